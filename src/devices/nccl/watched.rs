//! One NCCL communicator under a watchdog (feature `cuda`), so that a rank that dies or
//! stalls mid-collective makes the others fail within the group's timeout instead of
//! waiting forever, on the host or on the GPU.
//!
//! The communicator is made in NCCL's non-blocking mode (NCCL 2.14 and later): every call
//! returns at once, `ncclInProgress` while NCCL still works on the host, and only
//! `ncclCommAbort` may stop one. Every call on the communicator is made under one lock,
//! which a watchdog thread shares.
//!
//! # How a collective is watched
//! Every collective is queued on the communicator's own stream of the GPU (see
//! [`NcclGroup`](super::NcclGroup) for how it is ordered with the GPU's main stream).
//!
//! 1. Under the lock, the caller records an event `ready` on that stream, queues the NCCL
//!    call after it, and adds the collective to the in-flight list.
//! 2. The caller polls `ncclCommGetAsyncError` (under the lock, a call at a time) until NCCL
//!    is done with its host part; then it records an event `done` after the collective.
//! 3. Every [`POLL`], the watchdog, under the lock, drops the collectives whose `done`
//!    completed and aborts the communicator when
//!    - a collective's host part is older than the timeout;
//!    - a collective has run on the GPU (its `ready` completed) for longer than the timeout;
//!    - or NCCL reports an asynchronous error (a rank's process or network failed).
//! 4. The abort makes NCCL's kernels return, so a host thread waiting for the GPU wakes
//!    (with whatever the buffers then hold: callers check [`WatchedComm::failure`] after
//!    such a wait). The handle is gone after an abort; every later call returns the reason.
//!
//! The timeout of a collective on the GPU counts from when the GPU reached it, not from
//! when it was queued, so a host running far ahead of the GPU is not mistaken for a hang.
use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_uint};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::sys;

use super::nccl_error_words as words;
use crate::devices::collective::CollectiveError;
use crate::devices::cuda::Gpu;

/// How often the watchdog looks at the collectives in flight, and the longest a caller
/// sleeps between two looks at NCCL's progress.
const POLL: Duration = Duration::from_millis(20);

/// The oldest NCCL with non-blocking communicators and `ncclCommGetAsyncError` on them.
const NCCL_NON_BLOCKING: c_int = 21400;

/// NCCL's result codes that are not failures.
const NCCL_SUCCESS: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;

/// `ncclConfig_t` as NCCL 2.14 defined it (`ncclConfig_v21400`): later NCCLs read the
/// fields a caller set from `version`, so this layout works with every NCCL since 2.14.
#[repr(C)]
struct ConfigV21400 {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
    /// The C struct's tail padding; later layouts put a field here, so it holds
    /// `NCCL_CONFIG_UNDEF_INT` (use NCCL's default) rather than garbage.
    tail: c_int,
}

impl ConfigV21400 {
    fn non_blocking() -> Self {
        ConfigV21400 {
            size: std::mem::size_of::<Self>(),
            magic: 0xcafe_beef,
            version: NCCL_NON_BLOCKING as c_uint,
            blocking: 0,
            tail: c_int::MIN,
        }
    }
}

/// NCCL's communicator handle, valid until it is aborted.
struct Handle(sys::ncclComm_t);

// SAFETY: NCCL allows a communicator to be used from any thread as long as calls on it do
// not overlap; every call on a `Handle` is made under `Shared::state`'s lock.
unsafe impl Send for Handle {}

/// A collective queued on the communicator's stream.
struct InFlight {
    op: &'static str,
    queued: Instant,
    /// Recorded just before the collective: complete once the GPU reached it.
    ready: CudaEvent,
    /// Recorded just after it, once NCCL finished its host part.
    done: Option<CudaEvent>,
    /// When the watchdog first saw `ready` complete.
    running_since: Option<Instant>,
}

/// Why the communicator was aborted: the collective that failed, and NCCL's or the
/// watchdog's reason.
struct Failure {
    op: &'static str,
    reason: String,
}

impl Failure {
    fn error(&self) -> CollectiveError {
        CollectiveError::Aborted { op: self.op, reason: self.reason.clone() }
    }
}

struct State {
    /// `None` once aborted.
    comm: Option<Handle>,
    failure: Option<Failure>,
    in_flight: VecDeque<InFlight>,
    /// Events of finished collectives, recorded again by later ones.
    spare: Vec<CudaEvent>,
    /// Set by `Drop` to stop the watchdog.
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the watchdog early when the communicator closes.
    closed: Condvar,
    gpu: Arc<Gpu>,
    /// The stream of `gpu` that every collective is queued on.
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    timeout: Duration,
}

