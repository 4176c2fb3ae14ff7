//! A node process: joins a head, runs the tasks it is sent on its own threads, keeps large
//! results and serves them to peers, and sends heartbeats.
//!
//! A large result is kept encoded, except an array in a device's memory (CUDA or XLA): that
//! stays on its device as it is, so that a task run here after it gets the same buffer, and
//! is copied to the host only when the head or a peer pulls it (once; the copy is kept).
//!
//! Tasks and actors here that spawn registered tasks spawn them onto the cluster, through
//! the head (see `cluster_link`); closures (and tasks that cannot travel) run on the node's
//! own runtime.
//!
//! # Shutdown
//! The node exits when the head says so or its connection to the head closes: a node never
//! outlives its head.
mod cluster_link;
mod task_threads;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::auth::{client_handshake, server_handshake, ClusterKey, HandshakeGate};
use super::data::{serve_data, DataClient, ObjectSource};
use super::frame::{read_frame, write_frame};
use super::head::{write_loop, INLINE_LIMIT, MESSAGE_INLINE_LIMIT};
use super::in_order::InOrder;
use super::wire::{ArgSource, Message, ReplyValue, Role, TaskRequest};
use crate::actors::object::{RemoteAccess, Value, View};
use crate::actors::reference::device_bytes;
use crate::actors::task::{NodeArg, TaskOutput};
use crate::actors::user_actor::ActorEntry;
use crate::error::panic_message;
use crate::{Error, Result};

/// Settings of a node process.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The head's address.
    pub join: SocketAddr,
    /// The cluster secret.
    pub secret: String,
    /// The name this node reports (default: `TESSERA_NODE_NAME`, else Slurm's
    /// `SLURMD_NODENAME` in a node started by `srun`, else `node-PID`).
    pub name: String,
    /// Where to serve held values to peers (default `127.0.0.1:0`). On every interface
    /// (`0.0.0.0:0`, for a cluster of several machines), the node tells peers the address
    /// through which it reaches the head.
    pub listen: SocketAddr,
    /// How many tasks run at once (default: the number of cores; at least 1). A task that
    /// waits for a value (say, for tasks it spawned) does not count while it waits.
    pub slots: usize,
    /// How often to send heartbeats (default 500 ms).
    pub heartbeat_interval: Duration,
}

impl NodeConfig {
    /// A node joining `join` with `secret`, other settings default.
    pub fn new(join: SocketAddr, secret: impl Into<String>) -> Self {
        NodeConfig {
            join,
            secret: secret.into(),
            name: default_name(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            slots: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            heartbeat_interval: Duration::from_millis(500),
        }
    }

    /// Reads the settings that a cluster manager passes to a node process:
    /// `TESSERA_JOIN`, `TESSERA_SECRET`, and optionally `TESSERA_NODE_NAME` (as for every
    /// config, see [`name`](NodeConfig::name)), `TESSERA_LISTEN`, `TESSERA_SLOTS`.
    ///
    /// # Errors
    /// [`Error::Cluster`] naming the variable that is missing or malformed.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let join = var("TESSERA_JOIN").ok_or_else(|| Error::Cluster("TESSERA_JOIN is not set".into()))?;
        let join = join.parse().map_err(|e| Error::Cluster(format!("TESSERA_JOIN=`{join}`: {e}")))?;
        let secret =
            var("TESSERA_SECRET").ok_or_else(|| Error::Cluster("TESSERA_SECRET is not set".into()))?;
        let mut config = NodeConfig::new(join, secret);
        if let Some(listen) = var("TESSERA_LISTEN") {
            config.listen =
                listen.parse().map_err(|e| Error::Cluster(format!("TESSERA_LISTEN=`{listen}`: {e}")))?;
        }
        if let Some(slots) = var("TESSERA_SLOTS") {
            config.slots = slots
                .parse::<usize>()
                .map_err(|e| Error::Cluster(format!("TESSERA_SLOTS=`{slots}`: {e}")))?
                .max(1);
        }
        Ok(config)
    }
}

