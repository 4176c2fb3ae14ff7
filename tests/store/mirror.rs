//! Redundancy: a mirrored stash (`mirror:` URLs, `Stash::mirrored`) passes the conformance
//! suite, serves loads while a replica is damaged, lost or down, heals what it reads,
//! and `repair` (and `tessera stash repair`) makes every replica whole again.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ndarray::Array1;
use tessera::{BlobStore, ObjectMeta, Stash, StoreError};

fn mirror_url(dirs: &[&Path]) -> String {
    let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    format!("mirror:{}", list.join(","))
}

/// 2,000,000 floats: two chunks of the array, plus one small chunk for `note`.
fn weights() -> Array1<f32> {
    Array1::from_iter((0..2_000_000).map(|i| (i as f32).sin()))
}

fn save_both(stash: &Stash) {
    stash.save("weights", &weights(), &[("epoch", "1")]).unwrap();
    stash.save("note", &"kept twice".to_string(), &[]).unwrap();
}

fn assert_whole(stash: &Stash) {
    assert_eq!(stash.load::<Array1<f32>>("weights").unwrap(), weights());
    assert_eq!(stash.load::<String>("note").unwrap(), "kept twice");
}

/// The chunk files of `root` larger than 1 MiB (the array's), sorted.
fn big_chunks(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::metadata(p).unwrap().len() > 1 << 20)
        .collect();
    out.sort();
    out
}

fn record_files(root: &Path, segment: &str) -> Vec<PathBuf> {
    std::fs::read_dir(root.join("records").join(segment)).unwrap().map(|e| e.unwrap().path()).collect()
}

#[test]
fn conformance_mirror_of_two_directories() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let stash = Stash::open_url(&mirror_url(&[&a, &b])).unwrap();
    super::conformance::run(&stash);
    // Each replica alone is a whole stash holding the same entries.
    let names = stash.names("").unwrap();
    for root in [&a, &b] {
        let alone = Stash::open(root).unwrap();
        assert_eq!(alone.names("").unwrap(), names);
        let report = alone.verify().unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }
}

#[cfg(feature = "s3")]
#[test]
fn conformance_mirror_of_a_directory_and_s3() {
    let server = super::servers::S3Server::start("mirror-test");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("mirror:{},{}", dir.path().join("local").display(), server.url("mirror-test", "copy"));
    let stash = Stash::open_url(&url).unwrap();
    super::conformance::run(&stash);
    let s3_alone = Stash::open_url(&server.url("mirror-test", "copy")).unwrap();
    assert_eq!(s3_alone.names("").unwrap(), stash.names("").unwrap());
    assert!(s3_alone.verify().unwrap().problems.is_empty());
}

#[test]
fn damaged_and_lost_copies_are_served_from_the_other_replica_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let url = mirror_url(&[&a, &b]);
    let stash = Stash::open_url(&url).unwrap();
    save_both(&stash);

    // Replica a: one chunk garbled, the other deleted. Replica b: a record garbled.
    let chunks = big_chunks(&a);
    assert_eq!(chunks.len(), 2);
    let good = std::fs::read(&chunks[0]).unwrap();
    let mut bad = good.clone();
    bad[1000] ^= 0x40;
    std::fs::write(&chunks[0], &bad).unwrap();
    std::fs::remove_file(&chunks[1]).unwrap();
    let record = record_files(&b, "note").pop().unwrap();
    let mut garbled = std::fs::read(&record).unwrap();
    let last = garbled.len() - 1;
    garbled[last] ^= 0xff;
    std::fs::write(&record, &garbled).unwrap();
    // Alone, each replica is damaged.
    assert!(!Stash::open(&a).unwrap().verify().unwrap().problems.is_empty());
    assert!(Stash::open(&b).unwrap().load::<String>("note").is_err());

    // Through the mirror every load succeeds, and reading healed a's chunks.
    let stash = Stash::open_url(&url).unwrap();
    assert_whole(&stash);
    assert_eq!(std::fs::read(&chunks[0]).unwrap(), good);
    assert!(chunks[1].exists());

    // Records are healed by repair, once; a second repair finds nothing to do.
    let report = stash.repair().unwrap();
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.replicas, 2);
    assert_eq!(report.copies_written, 1, "{report:?}");
    assert!(report.blobs_checked >= 5, "{report:?}");
    let again = stash.repair().unwrap();
    assert_eq!(again.copies_written, 0, "{again:?}");
    for root in [&a, &b] {
        let alone = Stash::open(root).unwrap();
        assert!(alone.verify().unwrap().problems.is_empty());
        assert_whole(&alone);
    }

    // A whole replica lost: the other serves everything, and repair rebuilds it.
    std::fs::remove_dir_all(&a).unwrap();
    let stash = Stash::open_url(&url).unwrap();
    assert_whole(&stash);
    let report = stash.repair().unwrap();
    assert!(report.is_complete() && report.copies_written >= 2, "{report:?}");
    assert_whole(&Stash::open(&a).unwrap());
}

