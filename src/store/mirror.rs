//! Redundancy: `MirrorStore`, a [`BlobStore`] that keeps a copy of every blob on each of
//! several replica stores (`mirror:` URLs), reads from the first intact copy, heals the
//! damaged or missing chunk copies it meets, and repairs every replica on request.
//!
//! # Invariants
//! 1. A write succeeds when at least `min_copies` replicas took it (all of them by
//!    default); it is sent to every replica.
//! 2. A blob is intact when its bytes match its key: a chunk hashes to its name, a record
//!    decodes with a matching checksum. Reads skip copies that are not intact, so one
//!    damaged or lost replica never fails a load that another replica can serve.
//! 3. [`has`](BlobStore::has) is true only when every replica holds the blob, so a save
//!    writes every copy that is missing.
//! 4. Listing answers when enough replicas answer that every blob written to
//!    `min_copies` of them is seen (`replicas - min_copies + 1`).
//! 5. Reads heal only chunks (content-addressed, so a healed copy is never wrong);
//!    records are copied by [`repair`](BlobStore::repair), which runs chunks first, so a
//!    repaired record never names a chunk its replica lacks.
use std::collections::BTreeMap;
use std::time::SystemTime;

use super::blob::{BlobStore, ObjectMeta, PutBatch, RepairReport};
use super::record::{self, Record};
use super::StoreError;

/// Blobs copied to every one of several stores.
#[derive(Debug)]
pub(crate) struct MirrorStore {
    replicas: Vec<Box<dyn BlobStore>>,
    min_copies: usize,
}

/// What one replica holds under a key.
enum Copy {
    Intact(Vec<u8>),
    Damaged(Vec<u8>),
    Missing,
    Unreachable(StoreError),
}

