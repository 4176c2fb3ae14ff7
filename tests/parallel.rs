//! Parallel training tests: data-parallel replicas in real processes (2 and 3) holding
//! bit-identical parameters after every step, replicas matching single-worker training on
//! the whole batch, a dead replica failing the others with its rank named, pipelines (2 and
//! 3 stages over micro-batches) matching single-worker training; and the same replicas as
//! actors on cluster node processes, including a node killed mid-training and the
//! survivors resuming from the stash checkpoint.
//!
//! `harness = false`: replicas and nodes are this binary re-executed (`PAR_*` variables, or
//! `tessera::init()` for nodes).

mod support;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tessera::nn::{
    lenet, mlp, resume_from_stash, train_on_cluster, Activation, ClusterReplicas, Conv2d, DType,
    DataParallel, Dataset, ElasticTraining, Graph, Linear, MaxPool2d, Model, ModelSpec, NnError,
    OptimizerConfig, Params, Pipeline, ReplicaJob, TrainState, Trainer,
};
use tessera::{
    Cluster, ClusterConfig, CollectiveError, GroupConfig, LocalProcesses, Rendezvous, Runtime, TcpGroup,
};

const SECRET: &str = "parallel-test-secret";
const SEED: u64 = 11;

fn digits() -> Dataset {
    Dataset::digits(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv")).expect("digits.csv is committed")
}

fn hash(params: &Params) -> String {
    let mut h = blake3::Hasher::new();
    for t in &params.tensors {
        for v in &t.data {
            h.update(&v.to_le_bytes());
        }
    }
    h.finalize().to_hex().to_string()
}

fn close(a: &Params, b: &Params, what: &str) -> Result<()> {
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        for (&u, &v) in x.data.iter().zip(&y.data) {
            ensure!((u - v).abs() <= 2e-5 + 2e-4 * v.abs(), "{what}: {u} vs {v}");
        }
    }
    Ok(())
}

fn member() -> Result<()> {
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} not set"));
    let rank: usize = var("PAR_RANK")?.parse()?;
    let size: usize = var("PAR_SIZE")?.parse()?;
    let addr = var("PAR_ADDR")?.parse()?;
    let mode = var("PAR_MODE")?;
    let mut config = GroupConfig::new(rank, size, addr, SECRET);
    config.timeout = Duration::from_secs(3);
    let group: Box<dyn tessera::Communicator> = match std::env::var("PAR_BACKEND").as_deref() {
        Ok("ucx") => ucx_group(config)?,
        _ => Box::new(TcpGroup::join(config)?),
    };
    let data = digits().subset(&(0..288).collect::<Vec<_>>());
    let global = 48;
    match mode.as_str() {
        "lenet" => {
            let model = lenet(global / size, 8, 10)?;
            let mut state =
                TrainState::new(&model, OptimizerConfig::adamw(3e-3, 1e-4), data.len(), global, SEED);
            // Different initial parameters on each rank: sync must make them rank 0's.
            if rank > 0 {
                state.params.tensors[0].data[0] += 1.0;
            }
            // Small buckets: several all-reduces per step.
            let mut replica = DataParallel::new(model, group, 0.01)?;
            ensure!(replica.bucket_params().len() >= 3, "buckets {:?}", replica.bucket_params());
            replica.sync(&mut state)?;
            println!("sync {}", hash(&state.params));
            for epoch in 0..2 {
                let stats = replica.train_epoch(&mut state, &data)?;
                ensure!(stats.loss.is_finite() && stats.samples == 288, "epoch {epoch}: {stats:?}");
                println!("epoch {epoch} step {} {}", state.step, hash(&state.params));
            }
            let stats = replica.stats();
            eprintln!(
                "rank {rank}: {} steps, {:.3} s compute, {:.3} s waiting for buckets",
                stats.steps, stats.compute_seconds, stats.wait_seconds
            );
            Ok(())
        }
        "mlp" => {
            // Replicas on shards equal single-worker training on the whole batch (no
            // dropout in an MLP, so the two compute the same function).
            let sizes = [64, 32, 10];
            let model = mlp(global / size, &sizes)?;
            let config = OptimizerConfig::sgd(0.1, 0.9);
            let mut state = TrainState::new(&model, config.clone(), data.len(), global, SEED);
            let mut replica = DataParallel::new(model, group, 0.001)?;
            replica.sync(&mut state)?;
            let whole_model = mlp(global, &sizes)?;
            let mut whole_state = TrainState::new(&whole_model, config, data.len(), global, SEED);
            let mut whole = Trainer::new(whole_model);
            replica.train_epoch(&mut state, &data)?;
            whole.train_epoch(&mut whole_state, &data)?;
            close(&state.params, &whole_state.params, "replica vs whole batch")?;
            println!("mlp {} matches the whole batch", hash(&state.params));
            Ok(())
        }
        "dead" => {
            let model = lenet(global / size, 8, 10)?;
            let mut state = TrainState::new(&model, OptimizerConfig::adam(1e-3), data.len(), global, SEED);
            let mut replica = DataParallel::new(model, group, 0.02)?;
            replica.sync(&mut state)?;
            if rank == size - 1 {
                std::process::exit(0); // dies without a word
            }
            let start = Instant::now();
            match replica.train_epoch(&mut state, &data) {
                Ok(_) => bail!("an epoch finished without rank {}", size - 1),
                Err(NnError::Collective {
                    source:
                        CollectiveError::PeerLost { rank: r, .. } | CollectiveError::Timeout { rank: r, .. },
                }) => {
                    ensure!(r == size - 1, "error names rank {r}");
                    ensure!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
                    println!("rank {rank}: replica {r} is gone");
                    Ok(())
                }
                Err(other) => bail!("unexpected error: {other}"),
            }
        }
        other => bail!("unknown mode {other}"),
    }
}

