//! `NnError`: every way building, running, training or checkpointing a model can fail.
use std::path::PathBuf;

/// Why a graph could not be built or run, or a checkpoint or data set could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NnError {
    /// An op's input has the wrong shape.
    #[error("{op}: input `{input}` has shape {got:?}, expected {expected}")]
    Shape {
        /// The op being built.
        op: &'static str,
        /// Which input (by role, e.g. "weight").
        input: &'static str,
        /// The shape that was given.
        got: Vec<usize>,
        /// What was expected, in words (e.g. "[in, out] with in = 64").
        expected: String,
    },
    /// An op's input has the wrong element type.
    #[error("{op}: input `{input}` has dtype {got:?}, expected {expected:?}")]
    DType {
        /// The op being built.
        op: &'static str,
        /// Which input.
        input: &'static str,
        /// The dtype that was given.
        got: crate::nn::DType,
        /// The dtype the op needs.
        expected: crate::nn::DType,
    },
    /// An op argument (stride, head count, probability, ...) is out of range.
    #[error("{op}: invalid argument: {what}")]
    Argument {
        /// The op being built.
        op: &'static str,
        /// What is wrong.
        what: String,
    },
    /// A node id does not belong to the graph.
    #[error("node {node} is not in the graph ({len} nodes)")]
    UnknownNode {
        /// The id given.
        node: usize,
        /// How many nodes the graph has.
        len: usize,
    },
    /// A buffer given to the executor has the wrong length.
    #[error("node {node} (`{name}`) takes {expected} elements, got {got}")]
    Length {
        /// The node.
        node: usize,
        /// Its name.
        name: String,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// A node's value was needed but neither computed nor given.
    #[error("node {node} (`{name}`) has no value: run its producer or set it as a stage input")]
    MissingValue {
        /// The node.
        node: usize,
        /// Its name.
        name: String,
    },
    /// A node range or node lies outside the pipeline stage this executor was made for.
    #[error("nodes {start}..{end} are outside this executor's stage {stage_start}..{stage_end}")]
    OutsideStage {
        /// First node asked for.
        start: usize,
        /// One past the last node asked for.
        end: usize,
        /// First node of the stage.
        stage_start: usize,
        /// One past the last node of the stage.
        stage_end: usize,
    },
    /// The parameters do not match the graph's parameter list.
    #[error("parameter {index} (`{name}`): expected shape {expected:?}, got {got:?}")]
    ParamMismatch {
        /// Position in the parameter list.
        index: usize,
        /// The parameter's name.
        name: String,
        /// The shape the graph declares.
        expected: Vec<usize>,
        /// The shape given.
        got: Vec<usize>,
    },
    /// A label or token id is outside its valid range.
    #[error("{op}: id {id} at position {position} is outside 0..{limit}")]
    IdOutOfRange {
        /// The op that read it.
        op: &'static str,
        /// The offending id.
        id: i32,
        /// Where in the input it was.
        position: usize,
        /// The exclusive upper bound.
        limit: usize,
    },
    /// A data file could not be parsed.
    #[error("{path}:{line}: {what}")]
    Data {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint could not be encoded or decoded.
    #[error("checkpoint `{name}`: {what}")]
    Checkpoint {
        /// The checkpoint's name.
        name: String,
        /// What the codec reported.
        what: String,
    },
    /// A collective operation of data-parallel training failed (a replica died or stalled).
    #[error("gradient all-reduce failed: {source}")]
    Collective {
        /// What the communicator reported (names the missing rank).
        #[from]
        source: crate::devices::CollectiveError,
    },
    /// A pipeline stage failed while running a micro-batch.
    #[error("pipeline stage {stage} failed: {source}")]
    Stage {
        /// The stage (0 is the first).
        stage: usize,
        /// Its error.
        source: Box<NnError>,
    },
    /// A pipeline stage hosted on a cluster node failed there, did not answer in time, or
    /// its node was lost.
    #[error("pipeline stage {stage} on node `{node}`: {what}")]
    StageOnNode {
        /// The stage (0 is the first).
        stage: usize,
        /// The name of the node that hosts it.
        node: String,
        /// What happened (the stage's error, or why the node could not answer).
        what: String,
    },
    /// Supervising elastic training failed (too few replicas left, a process could not
    /// start, too many restarts).
    #[error("elastic training: {what}")]
    Elastic {
        /// What happened.
        what: String,
    },
    /// A data-parallel replica hosted on a cluster node failed: its node was lost, a peer
    /// replica was lost (`peer_lost`), or its own step failed.
    #[error("replica {rank} on node `{node}`: {what}")]
    Replica {
        /// Its rank in the group.
        rank: usize,
        /// Its node's name.
        node: String,
        /// What happened.
        what: String,
        /// Whether it failed only because a peer is gone.
        peer_lost: bool,
    },
    /// A GPU operation failed (feature `cuda`).
    #[cfg(feature = "cuda")]
    #[error("GPU: {source}")]
    Device {
        /// What the device reported.
        #[from]
        source: crate::devices::DeviceError,
    },
    /// An XLA device operation failed (feature `xla`).
    #[cfg(feature = "xla")]
    #[error("XLA: {source}")]
    Xla {
        /// What the PJRT plugin reported.
        #[from]
        source: crate::devices::XlaError,
    },
    /// An executor cannot run one of the graph's ops.
    #[error("the {backend} executor cannot run op `{op}` (node {node})")]
    Unsupported {
        /// The executor (e.g. "GPU").
        backend: &'static str,
        /// The op's name.
        op: &'static str,
        /// The node.
        node: usize,
    },
    /// A training worker thread (communication thread or pipeline stage) is gone.
    #[error("{worker} stopped unexpectedly")]
    WorkerGone {
        /// Which worker, in words (e.g. "pipeline stage 1").
        worker: String,
    },
}

impl NnError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        NnError::Io { path: path.into(), source }
    }
}
