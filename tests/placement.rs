//! Device placement with real node processes on 127.0.0.1: nodes report the CUDA devices
//! they find when they join, the head exposes them, and a task that asks for a GPU where
//! there is none fails at once with `Error::NoGpu`. (The scheduler's routing to a node that
//! has a GPU is tested against scripted nodes in `src/net/placement_tests.rs`.)
//!
//! This test binary has its own `main` (`harness = false`): node processes are this same
//! binary re-executed, and `tessera::init()` at the top of `main` turns them into nodes.
mod support;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use tessera::{local_gpus, Cluster, ClusterConfig, Error, LocalProcesses, Runtime, TaskOptions};

tessera::task! {
    fn double(x: u64) -> u64 { x * 2 }
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
    rt.shutdown();
    Ok(())
}

fn main() {
    tessera::init();
    let tests: &[(&str, support::TestFn)] = &[
        ("nodes_report_their_gpus_when_they_join", nodes_report_their_gpus_when_they_join),
        ("a_gpu_task_without_gpus_fails_at_once_naming_it", a_gpu_task_without_gpus_fails_at_once_naming_it),
        ("a_gpu_task_without_a_cluster_fails_at_once", a_gpu_task_without_a_cluster_fails_at_once),
        ("a_gpu_task_runs_on_a_node_with_a_gpu", a_gpu_task_runs_on_a_node_with_a_gpu),
    ];
    support::run(tests);
}
