//! Data parallelism on a cluster: every replica is a remote actor ([`ReplicaActor`]) on a
//! node process; the head forms the replicas' collective group through actor messages,
//! drives the epochs, checks that the replicas stay bit-identical, and — when a node is
//! lost mid-training — starts the survivors again as a smaller group that resumes from the
//! last stash checkpoint ([`train_on_cluster`]).
//!
//! # Protocol (one group)
//! 1. The head starts one [`ReplicaActor`] per listed node with [`Cluster::actor_on`] (a
//!    node listed k times runs k of them; on GPUs, on k consecutive devices); its state is
//!    the [`ReplicaJob`] (model description, optimizer, data, checkpoint place) and which
//!    of its node's replicas it is.
//! 2. `Bind`: every replica binds a [`GroupListener`] on its node's address, keyed by a
//!    secret derived on the node from the cluster secret and the group's number (the key
//!    never travels), and answers the address.
//! 3. `Connect`: the head hands every replica the address table; they connect pairwise,
//!    load the latest checkpoint (or start fresh from the job's seed) and broadcast rank
//!    0's parameters, so they start bit-identical.
//! 4. `Epoch`: every replica trains one epoch on its shard of each global batch (gradient
//!    buckets all-reduced during backward, see [`DataParallel`]; on a GPU, averaged after
//!    backward through NCCL or the TCP group, see `GpuTrainer::replica`); rank 0 then saves the
//!    checkpoint and evaluates; each answers its statistics and a hash of its parameters,
//!    which the head compares.
//! 5. Dropping the group stops the actors; their sockets close.
//!
//! # Failure
//! A replica whose node is lost fails its call (the head names the node); the others fail
//! theirs within the collective timeout, naming the missing rank. [`train_on_cluster`]
//! then waits for every call of the epoch, keeps the replicas whose node is still in the
//! cluster, and starts the next group from the last checkpoint — never a hang.
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::replicas::{CommStats, DataParallel};
use crate::devices::GroupListener;
use crate::nn::{
    resume_from_stash, save_to_stash, Dataset, EpochStats, Evaluator, ModelSpec, NnError, OptimizerConfig,
    Params, TrainState,
};
use crate::{ActorHandle, Cluster, NodeId};

/// What every replica of a cluster group trains, and where it checkpoints.
///
/// The data travel with the job to every node (fine for data sets of a few MiB; a node
/// reaches the checkpoint stash itself, so it must be a directory the nodes share, or an
/// S3 or PostgreSQL URL).
#[derive(Clone, Serialize, Deserialize)]
pub struct ReplicaJob {
    /// The classifier to build on each node (for its share of the global batch).
    pub model: ModelSpec,
    /// The optimizer (every replica applies the same averaged gradients).
    pub optimizer: OptimizerConfig,
    /// Rows per optimizer step over the whole group; the group size must divide it.
    pub global_batch: usize,
    /// Gradient bucket size in MiB.
    pub bucket_mib: f64,
    /// Seed of a fresh run (initialization, shuffling, dropout).
    pub seed: u64,
    /// Training data.
    pub train: Dataset,
    /// Held-out data rank 0 evaluates after every epoch, if any.
    pub test: Option<Dataset>,
    /// Where rank 0 saves a checkpoint after every epoch (and where a group resumes from):
    /// the path or URL the stash was opened from (credentials included, as given to
    /// [`Stash::open_url`](crate::Stash::open_url)) and a name.
    pub checkpoint: Option<(String, String)>,
    /// A peer silent this long fails a collective.
    pub timeout: Duration,
    /// Pin each replica's training and communication threads to core `rank` (modulo the
    /// cores of its machine; Linux only). Helps when the replicas share one machine and
    /// nothing else runs there (on a 2-core machine it roughly halves the time spent
    /// waiting in all-reduce); leave it off on shared or multi-machine clusters.
    pub pin_to_core: bool,
    /// Where each replica trains: its node's CPU cores, or one of its GPUs.
    pub device: ReplicaDevice,
}

