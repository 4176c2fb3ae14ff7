//! `tessera bench store`: save and load of a 512 MiB f32 array on the embedded stash,
//! beside the raw limits of the same disk measured by the same command: a sequential
//! write of a plain file of the same size with one fsync, and its read-back. The same
//! save and load on a mirror of two directories of that disk (`mirror:A,B`: every byte
//! written twice, read once) give the cost of redundancy.
//!
//! Reads are cold when the page cache can be dropped (`/proc/sys/vm/drop_caches`,
//! needs root); otherwise both the raw read and the stash load are warm, and the suite
//! says so on stderr. Environment: `TESSERA_BENCH_DIR` (default: the temp dir) and
//! `TESSERA_BENCH_STORE_MIB` (default 512). Everything written is removed at the end, and a
//! run removes what runs that were killed left behind.
//!
//! Remote stores: `TESSERA_BENCH_STORE_URLS` (stash URLs separated by spaces, say an
//! `s3://` and a `postgres://` one; the binary needs the backends' features) adds the same
//! save and load through each, named by its scheme, beside the loopback TCP limit when
//! any is on this machine. Each repeat saves different bytes (every chunk new, so nothing
//! is deduplicated away) under a name of its own, which is deleted after, and its chunks
//! collected with no grace period: give each URL a store (bucket prefix, table) of the
//! bench's own.
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use ndarray::Array1;
use tessera::Stash;

use super::{median, Reporter};

const REPEATS: usize = 5;

/// Removes the bench directory however the suite ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the scratch directories of earlier runs that were killed before they could
/// (Ctrl-C, `kill`): `tessera-bench-store-PID` under `base` whose process is gone. Each
/// holds up to twice the array's size.
fn remove_abandoned_scratch(base: &Path) {
    // Whether a process lives is read from /proc: without it, leave everything.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("tessera-bench-store-")) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!(
                "bench store: removing {} (left by an earlier run that was stopped)",
                entry.path().display()
            );
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Syncs and drops the page cache; false when not permitted.
fn drop_caches() -> bool {
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}

