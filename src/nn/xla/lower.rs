//! Lowering a [`Graph`]'s nodes to StableHLO programs: forward over a node range, backward
//! over a range from seed gradients, and a whole training step (forward, then backward from
//! the loss) in one program. Each op's forward and gradient are written here once, with
//! the same semantics as the CPU kernels (`nn/cpu/forward.rs`, `nn/cpu/backward.rs`).
//!
//! A [`Program`] says, beside its text, what each parameter of `main` is (a parameter, a
//! node's value or ids, a seed) and what each result is (a node's value or gradient), so
//! the executor can feed and unpack it without knowing the lowering.
use std::ops::Range;

use super::hlo::{Combine, Compare, ConvSpec, Elem, Hlo, Val};
use crate::nn::executor::rules;
use crate::nn::{Activation, DType, Graph, Node, Op};

/// What one parameter of a program's `main` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arg {
    /// Parameter number `index` of the graph's parameter list.
    Param(usize),
    /// The f32 value of a node.
    Value(usize),
    /// The i32 value of a node.
    Ids(usize),
    /// The seed gradient at this position of the seed list.
    Seed(usize),
    /// The dropout mask (0 or `1/(1-p)` per element) of a node, drawn on the host.
    Mask(usize),
    /// The first optimizer moment of parameter `index` (device-resident training).
    Moment1(usize),
    /// The second optimizer moment of parameter `index` (Adam, AdamW).
    Moment2(usize),
    /// The optimizer's constants (see [`Update`]), one vector.
    Scalars,
}

/// What one result of a program is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Out {
    /// The value of a node.
    Value(usize),
    /// The gradient of a node.
    Grad(usize),
    /// The updated value of parameter `index`.
    Param(usize),
    /// The updated first moment of parameter `index`.
    Moment1(usize),
    /// The updated second moment of parameter `index`.
    Moment2(usize),
}

/// An optimizer update written into a training step, with the semantics of
/// [`Optimizer::step`](crate::nn::Optimizer::step). Its constants are one vector parameter
/// (so one program serves every step and learning rate), in this order:
/// - `Sgd`: `lr, momentum, weight_decay`;
/// - `Adam` (also AdamW): `lr, beta1, beta2, eps, l2, decay, c1, c2` (see
///   `optim::adam_constants`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Update {
    Sgd,
    Adam,
}

/// Below this a moment is flushed to zero (as `optim.rs` does).
const TINY: f32 = 1e-30;
/// Below this an Adam gradient counts as zero (as `optim.rs` does).
const TINY_GRAD: f32 = 1e-15;

/// A StableHLO module and the meaning of its parameters and results.
#[derive(Debug)]
pub(crate) struct Program {
    pub(crate) text: String,
    pub(crate) args: Vec<Arg>,
    pub(crate) outputs: Vec<Out>,
}

/// Computes the range's nodes (with dropout active if `training`); results are the value of
/// every node it computes.
pub(crate) fn forward(graph: &Graph, range: Range<usize>, training: bool) -> Program {
    let mut w = Writer::new(graph, training);
    w.bind_inputs(range.clone());
    let mut outputs = Vec::new();
    for n in range {
        if w.computes(n) {
            w.forward(n);
            outputs.push(n);
        }
    }
    let results: Vec<Val> = outputs.iter().map(|&n| w.value(n)).collect();
    w.finish(&results, outputs.into_iter().map(Out::Value).collect())
}

/// Back-propagates through `range` from gradients given for the nodes `seeds`, reading the
/// range's forward values as parameters; results are the gradient of every node whose
/// gradient [`rules::zero_grads`] resets (zeros where none flows).
pub(crate) fn backward(
    graph: &Graph,
    requires_grad: &[bool],
    range: Range<usize>,
    seeds: &[usize],
    trained: bool,
) -> Program {
    let mut w = Writer::new(graph, trained);
    w.bind_inputs(range.clone());
    for n in range.clone() {
        if w.computes(n) {
            let node = &graph.nodes()[n];
            w.vals[n] = Some(w.h.param(&node.shape, Elem::F32));
            w.args.push(Arg::Value(n));
        }
    }
    let mut grads: Vec<Option<Val>> = vec![None; graph.len()];
    for (k, &s) in seeds.iter().enumerate() {
        if requires_grad[s] {
            let seed = w.h.param(&graph.nodes()[s].shape, Elem::F32);
            w.args.push(Arg::Seed(k));
            w.accumulate(&mut grads, s, seed);
        }
    }
    w.backward_walk(requires_grad, range.clone(), &mut grads);
    let (results, outputs) = w.grad_results(requires_grad, &range, &mut grads);
    w.finish(&results, outputs)
}

