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
            while std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() < start {
                std::hint::spin_loop();
            }
            for round in 0..5u32 {
                stash.save("shared", &a.mapv(|x| x + round as f32), &[("writer", &id.to_string()), ("round", &round.to_string())]).unwrap();
            }
            println!("DONE");
        }
        other => panic!("unknown child job {other}"),
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok()).filter(|e| !e.file_name().to_string_lossy().starts_with(".tmp-")).count()).unwrap_or(0)
}

#[test]
fn sigkill_mid_save_leaves_previous_version() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stash");
    let previous = Array1::from_elem(1000, 7.0f32);
    {
        let stash = Stash::open(&root).unwrap();
        stash.save("victim", &previous, &[("who", "parent")]).unwrap();
    }
    let chunks_dir = root.join("chunks");
    let baseline = count_files(&chunks_dir);
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
    // Kill as soon as the child has made some, but not all, of its chunks durable.
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_files(&chunks_dir) < baseline + 4 {
        assert!(Instant::now() < deadline, "child wrote no chunks within 60 s");
        std::thread::sleep(Duration::from_micros(200));
    }
    proc.kill().unwrap(); // SIGKILL
    let status = proc.wait().unwrap();
    assert!(!status.success());
    let written = count_files(&chunks_dir) - baseline;
    assert!(written < BIG * 4 / tessera::CHUNK_SIZE, "the child finished its save ({written} chunks) before the kill");

    let stash = Stash::open(&root).unwrap();
    let history = stash.history("victim").unwrap();
    assert_eq!(history.len(), 1, "a partial version is listed: {history:?}");
    assert_eq!(history[0].tags.get("who").map(String::as_str), Some("parent"));
    assert_eq!(stash.load::<Array1<f32>>("victim").unwrap(), previous);
    let report = stash.verify().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // The orphaned chunks are reclaimed by gc, and the previous version survives it.
    let gc = stash.gc_with_grace(Duration::ZERO).unwrap();
    assert!(gc.chunks_deleted >= 4, "{gc:?}");
    assert_eq!(count_files(&chunks_dir), baseline);
    assert_eq!(stash.load::<Array1<f32>>("victim").unwrap(), previous);
    // And the store takes new saves.
    stash.save("victim", &previous.mapv(|x| x + 1.0), &[]).unwrap();
    assert_eq!(stash.history("victim").unwrap().len(), 2);
}

#[test]
fn two_processes_save_the_same_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stash");
    Stash::open(&root).unwrap();
    let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() + 1500;
    let children: Vec<_> =
        (1..=2).map(|id| child(&format!("writer|{}|{id}|{start}", root.display())).spawn().unwrap()).collect();
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
