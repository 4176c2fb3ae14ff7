//! Device placement with real node processes on 127.0.0.1: nodes report the CUDA devices
//! and the XLA plugin they find when they join, the head exposes them, and a task that asks
//! for a GPU (an XLA device) where there is none fails at once with `Error::NoGpu`
//! (`Error::NoXla`); XLA arrays travel to tasks placed on nodes with XLA, whose own XLA
//! actors compute on them (feature `xla`), and a GPU task on a node uses the node's GPU
//! through the node's own device actor (feature `cuda`). (The scheduler's routing to a node
//! that has a GPU or XLA is tested against scripted nodes in `src/net/placement_tests.rs`.)
//!
//! This test binary has its own `main` (`harness = false`): node processes are this same
//! binary re-executed, and `tessera::init()` at the top of `main` turns them into nodes.
mod support;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tessera::nn::{
    resume_from_stash, train_on_cluster, ClusterReplicas, Dataset, ElasticTraining, ModelSpec,
    OptimizerConfig, ReplicaJob,
};
use tessera::{
    local_gpus, local_xla, Cluster, ClusterConfig, Error, LocalProcesses, NodeId, Runtime, TaskOptions,
};

tessera::task! {
    fn double(x: u64) -> u64 { x * 2 }
}

/// `main(x) = x · x` on 4 f32s, for the nodes' XLA actors.
#[cfg(feature = "xla")]
const SQUARE_F32: &str = "func.func @main(%x: tensor<4xf32>) -> tensor<4xf32> {
  %0 = stablehlo.multiply %x, %x : tensor<4xf32>
  return %0 : tensor<4xf32>
}";

#[cfg(feature = "xla")]
tessera::task! {
    /// Squares `x` on the XLA actor of the process it runs in, checking that the result
    /// stays on that device until the task returns it.
    fn square_on_xla(x: tessera::XlaArray) -> Result<tessera::XlaArray, String> {
        let rt = Runtime::current().ok_or("not in a task")?;
        let xla = tessera::XlaActor::get(&rt).map_err(|e| e.to_string())?;
        let square = xla.compile(SQUARE_F32).map_err(|e| e.to_string())?;
        let squared = xla.call(&square, &[rt.put(x)]).remove(0).blocking_get().map_err(|e| e.to_string())?;
        if !squared.is_on(&xla) || xla.copies_in() == 0 {
            return Err(format!("the node's result is not on its device ({} copies in)", xla.copies_in()));
        }
        Ok(squared)
    }
}

/// Elements of the device arrays that node tasks keep on their devices: 2 MiB of f32, more
/// than a result sent back inline, and enough for the head to run the next task where the
/// array is.
#[cfg(any(feature = "xla", feature = "cuda"))]
const NODE_ARRAY_LEN: usize = 1 << 19;

#[cfg(feature = "xla")]
tessera::task! {
    /// `NODE_ARRAY_LEN` ones of `value`, made on the XLA actor of the process it runs in.
    fn xla_fill(value: f32) -> Result<tessera::XlaArray, String> {
        let rt = Runtime::current().ok_or("not in a task")?;
        let xla = tessera::XlaActor::get(&rt).map_err(|e| e.to_string())?;
        xla.upload(vec![value; NODE_ARRAY_LEN], vec![NODE_ARRAY_LEN]).blocking_get().map_err(|e| e.to_string())
    }
}

#[cfg(feature = "xla")]
tessera::task! {
    /// Whether `x` reached this task on this process's XLA device (not staged on the host),
    /// how many arrays that actor copied in so far, and x's sum.
    fn xla_where_and_sum(x: tessera::XlaArray) -> Result<(bool, u64, f64), String> {
        let rt = Runtime::current().ok_or("not in a task")?;
        let xla = tessera::XlaActor::get(&rt).map_err(|e| e.to_string())?;
        let sum = x.to_host::<f32>().map_err(|e| e.to_string())?.iter().map(|&v| f64::from(v)).sum();
        Ok((x.is_on(&xla), xla.copies_in(), sum))
    }
}

