#!/usr/bin/env bash
# Signpost against etcd on this machine, side by side, with one load generator.
#
#   benches/compare-etcd.sh [--quick] [--clients N] [--secs S] [--runs R] [--mix R:W:K]
#                           [--watch-rate W]
#
# Starts a three-member etcd cluster (Debian's etcd-server, installed if missing) and a
# three-node Signpost cluster (`signpost dev`) on loopback, both with mutual TLS on client and
# peer ports; runs each workload against each system in turn, alternating, R times, with
# `signpost bench` (--target etcd for etcd); then kills each leader with SIGKILL once and
# measures the write outage. Prints one table with both systems and their ratio; the last line
# is one JSON object with every figure. Everything it starts it stops, on any exit.
#
# Workloads: register (Put, and Put with a lease), linearizable and stale resolve (Range,
# serializable Range), mixed (--mix resolves:registrations:keep-alives per client, default
# 80:15:5) and watch (N watch streams, one writer at --watch-rate writes/s, default 200: the
# delay from each write's send to its event at every watcher).
#
# Signpost runs twice: with benches/limits-throughput.toml (per-identity admission rates raised
# far above what the generator sends) and with the default limits.
#
# --quick: 1 run of 5 s per workload, for a smoke test and CI (under three minutes).
# Default: 3 runs of 20 s, medians reported. SIGNPOST_BIN picks the binary; SIGNPOST_KEEP_TEST_DIRS=1
# keeps the working directory (configs, logs, every run's JSON).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}
BIN=${SIGNPOST_BIN:-$TARGET_DIR/release/signpost}
CLIENTS=32
SECS=20
RUNS=3
MIX=80:15:5
WATCH_RATE=200
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) SECS=5; RUNS=1 ;;
    --clients) CLIENTS=$2; shift ;;
    --secs) SECS=$2; shift ;;
    --runs) RUNS=$2; shift ;;
    --mix) MIX=$2; shift ;;
    --watch-rate) WATCH_RATE=$2; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "compare-etcd: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "compare-etcd: $*" >&2; }
die() { say "$*"; exit 1; }

[ -x "$BIN" ] || die "no signpost binary at $BIN: run 'cargo build --release --locked --workspace --all-targets' (with CARGO_TARGET_DIR=$TARGET_DIR) or set SIGNPOST_BIN"
command -v python3 >/dev/null || die "python3 is missing (apt-get install python3)"
command -v openssl >/dev/null || die "openssl is missing (apt-get install openssl)"
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian's etcd-server and etcd-client"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server etcd-client >/dev/null \
      || die "apt-get install etcd-server etcd-client failed"
  else
    die "etcd is missing: run 'apt-get install etcd-server etcd-client' as root"
  fi
fi

WORK=$(mktemp -d /tmp/signpost-compare.XXXXXX)
RESULTS=$WORK/results
mkdir -p "$RESULTS"
DEV_PID=""
# Loopback ports: etcd clients 23791-3, peers 23801-3; Signpost from 7600 (dev's layout).
BASE_PORT=7600
ETCD_CLIENT=(127.0.0.1:23791 127.0.0.1:23792 127.0.0.1:23793)
ETCD_PEER=(127.0.0.1:23801 127.0.0.1:23802 127.0.0.1:23803)
ETCD_ENDPOINTS=$(IFS=,; echo "${ETCD_CLIENT[*]}")

