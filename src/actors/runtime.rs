//! `Runtime`: the handle users hold; starts and stops the worker pool, the actor system and
//! the metrics publisher, and offers `put`, `get`, `wait` and actors.
//!
//! Shutdown (in this order):
//! 1. Mark the runtime as shutting down: new tasks fail at once with `Error::Shutdown`.
//! 2. Stop the actor system: actor calls in flight finish, queued calls fail.
//! 3. Stop the pool: running tasks finish, workers exit and are joined.
//! 4. Stop the metrics publisher and join it with the workers.
//! 5. Fail every queued job and every value still pending with `Error::Shutdown`.
use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::object::{ObjectTable, Outcome};
use super::pool::{self, Pool};
use super::reference::{store, Payload, ReadyCounter, Ref, RefInner};
use super::sched::{Locality, Placement, PlacementRequest, SchedulingPolicy};
use super::stats::{RuntimeStats, Stats};
use super::task::{run_job, Job};
use super::user_actor::{Actor, ActorHandle, ActorSystem};
use crate::{Error, Result};

thread_local! {
    /// The runtime whose thread this is (workers and actor threads).
    static CURRENT: RefCell<Option<Weak<Core>>> = const { RefCell::new(None) };
}

static NEXT_RUNTIME_ID: AtomicU64 = AtomicU64::new(1);

/// The shared state of one runtime.
pub(crate) struct Core {
    pub(crate) table: Arc<ObjectTable>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) stats: Arc<Stats>,
    policy: Box<dyn SchedulingPolicy>,
    actors: ActorSystem,
    shutting_down: AtomicBool,
    stopped: Mutex<bool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Tells the metrics publisher to stop. Apart from `Core` so that the publisher does
    /// not hold the runtime alive while it sleeps.
    publisher: Arc<(Mutex<bool>, Condvar)>,
    cluster: OnceLock<Arc<dyn RemoteScheduler>>,
    /// The device actors this runtime keeps running until it shuts down (one per device).
    devices: Mutex<Vec<Arc<dyn std::any::Any + Send + Sync>>>,
    id: u64,
}

/// The seam between the runtime and a cluster head: runs ready tasks on node processes.
pub(crate) trait RemoteScheduler: Send + Sync + 'static {
    /// Takes a ready task that can run remotely; gives it back if no node can take it.
    /// A job that needs a GPU or XLA goes only to a node that reported one.
    #[allow(clippy::result_large_err)]
    fn submit(&self, job: Box<Job>) -> std::result::Result<(), Box<Job>>;
    /// How many nodes are in the cluster now, and how many of them reported each device.
    fn node_counts(&self) -> NodeCounts;
    /// Stops the cluster: nodes are told to exit; tasks running remotely fail.
    fn stop(&self);
    /// Has the node holding the value at `location` save it into the stash at
    /// `stash_location` (a node's store actor), and waits for the new version.
    fn save_held(
        &self,
        location: &super::object::RemoteLocation,
        stash_location: &str,
        name: &str,
        type_name: &str,
        tags: &[(&str, &str)],
    ) -> Result<crate::Version>;
}

/// How many nodes a cluster has, and how many of them reported a GPU, resp. an XLA plugin.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NodeCounts {
    pub(crate) nodes: usize,
    pub(crate) gpu: usize,
    pub(crate) xla: usize,
}

impl Core {
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// This runtime's device actor of type `A` that `is_it` picks, or a new one from
    /// `start`, which the runtime then keeps running until it shuts down: tasks that get
    /// it one after another find the same actor (its device, memory and compiled
    /// programs) instead of starting a new one each.
    #[cfg(any(feature = "cuda", feature = "xla"))]
    pub(crate) fn device_actor<A, E>(
        &self,
        is_it: impl Fn(&A) -> bool,
        start: impl FnOnce() -> std::result::Result<Arc<A>, E>,
    ) -> std::result::Result<Arc<A>, E>
    where
        A: Send + Sync + 'static,
    {
        let mut devices = self.devices.lock();
        let running =
            devices.iter().filter_map(|actor| actor.clone().downcast::<A>().ok()).find(|a| is_it(a));
        if let Some(actor) = running {
            return Ok(actor);
        }
        let actor = start()?;
        if !self.is_shutting_down() {
            devices.push(actor.clone());
        }
        Ok(actor)
    }