#[cfg(feature = "cuda")]
tessera::task! {
    /// `NODE_ARRAY_LEN` copies of `value` on GPU 0 of the process it runs in.
    fn gpu_fill(value: f32) -> Result<tessera::DeviceArray, String> {
        let rt = Runtime::current().ok_or("not in a task")?;
        let gpu = tessera::DeviceActor::get(&rt, 0).map_err(|e| e.to_string())?;
        let made = gpu.run(&[], move |scope, _| {
            let data = scope.gpu().upload(&vec![value; NODE_ARRAY_LEN])?;
            scope.array(data, vec![NODE_ARRAY_LEN])
        });
        made.blocking_get().map_err(|e| e.to_string())
    }
}

#[cfg(feature = "cuda")]
tessera::task! {
    /// Whether `x` reached this task on a GPU (not staged on the host), how many arrays
    /// GPU 0's actor of this process copied in so far, and x's sum.
    fn gpu_where_and_sum(x: tessera::DeviceArray) -> Result<(bool, u64, f64), String> {
        let rt = Runtime::current().ok_or("not in a task")?;
        let gpu = tessera::DeviceActor::get(&rt, 0).map_err(|e| e.to_string())?;
        let sum = x.to_host().map_err(|e| e.to_string())?.iter().map(|&v| f64::from(v)).sum();
        Ok((x.device() == Some(0), gpu.copies_in(), sum))
    }
}

#[cfg(feature = "cuda")]
tessera::task! {
    /// `max(x, 0)` on GPU 0 of the process it runs in, through that process's device actor.
    fn relu_on_this_process_gpu(x: tessera::DeviceArray) -> Result<tessera::DeviceArray, String> {
        let rt = Runtime::current().ok_or("not in a task")?;
        let gpu = tessera::DeviceActor::get(&rt, 0).map_err(|e| e.to_string())?;
        let input = rt.put(x);
        let out = gpu.run(&[input], |scope, inputs| {
            let mut out = scope.gpu().zeros(inputs[0].len())?;
            scope.gpu().copy(inputs[0].slice().expect("on the device"), &mut out)?;
            scope.gpu().relu(&mut out)?;
            scope.array(out, inputs[0].shape().to_vec())
        });
        let out = out.blocking_get().map_err(|e| e.to_string())?;
        if out.device() != Some(0) || gpu.copies_in() == 0 {
            return Err(format!("not computed on the device ({} copies in)", gpu.copies_in()));
        }
        Ok(out)
    }
}

/// Whether this machine should have a GPU (set by `scripts/gpu-check.sh`): then a missing
/// device is a failure, not a skip.
fn gpu_expected() -> bool {
    std::env::var("TESSERA_EXPECT_GPU").is_ok_and(|v| v == "1")
}

fn cluster(nodes: usize) -> Result<(Runtime, Cluster)> {
    let rt = Runtime::builder().workers(2).build()?;
    let cluster = Cluster::start(&rt, ClusterConfig::default())?;
    cluster.launch(&LocalProcesses { count: nodes, slots: Some(2) })?;
    cluster.wait_for_nodes(nodes, Duration::from_secs(30))?;
    Ok((rt, cluster))
}

/// Node processes on this machine see the devices this process sees, and say so when they
/// join; `gpu_nodes` lists exactly the nodes with devices.
fn nodes_report_their_gpus_when_they_join() -> Result<()> {
    let (rt, cluster) = cluster(2)?;
    let here = local_gpus();
    let nodes = cluster.nodes();
    ensure!(nodes.len() == 2, "{nodes:?}");
    for node in &nodes {
        ensure!(node.gpus == here, "node {} reported {:?}, this machine has {here:?}", node.name, node.gpus);
    }
    let gpu_nodes = cluster.gpu_nodes();
    ensure!(!(gpu_expected() && here.is_empty()), "a GPU was expected: {:?}", tessera::gpu_absence_reason());
    if here.is_empty() {
        ensure!(gpu_nodes.is_empty(), "{gpu_nodes:?}");
        eprintln!("no GPU here: {}", tessera::gpu_absence_reason().unwrap_or("?"));
    } else {
        ensure!(gpu_nodes.len() == 2, "{gpu_nodes:?}");
    }
    rt.shutdown();
    Ok(())
}

