//! Graph construction: one method per op, each checking its inputs' shapes and dtypes and
//! returning a typed [`NnError`] before anything runs.
use super::{Activation, Graph, Init, Node, NodeId, Op, ParamSpec};
use crate::nn::tensor::numel;
use crate::nn::{DType, NnError};

fn shape_err(op: &'static str, input: &'static str, node: &Node, expected: impl Into<String>) -> NnError {
    NnError::Shape { op, input, got: node.shape.clone(), expected: expected.into() }
}

fn arg_err(op: &'static str, what: impl Into<String>) -> NnError {
    NnError::Argument { op, what: what.into() }
}

impl Graph {
    fn checked(
        &self,
        op: &'static str,
        input: &'static str,
        id: NodeId,
        dtype: DType,
    ) -> Result<&Node, NnError> {
        let node = self.node(id)?;
        if node.dtype != dtype {
            return Err(NnError::DType { op, input, got: node.dtype, expected: dtype });
        }
        Ok(node)
    }

    /// Declares an external input (data, labels, token ids) of the given shape and dtype.
    pub fn input(&mut self, name: &str, shape: &[usize], dtype: DType) -> NodeId {
        self.push_named(Op::Input, vec![], shape.to_vec(), dtype, name.to_string())
    }

    /// Declares a parameter; it gets the next position in the parameter list.
    ///
    /// # Errors
    /// [`NnError::Argument`] if another parameter already has this name.
    pub fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<NodeId, NnError> {
        if self.params.iter().any(|p| p.name == name) {
            return Err(arg_err("param", format!("a parameter named `{name}` already exists")));
        }
        let index = self.params.len();
        let node = self.push_named(Op::Param { index }, vec![], shape.to_vec(), DType::F32, name.to_string());
        self.params.push(ParamSpec { name: name.to_string(), shape: shape.to_vec(), init, node });
        Ok(node)
    }

    /// A node whose every element is `value`.
    pub fn constant(&mut self, shape: &[usize], value: f32) -> NodeId {
        self.push(Op::Constant { value }, vec![], shape.to_vec(), DType::F32)
    }

    /// `a [m, k] · b [k, n]`.
    ///
    /// # Errors
    /// [`NnError::Shape`] unless `a` and `b` are matrices with matching inner extents.
    pub fn matmul(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, NnError> {
        const OP: &str = "matmul";
        let an = self.checked(OP, "a", a, DType::F32)?;
        let bn = self.checked(OP, "b", b, DType::F32)?;
        if an.shape.len() != 2 {
            return Err(shape_err(OP, "a", an, "a matrix [m, k]"));
        }
        if bn.shape.len() != 2 || bn.shape[0] != an.shape[1] {
            return Err(shape_err(OP, "b", bn, format!("[k, n] with k = {}", an.shape[1])));
        }
        let shape = vec![an.shape[0], bn.shape[1]];
        Ok(self.push(Op::MatMul, vec![a, b], shape, DType::F32))
    }

    /// `act(x · w + b)` over the last axis of `x`.
    ///
    /// # Errors
    /// [`NnError::Shape`] unless `w` is `[in, out]` with `in` = `x`'s last extent and `b`
    /// is `[out]`.
    pub fn linear(&mut self, x: NodeId, w: NodeId, b: NodeId, act: Activation) -> Result<NodeId, NnError> {
        const OP: &str = "linear";
        let xn = self.checked(OP, "x", x, DType::F32)?;
        let wn = self.checked(OP, "weight", w, DType::F32)?;
        let bn = self.checked(OP, "bias", b, DType::F32)?;
        let Some(&inner) = xn.shape.last() else {
            return Err(shape_err(OP, "x", xn, "at least one axis"));
        };
        if wn.shape.len() != 2 || wn.shape[0] != inner {
            return Err(shape_err(OP, "weight", wn, format!("[in, out] with in = {inner}")));
        }
        let out = wn.shape[1];
        if bn.shape != [out] {
            return Err(shape_err(OP, "bias", bn, format!("[{out}]")));
        }
        let mut shape = xn.shape.clone();
        *shape.last_mut().expect("checked non-empty") = out;
        Ok(self.push(Op::Linear { act }, vec![x, w, b], shape, DType::F32))
    }

    /// `act(conv2d(x, w) + b)` with the given stride and zero padding.
    ///
    /// # Errors
    /// [`NnError::Shape`] unless `x` is `[N, C, H, W]`, `w` is `[O, C, KH, KW]`, `b` is
    /// `[O]` and the padded image holds at least one window; [`NnError::Argument`] for a
    /// zero stride.
    pub fn conv2d(
        &mut self,
        x: NodeId,
        w: NodeId,
        b: NodeId,
        stride: usize,
        pad: usize,
        act: Activation,
    ) -> Result<NodeId, NnError> {
        const OP: &str = "conv2d";
        if stride == 0 {
            return Err(arg_err(OP, "stride must be at least 1"));
        }
        let xn = self.checked(OP, "x", x, DType::F32)?;
        let wn = self.checked(OP, "weight", w, DType::F32)?;
        let bn = self.checked(OP, "bias", b, DType::F32)?;
        if xn.shape.len() != 4 {
            return Err(shape_err(OP, "x", xn, "[N, C, H, W]"));
        }
        let (n, c, h, wd) = (xn.shape[0], xn.shape[1], xn.shape[2], xn.shape[3]);
        if wn.shape.len() != 4 || wn.shape[1] != c {
            return Err(shape_err(OP, "weight", wn, format!("[O, C, KH, KW] with C = {c}")));
        }
        let (o, kh, kw) = (wn.shape[0], wn.shape[2], wn.shape[3]);
        if bn.shape != [o] {
            return Err(shape_err(OP, "bias", bn, format!("[{o}]")));
        }
        if kh == 0 || kw == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
            let padded = format!("{}x{}", h + 2 * pad, wd + 2 * pad);
            return Err(shape_err(
                OP,
                "weight",
                wn,
                format!("a non-empty kernel no larger than the padded image {padded}"),
            ));
        }
        let oh = (h + 2 * pad - kh) / stride + 1;
        let ow = (wd + 2 * pad - kw) / stride + 1;
        Ok(self.push(Op::Conv2d { stride, pad, act }, vec![x, w, b], vec![n, o, oh, ow], DType::F32))
    }