/// The name a node goes by unless told: the one its cluster manager gave it
/// (`TESSERA_NODE_NAME`), else its Slurm node name (a node started by `srun`), else
/// `node-PID`.
fn default_name() -> String {
    ["TESSERA_NODE_NAME", "SLURMD_NODENAME"]
        .into_iter()
        .find_map(|var| std::env::var(var).ok().filter(|name| !name.is_empty()))
        .unwrap_or_else(|| format!("node-{}", std::process::id()))
}

/// Call first in `main` of a program that starts node processes of itself: in a process
/// started as a node (`TESSERA_ROLE=worker`), it runs the node until the head lets it go
/// and then exits the process; otherwise it returns at once.
pub fn init() {
    if std::env::var("TESSERA_ROLE").as_deref() != Ok("worker") {
        return;
    }
    let result = NodeConfig::from_env().and_then(run_node);
    match result {
        Ok(()) => std::process::exit(0),
        Err(error) => {
            eprintln!("tessera node: {error}");
            std::process::exit(2);
        }
    }
}

/// Values this node holds for the head.
#[derive(Default)]
struct NodeStore {
    objects: Mutex<HashMap<u64, Arc<Held>>>,
}

/// A value a node holds.
enum Held {
    /// Its encoding.
    Encoded(Arc<Vec<u8>>),
    /// An array in a device's memory, kept as it is; its encoding (a copy to the host) is
    /// made when first pulled, and kept.
    OnDevice { value: Value, encoded: OnceLock<std::result::Result<Arc<Vec<u8>>, String>> },
}

impl Held {
    fn encoded(bytes: Vec<u8>) -> Arc<Held> {
        Arc::new(Held::Encoded(Arc::new(bytes)))
    }

    fn bytes(&self) -> std::result::Result<Arc<Vec<u8>>, String> {
        match self {
            Held::Encoded(bytes) => Ok(bytes.clone()),
            Held::OnDevice { value, encoded } => encoded
                .get_or_init(|| {
                    value.encode().map(Arc::new).map_err(|e| format!("cannot copy it to the host: {e}"))
                })
                .clone(),
        }
    }
}

impl NodeStore {
    fn held(&self, id: u64) -> std::result::Result<Arc<Held>, String> {
        self.objects.lock().get(&id).cloned().ok_or_else(|| format!("obj#{id} is not held here"))
    }
}

impl ObjectSource for NodeStore {
    fn object_bytes(&self, id: u64) -> std::result::Result<Arc<Vec<u8>>, String> {
        // (Taken out of the lock first: a device array's first pull copies it to the host.)
        self.held(id)?.bytes()
    }

    fn ready_bytes(&self, id: u64) -> Option<std::result::Result<Arc<Vec<u8>>, String>> {
        let held = match self.held(id) {
            Ok(held) => held,
            Err(missing) => return Some(Err(missing)),
        };
        match &*held {
            Held::Encoded(bytes) => Some(Ok(bytes.clone())),
            // Not yet copied to the host: that copy runs on a blocking thread.
            Held::OnDevice { encoded, .. } => encoded.get().cloned(),
        }
    }
}

