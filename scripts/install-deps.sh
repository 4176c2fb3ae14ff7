#!/usr/bin/env bash
# Installs what Tessera's tests need on a fresh Debian machine: system packages and tools.
# Safe to run again: each step is skipped when its tool is already there.
set -euo pipefail

need_apt=()
# (packages are added here by the subsystems that need them)
# store: PostgreSQL server for the stash's postgres backend tests.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    need_apt+=(postgresql)
fi

if ((${#need_apt[@]})); then
    echo "install-deps: apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# store: a local S3-compatible server for the stash's s3 backend tests.
if ! command -v s3s-fs >/dev/null 2>&1 && [[ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ]]; then
    echo "install-deps: cargo install s3s-fs 0.14.1 (about 1.5 min)"
    cargo install --quiet --locked s3s-fs --version 0.14.1 --features binary
fi

# cuda: NVRTC from PyPI, so that the CUDA kernels are compiled (to PTX) in CI without a GPU.
nvrtc_dir=/opt/tessera-nvrtc
if [[ ! -e $nvrtc_dir/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 ]]; then
    echo "install-deps: pip install nvidia-cuda-nvrtc-cu12 into $nvrtc_dir"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --target "$nvrtc_dir" nvidia-cuda-nvrtc-cu12
fi
