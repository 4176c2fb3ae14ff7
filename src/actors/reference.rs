//! `Ref<T>`: a typed, cloneable reference to a value that may not exist yet, and `Arg<T>`,
//! a task argument that is either a value or a `Ref` (a graph edge).
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::object::{Fetched, ObjectId, ObjectTable, Outcome, RemoteAccess, RemoteLocation, Value, View};
use super::pool;
use crate::{Error, Result};

/// What a `Ref` can hold: a value that can be encoded, shared and sent between threads.
///
/// Implemented for every type with these bounds.
pub trait Payload: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}

impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> Payload for T {}

/// The shared part of every clone of one `Ref`: the last one to go frees the value.
pub(crate) struct RefInner {
    pub(crate) id: ObjectId,
    pub(crate) table: Arc<ObjectTable>,
}

impl Drop for RefInner {
    fn drop(&mut self) {
        self.table.release(self.id);
    }
}

/// A typed reference to a value that may not exist yet.
///
/// Cloning is cheap. The value is freed when the last clone (held by user code or by a
/// pending task) is dropped.
pub struct Ref<T> {
    pub(crate) inner: Arc<RefInner>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Ref<T> {
    fn clone(&self) -> Self {
        Ref { inner: self.inner.clone(), _type: PhantomData }
    }
}

impl<T> std::fmt::Debug for Ref<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ref<{}>({})", std::any::type_name::<T>(), self.inner.id)
    }
}

impl<T: Payload> Ref<T> {
    pub(crate) fn from_inner(inner: Arc<RefInner>) -> Self {
        Ref { inner, _type: PhantomData }
    }

    /// The id of the value in the object table.
    pub fn id(&self) -> ObjectId {
        self.inner.id
    }

    /// Whether the value (or its failure) is there.
    pub fn is_ready(&self) -> bool {
        self.inner.table.is_done(self.inner.id)
    }

    /// Waits for the value and returns a copy of it.
    ///
    /// # Errors
    /// The error of the task that should have produced the value (with its cause chain when
    /// an input failed), or [`Error::Shutdown`] if the runtime stopped first.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future only stops waiting.
    ///
    /// # Examples
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let rt = tessera::Runtime::local()?;
    /// let r = rt.put(41_u32);
    /// assert_eq!(r.get().await?, 41);
    /// # rt.shutdown();
    /// # Ok::<(), tessera::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn get(&self) -> Result<T> {
        let mut gave_up_at = None;
        loop {
            let outcome = match self.inner.table.outcome(self.inner.id) {
                Some(outcome) => outcome,
                None => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    self.inner.table.subscribe(
                        self.inner.id,
                        Box::new(move |outcome| {
                            let _ = tx.send(outcome);
                        }),
                    );
                    rx.await.map_err(|_| Error::Shutdown)?
                }
            };
            let location = match read_here::<T>(&outcome)? {
                Readable::Value(value) => return Ok(value),
                Readable::Remote(location) => location,
            };
            let remote = remote_access(&self.inner)?;
            match remote.fetch(location).await {
                Ok(fetched) => return decode_fetched(fetched),
                Err(error) => {
                    if !retry_transfer(&mut gave_up_at) {
                        return Err(error);
                    }
                    tokio::time::sleep(TRANSFER_RETRY_PAUSE).await;
                }
            }
        }
    }

    /// Blocks the thread until the value is there and returns a copy of it.
    ///
    /// Called inside a task, the worker runs other queued tasks while it waits, so nested
    /// waits do not starve the pool.
    ///
    /// # Errors
    /// As [`Ref::get`].
    pub fn blocking_get(&self) -> Result<T> {
        blocking_read(&self.inner, None)
    }

    /// Like [`Ref::blocking_get`], giving up after `timeout` with [`Error::Timeout`].
    ///
    /// # Errors
    /// As [`Ref::get`], or [`Error::Timeout`].
    pub fn blocking_get_timeout(&self, timeout: Duration) -> Result<T> {
        blocking_read(&self.inner, Some(timeout))
    }

    /// Blocks until the value is done, without reading it (a value held by a node stays
    /// there); its error if it failed.
    pub(crate) fn blocking_wait_done(&self) -> Result<()> {
        match blocking_outcome(&self.inner, None)? {
            Outcome::Ready(_) => Ok(()),
            Outcome::Failed(error) => Err((*error).clone()),
        }
    }
}

/// How long a reader keeps retrying transfers from a holder that stopped answering: long
/// enough for the head to notice a lost node and re-run the task that made the value.
const TRANSFER_RETRY_WINDOW: Duration = Duration::from_secs(20);
const TRANSFER_RETRY_PAUSE: Duration = Duration::from_millis(100);