/// Node processes on this machine load the XLA plugin this process would use and report it
/// when they join (none without feature `xla` or without the plugin); `xla_nodes` lists
/// exactly the nodes that have it.
fn nodes_report_their_xla_plugin_when_they_join() -> Result<()> {
    let (rt, cluster) = cluster(2)?;
    let here = local_xla();
    #[cfg(feature = "xla")]
    ensure!(
        here.is_some() || !std::path::Path::new(tessera::DEFAULT_PJRT_PLUGIN).is_file(),
        "the plugin is installed, yet: {:?}",
        tessera::xla_absence_reason()
    );
    for node in cluster.nodes() {
        ensure!(node.xla == here, "node {} reported {:?}, this process has {here:?}", node.name, node.xla);
    }
    let xla_nodes = cluster.xla_nodes();
    match &here {
        Some(xla) => {
            ensure!(xla_nodes.len() == 2, "{xla_nodes:?}");
            println!("    nodes report {} (PJRT C API {}.{})", xla.plugin, xla.pjrt_api.0, xla.pjrt_api.1);
        }
        None => {
            ensure!(xla_nodes.is_empty(), "{xla_nodes:?}");
            println!("    no XLA here: {}", tessera::xla_absence_reason().unwrap_or("?"));
        }
    }
    rt.shutdown();
    Ok(())
}

/// An XLA task fails at once, naming the task and the cluster's size, when no node (and not
/// this process) has an XLA plugin; a task on the same input without the option runs.
fn an_xla_task_without_xla_fails_at_once_naming_it() -> Result<()> {
    if local_xla().is_some() {
        eprintln!("skipped: this process has an XLA plugin, so XLA tasks run");
        return Ok(());
    }
    let (rt, _cluster) = cluster(2)?;
    let start = Instant::now();
    let input = double::spawn(&rt, 1);
    let on_xla = double::spawn_with(&rt, TaskOptions::new().on_xla(), &input);
    match on_xla.blocking_get_timeout(Duration::from_secs(20)) {
        Err(error @ Error::NoXla { .. }) => {
            let message = error.to_string();
            let Error::NoXla { task, nodes, xla_nodes, local } = error else { unreachable!() };
            ensure!(task.ends_with("::double"), "{task}");
            ensure!((nodes, xla_nodes) == (2, 0), "nodes = {nodes}, xla_nodes = {xla_nodes}");
            ensure!(local == tessera::xla_absence_reason().unwrap_or_default(), "{local}");
            ensure!(
                message.contains("asks for an XLA device") && message.contains("0 of 2 cluster node(s)"),
                "{message}"
            );
        }
        other => bail!("expected NoXla, got {other:?}"),
    }
    ensure!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    ensure!(double::spawn(&rt, &input).blocking_get_timeout(Duration::from_secs(20))? == 4);
    rt.shutdown();
    Ok(())
}

/// A GPU task fails at once, naming the task and the cluster's size, when no node (and not
/// this process) has a GPU; plain tasks still run on the nodes.
fn a_gpu_task_without_gpus_fails_at_once_naming_it() -> Result<()> {
    if !local_gpus().is_empty() {
        eprintln!("skipped: this machine has a GPU, so GPU tasks run");
        return Ok(());
    }
    let (rt, _cluster) = cluster(2)?;
    ensure!(double::spawn(&rt, 21).blocking_get_timeout(Duration::from_secs(20))? == 42);
    let start = Instant::now();
    let input = double::spawn(&rt, 1);
    let on_gpu = double::spawn_with(&rt, TaskOptions::new().on_gpu(), &input);
    match on_gpu.blocking_get_timeout(Duration::from_secs(20)) {
        Err(error @ Error::NoGpu { .. }) => {
            let message = error.to_string();
            let Error::NoGpu { task, nodes, gpu_nodes, local } = error else { unreachable!() };
            ensure!(task.ends_with("::double"), "{task}");
            ensure!((nodes, gpu_nodes) == (2, 0), "nodes = {nodes}, gpu_nodes = {gpu_nodes}");
            ensure!(!local.is_empty());
            ensure!(
                message.contains("asks for a GPU") && message.contains("0 of 2 cluster node(s)"),
                "{message}"
            );
        }
        other => bail!("expected NoGpu, got {other:?}"),
    }
    ensure!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    rt.shutdown();
    Ok(())
}

