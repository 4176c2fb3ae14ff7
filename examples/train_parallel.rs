//! Trains the LeNet-style CNN on the digits data set twice: first data-parallel, with 2
//! replicas in 2 processes (this program re-executed) joined by a TCP collective group,
//! all-reducing gradient buckets while backward runs; then model-parallel, with the graph
//! split into a 2-stage pipeline (one worker thread per stage) over 4 micro-batches.
//! Prints loss, accuracy and samples/s per epoch for both.
//!
//! The replicas run under elastic supervision: rank 0 checkpoints after every epoch, and
//! with `--kill-replica-at-epoch N` replica 1 kills itself (SIGKILL) after N epochs; the
//! survivor then resumes from the last checkpoint alone, and the supervisor says so.
//!
//! `cargo run --release --example train_parallel -- --epochs 20 [--kill-replica-at-epoch 5]`
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use tessera::nn::{
    is_peer_lost, lenet, resume_from_stash, save_to_stash, supervise, DataParallel, Dataset, ElasticConfig,
    EpochStats, Evaluator, Launch, OptimizerConfig, Pipeline, TrainState, PEER_LOST_EXIT_CODE,
};
use tessera::{GroupConfig, TcpGroup};

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
    /// Demonstrate elasticity: replica 1 dies after this many epochs.
    #[arg(long)]
    kill_replica_at_epoch: Option<u64>,
    /// (Internal) this process is replica RANK of SIZE, attempt ATTEMPT, joining the group
    /// at RENDEZVOUS and checkpointing into DIR.
    #[arg(long, hide = true, num_args = 5, value_names = ["RANK", "SIZE", "ATTEMPT", "RENDEZVOUS", "DIR"])]
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

/// One replica process: resumes from the last checkpoint if there is one, trains on its
/// shard of every batch; rank 0 prints and checkpoints.
fn replica(args: &Args, launch: &Launch, checkpoints: &str) -> Result<()> {
    let (rank, size) = (launch.rank, launch.size);
    let secret = std::env::var(SECRET_VAR).context("TESSERA_SECRET not set")?;
    let group = TcpGroup::join(GroupConfig::new(rank, size, launch.rendezvous, secret))?;
    let stash = tessera::Stash::open(checkpoints)?;
    let (train, test) = Dataset::digits(&args.data)?.split(0.2, 42);
    let model = lenet(args.batch / size, 8, 10)?;
    let mut state = if stash.history("train_parallel")?.is_empty() {
        TrainState::new(&model, OptimizerConfig::adamw(args.lr, 1e-4), train.len(), args.batch, args.seed)
    } else {
        resume_from_stash(&stash, "train_parallel", None)?
    };
    let mut replica = DataParallel::new(model, Box::new(group), args.bucket_mib)?;
    replica.sync(&mut state)?;
    let mut eval = Evaluator::new(lenet(test.len(), 8, 10)?);
    if rank == 0 {
        println!(
            "data parallel: {size} replica processes, {} rows each, {} gradient buckets, from epoch {}",
            args.batch / size,
            replica.bucket_params().len(),
            state.epoch
        );
    }
    while (state.epoch as usize) < args.epochs {
        if launch.attempt == 0 && rank == 1 && Some(state.epoch) == args.kill_replica_at_epoch {
            println!("  (replica 1 kills itself now)");
            Command::new("kill").args(["-9", &std::process::id().to_string()]).status()?;
            std::thread::sleep(Duration::from_secs(30));
        }
        state.optimizer.set_lr(lr_at(args, state.epoch as usize));
        let stats = match replica.train_epoch(&mut state, &train) {
            Ok(stats) => stats,
            Err(error) if is_peer_lost(&error) => {
                println!("  replica {rank}: {error}");
                std::process::exit(PEER_LOST_EXIT_CODE);
            }
            Err(error) => return Err(error.into()),
        };
        if rank == 0 {
            save_to_stash(&stash, "train_parallel", &state, &[("epoch", &state.epoch.to_string())])?;
            let e = eval.classify(&state.params, &test)?;
            print_epoch(state.epoch as usize - 1, &stats, e.accuracy);
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
    let secret = format!("train-parallel-{}", std::process::id());
    let checkpoints = std::env::temp_dir().join(format!("tessera-train-parallel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&checkpoints);
    let exe = std::env::current_exe()?;
    let dir = checkpoints.to_string_lossy().into_owned();
    let report = supervise(
        &ElasticConfig::new(REPLICAS, secret.clone()),
        |launch| {
            Command::new(&exe)
                .args(["--epochs", &args.epochs.to_string(), "--batch", &args.batch.to_string()])
                .args(["--bucket-mib", &args.bucket_mib.to_string(), "--lr", &args.lr.to_string()])
                .args(["--seed", &args.seed.to_string(), "--data", &args.data])
                .args(["--replica", &launch.rank.to_string(), &launch.size.to_string()])
                .args([&launch.attempt.to_string(), &launch.rendezvous.to_string(), &dir])
                .args(args.kill_replica_at_epoch.map(|e| format!("--kill-replica-at-epoch={e}")))
                .env(SECRET_VAR, &secret)
                .spawn()
        },
        |message| println!("supervisor: {message}"),
    )?;
    if report.sizes.len() > 1 {
        println!("supervisor: finished with group sizes {:?} (dead ranks {:?})", report.sizes, report.dead);
    }
    let _ = std::fs::remove_dir_all(&checkpoints);
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
    if let Some(r) = &args.replica {
        let launch = Launch {
            rank: r[0].parse()?,
            size: r[1].parse()?,
            attempt: r[2].parse()?,
            rendezvous: r[3].parse()?,
        };
        return replica(&args, &launch, &r[4]);
    }
    ensure!(args.batch % REPLICAS == 0 && args.batch % 4 == 0, "--batch must be a multiple of 4");
    data_parallel(&args)?;
    pipeline(&args)
}
