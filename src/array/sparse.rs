//! Sparse distributed matrices: [`SparseDArray`], a CSR matrix cut into blocks of rows,
//! each block a `Ref` held where the task that made it ran; `CsrBlock<T>`, the block
//! payload (checked when decoded); `CsrStack<T>`, blocks stacked without copying for a
//! sparse × sparse product; the sparse kernels (SpMV, SpMM, generators); and
//! saving to and loading from a stash (blocks written by their holders, then a manifest).
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::chunk::{from_le_bytes, le_bytes, Chunk};
use super::darray::{parallel, store_error, tree};
use super::ops::DElement;
use super::{ArrayError, ChunkGrid, DArray};
use crate::{Dtype, Error, Ref, Result, Runtime, Stash, Version};

/// Rows `start..end` of a CSR matrix with `cols` columns. Nominally `pub` only so that the
/// sealed kernels trait of the element types can name it.
///
/// On the wire and in a stash: `(rows, cols, offsets, indices, values)`, the three arrays
/// as raw little-endian bytes (so that counting a block's encoded size, done for every
/// task result, and moving it cost no per-element work); checked when decoded.
#[derive(Debug, Clone, PartialEq)]
#[allow(unreachable_pub)]
pub struct CsrBlock<T> {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    // Shared, so that the copy of a block a task receives does not copy its arrays.
    /// `rows + 1` offsets into `indices` and `values`, from 0, never decreasing.
    pub(crate) offsets: Arc<Vec<u64>>,
    /// The column of each stored value, each `< cols`.
    pub(crate) indices: Arc<Vec<u32>>,
    pub(crate) values: Arc<Vec<T>>,
}

/// The items that little-endian `bytes` hold, or why they cannot.
fn items<A: crate::ArrayElement + Default>(bytes: &[u8], what: &str) -> Result<Vec<A>, ArrayError> {
    from_le_bytes(bytes).ok_or_else(|| ArrayError::BadSparse {
        reason: format!(
            "{what}: {} bytes is no whole number of {}-byte items",
            bytes.len(),
            std::mem::size_of::<A>()
        ),
    })
}

impl<T: DElement> Serialize for CsrBlock<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut tuple = serializer.serialize_tuple(5)?;
        tuple.serialize_element(&self.rows)?;
        tuple.serialize_element(&self.cols)?;
        tuple.serialize_element(serde_bytes::Bytes::new(&le_bytes(&self.offsets)))?;
        tuple.serialize_element(serde_bytes::Bytes::new(&le_bytes(&self.indices)))?;
        tuple.serialize_element(serde_bytes::Bytes::new(&le_bytes(&self.values)))?;
        tuple.end()
    }
}

impl<'de, T: DElement> Deserialize<'de> for CsrBlock<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        type Raw = (usize, usize, serde_bytes::ByteBuf, serde_bytes::ByteBuf, serde_bytes::ByteBuf);
        let (rows, cols, offsets, indices, values): Raw = Deserialize::deserialize(deserializer)?;
        let unchecked = (|| {
            Ok::<_, ArrayError>(UncheckedBlock {
                rows,
                cols,
                offsets: items(&offsets, "offsets")?,
                indices: items(&indices, "column indices")?,
                values: items(&values, "values")?,
            })
        })()
        .map_err(D::Error::custom)?;
        CsrBlock::try_from(unchecked).map_err(D::Error::custom)
    }
}

/// A block as decoded, before its invariants are checked.
struct UncheckedBlock<T> {
    rows: usize,
    cols: usize,
    offsets: Vec<u64>,
    indices: Vec<u32>,
    values: Vec<T>,
}

impl<T> TryFrom<UncheckedBlock<T>> for CsrBlock<T> {
    type Error = ArrayError;

    fn try_from(b: UncheckedBlock<T>) -> Result<Self, ArrayError> {
        let bad = |reason: String| Err(ArrayError::BadSparse { reason });
        if b.offsets.len() != b.rows + 1 || b.offsets.first() != Some(&0) {
            return bad(format!("{} offsets for {} rows", b.offsets.len(), b.rows));
        }
        if b.offsets.windows(2).any(|w| w[0] > w[1]) {
            return bad("offsets decrease".into());
        }
        let nnz = b.offsets[b.rows] as usize;
        if b.indices.len() != nnz || b.values.len() != nnz {
            return bad(format!(
                "{nnz} nonzeros announced, {} indices, {} values",
                b.indices.len(),
                b.values.len()
            ));
        }
        if let Some(&column) = b.indices.iter().find(|&&c| c as usize >= b.cols) {
            return bad(format!("column {column} in a matrix of {} columns", b.cols));
        }
        Ok(CsrBlock {
            rows: b.rows,
            cols: b.cols,
            offsets: Arc::new(b.offsets),
            indices: Arc::new(b.indices),
            values: Arc::new(b.values),
        })
    }
}

impl<T: DElement> CsrBlock<T> {
    /// A block from its arrays, checked as a decoded one is.
    ///
    /// # Errors
    /// [`ArrayError::BadSparse`] unless they are a valid CSR matrix.
    #[cfg(feature = "cuda")]
    pub(crate) fn from_arrays(
        rows: usize,
        cols: usize,
        offsets: Vec<u64>,
        indices: Vec<u32>,
        values: Vec<T>,
    ) -> Result<CsrBlock<T>, ArrayError> {
        CsrBlock::try_from(UncheckedBlock { rows, cols, offsets, indices, values })
    }

