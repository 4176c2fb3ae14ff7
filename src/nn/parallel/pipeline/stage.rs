//! The work of one pipeline stage, shared by the thread pipeline ([`super::Pipeline`]) and
//! the stage actors on cluster nodes ([`super::ClusterPipeline`]): how a model is cut into
//! stages ([`plan_stages`]), and what a stage does with a micro-batch's boundary values in
//! forward and with their gradients in backward ([`StageWork`]).
//!
//! # Invariants
//! 1. Stage `s` runs the node range `bounds[s]..bounds[s + 1]`; it is given the values of
//!    its [`Graph::stage_inputs`] (data inputs from the coordinator, activations from
//!    earlier stages) and hands on every value a later stage reads, its own outputs
//!    included.
//! 2. A stage keeps only its inputs per micro-batch and recomputes its forward pass just
//!    before that micro-batch's backward (GPipe's re-materialization), with the same
//!    dropout seed, so activation memory is one micro-batch per stage. The one exception is
//!    the micro-batch whose activations are still in place (its forward was the stage's
//!    last piece of work): it is not recomputed.
//! 3. Gradients flow back as seeds for the nodes a stage produced; gradients of the stage's
//!    own inputs are added to what it passes on. Parameter gradients are summed over the
//!    micro-batches; averaged, a step equals one step on the whole batch (each
//!    micro-batch's loss being a mean over equally many rows).
use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::nn::{CpuExecutor, DType, Executor, Graph, Model, NnError, NodeId, Op, Params};

/// A value handed between stages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum Value {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

/// Boundary values of one micro-batch, by node id.
pub(super) type Values = BTreeMap<usize, Value>;

/// Gradients of boundary values of one micro-batch, by node id.
pub(super) type Grads = BTreeMap<usize, Vec<f32>>;

/// What one stage knows about the graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StagePlan {
    pub(super) index: usize,
    pub(super) range: Range<usize>,
    /// Values this stage reads from outside its range.
    pub(super) inputs: Vec<usize>,
    /// Values stages after this one read from this or earlier stages.
    pub(super) needed_later: Vec<usize>,
    /// The loss node, if this is the last stage.
    pub(super) loss: Option<usize>,
    pub(super) logits: usize,
    pub(super) micro_batches: usize,
    /// The parameters nodes of this stage read.
    pub(super) params: Vec<usize>,
}