/// One training step: forward through the loss, backward from it (seed 1), and the
/// optimizer's `update`. Results: the loss, the values of `keep` (e.g. the logits), then per
/// parameter in the graph's order its updated value and moments.
pub(crate) fn train_step(
    graph: &Graph,
    requires_grad: &[bool],
    (loss, keep): (usize, &[usize]),
    training: bool,
    update: Update,
) -> Program {
    let mut w = Writer::new(graph, training);
    let range = 0..loss + 1;
    w.bind_inputs(range.clone());
    for n in range.clone() {
        if w.computes(n) {
            w.forward(n);
        }
    }
    let mut grads: Vec<Option<Val>> = vec![None; graph.len()];
    if requires_grad[loss] {
        let one = w.h.splat(1.0, &graph.nodes()[loss].shape);
        w.accumulate(&mut grads, loss, one);
    }
    w.backward_walk(requires_grad, range, &mut grads);
    let mut results = vec![w.value(loss)];
    let mut outputs = vec![Out::Value(loss)];
    for &k in keep {
        results.push(w.value(k));
        outputs.push(Out::Value(k));
    }
    let scalars = w.scalars(match update {
        Update::Sgd => 3,
        Update::Adam => 8,
    });
    for (i, spec) in graph.params().iter().enumerate() {
        let n = spec.node.index();
        let g = match grads[n].take() {
            Some(g) => g,
            None => w.h.splat(0.0, &spec.shape),
        };
        // A parameter no node of the step reads is still updated (momentum, decay).
        let p = match w.vals[n].clone() {
            Some(p) => p,
            None => {
                w.args.push(Arg::Param(i));
                w.h.param(&spec.shape, Elem::F32)
            }
        };
        w.args.push(Arg::Moment1(i));
        let m = w.h.param(&spec.shape, Elem::F32);
        let v = (update == Update::Adam).then(|| {
            w.args.push(Arg::Moment2(i));
            w.h.param(&spec.shape, Elem::F32)
        });
        let (p, m, v) = apply_update(&mut w.h, update, &scalars, (&p, &m, v.as_ref(), &g));
        results.extend([p, m]);
        outputs.extend([Out::Param(i), Out::Moment1(i)]);
        if let Some(v) = v {
            results.push(v);
            outputs.push(Out::Moment2(i));
        }
    }
    w.finish(&results, outputs)
}

/// `x`, with elements smaller than `tiny` in magnitude set to zero.
fn flush(h: &mut Hlo, x: &Val, tiny: f32) -> Val {
    let magnitude = h.unary("abs", x);
    let limit = h.splat(tiny, &x.shape);
    let small = h.compare(&magnitude, &limit, Compare::Lt);
    let zero = h.splat(0.0, &x.shape);
    h.select(&small, &zero, x)
}

/// One optimizer update of a parameter `p` with moments `m` (and `v`) and gradient `g`;
/// returns the new `p`, `m` and `v`.
fn apply_update(
    h: &mut Hlo,
    update: Update,
    scalars: &[Val],
    (p, m, v, g): (&Val, &Val, Option<&Val>, &Val),
) -> (Val, Val, Option<Val>) {
    let shape = p.shape.clone();
    let mut c = |k: usize| h.broadcast(&scalars[k], &shape, &[]);
    match (update, v) {
        (Update::Adam, Some(v)) => {
            let (lr, beta1, beta2, eps, l2, decay, c1, c2) = (c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7));
            let one = h.splat(1.0, &shape);
            // g += l2 p; tiny g → 0
            let l2p = h.mul(&l2, p);
            let g = h.add(g, &l2p);
            let g = flush(h, &g, TINY_GRAD);
            // m = flush(b1 m + (1 - b1) g); v = flush(b2 v + (1 - b2) g²)
            let b1m = h.mul(&beta1, m);
            let omb1 = h.sub(&one, &beta1);
            let gm = h.mul(&omb1, &g);
            let m = h.add(&b1m, &gm);
            let m = flush(h, &m, TINY);
            let b2v = h.mul(&beta2, v);
            let omb2 = h.sub(&one, &beta2);
            let gv = h.mul(&omb2, &g);
            let gv = h.mul(&gv, &g);
            let v = h.add(&b2v, &gv);
            let v = flush(h, &v, TINY);
            // p = p decay - lr (m c1) / (sqrt(v c2) + eps)
            let mc = h.mul(&m, &c1);
            let vc = h.mul(&v, &c2);
            let root = h.unary("sqrt", &vc);
            let denominator = h.add(&root, &eps);
            let step = h.binary("divide", &mc, &denominator);
            let step = h.mul(&lr, &step);
            let decayed = h.mul(p, &decay);
            (h.sub(&decayed, &step), m, Some(v))
        }
        _ => {
            let (lr, momentum, weight_decay) = (c(0), c(1), c(2));
            // m = flush(momentum m + g + wd p); p -= lr m
            let mm = h.mul(&momentum, m);
            let wp = h.mul(&weight_decay, p);
            let m = h.add(&mm, g);
            let m = h.add(&m, &wp);
            let m = flush(h, &m, TINY);
            let step = h.mul(&lr, &m);
            (h.sub(p, &step), m, None)
        }
    }
}

/// The state of one program being written.
struct Writer<'g> {
    graph: &'g Graph,
    h: Hlo,
    /// Each node's value in the program, once bound or computed.
    vals: Vec<Option<Val>>,
    args: Vec<Arg>,
    /// Whether dropout is active (its masks are then parameters).
    training: bool,
    masks: Vec<Option<Val>>,
}

/// Whether node `node` applies a dropout mask when `training`.
pub(crate) fn drops(node: &Node, training: bool) -> bool {
    matches!(node.op, Op::Dropout { p } if training && p > 0.0)
}

impl<'g> Writer<'g> {
    fn new(graph: &'g Graph, training: bool) -> Self {
        let n = graph.len();
        Writer { graph, h: Hlo::new(), vals: vec![None; n], args: Vec::new(), training, masks: vec![None; n] }
    }