/// Summarizes the data sets (their sizes) and leaves the checkpoint URL's credentials out.
impl std::fmt::Debug for ReplicaJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let checkpoint = self.checkpoint.as_ref().map(|(url, name)| (crate::store::redact_url(url), name));
        f.debug_struct("ReplicaJob")
            .field("model", &self.model)
            .field("optimizer", &self.optimizer)
            .field("global_batch", &self.global_batch)
            .field("bucket_mib", &self.bucket_mib)
            .field("seed", &self.seed)
            .field("train_examples", &self.train.len())
            .field("test_examples", &self.test.as_ref().map(Dataset::len))
            .field("checkpoint", &checkpoint)
            .field("timeout", &self.timeout)
            .field("pin_to_core", &self.pin_to_core)
            .field("device", &self.device)
            .finish()
    }
}

/// Where each replica of a [`ReplicaJob`] trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaDevice {
    /// On its node's CPU cores, all-reducing gradient buckets over TCP while backward runs
    /// ([`DataParallel`]).
    Cpu,
    /// On GPU `ordinal` of its node, as a `GpuTrainer::replica` (nodes built with the `cuda`
    /// feature; every node must have reported that GPU when it joined). A node listed k
    /// times in the group runs k replicas, on GPUs `ordinal` to `ordinal + k - 1`
    /// ([`ClusterReplicas::every_gpu`] lists each node once per GPU). Gradients are
    /// averaged through NCCL on the devices when `nccl` is set (then every replica needs a
    /// GPU of its own), else through the replicas' TCP group, staged through host memory
    /// (replicas of different nodes on one machine may share a GPU).
    ///
    /// Either way a replica whose peer is lost fails within [`ReplicaJob::timeout`]: with
    /// `nccl`, a watchdog aborts NCCL's communicator when a collective runs on the GPU for
    /// longer than that (or NCCL's setup takes longer), or NCCL reports the peer's failure.
    Gpu {
        /// The device on each node.
        ordinal: usize,
        /// Average through NCCL rather than the TCP group.
        nccl: bool,
    },
}

impl ReplicaJob {
    /// `model` trained with `optimizer` on `train` in global batches of `global_batch`:
    /// 0.05 MiB buckets, seed 1, no evaluation, no checkpoints, a 10 s collective timeout,
    /// threads not pinned.
    pub fn new(model: ModelSpec, optimizer: OptimizerConfig, global_batch: usize, train: Dataset) -> Self {
        ReplicaJob {
            model,
            optimizer,
            global_batch,
            bucket_mib: 0.05,
            seed: 1,
            train,
            test: None,
            checkpoint: None,
            timeout: Duration::from_secs(10),
            pin_to_core: false,
            device: ReplicaDevice::Cpu,
        }
    }

    /// Each replica trains on GPU `ordinal` of its node (see [`ReplicaDevice::Gpu`]).
    pub fn on_gpu(mut self, ordinal: usize, nccl: bool) -> Self {
        self.device = ReplicaDevice::Gpu { ordinal, nccl };
        self
    }

    /// Rank 0 saves the training state as a new version of `name` in `stash` after every
    /// epoch, and every new group resumes from the latest one.
    pub fn checkpoint_to(mut self, stash: &crate::Stash, name: &str) -> Self {
        self.checkpoint = Some((stash.url_for_others(), name.to_string()));
        self
    }
}

/// One epoch of a cluster group, as the head saw it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// The epoch just finished (1 for the first).
    pub epoch: u64,
    /// Loss, accuracy and samples over every replica; seconds on rank 0.
    pub stats: EpochStats,
    /// Rank 0's accuracy on the job's test data, if it has some.
    pub test_accuracy: Option<f32>,
    /// Rank 0's compute and communication time so far in this group (on GPUs, GPU time
    /// read from events; see `GpuTrainer::comm_stats`).
    pub comm: CommStats,
    /// Replicas in the group.
    pub replicas: usize,
}

/// Calls to a replica (see the module's protocol).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ReplicaCall {
    Bind { rank: usize, size: usize, group: u64, ip: IpAddr },
    Connect { addrs: Vec<SocketAddr> },
    Epoch { lr: f32 },
    State,
}

/// A replica's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ReplicaAnswer {
    Bound(SocketAddr),
    Ready { epoch: u64 },
    Epoch { report: EpochReport, params: [u8; 32] },
    State(Box<TrainState>),
}

/// Why a replica's call failed, as it tells it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ReplicaFailure {
    /// A peer died or stalled (the replica itself is fine).
    peer_lost: bool,
    what: String,
}