/// Runs a node until the head tells it to stop or goes away.
///
/// # Errors
/// [`Error::Cluster`] if the head cannot be reached or refuses this node (for example a
/// wrong secret).
pub fn run_node(config: NodeConfig) -> Result<()> {
    // The first node run in a process names the secret its hosted actors derive keys from.
    let _ = NODE_SECRET.set(config.secret.clone());
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tessera-node-net")
        .enable_all()
        .build()
        .map_err(|e| Error::Cluster(format!("cannot start the network runtime: {e}")))?;
    let key = ClusterKey::from_secret(&config.secret);
    let store = Arc::new(NodeStore::default());
    let listener = tokio
        .block_on(TcpListener::bind(config.listen))
        .map_err(|e| Error::Cluster(format!("cannot listen on {}: {e}", config.listen)))?;
    let data_addr = listener.local_addr().map_err(|e| Error::Cluster(e.to_string()))?;
    tokio.spawn(accept_data(listener, key.clone(), store.clone()));

    let stream = tokio.block_on(connect_head(&config, &key))?;
    // Listening on every interface (`0.0.0.0`), the node tells peers the address through
    // which it reaches the head: one they can reach it at too.
    let data_addr = match stream.local_addr() {
        Ok(local) if data_addr.ip().is_unspecified() => SocketAddr::new(local.ip(), data_addr.port()),
        _ => data_addr,
    };
    let (reader, writer) = stream.into_split();
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let (sender, receiver) = mpsc::unbounded_channel::<Message>();
    let gpus = crate::devices::local_gpus();
    if let Some(reason) = crate::devices::gpu_absence_reason() {
        tracing::info!(name = %config.name, %reason, "this node has no GPU");
    }
    let xla = crate::devices::local_xla();
    if let Some(reason) = crate::devices::xla_absence_reason() {
        tracing::info!(name = %config.name, %reason, "this node has no XLA plugin");
    }
    let _ = sender.send(Message::Register {
        data_addr,
        slots: config.slots as u32,
        pid: std::process::id(),
        gpus,
        xla,
    });
    tokio.spawn(write_loop(receiver, writer));
    let node_id = tokio.block_on(async {
        match read_frame::<Message, _>(&mut reader).await {
            Ok(Message::Registered { node }) => Ok(node),
            Ok(other) => Err(Error::Cluster(format!("head answered {other:?} to Register"))),
            Err(e) => Err(Error::Cluster(format!("head closed the connection: {e}"))),
        }
    })?;
    tracing::info!(name = %config.name, node = node_id, %data_addr, "joined the cluster");

    let heartbeat = sender.clone();
    let interval = config.heartbeat_interval;
    tokio.spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            if heartbeat.send(Message::Heartbeat).is_err() {
                return;
            }
        }
    });

    // The node's own runtime: what `Runtime::current()` gives its tasks and actors (the
    // registered tasks they spawn go to the cluster through `link`, closures run on the
    // node's threads; device actors over the node's devices).
    let local = crate::Runtime::builder().workers(config.slots.max(1)).build()?;
    let data = Arc::new(DataClient::new(key, config.name.clone()));
    let link = Arc::new(cluster_link::ClusterLink::new(
        sender.clone(),
        store.clone(),
        data.clone(),
        data_addr,
        &local.core().table,
    ));
    local.core().set_cluster(link.clone());
    local.core().table.set_remote(link.clone());
    let (task_tx, task_rx) = std::sync::mpsc::channel::<TaskRequest>();
    let puller = Puller { store: store.clone(), data, data_addr };
    let threads = task_threads::TaskThreads::start(
        config.slots,
        task_rx,
        sender.clone(),
        puller.clone(),
        link.clone(),
        local.clone(),
    )?;

    let mut actors = HostedActors { mailboxes: HashMap::new(), puller, local: local.clone() };
    let stashes: Arc<Mutex<HashMap<String, crate::Stash>>> = Arc::default();
    let answers = link.clone();
    let mut spawns_done = InOrder::new("tessera-spawns-done".into(), move |(spawn_id, result)| {
        answers.spawn_done(spawn_id, result)
    });
    let reason = tokio.block_on(async {
        loop {
            match read_frame::<Message, _>(&mut reader).await {
                Ok(Message::RunTasks(tasks)) => {
                    for task in tasks {
                        if task_tx.send(task).is_err() {
                            return "executors stopped".to_string();
                        }
                    }
                }
                Ok(Message::Store { id, bytes }) => {
                    store.objects.lock().insert(id, Held::encoded(bytes));
                }
                Ok(Message::ActorCreate { actor_id, name, state }) => {
                    actors.create(actor_id, name, state, &sender);
                }
                Ok(Message::ActorCall { actor_id, call_id, message }) => {
                    actors.call(actor_id, call_id, message, &sender);
                }
                Ok(Message::ActorStop { actor_id }) => actors.stop(actor_id),
                Ok(Message::SaveValue { request, id, store: location, name, type_name, tags }) => {
                    let save = SaveRequest { id, location, name, type_name, tags };
                    let objects = store.clone();
                    let stashes = stashes.clone();
                    let replies = sender.clone();
                    // Writing to the stash is blocking I/O: keep it off the reader.
                    tokio::task::spawn_blocking(move || {
                        let result = save.run(&objects, &stashes);
                        let _ = replies.send(Message::Saved { request, result });
                    });
                }
                Ok(Message::Free(ids)) => {
                    let mut objects = store.objects.lock();
                    for id in ids {
                        objects.remove(&id);
                    }
                }
                // (Completing a value runs its waiters: they stay off the reader.)
                Ok(Message::SpawnDone { spawn_id, result }) => spawns_done.push((spawn_id, result)),
                Ok(Message::Shutdown) => return "the head asked to stop".to_string(),
                Ok(other) => return format!("protocol violation from the head: {other:?}"),
                Err(e) => return format!("connection to the head closed: {e}"),
            }
        }
    });
    tracing::info!(name = %config.name, %reason, "node stopping");
    drop(task_tx);
    // Tasks waiting for what they spawned fail now: the head will not answer.
    link.close();
    actors.stop_all();
    threads.join();
    local.shutdown();
    drop(sender);
    tokio.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