    /// The `count` optimizer constants: one vector parameter (`Arg::Scalars`), split into
    /// scalars.
    fn scalars(&mut self, count: usize) -> Vec<Val> {
        self.args.push(Arg::Scalars);
        let all = self.h.param(&[count], Elem::F32);
        (0..count)
            .map(|k| {
                let one = self.h.slice(&all, &[k], &[k + 1]);
                self.h.reshape(&one, &[])
            })
            .collect()
    }

    /// Node `n`'s dropout mask, a parameter of `main` made on first use.
    fn mask(&mut self, n: usize) -> Val {
        if let Some(m) = &self.masks[n] {
            return m.clone();
        }
        let m = self.h.param(&self.graph.nodes()[n].shape, Elem::F32);
        self.args.push(Arg::Mask(n));
        self.masks[n] = Some(m.clone());
        m
    }

    /// Whether a forward walk computes node `n` (neither a parameter nor an input).
    fn computes(&self, n: usize) -> bool {
        !matches!(self.graph.nodes()[n].op, Op::Param { .. } | Op::Input)
    }

    /// Makes parameters of `main` for everything the range reads but does not compute: the
    /// graph parameters, its inputs, and values from before the range.
    fn bind_inputs(&mut self, range: Range<usize>) {
        let nodes = self.graph.nodes();
        for n in range.clone() {
            let reads = nodes[n].inputs.iter().map(|i| i.index());
            let own = matches!(nodes[n].op, Op::Input).then_some(n);
            for i in reads.chain(own) {
                if self.vals[i].is_some() || (range.contains(&i) && self.computes(i)) {
                    continue;
                }
                let node = &nodes[i];
                let (elem, arg) = match (&node.op, node.dtype) {
                    (Op::Param { index }, _) => (Elem::F32, Arg::Param(*index)),
                    (_, DType::F32) => (Elem::F32, Arg::Value(i)),
                    (_, DType::I32) => (Elem::I32, Arg::Ids(i)),
                };
                self.vals[i] = Some(self.h.param(&node.shape, elem));
                self.args.push(arg);
            }
        }
    }

    /// Node `n`'s value (bound or computed before it is read: invariant of the walks).
    fn value(&self, n: usize) -> Val {
        self.vals[n].clone().expect("lowering reads a node before binding or computing it")
    }

    fn finish(self, results: &[Val], outputs: Vec<Out>) -> Program {
        Program { text: self.h.finish(results), args: self.args, outputs }
    }

