//! Model parallelism: [`Pipeline`] splits a model's op graph into stages, each run by its
//! own worker thread over a [`CpuExecutor::for_stage`], and trains GPipe-style: the
//! micro-batches of a batch flow forward through the stages, then backward in reverse,
//! and one optimizer update applies the averaged gradients.
//!
//! # Invariants
//! 1. Stage `s` runs the node range `bounds[s]..bounds[s + 1]`; it is given the values of
//!    its [`Graph::stage_inputs`](crate::nn::Graph::stage_inputs) (data inputs from the
//!    coordinator, activations from earlier stages) and hands on every value a later stage
//!    reads, its own outputs included.
//! 2. A stage keeps only its inputs per micro-batch and recomputes its forward pass just
//!    before that micro-batch's backward (GPipe's re-materialization), with the same
//!    dropout seed, so activation memory is one micro-batch per stage.
//! 3. Gradients flow back as seeds for the nodes a stage produced; gradients of the stage's
//!    own inputs are added to what it passes on. Parameter gradients are summed over the
//!    micro-batches and averaged by the coordinator, so a step equals one step on the
//!    whole batch (each micro-batch's loss being a mean over equally many rows).
//! 4. Messages on a stage's queue arrive in order: the coordinator sends one step's work
//!    only after the previous step completed.
//!
//! # Shutdown
//! 1. Dropping the pipeline closes every stage's queue; each stage thread exits at its
//!    next receive.
//! 2. Drop joins the stage threads. After a stage error the pipeline refuses further steps.
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::nn::{
    CpuExecutor, DType, Dataset, EpochStats, Executor, Graph, Model, NnError, NodeId, Op, Params, TrainState,
};

/// A value handed between stages.
#[derive(Debug, Clone)]
enum Value {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

type Values = BTreeMap<usize, Value>;

enum ToStage {
    /// Start of a step: the parameters and the step's seed.
    Begin(Arc<Params>, u64),
    Forward(usize, Values),
    Backward(usize, BTreeMap<usize, Vec<f32>>),
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

/// What one stage knows about the graph.
struct StagePlan {
    index: usize,
    range: Range<usize>,
    /// Values this stage reads from outside its range.
    inputs: Vec<usize>,
    /// Values stages after this one read from this or earlier stages.
    needed_later: Vec<usize>,
    /// The loss node, if this is the last stage.
    loss: Option<usize>,
    logits: usize,
    micro_batches: usize,
}

struct Stage {
    plan: StagePlan,
    exec: CpuExecutor,
    inbox: Receiver<ToStage>,
    next: Option<Sender<ToStage>>,
    previous: Option<Sender<ToStage>>,
    coordinator: Sender<ToCoordinator>,
    params: Arc<Params>,
    seed: u64,
    /// Stage inputs of each micro-batch of the current step.
    saved: Vec<Values>,
    /// Parameter gradients summed over micro-batches.
    grads: Vec<(usize, Vec<f32>)>,
    forwards: usize,
}

impl Stage {
    fn run(mut self) {
        while let Ok(message) = self.inbox.recv() {
            let result = match message {
                ToStage::Begin(params, seed) => {
                    self.params = params;
                    self.seed = seed;
                    self.forwards = 0;
                    self.grads.iter_mut().for_each(|(_, g)| g.fill(0.0));
                    Ok(())
                }
                ToStage::Forward(mb, values) => self.guarded(|stage| stage.forward(mb, values)),
                ToStage::Backward(mb, grads) => self.guarded(|stage| stage.backward(mb, grads)),
                ToStage::Stop => return,
            };
            if let Err(error) = result {
                let _ = self.coordinator.send(ToCoordinator::Failed(self.plan.index, error));
                return;
            }
        }
    }

    /// Runs `work`, turning a panic into an error so the coordinator never waits forever.
    fn guarded(&mut self, work: impl FnOnce(&mut Self) -> Result<(), NnError>) -> Result<(), NnError> {
        let index = self.plan.index;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(self))).unwrap_or_else(|_| {
            Err(NnError::WorkerGone { worker: format!("pipeline stage {index} (panicked)") })
        })
    }