impl ReplicaFailure {
    fn from_error(error: NnError) -> Self {
        ReplicaFailure { peer_lost: super::is_peer_lost(&error), what: error.to_string() }
    }

    fn protocol(what: &str) -> Self {
        ReplicaFailure { peer_lost: false, what: what.to_string() }
    }
}

/// One data-parallel replica hosted on a node process (an actor; see the module docs).
#[derive(Serialize, Deserialize)]
pub(crate) struct ReplicaActor {
    job: ReplicaJob,
    /// Which of its node's replicas this is (0 for the first): on GPUs, its device is the
    /// job's ordinal plus this.
    slot: usize,
    #[serde(skip)]
    live: Live,
}

/// What a replica builds on its node.
#[derive(Default)]
struct Live {
    rank: usize,
    listener: Option<GroupListener>,
    replica: Option<Engine>,
    state: Option<TrainState>,
    stash: Option<crate::Stash>,
}

/// A replica's trainer: on the CPU, or on a GPU with the training data on the device.
// One per replica actor, never moved after it is made: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Engine {
    Cpu(DataParallel),
    #[cfg(feature = "cuda")]
    Gpu {
        trainer: crate::nn::GpuTrainer,
        data: crate::nn::GpuDataset,
    },
}

impl Engine {
    /// A replica of `model` in `group` on the job's device (on GPUs, the job's ordinal plus
    /// `slot`), starting from rank 0's `state`.
    fn start(
        job: &ReplicaJob,
        slot: usize,
        model: crate::nn::Model,
        group: crate::devices::TcpGroup,
        state: &mut TrainState,
    ) -> Result<Engine, NnError> {
        match job.device {
            ReplicaDevice::Cpu => {
                let mut replica = DataParallel::new(model, Box::new(group), job.bucket_mib)?;
                replica.sync(state)?;
                Ok(Engine::Cpu(replica))
            }
            #[cfg(feature = "cuda")]
            ReplicaDevice::Gpu { ordinal, nccl } => {
                use crate::devices::{Gpu, GpuCommunicator, HostStagedGroup, NcclGroup};
                let gpu = std::sync::Arc::new(Gpu::open(ordinal + slot)?);
                let classes = model.graph.shape(model.logits)?.get(1).copied().unwrap_or(0);
                let data = crate::nn::GpuDataset::upload(&gpu, &job.train, classes)?;
                let mut group = group;
                let group: Box<dyn GpuCommunicator> = if nccl {
                    Box::new(NcclGroup::join_within(gpu, &mut group, job.timeout)?)
                } else {
                    Box::new(HostStagedGroup::new(gpu, Box::new(group)))
                };
                let trainer = crate::nn::GpuTrainer::replica(group, model, state, job.bucket_mib)?;
                Ok(Engine::Gpu { trainer, data })
            }
            #[cfg(not(feature = "cuda"))]
            ReplicaDevice::Gpu { .. } => {
                drop((model, group, slot));
                Err(NnError::Argument {
                    op: "ReplicaJob",
                    what:
                        "replicas on GPUs need Tessera built with the `cuda` feature, and this node's is not"
                            .into(),
                })
            }
        }
    }

    fn train_epoch(&mut self, state: &mut TrainState, data: &Dataset) -> Result<EpochStats, NnError> {
        match self {
            Engine::Cpu(replica) => replica.train_epoch(state, data),
            #[cfg(feature = "cuda")]
            Engine::Gpu { trainer, data } => trainer.train_epoch(state, data),
        }
    }

    fn stats(&self) -> CommStats {
        match self {
            Engine::Cpu(replica) => replica.stats(),
            #[cfg(feature = "cuda")]
            Engine::Gpu { trainer, .. } => trainer.comm_stats(),
        }
    }

    fn size(&self) -> usize {
        match self {
            Engine::Cpu(replica) => replica.size(),
            #[cfg(feature = "cuda")]
            Engine::Gpu { trainer, .. } => trainer.size(),
        }
    }
}

crate::remote_actor!(ReplicaActor);

impl crate::Actor for ReplicaActor {
    type Message = ReplicaCall;
    type Reply = Result<ReplicaAnswer, ReplicaFailure>;

