//! `tessera node --join`: the command-line node joins a head; a task its binary does not
//! contain fails with an error saying so (never a hang); the node leaves with the head.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use tessera::{Cluster, ClusterConfig, Error, Runtime};

tessera::task! {
    /// Registered in this test binary only, not in the `tessera` binary.
    fn only_here(x: u64) -> u64 { x + 1 }
}

#[test]
fn the_tessera_binary_joins_as_a_node() -> Result<()> {
    let rt = Runtime::builder().workers(2).build()?;
    let cluster =
        Cluster::start(&rt, ClusterConfig { secret: Some("cli-secret".into()), ..ClusterConfig::default() })?;
    let mut node = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["node", "--join", &cluster.addr().to_string(), "--name", "cli-node", "--slots", "1"])
        .env("TESSERA_SECRET", "cli-secret")
        .stdout(Stdio::null())
        .spawn()?;
    cluster.wait_for_nodes(1, Duration::from_secs(30))?;
    let nodes = cluster.nodes();
    ensure!(nodes.len() == 1 && nodes[0].name == "cli-node" && nodes[0].slots == 1, "{nodes:?}");
    match only_here::spawn(&rt, 1).blocking_get_timeout(Duration::from_secs(30)) {
        Err(Error::TaskFailed { message, .. }) => {
            ensure!(message.contains("not registered in this node's binary"), "{message}")
        }
        other => anyhow::bail!("expected a clear failure, got {other:?}"),
    }
    rt.shutdown();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = node.try_wait()? {
            ensure!(status.success(), "node exited with {status}");
            break;
        }
        ensure!(Instant::now() < deadline, "the node did not leave with its head");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn a_node_without_the_secret_says_what_is_missing() -> Result<()> {
    let output = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["node", "--join", "127.0.0.1:9"])
        .env_remove("TESSERA_SECRET")
        .output()?;
    ensure!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(stderr.contains("TESSERA_SECRET"), "{stderr}");
    Ok(())
}
