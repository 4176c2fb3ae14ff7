//! `Stash`: versioned, typed, tagged storage of named values over a [`BlobStore`].
//!
//! # Invariants
//! 1. A value's bytes are split into fixed-size chunks named by their BLAKE3 hash
//!    (`chunks/<hex>`); a chunk already stored with the same length is not written again.
//! 2. A version exists exactly when its record (`records/<escaped name>/<version>`)
//!    exists. The record is written last, after every chunk it names is durable
//!    (chunk files fsynced, chunk directory fsynced), so a crash mid-save leaves at most
//!    unreferenced chunks, never a listed partial version.
//! 3. Version ids are unique across processes (time + random nonce) and every save
//!    writes a new record key, so concurrent saves of one name all land.
//! 4. Every chunk is hashed again when read; a mismatch is an error naming the entry.
//! 5. gc deletes only chunks that no record names and that were not written or reused
//!    within the grace period, so saves in flight keep their chunks. The last check is
//!    made by the store in one step with the delete (`delete_if_untouched`), atomically
//!    against a save's `touch`: a chunk reused after gc listed it is never deleted, and a
//!    touch that comes too late reports the chunk missing, so the save writes it again.
//! 6. A record is rewritten (tags) only while it exists (`replace`), so a deleted version
//!    never comes back.
use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ndarray::{Array, ArrayBase, Data, Dimension};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::array::{self, ArrayElement};
use super::blob::{BlobStore, ObjectMeta, RepairReport};
use super::index::RecordIndex;
use super::local::LocalStore;
use super::record::{self, ChunkRef, Layout, Record, VersionInfo};
use super::{StoreError, Version};

/// Bytes per chunk: large enough that per-file costs (open, fsync, rename) stay small
/// next to the data, small enough that a local change re-stores little.
pub const CHUNK_SIZE: usize = 4 << 20;

/// How long gc leaves unreferenced chunks alone by default (saves in flight use them).
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);

const MARKER_FILE: &str = "STASH";
const MARKER_TEXT: &str = "tessera stash, format 1\n";
const MAX_NAME_LEN: usize = 1024;

/// A handle on a stash: cheap to clone, usable from any thread.
///
/// Blocking methods do their I/O on the calling thread (and a few scoped helper threads
/// for parallel chunk transfer); the `_async` variants run them on tokio's blocking pool.
#[derive(Clone)]
pub struct Stash {
    inner: Arc<Inner>,
    progress: Option<Arc<ProgressObserver>>,
}

/// Hands out the chunks of a value being saved: index and bytes, then `None`.
type ChunkSource<'a> = dyn Fn() -> Result<Option<(usize, Cow<'a, [u8]>)>, StoreError> + Sync + 'a;

/// What a [`Stash::with_progress`] observer is called with.
type ProgressObserver = dyn Fn(TransferProgress<'_>) + Send + Sync;

/// Whether a transfer saves or loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransferKind {
    /// Chunks hashed and written.
    Save,
    /// Chunks read and checked.
    Load,
    /// Blobs checked on every replica, and copied where missing or damaged.
    Repair,
}

/// How far one save or load of a value has got: reported to a
/// [`Stash::with_progress`] observer after every chunk.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct TransferProgress<'a> {
    /// Saving or loading.
    pub kind: TransferKind,
    /// The entry's name.
    pub name: &'a str,
    /// Bytes done so far (chunks finish in any order, on several threads).
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
}

struct Inner {
    blobs: Box<dyn BlobStore>,
    index: Option<RecordIndex>,
    /// The path or URL this stash was opened from, credentials included: what other
    /// processes (nodes saving the values they hold) open to reach it.
    url: Option<String>,
}

impl std::fmt::Debug for Stash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stash")
            .field("location", &self.inner.blobs.location())
            .field("index", &self.inner.index.is_some())
            .finish()
    }
}

/// A byte-string version about to be read: its record, its first chunk, and where the
/// string starts in it and how long it is.
struct ByteString {
    record: Record,
    first: Vec<u8>,
    prefix: usize,
    len: u64,
}

/// What [`Stash::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcReport {
    /// Chunks deleted.
    pub chunks_deleted: usize,
    /// Bytes those chunks held.
    pub bytes_freed: u64,
    /// Chunks still named by some version.
    pub chunks_live: usize,
    /// Unreferenced chunks kept because they are younger than the grace period.
    pub chunks_young: usize,
    /// Leftover temporary files of interrupted writes removed.
    pub temporaries_removed: usize,
}

/// What [`Stash::verify`] found.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Versions whose record could be read.
    pub versions: usize,
    /// Chunk reads checked (a chunk shared by versions is checked once).
    pub chunks: usize,
    /// Bytes read and hashed.
    pub bytes: u64,
    /// Every problem found: corrupt records, missing, truncated or damaged chunks.
    pub problems: Vec<StoreError>,
}

/// Size of what a stash holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Version records.
    pub versions: usize,
    /// Chunks.
    pub chunks: usize,
    /// Bytes in chunks.
    pub chunk_bytes: u64,
}

/// Whether opening a stash may create it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Create {
    /// Make the directory a stash if it is missing or empty (saves).
    IfMissing,
    /// The stash must exist already (reads and maintenance: a mistyped path is an error).
    Never,
}

/// Makes `root` an embedded stash directory (creating it and its marker file), or checks
/// that it is one.
fn prepare_directory(root: &Path, create: Create) -> Result<(), StoreError> {
    if root.as_os_str().is_empty() {
        return Err(StoreError::invalid_url("", "the stash path is empty"));
    }
    let marker = root.join(MARKER_FILE);
    if marker.exists() {
        return Ok(());
    }
    let missing = || StoreError::NoStash { path: root.display().to_string() };
    match std::fs::read_dir(root) {
        Ok(mut entries) => {
            // Another process may be creating this stash right now: give its marker a
            // moment to appear before calling the directory foreign.
            let empty = entries.next().is_none();
            if !empty && !wait_for(&marker, std::time::Duration::from_secs(2)) {
                return Err(StoreError::NotAStash { path: root.display().to_string() });
            }
            if !empty {
                return Ok(());
            }
            if create == Create::Never {
                return Err(missing());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if create == Create::Never {
                return Err(missing());
            }
            std::fs::create_dir_all(root).map_err(|e| StoreError::io("mkdir", root, e))?;
        }
        Err(e) => return Err(StoreError::io("list", root, e)),
    }
    let store = LocalStore::new(root.to_path_buf());
    store.put(MARKER_FILE, MARKER_TEXT.as_bytes())?;
    store.sync("")
}

/// A store URL fit for messages and logs: each URL's query (S3's keys) becomes `?…` and a
/// password in its user part is dropped; a mirror's replicas are redacted one by one.
///
/// # Examples
/// ```
/// let url = "postgres://me:secret@db/x?table=t";
/// assert_eq!(tessera::redact_url(url), "postgres://me@db/x?…");
/// ```
pub fn redact_url(url: &str) -> String {
    if let Some(list) = url.strip_prefix("mirror:") {
        let (list, options) = match list.split_once(';') {
            Some((list, options)) => (list, format!(";{options}")),
            None => (list, String::new()),
        };
        let replicas: Vec<String> = list.split(',').map(redact_one_url).collect();
        return format!("mirror:{}{options}", replicas.join(","));
    }
    redact_one_url(url)
}

fn redact_one_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, _)) => (base, "?…"),
        None => (url, ""),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{scheme}://{user}@{host}")
            }
            None => base.to_string(),
        },
        None => base.to_string(),
    };
    format!("{base}{query}")
}

/// The directory of an embedded-store URL: a plain path or `file:///path`.
fn local_path(url: &str) -> Result<&str, StoreError> {
    match url.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => Ok(path),
        Some(_) => Err(StoreError::invalid_url(url, "file URLs need an absolute path (file:///dir)")),
        None => Ok(url),
    }
}

/// The blob store a URL names (a mirror's replica): an embedded-store directory is
/// opened without its record index, which caches records for one process at a time.
fn open_blob_store(url: &str, create: Create) -> Result<Box<dyn BlobStore>, StoreError> {
    match url.split_once("://").map_or("file", |(scheme, _)| scheme) {
        "file" => {
            let path = local_path(url)?;
            prepare_directory(Path::new(path), create)?;
            Ok(Box::new(LocalStore::new(path.into())))
        }
        #[cfg(feature = "s3")]
        "s3" => remote_store(Box::new(super::s3::S3Store::open(url)?), url, create),
        #[cfg(not(feature = "s3"))]
        scheme @ "s3" => Err(StoreError::BackendNotCompiled { scheme: scheme.into(), feature: "s3" }),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => remote_store(
            Box::new(super::postgres::PostgresStore::open(url, create == Create::IfMissing)?),
            url,
            create,
        ),
        #[cfg(not(feature = "postgres"))]
        scheme @ ("postgres" | "postgresql") => {
            Err(StoreError::BackendNotCompiled { scheme: scheme.into(), feature: "postgres" })
        }
        other => Err(StoreError::invalid_url(
            url,
            format!("unknown scheme `{other}` (known: file, s3, postgres, mirror)"),
        )),
    }
}

