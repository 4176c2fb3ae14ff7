//! The `tessera` command line: node processes, the stash, and benchmark suites.
mod bench;
mod stash;

use anyhow::Result;
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
    /// The head's address, HOST:PORT.
    #[arg(long)]
    join: std::net::SocketAddr,
    /// The name this node reports (default: node-PID).
    #[arg(long)]
    name: Option<String>,
    /// Where to serve held values to peers (default 127.0.0.1:0).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Tasks run at once (default: the number of cores).
    #[arg(long)]
    slots: Option<usize>,
}

fn run_node(args: NodeArgs) -> Result<()> {
    let secret = std::env::var("TESSERA_SECRET")
        .map_err(|_| anyhow::anyhow!("set TESSERA_SECRET to the cluster secret before starting a node"))?;
    let mut config = tessera::NodeConfig::new(args.join, secret);
    if let Some(name) = args.name {
        config.name = name;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(slots) = args.slots {
        config.slots = slots.max(1);
    }
    tessera::run_node(config)?;
    Ok(())
}

fn main() -> Result<()> {
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
        Command::Node(args) => run_node(args),
        Command::CollectiveMember(args) => bench::collectives::member(args),
        Command::Stash(args) => stash::run(args),
        Command::TrainMember(args) => bench::train::member(args),
    }
}
