//! Data parallelism: [`DataParallel`], one replica of a model that trains on its shard of
//! every batch and all-reduces gradient buckets with its peers while backward continues.
//!
//! # Invariants
//! 1. Buckets are built once from the graph's fixed parameter order, in reverse (backward
//!    finishes the last parameters first), each holding whole parameters until it reaches
//!    the configured size. Every replica of the same graph builds the same buckets.
//! 2. A bucket is handed to the communication thread the moment backward has finished
//!    every parameter in it; the thread owns the [`Communicator`] and all-reduces buckets
//!    strictly in bucket order 0, 1, 2, … on every replica, whatever order they arrive in.
//! 3. Reduced gradients are divided by the group size on every replica the same way, and
//!    the optimizer update starts only after every bucket came back, so replicas that
//!    start with equal parameters and optimizer state stay bit-identical.
//!
//! # Shutdown
//! 1. Dropping the replica closes the thread's queue; the thread finishes the operation it
//!    is in (or fails it within the communicator's timeout) and exits.
//! 2. Drop joins the thread, so the communicator's sockets are closed when drop returns.
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Instant;

use super::buckets::Buckets;
use crate::devices::{segment, Communicator};
use crate::nn::train::{check_classifier_epoch, set_examples, EpochTally};
use crate::nn::{CpuExecutor, Dataset, EpochStats, Executor, Model, NnError, TrainState};

/// Work for the communication thread.
enum Job {
    /// A gradient bucket, reduced in bucket order.
    Bucket(usize, Vec<f32>),
    /// Any other all-reduce, run at once (only sent between steps).
    AllReduce(Vec<f32>),
    /// A broadcast from a root, run at once (only sent between steps).
    Broadcast(Vec<f32>, usize),
}

/// What the communication thread answers: the job's index (bucket, or `usize::MAX`), its
/// buffer, reduced, and the seconds the collective took.
type Done = Result<(usize, Vec<f32>, f64), crate::devices::CollectiveError>;

fn communicate(mut comm: Box<dyn Communicator>, buckets: usize, jobs: Receiver<Job>, done: Sender<Done>) {
    let mut pending: Vec<Option<Vec<f32>>> = (0..buckets).map(|_| None).collect();
    let mut next = 0;
    while let Ok(job) = jobs.recv() {
        let answer = match job {
            Job::Bucket(index, data) => {
                pending[index] = Some(data);
                // Reduce every bucket that is next in the fixed order.
                while let Some(mut data) = pending.get_mut(next).and_then(Option::take) {
                    let start = Instant::now();
                    let reply =
                        comm.all_reduce(&mut data).map(|()| (next, data, start.elapsed().as_secs_f64()));
                    next = (next + 1) % buckets.max(1);
                    let failed = reply.is_err();
                    if done.send(reply).is_err() || failed {
                        return;
                    }
                }
                continue;
            }
            Job::AllReduce(mut data) => comm.all_reduce(&mut data).map(|()| (usize::MAX, data, 0.0)),
            Job::Broadcast(mut data, root) => {
                comm.broadcast(&mut data, root).map(|()| (usize::MAX, data, 0.0))
            }
        };
        let failed = answer.is_err();
        if done.send(answer).is_err() || failed {
            return;
        }
    }
}

/// Whether a training error means a peer replica is gone (rather than a local failure): a
/// collective that timed out, lost a peer's connection, or was aborted because the other
/// ranks did not complete it. A backend's own failure (NCCL missing, a device error) or a
/// bad argument is local.
pub fn is_peer_lost(error: &NnError) -> bool {
    use crate::devices::CollectiveError;
    matches!(
        error,
        NnError::Collective {
            source: CollectiveError::Timeout { .. }
                | CollectiveError::PeerLost { .. }
                | CollectiveError::Aborted { .. }
        }
    )
}

