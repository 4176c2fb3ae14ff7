//! Cluster managers: how node processes are started, watched and killed, behind one trait
//! (in the spirit of Julia's `ClusterManager`): local processes, SSH, Slurm, manual join.
//!
//! Every manager passes the secret to the node out of sight of other users: in the
//! environment of a local or `srun` child, or on the standard input of `ssh`, never on a
//! command line.
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// What a node needs to join a cluster.
#[derive(Debug, Clone)]
pub struct JoinInfo {
    /// The head's address.
    pub addr: SocketAddr,
    /// The cluster secret.
    pub secret: String,
    /// The program the node runs (this same binary, or `tessera`).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

/// A process a manager started: one node (a local node process, or `ssh` running one), or
/// a launcher of several (`srun`).
#[derive(Debug)]
pub struct LaunchedNode {
    /// The name the node joins with (for a launcher of several nodes, the launcher's name).
    pub name: String,
    child: Option<Child>,
    /// Whether it starts the one node named `name` (not several that join under names of
    /// their own).
    one_node: bool,
    /// Whether the head has said that it exited while its node was not in the cluster.
    exit_reported: bool,
}

impl LaunchedNode {
    /// A node the manager started as `child` (a process that runs the node, or one that
    /// starts it elsewhere and lives as long as it does, as `ssh` does); the node joins as
    /// `name`.
    pub fn new(name: String, child: Option<Child>) -> Self {
        LaunchedNode { name, child, one_node: true, exit_reported: false }
    }

    /// A launcher process that starts several nodes, which join under names of their own
    /// (as `srun` does).
    pub fn launcher(name: String, child: Option<Child>) -> Self {
        LaunchedNode { name, child, one_node: false, exit_reported: false }
    }

    /// The local process id of the launcher (the node itself for local processes).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it starts one node, named as it is (not a launcher of several).
    pub(crate) fn is_one_node(&self) -> bool {
        self.one_node
    }

    /// How the process exited, if it has (a process started without a child is never
    /// seen to exit).
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// True the first time it is asked, then false: whether an exit is still to be reported.
    pub(crate) fn first_report(&mut self) -> bool {
        !std::mem::replace(&mut self.exit_reported, true)
    }