/// A remote store, checked when it must hold a stash already: it is reachable (an
/// unreachable server is an error when opening, not at the first command) and holds at
/// least one version record (a remote stash has no marker: an empty prefix or table is
/// no stash, as an empty directory is none).
#[cfg(any(feature = "s3", feature = "postgres"))]
fn remote_store(
    store: Box<dyn BlobStore>,
    url: &str,
    create: Create,
) -> Result<Box<dyn BlobStore>, StoreError> {
    if create == Create::Never && store.list("records/")?.is_empty() {
        return Err(StoreError::NoStash { path: redact_url(url) });
    }
    Ok(store)
}

/// Waits up to `limit` for `path` to exist.
fn wait_for(path: &Path, limit: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    path.exists()
}

impl Stash {
    /// Opens (creating if needed) the embedded stash in directory `path`.
    ///
    /// # Errors
    /// [`StoreError::NotAStash`] if the directory holds other files; [`StoreError::Io`]
    /// if it cannot be created; [`StoreError::IndexCorrupt`] if its index is damaged.
    pub fn open(path: impl AsRef<Path>) -> Result<Stash, StoreError> {
        Stash::open_directory(path.as_ref(), Create::IfMissing)
    }

    /// Opens the embedded stash in directory `path`, which must be one already: for
    /// reading and maintenance, where creating an empty stash at a mistyped path would
    /// hide the mistake.
    ///
    /// # Errors
    /// [`StoreError::NoStash`] if the directory is missing or empty; as
    /// [`open`](Stash::open).
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Stash, StoreError> {
        Stash::open_directory(path.as_ref(), Create::Never)
    }

