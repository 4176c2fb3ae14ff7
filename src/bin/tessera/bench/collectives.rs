//! The `collectives` suite: all-reduce between two processes over the TCP communicator
//! (and, in a build with feature `ucx`, over UCX: `collectives/ucx_…`), as time per
//! operation and bus bandwidth (nccl-tests' definition: busbw = size / time × 2(n−1)/n),
//! beside the loopback TCP limit.
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tessera::{Communicator, GroupConfig, TcpGroup};

use super::{median, start_group, tcp_loopback_gbps, Reporter};

const SECRET_VAR: &str = "TESSERA_SECRET";
const SIZES: [(usize, &str); 5] =
    [(1 << 10, "1KiB"), (64 << 10, "64KiB"), (1 << 20, "1MiB"), (16 << 20, "16MiB"), (128 << 20, "128MiB")];
const RANKS: usize = 2;

/// One measured size, printed by rank 0 as a JSON line.
#[derive(Serialize, Deserialize)]
struct Measured {
    bytes: usize,
    seconds_per_op: f64,
}

/// Arguments of the hidden `collective-member` command.
#[derive(clap::Args)]
pub(crate) struct MemberArgs {
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    size: usize,
    #[arg(long)]
    rendezvous: SocketAddr,
    /// The communicator: tcp, or ucx (a build with feature `ucx`).
    #[arg(long, default_value = "tcp")]
    backend: String,
}

/// A member process: joins the group and times all-reduce at each size.
pub(crate) fn member(args: MemberArgs) -> Result<()> {
    let secret = std::env::var(SECRET_VAR).context("TESSERA_SECRET not set")?;
    let config = GroupConfig::new(args.rank, args.size, args.rendezvous, secret);
    let mut group: Box<dyn Communicator> = match args.backend.as_str() {
        "tcp" => Box::new(TcpGroup::join(config)?),
        #[cfg(feature = "ucx")]
        "ucx" => Box::new(tessera::UcxGroup::join(config)?),
        other => bail!("unknown communicator backend `{other}`"),
    };
    for (bytes, _) in SIZES {
        let mut data = vec![1.0f32; bytes / 4];
        let ops = (512 << 20) / bytes;
        let ops = ops.clamp(5, 4000);
        for _ in 0..(ops / 10).max(2) {
            group.all_reduce(&mut data)?;
        }
        let mut batches = Vec::new();
        for _ in 0..5 {
            let per_batch = (ops / 5).max(1);
            group.barrier()?;
            let start = Instant::now();
            for _ in 0..per_batch {
                group.all_reduce(&mut data)?;
                // Keep values finite and identical across ranks.
                if data[0] > 1e30 {
                    data.fill(1.0);
                }
            }
            batches.push(start.elapsed().as_secs_f64() / per_batch as f64);
        }
        if args.rank == 0 {
            let line = Measured { bytes, seconds_per_op: median(&mut batches) };
            println!("{}", serde_json::to_string(&line)?);
        }
    }
    Ok(())
}

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    all_reduce_sizes(reporter, "tcp", "collectives/all_reduce")?;
    #[cfg(feature = "ucx")]
    all_reduce_sizes(reporter, "ucx", "collectives/ucx_all_reduce")?;
    // The limits an all-reduce works against: one stream into a fresh buffer (as a value
    // transfer), one stream into a reused buffer (as the ring), and two such streams at once
    // (as the two ranks of a 2-rank ring, each sending while it receives).
    let mut fresh: Vec<f64> = (0..3).map(|_| tcp_loopback_gbps(256 << 20)).collect::<Result<_>>()?;
    reporter.report("collectives/tcp_loopback_limit", median(&mut fresh), "GB/s", true);
    let mut reused: Vec<f64> = (0..3).map(|_| tcp_stream_gbps(256 << 20, false)).collect::<Result<_>>()?;
    reporter.report("collectives/tcp_loopback_limit_reused_buffer", median(&mut reused), "GB/s", true);
    let mut duplex: Vec<f64> = (0..3).map(|_| tcp_stream_gbps(256 << 20, true)).collect::<Result<_>>()?;
    reporter.report("collectives/tcp_loopback_limit_two_streams_each", median(&mut duplex), "GB/s", true);
    Ok(())
}

/// Times all-reduce at every size between two member processes over `backend`; reports
/// `<prefix>_<size>_time` and `<prefix>_<size>_busbw`.
fn all_reduce_sizes(reporter: &Reporter, backend: &str, prefix: &str) -> Result<()> {
    let mut members = start_group("collective-member", RANKS, &["--backend".into(), backend.into()])?;
    let stdout = members[0].stdout.take().context("rank 0 output")?;
    let labels: std::collections::HashMap<usize, &str> = SIZES.into_iter().collect();
    for line in BufReader::new(stdout).lines() {
        let measured: Measured = serde_json::from_str(&line?)?;
        let label = labels.get(&measured.bytes).copied().unwrap_or("?");
        let busbw = measured.bytes as f64 / measured.seconds_per_op * 2.0 * (RANKS - 1) as f64 / RANKS as f64;
        reporter.report(&format!("{prefix}_{label}_time"), measured.seconds_per_op * 1e6, "us", false);
        reporter.report(&format!("{prefix}_{label}_busbw"), busbw / 1e9, "GB/s", true);
    }
    for (rank, mut child) in members.into_iter().enumerate() {
        let status = child.wait()?;
        if !status.success() {
            bail!("member {rank} ({backend}) failed: {status}");
        }
    }
    Ok(())
}

/// GB/s of `len` bytes streamed over loopback TCP from a reused 4 MiB buffer into a reused
/// 4 MiB buffer (no page faults); with `duplex`, a second stream runs at the same time and
/// the figure is per stream (`len` each over the time both took).
fn tcp_stream_gbps(len: usize, duplex: bool) -> Result<f64> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    const CHUNK: usize = 4 << 20;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let streams = if duplex { 2 } else { 1 };
    let writers: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || -> Result<()> {
                let mut stream = TcpStream::connect(addr)?;
                let chunk = vec![1u8; CHUNK];
                let mut left = len;
                while left > 0 {
                    let n = left.min(CHUNK);
                    stream.write_all(&chunk[..n])?;
                    left -= n;
                }
                Ok(())
            })
        })
        .collect();
    let accepted: Vec<TcpStream> =
        (0..streams).map(|_| listener.accept().map(|(s, _)| s)).collect::<Result<_, _>>()?;
    let start = Instant::now();
    let readers: Vec<_> = accepted
        .into_iter()
        .map(|mut stream| {
            std::thread::spawn(move || -> Result<usize> {
                let mut buf = vec![0u8; CHUNK];
                let mut read = 0;
                while read < len {
                    let n = stream.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    read += n;
                }
                Ok(read)
            })
        })
        .collect();
    for reader in readers {
        let read = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
        if read != len {
            bail!("short read: {read} of {len}");
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    for writer in writers {
        writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    Ok(len as f64 / seconds / 1e9)
}
