//! Named tasks: the `task!` macro, task options and registration, spawning with `Ref`
//! inputs as graph edges, and running a task on a worker (panics caught, retries).
//!
//! Invariants:
//! 1. A task runs only when every input is ready; if an input fails, the task does not run
//!    and its output fails with `Error::DependencyFailed` carrying the input's error.
//! 2. A job holds its inputs' `Ref`s until it has run, so inputs stay alive for it.
//! 3. A task's output is completed exactly once: with its value, with the value of the
//!    `Ref` it returned (forwarding), or with its final error after its retries.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::object::{ForwardedValue, ObjectId, ObjectTable, Outcome, Value, View};
use super::reference::{store, Dependency, Payload, Ref, RemoteArg};
use super::runtime::{Core, Runtime};
use crate::error::panic_message;
use crate::{Error, Result};

/// Per-task options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskOptions {
    /// How many times a task that returned an error or panicked is run again before its
    /// error is final. Default 0.
    pub retries: u32,
    /// Whether the task needs a GPU: it runs only on a node that reported a CUDA device
    /// (or in this process, if it has one); with none anywhere its output fails at once
    /// with [`Error::NoGpu`]. A task whose arguments do not encode runs where it was
    /// spawned, so for it only this process's GPUs count. Default false.
    pub gpu: bool,
    /// Whether the task needs an XLA device: it runs only on a node that reported a
    /// loadable PJRT plugin (or in this process, if it has one), where it gets the device
    /// from `XlaActor::get` on `Runtime::current()` (feature `xla`); with none anywhere its
    /// output fails at once with [`Error::NoXla`]. As for [`gpu`](Self::gpu), a task whose
    /// arguments do not encode runs where it was spawned. Default false.
    pub xla: bool,
}

impl TaskOptions {
    /// Default options: no retries.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the number of retries.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Asks for a GPU: sets [`gpu`](Self::gpu).
    pub fn on_gpu(mut self) -> Self {
        self.gpu = true;
        self
    }

    /// Asks for an XLA device: sets [`xla`](Self::xla).
    pub fn on_xla(mut self) -> Self {
        self.xla = true;
        self
    }
}

/// A task registered by the `task!` macro: its stable name, and how to run it from a node
/// process's arguments (as a node process of the same binary does).
pub struct TaskEntry {
    /// The stable name: `module::path::function`.
    pub name: &'static str,
    /// Runs the task on a node process's arguments (each encoded, or a value the node
    /// holds).
    #[doc(hidden)]
    pub run_on_node: NodeRunner,
}

/// Runs a task on a node process's arguments, returning its output (used by the `task!`
/// macro).
#[doc(hidden)]
pub type NodeRunner = fn(&mut NodeArgs) -> Result<TaskOutput>;

/// One argument of a task run by a node process.
pub(crate) enum NodeArg {
    /// Its encoding: sent with the task, or pulled from its holder.
    Encoded(Vec<u8>),
    /// A value this node holds as it is (a device array an earlier task here made), so the
    /// task gets it without a decoding: the same device buffer.
    Held(Value),
}

/// The arguments of a task run by a node process, taken in order by the task's runner.
#[doc(hidden)]
pub struct NodeArgs {
    task: &'static str,
    args: std::vec::IntoIter<NodeArg>,
}

impl NodeArgs {
    pub(crate) fn new(task: &'static str, args: Vec<NodeArg>) -> Self {
        NodeArgs { task, args: args.into_iter() }
    }

    /// Arguments given as their bincode encodings, one per argument, as a node receives
    /// them with a task.
    pub fn encoded(task: &'static str, args: Vec<Vec<u8>>) -> Self {
        NodeArgs::new(task, args.into_iter().map(NodeArg::Encoded).collect())
    }

    /// The next argument, as a `T`: a held value of that type as it is (a clone of the
    /// handle), else decoded.
    ///
    /// # Errors
    /// [`Error::Codec`] if there is no next argument or it does not decode as a `T`.
    pub fn take<T: Payload>(&mut self) -> Result<T> {
        let codec = |message: String| Error::Codec { type_name: self.task, message };
        let decode = |bytes: &[u8]| {
            crate::codec::decode_slice::<T>(bytes).map(|(value, _)| value).map_err(|e| codec(e.to_string()))
        };
        match self.args.next() {
            None => Err(codec("fewer arguments than the task takes".into())),
            Some(NodeArg::Encoded(bytes)) => decode(&bytes),
            Some(NodeArg::Held(value)) => {
                if let View::Typed(typed) = value.view() {
                    if let Some(held) = typed.downcast_ref::<T>() {
                        return Ok(held.clone());
                    }
                }
                decode(&value.encode()?)
            }
        }
    }
}