    /// Max pooling over `size × size` windows with the given stride.
    ///
    /// # Errors
    /// [`NnError::Shape`] unless `x` is `[N, C, H, W]` with `H, W ≥ size`;
    /// [`NnError::Argument`] for a zero size or stride.
    pub fn max_pool2d(&mut self, x: NodeId, size: usize, stride: usize) -> Result<NodeId, NnError> {
        const OP: &str = "max_pool2d";
        if size == 0 || stride == 0 {
            return Err(arg_err(OP, "size and stride must be at least 1"));
        }
        let xn = self.checked(OP, "x", x, DType::F32)?;
        if xn.shape.len() != 4 || xn.shape[2] < size || xn.shape[3] < size {
            return Err(shape_err(OP, "x", xn, format!("[N, C, H, W] with H, W >= {size}")));
        }
        let s = &xn.shape;
        let shape = vec![s[0], s[1], (s[2] - size) / stride + 1, (s[3] - size) / stride + 1];
        Ok(self.push(Op::MaxPool2d { size, stride }, vec![x], shape, DType::F32))
    }

    /// `a + b`, broadcasting `b` over `a`'s leading axes when `b`'s shape is a suffix of
    /// `a`'s.
    ///
    /// # Errors
    /// [`NnError::Shape`] if `b`'s shape is not a suffix of `a`'s.
    pub fn add(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, NnError> {
        const OP: &str = "add";
        let an = self.checked(OP, "a", a, DType::F32)?;
        let bn = self.checked(OP, "b", b, DType::F32)?;
        if !an.shape.ends_with(&bn.shape) {
            return Err(shape_err(OP, "b", bn, format!("a suffix of {:?}", an.shape)));
        }
        let shape = an.shape.clone();
        Ok(self.push(Op::Add, vec![a, b], shape, DType::F32))
    }

    fn same_shape(&mut self, op: Op, a: NodeId, b: NodeId) -> Result<NodeId, NnError> {
        let name = op.name();
        let an = self.checked(name, "a", a, DType::F32)?;
        let bn = self.checked(name, "b", b, DType::F32)?;
        if an.shape != bn.shape {
            return Err(shape_err(name, "b", bn, format!("{:?} (the shape of a)", an.shape)));
        }
        let shape = an.shape.clone();
        Ok(self.push(op, vec![a, b], shape, DType::F32))
    }

    /// `a - b` (same shapes).
    ///
    /// # Errors
    /// [`NnError::Shape`] if the shapes differ.
    pub fn sub(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, NnError> {
        self.same_shape(Op::Sub, a, b)
    }

    /// `a * b` elementwise (same shapes).
    ///
    /// # Errors
    /// [`NnError::Shape`] if the shapes differ.
    pub fn mul(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, NnError> {
        self.same_shape(Op::Mul, a, b)
    }

    fn unary(&mut self, op: Op, x: NodeId) -> Result<NodeId, NnError> {
        let xn = self.checked(op.name(), "x", x, DType::F32)?;
        let shape = xn.shape.clone();
        Ok(self.push(op, vec![x], shape, DType::F32))
    }

    /// An elementwise activation.
    ///
    /// # Errors
    /// [`NnError::DType`] if `x` is not f32.
    pub fn act(&mut self, x: NodeId, act: Activation) -> Result<NodeId, NnError> {
        self.unary(Op::Act(act), x)
    }

    /// `max(x, 0)`.
    ///
    /// # Errors
    /// [`NnError::DType`] if `x` is not f32.
    pub fn relu(&mut self, x: NodeId) -> Result<NodeId, NnError> {
        self.act(x, Activation::Relu)
    }

    /// GELU (tanh approximation).
    ///
    /// # Errors
    /// [`NnError::DType`] if `x` is not f32.
    pub fn gelu(&mut self, x: NodeId) -> Result<NodeId, NnError> {
        self.unary(Op::Gelu, x)
    }

    /// Softmax over the last axis.
    ///
    /// # Errors
    /// [`NnError::Shape`] if `x` is a scalar.
    pub fn softmax(&mut self, x: NodeId) -> Result<NodeId, NnError> {
        let xn = self.checked("softmax", "x", x, DType::F32)?;
        if xn.shape.is_empty() {
            return Err(shape_err("softmax", "x", xn, "at least one axis"));
        }
        self.unary(Op::Softmax, x)
    }

    /// The same elements under `shape`.
    ///
    /// # Errors
    /// [`NnError::Shape`] if the element counts differ.
    pub fn reshape(&mut self, x: NodeId, shape: &[usize]) -> Result<NodeId, NnError> {
        let xn = self.node(x)?;
        if xn.len() != numel(shape) {
            return Err(shape_err("reshape", "x", xn, format!("{} elements to fit {shape:?}", numel(shape))));
        }
        let dtype = xn.dtype;
        Ok(self.push(Op::Reshape, vec![x], shape.to_vec(), dtype))
    }

    /// Layer normalization over the last axis with scale `gamma` and shift `beta`.
    ///
    /// # Errors
    /// [`NnError::Shape`] unless `gamma` and `beta` are `[d]`, `d` = `x`'s last extent.
    pub fn layer_norm(
        &mut self,
        x: NodeId,
        gamma: NodeId,
        beta: NodeId,
        eps: f32,
    ) -> Result<NodeId, NnError> {
        const OP: &str = "layer_norm";
        let xn = self.checked(OP, "x", x, DType::F32)?;
        let Some(&d) = xn.shape.last() else {
            return Err(shape_err(OP, "x", xn, "at least one axis"));
        };
        let shape = xn.shape.clone();
        for (role, id) in [("gamma", gamma), ("beta", beta)] {
            let n = self.checked(OP, role, id, DType::F32)?;
            if n.shape != [d] {
                return Err(shape_err(OP, role, n, format!("[{d}]")));
            }
        }
        if eps.is_nan() || eps <= 0.0 {
            return Err(arg_err(OP, format!("eps must be positive, got {eps}")));
        }
        Ok(self.push(Op::LayerNorm { eps }, vec![x, gamma, beta], shape, DType::F32))
    }

    /// Dropout with drop probability `p` (active only when the executor trains).
    ///
    /// # Errors
    /// [`NnError::Argument`] unless `0 <= p < 1`.
    pub fn dropout(&mut self, x: NodeId, p: f32) -> Result<NodeId, NnError> {
        if !(0.0..1.0).contains(&p) {
            return Err(arg_err("dropout", format!("p must be in [0, 1), got {p}")));
        }
        self.unary(Op::Dropout { p }, x)
    }

    /// Rows of `table [V, D]` picked by the i32 `ids`.
    ///
    /// # Errors
    /// [`NnError::DType`] unless `ids` is i32; [`NnError::Shape`] unless `table` is a matrix.
    pub fn embedding(&mut self, ids: NodeId, table: NodeId) -> Result<NodeId, NnError> {
        const OP: &str = "embedding";
        let idn = self.checked(OP, "ids", ids, DType::I32)?;
        let tn = self.checked(OP, "table", table, DType::F32)?;
        if tn.shape.len() != 2 {
            return Err(shape_err(OP, "table", tn, "[vocab, dim]"));
        }
        let mut shape = idn.shape.clone();
        shape.push(tn.shape[1]);
        Ok(self.push(Op::Embedding, vec![ids, table], shape, DType::F32))
    }

    /// `A · x` for a sparse `A [out_rows, C]` in coordinate form (i32 `rows [E]` and
    /// `cols [E]`, f32 `values [E]`; repeated coordinates add up) and a dense `x [C, N]`:
    /// `→ [out_rows, N]`. The graph convolution of a GCN is `A · (h · w)`.
    ///
    /// # Errors
    /// [`NnError::DType`] unless `rows` and `cols` are i32 and `values`, `x` f32;
    /// [`NnError::Shape`] unless the three are vectors of one length and `x` a matrix.
    pub fn sparse_matmul(
        &mut self,
        rows: NodeId,
        cols: NodeId,
        values: NodeId,
        x: NodeId,
        out_rows: usize,
    ) -> Result<NodeId, NnError> {
        const OP: &str = "sparse_matmul";
        let rn = self.checked(OP, "rows", rows, DType::I32)?;
        if rn.shape.len() != 1 {
            return Err(shape_err(OP, "rows", rn, "[E]"));
        }
        let entries = rn.shape[0];
        let cn = self.checked(OP, "cols", cols, DType::I32)?;
        if cn.shape != [entries] {
            return Err(shape_err(OP, "cols", cn, format!("[{entries}]")));
        }
        let vn = self.checked(OP, "values", values, DType::F32)?;
        if vn.shape != [entries] {
            return Err(shape_err(OP, "values", vn, format!("[{entries}]")));
        }
        let xn = self.checked(OP, "x", x, DType::F32)?;
        if xn.shape.len() != 2 {
            return Err(shape_err(OP, "x", xn, "[C, N]"));
        }
        let shape = vec![out_rows, xn.shape[1]];
        Ok(self.push(Op::SparseMatMul, vec![rows, cols, values, x], shape, DType::F32))
    }

    /// Mean softmax cross-entropy of `logits [N, C]` against i32 `labels [N]`.
    ///
    /// # Errors
    /// [`NnError::Shape`] / [`NnError::DType`] on mismatched inputs.
    pub fn softmax_cross_entropy(&mut self, logits: NodeId, labels: NodeId) -> Result<NodeId, NnError> {
        const OP: &str = "softmax_cross_entropy";
        let ln = self.checked(OP, "logits", logits, DType::F32)?;
        if ln.shape.len() != 2 || ln.shape[1] == 0 {
            return Err(shape_err(OP, "logits", ln, "[N, C] with C > 0"));
        }
        let rows = ln.shape[0];
        let yn = self.checked(OP, "labels", labels, DType::I32)?;
        if yn.shape != [rows] {
            return Err(shape_err(OP, "labels", yn, format!("[{rows}]")));
        }
        Ok(self.push(Op::SoftmaxCrossEntropy, vec![logits, labels], vec![], DType::F32))
    }

    /// Mean squared error between `pred` and `target` (same shapes).
    ///
    /// # Errors
    /// [`NnError::Shape`] if the shapes differ.
    pub fn mse(&mut self, pred: NodeId, target: NodeId) -> Result<NodeId, NnError> {
        let id = self.same_shape(Op::Mse, pred, target)?;
        self.nodes[id.0].shape = vec![];
        Ok(id)
    }

    /// Multi-head scaled dot-product attention.
    ///
    /// # Errors
    /// [`NnError::Shape`] unless `q`, `k`, `v` are all `[B, T, D]`; [`NnError::Argument`]
    /// unless `heads` divides `D`.
    pub fn attention(
        &mut self,
        q: NodeId,
        k: NodeId,
        v: NodeId,
        heads: usize,
        causal: bool,
    ) -> Result<NodeId, NnError> {
        const OP: &str = "attention";
        let qn = self.checked(OP, "q", q, DType::F32)?;
        if qn.shape.len() != 3 {
            return Err(shape_err(OP, "q", qn, "[B, T, D]"));
        }
        let shape = qn.shape.clone();
        for (role, id) in [("k", k), ("v", v)] {
            let n = self.checked(OP, role, id, DType::F32)?;
            if n.shape != shape {
                return Err(shape_err(OP, role, n, format!("{shape:?} (the shape of q)")));
            }
        }
        if heads == 0 || shape[2] % heads != 0 {
            return Err(arg_err(OP, format!("{heads} heads do not divide model width {}", shape[2])));
        }
        Ok(self.push(Op::Attention { heads, causal }, vec![q, k, v], shape, DType::F32))
    }

    /// Time step `step` of `x [B, T, D]`.
    ///
    /// # Errors
    /// [`NnError::Shape`] unless `x` is `[B, T, D]` with `step < T`.
    pub fn select_step(&mut self, x: NodeId, step: usize) -> Result<NodeId, NnError> {
        let xn = self.checked("select_step", "x", x, DType::F32)?;
        if xn.shape.len() != 3 || step >= xn.shape[1] {
            return Err(shape_err("select_step", "x", xn, format!("[B, T, D] with T > {step}")));
        }
        let shape = vec![xn.shape[0], xn.shape[2]];
        Ok(self.push(Op::SelectStep { step }, vec![x], shape, DType::F32))
    }

    /// Stacks `[B, D]` steps into `[B, T, D]`.
    ///
    /// # Errors
    /// [`NnError::Shape`] unless all steps are the same `[B, D]`; [`NnError::Argument`] for
    /// no steps.
    pub fn stack_steps(&mut self, steps: &[NodeId]) -> Result<NodeId, NnError> {
        let Some(&first) = steps.first() else {
            return Err(arg_err("stack_steps", "needs at least one step"));
        };
        let shape0 = self.checked("stack_steps", "step", first, DType::F32)?.shape.clone();
        if shape0.len() != 2 {
            return Err(shape_err("stack_steps", "step", self.node(first)?, "[B, D]"));
        }
        for &s in steps {
            let n = self.checked("stack_steps", "step", s, DType::F32)?;
            if n.shape != shape0 {
                return Err(shape_err("stack_steps", "step", n, format!("{shape0:?}")));
            }
        }
        let shape = vec![shape0[0], steps.len(), shape0[1]];
        Ok(self.push(Op::StackSteps, steps.to_vec(), shape, DType::F32))
    }

    /// One GRU step (gates ordered r, z, n).
    ///
    /// # Errors
    /// [`NnError::Shape`] unless `gx` is `[B, 3H]`, `h` is `[B, H]`, `wh` is `[H, 3H]` and
    /// `bh` is `[3H]`.
    pub fn gru_cell(&mut self, gx: NodeId, h: NodeId, wh: NodeId, bh: NodeId) -> Result<NodeId, NnError> {
        const OP: &str = "gru_cell";
        let hn = self.checked(OP, "h", h, DType::F32)?;
        if hn.shape.len() != 2 {
            return Err(shape_err(OP, "h", hn, "[B, H]"));
        }
        let (b, hid) = (hn.shape[0], hn.shape[1]);
        let checks =
            [("gx", gx, vec![b, 3 * hid]), ("wh", wh, vec![hid, 3 * hid]), ("bh", bh, vec![3 * hid])];
        for (role, id, want) in checks {
            let n = self.checked(OP, role, id, DType::F32)?;
            if n.shape != want {
                return Err(shape_err(OP, role, n, format!("{want:?}")));
            }
        }
        Ok(self.push(Op::GruCell, vec![gx, h, wh, bh], vec![b, hid], DType::F32))
    }
}
