#!/usr/bin/env bash
# GPU checks, in two halves because the GPU machine has no Rust toolchain:
#
#   scripts/gpu-check.sh build   # here: builds the CUDA test binary and example into gpu-carry/
#   scripts/gpu-check.sh run     # on the GPU machine, in a copy of the tree with gpu-carry/
#
# `run` finds the CUDA libraries (the toolkit, or the wheels of PyTorch's installation),
# runs the GPU tests with TESSERA_EXPECT_GPU=1 (a missing GPU is then a failure), then the
# GPU example, and prints everything to record in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
build)
    cargo build --release --features cuda --example gpu --bin tessera
    test_bin=$(cargo test --release --features cuda --test gpu --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys; print([json.loads(l)["executable"] for l in sys.stdin if "\"executable\":\"" in l][-1])')
    mkdir -p gpu-carry
    cp "$test_bin" gpu-carry/gpu-tests
    cp target/release/examples/gpu gpu-carry/gpu-example
    cp target/release/tessera gpu-carry/tessera
    echo "built: $(ls gpu-carry)"
    ;;
run)
    libs=()
    for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        [[ -d $dir ]] && libs+=("$dir")
    done
    while IFS= read -r dir; do libs+=("$dir"); done < <(
        python3 - <<'PY' 2>/dev/null || true
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    for lib in glob.glob(os.path.join(root, "nvidia", "*", "lib")):
        print(lib)
PY
    )
    export LD_LIBRARY_PATH="$(IFS=:; echo "${libs[*]:-}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    TESSERA_EXPECT_GPU=1 gpu-carry/gpu-tests --test-threads=1
    gpu-carry/gpu-example
    echo "--- tessera bench cuda --json"
    gpu-carry/tessera bench cuda --json
    echo "--- PyTorch on the same GPU, for comparison (if installed)"
    python3 - <<'PY' || echo "(PyTorch not available)"
import time, torch
for dtype in (torch.float32, torch.bfloat16):
    a = torch.ones(8192, 8192, device="cuda", dtype=dtype)
    b = torch.ones(8192, 8192, device="cuda", dtype=dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    a @ b; torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t = time.perf_counter(); a @ b; torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    times.sort()
    print(f"torch gemm {dtype} 8192^3: {2 * 8192**3 / times[5] / 1e12:.1f} TFLOP/s")
PY
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