    /// Waits for the process to exit until `deadline`, then kills it.
    pub fn wait_or_kill(&mut self, deadline: Instant) {
        let Some(child) = self.child.as_mut() else { return };
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Starts node processes for a cluster.
pub trait ClusterManager: Send + Sync {
    /// A short name for logs.
    fn name(&self) -> &str;
    /// Starts the nodes; they join `join.addr` on their own.
    ///
    /// # Errors
    /// [`Error::Cluster`] if a process cannot be started.
    fn launch(&self, join: &JoinInfo) -> Result<Vec<LaunchedNode>>;
}

/// Starts `count` node processes on this machine.
#[derive(Debug, Clone)]
pub struct LocalProcesses {
    /// How many nodes.
    pub count: usize,
    /// Tasks each node runs at once (default: the node's number of cores).
    pub slots: Option<usize>,
}

impl LocalProcesses {
    /// `count` local node processes.
    pub fn new(count: usize) -> Self {
        LocalProcesses { count, slots: None }
    }

    /// The command that starts node `index`.
    pub fn command(&self, join: &JoinInfo, index: usize) -> Command {
        let mut command = Command::new(&join.program);
        command
            .args(&join.args)
            .env("TESSERA_ROLE", "worker")
            .env("TESSERA_JOIN", join.addr.to_string())
            .env("TESSERA_SECRET", &join.secret)
            .env("TESSERA_NODE_NAME", format!("local-{index}"))
            .stdin(Stdio::null());
        if let Some(slots) = self.slots {
            command.env("TESSERA_SLOTS", slots.to_string());
        }
        command
    }
}

impl ClusterManager for LocalProcesses {
    fn name(&self) -> &str {
        "local"
    }

    fn launch(&self, join: &JoinInfo) -> Result<Vec<LaunchedNode>> {
        (0..self.count)
            .map(|index| {
                let child = self.command(join, index).spawn().map_err(|e| {
                    Error::Cluster(format!("cannot start local node {}: {e}", join.program.display()))
                })?;
                Ok(LaunchedNode::new(format!("local-{index}"), Some(child)))
            })
            .collect()
    }
}

/// Starts one node per host over SSH (key-based login, `BatchMode`).
#[derive(Debug, Clone)]
pub struct Ssh {
    /// Hosts, as `ssh` accepts them (`host` or `user@host`).
    pub hosts: Vec<String>,
    /// The program's path on the hosts (default: the same path as here).
    pub remote_program: Option<PathBuf>,
    /// The address nodes listen on for data (default: loopback, which only works for
    /// `localhost`; `0.0.0.0:0` for other machines: each node then tells peers the address
    /// through which it reaches the head).
    pub node_listen: Option<String>,
    /// Extra `ssh` options.
    pub ssh_options: Vec<String>,
}

impl Ssh {
    /// One node on each of `hosts`.
    pub fn new(hosts: Vec<String>) -> Self {
        Ssh { hosts, remote_program: None, node_listen: None, ssh_options: Vec::new() }
    }

    /// The command that starts the node on `host`; the secret goes to its standard input.
    pub fn command(&self, join: &JoinInfo, host: &str) -> Command {
        let program = self.remote_program.as_ref().unwrap_or(&join.program);
        let mut remote = String::from("IFS= read -r TESSERA_SECRET && export TESSERA_SECRET && ");
        remote.push_str(&format!(
            "TESSERA_ROLE=worker TESSERA_JOIN={} TESSERA_NODE_NAME={} ",
            shell_quote(&join.addr.to_string()),
            shell_quote(host)
        ));
        if let Some(listen) = &self.node_listen {
            remote.push_str(&format!("TESSERA_LISTEN={} ", shell_quote(listen)));
        }
        remote.push_str("exec ");
        remote.push_str(&shell_quote(&program.to_string_lossy()));
        for arg in &join.args {
            remote.push(' ');
            remote.push_str(&shell_quote(arg));
        }
        let mut command = Command::new("ssh");
        command
            .args(["-o", "BatchMode=yes"])
            .args(&self.ssh_options)
            .arg(host)
            .arg(remote)
            .stdin(Stdio::piped());
        command
    }
}

impl ClusterManager for Ssh {
    fn name(&self) -> &str {
        "ssh"
    }

    fn launch(&self, join: &JoinInfo) -> Result<Vec<LaunchedNode>> {
        check_reachable(join)?;
        self.hosts
            .iter()
            .map(|host| {
                let mut child = self
                    .command(join, host)
                    .spawn()
                    .map_err(|e| Error::Cluster(format!("cannot run ssh for {host}: {e}")))?;
                if let Some(mut stdin) = child.stdin.take() {
                    writeln!(stdin, "{}", join.secret)
                        .map_err(|e| Error::Cluster(format!("cannot pass the secret to {host}: {e}")))?;
                }
                Ok(LaunchedNode::new(host.clone(), Some(child)))
            })
            .collect()
    }
}

/// Starts nodes with Slurm's `srun`, one per allocated node.
#[derive(Debug, Clone)]
pub struct Slurm {
    /// How many nodes (default: all of the allocation, `SLURM_NNODES`).
    pub nodes: Option<usize>,
    /// Extra `srun` arguments (partition, time limit, …).
    pub srun_args: Vec<String>,
    /// The allocation this process runs in, if any (`SLURM_JOB_ID`).
    pub job_id: Option<String>,
    /// The address nodes listen on for data (default: loopback, which only works when
    /// every node runs on this machine; `0.0.0.0:0` for other machines: each node then
    /// tells peers the address through which it reaches the head).
    pub node_listen: Option<String>,
}

impl Slurm {
    /// Reads the `SLURM_*` variables of the allocation this process runs in, if any.
    pub fn from_env() -> Self {
        Self::from_vars(std::env::vars())
    }

    /// As [`Slurm::from_env`], from given variables.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut slurm = Slurm { nodes: None, srun_args: Vec::new(), job_id: None, node_listen: None };
        for (key, value) in vars {
            match key.as_str() {
                "SLURM_JOB_ID" => slurm.job_id = Some(value),
                "SLURM_NNODES" | "SLURM_JOB_NUM_NODES" if slurm.nodes.is_none() => {
                    slurm.nodes = value.trim().parse().ok()
                }
                _ => {}
            }
        }
        slurm
    }

    /// The `srun` command that starts the nodes; the secret travels in its environment.
    /// Each node joins under its Slurm node name (`SLURMD_NODENAME`).
    pub fn command(&self, join: &JoinInfo) -> Command {
        let mut command = Command::new("srun");
        if let Some(nodes) = self.nodes {
            command.arg(format!("--nodes={nodes}")).arg(format!("--ntasks={nodes}"));
        }
        if let Some(job) = &self.job_id {
            command.arg(format!("--jobid={job}"));
        }
        let mut export = format!("--export=ALL,TESSERA_ROLE=worker,TESSERA_JOIN={}", join.addr);
        if let Some(listen) = &self.node_listen {
            export.push_str(&format!(",TESSERA_LISTEN={listen}"));
        }
        command
            .arg("--ntasks-per-node=1")
            .arg("--kill-on-bad-exit=0")
            .arg(export)
            .args(&self.srun_args)
            .arg(&join.program)
            .args(&join.args)
            .env("TESSERA_SECRET", &join.secret)
            .stdin(Stdio::null());
        command
    }
}

impl ClusterManager for Slurm {
    fn name(&self) -> &str {
        "slurm"
    }

