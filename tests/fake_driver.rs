//! What Tessera does where a CUDA driver is installed but its GPU cannot be used (feature
//! `cuda`; no GPU needed): fault injection through `tests/support/fake_libcuda.c`, a
//! stand-in for `libcuda.so` built here by the C compiler and put first on the library path
//! of `tessera` processes (the test process itself keeps the machine's real answer).
//!
//! - A driver that finds no device, does not match its kernel module, or sees zero devices:
//!   the reason names it, `tessera devices --expect-gpu` fails saying so.
//! - A device whose context cannot be made (held by another process): it is listed, and
//!   opening it is an error naming the driver's reason, never a panic.
//! - A node process on that machine reports the GPU to the head; a GPU task goes to it, and
//!   a GPU replica job there fails at once with the driver's reason instead of hanging.
//! - A node with two GPUs: a replica job on every GPU lists it twice, and replicas past its
//!   GPUs are refused before any starts.
//!
//! Without a C compiler the tests skip, unless `TESSERA_EXPECT_CXX=1` (set by
//! `scripts/test.sh`), which makes a missing compiler a failure.
#![cfg(feature = "cuda")]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tessera::nn::{ClusterReplicas, Dataset, ModelSpec, OptimizerConfig, ReplicaJob};
use tessera::{Cluster, ClusterConfig, Error, Runtime, TaskOptions};

tessera::task! {
    /// Registered in this test binary only, not in the `tessera` binary.
    fn triple(x: u64) -> u64 { x * 3 }
}

const SECRET: &str = "fake-driver-secret";

/// The directory holding the fake `libcuda.so`, built once; `None` (a skip) without a C
/// compiler.
fn fake_driver() -> Option<&'static Path> {
    static BUILT: OnceLock<Option<tempfile::TempDir>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/fake_libcuda.c");
            let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
            let output = match Command::new(&compiler)
                .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
                .arg(dir.path().join("libcuda.so"))
                .arg(source)
                .output()
            {
                Ok(output) => output,
                Err(error) => {
                    let expected = std::env::var("TESSERA_EXPECT_CXX").is_ok_and(|v| v == "1");
                    assert!(!expected, "TESSERA_EXPECT_CXX=1 but `{compiler}` does not run: {error}");
                    eprintln!("skipped: no C compiler (`{compiler}`: {error})");
                    return None;
                }
            };
            assert!(
                output.status.success(),
                "the fake driver does not compile:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            Some(dir)
        })
        .as_ref()
        .map(|dir| dir.path())
}

/// `tessera ARGS` on a machine whose driver is the fake one in `mode`.
fn tessera(driver: &Path, mode: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tessera"));
    command
        .args(args)
        .env("LD_LIBRARY_PATH", driver)
        .env("TESSERA_FAKE_CUDA", mode)
        // Errors as a user sees them (no backtrace in the message).
        .env_remove("RUST_BACKTRACE");
    command
}

fn run(driver: &Path, mode: &str, args: &[&str]) -> Result<Output> {
    let output = tessera(driver, mode, args).output().context("running tessera")?;
    // A panic exits with 101: never acceptable, whatever the test expects.
    ensure!(output.status.code() != Some(101), "tessera {args:?} panicked: {output:?}");
    Ok(output)
}

