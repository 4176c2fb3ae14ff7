#!/usr/bin/env bash
# Runs Tessera's whole test suite: installs what the tests need, then `cargo test`.
# Tests are built in release mode: the training and transfer tests do real work.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# The stash's remote backends (s3, postgres) are optional features so that the default
# build needs no network client; the suite turns them on so that their conformance tests
# run against the local servers that install-deps provides.
cargo test --release --all-targets --features s3,postgres "$@"
cargo test --release --doc --features s3,postgres "$@"