async fn connect_head(config: &NodeConfig, key: &ClusterKey) -> Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(config.join).await {
            Ok(stream) => break stream,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "head not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(Error::Cluster(format!("cannot reach the head at {}: {e}", config.join))),
        }
    };
    let _ = stream.set_nodelay(true);
    client_handshake(&mut stream, key, Role::Node, &config.name)
        .await
        .map_err(|e| Error::Cluster(format!("the head at {} refused this node: {e}", config.join)))?;
    Ok(stream)
}

async fn accept_data(listener: TcpListener, key: ClusterKey, store: Arc<NodeStore>) {
    let gate = HandshakeGate::new();
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(admitted) = gate.admit() else {
            tracing::debug!(%peer, "closed: too many handshakes in progress");
            continue;
        };
        let key = key.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let handshake =
                tokio::time::timeout(Duration::from_secs(10), server_handshake(&mut stream, &key)).await;
            drop(admitted);
            match handshake {
                Ok(Ok((Role::Data, _))) => {
                    let source: Arc<dyn ObjectSource> = store;
                    let _ = serve_data(stream, source).await;
                }
                Ok(Ok((Role::Node, name))) => {
                    tracing::warn!(%peer, %name, "refused: nodes join the head, not other nodes");
                    let _ = write_frame(&mut stream, &Message::Refused { reason: "not a head".into() }).await;
                    let _ = stream.flush().await;
                }
                Ok(Err(e)) => tracing::warn!(%peer, error = %e, "refused data connection"),
                Err(_) => tracing::warn!(%peer, "refused data connection: handshake timed out"),
            }
        });
    }
}

/// The store actor's job: save a value this node holds into a stash.
struct SaveRequest {
    id: u64,
    location: String,
    name: String,
    type_name: String,
    tags: Vec<(String, String)>,
}

impl SaveRequest {
    fn run(
        &self,
        objects: &NodeStore,
        stashes: &Mutex<HashMap<String, crate::Stash>>,
    ) -> Result<String, String> {
        let bytes = objects.object_bytes(self.id)?;
        let stash = {
            let mut stashes = stashes.lock();
            match stashes.get(&self.location) {
                Some(stash) => stash.clone(),
                None => {
                    let stash = crate::Stash::open_url(&self.location).map_err(|e| e.to_string())?;
                    stashes.insert(self.location.clone(), stash.clone());
                    stash
                }
            }
        };
        let tags: Vec<(&str, &str)> = self.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        stash
            .save_encoded(&self.name, &self.type_name, &bytes, &tags)
            .map(|v| v.to_string())
            .map_err(|e| e.to_string())
    }
}

/// The cluster secret of the node running in this process, if one is.
static NODE_SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// A key for `purpose` derived from this node's cluster secret, for actors hosted here that
/// open their own authenticated connections (collective groups); `None` outside a node.
pub(crate) fn derived_node_secret(purpose: &str) -> Option<String> {
    let secret = NODE_SECRET.get()?;
    let key = blake3::derive_key("tessera derived node secret v1", secret.as_bytes());
    Some(blake3::keyed_hash(&key, purpose.as_bytes()).to_hex().to_string())
}

