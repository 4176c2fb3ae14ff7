//! The worker pool: threads that run ready tasks, with per-worker deques and work stealing.
//!
//! Invariants:
//! 1. A job is in exactly one queue (a worker's deque, a worker's inbox, or the shared
//!    injector) until a worker takes it; it is run or failed exactly once.
//! 2. No lost wake-ups: a worker publishes `sleeping` and re-checks every queue before it
//!    parks; a producer pushes, then wakes a worker whose `sleeping` it clears.
//! 3. Parks are bounded (a few ms), so a missed wake-up could only delay, never hang.
//!
//! Shutdown:
//! 1. `stop` sets the stop flag and wakes every worker.
//! 2. Workers finish the task they run, then exit; their deques are drained by `drain`.
//! 3. The runtime fails every drained job with `Error::Shutdown`.
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_deque::{Injector, Steal, Stealer, Worker};

use super::task::Job;

/// What a worker thread knows about itself.
struct WorkerContext {
    pool: Arc<Pool>,
    index: usize,
    local: Worker<Box<Job>>,
    /// How deep this thread is in nested "help while waiting" calls.
    help_depth: usize,
}

thread_local! {
    static CONTEXT: RefCell<Option<WorkerContext>> = const { RefCell::new(None) };
    /// Told when a thread that is not a pool worker starts and stops waiting for a value
    /// (a node's task thread: another takes its slot meanwhile).
    static WAIT_HOOK: RefCell<Option<Rc<dyn WaitHook>>> = const { RefCell::new(None) };
}

/// One worker's shared state.
struct Slot {
    inbox: Injector<Box<Job>>,
    stealer: Stealer<Box<Job>>,
    sleeping: AtomicBool,
    thread: parking_lot::Mutex<Option<std::thread::Thread>>,
}

/// The shared part of the pool.
pub(crate) struct Pool {
    injector: Injector<Box<Job>>,
    slots: Vec<Slot>,
    stopping: AtomicBool,
    runner: fn(Box<Job>),
}

/// How deep nested helping may go before a waiting worker just sleeps.
const MAX_HELP_DEPTH: usize = 64;

impl Pool {
    /// Makes a pool of `workers` queues; `runner` runs one job. Threads start in `start`.
    pub(crate) fn new(workers: usize, runner: fn(Box<Job>)) -> (Arc<Pool>, Vec<Worker<Box<Job>>>) {
        let locals: Vec<Worker<Box<Job>>> = (0..workers).map(|_| Worker::new_lifo()).collect();
        let slots = locals
            .iter()
            .map(|w| Slot {
                inbox: Injector::new(),
                stealer: w.stealer(),
                sleeping: AtomicBool::new(false),
                thread: parking_lot::Mutex::new(None),
            })
            .collect();
        let pool =
            Arc::new(Pool { injector: Injector::new(), slots, stopping: AtomicBool::new(false), runner });
        (pool, locals)
    }

    pub(crate) fn workers(&self) -> usize {
        self.slots.len()
    }

    /// Starts worker `index` on the current thread and runs until the pool stops.
    /// `on_start` runs first on the new thread.
    pub(crate) fn run_worker(self: &Arc<Self>, index: usize, local: Worker<Box<Job>>) {
        *self.slots[index].thread.lock() = Some(std::thread::current());
        CONTEXT.with(|c| {
            *c.borrow_mut() = Some(WorkerContext { pool: self.clone(), index, local, help_depth: 0 })
        });
        let mut idle_rounds = 0u32;
        loop {
            if let Some(job) = self.find_job(index) {
                idle_rounds = 0;
                (self.runner)(job);
                continue;
            }
            if self.stopping.load(Ordering::Acquire) {
                break;
            }
            idle_rounds += 1;
            if idle_rounds < 64 {
                if idle_rounds < 16 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            self.sleep(index);
            idle_rounds = 0;
        }
        CONTEXT.with(|c| c.borrow_mut().take());
    }

    fn sleep(&self, index: usize) {
        let slot = &self.slots[index];
        slot.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.has_work() || self.stopping.load(Ordering::SeqCst) {
            slot.sleeping.store(false, Ordering::SeqCst);
            return;
        }
        std::thread::park_timeout(Duration::from_millis(5));
        slot.sleeping.store(false, Ordering::SeqCst);
    }

    fn has_work(&self) -> bool {
        !self.injector.is_empty() || self.slots.iter().any(|s| !s.inbox.is_empty() || !s.stealer.is_empty())
    }

    /// Takes a job for worker `index`: its deque, its inbox, the injector, then others.
    fn find_job(&self, index: usize) -> Option<Box<Job>> {
        let local = CONTEXT.with(|c| {
            c.borrow().as_ref().and_then(|ctx| if ctx.index == index { ctx.local.pop() } else { None })
        });
        if local.is_some() {
            return local;
        }
        loop {
            let mut retry = false;
            match self.slots[index].inbox.steal() {
                Steal::Success(job) => return Some(job),
                Steal::Retry => retry = true,
                Steal::Empty => {}
            }
            match self.injector.steal() {
                Steal::Success(job) => return Some(job),
                Steal::Retry => retry = true,
                Steal::Empty => {}
            }
            let n = self.slots.len();
            for k in 1..n {
                let other = &self.slots[(index + k) % n];
                match other.stealer.steal() {
                    Steal::Success(job) => return Some(job),
                    Steal::Retry => retry = true,
                    Steal::Empty => {}
                }
                match other.inbox.steal() {
                    Steal::Success(job) => return Some(job),
                    Steal::Retry => retry = true,
                    Steal::Empty => {}
                }
            }
            if !retry {
                return None;
            }
        }
    }

    /// Queues a job where any worker may take it.
    pub(crate) fn push_shared(&self, job: Box<Job>) {
        self.injector.push(job);
        self.wake_one(None);
    }

    /// Queues a job for worker `index` (others may still steal it when idle).
    pub(crate) fn push_to(&self, index: usize, job: Box<Job>) {
        let index = index % self.slots.len();
        self.slots[index].inbox.push(job);
        self.wake_one(Some(index));
    }

    /// Queues a job on the current worker's own deque; falls back to the shared queue.
    pub(crate) fn push_local(self: &Arc<Self>, job: Box<Job>) {
        let rejected = CONTEXT.with(|c| match c.borrow().as_ref() {
            Some(ctx) if Arc::ptr_eq(&ctx.pool, self) => {
                ctx.local.push(job);
                None
            }
            _ => Some(job),
        });
        match rejected {
            None => self.wake_one(None),
            Some(job) => self.push_shared(job),
        }
    }

    fn wake_one(&self, preferred: Option<usize>) {
        fence(Ordering::SeqCst);
        if let Some(i) = preferred {
            if self.wake(i) {
                return;
            }
        }
        for i in 0..self.slots.len() {
            if self.wake(i) {
                return;
            }
        }
    }

    fn wake(&self, index: usize) -> bool {
        let slot = &self.slots[index];
        if slot.sleeping.load(Ordering::SeqCst)
            && slot.sleeping.compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst).is_ok()
        {
            if let Some(thread) = slot.thread.lock().as_ref() {
                thread.unpark();
            }
            return true;
        }
        false
    }