    fn forward(&mut self, n: usize) {
        let node = &self.graph.nodes()[n];
        let mask = drops(node, self.training).then(|| self.mask(n));
        let shape = node.shape.clone();
        let h = &mut self.h;
        let x = |pos: usize| self.vals[node.inputs[pos].index()].clone().expect("input bound before use");
        let y = match node.op {
            Op::Constant { value } => h.splat(value, &shape),
            Op::MatMul => h.dot(&x(0), &x(1), 1, 0),
            Op::Linear { act } => {
                let (input, w, b) = (x(0), x(1), x(2));
                let (fan_in, fan_out) = (w.shape[0], w.shape[1]);
                let rows = input.shape.iter().product::<usize>() / fan_in.max(1);
                let flat = h.reshape(&input, &[rows, fan_in]);
                let z = h.dot(&flat, &w, 1, 0);
                let bias = h.broadcast(&b, &[rows, fan_out], &[1]);
                let z = h.add(&z, &bias);
                let out = activate(h, &z, act);
                h.reshape(&out, &shape)
            }
            Op::Conv2d { stride, pad, act } => {
                let (input, w, b) = (x(0), x(1), x(2));
                let spec = ConvSpec {
                    dims: "[b, f, 0, 1]x[o, i, 0, 1]->[b, f, 0, 1]",
                    strides: [stride, stride],
                    padding: [(pad as i64, pad as i64); 2],
                    lhs_dilation: [1, 1],
                    rhs_dilation: [1, 1],
                };
                let z = h.conv(&input, &w, &spec, &shape);
                let bias = h.broadcast(&b, &shape, &[1]);
                let z = h.add(&z, &bias);
                activate(h, &z, act)
            }
            Op::MaxPool2d { size, stride } => h.max_pool(&x(0), size, stride, &shape),
            Op::Add => {
                let (a, b) = (x(0), x(1));
                let lead = a.shape.len() - b.shape.len();
                let dims: Vec<usize> = (lead..a.shape.len()).collect();
                let b = h.broadcast(&b, &a.shape, &dims);
                h.add(&a, &b)
            }
            Op::Sub => h.sub(&x(0), &x(1)),
            Op::Mul => h.mul(&x(0), &x(1)),
            Op::Act(act) => activate(h, &x(0), act),
            Op::Gelu => {
                let input = x(0);
                let (t, _) = gelu_tanh(h, &input);
                let one = h.splat(1.0, &shape);
                let onep = h.add(&one, &t);
                let half = h.scale(&input, 0.5);
                h.mul(&half, &onep)
            }
            Op::Reshape => h.reshape(&x(0), &shape),
            Op::LayerNorm { eps } => {
                let (input, gamma, beta) = (x(0), x(1), x(2));
                let (xhat, _) = normalize(h, &input, eps);
                let last = shape.len() - 1;
                let gamma = h.broadcast(&gamma, &shape, &[last]);
                let beta = h.broadcast(&beta, &shape, &[last]);
                let scaled = h.mul(&xhat, &gamma);
                h.add(&scaled, &beta)
            }
            // In training, the host-drawn mask (as the CPU executor draws it); else the identity.
            Op::Dropout { .. } => match &mask {
                Some(m) => h.mul(&x(0), m),
                None => x(0),
            },
            // Ids and coordinates are checked on the host before a run (gather and scatter
            // would clamp or drop out-of-range ones).
            Op::Embedding => {
                let (ids, table) = (x(0), x(1));
                let out = h.gather_rows(&table, &ids);
                h.reshape(&out, &shape)
            }
            // Each entry's row of `dense`, scaled by its value, added into its output row:
            // memory in entries × columns, as on the CPU.
            Op::SparseMatMul => {
                let (rows, cols, values, dense) = (x(0), x(1), x(2), x(3));
                let (entries, n) = (values.shape[0], dense.shape[1]);
                let gathered = h.gather_rows(&dense, &cols);
                let wide = h.broadcast(&values, &[entries, n], &[0]);
                let weighted = h.mul(&gathered, &wide);
                h.scatter_add_rows(&weighted, &rows, shape[0])
            }
            Op::Softmax => softmax(h, &x(0)),
            Op::SoftmaxCrossEntropy => {
                let (logits, labels) = (x(0), x(1));
                let (rows, classes) = (logits.shape[0], logits.shape[1]);
                let (shifted, lse) = log_sum_exp(h, &logits);
                let onehot = one_hot(h, &labels, rows, classes);
                let picked = h.mul(&onehot, &shifted);
                let picked = h.reduce(&picked, &[1], Combine::Add);
                let per_row = h.sub(&lse, &picked);
                let total = h.reduce(&per_row, &[0], Combine::Add);
                h.scale(&total, 1.0 / rows.max(1) as f32)
            }
            Op::Mse => {
                let (a, b) = (x(0), x(1));
                let d = h.sub(&a, &b);
                let sq = h.mul(&d, &d);
                let dims: Vec<usize> = (0..sq.shape.len()).collect();
                let total = h.reduce(&sq, &dims, Combine::Add);
                h.scale(&total, 1.0 / a.shape.iter().product::<usize>().max(1) as f32)
            }
            Op::Attention { heads, causal } => {
                let (b, t, d) = (shape[0], shape[1], shape[2]);
                let (q, k, v) = (
                    split_heads(h, &x(0), heads),
                    split_heads(h, &x(1), heads),
                    split_heads(h, &x(2), heads),
                );
                let p = attention_probs(h, &q, &k, causal);
                let o = h.dot_batched(&p, &v, &[0], 2, 1);
                merge_heads(h, &o, [b, t, d], heads)
            }
            Op::SelectStep { step } => {
                let input = x(0);
                let (b, d) = (input.shape[0], input.shape[2]);
                let picked = h.slice(&input, &[0, step, 0], &[b, step + 1, d]);
                h.reshape(&picked, &shape)
            }
            Op::StackSteps => {
                let (b, d) = (shape[0], shape[2]);
                let parts: Vec<Val> = (0..node.inputs.len()).map(|s| h.reshape(&x(s), &[b, 1, d])).collect();
                h.concatenate(&parts, 1)
            }
            Op::GruCell => {
                let gates = gru_gates(h, &x(0), &x(1), &x(2), &x(3));
                // (1 - z) n + z h = n + z (h - n)
                let hn = h.sub(&x(1), &gates.n);
                let zhn = h.mul(&gates.z, &hn);
                h.add(&gates.n, &zhn)
            }
            Op::Input | Op::Param { .. } => return,
        };
        self.vals[n] = Some(y);
    }

    /// Adds `g` to node `n`'s gradient.
    fn accumulate(&mut self, grads: &mut [Option<Val>], n: usize, g: Val) {
        grads[n] = Some(match grads[n].take() {
            Some(sum) => self.h.add(&sum, &g),
            None => g,
        });
    }

    /// Walks `range` backwards, giving each node's gradient to the inputs that need one.
    fn backward_walk(&mut self, requires_grad: &[bool], range: Range<usize>, grads: &mut [Option<Val>]) {
        for n in range.rev() {
            if !requires_grad[n] || matches!(self.graph.nodes()[n].op, Op::Param { .. }) {
                continue;
            }
            if let Some(g) = grads[n].clone() {
                self.backward(requires_grad, n, &g, grads);
            }
        }
    }

    /// The gradient results of [`backward`]: one per node that `rules::zero_grads` resets.
    fn grad_results(
        &mut self,
        requires_grad: &[bool],
        range: &Range<usize>,
        grads: &mut [Option<Val>],
    ) -> (Vec<Val>, Vec<Out>) {
        let mut seen = vec![false; self.graph.len()];
        let mut reset = Vec::new();
        let _ = rules::zero_grads(self.graph, requires_grad, range, &mut seen, |i| {
            reset.push(i);
            Ok(())
        });
        let mut results = Vec::with_capacity(reset.len());
        for &i in &reset {
            let g = match grads[i].take() {
                Some(g) => g,
                None => self.h.splat(0.0, &self.graph.nodes()[i].shape),
            };
            results.push(g);
        }
        (results, reset.into_iter().map(Out::Grad).collect())
    }

