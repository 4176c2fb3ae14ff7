#!/usr/bin/env bash
# Runs Tessera's whole test suite: installs what the tests need, then `cargo test`.
# Tests are built in release mode: the training and transfer tests do real work.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --release --all-targets "$@"
cargo test --release --doc "$@"