impl MirrorStore {
    /// A mirror over `replicas` whose writes need `min_copies` of them.
    pub(crate) fn new(
        replicas: Vec<Box<dyn BlobStore>>,
        min_copies: usize,
    ) -> Result<MirrorStore, StoreError> {
        let invalid = |reason: &'static str| StoreError::Invalid {
            what: "mirror",
            value: format!("{} replicas, min_copies {min_copies}", replicas.len()),
            reason,
        };
        if replicas.len() < 2 {
            return Err(invalid("a mirror needs at least two replicas"));
        }
        if min_copies == 0 || min_copies > replicas.len() {
            return Err(invalid("min_copies must be between 1 and the number of replicas"));
        }
        Ok(MirrorStore { replicas, min_copies })
    }

    /// Runs `op` on every replica at once; the results in replica order.
    fn on_each<R: Send>(
        &self,
        op: impl Fn(&dyn BlobStore) -> Result<R, StoreError> + Sync,
    ) -> Vec<Result<R, StoreError>> {
        let op = &op;
        std::thread::scope(|scope| {
            let others: Vec<_> =
                self.replicas[1..].iter().map(|replica| scope.spawn(move || op(&**replica))).collect();
            let mut results = vec![op(&*self.replicas[0])];
            results.extend(
                others
                    .into_iter()
                    .map(|handle| handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))),
            );
            results
        })
    }

    /// `Ok` with the successful results when at least `needed` replicas succeeded,
    /// otherwise the error naming each failed replica.
    fn require<R>(
        &self,
        op: &'static str,
        key: &str,
        needed: usize,
        results: Vec<Result<R, StoreError>>,
    ) -> Result<Vec<R>, StoreError> {
        let mut succeeded = Vec::with_capacity(results.len());
        let mut failures = Vec::new();
        for (replica, result) in self.replicas.iter().zip(results) {
            match result {
                Ok(value) => succeeded.push(value),
                Err(e) => failures.push(format!("{}: {e}", replica.location())),
            }
        }
        if !failures.is_empty() {
            metrics::counter!("tessera_stash_replica_failures_total", "op" => op)
                .increment(failures.len() as u64);
            tracing::warn!(
                op,
                key,
                "mirror: {} of {} replicas failed: {}",
                failures.len(),
                self.replicas.len(),
                failures.join("; ")
            );
        }
        if succeeded.len() >= needed {
            Ok(succeeded)
        } else {
            Err(StoreError::Replication {
                op,
                key: key.to_string(),
                succeeded: succeeded.len(),
                replicas: self.replicas.len(),
                needed,
                failures: failures.join("; "),
            })
        }
    }

    /// How many replicas must answer a listing (invariant 4).
    fn listing_quorum(&self) -> usize {
        self.replicas.len() - self.min_copies + 1
    }

    fn read(replica: &dyn BlobStore, key: &str) -> Copy {
        match replica.get(key) {
            Ok(Some(bytes)) if is_intact(key, &bytes) => Copy::Intact(bytes),
            Ok(Some(bytes)) => {
                damaged_copy(replica, key);
                Copy::Damaged(bytes)
            }
            Ok(None) => Copy::Missing,
            Err(e) => Copy::Unreachable(e),
        }
    }

    /// Writes a good chunk back to the replicas that lacked it or held it damaged (best
    /// effort: a replica that fails now is left for [`repair`](BlobStore::repair)).
    fn heal(&self, key: &str, bytes: &[u8], replicas: &[usize]) {
        if !key.starts_with("chunks/") {
            return;
        }
        for &r in replicas {
            let replica = &self.replicas[r];
            match replica.put(key, bytes).and_then(|()| replica.sync("chunks/")) {
                Ok(()) => {
                    metrics::counter!("tessera_stash_healed_copies_total").increment(1);
                    tracing::info!(key, replica = %replica.location(), "mirror: healed a chunk copy");
                }
                Err(e) => tracing::warn!(key, replica = %replica.location(), "mirror: could not heal: {e}"),
            }
        }
    }

    /// The union of every replica's listing of `prefix`, one entry per key.
    fn union(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let listings =
            self.require("list", prefix, self.listing_quorum(), self.on_each(|r| r.list(prefix)))?;
        let mut union: BTreeMap<String, ObjectMeta> = BTreeMap::new();
        for meta in listings.into_iter().flatten() {
            union.entry(meta.key.clone()).or_insert(meta);
        }
        Ok(union.into_values().collect())
    }

    /// Makes every replica hold an intact copy of each key in `keys`; keys whose every copy
    /// is damaged or missing go into `report.unrecoverable`.
    fn repair_keys(&self, keys: &[ObjectMeta], report: &mut RepairReport, progress: &(dyn Fn(u64) + Sync)) {
        for meta in keys {
            let copies = self.on_each(|replica| Ok(Self::read(replica, &meta.key)));
            let mut copies: Vec<Copy> = copies.into_iter().map(|c| c.unwrap_or(Copy::Missing)).collect();
            report.blobs_checked += 1;
            // The first intact copy's bytes, taken out (its slot still reads as intact).
            let good = copies.iter_mut().find_map(|c| match c {
                Copy::Intact(bytes) => Some(std::mem::take(bytes)),
                _ => None,
            });
            let Some(good) = good else {
                report.unrecoverable.push(StoreError::Unrecoverable {
                    key: meta.key.clone(),
                    reason: describe(&self.replicas, &copies),
                });
                progress(meta.size);
                continue;
            };
            for (replica, copy) in self.replicas.iter().zip(copies) {
                match copy {
                    Copy::Intact(_) => {}
                    Copy::Unreachable(e) => report.problems.push(e),
                    Copy::Missing | Copy::Damaged(_) => match replica.put(&meta.key, &good) {
                        Ok(()) => {
                            metrics::counter!("tessera_stash_healed_copies_total").increment(1);
                            report.copies_written += 1;
                            report.bytes_written += good.len() as u64;
                        }
                        Err(e) => report.problems.push(e),
                    },
                }
            }
            progress(good.len() as u64);
        }
    }
}

/// Counts and logs a copy whose bytes do not match its key.
fn damaged_copy(replica: &dyn BlobStore, key: &str) {
    metrics::counter!("tessera_stash_damaged_copies_total").increment(1);
    tracing::warn!(key, replica = %replica.location(), "mirror: a damaged copy");
}

/// Whether `bytes` are what `key` names: chunks hash to their name, records decode.
fn is_intact(key: &str, bytes: &[u8]) -> bool {
    if let Some(hex) = key.strip_prefix("chunks/") {
        record::hex(blake3::hash(bytes).as_bytes()) == hex
    } else if key.starts_with("records/") {
        Record::decode(key, bytes).is_ok()
    } else {
        true
    }
}

/// One line on what each replica holds of a blob none holds intact.
fn describe(replicas: &[Box<dyn BlobStore>], copies: &[Copy]) -> String {
    let states: Vec<String> = replicas
        .iter()
        .zip(copies)
        .map(|(replica, copy)| {
            let state = match copy {
                Copy::Intact(_) => "intact".to_string(),
                Copy::Damaged(bytes) => format!("damaged ({} bytes)", bytes.len()),
                Copy::Missing => "missing".to_string(),
                Copy::Unreachable(e) => format!("unreachable ({e})"),
            };
            format!("{}: {state}", replica.location())
        })
        .collect();
    format!("no intact copy on any replica: {}", states.join("; "))
}

