//! Cluster integration tests with real node processes on 127.0.0.1.
//!
//! This test binary has its own `main` (`harness = false`): node processes are this same
//! binary re-executed, and `tessera::init()` at the top of `main` turns them into nodes.
#[cfg(feature = "s3")]
#[path = "store/servers.rs"]
mod servers;
mod support;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_bytes::ByteBuf;
use tessera::{Cluster, ClusterConfig, Error, LocalProcesses, NodeInfo, Ref, Runtime};

tessera::task! {
    fn square(x: u64) -> u64 { x * x }
}

tessera::task! {
    fn add(a: u64, b: u64) -> u64 { a + b }
}

tessera::task! {
    /// Which node ran this task.
    fn node_name(_i: u64) -> String {
        std::env::var("TESSERA_NODE_NAME").unwrap_or_else(|_| "head".into())
    }
}

tessera::task! {
    /// Sums the squares below `n` by nested tasks spawned on `Runtime::current()` (onto the
    /// cluster, from a node), and says which node ran this task.
    fn squares_below_by_nested_tasks(n: u64) -> Result<(String, u64), String> {
        let rt = Runtime::current().ok_or("no runtime in this task")?;
        let squares: Vec<Ref<u64>> = (0..n).map(|i| square::spawn(&rt, i)).collect();
        let sum = squares.iter().map(|r| r.blocking_get()).sum::<Result<u64, _>>().map_err(|e| e.to_string())?;
        Ok((std::env::var("TESSERA_NODE_NAME").unwrap_or_else(|_| "head".into()), sum))
    }
}

tessera::task! {
    /// Deterministic bytes: `len` of them from `seed`.
    fn make_blob(len: usize, seed: u64) -> ByteBuf { ByteBuf::from(blob(len, seed)) }
}

tessera::task! {
    fn checksum(data: ByteBuf) -> String { blake3::hash(&data).to_hex().to_string() }
}

tessera::task! {
    /// A slow map step with a large (held, not inlined) result.
    fn slow_block(i: u64, ms: u64) -> ByteBuf {
        std::thread::sleep(Duration::from_millis(ms));
        ByteBuf::from(vec![(i % 251) as u8; 100_000])
    }
}

tessera::task! {
    /// Sums the bytes of a block.
    fn block_sum(block: ByteBuf) -> u64 { block.iter().map(|&b| u64::from(b)).sum() }
}

tessera::task! {
    fn slow_square(x: u64, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        x * x
    }
}

tessera::task! {
    fn parse(text: String) -> Result<u64, std::num::ParseIntError> { text.parse() }
}

/// Records the calls it gets, and where it runs.
#[derive(serde::Serialize, serde::Deserialize)]
struct Recorder {
    seen: Vec<(u32, u32)>,
}

impl tessera::Actor for Recorder {
    type Message = Option<(u32, u32)>;
    type Reply = (String, Vec<(u32, u32)>);
    fn handle(&mut self, message: Self::Message) -> Self::Reply {
        match message {
            Some(call) => {
                self.seen.push(call);
                (String::new(), Vec::new())
            }
            None => (std::env::var("TESSERA_NODE_NAME").unwrap_or_else(|_| "head".into()), self.seen.clone()),
        }
    }
}

tessera::remote_actor!(Recorder);

tessera::task! {
    /// Where a (large) argument arrived, and its digest.
    fn digest_where(data: ByteBuf) -> (String, String) {
        let node = std::env::var("TESSERA_NODE_NAME").unwrap_or_else(|_| "head".into());
        (node, blake3::hash(&data).to_hex().to_string())
    }
}

/// Holds a large byte string: a call may append to it, and gets back where the actor runs,
/// the digest of everything held, and the first `n` bytes.
#[derive(serde::Serialize, serde::Deserialize)]
struct Hoard {
    data: ByteBuf,
}

impl tessera::Actor for Hoard {
    type Message = (Option<ByteBuf>, usize);
    type Reply = (String, String, ByteBuf);
    fn handle(&mut self, (extra, n): Self::Message) -> Self::Reply {
        if let Some(extra) = extra {
            self.data.extend_from_slice(&extra);
        }
        let node = std::env::var("TESSERA_NODE_NAME").unwrap_or_else(|_| "head".into());
        let head = ByteBuf::from(self.data[..n.min(self.data.len())].to_vec());
        (node, blake3::hash(&self.data).to_hex().to_string(), head)
    }
}

tessera::remote_actor!(Hoard);

tessera::task! {
    /// Which node ran this task, after `ms` milliseconds.
    fn slow_node_name(_i: u64, ms: u64) -> String {
        std::thread::sleep(Duration::from_millis(ms));
        std::env::var("TESSERA_NODE_NAME").unwrap_or_else(|_| "head".into())
    }
}

tessera::task! {
    /// Spawns `n` tasks from wherever it runs and gives the names of the nodes that ran them.
    fn names_of_spawned(n: u64) -> Result<Vec<String>, String> {
        let rt = Runtime::current().ok_or("no runtime in this task")?;
        let names: Vec<Ref<String>> = (0..n).map(|i| slow_node_name::spawn(&rt, i, 50)).collect();
        let (ready, _) = rt.blocking_wait(&names, names.len(), None);
        if ready.len() != names.len() {
            return Err(format!("{} of {n} ready", ready.len()));
        }
        names.iter().map(|r| r.blocking_get().map_err(|e| e.to_string())).collect()
    }
}

/// Tasks of `concurrency_probe` running in this process now.
static PROBES_RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

tessera::task! {
    /// Says which node ran it and how many probes ran there at once with it (itself
    /// included), sleeping `ms` milliseconds.
    fn concurrency_probe(_i: u64, ms: u64) -> (String, usize) {
        use std::sync::atomic::Ordering::SeqCst;
        let running = PROBES_RUNNING.fetch_add(1, SeqCst) + 1;
        std::thread::sleep(Duration::from_millis(ms));
        let most = running.max(PROBES_RUNNING.load(SeqCst));
        PROBES_RUNNING.fetch_sub(1, SeqCst);
        (std::env::var("TESSERA_NODE_NAME").unwrap_or_else(|_| "head".into()), most)
    }
}

