//! The `sched` suite: the scheduling policies against each other on task graphs of
//! different shapes, on the in-process runtime. The classics are a central FIFO queue
//! (`fifo`) and a static spread (`round_robin`); `locality` (the default) runs a task where
//! its input was just produced. Idle workers steal in every policy, so a policy changes
//! order and cache locality, not which tasks run. Each case reports the median makespan of
//! several runs, in milliseconds.
use std::time::Instant;

use anyhow::Result;
use serde_bytes::ByteBuf;
use tessera::{Builder, Fifo, Locality, RoundRobin, Runtime};

use super::{median, Reporter};

tessera::task! {
    /// `steps` steps of dependent arithmetic (no sleep: the worker stays busy).
    fn spin(steps: u64) -> u64 { spin_steps(steps) }
}

fn spin_steps(steps: u64) -> u64 {
    let mut x = std::hint::black_box(steps | 1);
    for _ in 0..steps {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    }
    std::hint::black_box(x)
}

/// How many `spin` steps take one microsecond on this machine.
fn steps_per_micro() -> u64 {
    const STEPS: u64 = 20_000_000;
    let start = Instant::now();
    spin_steps(STEPS);
    (STEPS as f64 / (start.elapsed().as_secs_f64() * 1e6)).max(1.0) as u64
}

tessera::task! {
    /// A block of `len` bytes to start a chain from.
    fn seed_block(seed: u64, len: usize) -> ByteBuf {
        ByteBuf::from((0..len).map(|i| (i as u64).wrapping_mul(seed | 1) as u8).collect::<Vec<_>>())
    }
}

tessera::task! {
    /// One link of a chain: reads its input block and writes a new one of the same size
    /// (cheap per byte, so where the input sits in the cache shows).
    fn transform(block: ByteBuf) -> ByteBuf {
        let mut previous = 0u8;
        ByteBuf::from(
            block
                .iter()
                .map(|&b| {
                    previous = previous.wrapping_add(b).rotate_left(3);
                    previous
                })
                .collect::<Vec<_>>(),
        )
    }
}

tessera::task! {
    fn add(a: u64, b: u64) -> u64 { a + b }
}

tessera::task! {
    /// Sums `lo..hi` by halves, each half a nested task (a graph that unfolds as it runs).
    fn tree_sum(lo: u64, hi: u64) -> Ref<u64> {
        let rt = Runtime::current().expect("tasks run inside a runtime");
        if hi - lo <= 4096 {
            return rt.put((lo..hi).map(|v| v ^ (v >> 3)).sum());
        }
        let mid = lo + (hi - lo) / 2;
        let left = tree_sum::spawn(&rt, lo, mid);
        let right = tree_sum::spawn(&rt, mid, hi);
        add::spawn(&rt, &left, &right)
    }
}

const RUNS: usize = 5;

static STEPS_PER_MICRO: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn steps_per_micro_cached() -> u64 {
    *STEPS_PER_MICRO.get_or_init(steps_per_micro)
}

/// A policy: its name and how to put it into a runtime builder.
type PolicyCase = (&'static str, fn(Builder) -> Builder);
/// A task graph: its name and the function that builds it and waits for it.
type GraphCase = (&'static str, fn(&Runtime) -> Result<()>);

/// Runs `case` `RUNS` times (after one warm-up) on `rt`; the median in milliseconds.
fn makespan(rt: &Runtime, case: impl Fn(&Runtime) -> Result<()>) -> Result<f64> {
    case(rt)?;
    let mut samples = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        case(rt)?;
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&mut samples))
}

/// 20,000 independent tasks of about 20 µs: queue contention and spread.
fn fan_out(rt: &Runtime) -> Result<()> {
    let steps = 20 * steps_per_micro_cached();
    let refs: Vec<_> = (0..20_000).map(|_| spin::spawn(rt, steps)).collect();
    for r in &refs {
        r.blocking_get()?;
    }
    Ok(())
}

/// 2,000 tasks of which every tenth takes 2 ms, the rest 20 µs: load balance.
fn skewed(rt: &Runtime) -> Result<()> {
    let micro = steps_per_micro_cached();
    let refs: Vec<_> =
        (0..2_000).map(|i| spin::spawn(rt, if i % 10 == 0 { 2_000 * micro } else { 20 * micro })).collect();
    for r in &refs {
        r.blocking_get()?;
    }
    Ok(())
}

/// 8 chains of 200 links, each link reading the 256 KiB its predecessor wrote: locality.
fn chains(rt: &Runtime) -> Result<()> {
    const LEN: usize = 256 << 10;
    let ends: Vec<_> = (0..8u64)
        .map(|c| {
            let mut block = seed_block::spawn(rt, c, LEN);
            for _ in 0..200 {
                block = transform::spawn(rt, &block);
            }
            block
        })
        .collect();
    for end in &ends {
        end.blocking_get()?;
    }
    Ok(())
}

/// A divide-and-conquer sum over 2²⁴ numbers (≈ 12,000 nested tasks).
fn nested(rt: &Runtime) -> Result<()> {
    let n = 1u64 << 24;
    let sum = tree_sum::spawn(rt, 0, n).blocking_get()?;
    anyhow::ensure!(sum == (0..n).map(|v| v ^ (v >> 3)).sum::<u64>(), "tree_sum is wrong");
    Ok(())
}

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    let policies: [PolicyCase; 3] = [
        ("fifo", |b| b.policy(Fifo)),
        ("round_robin", |b| b.policy(RoundRobin::default())),
        ("locality", |b| b.policy(Locality)),
    ];
    let cases: [GraphCase; 4] =
        [("fan_out", fan_out), ("skewed", skewed), ("chains", chains), ("nested", nested)];
    for (name, policy) in policies {
        let rt = policy(Runtime::builder()).build()?;
        eprintln!("sched: policy {} on {} workers", rt.policy_name(), rt.workers());
        for (case, body) in cases {
            let ms = makespan(&rt, body)?;
            reporter.report(&format!("sched/{case}/{name}"), ms, "ms", false);
        }
        rt.shutdown();
    }
    Ok(())
}
