//! The object table: every value a `Ref` can name, whether it is ready, and who waits for it.
//!
//! Invariants:
//! 1. An entry exists from the moment its first `Ref` is made until the last `Ref` drops.
//! 2. An entry moves from pending to done once; a second completion is ignored. The one
//!    exception is recovery: a value lost with its node goes back to pending while the task
//!    that made it runs again (`reset_pending`), or is replaced by an error.
//! 3. Waiters run exactly once, outside the shard lock, on the thread that completed the
//!    entry (or on the subscriber's thread when the entry was already done).
//! 4. Waiters that complete further entries do not recurse: completions started while
//!    another completion runs on the same thread are queued and run in a loop, so chains
//!    of any length (forwarded results, long dependency chains) use constant stack.
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;

use parking_lot::Mutex;

use super::reference::Payload;
use super::stats::Stats;
use crate::Error;

/// The identity of a value in the runtime's object table.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(u64);

impl ObjectId {
    pub(crate) fn from_raw(raw: u64) -> Self {
        ObjectId(raw)
    }

    /// The raw number of this id.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "obj#{}", self.0)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "obj#{}", self.0)
    }
}

/// How a stored value can be read.
pub(crate) enum View<'a> {
    /// The value itself, in this process.
    Typed(&'a dyn Any),
    /// Its bincode encoding, in this process.
    Encoded(&'a [u8]),
    /// Held by another node.
    Remote(&'a RemoteLocation),
}

/// Where a value held by another node is.
#[derive(Debug, Clone)]
pub(crate) struct RemoteLocation {
    pub(crate) node: u64,
    pub(crate) node_name: String,
    pub(crate) addr: SocketAddr,
    pub(crate) id: u64,
    pub(crate) len: u64,
}

/// A value in the table: readable as its own type, and encodable for other processes.
pub(crate) trait StoredValue: Send + Sync + 'static {
    fn view(&self) -> View<'_>;
    fn encode(&self) -> Result<Vec<u8>, Error>;
    /// The entry this value was forwarded from (a task returned a `Ref` to it), if it is
    /// held elsewhere: that entry owns the holder's copy, not this one.
    fn forwarded_from(&self) -> Option<&super::reference::Dependency> {
        None
    }
}

/// A value that arrived encoded from another node.
pub(crate) struct EncodedValue(pub(crate) Vec<u8>);

impl StoredValue for EncodedValue {
    fn view(&self) -> View<'_> {
        View::Encoded(&self.0)
    }
    fn encode(&self) -> Result<Vec<u8>, Error> {
        Ok(self.0.clone())
    }
}

/// A value held by another node.
pub(crate) struct RemoteValue(pub(crate) RemoteLocation);

impl StoredValue for RemoteValue {
    fn view(&self) -> View<'_> {
        View::Remote(&self.0)
    }
    fn encode(&self) -> Result<Vec<u8>, Error> {
        Err(Error::ObjectLost { object: self.0.id, reason: format!("held by node `{}`", self.0.node_name) })
    }
}

/// A value held by another node that a task forwarded (it returned a `Ref` to it): read as
/// the value it forwards, while keeping that value's own entry alive, since the entry owns
/// the holder's copy (freeing the entry frees the copy).
pub(crate) struct ForwardedValue {
    pub(crate) value: Value,
    pub(crate) source: super::reference::Dependency,
}

impl StoredValue for ForwardedValue {
    fn view(&self) -> View<'_> {
        self.value.view()
    }
    fn encode(&self) -> Result<Vec<u8>, Error> {
        self.value.encode()
    }
    fn forwarded_from(&self) -> Option<&super::reference::Dependency> {
        Some(&self.source)
    }
}

/// A value's encoding pulled from another node: its first bytes (a length prefix, for
/// byte vectors) apart from the rest, so that a byte vector can be adopted without a copy.
pub(crate) struct Fetched {
    pub(crate) head: Vec<u8>,
    pub(crate) body: Vec<u8>,
}

