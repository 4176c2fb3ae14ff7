//! Multi-process tests of the collectives against a serial reference: every operation,
//! sizes from 1 element to 64 MiB, groups of 2 to 4 processes, bit-identical results on
//! every rank, and a dead or stalled member failing the others with its rank named; over
//! TCP (`TcpGroup`) and, with feature `ucx`, over UCX (`UcxGroup`).
//!
//! `harness = false`: the members are this binary re-executed with `COLL_*` variables.
mod support;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tessera::{segment, CollectiveError, Communicator, GroupConfig, Rendezvous, TcpGroup};

const SECRET: &str = "collective-test-secret";
/// Element counts: 1 element up to 64 MiB of f32.
const COUNTS: [usize; 8] = [1, 3, 7, 1000, 16 << 10, 256 << 10, 4 << 20, 16 << 20];

/// Small integers: sums are exact in any order, so results compare exactly.
fn exact_data(rank: usize, count: usize) -> Vec<f32> {
    (0..count).map(|i| (((i * 31 + rank * 7 + count) % 17) as f32) - 8.0).collect()
}

/// Values whose sum depends on the order of additions.
fn rough_data(rank: usize, count: usize) -> Vec<f32> {
    let mut state = ((rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ count as u64;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 1e-3 + 1.0
        })
        .collect()
}

fn member() -> Result<()> {
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} not set"));
    let rank: usize = var("COLL_RANK")?.parse()?;
    let size: usize = var("COLL_SIZE")?.parse()?;
    let addr = var("COLL_ADDR")?.parse()?;
    let mode = var("COLL_MODE")?;
    let mut config = GroupConfig::new(rank, size, addr, SECRET);
    if mode != "verify" {
        config.timeout = Duration::from_secs(2);
    }
    let mut group: Box<dyn Communicator> = match var("COLL_BACKEND")?.as_str() {
        "tcp" => Box::new(TcpGroup::join(config)?),
        #[cfg(feature = "ucx")]
        "ucx" => Box::new(tessera::UcxGroup::join(config)?),
        other => bail!("unknown backend {other}"),
    };
    let group = group.as_mut();
    match mode.as_str() {
        "verify" => verify(group),
        "small" => verify_small(group),
        "dead" | "stall" => {
            if rank == size - 1 {
                if mode == "stall" {
                    std::thread::sleep(Duration::from_secs(30));
                }
                std::process::exit(0); // leaves without a word
            }
            let start = Instant::now();
            let mut data = vec![1.0f32; 1000];
            match group.all_reduce(&mut data) {
                Ok(()) => bail!("all_reduce succeeded without rank {}", size - 1),
                Err(error) => {
                    let named = match &error {
                        CollectiveError::Timeout { rank, .. } | CollectiveError::PeerLost { rank, .. } => {
                            *rank
                        }
                        other => bail!("unexpected error {other}"),
                    };
                    ensure!(named == size - 1, "error names rank {named}: {error}");
                    ensure!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
                    println!("rank {rank}: {error}");
                    Ok(())
                }
            }
        }
        other => bail!("unknown mode {other}"),
    }
}

fn verify(group: &mut dyn Communicator) -> Result<()> {
    let (rank, size) = (group.rank(), group.size());
    for count in COUNTS {
        let reference: Vec<f32> = {
            let mut sum = vec![0f32; count];
            for r in 0..size {
                sum.iter_mut().zip(exact_data(r, count)).for_each(|(s, x)| *s += x);
            }
            sum
        };
        let mut data = exact_data(rank, count);
        group.all_reduce(&mut data)?;
        ensure!(data == reference, "all_reduce of {count} differs from the serial reference");

        let root = count % size;
        let mut data = if rank == root { exact_data(root, count) } else { vec![0f32; count] };
        group.broadcast(&mut data, root)?;
        ensure!(data == exact_data(root, count), "broadcast of {count} from {root} differs");

        let local = exact_data(rank, count);
        let mut gathered = vec![0f32; count * size];
        group.all_gather(&local, &mut gathered)?;
        for r in 0..size {
            ensure!(
                gathered[r * count..(r + 1) * count] == exact_data(r, count)[..],
                "all_gather of {count}: rank {r}"
            );
        }

        let mut data = exact_data(rank, count);
        let mine = segment(count, size, rank);
        let mut out = vec![0f32; mine.len()];
        group.reduce_scatter(&mut data, &mut out)?;
        ensure!(out == reference[mine], "reduce_scatter of {count} differs");

        // Bit-identical on every rank, even where the order of additions matters.
        same_bits_everywhere(group, count)?;
        group.barrier()?;
    }
    println!("rank {rank}: all collectives match for {} sizes", COUNTS.len());
    Ok(())
}

/// All-reduces `count` values whose sum depends on the order of additions and checks that
/// every rank holds the same bits (each rank's hash, gathered).
fn same_bits_everywhere(group: &mut dyn Communicator, count: usize) -> Result<()> {
    let (rank, size) = (group.rank(), group.size());
    let mut data = rough_data(rank, count);
    group.all_reduce(&mut data)?;
    let hash = blake3::hash(&data.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
    let digest: Vec<f32> = hash
        .as_bytes()
        .chunks(4)
        .map(|b| f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x3fff_ffff))
        .collect();
    let mut all = vec![0f32; digest.len() * size];
    group.all_gather(&digest, &mut all)?;
    for r in 0..size {
        ensure!(
            all[r * 8..(r + 1) * 8] == digest[..],
            "rank {r} holds different bits after all_reduce of {count}"
        );
    }
    Ok(())
}

