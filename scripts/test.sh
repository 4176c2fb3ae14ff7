#!/usr/bin/env bash
# Runs Tessera's whole test suite: installs what the tests need, then `cargo test`.
# Tests are built in release mode: the training and transfer tests do real work.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# The stash's remote backends (s3, postgres) are optional features so that the default
# build needs no network client; the suite turns them on so that their conformance tests
# run against the local servers that install-deps provides. `xla` runs the XLA executor
# tests on the PJRT CPU plugin that install-deps fetches; `ucx` runs the collectives tests
# over UCX too (Debian's libucx, installed by install-deps).
cargo test --release --all-targets --features s3,postgres,xla,ucx "$@"
cargo test --release --doc --features s3,postgres,xla,ucx "$@"
# README's first command, Tessera's main job end to end, must keep working (same features as
# above, so nothing is rebuilt).
cargo run --release --features s3,postgres,xla,ucx --example quickstart
# The map-reduce word count over 3 local node processes (its options for SSH and Slurm
# are tested for real in tests/managers.rs, through the same managers).
cargo run --release --features s3,postgres,xla,ucx --example cluster -- --local 3 README.md ARCHITECTURE.md
# The distributed-array tour: a least-squares fit and a product over 2 node processes,
# checked (it fails when the fit is off or the saved array does not load back equal).
cargo run --release --features s3,postgres,xla,ucx --example darray
# Sparse ML over 2 node processes: logistic regression on sparse features, by X·w and
# Xᵀ(p − y) task graphs (fails unless it reaches 95 % accuracy).
cargo run --release --features s3,postgres,xla,ucx --example sparse_logreg
# The stash tour: versions, a 256 MiB array with progress, and a mirror that survives a
# damaged and then a deleted replica (the example fails if any load or repair does).
cargo run --release --features s3,postgres,xla,ucx --example stash
# One model definition on the CPU executor and on XLA (the PJRT CPU plugin): the MLP and the
# CNN train to the same accuracy (the example fails otherwise).
cargo run --release --features s3,postgres,xla,ucx --example xla
# Every target builds and links with the CUDA feature on a machine without CUDA.
cargo test --release --features cuda --all-targets --no-run
# The CUDA feature without a GPU: discovery must say so, every kernel must compile to PTX
# and to sm_90/sm_80 machine code (NVRTC from PyPI, installed by install-deps), every
# kernel, run on the host as C++, must compute what the CPU executor computes, and the
# library's own tests (the cuBLAS call mapping and the launch signature check among them)
# pass with the feature on; with a stand-in driver library (tests/fake_driver.rs), a driver
# without a usable GPU is a clear reason and a device that cannot be opened an error, never
# a panic, in the `tessera` binary and its node processes. tests/gpu.rs then runs its GPU
# tests again on the host GPU (tests/support/gpu_on_host.rs: the driver, cuBLAS and NCCL on
# the CPU, kernels compiled as C++), kept in $host_gpu for the placement tests after it
# (node processes report that GPU and train replica actors on it) and the GPU tour.
host_gpu=$(mktemp -d)
trap 'rm -rf "$host_gpu"' EXIT
nvrtc12=/opt/tessera-nvrtc/nvidia/cuda_nvrtc/lib
LD_LIBRARY_PATH=$nvrtc12${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} TESSERA_HOST_GPU_DIR=$host_gpu \
    TESSERA_EXPECT_NVRTC=1 TESSERA_EXPECT_NVRTC_RELEASE=12 TESSERA_EXPECT_CXX=1 \
    cargo test --release --features cuda --lib --test gpu --test kernels_on_host --test fake_driver "$@"
if [[ -e $host_gpu/libcuda.so ]]; then # (not built when arguments filtered its test out)
    # (Two host devices: the replicas on two GPUs of one node, through NCCL, run too.)
    LD_LIBRARY_PATH=$host_gpu:$nvrtc12${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} TESSERA_EXPECT_GPU=1 \
        TESSERA_HOST_GPU_DEVICES=2 cargo test --release --features cuda --test placement "$@"
    # The GPU tour (examples/gpu.rs) at small sizes.
    LD_LIBRARY_PATH=$host_gpu:$nvrtc12${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
        cargo run --release --features cuda --example gpu -- --small
fi
# The same kernels (PTX and machine code) with CUDA 13's NVRTC, the version on the GPU
# machines.
LD_LIBRARY_PATH=/opt/tessera-nvrtc13/links:/opt/tessera-nvrtc13/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
    TESSERA_EXPECT_NVRTC=1 TESSERA_EXPECT_NVRTC_RELEASE=13.0 \
    cargo test --release --features cuda --test gpu "$@" every_kernel_compiles
# The GPU check scripts (they run only on a GPU machine) must at least parse.
bash -n scripts/gpu-check.sh
python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])' scripts/gpu_peers.py