inventory::collect!(TaskEntry);

impl TaskEntry {
    /// Every task registered in this binary.
    pub fn all() -> impl Iterator<Item = &'static TaskEntry> {
        inventory::iter::<TaskEntry>.into_iter()
    }

    /// The task registered under `name`, if any.
    pub fn find(name: &str) -> Option<&'static TaskEntry> {
        Self::all().find(|entry| entry.name == name)
    }
}

/// What a task body produced.
#[doc(hidden)]
pub struct TaskOutput(Produced);

enum Produced {
    /// A value, with its encoded size.
    Value(Value, usize),
    /// A `Ref` whose value becomes the task's value.
    Forward(Dependency),
}

impl TaskOutput {
    /// Wraps a plain return value.
    pub fn value<T: Payload>(value: T) -> Result<TaskOutput> {
        let (value, bytes) = store(value);
        Ok(TaskOutput(Produced::Value(value, bytes)))
    }

    /// Wraps a `Result` return value; the error becomes the task's error.
    pub fn fallible<T: Payload, E: std::fmt::Display>(
        task: &'static str,
        result: std::result::Result<T, E>,
    ) -> Result<TaskOutput> {
        match result {
            Ok(value) => Self::value(value),
            Err(error) => Err(Error::TaskFailed { task: task.to_string(), message: error.to_string() }),
        }
    }

    /// Wraps a returned `Ref`: the task's output forwards to it.
    pub fn forward<T: Payload>(r: Ref<T>) -> Result<TaskOutput> {
        Ok(TaskOutput(Produced::Forward(Dependency(r.inner))))
    }

    /// The `Ref` the task returned, or the output itself if it made a value.
    pub(crate) fn into_forwarded(self) -> std::result::Result<Dependency, TaskOutput> {
        match self.0 {
            Produced::Forward(source) => Ok(source),
            produced => Err(TaskOutput(produced)),
        }
    }

    /// The value and its size as the object table counts it; `None` for a forwarded `Ref`.
    pub(crate) fn into_value(self) -> Option<(Value, usize)> {
        match self.0 {
            Produced::Value(value, bytes) => Some((value, bytes)),
            Produced::Forward(_) => None,
        }
    }

    /// Encodes the value for another process.
    pub fn encode(self) -> Result<Vec<u8>> {
        match self.0 {
            Produced::Value(value, _) => value.encode(),
            Produced::Forward(_) => Err(Error::Codec {
                type_name: "Ref",
                message: "the task returned a Ref: its value is not made yet".into(),
            }),
        }
    }
}

type Body = Box<dyn FnMut(bool) -> Result<TaskOutput> + Send>;

/// A task ready to run, or waiting in a queue.
pub(crate) struct Job {
    core: Arc<Core>,
    name: &'static str,
    output: ObjectId,
    body: Body,
    attempt: u32,
    retries: u32,
    /// How many times a node running this task was lost.
    node_losses: u32,
    /// Whether the task must run where a GPU is.
    needs_gpu: bool,
    /// Whether the task must run where an XLA plugin is.
    needs_xla: bool,
    /// The arguments in the form a node process receives, if the task can run remotely.
    remote: Option<Vec<RemoteArg>>,
    inputs: Vec<Dependency>,
}

impl Job {
    /// A new job (counted as submitted) that has not run yet.
    fn submitted(
        core: &Arc<Core>,
        name: &'static str,
        output: ObjectId,
        body: Body,
        options: TaskOptions,
        remote: Option<Vec<RemoteArg>>,
        inputs: Vec<Dependency>,
    ) -> Box<Job> {
        core.stats.task_submitted();
        Box::new(Job {
            core: core.clone(),
            name,
            output,
            body,
            attempt: 0,
            retries: options.retries,
            node_losses: 0,
            needs_gpu: options.gpu,
            needs_xla: options.xla,
            remote,
            inputs,
        })
    }