    /// A block of `rows` rows whose row `r` has the nonzeros `row(r)` (columns ascending).
    fn from_rows(rows: usize, cols: usize, mut row: impl FnMut(usize, &mut Vec<(u32, T)>)) -> CsrBlock<T> {
        let (mut offsets, mut indices, mut values) = (vec![0], Vec::new(), Vec::new());
        let mut entries = Vec::new();
        for r in 0..rows {
            entries.clear();
            row(r, &mut entries);
            for &(c, v) in entries.iter() {
                indices.push(c);
                values.push(v);
            }
            offsets.push(indices.len() as u64);
        }
        CsrBlock {
            rows,
            cols,
            offsets: Arc::new(offsets),
            indices: Arc::new(indices),
            values: Arc::new(values),
        }
    }
}

/// Rows `rows` of the 5-point Laplacian of an `n×n` grid (`n²` rows): 4 on the diagonal,
/// -1 for each neighbour.
pub(crate) fn poisson_block<T: DElement>(n: usize, rows: Range<usize>) -> CsrBlock<T> {
    let (minus, four) = (T::from_f64(-1.0), T::from_f64(4.0));
    CsrBlock::from_rows(rows.len(), n * n, |r, out| {
        let i = rows.start + r;
        let (y, x) = (i / n, i % n);
        if y > 0 {
            out.push(((i - n) as u32, minus));
        }
        if x > 0 {
            out.push(((i - 1) as u32, minus));
        }
        out.push((i as u32, four));
        if x + 1 < n {
            out.push(((i + 1) as u32, minus));
        }
        if y + 1 < n {
            out.push(((i + n) as u32, minus));
        }
    })
}

/// Rows `rows` of a random `?×cols` matrix with `per_row` distinct columns per row
/// (all of them when `per_row ≥ cols`), values uniform in [-1, 1); row `i` depends only on
/// `seed` and `i`.
pub(crate) fn random_block<T: DElement>(
    cols: usize,
    per_row: usize,
    seed: u64,
    rows: Range<usize>,
) -> CsrBlock<T> {
    let per_row = per_row.min(cols);
    let mut picked = Vec::with_capacity(per_row);
    CsrBlock::from_rows(rows.len(), cols, |r, out| {
        let i = (rows.start + r) as u64;
        let fill = super::Fill::Uniform { seed: seed ^ 0x5eed, low: 0.0, high: 1.0 };
        picked.clear();
        let mut draw = 0u64;
        while picked.len() < per_row {
            // Floyd-style rejection: redraw a column already taken.
            let column = (fill.value_at(i.wrapping_mul(1 << 20).wrapping_add(draw)) * cols as f64) as u32;
            draw += 1;
            if !picked.contains(&column) {
                picked.push(column);
            }
        }
        picked.sort_unstable();
        let value = super::Fill::Uniform { seed, low: -1.0, high: 1.0 };
        for (k, &column) in picked.iter().enumerate() {
            out.push((column, T::from_f64(value.value_at(i * per_row as u64 + k as u64))));
        }
    })
}

/// `A_block · X` for a dense `X` of `cols` rows (a vector, or a matrix of `k` columns).
pub(crate) fn spmm<T: DElement>(block: &CsrBlock<T>, x: &Chunk<T>) -> Result<Chunk<T>, ArrayError> {
    let k = match x.shape.as_slice() {
        [n] if *n == block.cols => 1,
        [n, k] if *n == block.cols => *k,
        _ => {
            return Err(ArrayError::ShapeMismatch {
                op: "sparse matmul",
                left: vec![block.rows, block.cols],
                right: x.shape.clone(),
            })
        }
    };
    let shape = if x.shape.len() == 1 { vec![block.rows] } else { vec![block.rows, k] };
    let mut out = Chunk::zeros(shape);
    for (r, y) in out.data.chunks_exact_mut(k.max(1)).enumerate().take(block.rows) {
        let span = block.offsets[r] as usize..block.offsets[r + 1] as usize;
        if k == 1 {
            let mut sum = T::from_f64(0.0);
            for (&c, &v) in block.indices[span.clone()].iter().zip(&block.values[span]) {
                sum = T::mul_add_plain(v, x.data[c as usize], sum);
            }
            y[0] = sum;
        } else {
            for (&c, &v) in block.indices[span.clone()].iter().zip(&block.values[span]) {
                let row = &x.data[c as usize * k..(c as usize + 1) * k];
                for (acc, &b) in y.iter_mut().zip(row) {
                    *acc = T::mul_add_plain(v, b, *acc);
                }
            }
        }
    }
    Ok(out)
}

/// What a saved SparseDArray's manifest records: its shape and blocking, and the exact
/// version of each block's entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SparseManifest {
    dtype: Dtype,
    rows: usize,
    cols: usize,
    block_rows: usize,
    blocks: Vec<(String, Version)>,
}

