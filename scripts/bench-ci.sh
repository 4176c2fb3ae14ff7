#!/usr/bin/env bash
# The benchmarking CI: judges a change against main by running `tessera bench` suites with
# both builds on this machine, then `tessera bench-compare` on their figures.
#
#   scripts/bench-ci.sh [--base REF] [--runs N] [--threshold PCT] [--out DIR] [SUITE...]
#
#   --base REF       what the change is judged against (default: where HEAD left main)
#   --runs N         runs of each suite with each build (default 5), interleaved
#   --threshold PCT  how much worse a bench's median may get (default 10)
#   --out DIR        where the figures, logs and report go (default target/bench-ci/out)
#   --settle S       wait up to S seconds (default 120) after the builds for the load
#                    average to fall below half the cores before the first run
#   --base-bin PATH, --head-bin PATH
#                    use these `tessera` binaries instead of building them
#   SUITE...         the suites to run (default: every CPU suite, about 3.5 min a run
#                    for each build on 2 cores: 35 min in all with 5 runs)
#
# The head is the working tree, uncommitted changes included. The base is built in a git
# worktree under target/bench-ci/ with a target directory of its own, so that switching
# between the two does not rebuild either from scratch. Runs alternate base and head (and
# which goes first), so that drifting load on the machine affects both alike. A bench fails
# the change only when its median is worse than the threshold and every run of the head is
# worse than every run of the base (see `tessera bench-compare --help`). Exit status: 0 when
# nothing regressed, 1 when a bench regressed or a suite failed with the head's build.
# The report (DIR/report.md) is a Markdown table to paste into a review. Run it on a quiet
# machine: with 5 runs a side, a bench whose runs vary by more than the threshold still
# fails only if all 5 head runs fall beyond all 5 base runs (1 chance in 252 by luck alone);
# the report warns when the machine was busy.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

base_ref=
runs=5
threshold=10
out=target/bench-ci/out
settle=120
base_bin=
head_bin=
suites=()
while (($#)); do
    case $1 in
    --base | --runs | --threshold | --out | --settle | --base-bin | --head-bin)
        (($# >= 2)) || { echo "bench-ci: $1 needs a value (see --help)" >&2; exit 2; } ;;&
    --base) base_ref=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --threshold) threshold=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --settle) settle=$2; shift 2 ;;
    --base-bin) base_bin=$2; shift 2 ;;
    --head-bin) head_bin=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "bench-ci: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) suites+=("$1"); shift ;;
    esac
done
((${#suites[@]})) || suites=(tasks sched cluster darray collectives nn train pipeline store)
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "bench-ci: --runs takes a whole number above 0, not $runs" >&2; exit 2; }
[[ $settle =~ ^[0-9]+$ ]] || { echo "bench-ci: --settle takes whole seconds, not $settle" >&2; exit 2; }
say() { echo "[bench-ci $(date +%H:%M:%S)] $*" >&2; }

mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
rm -f "$out/base.jsonl" "$out/head.jsonl" "$out/report.md" "$out"/logs/*

if [[ -z $head_bin ]]; then
    say "building the head (the working tree)"
    cargo build --release --bin tessera
    head_bin=$root/target/release/tessera
fi
if [[ -z $base_bin ]]; then
    if [[ -z $base_ref ]]; then
        main=main
        git rev-parse -q --verify origin/main >/dev/null && main=origin/main
        base_ref=$(git merge-base HEAD "$main") || { echo "bench-ci: HEAD shares no history with $main; name a --base" >&2; exit 2; }
    fi
    base_commit=$(git rev-parse --verify "$base_ref^{commit}") || { echo "bench-ci: no commit $base_ref" >&2; exit 2; }
    if [[ $base_commit == $(git rev-parse HEAD) ]] && git diff --quiet HEAD; then
        say "the head is the base ($base_ref, no uncommitted change): this measures the noise only"
    fi
    tree=$root/target/bench-ci/base-tree
    if [[ -e $tree/.git ]]; then
        git -C "$tree" checkout -q --force --detach "$base_commit"
    else
        git worktree prune
        git worktree add -q --detach "$tree" "$base_commit"
    fi
    say "building the base, $(git log -1 --format='%h %s' "$base_commit")"
    (cd "$tree" && CARGO_TARGET_DIR=$root/target/bench-ci/base-target cargo build --release --bin tessera)
    base_bin=$root/target/bench-ci/base-target/release/tessera
    base_dir=$tree
else
    base_dir=$root
fi
for bin in "$base_bin" "$head_bin"; do
    [[ -x $bin ]] || { echo "bench-ci: $bin is not an executable" >&2; exit 2; }
done

# busy [LOAD]: whether a load average (default: the one now) is above half the cores.
busy() { awk -v load="${1:-$(cut -d' ' -f1 /proc/loadavg)}" -v cores="$(nproc)" 'BEGIN { exit !(load > cores / 2) }'; }
# The builds leave the one-minute load average high for a while after they end.
waited=0
while busy && ((waited < settle)); do
    if ((waited == 0)); then
        say "waiting up to $settle s for the load average ($(cut -d' ' -f1 /proc/loadavg)) to fall below $(nproc)/2"
    fi
    sleep 5
    waited=$((waited + 5))
done
load_before=$(cut -d' ' -f1 /proc/loadavg)
say "load average before the runs: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
failed=()
# run_suite SIDE SUITE RUN: one suite with one build, its JSON lines appended to SIDE.jsonl.
run_suite() {
    local side=$1 suite=$2 run=$3 bin dir start=$SECONDS rc=0
    if [[ $side == base ]]; then bin=$base_bin dir=$base_dir; else bin=$head_bin dir=$root; fi
    local log=$out/logs/$suite-$side-$run
    (cd "$dir" && timeout --kill-after=10 1800 "$bin" bench "$suite" --json >"$log.jsonl" 2>"$log.err") || rc=$?
    cat "$log.jsonl" >>"$out/$side.jsonl"
    say "run $run/$runs · $suite · $side: exit $rc after $((SECONDS - start)) s"
    if ((rc != 0)); then
        tail -3 "$log.err" >&2
        # A suite the base does not have yet is only new; a suite the head breaks fails it.
        if [[ $side == head ]]; then
            failed+=("$suite (run $run: exit $rc, see $log.err)")
        fi
    fi
}
for ((run = 1; run <= runs; run++)); do
    for suite in "${suites[@]}"; do
        if ((run % 2)); then
            run_suite base "$suite" "$run"
            run_suite head "$suite" "$run"
        else
            run_suite head "$suite" "$run"
            run_suite base "$suite" "$run"
        fi
    done
done

load_after=$(cut -d' ' -f1 /proc/loadavg)
rc=0
RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0 "$head_bin" bench-compare "$out/base.jsonl" "$out/head.jsonl" --threshold "$threshold" \
    --markdown "$out/report.md" || rc=$?
[[ -e $out/report.md ]] && {
    echo
    echo "Base: ${base_commit:-$base_bin}; head: the working tree of $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' with uncommitted changes'); runs a side: $runs; $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) cores, load average ${load_before} before and ${load_after} after."
    # The benches' own load counts towards the one after: warn only for load before them.
    if busy "$load_before"; then
        echo
        echo "**Warning:** the machine was busy before the runs (load average $load_before on $(nproc) cores); its figures are noisy."
    fi
} >>"$out/report.md"
if ((${#failed[@]})); then
    printf 'bench-ci: a suite failed with the head: %s\n' "${failed[@]}" >&2
    rc=1
fi
say "figures in $out (base.jsonl, head.jsonl, logs/), report in $out/report.md"
exit $rc