#[cfg(feature = "ucx")]
fn ucx_group(config: GroupConfig) -> Result<Box<dyn tessera::Communicator>> {
    Ok(Box::new(tessera::UcxGroup::join(config)?))
}

#[cfg(not(feature = "ucx"))]
fn ucx_group(_: GroupConfig) -> Result<Box<dyn tessera::Communicator>> {
    bail!("this build has no UCX (feature `ucx`)")
}

fn run_group(size: usize, mode: &str) -> Result<Vec<String>> {
    run_group_over(size, mode, "tcp")
}

/// Runs `size` replica processes in `mode`, their group over `backend` (tcp or ucx).
fn run_group_over(size: usize, mode: &str, backend: &str) -> Result<Vec<String>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let rendezvous =
        std::thread::spawn(move || Rendezvous::serve(listener, size, SECRET, Duration::from_secs(60)));
    let children: Vec<_> = (0..size)
        .map(|rank| {
            Command::new(std::env::current_exe()?)
                .env("PAR_RANK", rank.to_string())
                .env("PAR_SIZE", size.to_string())
                .env("PAR_ADDR", addr.to_string())
                .env("PAR_MODE", mode)
                .env("PAR_BACKEND", backend)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("spawning a replica")
        })
        .collect::<Result<_>>()?;
    let mut outputs = Vec::new();
    for (rank, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output()?;
        let (out, err) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        ensure!(output.status.success(), "rank {rank} of {size} ({mode}) failed: {out}{err}");
        if !err.is_empty() {
            println!("    {}", err.trim());
        }
        outputs.push(out.into_owned());
    }
    rendezvous.join().map_err(|_| anyhow::anyhow!("rendezvous panicked"))??;
    Ok(outputs)
}

fn replicas_hold_bit_identical_parameters_after_every_epoch() -> Result<()> {
    for size in [2, 3] {
        let outputs = run_group(size, "lenet")?;
        let lines = outputs[0].lines().count();
        ensure!(lines == 3, "rank 0 printed {lines} lines: {}", outputs[0]);
        for (rank, output) in outputs.iter().enumerate() {
            ensure!(
                output == &outputs[0],
                "rank {rank} of {size} differs:\n{output}\nvs rank 0:\n{}",
                outputs[0]
            );
        }
        // Parameters changed: the three hashes differ.
        let hashes: Vec<&str> = outputs[0].lines().map(|l| l.rsplit(' ').next().unwrap_or("")).collect();
        ensure!(hashes[0] != hashes[1] && hashes[1] != hashes[2], "parameters did not change: {hashes:?}");
        println!("    {size} replicas: identical parameter hashes after sync and 2 epochs ({} steps)", 2 * 6);
    }
    Ok(())
}

fn replicas_match_single_worker_training() -> Result<()> {
    let outputs = run_group(2, "mlp")?;
    ensure!(outputs[0] == outputs[1] && outputs[0].contains("matches"), "{outputs:?}");
    Ok(())
}

