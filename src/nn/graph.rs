//! `Graph`: a model as data — an ordered list of typed, shaped nodes, each an [`Op`] over
//! earlier node ids, plus the model's parameter list.
//!
//! # Invariants
//! 1. Nodes are in topological order: a node's inputs always have smaller ids, so running
//!    the nodes in id order is a valid schedule and any id range is a pipeline stage.
//! 2. Every node's shape and dtype are checked when it is added; a graph that was built is
//!    well-typed, and executors trust it.
//! 3. Parameters are numbered in the order they were created; that order is the order of
//!    [`Params`](crate::nn::Params) values, of gradients and of all-reduce buckets.
use serde::{Deserialize, Serialize};

use crate::nn::tensor::numel;
use crate::nn::{DType, NnError};

mod build;

/// Identifies a node of a [`Graph`]; ids grow in creation (= topological) order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub(crate) usize);

impl NodeId {
    /// The node's position in the graph.
    pub fn index(self) -> usize {
        self.0
    }
}

/// An elementwise activation whose derivative can be computed from its output, so that it
/// can be fused into the op before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Activation {
    /// `x`.
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `tanh(x)`.
    Tanh,
}

/// How a parameter is initialized.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Uniform in `[-bound, bound]`.
    Uniform {
        /// Half-width of the interval.
        bound: f32,
    },
    /// Normal with mean 0.
    Normal {
        /// Standard deviation.
        std: f32,
    },
}

impl Init {
    /// He/Kaiming uniform for a layer with `fan_in` inputs feeding a ReLU.
    pub fn kaiming_uniform(fan_in: usize) -> Init {
        Init::Uniform { bound: (6.0 / fan_in.max(1) as f32).sqrt() }
    }

    /// Glorot/Xavier uniform for a layer with `fan_in` inputs and `fan_out` outputs.
    pub fn xavier_uniform(fan_in: usize, fan_out: usize) -> Init {
        Init::Uniform { bound: (6.0 / (fan_in + fan_out).max(1) as f32).sqrt() }
    }
}

/// One operation of the graph. Inputs are node ids, listed in the order given here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Op {
    /// A value supplied from outside (data, labels, or a pipeline stage's input).
    Input,
    /// Parameter number `index` of the graph's parameter list.
    Param {
        /// Position in the parameter list.
        index: usize,
    },
    /// Every element equals `value`.
    Constant {
        /// The fill value.
        value: f32,
    },
    /// `a [m, k] · b [k, n] → [m, n]`.
    MatMul,
    /// `act(x [.., in] · w [in, out] + b [out]) → [.., out]`.
    Linear {
        /// Fused activation.
        act: Activation,
    },
    /// `act(conv(x [N, C, H, W], w [O, C, KH, KW]) + b [O]) → [N, O, OH, OW]`.
    Conv2d {
        /// Step between windows, both axes.
        stride: usize,
        /// Zero padding on each side, both axes.
        pad: usize,
        /// Fused activation.
        act: Activation,
    },
    /// Max over `size × size` windows: `[N, C, H, W] → [N, C, OH, OW]`.
    MaxPool2d {
        /// Window side.
        size: usize,
        /// Step between windows.
        stride: usize,
    },
    /// `a + b`, where `b`'s shape is a suffix of `a`'s (broadcast over leading axes).
    Add,
    /// `a - b`, same shapes.
    Sub,
    /// `a * b`, same shapes.
    Mul,
    /// An elementwise activation.
    Act(Activation),
    /// GELU (tanh approximation), elementwise.
    Gelu,
    /// The same elements under a new shape (the node's shape).
    Reshape,
    /// Normalizes the last axis: `(x - mean) / sqrt(var + eps) * gamma + beta`.
    LayerNorm {
        /// Added to the variance.
        eps: f32,
    },
    /// Zeroes elements with probability `p` in training (scaling the rest by `1/(1-p)`);
    /// the identity in evaluation.
    Dropout {
        /// Drop probability in `[0, 1)`.
        p: f32,
    },
    /// Rows of `table [V, D]` picked by `ids [..]` (i32): `→ [.., D]`.
    Embedding,
    /// Softmax over the last axis.
    Softmax,
    /// Mean over rows of `-log softmax(logits [N, C])[label]`, labels `[N]` (i32): `→ []`.
    SoftmaxCrossEntropy,
    /// Mean of `(a - b)²`: `→ []`.
    Mse,
    /// Multi-head scaled dot-product attention of `q, k, v [B, T, D]` → `[B, T, D]`.
    Attention {
        /// Number of heads; divides `D`.
        heads: usize,
        /// Whether position `t` may attend only to positions `≤ t`.
        causal: bool,
    },
    /// Time step `step` of `x [B, T, D]`: `→ [B, D]`.
    SelectStep {
        /// The step taken.
        step: usize,
    },
    /// `T` inputs `[B, D]` stacked as time steps: `→ [B, T, D]`.
    StackSteps,
    /// One GRU step: `gx [B, 3H]` (input projection, gates r, z, n), `h [B, H]`,
    /// `wh [H, 3H]`, `bh [3H]` → the next hidden state `[B, H]`.
    GruCell,
    /// A sparse matrix in coordinate form times a dense one: row ids `[E]` and column ids
    /// `[E]` (i32), values `[E]`, and `x [C, N]` → `y [R, N]` (`R` is the node's first
    /// axis) with `y[row[e]] += values[e] · x[col[e]]` for every entry `e`. Gradients flow to
    /// `x` and to the values.
    SparseMatMul,
}

