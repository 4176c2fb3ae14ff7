//! The `collectives` suite: all-reduce between two processes over the TCP communicator,
//! as time per operation and bus bandwidth (nccl-tests' definition:
//! busbw = size / time × 2(n−1)/n), beside the loopback TCP limit.
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
}

/// A member process: joins the group and times all-reduce at each size.
pub(crate) fn member(args: MemberArgs) -> Result<()> {
    let secret = std::env::var(SECRET_VAR).context("TESSERA_SECRET not set")?;
    let mut group = TcpGroup::join(GroupConfig::new(args.rank, args.size, args.rendezvous, secret))?;
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
    let mut members = start_group("collective-member", RANKS, &[])?;
    let stdout = members[0].stdout.take().context("rank 0 output")?;
    let labels: std::collections::HashMap<usize, &str> = SIZES.into_iter().collect();
    for line in BufReader::new(stdout).lines() {
        let measured: Measured = serde_json::from_str(&line?)?;
        let label = labels.get(&measured.bytes).copied().unwrap_or("?");
        let busbw = measured.bytes as f64 / measured.seconds_per_op * 2.0 * (RANKS - 1) as f64 / RANKS as f64;
        reporter.report(
            &format!("collectives/all_reduce_{label}_time"),
            measured.seconds_per_op * 1e6,
            "us",
            false,
        );
        reporter.report(&format!("collectives/all_reduce_{label}_busbw"), busbw / 1e9, "GB/s", true);
    }
    for (rank, mut child) in members.into_iter().enumerate() {
        let status = child.wait()?;
        if !status.success() {
            bail!("member {rank} failed: {status}");
        }
    }
    let mut limits: Vec<f64> = (0..3).map(|_| tcp_loopback_gbps(256 << 20)).collect::<Result<_>>()?;
    reporter.report("collectives/tcp_loopback_limit", median(&mut limits), "GB/s", true);
    Ok(())
}