impl Fetched {
    /// The whole encoding in one buffer.
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        let mut bytes = self.head;
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// Access to values held by other nodes (provided by the cluster, if one is attached).
pub(crate) trait RemoteAccess: Send + Sync + 'static {
    fn fetch_blocking(&self, location: &RemoteLocation) -> Result<Fetched, Error>;
    fn fetch(&self, location: RemoteLocation)
        -> Pin<Box<dyn Future<Output = Result<Fetched, Error>> + Send>>;
    fn released(&self, id: ObjectId, location: &RemoteLocation);
}

impl<T: Payload> StoredValue for T {
    fn view(&self) -> View<'_> {
        View::Typed(self)
    }
    fn encode(&self) -> Result<Vec<u8>, Error> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(|e| Error::Codec { type_name: std::any::type_name::<T>(), message: e.to_string() })
    }
}

/// A stored value, shared by every reader.
pub(crate) type Value = Arc<dyn StoredValue>;

/// What a finished entry holds.
#[derive(Clone)]
pub(crate) enum Outcome {
    Ready(Value),
    Failed(Arc<Error>),
}

/// A callback run once when an entry is done, given its own copy of the outcome.
pub(crate) type Waiter = Box<dyn FnOnce(Outcome) + Send>;

enum Slot {
    Pending(Vec<Waiter>),
    Done(Outcome),
}

struct Entry {
    slot: Slot,
    bytes: usize,
}

/// A fast hasher for sequential object ids.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Shard = Mutex<HashMap<u64, Entry, BuildHasherDefault<IdHasher>>>;

const SHARDS: usize = 64;

/// The table of all values known to one runtime.
pub(crate) struct ObjectTable {
    shards: Box<[Shard]>,
    next_id: AtomicU64,
    stats: Arc<Stats>,
    remote: OnceLock<Arc<dyn RemoteAccess>>,
}

thread_local! {
    static COMPLETING: Cell<bool> = const { Cell::new(false) };
    static DEFERRED: RefCell<VecDeque<(Vec<Waiter>, Outcome)>> = const { RefCell::new(VecDeque::new()) };
}

