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
//! 4. gc deletes a blob only through [`delete_if_untouched`](BlobStore::delete_if_untouched):
//!    it renames the file to a `.gc-*` name, reads its time there, and deletes it only if
//!    no touch landed; otherwise it links it back under its name. A touch sets the time
//!    through an open handle, then checks that the name still leads to that file: if gc
//!    renamed it away first, the touch reports the blob missing (and the save writes it
//!    again); if not, the rename came after the new time, which gc then sees.
//! 5. A `.gc-*` file left by a gc that died between rename and delete is linked back
//!    under its name by the next `remove_temporaries` (the start of every gc).
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use super::blob::{BlobStore, ObjectMeta, PutBatch};
use super::StoreError;

const TMP_PREFIX: &str = ".tmp-";
/// Blobs that gc has taken out of use while it decides whether to delete them
/// (`.gc-<pid>-<n>-<name>`).
const GC_PREFIX: &str = ".gc-";
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
            if name.starts_with(TMP_PREFIX) || name.starts_with(GC_PREFIX) {
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
            let gc_name = entry.file_name().to_str().and_then(quarantined_name).map(str::to_string);
            if meta.is_dir() {
                removed += self.remove_tmp_in(&entry.path(), older_than)?;
            } else if let Some(name) = gc_name {
                // Left by a gc that stopped midway: put it back (keeping an unreferenced
                // blob is harmless; the next gc decides again).
                restore(&entry.path(), &dir.join(name))?;
            } else if is_tmp && meta.modified().map(|m| m < older_than).unwrap_or(false) {
                fs::remove_file(entry.path()).map_err(|e| StoreError::io("remove", &entry.path(), e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The blob name in a `.gc-<pid>-<n>-<name>` file name.
fn quarantined_name(file_name: &str) -> Option<&str> {
    let rest = file_name.strip_prefix(GC_PREFIX)?;
    let (_pid, rest) = rest.split_once('-')?;
    let (_n, name) = rest.split_once('-')?;
    Some(name).filter(|n| !n.is_empty())
}

/// Links the blob that gc set aside at `quarantine` back under `path` (unless a new copy
/// is there already) and removes the gc name. Another gc may have restored it first.
fn restore(quarantine: &Path, path: &Path) -> Result<(), StoreError> {
    match fs::hard_link(quarantine, path) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::AlreadyExists | ErrorKind::NotFound) => {}
        Err(e) => return Err(StoreError::io("link", path, e)),
    }
    match fs::remove_file(quarantine) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(StoreError::io("remove", quarantine, e)),
        _ => Ok(()),
    }
}

/// Swaps the files at `new` and `old` in one step, only if `old` exists; returns whether
/// it did (Linux `renameat2(RENAME_EXCHANGE)`, so that a delete of `old` either comes
/// first and nothing is written, or comes after and deletes the new file). Where the
/// filesystem cannot exchange, checks then renames (a delete in between is undone).
fn exchange(new: &Path, old: &Path) -> Result<bool, StoreError> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c_path = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|e| StoreError::io("rename", p, std::io::Error::other(e)))
        };
        let (from, to) = (c_path(new)?, c_path(old)?);
        // SAFETY: both pointers are NUL-terminated strings that live across the call;
        // renameat2 only reads them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT) => return Ok(false),
            // Not supported by this kernel or filesystem: fall through.
            Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {}
            _ => return Err(StoreError::io("rename", old, e)),
        }
    }
    if !old.exists() {
        return Ok(false);
    }
    fs::rename(new, old).map_err(|e| StoreError::io("rename", old, e)).map(|()| true)
}

/// Whether `path` still names the file open as `file`.
#[cfg(unix)]
fn still_named(file: &File, path: &Path) -> Result<bool, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata().map_err(|e| StoreError::io("stat", path, e))?;
    match fs::metadata(path) {
        Ok(named) => Ok(named.dev() == open.dev() && named.ino() == open.ino()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::io("stat", path, e)),
    }
}

#[cfg(not(unix))]
fn still_named(_file: &File, path: &Path) -> Result<bool, StoreError> {
    Ok(path.exists())
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

    fn replace(&self, key: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        let path = self.path(key);
        let (tmp, file) = self.write_tmp(&path, bytes)?;
        let swapped = file
            .sync_all()
            .map_err(|e| StoreError::io("fsync", &tmp, e))
            .and_then(|()| exchange(&tmp, &path));
        // After an exchange `tmp` holds the old blob; otherwise the unused new one.
        let _ = fs::remove_file(&tmp);
        swapped
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

    fn touch(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path(key);
        let file = match File::options().write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::io("touch", &path, e)),
        };
        file.set_modified(SystemTime::now()).map_err(|e| StoreError::io("touch", &path, e))?;
        // Invariant 4: if gc renamed the file away before the new time was set, the name
        // leads elsewhere (or nowhere) now, and the touch does not count.
        still_named(&file, &path)
    }

    fn delete_if_untouched(&self, key: &str, since: SystemTime) -> Result<bool, StoreError> {
        let path = self.path(key);
        let touched = |meta: &fs::Metadata| meta.modified().map(|m| m > since).unwrap_or(false);
        match fs::metadata(&path) {
            Ok(meta) if touched(&meta) => return Ok(false),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(StoreError::io("stat", &path, e)),
        }
        // Invariant 4: take the file out of use, then read its time where no touch can
        // reach it any more.
        let (dir, file_name) = match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
            (Some(dir), Some(name)) => (dir, name),
            _ => return Err(StoreError::io("remove", &path, std::io::Error::other("not a blob path"))),
        };
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let quarantine = dir.join(format!("{GC_PREFIX}{}-{n}-{file_name}", std::process::id()));
        match fs::rename(&path, &quarantine) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(StoreError::io("rename", &path, e)),
        }
        match fs::metadata(&quarantine) {
            Ok(meta) if !touched(&meta) => match fs::remove_file(&quarantine) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(StoreError::io("remove", &quarantine, e)),
                _ => Ok(true),
            },
            // Touched after all (or restored by another gc's recovery): put it back.
            Ok(_) => restore(&quarantine, &path).map(|()| false),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io("stat", &quarantine, e)),
        }
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

    fn key_segment_limit(&self) -> Option<usize> {
        // A file name's limit on Linux filesystems (NAME_MAX); the `.tmp-*` names that
        // writes go through are in the parent directory, so only the segment counts.
        Some(255)
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
