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
# cuda: a C++20 compiler runs the NVRTC kernels on the host (tests/kernels_on_host.rs).
if ! command -v c++ >/dev/null 2>&1; then
    need_apt+=(g++)
fi

# xla: libclang and clang's own headers (stddef.h) for bindgen, which generates the PJRT C
# API bindings at build time.
if ! dpkg -s libclang-dev >/dev/null 2>&1; then
    need_apt+=(libclang-dev)
fi
# ucx: UCX's headers and libraries (UcxGroup), and its tools (ucx_info).
if ! dpkg -s libucx-dev >/dev/null 2>&1 || ! command -v ucx_info >/dev/null 2>&1; then
    need_apt+=(libucx-dev ucx-utils)
fi
# cluster managers: a throwaway sshd (and ssh-keygen) for the SSH manager's test, and a
# throwaway Slurm cluster (munge, slurmctld, two slurmd, srun) for the Slurm manager's
# (tests/managers.rs starts and stops them; none runs as a service).
if [[ ! -x /usr/sbin/sshd ]] || ! command -v ssh-keygen >/dev/null 2>&1; then
    need_apt+=(openssh-server)
fi
if [[ ! -x /usr/sbin/slurmctld || ! -x /usr/sbin/slurmd || ! -x /usr/sbin/munged ]] || ! command -v srun >/dev/null 2>&1; then
    need_apt+=(slurmctld slurmd slurm-client munge)
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

# xla: the CPU PJRT plugin from PyPI (a shared library exporting `GetPjrtApi`, with the
# PJRT C API header it was built against). build.rs binds that header; never committed.
pjrt_dir=/opt/tessera-pjrt
if [[ ! -e $pjrt_dir/xla_plugins/xla_cpu_pjrt/xla_cpu_pjrt.so ]]; then
    echo "install-deps: xla-cpu-pjrt 0.0.1 (PJRT CPU plugin) into $pjrt_dir"
    pjrt_tmp=$(mktemp -d)
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$pjrt_tmp" xla-cpu-pjrt==0.0.1
    mkdir -p "$pjrt_dir"
    python3 -m zipfile -e "$pjrt_tmp"/xla_cpu_pjrt-0.0.1-*.whl "$pjrt_dir"
    rm -rf "$pjrt_tmp"
fi

# cuda: NVRTC from PyPI, so that the CUDA kernels are compiled (to PTX) in CI without a GPU.
nvrtc_dir=/opt/tessera-nvrtc
if [[ ! -e $nvrtc_dir/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 ]]; then
    echo "install-deps: pip install nvidia-cuda-nvrtc-cu12 into $nvrtc_dir"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --target "$nvrtc_dir" nvidia-cuda-nvrtc-cu12
fi
# The GPU machines run CUDA 13, whose NVRTC drops the pre-Turing targets: compile every
# kernel with it too. cudarc (built for 12.8) looks for `libnvrtc.so` and `.so.12`, not
# `.so.13`, so give it the unversioned name.
nvrtc13_dir=/opt/tessera-nvrtc13
if [[ ! -e $nvrtc13_dir/nvidia/cu13/lib/libnvrtc.so.13 ]]; then
    echo "install-deps: pip install nvidia-cuda-nvrtc 13.0 into $nvrtc13_dir"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --target "$nvrtc13_dir" "nvidia-cuda-nvrtc==13.0.*"
fi
mkdir -p "$nvrtc13_dir/links"
ln -sf "$nvrtc13_dir/nvidia/cu13/lib/libnvrtc.so.13" "$nvrtc13_dir/links/libnvrtc.so"
