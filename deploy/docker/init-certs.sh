#!/usr/bin/env bash
# The compose `certs` step (run once, before the nodes start): a CA, a certificate and a
# config for each node, an admin signing key and a client config for the host.
#
# Volumes (see compose.yaml):
#   /var/lib/signpost-ca      the CA (its private key), the admin key, client material; only
#                             this step and deploy/docker/client-config.sh mount it
#   /out/node1 .. /out/node3  one per node, mounted read-only at /etc/signpost in that node:
#                             config.toml, node.crt, node.key, ca.crt, crl.pem
# so no node holds the CA key or another node's key.
#
# Runs as root with only CAP_CHOWN: fresh volumes are owned by root, and the nodes' files must
# end up owned by the nodes' uid (10001) because private keys are 0600.
#
# Idempotent: when /var/lib/signpost-ca/.complete exists it does nothing, so `up` after `up`
# keeps the same CA, keys and cluster. A run that died half-way left no .complete and nothing
# that a node has used (nodes start only after this step succeeds): it starts over.
set -euo pipefail

ca_root=/var/lib/signpost-ca
uid=10001
trust_domain="${SIGNPOST_TRUST_DOMAIN:-signpost.local}"
# The nodes' fixed addresses on the compose network, in node id order (compose.yaml sets them).
read -r -a ips <<<"${SIGNPOST_NODE_IPS:?set SIGNPOST_NODE_IPS to the node addresses}"
client_port=7001
raft_port=7002
metrics_port=7003

if [ -e "$ca_root/.complete" ]; then
  echo "certs: already initialized (trust domain $(cat "$ca_root/trust-domain")); nothing to do"
  exit 0
fi

echo "certs: initializing a CA for trust domain $trust_domain and ${#ips[@]} nodes"
rm -rf "${ca_root:?}"/* "$ca_root"/.complete
for i in $(seq 1 "${#ips[@]}"); do
  [ -d "/out/node$i" ] || { echo "certs: /out/node$i is not mounted" >&2; exit 1; }
  rm -rf "/out/node$i"/*
done
umask 077

signpost ca init --ca-dir "$ca_root/ca" --trust-domain "$trust_domain"
echo "$trust_domain" >"$ca_root/trust-domain"

# The genesis admin key: its public half goes into every node's [bootstrap] and into the
# client config's [trust]; the secret half stays here (and on the host, via client-config.sh).
mkdir -p "$ca_root/client/ca"
signpost keygen --out "$ca_root/client/admin.key"
admin_pub=$(tr -d '[:space:]' <"$ca_root/client/admin.key.pub")

members=""
endpoints=""
for i in $(seq 1 "${#ips[@]}"); do
  ip=${ips[$((i - 1))]}
  members+=$'\n'"[[members]]"$'\n'"id = $i"$'\n'"client_addr = \"$ip:$client_port\""$'\n'"raft_addr = \"$ip:$raft_port\""$'\n'
  endpoints+="${endpoints:+, }\"$ip:$client_port\""
done

for i in $(seq 1 "${#ips[@]}"); do
  ip=${ips[$((i - 1))]}
  out="/out/node$i"
  # --dns/--ip: third-party tools (grpcurl, grpc_health_probe) check the server's name;
  # Signpost's own peers and clients check the SPIFFE id.
  signpost ca issue --node "$i" --ca-dir "$ca_root/ca" --out "$out/node" \
    --dns "node$i" --dns localhost --ip "$ip" --ip 127.0.0.1
  cp "$ca_root/ca/ca.crt" "$ca_root/ca/crl.pem" "$out/"
  # The node's audit checkpoint key; its public half goes to the client directory, for the
  # admin to bind (`signpost bind signpost.checkpoint --pubkey checkpoint-node1.pub ...`).
  signpost keygen --out "$out/checkpoint.key"
  cp "$out/checkpoint.key.pub" "$ca_root/client/checkpoint-node$i.pub"
  # The node listens on its own compose address, which is also what the other nodes and the
  # host dial: Raft admits connections only from the members' addresses, so listen ==
  # advertised keeps that check exact. The metrics listener serves /readyz to the
  # healthcheck (127.0.0.1) and /metrics to a scraper on the compose network.
  cat >"$out/config.toml" <<EOF
# Written by deploy/docker/init-certs.sh (the compose certs step).
node_id = $i
data_dir = "/var/lib/signpost/data"
client_addr = "$ip:$client_port"
raft_addr = "$ip:$raft_port"
metrics_addr = "0.0.0.0:$metrics_port"
trust_domain = "$trust_domain"

[tls]
ca = "ca.crt"
cert = "node.crt"
key = "node.key"
crl = "crl.pem"
$members
[bootstrap]
admin_keys = ["$admin_pub"]
admin_threshold = 1

[audit]
checkpoint_key = "checkpoint.key"
EOF
  chmod 0644 "$out/config.toml" "$out/node.crt" "$out/ca.crt" "$out/crl.pem" "$out/checkpoint.key.pub"
  chmod 0600 "$out/node.key" "$out/checkpoint.key"
  chmod 0755 "$out"
  chown -R "$uid:$uid" "$out"
done

# The host's client config: the nodes' compose addresses are reachable from the host through
# the bridge network. Paths are relative to client.toml, so the directory can be copied out.
cp "$ca_root/ca/ca.crt" "$ca_root/client/ca/ca.crt"
signpost ca issue --admin admin --ca-dir "$ca_root/ca" --out "$ca_root/client/admin-cert"
cat >"$ca_root/client/client.toml" <<EOF
# Written by deploy/docker/init-certs.sh; deploy/docker/client-config.sh copies it to the host.
endpoints = [$endpoints]
trust_domain = "$trust_domain"
admin_key = "admin.key"

[tls]
ca = "ca/ca.crt"
cert = "admin-cert.crt"
key = "admin-cert.key"

[trust]
admin_keys = ["$admin_pub"]
admin_threshold = 1
EOF

touch "$ca_root/.complete"
echo "certs: done; admin public key $admin_pub"
