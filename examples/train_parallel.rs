//! Trains the LeNet-style CNN on the digits data set twice: first data-parallel, with 2
//! replicas in 2 processes (this program re-executed) joined by a TCP collective group,
//! all-reducing gradient buckets while backward runs; then model-parallel, with the graph
//! split into a 2-stage pipeline (one worker thread per stage) over 4 micro-batches.
//! Prints loss, accuracy and samples/s per epoch for both.
//!
//! `cargo run --release --example train_parallel -- --epochs 20`
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use tessera::nn::{
    lenet, DataParallel, Dataset, EpochStats, Evaluator, OptimizerConfig, Pipeline, TrainState,
};
use tessera::{GroupConfig, Rendezvous, TcpGroup};

#[derive(Parser, Clone)]
struct Args {
    /// Training epochs (each run).
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Global batch size (split over the replicas, or into micro-batches).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Gradient bucket size in MiB.
    #[arg(long, default_value_t = 0.025)]
    bucket_mib: f64,
    /// Peak AdamW learning rate (decays to zero on a cosine).
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Seed for initialization, shuffling and dropout.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The digits CSV.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"))]
    data: String,
    /// (Internal) this process is replica RANK, joining the group at RENDEZVOUS.
    #[arg(long, hide = true, num_args = 2, value_names = ["RANK", "RENDEZVOUS"])]
    replica: Option<Vec<String>>,
}

const REPLICAS: usize = 2;
const SECRET_VAR: &str = "TESSERA_SECRET";

fn lr_at(args: &Args, epoch: usize) -> f32 {
    args.lr * 0.5 * (1.0 + (std::f32::consts::PI * epoch as f32 / args.epochs as f32).cos())
}

fn print_epoch(epoch: usize, stats: &EpochStats, test_accuracy: f32) {
    println!(
        "  epoch {:3}  loss {:.4}  train acc {:6.2}%  test acc {:6.2}%  {:7.0} samples/s",
        epoch + 1,
        stats.loss,
        100.0 * stats.accuracy,
        100.0 * test_accuracy,
        stats.samples_per_second()
    );
}

/// One replica process: trains on its shard of every batch; rank 0 prints.
fn replica(args: &Args, rank: usize, rendezvous: SocketAddr) -> Result<()> {
    let secret = std::env::var(SECRET_VAR).context("TESSERA_SECRET not set")?;
    let group = TcpGroup::join(GroupConfig::new(rank, REPLICAS, rendezvous, secret))?;
    let (train, test) = Dataset::digits(&args.data)?.split(0.2, 42);
    let model = lenet(args.batch / REPLICAS, 8, 10)?;
    let mut state =
        TrainState::new(&model, OptimizerConfig::adamw(args.lr, 1e-4), train.len(), args.batch, args.seed);
    let mut replica = DataParallel::new(model, Box::new(group), args.bucket_mib)?;
    replica.sync(&mut state)?;
    let mut eval = Evaluator::new(lenet(test.len(), 8, 10)?);
    if rank == 0 {
        println!(
            "data parallel: {REPLICAS} replica processes, {} rows each, {} gradient buckets",
            args.batch / REPLICAS,
            replica.bucket_params().len()
        );
    }
    for epoch in 0..args.epochs {
        state.optimizer.set_lr(lr_at(args, epoch));
        let stats = replica.train_epoch(&mut state, &train)?;
        if rank == 0 {
            let e = eval.classify(&state.params, &test)?;
            print_epoch(epoch, &stats, e.accuracy);
        }
    }
    if rank == 0 {
        let s = replica.stats();
        println!(
            "  communication: {:.2} s of forward+backward, {:.2} s waiting for buckets after backward",
            s.compute_seconds, s.wait_seconds
        );
    }
    Ok(())
}

fn data_parallel(args: &Args) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let secret = format!("train-parallel-{}", std::process::id());
    let rendezvous = {
        let secret = secret.clone();
        std::thread::spawn(move || Rendezvous::serve(listener, REPLICAS, &secret, Duration::from_secs(60)))
    };
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..REPLICAS)
        .map(|rank| {
            Command::new(&exe)
                .args(["--epochs", &args.epochs.to_string(), "--batch", &args.batch.to_string()])
                .args(["--bucket-mib", &args.bucket_mib.to_string(), "--lr", &args.lr.to_string()])
                .args(["--seed", &args.seed.to_string(), "--data", &args.data])
                .args(["--replica", &rank.to_string(), &addr.to_string()])
                .env(SECRET_VAR, &secret)
                .spawn()
                .context("starting a replica process")
        })
        .collect::<Result<_>>()?;
    for (rank, mut child) in children.into_iter().enumerate() {
        ensure!(child.wait()?.success(), "replica {rank} failed");
    }
    rendezvous.join().map_err(|_| anyhow::anyhow!("rendezvous panicked"))??;
    Ok(())
}

fn pipeline(args: &Args) -> Result<()> {
    const MICRO_BATCHES: usize = 4;
    let (train, test) = Dataset::digits(&args.data)?.split(0.2, 42);
    let model = lenet(args.batch / MICRO_BATCHES, 8, 10)?;
    let mut state =
        TrainState::new(&model, OptimizerConfig::adamw(args.lr, 1e-4), train.len(), args.batch, args.seed);
    let mut pipeline = Pipeline::balanced(model, 2, MICRO_BATCHES)?;
    let ranges = pipeline.stage_ranges();
    let names = |r: &std::ops::Range<usize>| {
        let nodes = pipeline.model().graph.nodes();
        format!("{}..{} ({} → {})", r.start, r.end, nodes[r.start].name, nodes[r.end - 1].name)
    };
    println!(
        "pipeline: 2 stages [{}], [{}], {MICRO_BATCHES} micro-batches of {} rows",
        names(&ranges[0]),
        names(&ranges[1]),
        args.batch / MICRO_BATCHES
    );
    let mut eval = Evaluator::new(lenet(test.len(), 8, 10)?);
    for epoch in 0..args.epochs {
        state.optimizer.set_lr(lr_at(args, epoch));
        let stats = pipeline.train_epoch(&mut state, &train)?;
        let e = eval.classify(&state.params, &test)?;
        print_epoch(epoch, &stats, e.accuracy);
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(replica_args) = &args.replica {
        let rank = replica_args[0].parse()?;
        let addr = replica_args[1].parse()?;
        return replica(&args, rank, addr);
    }
    ensure!(args.batch % REPLICAS == 0 && args.batch % 4 == 0, "--batch must be a multiple of 4");
    data_parallel(&args)?;
    pipeline(&args)
}