fn retry_transfer(gave_up_at: &mut Option<Instant>) -> bool {
    Instant::now() < *gave_up_at.get_or_insert_with(|| Instant::now() + TRANSFER_RETRY_WINDOW)
}

fn remote_access(inner: &RefInner) -> Result<&Arc<dyn RemoteAccess>> {
    inner.table.remote().ok_or(Error::ObjectLost {
        object: inner.id.as_u64(),
        reason: "held by another node, but no cluster is attached".into(),
    })
}

/// Reads a value, waiting for it and pulling it from its holder if needed.
pub(crate) fn blocking_read<T: Payload>(inner: &RefInner, timeout: Option<Duration>) -> Result<T> {
    let mut gave_up_at = None;
    loop {
        let outcome = blocking_outcome(inner, timeout)?;
        let location = match read_here::<T>(&outcome)? {
            Readable::Value(value) => return Ok(value),
            Readable::Remote(location) => location,
        };
        match remote_access(inner)?.fetch_blocking(&location) {
            Ok(fetched) => return decode_fetched(fetched),
            Err(error) => {
                if !retry_transfer(&mut gave_up_at) {
                    return Err(error);
                }
                std::thread::sleep(TRANSFER_RETRY_PAUSE);
            }
        }
    }
}

/// Blocks until the value is done (ready or failed) and returns its outcome, without
/// reading it: a value held by another node stays where it is.
pub(crate) fn blocking_outcome(inner: &RefInner, timeout: Option<Duration>) -> Result<Outcome> {
    if let Some(outcome) = inner.table.outcome(inner.id) {
        return Ok(outcome);
    }
    let signal = Arc::new(Signal::new());
    let slot = Arc::new(parking_lot::Mutex::new(None::<Outcome>));
    {
        let signal = signal.clone();
        let slot = slot.clone();
        inner.table.subscribe(
            inner.id,
            Box::new(move |outcome| {
                *slot.lock() = Some(outcome);
                signal.set();
            }),
        );
    }
    if !signal.wait(timeout) {
        return Err(Error::Timeout(timeout.unwrap_or_default()));
    }
    let outcome = slot.lock().take();
    outcome.ok_or(Error::Shutdown)
}

/// A one-shot flag a thread can block on; helps the worker pool while it waits.
pub(crate) struct Signal {
    done: AtomicBool,
    thread: std::thread::Thread,
}

impl Signal {
    pub(crate) fn new() -> Self {
        Signal { done: AtomicBool::new(false), thread: std::thread::current() }
    }

    pub(crate) fn set(&self) {
        self.done.store(true, Ordering::Release);
        self.thread.unpark();
    }

