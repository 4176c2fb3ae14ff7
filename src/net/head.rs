//! The cluster head: accepts node processes, runs ready tasks on them, tracks where values
//! are held and the lineage that rebuilds them, and recovers from lost nodes.
//!
//! Invariants:
//! 1. A task sent to a node is in exactly one node's `in_flight` map until its reply
//!    arrives or the node is lost.
//! 2. A value held by a node is in that node's `held` set and, if a task made it, its job is
//!    in `lineage` (keeping the task's inputs alive) until the value's last `Ref` drops.
//! 3. The state lock is never held while completing values, dispatching or dropping jobs:
//!    those run user waiters and may re-enter the head.
//!
//! Recovery from a lost node (control connection closed, or heartbeats missing):
//! 1. Remove the node; forget pooled data connections to it.
//! 2. Every value it held goes back to pending and its task is re-run (gated on its own
//!    inputs, which may be being rebuilt too); values without lineage fail with
//!    `Error::ObjectLost` naming the node.
//! 3. Every task it was running is re-run elsewhere, at most `max_node_losses` times.
//! 4. The results the head kept for the node's own spawns are dropped (see `spawns`).
mod spawns;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::auth::{server_handshake, ClusterKey, HandshakeGate};
use super::data::{serve_data, DataClient, ObjectSource};
use super::frame::{read_frame, write_frame, FrameError};
use super::in_order::InOrder;
use super::manager::{ClusterManager, JoinInfo, LaunchedNode};
use super::wire::{ArgSource, Message, RemoteTaskError, ReplyValue, Role, TaskReply, TaskRequest};
use crate::actors::object::{
    EncodedValue, Fetched, ObjectId, ObjectTable, Outcome, RemoteAccess, RemoteLocation, RemoteValue, Value,
    View,
};
use crate::actors::reference::{Dependency, RefInner, RemoteArgKind};
use crate::actors::runtime::{Core, NodeCounts, RemoteScheduler};
use crate::actors::task::{forward_into, submit_when_ready, Job};
use crate::actors::user_actor::RemoteActorLink;
use crate::devices::{GpuInfo, XlaInfo};
use crate::{ActorHandle, Error, Payload, Ref, RemoteActor, Result, Runtime};

/// Where a node's answer to a save request goes: the version, or why it failed.
type SaveWaiter = std::sync::mpsc::Sender<std::result::Result<String, String>>;

/// Task results up to this size travel inline in replies; larger ones stay on the node
/// that made them (where the tasks that read them are likely to run), as do task
/// arguments held in the object table.
pub(crate) const INLINE_LIMIT: usize = 64 << 10;

/// Actor states, calls and replies, and task arguments given by value, travel inline up to
/// this size (a pull's extra round trip would cost more than the copy); larger ones go
/// through the data plane, so that no control frame comes near [`MAX_FRAME_LEN`].
///
/// [`MAX_FRAME_LEN`]: super::frame::MAX_FRAME_LEN
pub(crate) const MESSAGE_INLINE_LIMIT: usize = 4 << 20;

/// The identity of a node process in a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node#{}", self.0)
    }
}

/// What the head knows about a node.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeInfo {
    /// The node's id in this cluster.
    pub id: NodeId,
    /// The name it joined with.
    pub name: String,
    /// Its process id (on its own machine).
    pub pid: u32,
    /// Where it serves the values it holds.
    pub data_addr: SocketAddr,
    /// How many tasks it can run at once.
    pub slots: u32,
    /// Tasks it has finished.
    pub tasks_run: u64,
    /// Tasks it is running now.
    pub in_flight: usize,
    /// Values it holds for the head.
    pub values_held: usize,
    /// Their size in bytes: encoded, or for an array kept in a device's memory (CUDA or
    /// XLA), its data.
    pub bytes_held: u64,
    /// The CUDA devices it reported when it joined (empty: no GPU there).
    pub gpus: Vec<GpuInfo>,
    /// The XLA plugin it reported when it joined (none: no XLA there).
    pub xla: Option<XlaInfo>,
}

/// Settings of a cluster head.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Where the head listens for nodes (default `127.0.0.1:0`: loopback, any free port).
    pub listen: SocketAddr,
    /// The cluster secret every node must prove (default: a fresh random one).
    pub secret: Option<String>,
    /// How often nodes send heartbeats (default 500 ms).
    pub heartbeat_interval: Duration,
    /// A node silent this long is declared lost (default 3 s).
    pub heartbeat_timeout: Duration,
    /// How many lost nodes a task survives before it fails (default 3).
    pub max_node_losses: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret: None,
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(3),
            max_node_losses: 3,
        }
    }
}

struct NodeEntry {
    name: String,
    pid: u32,
    data_addr: SocketAddr,
    slots: u32,
    gpus: Vec<GpuInfo>,
    xla: Option<XlaInfo>,
    sender: mpsc::UnboundedSender<Message>,
    in_flight: HashMap<u64, Box<Job>>,
    /// The values it holds for the head, with their sizes.
    held: HashMap<u64, u64>,
    tasks_run: u64,
    dispatched: u64,
    last_seen: Instant,
    /// Actor calls waiting for a reply, by call id.
    pending_calls: HashMap<u64, PendingCall>,
    actors: usize,
    /// Results of this node's spawns that the head keeps for it, by its spawn id.
    spawned: HashMap<u64, Arc<RefInner>>,
}

/// An actor call sent to a node and not answered yet.
struct PendingCall {
    /// The actor's type name, for errors.
    actor: &'static str,
    /// Keeps a large message (or the actor's initial state) in this process's object table
    /// until the node has pulled it.
    _held: Vec<Arc<RefInner>>,
}

impl NodeEntry {
    /// The head's `Ref`s to the spawns whose results `replies` forward, by spawn id.
    fn forwarded_spawns(&self, replies: &[TaskReply]) -> Vec<(u64, Arc<RefInner>)> {
        replies
            .iter()
            .filter_map(|reply| match &reply.result {
                Ok(ReplyValue::Spawned(spawn_id)) => Some((*spawn_id, self.spawned.get(spawn_id)?.clone())),
                _ => None,
            })
            .collect()
    }