    fn handle(&mut self, call: ReplicaCall) -> Self::Reply {
        match call {
            ReplicaCall::Bind { rank, size, group, ip } => self.bind(rank, size, group, ip),
            ReplicaCall::Connect { addrs } => self.connect(&addrs).map_err(ReplicaFailure::from_error),
            ReplicaCall::Epoch { lr } => self.epoch(lr).map_err(ReplicaFailure::from_error),
            ReplicaCall::State => match &self.live.state {
                Some(state) => Ok(ReplicaAnswer::State(Box::new(state.clone()))),
                None => Err(ReplicaFailure::protocol("asked for its state before it connected")),
            },
        }
    }
}

impl ReplicaActor {
    fn bind(
        &mut self,
        rank: usize,
        size: usize,
        group: u64,
        ip: IpAddr,
    ) -> Result<ReplicaAnswer, ReplicaFailure> {
        let secret = crate::net::derived_node_secret(&format!("collective group {group}"))
            .ok_or_else(|| ReplicaFailure::protocol("replica actors run on cluster node processes"))?;
        let listener = GroupListener::bind(rank, size, ip, &secret, self.job.timeout)
            .map_err(|e| ReplicaFailure::from_error(e.into()))?;
        let addr = listener.addr();
        self.live = Live { rank, listener: Some(listener), ..Live::default() };
        Ok(ReplicaAnswer::Bound(addr))
    }

    fn connect(&mut self, addrs: &[SocketAddr]) -> Result<ReplicaAnswer, NnError> {
        let job = &self.job;
        let listener = self.live.listener.take().ok_or_else(|| NnError::Elastic {
            what: "a replica was asked to connect before binding".into(),
        })?;
        let size = addrs.len();
        let rows = job.global_batch / size.max(1);
        if rows == 0 || rows * size != job.global_batch {
            return Err(NnError::Argument {
                op: "ReplicaJob",
                what: format!("{size} replicas do not divide the global batch {}", job.global_batch),
            });
        }
        let group = listener.connect(addrs)?;
        if job.pin_to_core {
            // Before the communication thread starts, so that it shares the core.
            pin_this_thread(self.live.rank);
        }
        let model = job.model.build(rows)?;
        let stash = match &job.checkpoint {
            Some((location, name)) => {
                let stash = crate::Stash::open_url(location)
                    .map_err(|e| NnError::Checkpoint { name: name.clone(), what: e.to_string() })?;
                Some((stash, name))
            }
            None => None,
        };
        let resumable = match &stash {
            Some((stash, name)) => !stash
                .history(name)
                .map_err(|e| NnError::Checkpoint { name: name.to_string(), what: e.to_string() })?
                .is_empty(),
            None => false,
        };
        let mut state = match &stash {
            Some((stash, name)) if resumable => resume_from_stash(stash, name, None)?,
            _ => TrainState::new(&model, job.optimizer.clone(), job.train.len(), job.global_batch, job.seed),
        };
        let replica = Engine::start(job, self.slot, model, group, &mut state)?;
        let epoch = state.epoch;
        self.live.replica = Some(replica);
        self.live.state = Some(state);
        self.live.stash = stash.map(|(stash, _)| stash);
        Ok(ReplicaAnswer::Ready { epoch })
    }

    fn epoch(&mut self, lr: f32) -> Result<ReplicaAnswer, NnError> {
        let (Some(replica), Some(state)) = (self.live.replica.as_mut(), self.live.state.as_mut()) else {
            return Err(NnError::Elastic { what: "a replica was asked to train before it connected".into() });
        };
        state.optimizer.set_lr(lr);
        let stats = replica.train_epoch(state, &self.job.train)?;
        let mut test_accuracy = None;
        if self.live.rank == 0 {
            if let (Some(stash), Some((_, name))) = (&self.live.stash, &self.job.checkpoint) {
                save_to_stash(stash, name, state, &[("epoch", &state.epoch.to_string())])?;
            }
            if let Some(test) = &self.job.test {
                let mut eval = Evaluator::new(self.job.model.build(test.len().max(1))?);
                test_accuracy = Some(eval.classify(&state.params, test)?.accuracy);
            }
        }
        let report = EpochReport {
            epoch: state.epoch,
            stats,
            test_accuracy,
            comm: replica.stats(),
            replicas: replica.size(),
        };
        Ok(ReplicaAnswer::Epoch { report, params: params_hash(&state.params) })
    }
}

