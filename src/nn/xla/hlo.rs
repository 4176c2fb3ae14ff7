//! `Hlo`: a writer of StableHLO functions in MLIR's generic op syntax, one SSA value per
//! call. It knows the ops' textual forms and result types; what to compute is the lowering's
//! business (`lower.rs`).
//!
//! Floats are written as their exact bit patterns (`0x3F800000`), so constants reach XLA
//! unrounded and infinities need no special spelling.
use std::fmt::Write as _;

/// The precision of every product and convolution: full f32. XLA's default lets a GPU
/// multiply in TF32 (10 bits of mantissa): on an H200 the model zoo's values and gradients
/// then differed from the CPU executor's by about 1e-3 (2026-12-04, JAX's CUDA plugin),
/// where the CUDA executor (cuBLAS with TF32 off) matches it. One model definition gives
/// the same numbers on each device.
pub(crate) const FULL_F32: &str =
    "precision_config = [#stablehlo<precision HIGHEST>, #stablehlo<precision HIGHEST>]";

/// Element types of the values written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    I32,
    /// Booleans (comparison results).
    I1,
}

impl Elem {
    fn mlir(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::I32 => "i32",
            Elem::I1 => "i1",
        }
    }
}

/// One SSA value: its name and type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Val {
    name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) elem: Elem,
}

impl Val {
    pub(crate) fn ty(&self) -> String {
        tensor_type(&self.shape, self.elem)
    }
}

/// `tensor<2x3xf32>`, or `tensor<f32>` for a scalar.
pub(crate) fn tensor_type(shape: &[usize], elem: Elem) -> String {
    let mut s = String::from("tensor<");
    for d in shape {
        let _ = write!(s, "{d}x");
    }
    s.push_str(elem.mlir());
    s.push('>');
    s
}

fn i64_array(values: &[usize]) -> String {
    let list: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    if list.is_empty() {
        "array<i64>".into()
    } else {
        format!("array<i64: {}>", list.join(", "))
    }
}

/// How a reduction combines elements.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Combine {
    Add,
    Max,
}

/// A comparison.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Compare {
    Eq,
    Gt,
    Ge,
    Lt,
}

/// Convolution settings: the dimension numbers in StableHLO's short form, and per spatial
/// axis the stride, the (low, high) padding and the input and kernel dilations.
pub(crate) struct ConvSpec<'a> {
    pub(crate) dims: &'a str,
    pub(crate) strides: [usize; 2],
    pub(crate) padding: [(i64, i64); 2],
    pub(crate) lhs_dilation: [usize; 2],
    pub(crate) rhs_dilation: [usize; 2],
}

/// A function being written: its parameters, body and results.
#[derive(Debug, Default)]
pub(crate) struct Hlo {
    params: Vec<Val>,
    body: String,
    next: usize,
}