#[test]
fn a_chunk_damaged_on_every_replica_is_reported_not_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let url = mirror_url(&[&a, &b]);
    let stash = Stash::open_url(&url).unwrap();
    save_both(&stash);
    for root in [&a, &b] {
        let chunk = &big_chunks(root)[1];
        let mut bytes = std::fs::read(chunk).unwrap();
        bytes[7] ^= 0x01;
        std::fs::write(chunk, &bytes).unwrap();
    }
    let err = stash.load::<Array1<f32>>("weights").unwrap_err();
    assert!(matches!(err, StoreError::Checksum { .. }), "{err:?}");
    assert!(err.to_string().contains("weights"), "{err}");
    assert_eq!(stash.load::<String>("note").unwrap(), "kept twice");

    let report = stash.repair().unwrap();
    assert!(!report.is_complete());
    assert_eq!(report.unrecoverable.len(), 1, "{report:?}");
    let message = report.unrecoverable[0].to_string();
    assert!(message.contains("chunks/") && message.contains("damaged"), "{message}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["stash", "repair", "--store", &url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("UNRECOVERABLE") && stdout.contains("1 unrecoverable"), "{stdout}");
}

#[test]
fn cli_repairs_a_mirror_and_refuses_nothing_on_a_single_store() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let url = mirror_url(&[&a, &b]);
    save_both(&Stash::open_url(&url).unwrap());
    for chunk in big_chunks(&b) {
        std::fs::remove_file(chunk).unwrap();
    }
    let repair = |store: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["stash", "repair", "--store", store])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let stdout = repair(&url);
    assert!(stdout.contains("wrote 2 copies") && stdout.contains("every replica is whole"), "{stdout}");
    assert_whole(&Stash::open(&b).unwrap());
    let stdout = repair(&a.display().to_string());
    assert!(stdout.contains("nothing to repair"), "{stdout}");
}

/// An in-memory blob store that can be switched off, standing for a replica that is down.
#[derive(Debug, Default)]
struct Switchable {
    name: &'static str,
    blobs: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    down: Arc<AtomicBool>,
}

impl Switchable {
    fn new(name: &'static str) -> Switchable {
        Switchable { name, ..Switchable::default() }
    }

    /// A handle on the same blobs and switch.
    fn handle(&self) -> Switchable {
        Switchable { name: self.name, blobs: self.blobs.clone(), down: self.down.clone() }
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check(&self, op: &'static str, key: &str) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            let message = "connection refused".to_string();
            return Err(StoreError::Backend { backend: "memory", op, key: key.to_string(), message });
        }
        Ok(())
    }
}

impl BlobStore for Switchable {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.check("put", key)?;
        self.blobs.lock().unwrap().insert(key.to_string(), bytes.to_vec());
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.check("get", key)?;
        Ok(self.blobs.lock().unwrap().get(key).cloned())
    }

    fn has(&self, key: &str, len: u64) -> Result<bool, StoreError> {
        self.check("has", key)?;
        Ok(self.blobs.lock().unwrap().get(key).is_some_and(|b| b.len() as u64 == len))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.check("list", prefix)?;
        let blobs = self.blobs.lock().unwrap();
        Ok(blobs
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta::new(k.clone(), v.len() as u64, None))
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.check("delete", key)?;
        self.blobs.lock().unwrap().remove(key);
        Ok(())
    }

    fn location(&self) -> String {
        format!("memory://{}", self.name)
    }
}

fn pair(min_copies: usize) -> (Stash, Switchable, Switchable) {
    let (a, b) = (Switchable::new("a"), Switchable::new("b"));
    let replicas: Vec<Box<dyn BlobStore>> = vec![Box::new(a.handle()), Box::new(b.handle())];
    (Stash::mirrored(replicas, min_copies).unwrap(), a, b)
}

