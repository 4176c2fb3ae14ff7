//! The `cluster` suite: remote task throughput (spawned by the head, and by a task on a
//! node onto the cluster) and node-to-head transfer with two local node processes, beside
//! the loopback TCP limit measured here with plain sockets.
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_bytes::ByteBuf;
use tessera::{Cluster, ClusterConfig, LocalProcesses, Ref, Runtime};

use super::{median, tcp_loopback_gbps, Reporter};

tessera::task! {
    /// An empty remote task.
    fn noop() {}
}

tessera::task! {
    /// Makes `len` bytes on the node that runs it.
    fn make_bytes(len: usize) -> ByteBuf {
        let mut bytes = vec![0u8; len];
        for (i, chunk) in bytes.chunks_mut(4096).enumerate() {
            chunk[0] = i as u8;
        }
        ByteBuf::from(bytes)
    }
}

tessera::task! {
    /// Spawns `n` empty tasks from the node that runs it (onto the cluster, through the
    /// head) and gets them all.
    fn spawn_from_a_node(n: usize) -> Result<(), String> {
        let rt = Runtime::current().ok_or("no runtime in this task")?;
        let refs: Vec<Ref<()>> = (0..n).map(|_| noop::spawn(&rt)).collect();
        refs.iter().try_for_each(|r| r.blocking_get().map_err(|e| e.to_string()))
    }
}

const TRANSFER: usize = 256 << 20;
const RUNS: usize = 5;

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    let rt = Runtime::local()?;
    let cluster = Cluster::start(&rt, ClusterConfig::default())?;
    cluster.launch(&LocalProcesses::new(2))?;
    cluster.wait_for_nodes(2, Duration::from_secs(30))?;

    let mut samples = Vec::new();
    for _ in 0..RUNS {
        const N: usize = 100_000;
        let start = Instant::now();
        let refs: Vec<_> = (0..N).map(|_| noop::spawn(&rt)).collect();
        for r in &refs {
            r.blocking_get()?;
        }
        samples.push(N as f64 / start.elapsed().as_secs_f64());
    }
    let per_node: Vec<String> =
        cluster.nodes().iter().map(|n| format!("{}={}", n.name, n.tasks_run)).collect();
    eprintln!("remote tasks per node: {}", per_node.join(", "));
    reporter.report("cluster/remote_tasks", median(&mut samples), "tasks/s", true);

    samples.clear();
    let run_before: u64 = cluster.nodes().iter().map(|n| n.tasks_run).sum();
    for _ in 0..RUNS {
        const N: usize = 20_000;
        let start = Instant::now();
        spawn_from_a_node::spawn(&rt, N).blocking_get()?;
        samples.push(N as f64 / start.elapsed().as_secs_f64());
    }
    let run: u64 = cluster.nodes().iter().map(|n| n.tasks_run).sum::<u64>() - run_before;
    ensure!(run as usize == RUNS * 20_001, "the nodes ran {run} tasks, not {}", RUNS * 20_001);
    reporter.report("cluster/node_spawned_tasks", median(&mut samples), "tasks/s", true);

    // Transfer and the plain-socket limit alternate, so that load on the machine affects
    // both alike.
    samples.clear();
    let mut limits = Vec::new();
    for _ in 0..RUNS {
        limits.push(tcp_loopback_gbps(TRANSFER)?);
        let made = make_bytes::spawn(&rt, TRANSFER);
        rt.blocking_wait(std::slice::from_ref(&made), 1, None);
        let start = Instant::now();
        let bytes = made.blocking_get()?;
        let seconds = start.elapsed().as_secs_f64();
        ensure!(bytes.len() == TRANSFER && bytes[4096] == 1, "transfer corrupted");
        samples.push(TRANSFER as f64 / seconds / 1e9);
    }
    reporter.report("cluster/transfer_256MiB", median(&mut samples), "GB/s", true);
    reporter.report("cluster/tcp_loopback_limit", median(&mut limits), "GB/s", true);
    rt.shutdown();
    Ok(())
}