    pub(crate) fn cluster(&self) -> Option<&Arc<dyn RemoteScheduler>> {
        self.cluster.get()
    }

    pub(crate) fn has_cluster(&self) -> bool {
        self.cluster.get().is_some()
    }

    /// Attaches a cluster head; false if one is attached already.
    pub(crate) fn set_cluster(&self, cluster: Arc<dyn RemoteScheduler>) -> bool {
        self.cluster.set(cluster).is_ok()
    }

    pub(crate) fn new_pending<T: Payload>(&self) -> Ref<T> {
        let id = self.table.create_pending();
        Ref::from_inner(Arc::new(RefInner { id, table: self.table.clone() }))
    }

    /// Sends a ready job to a worker, as the policy says.
    ///
    /// A job that needs a GPU (or XLA) goes to a node that has one; failing that it runs
    /// here if this process has one, else its output fails at once with `Error::NoGpu`
    /// (`Error::NoXla`).
    pub(crate) fn dispatch(&self, job: Box<Job>) {
        let job = match self.cluster.get() {
            Some(cluster) if job.remote_args().is_some() => match cluster.submit(job) {
                Ok(()) => return,
                Err(job) => job,
            },
            _ => job,
        };
        if let Some(error) = self.missing_device(&job) {
            job.fail(error);
            return;
        }
        let placement = self.policy.place(&PlacementRequest {
            task: job.name(),
            current_worker: pool::current_worker(&self.pool),
            workers: self.pool.workers(),
            attempt: job.attempt(),
        });
        self.stats.task_queued();
        match placement {
            Placement::Local => self.pool.push_local(job),
            Placement::Worker(i) => self.pool.push_to(i, job),
            Placement::Shared => self.pool.push_shared(job),
        }
    }

    /// Why `job` cannot run here, if it needs a device (a GPU, XLA) that this process
    /// lacks: no node took it, so none can run it either.
    /// (A device is looked at only for jobs that need it: most need none.)
    fn missing_device(&self, job: &Job) -> Option<Error> {
        let counts = || self.cluster.get().map_or(NodeCounts::default(), |cluster| cluster.node_counts());
        if let Some(local) = job.needs_gpu().then(crate::devices::gpu_absence_reason).flatten() {
            let (task, counts, local) = (job.name().to_string(), counts(), local.to_string());
            return Some(Error::NoGpu { task, nodes: counts.nodes, gpu_nodes: counts.gpu, local });
        }
        let local = job.needs_xla().then(crate::devices::xla_absence_reason).flatten()?.to_string();
        let (task, counts) = (job.name().to_string(), counts());
        Some(Error::NoXla { task, nodes: counts.nodes, xla_nodes: counts.xla, local })
    }

    /// Whether the current thread belongs to this runtime.
    fn on_own_thread(self: &Arc<Self>) -> bool {
        CURRENT.with(|c| c.borrow().as_ref().is_some_and(|w| w.as_ptr() == Arc::as_ptr(self)))
    }