    pub(crate) fn name(&self) -> &'static str {
        self.name
    }
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }
    pub(crate) fn output(&self) -> ObjectId {
        self.output
    }
    pub(crate) fn remote_args(&self) -> Option<&[RemoteArg]> {
        self.remote.as_deref()
    }
    pub(crate) fn needs_gpu(&self) -> bool {
        self.needs_gpu
    }
    pub(crate) fn needs_xla(&self) -> bool {
        self.needs_xla
    }
    pub(crate) fn retries(&self) -> u32 {
        self.retries
    }
    /// Counts a retry after a task error; false when no retries are left.
    pub(crate) fn retry_after_error(&mut self) -> bool {
        if self.attempt >= self.retries {
            return false;
        }
        self.attempt += 1;
        true
    }
    /// Counts a lost node; false when the limit is reached.
    pub(crate) fn retry_after_node_loss(&mut self, limit: u32) -> bool {
        self.node_losses += 1;
        self.node_losses <= limit
    }

    /// Completes the output with `outcome` and counts the task as finished.
    pub(crate) fn complete(&self, outcome: Outcome, bytes: usize) {
        self.core.stats.task_finished();
        self.core.table.complete(self.output, outcome, bytes);
    }

    /// Completes the output with `outcome`, as [`complete`](Self::complete) does, after
    /// releasing what the job holds (its closure and its arguments' `Ref`s): so once a
    /// reader has the value, dropping its last `Ref` to an input frees that input then,
    /// not whenever this job would have dropped. (A job kept as lineage uses `complete`.)
    /// Returns false if every `Ref` to the output dropped before (nobody took the value).
    #[allow(clippy::boxed_local)] // jobs are always boxed; unboxing would copy them
    pub(crate) fn finish(self: Box<Self>, outcome: Outcome, bytes: usize) -> bool {
        let Job { core, output, body, remote, inputs, .. } = *self;
        drop((body, remote, inputs));
        core.stats.task_finished();
        core.table.complete(output, outcome, bytes)
    }

    /// Completes the output with `source`'s value once it is ready (the task returned a
    /// `Ref` to it), after releasing what the job holds, as [`finish`](Self::finish) does.
    #[allow(clippy::boxed_local)] // jobs are always boxed; unboxing would copy them
    pub(crate) fn forward(self: Box<Self>, source: Dependency) {
        let Job { core, output, body, remote, inputs, .. } = *self;
        drop((body, remote, inputs));
        core.stats.task_finished();
        forward_into(&core.table, output, source);
    }

    /// Fails the job's output without running it.
    #[allow(clippy::boxed_local)] // jobs are always boxed; unboxing would copy them
    pub(crate) fn fail(self: Box<Self>, error: Error) {
        self.core.stats.task_failed();
        self.core.table.complete(self.output, Outcome::Failed(Arc::new(error)), 0);
    }
}

/// Waits for a job's inputs.
struct Gate {
    remaining: AtomicUsize,
    job: Mutex<Option<Box<Job>>>,
}

/// Whether tasks spawned on `rt` should carry their arguments in encoded form, so that
/// node processes can run them (used by the `task!` macro).
#[doc(hidden)]
pub fn wants_remote(rt: &Runtime) -> bool {
    rt.core().has_cluster()
}

/// Spawns a task (used by the `task!` macro).
#[doc(hidden)]
pub fn spawn_task<T: Payload>(
    rt: &Runtime,
    name: &'static str,
    options: TaskOptions,
    inputs: Vec<Dependency>,
    remote: Option<Vec<RemoteArg>>,
    body: impl FnMut(bool) -> Result<TaskOutput> + Send + 'static,
) -> Ref<T> {
    let core = rt.core();
    let output = core.new_pending::<T>();
    if core.is_shutting_down() {
        core.table.complete(output.inner.id, Outcome::Failed(Arc::new(Error::Shutdown)), 0);
        return output;
    }
    let job = Job::submitted(core, name, output.inner.id, Box::new(body), options, remote, inputs);
    submit_when_ready(job);
    output
}

