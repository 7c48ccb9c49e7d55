#!/usr/bin/env bash
# The run command: installs what is missing, builds `signpost`, and starts a local three-node
# cluster with generated certificates in ./signpost-dev (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
cargo build --release --locked --workspace --all-targets
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null || echo target)
exec "$target_dir/release/signpost" dev --dir "${SIGNPOST_DEV_DIR:-signpost-dev}" "$@"