/// Without a cluster, a GPU task fails at once when this process has no GPU.
fn a_gpu_task_without_a_cluster_fails_at_once() -> Result<()> {
    if !local_gpus().is_empty() {
        eprintln!("skipped: this machine has a GPU");
        return Ok(());
    }
    let rt = Runtime::builder().workers(2).build()?;
    let r = double::spawn_with(&rt, TaskOptions::new().on_gpu(), 4);
    match r.blocking_get_timeout(Duration::from_secs(5)) {
        Err(Error::NoGpu { nodes: 0, gpu_nodes: 0, .. }) => {}
        other => bail!("expected NoGpu with 0 nodes, got {other:?}"),
    }
    ensure!(double::spawn(&rt, 4).blocking_get()? == 8);
    rt.shutdown();
    Ok(())
}

/// Where there is a GPU, a task that asks for one runs on a node that reported it.
fn a_gpu_task_runs_on_a_node_with_a_gpu() -> Result<()> {
    if local_gpus().is_empty() {
        ensure!(!gpu_expected(), "a GPU was expected: {:?}", tessera::gpu_absence_reason());
        eprintln!("skipped: no GPU here");
        return Ok(());
    }
    let (rt, cluster) = cluster(2)?;
    let refs: Vec<_> = (0..8_u64).map(|i| double::spawn_with(&rt, TaskOptions::new().on_gpu(), i)).collect();
    for (i, r) in refs.iter().enumerate() {
        ensure!(r.blocking_get_timeout(Duration::from_secs(20))? == 2 * i as u64);
    }
    let ran: u64 = cluster.nodes().iter().filter(|n| !n.gpus.is_empty()).map(|n| n.tasks_run).sum();
    ensure!(ran == 8, "GPU nodes ran {ran} of 8 tasks");
    // A GPU task on a node uses the node's GPU through the node's own device actor.
    #[cfg(feature = "cuda")]
    {
        let x = tessera::DeviceArray::from_host(vec![1.0, -2.0, 3.0, -4.0], vec![2, 2])?;
        let y = relu_on_this_process_gpu::spawn_with(&rt, TaskOptions::new().on_gpu(), x);
        let y = y.blocking_get_timeout(Duration::from_secs(30))?;
        ensure!(y.shape() == [2, 2] && y.to_host()? == vec![1.0, 0.0, 3.0, 0.0], "{y:?}");
        let ran_now: u64 = cluster.nodes().iter().map(|n| n.tasks_run).sum();
        ensure!(ran_now == 9, "the nodes ran {ran_now} of 9 tasks");
    }
    rt.shutdown();
    Ok(())
}

