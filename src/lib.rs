//! Tessera: an embeddable actor-model runtime for distributed, data-parallel computing
//! and model training.
//!
//! Every worker, node process, device, array shard and storage node is an actor that
//! exchanges [`Ref`]s: typed, futures-like references to values that may not exist yet.
//! See `ARCHITECTURE.md` in the repository for the picture and the message flows.
#![deny(missing_docs)]
#![warn(unreachable_pub)]

mod actors;
mod array;
mod codec;
mod devices;
mod error;
mod net;
pub mod nn;
mod store;

pub use actors::*;
pub use array::{ArrayError, BinaryOp, ChunkGrid, DArray, DElement, Fill, ReduceOp, SparseDArray, UnaryOp};
#[cfg(feature = "cuda")]
pub use array::{DeviceDArray, DeviceSparseDArray};
pub use devices::*;
pub use error::{Error, Result};
pub use net::*;
pub use store::{
    redact_url, ArrayElement, BlobStore, Dtype, GcReport, Layout, ObjectMeta, PutBatch, RepairReport, Stash,
    StoreError, StoreStats, TransferKind, TransferProgress, VerifyReport, Version, VersionInfo, CHUNK_SIZE,
    DEFAULT_GC_GRACE,
};

#[doc(hidden)]
pub mod __private {
    //! Items used by the exported macros; not part of the public API.
    pub use crate::actors::__NodeArgs as NodeArgs;
    pub use inventory;
}
