//! A node's task threads: `slots` of them take the tasks the head sends. While a task waits
//! for a value (a task it spawned onto the cluster, say), its thread does not count: if no
//! other thread is free, one more starts, so tasks waiting for their children never hold
//! every slot while the children queue behind them. When a waiting task resumes, the next
//! thread to go for a new task exits instead: at most `slots` threads take new tasks.
//!
//! Invariants:
//! 1. `alive` counts the threads started and not yet exiting; `waiting` those of them in
//!    a wait. A thread starts only while fewer than `slots` are not waiting.
//! 2. A thread exits only after the queue closed, or, holding the queue, before it takes a
//!    task while more than `slots` threads are not waiting.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::cluster_link::ClusterLink;
use super::Puller;
use crate::actors::object::Outcome;
use crate::actors::pool::{set_wait_hook, WaitHook};
use crate::actors::reference::Dependency;
use crate::actors::task::NodeArgs;
use crate::error::panic_message;
use crate::net::wire::{Message, RemoteErrorKind, RemoteTaskError, ReplyValue, TaskReply, TaskRequest};
use crate::{Error, Result, TaskEntry};

/// At most this many task threads at once, waiting ones included.
const MAX_THREADS: usize = 512;

/// How often an idle thread looks whether it is one too many.
const SURPLUS_IDLE: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Counts {
    alive: usize,
    waiting: usize,
}

/// The task threads of a node.
pub(super) struct TaskThreads {
    slots: usize,
    counts: Mutex<Counts>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    started: AtomicUsize,
    warned: std::sync::atomic::AtomicBool,
}

/// What every task thread shares.
#[derive(Clone)]
struct Executor {
    threads: Arc<TaskThreads>,
    tasks: Arc<Mutex<Receiver<TaskRequest>>>,
    replies: mpsc::UnboundedSender<Message>,
    puller: Puller,
    /// The node runtime's link to the cluster (which knows the spawns the head keeps).
    link: Arc<ClusterLink>,
    /// The node's runtime, current on these threads.
    local: crate::Runtime,
}

impl TaskThreads {
    /// Starts `slots` threads running the tasks from `tasks`, replying on `replies`.
    pub(super) fn start(
        slots: usize,
        tasks: Receiver<TaskRequest>,
        replies: mpsc::UnboundedSender<Message>,
        puller: Puller,
        link: Arc<ClusterLink>,
        local: crate::Runtime,
    ) -> Result<Arc<TaskThreads>> {
        let threads = Arc::new(TaskThreads {
            slots: slots.max(1),
            counts: Mutex::default(),
            handles: Mutex::default(),
            started: AtomicUsize::new(0),
            warned: std::sync::atomic::AtomicBool::new(false),
        });
        let executor = Executor {
            threads: threads.clone(),
            tasks: Arc::new(Mutex::new(tasks)),
            replies,
            puller,
            link,
            local,
        };
        for _ in 0..threads.slots {
            threads.counts.lock().alive += 1;
            executor
                .clone()
                .start()
                .map_err(|e| Error::Cluster(format!("cannot start a task thread: {e}")))?;
        }
        Ok(threads)
    }

    /// Whether the calling thread is one too many (more than `slots` threads are not
    /// waiting); if so it is counted out, and must exit.
    fn leave_if_surplus(&self) -> bool {
        let mut counts = self.counts.lock();
        let surplus = counts.alive - counts.waiting > self.slots;
        if surplus {
            counts.alive -= 1;
        }
        surplus
    }

    /// Waits for every thread to exit (the task queue must be closed).
    pub(super) fn join(&self) {
        loop {
            let handles = std::mem::take(&mut *self.handles.lock());
            if handles.is_empty() {
                return;
            }
            for handle in handles {
                let _ = handle.join();
            }
        }
    }
}

/// A task thread's wait hook: gives its slot to another thread while it waits.
struct SlotWhileWaiting(Executor);

impl WaitHook for SlotWhileWaiting {
    fn waiting(&self) {
        let threads = &self.0.threads;
        let start = {
            let mut counts = threads.counts.lock();
            counts.waiting += 1;
            let runnable = counts.alive - counts.waiting;
            let start = runnable < threads.slots && counts.alive < MAX_THREADS;
            if start {
                counts.alive += 1;
            }
            start
        };
        if !start {
            if threads.counts.lock().alive >= MAX_THREADS && !threads.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    limit = MAX_THREADS,
                    "every task thread of this node waits and no more may start; queued tasks wait"
                );
            }
            return;
        }
        if let Err(error) = self.0.clone().start() {
            threads.counts.lock().alive -= 1;
            tracing::warn!(%error, "cannot start a task thread for a waiting one");
        }
    }

    fn resumed(&self) {
        self.0.threads.counts.lock().waiting -= 1;
    }
}