    fn info(&self, id: u64) -> NodeInfo {
        NodeInfo {
            id: NodeId(id),
            name: self.name.clone(),
            pid: self.pid,
            data_addr: self.data_addr,
            slots: self.slots,
            tasks_run: self.tasks_run,
            in_flight: self.in_flight.len(),
            values_held: self.held.len(),
            bytes_held: self.held.values().sum(),
            gpus: self.gpus.clone(),
            xla: self.xla.clone(),
        }
    }

    /// Whether this node has the devices `job` needs.
    fn can_run(&self, job: &Job) -> bool {
        (!job.needs_gpu() || !self.gpus.is_empty()) && (!job.needs_xla() || self.xla.is_some())
    }

    fn load(&self) -> f64 {
        self.in_flight.len() as f64 / f64::from(self.slots.max(1))
    }
}

#[derive(Default)]
struct HeadState {
    nodes: BTreeMap<u64, NodeEntry>,
    next_node: u64,
    /// The job that made each value held by a node.
    lineage: HashMap<ObjectId, Box<Job>>,
    /// Values put on a node directly (no lineage).
    puts: HashSet<ObjectId>,
    /// Names of nodes lost so far, in order.
    lost: Vec<String>,
}

/// The shared state of a cluster head.
struct Head {
    config: ClusterConfig,
    key: ClusterKey,
    secret: String,
    addr: SocketAddr,
    handle: tokio::runtime::Handle,
    tokio: Mutex<Option<tokio::runtime::Runtime>>,
    core: Weak<Core>,
    table: Arc<ObjectTable>,
    state: Mutex<HeadState>,
    changed: Condvar,
    data: Arc<DataClient>,
    children: Mutex<Vec<LaunchedNode>>,
    stopped: AtomicBool,
    refused: AtomicU64,
    /// Numbers remote actors and save requests.
    next_id: AtomicU64,
    /// Saves that nodes are doing for the head, by request id.
    saves: Mutex<HashMap<u64, (u64, SaveWaiter)>>,
}

/// A cluster head attached to a runtime: node processes join it and run its tasks.
///
/// # Shutdown
/// When the runtime shuts down, every node is told to exit, node processes started by a
/// cluster manager are waited for (then killed), and tasks still running remotely fail
/// with [`Error::Shutdown`].
#[derive(Clone)]
pub struct Cluster {
    head: Arc<Head>,
}

impl Cluster {
    /// Makes `rt` the head of a new cluster, listening for nodes.
    ///
    /// # Errors
    /// [`Error::Cluster`] if the address cannot be bound or the runtime already heads a
    /// cluster.
    pub fn start(rt: &Runtime, config: ClusterConfig) -> Result<Cluster> {
        let core = rt.core().clone();
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tessera-net")
            .enable_all()
            .build()
            .map_err(|e| Error::Cluster(format!("cannot start the network runtime: {e}")))?;
        let listener = tokio
            .block_on(TcpListener::bind(config.listen))
            .map_err(|e| Error::Cluster(format!("cannot listen on {}: {e}", config.listen)))?;
        let addr = listener.local_addr().map_err(|e| Error::Cluster(e.to_string()))?;
        let secret = config.secret.clone().unwrap_or_else(|| {
            let nonce = super::auth::random_nonce();
            nonce.iter().map(|b| format!("{b:02x}")).collect()
        });
        let key = ClusterKey::from_secret(&secret);
        let head = Arc::new(Head {
            config,
            data: Arc::new(DataClient::new(key.clone(), "head".into())),
            key,
            secret,
            addr,
            handle: tokio.handle().clone(),
            tokio: Mutex::new(Some(tokio)),
            core: Arc::downgrade(&core),
            table: core.table.clone(),
            state: Mutex::new(HeadState::default()),
            changed: Condvar::new(),
            children: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            saves: Mutex::new(HashMap::new()),
        });
        if !core.set_cluster(head.clone()) || !core.table.set_remote(head.clone()) {
            head.shutdown_network();
            return Err(Error::Cluster("this runtime already heads a cluster".into()));
        }
        head.handle.spawn(accept_loop(head.clone(), listener));
        head.handle.spawn(watch_heartbeats(Arc::downgrade(&head)));
        tracing::info!(%addr, "cluster head listening");
        Ok(Cluster { head })
    }

    /// Where nodes join.
    pub fn addr(&self) -> SocketAddr {
        self.head.addr
    }

    /// The cluster secret (give it to nodes started by hand).
    pub fn secret(&self) -> &str {
        &self.head.secret
    }

    /// What a node needs to join this cluster, running `program` with `args`.
    pub fn join_info(&self, program: std::path::PathBuf, args: Vec<String>) -> JoinInfo {
        JoinInfo { addr: self.head.addr, secret: self.head.secret.clone(), program, args }
    }

    /// Starts nodes with `manager`, running this same executable (which must call
    /// [`crate::init`] at the top of `main`). Returns how many processes it started.
    ///
    /// # Errors
    /// What the manager reports.
    pub fn launch(&self, manager: &dyn ClusterManager) -> Result<usize> {
        let program = std::env::current_exe()
            .map_err(|e| Error::Cluster(format!("cannot find this executable: {e}")))?;
        self.launch_program(manager, program, Vec::new())
    }

    /// Starts nodes with `manager`, running `program args` (for example the `tessera`
    /// binary with `node`).
    ///
    /// # Errors
    /// What the manager reports.
    pub fn launch_program(
        &self,
        manager: &dyn ClusterManager,
        program: std::path::PathBuf,
        args: Vec<String>,
    ) -> Result<usize> {
        let join = self.join_info(program, args);
        let launched = manager.launch(&join)?;
        let count = launched.len();
        tracing::info!(manager = manager.name(), count, "launched node processes");
        self.head.children.lock().extend(launched);
        Ok(count)
    }