#[test]
fn with_every_copy_required_a_save_fails_while_a_replica_is_down_and_loses_nothing() {
    let (stash, _a, b) = pair(2);
    stash.save("note", &"first".to_string(), &[]).unwrap();
    b.set_down(true);
    let err = stash.save("note", &"second".to_string(), &[]).unwrap_err();
    assert!(matches!(err, StoreError::Replication { succeeded: 1, needed: 2, .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("memory://b") && message.contains("connection refused"), "{message}");
    // Reads and listings go on from the replica that is up; no partial version is listed.
    assert_eq!(stash.load::<String>("note").unwrap(), "first");
    assert_eq!(stash.history("note").unwrap().len(), 1);
    b.set_down(false);
    stash.save("note", &"second".to_string(), &[]).unwrap();
    assert_eq!(stash.history("note").unwrap().len(), 2);
}

#[test]
fn with_one_copy_required_saves_go_on_and_repair_catches_the_replica_up() {
    let (stash, a, b) = pair(1);
    save_both(&stash);
    b.set_down(true);
    stash.save("note", &"written while b was down".to_string(), &[]).unwrap();
    let moved = weights().mapv(|x| x + 1.0);
    stash.save("weights", &moved, &[("epoch", "2")]).unwrap();
    // A version saved on one replica may be on either, so while one is down, finding the
    // latest version is refused rather than answered from half the copies.
    let err = stash.load::<Array1<f32>>("weights").unwrap_err();
    assert!(matches!(err, StoreError::Replication { op: "list", needed: 2, .. }), "{err:?}");
    assert!(stash.repair().is_err());

    b.set_down(false);
    assert_eq!(stash.load::<Array1<f32>>("weights").unwrap(), moved);
    let report = stash.repair().unwrap();
    assert!(report.is_complete(), "{report:?}");
    // The new note's chunk and record, the array's two new chunks and its record.
    assert_eq!(report.copies_written, 5, "{report:?}");

    // Now a can be lost entirely: b alone holds every version.
    a.blobs.lock().unwrap().clear();
    assert_eq!(stash.load::<Array1<f32>>("weights").unwrap(), moved);
    assert_eq!(stash.load_tagged::<Array1<f32>>("weights", "epoch", "1").unwrap(), weights());
    assert_eq!(stash.history("note").unwrap().len(), 2);
    let report = stash.repair().unwrap();
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(a.blobs.lock().unwrap().len(), b.blobs.lock().unwrap().len());
}

#[test]
fn saving_a_chunk_again_writes_the_copy_a_replica_lacks() {
    let (stash, a, b) = pair(1);
    b.set_down(true);
    stash.save("weights", &weights(), &[]).unwrap();
    b.set_down(false);
    let chunks = |s: &Switchable| -> Vec<String> {
        s.blobs.lock().unwrap().keys().filter(|k| k.starts_with("chunks/")).cloned().collect()
    };
    assert!(chunks(&b).is_empty());
    // The same bytes again: every chunk is already on a, none on b.
    stash.save("weights", &weights(), &[]).unwrap();
    assert_eq!(chunks(&b), chunks(&a));
    assert_eq!(chunks(&a).len(), 2);
}

#[test]
fn deleting_needs_every_replica() {
    let (stash, _a, b) = pair(1);
    let v = stash.save("note", &"x".to_string(), &[]).unwrap();
    b.set_down(true);
    let err = stash.delete("note", Some(v)).unwrap_err();
    assert!(matches!(err, StoreError::Replication { .. }), "{err:?}");
    b.set_down(false);
    assert_eq!(stash.delete("note", Some(v)).unwrap(), 1);
    assert!(stash.history("note").unwrap().is_empty());
}

#[test]
fn mirror_urls_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    for (url, words) in [
        (format!("mirror:{d}/a"), "at least two"),
        (format!("mirror:{d}/a,,{d}/b"), "empty replica"),
        (format!("mirror:{d}/a,mirror:{d}/b"), "another mirror"),
        (format!("mirror:{d}/a,{d}/b;min_copies=3"), "min_copies"),
        (format!("mirror:{d}/a,{d}/b;min_copies=0"), "min_copies"),
        (format!("mirror:{d}/a,{d}/b;min_copies=two"), "not a number"),
        (format!("mirror:{d}/a,{d}/b;copies=1"), "unknown option"),
        (format!("mirror:{d}/a,ftp://host/x"), "unknown scheme"),
    ] {
        let err = Stash::open_url(&url).unwrap_err();
        assert!(err.to_string().contains(words), "{url}: {err}");
    }
    let stash = Stash::open_url(&format!("mirror:{d}/a,file://{d}/b;min_copies=1")).unwrap();
    assert_eq!(stash.location(), format!("mirror:{d}/a,{d}/b;min_copies=1"));
    // The location opens the same mirror again (nodes reopen stashes by location).
    stash.save("x", &1u32, &[]).unwrap();
    assert_eq!(Stash::open_url(&stash.location()).unwrap().load::<u32>("x").unwrap(), 1);
}

#[test]
fn mirror_damage_heals_and_replica_failures_are_counted_for_prometheus() {
    use std::io::{Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let rt = tessera::Runtime::builder().workers(1).prometheus(addr).build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let stash = Stash::open_url(&mirror_url(&[&a, &b])).unwrap();
    save_both(&stash);
    let chunk = &big_chunks(&a)[0];
    let mut bytes = std::fs::read(chunk).unwrap();
    bytes[9] ^= 0x10;
    std::fs::write(chunk, &bytes).unwrap();
    assert_whole(&stash);
    let (down, _, b_switch) = pair(2);
    b_switch.set_down(true);
    assert!(down.save("x", &1u8, &[]).is_err());

    let body = (|| -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        stream.read_to_string(&mut body)?;
        Ok(body)
    })()
    .unwrap();
    let value = |name: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(value("tessera_stash_damaged_copies_total") >= 1.0, "{body}");
    assert!(value("tessera_stash_healed_copies_total") >= 1.0, "{body}");
    assert!(value("tessera_stash_replica_failures_total") >= 1.0, "{body}");
    assert!(value("tessera_stash_bytes_saved_total") >= 8e6, "{body}");
    assert!(value("tessera_stash_bytes_loaded_total") >= 8e6, "{body}");
    rt.shutdown();
}
