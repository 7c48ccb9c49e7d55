#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time with libFuzzer, starting from
# and adding to the corpus kept in fuzz/corpus. Usage: deploy/fuzz.sh [SECONDS_PER_TARGET]
# (default 60). Needs the nightly toolchain (cargo-fuzz builds with sanitizers) and installs
# cargo-fuzz from crates.io if it is missing. Exits non-zero if any target finds a crash.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz: the nightly Rust toolchain is missing (rustup toolchain install nightly); cargo-fuzz needs it" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz >/dev/null
fi

# Fuzz builds (nightly, sanitizers) get their own cached target directory.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/signpost/fuzz-target}"
targets=(envelope admin_set binding raft_rpc snapshot_load)
cargo +nightly fuzz build --release
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  log="$(mktemp)"
  # -max_len bounds inputs to what the services accept (envelopes are at most 16 KiB).
  if ! cargo +nightly fuzz run --release "$target" "corpus/$target" -- \
      -max_total_time="$seconds" -max_len=16384 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz: $target FAILED (crash input under fuzz/artifacts/$target)" >&2
    exit 1
  fi
  runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
  echo "fuzz: $target ok: $runs executions in ${seconds} s, corpus $(ls "corpus/$target" | wc -l) inputs"
  rm -f "$log"
done