    /// Node `n`'s gradient `g` to its inputs.
    fn backward(&mut self, requires_grad: &[bool], n: usize, g: &Val, grads: &mut [Option<Val>]) {
        let node = &self.graph.nodes()[n];
        let mask = drops(node, self.training).then(|| self.mask(n));
        let needs = |pos: usize| requires_grad[node.inputs[pos].index()];
        let id = |pos: usize| node.inputs[pos].index();
        let y = self.value(n);
        let mut out: Vec<(usize, Val)> = Vec::new();
        let h_inputs: Vec<Val> = node
            .inputs
            .iter()
            .map(|i| self.vals[i.index()].clone().expect("inputs are bound before backward"))
            .collect();
        let x = |pos: usize| h_inputs[pos].clone();
        let h = &mut self.h;
        match node.op {
            Op::MatMul => {
                if needs(0) {
                    out.push((id(0), h.dot(g, &x(1), 1, 1)));
                }
                if needs(1) {
                    out.push((id(1), h.dot(&x(0), g, 0, 0)));
                }
            }
            Op::Linear { act } => {
                let (input, w) = (x(0), x(1));
                let (fan_in, fan_out) = (w.shape[0], w.shape[1]);
                let rows = input.shape.iter().product::<usize>() / fan_in.max(1);
                let gz = activate_grad(h, g, &y, act);
                let gz = h.reshape(&gz, &[rows, fan_out]);
                if needs(0) {
                    let gx = h.dot(&gz, &w, 1, 1);
                    out.push((id(0), h.reshape(&gx, &input.shape)));
                }
                if needs(1) {
                    let flat = h.reshape(&input, &[rows, fan_in]);
                    out.push((id(1), h.dot(&flat, &gz, 0, 0)));
                }
                if needs(2) {
                    out.push((id(2), h.reduce(&gz, &[0], Combine::Add)));
                }
            }
            Op::Conv2d { stride, pad, act } => {
                let (input, w) = (x(0), x(1));
                let gz = activate_grad(h, g, &y, act);
                let (k, side) = (w.shape[2] as i64, [input.shape[2] as i64, input.shape[3] as i64]);
                let outs = [y.shape[2] as i64, y.shape[3] as i64];
                let (s, p) = (stride as i64, pad as i64);
                if needs(0) {
                    // A transposed convolution: the flipped kernel over the gradient, its
                    // elements spread `stride` apart.
                    let flipped = h.reverse(&w, &[2, 3]);
                    let pads = [0, 1].map(|a| (k - 1 - p, side[a] - (outs[a] - 1) * s - 1 + p));
                    let spec = ConvSpec {
                        dims: "[b, f, 0, 1]x[i, o, 0, 1]->[b, f, 0, 1]",
                        strides: [1, 1],
                        padding: pads,
                        lhs_dilation: [stride, stride],
                        rhs_dilation: [1, 1],
                    };
                    out.push((id(0), h.conv(&gz, &flipped, &spec, &input.shape)));
                }
                if needs(1) {
                    // The input correlated with the gradient, batch as the summed axis.
                    let pads = [0, 1].map(|a| (p, k + (outs[a] - 1) * s - side[a] - p));
                    let spec = ConvSpec {
                        dims: "[f, b, 0, 1]x[i, o, 0, 1]->[f, b, 0, 1]",
                        strides: [1, 1],
                        padding: pads,
                        lhs_dilation: [1, 1],
                        rhs_dilation: [stride, stride],
                    };
                    out.push((id(1), h.conv(&input, &gz, &spec, &w.shape)));
                }
                if needs(2) {
                    out.push((id(2), h.reduce(&gz, &[0, 2, 3], Combine::Add)));
                }
            }
            Op::MaxPool2d { size, stride } => {
                if needs(0) {
                    out.push((id(0), h.max_pool_grad(&x(0), g, size, stride)));
                }
            }
            Op::Add => {
                if needs(0) {
                    out.push((id(0), g.clone()));
                }
                if needs(1) {
                    let lead: Vec<usize> = (0..g.shape.len() - x(1).shape.len()).collect();
                    let gb = if lead.is_empty() { g.clone() } else { h.reduce(g, &lead, Combine::Add) };
                    out.push((id(1), gb));
                }
            }
            Op::Sub => {
                if needs(0) {
                    out.push((id(0), g.clone()));
                }
                if needs(1) {
                    out.push((id(1), h.unary("negate", g)));
                }
            }
            Op::Mul => {
                if needs(0) {
                    out.push((id(0), h.mul(g, &x(1))));
                }
                if needs(1) {
                    out.push((id(1), h.mul(g, &x(0))));
                }
            }
            Op::Act(act) => {
                if needs(0) {
                    out.push((id(0), activate_grad(h, g, &y, act)));
                }
            }
            Op::Gelu => {
                if needs(0) {
                    // d/dx 0.5 x (1 + t) = 0.5 (1 + t) + 0.5 x (1 - t²) u',
                    // t = tanh(u), u = c (x + 0.044715 x³), u' = c (1 + 3·0.044715 x²).
                    let input = x(0);
                    let (t, c) = gelu_tanh(h, &input);
                    let one = h.splat(1.0, &input.shape);
                    let onep = h.add(&one, &t);
                    let first = h.scale(&onep, 0.5);
                    let t2 = h.mul(&t, &t);
                    let sech2 = h.sub(&one, &t2);
                    let x2 = h.mul(&input, &input);
                    let x2 = h.scale(&x2, 3.0 * 0.044715);
                    let du = h.add(&one, &x2);
                    let du = h.scale(&du, c);
                    let second = h.mul(&sech2, &du);
                    let second = h.mul(&second, &input);
                    let second = h.scale(&second, 0.5);
                    let d = h.add(&first, &second);
                    out.push((id(0), h.mul(g, &d)));
                }
            }
            Op::Reshape => {
                if needs(0) {
                    out.push((id(0), h.reshape(g, &x(0).shape)));
                }
            }
            Op::LayerNorm { eps } => {
                let (input, gamma) = (x(0), x(1));
                let last = input.shape.len() - 1;
                let dim = input.shape[last].max(1) as f32;
                let (xhat, rstd) = normalize(h, &input, eps);
                if needs(0) {
                    let gamma_b = h.broadcast(&gamma, &input.shape, &[last]);
                    let dxhat = h.mul(g, &gamma_b);
                    let m1 = h.reduce_keep(&dxhat, &[last], Combine::Add);
                    let m1 = h.scale(&m1, 1.0 / dim);
                    let dx_xhat = h.mul(&dxhat, &xhat);
                    let m2 = h.reduce_keep(&dx_xhat, &[last], Combine::Add);
                    let m2 = h.scale(&m2, 1.0 / dim);
                    let t = h.mul(&xhat, &m2);
                    let d = h.sub(&dxhat, &m1);
                    let d = h.sub(&d, &t);
                    out.push((id(0), h.mul(&rstd, &d)));
                }
                let rows: Vec<usize> = (0..last).collect();
                if needs(1) {
                    let gx = h.mul(g, &xhat);
                    out.push((id(1), h.reduce(&gx, &rows, Combine::Add)));
                }
                if needs(2) {
                    out.push((id(2), h.reduce(g, &rows, Combine::Add)));
                }
            }
            Op::Dropout { .. } => {
                if needs(0) {
                    out.push((
                        id(0),
                        match &mask {
                            Some(m) => h.mul(g, m),
                            None => g.clone(),
                        },
                    ));
                }
            }
            Op::Embedding => {
                if needs(1) {
                    let (ids, table) = (x(0), x(1));
                    let (vocab, dim) = (table.shape[0], table.shape[1]);
                    let rows = ids.shape.iter().product::<usize>();
                    let gflat = h.reshape(g, &[rows, dim]);
                    out.push((id(1), h.scatter_add_rows(&gflat, &ids, vocab)));
                }
            }
            Op::SparseMatMul => {
                let (rows, cols, values, dense) = (x(0), x(1), x(2), x(3));
                let (entries, n) = (values.shape[0], dense.shape[1]);
                // g's row of each entry: [E, N].
                let g_rows = h.gather_rows(g, &rows);
                if needs(2) {
                    let gathered = h.gather_rows(&dense, &cols);
                    let products = h.mul(&g_rows, &gathered);
                    out.push((id(2), h.reduce(&products, &[1], Combine::Add)));
                }
                if needs(3) {
                    let wide = h.broadcast(&values, &[entries, n], &[0]);
                    let weighted = h.mul(&g_rows, &wide);
                    out.push((id(3), h.scatter_add_rows(&weighted, &cols, dense.shape[0])));
                }
            }
            Op::Softmax => {
                if needs(0) {
                    let last = y.shape.len() - 1;
                    let gy = h.mul(g, &y);
                    let sum = h.reduce_keep(&gy, &[last], Combine::Add);
                    let d = h.sub(g, &sum);
                    out.push((id(0), h.mul(&y, &d)));
                }
            }
            Op::SoftmaxCrossEntropy => {
                if needs(0) {
                    let (logits, labels) = (x(0), x(1));
                    let (rows, classes) = (logits.shape[0], logits.shape[1]);
                    let (shifted, lse) = log_sum_exp(h, &logits);
                    let lse = h.broadcast(&lse, &logits.shape, &[0]);
                    let logp = h.sub(&shifted, &lse);
                    let probs = h.unary("exponential", &logp);
                    let onehot = one_hot(h, &labels, rows, classes);
                    let d = h.sub(&probs, &onehot);
                    let scale = h.scale(g, 1.0 / rows.max(1) as f32);
                    let scale = h.broadcast(&scale, &logits.shape, &[]);
                    out.push((id(0), h.mul(&d, &scale)));
                }
            }
            Op::Mse => {
                let (a, b) = (x(0), x(1));
                let n_el = a.shape.iter().product::<usize>().max(1) as f32;
                let d = h.sub(&a, &b);
                let scale = h.scale(g, 2.0 / n_el);
                let scale = h.broadcast(&scale, &a.shape, &[]);
                let da = h.mul(&d, &scale);
                if needs(1) {
                    out.push((id(1), h.unary("negate", &da)));
                }
                if needs(0) {
                    out.push((id(0), da));
                }
            }
            Op::Attention { heads, causal } => {
                let (b, t, d) = (y.shape[0], y.shape[1], y.shape[2]);
                let (q, k, v) = (
                    split_heads(h, &x(0), heads),
                    split_heads(h, &x(1), heads),
                    split_heads(h, &x(2), heads),
                );
                let p = attention_probs(h, &q, &k, causal);
                let go = split_heads(h, g, heads);
                // dP = gO·Vᵀ; dS = P (dP - Σ_j dP P) · scale; dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·gO.
                let dp = h.dot_batched(&go, &v, &[0], 2, 2);
                let dpp = h.mul(&dp, &p);
                let sum = h.reduce_keep(&dpp, &[2], Combine::Add);
                let centered = h.sub(&dp, &sum);
                let ds = h.mul(&p, &centered);
                let ds = h.scale(&ds, 1.0 / ((d / heads) as f32).sqrt());
                if needs(0) {
                    let dq = h.dot_batched(&ds, &k, &[0], 2, 1);
                    out.push((id(0), merge_heads(h, &dq, [b, t, d], heads)));
                }
                if needs(1) {
                    let dk = h.dot_batched(&ds, &q, &[0], 1, 1);
                    out.push((id(1), merge_heads(h, &dk, [b, t, d], heads)));
                }
                if needs(2) {
                    let dv = h.dot_batched(&p, &go, &[0], 1, 1);
                    out.push((id(2), merge_heads(h, &dv, [b, t, d], heads)));
                }
            }
            Op::SelectStep { step } => {
                if needs(0) {
                    let t = x(0).shape[1];
                    let (b, d) = (g.shape[0], g.shape[1]);
                    let g3 = h.reshape(g, &[b, 1, d]);
                    out.push((id(0), h.pad_zeros(&g3, &[0, step, 0], &[0, t - step - 1, 0])));
                }
            }
            Op::StackSteps => {
                let (b, d) = (g.shape[0], g.shape[2]);
                for s in 0..node.inputs.len() {
                    if needs(s) {
                        let part = h.slice(g, &[0, s, 0], &[b, s + 1, d]);
                        out.push((id(s), h.reshape(&part, &[b, d])));
                    }
                }
            }
            Op::GruCell => {
                let (gx, hv, wh) = (x(0), x(1), x(2));
                let gates = gru_gates(h, &gx, &hv, &wh, &x(3));
                let one = h.splat(1.0, &hv.shape);
                // y = (1 - z) n + z h.
                let omz = h.sub(&one, &gates.z);
                let dn = h.mul(g, &omz);
                let hmn = h.sub(&hv, &gates.n);
                let dz = h.mul(g, &hmn);
                // Pre-activations: n = tanh(a_n), a_n = gx_n + r gh_n; r, z = sigmoid(a).
                let n2 = h.mul(&gates.n, &gates.n);
                let dtanh = h.sub(&one, &n2);
                let dan = h.mul(&dn, &dtanh);
                let dr = h.mul(&dan, &gates.gh_n);
                let dsig_r = h.sub(&one, &gates.r);
                let dsig_r = h.mul(&gates.r, &dsig_r);
                let dar = h.mul(&dr, &dsig_r);
                let dsig_z = h.sub(&one, &gates.z);
                let dsig_z = h.mul(&gates.z, &dsig_z);
                let daz = h.mul(&dz, &dsig_z);
                let dghn = h.mul(&dan, &gates.r);
                let dgh = h.concatenate(&[dar.clone(), daz.clone(), dghn], 1);
                if needs(0) {
                    out.push((id(0), h.concatenate(&[dar, daz, dan], 1)));
                }
                if needs(1) {
                    let direct = h.mul(g, &gates.z);
                    let through = h.dot(&dgh, &wh, 1, 1);
                    out.push((id(1), h.add(&direct, &through)));
                }
                if needs(2) {
                    out.push((id(2), h.dot(&hv, &dgh, 0, 0)));
                }
                if needs(3) {
                    out.push((id(3), h.reduce(&dgh, &[0], Combine::Add)));
                }
            }
            Op::Constant { .. } | Op::Input | Op::Param { .. } => {}
        }
        for (i, gi) in out {
            self.accumulate(grads, i, gi);
        }
    }
}