tessera::task! {
    /// Counts the leaves of a binary tree of tasks `depth` levels deep: every inner task
    /// spawns two and waits for both.
    fn tree_leaves(depth: u32) -> Result<u64, String> {
        if depth == 0 {
            return Ok(1);
        }
        let rt = Runtime::current().ok_or("no runtime in this task")?;
        let (left, right) = (tree_leaves::spawn(&rt, depth - 1), tree_leaves::spawn(&rt, depth - 1));
        Ok(left.blocking_get().map_err(|e| e.to_string())? + right.blocking_get().map_err(|e| e.to_string())?)
    }
}

tessera::task! {
    /// From a node: spawns a task with a large result (held by a node) and hands its `Ref`
    /// to a second spawn; hands a large value of its own to a third; reads the large result
    /// itself. Gives the three checksums and the one it computed.
    fn large_values_between_spawns(len: usize) -> Result<Vec<String>, String> {
        let rt = Runtime::current().ok_or("no runtime in this task")?;
        let big = make_blob::spawn(&rt, len, 7);
        let of_spawned = checksum::spawn(&rt, &big);
        let own = rt.put(ByteBuf::from(blob(len, 8)));
        let of_own = checksum::spawn(&rt, &own);
        let read_here = big.blocking_get().map_err(|e| e.to_string())?;
        let sums = [of_spawned, of_own].iter().map(|r| r.blocking_get()).collect::<Result<Vec<_>, _>>();
        let mut sums = sums.map_err(|e| e.to_string())?;
        sums.push(blake3::hash(&read_here).to_hex().to_string());
        Ok(sums)
    }
}

tessera::task! {
    /// From a node: spawns a task with a large result (held where it ran), says so by
    /// making the file `dir/made`, waits for the file `dir/go`, then reads the result and
    /// gives its checksum.
    fn read_a_spawned_result_later(len: usize, dir: String) -> Result<String, String> {
        let rt = Runtime::current().ok_or("no runtime in this task")?;
        let big = make_blob::spawn(&rt, len, 9);
        let dir = std::path::Path::new(&dir);
        wait_for(|| big.is_ready(), "the spawned result")?;
        std::fs::write(dir.join("made"), b"").map_err(|e| e.to_string())?;
        wait_for(|| dir.join("go").exists(), "the file `go`")?;
        let bytes = big.blocking_get().map_err(|e| e.to_string())?;
        Ok(blake3::hash(&bytes).to_hex().to_string())
    }
}

tessera::task! {
    /// Hands back the `Ref` of a task it spawns: a blob of `len` bytes (held by the node
    /// that made it, when large).
    fn blob_by_forwarding(len: usize, seed: u64) -> Ref<ByteBuf> {
        let rt = Runtime::current().expect("tasks run inside a runtime");
        make_blob::spawn(&rt, len, seed)
    }
}

tessera::task! {
    /// From a node: reads what a task returning a `Ref` forwards (a large spawned result)
    /// and gives its checksum.
    fn read_a_forwarded_blob(len: usize, seed: u64) -> Result<String, String> {
        let rt = Runtime::current().ok_or("no runtime in this task")?;
        let forwarded = blob_by_forwarding::spawn(&rt, len, seed);
        let bytes = forwarded.blocking_get().map_err(|e| e.to_string())?;
        Ok(blake3::hash(&bytes).to_hex().to_string())
    }
}

tessera::task! {
    /// Sums `lo..hi` as a tree of tasks that return `Ref`s: a leaf puts its sum (with the
    /// name of the node that ran it, or "head"); an inner task forwards the `add_named` of
    /// its halves' `Ref`s.
    fn named_range_sum(lo: u64, hi: u64) -> Ref<(u64, Vec<String>)> {
        let rt = Runtime::current().expect("tasks run inside a runtime");
        if hi - lo <= 8 {
            let here = std::env::var("TESSERA_NODE_NAME").unwrap_or_else(|_| "head".into());
            return rt.put(((lo..hi).sum(), vec![here]));
        }
        let mid = lo + (hi - lo) / 2;
        let left = named_range_sum::spawn(&rt, lo, mid);
        let right = named_range_sum::spawn(&rt, mid, hi);
        add_named::spawn(&rt, &left, &right)
    }
}

tessera::task! {
    fn add_named(a: (u64, Vec<String>), b: (u64, Vec<String>)) -> (u64, Vec<String>) {
        (a.0 + b.0, a.1.into_iter().chain(b.1).collect())
    }
}

tessera::task! {
    /// Forwards a task that fails.
    fn forward_a_failure(text: String) -> Ref<u64> {
        let rt = Runtime::current().expect("tasks run inside a runtime");
        parse::spawn(&rt, text)
    }
}