    fn shutdown(self: &Arc<Self>) {
        if self.on_own_thread() {
            // A task or actor cannot join its own thread: finish the shutdown elsewhere.
            self.shutting_down.store(true, Ordering::Release);
            let core = self.clone();
            let _ =
                std::thread::Builder::new().name("tessera-shutdown".into()).spawn(move || core.shutdown());
            return;
        }
        let mut stopped = self.stopped.lock();
        if *stopped {
            return;
        }
        self.shutting_down.store(true, Ordering::Release);
        tracing::debug!(runtime = self.id, "shutting down");
        if let Some(cluster) = self.cluster.get() {
            cluster.stop();
        }
        self.actors.stop();
        self.pool.stop();
        *self.publisher.0.lock() = true;
        self.publisher.1.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock());
        for thread in threads {
            let _ = thread.join();
        }
        for job in self.pool.drain() {
            self.stats.task_dequeued();
            job.fail(Error::Shutdown);
        }
        // Device actors finish the work already queued and stop; work still waiting for
        // inputs fails with the inputs below.
        drop(std::mem::take(&mut *self.devices.lock()));
        self.table.fail_all_pending(Error::Shutdown);
        self.stats.publish();
        *stopped = true;
    }
}

/// Stops the runtime when the last handle made by the builder (or cloned from one) drops.
///
/// It holds the core strongly: `Runtime` drops its `core` field before its guard, so a
/// weak pointer here could find the core already gone (when no other thread happened to
/// hold it) and the runtime's threads would run on, unowned, forever.
struct ShutdownGuard(Arc<Core>);

impl Drop for ShutdownGuard {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// A handle to a running runtime. Cheap to clone; `Send + Sync`.
///
/// # Shutdown
/// [`Runtime::shutdown`] stops it; so does dropping the last handle made by
/// [`Builder::build`] or [`Runtime::local`] (or cloned from one). Handles obtained inside a
/// task with [`Runtime::current`] do not keep the runtime running.
#[derive(Clone)]
pub struct Runtime {
    core: Arc<Core>,
    _guard: Option<Arc<ShutdownGuard>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("id", &self.core.id)
            .field("workers", &self.core.pool.workers())
            .field("policy", &self.core.policy.name())
            .finish()
    }
}

/// Configures and starts a [`Runtime`].
pub struct Builder {
    workers: usize,
    actor_threads: usize,
    policy: Box<dyn SchedulingPolicy>,
    prometheus: Option<SocketAddr>,
    metrics_interval: Duration,
}

impl Default for Builder {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Builder {
            workers: cores,
            actor_threads: cores,
            policy: Box::new(Locality),
            prometheus: None,
            metrics_interval: Duration::from_millis(250),
        }
    }
}

impl Builder {
    /// Number of worker threads that run tasks (default: the number of cores).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Number of threads that host user actors (default: the number of cores).
    pub fn actor_threads(mut self, threads: usize) -> Self {
        self.actor_threads = threads.max(1);
        self
    }

    /// The scheduling policy (default: [`Locality`]).
    pub fn policy(mut self, policy: impl SchedulingPolicy) -> Self {
        self.policy = Box::new(policy);
        self
    }

    /// Serves the runtime's metrics for Prometheus at `addr` (process-wide: one exporter
    /// per process).
    pub fn prometheus(mut self, addr: SocketAddr) -> Self {
        self.prometheus = Some(addr);
        self
    }