fn activate(h: &mut Hlo, z: &Val, act: Activation) -> Val {
    match act {
        Activation::Relu => {
            let zero = h.splat(0.0, &z.shape);
            h.binary("maximum", z, &zero)
        }
        Activation::Sigmoid => h.unary("logistic", z),
        Activation::Tanh => h.unary("tanh", z),
        _ => z.clone(),
    }
}

/// The gradient through an activation, from its output `y`.
fn activate_grad(h: &mut Hlo, g: &Val, y: &Val, act: Activation) -> Val {
    match act {
        Activation::Relu => {
            let zero = h.splat(0.0, &y.shape);
            let positive = h.compare(y, &zero, Compare::Gt);
            h.select(&positive, g, &zero)
        }
        Activation::Sigmoid => {
            let one = h.splat(1.0, &y.shape);
            let rest = h.sub(&one, y);
            let d = h.mul(y, &rest);
            h.mul(g, &d)
        }
        Activation::Tanh => {
            let one = h.splat(1.0, &y.shape);
            let y2 = h.mul(y, y);
            let d = h.sub(&one, &y2);
            h.mul(g, &d)
        }
        _ => g.clone(),
    }
}

/// `tanh(c (x + 0.044715 x³))` with `c = sqrt(2/π)`, and `c`.
fn gelu_tanh(h: &mut Hlo, x: &Val) -> (Val, f32) {
    let c = (2.0f32 / std::f32::consts::PI).sqrt();
    let x2 = h.mul(x, x);
    let x3 = h.mul(&x2, x);
    let cubic = h.scale(&x3, 0.044715);
    let inner = h.add(x, &cubic);
    let u = h.scale(&inner, c);
    (h.unary("tanh", &u), c)
}