/// `A_blockᵀ · Y` for a dense `Y` of the block's `rows` rows (a vector, or a matrix of `k`
/// columns): each stored `(r, c, v)` adds `v · Y[r]` to row `c` of the `cols`-row result.
pub(crate) fn spmm_t<T: DElement>(block: &CsrBlock<T>, y: &Chunk<T>) -> Result<Chunk<T>, ArrayError> {
    let k = match y.shape.as_slice() {
        [n] if *n == block.rows => 1,
        [n, k] if *n == block.rows => *k,
        _ => {
            return Err(ArrayError::ShapeMismatch {
                op: "transposed sparse matmul",
                left: vec![block.cols, block.rows],
                right: y.shape.clone(),
            })
        }
    };
    let shape = if y.shape.len() == 1 { vec![block.cols] } else { vec![block.cols, k] };
    let mut out = Chunk::zeros(shape);
    if k == 0 {
        return Ok(out);
    }
    let data = &mut out.data;
    for (r, y_row) in y.data.chunks_exact(k).enumerate().take(block.rows) {
        let span = block.offsets[r] as usize..block.offsets[r + 1] as usize;
        for (&c, &v) in block.indices[span.clone()].iter().zip(&block.values[span]) {
            let target = &mut data[c as usize * k..(c as usize + 1) * k];
            for (acc, &b) in target.iter_mut().zip(y_row) {
                *acc = T::mul_add_plain(v, b, *acc);
            }
        }
    }
    Ok(out)
}

/// Blocks of rows stacked into one matrix without copying their arrays (each part's are
/// shared): the right operand of a sparse × sparse product, gathered from every block of
/// it. Nominally `pub` for the same reason as [`CsrBlock`].
///
/// On the wire: `(cols, parts)`, each part a [`CsrBlock`]; checked when decoded.
#[derive(Debug, Clone, PartialEq)]
#[allow(unreachable_pub)]
pub struct CsrStack<T> {
    cols: usize,
    parts: Vec<CsrBlock<T>>,
}

impl<T: DElement> Serialize for CsrStack<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (self.cols, &self.parts).serialize(serializer)
    }
}

impl<'de, T: DElement> Deserialize<'de> for CsrStack<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let (cols, parts): (usize, Vec<CsrBlock<T>>) = Deserialize::deserialize(deserializer)?;
        if let Some(part) = parts.iter().find(|part| part.cols != cols) {
            return Err(D::Error::custom(ArrayError::BadSparse {
                reason: format!("a part of {} columns in a stack of {cols}", part.cols),
            }));
        }
        Ok(CsrStack { cols, parts })
    }
}

impl<T: DElement> CsrStack<T> {
    /// A stack of one block.
    pub(crate) fn of(block: CsrBlock<T>) -> CsrStack<T> {
        CsrStack { cols: block.cols, parts: vec![block] }
    }

    /// The rows of `top` followed by those of `bottom` (both of the same width).
    ///
    /// # Errors
    /// [`ArrayError::ShapeMismatch`] if their widths differ.
    pub(crate) fn stack(mut top: CsrStack<T>, bottom: CsrStack<T>) -> Result<CsrStack<T>, ArrayError> {
        if top.cols != bottom.cols {
            return Err(ArrayError::ShapeMismatch {
                op: "stack sparse rows",
                left: vec![top.rows(), top.cols],
                right: vec![bottom.rows(), bottom.cols],
            });
        }
        top.parts.extend(bottom.parts);
        Ok(top)
    }

    fn rows(&self) -> usize {
        self.parts.iter().map(|part| part.rows).sum()
    }
}

/// Finds the rows of a [`CsrStack`] by their index in the whole stack, keeping the part
/// of the last one found at hand (a product's row reads rows close to each other).
struct StackRows<'a, T> {
    parts: &'a [CsrBlock<T>],
    /// The first row of each part, then the stack's row count.
    starts: Vec<usize>,
    /// The rows `first..end` of the stack are those of the part at hand, whose arrays
    /// these are.
    first: usize,
    end: usize,
    offsets: &'a [u64],
    indices: &'a [u32],
    values: &'a [T],
}