impl Hlo {
    pub(crate) fn new() -> Self {
        Hlo::default()
    }

    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%v{}", self.next)
    }

    /// Adds a parameter of `main`.
    pub(crate) fn param(&mut self, shape: &[usize], elem: Elem) -> Val {
        let v = Val { name: format!("%arg{}", self.params.len()), shape: shape.to_vec(), elem };
        self.params.push(v.clone());
        v
    }

    /// Writes `%r = "op"(inputs) {attrs} : (types) -> type` and returns `%r`.
    fn op(&mut self, op: &str, inputs: &[&Val], attrs: &str, shape: &[usize], elem: Elem) -> Val {
        let name = self.fresh();
        let out = Val { name, shape: shape.to_vec(), elem };
        let names: Vec<&str> = inputs.iter().map(|v| v.name.as_str()).collect();
        let types: Vec<String> = inputs.iter().map(|v| v.ty()).collect();
        let attrs = if attrs.is_empty() { String::new() } else { format!(" {{{attrs}}}") };
        let _ = writeln!(
            self.body,
            "    {} = \"stablehlo.{op}\"({}){attrs} : ({}) -> {}",
            out.name,
            names.join(", "),
            types.join(", "),
            out.ty()
        );
        out
    }

    /// A tensor of `shape` whose every element is `value`.
    pub(crate) fn splat(&mut self, value: f32, shape: &[usize]) -> Val {
        let ty = tensor_type(shape, Elem::F32);
        self.op(
            "constant",
            &[],
            &format!("value = dense<0x{:08X}> : {ty}", value.to_bits()),
            shape,
            Elem::F32,
        )
    }

    /// Elementwise binary op (`add`, `subtract`, `multiply`, `divide`, `maximum`) on equal
    /// shapes.
    pub(crate) fn binary(&mut self, op: &str, a: &Val, b: &Val) -> Val {
        self.op(op, &[a, b], "", &a.shape.clone(), a.elem)
    }

    pub(crate) fn add(&mut self, a: &Val, b: &Val) -> Val {
        self.binary("add", a, b)
    }

    pub(crate) fn sub(&mut self, a: &Val, b: &Val) -> Val {
        self.binary("subtract", a, b)
    }

    pub(crate) fn mul(&mut self, a: &Val, b: &Val) -> Val {
        self.binary("multiply", a, b)
    }

    /// Elementwise unary op (`exponential`, `log`, `tanh`, `logistic`, `negate`, `rsqrt`).
    pub(crate) fn unary(&mut self, op: &str, a: &Val) -> Val {
        self.op(op, &[a], "", &a.shape.clone(), a.elem)
    }

    /// `a * scalar` for a constant scalar.
    pub(crate) fn scale(&mut self, a: &Val, by: f32) -> Val {
        let c = self.splat(by, &a.shape);
        self.mul(a, &c)
    }

    /// Broadcasts `a` to `shape`; `a`'s axis `i` becomes axis `dims[i]`.
    pub(crate) fn broadcast(&mut self, a: &Val, shape: &[usize], dims: &[usize]) -> Val {
        if a.shape == shape {
            return a.clone();
        }
        self.op(
            "broadcast_in_dim",
            &[a],
            &format!("broadcast_dimensions = {}", i64_array(dims)),
            shape,
            a.elem,
        )
    }

    pub(crate) fn reshape(&mut self, a: &Val, shape: &[usize]) -> Val {
        if a.shape == shape {
            return a.clone();
        }
        self.op("reshape", &[a], "", shape, a.elem)
    }

    pub(crate) fn reverse(&mut self, a: &Val, dims: &[usize]) -> Val {
        self.op("reverse", &[a], &format!("dimensions = {}", i64_array(dims)), &a.shape.clone(), a.elem)
    }

    /// Counts along axis `dim` of `shape`.
    pub(crate) fn iota(&mut self, shape: &[usize], dim: usize, elem: Elem) -> Val {
        self.op("iota", &[], &format!("iota_dimension = {dim} : i64"), shape, elem)
    }

    pub(crate) fn compare(&mut self, a: &Val, b: &Val, how: Compare) -> Val {
        let dir = match how {
            Compare::Eq => "EQ",
            Compare::Gt => "GT",
            Compare::Ge => "GE",
            Compare::Lt => "LT",
        };
        let attrs = format!("comparison_direction = #stablehlo<comparison_direction {dir}>");
        self.op("compare", &[a, b], &attrs, &a.shape.clone(), Elem::I1)
    }

    /// `pred ? a : b`, elementwise.
    pub(crate) fn select(&mut self, pred: &Val, a: &Val, b: &Val) -> Val {
        self.op("select", &[pred, a, b], "", &a.shape.clone(), a.elem)
    }

    /// `a · b`, contracting `a`'s axis `ca` with `b`'s axis `cb` (rank-2 operands).
    pub(crate) fn dot(&mut self, a: &Val, b: &Val, ca: usize, cb: usize) -> Val {
        let shape = [a.shape[1 - ca], b.shape[1 - cb]];
        let attrs = format!(
            "dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [{ca}], \
             rhs_contracting_dimensions = [{cb}]>, {FULL_F32}"
        );
        self.op("dot_general", &[a, b], &attrs, &shape, Elem::F32)
    }

    /// `a · b` with batch axes: `batch` axes of both (in order) are kept, then `a`'s free
    /// axes, then `b`'s; `ca` of `a` is contracted with `cb` of `b`.
    pub(crate) fn dot_batched(&mut self, a: &Val, b: &Val, batch: &[usize], ca: usize, cb: usize) -> Val {
        let mut shape: Vec<usize> = batch.iter().map(|&i| a.shape[i]).collect();
        let free = |v: &Val, c: usize| -> Vec<usize> {
            (0..v.shape.len()).filter(|i| *i != c && !batch.contains(i)).map(|i| v.shape[i]).collect()
        };
        shape.extend(free(a, ca));
        shape.extend(free(b, cb));
        let list = |v: &[usize]| v.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
        let attrs = format!(
            "dot_dimension_numbers = #stablehlo.dot<lhs_batching_dimensions = [{b}], \
             rhs_batching_dimensions = [{b}], lhs_contracting_dimensions = [{ca}], \
             rhs_contracting_dimensions = [{cb}]>, {FULL_F32}",
            b = list(batch)
        );
        self.op("dot_general", &[a, b], &attrs, &shape, Elem::F32)
    }

    pub(crate) fn transpose(&mut self, a: &Val, permutation: &[usize]) -> Val {
        let shape: Vec<usize> = permutation.iter().map(|&i| a.shape[i]).collect();
        self.op("transpose", &[a], &format!("permutation = {}", i64_array(permutation)), &shape, a.elem)
    }

    /// The elements of `a` from `start` (inclusive) to `limit` (exclusive) on each axis.
    pub(crate) fn slice(&mut self, a: &Val, start: &[usize], limit: &[usize]) -> Val {
        let shape: Vec<usize> = start.iter().zip(limit).map(|(s, l)| l - s).collect();
        let attrs = format!(
            "start_indices = {}, limit_indices = {}, strides = {}",
            i64_array(start),
            i64_array(limit),
            i64_array(&vec![1; start.len()])
        );
        self.op("slice", &[a], &attrs, &shape, a.elem)
    }

    /// `a` surrounded by `low` and `high` zeros on each axis.
    pub(crate) fn pad_zeros(&mut self, a: &Val, low: &[usize], high: &[usize]) -> Val {
        let zero = self.splat(0.0, &[]);
        let shape: Vec<usize> =
            a.shape.iter().zip(low.iter().zip(high)).map(|(d, (l, h))| d + l + h).collect();
        let attrs = format!(
            "edge_padding_low = {}, edge_padding_high = {}, interior_padding = {}",
            i64_array(low),
            i64_array(high),
            i64_array(&vec![0; low.len()])
        );
        self.op("pad", &[a, &zero], &attrs, &shape, a.elem)
    }

    /// The values joined along axis `dim`.
    pub(crate) fn concatenate(&mut self, parts: &[Val], dim: usize) -> Val {
        let mut shape = parts[0].shape.clone();
        shape[dim] = parts.iter().map(|p| p.shape[dim]).sum();
        let refs: Vec<&Val> = parts.iter().collect();
        self.op("concatenate", &refs, &format!("dimension = {dim} : i64"), &shape, parts[0].elem)
    }

    /// A region `^bb0(%x: tensor<f32>, %y: tensor<f32>)` returning `combine(x, y)`.
    fn combiner_region(&mut self, combine: &str) -> String {
        let (x, y, r) = (self.fresh(), self.fresh(), self.fresh());
        let t = tensor_type(&[], Elem::F32);
        format!(
            "({{\n    ^bb0({x}: {t}, {y}: {t}):\n      {r} = \"stablehlo.{combine}\"({x}, {y}) : ({t}, {t}) -> {t}\n      \
             \"stablehlo.return\"({r}) : ({t}) -> ()\n    }})"
        )
    }

    /// Reduces `a` over the axes `dims` (f32).
    pub(crate) fn reduce(&mut self, a: &Val, dims: &[usize], how: Combine) -> Val {
        let (init_value, combine) = match how {
            Combine::Add => (0.0, "add"),
            Combine::Max => (f32::NEG_INFINITY, "maximum"),
        };
        let init = self.splat(init_value, &[]);
        let shape: Vec<usize> =
            a.shape.iter().enumerate().filter(|(i, _)| !dims.contains(i)).map(|(_, &d)| d).collect();
        let region = self.combiner_region(combine);
        let out = Val { name: self.fresh(), shape, elem: Elem::F32 };
        let _ = writeln!(
            self.body,
            "    {} = \"stablehlo.reduce\"({}, {}) {region} {{dimensions = {}}} : ({}, {}) -> {}",
            out.name,
            a.name,
            init.name,
            i64_array(dims),
            a.ty(),
            init.ty(),
            out.ty()
        );
        out
    }

    /// Sums `a` over axes `dims` and keeps them as size 1 broadcast back: `a`'s shape.
    pub(crate) fn reduce_keep(&mut self, a: &Val, dims: &[usize], how: Combine) -> Val {
        let r = self.reduce(a, dims, how);
        let kept: Vec<usize> = (0..a.shape.len()).filter(|i| !dims.contains(i)).collect();
        self.broadcast(&r, &a.shape.clone(), &kept)
    }

    pub(crate) fn conv(&mut self, lhs: &Val, rhs: &Val, spec: &ConvSpec<'_>, shape: &[usize]) -> Val {
        let [(pl0, ph0), (pl1, ph1)] = spec.padding;
        let attrs = format!(
            "dimension_numbers = #stablehlo.conv<{}>, window_strides = {}, \
             padding = dense<[[{pl0}, {ph0}], [{pl1}, {ph1}]]> : tensor<2x2xi64>, lhs_dilation = {}, \
             rhs_dilation = {}, feature_group_count = 1 : i64, batch_group_count = 1 : i64, {FULL_F32}",
            spec.dims,
            i64_array(&spec.strides),
            i64_array(&spec.lhs_dilation),
            i64_array(&spec.rhs_dilation)
        );
        self.op("convolution", &[lhs, rhs], &attrs, shape, Elem::F32)
    }

    /// Max over `size × size` windows of the last two axes of a rank-4 `x`.
    pub(crate) fn max_pool(&mut self, x: &Val, size: usize, stride: usize, shape: &[usize]) -> Val {
        let init = self.splat(f32::NEG_INFINITY, &[]);
        let region = self.combiner_region("maximum");
        let out = Val { name: self.fresh(), shape: shape.to_vec(), elem: Elem::F32 };
        let _ = writeln!(
            self.body,
            "    {} = \"stablehlo.reduce_window\"({}, {}) {region} {{window_dimensions = {}, window_strides = {}}} \
             : ({}, {}) -> {}",
            out.name,
            x.name,
            init.name,
            i64_array(&[1, 1, size, size]),
            i64_array(&[1, 1, stride, stride]),
            x.ty(),
            init.ty(),
            out.ty()
        );
        out
    }

    /// Rows `ids` (`[e]`, i32, each within `table`'s rows, which the caller checks) of the
    /// matrix `table` (`[rows, n]`): `[e, n]`, by `stablehlo.gather`.
    pub(crate) fn gather_rows(&mut self, table: &Val, ids: &Val) -> Val {
        let (e, n) = (ids.shape.iter().product::<usize>(), table.shape[1]);
        let index = self.reshape(ids, &[e, 1]);
        let attrs = format!(
            "dimension_numbers = #stablehlo.gather<offset_dims = [1], collapsed_slice_dims = [0], \
             start_index_map = [0], index_vector_dim = 1>, slice_sizes = {}, indices_are_sorted = false",
            i64_array(&[1, n])
        );
        self.op("gather", &[table, &index], &attrs, &[e, n], Elem::F32)
    }

    /// `[rows, n]` zeros with row `i` of `updates` (`[e, n]`) added into row `ids[i]` (`ids`
    /// `[e]`, i32, each within `rows`), by `stablehlo.scatter`: the transpose of
    /// [`Hlo::gather_rows`].
    pub(crate) fn scatter_add_rows(&mut self, updates: &Val, ids: &Val, rows: usize) -> Val {
        let (e, n) = (updates.shape[0], updates.shape[1]);
        let index = self.reshape(ids, &[e, 1]);
        let zeros = self.splat(0.0, &[rows, n]);
        let region = self.combiner_region("add");
        let out = Val { name: self.fresh(), shape: vec![rows, n], elem: Elem::F32 };
        let _ = writeln!(
            self.body,
            "    {} = \"stablehlo.scatter\"({}, {}, {}) {region} {{scatter_dimension_numbers = \
             #stablehlo.scatter<update_window_dims = [1], inserted_window_dims = [0], \
             scatter_dims_to_operand_dims = [0], index_vector_dim = 1>, indices_are_sorted = false, \
             unique_indices = false}} : ({}, {}, {}) -> {}",
            out.name,
            zeros.name,
            index.name,
            updates.name,
            zeros.ty(),
            index.ty(),
            updates.ty(),
            out.ty()
        );
        out
    }

    /// The gradient of [`Hlo::max_pool`]: each window's `g` goes to the first of its
    /// largest elements of `x`.
    pub(crate) fn max_pool_grad(&mut self, x: &Val, g: &Val, size: usize, stride: usize) -> Val {
        let init = self.splat(0.0, &[]);
        let t = tensor_type(&[], Elem::F32);
        let b = tensor_type(&[], Elem::I1);
        let (x1, x2, c) = (self.fresh(), self.fresh(), self.fresh());
        let select = format!(
            "{{\n    ^bb0({x1}: {t}, {x2}: {t}):\n      {c} = \"stablehlo.compare\"({x1}, {x2}) \
             {{comparison_direction = #stablehlo<comparison_direction GE>}} : ({t}, {t}) -> {b}\n      \
             \"stablehlo.return\"({c}) : ({b}) -> ()\n    }}"
        );
        let scatter = self.combiner_region("add");
        let scatter = scatter.trim_start_matches('(').trim_end_matches(')');
        let out = Val { name: self.fresh(), shape: x.shape.clone(), elem: Elem::F32 };
        let _ = writeln!(
            self.body,
            "    {} = \"stablehlo.select_and_scatter\"({}, {}, {}) ({select}, {scatter}) \
             {{window_dimensions = {}, window_strides = {}}} : ({}, {}, {}) -> {}",
            out.name,
            x.name,
            g.name,
            init.name,
            i64_array(&[1, 1, size, size]),
            i64_array(&[1, 1, stride, stride]),
            x.ty(),
            g.ty(),
            init.ty(),
            out.ty()
        );
        out
    }

    /// The module text: `func.func @main(params) -> results`.
    pub(crate) fn finish(self, results: &[Val]) -> String {
        let params: Vec<String> = self.params.iter().map(|p| format!("{}: {}", p.name, p.ty())).collect();
        let names: Vec<&str> = results.iter().map(|v| v.name.as_str()).collect();
        let types: Vec<String> = results.iter().map(|v| v.ty()).collect();
        if results.is_empty() {
            return format!("func.func @main({}) -> () {{\n{}    return\n}}\n", params.join(", "), self.body);
        }
        format!(
            "func.func @main({}) -> ({}) {{\n{}    return {} : {}\n}}\n",
            params.join(", "),
            types.join(", "),
            self.body,
            names.join(", "),
            types.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{ConvSpec, Elem, Hlo, FULL_F32};

    /// Every product and convolution asks for full f32: on a GPU, XLA's default precision
    /// multiplies in TF32 and the results drift from the CPU executor's by about 1e-3.
    #[test]
    fn products_and_convolutions_ask_for_full_f32() {
        let mut hlo = Hlo::new();
        let a = hlo.param(&[4, 3], Elem::F32);
        let b = hlo.param(&[3, 5], Elem::F32);
        let ab = hlo.dot(&a, &b, 1, 0);
        let x = hlo.param(&[2, 4, 3], Elem::F32);
        let y = hlo.param(&[2, 3, 6], Elem::F32);
        let xy = hlo.dot_batched(&x, &y, &[0], 2, 1);
        let image = hlo.param(&[1, 1, 5, 5], Elem::F32);
        let kernel = hlo.param(&[2, 1, 3, 3], Elem::F32);
        let spec = ConvSpec {
            dims: "[b, f, 0, 1]x[o, i, 0, 1]->[b, f, 0, 1]",
            strides: [1, 1],
            padding: [(0, 0), (0, 0)],
            lhs_dilation: [1, 1],
            rhs_dilation: [1, 1],
        };
        let conv = hlo.conv(&image, &kernel, &spec, &[1, 2, 3, 3]);
        let text = hlo.finish(&[ab, xy, conv]);
        let ops: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("stablehlo.dot_general") || l.contains("stablehlo.convolution"))
            .collect();
        assert_eq!(ops.len(), 3, "{text}");
        assert!(ops.iter().all(|line| line.contains(FULL_F32)), "{text}");
    }
}
