//! Model parallelism: [`Pipeline`] splits a model's op graph into stages, each run by its
//! own worker thread over a [`CpuExecutor::for_stage`](crate::nn::CpuExecutor::for_stage),
//! and trains GPipe-style: the micro-batches of a batch flow forward through the stages,
//! then backward in reverse, and one optimizer update applies the averaged gradients.
//! [`ClusterPipeline`] runs the same stages as actors on cluster node processes. Both
//! share the stage logic of `stage.rs` (its invariants: what a stage is given, hands on,
//! recomputes and sums).
//!
//! # Invariants (thread pipeline)
//! 1. Messages on a stage's queue arrive in order: the coordinator sends one step's work
//!    only after the previous step completed.
//! 2. The last stage starts backward (micro-batches in reverse) as soon as its last
//!    forward is done; each stage passes its input gradients to the previous one and
//!    reports its summed parameter gradients after micro-batch 0.
//!
//! # Shutdown
//! 1. Dropping the pipeline closes every stage's queue; each stage thread exits at its
//!    next receive.
//! 2. Drop joins the stage threads. After a stage error the pipeline refuses further steps.
mod cluster;
mod stage;

use std::ops::Range;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use cluster::ClusterPipeline;
use stage::{Forwarded, Grads, StageWork, Values};

use crate::nn::train::{check_classifier_epoch, EpochTally};
use crate::nn::{Dataset, EpochStats, Model, NnError, Params, TrainState};

enum ToStage {
    /// Start of a step: the parameters and the step's seed.
    Begin(Arc<Params>, u64),
    Forward(usize, Values),
    Backward(usize, Grads),
    /// Exit (stages hold each other's senders, so closing queues alone would not do).
    Stop,
}

enum ToCoordinator {
    /// The last stage's loss and logits for one micro-batch.
    Loss(usize, f32, Vec<f32>),
    /// A stage's parameter gradients summed over the micro-batches.
    Grads(Vec<(usize, Vec<f32>)>),
    Failed(usize, NnError),
}

/// A stage's worker thread: its [`StageWork`] and the queues around it.
struct Stage {
    work: StageWork,
    inbox: Receiver<ToStage>,
    next: Option<Sender<ToStage>>,
    previous: Option<Sender<ToStage>>,
    coordinator: Sender<ToCoordinator>,
    params: Arc<Params>,
    forwards: usize,
}

impl Stage {
    fn run(mut self) {
        while let Ok(message) = self.inbox.recv() {
            let result = match message {
                ToStage::Begin(params, seed) => {
                    self.params = params;
                    self.work.begin(seed);
                    self.forwards = 0;
                    Ok(())
                }
                ToStage::Forward(mb, values) => self.guarded(|stage| stage.forward(mb, values)),
                ToStage::Backward(mb, grads) => self.guarded(|stage| stage.backward(mb, grads)),
                ToStage::Stop => return,
            };
            if let Err(error) = result {
                let _ = self.coordinator.send(ToCoordinator::Failed(self.work.plan().index, error));
                return;
            }
        }
    }

    /// Runs `work`, turning a panic into an error so the coordinator never waits forever.
    fn guarded(&mut self, work: impl FnOnce(&mut Self) -> Result<(), NnError>) -> Result<(), NnError> {
        let index = self.work.plan().index;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(self))).unwrap_or_else(|_| {
            Err(NnError::WorkerGone { worker: format!("pipeline stage {index} (panicked)") })
        })
    }

    fn forward(&mut self, mb: usize, values: Values) -> Result<(), NnError> {
        self.forwards += 1;
        match self.work.forward(&self.params, mb, values)? {
            Forwarded::Loss(loss, logits) => {
                let _ = self.coordinator.send(ToCoordinator::Loss(mb, loss, logits));
                let micro_batches = self.work.plan().micro_batches;
                if self.forwards == micro_batches {
                    // GPipe: all forwards are done; backward runs the micro-batches in
                    // reverse (the last one's activations are still in place).
                    for mb in (0..micro_batches).rev() {
                        self.backward(mb, Grads::new())?;
                    }
                }
                Ok(())
            }
            Forwarded::Next(values) => self.send(self.next.as_ref(), 1, ToStage::Forward(mb, values)),
        }
    }

    /// Sends `message` to the stage `offset` after this one (`usize::MAX`: the one before).
    fn send(&self, to: Option<&Sender<ToStage>>, offset: usize, message: ToStage) -> Result<(), NnError> {
        match to {
            Some(to) if to.send(message).is_ok() => Ok(()),
            _ => Err(NnError::WorkerGone {
                worker: format!("pipeline stage {}", self.work.plan().index.wrapping_add(offset)),
            }),
        }
    }

    fn backward(&mut self, mb: usize, grads: Grads) -> Result<(), NnError> {
        let grads = self.work.backward(&self.params, mb, grads)?;
        if self.previous.is_some() {
            self.send(self.previous.as_ref(), usize::MAX, ToStage::Backward(mb, grads))?;
        }
        if mb == 0 {
            let grads = self.work.grads().to_vec();
            let _ = self.coordinator.send(ToCoordinator::Grads(grads));
        }
        Ok(())
    }
}

