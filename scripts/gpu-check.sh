#!/usr/bin/env bash
# GPU checks, in two halves because the GPU machine has no Rust toolchain:
#
#   scripts/gpu-check.sh build   # here: builds the CUDA test binary and example into gpu-carry/
#   scripts/gpu-check.sh run     # on the GPU machine, in a copy of the tree with gpu-carry/
#
# `run` finds the CUDA libraries (the toolkit, or the wheels of PyTorch's installation),
# runs the GPU tests with TESSERA_EXPECT_GPU=1 (a missing GPU is then a failure), then the
# GPU example and `tessera bench cuda --json`, then the same GEMMs in PyTorch with the
# ratio, and prints everything to record in BENCHMARKS.md; it exits non-zero if any step
# failed. Every step has a time limit (570 s in all), so one run fits the device tool's
# 600 s command limit even if a step hangs. With the device tool: build here, then run
# with `carry: ["gpu-carry"]`, `timeout_s: 600` and the command
# `scripts/gpu-check.sh run 2>&1 | tee $OUT/gpu-check.log`.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
build)
    cargo build --release --features cuda --example gpu --bin tessera
    # The executable of integration test $1 (cargo also lists the `tessera` binary it builds
    # for the tests among the artifacts: pick the test target by kind and name).
    test_executable() {
        cargo test --release --features cuda --test "$1" --no-run --message-format=json 2>/dev/null |
            python3 -c '
import json, sys
name = sys.argv[1]
found = [m["executable"] for m in map(json.loads, sys.stdin)
         if m.get("reason") == "compiler-artifact" and m.get("executable")
         and m["target"]["kind"] == ["test"] and m["target"]["name"] == name]
if len(found) != 1:
    sys.exit(f"gpu-check: expected one executable for test {name}, found {found}")
print(found[0])' "$1"
    }
    test_bin=$(test_executable gpu)
    placement_bin=$(test_executable placement)
    mkdir -p gpu-carry
    cp "$test_bin" gpu-carry/gpu-tests
    cp "$placement_bin" gpu-carry/placement-tests
    cp target/release/examples/gpu gpu-carry/gpu-example
    cp target/release/tessera gpu-carry/tessera
    # Without debug symbols the four fit the device tool's 64 MiB carry limit (~10 MB).
    strip gpu-carry/gpu-tests gpu-carry/placement-tests gpu-carry/gpu-example gpu-carry/tessera
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
    # cudarc (built for CUDA 12.8) loads `libX.so`, `libX.so.12`, `libX.so.11`, ... but not
    # `.so.13` (CUDA 13 wheels, in nvidia/cu13/lib) or NCCL's `.so.2`: give each library an
    # unversioned name. Checked on a machine without a GPU (2026-11-25): every cuBLAS,
    # cuBLASLt, cuSPARSE, NVRTC and NCCL function Tessera calls is exported by the CUDA 13.5
    # wheels (cuBLAS 13.10, cuSPARSE 12.9, NVRTC 13.5, NCCL 2.32 for CUDA 13), and NVRTC 13.0
    # and 13.5 compile every kernel (scripts/test.sh checks 13.0 in CI).
    links=$(mktemp -d)
    bench=$(mktemp)
    trap 'rm -rf "$links" "$bench"' EXIT
    for lib in cublas cublasLt cusparse nvrtc nccl; do
        for dir in "${libs[@]}"; do
            found=$(ls "$dir"/lib$lib.so.* 2>/dev/null | grep -v alt | sort -V | tail -1 || true)
            if [[ -n $found ]]; then
                ln -sf "$found" "$links/lib$lib.so"
                echo "lib$lib.so -> $found"
                break
            fi
        done
    done
    libs=("$links" "${libs[@]}")
    export LD_LIBRARY_PATH="$(IFS=:; echo "${libs[*]:-}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    # Each step runs under a time limit, so a hang (a driver or NCCL wait) costs only its
    # own limit of the device time and the later steps still run; the summary at the end
    # names every step that failed.
    failed=()
    step() {
        local name=$1 limit=$2 start=$SECONDS rc=0
        shift 2
        echo "--- $name (limit ${limit} s)"
        timeout --kill-after=10 "$limit" "$@" || rc=$?
        if ((rc == 124 || rc == 137)); then
            failed+=("$name (timed out after ${limit} s)")
        elif ((rc != 0)); then
            failed+=("$name (exit $rc)")
        fi
        echo "--- $name: exit $rc after $((SECONDS - start)) s"
    }
    step "GPU tests" 150 env TESSERA_EXPECT_GPU=1 gpu-carry/gpu-tests --test-threads=1
    # Real node processes on this machine report its GPU; GPU tasks run on them.
    step "placement tests" 90 env TESSERA_EXPECT_GPU=1 gpu-carry/placement-tests
    step "GPU example" 120 gpu-carry/gpu-example
    step "tessera bench cuda --json" 120 bash -c 'set -o pipefail; gpu-carry/tessera bench cuda --json | tee "$1"' bash "$bench"
    echo "--- PyTorch on the same GPU, for comparison (if installed)"
    BENCH="$bench" timeout 90 python3 - <<'PY' || echo "(PyTorch not available, or it failed)"
import json, os, time, torch
ours = {}
for line in open(os.environ["BENCH"]):
    try:
        row = json.loads(line)
        ours[row["bench"]] = row["value"]
    except (ValueError, KeyError):
        pass
torch.backends.cuda.matmul.allow_tf32 = False
for dtype, name in ((torch.float32, "cuda/gemm_f32_8192"), (torch.bfloat16, "cuda/gemm_bf16_8192")):
    a = torch.ones(8192, 8192, device="cuda", dtype=dtype)
    b = torch.ones(8192, 8192, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t = time.perf_counter(); a @ b; torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    times.sort()
    theirs = 2 * 8192**3 / times[5] / 1e12
    mine = ours.get(name)
    ratio = f", tessera {mine:.1f} = {100 * mine / theirs:.1f} % of torch" if mine else ""
    print(f"torch gemm {dtype} 8192^3: {theirs:.1f} TFLOP/s{ratio}")
PY
    if ((${#failed[@]})); then
        printf 'gpu-check: FAILED: %s\n' "${failed[@]}"
        exit 1
    fi
    echo "gpu-check: every step passed"
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
