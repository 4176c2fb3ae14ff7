//! Elastic data parallelism: [`supervise`] runs a group of replica processes and, when a
//! replica dies mid-training, starts the survivors again as a smaller group that resumes
//! from the last checkpoint, and says so.
//!
//! # Protocol
//! 1. The supervisor serves a [`Rendezvous`] for `size` replicas and starts each one with
//!    a [`Launch`] (rank, size, rendezvous address, attempt).
//! 2. A replica joins the group, loads the last checkpoint if there is one (else starts
//!    fresh), trains, and saves a checkpoint (rank 0) after every epoch. The global batch
//!    stays the same, so a smaller group only changes the rows per replica and the resumed
//!    run continues the same [`TrainState`](crate::nn::TrainState).
//! 3. A replica whose step fails because a peer is gone ([`is_peer_lost`]) exits with
//!    [`PEER_LOST_EXIT_CODE`]: it is alive and will be started again.
//! 4. Any other ending (killed, crashed, another error) marks the replica dead. When every
//!    process of the attempt has ended, the supervisor reports the dead ranks and, if at
//!    least `min_replicas` survive, starts the next attempt with that many replicas.
//! 5. The run is over when every replica of an attempt exits successfully.
//!
//! The checkpoint store is the replicas' business (a [`CheckpointStore`](crate::nn::CheckpointStore):
//! a directory today, the cluster's versioned stash once merged).
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, ExitStatus};
use std::time::Duration;

use crate::devices::Rendezvous;
use crate::nn::NnError;

/// The exit code of a replica that stopped because a peer was lost (it will be restarted).
pub const PEER_LOST_EXIT_CODE: i32 = 75;

/// Whether a training error means a peer replica is gone (rather than a local failure).
pub fn is_peer_lost(error: &NnError) -> bool {
    matches!(error, NnError::Collective { .. })
}

/// How [`supervise`] runs the group.
#[derive(Debug, Clone)]
pub struct ElasticConfig {
    /// Replicas of the first attempt.
    pub replicas: usize,
    /// Fewest replicas worth continuing with.
    pub min_replicas: usize,
    /// Most restarts after failures.
    pub max_restarts: usize,
    /// The group's shared secret.
    pub secret: String,
    /// How long the rendezvous waits for every replica to join.
    pub rendezvous_timeout: Duration,
}

impl ElasticConfig {
    /// `replicas` replicas, continuing down to 1, restarting up to `replicas - 1` times,
    /// with a 60 s rendezvous timeout.
    pub fn new(replicas: usize, secret: impl Into<String>) -> Self {
        ElasticConfig {
            replicas,
            min_replicas: 1,
            max_restarts: replicas.saturating_sub(1),
            secret: secret.into(),
            rendezvous_timeout: Duration::from_secs(60),
        }
    }
}

/// What a replica process is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Its rank in this attempt's group.
    pub rank: usize,
    /// The group's size in this attempt.
    pub size: usize,
    /// Where the group meets.
    pub rendezvous: SocketAddr,
    /// 0 for the first start, then 1, 2, … after each failure.
    pub attempt: usize,
}

/// How a supervised run went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElasticReport {
    /// Group size of each attempt, in order (the last one finished the run).
    pub sizes: Vec<usize>,
    /// The ranks that died in each failed attempt.
    pub dead: Vec<Vec<usize>>,
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("killed by signal {signal}");
        }
    }
    format!("{status}")
}

/// Runs replica processes started by `start` until an attempt finishes, restarting the
/// survivors as a smaller group after a replica dies (see the module's protocol). Each
/// restart is announced through `say`.
///
/// # Errors
/// [`NnError::Elastic`] if a process cannot be started or the rendezvous cannot listen,
/// if fewer than `min_replicas` survive, or after `max_restarts` restarts.
pub fn supervise(
    config: &ElasticConfig,
    mut start: impl FnMut(&Launch) -> std::io::Result<Child>,
    mut say: impl FnMut(&str),
) -> Result<ElasticReport, NnError> {
    let elastic = |what: String| NnError::Elastic { what };
    let mut report = ElasticReport { sizes: Vec::new(), dead: Vec::new() };
    let mut size = config.replicas;
    for attempt in 0..=config.max_restarts {
        report.sizes.push(size);
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| elastic(format!("cannot listen for the group: {e}")))?;
        let rendezvous = listener.local_addr().map_err(|e| elastic(format!("rendezvous address: {e}")))?;
        let (secret, timeout) = (config.secret.clone(), config.rendezvous_timeout);
        let server = std::thread::spawn(move || Rendezvous::serve(listener, size, &secret, timeout));
        let mut children = Vec::new();
        for rank in 0..size {
            match start(&Launch { rank, size, rendezvous, attempt }) {
                Ok(child) => children.push(child),
                Err(e) => {
                    for mut child in children {
                        // Already failing: stop the ones that did start.
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    return Err(elastic(format!("cannot start replica {rank}: {e}")));
                }
            }
        }
        let (mut dead, mut why, mut survivors, mut finished) = (Vec::new(), Vec::new(), 0, 0);
        for (rank, mut child) in children.into_iter().enumerate() {
            let status = child.wait().map_err(|e| elastic(format!("waiting for replica {rank}: {e}")))?;
            if status.success() {
                finished += 1;
            } else if status.code() == Some(PEER_LOST_EXIT_CODE) {
                survivors += 1;
            } else {
                dead.push(rank);
                why.push(format!("replica {rank} of {size} {}", describe(status)));
            }
        }
        // The group formed or failed already; its outcome adds nothing here.
        let _ = server.join();
        if finished == size {
            return Ok(report);
        }
        if dead.is_empty() {
            return Err(elastic(format!(
                "{survivors} replicas lost a peer but none died and {finished} finished: inconsistent group"
            )));
        }
        report.dead.push(dead.clone());
        let remaining = size - dead.len();
        if remaining < config.min_replicas.max(1) {
            return Err(elastic(format!(
                "{}; {remaining} left, fewer than the minimum {}",
                why.join(", "),
                config.min_replicas
            )));
        }
        say(&format!(
            "{} mid-training; resuming from the last checkpoint with the remaining {remaining} replicas",
            why.join(", ")
        ));
        size = remaining;
    }
    Err(elastic(format!("gave up after {} restarts", config.max_restarts)))
}
