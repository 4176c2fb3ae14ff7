//! Layers: named groups of parameters plus the ops that use them, added to a [`Graph`].
use crate::nn::{Activation, DType, Graph, Init, NnError, NodeId};

/// A fully connected layer `act(x · W + b)`.
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    /// `[in, out]`.
    pub weight: NodeId,
    /// `[out]`.
    pub bias: NodeId,
}

impl Linear {
    /// Declares `name.weight` (Kaiming uniform) and `name.bias` (zeros).
    ///
    /// # Errors
    /// [`NnError::Argument`] if the names are taken.
    pub fn new(g: &mut Graph, name: &str, inputs: usize, outputs: usize) -> Result<Self, NnError> {
        let weight = g.param(&format!("{name}.weight"), &[inputs, outputs], Init::kaiming_uniform(inputs))?;
        let bias = g.param(&format!("{name}.bias"), &[outputs], Init::Zeros)?;
        Ok(Linear { weight, bias })
    }

    /// Applies the layer to the last axis of `x`, with a fused activation.
    ///
    /// # Errors
    /// [`NnError::Shape`] if `x`'s last extent is not the layer's input width.
    pub fn forward(&self, g: &mut Graph, x: NodeId, act: Activation) -> Result<NodeId, NnError> {
        g.linear(x, self.weight, self.bias, act)
    }
}

/// A 2-D convolution layer (square kernel).
#[derive(Debug, Clone, Copy)]
pub struct Conv2d {
    /// `[out, in, k, k]`.
    pub weight: NodeId,
    /// `[out]`.
    pub bias: NodeId,
    /// Window step.
    pub stride: usize,
    /// Zero padding per side.
    pub pad: usize,
}

impl Conv2d {
    /// Declares `name.weight` (Kaiming uniform) and `name.bias` (zeros).
    ///
    /// # Errors
    /// [`NnError::Argument`] if the names are taken.
    pub fn new(
        g: &mut Graph,
        name: &str,
        inputs: usize,
        outputs: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self, NnError> {
        let fan_in = inputs * kernel * kernel;
        let weight = g.param(
            &format!("{name}.weight"),
            &[outputs, inputs, kernel, kernel],
            Init::kaiming_uniform(fan_in),
        )?;
        let bias = g.param(&format!("{name}.bias"), &[outputs], Init::Zeros)?;
        Ok(Conv2d { weight, bias, stride, pad })
    }

    /// Applies the convolution to `x [N, C, H, W]` with a fused activation.
    ///
    /// # Errors
    /// As [`Graph::conv2d`].
    pub fn forward(&self, g: &mut Graph, x: NodeId, act: Activation) -> Result<NodeId, NnError> {
        g.conv2d(x, self.weight, self.bias, self.stride, self.pad, act)
    }
}

/// Max pooling (no parameters).
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2d {
    /// Window side.
    pub size: usize,
    /// Window step.
    pub stride: usize,
}

impl MaxPool2d {
    /// Applies the pooling.
    ///
    /// # Errors
    /// As [`Graph::max_pool2d`].
    pub fn forward(&self, g: &mut Graph, x: NodeId) -> Result<NodeId, NnError> {
        g.max_pool2d(x, self.size, self.stride)
    }
}

/// Layer normalization with learned scale and shift.
#[derive(Debug, Clone, Copy)]
pub struct LayerNorm {
    /// `[d]`, initialized to ones.
    pub gamma: NodeId,
    /// `[d]`, initialized to zeros.
    pub beta: NodeId,
    /// Added to the variance.
    pub eps: f32,
}

impl LayerNorm {
    /// Declares `name.gamma` and `name.beta` for width `d`.
    ///
    /// # Errors
    /// [`NnError::Argument`] if the names are taken.
    pub fn new(g: &mut Graph, name: &str, d: usize) -> Result<Self, NnError> {
        let gamma = g.param(&format!("{name}.gamma"), &[d], Init::Ones)?;
        let beta = g.param(&format!("{name}.beta"), &[d], Init::Zeros)?;
        Ok(LayerNorm { gamma, beta, eps: 1e-5 })
    }

    /// Normalizes the last axis of `x`.
    ///
    /// # Errors
    /// As [`Graph::layer_norm`].
    pub fn forward(&self, g: &mut Graph, x: NodeId) -> Result<NodeId, NnError> {
        g.layer_norm(x, self.gamma, self.beta, self.eps)
    }
}

/// Dropout (no parameters).
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    /// Drop probability.
    pub p: f32,
}

impl Dropout {
    /// Applies dropout (active in training mode only).
    ///
    /// # Errors
    /// As [`Graph::dropout`].
    pub fn forward(&self, g: &mut Graph, x: NodeId) -> Result<NodeId, NnError> {
        g.dropout(x, self.p)
    }
}

/// A learned lookup table from ids to vectors.
#[derive(Debug, Clone, Copy)]
pub struct Embedding {
    /// `[vocab, dim]`, normal with std `1/sqrt(dim)`.
    pub table: NodeId,
}

