//! The `train` suite: CNN (LeNet on digits) training throughput with 1 replica (a plain
//! single-process trainer) and with 2 data-parallel replicas as actors on 2 node processes
//! (each pinned to one core; the rate is what the head sees per epoch call)
//! (bucketed all-reduce over the TCP communicator), at two global batch sizes; plus how
//! long each replica computed and how long it waited for gradient buckets after backward,
//! against one bucket reduced after backward (no overlap) and two independent processes
//! (how much CPU two processes get on this machine right now); and a 2-stage pipeline (2
//! threads, 4 micro-batches).
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tessera::nn::{
    lenet, ClusterReplicas, Dataset, ModelSpec, OptimizerConfig, Pipeline, ReplicaJob, TrainState, Trainer,
};
use tessera::{Cluster, ClusterConfig, LocalProcesses, Runtime};

use super::{median, Reporter};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv");
const BATCHES: [usize; 2] = [64, 256];
const WARMUP_EPOCHS: usize = 3;
const TIMED_EPOCHS: usize = 40;
const BUCKET_MIB: f64 = 0.025;
const DEFAULT_BUCKET_MIB: f64 = 25.0;

/// What a replica group measured.
struct Measured {
    samples_per_second: f64,
    compute_seconds: f64,
    wait_seconds: f64,
    reduce_seconds: f64,
    steps: u64,
}

/// What a solo trainer process prints, as one JSON line.
#[derive(Serialize, Deserialize)]
struct Solo {
    samples_per_second: f64,
}

/// Arguments of the hidden `train-member` command: a solo trainer process.
#[derive(clap::Args)]
pub(crate) struct MemberArgs {
    /// Batch size.
    #[arg(long)]
    batch: usize,
}

fn data() -> Result<Dataset> {
    Ok(Dataset::digits(DATA)?.split(0.2, 42).0)
}

/// A solo trainer process (a calibration of how much CPU several concurrent processes
/// get): warm-up epochs, then timed epochs; prints the median rate.
pub(crate) fn member(args: MemberArgs) -> Result<()> {
    let line = Solo { samples_per_second: single(args.batch)? };
    println!("{}", serde_json::to_string(&line)?);
    Ok(())
}

fn single(batch: usize) -> Result<f64> {
    let train = data()?;
    let model = lenet(batch, 8, 10)?;
    let mut state = TrainState::new(&model, OptimizerConfig::adamw(1e-3, 1e-4), train.len(), batch, 1);
    let mut trainer = Trainer::new(model);
    for _ in 0..WARMUP_EPOCHS {
        trainer.train_epoch(&mut state, &train)?;
    }
    let mut rates = Vec::new();
    for _ in 0..TIMED_EPOCHS {
        rates.push(trainer.train_epoch(&mut state, &train)?.samples_per_second());
    }
    Ok(median(&mut rates))
}

/// A 2-stage pipeline (two worker threads) over 4 micro-batches of `batch / 4` rows.
fn pipeline(batch: usize) -> Result<f64> {
    let train = data()?;
    let model = lenet(batch / 4, 8, 10)?;
    let mut state = TrainState::new(&model, OptimizerConfig::adamw(1e-3, 1e-4), train.len(), batch, 1);
    let mut pipeline = Pipeline::balanced(model, 2, 4)?;
    for _ in 0..WARMUP_EPOCHS {
        pipeline.train_epoch(&mut state, &train)?;
    }
    let mut rates = Vec::new();
    for _ in 0..TIMED_EPOCHS {
        rates.push(pipeline.train_epoch(&mut state, &train)?.samples_per_second());
    }
    Ok(median(&mut rates))
}

/// Aggregate samples/s of `count` independent single-process trainers run at once.
fn concurrent_solos(count: usize, batch: usize) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..count)
        .map(|_| {
            Command::new(&exe)
                .args(["train-member", "--batch", &batch.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .context("starting a solo trainer")
        })
        .collect::<Result<_>>()?;
    let mut total = 0.0;
    for child in children {
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!("a solo trainer failed: {}", output.status);
        }
        let measured: Solo = serde_json::from_slice(&output.stdout)?;
        total += measured.samples_per_second;
    }
    Ok(total)
}

