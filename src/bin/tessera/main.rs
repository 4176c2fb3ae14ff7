//! The `tessera` command line: node processes, the stash, benchmark suites, and what devices
//! this machine gives Tessera.
/// `println!` through [`write_stdout`]: `out!(...)?` (a closed pipe ends the output
/// quietly, a full disk is an error; neither panics).
macro_rules! out {
    ($($arg:tt)*) => {
        crate::write_stdout(&format!("{}\n", format_args!($($arg)*)))
    };
}

mod bench;
mod stash;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tessera", version, about = "Tessera: distributed actor runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a benchmark suite and print its results.
    Bench(bench::BenchArgs),
    /// Judge a change's benchmark figures against a base's (files of `tessera bench --json`
    /// lines; exit status 1 when a bench regressed beyond the threshold).
    BenchCompare(bench::compare::CompareArgs),
    /// List the devices a node started here would report: its cores, its CUDA GPUs and its
    /// XLA plugin (or why there are none).
    Devices(DevicesArgs),
    /// Run a node process that joins a cluster head (the secret comes from TESSERA_SECRET).
    Node(NodeArgs),
    /// A member of the `collectives` benchmark (started by `tessera bench collectives`).
    #[command(hide = true)]
    CollectiveMember(bench::collectives::MemberArgs),
    /// Inspect and maintain a stash (versioned value storage).
    Stash(stash::StashArgs),
    /// A replica of the `train` benchmark (started by `tessera bench train`).
    #[command(hide = true)]
    TrainMember(bench::train::MemberArgs),
}

#[derive(clap::Args)]
struct NodeArgs {
    /// The head's address, HOST:PORT (a name or an IP address).
    #[arg(long)]
    join: String,
    /// The name this node reports (default: `TESSERA_NODE_NAME`, else the Slurm node name
    /// under `srun`, else node-PID).
    #[arg(long)]
    name: Option<String>,
    /// Where to serve held values to peers (default 127.0.0.1:0; 0.0.0.0:0 for peers on
    /// other machines: the node tells them the address through which it reaches the head).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Tasks run at once, at least 1 (default: the number of cores).
    #[arg(long)]
    slots: Option<std::num::NonZeroUsize>,
}

#[derive(clap::Args)]
struct DevicesArgs {
    /// Print one JSON object: `cores`, `gpus` (ordinal, name, total_memory in bytes),
    /// `no_gpu_reason` (null when there are GPUs), `xla` (plugin path and PJRT C API
    /// version, or null) and `no_xla_reason` (null when there is a plugin).
    #[arg(long)]
    json: bool,
    /// Fail (exit status 1) when there is no GPU, saying why.
    #[arg(long)]
    expect_gpu: bool,
}

fn list_devices(args: DevicesArgs) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gpus = tessera::local_gpus();
    let reason = tessera::gpu_absence_reason();
    let xla = tessera::local_xla();
    let no_xla = tessera::xla_absence_reason();
    if args.json {
        let listing = serde_json::json!({
            "cores": cores,
            "gpus": gpus,
            "no_gpu_reason": reason,
            "xla": xla,
            "no_xla_reason": no_xla,
        });
        write_stdout(&format!("{listing}\n"))?;
    } else {
        let mut text = format!("cpu: {cores} cores\n");
        for gpu in &gpus {
            let gib = gpu.total_memory as f64 / (1u64 << 30) as f64;
            let _ = writeln!(text, "gpu {}: {}, {gib:.1} GiB", gpu.ordinal, gpu.name);
        }
        if let Some(reason) = &reason {
            let _ = writeln!(text, "no GPU: {reason}");
        }
        if let Some(xla) = &xla {
            let _ = writeln!(text, "xla: {} (PJRT C API {}.{})", xla.plugin, xla.pjrt_api.0, xla.pjrt_api.1);
        }
        if let Some(reason) = no_xla {
            let _ = writeln!(text, "no XLA: {reason}");
        }
        write_stdout(&text)?;
    }
    match reason {
        Some(reason) if args.expect_gpu => anyhow::bail!("a GPU was expected: {reason}"),
        _ => Ok(()),
    }
}

/// Writes `text` to standard output; returns whether a reader is still there. A reader
/// that went away (`tessera devices | head -1`) ends the output quietly, as it does for
/// other command-line tools (`Ok(false)`: the caller may stop early); any other failure
/// (a full disk) is an error, not a panic.
pub(crate) fn write_stdout(text: &str) -> Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(error) => Err(error).context("cannot write to standard output"),
    }
}

/// The head's address from `--join HOST:PORT`: an IP address, or a name resolved here
/// (its first IPv4 address, where it has one: heads listen on IPv4 by default).
fn head_address(join: &str) -> Result<SocketAddr> {
    let addresses: Vec<SocketAddr> = join
        .to_socket_addrs()
        .with_context(|| format!("--join {join:?}: not a HOST:PORT address that resolves here"))?
        .collect();
    addresses
        .iter()
        .find(|address| address.is_ipv4())
        .or(addresses.first())
        .copied()
        .with_context(|| format!("--join {join:?}: the name resolves to no address"))
}

fn run_node(args: NodeArgs) -> Result<()> {
    let secret = std::env::var("TESSERA_SECRET")
        .map_err(|_| anyhow::anyhow!("set TESSERA_SECRET to the cluster secret before starting a node"))?;
    anyhow::ensure!(!secret.is_empty(), "TESSERA_SECRET is empty: set it to the cluster secret");
    let mut config = tessera::NodeConfig::new(head_address(&args.join)?, secret);
    if let Some(name) = args.name {
        config.name = name;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(slots) = args.slots {
        config.slots = slots.get();
    }
    tessera::run_node(config)?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            report(&error);
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints an error and each of its causes that its message does not already say (library
/// errors often quote their source), one per line.
fn report(error: &anyhow::Error) {
    let mut said = error.to_string();
    eprintln!("error: {said}");
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !said.contains(&text) {
            eprintln!("  caused by: {text}");
            said.push_str(&text);
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // A process started by a cluster manager runs as a node and exits here.
    tessera::init();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::BenchCompare(args) => bench::compare::run(args),
        Command::Devices(args) => list_devices(args),
        Command::Node(args) => run_node(args),
        Command::CollectiveMember(args) => bench::collectives::member(args),
        Command::Stash(args) => stash::run(args),
        Command::TrainMember(args) => bench::train::member(args),
    }
}
