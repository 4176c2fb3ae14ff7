//! The `pipeline` suite: training throughput of LeNet on digits split into a 2-stage GPipe
//! pipeline over 4 micro-batches, with the stages on 2 threads of this process
//! (`Pipeline`) and as actors on 2 node processes (`ClusterPipeline`, this binary
//! re-executed), at two batch sizes; plus the cluster pipeline's time per step.
use std::time::{Duration, Instant};

use anyhow::Result;
use tessera::nn::{
    lenet, ClusterPipeline, Dataset, EpochStats, NnError, OptimizerConfig, Pipeline, TrainState,
};
use tessera::{Cluster, ClusterConfig, LocalProcesses, Runtime};

use super::{median, Reporter};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv");
const BATCHES: [usize; 2] = [64, 256];
const MICRO_BATCHES: usize = 4;
const WARMUP_EPOCHS: usize = 2;
const TIMED_EPOCHS: usize = 15;

/// The median samples/s of `train_epoch` over the timed epochs, after a warm-up.
fn rate(
    state: &mut TrainState,
    data: &Dataset,
    mut train_epoch: impl FnMut(&mut TrainState, &Dataset) -> Result<EpochStats, NnError>,
) -> Result<f64> {
    for _ in 0..WARMUP_EPOCHS {
        train_epoch(state, data)?;
    }
    let mut rates = Vec::new();
    for _ in 0..TIMED_EPOCHS {
        rates.push(train_epoch(state, data)?.samples_per_second());
    }
    Ok(median(&mut rates))
}

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    let start = Instant::now();
    let train = Dataset::digits(DATA)?.split(0.2, 42).0;
    let rt = Runtime::builder().workers(2).build()?;
    let cluster = Cluster::start(&rt, ClusterConfig::default())?;
    cluster.launch(&LocalProcesses { count: 2, slots: Some(1) })?;
    cluster.wait_for_nodes(2, Duration::from_secs(30))?;
    let nodes: Vec<_> = cluster.nodes().into_iter().map(|n| n.id).collect();
    for batch in BATCHES {
        let model = lenet(batch / MICRO_BATCHES, 8, 10)?;
        let fresh = || TrainState::new(&model, OptimizerConfig::adamw(1e-3, 1e-4), train.len(), batch, 1);
        let mut threads = Pipeline::balanced(model.clone(), 2, MICRO_BATCHES)?;
        let on_threads = rate(&mut fresh(), &train, |s, d| threads.train_epoch(s, d))?;
        let mut state = fresh();
        let mut staged = ClusterPipeline::balanced(&cluster, model.clone(), &nodes, MICRO_BATCHES, &state)?;
        let on_nodes = rate(&mut state, &train, |s, d| staged.train_epoch(s, d))?;
        let name = format!("pipeline/cnn_b{batch}_2_stages");
        reporter.report(&format!("{name}_threads"), on_threads, "samples/s", true);
        reporter.report(&format!("{name}_nodes"), on_nodes, "samples/s", true);
        reporter.report(&format!("{name}_nodes_vs_threads"), on_nodes / on_threads, "x", true);
        reporter.report(&format!("{name}_nodes_step"), batch as f64 / on_nodes * 1e3, "ms", false);
    }
    rt.shutdown();
    tracing::info!("pipeline suite took {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