/// Pulls the bytes that an [`ArgSource`] names: inline, held by this node, or from a peer.
#[derive(Clone)]
struct Puller {
    store: Arc<NodeStore>,
    data: Arc<DataClient>,
    data_addr: SocketAddr,
}

impl Puller {
    /// A task's argument from `source`: a device array held here as it is, anything else
    /// as its bytes.
    fn arg(&self, source: ArgSource) -> std::result::Result<NodeArg, String> {
        if let ArgSource::Fetch { addr, id } = &source {
            if *addr == self.data_addr {
                if let Held::OnDevice { value, .. } = &*self.store.held(*id)? {
                    return Ok(NodeArg::Held(value.clone()));
                }
            }
        }
        self.pull(source).map(NodeArg::Encoded)
    }

    /// Appends the bytes of `source` to `out` (moving them in when `out` is empty).
    fn append(&self, source: ArgSource, out: &mut Vec<u8>) -> std::result::Result<(), String> {
        match source {
            ArgSource::Inline(bytes) if out.is_empty() => *out = bytes,
            ArgSource::Inline(bytes) => out.extend_from_slice(&bytes),
            ArgSource::Fetch { addr, id } if addr == self.data_addr => {
                out.extend_from_slice(&self.store.object_bytes(id)?);
            }
            ArgSource::Fetch { addr, id } => match self.data.fetch_blocking(addr, id) {
                Ok(fetched) if out.is_empty() => *out = fetched.into_bytes(),
                Ok(fetched) => {
                    out.extend_from_slice(&fetched.head);
                    out.extend_from_slice(&fetched.body);
                }
                Err(error) => {
                    self.data.forget(addr);
                    return Err(error.to_string());
                }
            },
        }
        Ok(())
    }

    fn pull(&self, source: ArgSource) -> std::result::Result<Vec<u8>, String> {
        let mut bytes = Vec::new();
        self.append(source, &mut bytes)?;
        Ok(bytes)
    }

    /// How a result of `call_id` goes back: inline up to `inline_limit` bytes, else kept
    /// here under its id for the head and peers to pull, so that no reply frame outgrows
    /// the frame limit.
    fn reply_value(&self, call_id: u64, bytes: Vec<u8>, inline_limit: usize) -> ReplyValue {
        if bytes.len() <= inline_limit {
            return ReplyValue::Inline(bytes);
        }
        let len = bytes.len() as u64;
        self.store.objects.lock().insert(call_id, Held::encoded(bytes));
        ReplyValue::Stored { len }
    }

    /// How a task's result goes back: an array in a device's memory larger than
    /// `INLINE_LIMIT` stays here as it is (copied to the host only when pulled); anything
    /// else is encoded now, as [`reply_value`](Self::reply_value) says.
    fn task_reply_value(&self, task_id: u64, output: TaskOutput) -> Result<ReplyValue> {
        let Some((value, _)) = output.into_value() else {
            return Err(Error::Cluster("the task's value is not made yet (it returned a Ref)".into()));
        };
        self.value_reply(task_id, value)
    }

    /// How a value goes back as task `task_id`'s result (see
    /// [`task_reply_value`](Self::task_reply_value)).
    fn value_reply(&self, task_id: u64, value: Value) -> Result<ReplyValue> {
        if let Some(len) = device_bytes(&value).filter(|&len| len > INLINE_LIMIT) {
            let held = Held::OnDevice { value, encoded: OnceLock::new() };
            self.store.objects.lock().insert(task_id, Arc::new(held));
            return Ok(ReplyValue::Stored { len: len as u64 });
        }
        Ok(self.reply_value(task_id, value.encode()?, INLINE_LIMIT))
    }

