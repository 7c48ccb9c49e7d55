#!/usr/bin/env bash
# The test command: installs what is missing, builds the `signpost` binary and the tests in one
# profile (release: RocksDB is compiled once), then checks formatting, lints and runs every test,
# including the integration tests against real processes of that binary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
cargo fmt --all -- --check
# One feature resolution for everything (bins, tests, clippy): RocksDB is compiled once.
cargo build --release --locked --workspace --all-targets
cargo clippy --release --locked --workspace --all-targets -- -D warnings
# Integration tests start three-node clusters; two at a time keeps a 2-core machine responsive.
cargo test --release --locked --workspace -- --test-threads=2
