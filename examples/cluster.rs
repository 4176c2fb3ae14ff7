//! A map-reduce word count over three local node processes.
//!
//! Starts 3 node processes of this same program, counts the words of the text files given
//! on the command line (default: the project's own sources and docs) with one map task per
//! file and a tree of merge tasks, then prints the top words, the tasks each node ran and
//! the time.
//!
//! Run it: `cargo run --release --example cluster -- [FILES...]`
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tessera::{Cluster, ClusterConfig, LocalProcesses, Ref, Runtime};

type Counts = Vec<(String, u64)>;

tessera::task! {
    /// Map: the word counts of one text, sorted by word.
    fn count_words(text: String) -> Counts {
        let mut counts: HashMap<String, u64> = HashMap::new();
        for word in text.split(|c: char| !c.is_alphanumeric()).filter(|w| w.len() > 2) {
            *counts.entry(word.to_lowercase()).or_default() += 1;
        }
        let mut counts: Counts = counts.into_iter().collect();
        counts.sort();
        counts
    }
}

tessera::task! {
    /// Reduce: merges two sorted count lists.
    fn merge_counts(a: Counts, b: Counts) -> Counts {
        let mut merged = Vec::with_capacity(a.len() + b.len());
        let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.0 == y.0 => {
                    let (word, n) = a.next().expect("peeked");
                    let (_, m) = b.next().expect("peeked");
                    merged.push((word, n + m));
                }
                (Some(x), Some(y)) => merged.push(if x.0 < y.0 { a.next() } else { b.next() }.expect("peeked")),
                (Some(_), None) => merged.extend(a.by_ref()),
                (None, Some(_)) => merged.extend(b.by_ref()),
                (None, None) => break,
            }
        }
        merged
    }
}

fn default_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    let mut stack = vec![root.join("src"), root.join("examples"), root.join("tests")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs" || e == "md") {
                files.push(path);
            }
        }
    }
    for doc in ["README.md", "ARCHITECTURE.md", "BENCHMARKS.md"] {
        files.push(root.join(doc));
    }
    files.retain(|f| f.is_file());
    files.sort();
    files
}

fn main() -> Result<()> {
    tessera::init();
    let files: Vec<PathBuf> = match std::env::args().skip(1).map(PathBuf::from).collect::<Vec<_>>() {
        given if given.is_empty() => default_files(),
        given => given,
    };
    let started = Instant::now();
    let rt = Runtime::local()?;
    let cluster = Cluster::start(&rt, ClusterConfig::default())?;
    println!("head listening on {}; starting 3 local node processes", cluster.addr());
    cluster.launch(&LocalProcesses::new(3))?;
    cluster.wait_for_nodes(3, Duration::from_secs(30))?;
    println!("cluster up in {:.0} ms", started.elapsed().as_secs_f64() * 1e3);

    let job = Instant::now();
    let mut level: Vec<Ref<Counts>> = Vec::new();
    let mut bytes = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        bytes += text.len();
        level.push(count_words::spawn(&rt, text));
    }
    println!("map: {} files ({:.1} KiB), one task each", files.len(), bytes as f64 / 1024.0);
    let mut merges = 0;
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => {
                    merges += 1;
                    merge_counts::spawn(&rt, a, b)
                }
                [a] => a.clone(),
                _ => unreachable!("chunks of two"),
            })
            .collect();
    }
    let counts = match level.pop() {
        Some(total) => total.blocking_get()?,
        None => Vec::new(),
    };
    let elapsed = job.elapsed();
    println!("reduce: {merges} merge tasks");

    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    let mut top = counts.clone();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    println!("\n{total} words, {} distinct; top 15:", counts.len());
    for (word, n) in top.iter().take(15) {
        println!("  {n:>7}  {word}");
    }
    println!("\nper node: tasks run, values held for the head, devices:");
    for node in cluster.nodes() {
        let xla = node.xla.as_ref().map_or("no", |_| "yes");
        println!(
            "  {:<10} {:>5} tasks  {:>3} values ({:.1} KiB)  {} GPU(s), XLA: {xla}  (pid {})",
            node.name,
            node.tasks_run,
            node.values_held,
            node.bytes_held as f64 / 1024.0,
            node.gpus.len(),
            node.pid
        );
    }
    println!(
        "\njob took {:.1} ms; total with cluster start {:.1} ms",
        elapsed.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3
    );
    rt.shutdown();
    Ok(())
}