/// For each replica (by rank), how many replicas before it run on the same node.
fn slots_on_nodes(nodes: &[NodeId]) -> Vec<usize> {
    nodes.iter().enumerate().map(|(rank, node)| nodes[..rank].iter().filter(|n| *n == node).count()).collect()
}

/// Pins the calling thread (and the threads it starts later) to core `index` modulo the
/// cores this process may use; a refusal by the OS is only logged (pinning is an
/// optimization).
fn pin_this_thread(index: usize) {
    #[cfg(target_os = "linux")]
    {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: `set` is a plain bit set owned here; sched_setaffinity reads exactly
        // `size_of::<cpu_set_t>()` bytes of it and affects only the calling thread (pid 0).
        let status = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(index % cores, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if status != 0 {
            tracing::warn!(core = index % cores, error = %std::io::Error::last_os_error(), "cannot pin a replica");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = index;
}

/// BLAKE3 of every parameter's bits, in order.
fn params_hash(params: &Params) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for tensor in &params.tensors {
        for v in &tensor.data {
            hasher.update(&v.to_bits().to_le_bytes());
        }
    }
    *hasher.finalize().as_bytes()
}

/// Numbers groups so that each derives its own key (a member of an older group cannot join
/// a newer one).
static NEXT_GROUP: AtomicU64 = AtomicU64::new(1);

/// One member of a cluster group, as the head sees it.
struct Member {
    node: NodeId,
    name: String,
    actor: ActorHandle<ReplicaActor>,
}

/// How a replica's call ended, seen from the head.
enum CallError {
    /// The replica answered with a failure.
    Failed(ReplicaFailure),
    /// The call itself failed: its node was lost, or the actor is gone.
    Gone(String),
}

/// A data-parallel group of replica actors on cluster nodes (see the module docs).
pub struct ClusterReplicas {
    cluster: Cluster,
    members: Vec<Member>,
    start_epoch: u64,
}

impl std::fmt::Debug for ClusterReplicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
        f.debug_struct("ClusterReplicas")
            .field("nodes", &nodes)
            .field("start_epoch", &self.start_epoch)
            .finish()
    }
}

impl ClusterReplicas {
    /// Starts one replica of `job` on each of `nodes` (rank = position; a node listed k
    /// times runs k replicas, on GPUs on k consecutive devices), forms their group and
    /// resumes from the job's checkpoint if there is one.
    ///
    /// # Errors
    /// [`NnError::Argument`] if there are no nodes or their number does not divide the
    /// global batch; [`NnError::Replica`] naming the replica and node if one cannot start,
    /// bind, connect or load the checkpoint, or (a job on GPUs) its node reported no such
    /// GPU when it joined (checked before any replica starts).
    pub fn start(cluster: &Cluster, nodes: &[NodeId], job: &ReplicaJob) -> Result<Self, NnError> {
        let size = nodes.len();
        if size == 0 || job.global_batch % size != 0 {
            return Err(NnError::Argument {
                op: "ClusterReplicas::start",
                what: format!("{size} replicas for a global batch of {}", job.global_batch),
            });
        }
        let known = cluster.nodes();
        let slots = slots_on_nodes(nodes);
        if let ReplicaDevice::Gpu { ordinal, .. } = job.device {
            for (rank, (node, &slot)) in nodes.iter().zip(&slots).enumerate() {
                let Some(info) = known.iter().find(|n| n.id == *node) else { continue };
                let device = ordinal + slot;
                if info.gpus.len() <= device {
                    let which =
                        if slot == 0 { String::new() } else { format!(" (its replica {})", slot + 1) };
                    return Err(NnError::Replica {
                        rank,
                        node: info.name.clone(),
                        what: format!(
                            "has no GPU {device} for a replica on GPUs{which} (it reported {} GPU(s) when it joined)",
                            info.gpus.len()
                        ),
                        peer_lost: false,
                    });
                }
            }
        }
        let mut members = Vec::with_capacity(size);
        let mut ips = Vec::with_capacity(size);
        for (&node, &slot) in nodes.iter().zip(&slots) {
            let info = known.iter().find(|n| n.id == node).ok_or_else(|| NnError::Replica {
                rank: members.len(),
                node: node.to_string(),
                what: "is not in the cluster".into(),
                peer_lost: false,
            })?;
            let actor = cluster
                .actor_on(node, &ReplicaActor { job: job.clone(), slot, live: Live::default() })
                .map_err(|e| NnError::Replica {
                    rank: members.len(),
                    node: info.name.clone(),
                    what: format!("cannot start: {e}"),
                    peer_lost: false,
                })?;
            ips.push(info.data_addr.ip());
            members.push(Member { node, name: info.name.clone(), actor });
        }
        let mut group = ClusterReplicas { cluster: cluster.clone(), members, start_epoch: 0 };
        let nonce =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let number = NEXT_GROUP.fetch_add(1, Ordering::Relaxed) ^ ((nonce as u64) << 16);
        let binds = group.call_all(|rank| ReplicaCall::Bind { rank, size, group: number, ip: ips[rank] });
        let mut addrs = Vec::with_capacity(size);
        for (rank, answer) in group.collect(binds)?.into_iter().enumerate() {
            match answer {
                ReplicaAnswer::Bound(addr) => addrs.push(addr),
                other => return Err(group.unexpected(rank, &other)),
            }
        }
        let connects = group.call_all(|_| ReplicaCall::Connect { addrs: addrs.clone() });
        let answers = group.collect(connects)?;
        match answers.first() {
            Some(ReplicaAnswer::Ready { epoch }) => group.start_epoch = *epoch,
            Some(other) => return Err(group.unexpected(0, other)),
            None => {}
        }
        Ok(group)
    }

