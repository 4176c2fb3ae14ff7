//! Forward kernels: one arm per [`Op`], writing into the node's preallocated buffers.
use super::{gemm_rm, Ctx, MatRef};
use crate::nn::cpu::gemm::gemm;
use crate::nn::{Activation, NnError, Node, Op, Rng};

/// The node's own buffers, taken out of the executor while its kernel runs.
pub(crate) struct Out<'a> {
    pub(crate) val: &'a mut Vec<f32>,
    pub(crate) ids: &'a mut Vec<i32>,
    pub(crate) aux: &'a mut Vec<f32>,
    pub(crate) idx: &'a mut Vec<u32>,
}

pub(crate) const GELU_C: f32 = 0.797_884_6; // sqrt(2 / pi)

pub(crate) fn apply_act(act: Activation, y: &mut [f32]) {
    match act {
        Activation::Identity => {}
        Activation::Relu => y.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Sigmoid => y.iter_mut().for_each(|v| *v = sigmoid(*v)),
        Activation::Tanh => y.iter_mut().for_each(|v| *v = tanh(*v)),
    }
}

/// `tanh` through one `exp` (libm's `tanhf` goes through `expm1f` and was 47 % of a
/// transformer step); near zero a short series keeps the relative error small.
#[inline]
pub(crate) fn tanh(x: f32) -> f32 {
    if x.abs() < 0.0625 {
        let x2 = x * x;
        x * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0)))
    } else {
        // Saturates cleanly: exp(2x) = inf gives 1, exp(2x) = 0 gives -1.
        1.0 - 2.0 / ((2.0 * x).exp() + 1.0)
    }
}

pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Fills each row of `out` (rows of `bias.len()`) with `bias`.
fn broadcast_rows(out: &mut [f32], bias: &[f32]) {
    for row in out.chunks_exact_mut(bias.len().max(1)) {
        row.copy_from_slice(bias);
    }
}