    /// Waits until at least `count` nodes have joined, printing progress to stderr.
    ///
    /// A process a cluster manager started that exits before its node joined is reported
    /// on stderr when it is seen; once the nodes still to come from processes that are
    /// running cannot make up `count`, the wait fails at once instead of at the deadline.
    ///
    /// # Errors
    /// [`Error::Cluster`] if launched processes exited and too few nodes can still join,
    /// naming each with how it exited; [`Error::Timeout`] if the nodes have not joined in
    /// time.
    pub fn wait_for_nodes(&self, count: usize, timeout: Duration) -> Result<()> {
        // How often launched processes are checked for an early exit.
        const POLL: Duration = Duration::from_millis(100);
        let deadline = Instant::now() + timeout;
        let mut state = self.head.state.lock();
        let mut reported = usize::MAX;
        while state.nodes.len() < count {
            let joined = state.nodes.len();
            if joined != reported {
                reported = joined;
                eprintln!("cluster: {reported}/{count} nodes joined");
            }
            let names: Vec<String> = state.nodes.values().map(|node| node.name.clone()).collect();
            let outlook = MutexGuard::unlocked(&mut state, || self.head.launch_outlook(&names));
            for exit in &outlook.newly_exited {
                eprintln!("cluster: {exit}");
            }
            if let Some(most) = outlook.most_nodes(joined) {
                if !outlook.exited.is_empty() && most < count {
                    return Err(Error::Cluster(format!(
                        "waiting for {count} nodes: {joined} joined and at most {} more can: {} \
                         (see the output above)",
                        most - joined,
                        outlook.exited.join("; ")
                    )));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                if !outlook.running.is_empty() {
                    eprintln!(
                        "cluster: timed out while these ran without their nodes in the cluster: {} \
                         (can they reach the head at {}?)",
                        outlook.running.join(", "),
                        self.head.addr
                    );
                }
                return Err(Error::Timeout(timeout));
            }
            self.head.changed.wait_until(&mut state, deadline.min(now + POLL));
        }
        if reported != usize::MAX {
            eprintln!("cluster: {}/{count} nodes joined", state.nodes.len());
        }
        Ok(())
    }

    /// Starts an actor of a registered type (see [`remote_actor!`](crate::remote_actor)) on
    /// `node`; its calls run there, one at a time, in arrival order.
    ///
    /// # Errors
    /// [`Error::Cluster`] if the node is not in the cluster; [`Error::Codec`] if the state
    /// cannot be encoded.
    pub fn actor_on<A>(&self, node: NodeId, state: &A) -> Result<ActorHandle<A>>
    where
        A: RemoteActor,
        A::Message: serde::Serialize + serde::de::DeserializeOwned,
    {
        let bytes = bincode::serde::encode_to_vec(state, bincode::config::standard())
            .map_err(|e| Error::Codec { type_name: std::any::type_name::<A>(), message: e.to_string() })?;
        let actor_id = self.head.next_id.fetch_add(1, Ordering::Relaxed);
        let (state_source, state_holder) = self.head.outgoing(bytes);
        {
            let mut state = self.head.state.lock();
            let entry = state
                .nodes
                .get_mut(&node.0)
                .ok_or_else(|| Error::Cluster(format!("{node} is not in the cluster")))?;
            entry.actors += 1;
            let _ = entry.sender.send(Message::ActorCreate {
                actor_id,
                name: A::NAME.to_string(),
                state: state_source,
            });
        }
        let link = Arc::new(RemoteActorOnNode {
            head: Arc::downgrade(&self.head),
            node: node.0,
            actor_id,
            actor: A::NAME,
            state: Mutex::new(state_holder),
        });
        Ok(ActorHandle::remote(self.head.table.clone(), link))
    }

    /// Saves the value of `r` as a new version of `name` in `stash`, from wherever the value
    /// is: a value held by a node is written to the stash by that node (its store actor),
    /// so its bytes never pass through the head. The node must reach the same stash (the
    /// same directory, or the same S3 or PostgreSQL URL).
    ///
    /// # Errors
    /// The value's own error if it failed; [`Error::Store`] if the save fails;
    /// [`Error::Cluster`] if the holder is lost during the save, or for ndarray values held
    /// by a node (save those with [`Stash::save`](crate::Stash::save) in a task there).
    pub fn save_ref<T: Payload + serde::Serialize>(
        &self,
        stash: &crate::Stash,
        name: &str,
        r: &Ref<T>,
        tags: &[(&str, &str)],
    ) -> Result<crate::Version> {
        let core = self.head.core.upgrade().ok_or(Error::Shutdown)?;
        crate::actors::save_ref(&core, stash, name, r, tags)
    }

    /// The nodes in the cluster now.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.head.state.lock().nodes.iter().map(|(id, node)| node.info(*id)).collect()
    }

    /// The nodes that reported at least one CUDA device, with their devices: where tasks
    /// spawned with [`TaskOptions::on_gpu`](crate::TaskOptions::on_gpu) run.
    pub fn gpu_nodes(&self) -> Vec<(NodeId, Vec<GpuInfo>)> {
        let state = self.head.state.lock();
        state
            .nodes
            .iter()
            .filter(|(_, node)| !node.gpus.is_empty())
            .map(|(id, node)| (NodeId(*id), node.gpus.clone()))
            .collect()
    }

    /// The nodes that reported an XLA plugin, with it: where tasks spawned with
    /// [`TaskOptions::on_xla`](crate::TaskOptions::on_xla) run.
    pub fn xla_nodes(&self) -> Vec<(NodeId, XlaInfo)> {
        let state = self.head.state.lock();
        state.nodes.iter().filter_map(|(id, node)| Some((NodeId(*id), node.xla.clone()?))).collect()
    }

    /// Names of the nodes lost so far.
    pub fn lost_nodes(&self) -> Vec<String> {
        self.head.state.lock().lost.clone()
    }

    /// How many connections were refused (wrong secret, bad handshake).
    pub fn refused_connections(&self) -> u64 {
        self.head.refused.load(Ordering::Relaxed)
    }