    /// `nodes`, each listed once per GPU it reported when it joined (nodes without GPUs
    /// left out): with [`ReplicaJob::on_gpu`]`(0, …)`, a group with a replica on every GPU
    /// of those nodes.
    pub fn every_gpu(cluster: &Cluster, nodes: &[NodeId]) -> Vec<NodeId> {
        let known = cluster.nodes();
        nodes
            .iter()
            .flat_map(|&node| {
                let gpus = known.iter().find(|n| n.id == node).map_or(0, |n| n.gpus.len());
                std::iter::repeat_n(node, gpus)
            })
            .collect()
    }

    /// Replicas in the group.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// The nodes of the replicas, by rank.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.members.iter().map(|m| m.node).collect()
    }

    /// The epoch the group started from (after a resume, the checkpoint's).
    pub fn start_epoch(&self) -> u64 {
        self.start_epoch
    }

    /// Trains one epoch at learning rate `lr` on every replica and checks that every
    /// replica ends with the same parameter bits.
    ///
    /// # Errors
    /// [`NnError::Replica`] naming the first replica that failed (its node lost, a peer
    /// lost, or its own error) after every replica's call has ended; [`NnError::Elastic`]
    /// if the replicas' parameters differ.
    pub fn train_epoch(&mut self, lr: f32) -> Result<EpochReport, NnError> {
        let calls = self.call_all(|_| ReplicaCall::Epoch { lr });
        let answers = self.collect(calls)?;
        let mut first: Option<([u8; 32], EpochReport)> = None;
        for (rank, answer) in answers.into_iter().enumerate() {
            let ReplicaAnswer::Epoch { report, params } = answer else {
                return Err(self.unexpected(rank, &answer));
            };
            match &first {
                None => first = Some((params, report)),
                Some((hash, _)) if *hash != params => {
                    return Err(NnError::Elastic {
                        what: format!(
                        "replica {rank} on node `{}` has different parameters than replica 0 after epoch {}",
                        self.members[rank].name, report.epoch
                    ),
                    })
                }
                Some(_) => {}
            }
        }
        first.map(|(_, report)| report).ok_or_else(|| NnError::Elastic { what: "the group is empty".into() })
    }

    /// Rank 0's whole training state (parameters, optimizer, loader).
    ///
    /// # Errors
    /// [`NnError::Replica`] if rank 0 cannot answer.
    pub fn state(&self) -> Result<TrainState, NnError> {
        let call = vec![self.members[0].actor.call(ReplicaCall::State)];
        match self.collect_from(&self.members[..1], call)?.pop() {
            Some(ReplicaAnswer::State(state)) => Ok(*state),
            Some(other) => Err(self.unexpected(0, &other)),
            None => Err(self.unexpected_none()),
        }
    }

    fn call_all(
        &self,
        call: impl Fn(usize) -> ReplicaCall,
    ) -> Vec<crate::Ref<<ReplicaActor as crate::Actor>::Reply>> {
        self.members.iter().enumerate().map(|(rank, m)| m.actor.call(call(rank))).collect()
    }

    fn collect(
        &self,
        calls: Vec<crate::Ref<<ReplicaActor as crate::Actor>::Reply>>,
    ) -> Result<Vec<ReplicaAnswer>, NnError> {
        self.collect_from(&self.members, calls)
    }

    /// Waits for every call (so that no replica is still busy when this returns), then
    /// reports the first failure, preferring a replica that is itself gone or failed over
    /// one that only lost a peer.
    fn collect_from(
        &self,
        members: &[Member],
        calls: Vec<crate::Ref<<ReplicaActor as crate::Actor>::Reply>>,
    ) -> Result<Vec<ReplicaAnswer>, NnError> {
        let outcomes: Vec<Result<ReplicaAnswer, CallError>> = calls
            .iter()
            .map(|call| match call.blocking_get() {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(failure)) => Err(CallError::Failed(failure)),
                Err(error) => Err(CallError::Gone(error.to_string())),
            })
            .collect();
        let error = |rank: usize, e: &CallError| {
            let node = members[rank].name.clone();
            match e {
                CallError::Gone(what) => {
                    NnError::Replica { rank, node, what: what.clone(), peer_lost: false }
                }
                CallError::Failed(f) => {
                    NnError::Replica { rank, node, what: f.what.clone(), peer_lost: f.peer_lost }
                }
            }
        };
        let failures: Vec<(usize, &CallError)> =
            outcomes.iter().enumerate().filter_map(|(rank, o)| o.as_ref().err().map(|e| (rank, e))).collect();
        let worst = failures
            .iter()
            .find(|(_, e)| !matches!(e, CallError::Failed(f) if f.peer_lost))
            .or(failures.first());
        if let Some((rank, e)) = worst {
            return Err(error(*rank, e));
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    fn unexpected(&self, rank: usize, answer: &ReplicaAnswer) -> NnError {
        NnError::Replica {
            rank,
            node: self.members.get(rank).map_or_else(String::new, |m| m.name.clone()),
            what: format!("answered out of protocol: {answer:?}"),
            peer_lost: false,
        }
    }

    fn unexpected_none(&self) -> NnError {
        NnError::Elastic { what: "the group is empty".into() }
    }

    /// The members whose node is still in the cluster.
    fn surviving_nodes(&self) -> Vec<NodeId> {
        let alive: Vec<NodeId> = self.cluster.nodes().iter().map(|n| n.id).collect();
        self.members.iter().map(|m| m.node).filter(|n| alive.contains(n)).collect()
    }
}

