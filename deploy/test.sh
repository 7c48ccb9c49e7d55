#!/usr/bin/env bash
# The test command: installs what is missing, builds the `signpost` binary and the tests in one
# profile (release: RocksDB is compiled once), then checks formatting, lints and runs every test,
# including the integration tests against real processes of that binary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# Formatting and lints need the rustfmt and clippy components; say so if they are missing
# rather than fail the tests.
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
else
  echo "test: rustfmt is not installed (rustup component add rustfmt); skipping the format check" >&2
fi
# One feature resolution for everything (bins, tests, clippy): RocksDB is compiled once.
cargo build --release --locked --workspace --all-targets
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --release --locked --workspace --all-targets -- -D warnings
else
  echo "test: clippy is not installed (rustup component add clippy); skipping lints" >&2
fi
# Integration tests start three-node clusters; two at a time keeps a 2-core machine responsive.
cargo test --release --locked --workspace -- --test-threads=2
# Every fuzz target for a bounded time from the corpus in fuzz/corpus (nightly + cargo-fuzz).
bash deploy/fuzz.sh "${SIGNPOST_FUZZ_SECONDS:-45}"