impl ObjectTable {
    pub(crate) fn new(stats: Arc<Stats>) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect();
        ObjectTable { shards, next_id: AtomicU64::new(1), stats, remote: OnceLock::new() }
    }

    fn shard(&self, id: ObjectId) -> &Shard {
        &self.shards[(id.0 as usize) % SHARDS]
    }

    /// Attaches the cluster's access to remote values (once).
    pub(crate) fn set_remote(&self, remote: Arc<dyn RemoteAccess>) -> bool {
        self.remote.set(remote).is_ok()
    }

    pub(crate) fn remote(&self) -> Option<&Arc<dyn RemoteAccess>> {
        self.remote.get()
    }

    /// Whether the entry still exists (some `Ref` to it is alive).
    pub(crate) fn contains(&self, id: ObjectId) -> bool {
        self.shard(id).lock().contains_key(&id.0)
    }

    /// Puts a done entry back to pending, to be produced again (lineage re-execution after
    /// the node holding it was lost). Returns false if it is gone or not done.
    pub(crate) fn reset_pending(&self, id: ObjectId) -> bool {
        let mut shard = self.shard(id).lock();
        match shard.get_mut(&id.0) {
            Some(entry) if matches!(entry.slot, Slot::Done(_)) => {
                let old = std::mem::replace(&mut entry.slot, Slot::Pending(Vec::new()));
                let bytes = std::mem::take(&mut entry.bytes);
                drop(shard);
                self.stats.bytes_removed(bytes);
                drop(old);
                true
            }
            _ => false,
        }
    }

    /// The done entries forwarded from one of `sources` (values held elsewhere), each with
    /// its source.
    pub(crate) fn forwarded_from(
        &self,
        sources: &std::collections::HashSet<ObjectId>,
    ) -> Vec<(ObjectId, super::reference::Dependency)> {
        let mut found = Vec::new();
        for shard in self.shards.iter() {
            for (id, entry) in shard.lock().iter() {
                if let Slot::Done(Outcome::Ready(value)) = &entry.slot {
                    if let Some(source) = value.forwarded_from().filter(|s| sources.contains(&s.0.id)) {
                        found.push((ObjectId(*id), super::reference::Dependency(source.0.clone())));
                    }
                }
            }
        }
        found
    }

    /// Replaces a done entry's outcome (a value lost with its node becomes an error).
    pub(crate) fn replace_done(&self, id: ObjectId, outcome: Outcome) {
        let mut shard = self.shard(id).lock();
        if let Some(entry) = shard.get_mut(&id.0) {
            if matches!(entry.slot, Slot::Done(_)) {
                let old = std::mem::replace(&mut entry.slot, Slot::Done(outcome));
                let bytes = std::mem::take(&mut entry.bytes);
                drop(shard);
                self.stats.bytes_removed(bytes);
                drop(old);
            }
        }
    }

    /// Makes a new entry whose value is not produced yet.
    pub(crate) fn create_pending(&self) -> ObjectId {
        let id = ObjectId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.shard(id).lock().insert(id.0, Entry { slot: Slot::Pending(Vec::new()), bytes: 0 });
        self.stats.object_created();
        id
    }

    /// Makes a new entry holding a value.
    pub(crate) fn create_ready(&self, value: Value, bytes: usize) -> ObjectId {
        let id = ObjectId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.shard(id).lock().insert(id.0, Entry { slot: Slot::Done(Outcome::Ready(value)), bytes });
        self.stats.object_created();
        self.stats.bytes_added(bytes);
        id
    }

    /// The outcome of an entry, if it is done.
    pub(crate) fn outcome(&self, id: ObjectId) -> Option<Outcome> {
        match self.shard(id).lock().get(&id.0) {
            Some(Entry { slot: Slot::Done(outcome), .. }) => Some(outcome.clone()),
            _ => None,
        }
    }

    /// Whether the entry is done (ready or failed).
    pub(crate) fn is_done(&self, id: ObjectId) -> bool {
        matches!(self.shard(id).lock().get(&id.0), Some(Entry { slot: Slot::Done(_), .. }))
    }

    /// Runs `waiter` once the entry is done: now, if it already is.
    pub(crate) fn subscribe(&self, id: ObjectId, waiter: Waiter) {
        let outcome = {
            let mut shard = self.shard(id).lock();
            match shard.get_mut(&id.0) {
                Some(Entry { slot: Slot::Pending(waiters), .. }) => {
                    waiters.push(waiter);
                    return;
                }
                Some(Entry { slot: Slot::Done(outcome), .. }) => outcome.clone(),
                None => Outcome::Failed(Arc::new(Error::ObjectLost {
                    object: id.0,
                    reason: "the value was freed".into(),
                })),
            }
        };
        run_waiters(vec![waiter], outcome);
    }

    /// Finishes an entry and wakes its waiters. Returns false if it was already done or freed.
    ///
    /// The calling thread keeps no copy of the outcome once a waiter may run: the entry
    /// takes it, and each waiter gets a copy of its own. So a reader woken here that drops
    /// the last handle of the value frees it then, not when this thread gets round to it
    /// (device memory is given back when the last handle drops, not a moment later).
    pub(crate) fn complete(&self, id: ObjectId, outcome: Outcome, bytes: usize) -> bool {
        let (waiters, for_waiters) = {
            let mut shard = self.shard(id).lock();
            let Some(entry) = shard.get_mut(&id.0) else {
                return false;
            };
            let Slot::Pending(waiters) = &mut entry.slot else {
                return false;
            };
            let waiters = std::mem::take(waiters);
            let for_waiters = (!waiters.is_empty()).then(|| outcome.clone());
            entry.slot = Slot::Done(outcome);
            entry.bytes = bytes;
            (waiters, for_waiters)
        };
        self.stats.bytes_added(bytes);
        if let Some(outcome) = for_waiters {
            run_waiters(waiters, outcome);
        }
        true
    }

    /// Removes an entry: its last `Ref` is gone.
    pub(crate) fn release(&self, id: ObjectId) {
        let removed = self.shard(id).lock().remove(&id.0);
        if let Some(entry) = removed {
            self.stats.object_freed(entry.bytes);
            if let (Slot::Done(Outcome::Ready(value)), Some(remote)) = (&entry.slot, self.remote.get()) {
                if let (View::Remote(location), None) = (value.view(), value.forwarded_from()) {
                    remote.released(id, location);
                }
            }
            // Waiters and the value drop here, outside the lock.
            drop(entry);
        }
    }

    /// Fails every entry that is not done yet (used at shutdown).
    pub(crate) fn fail_all_pending(&self, error: Error) {
        let error = Arc::new(error);
        for shard in self.shards.iter() {
            let mut woken = Vec::new();
            {
                let mut shard = shard.lock();
                for entry in shard.values_mut() {
                    if let Slot::Pending(waiters) = &mut entry.slot {
                        woken.push(std::mem::take(waiters));
                        entry.slot = Slot::Done(Outcome::Failed(error.clone()));
                    }
                }
            }
            for waiters in woken {
                run_waiters(waiters, Outcome::Failed(error.clone()));
            }
        }
    }
}

