//! The runtime's error type: what a failed task, a lost value or a stopped runtime reports.
use std::sync::Arc;

/// A `Result` whose error is the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a runtime operation or a task failed.
///
/// Errors are cheap to clone: one failed value may be reported to many waiters.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A task returned an error.
    #[error("task `{task}` failed: {message}")]
    TaskFailed {
        /// The registered name of the task.
        task: String,
        /// The error the task returned, as text.
        message: String,
    },
    /// A task panicked; the runtime caught the panic and kept running.
    #[error("task `{task}` panicked: {message}")]
    TaskPanicked {
        /// The registered name of the task.
        task: String,
        /// The panic payload, as text.
        message: String,
    },
    /// A task did not run because one of its inputs failed.
    #[error("task `{task}` did not run: input failed: {cause}")]
    DependencyFailed {
        /// The registered name of the task that did not run.
        task: String,
        /// The failure of the input.
        #[source]
        cause: Arc<Error>,
    },
    /// An actor method failed or the actor stopped.
    #[error("actor `{actor}` failed: {message}")]
    ActorFailed {
        /// The actor's type name.
        actor: String,
        /// What went wrong.
        message: String,
    },
    /// The runtime was shut down before the value was produced.
    #[error("the runtime shut down before the value was produced")]
    Shutdown,
    /// A wait ran past its deadline.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// A value's bytes could not be encoded or decoded.
    #[error("codec error for `{type_name}`: {message}")]
    Codec {
        /// The Rust type involved.
        type_name: &'static str,
        /// What the codec reported.
        message: String,
    },
    /// A value is gone: freed, or held by a node that was lost.
    #[error("value obj#{object} is lost: {reason}")]
    ObjectLost {
        /// The raw id of the lost value.
        object: u64,
        /// Why it is gone.
        reason: String,
    },
    /// A stored value does not have the type the `Ref` names.
    #[error("type mismatch: expected `{expected}`")]
    TypeMismatch {
        /// The type the reader asked for.
        expected: &'static str,
    },
    /// A value's bytes could not be pulled from the node holding them.
    #[error("cannot fetch obj#{object} from {holder}: {message}")]
    Transfer {
        /// The raw id of the value.
        object: u64,
        /// The holder's address.
        holder: String,
        /// What went wrong.
        message: String,
    },
    /// A task was running on nodes that were lost, more often than its retries allow.
    #[error("task `{task}` lost: node `{node}` died while running it, and no retries are left")]
    NodeLost {
        /// The registered name of the task.
        task: String,
        /// The node lost last.
        node: String,
    },
    /// A task asked for a GPU and no place that can run it has one.
    #[error(
        "task `{task}` asks for a GPU, but none can run it: {gpu_nodes} of {nodes} cluster node(s) reported a CUDA device, and this process has none ({local})"
    )]
    NoGpu {
        /// The registered name of the task.
        task: String,
        /// How many nodes the cluster had when the task was placed (0 without a cluster).
        nodes: usize,
        /// How many of them reported a GPU: more than 0 only for a task that cannot run on a
        /// node (one whose arguments do not encode runs where it was spawned).
        gpu_nodes: usize,
        /// Why this process has no GPU either.
        local: String,
    },
    /// A task asked for an XLA device and no place that can run it has one.
    #[error(
        "task `{task}` asks for an XLA device, but none can run it: {xla_nodes} of {nodes} cluster node(s) reported an XLA plugin, and this process has none ({local})"
    )]
    NoXla {
        /// The registered name of the task.
        task: String,
        /// How many nodes the cluster had when the task was placed (0 without a cluster).
        nodes: usize,
        /// How many of them reported an XLA plugin: more than 0 only for a task that cannot
        /// run on a node (one whose arguments do not encode runs where it was spawned).
        xla_nodes: usize,
        /// Why this process has no XLA plugin either.
        local: String,
    },
    /// An array operation was refused.
    #[error("array: {0}")]
    Array(#[from] crate::ArrayError),
    /// The stash failed.
    #[error("stash: {0}")]
    Store(#[source] Arc<crate::StoreError>),
    /// The cluster could not be set up or reached.
    #[error("cluster error: {0}")]
    Cluster(String),
    /// The runtime could not start.
    #[error("runtime failed to start: {0}")]
    Startup(String),
}

impl Error {
    /// The chain of causes, outermost first, as one line of text per cause.
    pub fn chain(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(err) = current {
            out.push(err.to_string());
            current = err.source();
        }
        out
    }

    /// The innermost cause: the failure that started a chain of dependency failures.
    pub fn root_cause(&self) -> &Error {
        let mut current = self;
        while let Error::DependencyFailed { cause, .. } = current {
            current = cause;
        }
        current
    }
}

/// Formats a caught panic payload as text.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

impl From<crate::StoreError> for Error {
    fn from(error: crate::StoreError) -> Self {
        Error::Store(Arc::new(error))
    }
}