    /// How often counters are published to the `metrics` recorder (default 250 ms).
    pub fn metrics_interval(mut self, interval: Duration) -> Self {
        self.metrics_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Starts the runtime.
    ///
    /// # Errors
    /// [`Error::Startup`] if a thread cannot be started or the Prometheus endpoint cannot
    /// be served.
    pub fn build(self) -> Result<Runtime> {
        if let Some(addr) = self.prometheus {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .map_err(|e| Error::Startup(format!("prometheus endpoint on {addr}: {e}")))?;
        }
        let stats = Arc::new(Stats::default());
        let table = Arc::new(ObjectTable::new(stats.clone()));
        let (pool, locals) = Pool::new(self.workers, run_job);
        let id = NEXT_RUNTIME_ID.fetch_add(1, Ordering::Relaxed);
        let core = Arc::new_cyclic(|weak: &Weak<Core>| {
            let weak = weak.clone();
            let actors = ActorSystem::start(self.actor_threads, move || set_current(&weak));
            Core {
                table,
                pool: pool.clone(),
                stats,
                policy: self.policy,
                actors,
                shutting_down: AtomicBool::new(false),
                stopped: Mutex::new(false),
                threads: Mutex::new(Vec::new()),
                publisher: Arc::new((Mutex::new(false), Condvar::new())),
                cluster: OnceLock::new(),
                devices: Mutex::new(Vec::new()),
                id,
            }
        });
        let runtime = Runtime { core: core.clone(), _guard: Some(Arc::new(ShutdownGuard(core.clone()))) };
        if let Some(error) = core.actors.start_error() {
            core.shutdown();
            return Err(error);
        }
        let mut threads = Vec::new();
        for (index, local) in locals.into_iter().enumerate() {
            let weak = Arc::downgrade(&core);
            let pool = pool.clone();
            let spawned =
                std::thread::Builder::new().name(format!("tessera-worker-{index}")).spawn(move || {
                    set_current(&weak);
                    pool.run_worker(index, local);
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    *core.threads.lock() = threads;
                    core.shutdown();
                    return Err(Error::Startup(format!("cannot start worker thread: {e}")));
                }
            }
        }
        let weak = Arc::downgrade(&core);
        let signal = core.publisher.clone();
        let interval = self.metrics_interval;
        let publisher = std::thread::Builder::new()
            .name("tessera-metrics".into())
            .spawn(move || publish_metrics(weak, &signal, interval))
            .map_err(|e| Error::Startup(format!("cannot start metrics thread: {e}")))?;
        threads.push(publisher);
        *core.threads.lock() = threads;
        tracing::debug!(runtime = id, workers = self.workers, "runtime started");
        Ok(runtime)
    }
}

fn set_current(core: &Weak<Core>) {
    CURRENT.with(|c| *c.borrow_mut() = Some(core.clone()));
}

/// Publishes the counters every `interval` until `signal` says stop. Holds the runtime only
/// while it publishes.
fn publish_metrics(core: Weak<Core>, signal: &(Mutex<bool>, Condvar), interval: Duration) {
    let (stop, cond) = signal;
    loop {
        let mut stopped = stop.lock();
        if !*stopped {
            cond.wait_for(&mut stopped, interval);
        }
        if *stopped {
            return;
        }
        drop(stopped);
        let Some(core) = core.upgrade() else { return };
        core.stats.publish();
    }
}

impl Runtime {
    /// Starts a runtime in this process with the default settings.
    ///
    /// # Errors
    /// As [`Builder::build`].
    pub fn local() -> Result<Runtime> {
        Builder::default().build()
    }

    /// A builder to configure a runtime.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The runtime running the current task or actor, if any. In a task or actor that runs
    /// in a node process, it is that node's own runtime: registered tasks spawned on it run
    /// on the cluster (the head schedules them over all nodes, and their results stay where
    /// they were made until read), closures run on the node's threads, values put there
    /// stay there, and device actors got from it own the node's devices.
    pub fn current() -> Option<Runtime> {
        CURRENT
            .with(|c| c.borrow().as_ref().and_then(Weak::upgrade))
            .map(|core| Runtime { core, _guard: None })
    }

    /// Makes this runtime the one [`Runtime::current`] gives on this thread (a node's task
    /// and actor threads, which its pool did not start).
    pub(crate) fn enter_on_this_thread(&self) {
        set_current(&Arc::downgrade(&self.core));
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Stores a value and returns a `Ref` to it.
    pub fn put<T: Payload>(&self, value: T) -> Ref<T> {
        let (value, bytes) = store(value);
        let id = self.core.table.create_ready(value, bytes);
        Ref::from_inner(Arc::new(RefInner { id, table: self.core.table.clone() }))
    }

    /// Waits for a value; see [`Ref::get`].
    ///
    /// # Errors
    /// As [`Ref::get`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn get<T: Payload>(&self, r: &Ref<T>) -> Result<T> {
        r.get().await
    }