    fn open_directory(root: &Path, create: Create) -> Result<Stash, StoreError> {
        prepare_directory(root, create)?;
        let index = RecordIndex::open(&root.join("index"))?;
        let mut stash = Stash::from_parts(Box::new(LocalStore::new(root.to_path_buf())), index);
        // Absolute, so that processes started elsewhere find the same directory.
        stash.set_url(std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf()).display().to_string());
        Ok(stash)
    }

    /// Records where this (newly made) stash was opened from.
    fn set_url(&mut self, url: String) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.url = Some(url);
        }
    }

    /// Opens a stash by URL: `file:///path` or a plain path (the embedded store),
    /// `s3://bucket/prefix?endpoint=URL&region=R&access_key_id=K&secret_access_key=S`
    /// (feature `s3`; credentials may also come from `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`), `postgres://user@host:port/db?table=NAME`
    /// (feature `postgres`), or `mirror:URL,URL[,...][;min_copies=N]`: a copy of every
    /// chunk and version on each of the listed stores (see [`Stash::mirrored`]).
    ///
    /// A directory (or a mirror's directory replica) is made a stash if it is missing
    /// or empty; [`open_url_existing`](Stash::open_url_existing) refuses that instead.
    ///
    /// # Errors
    /// [`StoreError::InvalidUrl`] (an empty path among them),
    /// [`StoreError::BackendNotCompiled`], or what opening the backend reports.
    pub fn open_url(url: &str) -> Result<Stash, StoreError> {
        Stash::open_url_with(url, Create::IfMissing)
    }

    /// [`open_url`](Stash::open_url) for reading and maintenance: the stash must exist
    /// already, so that a mistyped path or prefix is an error, not an empty stash. A
    /// directory must be a stash; an S3 prefix or PostgreSQL table must hold a version
    /// (which also checks, at once, that the server answers); a mirror needs one replica
    /// that is a stash, and makes the missing others again (empty) for
    /// [`repair`](Stash::repair) to fill.
    ///
    /// # Errors
    /// [`StoreError::NoStash`] if there is no stash there; what listing a remote store
    /// reports (an unreachable server); as [`open_url`](Stash::open_url).
    pub fn open_url_existing(url: &str) -> Result<Stash, StoreError> {
        Stash::open_url_with(url, Create::Never)
    }

    fn open_url_with(url: &str, create: Create) -> Result<Stash, StoreError> {
        let mut stash = Stash::open_url_unnamed(url, create)?;
        if url.starts_with("mirror:") || url.contains("://") {
            // A plain path was recorded, made absolute, by `open`.
            stash.set_url(url.to_string());
        }
        Ok(stash)
    }

    fn open_url_unnamed(url: &str, create: Create) -> Result<Stash, StoreError> {
        if let Some(list) = url.strip_prefix("mirror:") {
            let invalid = |reason: String| StoreError::invalid_url(url, reason);
            let (list, options) = list.split_once(';').unwrap_or((list, ""));
            let urls: Vec<&str> = list.split(',').map(str::trim).collect();
            if urls.iter().any(|u| u.is_empty()) {
                return Err(invalid("an empty replica in the list (expected mirror:URL,URL,...)".into()));
            }
            if urls.iter().any(|u| u.starts_with("mirror:")) {
                return Err(invalid("a mirror cannot list another mirror".into()));
            }
            let mut min_copies = urls.len();
            for option in options.split(';').filter(|o| !o.trim().is_empty()) {
                match option.trim().split_once('=') {
                    Some(("min_copies", n)) => {
                        min_copies = n
                            .trim()
                            .parse()
                            .map_err(|_| invalid(format!("min_copies `{n}` is not a number")))?;
                    }
                    _ => return Err(invalid(format!("unknown option `{option}` (known: min_copies=N)"))),
                }
            }
            let replicas = match create {
                Create::IfMissing => {
                    urls.iter().map(|u| open_blob_store(u, create)).collect::<Result<Vec<_>, _>>()?
                }
                // The mirror exists when one of its replicas does: the others (deleted,
                // replaced by an empty disk) are made again, for `repair` to fill.
                Create::Never => {
                    let mut found = Vec::with_capacity(urls.len());
                    for u in &urls {
                        match open_blob_store(u, Create::Never) {
                            Ok(store) => found.push(Some(store)),
                            Err(StoreError::NoStash { .. }) => found.push(None),
                            Err(other) => return Err(other),
                        }
                    }
                    if found.iter().all(Option::is_none) {
                        return Err(StoreError::NoStash { path: redact_url(url) });
                    }
                    let made = |(store, u): (Option<Box<dyn BlobStore>>, &&str)| match store {
                        Some(store) => Ok(store),
                        None => open_blob_store(u, Create::IfMissing),
                    };
                    found.into_iter().zip(&urls).map(made).collect::<Result<Vec<_>, _>>()?
                }
            };
            return Stash::mirrored(replicas, min_copies);
        }
        if url.contains("://") && !url.starts_with("file://") {
            return Ok(Stash::with_store(open_blob_store(url, create)?));
        }
        Stash::open_directory(Path::new(local_path(url)?), create)
    }

    /// A stash that keeps a copy of every chunk and version record on each of `replicas`
    /// (two or more), so that losing or damaging all but one of them loses nothing:
    /// - a save writes to every replica and succeeds when `min_copies` of them took it;
    /// - a load reads the first intact copy (chunks hash to their name, records carry a
    ///   checksum), and writes a good chunk back over a missing or damaged one it met;
    /// - [`repair`](Stash::repair) brings every replica back to a full, intact copy
    ///   (after a replica was down, replaced or damaged);
    /// - deleting a version needs every replica (a copy left behind would come back at
    ///   the next repair; run the delete again).
    ///
    /// Each replica is a whole stash on its own: any one of them opened alone loads
    /// every version that was saved with all copies.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for fewer than two replicas, or `min_copies` of 0 or more
    /// than there are replicas.
    pub fn mirrored(replicas: Vec<Box<dyn BlobStore>>, min_copies: usize) -> Result<Stash, StoreError> {
        Ok(Stash::with_store(Box::new(super::mirror::MirrorStore::new(replicas, min_copies)?)))
    }

    /// A stash over any [`BlobStore`].
    pub fn with_store(blobs: Box<dyn BlobStore>) -> Stash {
        Stash::from_parts(blobs, None)
    }

    fn from_parts(blobs: Box<dyn BlobStore>, index: Option<RecordIndex>) -> Stash {
        Stash { inner: Arc::new(Inner { blobs, index, url: None }), progress: None }
    }

    /// This stash with `observer` told how every save and load of a value goes, after each
    /// chunk ([`CHUNK_SIZE`] bytes), from the threads that move them: for progress bars
    /// and logs on large values. Clones made after this share the observer; the stash's
    /// data is shared with the handle this was called on.
    #[must_use]
    pub fn with_progress(mut self, observer: impl Fn(TransferProgress<'_>) + Send + Sync + 'static) -> Stash {
        self.progress = Some(Arc::new(observer));
        self
    }

    /// Counts `len` more bytes of a value's chunks saved or loaded (in the
    /// `tessera_stash_bytes_{saved,loaded}_total` metrics too) and tells the observer.
    fn advance(&self, kind: TransferKind, name: &str, done: &AtomicU64, len: usize, total: u64) {
        match kind {
            TransferKind::Save => metrics::counter!("tessera_stash_bytes_saved_total").increment(len as u64),
            TransferKind::Load => metrics::counter!("tessera_stash_bytes_loaded_total").increment(len as u64),
            TransferKind::Repair => {}
        }
        self.notify(kind, name, done, len, total);
    }

    /// Counts `len` more bytes done of a transfer and tells the observer, if there is one
    /// (also used by distributed arrays, whose pieces are saved as entries of their own).
    pub(crate) fn notify(&self, kind: TransferKind, name: &str, done: &AtomicU64, len: usize, total: u64) {
        let done = done.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
        if let Some(observer) = &self.progress {
            observer(TransferProgress { kind, name, done, total });
        }
    }

    /// Where the stash keeps its bytes, for messages (credentials left out).
    pub fn location(&self) -> String {
        self.inner.blobs.location()
    }

    /// What another process opens (with [`open_url`](Stash::open_url)) to reach this
    /// stash: the path or URL it was opened from, credentials included; for a stash made
    /// over custom stores, its location (which other processes may not be able to open).
    pub(crate) fn url_for_others(&self) -> String {
        self.inner.url.clone().unwrap_or_else(|| self.location())
    }

    fn blobs(&self) -> &dyn BlobStore {
        &*self.inner.blobs
    }

    /// Checks a name and tags ([`validate`]), and that the name's key segment fits this
    /// store's keys.
    fn validate(&self, name: &str, tags: &[(&str, &str)]) -> Result<(), StoreError> {
        validate(name, tags)?;
        if let Some(limit) = self.blobs().key_segment_limit() {
            let escaped_len = record::escape_name(name).len();
            if escaped_len > limit {
                return Err(StoreError::NameTooLong {
                    name: name.to_string(),
                    escaped_len,
                    limit,
                    location: self.location(),
                });
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- saving

    /// Saves `value` as a new version of `name`, with `tags` (`key=value` pairs).
    ///
    /// Owned ndarray arrays (`Array<A, D>` for the element types of [`ArrayElement`])
    /// are stored in the compact array layout; other values with bincode.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad name or tag, [`StoreError::Encode`] if serde
    /// fails, or the backend's I/O error. On error no version is listed.
    pub fn save<T: Serialize + 'static>(
        &self,
        name: &str,
        value: &T,
        tags: &[(&str, &str)],
    ) -> Result<Version, StoreError> {
        if let Some(bytes) = array::detect_array(value as &dyn Any) {
            return self.save_array_bytes(name, bytes, tags);
        }
        let type_name = std::any::type_name::<T>();
        self.validate(name, tags)?;
        let payload = bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| {
            StoreError::Encode {
                name: name.to_string(),
                type_name: type_name.to_string(),
                message: e.to_string(),
            }
        })?;
        self.save_payload(name, type_name.to_string(), Layout::Bincode, &[], &payload, tags)
    }

    /// Saves an array (any ndarray storage, any layout) in the compact array layout.
    ///
    /// # Errors
    /// As [`save`](Stash::save).
    pub fn save_array<A, S, D>(
        &self,
        name: &str,
        array: &ArrayBase<S, D>,
        tags: &[(&str, &str)],
    ) -> Result<Version, StoreError>
    where
        A: ArrayElement,
        S: Data<Elem = A>,
        D: Dimension,
    {
        self.save_array_bytes(name, array::array_bytes(array), tags)
    }

    /// Saves a value that is already bincode-encoded, recording `type_name` (the store
    /// actor on a node saves values it holds this way, without decoding them).
    pub(crate) fn save_encoded(
        &self,
        name: &str,
        type_name: &str,
        payload: &[u8],
        tags: &[(&str, &str)],
    ) -> Result<Version, StoreError> {
        self.validate(name, tags)?;
        self.save_payload(name, type_name.to_string(), Layout::Bincode, &[], payload, tags)
    }

    /// Whether values of type `T` are stored in the array layout.
    pub(crate) fn uses_array_layout<T: 'static>() -> bool {
        array::array_kind::<T>().is_some()
    }

    fn save_array_bytes(
        &self,
        name: &str,
        bytes: array::ArrayBytes<'_>,
        tags: &[(&str, &str)],
    ) -> Result<Version, StoreError> {
        self.validate(name, tags)?;
        let layout = Layout::Array {
            dtype: bytes.dtype,
            shape: bytes.shape.iter().map(|&d| d as u64).collect(),
            header_len: bytes.header.len() as u32,
        };
        self.save_payload(name, array::array_type_name(bytes.dtype), layout, &bytes.header, &bytes.body, tags)
    }

    fn save_payload(
        &self,
        name: &str,
        type_name: String,
        layout: Layout,
        head: &[u8],
        body: &[u8],
        tags: &[(&str, &str)],
    ) -> Result<Version, StoreError> {
        let total = head.len() + body.len();
        let count = total.div_ceil(CHUNK_SIZE);
        let next = AtomicUsize::new(0);
        let chunks = self.write_chunks(name, total as u64, count, &|| {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                return Ok(None);
            }
            let start = i * CHUNK_SIZE;
            Ok(Some((i, slice_of(head, body, start, (start + CHUNK_SIZE).min(total)))))
        })?;
        self.commit_record(name, type_name, layout, total as u64, chunks, tags)
    }

    /// Writes the record of a new version whose chunks are stored.
    fn commit_record(
        &self,
        name: &str,
        type_name: String,
        layout: Layout,
        size: u64,
        chunks: Vec<ChunkRef>,
        tags: &[(&str, &str)],
    ) -> Result<Version, StoreError> {
        let version = Version::now();
        let record = Record {
            name: name.to_string(),
            version,
            fingerprint: fingerprint(&type_name, &layout),
            type_name,
            size,
            checksum: Record::checksum_of(size, &chunks),
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            layout,
            chunks,
        };
        let prefix = record::record_prefix(name);
        self.blobs().put(&format!("{prefix}{version}"), &record.encode())?;
        self.blobs().sync(&prefix)?;
        Ok(version)
    }

    /// Saves the bytes of the file at `path` as a new version of `name`, streamed: at most
    /// a chunk per transfer thread is in memory, whatever the file's size. The version is
    /// a byte string (`serde_bytes::ByteBuf`): load it with [`load`](Stash::load) as
    /// `ByteBuf`, or back into a file with [`load_to_file`](Stash::load_to_file).
    ///
    /// # Errors
    /// [`StoreError::Io`] if the file cannot be read, is not a regular file (a pipe or
    /// a device, whose length is unknown), or changes size while it is read; as
    /// [`save`](Stash::save).
    pub fn save_file(
        &self,
        name: &str,
        path: impl AsRef<Path>,
        tags: &[(&str, &str)],
    ) -> Result<Version, StoreError> {
        use std::io::Read;
        let path = path.as_ref();
        self.validate(name, tags)?;
        let file = std::fs::File::open(path).map_err(|e| StoreError::io("open", path, e))?;
        let meta = file.metadata().map_err(|e| StoreError::io("stat", path, e))?;
        if !meta.is_file() {
            // A pipe or a device has no length to check the bytes read against.
            let e = std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file (a pipe or device): copy it to a file first, or save its bytes",
            );
            return Err(StoreError::io("open", path, e));
        }
        let len = meta.len();
        // The value is a byte string: its bincode length prefix, then the file's bytes.
        let head = bincode::serde::encode_to_vec(len, bincode::config::standard()).map_err(|e| {
            StoreError::Encode {
                name: name.to_string(),
                type_name: bytes_type().to_string(),
                message: e.to_string(),
            }
        })?;
        let total = head.len() as u64 + len;
        let count = usize::try_from(total.div_ceil(CHUNK_SIZE as u64)).unwrap_or(usize::MAX);
        // The chunks are read in order under the lock; hashing and storing run in parallel.
        let stream = Mutex::new((0usize, std::io::Cursor::new(head).chain(file)));
        let changed = || {
            let e = std::io::Error::other(format!("the file is no longer {len} bytes long"));
            StoreError::io("read", path, e)
        };
        let chunks = self.write_chunks(name, total, count, &|| {
            let mut stream = lock(&stream);
            let (index, reader) = &mut *stream;
            let mut chunk = Vec::with_capacity(CHUNK_SIZE);
            let read = reader
                .take(CHUNK_SIZE as u64)
                .read_to_end(&mut chunk)
                .map_err(|e| StoreError::io("read", path, e))?;
            let expected = (total - (*index as u64 * CHUNK_SIZE as u64).min(total)).min(CHUNK_SIZE as u64);
            if read as u64 != expected {
                return Err(changed());
            }
            if read == 0 {
                // Past the end: the file must not have grown.
                let mut probe = [0u8; 1];
                return match reader.read(&mut probe) {
                    Ok(0) => Ok(None),
                    Ok(_) => Err(changed()),
                    Err(e) => Err(StoreError::io("read", path, e)),
                };
            }
            let i = *index;
            *index += 1;
            Ok(Some((i, Cow::Owned(chunk))))
        })?;
        self.commit_record(name, bytes_type().to_string(), Layout::Bincode, total, chunks, tags)
    }

    /// Hashes and stores the chunks that `next` hands out (index and bytes, every index
    /// below `count` once, then `None`) on several threads; `total` is their size in all.
    fn write_chunks<'a>(
        &self,
        name: &str,
        total: u64,
        count: usize,
        next: &ChunkSource<'a>,
    ) -> Result<Vec<ChunkRef>, StoreError> {
        let done = AtomicU64::new(0);
        let results: Mutex<Vec<Option<ChunkRef>>> = Mutex::new(vec![None; count]);
        let failed = AtomicBool::new(false);
        let first_error: Mutex<Option<StoreError>> = Mutex::new(None);
        let threads = self.blobs().parallelism().min(count).max(1);
        let batch = self.blobs().batch();
        let fail = |e: StoreError| {
            failed.store(true, Ordering::Relaxed);
            lock(&first_error).get_or_insert(e);
        };
        let work = || {
            while !failed.load(Ordering::Relaxed) {
                let (i, bytes) = match next() {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(e) => {
                        fail(e);
                        break;
                    }
                };
                let chunk = ChunkRef { hash: *blake3::hash(&bytes).as_bytes(), len: bytes.len() as u32 };
                let key = chunk.key();
                // A chunk already stored is touched so that gc keeps it; if a gc took it
                // away before the touch landed, it is written again.
                let stored = self.blobs().has(&key, bytes.len() as u64).and_then(|present| {
                    if present && self.blobs().touch(&key)? {
                        Ok(())
                    } else {
                        batch.put(&key, &bytes)
                    }
                });
                match stored {
                    Ok(()) => {
                        if let Some(slot) = lock(&results).get_mut(i) {
                            *slot = Some(chunk);
                        }
                        self.advance(TransferKind::Save, name, &done, bytes.len(), total);
                    }
                    Err(e) => fail(e),
                }
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(work);
            }
            work();
        });
        if let Some(e) = lock(&first_error).take() {
            return Err(e);
        }
        batch.commit()?;
        self.blobs().sync("chunks/")?;
        let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        results
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                c.ok_or_else(|| StoreError::Invalid {
                    what: "save",
                    value: format!("{name} (chunk {i} of {count})"),
                    reason: "the chunk was never produced",
                })
            })
            .collect()
    }

    // ---------------------------------------------------------------- loading

    /// Loads the latest version of `name` as a `T`.
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; [`StoreError::TypeMismatch`] (naming the stored type)
    /// if it was saved as another type; [`StoreError::Checksum`],
    /// [`StoreError::MissingChunk`] or [`StoreError::ChunkLength`] if its bytes are
    /// damaged; [`StoreError::CorruptRecord`] if its record is.
    pub fn load<T: DeserializeOwned + 'static>(&self, name: &str) -> Result<T, StoreError> {
        let record = self.latest_record(name)?;
        self.decode_record(&record)
    }

    /// Loads one version of `name`.
    ///
    /// # Errors
    /// As [`load`](Stash::load).
    pub fn load_version<T: DeserializeOwned + 'static>(
        &self,
        name: &str,
        version: Version,
    ) -> Result<T, StoreError> {
        let record = self.record(name, version)?;
        self.decode_record(&record)
    }

    /// Loads the latest version of `name` tagged `key=value`.
    ///
    /// # Errors
    /// [`StoreError::TagNotFound`], or as [`load`](Stash::load).
    pub fn load_tagged<T: DeserializeOwned + 'static>(
        &self,
        name: &str,
        key: &str,
        value: &str,
    ) -> Result<T, StoreError> {
        let record = self.tagged_record(name, key, value)?;
        self.decode_record(&record)
    }

    /// Writes a byte-string version of `name` (the latest, or `version`), such as one made
    /// by [`save_file`](Stash::save_file), to the file at `path`, streamed: a chunk per
    /// transfer thread is in memory, whatever the size. The bytes go to a temporary file
    /// beside `path` that is renamed over it only once every chunk has been checked, so a
    /// damaged version or a failed write never leaves a partial file. Returns the number
    /// of bytes written.
    ///
    /// # Errors
    /// [`StoreError::TypeMismatch`] if the version is not a byte string;
    /// [`StoreError::Io`] if the file cannot be written; as [`load`](Stash::load).
    pub fn load_to_file(
        &self,
        name: &str,
        version: Option<Version>,
        path: impl AsRef<Path>,
    ) -> Result<u64, StoreError> {
        let path = path.as_ref();
        let ByteString { record, first, prefix, len } = self.byte_string(name, version)?;
        let file_name = path
            .file_name()
            .ok_or_else(|| StoreError::io("write", path, std::io::Error::other("the path names no file")))?;
        let mut temp_name = file_name.to_os_string();
        temp_name.push(format!(".partial-{}", std::process::id()));
        let temp = path.with_file_name(temp_name);
        let written = self.write_chunks_to(&record, &temp, first, prefix);
        let finished = written
            .and_then(|()| std::fs::rename(&temp, path).map_err(|e| StoreError::io("rename", path, e)));
        if finished.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        finished.map(|()| len)
    }

    /// Writes a byte-string version of `name` (the latest, or `version`) to `out` in
    /// order, streamed: one chunk ([`CHUNK_SIZE`]) is in memory at a time, whatever the
    /// size; each chunk is checked before it is written. For outputs that cannot be
    /// renamed into place (standard output): if a chunk turns out damaged, what was
    /// written before it stays written, and the error says so. Returns the number of
    /// bytes written.
    ///
    /// # Errors
    /// As [`load_to_file`](Stash::load_to_file); [`StoreError::Io`] (path `(output)`)
    /// if `out` fails.
    pub fn load_to_writer(
        &self,
        name: &str,
        version: Option<Version>,
        out: &mut dyn std::io::Write,
    ) -> Result<u64, StoreError> {
        let ByteString { record, first, prefix, len } = self.byte_string(name, version)?;
        let output = Path::new("(output)");
        let write = |out: &mut dyn std::io::Write, bytes: &[u8]| {
            out.write_all(bytes).map_err(|e| StoreError::io("write", output, e))
        };
        let done = AtomicU64::new(0);
        write(out, &first[prefix..])?;
        self.advance(TransferKind::Load, &record.name, &done, first.len(), record.size);
        let mut buffer = first;
        for chunk in &record.chunks[1..] {
            buffer.resize(chunk.len as usize, 0);
            self.read_chunk(&record, chunk, &mut buffer)?;
            write(out, &buffer)?;
            self.advance(TransferKind::Load, &record.name, &done, buffer.len(), record.size);
        }
        out.flush().map_err(|e| StoreError::io("write", output, e))?;
        Ok(len)
    }

    /// The record of a byte-string version, checked, with its first chunk read and the
    /// string's length decoded from it.
    fn byte_string(&self, name: &str, version: Option<Version>) -> Result<ByteString, StoreError> {
        let record = match version {
            Some(version) => self.record(name, version)?,
            None => self.latest_record(name)?,
        };
        if record.layout != Layout::Bincode || record.type_name != bytes_type() {
            return Err(mismatch(&record, bytes_type().to_string()));
        }
        let corrupt = |reason: String| StoreError::CorruptRecord {
            key: record::record_key(&record.name, record.version),
            reason,
        };
        let chunked: u64 = record.chunks.iter().map(|c| u64::from(c.len)).sum();
        if chunked != record.size || record.chunks.is_empty() {
            return Err(corrupt(format!("chunks hold {chunked} bytes, record says {}", record.size)));
        }
        // The first chunk starts with the byte string's length prefix.
        let mut first = vec![0u8; record.chunks[0].len as usize];
        self.read_chunk(&record, &record.chunks[0], &mut first)?;
        let (len, prefix): (u64, usize) = crate::codec::decode_slice(&first)
            .map_err(|e| corrupt(format!("no byte-string length at the start: {e}")))?;
        if prefix as u64 + len != record.size {
            return Err(corrupt(format!("a {len}-byte string in {} bytes", record.size)));
        }
        Ok(ByteString { record, first, prefix, len })
    }

    /// Reads every chunk of `record` (the first one already read: `first`) and writes the
    /// bytes after the first `skip` of the stream to a new file at `temp`, then syncs it.
    fn write_chunks_to(
        &self,
        record: &Record,
        temp: &Path,
        first: Vec<u8>,
        skip: usize,
    ) -> Result<(), StoreError> {
        use std::io::{Seek, SeekFrom, Write};
        let file = std::fs::File::create(temp).map_err(|e| StoreError::io("create", temp, e))?;
        let file = Mutex::new(file);
        let write_at = |offset: u64, bytes: &[u8]| -> Result<(), StoreError> {
            let mut file = lock(&file);
            file.seek(SeekFrom::Start(offset)).map_err(|e| StoreError::io("seek", temp, e))?;
            file.write_all(bytes).map_err(|e| StoreError::io("write", temp, e))
        };
        let done = AtomicU64::new(0);
        write_at(0, &first[skip..])?;
        self.advance(TransferKind::Load, &record.name, &done, first.len(), record.size);
        let mut starts = Vec::with_capacity(record.chunks.len());
        let mut offset = 0u64;
        for chunk in &record.chunks {
            starts.push(offset);
            offset += u64::from(chunk.len);
        }
        let next = AtomicUsize::new(1);
        let first_error: Mutex<Option<StoreError>> = Mutex::new(None);
        let threads = self.blobs().parallelism().min(record.chunks.len()).max(1);
        let work = || {
            let mut buffer = Vec::new();
            while lock(&first_error).is_none() {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(chunk) = record.chunks.get(i) else { break };
                buffer.resize(chunk.len as usize, 0);
                let result = self
                    .read_chunk(record, chunk, &mut buffer)
                    .and_then(|()| write_at(starts[i] - skip as u64, &buffer));
                match result {
                    Ok(()) => {
                        self.advance(TransferKind::Load, &record.name, &done, buffer.len(), record.size)
                    }
                    Err(e) => {
                        lock(&first_error).get_or_insert(e);
                    }
                }
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(work);
            }
            work();
        });
        if let Some(e) = lock(&first_error).take() {
            return Err(e);
        }
        let file = file.into_inner().unwrap_or_else(|p| p.into_inner());
        file.sync_all().map_err(|e| StoreError::io("fsync", temp, e))
    }

    /// Loads the latest version of `name` as an array.
    ///
    /// # Errors
    /// [`StoreError::TypeMismatch`] if it is not an array of `A` with `D`'s number of
    /// dimensions, or as [`load`](Stash::load).
    pub fn load_array<A: ArrayElement, D: Dimension>(&self, name: &str) -> Result<Array<A, D>, StoreError> {
        let record = self.latest_record(name)?;
        self.read_array(&record)
    }

    /// Loads one version of `name` as an array.
    ///
    /// # Errors
    /// As [`load_array`](Stash::load_array).
    pub fn load_array_version<A: ArrayElement, D: Dimension>(
        &self,
        name: &str,
        version: Version,
    ) -> Result<Array<A, D>, StoreError> {
        let record = self.record(name, version)?;
        self.read_array(&record)
    }

    fn decode_record<T: DeserializeOwned + 'static>(&self, record: &Record) -> Result<T, StoreError> {
        if array::array_kind::<T>().is_some() {
            return self.load_detected_array::<T>(record);
        }
        let requested = std::any::type_name::<T>();
        if record.layout != Layout::Bincode || record.type_name != requested {
            return Err(mismatch(record, requested.to_string()));
        }
        let mut bytes = vec![0u8; record.size as usize];
        self.read_payload(record, &mut [], &mut bytes)?;
        let (value, _) = crate::codec::decode_slice(&bytes).map_err(|e| StoreError::Decode {
            name: record.name.clone(),
            version: record.version,
            type_name: requested.to_string(),
            message: e.to_string(),
        })?;
        Ok(value)
    }

    /// `T` is `Array<A, D>` for a supported `A` and `D`: read it and hand it back as `T`.
    fn load_detected_array<T: 'static>(&self, record: &Record) -> Result<T, StoreError> {
        macro_rules! try_types {
            ($($a:ty),*) => {$(
                try_dims!($a; ndarray::IxDyn, ndarray::Ix0, ndarray::Ix1, ndarray::Ix2,
                          ndarray::Ix3, ndarray::Ix4, ndarray::Ix5, ndarray::Ix6);
            )*};
        }
        macro_rules! try_dims {
            ($a:ty; $($d:ty),*) => {$(
                if TypeId::of::<T>() == TypeId::of::<Array<$a, $d>>() {
                    let array: Box<dyn Any> = Box::new(self.read_array::<$a, $d>(record)?);
                    return Ok(*array.downcast::<T>().expect("TypeId matched"));
                }
            )*};
        }
        try_types!(f32, f64, i8, i16, i32, i64, u8, u16, u32, u64);
        Err(mismatch(record, std::any::type_name::<T>().to_string()))
    }

    fn read_array<A: ArrayElement, D: Dimension>(&self, record: &Record) -> Result<Array<A, D>, StoreError> {
        let requested = || match D::NDIM {
            Some(n) => format!("{}, {n}-d", array::array_type_name(A::DTYPE)),
            None => array::array_type_name(A::DTYPE),
        };
        let Layout::Array { dtype, shape, header_len } = &record.layout else {
            return Err(mismatch(record, requested()));
        };
        if *dtype != A::DTYPE || D::NDIM.is_some_and(|n| n != shape.len()) {
            return Err(mismatch(record, requested()));
        }
        let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let body_len = record.size.checked_sub(u64::from(*header_len));
        let corrupt = |reason: String| StoreError::CorruptRecord {
            key: record::record_key(&record.name, record.version),
            reason,
        };
        let count = match (elements, body_len) {
            (Some(n), Some(len)) if n.checked_mul(dtype.size() as u64) == Some(len) => n as usize,
            _ => {
                return Err(corrupt(format!(
                    "shape {shape:?} of {dtype} does not match size {}",
                    record.size
                )))
            }
        };
        let mut header = vec![0u8; *header_len as usize];
        let mut elements: Vec<A> = vec![A::zeroed(); count];
        self.read_payload(record, &mut header, bytemuck::cast_slice_mut(&mut elements))?;
        match array::decode_header(&header) {
            Ok((d, s)) if d == *dtype && s == *shape => {}
            Ok((d, s)) => {
                return Err(corrupt(format!("array header says {d} {s:?}, record says {dtype} {shape:?}")))
            }
            Err(reason) => return Err(corrupt(reason)),
        }
        array::to_little_endian::<A>(bytemuck::cast_slice_mut(&mut elements));
        array::build_array(shape, elements).map_err(corrupt)
    }

    /// Reads a version's bytes into `head ++ body` (whose lengths sum to its size),
    /// checking every chunk's hash, on several threads.
    fn read_payload(&self, record: &Record, head: &mut [u8], body: &mut [u8]) -> Result<(), StoreError> {
        let total: u64 = record.chunks.iter().map(|c| u64::from(c.len)).sum();
        if total != record.size || (head.len() + body.len()) as u64 != record.size {
            return Err(StoreError::CorruptRecord {
                key: record::record_key(&record.name, record.version),
                reason: format!("chunks hold {total} bytes, record says {}", record.size),
            });
        }
        struct Task<'a> {
            chunk: ChunkRef,
            head: &'a mut [u8],
            body: &'a mut [u8],
        }
        let mut tasks = Vec::with_capacity(record.chunks.len());
        let (mut head_rest, mut body_rest) = (head, body);
        for chunk in &record.chunks {
            let len = chunk.len as usize;
            let from_head = len.min(head_rest.len());
            let (h, hr) = std::mem::take(&mut head_rest).split_at_mut(from_head);
            let (b, br) = std::mem::take(&mut body_rest).split_at_mut(len - from_head);
            head_rest = hr;
            body_rest = br;
            tasks.push(Task { chunk: *chunk, head: h, body: b });
        }
        let threads = self.blobs().parallelism().min(tasks.len()).max(1);
        let queue = Mutex::new(tasks.into_iter());
        let done = AtomicU64::new(0);
        let first_error: Mutex<Option<StoreError>> = Mutex::new(None);
        let work = || loop {
            if lock(&first_error).is_some() {
                break;
            }
            let Some(task) = lock(&queue).next() else {
                break;
            };
            let result = if task.head.is_empty() {
                self.read_chunk(record, &task.chunk, task.body)
            } else {
                let mut staged = vec![0u8; task.chunk.len as usize];
                self.read_chunk(record, &task.chunk, &mut staged).map(|()| {
                    let (h, b) = staged.split_at(task.head.len());
                    task.head.copy_from_slice(h);
                    task.body.copy_from_slice(b);
                })
            };
            match result {
                Ok(()) => {
                    let len = task.chunk.len as usize;
                    self.advance(TransferKind::Load, &record.name, &done, len, record.size);
                }
                Err(e) => {
                    lock(&first_error).get_or_insert(e);
                }
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(work);
            }
            work();
        });
        let first_error = first_error.into_inner().unwrap_or_else(|p| p.into_inner());
        first_error.map_or(Ok(()), Err)
    }

    fn read_chunk(&self, record: &Record, chunk: &ChunkRef, out: &mut [u8]) -> Result<(), StoreError> {
        match self.blobs().get_into_hashed(&chunk.key(), out)? {
            None => Err(StoreError::MissingChunk {
                name: record.name.clone(),
                version: record.version,
                chunk: chunk.hex(),
            }),
            Some((len, _)) if len != out.len() as u64 => Err(StoreError::ChunkLength {
                name: record.name.clone(),
                version: record.version,
                chunk: chunk.hex(),
                expected: out.len() as u64,
                actual: len,
            }),
            Some((_, actual)) if actual != chunk.hash => Err(StoreError::Checksum {
                name: record.name.clone(),
                version: record.version,
                chunk: chunk.hex(),
                actual: record::hex(&actual),
            }),
            Some(_) => Ok(()),
        }
    }

    // ---------------------------------------------------------------- records

    fn read_record(&self, meta: &ObjectMeta) -> Result<Record, StoreError> {
        if let Some(index) = &self.inner.index {
            if let Some(record) = index.get(meta)? {
                record.check_key(&meta.key)?;
                return Ok(record);
            }
        }
        let bytes = self.blobs().get(&meta.key)?.ok_or_else(|| StoreError::CorruptRecord {
            key: meta.key.clone(),
            reason: "listed but vanished (deleted concurrently?)".into(),
        })?;
        let record = Record::decode_at(&meta.key, &bytes)?;
        if let Some(index) = &self.inner.index {
            index.insert(meta, &bytes)?;
        }
        Ok(record)
    }

    /// The record keys of `name`, oldest first, with their versions.
    fn versions_of(&self, name: &str) -> Result<Vec<(Version, ObjectMeta)>, StoreError> {
        self.validate(name, &[])?;
        let prefix = record::record_prefix(name);
        let mut out = Vec::new();
        for meta in self.blobs().list(&prefix)? {
            match parse_version(&meta.key[prefix.len()..], &meta.key) {
                Ok(version) => out.push((version, meta)),
                Err(stray) => skip_stray(&stray),
            }
        }
        out.sort_by_key(|(v, _)| *v);
        Ok(out)
    }

    /// The latest record of `name`: lists only the keys (no per-version metadata), then
    /// reads that one record.
    fn latest_record(&self, name: &str) -> Result<Record, StoreError> {
        self.validate(name, &[])?;
        let prefix = record::record_prefix(name);
        let mut latest: Option<(Version, String)> = None;
        for key in self.blobs().list_keys(&prefix)? {
            let version = match parse_version(&key[prefix.len()..], &key) {
                Ok(version) => version,
                Err(stray) => {
                    skip_stray(&stray);
                    continue;
                }
            };
            if latest.as_ref().is_none_or(|(v, _)| version > *v) {
                latest = Some((version, key));
            }
        }
        let Some((version, key)) = latest else {
            return Err(StoreError::NotFound { name: name.to_string(), version: None });
        };
        let bytes = self
            .blobs()
            .get(&key)?
            .ok_or(StoreError::NotFound { name: name.to_string(), version: Some(version) })?;
        Record::decode_at(&key, &bytes)
    }

    fn record(&self, name: &str, version: Version) -> Result<Record, StoreError> {
        self.validate(name, &[])?;
        let key = record::record_key(name, version);
        let bytes = self
            .blobs()
            .get(&key)?
            .ok_or_else(|| StoreError::NotFound { name: name.to_string(), version: Some(version) })?;
        Record::decode_at(&key, &bytes)
    }

    fn tagged_record(&self, name: &str, key: &str, value: &str) -> Result<Record, StoreError> {
        for (_, meta) in self.versions_of(name)?.iter().rev() {
            let record = self.read_record(meta)?;
            if record.tags.get(key).map(String::as_str) == Some(value) {
                return Ok(record);
            }
        }
        Err(StoreError::TagNotFound {
            name: name.to_string(),
            key: key.to_string(),
            value: value.to_string(),
        })
    }

    /// Describes one version of `name`, or its latest when `version` is `None`.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] or [`StoreError::CorruptRecord`].
    pub fn info(&self, name: &str, version: Option<Version>) -> Result<VersionInfo, StoreError> {
        match version {
            Some(v) => self.record(name, v),
            None => self.latest_record(name),
        }
        .map(|r| r.info())
    }

    /// Describes the latest version of `name` tagged `key=value`.
    ///
    /// # Errors
    /// [`StoreError::TagNotFound`] or [`StoreError::CorruptRecord`].
    pub fn info_tagged(&self, name: &str, key: &str, value: &str) -> Result<VersionInfo, StoreError> {
        self.tagged_record(name, key, value).map(|r| r.info())
    }

    /// Every version of `name`, oldest first (empty if there is none).
    ///
    /// # Errors
    /// [`StoreError::CorruptRecord`] if a record is damaged.
    pub fn history(&self, name: &str) -> Result<Vec<VersionInfo>, StoreError> {
        self.versions_of(name)?.iter().map(|(_, meta)| self.read_record(meta).map(|r| r.info())).collect()
    }

    /// The names that start with `prefix`, sorted. Files under `records/` that are not
    /// records (`records/<escaped name>/<version id>`) are skipped, with a warning.
    ///
    /// # Errors
    /// The backend's listing error.
    pub fn names(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let (records, strays) = self.all_records()?;
        strays.iter().for_each(skip_stray);
        Ok(records.into_keys().filter(|n| n.starts_with(prefix)).collect())
    }

    /// The latest version of every name that starts with `prefix`, sorted by name. Files
    /// under `records/` that are not records are skipped, with a warning.
    ///
    /// # Errors
    /// [`StoreError::CorruptRecord`] if a latest record is damaged (or is another
    /// version's record, copied to the wrong key).
    pub fn list(&self, prefix: &str) -> Result<Vec<VersionInfo>, StoreError> {
        let mut out = Vec::new();
        let (records, strays) = self.all_records()?;
        strays.iter().for_each(skip_stray);
        for (name, mut versions) in records {
            if !name.starts_with(prefix) {
                continue;
            }
            versions.sort_by_key(|(v, _)| *v);
            if let Some((_, meta)) = versions.last() {
                out.push(self.read_record(meta)?.info());
            }
        }
        Ok(out)
    }

    /// Every record key, grouped by entry name; and a [`StoreError::CorruptRecord`] for
    /// each key under `records/` that is not `records/<escaped name>/<version id>` (a
    /// stray file: callers report or skip it).
    #[allow(clippy::type_complexity)]
    fn all_records(
        &self,
    ) -> Result<(BTreeMap<String, Vec<(Version, ObjectMeta)>>, Vec<StoreError>), StoreError> {
        let mut out: BTreeMap<String, Vec<(Version, ObjectMeta)>> = BTreeMap::new();
        let mut strays = Vec::new();
        for meta in self.blobs().list("records/")? {
            let rest = &meta.key["records/".len()..];
            let bad = |reason: &str| StoreError::CorruptRecord {
                key: meta.key.clone(),
                reason: reason.to_string(),
            };
            let parsed = rest
                .split_once('/')
                .ok_or_else(|| bad("not a record: the key has no version part"))
                .and_then(|(segment, version)| {
                    let name = record::unescape_name(segment)
                        .ok_or_else(|| bad("not a record: the key has a malformed name part"))?;
                    Ok((name, parse_version(version, &meta.key)?))
                });
            match parsed {
                Ok((name, version)) => out.entry(name).or_default().push((version, meta)),
                Err(stray) => strays.push(stray),
            }
        }
        Ok((out, strays))
    }

    // ---------------------------------------------------------------- changing

    /// Sets tag `key=value` on one version (replacing that key's old value).
    ///
    /// Tagging rewrites the version's record atomically, and only while it exists: a
    /// version deleted meanwhile stays deleted (see SAFETY.md, "Tag races", for the
    /// backends that cannot check and write in one step). Two processes tagging the same
    /// version at the same moment may lose one of the two tags (last writer wins).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if the version does not exist, or was deleted before the
    /// tag landed; [`StoreError::Invalid`] for a bad tag; I/O errors.
    pub fn tag(&self, name: &str, version: Version, key: &str, value: &str) -> Result<(), StoreError> {
        self.validate(name, &[(key, value)])?;
        let mut record = self.record(name, version)?;
        record.tags.insert(key.to_string(), value.to_string());
        let prefix = record::record_prefix(name);
        if !self.blobs().replace(&format!("{prefix}{version}"), &record.encode())? {
            return Err(StoreError::NotFound { name: name.to_string(), version: Some(version) });
        }
        self.blobs().sync(&prefix)
    }

    /// Deletes one version of `name`, or all of them when `version` is `None`; returns
    /// how many versions were deleted. Their chunks are reclaimed by [`gc`](Stash::gc).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if there is nothing to delete.
    pub fn delete(&self, name: &str, version: Option<Version>) -> Result<usize, StoreError> {
        let keys: Vec<String> = match version {
            Some(v) => {
                let key = record::record_key(name, v);
                self.validate(name, &[])?;
                if self.blobs().get(&key)?.is_none() {
                    return Err(StoreError::NotFound { name: name.to_string(), version: Some(v) });
                }
                vec![key]
            }
            None => self.versions_of(name)?.into_iter().map(|(_, m)| m.key).collect(),
        };
        if keys.is_empty() {
            return Err(StoreError::NotFound { name: name.to_string(), version: None });
        }
        for key in &keys {
            self.blobs().delete(key)?;
            if let Some(index) = &self.inner.index {
                index.remove(key)?;
            }
        }
        self.blobs().sync(&record::record_prefix(name))?;
        Ok(keys.len())
    }

    /// Deletes chunks that no version names, keeping those written or reused within the
    /// last [`DEFAULT_GC_GRACE`] (a save in flight may be using them).
    ///
    /// # Errors
    /// [`StoreError::CorruptRecord`] if any record is damaged, or a file under
    /// `records/` is not a record: gc deletes no chunk then, since it cannot know what
    /// that file references.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        self.gc_with_grace(DEFAULT_GC_GRACE)
    }

    /// [`gc`](Stash::gc) with another grace period; `Duration::ZERO` reclaims every
    /// unreferenced chunk at once (safe only when no save is running).
    ///
    /// # Errors
    /// As [`gc`](Stash::gc).
    pub fn gc_with_grace(&self, grace: Duration) -> Result<GcReport, StoreError> {
        let cutoff = SystemTime::now().checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut report =
            GcReport { temporaries_removed: self.blobs().remove_temporaries(cutoff)?, ..GcReport::default() };
        let mut live = HashSet::new();
        let (records, mut strays) = self.all_records()?;
        if !strays.is_empty() {
            // A file under records/ that is not a record may still be one kept under the
            // wrong name, naming chunks: refuse rather than guess.
            return Err(strays.swap_remove(0));
        }
        for versions in records.values() {
            for (_, meta) in versions {
                let bytes = self.blobs().get(&meta.key)?;
                // A record deleted since the listing references nothing.
                let Some(bytes) = bytes else { continue };
                live.extend(Record::decode_at(&meta.key, &bytes)?.chunks.iter().map(|c| c.hash));
            }
        }
        for meta in self.blobs().list("chunks/")? {
            let hash = parse_hash(&meta.key["chunks/".len()..]);
            if hash.is_some_and(|h| live.contains(&h)) {
                report.chunks_live += 1;
            } else if meta.modified.is_some_and(|m| m > cutoff) {
                report.chunks_young += 1;
            } else if self.blobs().delete_if_untouched(&meta.key, cutoff)? {
                // The listed time may be stale: a save may have reused (touched) the
                // chunk since, and committed a record naming it that this gc never read.
                // The store deletes it only if it still is untouched, atomically with
                // `touch` (SAFETY.md, "gc while saves run").
                report.chunks_deleted += 1;
                report.bytes_freed += meta.size;
            } else {
                report.chunks_young += 1;
            }
        }
        self.blobs().sync("chunks/")?;
        Ok(report)
    }

    /// Reads every version's chunks and checks their hashes; reports every problem
    /// instead of stopping at the first.
    ///
    /// # Errors
    /// Only when the store cannot be listed; damage goes into the report.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let mut good: HashSet<[u8; 32]> = HashSet::new();
        let mut buf = Vec::new();
        let (records, strays) = self.all_records()?;
        report.problems.extend(strays);
        for versions in records.values() {
            for (_, meta) in versions {
                let record = match self.blobs().get(&meta.key).and_then(|bytes| match bytes {
                    Some(bytes) => Record::decode_at(&meta.key, &bytes).map(Some),
                    None => Ok(None),
                }) {
                    Ok(Some(record)) => record,
                    Ok(None) => continue,
                    Err(e) => {
                        report.problems.push(e);
                        continue;
                    }
                };
                report.versions += 1;
                for chunk in &record.chunks {
                    if good.contains(&chunk.hash) {
                        continue;
                    }
                    buf.resize(chunk.len as usize, 0);
                    report.chunks += 1;
                    report.bytes += u64::from(chunk.len);
                    match self.read_chunk(&record, chunk, &mut buf) {
                        Ok(()) => {
                            good.insert(chunk.hash);
                        }
                        Err(e) => report.problems.push(e),
                    }
                }
            }
        }
        Ok(report)
    }

    /// Checks every chunk and version record on every replica of a mirrored stash
    /// ([`Stash::mirrored`], `mirror:` URLs) and copies an intact copy over each missing or
    /// damaged one: chunks first, then records, so a replica never lists a version whose
    /// chunks it lacks. Progress goes to the [`with_progress`](Stash::with_progress)
    /// observer (kind [`TransferKind::Repair`]). A stash with one copy has nothing to
    /// repair (use [`verify`](Stash::verify)).
    ///
    /// # Errors
    /// Only when too few replicas can be listed; damage that cannot be repaired and
    /// replicas that failed go into the report.
    pub fn repair(&self) -> Result<RepairReport, StoreError> {
        let location = self.location();
        let observer = |done: u64, total: u64| {
            if let Some(observer) = &self.progress {
                observer(TransferProgress { kind: TransferKind::Repair, name: &location, done, total });
            }
        };
        self.blobs().repair(&observer)
    }

    /// Counts versions and chunks.
    ///
    /// # Errors
    /// The backend's listing error.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let chunks = self.blobs().list("chunks/")?;
        Ok(StoreStats {
            versions: self.blobs().list("records/")?.len(),
            chunks: chunks.len(),
            chunk_bytes: chunks.iter().map(|m| m.size).sum(),
        })
    }

    // ---------------------------------------------------------------- async

    /// [`save`](Stash::save) on tokio's blocking pool.
    ///
    /// # Errors
    /// [`StoreError::NoRuntime`] outside a tokio runtime, or as [`save`](Stash::save).
    ///
    /// # Cancel safety
    /// Dropping the future does not stop the save; it completes (or fails) in the
    /// background and its version is listed if it completes.
    pub async fn save_async<T>(
        &self,
        name: &str,
        value: T,
        tags: &[(&str, &str)],
    ) -> Result<Version, StoreError>
    where
        T: Serialize + Send + 'static,
    {
        let this = self.clone();
        let name = name.to_string();
        let tags: Vec<(String, String)> = tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        blocking(move || {
            let tags: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            this.save(&name, &value, &tags)
        })
        .await
    }

    /// [`load`](Stash::load) on tokio's blocking pool.
    ///
    /// # Errors
    /// [`StoreError::NoRuntime`] outside a tokio runtime, or as [`load`](Stash::load).
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future only discards the value.
    pub async fn load_async<T>(&self, name: &str) -> Result<T, StoreError>
    where
        T: DeserializeOwned + Send + 'static,
    {
        let this = self.clone();
        let name = name.to_string();
        blocking(move || this.load::<T>(&name)).await
    }
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| StoreError::NoRuntime)?;
    match handle.spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(StoreError::NoRuntime),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes `start..end` of `head ++ body`, borrowed unless the range spans both.