    fn launch(&self, join: &JoinInfo) -> Result<Vec<LaunchedNode>> {
        check_reachable(join)?;
        let child =
            self.command(join).spawn().map_err(|e| Error::Cluster(format!("cannot run srun: {e}")))?;
        Ok(vec![LaunchedNode::launcher("srun".into(), Some(child))])
    }
}

/// Starts nothing: prints the command to run on each machine that should join.
#[derive(Debug, Clone, Default)]
pub struct ManualJoin;

impl ManualJoin {
    /// The instructions printed for the user (the secret is referred to, not printed).
    pub fn instructions(join: &JoinInfo) -> String {
        format!(
            "To add a node, run on the machine that should join (with the cluster secret in\n\
             TESSERA_SECRET; the head printed it or you chose it):\n\n    \
             TESSERA_SECRET=... tessera node --join {}\n",
            join.addr
        )
    }
}

impl ClusterManager for ManualJoin {
    fn name(&self) -> &str {
        "manual"
    }

    fn launch(&self, join: &JoinInfo) -> Result<Vec<LaunchedNode>> {
        eprintln!("{}", Self::instructions(join));
        Ok(Vec::new())
    }
}

/// Nodes on other machines cannot join a head that names itself by an unspecified address
/// (`0.0.0.0`): they would dial their own machine.
fn check_reachable(join: &JoinInfo) -> Result<()> {
    if join.addr.ip().is_unspecified() {
        return Err(Error::Cluster(format!(
            "the head listens on {}, an address nodes on other machines cannot join at: set \
             ClusterConfig::listen to this machine's address as they reach it (say 10.0.0.5:{})",
            join.addr,
            join.addr.port()
        )));
    }
    Ok(())
}

fn shell_quote(text: &str) -> String {
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:@=,".contains(c)) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join() -> JoinInfo {
        JoinInfo {
            addr: "10.0.0.1:7000".parse().expect("address"),
            secret: "s3cret".into(),
            program: PathBuf::from("/opt/app/bin/my app"),
            args: vec!["node".into(), "--flag=it's".into()],
        }
    }

