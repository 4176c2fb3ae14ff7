//! The wire protocol: every message that crosses a connection, in one enum.
//!
//! Connection life: `Hello` → `Challenge` → `Proof` → `Welcome` (or `Refused` and close);
//! then a control connection (role `Node`) starts with `Register`, and a data connection
//! (role `Data`) carries `Fetch` requests answered by `FetchHeader` + raw bytes.
//!
//! A task running on a node spawns tasks onto the cluster with `Spawn`; the head answers
//! each with `SpawnDone` when the task has run, and the node sends `Release` when its last
//! `Ref` to a result the head keeps for it drops.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::devices::{GpuInfo, XlaInfo};

/// First field of every `Hello`: "TSRA".
pub(crate) const MAGIC: u32 = 0x5453_5241;
/// Bumped on any incompatible change of [`Message`].
pub(crate) const PROTOCOL_VERSION: u16 = 4;

/// What a connecting peer wants to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Role {
    /// A node process joining the cluster (control connection to the head).
    Node,
    /// A peer that pulls objects.
    Data,
}

/// Where the bytes of a task argument, an actor's state or an actor call come from: inline
/// when small, else pulled from the data server of the process that holds them, so that no
/// control frame outgrows [`MAX_FRAME_LEN`](super::frame::MAX_FRAME_LEN).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ArgSource {
    /// The encoded value itself.
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Pull the value `id` from the holder at `addr`.
    Fetch { addr: SocketAddr, id: u64 },
}

/// One task sent to a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TaskRequest {
    pub(crate) task_id: u64,
    pub(crate) name: String,
    pub(crate) args: Vec<ArgSource>,
}

/// Where a finished task's value (or an actor's reply) is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ReplyValue {
    /// Small values come back inline.
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Large values stay on the node, under the task's id.
    Stored { len: u64 },
    /// The task returned the `Ref` of one of its node's spawns, whose result the head
    /// keeps for the node (the spawn's id): the head's own `Ref` to it is the task's value.
    Spawned(u64),
}

/// How a task failed on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RemoteErrorKind {
    /// The task returned an error.
    Failed,
    /// The task panicked.
    Panicked,
    /// An input could not be pulled from its holder (the task did not run).
    InputUnavailable,
}

/// A task's failure on a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RemoteTaskError {
    pub(crate) kind: RemoteErrorKind,
    pub(crate) message: String,
}

/// One finished task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TaskReply {
    pub(crate) task_id: u64,
    pub(crate) result: Result<ReplyValue, RemoteTaskError>,
}

/// An argument of a task that a node spawns onto the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum SpawnArg {
    /// The value's bytes, inline or where to pull them from.
    Source(ArgSource),
    /// The result of an earlier spawn of the same node, which the head keeps for it.
    Spawned(u64),
    /// Pull `id` (`len` bytes) from the holder at `addr` (the spawning node, for a large
    /// value of its own): the head prefers to run the task there.
    Held { addr: SocketAddr, id: u64, len: u64 },
}

/// A task that a task on a node spawns onto the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SpawnRequest {
    /// Numbers the spawn among the node's spawns (its `Ref`'s id in the node's runtime).
    pub(crate) spawn_id: u64,
    pub(crate) name: String,
    pub(crate) args: Vec<SpawnArg>,
    pub(crate) retries: u32,
    pub(crate) gpu: bool,
    pub(crate) xla: bool,
}

/// Where the result of a node's spawn is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum SpawnedValue {
    /// Small values come inline (the head keeps nothing for the node).
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Pull `id` from the holder at `addr`; the head keeps the value until `Release`.
    Held { addr: SocketAddr, id: u64, len: u64 },
}

/// Every message of the protocol.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Message {
    Hello {
        magic: u32,
        version: u16,
        role: Role,
        name: String,
    },
    Challenge {
        nonce: [u8; 32],
    },
    Proof {
        client_nonce: [u8; 32],
        mac: [u8; 32],
    },
    Welcome {
        mac: [u8; 32],
    },
    Refused {
        reason: String,
    },
    Register {
        data_addr: SocketAddr,
        slots: u32,
        pid: u32,
        /// The node's CUDA devices (empty without feature `cuda` or without a GPU).
        gpus: Vec<GpuInfo>,
        /// The node's XLA plugin (none without feature `xla` or without a loadable plugin).
        xla: Option<XlaInfo>,
    },
    Registered {
        node: u64,
    },
    Heartbeat,
    RunTasks(Vec<TaskRequest>),
    TasksDone(Vec<TaskReply>),
    Store {
        id: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    Free(Vec<u64>),
    ActorCreate {
        actor_id: u64,
        name: String,
        state: ArgSource,
    },
    ActorCall {
        actor_id: u64,
        call_id: u64,
        message: ArgSource,
    },
    /// A large reply stays on the node under `call_id`, like a large task result.
    ActorReply {
        call_id: u64,
        result: Result<ReplyValue, String>,
    },
    ActorStop {
        actor_id: u64,
    },
    SaveValue {
        request: u64,
        id: u64,
        store: String,
        name: String,
        type_name: String,
        tags: Vec<(String, String)>,
    },
    Saved {
        request: u64,
        result: Result<String, String>,
    },
    Fetch {
        id: u64,
    },
    FetchHeader {
        id: u64,
        len: u64,
    },
    FetchMissing {
        id: u64,
        reason: String,
    },
    /// Node → head: run a task on the cluster.
    Spawn(SpawnRequest),
    /// Head → node: a spawned task's result.
    SpawnDone {
        spawn_id: u64,
        result: Result<SpawnedValue, RemoteTaskError>,
    },
    /// Node → head: the node dropped its last `Ref` to these spawns' results.
    Release(Vec<u64>),
    Shutdown,
}

impl Message {
    /// The variant's name, for logs (never the payload, which may be large or secret).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Challenge { .. } => "Challenge",
            Message::Proof { .. } => "Proof",
            Message::Welcome { .. } => "Welcome",
            Message::Refused { .. } => "Refused",
            Message::Register { .. } => "Register",
            Message::Registered { .. } => "Registered",
            Message::Heartbeat => "Heartbeat",
            Message::RunTasks { .. } => "RunTasks",
            Message::TasksDone { .. } => "TasksDone",
            Message::Store { .. } => "Store",
            Message::Free { .. } => "Free",
            Message::ActorCreate { .. } => "ActorCreate",
            Message::ActorCall { .. } => "ActorCall",
            Message::ActorReply { .. } => "ActorReply",
            Message::ActorStop { .. } => "ActorStop",
            Message::SaveValue { .. } => "SaveValue",
            Message::Saved { .. } => "Saved",
            Message::Fetch { .. } => "Fetch",
            Message::FetchHeader { .. } => "FetchHeader",
            Message::FetchMissing { .. } => "FetchMissing",
            Message::Spawn { .. } => "Spawn",
            Message::SpawnDone { .. } => "SpawnDone",
            Message::Release { .. } => "Release",
            Message::Shutdown => "Shutdown",
        }
    }
}