/// The job for a task that a task on a node spawned onto the cluster: `entry` run on
/// `args` (in the form nodes receive them), completing `output`. `inputs` are the `Ref`s
/// among the arguments, which it waits for.
pub(crate) fn spawned_by_node(
    core: &Arc<Core>,
    entry: &'static TaskEntry,
    output: ObjectId,
    options: TaskOptions,
    args: Vec<RemoteArg>,
    inputs: Vec<Dependency>,
) -> Box<Job> {
    let run = entry.run_on_node;
    let table = core.table.clone();
    let own_args = args.clone();
    // Runs here only when no node can take it: the arguments are read from this process.
    let body = move |_last: bool| {
        let args = own_args.iter().map(|arg| arg_here(&table, arg)).collect::<Result<Vec<_>>>()?;
        run(&mut NodeArgs::new(entry.name, args))
    };
    Job::submitted(core, entry.name, output, Box::new(body), options, Some(args), inputs)
}

/// An argument in node form, read in this process: its bytes, or a value of this
/// process's object table as it is, or pulled from the process that holds it.
fn arg_here(table: &super::object::ObjectTable, arg: &RemoteArg) -> Result<NodeArg> {
    use super::object::RemoteLocation;
    use super::reference::RemoteArgKind;
    let pull = |location: &RemoteLocation| {
        let remote = table.remote().ok_or(Error::ObjectLost {
            object: location.id,
            reason: "held by another process, but no cluster is attached".into(),
        })?;
        Ok(NodeArg::Encoded(remote.fetch_blocking(location)?.into_bytes()))
    };
    match &arg.0 {
        RemoteArgKind::Value(bytes) => Ok(NodeArg::Encoded(bytes.clone())),
        RemoteArgKind::Ref(id) => match table.outcome(*id) {
            Some(Outcome::Ready(value)) => match value.view() {
                View::Remote(location) => pull(location),
                _ => Ok(NodeArg::Held(value)),
            },
            Some(Outcome::Failed(error)) => Err((*error).clone()),
            None => Err(Error::ObjectLost { object: id.as_u64(), reason: "the value was freed".into() }),
        },
        RemoteArgKind::Held { addr, id, len } => pull(&RemoteLocation {
            node: 0,
            node_name: format!("the node at {addr}"),
            addr: *addr,
            id: *id,
            len: *len,
        }),
    }
}

/// Completes `output` with `source`'s outcome once it is done. A value held by another node
/// keeps its source entry alive (that entry owns the holder's copy), and is followed if the
/// holder is lost (see `ObjectTable::forwarded_from`).
pub(crate) fn forward_into(table: &Arc<ObjectTable>, output: ObjectId, source: Dependency) {
    let into = table.clone();
    table.subscribe(
        source.0.id,
        Box::new(move |outcome| {
            // The forwarded value is shared, so its bytes are counted once.
            let outcome = match outcome {
                Outcome::Ready(value) if matches!(value.view(), View::Remote(_)) => {
                    Outcome::Ready(Arc::new(ForwardedValue { value, source }))
                }
                other => other,
            };
            into.complete(output, outcome, 0);
        }),
    );
}

/// Dispatches `job` once all its inputs are ready (now, if they are); fails it if one
/// fails. Also used to re-run a task whose node was lost: its inputs may be being rebuilt.
pub(crate) fn submit_when_ready(job: Box<Job>) {
    let waiting_on: Vec<ObjectId> = job.inputs.iter().map(|d| d.0.id).collect();
    let core = job.core.clone();
    if waiting_on.is_empty() {
        core.dispatch(job);
        return;
    }
    let gate = Arc::new(Gate { remaining: AtomicUsize::new(waiting_on.len()), job: Mutex::new(Some(job)) });
    for id in waiting_on {
        let gate = gate.clone();
        core.table.subscribe(
            id,
            Box::new(move |outcome| match outcome {
                Outcome::Ready(_) => {
                    if gate.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                        let job = gate.job.lock().take();
                        if let Some(job) = job {
                            let core = job.core.clone();
                            core.dispatch(job);
                        }
                    }
                }
                Outcome::Failed(cause) => {
                    let job = gate.job.lock().take();
                    if let Some(job) = job {
                        let error =
                            Error::DependencyFailed { task: job.name.to_string(), cause: cause.clone() };
                        job.fail(error);
                    }
                }
            }),
        );
    }
}