impl<'a, T> StackRows<'a, T> {
    fn new(stack: &'a CsrStack<T>) -> StackRows<'a, T> {
        let mut starts = Vec::with_capacity(stack.parts.len() + 1);
        starts.push(0);
        for part in &stack.parts {
            starts.push(starts[starts.len() - 1] + part.rows);
        }
        StackRows { parts: &stack.parts, starts, first: 0, end: 0, offsets: &[], indices: &[], values: &[] }
    }

    fn rows(&self) -> usize {
        self.starts[self.parts.len()]
    }

    /// Row `k`'s columns and values; `k` must be below [`Self::rows`].
    #[inline(always)]
    fn row(&mut self, k: usize) -> (&'a [u32], &'a [T]) {
        if k < self.first || k >= self.end {
            self.find(k);
        }
        let local = k - self.first;
        let span = self.offsets[local] as usize..self.offsets[local + 1] as usize;
        (&self.indices[span.clone()], &self.values[span])
    }

    #[cold]
    fn find(&mut self, k: usize) {
        // The last part that starts at or before `k` (so never an empty one).
        let index = self.starts.partition_point(|&start| start <= k) - 1;
        let part = &self.parts[index];
        (self.first, self.end) = (self.starts[index], self.starts[index + 1]);
        (self.offsets, self.indices, self.values) = (&part.offsets, &part.indices, &part.values);
    }
}

/// `A_block · B` for a sparse `B` of `cols` rows: Gustavson's row-by-row product with a
/// dense accumulator over `B`'s columns; each output row's columns ascend, and entries
/// that cancel to exactly zero are kept (as `sprs` keeps them).
pub(crate) fn spgemm<T: DElement>(a: &CsrBlock<T>, b: &CsrStack<T>) -> Result<CsrBlock<T>, ArrayError> {
    let mut b_rows = StackRows::new(b);
    if a.cols != b_rows.rows() {
        return Err(ArrayError::ShapeMismatch {
            op: "sparse × sparse matmul",
            left: vec![a.rows, a.cols],
            right: vec![b_rows.rows(), b.cols],
        });
    }
    // Row `r` stamps the accumulator with `r + 1`.
    let rows = u32::try_from(a.rows).ok().ok_or(ArrayError::TooLarge { shape: vec![a.rows, b.cols] })?;
    let zero = T::from_f64(0.0);
    // The dense accumulator: `(r + 1, sum)` for a column that row `r` of the product has
    // touched (zeroed memory to start with, which the allocator gives without writing it).
    let mut slots = vec![(0u32, zero); b.cols];
    let mut offsets = Vec::with_capacity(a.rows + 1);
    offsets.push(0u64);
    // Room for every partial product, the most nonzeros the product can have: reserved
    // once, so the output is never copied to grow (pages never written cost nothing).
    let partial_products: usize = a.indices.iter().map(|&k| b_rows.row(k as usize).0.len()).sum();
    let mut row = ProductRow {
        indices: Vec::with_capacity(partial_products),
        values: Vec::with_capacity(partial_products),
        // A row has at most `b.cols` columns.
        touched: vec![0u32; b.cols],
        count: 0,
    };
    let (a_offsets, a_indices, a_values) = (&a.offsets[..], &a.indices[..], &a.values[..]);
    for r in 1..=rows {
        let span = a_offsets[r as usize - 1] as usize..a_offsets[r as usize] as usize;
        for (&k, &v) in a_indices[span.clone()].iter().zip(&a_values[span]) {
            let (columns, weights) = b_rows.row(k as usize);
            for (&c, &w) in columns.iter().zip(weights) {
                let slot = &mut slots[c as usize];
                if slot.0 == r {
                    slot.1 = T::mul_add_plain(v, w, slot.1);
                } else {
                    *slot = (r, T::mul_add_plain(v, w, zero));
                    row.touched[row.count] = c;
                    row.count += 1;
                }
            }
        }
        row.finish(&slots);
        offsets.push(row.indices.len() as u64);
    }
    let ProductRow { indices, values, .. } = row;
    Ok(CsrBlock {
        rows: a.rows,
        cols: b.cols,
        offsets: Arc::new(offsets),
        indices: Arc::new(indices),
        values: Arc::new(values),
    })
}

/// The output of a sparse × sparse product, and the columns of the row being made.
struct ProductRow<T> {
    indices: Vec<u32>,
    values: Vec<T>,
    /// The columns the row has touched, in the order first touched: the first `count`.
    touched: Vec<u32>,
    count: usize,
}

impl<T: DElement> ProductRow<T> {
    /// Appends the row to the output, its columns ascending, each with its sum from
    /// `slots`; starts the next row.
    fn finish(&mut self, slots: &[(u32, T)]) {
        let touched = &mut self.touched[..self.count];
        self.count = 0;
        sort_columns(touched);
        self.indices.extend_from_slice(touched);
        self.values.extend(touched.iter().map(|&c| slots[c as usize].1));
    }
}

/// Sorts one product row's columns: insertion sort for the short rows sparse products
/// mostly have (cheaper there than the general sort's setup), the general sort otherwise.
fn sort_columns(columns: &mut [u32]) {
    if columns.len() > 32 {
        columns.sort_unstable();
        return;
    }
    for i in 1..columns.len() {
        let c = columns[i];
        let mut j = i;
        while j > 0 && columns[j - 1] > c {
            columns[j] = columns[j - 1];
            j -= 1;
        }
        columns[j] = c;
    }
}

/// A sparse matrix (CSR) of `f32` or `f64` cut into blocks of rows, each block a
/// [`Ref`] held where the task that made it ran. Products with dense [`DArray`]s run one
/// task per block.
#[derive(Clone)]
pub struct SparseDArray<T: DElement> {
    rt: Runtime,
    rows: usize,
    cols: usize,
    block_rows: usize,
    blocks: Vec<Ref<CsrBlock<T>>>,
}

impl<T: DElement> std::fmt::Debug for SparseDArray<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseDArray")
            .field("dtype", &T::DTYPE)
            .field("shape", &[self.rows, self.cols])
            .field("block_rows", &self.block_rows)
            .finish()
    }
}