/// How [`train_on_cluster`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElasticTraining {
    /// Epochs to reach (counted in the training state, so a resumed run finishes the rest).
    pub epochs: u64,
    /// Fewest replicas worth continuing with.
    pub min_replicas: usize,
    /// Most regroupings after lost nodes.
    pub max_restarts: usize,
}

impl ElasticTraining {
    /// `epochs` epochs, continuing down to 1 replica, regrouping up to 3 times.
    pub fn new(epochs: u64) -> Self {
        ElasticTraining { epochs, min_replicas: 1, max_restarts: 3 }
    }
}

/// How a [`train_on_cluster`] run went.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterTrainingReport {
    /// The final training state (rank 0's; every replica held the same bits).
    pub state: TrainState,
    /// Group size of each group, in order (the last one finished the run).
    pub sizes: Vec<usize>,
    /// The nodes lost during training, by name.
    pub lost: Vec<String>,
}

/// Trains `job` data-parallel with one replica actor on each of `nodes` until
/// `config.epochs`, at learning rate `lr(epoch)`; calls `on_epoch` after every epoch.
/// When a replica's node is lost mid-training, the replicas on the remaining nodes form a
/// new group that resumes from the last checkpoint (the job must have one), and `say`
/// tells why. Groups use the largest number of survivors that divides the global batch.
///
/// # Errors
/// [`NnError::Replica`] for a failure that is not a lost node (or without a checkpoint to
/// resume from); [`NnError::Elastic`] if fewer than `min_replicas` survive or after
/// `max_restarts` regroupings; what [`ClusterReplicas::start`] reports.
pub fn train_on_cluster(
    cluster: &Cluster,
    nodes: &[NodeId],
    job: &ReplicaJob,
    config: ElasticTraining,
    lr: impl Fn(u64) -> f32,
    mut on_epoch: impl FnMut(&EpochReport),
    mut say: impl FnMut(&str),
) -> Result<ClusterTrainingReport, NnError> {
    let mut nodes = nodes.to_vec();
    let (mut sizes, mut lost) = (Vec::new(), Vec::new());
    let mut restarts = 0;
    loop {
        let mut group = ClusterReplicas::start(cluster, &nodes, job)?;
        sizes.push(group.size());
        if group.start_epoch() > 0 {
            say(&format!(
                "{} replicas resumed from the checkpoint after epoch {}",
                group.size(),
                group.start_epoch()
            ));
        }
        let mut epoch = group.start_epoch();
        let failure = loop {
            if epoch >= config.epochs {
                break None;
            }
            match group.train_epoch(lr(epoch)) {
                Ok(report) => {
                    epoch = report.epoch;
                    on_epoch(&report);
                }
                Err(error) => break Some(error),
            }
        };
        let Some(error) = failure else {
            let state = group.state()?;
            return Ok(ClusterTrainingReport { state, sizes, lost });
        };
        // Give the head a moment to notice a node that is gone but not yet declared lost.
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut survivors = group.surviving_nodes();
        while survivors.len() == group.size() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            survivors = group.surviving_nodes();
        }
        let mut gone: Vec<String> = Vec::new();
        for member in group.members.iter().filter(|m| !survivors.contains(&m.node)) {
            // A node that ran several replicas is named once.
            if !gone.contains(&member.name) {
                gone.push(member.name.clone());
            }
        }
        if gone.is_empty() || job.checkpoint.is_none() {
            return Err(error);
        }
        drop(group);
        lost.extend(gone.iter().cloned());
        let mut size = survivors.len();
        while size > 0 && job.global_batch % size != 0 {
            size -= 1;
        }
        if size < config.min_replicas.max(1) {
            return Err(NnError::Elastic {
                what: format!(
                    "lost node(s) {gone:?} ({error}); {} left, fewer than the minimum {}",
                    survivors.len(),
                    config.min_replicas.max(1)
                ),
            });
        }
        if restarts == config.max_restarts {
            return Err(NnError::Elastic { what: format!("gave up after {restarts} regroupings ({error})") });
        }
        restarts += 1;
        say(&format!(
            "lost node(s) {} mid-training ({error}); resuming from the last checkpoint with the remaining {size} replica(s)",
            gone.join(", ")
        ));
        survivors.truncate(size);
        nodes = survivors;
    }
}