impl BlobStore for MirrorStore {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.require("put", key, self.min_copies, self.on_each(|r| r.put(key, bytes))).map(drop)
    }

    fn replace(&self, key: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        // Each replica replaces only its own existing copy, so a delete is never undone
        // on any of them; the blob was replaced if some replica still held it.
        let replaced = self.require("put", key, self.min_copies, self.on_each(|r| r.replace(key, bytes)))?;
        Ok(replaced.into_iter().any(|r| r))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut lacking = Vec::new();
        let mut damaged = None;
        let mut unreachable = None;
        for (r, replica) in self.replicas.iter().enumerate() {
            match Self::read(&**replica, key) {
                Copy::Intact(bytes) => {
                    self.heal(key, &bytes, &lacking);
                    return Ok(Some(bytes));
                }
                Copy::Damaged(bytes) => {
                    lacking.push(r);
                    damaged.get_or_insert(bytes);
                }
                Copy::Missing => lacking.push(r),
                Copy::Unreachable(e) => {
                    unreachable.get_or_insert(e);
                }
            }
        }
        // No intact copy: hand back a damaged one, so that the stash reports the damage
        // naming the entry; else the error of an unreachable replica, which may hold it.
        match (damaged, unreachable) {
            (Some(bytes), _) => Ok(Some(bytes)),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(None),
        }
    }

    fn get_into_hashed(&self, key: &str, buf: &mut [u8]) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        let Some(hex) = key.strip_prefix("chunks/") else {
            return Ok(self.get(key)?.map(|bytes| {
                let hash = if bytes.len() == buf.len() {
                    buf.copy_from_slice(&bytes);
                    *blake3::hash(buf).as_bytes()
                } else {
                    [0; 32]
                };
                (bytes.len() as u64, hash)
            }));
        };
        let mut lacking = Vec::new();
        let mut damaged = None;
        let mut unreachable = None;
        for (r, replica) in self.replicas.iter().enumerate() {
            match replica.get_into_hashed(key, buf) {
                Ok(Some((len, hash))) if len == buf.len() as u64 && record::hex(&hash) == hex => {
                    self.heal(key, buf, &lacking);
                    return Ok(Some((len, hash)));
                }
                Ok(Some(found)) => {
                    damaged_copy(&**replica, key);
                    lacking.push(r);
                    damaged.get_or_insert(found);
                }
                Ok(None) => lacking.push(r),
                Err(e) => {
                    unreachable.get_or_insert(e);
                }
            }
        }
        match (damaged, unreachable) {
            (Some(found), _) => Ok(Some(found)),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(None),
        }
    }

    fn get_into(&self, key: &str, buf: &mut [u8]) -> Result<Option<u64>, StoreError> {
        Ok(self.get_into_hashed(key, buf)?.map(|(len, _)| len))
    }

    fn has(&self, key: &str, len: u64) -> Result<bool, StoreError> {
        // An unreachable replica counts as lacking the blob: the put that follows decides
        // whether enough replicas take it.
        Ok(self.on_each(|r| r.has(key, len)).into_iter().all(|held| matches!(held, Ok(true))))
    }

    fn touch(&self, key: &str) -> Result<bool, StoreError> {
        // Missing from any replica that answered: the save writes it again everywhere.
        let touched = self.require("touch", key, self.min_copies, self.on_each(|r| r.touch(key)))?;
        Ok(touched.into_iter().all(|t| t))
    }

    fn delete_if_untouched(&self, key: &str, since: SystemTime) -> Result<bool, StoreError> {
        // Every replica, as `delete`; each decides atomically with its own `touch`.
        let gone = self.on_each(|r| r.delete_if_untouched(key, since));
        Ok(self.require("delete", key, self.replicas.len(), gone)?.into_iter().all(|g| g))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.union(prefix)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        // Every replica: a copy left behind would come back at the next repair.
        self.require("delete", key, self.replicas.len(), self.on_each(|r| r.delete(key))).map(drop)
    }

    fn sync(&self, prefix: &str) -> Result<(), StoreError> {
        self.require("sync", prefix, self.min_copies, self.on_each(|r| r.sync(prefix))).map(drop)
    }

    fn batch(&self) -> Box<dyn PutBatch + '_> {
        Box::new(MirrorBatch {
            mirror: self,
            batches: self.replicas.iter().map(|r| r.batch()).collect(),
            failed: self.replicas.iter().map(|_| parking_lot::Mutex::new(None)).collect(),
        })
    }

    fn remove_temporaries(&self, older_than: SystemTime) -> Result<usize, StoreError> {
        let removed = self.on_each(|r| r.remove_temporaries(older_than));
        Ok(self.require("remove temporaries", "", self.replicas.len(), removed)?.into_iter().sum())
    }

    fn key_segment_limit(&self) -> Option<usize> {
        self.replicas.iter().filter_map(|r| r.key_segment_limit()).min()
    }

    fn parallelism(&self) -> usize {
        self.replicas.iter().map(|r| r.parallelism()).max().unwrap_or(1)
    }

    fn location(&self) -> String {
        let list: Vec<String> = self.replicas.iter().map(|r| r.location()).collect();
        if self.min_copies == self.replicas.len() {
            format!("mirror:{}", list.join(","))
        } else {
            format!("mirror:{};min_copies={}", list.join(","), self.min_copies)
        }
    }

    fn repair(&self, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<RepairReport, StoreError> {
        let mut report = RepairReport { replicas: self.replicas.len(), ..RepairReport::default() };
        let chunks = self.union("chunks/")?;
        let records = self.union("records/")?;
        let total: u64 = chunks.iter().chain(&records).map(|m| m.size).sum();
        let done = std::sync::atomic::AtomicU64::new(0);
        let advance = |len: u64| {
            let now = done.fetch_add(len, std::sync::atomic::Ordering::Relaxed) + len;
            progress(now, total.max(now));
        };
        self.repair_keys(&chunks, &mut report, &advance);
        // Chunk copies must be durable before a record naming them is copied.
        for result in self.on_each(|r| r.sync("chunks/")) {
            if let Err(e) = result {
                report.problems.push(e);
            }
        }
        self.repair_keys(&records, &mut report, &advance);
        for result in self.on_each(|r| r.sync("records/")) {
            if let Err(e) = result {
                report.problems.push(e);
            }
        }
        Ok(report)
    }
}