stop_dev() {
  if [ -n "$DEV_PID" ] && kill -0 "$DEV_PID" 2>/dev/null; then
    kill -TERM "$DEV_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$DEV_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$DEV_PID" 2>/dev/null || true
  fi
  DEV_PID=""
  # Nodes dev started and lost track of (it restarts killed nodes): stop them by pid file.
  for f in "$WORK"/signpost/node*/pid; do
    [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
}
cleanup() {
  stop_dev
  for f in "$WORK"/etcd/*.pid; do
    [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ "${SIGNPOST_KEEP_TEST_DIRS:-}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- etcd: certificates, three members -----------------------------------------------------
make_etcd_certs() {
  local d=$WORK/etcd-tls
  mkdir -p "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=compare-etcd CA" -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  for name in member client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -subj "/CN=$name" -keyout "$d/$name.key" -out "$d/$name.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' \
      > "$d/$name.ext"
    openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" \
      -CAcreateserial -days 2 -extfile "$d/$name.ext" -out "$d/$name.crt" 2>/dev/null
  done
}

etcd_member() {  # index (0-based)
  local i=$1 name="e$(( $1 + 1 ))" d=$WORK/etcd-tls cluster=""
  for j in 0 1 2; do cluster+="e$(( j + 1 ))=https://${ETCD_PEER[$j]},"; done
  etcd --name "$name" --data-dir "$WORK/etcd/$name" \
    --listen-client-urls "https://${ETCD_CLIENT[$i]}" --advertise-client-urls "https://${ETCD_CLIENT[$i]}" \
    --listen-peer-urls "https://${ETCD_PEER[$i]}" --initial-advertise-peer-urls "https://${ETCD_PEER[$i]}" \
    --initial-cluster "${cluster%,}" --initial-cluster-state new --initial-cluster-token compare-etcd \
    --client-cert-auth --trusted-ca-file "$d/ca.crt" --cert-file "$d/member.crt" --key-file "$d/member.key" \
    --peer-client-cert-auth --peer-trusted-ca-file "$d/ca.crt" --peer-cert-file "$d/member.crt" \
    --peer-key-file "$d/member.key" --logger zap --log-level error \
    >>"$WORK/etcd/$name.log" 2>&1 &
  # A pid file, not a variable: a member restarted inside a command substitution (a
  # subshell) must still be stopped by cleanup.
  echo $! > "$WORK/etcd/$name.pid"
  # Killed on purpose later: keep bash from reporting it.
  disown "$!"
}

etcdctl_() {
  ETCDCTL_API=3 etcdctl --cacert "$WORK/etcd-tls/ca.crt" --cert "$WORK/etcd-tls/client.crt" \
    --key "$WORK/etcd-tls/client.key" "$@"
}

start_etcd() {
  make_etcd_certs
  mkdir -p "$WORK/etcd"
  for i in 0 1 2; do etcd_member "$i"; done
  for _ in $(seq 1 150); do
    if etcdctl_ --endpoints "$ETCD_ENDPOINTS" --command-timeout=1s put /compare/ready 1 >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  die "etcd did not become ready; see $WORK/etcd/*.log"
}

# ---- Signpost: `signpost dev` ----------------------------------------------------------------
start_signpost() {  # limits file or "" for the defaults
  local limits=()
  [ -n "$1" ] && limits=(--limits "$1")
  "$BIN" dev --dir "$WORK/signpost" --base-port "$BASE_PORT" "${limits[@]}" \
    >>"$WORK/signpost-dev.log" 2>&1 &
  DEV_PID=$!
  for _ in $(seq 1 300); do
    grep -q "cluster is up" "$WORK/signpost-dev.log" 2>/dev/null && return 0
    kill -0 "$DEV_PID" 2>/dev/null || die "signpost dev exited; see $WORK/signpost-dev.log"
    sleep 0.2
  done
  die "signpost dev did not become ready; see $WORK/signpost-dev.log"
}

restart_signpost() {
  stop_dev
  : > "$WORK/signpost-dev.log"
  start_signpost "$1"
}

# ---- runs -----------------------------------------------------------------------------------
bench_signpost() {  # label workload [extra args...]
  local label=$1 workload=$2; shift 2
  bench_signpost_at "$label" "$workload" 0 "$@"
}
bench_signpost_at() {  # label workload rate [extra args...]
  local label=$1 workload=$2 rate=$3; shift 3
  "$BIN" bench --config "$WORK/signpost/client.toml" --workload "$workload" --clients "$CLIENTS" \
    --rate "$rate" --duration "$SECS" --json "$@" >"$RESULTS/$label.$RUN.json" 2>>"$WORK/bench.log" \
    || die "signpost bench $label failed; see $WORK/bench.log"
}
bench_etcd() {  # label workload [extra args...]
  local label=$1 workload=$2; shift 2
  bench_etcd_at "$label" "$workload" 0 "$@"
}
bench_etcd_at() {  # label workload rate [extra args...]
  local label=$1 workload=$2 rate=$3; shift 3
  "$BIN" bench --target etcd --endpoints "$ETCD_ENDPOINTS" --etcd-ca "$WORK/etcd-tls/ca.crt" \
    --etcd-cert "$WORK/etcd-tls/client.crt" --etcd-key "$WORK/etcd-tls/client.key" \
    --workload "$workload" --clients "$CLIENTS" --rate "$rate" --duration "$SECS" --json "$@" \
    >"$RESULTS/$label.$RUN.json" 2>>"$WORK/bench.log" \
    || die "etcd bench $label failed; see $WORK/bench.log"
}

etcd_failover_ms() {
  # The leader is the member whose status names itself as leader.
  local leader="" i
  for i in 0 1 2; do
    if etcdctl_ --endpoints "${ETCD_CLIENT[$i]}" endpoint status -w json 2>/dev/null \
      | python3 -c 'import json,sys; s=json.load(sys.stdin)[0]["Status"]; sys.exit(0 if s["leader"]==s["header"]["member_id"] else 1)'; then
      leader=$i
    fi
  done
  [ -n "$leader" ] || die "no etcd leader found"
  local others=()
  for i in 0 1 2; do [ "$i" != "$leader" ] && others+=("${ETCD_CLIENT[$i]}"); done
  local ep; ep=$(IFS=,; echo "${others[*]}")
  local start end
  start=$(date +%s%N)
  kill -KILL "$(cat "$WORK/etcd/e$(( leader + 1 )).pid")"
  for _ in $(seq 1 600); do
    if etcdctl_ --endpoints "$ep" --command-timeout=1s put /compare/failover x >/dev/null 2>&1; then
      end=$(date +%s%N)
      echo $(( (end - start) / 1000000 ))
      # Bring the killed member back (its data directory makes it rejoin).
      etcd_member "$leader"
      return 0
    fi
    sleep 0.02
  done
  die "etcd took no write within 30 s of losing its leader"
}

signpost_failover_ms() {
  "$BIN" ca issue --ca-dir "$WORK/signpost/ca" --service compare-drill \
    --out "$WORK/signpost/compare-drill" >/dev/null 2>&1 \
    || die "cannot issue the drill's certificate"
  "$BIN" drill --target dev --dir "$WORK/signpost" --config "$WORK/signpost/client.toml" \
    --fault kill --fault-secs 2 --settle-secs 2 --service compare-drill \
    --service-cert "$WORK/signpost/compare-drill" --json \
    >"$RESULTS/signpost-drill.json" 2>>"$WORK/bench.log" || die "signpost drill failed; see $WORK/bench.log"
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["faults"][0]["write_outage_ms"])' \
    "$RESULTS/signpost-drill.json"
}

say "working in $WORK; $RUNS run(s) of ${SECS} s per workload, $CLIENTS closed-loop clients"
start_etcd
start_signpost "$ROOT/benches/limits-throughput.toml"
say "both clusters are up"

for RUN in $(seq 1 "$RUNS"); do
  say "run $RUN/$RUNS: register"
  bench_signpost signpost_register register
  bench_etcd etcd_put register
  bench_etcd etcd_put_lease register --lease
  say "run $RUN/$RUNS: linearizable resolve"
  bench_signpost signpost_resolve resolve
  bench_etcd etcd_range resolve
  say "run $RUN/$RUNS: stale resolve"
  bench_signpost signpost_resolve_stale resolve --stale
  bench_etcd etcd_range_serializable resolve --stale
  say "run $RUN/$RUNS: mixed $MIX (resolve:register:keep-alive)"
  bench_signpost signpost_mixed mixed --mix "$MIX"
  bench_etcd etcd_mixed mixed --mix "$MIX"
  say "run $RUN/$RUNS: watch fan-out, one writer at $WATCH_RATE/s, $CLIENTS watchers"
  bench_signpost_at signpost_watch watch "$WATCH_RATE"
  bench_etcd_at etcd_watch watch "$WATCH_RATE"
done

say "failover: kill -9 of each leader"
ETCD_FAILOVER=$(etcd_failover_ms)
SIGNPOST_FAILOVER=$(signpost_failover_ms)

say "Signpost again with the default admission limits"
restart_signpost ""
for RUN in $(seq 1 "$RUNS"); do
  bench_signpost signpost_default_register register
  bench_signpost signpost_default_resolve resolve
done

python3 - "$RESULTS" "$ETCD_FAILOVER" "$SIGNPOST_FAILOVER" "$CLIENTS" "$SECS" "$RUNS" <<'PY'
import glob, json, os, statistics, sys

results, etcd_fo, sp_fo, clients, secs, runs = sys.argv[1:]

def runs_of(label):
    out = []
    for path in sorted(glob.glob(os.path.join(results, label + ".*.json"))):
        with open(path) as f:
            out.append(json.load(f))
    return out

def med(label, key):
    values = [r[key] for r in runs_of(label)]
    return statistics.median(values) if values else 0.0

def errors(label):
    return sum(r["errors"] for r in runs_of(label))

def op(label, name, key):
    values = [r["ops"][name][key] for r in runs_of(label) if name in r.get("ops", {})]
    return statistics.median(values) if values else 0.0

rows = [
    ("register vs Put", "signpost_register", "etcd_put"),
    ("register vs Put with a lease", "signpost_register", "etcd_put_lease"),
    ("linearizable resolve vs Range", "signpost_resolve", "etcd_range"),
    ("stale resolve vs serializable Range", "signpost_resolve_stale", "etcd_range_serializable"),
    ("register, default limits, vs Put", "signpost_default_register", "etcd_put"),
    ("resolve, default limits, vs Range", "signpost_default_resolve", "etcd_range"),
    ("mixed (all operations)", "signpost_mixed", "etcd_mixed"),
    ("watch events delivered (p99 = delay)", "signpost_watch", "etcd_watch"),
]
print(f"{clients} closed-loop clients, {runs} run(s) of {secs} s, medians; p99 in ms")
print(f"{'workload':<38} {'signpost/s':>11} {'p99':>7} {'etcd/s':>9} {'p99':>7} {'ratio':>6} {'errors s/e':>11}")
for name, s, e in rows:
    so, eo = med(s, "throughput_ops_s"), med(e, "throughput_ops_s")
    print(f"{name:<38} {so:>11.0f} {med(s, 'p99_ms'):>7.1f} {eo:>9.0f} {med(e, 'p99_ms'):>7.1f} "
          f"{so / max(eo, 1e-9):>6.2f} {errors(s):>5}/{errors(e):<5}")
for name in ("resolve", "register", "keepalive"):
    so, eo = op("signpost_mixed", name, "ops_s"), op("etcd_mixed", name, "ops_s")
    print(f"{'  mixed: ' + name:<38} {so:>11.0f} {op('signpost_mixed', name, 'p99_ms'):>7.1f} "
          f"{eo:>9.0f} {op('etcd_mixed', name, 'p99_ms'):>7.1f} {so / max(eo, 1e-9):>6.2f}")
print(f"{'  watch: events missing':<38} {med('signpost_watch', 'events_missing'):>11.0f} {'':>7} "
      f"{med('etcd_watch', 'events_missing'):>9.0f}")
print(f"{'write outage after kill -9 of the leader':<38} {int(sp_fo):>9} ms {int(etcd_fo):>7} ms")

SIGNPOST_LABELS = ("signpost_register", "signpost_resolve", "signpost_resolve_stale", "signpost_mixed", "signpost_watch")
ETCD_LABELS = ("etcd_put", "etcd_put_lease", "etcd_range", "etcd_range_serializable", "etcd_mixed", "etcd_watch")
summary = {
    "clients": int(clients), "secs": int(secs), "runs": int(runs),
    "signpost_register_ops_s": med("signpost_register", "throughput_ops_s"),
    "signpost_register_p99_ms": med("signpost_register", "p99_ms"),
    "etcd_put_ops_s": med("etcd_put", "throughput_ops_s"),
    "etcd_put_p99_ms": med("etcd_put", "p99_ms"),
    "etcd_put_lease_ops_s": med("etcd_put_lease", "throughput_ops_s"),
    "register_ratio": round(med("signpost_register", "throughput_ops_s") / max(med("etcd_put", "throughput_ops_s"), 1e-9), 3),
    "signpost_resolve_ops_s": med("signpost_resolve", "throughput_ops_s"),
    "signpost_resolve_p99_ms": med("signpost_resolve", "p99_ms"),
    "etcd_range_ops_s": med("etcd_range", "throughput_ops_s"),
    "etcd_range_p99_ms": med("etcd_range", "p99_ms"),
    "resolve_ratio": round(med("signpost_resolve", "throughput_ops_s") / max(med("etcd_range", "throughput_ops_s"), 1e-9), 3),
    "signpost_stale_resolve_ops_s": med("signpost_resolve_stale", "throughput_ops_s"),
    "etcd_serializable_range_ops_s": med("etcd_range_serializable", "throughput_ops_s"),
    "signpost_default_register_ops_s": med("signpost_default_register", "throughput_ops_s"),
    "signpost_default_resolve_ops_s": med("signpost_default_resolve", "throughput_ops_s"),
    "signpost_ok": sum(r["ok"] for l in SIGNPOST_LABELS for r in runs_of(l)),
    "signpost_errors": sum(errors(l) for l in SIGNPOST_LABELS),
    "etcd_ok": sum(r["ok"] for l in ETCD_LABELS for r in runs_of(l)),
    "etcd_errors": sum(errors(l) for l in ETCD_LABELS),
    "signpost_mixed_ops_s": med("signpost_mixed", "throughput_ops_s"),
    "etcd_mixed_ops_s": med("etcd_mixed", "throughput_ops_s"),
    "mixed_ratio": round(med("signpost_mixed", "throughput_ops_s") / max(med("etcd_mixed", "throughput_ops_s"), 1e-9), 3),
    "signpost_watch_events_s": med("signpost_watch", "throughput_ops_s"),
    "signpost_watch_p50_ms": med("signpost_watch", "p50_ms"),
    "signpost_watch_p99_ms": med("signpost_watch", "p99_ms"),
    "signpost_watch_missing": sum(r["events_missing"] for r in runs_of("signpost_watch")),
    "etcd_watch_events_s": med("etcd_watch", "throughput_ops_s"),
    "etcd_watch_p50_ms": med("etcd_watch", "p50_ms"),
    "etcd_watch_p99_ms": med("etcd_watch", "p99_ms"),
    "etcd_watch_missing": sum(r["events_missing"] for r in runs_of("etcd_watch")),
    "signpost_failover_ms": int(sp_fo),
    "etcd_failover_ms": int(etcd_fo),
}
print(json.dumps(summary, sort_keys=True))
PY