/// An NCCL communicator whose collectives fail within `timeout` when the group cannot
/// complete them (see the module's doc).
pub(super) struct WatchedComm {
    shared: Arc<Shared>,
    watchdog: Option<JoinHandle<()>>,
}

/// The raw code of an NCCL result (cudarc gives it as a Rust enum).
fn code(result: sys::ncclResult_t) -> c_int {
    result as c_int
}

impl Shared {
    /// The state, even if a thread panicked while holding it (the state stays consistent:
    /// every change to it is a single assignment or push).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn who(&self) -> String {
        format!("rank {} of {} on GPU {}", self.rank, self.size, self.gpu.ordinal())
    }
}

impl State {
    /// Aborts the communicator (if not already) and keeps `failure` as the reason (unless
    /// an earlier one is kept); returns the kept reason's error.
    fn abort(&mut self, failure: Failure) -> CollectiveError {
        if let Some(Handle(comm)) = self.comm.take() {
            // SAFETY: `comm` is a live communicator (it is taken out of the state, so it is
            // never used again), and no other call on it is running: every call is made
            // under the lock this thread holds. An abort's own error cannot be acted on.
            let _ = unsafe { sys::ncclCommAbort(comm) };
        }
        self.failure.get_or_insert(failure).error()
    }

    /// The live handle, or the error of the abort that ended it.
    fn handle(&self, op: &'static str) -> Result<sys::ncclComm_t, CollectiveError> {
        match (&self.comm, &self.failure) {
            (Some(Handle(comm)), None) => Ok(*comm),
            (_, Some(failure)) => Err(failure.error()),
            (None, None) => Err(CollectiveError::Aborted { op, reason: "the communicator is closed".into() }),
        }
    }

    /// NCCL's asynchronous state of the communicator: in progress, done, or failed.
    fn async_state(&self, comm: sys::ncclComm_t) -> c_int {
        let mut state: c_int = NCCL_IN_PROGRESS;
        // SAFETY: `comm` is live (see `handle`); NCCL writes one result code, which is read
        // as a plain integer (an unknown code in cudarc's enum would be undefined behaviour).
        let called = unsafe { sys::ncclCommGetAsyncError(comm, (&mut state as *mut c_int).cast()) };
        match code(called) {
            NCCL_SUCCESS => state,
            failed => failed,
        }
    }

    /// An event recorded now on `stream`, a stream of `gpu`.
    fn event(&mut self, gpu: &Gpu, stream: &Arc<CudaStream>) -> Result<CudaEvent, String> {
        let recorded = match self.spare.pop() {
            Some(event) => event.record(stream).map(|()| event),
            None => stream.record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING)),
        };
        recorded.map_err(|e| gpu.driver(e).to_string())
    }
}

