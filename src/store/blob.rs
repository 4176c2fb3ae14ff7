//! `BlobStore`: the one trait every stash backend implements — a flat, durable key/value
//! store of byte blobs with prefix listing.
//!
//! Keys are `/`-separated ASCII paths made by the stash (`chunks/<hash>`,
//! `records/<escaped name>/<version>`), never raw user input.
use std::fmt;
use std::time::SystemTime;

use super::StoreError;

/// One object found by [`BlobStore::list`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ObjectMeta {
    /// The object's key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written (or touched), if the backend knows.
    pub modified: Option<SystemTime>,
}

impl ObjectMeta {
    /// Describes one object.
    pub fn new(key: String, size: u64, modified: Option<SystemTime>) -> ObjectMeta {
        ObjectMeta { key, size, modified }
    }
}

/// A durable key/value store of byte blobs: the seam between the stash and its backends.
///
/// # Contract
/// 1. `put` is atomic and durable: once it returns, the whole blob is readable after a
///    crash (together with [`sync`](BlobStore::sync) for the embedded store's directory
///    entries); a reader never sees part of a blob.
/// 2. `put` of an existing key replaces it atomically.
/// 3. `list(prefix)` returns every key that starts with `prefix` (`prefix` ends in `/`).
/// 4. Methods are called from several threads at once.
pub trait BlobStore: Send + Sync + fmt::Debug {
    /// Stores `bytes` under `key`, replacing any old value.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError>;

    /// Replaces the blob under `key` with `bytes` only if one is stored there; returns
    /// whether it did. Used to rewrite a version record (tags) without bringing back a
    /// version deleted meanwhile. Backends make the check and the write one atomic step
    /// where they can (SAFETY.md, "Tag races"); the default checks, then puts, so a
    /// delete in between is undone.
    fn replace(&self, key: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        if self.get(key)?.is_none() {
            return Ok(false);
        }
        self.put(key, bytes).map(|()| true)
    }

    /// The blob under `key`, or `None` if there is none.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Reads the blob under `key` into `buf`. Returns `Ok(None)` if it is missing, or
    /// `Ok(Some(len))` with the blob's real length; the bytes are only valid when that
    /// length equals `buf.len()`.
    fn get_into(&self, key: &str, buf: &mut [u8]) -> Result<Option<u64>, StoreError> {
        Ok(self.get(key)?.map(|bytes| {
            if bytes.len() == buf.len() {
                buf.copy_from_slice(&bytes);
            }
            bytes.len() as u64
        }))
    }