fn gbps(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    let mib: usize = match std::env::var("TESSERA_BENCH_STORE_MIB") {
        Ok(v) => v.parse().context("TESSERA_BENCH_STORE_MIB must be a number of MiB")?,
        Err(_) => 512,
    };
    // An array of at least one chunk's worth and small enough to hold in memory twice.
    ensure!(
        (1..=65_536).contains(&mib),
        "TESSERA_BENCH_STORE_MIB must be between 1 and 65536 MiB, not {mib}"
    );
    let base = std::env::var_os("TESSERA_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    remove_abandoned_scratch(&base);
    let scratch = Scratch(base.join(format!("tessera-bench-store-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).with_context(|| format!("creating {}", scratch.0.display()))?;
    let bytes = mib << 20;
    eprintln!("bench store: {mib} MiB f32 array in {}, {REPEATS} repeats", scratch.0.display());
    let array = Array1::from_iter((0..bytes / 4).map(|i| i as f32 * 0.5));
    let raw: &[u8] = bytemuck_bytes(array.as_slice().expect("a fresh Array1 is contiguous"));

    let cold = drop_caches();
    if cold {
        eprintln!("bench store: page cache dropped before every read (cold reads)");
    } else {
        eprintln!("bench store: cannot drop the page cache: raw read and load are both WARM");
    }

    // Each repeat measures the raw limits and the stash back to back, so that the disk's
    // drift hits both alike: write a plain file (one fsync), save into a fresh stash (so
    // no chunk is deduplicated away), then read the file back and load the value.
    let raw_path = scratch.0.join("raw.bin");
    let (mut write, mut read, mut save, mut load) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut mirror_save, mut mirror_load) = (Vec::new(), Vec::new());
    for rep in 0..REPEATS {
        // Both writes start from the same page-cache state: empty.
        drop_caches();
        let start = Instant::now();
        raw_write(&raw_path, raw)?;
        write.push(gbps(bytes, start.elapsed().as_secs_f64()));

        let dir = scratch.0.join(format!("stash-{rep}"));
        let stash = Stash::open(&dir)?;
        drop_caches();
        let start = Instant::now();
        stash.save("weights", &array, &[("bench", "store")])?;
        save.push(gbps(bytes, start.elapsed().as_secs_f64()));

        if cold {
            drop_caches();
        }
        let start = Instant::now();
        let back = raw_read(&raw_path, bytes)?;
        read.push(gbps(bytes, start.elapsed().as_secs_f64()));
        anyhow::ensure!(back == raw, "raw read-back differs");
        drop(back);
        std::fs::remove_file(&raw_path).ok();

        if cold {
            drop_caches();
        }
        let start = Instant::now();
        let back: Array1<f32> = stash.load("weights")?;
        load.push(gbps(bytes, start.elapsed().as_secs_f64()));
        anyhow::ensure!(back == array, "stash load differs from what was saved");
        drop((back, stash));
        std::fs::remove_dir_all(&dir).ok();

        let copies = [scratch.0.join(format!("mirror-{rep}-a")), scratch.0.join(format!("mirror-{rep}-b"))];
        let stash = Stash::open_url(&format!("mirror:{},{}", copies[0].display(), copies[1].display()))?;
        drop_caches();
        let start = Instant::now();
        stash.save("weights", &array, &[("bench", "store")])?;
        mirror_save.push(gbps(bytes, start.elapsed().as_secs_f64()));
        if cold {
            drop_caches();
        }
        let start = Instant::now();
        let back: Array1<f32> = stash.load("weights")?;
        mirror_load.push(gbps(bytes, start.elapsed().as_secs_f64()));
        anyhow::ensure!(back == array, "mirror load differs from what was saved");
        drop((back, stash));
        for copy in &copies {
            std::fs::remove_dir_all(copy).ok();
        }
        eprintln!(
            "bench store: rep {rep}: raw write {:.3}, save {:.3}, raw read {:.3}, load {:.3}, \
             mirror save {:.3}, mirror load {:.3} GB/s",
            write[rep], save[rep], read[rep], load[rep], mirror_save[rep], mirror_load[rep]
        );
    }
    drop(array);
    let urls = std::env::var("TESSERA_BENCH_STORE_URLS").unwrap_or_default();
    let urls: Vec<&str> = urls.split_whitespace().collect();
    if !urls.is_empty() {
        remote_stores(reporter, &urls, mib)?;
    }
    reporter.report("store/raw_write_limit", median(&mut write), "GB/s", true);
    reporter.report("store/raw_read_limit", median(&mut read), "GB/s", true);
    let name = format!("store/save_{mib}MiB_f32");
    reporter.report(&name, median(&mut save), "GB/s", true);
    let name = format!("store/load_{mib}MiB_f32");
    reporter.report(&name, median(&mut load), "GB/s", true);
    let name = format!("store/mirror2_save_{mib}MiB_f32");
    reporter.report(&name, median(&mut mirror_save), "GB/s", true);
    let name = format!("store/mirror2_load_{mib}MiB_f32");
    reporter.report(&name, median(&mut mirror_load), "GB/s", true);
    Ok(())
}

/// Save and load through each remote stash in `urls`, `REMOTE_REPEATS` times each.
fn remote_stores(reporter: &Reporter, urls: &[&str], mib: usize) -> Result<()> {
    const REMOTE_REPEATS: usize = 3;
    let bytes = mib << 20;
    let mut on_loopback = false;
    for url in urls {
        let scheme = url.split(':').next().unwrap_or("remote");
        on_loopback |= url.contains("127.0.0.1") || url.contains("localhost");
        let stash = Stash::open_url(url).with_context(|| format!("opening the bench's stash {scheme}:…"))?;
        let (mut save, mut load) = (Vec::new(), Vec::new());
        for rep in 0..REMOTE_REPEATS {
            // Different bytes each repeat: no chunk of an earlier one can be reused.
            let array = Array1::from_iter((0..bytes / 4).map(|i| (i + rep * 7919 + 1) as f32 * 0.25));
            let name = format!("tessera-bench-{}-{rep}", std::process::id());
            let start = Instant::now();
            stash.save(&name, &array, &[("bench", "store")])?;
            save.push(gbps(bytes, start.elapsed().as_secs_f64()));
            let start = Instant::now();
            let back: Array1<f32> = stash.load(&name)?;
            load.push(gbps(bytes, start.elapsed().as_secs_f64()));
            anyhow::ensure!(back == array, "{scheme} load differs from what was saved");
            drop((back, array));
            stash.delete(&name, None)?;
            stash.gc_with_grace(std::time::Duration::ZERO)?;
            eprintln!("bench store: {scheme} rep {rep}: save {:.3}, load {:.3} GB/s", save[rep], load[rep]);
        }
        reporter.report(&format!("store/{scheme}_save_{mib}MiB_f32"), median(&mut save), "GB/s", true);
        reporter.report(&format!("store/{scheme}_load_{mib}MiB_f32"), median(&mut load), "GB/s", true);
    }
    if on_loopback {
        let mut limits: Vec<f64> =
            (0..REMOTE_REPEATS).map(|_| super::tcp_loopback_gbps(bytes)).collect::<Result<_>>()?;
        reporter.report("store/tcp_loopback_limit", median(&mut limits), "GB/s", true);
    }
    Ok(())
}

fn bytemuck_bytes(values: &[f32]) -> &[u8] {
    bytemuck::cast_slice(values)
}

fn raw_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

fn raw_read(path: &Path, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    File::open(path)?.read_exact(&mut buf)?;
    Ok(buf)
}
