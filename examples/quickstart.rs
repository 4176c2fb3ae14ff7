//! Quick start: Tessera's main job end to end, on the embedded defaults.
//!
//! On the in-process runtime: Monte-Carlo π over many tasks, a recursive divide-and-conquer
//! sum whose tasks spawn tasks, and an actor counter. Then the same runtime heads a cluster
//! of 2 node processes on 127.0.0.1 (this program, started again): π tasks run on the
//! nodes, then again as a tree of tasks that tasks on the nodes spawn, a small CNN trains data-parallel on the digits data set with one replica actor
//! per node (gradients all-reduced between the nodes), checkpointing every epoch into the
//! embedded stash, and the final model is loaded back from the stash by name and
//! evaluated. Each part prints what it computed and how long it took.
//!
//! Run it: `cargo run --release --example quickstart`
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use tessera::nn::{
    lenet, resume_from_stash, train_on_cluster, Dataset, ElasticTraining, EpochReport, Evaluator, ModelSpec,
    OptimizerConfig, ReplicaJob,
};
use tessera::{Actor, Cluster, ClusterConfig, LocalProcesses, Ref, Runtime, Stash};

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

tessera::task! {
    /// Monte-Carlo π as a graph that unfolds where it runs: splits its throws in halves,
    /// each half a task it spawns (from whichever node runs it, onto the whole cluster),
    /// down to `leaf` throws, and adds the halves' counts.
    fn darts_tree(seed: u64, samples: u64, leaf: u64) -> Result<u64, String> {
        if samples <= leaf {
            return Ok(darts(seed, samples));
        }
        let rt = Runtime::current().ok_or("tasks run inside a runtime")?;
        let half = samples / 2;
        let left = darts_tree::spawn(&rt, seed.wrapping_mul(2), half, leaf);
        let right = darts_tree::spawn(&rt, seed.wrapping_mul(2) + 1, samples - half, leaf);
        add::spawn(&rt, &left, &right).blocking_get().map_err(|e| e.to_string())
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

/// Tessera's main job end to end on the embedded defaults: tasks and an actor here, then
/// tasks and data-parallel CNN training on 2 local node processes, checkpointed into the
/// embedded stash and loaded back. Takes no arguments.
#[derive(clap::Parser)]
struct Args {}

fn main() -> Result<()> {
    // A copy of this program started as a cluster node runs as one and exits here.
    tessera::init();
    // `--help` says what this runs; any argument is an error, not silently ignored.
    <Args as clap::Parser>::parse();
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

    let result = on_a_cluster(&rt);
    rt.shutdown();
    result?;
    println!("done in {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    Ok(())
}

/// Part 4: the runtime heads a cluster of node processes; tasks, training and the stash.
fn on_a_cluster(rt: &Runtime) -> Result<()> {
    const NODES: usize = 2;
    let t = Instant::now();
    let cluster = Cluster::start(rt, ClusterConfig::default())?; // 127.0.0.1, a random secret
    cluster.launch(&LocalProcesses { count: NODES, slots: Some(1) })?;
    cluster.wait_for_nodes(NODES, Duration::from_secs(30))?;
    println!("cluster: {NODES} node processes joined in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);

    // Tasks now run on the nodes; only their counts come back.
    let t = Instant::now();
    const TASKS: u64 = 40;
    const SAMPLES: u64 = 100_000;
    let throws: Vec<Ref<u64>> = (0..TASKS).map(|seed| darts::spawn(rt, seed, SAMPLES)).collect();
    let inside: u64 = throws.iter().map(|r| r.blocking_get()).sum::<tessera::Result<u64>>()?;
    let pi = 4.0 * inside as f64 / (TASKS * SAMPLES) as f64;
    let per_node: Vec<String> =
        cluster.nodes().iter().map(|n| format!("{} ran {}", n.name, n.tasks_run)).collect();
    println!(
        "Monte-Carlo pi  = {pi:.5} on the nodes ({}), {:.1} ms",
        per_node.join(", "),
        t.elapsed().as_secs_f64() * 1e3
    );

    // The same throws as a tree of tasks that the nodes' own tasks spawn onto the cluster.
    let t = Instant::now();
    let before: u64 = cluster.nodes().iter().map(|n| n.tasks_run).sum();
    let inside = darts_tree::spawn(rt, 1, TASKS * SAMPLES, SAMPLES).blocking_get()?;
    let ran: u64 = cluster.nodes().iter().map(|n| n.tasks_run).sum::<u64>() - before;
    let pi = 4.0 * inside as f64 / (TASKS * SAMPLES) as f64;
    println!(
        "Monte-Carlo pi  = {pi:.5} as a tree of {ran} tasks spawned by tasks on the nodes, {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    // Data-parallel training: one replica actor per node, checkpoints in the embedded stash.
    let stash_dir = std::env::temp_dir().join(format!("tessera-quickstart-{}", std::process::id()));
    let stash = Stash::open(&stash_dir)?;
    let (train, test) =
        Dataset::digits(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"))?.split(0.2, 42);
    let test_rows = test.len();
    let name = "quickstart/lenet";
    let mut job = ReplicaJob::new(
        ModelSpec::Lenet { side: 8, classes: 10 },
        OptimizerConfig::adamw(3e-3, 1e-4),
        64,
        train,
    )
    .checkpoint_to(&stash, name);
    job.test = Some(test.clone());
    const EPOCHS: u64 = 6;
    println!(
        "training a LeNet-style CNN on digits: {NODES} replica actors, global batch 64, {EPOCHS} epochs"
    );
    let nodes: Vec<_> = cluster.nodes().iter().map(|n| n.id).collect();
    let report = train_on_cluster(
        &cluster,
        &nodes,
        &job,
        ElasticTraining::new(EPOCHS),
        // A cosine learning-rate schedule.
        |epoch| 3e-3 * 0.5 * (1.0 + (std::f32::consts::PI * epoch as f32 / EPOCHS as f32).cos()),
        |r: &EpochReport| {
            println!(
                "  epoch {}  loss {:.4}  train acc {:5.1}%  test acc {:5.1}%  {:6.0} samples/s",
                r.epoch,
                r.stats.loss,
                100.0 * r.stats.accuracy,
                100.0 * r.test_accuracy.unwrap_or(f32::NAN),
                r.stats.samples_per_second()
            )
        },
        |message| println!("  elastic: {message}"),
    )?;

    // The stash keeps every checkpoint as a version of one name, with its type and tags.
    let history = stash.history(name)?;
    let last = history.last().ok_or_else(|| anyhow::anyhow!("no checkpoint in the stash"))?;
    println!(
        "stash {}: {} versions of `{name}` ({}), the last one {} bytes, tags {:?}",
        stash_dir.display(),
        history.len(),
        last.type_name,
        last.size,
        last.tags
    );
    let loaded = resume_from_stash(&stash, name, None)?;
    ensure!(
        loaded.params == report.state.params,
        "the stash holds other parameters than training ended with"
    );
    let accuracy = Evaluator::new(lenet(test_rows, 8, 10)?).classify(&loaded.params, &test)?.accuracy;
    println!(
        "loaded `{name}` back from the stash: test accuracy {:.1}% on {test_rows} digits",
        100.0 * accuracy
    );
    drop(stash);
    let _ = std::fs::remove_dir_all(&stash_dir);
    Ok(())
}
