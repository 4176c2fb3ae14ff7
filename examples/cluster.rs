//! A map-reduce word count over node processes: three local ones by default, or one per
//! host over SSH, or one per node of a Slurm allocation.
//!
//! Starts the nodes (this same program), counts the words of the text files given on the
//! command line (default: the project's own sources and docs) with one map task per file
//! and a tree of merge tasks, then prints the top words, the tasks each node ran and the
//! time.
//!
//! Run it: `cargo run --release --example cluster -- [OPTIONS] [FILES...]`, with
//! - `--local N`: N local node processes (the default, 3; at most 256);
//! - `--ssh HOST,HOST,...`: one node per host, over SSH with key-based login; the program
//!   must be at the same path there (`--ssh-option OPT` passes an option to `ssh`, once
//!   per option);
//! - `--slurm`: inside a Slurm allocation (`salloc`, `sbatch`), one node per allocated node;
//! - `--listen ADDR`: where the head listens (default `127.0.0.1:0`). Give this machine's
//!   address as the other hosts reach it (say `10.0.0.5:7000`) for nodes elsewhere: they
//!   then listen on every interface.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tessera::{Cluster, ClusterConfig, ClusterManager, LocalProcesses, Ref, Runtime, Slurm, Ssh};

type Counts = Vec<(String, u64)>;

tessera::task! {
    /// Map: the word counts of one text, sorted by word.
    fn count_words(text: String) -> Counts { word_counts(&[text.as_str()]) }
}

/// The counts of the words (of 3 or more letters, lowercased) in `texts`, sorted by word.
fn word_counts(texts: &[&str]) -> Counts {
    let mut counts: HashMap<String, u64> = HashMap::new();
    for text in texts {
        for word in text.split(|c: char| !c.is_alphanumeric()).filter(|w| w.len() > 2) {
            *counts.entry(word.to_lowercase()).or_default() += 1;
        }
    }
    let mut counts: Counts = counts.into_iter().collect();
    counts.sort();
    counts
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

/// Where the nodes come from.
enum Nodes {
    Local(usize),
    Ssh(Vec<String>),
    Slurm,
}

struct Options {
    nodes: Nodes,
    ssh_options: Vec<String>,
    listen: std::net::SocketAddr,
    files: Vec<PathBuf>,
}

fn parse_options() -> Result<Options> {
    let mut options = Options {
        nodes: Nodes::Local(3),
        ssh_options: Vec::new(),
        listen: ClusterConfig::default().listen,
        files: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--local" => {
                let count: usize = value("--local")?.parse().context("--local N")?;
                // Each node is a process with its own threads: thousands would only exhaust
                // the machine, not count words faster.
                ensure!((1..=256).contains(&count), "--local N takes 1 to 256 node processes, not {count}");
                options.nodes = Nodes::Local(count);
            }
            "--ssh" => {
                let hosts: Vec<String> =
                    value("--ssh")?.split(',').filter(|h| !h.is_empty()).map(String::from).collect();
                if hosts.is_empty() {
                    bail!("--ssh needs at least one host");
                }
                options.nodes = Nodes::Ssh(hosts);
            }
            "--ssh-option" => options.ssh_options.push(value("--ssh-option")?),
            "--slurm" => options.nodes = Nodes::Slurm,
            "--listen" => {
                options.listen = value("--listen")?.parse().context("--listen ADDR (say 10.0.0.5:7000)")?
            }
            flag if flag.starts_with("--") => {
                bail!("unknown option {flag} (see the top of examples/cluster.rs)")
            }
            file => options.files.push(PathBuf::from(file)),
        }
    }
    if options.files.is_empty() {
        options.files = default_files();
    }
    Ok(options)
}

fn main() -> Result<()> {
    tessera::init();
    let options = parse_options()?;
    let files = options.files;
    let started = Instant::now();
    let rt = Runtime::local()?;
    let cluster = Cluster::start(&rt, ClusterConfig { listen: options.listen, ..ClusterConfig::default() })?;
    // Nodes elsewhere listen on every interface (each tells peers the address through
    // which it reaches the head); nodes on this machine stay on loopback.
    let node_listen = (!options.listen.ip().is_loopback()).then(|| "0.0.0.0:0".to_string());
    let (manager, expected): (Box<dyn ClusterManager>, usize) = match options.nodes {
        Nodes::Local(count) => (Box::new(LocalProcesses::new(count)), count),
        Nodes::Ssh(hosts) => {
            let count = hosts.len();
            (Box::new(Ssh { node_listen, ssh_options: options.ssh_options, ..Ssh::new(hosts) }), count)
        }
        Nodes::Slurm => {
            let slurm = Slurm::from_env();
            let Some(count) = slurm.nodes else {
                bail!("--slurm needs a Slurm allocation (SLURM_NNODES is not set): run it under salloc or sbatch");
            };
            (Box::new(Slurm { node_listen, ..slurm }), count)
        }
    };
    println!("head listening on {}; starting {expected} node processes ({})", cluster.addr(), manager.name());
    cluster.launch(manager.as_ref())?;
    cluster.wait_for_nodes(expected, Duration::from_secs(60))?;
    println!("cluster up in {:.0} ms", started.elapsed().as_secs_f64() * 1e3);

    let job = Instant::now();
    let mut level: Vec<Ref<Counts>> = Vec::new();
    let mut texts = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        level.push(count_words::spawn(&rt, text.clone()));
        texts.push(text);
    }
    let bytes: usize = texts.iter().map(String::len).sum();
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
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    anyhow::ensure!(counts == word_counts(&texts), "the cluster's counts differ from counting here");

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
