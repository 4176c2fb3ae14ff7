//! The operations a `DArray` runs on its chunks (`Fill`, `UnaryOp`, `BinaryOp`,
//! `ReduceOp`), the element types it holds (`DElement`: f32 and f64), and the named tasks,
//! one set per element type, that run chunk kernels on workers and node processes.
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::{ArrayElement, Ref, Runtime};

/// How [`DArray::fill`](super::DArray::fill) makes each element. Every element's value
/// depends only on its position in the whole array, so the result does not depend on
/// the chunk shape or on where the chunks are made.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Fill {
    /// 0 everywhere.
    Zeros,
    /// One value everywhere.
    Constant(f64),
    /// Each element's row-major index in the whole array (0, 1, 2, …).
    Index,
    /// Uniform in `[low, high)`, from `seed` (a hash of the seed and the index).
    Uniform {
        /// The seed.
        seed: u64,
        /// The lowest value.
        low: f64,
        /// The bound above every value.
        high: f64,
    },
    /// Normal with `mean` and standard deviation `std`, from `seed` (Box–Muller over
    /// hashes of the seed and the index).
    Normal {
        /// The seed.
        seed: u64,
        /// The mean.
        mean: f64,
        /// The standard deviation.
        std: f64,
    },
}

impl Fill {
    /// The value of the element at row-major index `index`.
    pub fn value_at(self, index: u64) -> f64 {
        match self {
            Fill::Zeros => 0.0,
            Fill::Constant(value) => value,
            Fill::Index => index as f64,
            Fill::Uniform { seed, low, high } => low + (high - low) * unit(seed, index, 0),
            Fill::Normal { seed, mean, std } => {
                // 1 - u is in (0, 1], so its logarithm is finite.
                let (u, v) = (1.0 - unit(seed, index, 0), unit(seed, index, 1));
                mean + std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
            }
        }
    }
}

/// A uniform number in `[0, 1)` from a hash (splitmix64) of `seed`, `index` and `stream`.
fn unit(seed: u64, index: u64, stream: u64) -> f64 {
    let mut z = seed
        .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// An elementwise function, for [`DArray::map`](super::DArray::map).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum UnaryOp {
    /// `-x`
    Neg,
    /// `|x|`
    Abs,
    /// `√x`
    Sqrt,
    /// `eˣ`
    Exp,
    /// `ln x`
    Ln,
    /// `x²`
    Square,
    /// `max(x, 0)`
    Relu,
    /// `a·x`
    Scale(f64),
    /// `x + a`
    Offset(f64),
    /// `xᵃ`
    Powf(f64),
    /// `1 / (1 + e⁻ˣ)`
    Sigmoid,
}

/// An elementwise function of two arrays, for [`DArray::zip`](super::DArray::zip).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BinaryOp {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a · b`
    Mul,
    /// `a / b`
    Div,
    /// The smaller (a NaN loses to a number).
    Min,
    /// The larger (a NaN loses to a number).
    Max,
}

/// A reduction of all elements, for [`DArray::reduce`](super::DArray::reduce).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ReduceOp {
    /// The sum (each chunk sums in f64).
    Sum,
    /// The smallest element.
    Min,
    /// The largest element.
    Max,
}

/// An element type a [`DArray`](super::DArray) holds: `f32` or `f64`.
pub trait DElement:
    ArrayElement + crate::Payload + sealed::Kernels + Default + PartialOrd + std::fmt::Debug
{
}

impl DElement for f32 {}
impl DElement for f64 {}

pub(crate) mod sealed {
    use super::*;
    use crate::array::chunk::Chunk;
    use crate::array::sparse::{CsrBlock, CsrStack};

    /// The kernels and task spawners of one element type; sealed, so that the set of
    /// element types (and their registered tasks) stays ours.
    pub trait Kernels: Sized + Copy + Send + Sync + 'static {
        fn from_f64(value: f64) -> Self;
        fn to_f64(self) -> f64;
        fn binary(op: BinaryOp, a: Self, b: Self) -> Self;
        /// `a·b + c`, rounded twice (not a fused multiply-add, which is a slow library call
        /// on CPUs built without FMA).
        fn mul_add_plain(a: Self, b: Self, c: Self) -> Self;
        /// `op` of each element, into a new vector (one read and one write pass: the input
        /// is shared with the object table, so updating it in place would copy it first).
        fn map_new(op: UnaryOp, src: &[Self]) -> Vec<Self>;
        /// `a op b` element by element, into a new vector.
        fn zip_new(op: BinaryOp, a: &[Self], b: &[Self]) -> Vec<Self>;
        /// `c += a·b` for row-major `m×k`, `k×n` and `m×n` matrices.
        fn gemm(m: usize, k: usize, n: usize, a: &[Self], b: &[Self], c: &mut [Self]);

