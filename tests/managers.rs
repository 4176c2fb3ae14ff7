//! Cluster managers for real: nodes started over SSH (a throwaway `sshd` on loopback, with
//! keys made for the test) and by Slurm's `srun` (a throwaway Slurm cluster of two nodes on
//! this machine: `munged`, `slurmctld` and two `slurmd`), and what the head says when a
//! started process exits before its node joins.
//!
//! This test binary has its own `main` (`harness = false`): node processes are this same
//! binary re-executed, and `tessera::init()` at the top of `main` turns them into nodes.
mod support;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_bytes::ByteBuf;
use tessera::{
    Cluster, ClusterConfig, ClusterManager, Error, JoinInfo, LaunchedNode, LocalProcesses, Ref, Runtime,
    Slurm, Ssh,
};

tessera::task! {
    /// The name of the node that ran this task (as its manager named it).
    fn node_name(_i: u64) -> String {
        std::env::var("TESSERA_NODE_NAME")
            .or_else(|_| std::env::var("SLURMD_NODENAME"))
            .unwrap_or_else(|_| "head".into())
    }
}

tessera::task! {
    fn square(x: u64) -> u64 { x * x }
}

tessera::task! {
    /// `len` bytes made from `seed`, on the node that runs it.
    fn make_blob(len: usize, seed: u64) -> ByteBuf { ByteBuf::from(blob(len, seed)) }
}

fn blob(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64).map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8).collect()
}

/// A manager whose processes run `sh -c script` and never join: `one_node` says whether
/// each stands for one node of its own name or launches several (as `srun` does).
struct Exiting {
    name: &'static str,
    script: &'static str,
    one_node: bool,
}

impl ClusterManager for Exiting {
    fn name(&self) -> &str {
        self.name
    }

    fn launch(&self, _join: &JoinInfo) -> tessera::Result<Vec<LaunchedNode>> {
        let child = Command::new("sh")
            .args(["-c", self.script])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| Error::Cluster(format!("cannot run sh: {e}")))?;
        let name = self.name.to_string();
        Ok(vec![if self.one_node {
            LaunchedNode::new(name, Some(child))
        } else {
            LaunchedNode::launcher(name, Some(child))
        }])
    }
}

/// Waits for `count` nodes and expects the wait to fail soon (within 10 s, of a 60 s
/// deadline) with a cluster error naming `exit`; returns how long it took.
fn expect_early_failure(cluster: &Cluster, count: usize, exit: &str) -> Result<Duration> {
    let started = Instant::now();
    let result = cluster.wait_for_nodes(count, Duration::from_secs(60));
    let waited = started.elapsed();
    match result {
        Err(Error::Cluster(message)) => {
            ensure!(message.contains(exit), "the error does not say `{exit}`: {message}")
        }
        other => bail!("waiting for {count} nodes, expecting `{exit}`, gave {other:?}"),
    }
    ensure!(waited < Duration::from_secs(10), "the wait failed only after {waited:?} (`{exit}`)");
    Ok(waited)
}

/// The wait fails as soon as a started process has exited and too few nodes can still
/// join, naming the process and its exit status; it does not when enough still can, and
/// not while a launcher of several nodes still runs.
fn a_process_that_exits_before_joining_fails_the_wait_at_once() -> Result<()> {
    let rt = Runtime::builder().workers(2).build()?;
    let cluster = Cluster::start(&rt, ClusterConfig::default())?;
    cluster.launch(&LocalProcesses { count: 1, slots: Some(1) })?;
    cluster.wait_for_nodes(1, Duration::from_secs(30))?;

    cluster.launch(&Exiting { name: "doomed", script: "exit 3", one_node: true })?;
    expect_early_failure(&cluster, 2, "1 joined and at most 0 more can: doomed exited (exit status: 3)")?;
    // One node did join: waiting for it still succeeds.
    cluster.wait_for_nodes(1, Duration::from_secs(1))?;

    // A launcher of several nodes may still start any number while it runs: the wait fails
    // only once it has exited.
    let launcher = Exiting { name: "launcher", script: "sleep 1.5; exit 0", one_node: false };
    cluster.launch(&launcher)?;
    let waited = expect_early_failure(&cluster, 2, "launcher, a launcher of nodes, exited (exit status: 0)")?;
    ensure!(
        waited >= Duration::from_secs(1),
        "the wait failed after {waited:?}, while the launcher ran (1.5 s)"
    );

    // A process still running that has not joined keeps the wait going to its deadline.
    cluster.launch(&Exiting { name: "slow", script: "sleep 30", one_node: true })?;
    match cluster.wait_for_nodes(2, Duration::from_millis(700)) {
        Err(Error::Timeout(_)) => {}
        other => bail!("waiting for a slow process gave {other:?}, not a timeout"),
    }
    rt.shutdown();
    Ok(())
}