/// A model split into pipeline stages on worker threads (see the module invariants).
///
/// # Examples
/// ```
/// use tessera::nn::{mlp, OptimizerConfig, Pipeline, TrainState};
///
/// let model = mlp(2, &[3, 8, 2])?; // micro-batches of 2 rows
/// let mut state = TrainState::new(&model, OptimizerConfig::sgd(0.1, 0.0), 8, 4, 7);
/// let cut = model.graph.len() / 2;
/// let mut pipeline = Pipeline::new(model, &[cut], 2)?; // 2 stages, 2 micro-batches
/// let loss = pipeline.step(&mut state, &[0.5; 12], &[0, 1, 1, 0])?;
/// assert!(loss.is_finite());
/// Ok::<(), tessera::nn::NnError>(())
/// ```
#[derive(Debug)]
pub struct Pipeline {
    model: Model,
    bounds: Vec<usize>,
    micro_batches: usize,
    stages: Vec<Sender<ToStage>>,
    results: Receiver<ToCoordinator>,
    threads: Vec<JoinHandle<()>>,
    failed: bool,
    /// Summed gradients of every parameter (reused each step).
    grads: Vec<Vec<f32>>,
}

impl Pipeline {
    /// Splits `model` (built for one micro-batch) at the node ids in `cuts` (strictly
    /// increasing, inside the graph; `cuts.len() + 1` stages) and starts one worker thread
    /// per stage; each step runs `micro_batches` micro-batches.
    ///
    /// # Errors
    /// [`NnError::Argument`] for bad cuts or zero micro-batches, or if the loss is not in
    /// the last stage.
    pub fn new(model: Model, cuts: &[usize], micro_batches: usize) -> Result<Self, NnError> {
        let plans = stage::plan_stages(&model, cuts, micro_batches, "Pipeline::new")?;
        let mut bounds: Vec<usize> = plans.iter().map(|p| p.range.start).collect();
        bounds.extend(plans.last().map(|p| p.range.end));
        let (result_tx, results) = mpsc::channel();
        let channels: Vec<(Sender<ToStage>, Receiver<ToStage>)> =
            plans.iter().map(|_| mpsc::channel()).collect();
        let senders: Vec<Sender<ToStage>> = channels.iter().map(|(s, _)| s.clone()).collect();
        let mut threads = Vec::new();
        for (plan, (_, inbox)) in plans.into_iter().zip(channels) {
            let index = plan.index;
            let stage = Stage {
                work: StageWork::new(&model.graph, plan),
                inbox,
                next: senders.get(index + 1).cloned(),
                previous: index.checked_sub(1).map(|i| senders[i].clone()),
                coordinator: result_tx.clone(),
                params: Arc::new(Params { tensors: Vec::new() }),
                forwards: 0,
            };
            let thread = std::thread::Builder::new()
                .name(format!("tessera-stage-{index}"))
                .spawn(move || stage.run())
                .map_err(|_| NnError::WorkerGone {
                    worker: format!("pipeline stage {index} (could not start)"),
                })?;
            threads.push(thread);
        }
        let grads = model.graph.params().iter().map(|p| vec![0.0; p.shape.iter().product()]).collect();
        Ok(Pipeline { model, bounds, micro_batches, stages: senders, results, threads, failed: false, grads })
    }

    /// Cuts `model` into `stages` stages of about equal estimated work (multiply-adds of
    /// each node, from its output size and the size of its largest input), then as
    /// [`Pipeline::new`].
    ///
    /// # Errors
    /// As [`Pipeline::new`]; [`NnError::Argument`] if the graph has compute nodes for fewer
    /// stages than `stages`.
    pub fn balanced(model: Model, stages: usize, micro_batches: usize) -> Result<Self, NnError> {
        let cuts = stage::balanced(&model, stages, "Pipeline::balanced")?;
        Self::new(model, &cuts, micro_batches)
    }

    /// The model (built for one micro-batch).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Each stage's node range.
    pub fn stage_ranges(&self) -> Vec<Range<usize>> {
        self.bounds.windows(2).map(|w| w[0]..w[1]).collect()
    }

    /// Rows per step: micro-batches × the model's batch.
    pub fn batch_rows(&self) -> usize {
        self.micro_batches * micro_rows(&self.model)
    }

    fn receive(&mut self) -> Result<ToCoordinator, NnError> {
        match self.results.recv() {
            Ok(ToCoordinator::Failed(stage, error)) => {
                self.failed = true;
                Err(NnError::Stage { stage, source: Box::new(error) })
            }
            Ok(message) => Ok(message),
            Err(_) => {
                self.failed = true;
                Err(NnError::WorkerGone { worker: "every pipeline stage".into() })
            }
        }
    }

    /// One optimizer step on a batch of `micro_batches × model batch` rows of features `x`
    /// and labels `y`; returns the mean loss over the micro-batches. When `logits_out` is
    /// given it receives the logits of every row.
    ///
    /// # Errors
    /// [`NnError::Length`] for inputs of the wrong size; [`NnError::Stage`] if a stage
    /// failed (the pipeline then refuses further steps).
    pub fn step(&mut self, state: &mut TrainState, x: &[f32], y: &[i32]) -> Result<f32, NnError> {
        self.step_with_logits(state, x, y, None)
    }