/// Waits up to 60 s for `done`.
fn wait_for(done: impl Fn() -> bool, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("gave up waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

tessera::task! {
    /// From a node: hands a large value of its own (`len` bytes) to a spawned task; gives
    /// this node's name and where the spawned task ran.
    fn where_a_large_argument_goes(len: usize) -> Result<(String, String), String> {
        let rt = Runtime::current().ok_or("no runtime in this task")?;
        let own = rt.put(ByteBuf::from(blob(len, 3)));
        let (ran_on, digest) = digest_where::spawn(&rt, &own).blocking_get().map_err(|e| e.to_string())?;
        if digest != blake3::hash(&blob(len, 3)).to_hex().to_string() {
            return Err("the argument arrived damaged".into());
        }
        Ok((std::env::var("TESSERA_NODE_NAME").unwrap_or_else(|_| "head".into()), ran_on))
    }
}

tessera::task! {
    /// Spawns `parse(text)` and passes its result (or error) on.
    fn parse_in_a_spawn(text: String) -> Result<u64, String> {
        let rt = Runtime::current().ok_or("no runtime in this task")?;
        parse::spawn(&rt, text).blocking_get().map_err(|e| e.to_string())
    }
}

fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

struct TestCluster {
    rt: Runtime,
    cluster: Cluster,
}

impl TestCluster {
    fn start(nodes: usize, config: ClusterConfig) -> Result<Self> {
        Self::with_slots(nodes, 2, config)
    }

    /// `nodes` node processes of `slots` slots each.
    fn with_slots(nodes: usize, slots: usize, config: ClusterConfig) -> Result<Self> {
        let rt = Runtime::builder().workers(2).build()?;
        let cluster = Cluster::start(&rt, config)?;
        let c = TestCluster { rt, cluster };
        c.cluster.launch(&LocalProcesses { count: nodes, slots: Some(slots) })?;
        c.cluster.wait_for_nodes(nodes, Duration::from_secs(30))?;
        Ok(c)
    }

    /// Waits up to 10 s for the nodes to hold nothing for the head.
    fn wait_until_nothing_held(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cluster.nodes().iter().any(|n| n.values_held > 0) {
            ensure!(Instant::now() < deadline, "values still held: {:?}", self.cluster.nodes());
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Once `read_a_spawned_result_later` has made its result: the node holding the result
    /// and the node running the spawner (two different nodes).
    fn holder_and_spawner(&self) -> Result<(NodeInfo, NodeInfo)> {
        let nodes = self.cluster.nodes();
        let holder = nodes.iter().find(|n| n.values_held > 0).context("no node holds the result")?;
        let spawner = nodes.iter().find(|n| n.in_flight > 0).context("no node runs the spawner")?;
        ensure!(holder.name != spawner.name, "the spawner's node {} holds its result", holder.name);
        Ok((holder.clone(), spawner.clone()))
    }

    fn node_names(&self) -> Vec<String> {
        self.cluster.nodes().into_iter().map(|n| n.name).collect()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.rt.shutdown();
    }
}

fn kill9(pid: u32) -> Result<()> {
    let status = Command::new("kill").args(["-9", &pid.to_string()]).status()?;
    ensure!(status.success(), "kill -9 {pid} failed");
    Ok(())
}

fn remote_tasks_give_correct_results() -> Result<()> {
    let c = TestCluster::start(2, ClusterConfig::default())?;
    let squares: Vec<Ref<u64>> = (0..2000).map(|i| square::spawn(&c.rt, i)).collect();
    let mut total = 0;
    for r in &squares {
        total += r.blocking_get()?;
    }
    ensure!(total == (0..2000u64).map(|i| i * i).sum::<u64>(), "wrong sum {total}");
    // Dependent remote tasks: a reduction tree over remote results.
    let mut level = squares;
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| if p.len() == 2 { add::spawn(&c.rt, &p[0], &p[1]) } else { p[0].clone() })
            .collect();
    }
    ensure!(level[0].blocking_get()? == total, "reduction tree disagrees");
    let spawned: Vec<_> = (0..200).map(|i| node_name::spawn(&c.rt, i)).collect();
    let names: std::collections::BTreeSet<String> =
        spawned.iter().map(|r| r.blocking_get()).collect::<Result<_, _>>()?;
    ensure!(names.iter().all(|n| n.starts_with("local-")), "tasks ran outside the nodes: {names:?}");
    ensure!(names.len() == 2, "expected both nodes to run tasks, got {names:?}");
    for node in c.cluster.nodes() {
        ensure!(node.tasks_run > 0, "node {} ran nothing", node.name);
    }
    // A task on a node spawns nested tasks (onto the cluster).
    for nested in (0..6).map(|_| squares_below_by_nested_tasks::spawn(&c.rt, 100)).collect::<Vec<_>>() {
        let (node, sum) = nested.blocking_get()?;
        ensure!(node.starts_with("local-"), "ran on {node}");
        ensure!(sum == (0..100u64).map(|i| i * i).sum::<u64>(), "nested sum {sum}");
    }
    // Errors cross the wire with the task's name.
    match parse::spawn(&c.rt, "x1".to_string()).blocking_get() {
        Err(Error::TaskFailed { task, message }) => {
            ensure!(task.ends_with("::parse") && message.contains("invalid digit"), "{task}: {message}")
        }
        other => bail!("expected a remote task failure, got {other:?}"),
    }
    Ok(())
}

/// Tasks running on nodes spawn tasks onto the whole cluster (through the head), even
/// when every node's one slot is taken by a task waiting for its children.
fn tasks_on_nodes_spawn_onto_the_cluster() -> Result<()> {
    let c = TestCluster::with_slots(2, 1, ClusterConfig::default())?;
    let (rt, cluster) = (c.rt.clone(), c.cluster.clone());

    let names = names_of_spawned::spawn(&rt, 8).blocking_get()?;
    let distinct: std::collections::BTreeSet<&String> = names.iter().collect();
    ensure!(names.len() == 8 && distinct.len() == 2, "children of a node's task ran on {names:?}");
    ensure!(distinct.iter().all(|n| n.starts_with("local-")), "children ran outside the nodes: {names:?}");

    // 255 tasks, each inner one waiting for two, on two one-slot nodes.
    ensure!(tree_leaves::spawn(&rt, 7).blocking_get()? == 128, "wrong leaf count");
    // The threads that stood in for waiting tasks are gone: one task at a time per node.
    let probes: Vec<Ref<(String, usize)>> = (0..16).map(|i| concurrency_probe::spawn(&rt, i, 20)).collect();
    for probe in &probes {
        let (node, most) = probe.blocking_get()?;
        ensure!(most == 1, "{most} tasks ran at once on one-slot node {node}");
    }

    let len = 300_000;
    let sums = large_values_between_spawns::spawn(&rt, len).blocking_get()?;
    let expected = |seed| blake3::hash(&blob(len, seed)).to_hex().to_string();
    ensure!(sums == [expected(7), expected(8), expected(7)], "checksums {sums:?}");

    // A task spawned with a large value of its node's own runs where the value is.
    for _ in 0..4 {
        let (parent, child) = where_a_large_argument_goes::spawn(&rt, 2 << 20).blocking_get()?;
        ensure!(parent == child, "a 2 MiB argument held by {parent} went to {child}");
    }

    match parse_in_a_spawn::spawn(&rt, "x1".to_string()).blocking_get() {
        Err(Error::TaskFailed { task, message }) => ensure!(
            task.ends_with("::parse_in_a_spawn")
                && message.contains("::parse")
                && message.contains("invalid digit"),
            "{task}: {message}"
        ),
        other => bail!("expected the spawned task's failure, got {other:?}"),
    }
    let run: u64 = cluster.nodes().iter().map(|n| n.tasks_run).sum();
    ensure!(run >= 1 + 8 + 255 + 16 + 4 + 8 + 2, "the nodes ran {run} tasks");

    // Once nothing refers to them, the results kept for the nodes' spawns are freed.
    c.wait_until_nothing_held()
}

/// A task returning a `Ref` to a large value that a node holds: the value stays readable
/// for as long as the forwarded `Ref` lives (the task's own `Ref` to it is gone by then),
/// read by the head and by a task on a node, and is freed once nothing names it.
fn a_forwarded_value_held_by_a_node_stays_readable() -> Result<()> {
    let c = TestCluster::start(2, ClusterConfig::default())?;
    let rt = c.rt.clone();
    let len = 300_000;
    let expected = |seed| blake3::hash(&blob(len, seed)).to_hex().to_string();
    for seed in 0..4 {
        let forwarded = blob_by_forwarding::spawn(&rt, len, seed);
        let bytes = forwarded.blocking_get().context("reading a forwarded blob on the head")?;
        ensure!(blake3::hash(&bytes).to_hex().to_string() == expected(seed), "blob {seed} differs");
        // A task on a node takes it as an argument.
        let sum = checksum::spawn(&rt, &forwarded).blocking_get().context("a node's task taking it")?;
        ensure!(sum == expected(seed), "blob {seed} differs on a node");
        let sum = read_a_forwarded_blob::spawn(&rt, len, seed + 10).blocking_get()?;
        ensure!(sum == expected(seed + 10), "blob {} read on a node differs", seed + 10);
    }
    c.wait_until_nothing_held()
}

/// Tasks returning `Ref`s run on the nodes like any other: a tree of them (each inner one
/// forwarding a task it spawns from its node) gives the right sum with leaves on both nodes;
/// a forwarded large result held by a node and a forwarded failure reach the head.
fn tasks_returning_refs_run_on_the_nodes() -> Result<()> {
    let c = TestCluster::with_slots(2, 1, ClusterConfig::default())?;
    let rt = c.rt.clone();
    let before: u64 = c.cluster.nodes().iter().map(|n| n.tasks_run).sum();
    let (sum, leaves) = named_range_sum::spawn(&rt, 0, 256).blocking_get()?;
    ensure!(sum == (0..256).sum::<u64>(), "sum {sum}");
    ensure!(leaves.len() == 32, "{} leaves", leaves.len());
    let distinct: std::collections::BTreeSet<&String> = leaves.iter().collect();
    ensure!(
        distinct.len() == 2 && distinct.iter().all(|n| n.starts_with("local-")),
        "the leaves ran on {distinct:?}"
    );
    // 63 tasks returning `Ref`s (32 leaves, 31 inner ones) and 31 additions, all on nodes.
    let ran: u64 = c.cluster.nodes().iter().map(|n| n.tasks_run).sum::<u64>() - before;
    ensure!(ran == 63 + 31, "the nodes ran {ran} tasks");

    let len = 300_000;
    let bytes = blob_by_forwarding::spawn(&rt, len, 5).blocking_get()?;
    ensure!(bytes.as_slice() == blob(len, 5).as_slice(), "the forwarded blob differs");
    match forward_a_failure::spawn(&rt, "x1".to_string()).blocking_get() {
        Err(Error::TaskFailed { task, message }) => ensure!(
            task.ends_with("::forward_a_failure") && message.contains("invalid digit"),
            "{task}: {message}"
        ),
        other => bail!("expected the forwarded task's failure, got {other:?}"),
    }
    ensure!(forward_a_failure::spawn(&rt, "41".to_string()).blocking_get()? == 41, "forwarded parse");
    c.wait_until_nothing_held()
}

/// The node holding a value that a task forwarded is lost: the value is made again from
/// lineage, and the forwarding task's `Ref` reads the new copy.
fn a_forwarded_value_lost_with_its_holder_is_made_again() -> Result<()> {
    let c = TestCluster::with_slots(3, 1, ClusterConfig::default())?;
    let len = 300_000;
    let forwarded = blob_by_forwarding::spawn(&c.rt, len, 21);
    ensure!(forwarded.blocking_get()?.as_slice() == blob(len, 21).as_slice(), "the first read differs");
    let nodes = c.cluster.nodes();
    let holder = nodes.iter().find(|n| n.values_held > 0).context("no node holds the blob")?;
    kill9(holder.pid)?;
    let again = forwarded.blocking_get().context("reading it after its holder was lost")?;
    ensure!(again.as_slice() == blob(len, 21).as_slice(), "the value made again differs");
    let lost: Vec<String> = c.cluster.nodes().into_iter().map(|n| n.name).collect();
    ensure!(!lost.contains(&holder.name), "{} is still listed", holder.name);
    Ok(())
}

/// The node holding the result of a node's spawn is lost before the spawner reads it: the
/// head makes it again from lineage and tells the spawner where it is now.
fn a_spawned_result_lost_with_its_holder_is_made_again_for_the_spawner() -> Result<()> {
    let c = TestCluster::with_slots(3, 1, ClusterConfig::default())?;
    let (rt, cluster) = (c.rt.clone(), c.cluster.clone());
    let dir = std::env::temp_dir().join(format!("tessera-spawn-loss-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let len = 300_000;
    let sum = read_a_spawned_result_later::spawn(&rt, len, dir.to_string_lossy().into_owned());
    let result = (|| {
        wait_for(|| dir.join("made").exists(), "the spawned result").map_err(anyhow::Error::msg)?;
        let (holder, _) = c.holder_and_spawner()?;
        kill9(holder.pid)?;
        let lost = holder.name.clone();
        wait_for(|| cluster.lost_nodes().contains(&lost), "the holder's loss").map_err(anyhow::Error::msg)?;
        std::fs::write(dir.join("go"), b"")?;
        let sum = sum.blocking_get()?;
        ensure!(sum == blake3::hash(&blob(len, 9)).to_hex().to_string(), "wrong checksum {sum}");
        c.wait_until_nothing_held()
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The node that spawned a task is lost while another node holds the task's result: the
/// head drops what it kept for the lost node, so the holder frees the result.
fn what_the_head_keeps_for_a_lost_spawner_is_freed() -> Result<()> {
    let c = TestCluster::with_slots(2, 1, ClusterConfig { max_node_losses: 0, ..ClusterConfig::default() })?;
    let rt = c.rt.clone();
    let dir = std::env::temp_dir().join(format!("tessera-spawner-loss-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sum = read_a_spawned_result_later::spawn(&rt, 300_000usize, dir.to_string_lossy().into_owned());
    let result = (|| {
        wait_for(|| dir.join("made").exists(), "the spawned result").map_err(anyhow::Error::msg)?;
        let (_, spawner) = c.holder_and_spawner()?;
        kill9(spawner.pid)?;
        match sum.blocking_get() {
            Err(Error::NodeLost { node, .. }) => ensure!(node == spawner.name, "lost {node}"),
            other => bail!("expected the spawner's loss, got {other:?}"),
        }
        c.wait_until_nothing_held()
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn a_64_mib_object_crosses_nodes_intact() -> Result<()> {
    let c = TestCluster::start(2, ClusterConfig::default())?;
    const LEN: usize = 64 << 20;
    let expected = blake3::hash(&blob(LEN, 42)).to_hex().to_string();
    let made = make_blob::spawn(&c.rt, LEN, 42);
    let remote_sum = checksum::spawn(&c.rt, &made).blocking_get()?;
    ensure!(remote_sum == expected, "checksum computed on a node differs");
    let held: usize = c.cluster.nodes().iter().map(|n| n.values_held).sum();
    ensure!(held >= 1, "the 64 MiB value should stay on the node that made it");
    let start = Instant::now();
    let local = made.blocking_get()?;
    let took = start.elapsed();
    ensure!(local.len() == LEN, "got {} bytes", local.len());
    ensure!(blake3::hash(&local).to_hex().to_string() == expected, "bytes differ after crossing to the head");
    println!("    64 MiB node -> head in {:.1} ms", took.as_secs_f64() * 1e3);
    // A head-held value larger than a frame goes to a node and back.
    let head_value = c.rt.put(ByteBuf::from(blob(20 << 20, 7)));
    let sum_there = checksum::spawn(&c.rt, &head_value).blocking_get()?;
    ensure!(
        sum_there == blake3::hash(&blob(20 << 20, 7)).to_hex().to_string(),
        "head -> node transfer corrupted"
    );
    drop(made);
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.cluster.nodes().iter().map(|n| n.values_held).sum::<usize>() > 0 {
        ensure!(Instant::now() < deadline, "nodes still hold values after their last Ref dropped");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn a_sigkilled_node_mid_job_does_not_stop_the_job() -> Result<()> {
    let config = ClusterConfig { heartbeat_timeout: Duration::from_secs(2), ..ClusterConfig::default() };
    let c = TestCluster::start(3, config)?;
    // Map: 48 slow tasks with large results held on the nodes; reduce: sums over them.
    let blocks: Vec<_> = (0..48).map(|i| slow_block::spawn(&c.rt, i, 60)).collect();
    let sums: Vec<_> = blocks.iter().map(|b| block_sum::spawn(&c.rt, b)).collect();
    std::thread::sleep(Duration::from_millis(400));
    let victim = c
        .cluster
        .nodes()
        .into_iter()
        .find(|n| n.in_flight > 0 || n.values_held > 0)
        .context("a busy node")?;
    println!(
        "    killing {} (pid {}) with {} running, {} held",
        victim.name, victim.pid, victim.in_flight, victim.values_held
    );
    kill9(victim.pid)?;
    let mut total = 0;
    for s in &sums {
        total += s.blocking_get_timeout(Duration::from_secs(60))?;
    }
    let expected: u64 = (0..48u64).map(|i| (i % 251) * 100_000).sum();
    ensure!(total == expected, "wrong total {total}, expected {expected}");
    // Values that lived on the dead node are rebuilt from lineage when read again.
    for (i, b) in blocks.iter().enumerate() {
        let block = b.blocking_get_timeout(Duration::from_secs(60))?;
        ensure!(block.len() == 100_000 && block[0] == (i % 251) as u8, "block {i} wrong after recovery");
    }
    ensure!(c.cluster.lost_nodes() == vec![victim.name.clone()], "lost: {:?}", c.cluster.lost_nodes());
    ensure!(c.cluster.nodes().len() == 2, "two nodes should remain");
    Ok(())
}

fn a_hung_node_is_detected_by_missing_heartbeats() -> Result<()> {
    let config = ClusterConfig {
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_millis(1500),
        ..ClusterConfig::default()
    };
    let c = TestCluster::start(2, config)?;
    let work: Vec<_> = (0..40).map(|i| slow_square::spawn(&c.rt, i, 50)).collect();
    std::thread::sleep(Duration::from_millis(150));
    let victim = c.cluster.nodes().into_iter().find(|n| n.in_flight > 0).context("a busy node")?;
    // SIGSTOP: the process hangs, its sockets stay open; only heartbeats tell.
    let stopped = Instant::now();
    let status = Command::new("kill").args(["-STOP", &victim.pid.to_string()]).status()?;
    ensure!(status.success(), "kill -STOP failed");
    while c.cluster.lost_nodes().is_empty() {
        ensure!(stopped.elapsed() < Duration::from_secs(10), "the hung node was never declared lost");
        std::thread::sleep(Duration::from_millis(50));
    }
    let detected = stopped.elapsed();
    for (i, r) in work.iter().enumerate() {
        ensure!(r.blocking_get_timeout(Duration::from_secs(30))? == (i * i) as u64, "wrong result {i}");
    }
    let _ = Command::new("kill").args(["-KILL", &victim.pid.to_string()]).status();
    println!("    hung node declared lost after {:.1} s", detected.as_secs_f64());
    ensure!(detected < Duration::from_secs(5), "detection took {detected:?}");
    ensure!(c.cluster.lost_nodes() == vec![victim.name], "lost: {:?}", c.cluster.lost_nodes());
    Ok(())
}

fn a_put_on_a_lost_node_fails_naming_the_node() -> Result<()> {
    let c = TestCluster::start(2, ClusterConfig::default())?;
    let node = c.cluster.nodes().into_iter().next().context("a node")?;
    let value = c.cluster.put_on(node.id, &ByteBuf::from(vec![9u8; 200_000]))?;
    ensure!(value.blocking_get()?.len() == 200_000, "put_on value readable while the node lives");
    kill9(node.pid)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match value.blocking_get() {
            Err(Error::ObjectLost { reason, .. }) => {
                ensure!(reason.contains(&node.name), "error does not name the node: {reason}");
                break;
            }
            Err(Error::Transfer { .. }) | Ok(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => bail!("expected the value to be lost, got {other:?}"),
        }
    }
    ensure!(square::spawn(&c.rt, 5).blocking_get()? == 25, "the head keeps running");
    Ok(())
}

fn a_wrong_secret_is_refused() -> Result<()> {
    let c =
        TestCluster::start(1, ClusterConfig { secret: Some("right".into()), ..ClusterConfig::default() })?;
    let output = Command::new(std::env::current_exe()?)
        .env("TESSERA_ROLE", "worker")
        .env("TESSERA_JOIN", c.cluster.addr().to_string())
        .env("TESSERA_SECRET", "wrong")
        .env("TESSERA_NODE_NAME", "intruder")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "a node with a wrong secret must exit with an error");
    ensure!(stderr.contains("refused") && stderr.contains("wrong cluster secret"), "stderr: {stderr}");
    // The head counts the refusal once its handshake task has sent it, which can be just
    // after the intruder has read it and exited.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while c.cluster.refused_connections() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    ensure!(c.cluster.refused_connections() >= 1, "the head must count the refusal");
    ensure!(c.node_names() == vec!["local-0".to_string()], "intruder joined: {:?}", c.node_names());
    ensure!(square::spawn(&c.rt, 3).blocking_get()? == 9, "cluster still serves");
    Ok(())
}

fn garbage_and_oversized_frames_leave_nodes_serving() -> Result<()> {
    let c = TestCluster::start(1, ClusterConfig::default())?;
    let node = c.cluster.nodes().into_iter().next().context("a node")?;
    let targets = [c.cluster.addr(), node.data_addr];
    let mut seed = 12345u64;
    for target in targets {
        for round in 0..20 {
            let mut stream = TcpStream::connect(target)?;
            stream.set_write_timeout(Some(Duration::from_secs(2)))?;
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let payload: Vec<u8> = match round % 4 {
                0 => blob(1 + (seed % 4096) as usize, seed), // random bytes
                1 => (u32::MAX - 1).to_le_bytes().to_vec(),  // oversized frame
                2 => [&(17u32 << 20).to_le_bytes()[..], &[0u8; 64]].concat(), // just over the limit
                _ => [&8u32.to_le_bytes()[..], &[0xff; 8]].concat(), // malformed message
            };
            let _ = stream.write_all(&payload);
            drop(stream);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    ensure!(c.cluster.nodes().len() == 1, "the node must still be in the cluster");
    let big = make_blob::spawn(&c.rt, 1 << 20, 3);
    ensure!(big.blocking_get()?.len() == 1 << 20, "data port still serves");
    ensure!(square::spawn(&c.rt, 12).blocking_get()? == 144, "head still runs tasks");
    ensure!(c.cluster.refused_connections() >= 20, "refusals counted: {}", c.cluster.refused_connections());
    Ok(())
}

fn a_node_joining_mid_job_gets_work() -> Result<()> {
    let c = TestCluster::start(1, ClusterConfig::default())?;
    let first: Vec<_> = (0..40).map(|i| slow_square::spawn(&c.rt, i, 25)).collect();
    c.cluster.launch(&LocalProcesses { count: 1, slots: Some(2) })?;
    c.cluster.wait_for_nodes(2, Duration::from_secs(30))?;
    let second: Vec<_> = (40..200).map(|i| slow_square::spawn(&c.rt, i, 25)).collect();
    for (i, r) in first.iter().chain(&second).enumerate() {
        ensure!(r.blocking_get()? == (i * i) as u64, "wrong result {i}");
    }
    let nodes = c.cluster.nodes();
    ensure!(nodes.len() == 2, "{nodes:?}");
    for node in &nodes {
        ensure!(node.tasks_run >= 20, "node {} ran only {} tasks", node.name, node.tasks_run);
    }
    Ok(())
}

fn actors_run_on_nodes_in_arrival_order_per_caller() -> Result<()> {
    let c = TestCluster::start(2, ClusterConfig::default())?;
    let node = c.cluster.nodes().into_iter().nth(1).context("two nodes")?;
    let recorder = c.cluster.actor_on(node.id, &Recorder { seen: vec![(99, 0)] })?;
    const CALLERS: u32 = 8;
    const CALLS: u32 = 300;
    std::thread::scope(|scope| {
        for caller in 0..CALLERS {
            let recorder = recorder.clone();
            scope.spawn(move || {
                let replies: Vec<_> = (0..CALLS).map(|seq| recorder.call(Some((caller, seq)))).collect();
                for reply in replies {
                    reply.blocking_get().expect("call handled");
                }
            });
        }
    });
    let (host, seen) = recorder.call(None).blocking_get()?;
    ensure!(host == node.name, "the actor ran on `{host}`, not on {}", node.name);
    ensure!(
        seen.len() == (CALLERS * CALLS) as usize + 1 && seen[0] == (99, 0),
        "state or calls lost: {}",
        seen.len()
    );
    let mut next = [0u32; CALLERS as usize];
    for &(caller, seq) in &seen[1..] {
        ensure!(seq == next[caller as usize], "caller {caller} out of order");
        next[caller as usize] += 1;
    }
    // A call to an actor whose node is lost fails with the node named.
    kill9(node.pid)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match recorder.call(None).blocking_get_timeout(Duration::from_secs(10)) {
            Err(Error::ActorFailed { message, .. })
                if message.contains(&node.name) || message.contains("not in the cluster") =>
            {
                break
            }
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => bail!("expected the actor's node to be reported lost, got {other:?}"),
        }
    }
    Ok(())
}

fn the_store_actor_saves_a_value_from_the_node_that_holds_it() -> Result<()> {
    let c = TestCluster::start(2, ClusterConfig::default())?;
    let dir = tempfile::tempdir()?;
    let stash = tessera::Stash::open(dir.path())?;
    const LEN: usize = 6 << 20;
    let made = make_blob::spawn(&c.rt, LEN, 11);
    c.rt.blocking_wait(std::slice::from_ref(&made), 1, None);
    let holders: Vec<_> = c.cluster.nodes().into_iter().filter(|n| n.values_held > 0).collect();
    ensure!(holders.len() == 1, "the blob should be held by one node: {holders:?}");
    // Its size as encoded: the bytes and a length prefix.
    ensure!((LEN as u64..LEN as u64 + 16).contains(&holders[0].bytes_held), "{holders:?}");
    let version = c.cluster.save_ref(&stash, "blob", &made, &[("source", "node")])?;
    let info = stash.info("blob", Some(version))?;
    ensure!(info.type_name.contains("ByteBuf"), "recorded type {}", info.type_name);
    ensure!(info.tags.iter().any(|(k, v)| k == "source" && v == "node"), "tags {:?}", info.tags);
    let loaded: ByteBuf = stash.load("blob")?;
    ensure!(loaded.len() == LEN && loaded.as_slice() == blob(LEN, 11).as_slice(), "saved bytes differ");
    // A value not produced yet: the save waits for it, then the node that made it saves it.
    let pending = make_blob::spawn(&c.rt, LEN, 12);
    let v_pending = c.cluster.save_ref(&stash, "pending", &pending, &[])?;
    let loaded: ByteBuf = stash.load_version("pending", v_pending)?;
    ensure!(loaded.as_slice() == blob(LEN, 12).as_slice(), "saved pending bytes differ");
    // A value the head holds is saved by the head.
    let local = c.rt.put(vec![1u64, 2, 3]);
    let v2 = c.cluster.save_ref(&stash, "small", &local, &[])?;
    ensure!(stash.load_version::<Vec<u64>>("small", v2)? == vec![1, 2, 3], "head-held value");
    // A failed value is not saved.
    let failed = parse::spawn(&c.rt, "nope".to_string());
    ensure!(c.cluster.save_ref(&stash, "failed", &failed, &[]).is_err(), "a failed value must not be saved");
    ensure!(stash.history("failed").map(|h| h.is_empty()).unwrap_or(true), "no version for a failed value");
    Ok(())
}

/// A task argument, an actor's state, a call and a reply each larger than a frame (16 MiB)
/// travel through the data plane; the node stays in the cluster throughout.
fn values_larger_than_a_frame_reach_nodes_and_come_back() -> Result<()> {
    let c = TestCluster::start(1, ClusterConfig::default())?;
    let node = c.cluster.nodes().into_iter().next().context("one node")?;
    const BIG: usize = 20 << 20;
    let arg = blob(BIG, 31);
    let (ran_on, digest) = digest_where::spawn(&c.rt, ByteBuf::from(arg.clone())).blocking_get()?;
    ensure!(ran_on == node.name, "the task ran on `{ran_on}`, not on the node {}", node.name);
    ensure!(digest == blake3::hash(&arg).to_hex().to_string(), "the task saw other bytes");

    // The task's argument is freed when the finished task is dropped, which may come just
    // after its result: wait for that before counting what the head holds.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.rt.stats().live_bytes >= BIG as u64 {
        ensure!(Instant::now() < deadline, "the head still holds the task's argument: {:?}", c.rt.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = c.rt.stats().live_bytes;
    let state = blob(BIG + 3, 32);
    let hoard = c.cluster.actor_on(node.id, &Hoard { data: ByteBuf::from(state.clone()) })?;
    let waiting = c.rt.stats().live_bytes - before;
    ensure!(waiting >= BIG as u64, "the state should wait on the head for the node: {waiting} bytes");
    let extra = blob(BIG - 5, 33);
    let wanted = BIG + 1000;
    let (ran_on, digest, head) = hoard
        .call((Some(ByteBuf::from(extra.clone())), wanted))
        .blocking_get_timeout(Duration::from_secs(60))?;
    // Once answered, the head holds neither the state, nor the message, nor (its Ref gone)
    // the reply (the finished call is dropped just after its answer, as the task above).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = c.rt.stats().live_bytes.saturating_sub(before);
        if left < 4096 {
            break;
        }
        ensure!(Instant::now() < deadline, "{left} bytes still held on the head after the first call");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The large reply was kept on the node; with its Ref gone the node frees it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.cluster.nodes()[0].values_held > 0 {
        ensure!(Instant::now() < deadline, "the node still holds the reply: {:?}", c.cluster.nodes());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut all = state;
    all.extend_from_slice(&extra);
    ensure!(ran_on == node.name, "the actor ran on `{ran_on}`");
    ensure!(digest == blake3::hash(&all).to_hex().to_string(), "the actor holds other bytes");
    ensure!(head.len() == wanted && head.as_slice() == &all[..wanted], "the large reply differs");
    // Small calls still work, and the node never left.
    let (_, digest, head) = hoard.call((None, 4)).blocking_get()?;
    ensure!(head.as_slice() == &all[..4] && digest == blake3::hash(&all).to_hex().to_string(), "small call");
    ensure!(c.cluster.nodes().len() == 1, "the node left the cluster: {:?}", c.node_names());
    ensure!(square::spawn(&c.rt, 12).blocking_get()? == 144, "a task after the large transfers");
    Ok(())
}

/// A distributed array made, multiplied, sliced and saved over two node processes: the
/// chunk tasks run on the nodes, which also write the chunks they hold to the stash.
/// Chunks of `a` and of the product outgrow the inline limit (64 KiB), so nodes hold them;
/// `b`'s small chunks come to the head, and are rechunked for the product on the nodes.
fn distributed_arrays_compute_and_save_on_the_nodes() -> Result<()> {
    use tessera::{DArray, Fill, ReduceOp};
    let c = TestCluster::start(2, ClusterConfig::default())?;
    let dir = tempfile::tempdir()?;
    let stash = tessera::Stash::open(dir.path())?;
    let a = DArray::<f64>::fill(
        &c.rt,
        &[300, 200],
        &[100, 100],
        Fill::Uniform { seed: 1, low: -1.0, high: 1.0 },
    )?;
    let b =
        DArray::<f64>::fill(&c.rt, &[200, 120], &[40, 120], Fill::Normal { seed: 2, mean: 0.0, std: 1.0 })?;
    let product = a.matmul(&b)?;
    product.wait()?;
    let nodes = c.cluster.nodes();
    ensure!(nodes.iter().all(|n| n.tasks_run > 0), "every node should run chunk tasks: {nodes:?}");
    ensure!(nodes.iter().any(|n| n.values_held > 0), "the nodes should hold the chunks: {nodes:?}");

    let (la, lb) = (
        a.to_array()?.into_dimensionality::<ndarray::Ix2>()?,
        b.to_array()?.into_dimensionality::<ndarray::Ix2>()?,
    );
    let expected = la.dot(&lb);
    let got = product.to_array()?.into_dimensionality::<ndarray::Ix2>()?;
    let worst = (&got - &expected).iter().fold(0.0f64, |w, d| w.max(d.abs()));
    ensure!(worst < 1e-10, "the product is off by {worst}");
    let sum = product.reduce(ReduceOp::Sum)?.blocking_get()?;
    ensure!((sum - expected.sum()).abs() < 1e-8, "sum {sum} vs {}", expected.sum());
    let part = product.slice(&[40..260, 15..100])?.to_array()?;
    ensure!(part == got.slice(ndarray::s![40..260, 15..100]).into_dyn().to_owned(), "slice differs");

    // A sparse matrix made on the nodes, times a vector: one task per block of rows.
    let laplacian = tessera::SparseDArray::<f64>::poisson_2d(&c.rt, 100, 2500)?;
    let ones = DArray::<f64>::fill(&c.rt, &[10_000], &[2500], Fill::Constant(1.0))?;
    let sums = laplacian.matmul(&ones)?.to_array()?;
    // Row sums of the 5-point Laplacian: 4 minus the neighbours inside the grid.
    ensure!(sums.iter().sum::<f64>() == 4.0 * 100.0, "row sums add up to {}", sums.sum());
    ensure!(laplacian.to_csr()?.nnz() == 5 * 10_000 - 400, "the Laplacian's nonzeros");
    // Sparse × sparse on the nodes: the Laplacian squared, against sprs.
    let reference = laplacian.to_csr()?;
    ensure!(
        laplacian.matmul_sparse(&laplacian)?.to_csr()? == &reference * &reference,
        "the Laplacian squared"
    );

    // Blocks of about 150 KB: the nodes hold them, and write them to the stash.
    let version = laplacian.save(&stash, "laplacian", &[])?;
    let loaded = tessera::SparseDArray::<f64>::load_version(&c.rt, &stash, "laplacian", version)?;
    ensure!(loaded.to_csr()? == laplacian.to_csr()?, "the saved sparse matrix differs");

    let version = product.save(&stash, "product", &[("by", "nodes")])?;
    let loaded = DArray::<f64>::load_version(&c.rt, &stash, "product", version)?;
    ensure!(loaded.to_array()? == got.into_dyn(), "the saved array differs");
    Ok(())
}

/// Nodes reach a remote stash with the URL it was opened from (endpoint and credentials
/// included), for values they hold and for the chunks of a distributed array; a mirror of
/// a directory and S3 gets a whole copy on each.
#[cfg(feature = "s3")]
fn nodes_save_what_they_hold_into_s3_and_a_mirror() -> Result<()> {
    use tessera::{DArray, Fill};
    let c = TestCluster::start(2, ClusterConfig::default())?;
    let server = servers::S3Server::start("cluster-saves");
    let stash = tessera::Stash::open_url(&server.url("cluster-saves", "direct"))?;
    const LEN: usize = 3 << 20;
    let made = make_blob::spawn(&c.rt, LEN, 21);
    let version = c.cluster.save_ref(&stash, "blob", &made, &[])?;
    let loaded: ByteBuf = stash.load_version("blob", version)?;
    ensure!(loaded.as_slice() == blob(LEN, 21).as_slice(), "the node saved other bytes to S3");

    // 512 KiB chunks: the nodes hold them, and write them.
    let fill = Fill::Uniform { seed: 5, low: -1.0, high: 1.0 };
    let array = DArray::<f64>::fill(&c.rt, &[512, 512], &[256, 256], fill)?;
    let expected = array.to_array()?;
    let version = array.save(&stash, "array", &[])?;
    ensure!(
        DArray::<f64>::load_version(&c.rt, &stash, "array", version)?.to_array()? == expected,
        "S3 array"
    );

    let dir = tempfile::tempdir()?;
    let copy = server.url("cluster-saves", "copy");
    let mirror = tessera::Stash::open_url(&format!("mirror:{},{copy}", dir.path().display()))?;
    array.save(&mirror, "array", &[("kept", "twice")])?;
    for alone in [tessera::Stash::open(dir.path())?, tessera::Stash::open_url(&copy)?] {
        let back = DArray::<f64>::load(&c.rt, &alone, "array")?.to_array()?;
        ensure!(back == expected, "a replica of {} lacks the array", alone.location());
    }
    Ok(())
}

fn main() {
    tessera::init();
    let tests: &[(&str, support::TestFn)] = &[
        ("remote_tasks_give_correct_results", remote_tasks_give_correct_results),
        ("tasks_on_nodes_spawn_onto_the_cluster", tasks_on_nodes_spawn_onto_the_cluster),
        ("a_forwarded_value_held_by_a_node_stays_readable", a_forwarded_value_held_by_a_node_stays_readable),
        ("tasks_returning_refs_run_on_the_nodes", tasks_returning_refs_run_on_the_nodes),
        (
            "a_forwarded_value_lost_with_its_holder_is_made_again",
            a_forwarded_value_lost_with_its_holder_is_made_again,
        ),
        (
            "a_spawned_result_lost_with_its_holder_is_made_again_for_the_spawner",
            a_spawned_result_lost_with_its_holder_is_made_again_for_the_spawner,
        ),
        ("what_the_head_keeps_for_a_lost_spawner_is_freed", what_the_head_keeps_for_a_lost_spawner_is_freed),
        ("a_64_mib_object_crosses_nodes_intact", a_64_mib_object_crosses_nodes_intact),
        ("a_sigkilled_node_mid_job_does_not_stop_the_job", a_sigkilled_node_mid_job_does_not_stop_the_job),
        ("a_hung_node_is_detected_by_missing_heartbeats", a_hung_node_is_detected_by_missing_heartbeats),
        ("a_put_on_a_lost_node_fails_naming_the_node", a_put_on_a_lost_node_fails_naming_the_node),
        ("a_wrong_secret_is_refused", a_wrong_secret_is_refused),
        (
            "garbage_and_oversized_frames_leave_nodes_serving",
            garbage_and_oversized_frames_leave_nodes_serving,
        ),
        ("a_node_joining_mid_job_gets_work", a_node_joining_mid_job_gets_work),
        ("actors_run_on_nodes_in_arrival_order_per_caller", actors_run_on_nodes_in_arrival_order_per_caller),
        (
            "the_store_actor_saves_a_value_from_the_node_that_holds_it",
            the_store_actor_saves_a_value_from_the_node_that_holds_it,
        ),
        (
            "distributed_arrays_compute_and_save_on_the_nodes",
            distributed_arrays_compute_and_save_on_the_nodes,
        ),
        (
            "values_larger_than_a_frame_reach_nodes_and_come_back",
            values_larger_than_a_frame_reach_nodes_and_come_back,
        ),
        #[cfg(feature = "s3")]
        ("nodes_save_what_they_hold_into_s3_and_a_mirror", nodes_save_what_they_hold_into_s3_and_a_mirror),
    ];
    support::run(tests);
}