fn a_dead_replica_fails_the_others_naming_its_rank() -> Result<()> {
    let outputs = run_group(3, "dead")?;
    for output in &outputs[..2] {
        ensure!(output.contains("replica 2 is gone"), "{output}");
    }
    Ok(())
}

/// Data-parallel replicas over UCX: bit-identical parameters after every epoch, equal to
/// single-worker training, and a dead replica named (feature `ucx`).
#[cfg(feature = "ucx")]
fn replicas_over_ucx_train_as_over_tcp() -> Result<()> {
    let outputs = run_group_over(3, "lenet", "ucx")?;
    ensure!(outputs[0].lines().count() == 3, "rank 0 printed: {}", outputs[0]);
    ensure!(outputs.iter().all(|o| o == &outputs[0]), "replicas differ: {outputs:?}");
    // Two replicas over UCX train as one worker on the whole batch.
    let ucx = run_group_over(2, "mlp", "ucx")?;
    ensure!(ucx[0] == ucx[1] && ucx[0].contains("matches"), "{ucx:?}");
    let outputs = run_group_over(3, "dead", "ucx")?;
    for output in &outputs[..2] {
        ensure!(output.contains("replica 2 is gone"), "{output}");
    }
    println!(
        "    3 UCX replicas: identical parameter hashes; 2 match single-worker training; a dead one is named"
    );
    Ok(())
}

/// A small CNN without dropout (the pipeline and the single worker draw dropout masks
/// for different batch shapes, so they are compared on a deterministic model).
fn small_cnn(batch: usize) -> Result<Model> {
    let mut g = Graph::new();
    let x = g.input("x", &[batch, 64], DType::F32);
    let img = g.reshape(x, &[batch, 1, 8, 8])?;
    let conv = Conv2d::new(&mut g, "conv", 1, 8, 3, 1, 1)?;
    let h = conv.forward(&mut g, img, Activation::Relu)?;
    let h = MaxPool2d { size: 2, stride: 2 }.forward(&mut g, h)?;
    let h = g.reshape(h, &[batch, 8 * 4 * 4])?;
    let fc1 = Linear::new(&mut g, "fc1", 128, 32)?;
    let h = fc1.forward(&mut g, h, Activation::Relu)?;
    let fc2 = Linear::new(&mut g, "fc2", 32, 10)?;
    let logits = fc2.forward(&mut g, h, Activation::Identity)?;
    let target = g.input("target", &[batch], DType::I32);
    let loss = g.softmax_cross_entropy(logits, target)?;
    Ok(Model { graph: g, input: x, target, logits, loss })
}

fn pipelines_match_single_worker_training() -> Result<()> {
    let data = digits().subset(&(0..256).collect::<Vec<_>>());
    let (micro, micro_batches) = (8, 4);
    let batch = micro * micro_batches;
    type Build = fn(usize) -> Result<Model>;
    let builders: [(&str, Build); 2] = [("mlp", |b| Ok(mlp(b, &[64, 48, 32, 10])?)), ("cnn", small_cnn)];
    for (name, build) in builders {
        for stages in [2, 3] {
            let config = OptimizerConfig::adam(1e-2);
            let model = build(micro)?;
            let mut state = TrainState::new(&model, config.clone(), data.len(), batch, SEED);
            let mut pipeline = Pipeline::balanced(model, stages, micro_batches)?;
            let ranges = pipeline.stage_ranges();
            ensure!(ranges.len() == stages, "{name}: stages {ranges:?}");
            let whole_model = build(batch)?;
            let mut whole_state = TrainState::new(&whole_model, config, data.len(), batch, SEED);
            let mut whole = Trainer::new(whole_model);
            for epoch in 0..2 {
                let p = pipeline.train_epoch(&mut state, &data)?;
                let w = whole.train_epoch(&mut whole_state, &data)?;
                ensure!(
                    (p.loss - w.loss).abs() < 1e-4 * w.loss.abs().max(1.0),
                    "{name} epoch {epoch}: {p:?} vs {w:?}"
                );
                ensure!(p.accuracy == w.accuracy, "{name} epoch {epoch}: {p:?} vs {w:?}");
            }
            ensure!(state.step == 16 && whole_state.step == 16);
            close(&state.params, &whole_state.params, &format!("{name}, {stages} stages"))?;
            println!("    {name}: {stages} stages {ranges:?} x {micro_batches} micro-batches match 16 whole-batch steps");
        }
    }
    // Lenet (with dropout) runs through a 2-stage pipeline and learns.
    let model = lenet(micro, 8, 10)?;
    let mut state = TrainState::new(&model, OptimizerConfig::adamw(3e-3, 1e-4), data.len(), batch, SEED);
    let mut pipeline = Pipeline::balanced(model, 2, micro_batches)?;
    let first = pipeline.train_epoch(&mut state, &data)?;
    let mut last = first;
    for _ in 0..4 {
        last = pipeline.train_epoch(&mut state, &data)?;
    }
    ensure!(last.loss < first.loss, "lenet pipeline did not learn: {first:?} then {last:?}");
    // Bad inputs are errors, not panics.
    ensure!(pipeline.step(&mut state, &[0.0; 3], &[0; 3]).is_err());
    ensure!(Pipeline::new(lenet(4, 8, 10)?, &[5, 3], 2).is_err());
    // A loader over more examples than the data set has (it used to index past its end).
    let mut over =
        TrainState::new(&lenet(micro, 8, 10)?, OptimizerConfig::sgd(0.1, 0.0), data.len() + 1, batch, SEED);
    let result = pipeline.train_epoch(&mut over, &data);
    ensure!(matches!(result, Err(NnError::Argument { .. })), "{result:?}");
    Ok(())
}

