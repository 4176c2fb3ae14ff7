//! `tessera bench <suite>`: runs a benchmark suite and prints one result per line.
//!
//! With `--json` each line is `{"bench": "<suite>/<case>", "value": <number>,
//! "unit": "<unit>", "higher_is_better": <bool>}`, the format the benchmarking CI reads.
mod cluster;
pub(crate) mod collectives;
pub(crate) mod compare;
#[cfg(feature = "cuda")]
mod cuda;
mod darray;
mod store;
mod tasks;
pub(crate) mod train;
#[cfg(feature = "xla")]
mod xla;

mod nn;
mod pipeline;
mod sched;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// The suite to run: tasks, sched, cluster, darray, collectives, nn, train, pipeline, store, cuda,
    /// xla.
    suite: String,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// The cuda suite at small sizes, named `cuda-small/…`: a quick check that every part
    /// of the suite runs, not figures to record.
    #[arg(long)]
    small: bool,
}

/// One measured figure of a suite: a line of `--json`, written by the suites and read by
/// `tessera bench-compare`.
#[derive(Serialize, Deserialize)]
pub(crate) struct BenchLine {
    pub(crate) bench: String,
    pub(crate) value: f64,
    pub(crate) unit: String,
    pub(crate) higher_is_better: bool,
}

/// The words for a figure's direction.
pub(crate) fn direction(higher_is_better: bool) -> &'static str {
    if higher_is_better {
        "higher is better"
    } else {
        "lower is better"
    }
}

/// Prints results as they are measured, so that long suites show progress.
pub(crate) struct Reporter {
    json: bool,
}

impl Reporter {
    pub(crate) fn report(&self, bench: &str, value: f64, unit: &'static str, higher_is_better: bool) {
        let line = BenchLine { bench: bench.to_string(), value, unit: unit.to_string(), higher_is_better };
        let text = if self.json {
            serde_json::to_string(&line).expect("bench line serializes")
        } else {
            format!(
                "{:<36} {:>14.3} {:<10} ({})",
                line.bench,
                line.value,
                line.unit,
                direction(higher_is_better)
            )
        };
        match crate::write_stdout(&format!("{text}\n")) {
            Ok(true) => {}
            // The reader went away (`tessera bench … | head`): nobody wants the remaining
            // figures, so stop quietly instead of measuring on.
            Ok(false) => std::process::exit(0),
            Err(error) => {
                eprintln!("tessera bench: cannot write a result: {error:#}");
                std::process::exit(1);
            }
        }
    }
}

pub(crate) fn run(args: BenchArgs) -> Result<()> {
    let reporter = Reporter { json: args.json };
    match args.suite.as_str() {
        "tasks" => tasks::run(&reporter),
        "sched" => sched::run(&reporter),
        "cluster" => cluster::run(&reporter),
        "darray" => darray::run(&reporter),
        "collectives" => collectives::run(&reporter),
        "nn" => nn::run(&reporter),
        "train" => train::run(&reporter),
        "pipeline" => pipeline::run(&reporter),
        "store" => store::run(&reporter),
        #[cfg(feature = "cuda")]
        "cuda" => cuda::run(&reporter, args.small),
        #[cfg(not(feature = "cuda"))]
        "cuda" => bail!("the cuda suite needs a build with `--features cuda`"),
        #[cfg(feature = "xla")]
        "xla" => xla::run(&reporter),
        #[cfg(not(feature = "xla"))]
        "xla" => bail!("the xla suite needs a build with `--features xla`"),
        other => {
            bail!("unknown bench suite `{other}`; known suites: tasks, sched, cluster, darray, collectives, nn, train, pipeline, store, cuda, xla")
        }
    }
}

/// The median of a set of samples (sorted in place).
pub(crate) fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    let n = samples.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    }
}

/// One TCP stream over loopback: `len` bytes written in 4 MiB pieces, read into one buffer.
/// The limit that transfers over the node transport are compared with.
pub(crate) fn tcp_loopback_gbps(len: usize) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let writer = std::thread::spawn(move || -> Result<()> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let chunk = vec![1u8; 4 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            stream.write_all(&chunk[..n])?;
            left -= n;
        }
        Ok(())
    });
    let (mut stream, _) = listener.accept()?;
    let mut buf = Vec::with_capacity(len);
    let start = Instant::now();
    let read = (&mut stream).take(len as u64).read_to_end(&mut buf)?;
    let seconds = start.elapsed().as_secs_f64();
    writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    ensure!(read == len, "short read");
    Ok(len as f64 / seconds / 1e9)
}

/// Starts `size` member processes of this binary around a rendezvous:
/// `tessera <subcommand> --rank R --size N --rendezvous ADDR <extra…>`, with a fresh secret
/// in `TESSERA_SECRET`. Rank 0's standard output is piped; returns once all have met.
pub(crate) fn start_group(
    subcommand: &str,
    size: usize,
    extra: &[String],
) -> Result<Vec<std::process::Child>> {
    use anyhow::Context;
    use std::process::{Command, Stdio};
    let secret = format!("bench-{subcommand}-{}", std::process::id());
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let rendezvous = {
        let secret = secret.clone();
        std::thread::spawn(move || {
            tessera::Rendezvous::serve(listener, size, &secret, std::time::Duration::from_secs(30))
        })
    };
    let exe = std::env::current_exe()?;
    let mut members = Vec::new();
    for rank in 0..size {
        let child = Command::new(&exe)
            .args([subcommand, "--rank", &rank.to_string(), "--size", &size.to_string()])
            .args(["--rendezvous", &addr.to_string()])
            .args(extra)
            .env("TESSERA_SECRET", &secret)
            .stdout(if rank == 0 { Stdio::piped() } else { Stdio::null() })
            .spawn()
            .with_context(|| format!("starting {subcommand} process {rank}"))?;
        members.push(child);
    }
    rendezvous.join().map_err(|_| anyhow::anyhow!("rendezvous panicked"))??;
    Ok(members)
}