/// Softmax of each row of `x` (rows of `d`), in place.
pub(crate) fn softmax_rows(x: &mut [f32], d: usize) {
    for row in x.chunks_exact_mut(d.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

pub(crate) fn run(
    ctx: &Ctx<'_>,
    node: &Node,
    out: Out<'_>,
    rng: &mut Rng,
    training: bool,
) -> Result<(), NnError> {
    let y = out.val.as_mut_slice();
    let inp = &node.inputs;
    match node.op {
        Op::Input | Op::Param { .. } => {}
        Op::Constant { value } => y.fill(value),
        Op::MatMul => {
            let (a, b) = (ctx.shape(inp[0]), ctx.shape(inp[1]));
            let (m, k, n) = (a[0], a[1], b[1]);
            gemm_rm(m, k, n, MatRef::rows(ctx.val(inp[0]), k), MatRef::rows(ctx.val(inp[1]), n), 0.0, y);
        }
        Op::Linear { act } => {
            let w = ctx.shape(inp[1]);
            let (k, n) = (w[0], w[1]);
            let m = y.len() / n.max(1);
            broadcast_rows(y, ctx.val(inp[2]));
            gemm_rm(m, k, n, MatRef::rows(ctx.val(inp[0]), k), MatRef::rows(ctx.val(inp[1]), n), 1.0, y);
            apply_act(act, y);
        }
        Op::Conv2d { stride, pad, act } => {
            let x = ctx.shape(inp[0]);
            let w = ctx.shape(inp[1]);
            let geo = ConvGeometry::new(x, w, &node.shape, stride, pad);
            let (xv, wv, bv) = (ctx.val(inp[0]), ctx.val(inp[1]), ctx.val(inp[2]));
            // One GEMM for the whole batch: out [O, N·OHW] = W [O, CKK] · cols [CKK, N·OHW],
            // then a transposing copy to [N, O, OHW] with the bias fused.
            let (ckk, ohw, o, n) = (geo.ckk(), geo.ohw(), w[0], x[0]);
            let (cols, prod) = out.aux.split_at_mut(ckk * n * ohw);
            for b in 0..n {
                geo.im2col(&xv[b * geo.chw()..(b + 1) * geo.chw()], b, n, cols);
            }
            let (wm, cm) = (MatRef::rows(wv, ckk), MatRef::rows(cols, n * ohw));
            gemm_rm(o, ckk, n * ohw, wm, cm, 0.0, prod);
            for b in 0..n {
                for (oc, &bias) in bv.iter().enumerate() {
                    let src = &prod[oc * n * ohw + b * ohw..oc * n * ohw + (b + 1) * ohw];
                    let dst = &mut y[(b * o + oc) * ohw..(b * o + oc + 1) * ohw];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = s + bias;
                    }
                }
            }
            apply_act(act, y);
        }
        Op::MaxPool2d { size, stride } => {
            let x = ctx.shape(inp[0]);
            let (h, w) = (x[2], x[3]);
            let (oh, ow) = (node.shape[2], node.shape[3]);
            let xv = ctx.val(inp[0]);
            let idx = out.idx.as_mut_slice();
            for plane in 0..x[0] * x[1] {
                let xp = &xv[plane * h * w..(plane + 1) * h * w];
                let yp = &mut y[plane * oh * ow..(plane + 1) * oh * ow];
                let ip = &mut idx[plane * oh * ow..(plane + 1) * oh * ow];
                for i in 0..oh {
                    for j in 0..ow {
                        // The window's first element starts the scan; later ones replace it
                        // only when strictly greater (first maximum wins).
                        let first = i * stride * w + j * stride;
                        let (mut best, mut arg) = (xp[first], first);
                        for di in 0..size {
                            let row = &xp[first + di * w..first + di * w + size];
                            for (dj, &v) in row.iter().enumerate() {
                                if v > best {
                                    best = v;
                                    arg = first + di * w + dj;
                                }
                            }
                        }
                        yp[i * ow + j] = best;
                        ip[i * ow + j] = arg as u32;
                    }
                }
            }
        }
        Op::Add => {
            let (a, b) = (ctx.val(inp[0]), ctx.val(inp[1]));
            for (yc, ac) in y.chunks_exact_mut(b.len().max(1)).zip(a.chunks_exact(b.len().max(1))) {
                for ((yv, av), bv) in yc.iter_mut().zip(ac).zip(b) {
                    *yv = av + bv;
                }
            }
        }
        Op::Sub | Op::Mul | Op::Mse => {
            let (a, b) = (ctx.val(inp[0]), ctx.val(inp[1]));
            match node.op {
                Op::Sub => y.iter_mut().zip(a.iter().zip(b)).for_each(|(y, (a, b))| *y = a - b),
                Op::Mul => y.iter_mut().zip(a.iter().zip(b)).for_each(|(y, (a, b))| *y = a * b),
                _ => {
                    let sum: f64 = a.iter().zip(b).map(|(a, b)| ((a - b) * (a - b)) as f64).sum();
                    y[0] = (sum / a.len().max(1) as f64) as f32;
                }
            }
        }
        Op::Act(act) => {
            y.copy_from_slice(ctx.val(inp[0]));
            apply_act(act, y);
        }
        Op::Gelu => {
            for (yv, &x) in y.iter_mut().zip(ctx.val(inp[0])) {
                *yv = 0.5 * x * (1.0 + tanh(GELU_C * (x + 0.044715 * x * x * x)));
            }
        }
        Op::Reshape => {
            if node.dtype == crate::nn::DType::I32 {
                out.ids.copy_from_slice(ctx.ids(inp[0]));
            } else {
                y.copy_from_slice(ctx.val(inp[0]));
            }
        }
        Op::LayerNorm { eps } => {
            let d = *node.shape.last().unwrap_or(&1);
            let (xv, gamma, beta) = (ctx.val(inp[0]), ctx.val(inp[1]), ctx.val(inp[2]));
            let stats = out.aux.as_mut_slice();
            for (r, (yr, xr)) in y.chunks_exact_mut(d.max(1)).zip(xv.chunks_exact(d.max(1))).enumerate() {
                let mean = xr.iter().sum::<f32>() / d as f32;
                let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                stats[2 * r] = mean;
                stats[2 * r + 1] = rstd;
                for i in 0..d {
                    yr[i] = (xr[i] - mean) * rstd * gamma[i] + beta[i];
                }
            }
        }
        Op::Dropout { p } => {
            let xv = ctx.val(inp[0]);
            if training && p > 0.0 {
                let keep = 1.0 / (1.0 - p);
                for ((yv, m), &x) in y.iter_mut().zip(out.aux.iter_mut()).zip(xv) {
                    *m = if rng.uniform() < p { 0.0 } else { keep };
                    *yv = x * *m;
                }
            } else {
                y.copy_from_slice(xv);
            }
        }
        Op::Embedding => {
            let ids = ctx.ids(inp[0]);
            let table = ctx.val(inp[1]);
            let t = ctx.shape(inp[1]);
            let (v, d) = (t[0], t[1]);
            for (position, (&id, yr)) in ids.iter().zip(y.chunks_exact_mut(d.max(1))).enumerate() {
                check_id("embedding", id, position, v)?;
                let id = id as usize;
                yr.copy_from_slice(&table[id * d..(id + 1) * d]);
            }
        }
        Op::SparseMatMul => {
            let (rows, cols, values) = (ctx.ids(inp[0]), ctx.ids(inp[1]), ctx.val(inp[2]));
            let (c, n) = (ctx.shape(inp[3])[0], ctx.shape(inp[3])[1]);
            let (x, r) = (ctx.val(inp[3]), node.shape[0]);
            y.fill(0.0);
            for (position, ((&row, &col), &v)) in rows.iter().zip(cols).zip(values).enumerate() {
                check_id("sparse_matmul rows", row, position, r)?;
                check_id("sparse_matmul cols", col, position, c)?;
                let (row, col) = (row as usize, col as usize);
                for (yv, &xv) in y[row * n..(row + 1) * n].iter_mut().zip(&x[col * n..(col + 1) * n]) {
                    *yv += v * xv;
                }
            }
        }
        Op::Softmax => {
            y.copy_from_slice(ctx.val(inp[0]));
            softmax_rows(y, *node.shape.last().unwrap_or(&1));
        }
        Op::SoftmaxCrossEntropy => {
            let l = ctx.shape(inp[0]);
            let c = l[1];
            let probs = out.aux.as_mut_slice();
            probs.copy_from_slice(ctx.val(inp[0]));
            softmax_rows(probs, c);
            let labels = ctx.ids(inp[1]);
            let mut total = 0.0f64;
            let rows = probs.chunks_exact(c).zip(ctx.val(inp[0]).chunks_exact(c));
            for (position, (&label, (row, logits))) in labels.iter().zip(rows).enumerate() {
                check_id("softmax_cross_entropy", label, position, c)?;
                let p = row[label as usize];
                total += if p >= 1e-30 {
                    -(p as f64).ln()
                } else {
                    // The probability underflowed: log-sum-exp minus the label's logit, exactly
                    // (as XLA computes every row).
                    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let sum: f64 = logits.iter().map(|&v| (v as f64 - m).exp()).sum();
                    m + sum.ln() - logits[label as usize] as f64
                };
            }
            y[0] = (total / labels.len().max(1) as f64) as f32;
        }
        // No steps (T = 0): nothing to attend over, and nothing to write.
        Op::Attention { .. } if y.is_empty() => {}
        Op::Attention { heads, causal } => {
            let (b, t, d) = (node.shape[0], node.shape[1], node.shape[2]);
            let dh = d / heads;
            let scale = 1.0 / (dh as f32).sqrt();
            let (q, k, v) = (ctx.val(inp[0]), ctx.val(inp[1]), ctx.val(inp[2]));
            let probs = out.aux.as_mut_slice();
            for bi in 0..b {
                for h in 0..heads {
                    let off = bi * t * d + h * dh;
                    let p = &mut probs[(bi * heads + h) * t * t..(bi * heads + h + 1) * t * t];
                    let qm = MatRef::strided(&q[off..], d, 1);
                    let km = MatRef::strided(&k[off..], 1, d);
                    gemm(t, dh, t, scale, qm, km, 0.0, p, t, 1);
                    if causal {
                        for i in 0..t {
                            p[i * t + i + 1..(i + 1) * t].fill(f32::NEG_INFINITY);
                        }
                    }
                    softmax_rows(p, t);
                    let vm = MatRef::strided(&v[off..], d, 1);
                    gemm(t, t, dh, 1.0, MatRef::rows(p, t), vm, 0.0, &mut y[off..], d, 1);
                }
            }
        }
        Op::SelectStep { step } => {
            let x = ctx.shape(inp[0]);
            let (t, d) = (x[1], x[2]);
            let xv = ctx.val(inp[0]);
            for (bi, yr) in y.chunks_exact_mut(d.max(1)).enumerate() {
                yr.copy_from_slice(&xv[(bi * t + step) * d..(bi * t + step + 1) * d]);
            }
        }
        Op::StackSteps => {
            let (b, t, d) = (node.shape[0], node.shape[1], node.shape[2]);
            for (s, &input) in inp.iter().enumerate() {
                let xv = ctx.val(input);
                for bi in 0..b {
                    y[(bi * t + s) * d..(bi * t + s + 1) * d].copy_from_slice(&xv[bi * d..(bi + 1) * d]);
                }
            }
        }
        Op::GruCell => {
            let (b, h) = (node.shape[0], node.shape[1]);
            let (gx, hv, wh, bh) = (ctx.val(inp[0]), ctx.val(inp[1]), ctx.val(inp[2]), ctx.val(inp[3]));
            let (gh, gates) = out.aux.split_at_mut(b * 3 * h);
            broadcast_rows(gh, bh);
            gemm_rm(b, h, 3 * h, MatRef::rows(hv, h), MatRef::rows(wh, 3 * h), 1.0, gh);
            // gates: [r | z | n], each [B, H].
            let (r, rest) = gates.split_at_mut(b * h);
            let (z, n) = rest.split_at_mut(b * h);
            for bi in 0..b {
                let gxr = &gx[bi * 3 * h..(bi + 1) * 3 * h];
                let ghr = &gh[bi * 3 * h..(bi + 1) * 3 * h];
                for j in 0..h {
                    let o = bi * h + j;
                    let rv = sigmoid(gxr[j] + ghr[j]);
                    let zv = sigmoid(gxr[h + j] + ghr[h + j]);
                    let nv = tanh(gxr[2 * h + j] + rv * ghr[2 * h + j]);
                    r[o] = rv;
                    z[o] = zv;
                    n[o] = nv;
                    y[o] = (1.0 - zv) * nv + zv * hv[o];
                }
            }
        }
    }
    Ok(())
}

/// The index arithmetic of one convolution, shared by im2col and col2im.
pub(crate) struct ConvGeometry {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    pad: usize,
}

impl ConvGeometry {
    pub(crate) fn new(x: &[usize], w: &[usize], y: &[usize], stride: usize, pad: usize) -> Self {
        ConvGeometry { c: x[1], h: x[2], w: x[3], kh: w[2], kw: w[3], oh: y[2], ow: y[3], stride, pad }
    }

    pub(crate) fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }

    pub(crate) fn ohw(&self) -> usize {
        self.oh * self.ow
    }

    pub(crate) fn chw(&self) -> usize {
        self.c * self.h * self.w
    }

    /// The outputs `j` whose input column `j·stride + kj - pad` lies inside the image.
    fn valid_columns(&self, kj: usize) -> (usize, usize) {
        let (s, pad, w) = (self.stride as isize, self.pad as isize, self.w as isize);
        let kj = kj as isize;
        let lo = if pad > kj { (pad - kj + s - 1) / s } else { 0 };
        let hi = if w - 1 + pad - kj >= 0 { (w - 1 + pad - kj) / s + 1 } else { 0 };
        let lo = (lo as usize).min(self.ow);
        (lo, (hi as usize).clamp(lo, self.ow))
    }

    /// Calls `f(column_segment_start, x_row_start, j_lo, j_hi)` for each row `(c, ki, kj)`
    /// and output row `i` whose input row is inside the image; other segments get
    /// `f(start, None, ..)`.
    #[inline]
    fn rows(&self, row_stride: usize, offset: usize, mut f: impl FnMut(usize, Option<isize>, usize, usize)) {
        for c in 0..self.c {
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let row = (c * self.kh + ki) * self.kw + kj;
                    let (lo, hi) = self.valid_columns(kj);
                    for i in 0..self.oh {
                        let start = row * row_stride + offset + i * self.ow;
                        let yi = (i * self.stride + ki) as isize - self.pad as isize;
                        if yi < 0 || yi as usize >= self.h {
                            f(start, None, lo, hi);
                        } else {
                            // Index in x of output column 0 (may be negative: only lo.. is read).
                            let x0 = ((c * self.h + yi as usize) * self.w) as isize + kj as isize
                                - self.pad as isize;
                            f(start, Some(x0), lo, hi);
                        }
                    }
                }
            }
        }
    }

    /// Unfolds image `b` `[C, H, W]` of a batch of `n` into its column block of
    /// `cols [C·KH·KW, n·OH·OW]`.
    pub(crate) fn im2col(&self, x: &[f32], b: usize, n: usize, cols: &mut [f32]) {
        let (ohw, ow, s) = (self.ohw(), self.ow, self.stride);
        self.rows(n * ohw, b * ohw, |start, x0, lo, hi| {
            let dst = &mut cols[start..start + ow];
            match x0 {
                None => dst.fill(0.0),
                Some(x0) => {
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if s == 1 {
                        let from = (x0 + lo as isize) as usize;
                        dst[lo..hi].copy_from_slice(&x[from..from + (hi - lo)]);
                    } else {
                        for (j, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                            *d = x[(x0 + (j * s) as isize) as usize];
                        }
                    }
                }
            }
        });
    }

    /// Folds image `b`'s column block of `cols` back, adding into `dx [C, H, W]`.
    pub(crate) fn col2im_add(&self, cols: &[f32], b: usize, n: usize, dx: &mut [f32]) {
        let (ohw, ow, s) = (self.ohw(), self.ow, self.stride);
        self.rows(n * ohw, b * ohw, |start, x0, lo, hi| {
            if let Some(x0) = x0 {
                let src = &cols[start..start + ow];
                if s == 1 {
                    let from = (x0 + lo as isize) as usize;
                    for (d, v) in dx[from..from + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
                        *d += v;
                    }
                } else {
                    for (j, v) in src.iter().enumerate().take(hi).skip(lo) {
                        dx[(x0 + (j * s) as isize) as usize] += v;
                    }
                }
            }
        });
    }
}

/// Errors unless `id` indexes one of `limit` rows.
fn check_id(op: &'static str, id: i32, position: usize, limit: usize) -> Result<(), NnError> {
    if id < 0 || id as usize >= limit {
        return Err(NnError::IdOutOfRange { op, id, position, limit });
    }
    Ok(())
}