/// Time spent on gradient communication since the replica was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CommStats {
    /// Optimizer steps taken.
    pub steps: u64,
    /// Seconds of forward and backward (gradient buckets were reduced during backward).
    pub compute_seconds: f64,
    /// Seconds the replica waited after backward for the last buckets to come back: the
    /// communication that did not overlap with backward (including waiting for a slower
    /// replica).
    pub wait_seconds: f64,
    /// Seconds the communication thread spent inside bucket all-reduces (overlapped or not;
    /// includes waiting for the peers' buckets).
    pub reduce_seconds: f64,
}

/// One replica of a data-parallel training group.
///
/// Every replica runs the same model graph, built for its share of the global batch
/// (`global batch / group size` rows), and steps on its shard of each global batch that
/// the (identical) [`TrainState`] loaders hand out. Gradients are all-reduced in buckets
/// overlapping backward, averaged, and applied by every replica.
///
/// # Examples
/// A group of one (a real group joins a [`TcpGroup`](crate::devices::TcpGroup) per process):
/// ```
/// use tessera::nn::{mlp, DataParallel, OptimizerConfig, TrainState};
/// use tessera::{Communicator, CollectiveError};
///
/// struct Alone;
/// impl Communicator for Alone {
///     fn rank(&self) -> usize { 0 }
///     fn size(&self) -> usize { 1 }
///     fn all_reduce(&mut self, _: &mut [f32]) -> Result<(), CollectiveError> { Ok(()) }
///     fn broadcast(&mut self, _: &mut [f32], _: usize) -> Result<(), CollectiveError> { Ok(()) }
///     fn all_gather(&mut self, l: &[f32], o: &mut [f32]) -> Result<(), CollectiveError> {
///         o.copy_from_slice(l);
///         Ok(())
///     }
///     fn reduce_scatter(&mut self, d: &mut [f32], o: &mut [f32]) -> Result<(), CollectiveError> {
///         o.copy_from_slice(d);
///         Ok(())
///     }
///     fn barrier(&mut self) -> Result<(), CollectiveError> { Ok(()) }
/// }
///
/// let model = mlp(4, &[3, 8, 2])?;
/// let mut state = TrainState::new(&model, OptimizerConfig::adam(1e-2), 4, 4, 7);
/// let mut replica = DataParallel::new(model, Box::new(Alone), 0.25)?;
/// replica.sync(&mut state)?;
/// let (input, target) = (replica.model().input, replica.model().target);
/// tessera::nn::Executor::set_value(replica.executor(), input, &[0.5; 12])?;
/// tessera::nn::Executor::set_ids(replica.executor(), target, &[0, 1, 0, 1])?;
/// assert!(replica.step(&mut state)?.is_finite());
/// Ok::<(), tessera::nn::NnError>(())
/// ```
#[derive(Debug)]
pub struct DataParallel {
    model: Model,
    exec: CpuExecutor,
    rank: usize,
    size: usize,
    buckets: Buckets,
    /// Bucket buffers while they are here (between steps all are).
    buffers: Vec<Option<Vec<f32>>>,
    /// Parameters of each bucket still to finish in the current backward.
    remaining: Vec<usize>,
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    stats: CommStats,
    batch: Vec<usize>,
    /// Set when a step failed after buckets were handed out: the group is out of step.
    failed: bool,
}