impl<T: DElement> SparseDArray<T> {
    fn spawn_blocks(
        rt: &Runtime,
        rows: usize,
        cols: usize,
        block_rows: usize,
        spawn: impl Fn(Range<usize>) -> Ref<CsrBlock<T>>,
    ) -> Result<SparseDArray<T>> {
        if cols > u32::MAX as usize {
            return Err(ArrayError::TooLarge { shape: vec![rows, cols] }.into());
        }
        let grid = ChunkGrid::new(&[rows], &[block_rows])?;
        let blocks = (0..grid.num_chunks()).map(|b| spawn(grid.region(b)[0].clone())).collect();
        Ok(SparseDArray { rt: rt.clone(), rows, cols, block_rows: grid.chunk_shape()[0], blocks })
    }

    /// The 5-point Laplacian of an `n×n` grid (`n²` rows, about 5 nonzeros a row), in
    /// blocks of `block_rows` rows, each made by a task.
    ///
    /// # Errors
    /// [`ArrayError::BadChunkShape`] for 0 rows a block; [`ArrayError::TooLarge`].
    pub fn poisson_2d(rt: &Runtime, n: usize, block_rows: usize) -> Result<SparseDArray<T>> {
        let rows = n.checked_mul(n).ok_or(ArrayError::TooLarge { shape: vec![n, n] })?;
        Self::spawn_blocks(rt, rows, rows, block_rows, |range| T::spawn_poisson(rt, n, range))
    }

    /// A random `rows×cols` matrix with `per_row` nonzeros in each row (distinct columns,
    /// values uniform in [-1, 1)), from `seed`; the same for any block size.
    ///
    /// # Errors
    /// As [`poisson_2d`](SparseDArray::poisson_2d).
    pub fn random(
        rt: &Runtime,
        shape: [usize; 2],
        per_row: usize,
        seed: u64,
        block_rows: usize,
    ) -> Result<SparseDArray<T>> {
        let [rows, cols] = shape;
        Self::spawn_blocks(rt, rows, cols, block_rows, |range| {
            T::spawn_random_sparse(rt, cols, per_row, seed, range)
        })
    }

    /// Cuts a `sprs` matrix (CSR or CSC) into blocks of `block_rows` rows, put in this
    /// process's object table.
    ///
    /// # Errors
    /// As [`poisson_2d`](SparseDArray::poisson_2d).
    pub fn from_csr(rt: &Runtime, matrix: &sprs::CsMat<T>, block_rows: usize) -> Result<SparseDArray<T>> {
        let csr = if matrix.is_csr() {
            std::borrow::Cow::Borrowed(matrix)
        } else {
            std::borrow::Cow::Owned(matrix.to_csr())
        };
        let (rows, cols) = csr.shape();
        Self::spawn_blocks(rt, rows, cols, block_rows, |range| {
            let block = CsrBlock::from_rows(range.len(), cols, |r, out| {
                if let Some(row) = csr.outer_view(range.start + r) {
                    out.extend(row.iter().map(|(c, &v)| (c as u32, v)));
                }
            });
            rt.put(block)
        })
    }

    /// The runtime and the blocks, for moving them onto devices.
    #[cfg(feature = "cuda")]
    pub(crate) fn parts(&self) -> (&Runtime, &[Ref<CsrBlock<T>>]) {
        (&self.rt, &self.blocks)
    }

    /// The matrix's shape.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Rows per block (the last block may have fewer).
    pub fn block_rows(&self) -> usize {
        self.block_rows
    }

    /// How many blocks there are.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The product with a dense vector (1-dimensional, `cols` long) or matrix (`cols×k`):
    /// one task per block, each given the whole of `x` (rechunked into one chunk first if
    /// it is in several). The result has this matrix's blocks of rows as its chunks.
    ///
    /// # Errors
    /// [`ArrayError::ShapeMismatch`] unless `x` has `cols` rows.
    pub fn matmul(&self, x: &DArray<T>) -> Result<DArray<T>> {
        let fits = matches!(x.shape(), [n] | [n, _] if *n == self.cols);
        if !fits {
            return Err(ArrayError::ShapeMismatch {
                op: "sparse matmul",
                left: vec![self.rows, self.cols],
                right: x.shape().to_vec(),
            }
            .into());
        }
        let whole = x.rechunk(&x.shape().iter().map(|&d| d.max(1)).collect::<Vec<_>>())?;
        let (shape, chunk) = match x.shape() {
            [_] => (vec![self.rows], vec![self.block_rows]),
            [_, k] => (vec![self.rows, *k], vec![self.block_rows, (*k).max(1)]),
            _ => unreachable!("checked above"),
        };
        let grid = ChunkGrid::new(&shape, &chunk)?;
        let x_chunk = whole.chunk_refs().first().cloned();
        let chunks = match x_chunk {
            Some(x_chunk) => self.blocks.iter().map(|b| T::spawn_spmm(&self.rt, b, &x_chunk)).collect(),
            // `x` is empty (0 columns): so is every block of the product.
            None => (0..grid.num_chunks())
                .map(|c| self.rt.put(Chunk::zeros(grid.region(c).iter().map(|r| r.len()).collect())))
                .collect(),
        };
        Ok(DArray::from_parts(&self.rt, grid, chunks))
    }