    fn step_with_logits(
        &mut self,
        state: &mut TrainState,
        x: &[f32],
        y: &[i32],
        mut logits_out: Option<&mut Vec<f32>>,
    ) -> Result<f32, NnError> {
        if self.failed {
            return Err(NnError::WorkerGone { worker: "a pipeline stage (failed earlier)".into() });
        }
        stage::check_batch(&self.model, self.micro_batches, x, y)?;
        let params = Arc::new(state.params.clone());
        let seed = state.rng.next_u64();
        for stage in &self.stages {
            if stage.send(ToStage::Begin(Arc::clone(&params), seed)).is_err() {
                self.failed = true;
                return Err(NnError::WorkerGone { worker: "a pipeline stage".into() });
            }
        }
        for mb in 0..self.micro_batches {
            let values = stage::micro_batch(&self.model, mb, x, y);
            if self.stages[0].send(ToStage::Forward(mb, values)).is_err() {
                self.failed = true;
                return Err(NnError::WorkerGone { worker: "pipeline stage 0".into() });
            }
        }
        self.grads.iter_mut().for_each(|g| g.fill(0.0));
        let mut loss = 0.0f64;
        if let Some(out) = logits_out.as_deref_mut() {
            out.clear();
            out.resize(self.batch_rows() * classes(&self.model), 0.0);
        }
        let (mut losses, mut grads) = (0, 0);
        while losses < self.micro_batches || grads < self.stages.len() {
            match self.receive()? {
                ToCoordinator::Loss(mb, l, logits) => {
                    loss += l as f64;
                    losses += 1;
                    if let Some(out) = logits_out.as_deref_mut() {
                        out[mb * logits.len()..(mb + 1) * logits.len()].copy_from_slice(&logits);
                    }
                }
                ToCoordinator::Grads(list) => {
                    for (p, g) in list {
                        self.grads[p].iter_mut().zip(&g).for_each(|(s, g)| *s += g);
                    }
                    grads += 1;
                }
                ToCoordinator::Failed(..) => unreachable!("receive turns failures into errors"),
            }
        }
        let scale = 1.0 / self.micro_batches as f32;
        self.grads.iter_mut().for_each(|g| g.iter_mut().for_each(|v| *v *= scale));
        let grads = &self.grads;
        state.optimizer.step(&mut state.params, |i| &grads[i]);
        state.step += 1;
        Ok((loss / self.micro_batches as f64) as f32)
    }

    /// One epoch of a classifier over `data`; the state's loader must hand out batches of
    /// [`Pipeline::batch_rows`] rows.
    ///
    /// # Errors
    /// [`NnError::Argument`] if the loader does not draw batches of that size from `data`'s
    /// examples; [`NnError::Shape`] if `data`'s rows do not fit the model's input; as
    /// [`Pipeline::step`].
    pub fn train_epoch(&mut self, state: &mut TrainState, data: &Dataset) -> Result<EpochStats, NnError> {
        let rows = self.batch_rows();
        let classes = check_classifier_epoch(
            "Pipeline::train_epoch",
            &self.model,
            &state.loader,
            rows,
            (data.len(), data.dim),
        )?;
        run_epoch(rows, classes, state, data, |state, x, y, logits| {
            self.step_with_logits(state, x, y, Some(logits))
        })
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for stage in self.stages.drain(..) {
            // A stage that already exited has dropped its queue; nothing to stop.
            let _ = stage.send(ToStage::Stop);
        }
        for thread in self.threads.drain(..) {
            // A stage that panicked has already reported nothing more useful.
            let _ = thread.join();
        }
    }
}

/// Rows of one micro-batch (the model's batch).
fn micro_rows(model: &Model) -> usize {
    model.graph.nodes()[model.input.index()].shape[0]
}

/// Classes of a classifier model (columns of its logits).
fn classes(model: &Model) -> usize {
    model.graph.nodes()[model.logits.index()].shape[1]
}

/// One epoch of a classifier over `data` in batches of `rows` rows (the loader's, checked
/// by the caller), each trained by `step` (which fills the batch's logits); counts loss,
/// accuracy and samples.
///
/// # Errors
/// What `step` returns.
fn run_epoch(
    rows: usize,
    classes: usize,
    state: &mut TrainState,
    data: &Dataset,
    mut step: impl FnMut(&mut TrainState, &[f32], &[i32], &mut Vec<f32>) -> Result<f32, NnError>,
) -> Result<EpochStats, NnError> {
    let mut tally = EpochTally::start();
    let mut x = vec![0.0; rows * data.dim];
    let mut y = vec![0; rows];
    let mut logits = Vec::new();
    while let Some(idx) = state.loader.next_batch() {
        let idx = idx.to_vec();
        data.gather(&idx, &mut x, &mut y);
        let loss = step(state, &x, &y, &mut logits)?;
        tally.batch(loss, rows);
        tally.classified(&logits, classes, y.iter().copied());
    }
    state.epoch += 1;
    Ok(tally.finish())
}