/// Runs one job on the current worker thread (the pool's runner).
pub(crate) fn run_job(mut job: Box<Job>) {
    let core = job.core.clone();
    core.stats.task_dequeued();
    if core.is_shutting_down() {
        job.fail(Error::Shutdown);
        return;
    }
    core.stats.task_started();
    let last = job.attempt >= job.retries;
    let result = catch_unwind(AssertUnwindSafe(|| (job.body)(last)));
    core.stats.task_stopped();
    let result = result.unwrap_or_else(|payload| {
        Err(Error::TaskPanicked { task: job.name.to_string(), message: panic_message(&*payload) })
    });
    match result {
        Ok(TaskOutput(Produced::Value(value, bytes))) => {
            job.finish(Outcome::Ready(value), bytes);
        }
        Ok(TaskOutput(Produced::Forward(source))) => job.forward(source),
        Err(error) if !last && is_retryable(&error) => {
            tracing::debug!(task = job.name, attempt = job.attempt, %error, "task failed; retrying");
            job.attempt += 1;
            core.dispatch(job);
        }
        Err(error) => {
            tracing::debug!(task = job.name, %error, "task failed");
            job.fail(error);
        }
    }
}

fn is_retryable(error: &Error) -> bool {
    matches!(error, Error::TaskFailed { .. } | Error::TaskPanicked { .. })
}