    /// Stores `value` on `node` (it has no lineage: if the node is lost, so is the value).
    ///
    /// # Errors
    /// [`Error::Cluster`] if the node is not in the cluster; [`Error::Codec`] if the value
    /// cannot be encoded.
    pub fn put_on<T: Payload>(&self, node: NodeId, value: &T) -> Result<Ref<T>> {
        let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard())
            .map_err(|e| Error::Codec { type_name: std::any::type_name::<T>(), message: e.to_string() })?;
        if bytes.len() > super::frame::MAX_FRAME_LEN - 1024 {
            return Err(Error::Cluster(format!(
                "put_on takes values up to {} bytes (this one encodes to {}); make larger values with a task on the node",
                super::frame::MAX_FRAME_LEN - 1024,
                bytes.len()
            )));
        }
        let core = self.head.core.upgrade().ok_or(Error::Shutdown)?;
        let r: Ref<T> = core.new_pending();
        let id = r.id();
        let len = bytes.len() as u64;
        let location = {
            let mut state = self.head.state.lock();
            let entry = state
                .nodes
                .get_mut(&node.0)
                .ok_or_else(|| Error::Cluster(format!("{node} is not in the cluster")))?;
            entry.held.insert(id.as_u64(), len);
            let location = RemoteLocation {
                node: node.0,
                node_name: entry.name.clone(),
                addr: entry.data_addr,
                id: id.as_u64(),
                len,
            };
            let _ = entry.sender.send(Message::Store { id: id.as_u64(), bytes });
            state.puts.insert(id);
            location
        };
        self.head.table.complete(id, Outcome::Ready(Arc::new(RemoteValue(location))), len as usize);
        Ok(r)
    }
}

/// Sends calls to an actor hosted on a node; tells the node to stop it when dropped.
struct RemoteActorOnNode {
    head: Weak<Head>,
    node: u64,
    actor_id: u64,
    actor: &'static str,
    /// Keeps a large initial state pullable by the node until the reply to the first call:
    /// the node builds the actor from it before handling any call.
    state: Mutex<Option<Arc<RefInner>>>,
}

impl RemoteActorLink for RemoteActorOnNode {
    fn call(&self, output: ObjectId, message: Vec<u8>) {
        let failure = match self.head.upgrade() {
            None => Some("the cluster is stopped".to_string()),
            Some(head) => {
                let mut state = head.state.lock();
                match state.nodes.get_mut(&self.node) {
                    Some(node) => {
                        let (message, holder) = head.outgoing(message);
                        let held = [holder, self.state.lock().take()].into_iter().flatten().collect();
                        let pending = PendingCall { actor: self.actor, _held: held };
                        node.pending_calls.insert(output.as_u64(), pending);
                        let call =
                            Message::ActorCall { actor_id: self.actor_id, call_id: output.as_u64(), message };
                        let _ = node.sender.send(call);
                        None
                    }
                    None => Some(format!("its node ({}) is not in the cluster", NodeId(self.node))),
                }
            }
        };
        if let (Some(message), Some(head)) = (failure, self.head.upgrade()) {
            let error = Error::ActorFailed { actor: self.actor.to_string(), message };
            head.table.complete(output, Outcome::Failed(Arc::new(error)), 0);
        }
    }
}

impl Drop for RemoteActorOnNode {
    fn drop(&mut self) {
        if let Some(head) = self.head.upgrade() {
            if let Some(node) = head.state.lock().nodes.get_mut(&self.node) {
                node.actors = node.actors.saturating_sub(1);
                let _ = node.sender.send(Message::ActorStop { actor_id: self.actor_id });
            }
        }
    }
}

impl Head {
    /// How `bytes` travel to a node: inline when small; larger ones wait in this process's
    /// object table, from which the node pulls them, for as long as the returned holder
    /// lives. No control frame then outgrows the frame limit, whatever the value's size.
    fn outgoing(&self, bytes: Vec<u8>) -> (ArgSource, Option<Arc<RefInner>>) {
        if bytes.len() <= MESSAGE_INLINE_LIMIT {
            return (ArgSource::Inline(bytes), None);
        }
        let len = bytes.len();
        let id = self.table.create_ready(Arc::new(EncodedValue(bytes)), len);
        let holder = Arc::new(RefInner { id, table: self.table.clone() });
        (ArgSource::Fetch { addr: self.addr, id: id.as_u64() }, Some(holder))
    }

    fn actor_replied(&self, node_id: u64, call_id: u64, result: std::result::Result<ReplyValue, String>) {
        let output = ObjectId::from_raw(call_id);
        let (outcome, len) = {
            let mut state = self.state.lock();
            let Some(node) = state.nodes.get_mut(&node_id) else { return };
            let Some(call) = node.pending_calls.remove(&call_id) else { return };
            match result {
                Ok(ReplyValue::Inline(bytes)) => {
                    let len = bytes.len();
                    (Outcome::Ready(Arc::new(EncodedValue(bytes))), len)
                }
                Ok(ReplyValue::Stored { len }) => {
                    node.held.insert(call_id, len);
                    let location = RemoteLocation {
                        node: node_id,
                        node_name: node.name.clone(),
                        addr: node.data_addr,
                        id: call_id,
                        len,
                    };
                    // Like a put value: an actor's reply has no lineage to rebuild it from.
                    state.puts.insert(output);
                    (Outcome::Ready(Arc::new(RemoteValue(location))), len as usize)
                }
                Ok(ReplyValue::Spawned(_)) => {
                    let message = "protocol violation: the reply names a spawn".to_string();
                    let error = Error::ActorFailed { actor: call.actor.to_string(), message };
                    (Outcome::Failed(Arc::new(error)), 0)
                }
                Err(message) => {
                    let error = Error::ActorFailed { actor: call.actor.to_string(), message };
                    (Outcome::Failed(Arc::new(error)), 0)
                }
            }
        };
        if !self.table.complete(output, outcome, len) {
            // Every Ref to the reply dropped already: free it where it is held.
            let mut state = self.state.lock();
            if state.puts.remove(&output) {
                if let Some(node) = state.nodes.get_mut(&node_id) {
                    node.held.remove(&call_id);
                    let _ = node.sender.send(Message::Free(vec![call_id]));
                }
            }
        }
    }