    /// Blocks until a value is there; see [`Ref::blocking_get`].
    ///
    /// # Errors
    /// As [`Ref::get`].
    pub fn blocking_get<T: Payload>(&self, r: &Ref<T>) -> Result<T> {
        r.blocking_get()
    }

    /// Waits until at least `num_ready` of `refs` are done (ready or failed) or `timeout`
    /// passes, then returns `(done, pending)`, each in the order given. Like `ray.wait`.
    ///
    /// # Errors
    /// None: a timeout is not an error, it shows as a short `done` list.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn wait<T: Payload>(
        &self,
        refs: &[Ref<T>],
        num_ready: usize,
        timeout: Option<Duration>,
    ) -> (Vec<Ref<T>>, Vec<Ref<T>>) {
        let target = num_ready.min(refs.len());
        let counter = watch_all(refs);
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let notified = counter.notify.notified();
            if counter.count.load(Ordering::Acquire) >= target {
                break;
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        break;
                    }
                }
                None => notified.await,
            }
        }
        partition(refs)
    }

    /// Blocking version of [`Runtime::wait`].
    pub fn blocking_wait<T: Payload>(
        &self,
        refs: &[Ref<T>],
        num_ready: usize,
        timeout: Option<Duration>,
    ) -> (Vec<Ref<T>>, Vec<Ref<T>>) {
        wait_blocking(refs, num_ready, timeout)
    }

    /// Starts a user actor holding `state`; its methods run one call at a time.
    pub fn actor<A: Actor>(&self, state: A) -> ActorHandle<A> {
        self.core.actors.start_actor(state, self.core.table.clone(), self.core.is_shutting_down())
    }

    /// A snapshot of the runtime's counters.
    pub fn stats(&self) -> RuntimeStats {
        self.core.stats.snapshot()
    }

    /// The number of worker threads.
    pub fn workers(&self) -> usize {
        self.core.pool.workers()
    }

    /// The scheduling policy's name.
    pub fn policy_name(&self) -> &'static str {
        self.core.policy.name()
    }

    /// Whether the runtime is shutting down or stopped.
    pub fn is_shut_down(&self) -> bool {
        self.core.is_shutting_down()
    }

    /// Stops the runtime; see the type's docs. Blocks until every thread it started has
    /// exited (from inside a task or actor it returns at once and finishes in the
    /// background). Calling it again does nothing.
    pub fn shutdown(&self) {
        self.core.shutdown();
    }
}

/// [`Runtime::blocking_wait`], for callers that hold `Ref`s but no runtime handle.
pub(crate) fn wait_blocking<T: Payload>(
    refs: &[Ref<T>],
    num_ready: usize,
    timeout: Option<Duration>,
) -> (Vec<Ref<T>>, Vec<Ref<T>>) {
    let target = num_ready.min(refs.len());
    let counter = watch_all(refs);
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut guard = counter.lock.lock();
    // (A node's task thread gives its slot to another while it waits.)
    let _waiting = (counter.count.load(Ordering::Acquire) < target).then(super::pool::waiting);
    while counter.count.load(Ordering::Acquire) < target {
        match deadline {
            Some(deadline) => {
                if counter.cond.wait_until(&mut guard, deadline).timed_out() {
                    break;
                }
            }
            None => counter.cond.wait(&mut guard),
        }
    }
    drop(guard);
    partition(refs)
}

fn watch_all<T: Payload>(refs: &[Ref<T>]) -> Arc<ReadyCounter> {
    let counter = Arc::new(ReadyCounter::new());
    for r in refs {
        let counter = counter.clone();
        r.inner.table.subscribe(r.inner.id, Box::new(move |_: Outcome| counter.bump()));
    }
    counter
}

fn partition<T: Payload>(refs: &[Ref<T>]) -> (Vec<Ref<T>>, Vec<Ref<T>>) {
    refs.iter().cloned().partition(|r| r.is_ready())
}
