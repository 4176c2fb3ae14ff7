//! `CpuExecutor`: runs a [`Graph`] forward and backward on the CPU, one op kernel at a time,
//! over buffers allocated once per graph.
//!
//! # Invariants
//! 1. Every buffer (values, gradients, saved intermediates, scratch) is allocated in
//!    [`CpuExecutor::new`]; `forward` and `backward` never allocate.
//! 2. A node's value is valid once it was computed by `forward` or set by `set_value` /
//!    `set_ids`; reading a node that is neither is a [`NnError::MissingValue`].
//! 3. `backward(range, seeds)` first zeroes the gradients of the nodes in `range` and of
//!    every node they read (parameters and stage inputs included), then adds the seeds,
//!    then runs the nodes of `range` in reverse. Gradients only flow to nodes that depend on
//!    a parameter (`requires_grad`).
//! 4. A parameter's gradient is final once backward has run its first reader (the
//!    lowest-numbered node that reads it); [`CpuExecutor::backward_observed`] reports it
//!    right then, which is where data-parallel training starts reducing a bucket.
//! 5. Matrix products go through `matrixmultiply` single-threaded; transposed operands are
//!    read through strides, never copied.
use std::ops::Range;

use crate::nn::executor::rules;
use crate::nn::tensor::numel;
use crate::nn::{DType, Executor, Graph, NnError, NodeId, Op, Params, Rng};

mod backward;
mod forward;
mod gemm;

pub(crate) use gemm::{gemm_rm, MatRef};

/// Called with a parameter's index and final gradient during backward.
pub(crate) type ParamReady<'a> = dyn FnMut(usize, &[f32]) -> Result<(), NnError> + 'a;

/// Read-only views the kernels need: the graph, node values, ids, saved intermediates.
pub(crate) struct Ctx<'a> {
    pub(crate) graph: &'a Graph,
    pub(crate) vals: &'a [Vec<f32>],
    pub(crate) ids: &'a [Vec<i32>],
    pub(crate) params: &'a Params,
}

impl<'a> Ctx<'a> {
    pub(crate) fn val(&self, id: NodeId) -> &'a [f32] {
        match self.graph.nodes()[id.0].op {
            Op::Param { index } => &self.params.tensors[index].data,
            _ => &self.vals[id.0],
        }
    }

    pub(crate) fn ids(&self, id: NodeId) -> &'a [i32] {
        &self.ids[id.0]
    }

    pub(crate) fn shape(&self, id: NodeId) -> &'a [usize] {
        &self.graph.nodes()[id.0].shape
    }
}

/// Runs a graph on the CPU with preallocated buffers.
#[derive(Debug)]
pub struct CpuExecutor {
    graph: Graph,
    vals: Vec<Vec<f32>>,
    ids: Vec<Vec<i32>>,
    grads: Vec<Vec<f32>>,
    aux: Vec<Vec<f32>>,
    idx: Vec<Vec<u32>>,
    scratch: Vec<f32>,
    scratch2: Vec<f32>,
    filled: Vec<bool>,
    requires_grad: Vec<bool>,
    stage: Range<usize>,
    /// Marks used while zeroing gradients (all false between calls).
    zeroed: Vec<bool>,
    rng: Rng,
    training: bool,
    forward_trained: bool,
    /// For each parameter, the lowest node id that reads it (`usize::MAX` if none does).
    first_reader: Vec<usize>,
    /// Whether nodes of the stage read each parameter (the others may be left empty).
    reads: Vec<bool>,
}

impl CpuExecutor {
    /// An executor for `graph`, with every buffer it will need allocated now.
    pub fn new(graph: &Graph) -> Self {
        Self::for_stage(graph, 0..graph.len())
    }

