//! Quick start: a small dynamic task graph on the in-process runtime.
//!
//! Runs Monte-Carlo π over many tasks, a recursive divide-and-conquer sum whose tasks spawn
//! tasks, and an actor counter, printing what each computed and how long it took.
//!
//! Run it: `cargo run --release --example quickstart`
use std::time::Instant;

use anyhow::Result;
use tessera::{Actor, Ref, Runtime};

tessera::task! {
    /// Throws `samples` darts at the unit square; returns how many fell inside the circle.
    fn darts(seed: u64, samples: u64) -> u64 {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            // xorshift64*: small, fast, good enough for darts.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..samples).filter(|_| {
            let (x, y) = (next(), next());
            x * x + y * y <= 1.0
        }).count() as u64
    }
}

tessera::task! {
    fn total(counts: Vec<u64>) -> u64 { counts.iter().sum() }
}

tessera::task! {
    fn add(a: u64, b: u64) -> u64 { a + b }
}

tessera::task! {
    /// Sums `lo..hi` by splitting it in halves, each half a nested task.
    fn range_sum(lo: u64, hi: u64) -> Ref<u64> {
        let rt = Runtime::current().expect("tasks run inside a runtime");
        if hi - lo <= 1024 {
            return rt.put((lo..hi).sum());
        }
        let mid = lo + (hi - lo) / 2;
        let left = range_sum::spawn(&rt, lo, mid);
        let right = range_sum::spawn(&rt, mid, hi);
        add::spawn(&rt, &left, &right)
    }
}

/// Counts what it is told to.
struct Counter {
    count: u64,
}

impl Actor for Counter {
    type Message = u64;
    type Reply = u64;
    fn handle(&mut self, add: u64) -> u64 {
        self.count += add;
        self.count
    }
}

fn main() -> Result<()> {
    let started = Instant::now();
    let rt = Runtime::local()?;
    println!("tessera quickstart: {} workers, policy {}", rt.workers(), rt.policy_name());

    // 1. Monte-Carlo π: fan out 200 tasks, fan in their counts.
    let t = Instant::now();
    const TASKS: u64 = 200;
    const SAMPLES: u64 = 100_000;
    let throws: Vec<Ref<u64>> = (0..TASKS).map(|seed| darts::spawn(&rt, seed, SAMPLES)).collect();
    let mut counts = Vec::with_capacity(throws.len());
    for (i, r) in throws.iter().enumerate() {
        counts.push(r.blocking_get()?);
        if (i + 1) % 50 == 0 {
            println!("  pi: {}/{TASKS} tasks done", i + 1);
        }
    }
    let inside = total::spawn(&rt, counts).blocking_get()?;
    let pi = 4.0 * inside as f64 / (TASKS * SAMPLES) as f64;
    println!(
        "Monte-Carlo pi  = {pi:.5} (error {:.1e}) from {} darts in {TASKS} tasks, {:.1} ms",
        (pi - std::f64::consts::PI).abs(),
        TASKS * SAMPLES,
        t.elapsed().as_secs_f64() * 1e3
    );

    // 2. Divide and conquer: tasks spawn tasks and return Refs (a dynamic, nested graph).
    let t = Instant::now();
    let n = 10_000_000u64;
    let before = rt.stats().tasks_submitted;
    let sum = range_sum::spawn(&rt, 0, n).blocking_get()?;
    let spawned = rt.stats().tasks_submitted - before;
    assert_eq!(sum, n * (n - 1) / 2, "divide-and-conquer sum is wrong");
    println!("sum(0..{n}) = {sum} with {spawned} nested tasks, {:.1} ms", t.elapsed().as_secs_f64() * 1e3);

    // 3. An actor counter called from 8 threads.
    let t = Instant::now();
    let counter = rt.actor(Counter { count: 0 });
    std::thread::scope(|scope| {
        for _ in 0..8 {
            let counter = counter.clone();
            scope.spawn(move || {
                for _ in 0..10_000 {
                    counter.call(1);
                }
            });
        }
    });
    let count = counter.call(0).blocking_get()?;
    println!(
        "actor counter = {count} after 80000 calls from 8 threads, {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    let stats = rt.stats();
    println!(
        "runtime: {} tasks submitted, {} finished, {} failed; {} live objects",
        stats.tasks_submitted, stats.tasks_finished, stats.tasks_failed, stats.live_objects
    );
    rt.shutdown();
    println!("done in {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    Ok(())
}