/// Runs waiters without recursion: nested completions on this thread are queued.
fn run_waiters(waiters: Vec<Waiter>, outcome: Outcome) {
    if COMPLETING.with(|c| c.get()) {
        DEFERRED.with(|d| d.borrow_mut().push_back((waiters, outcome)));
        return;
    }
    COMPLETING.with(|c| c.set(true));
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            COMPLETING.with(|c| c.set(false));
        }
    }
    let _reset = Reset;
    let mut next = Some((waiters, outcome));
    while let Some((waiters, outcome)) = next {
        // Every waiter's copy is made before the first runs, so this thread holds only
        // copies that later waiters will own.
        let mut copies: Vec<Outcome> = (1..waiters.len()).map(|_| outcome.clone()).collect();
        copies.push(outcome);
        for (waiter, copy) in waiters.into_iter().zip(copies) {
            waiter(copy);
        }
        next = DEFERRED.with(|d| d.borrow_mut().pop_front());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// While waiters run, the completing thread holds no copy of the value beyond those
    /// that waiters not yet run will own: a woken reader that drops its copy and the
    /// entry's leaves the value freed at once.
    #[test]
    fn a_completing_thread_keeps_no_copy_of_the_value_while_waiters_run() {
        let table = Arc::new(ObjectTable::new(Arc::new(Stats::default())));
        let id = table.create_pending();
        let counts = Arc::new(Mutex::new(Vec::new()));
        let runs = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let (counts, runs) = (counts.clone(), runs.clone());
            table.subscribe(
                id,
                Box::new(move |outcome| {
                    runs.fetch_add(1, Ordering::Relaxed);
                    if let Outcome::Ready(value) = outcome {
                        counts.lock().push(Arc::strong_count(&value));
                    }
                }),
            );
        }
        let value: Value = Arc::new(7u64);
        assert!(table.complete(id, Outcome::Ready(value), 8));
        assert_eq!(runs.load(Ordering::Relaxed), 3);
        // The entry's copy, the running waiter's, and the copies of the waiters after it.
        assert_eq!(*counts.lock(), [4, 3, 2]);
        // A waiter subscribed after completion gets the entry's value alongside it.
        let seen = Arc::new(AtomicUsize::new(0));
        let late = seen.clone();
        table.subscribe(
            id,
            Box::new(move |outcome| {
                if let Outcome::Ready(value) = outcome {
                    late.store(Arc::strong_count(&value), Ordering::Relaxed);
                }
            }),
        );
        assert_eq!(seen.load(Ordering::Relaxed), 2);
    }
}