        fn spawn_fill(
            rt: &Runtime,
            shape: Vec<usize>,
            region: Vec<Range<usize>>,
            fill: Fill,
        ) -> Ref<Chunk<Self>>;
        fn spawn_map(rt: &Runtime, chunk: &Ref<Chunk<Self>>, op: UnaryOp) -> Ref<Chunk<Self>>;
        fn spawn_zip(
            rt: &Runtime,
            a: &Ref<Chunk<Self>>,
            b: &Ref<Chunk<Self>>,
            op: BinaryOp,
        ) -> Ref<Chunk<Self>>;
        fn spawn_reduce(rt: &Runtime, chunk: &Ref<Chunk<Self>>, op: ReduceOp) -> Ref<Option<Self>>;
        fn spawn_combine(
            rt: &Runtime,
            a: &Ref<Option<Self>>,
            b: &Ref<Option<Self>>,
            op: ReduceOp,
        ) -> Ref<Option<Self>>;
        fn spawn_transpose(rt: &Runtime, chunk: &Ref<Chunk<Self>>) -> Ref<Chunk<Self>>;
        fn spawn_total(rt: &Runtime, total: &Ref<Option<Self>>, op: ReduceOp) -> Ref<Self>;
        fn spawn_poisson(rt: &Runtime, n: usize, rows: Range<usize>) -> Ref<CsrBlock<Self>>;
        fn spawn_random_sparse(
            rt: &Runtime,
            cols: usize,
            per_row: usize,
            seed: u64,
            rows: Range<usize>,
        ) -> Ref<CsrBlock<Self>>;
        fn spawn_spmm(rt: &Runtime, block: &Ref<CsrBlock<Self>>, x: &Ref<Chunk<Self>>) -> Ref<Chunk<Self>>;
        fn spawn_spmm_t(rt: &Runtime, block: &Ref<CsrBlock<Self>>, y: &Ref<Chunk<Self>>) -> Ref<Chunk<Self>>;
        fn spawn_spgemm(
            rt: &Runtime,
            a: &Ref<CsrBlock<Self>>,
            b: &Ref<CsrStack<Self>>,
        ) -> Ref<CsrBlock<Self>>;
        fn spawn_stack_of(rt: &Runtime, block: &Ref<CsrBlock<Self>>) -> Ref<CsrStack<Self>>;
        fn spawn_stack(
            rt: &Runtime,
            top: &Ref<CsrStack<Self>>,
            bottom: &Ref<CsrStack<Self>>,
        ) -> Ref<CsrStack<Self>>;
        fn spawn_matmul(rt: &Runtime, a: &Ref<Chunk<Self>>, b: &Ref<Chunk<Self>>) -> Ref<Chunk<Self>>;
        fn spawn_extract(
            rt: &Runtime,
            src: &Ref<Chunk<Self>>,
            from: Vec<Range<usize>>,
            shape: Vec<usize>,
            at: Vec<usize>,
        ) -> Ref<Chunk<Self>>;
        fn spawn_paste(
            rt: &Runtime,
            dst: &Ref<Chunk<Self>>,
            src: &Ref<Chunk<Self>>,
            from: Vec<Range<usize>>,
            at: Vec<usize>,
        ) -> Ref<Chunk<Self>>;
    }
}

