//! Crash and concurrency tests with real child processes: SIGKILL in the middle of a
//! save, and two processes saving the same name at once.
//!
//! The children are this test binary again, running the ignored `child_process` test
//! with its job in the `TESSERA_STASH_CHILD` environment variable.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ndarray::Array1;
use tessera::Stash;

const CHILD_ENV: &str = "TESSERA_STASH_CHILD";
/// Elements of the array the SIGKILL child saves: 256 MiB of f32, 64 chunks.
const BIG: usize = 64 << 20;

fn child(job: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "store::crash::child_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, job)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// Not a test of its own: the body of the child processes (see the module docs).
#[test]
#[ignore = "run as a child process by the crash tests"]
fn child_process() {
    let job = std::env::var(CHILD_ENV).expect("child_process runs only as a child of the crash tests");
    let parts: Vec<&str> = job.split('|').collect();
    let stash = Stash::open(parts[1]).unwrap();
    match parts[0] {
        "big" => {
            let a = Array1::from_iter((0..BIG).map(|i| i as f32));
            println!("SAVING");
            stash.save("victim", &a, &[("who", "child")]).unwrap();
            println!("SAVED");
        }
        "writer" => {
            let id: u32 = parts[2].parse().unwrap();
            let a = Array1::from_elem(1 << 20, id as f32);
            // Both children start saving at the same instant.
            let start: u128 = parts[3].parse().unwrap();
            while std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
                < start
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            for round in 0..5u32 {
                stash
                    .save(
                        "shared",
                        &a.mapv(|x| x + round as f32),
                        &[("writer", &id.to_string()), ("round", &round.to_string())],
                    )
                    .unwrap();
            }
            println!("DONE");
        }
        other => panic!("unknown child job {other}"),
    }
}

/// Chunk files under their final names, and temporaries (chunks being written).
fn count_files(dir: &Path) -> (usize, usize) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let tmp = names.iter().filter(|n| n.starts_with(".tmp-")).count();
    (names.len() - tmp, tmp)
}

/// Where in the child's save the parent kills it.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// While chunks are being written (several temporaries exist).
    WritingChunks,
    /// As soon as chunks start to appear under their final names (commit phase).
    CommittingChunks,
}

fn kill_child_mid_save(point: KillPoint) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stash");
    let previous = Array1::from_elem(1000, 7.0f32);
    {
        let stash = Stash::open(&root).unwrap();
        stash.save("victim", &previous, &[("who", "parent")]).unwrap();
    }
    let chunks_dir = root.join("chunks");
    let (baseline, _) = count_files(&chunks_dir);
    let mut proc = child(&format!("big|{}", root.display())).spawn().unwrap();
    let mut out = BufReader::new(proc.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child exited before saving");
        if line.contains("SAVING") {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (done, tmp) = count_files(&chunks_dir);
        let reached = match point {
            KillPoint::WritingChunks => tmp >= 4,
            KillPoint::CommittingChunks => done > baseline,
        };
        if reached {
            break;
        }
        assert!(Instant::now() < deadline, "child did not reach {point:?} within 60 s");
        std::thread::sleep(Duration::from_micros(100));
    }
    proc.kill().unwrap(); // SIGKILL
    let status = proc.wait().unwrap();
    assert!(!status.success());
    let (done, tmp) = count_files(&chunks_dir);
    eprintln!("{point:?}: killed with {} chunks renamed and {tmp} temporaries", done - baseline);

    let stash = Stash::open(&root).unwrap();
    let history = stash.history("victim").unwrap();
    match point {
        KillPoint::WritingChunks => {
            assert!(
                done - baseline < BIG * 4 / tessera::CHUNK_SIZE,
                "the child committed every chunk before the kill"
            );
            assert_eq!(history.len(), 1, "a partial version is listed: {history:?}");
        }
        // The child may have committed in the instant before the kill: then its version
        // must be complete and correct.
        KillPoint::CommittingChunks => {
            assert!(history.len() <= 2, "{history:?}");
            if history.len() == 2 {
                let loaded = stash.load::<Array1<f32>>("victim").unwrap();
                assert!(loaded.iter().enumerate().all(|(i, &x)| x == i as f32));
            }
        }
    }
    assert_eq!(history[0].tags.get("who").map(String::as_str), Some("parent"));
    assert_eq!(stash.load_version::<Array1<f32>>("victim", history[0].version).unwrap(), previous);
    let report = stash.verify().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // Orphaned chunks and temporaries are reclaimed by gc; listed versions survive it.
    let gc = stash.gc_with_grace(Duration::ZERO).unwrap();
    if history.len() == 1 {
        assert_eq!(count_files(&chunks_dir), (baseline, 0), "gc left orphans: {gc:?}");
        assert!(gc.chunks_deleted + gc.temporaries_removed >= 4, "{gc:?}");
    }
    assert_eq!(stash.load_version::<Array1<f32>>("victim", history[0].version).unwrap(), previous);
    // And the store takes new saves.
    stash.save("victim", &previous.mapv(|x| x + 1.0), &[]).unwrap();
    assert_eq!(stash.history("victim").unwrap().len(), history.len() + 1);
}

#[test]
fn sigkill_while_writing_chunks_leaves_previous_version() {
    kill_child_mid_save(KillPoint::WritingChunks);
}

#[test]
fn sigkill_while_committing_chunks_lists_no_partial_version() {
    kill_child_mid_save(KillPoint::CommittingChunks);
}

#[test]
fn two_processes_save_the_same_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stash");
    Stash::open(&root).unwrap();
    let start =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() + 1500;
    let children: Vec<_> = (1..=2)
        .map(|id| child(&format!("writer|{}|{id}|{start}", root.display())).spawn().unwrap())
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "writer failed");
        assert!(String::from_utf8_lossy(&output.stdout).contains("DONE"));
    }
    let stash = Stash::open(&root).unwrap();
    let history = stash.history("shared").unwrap();
    assert_eq!(history.len(), 10, "every save of both writers lands");
    let mut versions: Vec<_> = history.iter().map(|i| i.version).collect();
    versions.dedup();
    assert_eq!(versions.len(), 10);
    for info in &history {
        let id: f32 = info.tags["writer"].parse().unwrap();
        let round: f32 = info.tags["round"].parse().unwrap();
        let a = stash.load_version::<Array1<f32>>("shared", info.version).unwrap();
        assert!(a.iter().all(|&x| x == id + round), "version {} holds the wrong data", info.version);
    }
    for id in ["1", "2"] {
        assert_eq!(history.iter().filter(|i| i.tags["writer"] == id).count(), 5);
    }
}