#[cfg(test)]
mod tests {
    use super::slots_on_nodes;
    use crate::NodeId;

    #[test]
    fn a_jobs_debug_shows_sizes_and_no_credentials() {
        use crate::nn::{Dataset, ModelSpec, OptimizerConfig};
        let train = Dataset { features: vec![0.5; 3 * 1000], labels: vec![1; 1000], dim: 3 };
        let mut job = super::ReplicaJob::new(
            ModelSpec::LogisticRegression { features: 3, classes: 2 },
            OptimizerConfig::sgd(0.1, 0.0),
            10,
            train,
        );
        job.checkpoint = Some(("s3://b/p?secret_access_key=SECRET".into(), "run".into()));
        let shown = format!("{job:?}");
        assert!(shown.contains("train_examples: 1000") && shown.contains("s3://b/p?…"), "{shown}");
        assert!(!shown.contains("SECRET") && shown.len() < 1000, "{shown}");
    }

    #[test]
    fn a_nodes_replicas_take_consecutive_slots_in_rank_order() {
        let (a, b, c) = (NodeId(7), NodeId(3), NodeId(9));
        assert_eq!(slots_on_nodes(&[a, b, a, a, c, b]), [0, 0, 1, 2, 0, 1]);
        assert_eq!(slots_on_nodes(&[a, b, c]), [0, 0, 0]);
        assert!(slots_on_nodes(&[]).is_empty());
    }
}