    /// Builds the arguments of a task as a node receives them.
    fn task_request(&self, job: &Job) -> Option<(TaskRequest, Option<u64>)> {
        let mut args = Vec::new();
        // The largest input held by a node: (len, node).
        let mut biggest: Option<(u64, u64)> = None;
        // The largest argument held by a node that spawned the task: (len, its data address).
        let mut biggest_held: Option<(u64, SocketAddr)> = None;
        for arg in job.remote_args()? {
            match &arg.0 {
                RemoteArgKind::Value(bytes) => args.push(ArgSource::Inline(bytes.clone())),
                RemoteArgKind::Held { addr, id, len } => {
                    if biggest_held.is_none_or(|(most, _)| *len > most) {
                        biggest_held = Some((*len, *addr));
                    }
                    args.push(ArgSource::Fetch { addr: *addr, id: *id });
                }
                RemoteArgKind::Ref(id) => {
                    let Some(Outcome::Ready(value)) = self.table.outcome(*id) else {
                        return None;
                    };
                    match value.view() {
                        View::Remote(location) => {
                            if biggest.is_none_or(|(len, _)| location.len > len) {
                                biggest = Some((location.len, location.node));
                            }
                            args.push(ArgSource::Fetch { addr: location.addr, id: location.id });
                        }
                        _ => {
                            let bytes = value.encode().ok()?;
                            if bytes.len() <= INLINE_LIMIT {
                                args.push(ArgSource::Inline(bytes));
                            } else {
                                args.push(ArgSource::Fetch { addr: self.addr, id: id.as_u64() });
                            }
                        }
                    }
                }
            }
        }
        if let Some((len, addr)) = biggest_held.filter(|(len, _)| biggest.is_none_or(|(most, _)| *len > most))
        {
            let state = self.state.lock();
            if let Some((node, _)) = state.nodes.iter().find(|(_, node)| node.data_addr == addr) {
                biggest = Some((len, *node));
            }
        }
        let preferred = biggest.filter(|(len, _)| *len >= 1 << 20).map(|(_, node)| node);
        Some((TaskRequest { task_id: job.output().as_u64(), name: job.name().to_string(), args }, preferred))
    }

