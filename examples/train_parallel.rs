//! Trains the LeNet-style CNN on the digits data set twice: first data-parallel, with 2
//! replicas as actors on 2 node processes (this program re-executed, joined to a cluster
//! head), all-reducing gradient buckets while backward runs; then model-parallel, with the
//! graph split into a 2-stage pipeline whose stages are actors on the same 2 node
//! processes, over 4 micro-batches. Prints loss, accuracy and samples/s per epoch for both.
//!
//! Both survive a lost node. The replicas are elastic: rank 0 checkpoints into a stash after
//! every epoch, and with `--kill-node-at-epoch N` the second node is killed (SIGKILL) while
//! epoch N+1 runs; the surviving replica then resumes from the last checkpoint alone, and
//! says so. A fresh node then replaces the lost one for the pipeline, and the same epoch's
//! kill hits stage 1's node: the pipeline restarts its stages (`ClusterPipeline::restart`)
//! with another fresh node, from the state after the last good epoch, and runs the epoch
//! again.
//!
//! With `--gpu` (a build with `--features cuda`, on a machine with a GPU) the replicas train
//! on GPU 0 of their nodes, averaging gradients through their TCP group; add `--nccl` to
//! average through NCCL instead, where every node has a GPU of its own (NCCL refuses two
//! ranks on one device).
//!
//! `cargo run --release --example train_parallel -- --epochs 20 [--kill-node-at-epoch 5] [--gpu [--nccl]]`
#[path = "common/digits.rs"]
mod digits;

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use clap::Parser;
use tessera::nn::{
    lenet, train_on_cluster, ClusterPipeline, ElasticTraining, EpochReport, Evaluator, ModelSpec,
    OptimizerConfig, ReplicaJob, TrainState,
};
use tessera::{Cluster, ClusterConfig, LocalProcesses, Runtime};

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
    #[command(flatten)]
    data: digits::DataArg,
    /// Demonstrate elasticity: the second node dies while this epoch + 1 runs.
    #[arg(long)]
    kill_node_at_epoch: Option<u64>,
    /// Train the replicas on GPU 0 of their nodes (build with `--features cuda`).
    #[arg(long)]
    gpu: bool,
    /// With `--gpu`: average gradients through NCCL (one GPU per node).
    #[arg(long, requires = "gpu")]
    nccl: bool,
}

const REPLICAS: usize = 2;

