#!/usr/bin/env bash
# GPU checks, in two halves because the GPU machine has no Rust toolchain:
#
#   scripts/gpu-check.sh build          # here: builds the CUDA binaries into gpu-carry/
#   scripts/gpu-check.sh run [STEP...]  # on the GPU machine, in a copy of the tree with gpu-carry/
#
# `run` finds the CUDA libraries (the toolkit, or the wheels of PyTorch's installation),
# then runs these steps (all of them, or only the STEPs named, to rerun what failed):
#   tests      the GPU tests, with TESSERA_EXPECT_GPU=1 (a missing GPU is then a failure);
#              GPU_TEST_FILTER=NAME runs only the tests whose name contains NAME
#   placement  the placement tests: real node processes that report the GPU
#   example    examples/gpu.rs
#   bench      `tessera bench cuda --json`
#   peers      scripts/gpu_peers.py: the same figures measured with PyTorch, each beside
#              the bench's with the ratio (the bench's from this run, if it ran)
#   xla        (only when named) the XLA tests and `tessera bench xla --json` on the PJRT
#              plugin TESSERA_PJRT_PLUGIN names, else JAX's CUDA plugin found in Python's
#              site-packages (xla_cuda_plugin.so)
# It prints everything to record in BENCHMARKS.md and exits non-zero if any step failed.
# Every step has a time limit (570 s in all), so one run fits the device tool's 600 s
# command limit even if a step hangs. Where $OUT is set (the device tool), the bench's and
# PyTorch's JSON lines are also written there. With the device tool: build here, then run
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
        cargo test --release --features "${features:-cuda}" --test "$1" --no-run --message-format=json 2>/dev/null |
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
    # The `xla` step's binaries: XLA (through a GPU's PJRT plugin) beside CUDA. Built last:
    # they replace target/release/tessera with a build of both features.
    cargo build --release --features cuda,xla --bin tessera
    xla_bin=$(features=cuda,xla test_executable xla)
    cp "$xla_bin" gpu-carry/xla-tests
    cp target/release/tessera gpu-carry/tessera-xla
    # Without debug symbols the six fit the device tool's 64 MiB carry limit (~50 MB).
    strip gpu-carry/gpu-tests gpu-carry/placement-tests gpu-carry/gpu-example gpu-carry/tessera \
        gpu-carry/xla-tests gpu-carry/tessera-xla
    echo "built: $(ls gpu-carry)"
    ;;
run)
    all_steps=(tests placement example bench peers)
    steps=("${@:2}")
    ((${#steps[@]})) || steps=("${all_steps[@]}")
    for name in "${steps[@]}"; do
        [[ " ${all_steps[*]} xla " == *" $name "* ]] || { echo "gpu-check: unknown step $name (steps: ${all_steps[*]} xla)" >&2; exit 2; }
    done
    wanted() { [[ " ${steps[*]} " == *" $1 "* ]]; }
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
    trap 'rm -rf "$links"' EXIT
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
    # What Tessera itself finds (a node started here would report the same).
    gpu-carry/tessera devices || true
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
    out=${OUT:-$links}
    wanted tests && step "GPU tests" 150 env TESSERA_EXPECT_GPU=1 gpu-carry/gpu-tests --test-threads=1 ${GPU_TEST_FILTER:-}
    # Real node processes on this machine report its GPU; GPU tasks run on them.
    wanted placement && step "placement tests" 90 env TESSERA_EXPECT_GPU=1 gpu-carry/placement-tests
    wanted example && step "GPU example" 120 gpu-carry/gpu-example
    wanted bench && step "tessera bench cuda --json" 120 \
        bash -c 'set -o pipefail; gpu-carry/tessera bench cuda --json | tee "$1"' bash "$out/bench-cuda.json"
    ours=()
    [[ -s $out/bench-cuda.json ]] && ours=(--ours "$out/bench-cuda.json")
    wanted peers && step "PyTorch on the same GPU" 90 python3 scripts/gpu_peers.py "${ours[@]}" --json "$out/peers-torch.json"
    if wanted xla; then
        plugin=${TESSERA_PJRT_PLUGIN:-$(python3 -c '
import glob, site
roots = site.getsitepackages() + [site.getusersitepackages()]
print(next(iter(sorted(p for r in roots for p in glob.glob(r + "/jax_plugins/*/xla_cuda_plugin.so"))), ""))' 2>/dev/null || true)}
        if [[ -z $plugin ]]; then
            echo "--- xla: no PJRT plugin: set TESSERA_PJRT_PLUGIN, or install JAX's CUDA plugin"
            failed+=("xla (no plugin)")
        else
            echo "--- xla on the PJRT plugin $plugin"
            step "XLA tests" 150 env TESSERA_PJRT_PLUGIN="$plugin" gpu-carry/xla-tests --test-threads=1
            step "tessera bench xla --json" 150 env TESSERA_PJRT_PLUGIN="$plugin" \
                bash -c 'set -o pipefail; gpu-carry/tessera-xla bench xla --json | tee "$1"' bash "$out/bench-xla.json"
        fi
    fi
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