impl DataParallel {
    /// A replica of `model` (built for the per-replica batch) in the group `comm`, with
    /// gradient buckets of about `bucket_mib` MiB (a parameter is never split, so a bucket
    /// may be larger). Starts the communication thread.
    ///
    /// # Errors
    /// [`NnError::Argument`] if `bucket_mib` is not a positive number.
    pub fn new(model: Model, comm: Box<dyn Communicator>, bucket_mib: f64) -> Result<Self, NnError> {
        let buckets = Buckets::for_graph("DataParallel::new", &model.graph, bucket_mib)?;
        let buffers = (0..buckets.slots.len()).map(|b| Some(vec![0.0; buckets.len_of(b)])).collect();
        let (rank, size) = (comm.rank(), comm.size());
        let (jobs, job_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let count = buckets.slots.len();
        let thread = std::thread::Builder::new()
            .name(format!("tessera-allreduce-{rank}"))
            .spawn(move || communicate(comm, count, job_rx, done_tx))
            .map_err(|_| NnError::WorkerGone { worker: "all-reduce thread (could not start)".into() })?;
        let exec = CpuExecutor::new(&model.graph);
        let batch = Vec::with_capacity(model.graph.shape(model.input).map_or(0, |s| s[0]));
        Ok(DataParallel {
            model,
            exec,
            rank,
            size,
            remaining: vec![0; buckets.slots.len()],
            buckets,
            buffers,
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            stats: CommStats::default(),
            batch,
            failed: false,
        })
    }

    /// This replica's rank in the group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of replicas.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The executor (to fill this replica's shard of a batch or read values).
    pub fn executor(&mut self) -> &mut CpuExecutor {
        &mut self.exec
    }

    /// The parameter indices of each gradient bucket, in reduction order.
    pub fn bucket_params(&self) -> Vec<Vec<usize>> {
        self.buckets.slots.iter().map(|b| b.iter().map(|s| s.param).collect()).collect()
    }

    /// Compute and communication time so far.
    pub fn stats(&self) -> CommStats {
        self.stats
    }

    fn send(&self, job: Job) -> Result<(), NnError> {
        match &self.jobs {
            Some(jobs) if jobs.send(job).is_ok() => Ok(()),
            _ => Err(self.failure()),
        }
    }

    fn gone(&self) -> NnError {
        NnError::WorkerGone { worker: format!("all-reduce thread of rank {}", self.rank) }
    }

    /// Why the communication thread stopped: the collective error it reported last (it
    /// exits right after reporting one), or that it is simply gone.
    fn failure(&self) -> NnError {
        while let Ok(done) = self.done.recv() {
            if let Err(error) = done {
                return error.into();
            }
        }
        self.gone()
    }

    fn receive(&self) -> Result<(usize, Vec<f32>, f64), NnError> {
        Ok(self.done.recv().map_err(|_| self.gone())??)
    }

    /// Makes every replica's parameters rank 0's (a broadcast): call once before training,
    /// so that replicas start bit-identical even if they were initialized differently.
    ///
    /// # Errors
    /// [`NnError::Collective`] if a replica is missing.
    pub fn sync(&mut self, state: &mut TrainState) -> Result<(), NnError> {
        let flat: Vec<f32> = state.params.tensors.iter().flat_map(|t| t.data.iter().copied()).collect();
        self.send(Job::Broadcast(flat, 0))?;
        let (_, flat, _) = self.receive()?;
        let mut at = 0;
        for t in &mut state.params.tensors {
            let n = t.data.len();
            t.data.copy_from_slice(&flat[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// Sums `values` over all replicas (for statistics; not during a step).
    ///
    /// # Errors
    /// [`NnError::Collective`] if a replica is missing.
    pub fn all_reduce(&mut self, values: &[f32]) -> Result<Vec<f32>, NnError> {
        self.send(Job::AllReduce(values.to_vec()))?;
        Ok(self.receive()?.1)
    }

    /// One optimizer step on this replica's shard, currently set in the executor: forward,
    /// backward with bucketed all-reduce overlapping it, averaging, update. Returns this
    /// shard's loss.
    ///
    /// # Errors
    /// As [`Executor::forward`] and [`Executor::backward`]; [`NnError::Collective`] if a
    /// replica died or stalled (the update is then skipped and this replica is unusable);
    /// [`NnError::Argument`] if the optimizer's moments do not fit the parameters.
    pub fn step(&mut self, state: &mut TrainState) -> Result<f32, NnError> {
        if self.failed {
            return Err(NnError::WorkerGone {
                worker: format!("replica {} (a step failed earlier)", self.rank),
            });
        }
        let result = self.try_step(state);
        self.failed = result.is_err();
        result
    }

    fn try_step(&mut self, state: &mut TrainState) -> Result<f32, NnError> {
        let start = Instant::now();
        let loss = self.model.loss;
        state.optimizer.check_fits(&state.params, "DataParallel::step")?;
        self.exec.set_training(true);
        // Different dropout masks on each replica's shard, reproducibly.
        self.exec.set_seed(state.rng.next_u64() ^ (self.rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.exec.forward(&state.params, 0..loss.index() + 1)?;
        for (b, slots) in self.buckets.slots.iter().enumerate() {
            self.remaining[b] = slots.len();
        }
        let (buckets, buffers, remaining) = (&self.buckets, &mut self.buffers, &mut self.remaining);
        let jobs = self.jobs.as_ref();
        let rank = self.rank;
        let observed = self.exec.backward_observed(
            &state.params,
            0..loss.index() + 1,
            &[(loss, &[1.0])],
            &mut |p, g| {
                let Some(slot) = buckets.slot_of(p) else { return Ok(()) };
                let b = buckets.of_param[p];
                let Some(buffer) = buffers[b].as_mut() else { return Ok(()) };
                buffer[slot.offset..slot.offset + slot.len].copy_from_slice(g);
                remaining[b] -= 1;
                if remaining[b] == 0 {
                    let data = buffers[b].take().unwrap_or_default();
                    if jobs.is_none_or(|j| j.send(Job::Bucket(b, data)).is_err()) {
                        return Err(NnError::WorkerGone {
                            worker: format!("all-reduce thread of rank {rank}"),
                        });
                    }
                }
                Ok(())
            },
        );
        match observed {
            Ok(()) => {}
            Err(NnError::WorkerGone { .. }) => return Err(self.failure()),
            Err(error) => return Err(error),
        }
        let computed = Instant::now();
        let scale = 1.0 / self.size as f32;
        for _ in 0..self.buckets.slots.len() {
            let (b, data, seconds) = self.receive()?;
            self.stats.reduce_seconds += seconds;
            for slot in &self.buckets.slots[b] {
                let grad = self.exec.param_grad_mut(slot.param);
                for (g, &r) in grad.iter_mut().zip(&data[slot.offset..slot.offset + slot.len]) {
                    *g = r * scale;
                }
            }
            self.buffers[b] = Some(data);
        }
        self.stats.compute_seconds += (computed - start).as_secs_f64();
        self.stats.wait_seconds += computed.elapsed().as_secs_f64();
        self.stats.steps += 1;
        let exec = &self.exec;
        state.optimizer.step(&mut state.params, |i| exec.param_grad(i));
        state.step += 1;
        exec.scalar(loss)
    }

    /// One epoch of a classifier: the state's loader hands out global batches (its batch
    /// size is the global batch, `size` × the model's batch), each replica trains on its
    /// contiguous shard of every batch, and the returned loss, accuracy and sample count
    /// are over all replicas (one all-reduce at the end of the epoch).
    ///
    /// # Errors
    /// [`NnError::Argument`] if the loader's batch is not `size` × the model's batch, or it
    /// draws from another number of examples than `data` has; [`NnError::Shape`] if
    /// `data`'s rows do not fit the model's input; as [`DataParallel::step`].
    pub fn train_epoch(&mut self, state: &mut TrainState, data: &Dataset) -> Result<EpochStats, NnError> {
        let mut tally = EpochTally::start();
        let (input, logits) = (self.model.input, self.model.logits);
        let local = self.model.graph.shape(input)?[0];
        let global = state.loader.batch_size();
        if global != local * self.size {
            return Err(NnError::Argument {
                op: "DataParallel::train_epoch",
                what: format!(
                    "the loader's batch {global} must be {} replicas × the model's batch {local}",
                    self.size
                ),
            });
        }
        let classes = check_classifier_epoch(
            "DataParallel::train_epoch",
            &self.model,
            &state.loader,
            global,
            (data.len(), data.dim),
        )?;
        while let Some(idx) = state.loader.next_batch() {
            self.batch.clear();
            self.batch.extend_from_slice(&idx[segment(global, self.size, self.rank)]);
            set_examples(&mut self.exec, &self.model, data, &self.batch)?;
            let loss = self.step(state)?;
            tally.batch(loss, self.batch.len());
            let labels = self.batch.iter().map(|&i| data.labels[i]);
            tally.classified(self.exec.value(logits)?, classes, labels);
        }
        state.epoch += 1;
        let sums = self.all_reduce(&[tally.loss as f32, tally.correct as f32, tally.samples as f32])?;
        let batches = (tally.batches * self.size).max(1);
        Ok(EpochStats {
            loss: sums[0] / batches as f32,
            accuracy: sums[1] / sums[2].max(1.0),
            samples: sums[2] as usize,
            seconds: tally.seconds(),
        })
    }
}

impl Drop for DataParallel {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            // The thread ends once its queue is closed; a panic there has nothing to add.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_timeouts_and_lost_connections_mean_a_peer_is_lost() {
        use super::is_peer_lost;
        use crate::devices::CollectiveError;
        use crate::nn::NnError;
        let timeout =
            CollectiveError::Timeout { rank: 1, op: "all_reduce", timeout: std::time::Duration::ZERO };
        let lost = CollectiveError::PeerLost { rank: 1, op: "all_reduce", message: "eof".into() };
        let backend = CollectiveError::Backend { op: "join", message: "libnccl is not installed".into() };
        assert!(is_peer_lost(&timeout.into()));
        assert!(is_peer_lost(&lost.into()));
        let aborted = CollectiveError::Aborted { op: "all_reduce", reason: "ran past the timeout".into() };
        assert!(is_peer_lost(&aborted.into()));
        assert!(!is_peer_lost(&backend.into()));
        assert!(!is_peer_lost(&CollectiveError::Setup("bad secret".into()).into()));
        assert!(!is_peer_lost(&NnError::WorkerGone { worker: "x".into() }));
    }

    use crate::nn::{mlp, CpuExecutor, Executor, Params, Rng};

    #[test]
    fn backward_reports_each_parameter_once_as_soon_as_it_is_final() {
        let model = mlp(4, &[3, 8, 5, 2]).unwrap();
        let params = Params::init(&model.graph, &mut Rng::seed(3));
        let mut exec = CpuExecutor::new(&model.graph);
        exec.set_value(model.input, &[0.25, -0.5, 1.0, 0.75, 0.1, -0.2, 0.3, 0.9, -1.0, 0.5, 0.0, 0.2])
            .unwrap();
        exec.set_ids(model.target, &[0, 1, 1, 0]).unwrap();
        exec.forward_all(&params).unwrap();
        let end = model.loss.index() + 1;
        let mut seen: Vec<(usize, Vec<f32>)> = Vec::new();
        exec.backward_observed(&params, 0..end, &[(model.loss, &[1.0])], &mut |p, g| {
            seen.push((p, g.to_vec()));
            Ok(())
        })
        .unwrap();
        // Last layer first (weight, then bias, as the linear node reads them).
        let order: Vec<usize> = seen.iter().map(|(p, _)| *p).collect();
        assert_eq!(order, [4, 5, 2, 3, 0, 1]);
        for (p, g) in &seen {
            assert_eq!(g.as_slice(), exec.param_grad(*p), "parameter {p} changed after it was reported");
            assert!(g.iter().any(|&v| v != 0.0));
        }
        // The same gradients as plain backward; a hook error stops backward.
        let observed: Vec<Vec<f32>> = (0..6).map(|p| exec.param_grad(p).to_vec()).collect();
        exec.backward_from(&params, model.loss).unwrap();
        assert!((0..6).all(|p| exec.param_grad(p) == observed[p].as_slice()));
        let mut calls = 0;
        let stopped = exec.backward_observed(&params, 0..end, &[(model.loss, &[1.0])], &mut |_, _| {
            calls += 1;
            Err(crate::nn::NnError::WorkerGone { worker: "test".into() })
        });
        assert!(stopped.is_err() && calls == 1);
    }
}