    /// Asks every worker to exit once it has no job in hand.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for slot in &self.slots {
            slot.sleeping.store(false, Ordering::SeqCst);
            if let Some(thread) = slot.thread.lock().as_ref() {
                thread.unpark();
            }
        }
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Takes every job still queued (after the workers exited).
    #[allow(clippy::vec_box)] // jobs travel boxed through the queues; no reason to unbox
    pub(crate) fn drain(&self) -> Vec<Box<Job>> {
        let mut jobs = Vec::new();
        let mut take = |steal: &dyn Fn() -> Steal<Box<Job>>| loop {
            match steal() {
                Steal::Success(job) => jobs.push(job),
                Steal::Retry => continue,
                Steal::Empty => break,
            }
        };
        take(&|| self.injector.steal());
        for slot in &self.slots {
            take(&|| slot.inbox.steal());
            take(&|| slot.stealer.steal());
        }
        jobs
    }
}

/// The index of the current thread in `pool`, if it is one of its workers.
pub(crate) fn current_worker(pool: &Arc<Pool>) -> Option<usize> {
    CONTEXT.with(|c| c.borrow().as_ref().filter(|ctx| Arc::ptr_eq(&ctx.pool, pool)).map(|ctx| ctx.index))
}

/// Whether the current thread is a worker of some pool.
pub(crate) fn is_worker_thread() -> bool {
    CONTEXT.with(|c| c.borrow().is_some())
}

/// What a thread that is not a pool worker does when it starts and stops waiting for a
/// value: a node's task thread gives its slot to another thread while it waits.
pub(crate) trait WaitHook {
    fn waiting(&self);
    fn resumed(&self);
}

/// Makes `hook` the current thread's wait hook.
pub(crate) fn set_wait_hook(hook: Rc<dyn WaitHook>) {
    WAIT_HOOK.with(|h| *h.borrow_mut() = Some(hook));
}

/// A wait on the current thread: its hook (if any) hears `waiting` now, `resumed` on drop.
pub(crate) struct Waiting(Option<Rc<dyn WaitHook>>);

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(hook) = &self.0 {
            hook.resumed();
        }
    }
}

/// Starts a wait on the current thread (see [`Waiting`]).
pub(crate) fn waiting() -> Waiting {
    let hook = WAIT_HOOK.with(|h| h.borrow().clone());
    if let Some(hook) = &hook {
        hook.waiting();
    }
    Waiting(hook)
}

/// Runs one queued job on the current worker thread, if there is one; used by workers
/// that wait for a value so that a waiting task never starves the pool.
pub(crate) fn help_one() -> bool {
    let helper = CONTEXT.with(|c| {
        c.borrow().as_ref().and_then(|ctx| {
            let allowed = ctx.help_depth < MAX_HELP_DEPTH && !ctx.pool.is_stopping();
            allowed.then(|| (ctx.pool.clone(), ctx.index))
        })
    });
    let Some((pool, index)) = helper else {
        return false;
    };
    let Some(job) = pool.find_job(index) else {
        return false;
    };
    let adjust_depth = |delta: isize| {
        CONTEXT.with(|c| {
            if let Some(ctx) = c.borrow_mut().as_mut() {
                ctx.help_depth = ctx.help_depth.saturating_add_signed(delta);
            }
        })
    };
    adjust_depth(1);
    (pool.runner)(job);
    adjust_depth(-1);
    true
}