    /// How the value a task forwarded (it returned a `Ref` here) goes back as task
    /// `task_id`'s result: one held by another process is pulled from there first.
    fn forwarded_reply(&self, task_id: u64, value: Value, remote: &dyn RemoteAccess) -> Result<ReplyValue> {
        if let View::Remote(location) = value.view() {
            let bytes = remote.fetch_blocking(location)?.into_bytes();
            return Ok(self.reply_value(task_id, bytes, INLINE_LIMIT));
        }
        self.value_reply(task_id, value)
    }
}

/// Actors hosted on this node: each runs on its own thread and handles its calls in order.
struct HostedActors {
    mailboxes: HashMap<u64, Mailbox>,
    puller: Puller,
    /// The node's runtime, current on every actor's thread.
    local: crate::Runtime,
}

/// A call waiting for its actor: (call id, where its message is).
type ActorCall = (u64, ArgSource);
/// A hosted actor's queue and thread.
type Mailbox = (std::sync::mpsc::Sender<ActorCall>, std::thread::JoinHandle<()>);

impl HostedActors {
    /// Starts the actor's thread, which pulls its state (off the connection's reader: a large
    /// state streams from the head) and builds it, then handles calls in order.
    fn create(
        &mut self,
        actor_id: u64,
        name: String,
        state: ArgSource,
        replies: &mpsc::UnboundedSender<Message>,
    ) {
        let Some(entry) = ActorEntry::find(&name) else {
            tracing::warn!(%name, "actor type is not registered in this node's binary");
            return;
        };
        let (mailbox, inbox) = std::sync::mpsc::channel::<ActorCall>();
        let replies = replies.clone();
        let puller = self.puller.clone();
        let local = self.local.clone();
        let spawned =
            std::thread::Builder::new().name(format!("tessera-actor-{actor_id}")).spawn(move || {
                local.enter_on_this_thread();
                drop(local);
                let created =
                    puller.pull(state).and_then(|state| (entry.create)(&state).map_err(|e| e.to_string()));
                let mut actor = match created {
                    Ok(actor) => Some(actor),
                    Err(error) => {
                        tracing::warn!(%name, %error, "cannot create actor");
                        None
                    }
                };
                while let Ok((call_id, message)) = inbox.recv() {
                    let result = match (actor.as_mut(), puller.pull(message)) {
                        (None, _) => Err(format!("actor `{name}` is not running on this node")),
                        (Some(_), Err(error)) => Err(format!("cannot pull the call's message: {error}")),
                        (Some(state), Ok(message)) => {
                            match catch_unwind(AssertUnwindSafe(|| state.handle_encoded(&message))) {
                                Ok(Ok(reply)) => Ok(puller.reply_value(call_id, reply, MESSAGE_INLINE_LIMIT)),
                                Ok(Err(error)) => Err(error.to_string()),
                                Err(payload) => {
                                    actor = None;
                                    Err(format!("panicked: {}", panic_message(&*payload)))
                                }
                            }
                        }
                    };
                    if replies.send(Message::ActorReply { call_id, result }).is_err() {
                        return;
                    }
                }
            });
        match spawned {
            Ok(thread) => {
                self.mailboxes.insert(actor_id, (mailbox, thread));
            }
            Err(error) => tracing::warn!(%error, "cannot start an actor thread"),
        }
    }

    fn call(
        &mut self,
        actor_id: u64,
        call_id: u64,
        message: ArgSource,
        replies: &mpsc::UnboundedSender<Message>,
    ) {
        let delivered = self
            .mailboxes
            .get(&actor_id)
            .is_some_and(|(mailbox, _)| mailbox.send((call_id, message)).is_ok());
        if !delivered {
            let result = Err(format!("no actor #{actor_id} on this node"));
            let _ = replies.send(Message::ActorReply { call_id, result });
        }
    }

    fn stop(&mut self, actor_id: u64) {
        if let Some((mailbox, thread)) = self.mailboxes.remove(&actor_id) {
            drop(mailbox);
            // The actor finishes the calls it has, then its thread ends; no need to wait.
            drop(thread);
        }
    }

    fn stop_all(&mut self) {
        for (_, (mailbox, thread)) in self.mailboxes.drain() {
            drop(mailbox);
            let _ = thread.join();
        }
    }
}
