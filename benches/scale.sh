#!/usr/bin/env bash
# benches/scale.sh CLIENTS INSTANCES_PER_CLIENT: fills a fresh `signpost dev` (in /tmp/scale-dev,
# ports 7801-8003) with CLIENTS x INSTANCES registrations, then prints RSS per node, data size,
# snapshot size, stale resolve latency and the restart-to-ready time of node 3. SIGNPOST_BIN picks
# the binary. FORWARD=1 turns follower forwarding on and spreads the fill's clients over the
# nodes (a leader change under the fill's overload then costs no refusals). Stops what it started.
C=$1; K=$2; N=$((C*K))
B=${SIGNPOST_BIN:-/root/.cache/signpost/target/release/signpost}
D=/tmp/scale-dev
rm -rf $D; mkdir -p $D
# Genesis quotas sized for the fill: K instances per service, state up to 448 MiB.
$B dev --dir $D --base-port 7800 --limits "$(cd "$(dirname "$0")" && pwd)/limits-throughput.toml" \
  --instances-per-service-max $(( K > 1024 ? K : 1024 )) --state-mib-max 448 \
  ${FORWARD:+--forward-to-leader} > $D/dev.log 2>&1 & DEV=$!
trap 'kill -TERM $DEV; sleep 3; for f in $D/node*/pid; do kill -9 $(cat $f) 2>/dev/null || true; done' EXIT
for i in $(seq 1 150); do grep -q "cluster is up" $D/dev.log && break; sleep 0.2; done
rss() { ps -o rss= -p $(cat $D/node$1/pid) | tr -d ' '; }
sleep 2
echo "base RSS KiB: $(rss 1) $(rss 2) $(rss 3)"
t0=$(date +%s)
FILL_SECS=$(( N / 2000 + 60 )); [ $FILL_SECS -gt 600 ] && FILL_SECS=600
$B bench --config $D/client.toml --workload register --clients $C --instances $K --rate 0 --duration $FILL_SECS ${FORWARD:+--spread} --json 2>$D/fill.log > $D/fill.json
t1=$(date +%s)
python3 -c "import json; r=json.load(open('$D/fill.json')); print('fill: ops', r['ok'], 'ops/s', r['throughput_ops_s'], 'p99', r['p99_ms'], 'errors', r['errors'], r['first_error'])"
$B status --config $D/client.toml --json > $D/status.json
python3 - $D/status.json <<'PY'
import json,sys; s=json.load(open(sys.argv[1]))
print("status:", {k: s.get(k) for k in ("state_bytes","instances","services","commit_index","applied_index") if k in s})
PY
sleep 3
echo "RSS KiB after $N instances: $(rss 1) $(rss 2) $(rss 3)"
echo "data dir sizes: $(du -sm $D/node1/data | cut -f1) MiB (node1)"
$B snapshot --config $D/client.toml >/dev/null 2>&1 || true
sleep 2
grep -h "built snapshot" $D/node*/server.log | tail -3 | sed 's/.*snapshot=/snapshot=/' || true
# Resolve bench-0, which the fill gave K instances, from reader identities (resolving as
# bench-i would re-bind it with a new key and so empty it).
$B bench --config $D/client.toml --workload resolve --stale --clients 8 --rate 0 --duration 5 --resolve-service bench-0 --json 2>/dev/null | python3 -c "import json,sys; r=json.load(sys.stdin); print('stale resolve of bench-0 (%s records per answer): ops/s' % r.get('records_per_resolve'), r['throughput_ops_s'], 'p50', r['p50_ms'], 'p99', r['p99_ms'])"
# Restart: kill -9 node 3; dev starts it again after 1 s; time from its new pid to /readyz.
old=$(cat $D/node3/pid); kill -9 $old
for i in $(seq 1 400); do new=$(cat $D/node3/pid); [ "$new" != "$old" ] && break; sleep 0.01; done
ts=$(date +%s%N)
for i in $(seq 1 12000); do
  code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8003/readyz 2>/dev/null || true)
  [ "$code" = 200 ] && break; sleep 0.01
done
te=$(date +%s%N)
echo "restart to ready (node3, $N instances): $(( (te-ts)/1000000 )) ms; RSS after restart $(rss 3) KiB"
