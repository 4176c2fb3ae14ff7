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

use super::Puller;
use crate::actors::pool::{set_wait_hook, WaitHook};
use crate::actors::task::NodeArgs;
use crate::error::panic_message;
use crate::net::wire::{Message, RemoteErrorKind, RemoteTaskError, TaskReply, TaskRequest};
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
        local: crate::Runtime,
    ) -> Result<Arc<TaskThreads>> {
        let threads = Arc::new(TaskThreads {
            slots: slots.max(1),
            counts: Mutex::default(),
            handles: Mutex::default(),
            started: AtomicUsize::new(0),
            warned: std::sync::atomic::AtomicBool::new(false),
        });
        let executor =
            Executor { threads: threads.clone(), tasks: Arc::new(Mutex::new(tasks)), replies, puller, local };
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
            let reply = self.execute(task);
            if self.replies.send(Message::TasksDone(vec![reply])).is_err() {
                break;
            }
        }
        self.threads.counts.lock().alive -= 1;
    }

    fn execute(&self, task: TaskRequest) -> TaskReply {
        let task_id = task.task_id;
        let fail =
            |kind, message: String| TaskReply { task_id, result: Err(RemoteTaskError { kind, message }) };
        let mut args = Vec::with_capacity(task.args.len());
        for source in task.args {
            match self.puller.arg(source) {
                Ok(arg) => args.push(arg),
                Err(reason) => return fail(RemoteErrorKind::InputUnavailable, reason),
            }
        }
        let Some(entry) = TaskEntry::find(&task.name) else {
            return fail(
                RemoteErrorKind::Failed,
                format!("task `{}` is not registered in this node's binary", task.name),
            );
        };
        let Some(run) = entry.run_on_node else {
            return fail(RemoteErrorKind::Failed, format!("task `{}` cannot run on a node", task.name));
        };
        let mut args = NodeArgs::new(entry.name, args);
        let reply = catch_unwind(AssertUnwindSafe(|| {
            run(&mut args).and_then(|output| self.puller.task_reply_value(task_id, output))
        }));
        match reply {
            Ok(Ok(value)) => TaskReply { task_id, result: Ok(value) },
            Ok(Err(Error::TaskFailed { message, .. })) => fail(RemoteErrorKind::Failed, message),
            Ok(Err(error)) => fail(RemoteErrorKind::Failed, error.to_string()),
            Err(payload) => fail(RemoteErrorKind::Panicked, panic_message(&*payload)),
        }
    }
}
