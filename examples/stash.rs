//! The stash, end to end: versions and tags of a value, a 256 MiB array saved and loaded
//! with progress, then redundancy: the same entries kept on a mirror of two directories,
//! one of them damaged and then deleted outright, every load still served, and `repair`
//! making both whole again. Each step prints what it did and how long it took.
//!
//! Run it: `cargo run --release --example stash` (it works in a temporary directory, or in
//! `$TESSERA_EXAMPLE_DIR` if set, and removes what it wrote).
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use ndarray::Array1;
use serde::{Deserialize, Serialize};
use tessera::{Stash, TransferProgress};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunConfig {
    model: String,
    learning_rate: f64,
    layers: Vec<usize>,
}

/// Prints a line at each quarter of a transfer.
fn quarters() -> impl Fn(TransferProgress<'_>) + Send + Sync + 'static {
    let printed = Mutex::new(0u64);
    move |p: TransferProgress<'_>| {
        if p.total < 64 << 20 {
            return;
        }
        let quarter = 4 * p.done / p.total;
        let mut last = printed.lock().unwrap_or_else(|e| e.into_inner());
        if quarter > *last || (quarter == 0 && *last == 4) {
            *last = quarter;
            println!("    {:?} {}: {} of {} MiB", p.kind, p.name, p.done >> 20, p.total >> 20);
        }
    }
}

/// Removes the example's directory however it ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn chunk_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(root.join("chunks"))?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    files.sort();
    Ok(files)
}

/// The stash end to end: versions, tags, a 256 MiB array with progress, and a mirror that
/// survives a damaged and a deleted replica. Takes no arguments (`TESSERA_EXAMPLE_DIR`:
/// where to write, default the temp dir).
#[derive(clap::Parser)]
struct Args {}

fn main() -> Result<()> {
    // `--help` says what this runs; any argument is an error, not silently ignored.
    <Args as clap::Parser>::parse();
    let base = std::env::var_os("TESSERA_EXAMPLE_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let scratch = Scratch(base.join(format!("tessera-stash-example-{}", std::process::id())));

    // 1. Versions and tags of a small value.
    let stash = Stash::open(scratch.0.join("single"))?.with_progress(quarters());
    let mut config = RunConfig { model: "mlp".into(), learning_rate: 0.1, layers: vec![64, 128, 10] };
    let v1 = stash.save("config", &config, &[("stage", "baseline")])?;
    config.learning_rate = 0.05;
    stash.save("config", &config, &[("stage", "tuned")])?;
    let baseline: RunConfig = stash.load_tagged("config", "stage", "baseline")?;
    ensure!(baseline.learning_rate == 0.1 && stash.load::<RunConfig>("config")? == config);
    println!("config: {} versions; the one tagged stage=baseline is {v1}", stash.history("config")?.len());

    // 2. A 256 MiB array: saved in content-addressed chunks, loaded with every chunk checked.
    let weights = Array1::from_iter((0..64 << 20).map(|i| (i as f32 * 1e-3).sin()));
    let t = Instant::now();
    stash.save("weights", &weights, &[("epoch", "1")])?;
    let save_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let back: Array1<f32> = stash.load("weights")?;
    ensure!(back == weights, "the loaded array differs");
    println!(
        "weights: 256 MiB saved in {save_s:.2} s, loaded and checked in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    // A second version changing one element stores one new chunk (4 MiB), not 256 MiB.
    let before = stash.stats()?.chunk_bytes;
    let mut changed = weights.clone();
    changed[12_345] = 42.0;
    stash.save("weights", &changed, &[("epoch", "2")])?;
    let added = stash.stats()?.chunk_bytes - before;
    ensure!(added <= 4 << 20, "a one-element change stored {added} bytes");
    println!("weights: a second version differing in one element added {} KiB of chunks", added >> 10);

    // 3. Redundancy: a mirror of two directories.
    let (a, b) = (scratch.0.join("replica-a"), scratch.0.join("replica-b"));
    let url = format!("mirror:{},{}", a.display(), b.display());
    let mirror = Stash::open_url(&url)?.with_progress(quarters());
    let t = Instant::now();
    mirror.save("weights", &weights, &[("epoch", "1")])?;
    mirror.save("config", &config, &[])?;
    println!("mirror: 256 MiB saved on both replicas in {:.2} s", t.elapsed().as_secs_f64());

    // Damage replica a: one chunk garbled, another deleted. Loads read b's intact copies
    // and write them back over a's.
    let chunks = chunk_files(&a)?;
    let mut bytes = std::fs::read(&chunks[0])?;
    bytes[100] ^= 0xff;
    std::fs::write(&chunks[0], &bytes)?;
    std::fs::remove_file(&chunks[1])?;
    let back: Array1<f32> = mirror.load("weights")?;
    ensure!(back == weights, "a load with replica a damaged differs");
    println!("mirror: replica a damaged (a chunk garbled, one deleted): the load was served and healed a");

    // Lose replica a entirely; b serves everything, and repair rebuilds a.
    std::fs::remove_dir_all(&a).context("deleting replica a")?;
    let mirror = Stash::open_url(&url)?.with_progress(quarters());
    ensure!(mirror.load::<RunConfig>("config")? == config);
    let t = Instant::now();
    let report = mirror.repair()?;
    ensure!(report.is_complete(), "repair left problems: {report:?}");
    println!(
        "mirror: replica a deleted; repair checked {} blobs and wrote {} copies ({} MiB) in {:.2} s",
        report.blobs_checked,
        report.copies_written,
        report.bytes_written >> 20,
        t.elapsed().as_secs_f64()
    );
    for root in [&a, &b] {
        let alone = Stash::open(root)?;
        ensure!(alone.load::<Array1<f32>>("weights")? == weights, "{} is not whole", root.display());
        ensure!(alone.verify()?.problems.is_empty(), "{} does not verify", root.display());
    }
    println!("mirror: each replica, opened alone, verifies and loads every entry");
    Ok(())
}