/// The JSON of `tessera devices --json`.
fn devices(driver: &Path, mode: &str) -> Result<serde_json::Value> {
    let output = run(driver, mode, &["devices", "--json"])?;
    ensure!(output.status.success(), "{output:?}");
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[test]
fn a_driver_without_a_usable_device_says_why() -> Result<()> {
    let Some(driver) = fake_driver() else { return Ok(()) };
    for (mode, reason) in [
        ("no_device", "no CUDA-capable device is detected"),
        ("driver_mismatch", "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH"),
        ("zero", "the CUDA driver sees no device"),
    ] {
        let listing = devices(driver, mode)?;
        ensure!(listing["gpus"].as_array().is_some_and(Vec::is_empty), "{mode}: {listing}");
        let said = listing["no_gpu_reason"].as_str().unwrap_or_default();
        ensure!(said.contains(reason), "{mode}: the reason is `{said}`");
        let expected = run(driver, mode, &["devices", "--expect-gpu"])?;
        let stderr = String::from_utf8_lossy(&expected.stderr);
        ensure!(expected.status.code() == Some(1), "{mode}: {expected:?}");
        ensure!(stderr.contains("a GPU was expected") && stderr.contains(reason), "{mode}: {stderr}");
        println!("{mode}: {said}");
    }
    Ok(())
}

#[test]
fn a_busy_gpu_is_listed_and_opening_it_is_an_error_not_a_panic() -> Result<()> {
    let Some(driver) = fake_driver() else { return Ok(()) };
    let listing = devices(driver, "busy")?;
    ensure!(listing["no_gpu_reason"].is_null(), "{listing}");
    let gpus = listing["gpus"].as_array().context("a gpus array")?;
    ensure!(gpus.len() == 1, "{listing}");
    ensure!(gpus[0]["ordinal"] == 0 && gpus[0]["name"] == "Fake GPU", "{listing}");
    ensure!(gpus[0]["total_memory"].as_u64() == Some(80 << 30), "{listing}");
    let text = run(driver, "busy", &["devices"])?;
    let stdout = String::from_utf8_lossy(&text.stdout);
    ensure!(stdout.contains("gpu 0: Fake GPU, 80.0 GiB"), "{stdout}");

    // The cuda suite finds the device, then cannot open it: a clear error, exit status 1.
    let bench = run(driver, "busy", &["bench", "cuda"])?;
    let stderr = String::from_utf8_lossy(&bench.stderr);
    ensure!(bench.status.code() == Some(1), "{bench:?}");
    ensure!(stderr.contains("device 0: Fake GPU"), "{stderr}");
    ensure!(stderr.contains("busy or unavailable") && stderr.contains("device 0"), "{stderr}");
    Ok(())
}

/// A `tessera node` that leaves when dropped (killed if the head has not ended it).
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A head in this process and one `tessera node` on a fake machine of `gpus` busy GPUs.
fn cluster_with_a_fake_gpu_node(driver: &Path, gpus: usize) -> Result<(Runtime, Cluster, Node)> {
    let rt = Runtime::builder().workers(2).build()?;
    let cluster =
        Cluster::start(&rt, ClusterConfig { secret: Some(SECRET.into()), ..ClusterConfig::default() })?;
    let node = Node(
        tessera(driver, "busy", &["node", "--join", &cluster.addr().to_string(), "--name", "fake-gpu-node"])
            .env("TESSERA_FAKE_CUDA_DEVICES", gpus.to_string())
            .env("TESSERA_SECRET", SECRET)
            .stdout(Stdio::null())
            .spawn()?,
    );
    cluster.wait_for_nodes(1, Duration::from_secs(30))?;
    Ok((rt, cluster, node))
}

/// A small replica job on the digits (a global batch of 48: groups of 1, 2 or 3).
fn small_job() -> Result<ReplicaJob> {
    let data = Dataset::digits(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"))?;
    let data = data.subset(&(0..96).collect::<Vec<_>>());
    Ok(ReplicaJob::new(ModelSpec::Mlp { sizes: vec![64, 16, 10] }, OptimizerConfig::adam(1e-3), 48, data))
}

#[test]
fn a_node_reports_the_gpu_and_gpu_work_goes_there() -> Result<()> {
    let Some(driver) = fake_driver() else { return Ok(()) };
    let (rt, cluster, _node) = cluster_with_a_fake_gpu_node(driver, 1)?;
    let node = cluster.nodes().pop().context("the node")?;
    ensure!(node.gpus.len() == 1 && node.gpus[0].name == "Fake GPU", "{:?}", node.gpus);
    ensure!(node.gpus[0].ordinal == 0 && node.gpus[0].total_memory == 80 << 30, "{:?}", node.gpus);
    ensure!(cluster.gpu_nodes().len() == 1, "{:?}", cluster.gpu_nodes());

    // A GPU task goes to that node (the only one with a GPU; this process has none, or its
    // own): the node's binary lacks this test's task, and says so.
    if tessera::local_gpus().is_empty() {
        match triple::spawn_with(&rt, TaskOptions::new().on_gpu(), 2)
            .blocking_get_timeout(Duration::from_secs(30))
        {
            Err(Error::TaskFailed { message, .. }) => {
                ensure!(message.contains("not registered in this node's binary"), "{message}")
            }
            other => bail!("expected the GPU node to run the task, got {other:?}"),
        }
    }

    // A replica job on that GPU: the head lets it start (the node reported GPU 0), and the
    // replica's failure to open the device comes back at once, with the driver's reason.
    let job = small_job()?.on_gpu(0, false);
    let start = Instant::now();
    let error =
        ClusterReplicas::start(&cluster, &[node.id], &job).err().context("a replica opened a busy GPU")?;
    let text = error.to_string();
    ensure!(text.contains("busy or unavailable"), "{text}");
    ensure!(start.elapsed() < Duration::from_secs(30), "the failure took {:?}", start.elapsed());
    println!("replica job on the busy GPU: {text}");
    rt.shutdown();
    Ok(())
}

#[test]
fn a_job_on_every_gpu_runs_a_replica_on_each_of_a_nodes_gpus() -> Result<()> {
    let Some(driver) = fake_driver() else { return Ok(()) };
    let (rt, cluster, _node) = cluster_with_a_fake_gpu_node(driver, 2)?;
    let node = cluster.nodes().pop().context("the node")?;
    ensure!(node.gpus.len() == 2, "{:?}", node.gpus);
    let every = ClusterReplicas::every_gpu(&cluster, &[node.id]);
    ensure!(every == [node.id, node.id], "{every:?}");

    // Past the node's GPUs: refused before any replica starts, naming the missing device.
    let refusals = [(0, 3, "has no GPU 2 for a replica on GPUs (its replica 3)"), (1, 2, "has no GPU 2")];
    for (ordinal, listed, missing) in refusals {
        let job = small_job()?.on_gpu(ordinal, false);
        let error =
            ClusterReplicas::start(&cluster, &vec![node.id; listed], &job).err().context("started")?;
        let text = error.to_string();
        ensure!(text.contains(missing) && text.contains("reported 2 GPU(s)"), "{text}");
    }
    // GPU 1 alone: that device's own failure comes back (the fake's device 1 is out of
    // memory, device 0 busy).
    let error = ClusterReplicas::start(&cluster, &[node.id], &small_job()?.on_gpu(1, false))
        .err()
        .context("a replica opened a fake GPU")?;
    let text = error.to_string();
    ensure!(text.contains("device 1") && text.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{text}");
    // Both GPUs: the check passes and the replicas fail at their devices (rank 0's first).
    let error = ClusterReplicas::start(&cluster, &every, &small_job()?.on_gpu(0, false))
        .err()
        .context("replicas opened the fake GPUs")?;
    let text = error.to_string();
    ensure!(text.contains("replica 0") && text.contains("CUDA_ERROR_DEVICE_UNAVAILABLE"), "{text}");
    rt.shutdown();
    Ok(())
}