/// Arrays sharded over nodes and GPUs: a `DArray` made by tasks on two node processes (its
/// chunks stay there) moves onto this process's GPUs, each chunk fetched from its node by
/// the device actor; the product computed there matches the same product computed on the
/// nodes, and comes back as a `DArray` that the nodes' tasks continue from.
#[cfg(feature = "cuda")]
fn a_darray_made_on_the_nodes_computes_on_this_process_gpus() -> Result<()> {
    use tessera::{BinaryOp, DArray, DeviceActor, Fill, ReduceOp};
    if local_gpus().is_empty() {
        ensure!(!gpu_expected(), "a GPU was expected: {:?}", tessera::gpu_absence_reason());
        eprintln!("skipped: no GPU here");
        return Ok(());
    }
    let (rt, cluster) = cluster(2)?;
    let gpus = DeviceActor::all(&rt)?;
    // Chunks of 150×200 f32 (120 KB): over the inline limit, so they stay on their nodes.
    let a =
        DArray::<f32>::fill(&rt, &[600, 400], &[150, 200], Fill::Uniform { seed: 1, low: -1.0, high: 1.0 })?;
    let b =
        DArray::<f32>::fill(&rt, &[400, 300], &[200, 150], Fill::Uniform { seed: 2, low: -1.0, high: 1.0 })?;
    a.wait()?;
    b.wait()?;
    let ran: u64 = cluster.nodes().iter().map(|n| n.tasks_run).sum();
    ensure!(ran == 12, "the nodes ran {ran} of the 12 fill tasks");
    let on_gpus = a.to_devices(&gpus)?.matmul(&b.to_devices(&gpus)?)?;
    let on_nodes = a.matmul(&b)?;
    let (got, expected) = (on_gpus.to_array()?, on_nodes.to_array()?);
    let worst = got.iter().zip(expected.iter()).map(|(g, e)| (g - e).abs()).fold(0.0f32, f32::max);
    ensure!(worst < 1e-3, "the GPUs' product differs from the nodes' by {worst}");
    // Back on the host, the nodes' tasks take it from here.
    let difference = on_gpus.to_darray().zip(&on_nodes, BinaryOp::Sub)?.reduce(ReduceOp::Max)?;
    ensure!(difference.blocking_get_timeout(Duration::from_secs(30))? < 1e-3);
    println!("    {} GPU(s): product of node-held arrays, largest difference {worst:.1e}", gpus.len());
    rt.shutdown();
    Ok(())
}

/// The digits data: from the working directory when it has it (`scripts/gpu-check.sh` runs
/// this binary, built elsewhere, in a copy of the repository), else from the source tree.
fn digits() -> Result<Dataset> {
    let local = std::path::Path::new("data/digits.csv");
    let source = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"));
    Ok(Dataset::digits(if local.exists() { local } else { source })?)
}

/// Replica actors train on the nodes' GPUs where there are some: two replicas sharing
/// GPU 0 (averaging through their TCP group, staged through host memory), then one through
/// NCCL, and where a node has two GPUs, one replica on each through NCCL; the head checks
/// after every epoch that the replicas hold the same bits, and the test accuracy matches
/// the same job's on the nodes' CPUs. Elsewhere only the CPU run.
fn replica_actors_train_on_the_nodes_gpus() -> Result<()> {
    let (rt, cluster) = cluster(2)?;
    let (train, test) = digits()?.split(0.2, 42);
    let mut job =
        ReplicaJob::new(ModelSpec::Mlp { sizes: vec![64, 128, 10] }, OptimizerConfig::adam(1e-2), 64, train);
    job.test = Some(test);
    job.bucket_mib = 0.02;
    let nodes: Vec<NodeId> = cluster.nodes().iter().map(|n| n.id).collect();
    let samples = job.train.len() / 64 * 64; // whole global batches
    let accuracy = |job: &ReplicaJob, nodes: &[NodeId]| -> Result<f32> {
        let mut group = ClusterReplicas::start(&cluster, nodes, job)?;
        let mut accuracy = None;
        for epoch in 1..=6 {
            let report = group.train_epoch(1e-2)?;
            ensure!(report.epoch == epoch && report.replicas == nodes.len(), "{report:?}");
            ensure!(report.stats.loss.is_finite() && report.stats.samples == samples, "{report:?}");
            // Rank 0's steps so far, with the time its averaging took (GPU time on GPUs).
            let steps = epoch * (samples / 64) as u64;
            ensure!(report.comm.steps == steps && report.comm.reduce_seconds > 0.0, "{report:?}");
            accuracy = report.test_accuracy;
        }
        accuracy.context("rank 0 evaluates the test data")
    };
    let cpu = accuracy(&job, &nodes)?;
    println!("    2 replicas on the nodes' CPUs: test accuracy {cpu:.4}");
    ensure!(cpu > 0.85, "CPU replicas reached only {cpu}");
    if cluster.gpu_nodes().len() < 2 {
        ensure!(!gpu_expected(), "a GPU was expected: {:?}", tessera::gpu_absence_reason());
        eprintln!("skipped the GPU runs: no GPU here");
    } else {
        for (nodes, nccl) in [(&nodes[..], false), (&nodes[..1], true)] {
            let gpu = accuracy(&job.clone().on_gpu(0, nccl), nodes)?;
            let how = if nccl { "through NCCL" } else { "through TCP" };
            println!("    {} replica(s) on GPU 0 {how}: test accuracy {gpu:.4} (CPU {cpu:.4})", nodes.len());
            ensure!((gpu - cpu).abs() < 0.03, "GPU replicas {gpu} vs CPU replicas {cpu}");
        }
        // A node with two GPUs or more: one replica on each of two, through NCCL.
        let every = ClusterReplicas::every_gpu(&cluster, &nodes[..1]);
        if every.len() >= 2 {
            let gpu = accuracy(&job.clone().on_gpu(0, true), &every[..2])?;
            println!("    2 replicas on GPUs 0 and 1 of one node through NCCL: test accuracy {gpu:.4} (CPU {cpu:.4})");
            ensure!((gpu - cpu).abs() < 0.03, "GPU replicas {gpu} vs CPU replicas {cpu}");
        }
    }
    rt.shutdown();
    Ok(())
}

