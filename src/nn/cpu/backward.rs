//! Backward kernels: for each [`Op`], `prepare` computes what all input gradients share
//! (e.g. the gradient before a fused activation) into scratch, then `accumulate` adds one
//! input's gradient into that input's gradient buffer.
use super::forward::{tanh, ConvGeometry, GELU_C};
use super::gemm::gemm;
use super::{gemm_rm, Ctx, MatRef};
use crate::nn::{Activation, Node, Op};

/// What the forward pass saved for the node.
pub(crate) struct Saved<'a> {
    pub(crate) aux: &'a [f32],
    pub(crate) idx: &'a [u32],
    /// Whether the forward pass ran in training mode.
    pub(crate) trained: bool,
}

/// `out = g * act'(y)`, with the derivative taken from the activation's output.
fn act_grad(act: Activation, y: &[f32], g: &[f32], out: &mut [f32]) {
    match act {
        Activation::Identity => out.copy_from_slice(g),
        Activation::Relu => {
            for ((o, &y), &g) in out.iter_mut().zip(y).zip(g) {
                *o = if y > 0.0 { g } else { 0.0 };
            }
        }
        Activation::Sigmoid => {
            for ((o, &y), &g) in out.iter_mut().zip(y).zip(g) {
                *o = g * y * (1.0 - y);
            }
        }
        Activation::Tanh => {
            for ((o, &y), &g) in out.iter_mut().zip(y).zip(g) {
                *o = g * (1.0 - y * y);
            }
        }
    }
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

/// Adds the column sums of `m` (rows of `dst.len()`) into `dst`.
fn add_col_sums(dst: &mut [f32], m: &[f32]) {
    for row in m.chunks_exact(dst.len().max(1)) {
        add_into(dst, row);
    }
}

pub(crate) fn prepare(
    ctx: &Ctx<'_>,
    node: &Node,
    n: usize,
    g: &[f32],
    saved: &Saved<'_>,
    scratch: &mut [f32],
) {
    let y = &ctx.vals[n];
    match node.op {
        Op::Linear { act } => act_grad(act, y, g, &mut scratch[..g.len()]),
        Op::Conv2d { act, .. } => {
            // dz = g·act'(y), transposed from [N, O, OHW] to [O, N·OHW] for batched GEMMs.
            let (n, o) = (node.shape[0], node.shape[1]);
            let ohw = node.shape[2] * node.shape[3];
            for b in 0..n {
                for oc in 0..o {
                    let at = (b * o + oc) * ohw;
                    let to = oc * n * ohw + b * ohw;
                    act_grad(act, &y[at..at + ohw], &g[at..at + ohw], &mut scratch[to..to + ohw]);
                }
            }
        }
        Op::Attention { heads, .. } => {
            let (b, t, d) = (node.shape[0], node.shape[1], node.shape[2]);
            let dh = d / heads;
            let scale = 1.0 / (dh as f32).sqrt();
            let v = ctx.val(node.inputs[2]);
            for bh in 0..b * heads {
                let off = (bh / heads) * t * d + (bh % heads) * dh;
                let ds = &mut scratch[bh * t * t..(bh + 1) * t * t];
                let p = &saved.aux[bh * t * t..(bh + 1) * t * t];
                gemm(
                    t,
                    dh,
                    t,
                    1.0,
                    MatRef::strided(&g[off..], d, 1),
                    MatRef::strided(&v[off..], 1, d),
                    0.0,
                    ds,
                    t,
                    1,
                );
                for (dr, pr) in ds.chunks_exact_mut(t.max(1)).zip(p.chunks_exact(t.max(1))) {
                    let s: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (dv, &pv) in dr.iter_mut().zip(pr) {
                        *dv = pv * (*dv - s) * scale;
                    }
                }
            }
        }
        Op::GruCell => {
            let (b, h) = (node.shape[0], node.shape[1]);
            let hv = ctx.val(node.inputs[1]);
            let (gh, gates) = saved.aux.split_at(b * 3 * h);
            let (r, rest) = gates.split_at(b * h);
            let (z, nn) = rest.split_at(b * h);
            let (dga, dgh) = scratch[..2 * b * 3 * h].split_at_mut(b * 3 * h);
            for bi in 0..b {
                for j in 0..h {
                    let o = bi * h + j;
                    let (gv, rv, zv, nv) = (g[o], r[o], z[o], nn[o]);
                    let dn = gv * (1.0 - zv);
                    let dz = gv * (hv[o] - nv);
                    let dan = dn * (1.0 - nv * nv);
                    let ghn = gh[bi * 3 * h + 2 * h + j];
                    let dar = dan * ghn * rv * (1.0 - rv);
                    let daz = dz * zv * (1.0 - zv);
                    let base = bi * 3 * h;
                    dga[base + j] = dar;
                    dga[base + h + j] = daz;
                    dga[base + 2 * h + j] = dan;
                    dgh[base + j] = dar;
                    dgh[base + h + j] = daz;
                    dgh[base + 2 * h + j] = dan * rv;
                }
            }
        }
        _ => {}
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn accumulate(
    ctx: &Ctx<'_>,
    node: &Node,
    n: usize,
    pos: usize,
    g: &[f32],
    saved: &Saved<'_>,
    scratch: &[f32],
    scratch2: &mut [f32],
    gin: &mut [f32],
) {
    let inp = &node.inputs;
    let y = &ctx.vals[n];
    let val = |i: usize| ctx.val(inp[i]);
    match node.op {
        Op::Input | Op::Param { .. } | Op::Constant { .. } => {}
        Op::MatMul => {
            let (a, b) = (ctx.shape(inp[0]), ctx.shape(inp[1]));
            let (m, k, nn) = (a[0], a[1], b[1]);
            if pos == 0 {
                gemm_rm(m, nn, k, MatRef::rows(g, nn), MatRef::trans(val(1), nn), 1.0, gin);
            } else {
                gemm_rm(k, m, nn, MatRef::trans(val(0), k), MatRef::rows(g, nn), 1.0, gin);
            }
        }
        Op::Linear { .. } => {
            let w = ctx.shape(inp[1]);
            let (k, nn) = (w[0], w[1]);
            let m = g.len() / nn.max(1);
            let dz = &scratch[..g.len()];
            match pos {
                0 => gemm_rm(m, nn, k, MatRef::rows(dz, nn), MatRef::trans(val(1), nn), 1.0, gin),
                1 => gemm_rm(k, m, nn, MatRef::trans(val(0), k), MatRef::rows(dz, nn), 1.0, gin),
                _ => add_col_sums(gin, dz),
            }
        }
        Op::Conv2d { stride, pad, .. } => {
            let (x, w) = (ctx.shape(inp[0]), ctx.shape(inp[1]));
            let geo = ConvGeometry::new(x, w, &node.shape, stride, pad);
            let (ckk, ohw, o, n) = (geo.ckk(), geo.ohw(), w[0], x[0]);
            let dz = &scratch[..g.len()];
            let cols = &saved.aux[..ckk * n * ohw];
            match pos {
                0 => {
                    let dcol = &mut scratch2[..ckk * n * ohw];
                    gemm_rm(
                        ckk,
                        o,
                        n * ohw,
                        MatRef::trans(val(1), ckk),
                        MatRef::rows(dz, n * ohw),
                        0.0,
                        dcol,
                    );
                    for b in 0..n {
                        geo.col2im_add(dcol, b, n, &mut gin[b * geo.chw()..(b + 1) * geo.chw()]);
                    }
                }
                1 => gemm_rm(
                    o,
                    n * ohw,
                    ckk,
                    MatRef::rows(dz, n * ohw),
                    MatRef::trans(cols, n * ohw),
                    1.0,
                    gin,
                ),
                _ => {
                    for (gb, row) in gin.iter_mut().zip(dz.chunks_exact((n * ohw).max(1))) {
                        *gb += row.iter().sum::<f32>();
                    }
                }
            }
        }
        Op::MaxPool2d { .. } => {
            let x = ctx.shape(inp[0]);
            let plane_in = x[2] * x[3];
            let plane_out = node.shape[2] * node.shape[3];
            for (o, (&gv, &i)) in g.iter().zip(saved.idx).enumerate() {
                gin[(o / plane_out) * plane_in + i as usize] += gv;
            }
        }
        Op::Add => {
            if pos == 0 {
                add_into(gin, g);
            } else {
                add_col_sums(gin, g);
            }
        }
        Op::Sub => {
            if pos == 0 {
                add_into(gin, g);
            } else {
                gin.iter_mut().zip(g).for_each(|(d, s)| *d -= s);
            }
        }
        Op::Mul => {
            let other = val(1 - pos);
            for ((d, &gv), &o) in gin.iter_mut().zip(g).zip(other) {
                *d += gv * o;
            }
        }
        Op::Mse => {
            let (a, b) = (val(0), val(1));
            let sign = if pos == 0 { 1.0 } else { -1.0 };
            let scale = sign * 2.0 * g[0] / a.len().max(1) as f32;
            for ((d, &av), &bv) in gin.iter_mut().zip(a).zip(b) {
                *d += scale * (av - bv);
            }
        }
        Op::Act(act) => match act {
            Activation::Identity => add_into(gin, g),
            Activation::Relu => {
                for ((d, &yv), &gv) in gin.iter_mut().zip(y).zip(g) {
                    if yv > 0.0 {
                        *d += gv;
                    }
                }
            }
            Activation::Sigmoid => {
                for ((d, &yv), &gv) in gin.iter_mut().zip(y).zip(g) {
                    *d += gv * yv * (1.0 - yv);
                }
            }
            Activation::Tanh => {
                for ((d, &yv), &gv) in gin.iter_mut().zip(y).zip(g) {
                    *d += gv * (1.0 - yv * yv);
                }
            }
        },
        Op::Gelu => {
            for ((d, &x), &gv) in gin.iter_mut().zip(val(0)).zip(g) {
                let t = tanh(GELU_C * (x + 0.044715 * x * x * x));
                let dt = (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x);
                *d += gv * (0.5 * (1.0 + t) + 0.5 * x * dt);
            }
        }
        Op::Reshape => add_into(gin, g),
        Op::LayerNorm { .. } => {
            let dim = *node.shape.last().unwrap_or(&1);
            let (x, gamma) = (val(0), val(1));
            let stats = saved.aux;
            for (r, (xr, gr)) in x.chunks_exact(dim.max(1)).zip(g.chunks_exact(dim.max(1))).enumerate() {
                let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
                match pos {
                    0 => {
                        let dxhat = &mut scratch2[..dim];
                        let (mut m1, mut m2) = (0.0, 0.0);
                        for i in 0..dim {
                            dxhat[i] = gr[i] * gamma[i];
                            m1 += dxhat[i];
                            m2 += dxhat[i] * (xr[i] - mean) * rstd;
                        }
                        m1 /= dim as f32;
                        m2 /= dim as f32;
                        let out = &mut gin[r * dim..(r + 1) * dim];
                        for i in 0..dim {
                            let xhat = (xr[i] - mean) * rstd;
                            out[i] += rstd * (dxhat[i] - m1 - xhat * m2);
                        }
                    }
                    1 => {
                        for i in 0..dim {
                            gin[i] += gr[i] * (xr[i] - mean) * rstd;
                        }
                    }
                    _ => add_into(gin, gr),
                }
            }
        }
        Op::Dropout { p } => {
            if saved.trained && p > 0.0 {
                for ((d, &gv), &m) in gin.iter_mut().zip(g).zip(saved.aux) {
                    *d += gv * m;
                }
            } else {
                add_into(gin, g);
            }
        }
        Op::Embedding => {
            if pos == 1 {
                let d = ctx.shape(inp[1])[1];
                for (&id, gr) in ctx.ids(inp[0]).iter().zip(g.chunks_exact(d.max(1))) {
                    let id = id as usize;
                    add_into(&mut gin[id * d..(id + 1) * d], gr);
                }
            }
        }
        Op::SparseMatMul => {
            // Ids were checked by the forward pass.
            let (rows, cols, values) = (ctx.ids(inp[0]), ctx.ids(inp[1]), ctx.val(inp[2]));
            let (x, n) = (ctx.val(inp[3]), node.shape[1]);
            for (e, ((&row, &col), &v)) in rows.iter().zip(cols).zip(values).enumerate() {
                let (g_row, x_row) = (&g[row as usize * n..][..n], &x[col as usize * n..][..n]);
                match pos {
                    2 => gin[e] += g_row.iter().zip(x_row).map(|(a, b)| a * b).sum::<f32>(),
                    3 => {
                        for (d, &gv) in gin[col as usize * n..][..n].iter_mut().zip(g_row) {
                            *d += v * gv;
                        }
                    }
                    _ => {}
                }
            }
        }
        Op::Softmax => {
            let d = *node.shape.last().unwrap_or(&1);
            for ((dr, yr), gr) in
                gin.chunks_exact_mut(d.max(1)).zip(y.chunks_exact(d.max(1))).zip(g.chunks_exact(d.max(1)))
            {
                let s: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for ((dv, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                    *dv += yv * (gv - s);
                }
            }
        }
        Op::SoftmaxCrossEntropy => {
            if pos == 0 {
                let c = ctx.shape(inp[0])[1];
                let labels = ctx.ids(inp[1]);
                let scale = g[0] / labels.len().max(1) as f32;
                for ((dr, pr), &label) in gin.chunks_exact_mut(c).zip(saved.aux.chunks_exact(c)).zip(labels) {
                    for (dv, &pv) in dr.iter_mut().zip(pr) {
                        *dv += scale * pv;
                    }
                    dr[label as usize] -= scale;
                }
            }
        }
        Op::Attention { heads, .. } => {
            let (b, t, d) = (node.shape[0], node.shape[1], node.shape[2]);
            let dh = d / heads;
            for bh in 0..b * heads {
                let off = (bh / heads) * t * d + (bh % heads) * dh;
                let ds = &scratch[bh * t * t..(bh + 1) * t * t];
                let out = &mut gin[off..];
                match pos {
                    0 => {
                        let k = MatRef::strided(&val(1)[off..], d, 1);
                        gemm(t, t, dh, 1.0, MatRef::rows(ds, t), k, 1.0, out, d, 1);
                    }
                    1 => {
                        let q = MatRef::strided(&val(0)[off..], d, 1);
                        gemm(t, t, dh, 1.0, MatRef::trans(ds, t), q, 1.0, out, d, 1);
                    }
                    _ => {
                        let p = &saved.aux[bh * t * t..(bh + 1) * t * t];
                        let gm = MatRef::strided(&g[off..], d, 1);
                        gemm(t, t, dh, 1.0, MatRef::trans(p, t), gm, 1.0, out, d, 1);
                    }
                }
            }
        }
        Op::SelectStep { step } => {
            let x = ctx.shape(inp[0]);
            let (t, d) = (x[1], x[2]);
            for (bi, gr) in g.chunks_exact(d.max(1)).enumerate() {
                add_into(&mut gin[(bi * t + step) * d..(bi * t + step + 1) * d], gr);
            }
        }
        Op::StackSteps => {
            let (b, t, d) = (node.shape[0], node.shape[1], node.shape[2]);
            for bi in 0..b {
                add_into(&mut gin[bi * d..(bi + 1) * d], &g[(bi * t + pos) * d..(bi * t + pos + 1) * d]);
            }
        }
        Op::GruCell => {
            let (b, h) = (node.shape[0], node.shape[1]);
            let (dga, dgh) = scratch[..2 * b * 3 * h].split_at(b * 3 * h);
            match pos {
                0 => add_into(gin, dga),
                1 => {
                    let z = &saved.aux[b * 3 * h + b * h..b * 3 * h + 2 * b * h];
                    for ((d, &gv), &zv) in gin.iter_mut().zip(g).zip(z) {
                        *d += gv * zv;
                    }
                    gemm_rm(b, 3 * h, h, MatRef::rows(dgh, 3 * h), MatRef::trans(val(2), 3 * h), 1.0, gin);
                }
                2 => gemm_rm(h, b, 3 * h, MatRef::trans(val(1), h), MatRef::rows(dgh, 3 * h), 1.0, gin),
                _ => add_col_sums(gin, dgh),
            }
        }
    }
}