    /// The product of this matrix's transpose with a dense vector (`rows` long) or matrix
    /// (`rows×k`), `Aᵀ·y`, without forming `Aᵀ`: `y` is cut like this matrix's blocks of
    /// rows, one task per block computes `blockᵀ · y_block` (a `cols`-row partial), and a
    /// tree of tasks sums the partials. The result is one chunk of `cols` rows. With
    /// [`matmul`](SparseDArray::matmul) this gives gradients of linear models on sparse
    /// features (`Xᵀ(Xw − y)`).
    ///
    /// # Errors
    /// [`ArrayError::ShapeMismatch`] unless `y` has `rows` rows.
    pub fn t_matmul(&self, y: &DArray<T>) -> Result<DArray<T>> {
        let fits = matches!(y.shape(), [n] | [n, _] if *n == self.rows);
        if !fits {
            return Err(ArrayError::ShapeMismatch {
                op: "transposed sparse matmul",
                left: vec![self.cols, self.rows],
                right: y.shape().to_vec(),
            }
            .into());
        }
        let (shape, chunk, y_chunk) = match y.shape() {
            [_] => (vec![self.cols], vec![self.cols.max(1)], vec![self.block_rows]),
            [_, k] => {
                (vec![self.cols, *k], vec![self.cols.max(1), (*k).max(1)], vec![self.block_rows, (*k).max(1)])
            }
            _ => unreachable!("checked above"),
        };
        let grid = ChunkGrid::new(&shape, &chunk)?;
        let aligned = y.rechunk(&y_chunk)?;
        let partials: Vec<Ref<Chunk<T>>> = self
            .blocks
            .iter()
            .zip(aligned.chunk_refs())
            .map(|(block, part)| T::spawn_spmm_t(&self.rt, block, part))
            .collect();
        let total = tree(partials, |a, b| T::spawn_zip(&self.rt, a, b, super::BinaryOp::Add))
            // No rows: the product is all zeros.
            .unwrap_or_else(|| self.rt.put(Chunk::zeros(shape.clone())));
        Ok(DArray::from_parts(&self.rt, grid, vec![total]))
    }

    /// The sparse product `self · other` of an `m×k` and a `k×n` sparse matrix: `other`'s
    /// blocks are stacked into one by a tree of tasks, then one task per block of `self`
    /// multiplies it (Gustavson's algorithm). The result has `self`'s blocks of rows.
    ///
    /// # Errors
    /// [`ArrayError::ShapeMismatch`] unless `other` has `k` rows.
    pub fn matmul_sparse(&self, other: &SparseDArray<T>) -> Result<SparseDArray<T>> {
        if other.rows != self.cols {
            return Err(ArrayError::ShapeMismatch {
                op: "sparse × sparse matmul",
                left: vec![self.rows, self.cols],
                right: vec![other.rows, other.cols],
            }
            .into());
        }
        // `other`'s blocks stacked without copying them (each stays where it was made until
        // a product task needs it).
        let parts = other.blocks.iter().map(|block| T::spawn_stack_of(&self.rt, block)).collect();
        let whole = tree(parts, |top, bottom| T::spawn_stack(&self.rt, top, bottom))
            // `other` has no rows (k = 0): every product row is empty.
            .unwrap_or_else(|| self.rt.put(CsrStack { cols: other.cols, parts: Vec::new() }));
        let blocks = self.blocks.iter().map(|block| T::spawn_spgemm(&self.rt, block, &whole)).collect();
        Ok(SparseDArray {
            rt: self.rt.clone(),
            rows: self.rows,
            cols: other.cols,
            block_rows: self.block_rows,
            blocks,
        })
    }

    /// Waits until every block is made, leaving each where it is.
    ///
    /// # Errors
    /// The first failed block's error.
    pub fn wait(&self) -> Result<()> {
        self.blocks.iter().try_for_each(|b| b.blocking_wait_done())
    }

    /// Saves the matrix as a new version of `name`: every block as an entry of its own
    /// (`name/block/N`), written by the node that holds it (so block bytes do not pass
    /// through this process) several at a time, then a manifest naming each block's exact
    /// version as `name` itself, with `tags`. The manifest is written last, so a reader
    /// sees the new version whole or not at all; blocks that did not change since the
    /// last save cost no new blob bytes.
    ///
    /// # Errors
    /// A failed block's error, [`Error::Store`], or [`Error::Cluster`] if a holder is lost.
    pub fn save(&self, stash: &Stash, name: &str, tags: &[(&str, &str)]) -> Result<Version> {
        let names: Vec<String> = (0..self.blocks.len()).map(|b| format!("{name}/block/{b}")).collect();
        let versions = parallel(self.blocks.len(), |b| {
            crate::actors::save_ref(self.rt.core(), stash, &names[b], &self.blocks[b], &[])
        })?;
        let manifest = SparseManifest {
            dtype: T::DTYPE,
            rows: self.rows,
            cols: self.cols,
            block_rows: self.block_rows,
            blocks: names.into_iter().zip(versions).collect(),
        };
        stash.save(name, &manifest, tags).map_err(store_error)
    }

    /// Loads the latest version of `name` saved by [`save`](SparseDArray::save), with its
    /// blocks, into this process's object table.
    ///
    /// # Errors
    /// [`ArrayError::NotADArray`] if `name` is not a saved sparse matrix of `T` (or its
    /// blocks do not fit its shape); [`Error::Store`] if reading fails, or if `name`
    /// holds something else (the error names the stored type).
    pub fn load(rt: &Runtime, stash: &Stash, name: &str) -> Result<SparseDArray<T>> {
        let manifest: SparseManifest = stash.load(name).map_err(store_error)?;
        Self::from_manifest(rt, stash, name, manifest)
    }

