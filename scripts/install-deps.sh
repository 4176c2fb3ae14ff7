#!/usr/bin/env bash
# Installs what Tessera's tests need on a fresh Debian machine: system packages and tools.
# Safe to run again: each step is skipped when its tool is already there.
set -euo pipefail

need_apt=()
# (packages are added here by the subsystems that need them)

if ((${#need_apt[@]})); then
    echo "install-deps: apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