impl Executor {
    /// Starts one more thread (already counted in `alive`).
    fn start(self) -> std::io::Result<()> {
        let threads = self.threads.clone();
        let number = threads.started.fetch_add(1, Ordering::Relaxed);
        let handle =
            std::thread::Builder::new().name(format!("tessera-exec-{number}")).spawn(move || self.run())?;
        threads.handles.lock().push(handle);
        Ok(())
    }

    fn run(self) {
        self.local.enter_on_this_thread();
        set_wait_hook(Rc::new(SlotWhileWaiting(self.clone())));
        loop {
            let next = {
                let tasks = self.tasks.lock();
                // (Looked at with the queue in hand: a task that waited has resumed, so
                // this thread takes no new task if that makes more than `slots` run.)
                if self.threads.leave_if_surplus() {
                    return;
                }
                tasks.recv_timeout(SURPLUS_IDLE)
            };
            let task = match next {
                Ok(task) => task,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let Some(reply) = self.execute(task) else { continue };
            if self.replies.send(Message::TasksDone(vec![reply])).is_err() {
                break;
            }
        }
        self.threads.counts.lock().alive -= 1;
    }

    /// Runs `task`; its reply, or `None` if it comes later (the task returned a `Ref` to a
    /// value not made yet).
    fn execute(&self, task: TaskRequest) -> Option<TaskReply> {
        let task_id = task.task_id;
        let fail =
            |kind, message: String| TaskReply { task_id, result: Err(RemoteTaskError { kind, message }) };
        let mut args = Vec::with_capacity(task.args.len());
        for source in task.args {
            match self.puller.arg(source) {
                Ok(arg) => args.push(arg),
                Err(reason) => return Some(fail(RemoteErrorKind::InputUnavailable, reason)),
            }
        }
        let Some(entry) = TaskEntry::find(&task.name) else {
            return Some(fail(
                RemoteErrorKind::Failed,
                format!("task `{}` is not registered in this node's binary", task.name),
            ));
        };
        let mut args = NodeArgs::new(entry.name, args);
        let reply = catch_unwind(AssertUnwindSafe(|| {
            let output = (entry.run_on_node)(&mut args)?;
            match output.into_forwarded() {
                Ok(source) => {
                    self.reply_when_made(task_id, source);
                    Ok(None)
                }
                Err(output) => self.puller.task_reply_value(task_id, output).map(Some),
            }
        }));
        Some(match reply {
            Ok(Ok(Some(value))) => TaskReply { task_id, result: Ok(value) },
            Ok(Ok(None)) => return None,
            Ok(Err(error)) => fail(RemoteErrorKind::Failed, failure_message(error)),
            Err(payload) => fail(RemoteErrorKind::Panicked, panic_message(&*payload)),
        })
    }

    /// Replies for task `task_id`, which returned `source` (a `Ref` here), once its value is
    /// made, without holding this thread meanwhile: the result of a spawn that the head
    /// keeps goes back as its spawn id (the head forwards its own `Ref` to it); any other
    /// value goes back as a task's result does.
    fn reply_when_made(&self, task_id: u64, source: Dependency) {
        let (link, puller, replies) = (self.link.clone(), self.puller.clone(), self.replies.clone());
        let id = source.0.id;
        self.local.core().table.subscribe(
            id,
            Box::new(move |outcome| {
                let result = match outcome {
                    Outcome::Ready(value) => match link.kept_spawn(id) {
                        Some(spawn_id) => Ok(ReplyValue::Spawned(spawn_id)),
                        None => puller.forwarded_reply(task_id, value, &*link),
                    },
                    Outcome::Failed(error) => Err((*error).clone()),
                };
                let result = result.map_err(|error| RemoteTaskError {
                    kind: RemoteErrorKind::Failed,
                    message: failure_message(error),
                });
                // Sent before `source` drops: the head reads this reply before the
                // `Release` of the spawn that dropping it may send.
                let _ = replies.send(Message::TasksDone(vec![TaskReply { task_id, result }]));
                drop(source);
            }),
        );
    }
}

/// What the head is told of a task's error: a failed task's own message, else the error.
fn failure_message(error: Error) -> String {
    match error {
        Error::TaskFailed { message, .. } => message,
        error => error.to_string(),
    }
}