/// Replica actors on the cluster's nodes: warm-up epochs, then timed epochs (the rate the
/// head sees per epoch call, median).
fn replicas(cluster: &Cluster, batch: usize, bucket_mib: f64) -> Result<Measured> {
    let mut nodes: Vec<_> = cluster.nodes().iter().map(|n| n.id).collect();
    nodes.sort();
    let mut job = ReplicaJob::new(
        ModelSpec::Lenet { side: 8, classes: 10 },
        OptimizerConfig::adamw(1e-3, 1e-4),
        batch,
        data()?,
    );
    job.bucket_mib = bucket_mib;
    // Both replicas share this machine with nothing else: one core each.
    job.pin_to_core = true;
    let mut group = ClusterReplicas::start(cluster, &nodes, &job)?;
    let mut before = None;
    let mut rates = Vec::new();
    for epoch in 0..WARMUP_EPOCHS + TIMED_EPOCHS {
        // Timed at the head: the epoch call to every replica, until every answer is back.
        let start = Instant::now();
        let report = group.train_epoch(1e-3)?;
        let seconds = start.elapsed().as_secs_f64();
        if epoch < WARMUP_EPOCHS {
            before = Some(report.comm);
        } else {
            rates.push(report.stats.samples as f64 / seconds);
        }
        if epoch + 1 == WARMUP_EPOCHS + TIMED_EPOCHS {
            let before = before.unwrap_or_default();
            return Ok(Measured {
                samples_per_second: median(&mut rates),
                compute_seconds: report.comm.compute_seconds - before.compute_seconds,
                wait_seconds: report.comm.wait_seconds - before.wait_seconds,
                reduce_seconds: report.comm.reduce_seconds - before.reduce_seconds,
                steps: report.comm.steps - before.steps,
            });
        }
    }
    bail!("no epochs were timed")
}

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    let start = Instant::now();
    let rt = Runtime::builder().workers(1).build()?;
    let cluster = Cluster::start(&rt, ClusterConfig::default())?;
    cluster.launch(&LocalProcesses { count: 2, slots: Some(1) })?;
    cluster.wait_for_nodes(2, Duration::from_secs(30))?;
    for batch in BATCHES {
        let one = single(batch)?;
        reporter.report(&format!("train/cnn_b{batch}_1_replica"), one, "samples/s", true);
        // PyTorch DDP's default 25 MiB: all of LeNet's 55 KiB of gradients in one bucket,
        // reduced once backward ends; then small buckets (2), the first reduced while
        // backward runs on.
        for (case, bucket_mib) in
            [("2_replicas", DEFAULT_BUCKET_MIB), ("2_replicas_small_buckets", BUCKET_MIB)]
        {
            let two = replicas(&cluster, batch, bucket_mib)?;
            let steps = two.steps.max(1) as f64;
            let name = format!("train/cnn_b{batch}_{case}");
            reporter.report(&name, two.samples_per_second, "samples/s", true);
            reporter.report(&format!("{name}_speedup"), two.samples_per_second / one, "x", true);
            reporter.report(
                &format!("{name}_compute_per_step"),
                two.compute_seconds / steps * 1e3,
                "ms",
                false,
            );
            reporter.report(
                &format!("{name}_bucket_wait_per_step"),
                two.wait_seconds / steps * 1e3,
                "ms",
                false,
            );
            reporter.report(
                &format!("{name}_allreduce_per_step"),
                two.reduce_seconds / steps * 1e3,
                "ms",
                false,
            );
        }
        let solos = concurrent_solos(2, batch)?;
        reporter.report(&format!("train/cnn_b{batch}_2_independent_processes"), solos, "samples/s", true);
        reporter.report(&format!("train/cnn_b{batch}_2_independent_speedup"), solos / one, "x", true);
        let staged = pipeline(batch)?;
        reporter.report(&format!("train/cnn_b{batch}_pipeline_2_stages"), staged, "samples/s", true);
        reporter.report(&format!("train/cnn_b{batch}_pipeline_2_stages_speedup"), staged / one, "x", true);
    }
    rt.shutdown();
    tracing::info!("train suite took {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
