//! Pipeline stages as actors on cluster nodes: a 2-stage [`ClusterPipeline`] on 2 node
//! processes matches single-worker training on the whole batch (an MLP) and the thread
//! pipeline (LeNet, with dropout), moves its state in and out of the stages, and fails a
//! step naming the stage's node within seconds when that node is killed, after which a
//! restart on a fresh node from a checkpoint resumes training where it was.
//!
//! `harness = false`: node processes are this binary re-executed; `tessera::init()` at the
//! top of `main` turns them into nodes.
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use tessera::nn::{
    lenet, mlp, ClusterPipeline, Dataset, NnError, OptimizerConfig, Params, Pipeline, TrainState, Trainer,
};
use tessera::{Cluster, ClusterConfig, LocalProcesses, NodeId, NodeInfo, Runtime};

const SEED: u64 = 11;

fn digits() -> Result<Dataset> {
    let data = Dataset::digits(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"))?;
    Ok(data.subset(&(0..256).collect::<Vec<_>>()))
}

/// The tolerance of the in-process pipeline tests (tests/parallel.rs).
fn close(a: &Params, b: &Params, what: &str) -> Result<()> {
    ensure!(a.tensors.len() == b.tensors.len(), "{what}: parameter counts differ");
    for (i, (x, y)) in a.tensors.iter().zip(&b.tensors).enumerate() {
        ensure!(x.data.len() == y.data.len(), "{what}: parameter {i} sizes differ");
        for (&u, &v) in x.data.iter().zip(&y.data) {
            ensure!((u - v).abs() <= 2e-5 + 2e-4 * v.abs(), "{what}: parameter {i}: {u} vs {v}");
        }
    }
    Ok(())
}

/// A head with `count` local node processes (this binary).
struct TestCluster {
    rt: Runtime,
    cluster: Cluster,
    nodes: Vec<NodeId>,
}

impl TestCluster {
    fn start(count: usize) -> Result<Self> {
        let rt = Runtime::builder().workers(2).build()?;
        let cluster = Cluster::start(&rt, ClusterConfig::default())?;
        cluster.launch(&LocalProcesses { count, slots: Some(1) })?;
        cluster.wait_for_nodes(count, Duration::from_secs(30))?;
        let nodes = cluster.nodes().into_iter().map(|n| n.id).collect();
        Ok(TestCluster { rt, cluster, nodes })
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.rt.shutdown();
    }
}

fn cluster_pipeline_matches_single_worker_training() -> Result<()> {
    let data = digits()?;
    let (micro, micro_batches) = (8, 4);
    let batch = micro * micro_batches;
    let test = TestCluster::start(2)?;

    // An MLP (no dropout): the pipeline on 2 nodes equals whole-batch training.
    let sizes = [64, 48, 32, 10];
    let config = OptimizerConfig::adam(1e-2);
    let model = mlp(micro, &sizes)?;
    let mut state = TrainState::new(&model, config.clone(), data.len(), batch, SEED);
    let mut pipeline = ClusterPipeline::balanced(&test.cluster, model, &test.nodes, micro_batches, &state)?;
    let ranges = pipeline.stage_ranges();
    ensure!(ranges.len() == 2, "stages {ranges:?}");
    let names = pipeline.stage_nodes();
    ensure!(names[0] != names[1], "both stages on {}", names[0]);
    let whole_model = mlp(batch, &sizes)?;
    let mut whole_state = TrainState::new(&whole_model, config, data.len(), batch, SEED);
    let mut whole = Trainer::new(whole_model);
    let initial = state.params.clone();
    for epoch in 0..2 {
        let p = pipeline.train_epoch(&mut state, &data)?;
        let w = whole.train_epoch(&mut whole_state, &data)?;
        ensure!((p.loss - w.loss).abs() < 1e-4 * w.loss.abs().max(1.0), "mlp epoch {epoch}: {p:?} vs {w:?}");
        ensure!(p.accuracy == w.accuracy, "mlp epoch {epoch}: {p:?} vs {w:?}");
    }
    ensure!(state.step == 16 && whole_state.step == 16, "steps {} and {}", state.step, whole_state.step);
    ensure!(state.params != initial, "the parameters did not change");
    close(&state.params, &whole_state.params, "mlp, 2 stages on 2 nodes")?;
    ensure!(state.optimizer.steps == 16, "optimizer steps {}", state.optimizer.steps);
    println!("    mlp: 2 stages {ranges:?} on {names:?} x {micro_batches} micro-batches match 16 whole-batch steps");

    // State in and out: load the whole-batch run's state, read it back unchanged.
    pipeline.load_state(&whole_state)?;
    let mut back = state.clone();
    pipeline.fetch_state(&mut back)?;
    ensure!(back.params == whole_state.params, "parameters changed on the way through the stages");
    ensure!(back.optimizer == whole_state.optimizer, "optimizer state changed on the way through the stages");
    drop(pipeline);

    // LeNet (convolutions, dropout): the same as the thread pipeline, step for step.
    let config = OptimizerConfig::adamw(3e-3, 1e-4);
    let model = lenet(micro, 8, 10)?;
    let mut state = TrainState::new(&model, config.clone(), data.len(), batch, SEED);
    let mut threads_state = state.clone();
    let mut pipeline =
        ClusterPipeline::balanced(&test.cluster, model.clone(), &test.nodes, micro_batches, &state)?;
    let mut threads = Pipeline::balanced(model, 2, micro_batches)?;
    ensure!(threads.stage_ranges() == pipeline.stage_ranges());
    let (mut first, mut last) = (f32::NAN, f32::NAN);
    for epoch in 0..3 {
        let p = pipeline.train_epoch(&mut state, &data)?;
        let t = threads.train_epoch(&mut threads_state, &data)?;
        ensure!(
            (p.loss - t.loss).abs() < 1e-4 * t.loss.abs().max(1.0),
            "lenet epoch {epoch}: {p:?} vs {t:?}"
        );
        if epoch == 0 {
            first = p.loss;
        }
        last = p.loss;
    }
    close(&state.params, &threads_state.params, "lenet, nodes vs threads")?;
    ensure!(last < first, "lenet did not learn: {first:?} then {last:?}");
    println!("    lenet: 2 stages on 2 nodes match the thread pipeline over 24 steps (loss {first:.4} -> {last:.4})");

    // Bad inputs are errors, not panics; the pipeline still works after them.
    ensure!(matches!(pipeline.step(&mut state, &[0.0; 3], &[0; 3]), Err(NnError::Length { .. })));
    let cut = pipeline.stage_ranges()[1].start;
    let bad = ClusterPipeline::new(&test.cluster, lenet(micro, 8, 10)?, &[cut], &test.nodes[..1], 2, &state);
    ensure!(matches!(bad, Err(NnError::Argument { .. })), "2 stages on 1 node: {bad:?}");
    let missing = [test.nodes[0], NodeId(999)];
    let bad = ClusterPipeline::balanced(&test.cluster, lenet(micro, 8, 10)?, &missing, 2, &state);
    ensure!(matches!(bad, Err(NnError::StageOnNode { stage: 1, .. })), "{bad:?}");
    pipeline.train_epoch(&mut state, &data)?;
    Ok(())
}

/// A LeNet pipeline on 2 nodes that has made one step, with a batch to step on and the
/// node of stage 1.
struct Running {
    test: TestCluster,
    pipeline: ClusterPipeline,
    state: TrainState,
    x: Vec<f32>,
    y: Vec<i32>,
    victim: NodeInfo,
}

impl Running {
    fn start() -> Result<Self> {
        let data = digits()?;
        let (micro, micro_batches) = (8, 4);
        let test = TestCluster::start(2)?;
        let model = lenet(micro, 8, 10)?;
        let mut state =
            TrainState::new(&model, OptimizerConfig::adam(1e-3), data.len(), micro * micro_batches, SEED);
        let mut pipeline =
            ClusterPipeline::balanced(&test.cluster, model, &test.nodes, micro_batches, &state)?;
        let rows = pipeline.batch_rows();
        let (mut x, mut y) = (vec![0.0; rows * data.dim], vec![0; rows]);
        data.gather(&(0..rows).collect::<Vec<_>>(), &mut x, &mut y);
        pipeline.step(&mut state, &x, &y)?;
        let victim = test.cluster.nodes().into_iter().find(|n| n.id == test.nodes[1]);
        let victim = victim.ok_or_else(|| anyhow::anyhow!("stage 1's node left"))?;
        Ok(Running { test, pipeline, state, x, y, victim })
    }
}

fn a_dead_stage_node_fails_the_step_naming_it_and_a_restart_resumes() -> Result<()> {
    let Running { test, mut pipeline, mut state, x, y, victim } = Running::start()?;
    // A checkpoint, and the step that follows it, to compare the resumed run with.
    let mut checkpoint = state.clone();
    pipeline.fetch_state(&mut checkpoint)?;
    let mut reference = checkpoint.clone();
    pipeline.step(&mut reference, &x, &y)?;
    pipeline.fetch_state(&mut reference)?;
    pipeline.load_state(&checkpoint)?;
    // Kill stage 1's node while steps run.
    let pid = victim.pid;
    let killer = std::thread::spawn(move || -> Result<Instant> {
        std::thread::sleep(Duration::from_millis(200));
        signal("-KILL", pid)?;
        Ok(Instant::now())
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut steps = 0;
    let error = loop {
        match pipeline.step(&mut state, &x, &y) {
            Ok(_) if Instant::now() < deadline => steps += 1,
            Ok(_) => bail!("{steps} steps finished without stage 1's node"),
            Err(error) => break error,
        }
    };
    let failed_at = Instant::now();
    let killed_at = killer.join().map_err(|_| anyhow::anyhow!("the killer thread panicked"))??;
    match error {
        NnError::StageOnNode { stage, node, what } => {
            ensure!(stage == 1 && node == victim.name, "named stage {stage} on `{node}`: {what}");
            let after = failed_at.saturating_duration_since(killed_at);
            ensure!(after < Duration::from_secs(10), "took {after:?}");
            println!(
                "    after {steps} steps: stage {stage} on `{node}` failed {after:?} after the kill: {what}"
            );
        }
        other => bail!("unexpected error: {other}"),
    }
    // Later steps are refused at once, naming the same stage.
    let start = Instant::now();
    let again = pipeline.step(&mut state, &x, &y);
    ensure!(matches!(&again, Err(NnError::StageOnNode { stage: 1, .. })), "{again:?}");
    ensure!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());

    // A fresh node takes stage 1; restarted from the checkpoint, the pipeline makes the same
    // step as before the loss.
    test.cluster.launch(&LocalProcesses { count: 1, slots: Some(1) })?;
    test.cluster.wait_for_nodes(2, Duration::from_secs(30))?;
    let fresh = test.cluster.nodes().into_iter().find(|n| n.id != test.nodes[0] && n.id != victim.id);
    let fresh = fresh.ok_or_else(|| anyhow::anyhow!("no fresh node joined"))?;
    pipeline.restart(&test.cluster, &[test.nodes[0], fresh.id], &checkpoint)?;
    ensure!(pipeline.stage_nodes()[1] == fresh.name, "stage 1 is on {:?}", pipeline.stage_nodes());
    let mut resumed = checkpoint.clone();
    pipeline.step(&mut resumed, &x, &y)?;
    pipeline.fetch_state(&mut resumed)?;
    close(&resumed.params, &reference.params, "the step after a restart")?;
    ensure!(resumed.step == reference.step, "steps {} and {}", resumed.step, reference.step);
    println!("    restarted with stage 1 on `{}`: the next step matches the one before the loss", fresh.name);
    Ok(())
}

fn signal(sig: &str, pid: u32) -> Result<()> {
    let status = Command::new("kill").args([sig, &pid.to_string()]).status()?;
    ensure!(status.success(), "kill {sig} {pid} failed");
    Ok(())
}

fn a_frozen_stage_node_times_out_naming_it() -> Result<()> {
    let Running { test: _test, mut pipeline, mut state, x, y, victim } = Running::start()?;
    // Stopped, not dead: its connection stays open, and the head would notice the missing
    // heartbeats only after 3 s; the driver's own timeout is shorter.
    pipeline.set_timeout(Duration::from_secs(1));
    signal("-STOP", victim.pid)?;
    let start = Instant::now();
    let late = pipeline.step(&mut state, &x, &y);
    let took = start.elapsed();
    signal("-KILL", victim.pid)?;
    match late {
        Err(NnError::StageOnNode { stage: 1, node, what }) if what.starts_with("no answer in 1.0 s") => {
            ensure!(node == victim.name, "named `{node}`, not `{}`", victim.name);
            ensure!(took < Duration::from_secs(3), "took {took:?}");
            println!("    stage 1 on `{node}` failed after {took:?}: {what}");
        }
        other => bail!("unexpected result: {other:?}"),
    }
    Ok(())
}

fn main() {
    tessera::init();
    let tests: &[(&str, support::TestFn)] = &[
        ("cluster_pipeline_matches_single_worker_training", cluster_pipeline_matches_single_worker_training),
        (
            "a_dead_stage_node_fails_the_step_naming_it_and_a_restart_resumes",
            a_dead_stage_node_fails_the_step_naming_it_and_a_restart_resumes,
        ),
        ("a_frozen_stage_node_times_out_naming_it", a_frozen_stage_node_times_out_naming_it),
    ];
    support::run(tests);
}