/// Defines a task: a plain Rust function registered under a stable name, plus a module of
/// the same name whose `spawn` runs it on a runtime.
///
/// Arguments are [`Payload`](crate::Payload) values; at the call site each may be given as
/// a value or as a `Ref` to one (a graph edge: the task waits for it). The return type may
/// be a value `T`, `Result<T, E>` with `E: Display` (the error becomes the task's error),
/// or `Ref<T>` (the task's output becomes that `Ref`'s value: nested graphs).
///
/// # Examples
/// ```
/// tessera::task! {
///     /// Adds two numbers.
///     pub fn add(a: u64, b: u64) -> u64 { a + b }
/// }
///
/// fn main() -> Result<(), tessera::Error> {
///     let rt = tessera::Runtime::local()?;
///     let x = add::spawn(&rt, 1, 2);
///     let y = add::spawn(&rt, &x, 10); // waits for x
///     assert_eq!(y.blocking_get()?, 13);
///     rt.shutdown();
///     Ok(())
/// }
/// ```
///
/// Invoke it at module level (not inside a function body): the generated module refers
/// to the function through `super`.
#[macro_export]
macro_rules! task {
    ($(#[$meta:meta])* $vis:vis fn $name:ident ($($arg:ident : $ty:ty),* $(,)?) -> Result<$ok:ty, $err:ty> $body:block) => {
        $(#[$meta])* $vis fn $name($($arg: $ty),*) -> Result<$ok, $err> $body
        $crate::__task_module!($vis $name ($($arg : $ty),*) -> $ok,
            |name, result| $crate::__TaskOutput::fallible::<$ok, $err>(name, result), encoded);
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident ($($arg:ident : $ty:ty),* $(,)?) -> Ref<$ok:ty> $body:block) => {
        $(#[$meta])* $vis fn $name($($arg: $ty),*) -> $crate::Ref<$ok> $body
        $crate::__task_module!($vis $name ($($arg : $ty),*) -> $ok,
            |_name, result| $crate::__TaskOutput::forward::<$ok>(result), encoded);
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident ($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])* $vis fn $name($($arg: $ty),*) -> $ret $body
        $crate::__task_module!($vis $name ($($arg : $ty),*) -> $ret,
            |_name, result| $crate::__TaskOutput::value::<$ret>(result), encoded);
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident ($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])* $vis fn $name($($arg: $ty),*) $body
        $crate::__task_module!($vis $name ($($arg : $ty),*) -> (),
            |_name, result| $crate::__TaskOutput::value::<()>(result), encoded);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __task_module {
    ($vis:vis $name:ident ($($arg:ident : $ty:ty),*) -> $out:ty, |$n:ident, $r:ident| $convert:expr, $mode:ident) => {
        #[doc = concat!("Spawning of the task [`", stringify!($name), "`](fn@", stringify!($name), ").")]
        #[allow(unused_imports, clippy::too_many_arguments)]
        $vis mod $name {
            use super::*;

            /// The task's stable name.
            pub const NAME: &str = module_path!();

            /// Spawns the task with default options; arguments are values or `Ref`s.
            #[allow(clippy::too_many_arguments)]
            pub fn spawn(rt: &$crate::Runtime $(, $arg: impl Into<$crate::Arg<$ty>>)*) -> $crate::Ref<$out> {
                spawn_with(rt, $crate::TaskOptions::default() $(, $arg)*)
            }

            /// Spawns the task with the given options.
            #[allow(clippy::too_many_arguments, unused_mut)]
            pub fn spawn_with(rt: &$crate::Runtime, options: $crate::TaskOptions $(, $arg: impl Into<$crate::Arg<$ty>>)*) -> $crate::Ref<$out> {
                $(let mut $arg: $crate::Arg<$ty> = $arg.into();)*
                #[allow(unused_mut)]
                let mut inputs: Vec<$crate::__Dependency> = Vec::new();
                $(inputs.extend($arg.dependency());)*
                let remote = $crate::__task_module!(@remote $mode rt $($arg)*);
                $crate::__spawn_task::<$out>(rt, NAME, options, inputs, remote, move |last| {
                    $(let $arg = $arg.resolve(last)?;)*
                    let $n = NAME;
                    let $r = super::$name($($arg),*);
                    $convert
                })
            }

            $crate::__task_module!(@register $mode $name ($($arg : $ty),*), |$n, $r| $convert);
        }
    };
    (@remote encoded $rt:ident $($arg:ident)*) => {
        if $crate::__wants_remote($rt) {
            let args: Option<Vec<$crate::__RemoteArg>> = [$($arg.remote_arg($rt)),*].into_iter().collect();
            args
        } else {
            None
        }
    };
    (@register encoded $name:ident ($($arg:ident : $ty:ty),*), |$n:ident, $r:ident| $convert:expr) => {
        fn run_on_node(args: &mut $crate::__private::NodeArgs) -> $crate::Result<$crate::__TaskOutput> {
            $(let $arg: $ty = args.take()?;)*
            let $n = NAME;
            let $r = super::$name($($arg),*);
            $convert
        }
        $crate::__private::inventory::submit! {
            $crate::TaskEntry { name: NAME, run_on_node }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded<T: serde::Serialize>(value: &T) -> NodeArg {
        NodeArg::Encoded(bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap())
    }

    /// A node task's arguments: each decoded on its own, or a held value handed over as it
    /// is when it has the parameter's type (else through its encoding); too few arguments
    /// or bytes that do not decode are errors.
    #[test]
    fn node_args_decode_each_argument_or_hand_over_held_values() {
        let held: Value = Arc::new(vec![1.5f32, 2.5]);
        let args =
            vec![encoded(&7u64), NodeArg::Held(held.clone()), NodeArg::Held(held), NodeArg::Encoded(vec![])];
        let mut args = NodeArgs::new("test::task", args);
        assert_eq!(args.take::<u64>().unwrap(), 7);
        assert_eq!(args.take::<Vec<f32>>().unwrap(), vec![1.5, 2.5]);
        // Another type with the same encoding.
        assert_eq!(args.take::<std::collections::VecDeque<f32>>().unwrap(), [1.5, 2.5]);
        assert!(matches!(args.take::<u64>(), Err(Error::Codec { type_name: "test::task", .. })));
        let missing = args.take::<u64>().unwrap_err();
        assert!(missing.to_string().contains("fewer arguments"), "{missing}");
    }

    /// An argument whose length prefix claims 2^63 - 1 bytes (from a corrupt or hostile
    /// peer) is a decoding error, not an allocation that aborts the node.
    #[test]
    fn an_argument_claiming_a_huge_length_is_an_error() {
        let poison = vec![0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        let mut args =
            NodeArgs::new("test::task", vec![NodeArg::Encoded(poison.clone()), NodeArg::Encoded(poison)]);
        assert!(matches!(args.take::<String>(), Err(Error::Codec { type_name: "test::task", .. })));
        assert!(matches!(args.take::<Vec<u8>>(), Err(Error::Codec { .. })));
    }
}