impl Op {
    /// A short name for messages and profiles.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Param { .. } => "param",
            Op::Constant { .. } => "constant",
            Op::MatMul => "matmul",
            Op::Linear { .. } => "linear",
            Op::Conv2d { .. } => "conv2d",
            Op::MaxPool2d { .. } => "max_pool2d",
            Op::Add => "add",
            Op::Sub => "sub",
            Op::Mul => "mul",
            Op::Act(_) => "activation",
            Op::Gelu => "gelu",
            Op::Reshape => "reshape",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Dropout { .. } => "dropout",
            Op::Embedding => "embedding",
            Op::Softmax => "softmax",
            Op::SoftmaxCrossEntropy => "softmax_cross_entropy",
            Op::Mse => "mse",
            Op::Attention { .. } => "attention",
            Op::SelectStep { .. } => "select_step",
            Op::StackSteps => "stack_steps",
            Op::GruCell => "gru_cell",
            Op::SparseMatMul => "sparse_matmul",
        }
    }
}

/// One node: an op, its inputs, and the shape and dtype of its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// What the node computes.
    pub op: Op,
    /// The nodes it reads, all with smaller ids.
    pub inputs: Vec<NodeId>,
    /// The shape of its value.
    pub shape: Vec<usize>,
    /// The element type of its value.
    pub dtype: DType,
    /// A name for messages (parameters and inputs carry the name given; others the op's).
    pub name: String,
}

impl Node {
    /// The number of elements of the node's value.
    pub fn len(&self) -> usize {
        numel(&self.shape)
    }

    /// Whether the node's value has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A declared parameter: its name, shape, initializer and the node that reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// A unique, descriptive name (e.g. `fc1.weight`).
    pub name: String,
    /// The parameter's shape.
    pub shape: Vec<usize>,
    /// How [`Params::init`](crate::nn::Params::init) fills it.
    pub init: Init,
    /// Its `Op::Param` node.
    pub node: NodeId,
}

/// A model as data: nodes in topological order and the parameter list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    nodes: Vec<Node>,
    params: Vec<ParamSpec>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Graph::default()
    }

    /// All nodes, in topological order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// One node.
    ///
    /// # Errors
    /// [`NnError::UnknownNode`] if `id` is not from this graph.
    pub fn node(&self, id: NodeId) -> Result<&Node, NnError> {
        self.nodes.get(id.0).ok_or(NnError::UnknownNode { node: id.0, len: self.nodes.len() })
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The parameters, in their fixed order.
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// The shape of a node's value.
    ///
    /// # Errors
    /// [`NnError::UnknownNode`] if `id` is not from this graph.
    pub fn shape(&self, id: NodeId) -> Result<&[usize], NnError> {
        Ok(&self.node(id)?.shape)
    }

    /// Nodes outside `range` whose values nodes inside `range` read (excluding parameters):
    /// the activations a pipeline stage running `range` must be given.
    pub fn stage_inputs(&self, range: std::ops::Range<usize>) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = Vec::new();
        for node in &self.nodes[range.clone()] {
            for &i in &node.inputs {
                let outside = !range.contains(&i.0);
                let is_param = matches!(self.nodes[i.0].op, Op::Param { .. });
                if outside && !is_param && !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        out.sort();
        out
    }

    /// Indices of the parameters that nodes inside `range` read: the parameters a pipeline
    /// stage running `range` uses (and computes gradients for), in increasing order.
    pub fn stage_params(&self, range: std::ops::Range<usize>) -> Vec<usize> {
        let end = range.end.min(self.nodes.len());
        let mut out: Vec<usize> = Vec::new();
        for node in &self.nodes[range.start.min(end)..end] {
            for &i in &node.inputs {
                if let Op::Param { index } = self.nodes[i.0].op {
                    out.push(index);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Nodes inside `range` whose values nodes after `range` read: the activations a
    /// pipeline stage running `range` hands on (and receives gradients for in backward).
    pub fn stage_outputs(&self, range: std::ops::Range<usize>) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = Vec::new();
        for node in &self.nodes[range.end.min(self.nodes.len())..] {
            for &i in &node.inputs {
                if range.contains(&i.0) && !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        out.sort();
        out
    }

    pub(crate) fn push(&mut self, op: Op, inputs: Vec<NodeId>, shape: Vec<usize>, dtype: DType) -> NodeId {
        let name = op.name().to_string();
        self.push_named(op, inputs, shape, dtype, name)
    }

    pub(crate) fn push_named(
        &mut self,
        op: Op,
        inputs: Vec<NodeId>,
        shape: Vec<usize>,
        dtype: DType,
        name: String,
    ) -> NodeId {
        let id = NodeId(self.nodes.len());
        self.nodes.push(Node { op, inputs, shape, dtype, name });
        id
    }
}