impl Embedding {
    /// Declares `name.table`.
    ///
    /// # Errors
    /// [`NnError::Argument`] if the name is taken.
    pub fn new(g: &mut Graph, name: &str, vocab: usize, dim: usize) -> Result<Self, NnError> {
        let std = 1.0 / (dim.max(1) as f32).sqrt();
        Ok(Embedding { table: g.param(&format!("{name}.table"), &[vocab, dim], Init::Normal { std })? })
    }

    /// Looks up `ids`.
    ///
    /// # Errors
    /// As [`Graph::embedding`].
    pub fn forward(&self, g: &mut Graph, ids: NodeId) -> Result<NodeId, NnError> {
        g.embedding(ids, self.table)
    }
}

/// A GRU layer: an input projection for all steps at once, then one fused cell per step.
#[derive(Debug, Clone, Copy)]
pub struct Gru {
    /// Input projection `x · Wx + bx → [.., 3H]` (gates r, z, n).
    pub input: Linear,
    /// `[H, 3H]`.
    pub wh: NodeId,
    /// `[3H]`.
    pub bh: NodeId,
    /// Hidden width.
    pub hidden: usize,
}

impl Gru {
    /// Declares `name.input.*`, `name.wh`, `name.bh`.
    ///
    /// # Errors
    /// [`NnError::Argument`] if the names are taken.
    pub fn new(g: &mut Graph, name: &str, inputs: usize, hidden: usize) -> Result<Self, NnError> {
        let input = Linear::new(g, &format!("{name}.input"), inputs, 3 * hidden)?;
        let bound = 1.0 / (hidden.max(1) as f32).sqrt();
        let wh = g.param(&format!("{name}.wh"), &[hidden, 3 * hidden], Init::Uniform { bound })?;
        let bh = g.param(&format!("{name}.bh"), &[3 * hidden], Init::Zeros)?;
        Ok(Gru { input, wh, bh, hidden })
    }

    /// Runs the GRU over `x [B, T, E]` from a zero state; returns the hidden states
    /// stacked as `[B, T, H]`.
    ///
    /// # Errors
    /// [`NnError::Shape`] unless `x` is `[B, T, E]` with `E` the layer's input width.
    pub fn forward(&self, g: &mut Graph, x: NodeId) -> Result<NodeId, NnError> {
        let shape = g.shape(x)?.to_vec();
        if shape.len() != 3 {
            return Err(NnError::Shape { op: "gru", input: "x", got: shape, expected: "[B, T, E]".into() });
        }
        let (b, t) = (shape[0], shape[1]);
        let gx_all = self.input.forward(g, x, Activation::Identity)?;
        let mut h = g.constant(&[b, self.hidden], 0.0);
        let mut states = Vec::with_capacity(t);
        for step in 0..t {
            let gx = g.select_step(gx_all, step)?;
            h = g.gru_cell(gx, h, self.wh, self.bh)?;
            states.push(h);
        }
        g.stack_steps(&states)
    }
}

/// Multi-head self-attention: q, k, v projections, scaled dot-product attention, output
/// projection.
#[derive(Debug, Clone, Copy)]
pub struct MultiHeadSelfAttention {
    /// Query projection.
    pub q: Linear,
    /// Key projection.
    pub k: Linear,
    /// Value projection.
    pub v: Linear,
    /// Output projection.
    pub out: Linear,
    /// Number of heads.
    pub heads: usize,
    /// Whether attention is causal (language models).
    pub causal: bool,
}

impl MultiHeadSelfAttention {
    /// Declares `name.{q,k,v,out}.*` for model width `d`.
    ///
    /// # Errors
    /// [`NnError::Argument`] if the names are taken or `heads` does not divide `d`.
    pub fn new(g: &mut Graph, name: &str, d: usize, heads: usize, causal: bool) -> Result<Self, NnError> {
        if heads == 0 || d % heads != 0 {
            return Err(NnError::Argument {
                op: "attention",
                what: format!("{heads} heads do not divide width {d}"),
            });
        }
        let mut lin = |part: &str| -> Result<Linear, NnError> {
            let l = Linear::new(g, &format!("{name}.{part}"), d, d)?;
            Ok(l)
        };
        let (q, k, v, out) = (lin("q")?, lin("k")?, lin("v")?, lin("out")?);
        Ok(MultiHeadSelfAttention { q, k, v, out, heads, causal })
    }

    /// Applies attention to `x [B, T, D]`.
    ///
    /// # Errors
    /// As [`Graph::attention`].
    pub fn forward(&self, g: &mut Graph, x: NodeId) -> Result<NodeId, NnError> {
        let q = self.q.forward(g, x, Activation::Identity)?;
        let k = self.k.forward(g, x, Activation::Identity)?;
        let v = self.v.forward(g, x, Activation::Identity)?;
        let a = g.attention(q, k, v, self.heads, self.causal)?;
        self.out.forward(g, a, Activation::Identity)
    }
}

/// Declares an i32 input (labels or token ids).
pub(crate) fn ids_input(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
    g.input(name, shape, DType::I32)
}