    /// [`get_into`](BlobStore::get_into), also returning the BLAKE3 hash of the bytes read
    /// (valid when the length matches). Backends may hash while reading, when the bytes
    /// are still in the CPU cache.
    fn get_into_hashed(&self, key: &str, buf: &mut [u8]) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        Ok(self.get_into(key, buf)?.map(|len| {
            let hash = if len == buf.len() as u64 { *blake3::hash(buf).as_bytes() } else { [0; 32] };
            (len, hash)
        }))
    }

    /// Whether a blob of exactly `len` bytes is stored under `key`.
    fn has(&self, key: &str, len: u64) -> Result<bool, StoreError>;

    /// Marks `key` as recently used, so that a concurrent [`gc`](super::Stash::gc) with a
    /// grace period keeps it. Returns `Ok(false)` when the blob is no longer stored (a
    /// gc took it away first): the caller must then write it again before naming it in a
    /// record. A backend that can touch must make this atomic with
    /// [`delete_if_untouched`](BlobStore::delete_if_untouched): either the touch lands
    /// first and the delete keeps the blob, or the delete lands first and the touch
    /// returns `Ok(false)`. Backends that cannot touch cheaply do nothing and return
    /// `Ok(true)`.
    fn touch(&self, _key: &str) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// Deletes `key` unless it was written or [touched](BlobStore::touch) after `since`;
    /// returns whether it is gone. Used by gc on chunks that no record names: the check
    /// and the delete are one atomic step against `touch`, so a save that reuses the
    /// chunk either keeps it or learns that it must write it again. The default deletes
    /// unconditionally (for backends that cannot touch: the caller has already checked
    /// the listed time).
    fn delete_if_untouched(&self, key: &str, _since: SystemTime) -> Result<bool, StoreError> {
        self.delete(key).map(|()| true)
    }

    /// Every object whose key starts with `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;

    /// The keys that start with `prefix`, without sizes or times (cheaper on some
    /// backends).
    fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.list(prefix)?.into_iter().map(|m| m.key).collect())
    }

    /// Deletes `key`; deleting a missing key is not an error.
    fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Makes the creation of the keys under `prefix` durable (the embedded store fsyncs
    /// the directory). Remote stores are durable per `put` and do nothing.
    fn sync(&self, _prefix: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Starts a batch of puts whose durability is paid once, at
    /// [`PutBatch::commit`]. The default batch puts each blob at once.
    fn batch(&self) -> Box<dyn PutBatch + '_> {
        Box::new(ImmediateBatch(self))
    }

    /// Removes leftovers of interrupted writes older than `older_than`; returns how many.
    fn remove_temporaries(&self, _older_than: SystemTime) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// The longest `/`-separated segment of a key this store can hold, in bytes, if it
    /// has a limit: an entry name's escaped form (`records/<escaped name>/…`) must fit
    /// (the embedded store: 255, the longest file name).
    fn key_segment_limit(&self) -> Option<usize> {
        None
    }

    /// How many blobs to move at once in one save or load.
    fn parallelism(&self) -> usize {
        4
    }

    /// Where the store is, for messages (`/path`, `s3://bucket/prefix`, ...).
    fn location(&self) -> String;

    /// Brings every replica of a redundant store back to an intact copy of every blob,
    /// telling `progress` the bytes checked so far and in all. A store that keeps one copy
    /// has nothing to repair: the default reports one replica and does nothing.
    fn repair(&self, _progress: &(dyn Fn(u64, u64) + Sync)) -> Result<RepairReport, StoreError> {
        Ok(RepairReport { replicas: 1, ..RepairReport::default() })
    }
}

/// What [`BlobStore::repair`] (and [`Stash::repair`](super::Stash::repair)) did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RepairReport {
    /// How many copies the store keeps.
    pub replicas: usize,
    /// Blobs (chunks and version records) checked on every replica.
    pub blobs_checked: usize,
    /// Copies written to replicas that lacked them or held them damaged.
    pub copies_written: usize,
    /// Bytes those copies hold.
    pub bytes_written: u64,
    /// Blobs with no intact copy anywhere: their versions cannot be loaded.
    pub unrecoverable: Vec<StoreError>,
    /// Replicas that could not be read or written (the repair should be run again).
    pub problems: Vec<StoreError>,
}

impl RepairReport {
    /// Whether every replica now holds an intact copy of every blob.
    pub fn is_complete(&self) -> bool {
        self.unrecoverable.is_empty() && self.problems.is_empty()
    }
}

/// A group of puts made durable together (see [`BlobStore::batch`]).
///
/// Blobs put through a batch may stay invisible until [`commit`](PutBatch::commit)
/// returns; after that they are durable and visible. A batch dropped without commit
/// leaves no visible blob behind (temporaries are removed, or reclaimed by gc).
pub trait PutBatch: Send + Sync {
    /// Adds a blob to the batch; may be called from several threads at once.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError>;

    /// Makes every blob of the batch durable and visible.
    fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

struct ImmediateBatch<'a, S: BlobStore + ?Sized>(&'a S);

impl<S: BlobStore + ?Sized> PutBatch for ImmediateBatch<'_, S> {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.0.put(key, bytes)
    }

    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        Ok(())
    }
}
