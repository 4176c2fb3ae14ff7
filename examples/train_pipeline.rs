//! Trains the LeNet-style CNN on the digits data set model-parallel: the graph is split
//! into a 2-stage pipeline whose stages are actors on 2 node processes (this program
//! re-executed), trained GPipe-style over micro-batches. Prints loss, accuracy and
//! samples/s per epoch. `--threads` runs the same pipeline with its stages on threads of
//! this process instead (for comparison).
//!
//! `cargo run --release --example train_pipeline -- --epochs 10 [--threads]`
#[path = "common/digits.rs"]
mod digits;

use std::time::Duration;

use anyhow::{ensure, Result};
use clap::Parser;
use tessera::nn::{
    lenet, ClusterPipeline, Dataset, EpochStats, Evaluator, NnError, OptimizerConfig, Pipeline, TrainState,
};
use tessera::{Cluster, ClusterConfig, LocalProcesses, Runtime};

#[derive(Parser)]
struct Args {
    /// Training epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Rows per step (split into micro-batches).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 4)]
    micro_batches: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Seed for initialization, shuffling and dropout.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    data: digits::DataArg,
    /// Run the stages on threads of this process instead of node processes.
    #[arg(long)]
    threads: bool,
}

const STAGES: usize = 2;

fn main() -> Result<()> {
    tessera::init();
    let args = Args::parse();
    ensure!(
        args.micro_batches > 0 && args.batch % args.micro_batches == 0,
        "--batch must split into micro-batches"
    );
    let (train, test) = digits::load(&args.data)?;
    let micro = args.batch / args.micro_batches;
    let model = lenet(micro, 8, 10)?;
    let mut state =
        TrainState::new(&model, OptimizerConfig::adamw(args.lr, 1e-4), train.len(), args.batch, args.seed);
    let mut eval = Evaluator::new(lenet(test.len(), 8, 10)?);
    let describe = |ranges: Vec<std::ops::Range<usize>>| {
        let nodes = model.graph.nodes();
        let parts: Vec<String> = ranges
            .iter()
            .map(|r| format!("{}..{} ({} → {})", r.start, r.end, nodes[r.start].name, nodes[r.end - 1].name))
            .collect();
        parts.join(", ")
    };
    // Either kind of pipeline trains an epoch the same way; keep the cluster's runtime
    // alive for as long as its pipeline.
    type TrainEpoch = Box<dyn FnMut(&mut TrainState, &Dataset) -> Result<EpochStats, NnError>>;
    let mut runtime = None;
    let mut train_epoch: TrainEpoch = if args.threads {
        let mut pipeline = Pipeline::balanced(model.clone(), STAGES, args.micro_batches)?;
        println!(
            "pipeline: {STAGES} stages on threads [{}], {} micro-batches of {micro} rows",
            describe(pipeline.stage_ranges()),
            args.micro_batches
        );
        Box::new(move |state, data| pipeline.train_epoch(state, data))
    } else {
        let rt = Runtime::builder().workers(2).build()?;
        let cluster = Cluster::start(&rt, ClusterConfig::default())?;
        runtime = Some(rt);
        cluster.launch(&LocalProcesses { count: STAGES, slots: Some(1) })?;
        cluster.wait_for_nodes(STAGES, Duration::from_secs(30))?;
        let nodes: Vec<_> = cluster.nodes().into_iter().map(|n| n.id).collect();
        let mut pipeline =
            ClusterPipeline::balanced(&cluster, model.clone(), &nodes, args.micro_batches, &state)?;
        println!(
            "pipeline: {STAGES} stages as actors on node processes {:?} [{}], {} micro-batches of {micro} rows",
            pipeline.stage_nodes(),
            describe(pipeline.stage_ranges()),
            args.micro_batches
        );
        // train_epoch ends by fetching the stages' parameters into the state.
        Box::new(move |state, data| pipeline.train_epoch(state, data))
    };
    let mut total = (0usize, 0.0f64);
    for epoch in 0..args.epochs {
        let stats = train_epoch(&mut state, &train)?;
        total = (total.0 + stats.samples, total.1 + stats.seconds);
        digits::print_epoch(epoch, &stats, eval.classify(&state.params, &test)?.accuracy);
    }
    drop(train_epoch);
    if let Some(rt) = runtime {
        rt.shutdown();
    }
    println!("  overall {:.0} samples/s", total.0 as f64 / total.1.max(1e-9));
    Ok(())
}