/// A head with `nodes` local node processes (this binary re-executed).
struct TestCluster {
    rt: Runtime,
    cluster: Cluster,
}

impl TestCluster {
    fn start(nodes: usize) -> Result<Self> {
        let rt = Runtime::builder().workers(2).build()?;
        let config = ClusterConfig { heartbeat_timeout: Duration::from_secs(2), ..ClusterConfig::default() };
        let cluster = Cluster::start(&rt, config)?;
        cluster.launch(&LocalProcesses { count: nodes, slots: Some(1) })?;
        cluster.wait_for_nodes(nodes, Duration::from_secs(30))?;
        Ok(TestCluster { rt, cluster })
    }

    fn node_ids(&self) -> Vec<tessera::NodeId> {
        let mut ids: Vec<_> = self.cluster.nodes().iter().map(|n| n.id).collect();
        ids.sort();
        ids
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.rt.shutdown();
    }
}

fn replica_actors_on_node_processes_stay_bit_identical() -> Result<()> {
    let c = TestCluster::start(3)?;
    let data = digits().subset(&(0..288).collect::<Vec<_>>());
    let mut job =
        ReplicaJob::new(ModelSpec::Lenet { side: 8, classes: 10 }, OptimizerConfig::adam(1e-3), 48, data);
    job.bucket_mib = 0.01;
    job.seed = SEED;
    for size in [2, 3] {
        let nodes = &c.node_ids()[..size];
        let mut group = ClusterReplicas::start(&c.cluster, nodes, &job)?;
        ensure!(group.size() == size && group.nodes() == nodes && group.start_epoch() == 0);
        let before = hash(&group.state()?.params);
        let mut hashes = vec![before];
        for epoch in 1..=2 {
            // Every replica's parameter hash is compared by the head after each epoch.
            let report = group.train_epoch(1e-3)?;
            ensure!(report.epoch == epoch && report.replicas == size, "{report:?}");
            ensure!(report.stats.samples == 288 && report.stats.loss.is_finite(), "{report:?}");
            ensure!(report.comm.steps == 6 * epoch, "{report:?}");
            hashes.push(hash(&group.state()?.params));
        }
        ensure!(hashes[0] != hashes[1] && hashes[1] != hashes[2], "parameters did not change: {hashes:?}");
        println!(
            "    {size} replica actors on {size} nodes: identical parameter bits after each of 2 epochs"
        );
    }
    Ok(())
}

fn replica_actors_match_single_worker_training() -> Result<()> {
    let c = TestCluster::start(2)?;
    let data = digits().subset(&(0..288).collect::<Vec<_>>());
    let sizes = vec![64, 32, 10];
    let config = OptimizerConfig::sgd(0.1, 0.9);
    let mut job = ReplicaJob::new(ModelSpec::Mlp { sizes: sizes.clone() }, config.clone(), 48, data.clone());
    job.seed = SEED;
    job.bucket_mib = 0.001;
    let mut group = ClusterReplicas::start(&c.cluster, &c.node_ids(), &job)?;
    group.train_epoch(0.1)?;
    let whole_model = mlp(48, &sizes)?;
    let mut whole_state = TrainState::new(&whole_model, config, data.len(), 48, SEED);
    Trainer::new(whole_model).train_epoch(&mut whole_state, &data)?;
    let state = group.state()?;
    ensure!(state.step == 6 && whole_state.step == 6);
    close(&state.params, &whole_state.params, "replica actors vs whole batch")?;
    Ok(())
}