    /// Loads one version of `name`.
    ///
    /// # Errors
    /// As [`load`](SparseDArray::load).
    pub fn load_version(
        rt: &Runtime,
        stash: &Stash,
        name: &str,
        version: Version,
    ) -> Result<SparseDArray<T>> {
        let manifest: SparseManifest = stash.load_version(name, version).map_err(store_error)?;
        Self::from_manifest(rt, stash, name, manifest)
    }

    fn from_manifest(
        rt: &Runtime,
        stash: &Stash,
        name: &str,
        manifest: SparseManifest,
    ) -> Result<SparseDArray<T>> {
        let not_ours = |reason: String| ArrayError::NotADArray {
            name: name.to_string(),
            expected: std::any::type_name::<SparseDArray<T>>(),
            reason,
        };
        if manifest.dtype != T::DTYPE {
            return Err(not_ours(format!("its elements are {}", manifest.dtype)).into());
        }
        let grid = ChunkGrid::new(&[manifest.rows], &[manifest.block_rows])?;
        if grid.num_chunks() != manifest.blocks.len() || manifest.cols > u32::MAX as usize {
            let reason = format!(
                "{} blocks listed for {} rows in blocks of {}",
                manifest.blocks.len(),
                manifest.rows,
                manifest.block_rows
            );
            return Err(not_ours(reason).into());
        }
        let blocks = parallel(manifest.blocks.len(), |b| {
            let (entry, version) = &manifest.blocks[b];
            let block: CsrBlock<T> = stash.load_version(entry, *version).map_err(store_error)?;
            let rows = grid.region(b)[0].len();
            if block.rows != rows || block.cols != manifest.cols {
                let reason =
                    format!("`{entry}` is {}×{}, not {rows}×{}", block.rows, block.cols, manifest.cols);
                return Err(not_ours(reason).into());
            }
            Ok(rt.put(block))
        })?;
        Ok(SparseDArray {
            rt: rt.clone(),
            rows: manifest.rows,
            cols: manifest.cols,
            block_rows: grid.chunk_shape()[0],
            blocks,
        })
    }