/// Cuts `model` at `cuts` (strictly increasing node ids; `cuts.len() + 1` stages) and
/// plans each stage. `op` names the caller in errors.
///
/// # Errors
/// [`NnError::Argument`] for bad cuts or zero micro-batches, or if the logits are not in or
/// read by the last stage.
pub(super) fn plan_stages(
    model: &Model,
    cuts: &[usize],
    micro_batches: usize,
    op: &'static str,
) -> Result<Vec<StagePlan>, NnError> {
    let graph = &model.graph;
    let end = model.loss.index() + 1;
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(end);
    let bad = |what: String| NnError::Argument { op, what };
    if bounds.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad(format!("cuts {cuts:?} must increase strictly inside 1..{end}")));
    }
    if micro_batches == 0 {
        return Err(bad("needs at least one micro-batch".into()));
    }
    let ranges: Vec<Range<usize>> = bounds.windows(2).map(|w| w[0]..w[1]).collect();
    // What each stage reads from outside: earlier activations, and data inputs.
    let inputs: Vec<Vec<usize>> = ranges
        .iter()
        .map(|r| {
            let mut reads: Vec<usize> =
                graph.stage_inputs(r.clone()).into_iter().map(NodeId::index).collect();
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
    Ok(ranges
        .iter()
        .enumerate()
        .map(|(index, range)| {
            let mut needed_later: Vec<usize> = inputs[index + 1..].iter().flatten().copied().collect();
            needed_later.sort_unstable();
            needed_later.dedup();
            StagePlan {
                index,
                range: range.clone(),
                inputs: inputs[index].clone(),
                needed_later,
                loss: (index + 1 == count).then_some(model.loss.index()),
                logits,
                micro_batches,
                params: graph.stage_params(range.clone()),
            }
        })
        .collect())
}

/// The cuts of `stages` stages of about equal estimated work (see [`balanced_cuts`]).
///
/// # Errors
/// [`NnError::Argument`] if the graph has compute nodes for fewer stages than `stages`.
pub(super) fn balanced(model: &Model, stages: usize, op: &'static str) -> Result<Vec<usize>, NnError> {
    let cuts = balanced_cuts(&model.graph, model.loss.index() + 1, stages);
    if cuts.len() + 1 != stages {
        return Err(NnError::Argument {
            op,
            what: format!("the graph has compute for at most {} stages, not {stages}", cuts.len() + 1),
        });
    }
    Ok(cuts)
}

/// Checks that `x` and `y` hold `micro_batches` micro-batches for `model`.
///
/// # Errors
/// [`NnError::Length`] naming the input or target node.
pub(super) fn check_batch(model: &Model, micro_batches: usize, x: &[f32], y: &[i32]) -> Result<(), NnError> {
    let (input, target) = (model.input, model.target);
    let rows = model.graph.nodes()[input.index()].shape[0];
    let x_len = model.graph.node(input)?.len();
    for (node, got, per) in [(input, x.len(), x_len), (target, y.len(), rows)] {
        if got != per * micro_batches {
            let name = model.graph.node(node)?.name.clone();
            return Err(NnError::Length { node: node.index(), name, expected: per * micro_batches, got });
        }
    }
    Ok(())
}

/// The values stage 0 is given for micro-batch `mb` of a batch `x`, `y`: the features and
/// the targets (stage 0 hands on whatever later stages read, the targets for the loss).
pub(super) fn micro_batch(model: &Model, mb: usize, x: &[f32], y: &[i32]) -> Values {
    let input = &model.graph.nodes()[model.input.index()];
    let (rows, x_len) = (input.shape[0], input.len());
    let mut values = Values::new();
    values.insert(model.input.index(), Value::F32(x[mb * x_len..(mb + 1) * x_len].to_vec()));
    values.insert(model.target.index(), Value::I32(y[mb * rows..(mb + 1) * rows].to_vec()));
    values
}

/// What a stage's forward pass of one micro-batch gives.
pub(super) enum Forwarded {
    /// The values the next stage needs.
    Next(Values),
    /// The last stage's loss and logits.
    Loss(f32, Vec<f32>),
}

/// One stage's executor, saved inputs and summed parameter gradients.
pub(super) struct StageWork {
    plan: StagePlan,
    exec: CpuExecutor,
    seed: u64,
    /// Stage inputs of each micro-batch of the current step.
    saved: Vec<Values>,
    /// Parameter gradients summed over micro-batches (the stage's parameters only).
    grads: Vec<(usize, Vec<f32>)>,
    /// The micro-batch whose activations are in the executor now, if any.
    loaded: Option<usize>,
}

impl StageWork {
    pub(super) fn new(graph: &Graph, plan: StagePlan) -> Self {
        let exec = CpuExecutor::for_stage(graph, plan.range.clone());
        let grads = plan.params.iter().map(|&p| (p, vec![0.0; exec.param_grad(p).len()])).collect();
        let saved = vec![Values::new(); plan.micro_batches];
        StageWork { plan, exec, seed: 0, saved, grads, loaded: None }
    }

    pub(super) fn plan(&self) -> &StagePlan {
        &self.plan
    }

    /// Starts a step: clears the summed gradients and sets the step's seed.
    pub(super) fn begin(&mut self, seed: u64) {
        self.seed = seed;
        self.loaded = None;
        self.grads.iter_mut().for_each(|(_, g)| g.fill(0.0));
    }

    /// The parameter gradients summed over the micro-batches so far.
    pub(super) fn grads(&self) -> &[(usize, Vec<f32>)] {
        &self.grads
    }

    /// Divides the summed gradients by the number of micro-batches, and returns them.
    pub(super) fn average_grads(&mut self) -> &[(usize, Vec<f32>)] {
        let scale = 1.0 / self.plan.micro_batches as f32;
        self.grads.iter_mut().for_each(|(_, g)| g.iter_mut().for_each(|v| *v *= scale));
        &self.grads
    }

    fn check_mb(&self, mb: usize) -> Result<(), NnError> {
        if mb < self.plan.micro_batches {
            return Ok(());
        }
        Err(NnError::Argument {
            op: "pipeline stage",
            what: format!("micro-batch {mb} of {}", self.plan.micro_batches),
        })
    }

    fn load(&mut self, params: &Params, mb: usize) -> Result<(), NnError> {
        for (&node, value) in &self.saved[mb] {
            match value {
                Value::F32(v) => self.exec.set_value(NodeId(node), v)?,
                Value::I32(v) => self.exec.set_ids(NodeId(node), v)?,
            }
        }
        self.exec.set_training(true);
        self.exec.set_seed(self.seed ^ (mb as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
        self.loaded = None;
        self.exec.forward(params, self.plan.range.clone())?;
        self.loaded = Some(mb);
        Ok(())
    }

    /// Runs micro-batch `mb` forward from its boundary `values`.
    pub(super) fn forward(
        &mut self,
        params: &Params,
        mb: usize,
        mut values: Values,
    ) -> Result<Forwarded, NnError> {
        self.check_mb(mb)?;
        self.saved[mb] = values
            .iter()
            .filter(|(k, _)| self.plan.inputs.contains(k))
            .map(|(&k, v)| (k, v.clone()))
            .collect();
        self.load(params, mb)?;
        if let Some(loss) = self.plan.loss {
            let logits = self.exec.value(NodeId(self.plan.logits))?.to_vec();
            let loss = self.exec.scalar(NodeId(loss))?;
            return Ok(Forwarded::Loss(loss, logits));
        }
        for &node in self.plan.needed_later.iter().filter(|n| self.plan.range.contains(n)) {
            let value = match self.exec.graph().nodes()[node].dtype {
                DType::F32 => Value::F32(self.exec.value(NodeId(node))?.to_vec()),
                DType::I32 => Value::I32(self.exec.ids_mut(NodeId(node))?.to_vec()),
            };
            values.insert(node, value);
        }
        values.retain(|k, _| self.plan.needed_later.contains(k));
        Ok(Forwarded::Next(values))
    }

    /// Runs micro-batch `mb` backward from the gradients of the values this stage handed
    /// on (none for the last stage, which seeds its loss); adds its parameter gradients to
    /// the sums and returns the gradients the previous stage needs.
    pub(super) fn backward(
        &mut self,
        params: &Params,
        mb: usize,
        mut grads: Grads,
    ) -> Result<Grads, NnError> {
        self.check_mb(mb)?;
        if self.loaded != Some(mb) {
            self.load(params, mb)?;
        }
        self.loaded = None;
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
        let acc = &mut self.grads;
        self.exec.backward_observed(params, range.clone(), &seeds, &mut |p, g| {
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
        Ok(grads)
    }
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
