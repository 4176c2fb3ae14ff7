//! The `train` suite: CNN (LeNet on digits) training throughput with 1 replica (a plain
//! single-process trainer) and with 2 data-parallel replicas in 2 processes (bucketed
//! all-reduce over the TCP communicator), at two global batch sizes; plus how long each
//! replica computed and how long it waited for gradient buckets after backward, against
//! one bucket reduced after backward (no overlap) and two independent processes (how much
//! CPU two processes get on this machine right now); and a 2-stage pipeline (2 threads,
//! 4 micro-batches).
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tessera::nn::{lenet, DataParallel, Dataset, OptimizerConfig, Pipeline, TrainState, Trainer};
use tessera::{GroupConfig, TcpGroup};

use super::{median, start_group, Reporter};

const SECRET_VAR: &str = "TESSERA_SECRET";
const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv");
const BATCHES: [usize; 2] = [64, 256];
const WARMUP_EPOCHS: usize = 3;
const TIMED_EPOCHS: usize = 40;
const BUCKET_MIB: f64 = 0.025;
const DEFAULT_BUCKET_MIB: f64 = 25.0;

/// What rank 0 of a replica group measured, printed as one JSON line.
#[derive(Serialize, Deserialize)]
struct Measured {
    samples_per_second: f64,
    compute_seconds: f64,
    wait_seconds: f64,
    reduce_seconds: f64,
    steps: u64,
}

/// Arguments of the hidden `train-member` command.
#[derive(clap::Args)]
pub(crate) struct MemberArgs {
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    size: usize,
    #[arg(long)]
    rendezvous: SocketAddr,
    /// Global batch size.
    #[arg(long)]
    batch: usize,
    /// Train alone with a plain trainer on the whole batch (no group; a calibration of
    /// how much CPU several concurrent processes get).
    #[arg(long)]
    solo: bool,
    /// Gradient bucket size in MiB.
    #[arg(long, default_value_t = BUCKET_MIB)]
    bucket_mib: f64,
}

fn data() -> Result<Dataset> {
    Ok(Dataset::digits(DATA)?.split(0.2, 42).0)
}

/// A replica process: warm-up epochs, then timed epochs; rank 0 prints the median.
pub(crate) fn member(args: MemberArgs) -> Result<()> {
    if args.solo {
        let rate = single(args.batch)?;
        let line = Measured {
            samples_per_second: rate,
            compute_seconds: 0.0,
            wait_seconds: 0.0,
            reduce_seconds: 0.0,
            steps: 0,
        };
        println!("{}", serde_json::to_string(&line)?);
        return Ok(());
    }
    let secret = std::env::var(SECRET_VAR).context("TESSERA_SECRET not set")?;
    let group = TcpGroup::join(GroupConfig::new(args.rank, args.size, args.rendezvous, secret))?;
    let train = data()?;
    let model = lenet(args.batch / args.size, 8, 10)?;
    let mut state = TrainState::new(&model, OptimizerConfig::adamw(1e-3, 1e-4), train.len(), args.batch, 1);
    let mut replica = DataParallel::new(model, Box::new(group), args.bucket_mib)?;
    replica.sync(&mut state)?;
    for _ in 0..WARMUP_EPOCHS {
        replica.train_epoch(&mut state, &train)?;
    }
    let before = replica.stats();
    let mut rates = Vec::new();
    for _ in 0..TIMED_EPOCHS {
        rates.push(replica.train_epoch(&mut state, &train)?.samples_per_second());
    }
    let after = replica.stats();
    if args.rank == 0 {
        let line = Measured {
            samples_per_second: median(&mut rates),
            compute_seconds: after.compute_seconds - before.compute_seconds,
            wait_seconds: after.wait_seconds - before.wait_seconds,
            reduce_seconds: after.reduce_seconds - before.reduce_seconds,
            steps: after.steps - before.steps,
        };
        println!("{}", serde_json::to_string(&line)?);
    }
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
                .args(["train-member", "--solo", "--rank", "0", "--size", "1"])
                .args(["--rendezvous", "127.0.0.1:1", "--batch", &batch.to_string()])
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
        let measured: Measured = serde_json::from_slice(&output.stdout)?;
        total += measured.samples_per_second;
    }
    Ok(total)
}

fn replicas(size: usize, batch: usize, bucket_mib: f64) -> Result<Measured> {
    let extra =
        ["--batch".to_string(), batch.to_string(), "--bucket-mib".to_string(), bucket_mib.to_string()];
    let mut members = start_group("train-member", size, &extra)?;
    let stdout = members[0].stdout.take().context("rank 0 output")?;
    let line = BufReader::new(stdout).lines().next().context("rank 0 printed nothing")??;
    let measured: Measured = serde_json::from_str(&line)?;
    for (rank, mut child) in members.into_iter().enumerate() {
        let status = child.wait()?;
        if !status.success() {
            bail!("replica {rank} failed: {status}");
        }
    }
    Ok(measured)
}

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    let start = Instant::now();
    for batch in BATCHES {
        let one = single(batch)?;
        reporter.report(&format!("train/cnn_b{batch}_1_replica"), one, "samples/s", true);
        // PyTorch DDP's default 25 MiB: all of LeNet's 55 KiB of gradients in one bucket,
        // reduced once backward ends; then small buckets (2), the first reduced while
        // backward runs on.
        for (case, bucket_mib) in
            [("2_replicas", DEFAULT_BUCKET_MIB), ("2_replicas_small_buckets", BUCKET_MIB)]
        {
            let two = replicas(2, batch, bucket_mib)?;
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
    tracing::info!("train suite took {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