/// One batch per replica; a replica whose batch failed takes no more of it.
struct MirrorBatch<'a> {
    mirror: &'a MirrorStore,
    batches: Vec<Box<dyn PutBatch + 'a>>,
    /// Per replica: why its batch failed, once it has.
    failed: Vec<parking_lot::Mutex<Option<StoreError>>>,
}

impl MirrorBatch<'_> {
    /// `Ok` while at least `min_copies` replicas' batches have not failed.
    fn check(&self, op: &'static str, key: &str) -> Result<(), StoreError> {
        let failures: Vec<String> = (self.failed.iter().zip(&self.mirror.replicas))
            .filter_map(|(f, replica)| f.lock().as_ref().map(|e| format!("{}: {e}", replica.location())))
            .collect();
        let succeeded = self.batches.len() - failures.len();
        if succeeded >= self.mirror.min_copies {
            return Ok(());
        }
        Err(StoreError::Replication {
            op,
            key: key.to_string(),
            succeeded,
            replicas: self.batches.len(),
            needed: self.mirror.min_copies,
            failures: failures.join("; "),
        })
    }

    fn fail(&self, replica: usize, error: StoreError) {
        let location = self.mirror.replicas[replica].location();
        metrics::counter!("tessera_stash_replica_failures_total", "op" => "put").increment(1);
        tracing::warn!(replica = %location, "mirror: a replica failed during a save: {error}");
        self.failed[replica].lock().get_or_insert(error);
    }
}

impl PutBatch for MirrorBatch<'_> {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        std::thread::scope(|scope| {
            let live = |r: &usize| self.failed[*r].lock().is_none();
            let mut replicas = (0..self.batches.len()).filter(live);
            let first = replicas.next();
            let others: Vec<_> =
                replicas.map(|r| scope.spawn(move || (r, self.batches[r].put(key, bytes)))).collect();
            if let Some(r) = first {
                if let Err(e) = self.batches[r].put(key, bytes) {
                    self.fail(r, e);
                }
            }
            for handle in others {
                let (r, result) = handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                if let Err(e) = result {
                    self.fail(r, e);
                }
            }
        });
        self.check("put", key)
    }

    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let MirrorBatch { mirror, batches, failed } = *self;
        let committed: Vec<Result<(), StoreError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = batches
                .into_iter()
                .zip(&failed)
                .map(|(batch, failed)| {
                    let earlier = failed.lock().take();
                    scope.spawn(move || match earlier {
                        // Dropping an uncommitted batch leaves no visible blob behind.
                        Some(e) => Err(e),
                        None => batch.commit(),
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect()
        });
        mirror.require("commit", "chunks/", mirror.min_copies, committed).map(drop)
    }
}