fn data_parallel(args: &Args, cluster: &Cluster) -> Result<()> {
    let mut nodes = cluster.nodes();
    nodes.sort_by_key(|n| n.id);
    let checkpoints = std::env::temp_dir().join(format!("tessera-train-parallel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&checkpoints);
    let stash = tessera::Stash::open(&checkpoints)?;
    let (train, test) = digits::load(&args.data)?;
    let mut job = ReplicaJob::new(
        ModelSpec::Lenet { side: 8, classes: 10 },
        OptimizerConfig::adamw(args.lr, 1e-4),
        args.batch,
        train,
    )
    .checkpoint_to(&stash, "train_parallel");
    job.test = Some(test);
    job.bucket_mib = args.bucket_mib;
    job.seed = args.seed;
    if args.gpu {
        job = job.on_gpu(0, args.nccl);
    }
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let place = match (args.gpu, args.nccl) {
        (false, _) => "CPU",
        (true, false) => "GPU 0, averaging through TCP",
        (true, true) => "GPU 0, averaging through NCCL",
    };
    println!(
        "data parallel: {REPLICAS} replica actors on node processes {names:?} ({place}), {} rows each, checkpoints in {}",
        args.batch / REPLICAS,
        checkpoints.display()
    );
    let victim = nodes[1].pid;
    let report = train_on_cluster(
        cluster,
        &nodes.iter().map(|n| n.id).collect::<Vec<_>>(),
        &job,
        ElasticTraining::new(args.epochs as u64),
        |epoch| digits::cosine_lr(args.lr, epoch as usize, args.epochs),
        |r: &EpochReport| {
            digits::print_epoch(r.epoch as usize - 1, &r.stats, r.test_accuracy.unwrap_or(f32::NAN));
            if Some(r.epoch) == args.kill_node_at_epoch && r.replicas == REPLICAS {
                println!("  (killing the second node while the next epoch runs)");
                kill_soon(victim);
            }
        },
        |message| println!("elastic: {message}"),
    )?;
    if report.sizes.len() > 1 {
        println!("elastic: finished with group sizes {:?} (lost nodes {:?})", report.sizes, report.lost);
    }
    let _ = std::fs::remove_dir_all(&checkpoints);
    Ok(())
}

fn pipeline(args: &Args, cluster: &Cluster) -> Result<()> {
    const MICRO_BATCHES: usize = 4;
    if cluster.nodes().len() < 2 {
        println!("pipeline: starting a node to replace the lost one");
        cluster.launch(&LocalProcesses { count: 1, slots: Some(1) })?;
        cluster.wait_for_nodes(2, Duration::from_secs(30))?;
    }
    let mut nodes: Vec<_> = cluster.nodes().iter().map(|n| n.id).collect();
    nodes.sort();
    let (train, test) = digits::load(&args.data)?;
    let model = lenet(args.batch / MICRO_BATCHES, 8, 10)?;
    let mut state =
        TrainState::new(&model, OptimizerConfig::adamw(args.lr, 1e-4), train.len(), args.batch, args.seed);
    let mut pipeline = ClusterPipeline::balanced(cluster, model, &nodes[..2], MICRO_BATCHES, &state)?;
    let ranges = pipeline.stage_ranges();
    let names = |r: &std::ops::Range<usize>| {
        let nodes = pipeline.model().graph.nodes();
        format!("{}..{} ({} → {})", r.start, r.end, nodes[r.start].name, nodes[r.end - 1].name)
    };
    println!(
        "pipeline: 2 stages as actors on node processes {:?}: [{}], [{}], {MICRO_BATCHES} micro-batches of {} rows",
        pipeline.stage_nodes(),
        names(&ranges[0]),
        names(&ranges[1]),
        args.batch / MICRO_BATCHES
    );
    let mut eval = Evaluator::new(lenet(test.len(), 8, 10)?);
    let mut kill_at = args.kill_node_at_epoch;
    let mut epoch = 0;
    while epoch < args.epochs {
        // The state after the last good epoch: where a restart resumes from.
        let checkpoint = state.clone();
        if kill_at == Some(epoch as u64) {
            kill_at = None;
            let victim = cluster.nodes().into_iter().find(|n| pipeline.stage_nodes()[1] == n.name);
            if let Some(victim) = victim {
                println!("  (killing stage 1's node `{}` while the next epoch runs)", victim.name);
                kill_soon(victim.pid);
            }
        }
        state.optimizer.set_lr(digits::cosine_lr(args.lr, epoch, args.epochs));
        // Ends by fetching the stages' parameters into `state`.
        let stats = match pipeline.train_epoch(&mut state, &train) {
            Ok(stats) => stats,
            Err(tessera::nn::NnError::StageOnNode { stage, node, what }) => {
                println!("pipeline: stage {stage} on `{node}` lost ({what})");
                let survivors: Vec<_> = cluster.nodes().iter().map(|n| n.id).collect();
                cluster.launch(&LocalProcesses { count: 1, slots: Some(1) })?;
                cluster.wait_for_nodes(survivors.len() + 1, Duration::from_secs(30))?;
                let fresh = cluster.nodes().into_iter().find(|n| !survivors.contains(&n.id));
                let fresh = fresh.ok_or_else(|| anyhow::anyhow!("no fresh node joined"))?;
                let mut placed = nodes[..2].to_vec();
                placed[stage] = fresh.id;
                pipeline.restart(cluster, &placed, &checkpoint)?;
                nodes[..2].copy_from_slice(&placed);
                state = checkpoint;
                println!(
                    "pipeline: restarted on {:?} from the state after epoch {epoch}; running epoch {} again",
                    pipeline.stage_nodes(),
                    epoch + 1
                );
                continue;
            }
            Err(other) => return Err(other.into()),
        };
        let e = eval.classify(&state.params, &test)?;
        digits::print_epoch(epoch, &stats, e.accuracy);
        epoch += 1;
    }
    Ok(())
}

/// Kills process `pid` (SIGKILL) 20 ms from now, from another thread.
fn kill_soon(pid: u32) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
}

fn main() -> Result<()> {
    tessera::init();
    let args = Args::parse();
    ensure!(args.batch % REPLICAS == 0 && args.batch % 4 == 0, "--batch must be a multiple of 4");
    let rt = Runtime::builder().workers(2).build()?;
    let cluster = Cluster::start(&rt, ClusterConfig::default())?;
    cluster.launch(&LocalProcesses { count: REPLICAS, slots: Some(1) })?;
    cluster.wait_for_nodes(REPLICAS, Duration::from_secs(30))?;
    let result = data_parallel(&args, &cluster).and_then(|()| pipeline(&args, &cluster));
    rt.shutdown();
    result
}