    /// Completes the jobs that node `node_id` finished; `forwarded` holds the head's `Ref`s
    /// to the spawns the node's tasks returned (`ReplyValue::Spawned`), by spawn id.
    fn handle_replies(
        self: &Arc<Self>,
        node_id: u64,
        replies: Vec<TaskReply>,
        mut forwarded: Vec<(u64, Arc<RefInner>)>,
    ) {
        let mut finished = Vec::with_capacity(replies.len());
        let (name, addr) = {
            let mut state = self.state.lock();
            let Some(node) = state.nodes.get_mut(&node_id) else {
                return;
            };
            for reply in replies {
                if let Some(job) = node.in_flight.remove(&reply.task_id) {
                    node.tasks_run += 1;
                    finished.push((job, reply.result));
                }
            }
            (node.name.clone(), node.data_addr)
        };
        for (mut job, result) in finished {
            match result {
                Ok(ReplyValue::Inline(bytes)) => {
                    let len = bytes.len();
                    job.finish(Outcome::Ready(Arc::new(EncodedValue(bytes))), len);
                }
                Ok(ReplyValue::Stored { len }) => {
                    let output = job.output();
                    let location = RemoteLocation {
                        node: node_id,
                        node_name: name.clone(),
                        addr,
                        id: output.as_u64(),
                        len,
                    };
                    // Record the holder before completing: whoever wakes on the value sees it.
                    if let Some(node) = self.state.lock().nodes.get_mut(&node_id) {
                        node.held.insert(output.as_u64(), len);
                    }
                    job.complete(Outcome::Ready(Arc::new(RemoteValue(location))), len as usize);
                    self.keep_lineage(node_id, job);
                }
                Ok(ReplyValue::Spawned(spawn_id)) => {
                    match forwarded.iter().position(|(id, _)| *id == spawn_id) {
                        Some(at) => job.forward(Dependency(forwarded.swap_remove(at).1)),
                        None => {
                            let task = job.name().to_string();
                            let message = format!(
                                "it returned the result of its node's spawn {spawn_id}, which the head no \
                                 longer keeps"
                            );
                            job.fail(Error::TaskFailed { task, message });
                        }
                    }
                }
                Err(RemoteTaskError { kind, message }) => {
                    use super::wire::RemoteErrorKind::*;
                    let task = job.name().to_string();
                    match kind {
                        InputUnavailable => {
                            // An input's holder is gone; the head will notice and rebuild it.
                            if job.retry_after_node_loss(self.config.max_node_losses) {
                                self.handle.spawn(async move {
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                    let _ = tokio::task::spawn_blocking(move || submit_when_ready(job)).await;
                                });
                            } else {
                                let task = job.name().to_string();
                                job.fail(Error::TaskFailed {
                                    task,
                                    message: format!("an input stayed unavailable after retries: {message}"),
                                });
                            }
                        }
                        Failed | Panicked => {
                            let error = if matches!(kind, Panicked) {
                                Error::TaskPanicked { task, message }
                            } else {
                                Error::TaskFailed { task, message }
                            };
                            if job.retry_after_error() {
                                submit_when_ready(job);
                            } else {
                                job.fail(error);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Values forwarded from `lost` ones (being made again, or failed) go back to pending and
    /// follow their sources again, and so on down chains of forwards: they named the lost
    /// holder's copy.
    fn follow_forwarded(&self, mut lost: HashSet<ObjectId>) {
        loop {
            let follows: Vec<_> = self
                .table
                .forwarded_from(&lost)
                .into_iter()
                .filter(|(output, _)| !lost.contains(output))
                .collect();
            if follows.is_empty() {
                return;
            }
            for (output, source) in follows {
                lost.insert(output);
                if self.table.reset_pending(output) {
                    forward_into(&self.table, output, source);
                }
            }
        }
    }

    /// Records that `node` holds the output of `job`, keeping the job as its lineage.
    fn keep_lineage(&self, node_id: u64, job: Box<Job>) {
        let output = job.output();
        let mut state = self.state.lock();
        // (The reply recorded the value as held, with its size.)
        let alive = state.nodes.contains_key(&node_id);
        if !alive {
            drop(state);
            // The node was lost between its reply and now: rebuild the value.
            if self.table.reset_pending(output) {
                submit_when_ready(job);
            }
            return;
        }
        if !self.table.contains(output) {
            // Every Ref dropped already: free it on the node.
            if let Some(node) = state.nodes.get_mut(&node_id) {
                node.held.remove(&output.as_u64());
                let _ = node.sender.send(Message::Free(vec![output.as_u64()]));
            }
            drop(state);
            drop(job);
            return;
        }
        state.lineage.insert(output, job);
    }

    fn node_lost(self: &Arc<Self>, node_id: u64, reason: &str) {
        let (node, lineage_jobs, no_lineage) = {
            let mut state = self.state.lock();
            let Some(node) = state.nodes.remove(&node_id) else {
                return;
            };
            state.lost.push(node.name.clone());
            let mut lineage_jobs = Vec::new();
            let mut no_lineage = Vec::new();
            for raw in node.held.keys() {
                let id = ObjectId::from_raw(*raw);
                if let Some(job) = state.lineage.remove(&id) {
                    lineage_jobs.push(job);
                } else if state.puts.remove(&id) {
                    no_lineage.push(id);
                }
            }
            self.changed.notify_all();
            (node, lineage_jobs, no_lineage)
        };
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        tracing::warn!(node = %node.name, %reason, running = node.in_flight.len(), held = node.held.len(), "node lost");
        self.data.forget(node.data_addr);
        let _ = node.sender.send(Message::Shutdown);
        let lost_puts = no_lineage.clone();
        for id in no_lineage {
            let error = Error::ObjectLost {
                object: id.as_u64(),
                reason: format!(
                    "held by node `{}`, which was lost ({reason}); a put value has no lineage to rebuild it",
                    node.name
                ),
            };
            self.table.replace_done(id, Outcome::Failed(Arc::new(error)));
        }
        // First put every lost value back to pending, so that re-run tasks wait for them.
        let mut rebuild = Vec::new();
        for job in lineage_jobs {
            if self.table.reset_pending(job.output()) {
                rebuild.push(job);
            }
        }
        let rebuilt: Vec<ObjectId> = rebuild.iter().map(|job| job.output()).collect();
        self.follow_rebuilt_spawns(&rebuilt);
        self.follow_forwarded(rebuilt.iter().chain(&lost_puts).copied().collect());
        for job in rebuild {
            submit_when_ready(job);
        }
        // Saves in flight on the lost node: dropping their senders wakes the waiters.
        self.saves.lock().retain(|_, (holder, _)| *holder != node_id);
        for (call_id, call) in node.pending_calls {
            let error = Error::ActorFailed {
                actor: call.actor.to_string(),
                message: format!("its node `{}` was lost ({reason})", node.name),
            };
            self.table.complete(ObjectId::from_raw(call_id), Outcome::Failed(Arc::new(error)), 0);
        }
        for (_, mut job) in node.in_flight {
            if job.retry_after_node_loss(self.config.max_node_losses) {
                submit_when_ready(job);
            } else {
                let task = job.name().to_string();
                job.fail(Error::NodeLost { task, node: node.name.clone() });
            }
        }
    }

    fn shutdown_network(&self) {
        if let Some(tokio) = self.tokio.lock().take() {
            tokio.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl RemoteScheduler for Head {
    fn save_held(
        &self,
        location: &RemoteLocation,
        stash_location: &str,
        name: &str,
        type_name: &str,
        tags: &[(&str, &str)],
    ) -> Result<crate::Version> {
        let request = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::channel();
        self.saves.lock().insert(request, (location.node, tx));
        let message = Message::SaveValue {
            request,
            id: location.id,
            store: stash_location.to_string(),
            name: name.to_string(),
            type_name: type_name.to_string(),
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let sent = match self.state.lock().nodes.get(&location.node) {
            Some(node) => node.sender.send(message).is_ok(),
            None => false,
        };
        let reply = if sent {
            // Wait while the holder lives; a lost holder drops the sender (see `node_lost`).
            rx.recv().map_err(|_| {
                Error::Cluster(format!("node `{}` was lost during the save", location.node_name))
            })
        } else {
            Err(Error::Cluster(format!("node `{}` is not in the cluster", location.node_name)))
        };
        self.saves.lock().remove(&request);
        match reply? {
            Ok(version) => {
                version.parse().map_err(|_| Error::Cluster(format!("node sent a bad version `{version}`")))
            }
            Err(message) => Err(Error::Cluster(format!(
                "node `{}` could not save `{name}`: {message}",
                location.node_name
            ))),
        }
    }

    fn submit(&self, job: Box<Job>) -> std::result::Result<(), Box<Job>> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(job);
        }
        let Some((request, preferred)) = self.task_request(&job) else {
            return Err(job);
        };
        let mut state = self.state.lock();
        // A task that needs a GPU or XLA only goes to nodes that reported one.
        let least_loaded = state
            .nodes
            .iter()
            .filter(|(_, node)| node.can_run(&job))
            .min_by(|a, b| a.1.load().total_cmp(&b.1.load()).then(a.1.dispatched.cmp(&b.1.dispatched)))
            .map(|(id, node)| (*id, node.load()));
        let Some((mut target, least_load)) = least_loaded else {
            return Err(job);
        };
        let preferred = preferred.and_then(|id| state.nodes.get(&id).map(|n| (id, n)));
        if let Some(node) = preferred.filter(|(_, n)| n.can_run(&job)) {
            if node.1.load() <= least_load * 2.0 + 1.0 {
                target = node.0;
            }
        }
        let Some(node) = state.nodes.get_mut(&target) else {
            return Err(job);
        };
        node.dispatched += 1;
        node.in_flight.insert(request.task_id, job);
        let _ = node.sender.send(Message::RunTasks(vec![request]));
        Ok(())
    }

    fn node_counts(&self) -> NodeCounts {
        let state = self.state.lock();
        NodeCounts {
            nodes: state.nodes.len(),
            gpu: state.nodes.values().filter(|node| !node.gpus.is_empty()).count(),
            xla: state.nodes.values().filter(|node| node.xla.is_some()).count(),
        }
    }

    fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let (in_flight, lineage) = {
            let mut state = self.state.lock();
            let mut in_flight = Vec::new();
            for node in state.nodes.values_mut() {
                let _ = node.sender.send(Message::Shutdown);
                in_flight.extend(node.in_flight.drain().map(|(_, job)| job));
            }
            (in_flight, std::mem::take(&mut state.lineage))
        };
        for job in in_flight {
            job.fail(Error::Shutdown);
        }
        drop(lineage);
        let children = std::mem::take(&mut *self.children.lock());
        let deadline = Instant::now() + Duration::from_secs(3);
        for mut child in children {
            child.wait_or_kill(deadline);
        }
        self.shutdown_network();
    }
}

/// What the processes cluster managers started still promise, while the head waits for
/// nodes.
struct LaunchOutlook {
    /// Each process that exited while its node was not in the cluster, and how.
    exited: Vec<String>,
    /// Those of `exited` not reported before.
    newly_exited: Vec<String>,
    /// Processes that run and whose node (or nodes) have not joined, by name.
    running: Vec<String>,
    /// How many of `running` start one node each.
    pending: usize,
    /// Whether a launcher of several nodes (`srun`) still runs: it may start any number.
    open_ended: bool,
}

impl LaunchOutlook {
    /// The most nodes the cluster can reach from `joined` with what was launched, or `None`
    /// if a launcher of several nodes still runs.
    fn most_nodes(&self, joined: usize) -> Option<usize> {
        (!self.open_ended).then_some(joined + self.pending)
    }
}

impl Head {
    /// Matches the launched processes against the nodes in the cluster (`joined`, by
    /// name) and checks which have exited.
    fn launch_outlook(&self, joined: &[String]) -> LaunchOutlook {
        let mut unmatched: HashMap<&str, usize> = HashMap::new();
        for name in joined {
            *unmatched.entry(name.as_str()).or_default() += 1;
        }
        let mut outlook = LaunchOutlook {
            exited: Vec::new(),
            newly_exited: Vec::new(),
            running: Vec::new(),
            pending: 0,
            open_ended: false,
        };
        for launched in self.children.lock().iter_mut() {
            if launched.is_one_node() {
                if let Some(left) = unmatched.get_mut(launched.name.as_str()).filter(|left| **left > 0) {
                    *left -= 1;
                    continue;
                }
            }
            match launched.exited() {
                Some(status) => {
                    let exit = if launched.is_one_node() {
                        format!("{} exited ({status}) without its node in the cluster", launched.name)
                    } else {
                        format!("{}, a launcher of nodes, exited ({status})", launched.name)
                    };
                    if launched.first_report() {
                        outlook.newly_exited.push(exit.clone());
                    }
                    outlook.exited.push(exit);
                }
                None => {
                    if launched.is_one_node() {
                        outlook.running.push(launched.name.clone());
                        outlook.pending += 1;
                    } else {
                        outlook.running.push(format!("{} (a launcher of nodes)", launched.name));
                        outlook.open_ended = true;
                    }
                }
            }
        }
        outlook
    }
}

impl RemoteAccess for Head {
    fn fetch_blocking(&self, location: &RemoteLocation) -> Result<Fetched> {
        self.data.fetch_blocking(location.addr, location.id)
    }

    fn fetch(&self, location: RemoteLocation) -> Pin<Box<dyn Future<Output = Result<Fetched>> + Send>> {
        self.data.fetch_in_background(location.addr, location.id)
    }

    fn released(&self, id: ObjectId, location: &RemoteLocation) {
        let job = {
            let mut state = self.state.lock();
            state.puts.remove(&id);
            if let Some(node) = state.nodes.get_mut(&location.node) {
                node.held.remove(&location.id);
                let _ = node.sender.send(Message::Free(vec![location.id]));
            }
            state.lineage.remove(&id)
        };
        drop(job);
    }
}

impl Head {
    /// The value `id` names here, to encode for a peer, or why there is none.
    fn value_to_serve(&self, id: u64) -> std::result::Result<Value, String> {
        match self.table.outcome(ObjectId::from_raw(id)) {
            Some(Outcome::Ready(value)) => match value.view() {
                View::Remote(location) => Err(format!("held by node `{}`", location.node_name)),
                _ => Ok(value),
            },
            Some(Outcome::Failed(error)) => Err(error.to_string()),
            None => Err("no such value".into()),
        }
    }
}

impl ObjectSource for Head {
    fn object_bytes(&self, id: u64) -> std::result::Result<Arc<Vec<u8>>, String> {
        self.value_to_serve(id)?.encode().map(Arc::new).map_err(|e| e.to_string())
    }

    /// Only the refusals: encoding a value (a copy, or a download from a device) is work
    /// for a blocking thread.
    fn ready_bytes(&self, id: u64) -> Option<std::result::Result<Arc<Vec<u8>>, String>> {
        self.value_to_serve(id).err().map(Err)
    }
}

async fn accept_loop(head: Arc<Head>, listener: TcpListener) {
    let gate = HandshakeGate::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(admitted) = gate.admit() else {
            tracing::debug!(%peer, "closed: too many handshakes in progress");
            continue;
        };
        let head = head.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let _ = stream.set_nodelay(true);
            let handshake =
                tokio::time::timeout(Duration::from_secs(10), server_handshake(&mut stream, &head.key)).await;
            drop(admitted);
            match handshake {
                Ok(Ok((Role::Node, name))) => serve_node(head, stream, name).await,
                Ok(Ok((Role::Data, _))) => {
                    let source: Arc<dyn ObjectSource> = head.clone();
                    if let Err(e) = serve_data(stream, source).await {
                        tracing::debug!(%peer, error = %e, "data connection closed");
                    }
                }
                Ok(Err(e)) => {
                    head.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, error = %e, "refused connection");
                }
                Err(_) => {
                    head.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, "refused connection: handshake timed out");
                }
            }
        });
    }
}

async fn serve_node(head: Arc<Head>, stream: TcpStream, name: String) {
    let (reader, writer) = stream.into_split();
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let (data_addr, slots, pid, gpus, xla) = match read_frame::<Message, _>(&mut reader).await {
        Ok(Message::Register { data_addr, slots, pid, gpus, xla }) => (data_addr, slots, pid, gpus, xla),
        Ok(other) => {
            tracing::warn!(node = %name, "expected Register, got {other:?}; closing");
            return;
        }
        Err(e) => {
            tracing::warn!(node = %name, error = %e, "node closed before registering");
            return;
        }
    };
    let (sender, receiver) = mpsc::unbounded_channel();
    let (node_id, name) = {
        let mut state = head.state.lock();
        state.next_node += 1;
        let id = state.next_node;
        // Names identify nodes in messages: a name already used (by a node here or one
        // lost earlier, e.g. a replacement started by the same manager) gets the id added.
        let taken = state.nodes.values().any(|n| n.name == name) || state.lost.contains(&name);
        let name = if taken { format!("{name}#{id}") } else { name };
        let _ = sender.send(Message::Registered { node: id });
        state.nodes.insert(
            id,
            NodeEntry {
                name: name.clone(),
                pid,
                data_addr,
                slots,
                gpus: gpus.clone(),
                xla: xla.clone(),
                sender,
                in_flight: HashMap::new(),
                held: HashMap::new(),
                tasks_run: 0,
                dispatched: 0,
                last_seen: Instant::now(),
                pending_calls: HashMap::new(),
                actors: 0,
                spawned: HashMap::new(),
            },
        );
        head.changed.notify_all();
        (id, name)
    };
    tracing::info!(
        node = %name,
        id = node_id,
        %data_addr,
        slots,
        gpus = gpus.len(),
        xla = xla.as_ref().map_or("none", |xla| xla.plugin.as_str()),
        "node joined"
    );
    tokio::spawn(write_loop(receiver, writer));
    let spawner = head.clone();
    let mut spawns = InOrder::new(format!("tessera-spawns-{node_id}"), move |request| {
        spawner.spawn_for_node(node_id, request)
    });
    let reason = loop {
        match read_frame::<Message, _>(&mut reader).await {
            Ok(Message::ActorReply { call_id, result }) => {
                let head = head.clone();
                tokio::task::spawn_blocking(move || head.actor_replied(node_id, call_id, result));
            }
            Ok(Message::Saved { request, result }) => {
                if let Some((_, waiter)) = head.saves.lock().remove(&request) {
                    let _ = waiter.send(result);
                }
            }
            Ok(Message::Heartbeat) => {
                if let Some(node) = head.state.lock().nodes.get_mut(&node_id) {
                    node.last_seen = Instant::now();
                }
            }
            Ok(Message::TasksDone(replies)) => {
                // The head's `Ref`s to the spawns that tasks forwarded are taken here, on the
                // reader: a `Release` of those spawns may follow at once.
                let forwarded = match head.state.lock().nodes.get_mut(&node_id) {
                    Some(node) => {
                        node.last_seen = Instant::now();
                        node.forwarded_spawns(&replies)
                    }
                    None => Vec::new(),
                };
                let head = head.clone();
                // Completing values runs user waiters: keep them off the reader.
                tokio::task::spawn_blocking(move || head.handle_replies(node_id, replies, forwarded));
            }
            // (Submitting may fail the task at once, a failed input, which runs waiters.)
            Ok(Message::Spawn(request)) => spawns.push(request),
            Ok(Message::Release(spawn_ids)) => head.release_spawns(node_id, spawn_ids),
            Ok(other) => break format!("protocol violation: unexpected {other:?}"),
            Err(e) => break format!("connection closed: {e}"),
        }
    };
    head.node_lost(node_id, &reason);
}

/// Writes queued messages, coalescing bursts into one flush.
pub(crate) async fn write_loop(
    mut receiver: mpsc::UnboundedReceiver<Message>,
    writer: tokio::net::tcp::OwnedWriteHalf,
) {
    let mut writer = BufWriter::with_capacity(1 << 18, writer);
    while let Some(message) = receiver.recv().await {
        let shutdown = matches!(message, Message::Shutdown);
        if write_message(&mut writer, &message).await.is_err() {
            return;
        }
        while let Ok(message) = receiver.try_recv() {
            if write_message(&mut writer, &message).await.is_err() {
                return;
            }
        }
        if writer.flush().await.is_err() || shutdown {
            return;
        }
    }
}

/// Writes one message. One that cannot be encoded (too large for a frame, say) is dropped
/// with an error in the log: nothing of it was written, so the connection stays in step,
/// and the peer is not lost over one message. Senders keep their payloads small (large
/// values travel through the data plane), so this is a last line of defence.
async fn write_message<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
) -> std::result::Result<(), FrameError> {
    match write_frame(writer, message).await {
        Err(error @ (FrameError::Oversized { .. } | FrameError::Malformed(_))) => {
            tracing::error!(%error, message = message.kind(), "message not sent: it cannot be framed");
            Ok(())
        }
        other => other,
    }
}

async fn watch_heartbeats(head: Weak<Head>) {
    loop {
        let Some(h) = head.upgrade() else { return };
        let interval = h.config.heartbeat_interval;
        let timeout = h.config.heartbeat_timeout;
        let silent: Vec<(u64, Duration)> = h
            .state
            .lock()
            .nodes
            .iter()
            .filter(|(_, node)| node.last_seen.elapsed() > timeout)
            .map(|(id, node)| (*id, node.last_seen.elapsed()))
            .collect();
        for (id, silence) in silent {
            let h = h.clone();
            tokio::task::spawn_blocking(move || {
                h.node_lost(id, &format!("no heartbeat for {:.1} s", silence.as_secs_f64()))
            });
        }
        drop(h);
        tokio::time::sleep(interval).await;
    }
}