/// NCCL replicas survive a killed node: NCCL alone would leave the other replicas waiting on
/// their GPUs forever; the watchdog aborts their group within the job's timeout, the
/// failure counts as a lost peer, and the survivors regroup and resume from the last
/// checkpoint. Only on the host GPU, where three nodes' NCCL ranks may share one device
/// (NCCL refuses that on a real GPU, and the nodes of this test share one machine).
fn nccl_replicas_regroup_after_a_node_is_killed() -> Result<()> {
    let on_host_gpu = local_gpus().first().is_some_and(|gpu| gpu.name == "Tessera host GPU");
    if !on_host_gpu {
        eprintln!("skipped: three nodes' NCCL ranks share a GPU only on the host GPU");
        return Ok(());
    }
    let rt = Runtime::builder().workers(2).build()?;
    let config = ClusterConfig { heartbeat_timeout: Duration::from_secs(2), ..ClusterConfig::default() };
    let cluster = Cluster::start(&rt, config)?;
    cluster.launch(&LocalProcesses { count: 3, slots: Some(1) })?;
    cluster.wait_for_nodes(3, Duration::from_secs(30))?;
    let dir = tempfile::tempdir()?;
    let stash = tessera::Stash::open(dir.path())?;
    // 20 steps per epoch, so that the node is killed while an epoch runs.
    let data = digits()?.subset(&(0..960).collect::<Vec<_>>());
    let mut job =
        ReplicaJob::new(ModelSpec::Mlp { sizes: vec![64, 32, 10] }, OptimizerConfig::adam(1e-3), 48, data)
            .checkpoint_to(&stash, "nccl-elastic")
            .on_gpu(0, true);
    job.timeout = Duration::from_secs(3);
    let mut nodes: Vec<NodeId> = cluster.nodes().iter().map(|n| n.id).collect();
    nodes.sort();
    let victim = cluster.nodes().into_iter().find(|n| n.id == nodes[2]).context("third node")?;
    let (mut said, mut epochs) = (Vec::new(), Vec::new());
    let start = Instant::now();
    let report = train_on_cluster(
        &cluster,
        &nodes,
        &job,
        ElasticTraining::new(5),
        |_| 1e-3,
        |r| {
            epochs.push((r.epoch, r.replicas));
            if r.epoch == 2 && r.replicas == 3 {
                let pid = victim.pid.to_string();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(5));
                    let _ = std::process::Command::new("kill").args(["-9", &pid]).status();
                });
            }
        },
        |m| said.push(m.to_string()),
    );
    let elapsed = start.elapsed();
    let report = report?;
    ensure!(report.sizes == [3, 2] && report.lost == [victim.name.clone()], "{report:?}; {said:?}");
    ensure!(report.state.epoch == 5 && report.state.step == 100, "{report:?}");
    ensure!(said.len() == 2 && said[0].contains(&victim.name), "{said:?}");
    ensure!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    let saved = resume_from_stash(&stash, "nccl-elastic", None)?;
    ensure!(saved.params == report.state.params, "the last checkpoint is not the final state");
    println!(
        "    NCCL replicas, a node killed during epoch 3, after {:.1} s: {}",
        elapsed.as_secs_f64(),
        said[0]
    );
    println!("    {}", said[1]);
    println!("    epochs (epoch, replicas): {epochs:?}");
    rt.shutdown();
    Ok(())
}

