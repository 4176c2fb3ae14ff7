//! `tessera node --join`: the command-line node joins a head; a task its binary does not
//! contain fails with an error saying so (never a hang); the node leaves with the head.
//! `tessera devices` lists what such a node would report.
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

/// `tessera devices` lists what a node started here reports: the same GPUs as this process
/// finds (none here without a GPU, with the reason) and its XLA plugin (or why there is
/// none), in text and in JSON; `--expect-gpu` fails only where there is no GPU.
#[test]
fn tessera_devices_lists_what_a_node_would_report() -> Result<()> {
    let devices =
        |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_tessera")).arg("devices").args(args).output();
    let text = devices(&[])?;
    ensure!(text.status.success(), "{text:?}");
    let stdout = String::from_utf8(text.stdout)?;
    ensure!(stdout.starts_with("cpu: ") && stdout.contains(" cores"), "{stdout}");

    let json = devices(&["--json"])?;
    ensure!(json.status.success(), "{json:?}");
    let listing: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    ensure!(listing["cores"].as_u64().is_some_and(|n| n >= 1), "{listing}");
    let gpus = listing["gpus"].as_array().ok_or_else(|| anyhow::anyhow!("no gpus array: {listing}"))?;
    let reason = listing["no_gpu_reason"].as_str();
    // The binary may be built with other features than this test: compare with the process
    // only where both have the same answer to "is there a GPU".
    let expected = devices(&["--expect-gpu"])?;
    if gpus.is_empty() {
        let reason = reason.ok_or_else(|| anyhow::anyhow!("no GPU and no reason: {listing}"))?;
        ensure!(stdout.contains(&format!("no GPU: {reason}")), "{stdout}");
        ensure!(!expected.status.success(), "--expect-gpu without a GPU succeeded");
        let stderr = String::from_utf8(expected.stderr)?;
        ensure!(stderr.contains("a GPU was expected") && stderr.contains(reason), "{stderr}");
    } else {
        ensure!(reason.is_none(), "{listing}");
        ensure!(expected.status.success(), "{expected:?}");
        for (i, gpu) in gpus.iter().enumerate() {
            ensure!(gpu["ordinal"].as_u64() == Some(i as u64), "{gpu}");
            let name = gpu["name"].as_str().unwrap_or_default();
            ensure!(stdout.contains(&format!("gpu {i}: {name}, ")), "{stdout}");
        }
        let here = tessera::local_gpus();
        if !here.is_empty() {
            ensure!(here.len() == gpus.len(), "the binary found {gpus:?}, this process {here:?}");
        }
    }
    match (listing["xla"].as_object(), listing["no_xla_reason"].as_str()) {
        (Some(xla), None) => {
            let plugin = xla["plugin"].as_str().unwrap_or_default();
            ensure!(std::path::Path::new(plugin).is_file(), "{listing}");
            ensure!(stdout.contains(&format!("xla: {plugin} (PJRT C API 0.")), "{stdout}");
            // The same plugin as this process finds, where this test has the feature too.
            if let Some(here) = tessera::local_xla() {
                ensure!(here.plugin == plugin, "the binary found {plugin}, this process {}", here.plugin);
            }
        }
        (None, Some(reason)) => ensure!(stdout.contains(&format!("no XLA: {reason}")), "{stdout}"),
        _ => anyhow::bail!("exactly one of xla and no_xla_reason expected: {listing}"),
    }
    Ok(())
}