/// The type a byte string is saved as by [`Stash::save_file`] and read as by
/// [`Stash::load_to_file`].
fn bytes_type() -> &'static str {
    std::any::type_name::<serde_bytes::ByteBuf>()
}

fn slice_of<'a>(head: &'a [u8], body: &'a [u8], start: usize, end: usize) -> Cow<'a, [u8]> {
    let h = head.len();
    if start >= h {
        Cow::Borrowed(&body[start - h..end - h])
    } else if end <= h {
        Cow::Borrowed(&head[start..end])
    } else {
        let mut bytes = Vec::with_capacity(end - start);
        bytes.extend_from_slice(&head[start..]);
        bytes.extend_from_slice(&body[..end - h]);
        Cow::Owned(bytes)
    }
}

/// BLAKE3 of the type name and layout kind, truncated to 128 bits.
fn fingerprint(type_name: &str, layout: &Layout) -> [u8; 16] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(type_name.as_bytes());
    match layout {
        Layout::Bincode => hasher.update(b"\0bincode2-standard"),
        Layout::Array { dtype, .. } => hasher.update(format!("\0array1-{dtype}").as_bytes()),
    };
    let mut out = [0; 16];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    out
}

fn mismatch(record: &Record, requested: String) -> StoreError {
    let stored = match &record.layout {
        Layout::Array { shape, .. } => {
            format!("{}, {}-d, shape {shape:?}", record.type_name, shape.len())
        }
        _ => record.type_name.clone(),
    };
    StoreError::TypeMismatch { name: record.name.clone(), version: record.version, stored, requested }
}