/// Runs 200 tasks and checks their results, then checks that tasks ran on each of `nodes`.
fn run_tasks_on(rt: &Runtime, nodes: &[&str]) -> Result<()> {
    let squares: Vec<Ref<u64>> = (0..200).map(|i| square::spawn(rt, i)).collect();
    let sum = squares.iter().map(|r| r.blocking_get()).sum::<tessera::Result<u64>>()?;
    ensure!(sum == (0..200u64).map(|i| i * i).sum::<u64>(), "sum of squares {sum}");
    let ran: Vec<String> =
        (0..40).map(|i| node_name::spawn(rt, i).blocking_get()).collect::<tessera::Result<_>>()?;
    for node in nodes {
        ensure!(ran.iter().any(|n| n == node), "no task ran on {node}: {ran:?}");
    }
    Ok(())
}

/// A throwaway `sshd` on a free loopback port that accepts one key made for the test.
struct SshServer {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl SshServer {
    fn start() -> Result<SshServer> {
        let sshd = Path::new("/usr/sbin/sshd");
        ensure!(
            sshd.is_file(),
            "{} not found: run scripts/install-deps.sh (the SSH tests need it)",
            sshd.display()
        );
        let dir = tempfile::tempdir()?;
        for key in ["host_key", "client_key"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.path().join(key))
                .status()
                .context("run ssh-keygen")?;
            ensure!(status.success(), "ssh-keygen failed for {key}");
        }
        std::fs::copy(dir.path().join("client_key.pub"), dir.path().join("authorized_keys"))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
                 PermitRootLogin prohibit-password\n",
                dir = dir.path().display()
            ),
        )?;
        // sshd wants its privilege separation directory (made by its init script otherwise).
        let _ = std::fs::create_dir_all("/run/sshd");
        let log = std::fs::File::create(dir.path().join("sshd.log"))?;
        let mut child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start sshd")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!("sshd exited with {status}: {}", std::fs::read_to_string(dir.path().join("sshd.log"))?);
            }
            ensure!(Instant::now() < deadline, "sshd did not listen on 127.0.0.1:{port} within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(SshServer { child, dir, port })
    }

    /// An `Ssh` manager for `hosts` (names of this machine) that logs in with `key`.
    fn manager(&self, hosts: &[&str], key: &Path) -> Ssh {
        let mut ssh = Ssh::new(hosts.iter().map(|h| h.to_string()).collect());
        ssh.ssh_options = [
            "-p",
            &self.port.to_string(),
            "-i",
            &key.display().to_string(),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
        ]
        .map(String::from)
        .to_vec();
        ssh
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether process `pid` still runs (a zombie counts as gone).
fn runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit(") ").next().is_some_and(|rest| !rest.starts_with('Z')))
}