    fn args(command: &Command) -> Vec<String> {
        command.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn ssh_command_runs_the_program_remotely_and_keeps_the_secret_off_the_command_line() {
        let ssh =
            Ssh { ssh_options: vec!["-p".into(), "2222".into()], ..Ssh::new(vec!["alice@gpu1".into()]) };
        let command = ssh.command(&join(), "alice@gpu1");
        assert_eq!(command.get_program(), "ssh");
        let args = args(&command);
        assert_eq!(&args[..5], ["-o", "BatchMode=yes", "-p", "2222", "alice@gpu1"]);
        let remote = &args[5];
        assert!(remote.starts_with("IFS= read -r TESSERA_SECRET && export TESSERA_SECRET && "), "{remote}");
        assert!(
            remote.contains("TESSERA_ROLE=worker TESSERA_JOIN=10.0.0.1:7000 TESSERA_NODE_NAME=alice@gpu1")
        );
        assert!(remote.ends_with(r"exec '/opt/app/bin/my app' node '--flag=it'\''s'"), "{remote}");
        assert!(!args.iter().any(|a| a.contains("s3cret")), "secret leaked into {args:?}");
    }

    #[test]
    fn ssh_command_uses_the_remote_program_and_listen_address() {
        let ssh = Ssh {
            remote_program: Some(PathBuf::from("/srv/tessera")),
            node_listen: Some("0.0.0.0:0".into()),
            ..Ssh::new(vec!["h".into()])
        };
        let remote = args(&ssh.command(&join(), "h")).pop().expect("remote command");
        assert!(remote.contains("TESSERA_LISTEN=0.0.0.0:0 exec /srv/tessera node"), "{remote}");
    }

    #[test]
    fn slurm_reads_the_allocation_and_builds_srun() {
        let vars = [("SLURM_JOB_ID", "4242"), ("SLURM_NNODES", "8"), ("HOME", "/root")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let slurm = Slurm { srun_args: vec!["--partition=gpu".into()], ..Slurm::from_vars(vars) };
        assert_eq!(slurm.nodes, Some(8));
        assert_eq!(slurm.job_id.as_deref(), Some("4242"));
        let command = slurm.command(&join());
        assert_eq!(command.get_program(), "srun");
        assert_eq!(
            args(&command),
            [
                "--nodes=8",
                "--ntasks=8",
                "--jobid=4242",
                "--ntasks-per-node=1",
                "--kill-on-bad-exit=0",
                "--export=ALL,TESSERA_ROLE=worker,TESSERA_JOIN=10.0.0.1:7000",
                "--partition=gpu",
                "/opt/app/bin/my app",
                "node",
                "--flag=it's",
            ]
        );
        let secret = command.get_envs().find(|(k, _)| *k == "TESSERA_SECRET").and_then(|(_, v)| v);
        assert_eq!(secret.map(|v| v.to_string_lossy().into_owned()).as_deref(), Some("s3cret"));
    }

    #[test]
    fn slurm_passes_the_listen_address_to_the_nodes() {
        let slurm = Slurm { node_listen: Some("0.0.0.0:0".into()), ..Slurm::from_vars(Vec::new()) };
        let args = args(&slurm.command(&join()));
        assert!(
            args.contains(
                &"--export=ALL,TESSERA_ROLE=worker,TESSERA_JOIN=10.0.0.1:7000,TESSERA_LISTEN=0.0.0.0:0"
                    .into()
            ),
            "{args:?}"
        );
    }

    #[test]
    fn remote_managers_refuse_a_head_on_an_unspecified_address() {
        let join = JoinInfo { addr: "0.0.0.0:7000".parse().expect("address"), ..join() };
        for manager in [&Ssh::new(vec!["h".into()]) as &dyn ClusterManager, &Slurm::from_vars(Vec::new())] {
            match manager.launch(&join) {
                Err(Error::Cluster(message)) => {
                    assert!(message.contains("listens on 0.0.0.0:7000"), "{}: {message}", manager.name())
                }
                other => panic!("{} launched for a head on 0.0.0.0: {other:?}", manager.name()),
            }
        }
    }

    #[test]
    fn slurm_outside_an_allocation_leaves_the_size_to_srun() {
        let slurm = Slurm::from_vars(Vec::new());
        assert_eq!((slurm.nodes, slurm.job_id.as_deref()), (None, None));
        let args = args(&slurm.command(&join()));
        assert!(!args.iter().any(|a| a.starts_with("--nodes") || a.starts_with("--jobid")), "{args:?}");
    }

    #[test]
    fn local_command_sets_the_node_environment() {
        let local = LocalProcesses { count: 2, slots: Some(3) };
        let command = local.command(&join(), 1);
        let envs: std::collections::HashMap<String, String> = command
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_string_lossy().into_owned(), v?.to_string_lossy().into_owned())))
            .collect();
        assert_eq!(envs["TESSERA_ROLE"], "worker");
        assert_eq!(envs["TESSERA_JOIN"], "10.0.0.1:7000");
        assert_eq!(envs["TESSERA_NODE_NAME"], "local-1");
        assert_eq!(envs["TESSERA_SLOTS"], "3");
        assert_eq!(envs["TESSERA_SECRET"], "s3cret");
    }

    #[test]
    fn manual_join_does_not_print_the_secret() {
        let text = ManualJoin::instructions(&join());
        assert!(text.contains("tessera node --join 10.0.0.1:7000"));
        assert!(!text.contains("s3cret"));
    }
}
