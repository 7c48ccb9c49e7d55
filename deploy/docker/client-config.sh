#!/usr/bin/env bash
# Copies what a host-side `signpost` needs to talk to the compose cluster out of its `ca`
# volume: client.toml, ca/ca.crt, the admin signing key and a freshly issued admin client
# certificate (client certificates last 24 h, so run this again when it has expired).
# With --service NAME (repeatable) it also issues NAME's client certificate from the
# cluster's CA as NAME-cert.crt / NAME-cert.key; the service's signing key is made on the host
# with `signpost keygen` and bound with `signpost bind`.
#
#   deploy/docker/client-config.sh [--out DIR] [--service NAME]...
#   signpost status --config DIR/client.toml          (DIR defaults to deploy/docker/client)
#
# It runs the compose `certs` service's image with its volumes (the only place the CA key is),
# so it needs the cluster to have been started once with `up`.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out="$here/client"
services=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --service) services+=("$2"); shift 2 ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "client-config: unknown argument $1" >&2; exit 2 ;;
  esac
done
for s in "${services[@]}"; do
  # The name becomes a file name and a SPIFFE path segment: keep it to what both accept.
  [[ $s =~ ^[a-z0-9][a-z0-9._-]{0,62}$ ]] || { echo "client-config: bad service name $s" >&2; exit 2; }
done

# Compose v2 (`docker compose`) when present, else docker-compose 1.x.
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose -f "$here/compose.yaml")
else
  compose=(docker-compose -f "$here/compose.yaml")
fi

# Inside the container: re-issue the admin certificate, issue the services' certificates into
# a scratch directory, and stream the client directory to stdout as a tar archive (stdout
# carries only the archive; messages go to stderr).
# shellcheck disable=SC2016 # expanded by the container's bash, not here
script='set -euo pipefail
ca_root=/var/lib/signpost-ca
[ -e "$ca_root/.complete" ] || { echo "the cluster has no CA yet: run compose up first" >&2; exit 1; }
umask 077
signpost ca issue --admin admin --ca-dir "$ca_root/ca" --out "$ca_root/client/admin-cert" >&2
for s in "$@"; do
  signpost ca issue --service "$s" --ca-dir "$ca_root/ca" --out "$ca_root/client/$s-cert" >&2
done
tar -C "$ca_root/client" -cf - .'

mkdir -p "$out"
chmod 0700 "$out"
# --no-deps: only the certs container, not the nodes; -T: no TTY, so the archive is intact;
# the tmpfs is not needed because nothing is written outside the ca volume.
"${compose[@]}" run --rm -T --no-deps --entrypoint bash certs -c "$script" bash "${services[@]}" |
  tar -C "$out" -xf - --no-same-owner
echo "client-config: wrote $out/client.toml (admin certificate valid 24 h)${services[*]:+ and certificates for ${services[*]}}"
echo "  signpost status --config $out/client.toml"
