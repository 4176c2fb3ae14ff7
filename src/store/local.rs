//! The embedded blob store: one file per blob under a directory, written by temporary
//! file, fsync, and rename.
//!
//! # Invariants
//! 1. A blob file under its final name is complete and fsynced: it is written as
//!    `.tmp-*` in the same directory, fsynced, then renamed.
//! 2. Temporary files never show in [`list`](BlobStore::list); after a crash they are
//!    removed by `remove_temporaries` (called by the stash's gc).
//! 3. Directory entries become durable at [`sync`](BlobStore::sync), which fsyncs the
//!    directory; the stash calls it before it commits a record that points at them.
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use super::blob::{BlobStore, ObjectMeta, PutBatch};
use super::StoreError;

const TMP_PREFIX: &str = ".tmp-";
/// Bytes read per system call when reading and hashing a blob.
const READ_PIECE: usize = 512 << 10;

/// Blobs as files under a root directory.
#[derive(Debug)]
pub(crate) struct LocalStore {
    root: PathBuf,
    tmp_counter: AtomicU64,
}

impl LocalStore {
    pub(crate) fn new(root: PathBuf) -> LocalStore {
        LocalStore { root, tmp_counter: AtomicU64::new(0) }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn tmp_path(&self, dir: &Path) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let nanos =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        dir.join(format!("{TMP_PREFIX}{}-{n}-{nanos:x}", std::process::id()))
    }

    fn write_new(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let (tmp, file) = self.write_tmp(path, bytes)?;
        let result = file
            .sync_all()
            .map_err(|e| StoreError::io("fsync", &tmp, e))
            .and_then(|()| fs::rename(&tmp, path).map_err(|e| StoreError::io("rename", path, e)));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Writes `bytes` to a new temporary file beside `path` (not yet fsynced).
    fn write_tmp(&self, path: &Path, bytes: &[u8]) -> Result<(PathBuf, File), StoreError> {
        let dir = path.parent().unwrap_or(&self.root);
        let tmp = self.tmp_path(dir);
        let result = (|| {
            let mut file = match File::create(&tmp) {
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    create_dir_durable(dir)?;
                    File::create(&tmp)
                }
                other => other,
            }
            .map_err(|e| StoreError::io("create", &tmp, e))?;
            file.write_all(bytes).map_err(|e| StoreError::io("write", &tmp, e))?;
            Ok(file)
        })();
        match result {
            Ok(file) => Ok((tmp, file)),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Walks `dir`, pushing one entry per file; `stat` says whether to read sizes and
    /// times (otherwise they are 0 and `None`, and only directory entries are read).
    fn list_dir(
        &self,
        dir: &Path,
        key_prefix: &str,
        stat: bool,
        out: &mut Vec<ObjectMeta>,
    ) -> Result<(), StoreError> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io("list", dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("list", dir, e))?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                continue;
            };
            if name.starts_with(TMP_PREFIX) {
                continue;
            }
            let key = format!("{key_prefix}{name}");
            let is_dir = entry.file_type().map_err(|e| StoreError::io("stat", &entry.path(), e))?.is_dir();
            if is_dir {
                self.list_dir(&entry.path(), &format!("{key}/"), stat, out)?;
            } else if stat {
                let meta = entry.metadata().map_err(|e| StoreError::io("stat", &entry.path(), e))?;
                out.push(ObjectMeta::new(key, meta.len(), meta.modified().ok()));
            } else {
                out.push(ObjectMeta::new(key, 0, None));
            }
        }
        Ok(())
    }

    fn remove_tmp_in(&self, dir: &Path, older_than: SystemTime) -> Result<usize, StoreError> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StoreError::io("list", dir, e)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("list", dir, e))?;
            let meta = entry.metadata().map_err(|e| StoreError::io("stat", &entry.path(), e))?;
            let is_tmp = entry.file_name().to_str().is_some_and(|n| n.starts_with(TMP_PREFIX));
            if meta.is_dir() {
                removed += self.remove_tmp_in(&entry.path(), older_than)?;
            } else if is_tmp && meta.modified().map(|m| m < older_than).unwrap_or(false) {
                fs::remove_file(entry.path()).map_err(|e| StoreError::io("remove", &entry.path(), e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Creates `dir` and its missing ancestors, fsyncing the parent of each directory it
/// created so that the new entries survive a crash.
fn create_dir_durable(dir: &Path) -> Result<(), StoreError> {
    let mut missing = Vec::new();
    let mut current = Some(dir);
    while let Some(d) = current {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d);
        current = d.parent();
    }
    fs::create_dir_all(dir).map_err(|e| StoreError::io("mkdir", dir, e))?;
    for created in missing.iter().rev() {
        if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
    }
    Ok(())
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StoreError::io("fsync", dir, e))
}

/// The blob file at `path`, opened, with its length; `None` if there is none.
fn open_blob(path: &Path) -> Result<Option<(File, u64)>, StoreError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("open", path, e)),
    };
    let len = file.metadata().map_err(|e| StoreError::io("stat", path, e))?.len();
    Ok(Some((file, len)))
}