impl WatchedComm {
    /// Sets up this rank's communicator of a `size`-rank group with NCCL's unique id `id`,
    /// waiting at most `timeout` for every rank to join, and starts its watchdog.
    ///
    /// # Errors
    /// [`CollectiveError::Backend`] if NCCL is older than 2.14 or fails;
    /// [`CollectiveError::Aborted`] if the group was not set up within `timeout` (a rank
    /// that received the id failed, died or never joined NCCL).
    pub(super) fn join(
        gpu: Arc<Gpu>,
        stream: Arc<CudaStream>,
        rank: usize,
        size: usize,
        id: [c_char; 128],
        timeout: Duration,
    ) -> Result<WatchedComm, CollectiveError> {
        let backend = |message: String| CollectiveError::Backend { op: "join", message };
        let mut version: c_int = 0;
        // SAFETY: NCCL writes the version into the int.
        let called = unsafe { sys::ncclGetVersion(&mut version) };
        if code(called) != NCCL_SUCCESS {
            return Err(backend(format!("ncclGetVersion failed: {}", words(code(called)))));
        }
        if version < NCCL_NON_BLOCKING {
            return Err(backend(format!(
                "NCCL {version} is older than 2.14 (21400), the first with the non-blocking communicators \
                 Tessera needs to time out collectives; install a newer NCCL"
            )));
        }
        let too_big = |what| backend(format!("a group with {what} does not fit NCCL's int"));
        let ranks = c_int::try_from(size).map_err(|_| too_big("so many ranks"))?;
        let me = c_int::try_from(rank).map_err(|_| too_big("such a rank"))?;
        // NCCL puts the communicator on the calling thread's current device.
        gpu.bind_to_thread().map_err(|e| backend(e.to_string()))?;
        let mut config = ConfigV21400::non_blocking();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` receives the handle; `config` is a valid ncclConfig_v21400 (NCCL
        // reads it during the call only); the id is rank 0's bytes.
        let called = unsafe {
            sys::ncclCommInitRankConfig(
                &mut comm,
                ranks,
                sys::ncclUniqueId { internal: id },
                me,
                (&mut config as *mut ConfigV21400).cast(),
            )
        };
        let called = code(called);
        if called != NCCL_SUCCESS && called != NCCL_IN_PROGRESS {
            if !comm.is_null() {
                // SAFETY: NCCL made a handle before failing; it is aborted once, here.
                let _ = unsafe { sys::ncclCommAbort(comm) };
            }
            return Err(backend(format!("ncclCommInitRankConfig failed: {}", words(called))));
        }
        if comm.is_null() {
            return Err(backend("ncclCommInitRankConfig gave no communicator".into()));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                comm: Some(Handle(comm)),
                failure: None,
                in_flight: VecDeque::new(),
                spare: Vec::new(),
                closing: false,
            }),
            closed: Condvar::new(),
            gpu,
            stream,
            rank,
            size,
            timeout,
        });
        // NCCL's setup runs in the background: wait for it, at most `timeout`.
        let started = Instant::now();
        loop {
            let mut state = shared.lock();
            let comm = state.handle("join")?;
            match state.async_state(comm) {
                NCCL_SUCCESS => break,
                NCCL_IN_PROGRESS if started.elapsed() < timeout => {}
                NCCL_IN_PROGRESS => {
                    let reason = format!(
                        "NCCL did not set up the communicator within {timeout:?} ({}): a rank that received \
                         the id did not join NCCL (it failed or died)",
                        shared.who()
                    );
                    return Err(state.abort(Failure { op: "join", reason }));
                }
                failed => {
                    let reason = format!("NCCL's setup failed ({}): {}", shared.who(), words(failed));
                    return Err(state.abort(Failure { op: "join", reason }));
                }
            }
            drop(state);
            std::thread::sleep(Duration::from_millis(1));
        }
        let watched = shared.clone();
        let watchdog = std::thread::Builder::new()
            .name(format!("tessera-nccl-watchdog-{rank}"))
            .spawn(move || watch(&watched))
            .map_err(|e| backend(format!("could not start the NCCL watchdog thread: {e}")));
        let watchdog = match watchdog {
            Ok(watchdog) => watchdog,
            Err(error) => {
                let reason = "the NCCL watchdog thread could not start".into();
                let _ = shared.lock().abort(Failure { op: "join", reason });
                return Err(error);
            }
        };
        Ok(WatchedComm { shared, watchdog: Some(watchdog) })
    }

    /// Why the communicator was aborted, if it was: check it after waiting for the GPU,
    /// whose buffers then hold whatever the aborted collectives left.
    pub(super) fn failure(&self) -> Option<CollectiveError> {
        self.shared.lock().failure.as_ref().map(Failure::error)
    }

    /// Sums `data` over the group, in place, on the communicator's stream.
    pub(super) fn all_reduce_in_place(&mut self, data: &mut CudaSlice<f32>) -> Result<(), CollectiveError> {
        let stream = self.shared.stream.clone();
        let count = data.len();
        let (pointer, _written) = data.device_ptr_mut(&stream);
        self.collective("all_reduce", |comm, stream| {
            let pointer = pointer as *mut std::ffi::c_void;
            // SAFETY: `pointer` holds `count` f32 on this communicator's device, alive and
            // not otherwise used until the stream passes the collective (`_written` makes
            // later work on other streams wait for it).
            unsafe {
                sys::ncclAllReduce(
                    pointer,
                    pointer,
                    count,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            }
        })
    }

    /// Gives every rank `root`'s `data`, in place, on the communicator's stream.
    pub(super) fn broadcast_in_place(
        &mut self,
        data: &mut CudaSlice<f32>,
        root: usize,
    ) -> Result<(), CollectiveError> {
        let root = c_int::try_from(root).map_err(|_| CollectiveError::InvalidArgument {
            op: "broadcast",
            message: format!("root {root}"),
        })?;
        let stream = self.shared.stream.clone();
        let count = data.len();
        let (pointer, _written) = data.device_ptr_mut(&stream);
        self.collective("broadcast", |comm, stream| {
            let pointer = pointer as *mut std::ffi::c_void;
            // SAFETY: as in `all_reduce_in_place`.
            unsafe {
                sys::ncclBroadcast(
                    pointer,
                    pointer,
                    count,
                    sys::ncclDataType_t::ncclFloat32,
                    root,
                    comm,
                    stream,
                )
            }
        })
    }

    /// Gathers every rank's `send` into `receive` (rank order), on the communicator's stream.
    /// `receive` must hold `send.len()` × the group's size elements.
    pub(super) fn all_gather(
        &mut self,
        send: &CudaSlice<f32>,
        receive: &mut CudaSlice<f32>,
    ) -> Result<(), CollectiveError> {
        if receive.len() != send.len() * self.shared.size {
            return Err(CollectiveError::InvalidArgument {
                op: "all_gather",
                message: format!(
                    "{} elements to receive {} × {}",
                    receive.len(),
                    self.shared.size,
                    send.len()
                ),
            });
        }
        let stream = self.shared.stream.clone();
        let count = send.len();
        let (from, _read) = send.device_ptr(&stream);
        let (into, _written) = receive.device_ptr_mut(&stream);
        self.collective("all_gather", |comm, stream| {
            // SAFETY: `from` holds `count` f32 and `into` `count` × ranks (checked above), on
            // this communicator's device; alive until the stream passes the collective.
            unsafe {
                sys::ncclAllGather(
                    from as *const std::ffi::c_void,
                    into as *mut std::ffi::c_void,
                    count,
                    sys::ncclDataType_t::ncclFloat32,
                    comm,
                    stream,
                )
            }
        })
    }

    /// Queues one collective (`call`, given the handle and the stream) and waits for NCCL's
    /// host part; the watchdog takes it from there.
    fn collective(
        &mut self,
        op: &'static str,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
    ) -> Result<(), CollectiveError> {
        let shared = &*self.shared;
        let gpu = &*shared.gpu;
        let device = |message: String| CollectiveError::Backend { op, message };
        {
            let mut state = shared.lock();
            let comm = state.handle(op)?;
            let ready = state.event(gpu, &shared.stream).map_err(device)?;
            let stream = shared.stream.cu_stream() as sys::cudaStream_t;
            let called = code(call(comm, stream));
            if called != NCCL_SUCCESS && called != NCCL_IN_PROGRESS {
                // A failed call leaves the group out of step: no rank can go on with it.
                let reason = format!("NCCL's {op} failed ({}): {}", shared.who(), words(called));
                return Err(state.abort(Failure { op, reason }));
            }
            state.in_flight.push_back(InFlight {
                op,
                queued: Instant::now(),
                ready,
                done: None,
                running_since: None,
            });
        }
        let mut pause = Duration::from_micros(20);
        loop {
            let mut state = shared.lock();
            let comm = state.handle(op)?;
            match state.async_state(comm) {
                NCCL_SUCCESS => {
                    let done = state.event(gpu, &shared.stream).map_err(device)?;
                    if let Some(last) = state.in_flight.back_mut() {
                        last.done = Some(done);
                    }
                    return Ok(());
                }
                NCCL_IN_PROGRESS => {}
                failed => {
                    let reason = format!("NCCL's {op} failed ({}): {}", shared.who(), words(failed));
                    return Err(state.abort(Failure { op, reason }));
                }
            }
            drop(state);
            std::thread::sleep(pause);
            pause = (pause * 2).min(POLL);
        }
    }

    /// Waits until every queued collective finished on the GPU, or the communicator was
    /// aborted (the watchdog aborts it within the timeout; this waits twice that at most).
    fn drain(&self) {
        let give_up = Instant::now() + self.shared.timeout * 2;
        self.shared.gpu.make_current();
        loop {
            {
                let mut state = self.shared.lock();
                if state.comm.is_none() {
                    return;
                }
                // A GPU that cannot say (it failed) has nothing left to wait for.
                let failed = retire_finished(&mut state, &self.shared.gpu).is_err();
                if failed || state.in_flight.is_empty() || Instant::now() > give_up {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for WatchedComm {
    /// Lets the queued collectives finish (other ranks may be waiting in them; a group
    /// that cannot finish them is aborted by the watchdog within its timeout), then stops
    /// the watchdog and frees the communicator.
    fn drop(&mut self) {
        self.drain();
        {
            let mut state = self.shared.lock();
            state.closing = true;
            self.shared.closed.notify_all();
            if let Some(Handle(comm)) = state.comm.take() {
                // SAFETY: live, and never used again (taken out of the state). Nothing is in
                // flight, so the abort only frees it; it never waits for other ranks, as
                // `ncclCommDestroy` could.
                let _ = unsafe { sys::ncclCommAbort(comm) };
            }
        }
        if let Some(watchdog) = self.watchdog.take() {
            let _ = watchdog.join();
        }
    }
}

/// Drops the collectives at the front of the in-flight list that finished on the GPU.
///
/// # Errors
/// The driver's error when it cannot say whether a collective finished (the GPU failed).
fn retire_finished(state: &mut State, gpu: &Gpu) -> Result<(), String> {
    while let Some(first) = state.in_flight.front() {
        let finished = match &first.done {
            Some(done) => done.try_is_complete().map_err(|e| gpu.driver(e).to_string())?,
            None => false,
        };
        if !finished {
            return Ok(());
        }
        if let Some(InFlight { ready, done, .. }) = state.in_flight.pop_front() {
            state.spare.push(ready);
            state.spare.extend(done);
        }
    }
    Ok(())
}

/// The watchdog: every [`POLL`] until the communicator closes or is aborted, aborts it when
/// a collective ran past the timeout or NCCL reports an asynchronous error.
fn watch(shared: &Shared) {
    // Event queries need the GPU's context current on this thread.
    let bound = shared.gpu.bind_to_thread();
    let mut state = shared.lock();
    if let Err(error) = bound {
        let reason = format!("the NCCL watchdog could not use the GPU ({}): {error}", shared.who());
        let _ = state.abort(Failure { op: "join", reason });
        return;
    }
    loop {
        if state.closing {
            return;
        }
        let Some(Handle(comm)) = state.comm else { return };
        let failure = match retire_finished(&mut state, &shared.gpu) {
            Ok(()) => overdue(shared, &mut state, comm),
            Err(error) => {
                let op = state.in_flight.front().map_or("collective", |c| c.op);
                Some(Failure {
                    op,
                    reason: format!("the GPU failed during NCCL's {op} ({}): {error}", shared.who()),
                })
            }
        };
        if let Some(failure) = failure {
            let _ = state.abort(failure);
            return;
        }
        state = match shared.closed.wait_timeout(state, POLL) {
            Ok((state, _)) => state,
            Err(poisoned) => poisoned.into_inner().0,
        };
    }
}

/// Why the communicator must be aborted now, if it must.
fn overdue(shared: &Shared, state: &mut State, comm: sys::ncclComm_t) -> Option<Failure> {
    let timeout = shared.timeout;
    let async_state = state.async_state(comm);
    if async_state != NCCL_SUCCESS && async_state != NCCL_IN_PROGRESS {
        let op = state.in_flight.front().map_or("collective", |c| c.op);
        let reason = format!(
            "NCCL reported {} ({}): another rank's process or the network failed",
            words(async_state),
            shared.who()
        );
        return Some(Failure { op, reason });
    }
    // The last collective may still be in its host part; the first may be on the GPU.
    if let Some(last) = state.in_flight.back() {
        if last.done.is_none() && last.queued.elapsed() > timeout {
            let reason = format!(
                "NCCL's {} was not set up within {timeout:?} ({}): another rank failed, died or stopped \
                 calling the group's collectives",
                last.op,
                shared.who()
            );
            return Some(Failure { op: last.op, reason });
        }
    }
    let first = state.in_flight.front_mut()?;
    first.done.as_ref()?;
    if first.running_since.is_none() {
        match first.ready.try_is_complete() {
            Ok(true) => first.running_since = Some(Instant::now()),
            Ok(false) => {}
            Err(error) => {
                let reason = format!(
                    "the GPU failed before NCCL's {} ({}): {}",
                    first.op,
                    shared.who(),
                    shared.gpu.driver(error)
                );
                return Some(Failure { op: first.op, reason });
            }
        }
    }
    let running = first.running_since?.elapsed();
    (running > timeout).then(|| Failure {
        op: first.op,
        reason: format!(
            "NCCL's {} ran on the GPU for {running:.1?}, longer than the group's timeout of {timeout:?} ({}): \
             another rank failed, died or stopped calling the group's collectives",
            first.op,
            shared.who()
        ),
    })
}
