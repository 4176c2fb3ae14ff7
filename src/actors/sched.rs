//! Scheduling policies: where a task that became ready runs.
//!
//! A policy is asked once per ready task. It sees the task's name, the worker that made it
//! ready (if a worker did), and the pool's size, and answers with a [`Placement`]. Idle
//! workers steal from busy ones whatever the policy says, so a policy shapes locality and
//! order, never correctness.

/// What a policy knows about a task that is ready to run.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct PlacementRequest<'a> {
    /// The registered name of the task.
    pub task: &'a str,
    /// The worker whose thread made the task ready, if a worker did (its inputs were just
    /// produced there, so they are hot in its cache).
    pub current_worker: Option<usize>,
    /// How many workers the pool has.
    pub workers: usize,
    /// How many times this task has failed and is being retried.
    pub attempt: u32,
}

/// Where a ready task goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// The shared queue: the first idle worker takes it.
    Shared,
    /// The current worker's own queue (falls back to `Shared` off a worker thread).
    Local,
    /// A given worker's queue (taken modulo the pool size).
    Worker(usize),
}

/// Decides where ready tasks run. Implementations must be cheap: they run once per task.
pub trait SchedulingPolicy: Send + Sync + 'static {
    /// A short name for logs and benchmarks.
    fn name(&self) -> &'static str;
    /// Where the task described by `request` should run.
    fn place(&self, request: &PlacementRequest<'_>) -> Placement;
}

/// The default: run a task where its input was produced, else on the shared queue; idle
/// workers steal. Good for chains and nested spawns.
#[derive(Debug, Default, Clone, Copy)]
pub struct Locality;

impl SchedulingPolicy for Locality {
    fn name(&self) -> &'static str {
        "locality"
    }
    fn place(&self, request: &PlacementRequest<'_>) -> Placement {
        match request.current_worker {
            Some(_) if request.attempt == 0 => Placement::Local,
            _ => Placement::Shared,
        }
    }
}

/// The classic central queue: every task goes to one FIFO shared by all workers.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fifo;

impl SchedulingPolicy for Fifo {
    fn name(&self) -> &'static str {
        "fifo"
    }
    fn place(&self, _request: &PlacementRequest<'_>) -> Placement {
        Placement::Shared
    }
}

/// The classic static spread: tasks go to workers in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: std::sync::atomic::AtomicUsize,
}

impl SchedulingPolicy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }
    fn place(&self, request: &PlacementRequest<'_>) -> Placement {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Placement::Worker(n % request.workers.max(1))
    }
}