    /// An executor for one pipeline stage: it can run only nodes in `stage`, and holds
    /// buffers only for those nodes, the stage's inputs ([`Graph::stage_inputs`]) and the
    /// parameters it reads. (`stage` is clamped to the graph.)
    pub fn for_stage(graph: &Graph, stage: Range<usize>) -> Self {
        let nodes = graph.nodes();
        let stage = stage.start.min(nodes.len())..stage.end.min(nodes.len());
        let mut held = vec![false; nodes.len()];
        for i in stage.clone() {
            held[i] = true;
            for j in &nodes[i].inputs {
                held[j.0] = true;
            }
        }
        let n = nodes.len();
        let requires_grad = rules::requires_grad(graph);
        let mut vals = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut grads = Vec::with_capacity(n);
        let mut aux = Vec::with_capacity(n);
        let mut idx = Vec::with_capacity(n);
        let (mut scratch, mut scratch2) = (0usize, 0usize);
        for (i, node) in nodes.iter().enumerate() {
            let len = if held[i] { node.len() } else { 0 };
            let is_param = matches!(node.op, Op::Param { .. });
            vals.push(if node.dtype == DType::F32 && !is_param { vec![0.0; len] } else { Vec::new() });
            ids.push(if node.dtype == DType::I32 { vec![0; len] } else { Vec::new() });
            grads.push(if requires_grad[i] { vec![0.0; len] } else { Vec::new() });
            let sizes = if stage.contains(&i) {
                buffer_sizes(graph, node)
            } else {
                Sizes { aux: 0, idx: 0, scratch: 0, scratch2: 0 }
            };
            aux.push(vec![0.0; sizes.aux]);
            idx.push(vec![0; sizes.idx]);
            scratch = scratch.max(sizes.scratch);
            scratch2 = scratch2.max(sizes.scratch2);
        }
        let filled = nodes.iter().map(|n| matches!(n.op, Op::Param { .. })).collect();
        let mut first_reader = vec![usize::MAX; graph.params().len()];
        for (i, node) in nodes.iter().enumerate().rev() {
            for &j in &node.inputs {
                if let Op::Param { index } = nodes[j.0].op {
                    first_reader[index] = i;
                }
            }
        }
        let mut reads = vec![false; graph.params().len()];
        graph.stage_params(stage.clone()).into_iter().for_each(|p| reads[p] = true);
        CpuExecutor {
            graph: graph.clone(),
            vals,
            ids,
            grads,
            aux,
            idx,
            scratch: vec![0.0; scratch],
            scratch2: vec![0.0; scratch2],
            filled,
            requires_grad,
            stage,
            zeroed: vec![false; nodes.len()],
            rng: Rng::seed(0),
            training: false,
            forward_trained: false,
            first_reader,
            reads,
        }
    }

    fn check_node(&self, node: NodeId) -> Result<(), NnError> {
        self.graph.node(node).map(|_| ())
    }

    /// Errors unless the node has buffers in this executor (is in the stage or read by it).
    fn check_held(&self, node: NodeId) -> Result<(), NnError> {
        let n = self.graph.node(node)?;
        let held = match n.dtype {
            DType::I32 => self.ids[node.0].len() == n.len(),
            _ => self.vals[node.0].len() == n.len() || matches!(n.op, Op::Param { .. }),
        };
        if held {
            Ok(())
        } else {
            Err(self.outside(node.0..node.0 + 1))
        }
    }

    fn outside(&self, range: Range<usize>) -> NnError {
        NnError::OutsideStage {
            start: range.start,
            end: range.end,
            stage_start: self.stage.start,
            stage_end: self.stage.end,
        }
    }

    fn check_range(&self, range: &Range<usize>) -> Result<(), NnError> {
        rules::check_in_graph(&self.graph, range)?;
        if !range.is_empty() && (range.start < self.stage.start || range.end > self.stage.end) {
            return Err(self.outside(range.clone()));
        }
        Ok(())
    }

    /// A mutable view of an f32 node's value buffer, to fill an input in place (marks the
    /// node as set).
    ///
    /// # Errors
    /// [`NnError::UnknownNode`]; [`NnError::DType`] for an i32 node or a parameter.
    pub fn value_mut(&mut self, node: NodeId) -> Result<&mut [f32], NnError> {
        self.check_held(node)?;
        rules::check_settable(&self.graph, node, DType::F32)?;
        self.filled[node.0] = true;
        Ok(&mut self.vals[node.0])
    }

    /// A mutable view of an i32 node's buffer (labels, token ids); marks the node as set.
    ///
    /// # Errors
    /// [`NnError::UnknownNode`]; [`NnError::DType`] for an f32 node.
    pub fn ids_mut(&mut self, node: NodeId) -> Result<&mut [i32], NnError> {
        self.check_held(node)?;
        rules::check_settable(&self.graph, node, DType::I32)?;
        self.filled[node.0] = true;
        Ok(&mut self.ids[node.0])
    }

    /// A node's gradient, mutable (e.g. to write back an all-reduced gradient).
    ///
    /// # Errors
    /// [`NnError::UnknownNode`], or [`NnError::MissingValue`] for a node without gradient.
    pub fn grad_mut(&mut self, node: NodeId) -> Result<&mut [f32], NnError> {
        self.check_node(node)?;
        if !self.requires_grad[node.0] {
            return Err(self.missing(node));
        }
        Ok(&mut self.grads[node.0])
    }