    pub(crate) fn is_set(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Waits until set; false on timeout. Must be called on the thread that made it.
    pub(crate) fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        // A short spin catches quick answers without a sleep/wake round trip.
        for i in 0..200 {
            if self.is_set() {
                return true;
            }
            if i < 50 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let on_worker = pool::is_worker_thread();
        let _waiting = pool::waiting();
        loop {
            if self.is_set() {
                return true;
            }
            let now = Instant::now();
            if let Some(deadline) = deadline {
                if now >= deadline {
                    return self.is_set();
                }
            }
            if on_worker && pool::help_one() {
                continue;
            }
            let mut nap = if on_worker { Duration::from_micros(500) } else { Duration::from_millis(50) };
            if let Some(deadline) = deadline {
                nap = nap.min(deadline - now);
            }
            std::thread::park_timeout(nap);
        }
    }
}

/// A value read in this process, or where to pull it from.
enum Readable<T> {
    Value(T),
    Remote(RemoteLocation),
}

fn read_here<T: Payload>(outcome: &Outcome) -> Result<Readable<T>> {
    match outcome {
        Outcome::Failed(error) => Err((**error).clone()),
        Outcome::Ready(value) => match value.view() {
            View::Typed(any) => any
                .downcast_ref::<T>()
                .cloned()
                .map(Readable::Value)
                .ok_or(Error::TypeMismatch { expected: std::any::type_name::<T>() }),
            View::Encoded(bytes) => decode_value(bytes).map(Readable::Value),
            View::Remote(location) => Ok(Readable::Remote(location.clone())),
        },
    }
}

/// Decodes a value pulled from another node. Byte vectors (`Vec<u8>`, `serde_bytes::ByteBuf`)
/// take the received buffer as it is; other types decode from the two parts in one pass.
pub(crate) fn decode_fetched<T: Payload>(fetched: Fetched) -> Result<T> {
    use std::any::{Any, TypeId};
    let is_bytes = TypeId::of::<T>() == TypeId::of::<Vec<u8>>()
        || TypeId::of::<T>() == TypeId::of::<serde_bytes::ByteBuf>();
    if is_bytes && varint_len(&fetched.head) == Some(fetched.body.len() as u64) {
        let body = fetched.body;
        let boxed: Box<dyn Any> = if TypeId::of::<T>() == TypeId::of::<Vec<u8>>() {
            Box::new(body)
        } else {
            Box::new(serde_bytes::ByteBuf::from(body))
        };
        if let Ok(value) = boxed.downcast::<T>() {
            return Ok(*value);
        }
        return Err(Error::TypeMismatch { expected: std::any::type_name::<T>() });
    }
    let len = fetched.head.len() + fetched.body.len();
    let mut reader = std::io::Read::chain(&fetched.head[..], &fetched.body[..]);
    crate::codec::decode_read::<T>(&mut reader, len)
        .map_err(|e| Error::Codec { type_name: std::any::type_name::<T>(), message: e.to_string() })
}

/// Reads a bincode varint that fills `bytes` exactly.
fn varint_len(bytes: &[u8]) -> Option<u64> {
    match bytes {
        [b] if *b < 251 => Some(u64::from(*b)),
        [251, rest @ ..] if rest.len() == 2 => Some(u64::from(u16::from_le_bytes(rest.try_into().ok()?))),
        [252, rest @ ..] if rest.len() == 4 => Some(u64::from(u32::from_le_bytes(rest.try_into().ok()?))),
        [253, rest @ ..] if rest.len() == 8 => Some(u64::from_le_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

/// Decodes a value from its bincode encoding.
pub(crate) fn decode_value<T: Payload>(bytes: &[u8]) -> Result<T> {
    match crate::codec::decode_slice::<T>(bytes) {
        Ok((value, used)) if used == bytes.len() => Ok(value),
        Ok(_) => {
            Err(Error::Codec { type_name: std::any::type_name::<T>(), message: "trailing bytes".into() })
        }
        Err(e) => Err(Error::Codec { type_name: std::any::type_name::<T>(), message: e.to_string() }),
    }
}

/// The encoded size of a value in bytes (bincode, standard configuration).
pub(crate) fn encoded_size<T: Serialize>(value: &T) -> usize {
    let mut writer = bincode::enc::write::SizeWriter::default();
    match bincode::serde::encode_into_writer(value, &mut writer, bincode::config::standard()) {
        Ok(()) => writer.bytes_written,
        Err(_) => 0,
    }
}

/// Wraps a value for the object table.
pub(crate) fn store<T: Payload>(value: T) -> (Value, usize) {
    // A device array's encoding is a copy to the host (CUDA's or XLA's): count its size
    // without making one.
    #[cfg(feature = "cuda")]
    if let Some(array) = (&value as &dyn std::any::Any).downcast_ref::<crate::devices::DeviceArray>() {
        let bytes = array.byte_len();
        return (Arc::new(value), bytes);
    }
    #[cfg(feature = "xla")]
    if let Some(array) = (&value as &dyn std::any::Any).downcast_ref::<crate::devices::XlaArray>() {
        let bytes = array.byte_len();
        return (Arc::new(value), bytes);
    }
    let bytes = encoded_size(&value);
    (Arc::new(value), bytes)
}

/// The size of `value`'s data if it is an array in a device's memory (CUDA's or XLA's):
/// its encoding is a copy to the host, and a node keeps it as it is for the tasks that run
/// there after.
pub(crate) fn device_bytes(value: &Value) -> Option<usize> {
    let super::object::View::Typed(_typed) = value.view() else { return None };
    #[cfg(feature = "cuda")]
    if let Some(array) = _typed.downcast_ref::<crate::devices::DeviceArray>() {
        return array.device().is_some().then(|| array.byte_len());
    }
    #[cfg(feature = "xla")]
    if let Some(array) = _typed.downcast_ref::<crate::devices::XlaArray>() {
        return array.is_on_device().then(|| array.byte_len());
    }
    None
}

/// An input a task waits for (used by the `task!` macro).
#[doc(hidden)]
pub struct Dependency(pub(crate) Arc<RefInner>);

/// A task argument: a plain value, or a `Ref` whose value the task waits for.
pub enum Arg<T> {
    /// A value passed as is.
    Value(Option<T>),
    /// A value produced elsewhere: the task runs once it is ready.
    Ref(Ref<T>),
}

impl<T: Payload> Arg<T> {
    /// The `Ref` this argument waits for, if any.
    #[doc(hidden)]
    pub fn dependency(&self) -> Option<Dependency> {
        match self {
            Arg::Value(_) => None,
            Arg::Ref(r) => Some(Dependency(r.inner.clone())),
        }
    }

    /// The argument's value. With `last` the value is moved out, otherwise copied (so that
    /// a retried task gets its arguments again).
    ///
    /// # Errors
    /// The failure of the input, if it failed.
    pub fn resolve(&mut self, last: bool) -> Result<T> {
        match self {
            Arg::Value(slot) => {
                let value = if last { slot.take() } else { slot.clone() };
                value.ok_or(Error::TypeMismatch { expected: std::any::type_name::<T>() })
            }
            Arg::Ref(r) => blocking_read(&r.inner, None),
        }
    }
}

/// An argument as a node process will receive it (used by the `task!` macro).
#[doc(hidden)]
#[derive(Clone)]
pub struct RemoteArg(pub(crate) RemoteArgKind);

#[derive(Clone)]
pub(crate) enum RemoteArgKind {
    /// The encoded value.
    Value(Vec<u8>),
    /// A value in the object table.
    Ref(ObjectId),
    /// A value of `len` bytes held by the process whose data server listens at `addr`,
    /// under `id` (an argument of a task that a node spawned, held by that node).
    Held { addr: std::net::SocketAddr, id: u64, len: u64 },
}

impl<T: Payload> Arg<T> {
    /// The argument in the form a node process receives; `None` if it cannot be encoded
    /// (the task then runs in this process).
    ///
    /// A value too large to ride in the task's message is put in `rt`'s object table first
    /// (this argument becomes a `Ref` to it), so that the node pulls it through the data
    /// plane: no control frame outgrows the frame limit.
    #[doc(hidden)]
    pub fn remote_arg(&mut self, rt: &crate::Runtime) -> Option<RemoteArg> {
        match self {
            Arg::Value(slot @ Some(_)) => {
                let bytes =
                    bincode::serde::encode_to_vec(slot.as_ref()?, bincode::config::standard()).ok()?;
                if bytes.len() <= crate::net::MESSAGE_INLINE_LIMIT {
                    return Some(RemoteArg(RemoteArgKind::Value(bytes)));
                }
                let shared = rt.put(slot.take()?);
                let id = shared.inner.id;
                *self = Arg::Ref(shared);
                Some(RemoteArg(RemoteArgKind::Ref(id)))
            }
            Arg::Value(None) => None,
            Arg::Ref(r) => Some(RemoteArg(RemoteArgKind::Ref(r.inner.id))),
        }
    }
}

impl<T: Payload> From<T> for Arg<T> {
    fn from(value: T) -> Self {
        Arg::Value(Some(value))
    }
}

impl<T: Payload> From<Ref<T>> for Arg<T> {
    fn from(r: Ref<T>) -> Self {
        Arg::Ref(r)
    }
}

impl<T: Payload> From<&Ref<T>> for Arg<T> {
    fn from(r: &Ref<T>) -> Self {
        Arg::Ref(r.clone())
    }
}

/// Counts how many of a set of values are done; used by `wait`.
pub(crate) struct ReadyCounter {
    pub(crate) count: AtomicUsize,
    pub(crate) notify: tokio::sync::Notify,
    pub(crate) lock: parking_lot::Mutex<()>,
    pub(crate) cond: parking_lot::Condvar,
}

impl ReadyCounter {
    pub(crate) fn new() -> Self {
        ReadyCounter {
            count: AtomicUsize::new(0),
            notify: tokio::sync::Notify::new(),
            lock: parking_lot::Mutex::new(()),
            cond: parking_lot::Condvar::new(),
        }
    }

    pub(crate) fn bump(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_one();
        let _guard = self.lock.lock();
        self.cond.notify_all();
    }
}

/// Saves the value of `r` as a new version of `name` in `stash`, from wherever the value
/// is: a value in this process is saved from here, one held by a node is written by that
/// node, so its bytes never pass through this process.
///
/// # Errors
/// The value's own error if it failed; [`Error::Store`] if the save fails;
/// [`Error::Cluster`] if the holder is lost during the save, or for ndarray values held
/// by a node (save those with [`Stash::save`](crate::Stash::save) in a task there).
pub(crate) fn save_ref<T: Payload>(
    core: &super::runtime::Core,
    stash: &crate::Stash,
    name: &str,
    r: &Ref<T>,
    tags: &[(&str, &str)],
) -> Result<crate::Version> {
    // Wait for the value without reading it: a node-held value must stay on its node.
    let value = match blocking_outcome(&r.inner, None)? {
        Outcome::Failed(error) => return Err((*error).clone()),
        Outcome::Ready(value) => value,
    };
    let location = match value.view() {
        View::Remote(location) => location.clone(),
        _ => return Ok(stash.save(name, &r.blocking_get()?, tags)?),
    };
    if crate::Stash::uses_array_layout::<T>() {
        return Err(Error::Cluster(format!(
            "`{name}`: arrays held by a node are saved with Stash::save in a task on that node"
        )));
    }
    let cluster = core.cluster().ok_or_else(|| {
        Error::Cluster(format!(
            "`{name}` is held by node `{}`, but no cluster is attached",
            location.node_name
        ))
    })?;
    cluster.save_held(&location, &stash.url_for_others(), name, std::any::type_name::<T>(), tags)
}