/// Two nodes started over SSH (as `127.0.0.1` and `localhost`) join, run tasks under the
/// hosts' names, and exit when the head shuts down; a host that refuses the login fails
/// the wait at once, naming it.
fn nodes_started_over_ssh_join_work_and_exit() -> Result<()> {
    let server = SshServer::start()?;
    let rt = Runtime::builder().workers(2).build()?;
    let cluster = Cluster::start(&rt, ClusterConfig::default())?;
    ensure!(cluster.launch(&server.manager(&["127.0.0.1", "localhost"], &server.key()))? == 2);
    cluster.wait_for_nodes(2, Duration::from_secs(60))?;
    let mut names: Vec<String> = cluster.nodes().into_iter().map(|n| n.name).collect();
    names.sort();
    ensure!(names == ["127.0.0.1", "localhost"], "nodes joined as {names:?}");

    run_tasks_on(&rt, &["127.0.0.1", "localhost"])?;
    let pids: Vec<u32> = cluster.nodes().iter().map(|n| n.pid).collect();
    ensure!(pids.iter().all(|&pid| runs(pid)), "node processes {pids:?} not seen running");

    // A key the server does not know: ssh exits (255) and the wait says so at once.
    let stranger = server.dir.path().join("stranger_key");
    let status =
        Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&stranger).status()?;
    ensure!(status.success(), "ssh-keygen failed");
    cluster.launch(&server.manager(&["127.0.0.1"], &stranger))?;
    expect_early_failure(&cluster, 3, "127.0.0.1 exited (exit status: 255)")?;

    rt.shutdown();
    let deadline = Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|&pid| runs(pid)) {
        ensure!(Instant::now() < deadline, "node processes still run 15 s after the head shut down");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The file `SLURM_CONF` names for this test process (`srun`, `sinfo` and the daemons all
/// read it): set in `main`, written by [`SlurmCluster::start`].
fn slurm_conf() -> PathBuf {
    std::env::temp_dir().join(format!("tessera-slurm-{}", std::process::id())).join("slurm.conf")
}

/// A throwaway Slurm cluster on this machine: its own `munged` (socket and key in a temp
/// dir), a `slurmctld` and two `slurmd` (nodes `n1` and `n2`), on free loopback ports.
struct SlurmCluster {
    daemons: Vec<Child>,
    dir: PathBuf,
}

impl SlurmCluster {
    fn start() -> Result<SlurmCluster> {
        for program in ["/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd"] {
            ensure!(
                Path::new(program).is_file(),
                "{program} not found: run scripts/install-deps.sh (the Slurm test needs it)"
            );
        }
        let conf = slurm_conf();
        let dir = conf.parent().context("slurm.conf has no directory")?.to_path_buf();
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["munge", "state", "spool/n1", "spool/n2"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mut cluster = SlurmCluster { daemons: Vec::new(), dir: dir.clone() };
        let key: Vec<u8> = (0..1024).map(|_| rand_byte()).collect();
        let key_file = dir.join("munge/munge.key");
        std::fs::write(&key_file, key)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
        std::fs::set_permissions(dir.join("munge"), std::fs::Permissions::from_mode(0o755))?;
        let socket = dir.join("munge/munge.socket");
        cluster.spawn(
            "munged",
            Command::new("/usr/sbin/munged")
                .args(["--foreground", "--force"])
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--key-file={}", key_file.display()))
                .arg(format!("--pid-file={}", dir.join("munge/munged.pid").display()))
                .arg(format!("--seed-file={}", dir.join("munge/munged.seed").display()))
                .arg(format!("--log-file={}", dir.join("munge/munged.log").display())),
        )?;
        cluster.wait_for("munged's socket", || Ok(socket.exists()))?;

        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim().to_string();
        let ports: Vec<u16> = (0..3)
            .map(|_| Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()))
            .collect::<Result<_>>()?;
        let user = if is_root() { "root".to_string() } else { std::env::var("USER").unwrap_or_default() };
        std::fs::write(
            &conf,
            format!(
                "ClusterName=tessera\nSlurmctldHost={hostname}(127.0.0.1)\nSlurmUser={user}\nSlurmdUser={user}\n\
                 SlurmctldPort={ctld}\nAuthType=auth/munge\nCredType=cred/munge\n\
                 AuthInfo=socket={socket}\nStateSaveLocation={dir}/state\nSlurmdSpoolDir={dir}/spool/%n\n\
                 SlurmctldPidFile={dir}/slurmctld.pid\nSlurmdPidFile={dir}/slurmd-%n.pid\n\
                 SlurmctldLogFile={dir}/slurmctld.log\nSlurmdLogFile={dir}/slurmd-%n.log\n\
                 ProctrackType=proctrack/pgid\nTaskPlugin=task/none\nSelectType=select/cons_tres\n\
                 SelectTypeParameters=CR_CPU\nJobAcctGatherType=jobacct_gather/none\n\
                 AccountingStorageType=accounting_storage/none\nMpiDefault=none\nReturnToService=2\n\
                 NodeName=n1 NodeHostname={hostname} NodeAddr=127.0.0.1 Port={n1} CPUs=2\n\
                 NodeName=n2 NodeHostname={hostname} NodeAddr=127.0.0.1 Port={n2} CPUs=2\n\
                 PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES\n",
                ctld = ports[0],
                n1 = ports[1],
                n2 = ports[2],
                socket = socket.display(),
                dir = dir.display(),
            ),
        )?;
        cluster.spawn("slurmctld", Command::new("/usr/sbin/slurmctld").args(["-D", "-i"]))?;
        for node in ["n1", "n2"] {
            cluster.spawn("slurmd", Command::new("/usr/sbin/slurmd").args(["-D", "-N", node]))?;
        }
        cluster.wait_for("both Slurm nodes idle", || {
            let sinfo = Command::new("sinfo").args(["-h", "-N", "-o", "%N %t"]).output()?;
            let states = String::from_utf8_lossy(&sinfo.stdout).to_string();
            Ok(states.lines().filter(|line| line.ends_with(" idle")).count() == 2)
        })?;
        Ok(cluster)
    }

    fn spawn(&mut self, what: &str, command: &mut Command) -> Result<()> {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {what}"))?;
        self.daemons.push(child);
        Ok(())
    }

    /// Waits up to 30 s for `ready`, failing early (with the daemons' logs) if one exits.
    fn wait_for(&mut self, what: &str, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready()? {
            if let Some(status) = self.daemons.iter_mut().find_map(|d| d.try_wait().ok().flatten()) {
                bail!("a Slurm daemon exited ({status}) while waiting for {what}:\n{}", self.logs());
            }
            ensure!(Instant::now() < deadline, "no {what} after 30 s:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The last lines of each daemon's log.
    fn logs(&self) -> String {
        ["munge/munged.log", "slurmctld.log", "slurmd-n1.log", "slurmd-n2.log"]
            .iter()
            .map(|log| {
                let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(8).collect();
                format!("== {log}\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Jobs Slurm still runs or has pending.
    fn jobs(&self) -> Result<String> {
        let squeue = Command::new("squeue").args(["-h", "-o", "%i %T"]).output()?;
        ensure!(squeue.status.success(), "squeue failed: {}", String::from_utf8_lossy(&squeue.stderr));
        Ok(String::from_utf8_lossy(&squeue.stdout).trim().to_string())
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        // The node daemons first, then the controller, then munge.
        for daemon in self.daemons.iter_mut().rev() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_byte() -> u8 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(Instant::now().elapsed().as_nanos() as u64);
    hasher.finish() as u8
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Nodes started by `srun` on a two-node Slurm cluster join under their Slurm node names,
/// listening on every interface yet telling peers a reachable address, run tasks and hand
/// back their values, and leave no job behind when the head shuts down; asking Slurm for
/// a partition it does not have fails the wait at once, naming `srun`.
fn nodes_started_by_srun_join_work_and_leave_no_job() -> Result<()> {
    let slurm = SlurmCluster::start()?;
    let rt = Runtime::builder().workers(2).build()?;
    let cluster = Cluster::start(&rt, ClusterConfig::default())?;

    let mistaken = Slurm {
        nodes: Some(2),
        srun_args: vec!["--partition=nonesuch".into()],
        ..Slurm::from_vars(Vec::new())
    };
    cluster.launch(&mistaken)?;
    expect_early_failure(&cluster, 2, "srun, a launcher of nodes, exited (exit status: 1)")?;

    let two = Slurm { nodes: Some(2), node_listen: Some("0.0.0.0:0".into()), ..Slurm::from_vars(Vec::new()) };
    ensure!(cluster.launch(&two)? == 1, "srun is one launcher");
    cluster.wait_for_nodes(2, Duration::from_secs(60)).with_context(|| slurm.logs())?;
    let nodes = cluster.nodes();
    let mut names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    names.sort();
    ensure!(names == ["n1", "n2"], "nodes joined as {names:?}, not by their Slurm names");
    for node in &nodes {
        ensure!(
            node.data_addr.ip() == std::net::Ipv4Addr::LOCALHOST,
            "{} listens on 0.0.0.0 but told peers {}",
            node.name,
            node.data_addr
        );
    }
    ensure!(!slurm.jobs()?.is_empty(), "Slurm runs no job for the nodes");

    let blobs: Vec<Ref<ByteBuf>> = (0..8).map(|i| make_blob::spawn(&rt, 1 << 20, i)).collect();
    for (seed, blob_ref) in blobs.iter().enumerate() {
        ensure!(
            blob_ref.blocking_get()?.as_ref() == blob(1 << 20, seed as u64),
            "blob {seed} came back wrong"
        );
    }
    run_tasks_on(&rt, &["n1", "n2"])?;

    rt.shutdown();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let jobs = slurm.jobs()?;
        if jobs.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "Slurm still runs {jobs} 20 s after the head shut down");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn main() {
    tessera::init();
    // Before any thread reads the environment: where this process's Slurm cluster lives.
    std::env::set_var("SLURM_CONF", slurm_conf());
    let tests: &[(&str, support::TestFn)] = &[
        (
            "a_process_that_exits_before_joining_fails_the_wait_at_once",
            a_process_that_exits_before_joining_fails_the_wait_at_once,
        ),
        ("nodes_started_over_ssh_join_work_and_exit", nodes_started_over_ssh_join_work_and_exit),
        (
            "nodes_started_by_srun_join_work_and_leave_no_job",
            nodes_started_by_srun_join_work_and_leave_no_job,
        ),
    ];
    support::run(tests);
}