/// All-reduce of small messages (the recursive-doubling path in groups over 4): the exact
/// sum, and the same bits on every rank where the order of additions matters.
fn verify_small(group: &mut dyn Communicator) -> Result<()> {
    let (rank, size) = (group.rank(), group.size());
    for count in [1, 7, 1000, 16 << 10] {
        let mut reference = vec![0f32; count];
        for r in 0..size {
            reference.iter_mut().zip(exact_data(r, count)).for_each(|(s, x)| *s += x);
        }
        let mut data = exact_data(rank, count);
        group.all_reduce(&mut data)?;
        ensure!(data == reference, "all_reduce of {count} differs from the serial reference");
        same_bits_everywhere(group, count)?;
    }
    group.barrier()?;
    println!("rank {rank}: small all-reduces match");
    Ok(())
}

/// The rendezvous thread of a group being tested.
type RendezvousThread = std::thread::JoinHandle<Result<(), CollectiveError>>;

/// Starts a rendezvous and `size` member processes in `mode` over `backend`.
fn start_group(
    size: usize,
    mode: &str,
    backend: &str,
) -> Result<(RendezvousThread, Vec<std::process::Child>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let rendezvous =
        std::thread::spawn(move || Rendezvous::serve(listener, size, SECRET, Duration::from_secs(30)));
    let children: Vec<_> = (0..size)
        .map(|rank| {
            Command::new(std::env::current_exe()?)
                .env("COLL_RANK", rank.to_string())
                .env("COLL_SIZE", size.to_string())
                .env("COLL_ADDR", addr.to_string())
                .env("COLL_MODE", mode)
                .env("COLL_BACKEND", backend)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("spawning a member")
        })
        .collect::<Result<_>>()?;
    Ok((rendezvous, children))
}

/// Runs a group of `size` member processes in `mode` over `backend`; returns their outputs.
fn run_group(size: usize, mode: &str, backend: &str) -> Result<Vec<String>> {
    let (rendezvous, children) = start_group(size, mode, backend)?;
    let mut outputs = Vec::new();
    for (rank, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output()?;
        let text =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        ensure!(output.status.success(), "rank {rank} of {size} ({mode}) failed: {text}");
        outputs.push(text);
    }
    rendezvous.join().map_err(|_| anyhow::anyhow!("rendezvous panicked"))??;
    Ok(outputs)
}

fn every_collective_matches_the_serial_reference(backend: &str) -> Result<()> {
    for size in 2..=4 {
        let t = Instant::now();
        let outputs = run_group(size, "verify", backend)?;
        ensure!(outputs.iter().all(|o| o.contains("all collectives match")), "{outputs:?}");
        println!("    {backend}, group of {size}: ok in {:.1} s", t.elapsed().as_secs_f64());
    }
    Ok(())
}

fn small_all_reduces_in_larger_groups_match_the_serial_reference(backend: &str) -> Result<()> {
    for size in [5, 8] {
        let t = Instant::now();
        let outputs = run_group(size, "small", backend)?;
        ensure!(outputs.iter().all(|o| o.contains("small all-reduces match")), "{outputs:?}");
        println!("    {backend}, group of {size}: ok in {:.1} s", t.elapsed().as_secs_f64());
    }
    Ok(())
}

fn a_dead_member_fails_the_others_naming_its_rank(backend: &str) -> Result<()> {
    let outputs = run_group(3, "dead", backend)?;
    for output in &outputs[..2] {
        ensure!(output.contains("rank 2"), "{output}");
    }
    Ok(())
}

fn a_stalled_member_times_out_naming_its_rank(backend: &str) -> Result<()> {
    let t = Instant::now();
    let (rendezvous, mut children) = start_group(3, "stall", backend)?;
    let staller = children.pop().context("three members")?;
    for (rank, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&output.stdout);
        ensure!(output.status.success() && text.contains("rank 2 did not answer"), "rank {rank}: {text}");
    }
    ensure!(t.elapsed() < Duration::from_secs(20), "stall detection took {:?}", t.elapsed());
    let mut staller = staller;
    let _ = staller.kill();
    let _ = staller.wait();
    rendezvous.join().map_err(|_| anyhow::anyhow!("rendezvous panicked"))??;
    Ok(())
}

fn main() {
    if std::env::var("COLL_RANK").is_ok() {
        if let Err(error) = member() {
            eprintln!("member failed: {error:#}");
            std::process::exit(1);
        }
        return;
    }
    #[cfg_attr(not(feature = "ucx"), allow(unused_mut))]
    let mut tests: Vec<(&str, support::TestFn)> = vec![
        ("every_collective_matches_the_serial_reference", || {
            every_collective_matches_the_serial_reference("tcp")
        }),
        ("small_all_reduces_in_larger_groups_match_the_serial_reference", || {
            small_all_reduces_in_larger_groups_match_the_serial_reference("tcp")
        }),
        ("a_dead_member_fails_the_others_naming_its_rank", || {
            a_dead_member_fails_the_others_naming_its_rank("tcp")
        }),
        ("a_stalled_member_times_out_naming_its_rank", || a_stalled_member_times_out_naming_its_rank("tcp")),
    ];
    #[cfg(feature = "ucx")]
    tests.extend([
        (
            "ucx_every_collective_matches_the_serial_reference",
            (|| every_collective_matches_the_serial_reference("ucx")) as support::TestFn,
        ),
        ("ucx_small_all_reduces_in_larger_groups_match_the_serial_reference", || {
            small_all_reduces_in_larger_groups_match_the_serial_reference("ucx")
        }),
        ("ucx_a_dead_member_fails_the_others_naming_its_rank", || {
            a_dead_member_fails_the_others_naming_its_rank("ucx")
        }),
        ("ucx_a_stalled_member_times_out_naming_its_rank", || {
            a_stalled_member_times_out_naming_its_rank("ucx")
        }),
    ]);
    support::run(&tests);
}