    /// Parameter `index`'s gradient, mutable.
    ///
    /// # Panics
    /// If `index` is not a parameter index of the graph.
    pub fn param_grad_mut(&mut self, index: usize) -> &mut [f32] {
        let node = self.graph.params()[index].node;
        &mut self.grads[node.0]
    }

    /// Whether gradients flow to `node` (it depends on a parameter).
    pub fn requires_grad(&self, node: NodeId) -> bool {
        self.requires_grad.get(node.0).copied().unwrap_or(false)
    }

    /// As [`Executor::backward`], but calls `ready(index, gradient)` for each parameter as
    /// soon as its gradient is final (right after its first reader ran backward), while
    /// the rest of the range continues: the hook where data parallelism overlaps gradient
    /// reduction with backward. Parameters that no node of `range` reads first are reported
    /// after the walk. Every parameter is reported exactly once.
    ///
    /// # Errors
    /// As [`Executor::backward`], and the first error `ready` returns (backward stops).
    pub(crate) fn backward_observed(
        &mut self,
        params: &Params,
        range: Range<usize>,
        seeds: &[(NodeId, &[f32])],
        ready: &mut ParamReady<'_>,
    ) -> Result<(), NnError> {
        // (A hook error may have left marks from an earlier call.)
        self.zeroed.fill(false);
        self.check_range(&range)?;
        params.check_some(&self.graph, |p| self.reads[p])?;
        let grads = &mut self.grads;
        rules::zero_grads(&self.graph, &self.requires_grad, &range, &mut self.zeroed, |i| {
            grads[i].fill(0.0);
            Ok(())
        })?;
        for &(node, seed) in seeds {
            rules::check_len(&self.graph, node, seed.len())?;
            self.check_held(node)?;
            if !self.requires_grad[node.0] {
                continue;
            }
            for (g, s) in self.grads[node.0].iter_mut().zip(seed) {
                *g += s;
            }
        }
        for n in range.clone().rev() {
            if !rules::backward_runs(&self.graph, &self.requires_grad, &self.filled, n)? {
                continue;
            }
            let node = &self.graph.nodes()[n];
            if node.is_empty() {
                // An empty output (a batch or axis of zero) adds nothing to its inputs'
                // gradients; its parameters are still reported below.
                self.report_ready_params(n, ready)?;
                continue;
            }
            let g = std::mem::take(&mut self.grads[n]);
            let ctx = Ctx { graph: &self.graph, vals: &self.vals, ids: &self.ids, params };
            let saved =
                backward::Saved { aux: &self.aux[n], idx: &self.idx[n], trained: self.forward_trained };
            backward::prepare(&ctx, node, n, &g, &saved, &mut self.scratch);
            for (pos, &input) in node.inputs.iter().enumerate() {
                if !self.requires_grad[input.0] {
                    continue;
                }
                let mut gin = std::mem::take(&mut self.grads[input.0]);
                let ctx = Ctx { graph: &self.graph, vals: &self.vals, ids: &self.ids, params };
                backward::accumulate(
                    &ctx,
                    node,
                    n,
                    pos,
                    &g,
                    &saved,
                    &self.scratch,
                    &mut self.scratch2,
                    &mut gin,
                );
                self.grads[input.0] = gin;
            }
            self.grads[n] = g;
            self.report_ready_params(n, ready)?;
        }
        // Parameters not reported in the walk (no reader in `range`), in their order.
        for index in 0..self.graph.params().len() {
            let node = self.graph.params()[index].node.0;
            if !self.zeroed[node] {
                self.zeroed[node] = true;
                ready(index, &self.grads[node])?;
            }
        }
        self.zeroed.fill(false);
        Ok(())
    }

    /// Reports the parameters whose first reader is node `n` (just run backward): their
    /// gradients are final.
    fn report_ready_params(&mut self, n: usize, ready: &mut ParamReady<'_>) -> Result<(), NnError> {
        for &input in &self.graph.nodes()[n].inputs {
            if let Op::Param { index } = self.graph.nodes()[input.0].op {
                // A node may read the same parameter twice: report it once.
                if self.first_reader[index] == n && !self.zeroed[input.0] {
                    self.zeroed[input.0] = true;
                    ready(index, &self.grads[input.0])?;
                }
            }
        }
        Ok(())
    }

    fn missing(&self, node: NodeId) -> NnError {
        rules::missing(&self.graph, node)
    }