    /// Gathers the whole matrix into this process as a `sprs` CSR matrix.
    ///
    /// # Errors
    /// A failed block's error, or the error of pulling it from its holder.
    pub fn to_csr(&self) -> Result<sprs::CsMat<T>> {
        let (mut offsets, mut indices, mut values) = (vec![0usize], Vec::new(), Vec::new());
        for b in &self.blocks {
            let block = b.blocking_get()?;
            let base = indices.len();
            offsets.extend(block.offsets[1..].iter().map(|&o| base + o as usize));
            indices.extend(block.indices.iter().map(|&c| c as usize));
            values.extend_from_slice(&block.values);
        }
        sprs::CsMat::try_new((self.rows, self.cols), offsets, indices, values)
            .map_err(|(_, _, _, e)| Error::from(ArrayError::BadSparse { reason: e.to_string() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(block: &UncheckedParts) -> Result<CsrBlock<f32>, String> {
        let raw = (
            block.rows,
            block.cols,
            serde_bytes::ByteBuf::from(le_bytes(&block.offsets).into_owned()),
            serde_bytes::ByteBuf::from(le_bytes(&block.indices).into_owned()),
            serde_bytes::ByteBuf::from(le_bytes(&block.values).into_owned()),
        );
        let bytes =
            bincode::serde::encode_to_vec(&raw, bincode::config::standard()).map_err(|e| e.to_string())?;
        bincode::serde::decode_from_slice::<CsrBlock<f32>, _>(&bytes, bincode::config::standard())
            .map(|(b, _)| b)
            .map_err(|e| e.to_string())
    }

    #[derive(Clone)]
    struct UncheckedParts {
        rows: usize,
        cols: usize,
        offsets: Vec<u64>,
        indices: Vec<u32>,
        values: Vec<f32>,
    }

    #[test]
    fn blocks_round_trip_through_their_encoding() {
        let block: CsrBlock<f64> = random_block(50, 4, 3, 10..30);
        let bytes = bincode::serde::encode_to_vec(&block, bincode::config::standard()).unwrap();
        // Raw arrays: 21 offsets, 80 indices and 80 values, plus a few bytes of lengths.
        assert!(bytes.len() < 21 * 8 + 80 * (4 + 8) + 16, "{} bytes", bytes.len());
        let (back, _): (CsrBlock<f64>, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, block);
        let truncated = &bytes[..bytes.len() - 3];
        assert!(bincode::serde::decode_from_slice::<CsrBlock<f64>, _>(
            truncated,
            bincode::config::standard()
        )
        .is_err());
        let ragged = (
            1usize,
            1usize,
            serde_bytes::ByteBuf::from(vec![0u8; 12]),
            serde_bytes::ByteBuf::new(),
            serde_bytes::ByteBuf::new(),
        );
        let bytes = bincode::serde::encode_to_vec(&ragged, bincode::config::standard()).unwrap();
        let error =
            bincode::serde::decode_from_slice::<CsrBlock<f64>, _>(&bytes, bincode::config::standard())
                .unwrap_err();
        assert!(error.to_string().contains("whole number"), "{error}");
    }

    #[test]
    fn malformed_blocks_are_refused_when_decoded() {
        let good = UncheckedParts {
            rows: 2,
            cols: 3,
            offsets: vec![0, 1, 3],
            indices: vec![2, 0, 1],
            values: vec![1.0; 3],
        };
        assert_eq!(*decode(&good).unwrap().indices, vec![2, 0, 1]);
        let cases = [
            (UncheckedParts { indices: vec![2, 0, 3], ..good.clone() }, "column 3"),
            (UncheckedParts { offsets: vec![0, 2, 1], ..good.clone() }, "decrease"),
            (UncheckedParts { offsets: vec![0, 3], ..good.clone() }, "offsets for 2 rows"),
            (UncheckedParts { values: vec![1.0; 2], ..good.clone() }, "3 nonzeros announced"),
            (UncheckedParts { offsets: vec![1, 1, 3], ..good.clone() }, "offsets for 2 rows"),
        ];
        for (bad, words) in cases {
            let error = decode(&bad).unwrap_err();
            assert!(error.contains(words), "{error}");
        }
    }

    #[test]
    fn poisson_rows_sum_to_the_boundary_terms() {
        let block: CsrBlock<f64> = poisson_block(4, 0..16);
        assert_eq!(block.indices.len(), 5 * 16 - 4 * 4);
        let ones = Chunk { shape: vec![16], data: vec![1.0; 16].into() };
        let sums = spmm(&block, &ones).unwrap().data.to_vec();
        // Corners have 2 neighbours, edges 3, the interior 4.
        assert_eq!(&sums[..4], &[2.0, 1.0, 1.0, 2.0]);
        assert_eq!(sums[5], 0.0);
    }

    /// `parts` stacked as `matmul_sparse` stacks a right operand's blocks.
    fn stacked(parts: Vec<CsrBlock<f64>>) -> CsrStack<f64> {
        parts
            .into_iter()
            .map(CsrStack::of)
            .reduce(|top, bottom| CsrStack::stack(top, bottom).unwrap())
            .unwrap()
    }

    #[test]
    fn a_product_reads_its_right_operand_across_stacked_parts() {
        let n = 6;
        let whole: CsrBlock<f64> = poisson_block(n, 0..n * n);
        let a: CsrBlock<f64> = random_block(n * n, 7, 11, 0..20);
        let expected = spgemm(&a, &stacked(vec![whole.clone()])).unwrap();
        // Uneven parts, one of them empty, and the rows of `a` jumping between parts.
        let parts = vec![
            poisson_block(n, 0..5),
            poisson_block(n, 5..5),
            poisson_block(n, 5..17),
            poisson_block(n, 17..36),
        ];
        let product = spgemm(&a, &stacked(parts)).unwrap();
        assert_eq!(product, expected);
        // Each row's columns ascend, and the values are those of the dense product.
        let dense = |m: &CsrBlock<f64>| {
            let mut d = vec![vec![0.0; m.cols]; m.rows];
            for (r, row) in d.iter_mut().enumerate() {
                for i in m.offsets[r] as usize..m.offsets[r + 1] as usize {
                    row[m.indices[i] as usize] += m.values[i];
                }
            }
            d
        };
        let (da, dw) = (dense(&a), dense(&whole));
        for (r, row) in dense(&product).iter().enumerate() {
            let columns = &product.indices[product.offsets[r] as usize..product.offsets[r + 1] as usize];
            assert!(columns.windows(2).all(|w| w[0] < w[1]), "row {r}: {columns:?}");
            for (c, &got) in row.iter().enumerate() {
                let want: f64 = (0..n * n).map(|k| da[r][k] * dw[k][c]).sum();
                assert!((got - want).abs() < 1e-12, "({r}, {c}): {got} vs {want}");
            }
        }
        let short = stacked(vec![poisson_block(n, 0..30)]);
        let error = spgemm(&a, &short).unwrap_err();
        assert!(error.to_string().contains("[30, 36]"), "{error}");
    }

    #[test]
    fn stacks_round_trip_and_refuse_parts_of_another_width() {
        let stack = stacked(vec![poisson_block(4, 0..6), random_block(16, 3, 5, 6..16)]);
        let bytes = bincode::serde::encode_to_vec(&stack, bincode::config::standard()).unwrap();
        let (back, _): (CsrStack<f64>, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, stack);
        let narrow: CsrBlock<f64> = random_block(15, 3, 5, 0..4);
        let bad = (16usize, vec![poisson_block::<f64>(4, 0..6), narrow.clone()]);
        let bytes = bincode::serde::encode_to_vec(&bad, bincode::config::standard()).unwrap();
        let error =
            bincode::serde::decode_from_slice::<CsrStack<f64>, _>(&bytes, bincode::config::standard())
                .unwrap_err();
        assert!(error.to_string().contains("a part of 15 columns in a stack of 16"), "{error}");
        let error = CsrStack::stack(stack, CsrStack::of(narrow)).unwrap_err();
        assert!(matches!(error, ArrayError::ShapeMismatch { .. }), "{error}");
    }
}