/// A node listed twice runs two replicas (its own actors, threads and group sockets):
/// the same training, bit for bit, as two replicas on two nodes.
fn a_node_listed_twice_runs_two_replicas() -> Result<()> {
    let c = TestCluster::start(2)?;
    let data = digits().subset(&(0..192).collect::<Vec<_>>());
    let mut job =
        ReplicaJob::new(ModelSpec::Mlp { sizes: vec![64, 32, 10] }, OptimizerConfig::sgd(0.1, 0.9), 48, data);
    job.seed = SEED;
    let nodes = c.node_ids();
    let train = |nodes: &[tessera::NodeId]| -> Result<TrainState> {
        let mut group = ClusterReplicas::start(&c.cluster, nodes, &job)?;
        ensure!(group.size() == 2 && group.nodes() == nodes, "{group:?}");
        for _ in 0..2 {
            group.train_epoch(0.1)?;
        }
        Ok(group.state()?)
    };
    let one_node = train(&[nodes[0], nodes[0]])?;
    let two_nodes = train(&nodes)?;
    ensure!(one_node.step == 8, "{} steps", one_node.step);
    ensure!(one_node.params == two_nodes.params, "one node's two replicas trained differently");
    // Without GPUs, a job on every GPU of the nodes has no replica at all.
    if tessera::local_gpus().is_empty() {
        ensure!(ClusterReplicas::every_gpu(&c.cluster, &nodes).is_empty());
    }
    Ok(())
}

/// A job on GPUs is refused before any replica starts when a node did not report the GPU
/// it asks for, naming the node; where the nodes have none, the first GPU too.
fn gpu_replica_actors_need_nodes_that_reported_the_gpu() -> Result<()> {
    let c = TestCluster::start(2)?;
    let data = digits().subset(&(0..96).collect::<Vec<_>>());
    let job =
        ReplicaJob::new(ModelSpec::Mlp { sizes: vec![64, 32, 10] }, OptimizerConfig::adam(1e-3), 48, data);
    let mut ordinals = vec![99];
    if tessera::local_gpus().is_empty() {
        ordinals.push(0);
    }
    for ordinal in ordinals {
        let error = ClusterReplicas::start(&c.cluster, &c.node_ids(), &job.clone().on_gpu(ordinal, false))
            .err()
            .context("a job on a GPU the nodes lack started")?;
        let text = error.to_string();
        ensure!(
            matches!(error, tessera::nn::NnError::Replica { rank: 0, peer_lost: false, .. })
                && text.contains(&format!("has no GPU {ordinal}"))
                && text.contains(&c.cluster.nodes()[0].name),
            "{text}"
        );
        println!("    GPU {ordinal}: {text}");
    }
    // The same job on the CPU still trains on those nodes.
    let mut group = ClusterReplicas::start(&c.cluster, &c.node_ids(), &job)?;
    ensure!(group.train_epoch(1e-3)?.stats.samples == 96);
    Ok(())
}