/// Implements the kernels of one float type and registers its chunk tasks.
macro_rules! float_element {
    ($t:ident, $tasks:ident, $gemm:path) => {
        /// The chunk tasks of one element type, registered under stable names so that node
        /// processes of any binary linking Tessera run them.
        mod $tasks {
            #![allow(unreachable_pub)]
            use super::*;
            use crate::array::chunk::{self, Chunk};
            use crate::array::sparse::{self, CsrBlock, CsrStack};
            use crate::array::ArrayError;

            crate::task! {
                pub(super) fn poisson(n: usize, rows: Range<usize>) -> CsrBlock<$t> {
                    sparse::poisson_block(n, rows)
                }
            }
            crate::task! {
                pub(super) fn random_sparse(cols: usize, per_row: usize, seed: u64, rows: Range<usize>) -> CsrBlock<$t> {
                    sparse::random_block(cols, per_row, seed, rows)
                }
            }
            crate::task! {
                pub(super) fn spmm(block: CsrBlock<$t>, x: Chunk<$t>) -> Result<Chunk<$t>, ArrayError> {
                    sparse::spmm(&block, &x)
                }
            }
            crate::task! {
                pub(super) fn spmm_t(block: CsrBlock<$t>, y: Chunk<$t>) -> Result<Chunk<$t>, ArrayError> {
                    sparse::spmm_t(&block, &y)
                }
            }
            crate::task! {
                pub(super) fn spgemm(a: CsrBlock<$t>, b: CsrStack<$t>) -> Result<CsrBlock<$t>, ArrayError> {
                    sparse::spgemm(&a, &b)
                }
            }
            crate::task! {
                pub(super) fn stack_of(block: CsrBlock<$t>) -> CsrStack<$t> {
                    CsrStack::of(block)
                }
            }
            crate::task! {
                pub(super) fn stack(top: CsrStack<$t>, bottom: CsrStack<$t>) -> Result<CsrStack<$t>, ArrayError> {
                    CsrStack::stack(top, bottom)
                }
            }

            crate::task! {
                pub(super) fn fill(shape: Vec<usize>, region: Vec<Range<usize>>, how: Fill) -> Result<Chunk<$t>, ArrayError> {
                    chunk::fill(&shape, &region, how)
                }
            }
            crate::task! {
                pub(super) fn map(input: Chunk<$t>, op: UnaryOp) -> Chunk<$t> {
                    let data = <$t as sealed::Kernels>::map_new(op, &input.data);
                    Chunk { shape: input.shape, data: data.into() }
                }
            }
            crate::task! {
                pub(super) fn zip(a: Chunk<$t>, b: Chunk<$t>, op: BinaryOp) -> Result<Chunk<$t>, ArrayError> {
                    chunk::zip(&a, &b, op)
                }
            }
            crate::task! {
                pub(super) fn reduce(input: Chunk<$t>, op: ReduceOp) -> Option<$t> {
                    chunk::reduce(&input, op)
                }
            }
            crate::task! {
                pub(super) fn combine(a: Option<$t>, b: Option<$t>, op: ReduceOp) -> Option<$t> {
                    chunk::combine(a, b, op)
                }
            }
            crate::task! {
                pub(super) fn transpose(input: Chunk<$t>) -> Result<Chunk<$t>, ArrayError> {
                    chunk::transpose(&input)
                }
            }
            crate::task! {
                /// The value of a whole reduction (`None` only for min or max of nothing).
                pub(super) fn total(total: Option<$t>, op: ReduceOp) -> Result<$t, ArrayError> {
                    total.ok_or(ArrayError::Empty { op })
                }
            }
            crate::task! {
                pub(super) fn matmul(a: Chunk<$t>, b: Chunk<$t>) -> Result<Chunk<$t>, ArrayError> {
                    chunk::matmul(&a, &b)
                }
            }
            crate::task! {
                pub(super) fn extract(
                    src: Chunk<$t>,
                    from: Vec<Range<usize>>,
                    shape: Vec<usize>,
                    at: Vec<usize>,
                ) -> Result<Chunk<$t>, ArrayError> {
                    chunk::extract(&src, &from, shape, &at)
                }
            }
            crate::task! {
                pub(super) fn paste(
                    dst: Chunk<$t>,
                    src: Chunk<$t>,
                    from: Vec<Range<usize>>,
                    at: Vec<usize>,
                ) -> Result<Chunk<$t>, ArrayError> {
                    chunk::paste(dst, &src, &from, &at)
                }
            }
        }

        impl sealed::Kernels for $t {
            fn from_f64(value: f64) -> Self {
                value as $t
            }
            fn to_f64(self) -> f64 {
                f64::from(self)
            }
            fn mul_add_plain(a: Self, b: Self, c: Self) -> Self {
                a * b + c
            }
            fn binary(op: BinaryOp, a: Self, b: Self) -> Self {
                match op {
                    BinaryOp::Add => a + b,
                    BinaryOp::Sub => a - b,
                    BinaryOp::Mul => a * b,
                    BinaryOp::Div => a / b,
                    BinaryOp::Min => a.min(b),
                    BinaryOp::Max => a.max(b),
                }
            }
            fn map_new(op: UnaryOp, src: &[Self]) -> Vec<Self> {
                // Generic over the closure, so that each arm compiles to its own loop.
                fn run(src: &[$t], f: impl Fn($t) -> $t) -> Vec<$t> {
                    src.iter().map(|&x| f(x)).collect()
                }
                match op {
                    UnaryOp::Neg => run(src, |x| -x),
                    UnaryOp::Abs => run(src, |x| x.abs()),
                    UnaryOp::Sqrt => run(src, |x| x.sqrt()),
                    UnaryOp::Exp => run(src, |x| x.exp()),
                    UnaryOp::Ln => run(src, |x| x.ln()),
                    UnaryOp::Square => run(src, |x| x * x),
                    UnaryOp::Relu => run(src, |x| x.max(0.0)),
                    UnaryOp::Sigmoid => run(src, |x| 1.0 / (1.0 + (-x).exp())),
                    UnaryOp::Scale(a) => {
                        let a = a as $t;
                        run(src, |x| a * x)
                    }
                    UnaryOp::Offset(a) => {
                        let a = a as $t;
                        run(src, |x| x + a)
                    }
                    UnaryOp::Powf(a) => {
                        let a = a as $t;
                        run(src, |x| x.powf(a))
                    }
                }
            }
            fn zip_new(op: BinaryOp, a: &[Self], b: &[Self]) -> Vec<Self> {
                fn run(a: &[$t], b: &[$t], f: impl Fn($t, $t) -> $t) -> Vec<$t> {
                    a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
                }
                match op {
                    BinaryOp::Add => run(a, b, |x, y| x + y),
                    BinaryOp::Sub => run(a, b, |x, y| x - y),
                    BinaryOp::Mul => run(a, b, |x, y| x * y),
                    BinaryOp::Div => run(a, b, |x, y| x / y),
                    BinaryOp::Min => run(a, b, |x, y| x.min(y)),
                    BinaryOp::Max => run(a, b, |x, y| x.max(y)),
                }
            }
            fn gemm(m: usize, k: usize, n: usize, a: &[Self], b: &[Self], c: &mut [Self]) {
                assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm operands too short");
                if m == 0 || n == 0 || k == 0 {
                    return;
                }
                // SAFETY: the slices hold m·k, k·n and m·n elements (checked above), laid
                // out row-major with the strides given; `c` does not alias `a` or `b`.
                unsafe {
                    $gemm(
                        m,
                        k,
                        n,
                        1.0,
                        a.as_ptr(),
                        k as isize,
                        1,
                        b.as_ptr(),
                        n as isize,
                        1,
                        1.0,
                        c.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                }
            }

            fn spawn_fill(
                rt: &Runtime,
                shape: Vec<usize>,
                region: Vec<Range<usize>>,
                fill: Fill,
            ) -> Ref<crate::array::chunk::Chunk<Self>> {
                $tasks::fill::spawn(rt, shape, region, fill)
            }
            fn spawn_map(
                rt: &Runtime,
                chunk: &Ref<crate::array::chunk::Chunk<Self>>,
                op: UnaryOp,
            ) -> Ref<crate::array::chunk::Chunk<Self>> {
                $tasks::map::spawn(rt, chunk, op)
            }
            fn spawn_zip(
                rt: &Runtime,
                a: &Ref<crate::array::chunk::Chunk<Self>>,
                b: &Ref<crate::array::chunk::Chunk<Self>>,
                op: BinaryOp,
            ) -> Ref<crate::array::chunk::Chunk<Self>> {
                $tasks::zip::spawn(rt, a, b, op)
            }
            fn spawn_reduce(
                rt: &Runtime,
                chunk: &Ref<crate::array::chunk::Chunk<Self>>,
                op: ReduceOp,
            ) -> Ref<Option<Self>> {
                $tasks::reduce::spawn(rt, chunk, op)
            }
            fn spawn_combine(
                rt: &Runtime,
                a: &Ref<Option<Self>>,
                b: &Ref<Option<Self>>,
                op: ReduceOp,
            ) -> Ref<Option<Self>> {
                $tasks::combine::spawn(rt, a, b, op)
            }
            fn spawn_transpose(
                rt: &Runtime,
                chunk: &Ref<crate::array::chunk::Chunk<Self>>,
            ) -> Ref<crate::array::chunk::Chunk<Self>> {
                $tasks::transpose::spawn(rt, chunk)
            }
            fn spawn_poisson(rt: &Runtime, n: usize, rows: Range<usize>) -> Ref<crate::array::sparse::CsrBlock<Self>> {
                $tasks::poisson::spawn(rt, n, rows)
            }
            fn spawn_random_sparse(
                rt: &Runtime,
                cols: usize,
                per_row: usize,
                seed: u64,
                rows: Range<usize>,
            ) -> Ref<crate::array::sparse::CsrBlock<Self>> {
                $tasks::random_sparse::spawn(rt, cols, per_row, seed, rows)
            }
            fn spawn_spmm(
                rt: &Runtime,
                block: &Ref<crate::array::sparse::CsrBlock<Self>>,
                x: &Ref<crate::array::chunk::Chunk<Self>>,
            ) -> Ref<crate::array::chunk::Chunk<Self>> {
                $tasks::spmm::spawn(rt, block, x)
            }
            fn spawn_spmm_t(
                rt: &Runtime,
                block: &Ref<crate::array::sparse::CsrBlock<Self>>,
                y: &Ref<crate::array::chunk::Chunk<Self>>,
            ) -> Ref<crate::array::chunk::Chunk<Self>> {
                $tasks::spmm_t::spawn(rt, block, y)
            }
            fn spawn_spgemm(
                rt: &Runtime,
                a: &Ref<crate::array::sparse::CsrBlock<Self>>,
                b: &Ref<crate::array::sparse::CsrStack<Self>>,
            ) -> Ref<crate::array::sparse::CsrBlock<Self>> {
                $tasks::spgemm::spawn(rt, a, b)
            }
            fn spawn_stack_of(
                rt: &Runtime,
                block: &Ref<crate::array::sparse::CsrBlock<Self>>,
            ) -> Ref<crate::array::sparse::CsrStack<Self>> {
                $tasks::stack_of::spawn(rt, block)
            }
            fn spawn_stack(
                rt: &Runtime,
                top: &Ref<crate::array::sparse::CsrStack<Self>>,
                bottom: &Ref<crate::array::sparse::CsrStack<Self>>,
            ) -> Ref<crate::array::sparse::CsrStack<Self>> {
                $tasks::stack::spawn(rt, top, bottom)
            }
            fn spawn_total(rt: &Runtime, total: &Ref<Option<Self>>, op: ReduceOp) -> Ref<Self> {
                $tasks::total::spawn(rt, total, op)
            }
            fn spawn_matmul(
                rt: &Runtime,
                a: &Ref<crate::array::chunk::Chunk<Self>>,
                b: &Ref<crate::array::chunk::Chunk<Self>>,
            ) -> Ref<crate::array::chunk::Chunk<Self>> {
                $tasks::matmul::spawn(rt, a, b)
            }
            fn spawn_extract(
                rt: &Runtime,
                src: &Ref<crate::array::chunk::Chunk<Self>>,
                from: Vec<Range<usize>>,
                shape: Vec<usize>,
                at: Vec<usize>,
            ) -> Ref<crate::array::chunk::Chunk<Self>> {
                $tasks::extract::spawn(rt, src, from, shape, at)
            }
            fn spawn_paste(
                rt: &Runtime,
                dst: &Ref<crate::array::chunk::Chunk<Self>>,
                src: &Ref<crate::array::chunk::Chunk<Self>>,
                from: Vec<Range<usize>>,
                at: Vec<usize>,
            ) -> Ref<crate::array::chunk::Chunk<Self>> {
                $tasks::paste::spawn(rt, dst, src, from, at)
            }
        }
    };
}

float_element!(f32, f32_tasks, matrixmultiply::sgemm);
float_element!(f64, f64_tasks, matrixmultiply::dgemm);