    fn load(&mut self, mb: usize) -> Result<(), NnError> {
        for (&node, value) in &self.saved[mb] {
            if !self.plan.inputs.contains(&node) {
                continue;
            }
            match value {
                Value::F32(v) => self.exec.set_value(NodeId(node), v)?,
                Value::I32(v) => self.exec.set_ids(NodeId(node), v)?,
            }
        }
        self.exec.set_training(true);
        self.exec.set_seed(self.seed ^ (mb as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
        self.exec.forward(&self.params, self.plan.range.clone())
    }

    fn forward(&mut self, mb: usize, mut values: Values) -> Result<(), NnError> {
        self.saved[mb] = values
            .iter()
            .filter(|(k, _)| self.plan.inputs.contains(k))
            .map(|(&k, v)| (k, v.clone()))
            .collect();
        self.load(mb)?;
        self.forwards += 1;
        match self.plan.loss {
            Some(loss) => {
                let logits = self.exec.value(NodeId(self.plan.logits))?.to_vec();
                let loss = self.exec.scalar(NodeId(loss))?;
                let _ = self.coordinator.send(ToCoordinator::Loss(mb, loss, logits));
                if self.forwards == self.plan.micro_batches {
                    // GPipe: all forwards are done; backward runs the micro-batches in
                    // reverse (the last one's activations are still in place).
                    for mb in (0..self.plan.micro_batches).rev() {
                        self.backward(mb, BTreeMap::new())?;
                    }
                }
                Ok(())
            }
            None => {
                for &node in &self.plan.own_outputs_needed_later() {
                    let value = match self.exec.graph().nodes()[node].dtype {
                        DType::F32 => Value::F32(self.exec.value(NodeId(node))?.to_vec()),
                        DType::I32 => Value::I32(self.exec.ids_mut(NodeId(node))?.to_vec()),
                    };
                    values.insert(node, value);
                }
                values.retain(|k, _| self.plan.needed_later.contains(k));
                self.send_next(ToStage::Forward(mb, values))
            }
        }
    }

    fn send_next(&self, message: ToStage) -> Result<(), NnError> {
        match &self.next {
            Some(next) if next.send(message).is_ok() => Ok(()),
            _ => Err(NnError::WorkerGone { worker: format!("pipeline stage {}", self.plan.index + 1) }),
        }
    }

    fn backward(&mut self, mb: usize, mut grads: BTreeMap<usize, Vec<f32>>) -> Result<(), NnError> {
        let last_forward = self.plan.loss.is_some() && mb + 1 == self.plan.micro_batches;
        if !last_forward {
            self.load(mb)?;
        }
        let range = self.plan.range.clone();
        let one = [1.0f32];
        let mut seeds: Vec<(NodeId, &[f32])> = Vec::new();
        if let Some(loss) = self.plan.loss {
            seeds.push((NodeId(loss), &one));
        }
        for (&node, g) in &grads {
            if range.contains(&node) {
                seeds.push((NodeId(node), g));
            }
        }
        let params = Arc::clone(&self.params);
        let acc = &mut self.grads;
        self.exec.backward_observed(&params, range.clone(), &seeds, &mut |p, g| {
            if let Some((_, sum)) = acc.iter_mut().find(|(i, _)| *i == p) {
                sum.iter_mut().zip(g).for_each(|(s, g)| *s += g);
            }
            Ok(())
        })?;
        grads.retain(|&k, _| k < range.start);
        for &node in &self.plan.inputs {
            if self.exec.requires_grad(NodeId(node)) {
                let g = self.exec.grad(NodeId(node))?;
                let entry = grads.entry(node).or_insert_with(|| vec![0.0; g.len()]);
                entry.iter_mut().zip(g).for_each(|(e, g)| *e += g);
            }
        }
        if let Some(previous) = &self.previous {
            if previous.send(ToStage::Backward(mb, grads)).is_err() {
                return Err(NnError::WorkerGone {
                    worker: format!("pipeline stage {}", self.plan.index - 1),
                });
            }
        }
        if mb == 0 {
            let grads = self.grads.clone();
            let _ = self.coordinator.send(ToCoordinator::Grads(grads));
        }
        Ok(())
    }
}

impl StagePlan {
    fn own_outputs_needed_later(&self) -> Vec<usize> {
        self.needed_later.iter().copied().filter(|n| self.range.contains(n)).collect()
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
        let graph = &model.graph;
        let end = model.loss.index() + 1;
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(end);
        let bad = |what: String| NnError::Argument { op: "Pipeline::new", what };
        if bounds.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad(format!("cuts {cuts:?} must increase strictly inside 1..{}", end)));
        }
        if micro_batches == 0 {
            return Err(bad("needs at least one micro-batch".into()));
        }
        let ranges: Vec<Range<usize>> = bounds.windows(2).map(|w| w[0]..w[1]).collect();
        // What each stage reads from outside: earlier activations, and data inputs.
        let inputs: Vec<Vec<usize>> = ranges
            .iter()
            .map(|r| {
                let mut reads = ids(graph.stage_inputs(r.clone()));
                reads.extend(r.clone().filter(|&n| matches!(graph.nodes()[n].op, Op::Input)));
                reads.sort_unstable();
                reads
            })
            .collect();
        let count = ranges.len();
        let logits = model.logits.index();
        if !ranges[count - 1].contains(&logits) && !inputs[count - 1].contains(&logits) {
            return Err(bad("the last stage must compute or read the logits".into()));
        }
        let (result_tx, results) = mpsc::channel();
        let channels: Vec<(Sender<ToStage>, Receiver<ToStage>)> =
            ranges.iter().map(|_| mpsc::channel()).collect();
        let senders: Vec<Sender<ToStage>> = channels.iter().map(|(s, _)| s.clone()).collect();
        let mut threads = Vec::new();
        for (index, (range, (_, inbox))) in ranges.iter().zip(channels).enumerate() {
            let mut needed_later: Vec<usize> = inputs[index + 1..].iter().flatten().copied().collect();
            needed_later.sort_unstable();
            needed_later.dedup();
            let exec = CpuExecutor::for_stage(graph, range.clone());
            let grads = (0..graph.params().len())
                .filter(|&p| !exec.param_grad(p).is_empty())
                .map(|p| (p, vec![0.0; exec.param_grad(p).len()]))
                .collect();
            let stage = Stage {
                plan: StagePlan {
                    index,
                    range: range.clone(),
                    inputs: inputs[index].clone(),
                    needed_later,
                    loss: (index + 1 == count).then_some(model.loss.index()),
                    logits: model.logits.index(),
                    micro_batches,
                },
                exec,
                inbox,
                next: senders.get(index + 1).cloned(),
                previous: index.checked_sub(1).map(|i| senders[i].clone()),
                coordinator: result_tx.clone(),
                params: Arc::new(Params { tensors: Vec::new() }),
                seed: 0,
                saved: vec![Values::new(); micro_batches],
                grads,
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
        let grads = graph.params().iter().map(|p| vec![0.0; p.shape.iter().product()]).collect();
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
        let cuts = balanced_cuts(&model.graph, model.loss.index() + 1, stages);
        if cuts.len() + 1 != stages {
            return Err(NnError::Argument {
                op: "Pipeline::balanced",
                what: format!("the graph has compute for at most {} stages, not {stages}", cuts.len() + 1),
            });
        }
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
        self.micro_batches * self.micro_rows()
    }

    fn micro_rows(&self) -> usize {
        self.model.graph.nodes()[self.model.input.index()].shape[0]
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
        let (input, target) = (self.model.input, self.model.target);
        let rows = self.micro_rows();
        let x_len = self.model.graph.node(input)?.len();
        for (node, got, per) in [(input, x.len(), x_len), (target, y.len(), rows)] {
            if got != per * self.micro_batches {
                let name = self.model.graph.node(node)?.name.clone();
                return Err(NnError::Length {
                    node: node.index(),
                    name,
                    expected: per * self.micro_batches,
                    got,
                });
            }
        }
        let params = Arc::new(state.params.clone());
        let seed = state.rng.next_u64();
        for stage in &self.stages {
            if stage.send(ToStage::Begin(Arc::clone(&params), seed)).is_err() {
                self.failed = true;
                return Err(NnError::WorkerGone { worker: "a pipeline stage".into() });
            }
        }
        for mb in 0..self.micro_batches {
            let mut values = Values::new();
            values.insert(input.index(), Value::F32(x[mb * x_len..(mb + 1) * x_len].to_vec()));
            values.insert(target.index(), Value::I32(y[mb * rows..(mb + 1) * rows].to_vec()));
            // Stage 0 hands on whatever later stages read (the targets, for the loss).
            if self.stages[0].send(ToStage::Forward(mb, values)).is_err() {
                self.failed = true;
                return Err(NnError::WorkerGone { worker: "pipeline stage 0".into() });
            }
        }
        self.grads.iter_mut().for_each(|g| g.fill(0.0));
        let mut loss = 0.0f64;
        let classes = self.model.graph.nodes()[self.model.logits.index()].shape[1];
        if let Some(out) = logits_out.as_deref_mut() {
            out.clear();
            out.resize(self.batch_rows() * classes, 0.0);
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
    /// [`NnError::Argument`] if the loader's batch does not fit; as [`Pipeline::step`].
    pub fn train_epoch(&mut self, state: &mut TrainState, data: &Dataset) -> Result<EpochStats, NnError> {
        let start = Instant::now();
        let rows = self.batch_rows();
        if state.loader.batch_size() != rows {
            return Err(NnError::Argument {
                op: "Pipeline::train_epoch",
                what: format!("the loader's batch {} must be {rows} rows", state.loader.batch_size()),
            });
        }
        let classes = self.model.graph.nodes()[self.model.logits.index()].shape[1];
        let mut x = vec![0.0; rows * data.dim];
        let mut y = vec![0; rows];
        let mut logits = Vec::new();
        let (mut total, mut batches, mut correct, mut samples) = (0.0f64, 0usize, 0usize, 0usize);
        while let Some(idx) = state.loader.next_batch() {
            let idx = idx.to_vec();
            data.gather(&idx, &mut x, &mut y);
            total += self.step_with_logits(state, &x, &y, Some(&mut logits))? as f64;
            batches += 1;
            samples += rows;
            for (row, &label) in logits.chunks_exact(classes).zip(&y) {
                correct += usize::from(super::argmax(row) == label as usize);
            }
        }
        state.epoch += 1;
        Ok(EpochStats {
            loss: (total / batches.max(1) as f64) as f32,
            accuracy: correct as f32 / samples.max(1) as f32,
            samples,
            seconds: start.elapsed().as_secs_f64(),
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

fn ids(nodes: Vec<NodeId>) -> Vec<usize> {
    nodes.into_iter().map(NodeId::index).collect()
}

/// Estimated multiply-adds of each node.
fn node_cost(graph: &Graph, n: usize) -> f64 {
    let node = &graph.nodes()[n];
    if matches!(node.op, Op::Param { .. } | Op::Input | Op::Constant { .. }) {
        return 0.0;
    }
    let out = node.len() as f64;
    match node.op {
        Op::Linear { .. } | Op::Conv2d { .. } => {
            // Output elements × (weight elements / output channels or columns).
            let w = &graph.nodes()[node.inputs[1].index()].shape;
            let per_out = w.iter().product::<usize>() as f64 / w.iter().copied().max().unwrap_or(1) as f64;
            out * per_out.max(1.0)
        }
        _ => out,
    }
}

/// Cuts before compute nodes (never leaving a stage without work), each as close as
/// possible to an equal share of the estimated total cost.
fn balanced_cuts(graph: &Graph, end: usize, stages: usize) -> Vec<usize> {
    let costs: Vec<f64> = (0..end).map(|n| node_cost(graph, n)).collect();
    let total: f64 = costs.iter().sum();
    // Candidate cut positions: the start of each compute node but the first.
    let mut before = 0.0;
    let mut candidates: Vec<(usize, f64)> = Vec::new();
    for (n, &c) in costs.iter().enumerate() {
        if c > 0.0 && before > 0.0 {
            candidates.push((n, before));
        }
        before += c;
    }
    let mut cuts: Vec<usize> = Vec::new();
    let mut from = 0;
    for k in 1..stages {
        let target = total * k as f64 / stages as f64;
        // Leave enough candidates for the remaining cuts.
        let last = candidates.len().saturating_sub(stages - 1 - k);
        let best = (from..last)
            .min_by(|&a, &b| (candidates[a].1 - target).abs().total_cmp(&(candidates[b].1 - target).abs()));
        let Some(best) = best else { break };
        cuts.push(candidates[best].0);
        from = best + 1;
    }
    cuts
}