/// Trains 6 epochs on 3 replica actors; `signal` hits the third node while the 4th epoch
/// runs. The survivors must regroup and resume from the last stash checkpoint.
fn regroup_after_signal(signal: &str) -> Result<()> {
    let c = TestCluster::start(3)?;
    let dir = std::env::temp_dir().join(format!("tessera-cluster-elastic-{signal}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let stash = tessera::Stash::open(&dir)?;
    // 20 steps per epoch, so that the node is hit while an epoch runs.
    let data = digits().subset(&(0..960).collect::<Vec<_>>());
    let mut job =
        ReplicaJob::new(ModelSpec::Lenet { side: 8, classes: 10 }, OptimizerConfig::adam(1e-3), 48, data)
            .checkpoint_to(&stash, "elastic");
    job.seed = SEED;
    job.timeout = Duration::from_secs(3);
    let nodes = c.node_ids();
    let victim = c.cluster.nodes().into_iter().find(|n| n.id == nodes[2]).context("third node")?;
    let (mut said, mut epochs) = (Vec::new(), Vec::new());
    let start = Instant::now();
    let report = train_on_cluster(
        &c.cluster,
        &nodes,
        &job,
        ElasticTraining::new(6),
        |_| 1e-3,
        |r| {
            epochs.push((r.epoch, r.replicas));
            if r.epoch == 3 && r.replicas == 3 {
                let (pid, signal) = (victim.pid.to_string(), signal.to_string());
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(5));
                    let _ = Command::new("kill").args([&signal, &pid]).status();
                });
            }
        },
        |m| said.push(m.to_string()),
    );
    let elapsed = start.elapsed();
    // A stopped process is not gone: end it.
    let _ = Command::new("kill").args(["-9", &victim.pid.to_string()]).status();
    let report = report?;
    ensure!(report.sizes == [3, 2] && report.lost == [victim.name.clone()], "{report:?}; {said:?}");
    ensure!(
        report.state.epoch == 6 && report.state.step == 120,
        "epoch {} step {}",
        report.state.epoch,
        report.state.step
    );
    ensure!(said.len() == 2, "{said:?}");
    ensure!(said[0].contains(&victim.name) && said[0].contains("remaining 2 replica(s)"), "{said:?}");
    // Hit during epoch 4, or (on a fast machine) just after it ended.
    let resumed = (3..=4)
        .find(|e| said[1].contains(&format!("resumed from the checkpoint after epoch {e}")))
        .with_context(|| format!("{said:?}"))?;
    let expected: Vec<(u64, usize)> = (1..=6).map(|e| (e, if e <= resumed { 3 } else { 2 })).collect();
    ensure!(epochs == expected, "{epochs:?}");
    ensure!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    let history = stash.history("elastic")?;
    ensure!(history.len() == 6, "{} checkpoints", history.len());
    let saved = resume_from_stash(&stash, "elastic", None)?;
    ensure!(hash(&saved.params) == hash(&report.state.params), "the last checkpoint is not the final state");
    println!("    kill {signal} after {:.1} s: {}", elapsed.as_secs_f64(), said[0]);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn a_killed_node_makes_the_replica_actors_resume_from_the_stash_checkpoint() -> Result<()> {
    regroup_after_signal("-KILL")
}

fn a_stalled_node_makes_the_replica_actors_resume_from_the_stash_checkpoint() -> Result<()> {
    regroup_after_signal("-STOP")
}

fn main() {
    tessera::init();
    if std::env::var("PAR_RANK").is_ok() {
        if let Err(error) = member() {
            eprintln!("replica failed: {error:#}");
            std::process::exit(1);
        }
        return;
    }
    #[cfg_attr(not(feature = "ucx"), allow(unused_mut))]
    let mut tests: Vec<(&str, support::TestFn)> = vec![
        (
            "replicas_hold_bit_identical_parameters_after_every_epoch",
            replicas_hold_bit_identical_parameters_after_every_epoch,
        ),
        ("replicas_match_single_worker_training", replicas_match_single_worker_training),
        ("a_dead_replica_fails_the_others_naming_its_rank", a_dead_replica_fails_the_others_naming_its_rank),
        ("pipelines_match_single_worker_training", pipelines_match_single_worker_training),
        (
            "replica_actors_on_node_processes_stay_bit_identical",
            replica_actors_on_node_processes_stay_bit_identical,
        ),
        ("replica_actors_match_single_worker_training", replica_actors_match_single_worker_training),
        ("a_node_listed_twice_runs_two_replicas", a_node_listed_twice_runs_two_replicas),
        (
            "gpu_replica_actors_need_nodes_that_reported_the_gpu",
            gpu_replica_actors_need_nodes_that_reported_the_gpu,
        ),
        (
            "a_killed_node_makes_the_replica_actors_resume_from_the_stash_checkpoint",
            a_killed_node_makes_the_replica_actors_resume_from_the_stash_checkpoint,
        ),
        (
            "a_stalled_node_makes_the_replica_actors_resume_from_the_stash_checkpoint",
            a_stalled_node_makes_the_replica_actors_resume_from_the_stash_checkpoint,
        ),
    ];
    #[cfg(feature = "ucx")]
    tests.push(("replicas_over_ucx_train_as_over_tcp", replicas_over_ucx_train_as_over_tcp));
    support::run(&tests);
}
