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
        // A name, not only an IP address: `localhost` resolves to the loopback address the
        // head listens on.
        .args([
            "node",
            "--join",
            &format!("localhost:{}", cluster.addr().port()),
            "--name",
            "cli-node",
            "--slots",
            "1",
        ])
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

/// Arguments a node cannot run with are refused at once, each with a message naming it.
#[test]
fn a_node_refuses_arguments_it_cannot_run_with() -> Result<()> {
    let node = |secret: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .arg("node")
            .args(args)
            .env("TESSERA_SECRET", secret)
            .output()
    };
    let cases: [(&str, &[&str], &str); 4] = [
        ("", &["--join", "127.0.0.1:9"], "TESSERA_SECRET is empty"),
        ("s", &["--join", "127.0.0.1:9", "--slots", "0"], "--slots"),
        ("s", &["--join", "no-such-host.invalid:9"], "no-such-host.invalid:9"),
        ("s", &["--join", "127.0.0.1"], "HOST:PORT"),
    ];
    for (secret, args, says) in cases {
        let output = node(secret, args)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(!output.status.success(), "{args:?} succeeded");
        ensure!(output.status.code() != Some(101), "{args:?} panicked: {stderr}");
        ensure!(stderr.contains(says), "{args:?}: {stderr}");
    }
    Ok(())
}

/// Output to a reader that went away ends quietly (exit 0, as `… | head` expects); output
/// to a full disk is an error message, exit 1; neither is a panic.
#[test]
fn listings_into_a_closed_pipe_or_a_full_disk_do_not_panic() -> Result<()> {
    use std::os::fd::FromRawFd;
    let dir = tempfile::tempdir()?;
    let figures = dir.path().join("figures.json");
    std::fs::write(&figures, "{\"bench\":\"x\",\"value\":1.0,\"unit\":\"s\",\"higher_is_better\":false}\n")?;
    let figures = figures.to_str().unwrap_or_default().to_string();
    let store = dir.path().join("stash");
    let store = store.to_str().unwrap_or_default().to_string();
    let put = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["stash", "put", "figures", &figures, "--store", &store])
        .output()?;
    ensure!(put.status.success(), "{put:?}");
    let commands: [&[&str]; 4] = [
        &["devices"],
        &["devices", "--json"],
        &["bench-compare", &figures, &figures],
        &["stash", "list", "--store", &store],
    ];
    for args in commands {
        let mut ends = [0; 2];
        // SAFETY: `pipe` fills `ends` with two new descriptors, each owned once below.
        ensure!(unsafe { libc::pipe(ends.as_mut_ptr()) } == 0, "pipe failed");
        // SAFETY: both descriptors were just made and are owned by nothing else.
        let (reader, writer) =
            unsafe { (std::fs::File::from_raw_fd(ends[0]), std::fs::File::from_raw_fd(ends[1])) };
        drop(reader);
        let closed = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .spawn()?
            .wait_with_output()?;
        let stderr = String::from_utf8_lossy(&closed.stderr);
        ensure!(closed.status.success(), "{args:?} into a closed pipe: {:?} {stderr}", closed.status);
        if std::path::Path::new("/dev/full").exists() {
            let full = Command::new(env!("CARGO_BIN_EXE_tessera"))
                .args(args)
                .stdout(std::fs::OpenOptions::new().write(true).open("/dev/full")?)
                .stderr(Stdio::piped())
                .spawn()?
                .wait_with_output()?;
            let stderr = String::from_utf8_lossy(&full.stderr);
            ensure!(full.status.code() == Some(1), "{args:?} into /dev/full: {:?} {stderr}", full.status);
            ensure!(stderr.contains("cannot write to standard output"), "{args:?}: {stderr}");
        }
    }
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