impl BlobStore for LocalStore {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.write_new(&self.path(key), bytes)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(key);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("read", &path, e)),
        }
    }

    fn get_into(&self, key: &str, buf: &mut [u8]) -> Result<Option<u64>, StoreError> {
        let path = self.path(key);
        let Some((mut file, len)) = open_blob(&path)? else { return Ok(None) };
        if len == buf.len() as u64 {
            file.read_exact(buf).map_err(|e| StoreError::io("read", &path, e))?;
        }
        Ok(Some(len))
    }

    fn get_into_hashed(&self, key: &str, buf: &mut [u8]) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        let path = self.path(key);
        let Some((mut file, len)) = open_blob(&path)? else { return Ok(None) };
        let mut hasher = blake3::Hasher::new();
        if len == buf.len() as u64 {
            // Hash each piece right after reading it, while it is in the CPU cache.
            for piece in buf.chunks_mut(READ_PIECE) {
                file.read_exact(piece).map_err(|e| StoreError::io("read", &path, e))?;
                hasher.update(piece);
            }
        }
        Ok(Some((len, *hasher.finalize().as_bytes())))
    }

    fn has(&self, key: &str, len: u64) -> Result<bool, StoreError> {
        let path = self.path(key);
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta.len() == len),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io("stat", &path, e)),
        }
    }

    fn touch(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(SystemTime::now()))
            .map_err(|e| StoreError::io("touch", &path, e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let mut out = Vec::new();
        let dir = prefix.trim_end_matches('/');
        self.list_dir(&self.path(dir), prefix, true, &mut out)?;
        Ok(out)
    }

    fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let dir = prefix.trim_end_matches('/');
        self.list_dir(&self.path(dir), prefix, false, &mut out)?;
        Ok(out.into_iter().map(|m| m.key).collect())
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("remove", &path, e)),
        }
    }

    fn sync(&self, prefix: &str) -> Result<(), StoreError> {
        let dir = self.path(prefix.trim_end_matches('/'));
        match fsync_dir(&dir) {
            Err(StoreError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn batch(&self) -> Box<dyn PutBatch + '_> {
        Box::new(LocalBatch { store: self, pending: Mutex::new(Vec::new()) })
    }

    fn remove_temporaries(&self, older_than: SystemTime) -> Result<usize, StoreError> {
        self.remove_tmp_in(&self.root, older_than)
    }

    fn parallelism(&self) -> usize {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8) * 2
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

/// A batch of files written first and made durable together.
///
/// `put` only writes a temporary file. `commit` fsyncs all of them at once from several
/// threads, so that the filesystem folds their journal commits and device cache flushes
/// into a few (one fsync per file, but not one flush per file), then renames each into
/// place and fsyncs the directories once.
struct LocalBatch<'a> {
    store: &'a LocalStore,
    pending: Mutex<Vec<(PathBuf, PathBuf, File)>>,
}

/// Threads that wait in fsync at once during a commit (they use no CPU while waiting).
const FSYNC_THREADS: usize = 16;

impl PutBatch for LocalBatch<'_> {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.store.path(key);
        let (tmp, file) = self.store.write_tmp(&path, bytes)?;
        start_writeback(&file);
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).push((tmp, path, file));
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let next = AtomicUsize::new(0);
        let first_error: Mutex<Option<StoreError>> = Mutex::new(None);
        let work = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some((tmp, _, file)) = pending.get(i) else {
                break;
            };
            if let Err(e) = file.sync_all() {
                first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(StoreError::io("fsync", tmp, e));
                break;
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..FSYNC_THREADS.min(pending.len()) {
                scope.spawn(work);
            }
            work();
        });
        if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            for (tmp, _, _) in &pending {
                let _ = fs::remove_file(tmp);
            }
            return Err(e);
        }
        let mut dirs = std::collections::BTreeSet::new();
        for (tmp, path, _) in &pending {
            fs::rename(tmp, path).map_err(|e| StoreError::io("rename", path, e))?;
            if let Some(dir) = path.parent() {
                dirs.insert(dir.to_path_buf());
            }
        }
        for dir in dirs {
            fsync_dir(&dir)?;
        }
        Ok(())
    }
}

impl Drop for LocalBatch<'_> {
    fn drop(&mut self) {
        // Uncommitted: remove the temporaries (commit took them out of `pending`).
        for (tmp, _, _) in self.pending.get_mut().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Asks the kernel to start writing `file`'s dirty pages now, without waiting and without
/// a device cache flush, so that the disk works while later chunks are still being
/// hashed and written; the commit's fsync then finds little left to do.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads the descriptor, which `file` keeps open for the
    // duration of the call; offset 0 with length 0 means "to the end of the file".
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}