/// XLA arrays move between processes as host copies: an array on this process's XLA device
/// goes to tasks that ask for XLA, placed on the two node processes that reported it; each
/// node's own XLA actor computes on it there, and the results come back and continue on
/// this process's device.
#[cfg(feature = "xla")]
fn xla_arrays_are_computed_on_by_the_nodes_xla_actors() -> Result<()> {
    use tessera::{XlaActor, XlaArray};
    let (rt, cluster) = cluster(2)?;
    let xla = XlaActor::get(&rt)?;
    let x = xla.upload(vec![1.0f32, -2.0, 3.0, 0.5], vec![4]);
    ensure!(cluster.xla_nodes().len() == 2, "{:?}", cluster.xla_nodes());
    let squares: Vec<_> =
        (0..4).map(|_| square_on_xla::spawn_with(&rt, TaskOptions::new().on_xla(), &x)).collect();
    let square = xla.compile(SQUARE_F32)?;
    for squared in &squares {
        let back: XlaArray = squared.blocking_get_timeout(Duration::from_secs(30))?;
        ensure!(!back.is_on_device(), "a node's result arrives as a host copy");
        ensure!(back.to_host::<f32>()? == vec![1.0, 4.0, 9.0, 0.25], "{back:?}");
        let fourth = xla.call(&square, std::slice::from_ref(squared)).remove(0);
        ensure!(fourth.blocking_get()?.to_host::<f32>()? == vec![1.0, 16.0, 81.0, 0.0625]);
    }
    ensure!(xla.copies_in() == 4, "each node result was copied in once: {}", xla.copies_in());
    let ran: Vec<u64> = cluster.nodes().iter().map(|n| n.tasks_run).collect();
    ensure!(ran.iter().sum::<u64>() == 4, "the nodes ran {ran:?} of the 4 tasks");
    rt.shutdown();
    Ok(())
}

/// A node task's large device result stays on the node's device: the next task there gets
/// the same array without a copy in, and the node still saves it and the head reads it (a
/// host copy made when it is first pulled). `fill` makes the array on a node, `where_and_sum` reports where it found it.
#[cfg(any(feature = "xla", feature = "cuda"))]
fn device_results_stay_on_the_node<T: tessera::Payload>(
    fill: impl Fn(&Runtime, f32) -> tessera::Ref<T>,
    where_and_sum: impl Fn(&Runtime, &tessera::Ref<T>) -> tessera::Ref<(bool, u64, f64)>,
    sum_here: impl Fn(&T) -> Result<f64>,
) -> Result<()> {
    let (rt, cluster) = cluster(1)?;
    let timeout = Duration::from_secs(30);
    let array = fill(&rt, 0.5);
    let (on_device, copies_in, sum) = where_and_sum(&rt, &array).blocking_get_timeout(timeout)?;
    ensure!(on_device, "the node's next task got the array staged on the host");
    ensure!(copies_in == 0, "the node's device actor copied {copies_in} array(s) in");
    ensure!(sum == 0.5 * NODE_ARRAY_LEN as f64, "sum {sum}");
    // The node saves it into a stash (its store actor copies it to the host), and the head
    // reads it; the next task there still finds it on the device.
    let dir = tempfile::tempdir()?;
    let stash = tessera::Stash::open(dir.path())?;
    let version = cluster.save_ref(&stash, "on-device", &array, &[])?;
    ensure!(sum_here(&stash.load_version::<T>("on-device", version)?)? == sum);
    ensure!(sum_here(&array.blocking_get_timeout(timeout)?)? == sum);
    let (on_device, copies_in, _) = where_and_sum(&rt, &array).blocking_get_timeout(timeout)?;
    ensure!(on_device && copies_in == 0, "on device: {on_device}, copies in: {copies_in}");
    let node = &cluster.nodes()[0];
    ensure!(node.tasks_run == 3, "{node:?}");
    // The head counts what the node holds for it: the array's data, until it is dropped.
    ensure!(node.bytes_held == (NODE_ARRAY_LEN * 4) as u64, "{node:?}");
    // (The last task's job let go of its clone of the Ref before its result was ready.)
    drop(array);
    ensure!(cluster.nodes()[0].bytes_held == 0, "{:?}", cluster.nodes());
    rt.shutdown();
    Ok(())
}