/// `(x - mean) · rstd` over the last axis, and `rstd = 1 / sqrt(var + eps)` (broadcast).
fn normalize(h: &mut Hlo, x: &Val, eps: f32) -> (Val, Val) {
    let last = x.shape.len() - 1;
    let dim = x.shape[last].max(1) as f32;
    let sum = h.reduce_keep(x, &[last], Combine::Add);
    let mean = h.scale(&sum, 1.0 / dim);
    let centered = h.sub(x, &mean);
    let sq = h.mul(&centered, &centered);
    let var = h.reduce_keep(&sq, &[last], Combine::Add);
    let var = h.scale(&var, 1.0 / dim);
    let eps = h.splat(eps, &x.shape);
    let var = h.add(&var, &eps);
    let rstd = h.unary("rsqrt", &var);
    (h.mul(&centered, &rstd), rstd)
}

/// `[B, T, D]` → `[B·H, T, D/H]`: each head's columns as its own batch entry.
fn split_heads(h: &mut Hlo, x: &Val, heads: usize) -> Val {
    let (b, t, d) = (x.shape[0], x.shape[1], x.shape[2]);
    let x4 = h.reshape(x, &[b, t, heads, d / heads]);
    let x4 = h.transpose(&x4, &[0, 2, 1, 3]);
    h.reshape(&x4, &[b * heads, t, d / heads])
}

