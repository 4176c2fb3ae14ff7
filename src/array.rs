//! Distributed arrays: [`DArray`], an n-dimensional array of `f32` or `f64` cut into a
//! grid of chunks, each chunk a [`Ref`](crate::Ref) held wherever the task that made it
//! ran (a worker here or a node process of the cluster).
//!
//! Every operation is a task graph over chunks, built at once and run as inputs become
//! ready: elementwise [`map`](DArray::map) and [`zip`](DArray::zip), tree
//! [`reduce`](DArray::reduce), tiled [`matmul`](DArray::matmul) (products in parallel,
//! summed by a tree), [`transpose`](DArray::transpose), [`slice`](DArray::slice) and [`rechunk`](DArray::rechunk) (each new
//! chunk assembled from the old ones it overlaps). Nothing is gathered to the caller until
//! it asks ([`to_array`](DArray::to_array)); the chunk tasks are registered in the library,
//! so any node process (`tessera node`, or a program calling [`init`](crate::init)) runs
//! them. [`DArray::save`] writes every chunk to a [`Stash`](crate::Stash) (from the node
//! that holds it, on a cluster) and then one manifest, so a saved array appears whole or
//! not at all. With the `cuda` feature, `DArray::to_devices` moves an `f32` array's
//! chunks onto GPUs (`DeviceDArray`), where its operations run as device-actor work.
//!
//! # Examples
//! ```
//! use tessera::{BinaryOp, DArray, Fill, ReduceOp, Runtime};
//!
//! let rt = Runtime::local()?;
//! let a = DArray::<f64>::fill(&rt, &[300, 200], &[100, 100], Fill::Index)?;
//! let b = a.map(tessera::UnaryOp::Scale(2.0));
//! let c = a.zip(&b, BinaryOp::Add)?; // 3 × index
//! let total = c.reduce(ReduceOp::Sum)?.blocking_get()?;
//! let n = 300.0 * 200.0;
//! assert_eq!(total, 3.0 * n * (n - 1.0) / 2.0);
//! assert_eq!(c.slice(&[1..2, 0..3])?.to_array()?.as_slice().unwrap(), &[600.0, 603.0, 606.0]);
//! # rt.shutdown();
//! # Ok::<(), tessera::Error>(())
//! ```
mod chunk;
mod darray;
#[cfg(feature = "cuda")]
mod device;
mod grid;
mod ops;
mod sparse;

use std::ops::Range;

pub use darray::DArray;
#[cfg(feature = "cuda")]
pub use device::{DeviceDArray, DeviceSparseDArray};
pub use grid::ChunkGrid;
pub use ops::{BinaryOp, DElement, Fill, ReduceOp, UnaryOp};
#[cfg(feature = "cuda")]
pub(crate) use sparse::CsrBlock;
pub use sparse::SparseDArray;

/// Why an array operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum ArrayError {
    /// The chunk shape has another rank than the array, or a 0 in it.
    #[error(
        "chunk shape {chunk:?} does not fit an array of shape {shape:?}: it needs one size > 0 per dimension"
    )]
    BadChunkShape {
        /// The array's shape.
        shape: Vec<usize>,
        /// The chunk shape asked for.
        chunk: Vec<usize>,
    },
    /// The shape holds more elements than an array may.
    #[error("shape {shape:?} holds more than 2^48 elements")]
    TooLarge {
        /// The shape asked for.
        shape: Vec<usize>,
    },
    /// The operands' shapes do not fit the operation.
    #[error("{op}: shapes {left:?} and {right:?} do not fit")]
    ShapeMismatch {
        /// The operation.
        op: &'static str,
        /// The left operand's shape.
        left: Vec<usize>,
        /// The right operand's shape.
        right: Vec<usize>,
    },
    /// The operation needs arrays of another rank.
    #[error("{op} needs {expected}-dimensional arrays, not {got}-dimensional")]
    RankMismatch {
        /// The operation.
        op: &'static str,
        /// The rank it needs.
        expected: usize,
        /// The rank it got.
        got: usize,
    },
    /// A slice reaches outside the array.
    #[error("slice {ranges:?} is out of bounds of shape {shape:?}")]
    SliceOutOfBounds {
        /// The ranges asked for.
        ranges: Vec<Range<usize>>,
        /// The array's shape.
        shape: Vec<usize>,
    },
    /// Min or max of an array with no element.
    #[error("{op:?} of an empty array has no value")]
    Empty {
        /// The reduction.
        op: ReduceOp,
    },
    /// A chunk task was given a block that does not fit its chunks (an internal
    /// inconsistency, or a malformed task from another process).
    #[error(
        "block {block:?} of a chunk of shape {source_shape:?} does not fit a chunk of shape {target_shape:?}"
    )]
    BadBlock {
        /// The block, in the source chunk's coordinates.
        block: Vec<Range<usize>>,
        /// The source chunk's shape.
        source_shape: Vec<usize>,
        /// The target chunk's shape.
        target_shape: Vec<usize>,
    },
    /// A sparse block is not a valid CSR matrix (a malformed task from another process,
    /// or a `sprs` matrix that could not be rebuilt).
    #[error("not a valid CSR block: {reason}")]
    BadSparse {
        /// What is wrong.
        reason: String,
    },
    /// The operands' chunk shapes do not line up, and the operation does not rechunk (arrays
    /// on devices).
    #[error(
        "{op}: chunk shapes {left:?} and {right:?} do not line up (arrays on devices are not rechunked: rechunk the DArray before moving it to the devices)"
    )]
    ChunkMismatch {
        /// The operation.
        op: &'static str,
        /// The left operand's chunk shape.
        left: Vec<usize>,
        /// The right operand's chunk shape.
        right: Vec<usize>,
    },
    /// An array was to be placed on devices, but none was given.
    #[error("an array on devices needs at least one device actor, and none was given")]
    NoDevices,
    /// A device actor given for an array serves another runtime than the array's.
    #[error("the device actor of GPU {ordinal} serves another runtime than the array's")]
    ForeignDevice {
        /// The device's ordinal.
        ordinal: usize,
    },
    /// A saved array's manifest does not describe a whole array of this element type.
    #[error("`{name}` is not a saved DArray of {expected}: {reason}")]
    NotADArray {
        /// The stash entry.
        name: String,
        /// The element type asked for.
        expected: &'static str,
        /// What is wrong.
        reason: String,
    },
}
