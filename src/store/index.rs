//! The embedded store's sled index: a cache of decoded version records, so that listing
//! and history do not open one record file per version.
//!
//! # Invariants
//! 1. The record files are authoritative; the index only caches their bytes, keyed by
//!    record key and stamped with the file's size and modification time. A stale stamp is
//!    a miss, so records written or retagged by another process are never served stale.
//! 2. sled admits one process per database. The first process to open the stash holds
//!    the index; others run without it (reading record files directly), which is correct
//!    and only slower.
//! 3. Damage is reported: an index that sled cannot open, or an entry whose bytes fail
//!    the record checksum, is [`StoreError::IndexCorrupt`]. Recovery: delete the `index`
//!    directory; it is rebuilt as records are read.
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use super::blob::ObjectMeta;
use super::record::Record;
use super::StoreError;

/// A sled database caching record bytes.
pub(crate) struct RecordIndex {
    db: sled::Db,
    path: PathBuf,
}

impl std::fmt::Debug for RecordIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordIndex").field("path", &self.path).finish()
    }
}

impl RecordIndex {
    /// Opens the index, or `Ok(None)` when another process holds it.
    pub(crate) fn open(path: &Path) -> Result<Option<RecordIndex>, StoreError> {
        let corrupt = |reason: String| StoreError::IndexCorrupt { path: path.display().to_string(), reason };
        let config = sled::Config::new().path(path).cache_capacity(16 << 20).flush_every_ms(Some(1000));
        // sled may panic on some garbled files instead of returning an error.
        let opened =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open())).map_err(|payload| {
                corrupt(format!("sled panicked: {}", crate::error::panic_message(&*payload)))
            })?;
        match opened {
            Ok(db) => Ok(Some(RecordIndex { db, path: path.to_path_buf() })),
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                tracing::debug!(
                    "stash index {} is held by another process; running without it",
                    path.display()
                );
                Ok(None)
            }
            Err(e) => Err(corrupt(e.to_string())),
        }
    }

    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::IndexCorrupt { path: self.path.display().to_string(), reason }
    }

    /// The cached record for `meta`, if the cache holds it with the same stamp.
    pub(crate) fn get(&self, meta: &ObjectMeta) -> Result<Option<Record>, StoreError> {
        let Some(value) = self.db.get(meta.key.as_bytes()).map_err(|e| self.corrupt(e.to_string()))? else {
            return Ok(None);
        };
        if value.len() < 16 {
            return Err(self.corrupt(format!("entry `{}` is {} bytes", meta.key, value.len())));
        }
        if value[..16] != stamp(meta) {
            return Ok(None);
        }
        Record::decode(&meta.key, &value[16..])
            .map(Some)
            .map_err(|e| self.corrupt(format!("entry `{}`: {e}", meta.key)))
    }

    /// Caches `bytes` (an encoded record) for `meta`.
    pub(crate) fn insert(&self, meta: &ObjectMeta, bytes: &[u8]) -> Result<(), StoreError> {
        let mut value = Vec::with_capacity(16 + bytes.len());
        value.extend_from_slice(&stamp(meta));
        value.extend_from_slice(bytes);
        self.db.insert(meta.key.as_bytes(), value).map_err(|e| self.corrupt(e.to_string()))?;
        Ok(())
    }

    pub(crate) fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.db.remove(key.as_bytes()).map_err(|e| self.corrupt(e.to_string()))?;
        Ok(())
    }
}

/// Size and modification time of a record file: a changed file gets a new stamp.
fn stamp(meta: &ObjectMeta) -> [u8; 16] {
    let modified = meta
        .modified
        .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut out = [0; 16];
    out[..8].copy_from_slice(&meta.size.to_le_bytes());
    out[8..].copy_from_slice(&modified.to_le_bytes());
    out
}