/// The inverse of [`split_heads`].
fn merge_heads(h: &mut Hlo, x: &Val, [b, t, d]: [usize; 3], heads: usize) -> Val {
    let x4 = h.reshape(x, &[b, heads, t, d / heads]);
    let x4 = h.transpose(&x4, &[0, 2, 1, 3]);
    h.reshape(&x4, &[b, t, d])
}

/// Attention weights `softmax(q·kᵀ / sqrt(dh))` per head (`[B·H, T, T]`), position `i`
/// seeing only `j ≤ i` when `causal`.
fn attention_probs(h: &mut Hlo, q: &Val, k: &Val, causal: bool) -> Val {
    let dh = q.shape[2];
    let scores = h.dot_batched(q, k, &[0], 2, 2);
    let scores = h.scale(&scores, 1.0 / (dh as f32).sqrt());
    let scores = if causal {
        let rows = h.iota(&scores.shape, 1, Elem::I32);
        let cols = h.iota(&scores.shape, 2, Elem::I32);
        let seen = h.compare(&rows, &cols, Compare::Ge);
        let never = h.splat(f32::NEG_INFINITY, &scores.shape);
        h.select(&seen, &scores, &never)
    } else {
        scores
    };
    softmax(h, &scores)
}

/// A GRU step's gates `[B, H]` each, and the recurrent projection's `n` part.
struct GruGates {
    r: Val,
    z: Val,
    n: Val,
    gh_n: Val,
}

/// `gh = h·wh + bh`; `r = σ(gx_r + gh_r)`, `z = σ(gx_z + gh_z)`, `n = tanh(gx_n + r gh_n)`.
fn gru_gates(h: &mut Hlo, gx: &Val, hv: &Val, wh: &Val, bh: &Val) -> GruGates {
    let (b, hidden) = (hv.shape[0], hv.shape[1]);
    let gh = h.dot(hv, wh, 1, 0);
    let bias = h.broadcast(bh, &gh.shape, &[1]);
    let gh = h.add(&gh, &bias);
    let part = |h: &mut Hlo, v: &Val, k: usize| h.slice(v, &[0, k * hidden], &[b, (k + 1) * hidden]);
    let (gx_r, gx_z, gx_n) = (part(h, gx, 0), part(h, gx, 1), part(h, gx, 2));
    let (gh_r, gh_z, gh_n) = (part(h, &gh, 0), part(h, &gh, 1), part(h, &gh, 2));
    let ar = h.add(&gx_r, &gh_r);
    let r = h.unary("logistic", &ar);
    let az = h.add(&gx_z, &gh_z);
    let z = h.unary("logistic", &az);
    let rg = h.mul(&r, &gh_n);
    let an = h.add(&gx_n, &rg);
    let n = h.unary("tanh", &an);
    GruGates { r, z, n, gh_n }
}

/// Softmax over the last axis.
fn softmax(h: &mut Hlo, x: &Val) -> Val {
    let last = x.shape.len() - 1;
    let max = h.reduce_keep(x, &[last], Combine::Max);
    let shifted = h.sub(x, &max);
    let e = h.unary("exponential", &shifted);
    let sum = h.reduce_keep(&e, &[last], Combine::Add);
    h.binary("divide", &e, &sum)
}

/// For logits `[N, C]`: the logits less each row's max, and each row's
/// `log Σ exp(shifted)` (`[N]`).
fn log_sum_exp(h: &mut Hlo, logits: &Val) -> (Val, Val) {
    let max = h.reduce_keep(logits, &[1], Combine::Max);
    let shifted = h.sub(logits, &max);
    let e = h.unary("exponential", &shifted);
    let sum = h.reduce(&e, &[1], Combine::Add);
    let lse = h.unary("log", &sum);
    (shifted, lse)
}

/// `[rows, classes]` with 1 where the column is the row's id (ids of any shape, `rows`
/// elements).
fn one_hot(h: &mut Hlo, ids: &Val, rows: usize, classes: usize) -> Val {
    let flat = h.reshape(ids, &[rows]);
    let wide = h.broadcast(&flat, &[rows, classes], &[0]);
    let columns = h.iota(&[rows, classes], 1, Elem::I32);
    let hit = h.compare(&wide, &columns, Compare::Eq);
    let one = h.splat(1.0, &[rows, classes]);
    let zero = h.splat(0.0, &[rows, classes]);
    h.select(&hit, &one, &zero)
}
