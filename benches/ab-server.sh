#!/usr/bin/env bash
# benches/ab-server.sh SERVER_BIN BENCH_BIN LABEL [bench args...]: one A/B point. Makes (once) a
# `signpost dev` directory in /tmp/ab-dev with benches/limits-throughput.toml, starts its three nodes
# with SERVER_BIN (an older build works: keys it does not know are dropped from the configs),
# runs BENCH_BIN bench --rate 0 --clients 32 against them, prints one line, stops them.
# Delete /tmp/ab-dev between servers of different versions (newer logs may not be readable).
# AB_NO_CHECKPOINTS=1 removes the nodes' audit checkpoint keys (A/B of the checkpoint rounds).
set -euo pipefail
SERVER=$1; BENCH=$2; LABEL=$3; shift 3
D=/tmp/ab-dev
if [ ! -f $D/client.toml ]; then
  rm -rf $D
  ( $BENCH dev --dir $D --base-port 7700 --limits "$(cd "$(dirname "$0")" && pwd)/limits-throughput.toml" > /tmp/ab-dev.log 2>&1 & echo $! > /tmp/ab-dev.pid )
  for i in $(seq 1 100); do grep -q "cluster is up" /tmp/ab-dev.log && break; sleep 0.3; done
  kill -TERM $(cat /tmp/ab-dev.pid); sleep 3; sed -i "/batch_proposals/d" $D/node*/config.toml
  # AB_NO_CHECKPOINTS=1: the nodes run without checkpoint keys (no checkpoint rounds).
  if [ -n "${AB_NO_CHECKPOINTS:-}" ]; then sed -i "/checkpoint_key/d" $D/node*/config.toml; fi
fi
pids=()
for n in 1 2 3; do
  $SERVER server --config $D/node$n/config.toml >> $D/node$n/server.log 2>&1 &
  pids+=($!)
done
trap 'kill -TERM ${pids[@]} 2>/dev/null; sleep 1; kill -KILL ${pids[@]} 2>/dev/null || true' EXIT
for i in $(seq 1 100); do $BENCH status --config $D/client.toml >/dev/null 2>&1 && break; sleep 0.3; done
sleep 1
$BENCH bench --config $D/client.toml --rate 0 --clients 32 --json "$@" 2>/dev/null | python3 -c "import json,sys; r=json.load(sys.stdin); print('$LABEL', r['workload'], 'records', r.get('records_per_resolve'), r['throughput_ops_s'], 'p50', r['p50_ms'], 'p99', r['p99_ms'], 'errors', r['errors'], r.get('errors_by_code'), r.get('first_error'))"
