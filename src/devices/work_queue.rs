//! A device's work queue (features `cuda`, `xla`): the thread that owns a device's state
//! and runs the work sent to it, one item at a time in arrival order, each item queued once
//! the `Ref`s it reads are ready. CUDA's and XLA's device actors are built on it.
//!
//! Invariants:
//! 1. An item is queued only when every input it names is ready; if one fails, the item
//!    never runs and each of its outputs fails with `Error::DependencyFailed`.
//! 2. An item's value (or error, or panic) completes its outputs; an item that returns
//!    another number of values than it has outputs fails them all.
//! 3. Items waiting for inputs hold the queue weakly, so dropping the last handle never
//!    waits for inputs; an item whose queue is gone fails with `Error::Shutdown`.
//! 4. Dropping the queue closes it; its thread finishes the items already queued, drops the
//!    state and exits, and the drop joins it (unless the drop happens on that thread).
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::actors::object::{ObjectId, ObjectTable, Outcome, Value};
use crate::actors::reference::{Payload, RefInner};
use crate::error::panic_message;
use crate::{Error, Ref};

type Job<S> = Box<dyn FnOnce(&S) + Send>;

/// An input a job waits for: the table that holds it (a `Ref` of another runtime is waited
/// for in that runtime's table) and its id there.
pub(crate) type Input = (Arc<ObjectTable>, ObjectId);

/// The input that `r` names.
pub(crate) fn input_of<T>(r: &Ref<T>) -> Input {
    (r.inner.table.clone(), r.inner.id)
}

/// One device thread and its queue; `S` is the device state the thread owns.
pub(crate) struct WorkQueue<S: 'static> {
    /// The task name in errors (`device#0`, `xla:cpu`).
    name: String,
    table: Arc<ObjectTable>,
    sender: Mutex<Option<Sender<Job<S>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<S: 'static> Drop for WorkQueue<S> {
    fn drop(&mut self) {
        drop(self.sender.lock().take());
        if let Some(thread) = self.thread.lock().take() {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl<S: 'static> WorkQueue<S> {
    /// Starts the thread `thread_name`, which first makes its state with `open`, and
    /// returns once `open` has returned: its error is this call's. `fail` words a thread
    /// that cannot start (or exits inside `open`) as the device's error.
    pub(crate) fn start<E: Send + 'static>(
        table: Arc<ObjectTable>,
        name: String,
        thread_name: String,
        open: impl FnOnce() -> Result<S, E> + Send + 'static,
        fail: impl Fn(String) -> E,
    ) -> Result<Arc<WorkQueue<S>>, E> {
        let (sender, receiver) = channel::<Job<S>>();
        let (ready_tx, ready_rx) = channel::<Result<(), E>>();
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let state = match open() {
                    Ok(state) => state,
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while let Ok(job) = receiver.recv() {
                    job(&state);
                }
            })
            .map_err(|e| fail(format!("cannot start the device thread: {e}")))?;
        let opened = ready_rx.recv().unwrap_or_else(|_| Err(fail("the device thread exited".into())));
        if let Err(error) = opened {
            let _ = thread.join();
            return Err(error);
        }
        Ok(Arc::new(WorkQueue {
            name,
            table,
            sender: Mutex::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// The object table the outputs live in.
    #[cfg(feature = "cuda")]
    pub(crate) fn table(&self) -> &Arc<ObjectTable> {
        &self.table
    }

    /// Queues `job` once every input is ready (each in its own runtime's table); the values it makes (or its
    /// error, or panic) complete the returned `Ref`s, one per value in order, whose sizes
    /// in bytes `size` gives.
    pub(crate) fn submit<R, J>(
        self: &Arc<Self>,
        inputs: Vec<Input>,
        outputs: usize,
        size: fn(&R) -> usize,
        job: J,
    ) -> Vec<Ref<R>>
    where
        R: Payload,
        J: FnOnce(&S, &str) -> Result<Vec<R>, Error> + Send + 'static,
    {
        let table = self.table.clone();
        let refs: Vec<Ref<R>> = (0..outputs)
            .map(|_| Ref::from_inner(Arc::new(RefInner { id: table.create_pending(), table: table.clone() })))
            .collect();
        let out_ids: Vec<ObjectId> = refs.iter().map(Ref::id).collect();
        let job_table = table.clone();
        let job_task = self.name.clone();
        let job_outs = out_ids.clone();
        let work: Job<S> = Box::new(move |state| {
            let error = match catch_unwind(AssertUnwindSafe(|| job(state, &job_task))) {
                Ok(Ok(values)) if values.len() == job_outs.len() => {
                    for (id, value) in job_outs.iter().zip(values) {
                        let bytes = size(&value);
                        let value: Value = Arc::new(value);
                        job_table.complete(*id, Outcome::Ready(value), bytes);
                    }
                    return;
                }
                Ok(Ok(values)) => Error::TaskFailed {
                    task: job_task.clone(),
                    message: format!("made {} values for {} outputs", values.len(), job_outs.len()),
                },
                Ok(Err(error)) => error,
                Err(payload) => {
                    Error::TaskPanicked { task: job_task.clone(), message: panic_message(&*payload) }
                }
            };
            fail_all(&job_table, &job_outs, Arc::new(error));
        });
        when_ready(&table, out_ids, self.name.clone(), inputs, work, Arc::downgrade(self));
        refs
    }
}

fn fail_all(table: &ObjectTable, outputs: &[ObjectId], error: Arc<Error>) {
    for id in outputs {
        table.complete(*id, Outcome::Failed(error.clone()), 0);
    }
}

/// Queues `job` once every input is ready (invariants 1 and 3); `table` holds the outputs.
fn when_ready<S: 'static>(
    table: &Arc<ObjectTable>,
    outputs: Vec<ObjectId>,
    task: String,
    inputs: Vec<Input>,
    job: Job<S>,
    queue: Weak<WorkQueue<S>>,
) {
    let send = move |table: &ObjectTable, outputs: &[ObjectId], job: Job<S>, queue: Weak<WorkQueue<S>>| {
        let sender = queue.upgrade().and_then(|queue| queue.sender.lock().clone());
        if sender.is_none_or(|sender| sender.send(job).is_err()) {
            fail_all(table, outputs, Arc::new(Error::Shutdown));
        }
    };
    if inputs.is_empty() {
        send(table, &outputs, job, queue);
        return;
    }
    struct Gate<S: 'static> {
        remaining: AtomicUsize,
        job: Mutex<Option<Job<S>>>,
        queue: Weak<WorkQueue<S>>,
        outputs: Vec<ObjectId>,
    }
    let gate = Arc::new(Gate {
        remaining: AtomicUsize::new(inputs.len()),
        job: Mutex::new(Some(job)),
        queue,
        outputs,
    });
    for (input_table, id) in inputs {
        let gate = gate.clone();
        let waiter_table = table.clone();
        let task = task.clone();
        input_table.subscribe(
            id,
            Box::new(move |outcome| match outcome {
                Outcome::Ready(_) => {
                    if gate.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                        let queued = gate.job.lock().take();
                        if let Some(job) = queued {
                            send(&waiter_table, &gate.outputs, job, gate.queue.clone());
                        }
                    }
                }
                Outcome::Failed(cause) => {
                    if gate.job.lock().take().is_some() {
                        let error = Error::DependencyFailed { task, cause: cause.clone() };
                        fail_all(&waiter_table, &gate.outputs, Arc::new(error));
                    }
                }
            }),
        );
    }
}