    /// Runs node `n`'s forward kernel into its (taken-out) buffers.
    fn forward_node(&mut self, params: &Params, n: usize) -> Result<(), NnError> {
        let node = &self.graph.nodes()[n];
        let mut out = std::mem::take(&mut self.vals[n]);
        let mut out_ids = std::mem::take(&mut self.ids[n]);
        let mut aux = std::mem::take(&mut self.aux[n]);
        let mut idx = std::mem::take(&mut self.idx[n]);
        let ctx = Ctx { graph: &self.graph, vals: &self.vals, ids: &self.ids, params };
        let result = forward::run(
            &ctx,
            node,
            forward::Out { val: &mut out, ids: &mut out_ids, aux: &mut aux, idx: &mut idx },
            &mut self.rng,
            self.training,
        );
        self.vals[n] = out;
        self.ids[n] = out_ids;
        self.aux[n] = aux;
        self.idx[n] = idx;
        result
    }
}

/// Buffers one node needs besides its value and gradient.
struct Sizes {
    aux: usize,
    idx: usize,
    scratch: usize,
    scratch2: usize,
}

fn buffer_sizes(graph: &Graph, node: &crate::nn::Node) -> Sizes {
    let mut s = Sizes { aux: 0, idx: 0, scratch: 0, scratch2: 0 };
    let shape_of = |i: usize| &graph.nodes()[node.inputs[i].0].shape;
    let len = node.len();
    match node.op {
        Op::Linear { .. } => s.scratch = len,
        Op::Conv2d { .. } => {
            let (x, w) = (shape_of(0), shape_of(1));
            let ckk = w[1] * w[2] * w[3];
            let nohw = x[0] * node.shape[2] * node.shape[3];
            // Columns [CKK, N·OHW], then the product [O, N·OHW].
            s.aux = ckk * nohw + len;
            s.scratch = len;
            s.scratch2 = ckk * nohw;
        }
        Op::MaxPool2d { .. } => s.idx = len,
        Op::LayerNorm { .. } => {
            let d = *node.shape.last().unwrap_or(&1);
            s.aux = 2 * (len / d.max(1));
            s.scratch2 = d;
        }
        Op::Dropout { .. } => s.aux = len,
        Op::SoftmaxCrossEntropy => s.aux = numel(shape_of(0)),
        Op::Attention { heads, .. } => {
            let (b, t) = (node.shape[0], node.shape[1]);
            s.aux = b * heads * t * t;
            s.scratch = b * heads * t * t;
        }
        Op::GruCell => {
            let (b, h) = (node.shape[0], node.shape[1]);
            s.aux = b * 6 * h;
            s.scratch = 2 * b * 3 * h;
        }
        _ => {}
    }
    s
}

impl Executor for CpuExecutor {
    fn graph(&self) -> &Graph {
        &self.graph
    }

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn set_seed(&mut self, seed: u64) {
        self.rng = Rng::seed(seed);
    }

    fn set_value(&mut self, node: NodeId, data: &[f32]) -> Result<(), NnError> {
        rules::check_len(&self.graph, node, data.len())?;
        self.value_mut(node)?.copy_from_slice(data);
        Ok(())
    }

    fn set_ids(&mut self, node: NodeId, data: &[i32]) -> Result<(), NnError> {
        rules::check_len(&self.graph, node, data.len())?;
        self.ids_mut(node)?.copy_from_slice(data);
        Ok(())
    }

    fn forward(&mut self, params: &Params, range: Range<usize>) -> Result<(), NnError> {
        self.check_range(&range)?;
        params.check_some(&self.graph, |p| self.reads[p])?;
        self.forward_trained = self.training;
        for n in range {
            if rules::forward_computes(&self.graph, &self.filled, n)? {
                self.forward_node(params, n)?;
                self.filled[n] = true;
            }
        }
        Ok(())
    }

    fn backward(
        &mut self,
        params: &Params,
        range: Range<usize>,
        seeds: &[(NodeId, &[f32])],
    ) -> Result<(), NnError> {
        self.backward_observed(params, range, seeds, &mut |_, _| Ok(()))
    }

    fn value(&self, node: NodeId) -> Result<&[f32], NnError> {
        rules::check_readable(&self.graph, &self.filled, node)?;
        Ok(&self.vals[node.0])
    }

    fn grad(&self, node: NodeId) -> Result<&[f32], NnError> {
        self.check_held(node)?;
        if !self.requires_grad[node.0] {
            return Err(self.missing(node));
        }
        Ok(&self.grads[node.0])
    }

    fn param_grad(&self, index: usize) -> &[f32] {
        let node = self.graph.params()[index].node;
        &self.grads[node.0]
    }
}