#[cfg(feature = "xla")]
fn xla_results_stay_on_the_nodes_device() -> Result<()> {
    let options = TaskOptions::new().on_xla();
    device_results_stay_on_the_node(
        |rt, value| xla_fill::spawn_with(rt, options, value),
        |rt, array| xla_where_and_sum::spawn_with(rt, options, array),
        |array: &tessera::XlaArray| Ok(array.to_host::<f32>()?.iter().map(|&v| f64::from(v)).sum()),
    )
}

#[cfg(feature = "cuda")]
fn gpu_results_stay_on_the_nodes_device() -> Result<()> {
    if local_gpus().is_empty() {
        ensure!(!gpu_expected(), "a GPU was expected: {:?}", tessera::gpu_absence_reason());
        eprintln!("skipped: no GPU here");
        return Ok(());
    }
    let options = TaskOptions::new().on_gpu();
    device_results_stay_on_the_node(
        |rt, value| gpu_fill::spawn_with(rt, options, value),
        |rt, array| gpu_where_and_sum::spawn_with(rt, options, array),
        |array: &tessera::DeviceArray| Ok(array.to_host()?.iter().map(|&v| f64::from(v)).sum()),
    )
}

fn main() {
    tessera::init();
    let tests: &[(&str, support::TestFn)] = &[
        ("nodes_report_their_gpus_when_they_join", nodes_report_their_gpus_when_they_join),
        ("a_gpu_task_without_gpus_fails_at_once_naming_it", a_gpu_task_without_gpus_fails_at_once_naming_it),
        ("nodes_report_their_xla_plugin_when_they_join", nodes_report_their_xla_plugin_when_they_join),
        ("an_xla_task_without_xla_fails_at_once_naming_it", an_xla_task_without_xla_fails_at_once_naming_it),
        ("a_gpu_task_without_a_cluster_fails_at_once", a_gpu_task_without_a_cluster_fails_at_once),
        ("a_gpu_task_runs_on_a_node_with_a_gpu", a_gpu_task_runs_on_a_node_with_a_gpu),
        ("replica_actors_train_on_the_nodes_gpus", replica_actors_train_on_the_nodes_gpus),
        ("nccl_replicas_regroup_after_a_node_is_killed", nccl_replicas_regroup_after_a_node_is_killed),
        #[cfg(feature = "xla")]
        (
            "xla_arrays_are_computed_on_by_the_nodes_xla_actors",
            xla_arrays_are_computed_on_by_the_nodes_xla_actors,
        ),
        #[cfg(feature = "xla")]
        ("xla_results_stay_on_the_nodes_device", xla_results_stay_on_the_nodes_device),
        #[cfg(feature = "cuda")]
        ("gpu_results_stay_on_the_nodes_device", gpu_results_stay_on_the_nodes_device),
        #[cfg(feature = "cuda")]
        (
            "a_darray_made_on_the_nodes_computes_on_this_process_gpus",
            a_darray_made_on_the_nodes_computes_on_this_process_gpus,
        ),
    ];
    support::run(tests);
}