fn parse_version(text: &str, key: &str) -> Result<Version, StoreError> {
    text.parse().map_err(|_| StoreError::CorruptRecord {
        key: key.to_string(),
        reason: "not a record: the key does not end in a version id".into(),
    })
}

/// Warns about a file under `records/` that is not a record, which a listing skips
/// (`verify` reports it).
fn skip_stray(stray: &StoreError) {
    tracing::warn!("skipped: {stray} (tessera stash verify reports it; move the file away)");
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn validate(name: &str, tags: &[(&str, &str)]) -> Result<(), StoreError> {
    let invalid =
        |what, value: &str, reason| Err(StoreError::Invalid { what, value: value.to_string(), reason });
    if name.is_empty() {
        return invalid("name", name, "names cannot be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return invalid("name", name, "names are at most 1024 bytes");
    }
    if name.chars().any(char::is_control) {
        return invalid("name", name, "names cannot hold control characters");
    }
    for (key, value) in tags {
        if key.is_empty() || key.contains('=') || key.chars().any(char::is_control) {
            return invalid("tag key", key, "tag keys are non-empty, without `=` or control characters");
        }
        if value.chars().any(char::is_control) {
            return invalid("tag value", value, "tag values cannot hold control characters");
        }
    }
    Ok(())
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Stash>();
};

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_redacted_for_messages() {
        use super::redact_url;
        assert_eq!(redact_url("/data/stash"), "/data/stash");
        assert_eq!(redact_url("s3://bucket/p?endpoint=http://h:9000&secret_access_key=S"), "s3://bucket/p?…");
        assert_eq!(redact_url("postgres://me:pw@db:5432/x?table=t"), "postgres://me@db:5432/x?…");
        assert_eq!(
            redact_url("mirror:/a,s3://b/p?secret_access_key=S;min_copies=1"),
            "mirror:/a,s3://b/p?…;min_copies=1"
        );
    }

    use super::*;

    /// A directory store that runs a hook once, right after the first listing or read
    /// under a prefix: to put one operation exactly inside another.
    struct ListHook {
        inner: LocalStore,
        /// Fires after the first list or get of a key starting with this.
        on: &'static str,
        hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl ListHook {
        fn new(root: &Path, on: &'static str, hook: impl FnOnce() + Send + 'static) -> ListHook {
            ListHook {
                inner: LocalStore::new(root.to_path_buf()),
                on,
                hook: Mutex::new(Some(Box::new(hook))),
            }
        }

        fn run_hook(&self) {
            let hook = lock(&self.hook).take();
            if let Some(hook) = hook {
                hook();
            }
        }
    }

    impl std::fmt::Debug for ListHook {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ListHook").field("inner", &self.inner).finish()
        }
    }

    impl BlobStore for ListHook {
        fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
            self.inner.put(key, bytes)
        }
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            let got = self.inner.get(key)?;
            if key.starts_with(self.on) {
                self.run_hook();
            }
            Ok(got)
        }
        fn has(&self, key: &str, len: u64) -> Result<bool, StoreError> {
            self.inner.has(key, len)
        }
        fn touch(&self, key: &str) -> Result<bool, StoreError> {
            self.inner.touch(key)
        }
        fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
            let listed = self.inner.list(prefix)?;
            if prefix.starts_with(self.on) {
                self.run_hook();
            }
            Ok(listed)
        }
        fn delete(&self, key: &str) -> Result<(), StoreError> {
            self.inner.delete(key)
        }
        fn delete_if_untouched(&self, key: &str, since: SystemTime) -> Result<bool, StoreError> {
            self.inner.delete_if_untouched(key, since)
        }
        fn sync(&self, prefix: &str) -> Result<(), StoreError> {
            self.inner.sync(prefix)
        }
        fn location(&self) -> String {
            self.inner.location()
        }
    }

    /// A save that reuses old orphan chunks after gc listed them (with their old times)
    /// keeps them: gc must not delete chunks that a record made after its listing names.
    #[test]
    fn gc_keeps_orphan_chunks_reused_by_a_save_after_its_listing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("stash");
        let value: Vec<u8> = (0..CHUNK_SIZE * 2 + 5).map(|i| (i * 31 % 251) as u8).collect();
        let first = Stash::open(&root).unwrap();
        first.save("big", &value, &[]).unwrap();
        first.delete("big", None).unwrap();
        drop(first);
        // The orphan chunks are three hours old: past the default grace.
        let old = SystemTime::now() - Duration::from_secs(3 * 3600);
        for entry in std::fs::read_dir(root.join("chunks")).unwrap() {
            let file = std::fs::File::options().write(true).open(entry.unwrap().path()).unwrap();
            file.set_modified(old).unwrap();
        }
        let saver = Stash::with_store(Box::new(LocalStore::new(root.clone())));
        let saved = Arc::new(Mutex::new(None));
        let hook = {
            let (saver, value, saved) = (saver.clone(), value.clone(), saved.clone());
            move || *lock(&saved) = Some(saver.save("big", &value, &[]))
        };
        let gc = Stash::with_store(Box::new(ListHook::new(&root, "chunks/", hook)));
        let report = gc.gc().unwrap();
        let version = lock(&saved).take().expect("the hook ran").unwrap();
        assert_eq!(report.chunks_deleted, 0, "{report:?}");
        let problems = saver.verify().unwrap().problems;
        assert!(problems.is_empty(), "gc deleted chunks of the save it raced: {problems:?}");
        assert_eq!(saver.load_version::<Vec<u8>>("big", version).unwrap(), value);
    }

    /// A version deleted while `tag` rewrites its record stays deleted: the tag fails
    /// with `NotFound` instead of writing the record back.
    #[test]
    fn tag_racing_a_delete_does_not_bring_the_version_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("stash");
        let other = Stash::open(&root).unwrap();
        let version = other.save("n", &1u32, &[]).unwrap();
        let deleted = Arc::new(Mutex::new(None));
        let hook = {
            let (other, deleted) = (other.clone(), deleted.clone());
            // Runs right after `tag` has read the record.
            move || *lock(&deleted) = Some(other.delete("n", Some(version)))
        };
        let tagger = Stash::with_store(Box::new(ListHook::new(&root, "records/", hook)));
        let tagged = tagger.tag("n", version, "k", "v");
        assert_eq!(lock(&deleted).take().expect("the hook ran").unwrap(), 1);
        assert!(
            matches!(tagged, Err(StoreError::NotFound { version: Some(v), .. }) if v == version),
            "{tagged:?}"
        );
        assert!(other.history("n").unwrap().is_empty(), "the deleted version came back");
        // A version that exists is tagged as before.
        let kept = other.save("n", &2u32, &[]).unwrap();
        tagger.tag("n", kept, "k", "w").unwrap();
        assert_eq!(other.info("n", Some(kept)).unwrap().tags.get("k").map(String::as_str), Some("w"));
    }

    /// A chunk that gc has taken away between a save's `has` and its `touch` is written
    /// again; a gc that stopped with a chunk set aside gives it back at the next gc.
    #[test]
    fn touch_after_gc_took_a_chunk_reports_it_missing_and_gc_leftovers_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        store.put("chunks/abc", b"bytes").unwrap();
        assert!(store.touch("chunks/abc").unwrap());
        let since = SystemTime::now() + Duration::from_secs(60);
        assert!(store.delete_if_untouched("chunks/abc", since).unwrap());
        assert!(!store.touch("chunks/abc").unwrap(), "a touch of a deleted chunk counts");
        // Touched after `since`: kept, under its own name.
        store.put("chunks/def", b"more").unwrap();
        let past = SystemTime::now() - Duration::from_secs(60);
        assert!(!store.delete_if_untouched("chunks/def", past).unwrap());
        assert_eq!(store.get("chunks/def").unwrap().as_deref(), Some(&b"more"[..]));
        // A gc that died after setting a chunk aside: the next gc's first step restores it.
        std::fs::rename(dir.path().join("chunks/def"), dir.path().join("chunks/.gc-1-2-def")).unwrap();
        assert!(store.list("chunks/").unwrap().is_empty());
        store.remove_temporaries(SystemTime::now()).unwrap();
        assert_eq!(store.get("chunks/def").unwrap().as_deref(), Some(&b"more"[..]));
        let keys = store.list_keys("chunks/").unwrap();
        assert_eq!(keys, ["chunks/def"]);
    }

    /// The observer sees every chunk of a save and a load once, with the totals of the value.
    #[test]
    fn progress_counts_every_chunk_of_saves_and_loads() {
        let dir = std::env::temp_dir().join(format!("tessera-progress-{}", std::process::id()));
        /// (kind, name, done, total) of each report.
        type Seen = Vec<(TransferKind, String, u64, u64)>;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let record = seen.clone();
        let stash = Stash::open(&dir).unwrap().with_progress(move |p| {
            lock(&record).push((p.kind, p.name.to_string(), p.done, p.total));
        });
        let value: Vec<u32> = (0..(5 * CHUNK_SIZE / 4) as u32 / 2).collect(); // 2.5 chunks
        stash.save("numbers", &value, &[]).unwrap();
        let total = stash.info("numbers", None).unwrap().size;
        let loaded: Vec<u32> = stash.load("numbers").unwrap();
        assert_eq!(loaded, value);
        let seen = lock(&seen).clone();
        for kind in [TransferKind::Save, TransferKind::Load] {
            let mut done: Vec<u64> =
                seen.iter().filter(|s| s.0 == kind && s.1 == "numbers").map(|s| s.2).collect();
            done.sort_unstable();
            assert_eq!(done.len(), total.div_ceil(CHUNK_SIZE as u64) as usize, "{kind:?}: {seen:?}");
            assert_eq!(done.last(), Some(&total), "{kind:?}: {seen:?}");
            assert!(seen.iter().all(|s| s.3 == total), "{seen:?}");
        }
        drop(stash);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Files stream in and out as byte strings, interchangeable with saved `ByteBuf`s; a
    /// version that is not a byte string, or one with a damaged chunk, leaves no file.
    #[test]
    fn files_stream_in_and_out_as_byte_strings() {
        let dir = std::env::temp_dir().join(format!("tessera-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let stash = Stash::open(dir.join("stash")).unwrap();
        for len in [0usize, 1, 250, CHUNK_SIZE - 3, CHUNK_SIZE, 2 * CHUNK_SIZE + 17] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let file = dir.join("in.bin");
            std::fs::write(&file, &bytes).unwrap();
            let version = stash.save_file("file", &file, &[("len", &len.to_string())]).unwrap();
            let loaded: serde_bytes::ByteBuf = stash.load_version("file", version).unwrap();
            assert!(loaded.as_slice() == bytes.as_slice(), "save_file then load, {len} bytes");
            let out = dir.join("out.bin");
            assert_eq!(stash.load_to_file("file", None, &out).unwrap(), len as u64);
            assert!(std::fs::read(&out).unwrap() == bytes, "save_file then load_to_file, {len} bytes");
            let mut streamed = Vec::new();
            assert_eq!(stash.load_to_writer("file", Some(version), &mut streamed).unwrap(), len as u64);
            assert!(streamed == bytes, "save_file then load_to_writer, {len} bytes");
            let saved = stash.save("buf", &serde_bytes::ByteBuf::from(bytes.clone()), &[]).unwrap();
            stash.load_to_file("buf", Some(saved), &out).unwrap();
            assert!(std::fs::read(&out).unwrap() == bytes, "save then load_to_file, {len} bytes");
        }
        let out = dir.join("never.bin");
        stash.save("numbers", &vec![1u32, 2, 3], &[]).unwrap();
        let wrong = stash.load_to_file("numbers", None, &out);
        assert!(matches!(wrong, Err(StoreError::TypeMismatch { .. })), "{wrong:?}");
        // Damage the middle chunk of the largest file: the load fails and leaves nothing.
        let record = stash.latest_record("file").unwrap();
        let key = record.chunks[1].key();
        let damaged = dir.join("stash").join(&key);
        let mut bytes = std::fs::read(&damaged).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&damaged, bytes).unwrap();
        let broken = stash.load_to_file("file", None, &out);
        assert!(matches!(broken, Err(StoreError::Checksum { .. })), "{broken:?}");
        let broken = stash.load_to_writer("file", None, &mut Vec::new());
        assert!(matches!(broken, Err(StoreError::Checksum { .. })), "{broken:?}");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(!out.exists() && left.iter().all(|n| !n.to_string_lossy().contains("partial")), "{left:?}");
        drop(stash);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
