//! The network side of the runtime: node processes joined over TCP, the framed wire
//! protocol with its authenticated handshake, the object data plane, and the cluster
//! managers that start node processes.
//!
//! # Topology
//! The head is the process that runs the user's program and its [`Runtime`](crate::Runtime);
//! it listens for nodes. Each node process connects to the head (control connection) and
//! serves the objects it holds on a data port of its own. Task results stay on the node
//! that made them (small ones travel back inline); whoever needs the bytes pulls them
//! straight from the holder.
//!
//! # Failure
//! A node is declared lost when its control connection closes or its heartbeats stop for
//! longer than the timeout. Its running tasks are retried on other nodes; the values it held
//! are rebuilt by re-running the tasks that made them; values without lineage fail with
//! [`Error::ObjectLost`](crate::Error::ObjectLost) naming the node.
mod auth;
mod data;
mod frame;
mod head;
mod in_order;
mod manager;
mod node;
#[cfg(test)]
mod placement_tests;
mod wire;

pub use frame::{decode_frame, FrameError, MAX_FRAME_LEN};
pub(crate) use head::MESSAGE_INLINE_LIMIT;
pub use head::{Cluster, ClusterConfig, NodeId, NodeInfo};
pub use manager::{ClusterManager, JoinInfo, LaunchedNode, LocalProcesses, ManualJoin, Slurm, Ssh};
pub(crate) use node::derived_node_secret;
pub use node::{init, run_node, NodeConfig};

/// A fresh random 32-byte nonce (for handshakes in other subsystems).
pub(crate) fn random_nonce_pub() -> [u8; 32] {
    auth::random_nonce()
}
