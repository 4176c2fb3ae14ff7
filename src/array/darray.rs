//! `DArray<T>`: the distributed array handle (a chunk grid and one `Ref` per chunk), the
//! task graphs of its operations, gathering, and saving to and loading from a stash.
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use ndarray::{ArrayBase, ArrayD, Data, Dimension, IxDyn};
use serde::{Deserialize, Serialize};

use super::chunk::{self, Chunk};
use super::ops::{BinaryOp, DElement, Fill, ReduceOp, UnaryOp};
use super::{ArrayError, ChunkGrid};
use crate::{Dtype, Error, Ref, Result, Runtime, Stash, TransferKind, Version};

/// An n-dimensional array of `T` cut into a grid of chunks, each a [`Ref`] held where
/// the task that made it ran. Operations return at once with a new `DArray` whose chunks
/// are being computed; errors of chunk tasks surface when the result is read
/// ([`to_array`](DArray::to_array), [`wait`](DArray::wait)).
///
/// Cloning is cheap (the chunks are shared); a chunk is freed when no `DArray` and no
/// pending task holds it.
#[derive(Clone)]
pub struct DArray<T: DElement> {
    rt: Runtime,
    grid: ChunkGrid,
    /// One per chunk, in row-major grid order.
    chunks: Vec<Ref<Chunk<T>>>,
}

impl<T: DElement> std::fmt::Debug for DArray<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DArray")
            .field("dtype", &T::DTYPE)
            .field("shape", &self.grid.shape())
            .field("chunk", &self.grid.chunk_shape())
            .finish()
    }
}

/// What a saved DArray's manifest records: its grid and the exact version of each
/// chunk's entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    dtype: Dtype,
    shape: Vec<usize>,
    chunk: Vec<usize>,
    chunks: Vec<(String, Version)>,
}

/// How many chunks one call saves or loads at once.
const PARALLEL_TRANSFERS: usize = 8;

impl<T: DElement> DArray<T> {
    /// An array of `shape` in chunks of `chunk`, every element made by `fill`, each chunk
    /// by a task of its own (so on a cluster, on the nodes).
    ///
    /// # Errors
    /// [`ArrayError::BadChunkShape`] or [`ArrayError::TooLarge`] (as [`Error::Array`]).
    pub fn fill(rt: &Runtime, shape: &[usize], chunk: &[usize], fill: Fill) -> Result<DArray<T>> {
        let grid = ChunkGrid::new(shape, chunk)?;
        let chunks =
            (0..grid.num_chunks()).map(|c| T::spawn_fill(rt, shape.to_vec(), grid.region(c), fill)).collect();
        Ok(DArray { rt: rt.clone(), grid, chunks })
    }

    /// An array of zeros.
    ///
    /// # Errors
    /// As [`fill`](DArray::fill).
    pub fn zeros(rt: &Runtime, shape: &[usize], chunk: &[usize]) -> Result<DArray<T>> {
        Self::fill(rt, shape, chunk, Fill::Zeros)
    }

    /// Cuts a local array into chunks of `chunk`, each put in this process's object table.
    ///
    /// # Errors
    /// As [`fill`](DArray::fill).
    pub fn from_array<S, D>(rt: &Runtime, array: &ArrayBase<S, D>, chunk: &[usize]) -> Result<DArray<T>>
    where
        S: Data<Elem = T>,
        D: Dimension,
    {
        let grid = ChunkGrid::new(array.shape(), chunk)?;
        let standard = array.as_standard_layout();
        let data = standard.as_slice().unwrap_or_default();
        let chunks = (0..grid.num_chunks())
            .map(|c| {
                let region = grid.region(c);
                let mut out = Chunk::zeros(region.iter().map(|r| r.end - r.start).collect());
                let start: Vec<usize> = region.iter().map(|r| r.start).collect();
                let zero = vec![0; start.len()];
                let extent = out.shape.clone();
                chunk::copy_block(data, grid.shape(), &start, &mut out.data, &extent, &zero, &extent);
                rt.put(out)
            })
            .collect();
        Ok(DArray { rt: rt.clone(), grid, chunks })
    }

    /// The bytes of its elements.
    fn byte_len(&self) -> u64 {
        (self.grid.len() * std::mem::size_of::<T>()) as u64
    }

    /// The bytes of chunk `c`'s elements.
    fn chunk_bytes(&self, c: usize) -> usize {
        self.grid.region(c).iter().map(|r| r.len()).product::<usize>() * std::mem::size_of::<T>()
    }

    /// An array of `grid` over `chunks` (one per chunk, row-major), made by other modules.
    pub(crate) fn from_parts(rt: &Runtime, grid: ChunkGrid, chunks: Vec<Ref<Chunk<T>>>) -> DArray<T> {
        debug_assert_eq!(grid.num_chunks(), chunks.len());
        DArray { rt: rt.clone(), grid, chunks }
    }

    /// The chunks, row-major.
    /// The runtime its chunk tasks run on.
    #[cfg(feature = "cuda")]
    pub(crate) fn runtime(&self) -> &Runtime {
        &self.rt
    }

    pub(crate) fn chunk_refs(&self) -> &[Ref<Chunk<T>>] {
        &self.chunks
    }

    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        self.grid.shape()
    }

    /// How the array is cut into chunks.
    pub fn grid(&self) -> &ChunkGrid {
        &self.grid
    }

    /// How many elements it holds.
    pub fn len(&self) -> usize {
        self.grid.len()
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.grid.is_empty()
    }

    /// `op` applied to every element.
    #[must_use]
    pub fn map(&self, op: UnaryOp) -> DArray<T> {
        let chunks = self.chunks.iter().map(|c| T::spawn_map(&self.rt, c, op)).collect();
        DArray { rt: self.rt.clone(), grid: self.grid.clone(), chunks }
    }

    /// `self op other`, element by element. `other` is rechunked to `self`'s grid first if
    /// its chunks differ.
    ///
    /// # Errors
    /// [`ArrayError::ShapeMismatch`] if the shapes differ (there is no broadcasting).
    pub fn zip(&self, other: &DArray<T>, op: BinaryOp) -> Result<DArray<T>> {
        if self.shape() != other.shape() {
            return Err(mismatch("zip", self.shape(), other.shape()));
        }
        let aligned = other.rechunk(self.grid.chunk_shape())?;
        let chunks =
            self.chunks.iter().zip(&aligned.chunks).map(|(a, b)| T::spawn_zip(&self.rt, a, b, op)).collect();
        Ok(DArray { rt: self.rt.clone(), grid: self.grid.clone(), chunks })
    }

    /// The reduction of all elements by `op`: one task per chunk, then a tree of
    /// combining tasks.
    ///
    /// # Errors
    /// [`ArrayError::Empty`] for min or max of an empty array.
    pub fn reduce(&self, op: ReduceOp) -> Result<Ref<T>> {
        let per_chunk: Vec<Ref<Option<T>>> =
            self.chunks.iter().map(|c| T::spawn_reduce(&self.rt, c, op)).collect();
        match tree(per_chunk, |a, b| T::spawn_combine(&self.rt, a, b, op)) {
            Some(total) => Ok(T::spawn_total(&self.rt, &total, op)),
            None => match op {
                ReduceOp::Sum => Ok(self.rt.put(T::from_f64(0.0))),
                _ => Err(ArrayError::Empty { op }.into()),
            },
        }
    }

    /// The matrix product `self · other` of an `m×k` and a `k×n` array, tile by tile: the
    /// products of matching tiles run in parallel and are summed by a tree of tasks. The
    /// result has `self`'s row chunks and `other`'s column chunks; `other` is rechunked
    /// first if its row chunks differ from `self`'s column chunks.
    ///
    /// # Errors
    /// [`ArrayError::RankMismatch`] unless both are 2-dimensional;
    /// [`ArrayError::ShapeMismatch`] if the inner dimensions differ.
    pub fn matmul(&self, other: &DArray<T>) -> Result<DArray<T>> {
        let rank = self.shape().len().max(other.shape().len());
        if self.shape().len() != 2 || other.shape().len() != 2 {
            return Err(ArrayError::RankMismatch { op: "matmul", expected: 2, got: rank }.into());
        }
        let (m, k, n) = (self.shape()[0], self.shape()[1], other.shape()[1]);
        if other.shape()[0] != k {
            return Err(mismatch("matmul", self.shape(), other.shape()));
        }
        let inner = self.grid.chunk_shape()[1];
        let other = other.rechunk(&[inner, other.grid.chunk_shape()[1]])?;
        let (grid, [rows, depth, cols]) = self.grid.product_tiles(&other.grid)?;
        let mut chunks = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for j in 0..cols {
                let mut terms: Vec<Ref<Chunk<T>>> = (0..depth)
                    .map(|p| {
                        T::spawn_matmul(&self.rt, &self.chunks[i * depth + p], &other.chunks[p * cols + j])
                    })
                    .collect();
                if terms.is_empty() {
                    // k = 0: the product is all zeros.
                    let region = grid.region(grid.linear(&[i, j]));
                    terms.push(T::spawn_fill(&self.rt, vec![m, n], region, Fill::Zeros));
                }
                chunks.extend(tree(terms, |a, b| T::spawn_zip(&self.rt, a, b, BinaryOp::Add)));
            }
        }
        Ok(DArray { rt: self.rt.clone(), grid, chunks })
    }

    /// The transpose of a 2-dimensional array: chunk `(i, j)` of the result is the
    /// transposed chunk `(j, i)`, made by a task where that chunk is.
    ///
    /// # Errors
    /// [`ArrayError::RankMismatch`] unless the array is 2-dimensional.
    pub fn transpose(&self) -> Result<DArray<T>> {
        let (grid, sources) = self.grid.transposed()?;
        let chunks =
            sources.iter().map(|&source| T::spawn_transpose(&self.rt, &self.chunks[source])).collect();
        Ok(DArray { rt: self.rt.clone(), grid, chunks })
    }

    /// The part of the array in `ranges` (one per dimension), in chunks of the same shape
    /// as this array's. A chunk of the result that is a whole chunk of this array shares
    /// it; the others are assembled by tasks from the chunks they overlap.
    ///
    /// # Errors
    /// [`ArrayError::SliceOutOfBounds`] if a range is reversed or reaches past the shape,
    /// or if there is not one range per dimension.
    pub fn slice(&self, ranges: &[Range<usize>]) -> Result<DArray<T>> {
        let fits = ranges.len() == self.shape().len()
            && ranges.iter().zip(self.shape()).all(|(r, &d)| r.start <= r.end && r.end <= d);
        if !fits {
            return Err(ArrayError::SliceOutOfBounds {
                ranges: ranges.to_vec(),
                shape: self.shape().to_vec(),
            }
            .into());
        }
        let shape: Vec<usize> = ranges.iter().map(|r| r.end - r.start).collect();
        let grid = ChunkGrid::new(&shape, self.grid.chunk_shape())?;
        let offset: Vec<usize> = ranges.iter().map(|r| r.start).collect();
        Ok(self.assemble(grid, &offset))
    }

    /// The same array in chunks of `chunk`. Returns a copy sharing every chunk when the
    /// grid does not change.
    ///
    /// # Errors
    /// [`ArrayError::BadChunkShape`] for a chunk shape of another rank or with a 0.
    pub fn rechunk(&self, chunk: &[usize]) -> Result<DArray<T>> {
        let grid = ChunkGrid::new(self.shape(), chunk)?;
        if grid == self.grid {
            return Ok(self.clone());
        }
        Ok(self.assemble(grid, &vec![0; chunk.len()]))
    }

    /// An array over `grid` whose element at `i` is this array's element at `offset + i`:
    /// each new chunk is a chunk of this array when their regions match, or else an
    /// `extract` from the first chunk it overlaps followed by a `paste` from each other one.
    fn assemble(&self, grid: ChunkGrid, offset: &[usize]) -> DArray<T> {
        let chunks = (0..grid.num_chunks())
            .map(|c| {
                let target: Vec<Range<usize>> =
                    grid.region(c).iter().zip(offset).map(|(r, &o)| r.start + o..r.end + o).collect();
                let shape: Vec<usize> = target.iter().map(|r| r.end - r.start).collect();
                let mut built: Option<Ref<Chunk<T>>> = None;
                for (source, overlap) in self.grid.overlapping(&target) {
                    let source_region = self.grid.region(source);
                    if source_region == target {
                        built = Some(self.chunks[source].clone());
                        break;
                    }
                    let from: Vec<Range<usize>> = overlap
                        .iter()
                        .zip(&source_region)
                        .map(|(o, s)| o.start - s.start..o.end - s.start)
                        .collect();
                    let at: Vec<usize> =
                        overlap.iter().zip(&target).map(|(o, t)| o.start - t.start).collect();
                    let src = &self.chunks[source];
                    built = Some(match built {
                        None => T::spawn_extract(&self.rt, src, from, shape.clone(), at),
                        Some(dst) => T::spawn_paste(&self.rt, &dst, src, from, at),
                    });
                }
                // Only an empty target overlaps nothing.
                built.unwrap_or_else(|| self.rt.put(Chunk::zeros(shape)))
            })
            .collect();
        DArray { rt: self.rt.clone(), grid, chunks }
    }

    /// Waits until every chunk is computed, leaving each where it is.
    ///
    /// # Errors
    /// The first failed chunk's error (with its cause chain).
    pub fn wait(&self) -> Result<()> {
        self.chunks.iter().try_for_each(|c| c.blocking_wait_done())
    }

    /// Gathers the whole array into this process.
    ///
    /// # Errors
    /// A failed chunk's error, or the error of pulling it from its holder.
    pub fn to_array(&self) -> Result<ArrayD<T>> {
        let mut out = ArrayD::from_elem(IxDyn(self.shape()), T::default());
        let data = out.as_slice_mut().ok_or(Error::TypeMismatch { expected: "a standard-layout array" })?;
        for (c, r) in self.chunks.iter().enumerate() {
            let chunk = r.blocking_get()?;
            let start: Vec<usize> = self.grid.region(c).iter().map(|r| r.start).collect();
            let zero = vec![0; start.len()];
            if chunk.shape.iter().zip(self.grid.region(c)).any(|(&d, r)| d != r.end - r.start) {
                return Err(mismatch("gather", &chunk.shape, self.grid.chunk_shape()));
            }
            chunk::copy_block(
                &chunk.data,
                &chunk.shape,
                &zero,
                data,
                self.grid.shape(),
                &start,
                &chunk.shape,
            );
        }
        Ok(out)
    }

    /// Saves the array as a new version of `name`: every chunk as an entry of its own
    /// (`name/chunk/N`), written by the node that holds it (so chunk bytes do not pass
    /// through this process) several at a time, then a manifest naming each chunk's exact
    /// version as `name` itself, with `tags`. The manifest is written last, so a reader
    /// sees the new version whole or not at all. Chunks that did not change since the last
    /// save cost no new blob bytes (the stash is content-addressed).
    ///
    /// On a cluster, nodes must reach the same stash (the same directory, S3 or
    /// PostgreSQL URL). The stash's [`with_progress`](Stash::with_progress) observer is
    /// told after each chunk, under `name`, with the bytes of the chunks saved so far.
    ///
    /// # Errors
    /// A failed chunk's error, [`Error::Store`], or [`Error::Cluster`] if a holder is lost.
    pub fn save(&self, stash: &Stash, name: &str, tags: &[(&str, &str)]) -> Result<Version> {
        let names: Vec<String> = (0..self.chunks.len()).map(|c| format!("{name}/chunk/{c}")).collect();
        let (total, done) = (self.byte_len(), AtomicU64::new(0));
        let versions = parallel(self.chunks.len(), |c| {
            let version = crate::actors::save_ref(self.rt.core(), stash, &names[c], &self.chunks[c], &[])?;
            stash.notify(TransferKind::Save, name, &done, self.chunk_bytes(c), total);
            Ok(version)
        })?;
        let manifest = Manifest {
            dtype: T::DTYPE,
            shape: self.shape().to_vec(),
            chunk: self.grid.chunk_shape().to_vec(),
            chunks: names.into_iter().zip(versions).collect(),
        };
        stash.save(name, &manifest, tags).map_err(store_error)
    }

    /// Loads the latest version of `name` saved by [`save`](DArray::save), with its
    /// chunks, into this process's object table (telling the stash's progress observer
    /// after each chunk, as [`save`](DArray::save) does).
    ///
    /// # Errors
    /// [`ArrayError::NotADArray`] if `name` is not a saved DArray of `T`;
    /// [`Error::Store`] if reading fails.
    pub fn load(rt: &Runtime, stash: &Stash, name: &str) -> Result<DArray<T>> {
        let manifest: Manifest = stash.load(name).map_err(store_error)?;
        Self::from_manifest(rt, stash, name, manifest)
    }

    /// Loads one version of `name`.
    ///
    /// # Errors
    /// As [`load`](DArray::load).
    pub fn load_version(rt: &Runtime, stash: &Stash, name: &str, version: Version) -> Result<DArray<T>> {
        let manifest: Manifest = stash.load_version(name, version).map_err(store_error)?;
        Self::from_manifest(rt, stash, name, manifest)
    }

    fn from_manifest(rt: &Runtime, stash: &Stash, name: &str, manifest: Manifest) -> Result<DArray<T>> {
        let not_ours = |reason: String| ArrayError::NotADArray {
            name: name.to_string(),
            expected: std::any::type_name::<T>(),
            reason,
        };
        if manifest.dtype != T::DTYPE {
            return Err(not_ours(format!("its elements are {}", manifest.dtype)).into());
        }
        let grid = ChunkGrid::new(&manifest.shape, &manifest.chunk)?;
        if grid.num_chunks() != manifest.chunks.len() {
            let reason = format!("{} chunks listed, {} expected", manifest.chunks.len(), grid.num_chunks());
            return Err(not_ours(reason).into());
        }
        let (total, done) = ((grid.len() * std::mem::size_of::<T>()) as u64, AtomicU64::new(0));
        let chunks = parallel(manifest.chunks.len(), |c| {
            let (entry, version) = &manifest.chunks[c];
            let chunk: Chunk<T> = stash.load_version(entry, *version).map_err(store_error)?;
            let expected: Vec<usize> = grid.region(c).iter().map(|r| r.end - r.start).collect();
            if chunk.shape != expected {
                return Err(
                    not_ours(format!("`{entry}` has shape {:?}, not {expected:?}", chunk.shape)).into()
                );
            }
            stash.notify(TransferKind::Load, name, &done, chunk.data.len() * std::mem::size_of::<T>(), total);
            Ok(rt.put(chunk))
        })?;
        Ok(DArray { rt: rt.clone(), grid, chunks })
    }
}

/// Combines `level` pairwise, level by level, into one `Ref` (a tree of `combine` tasks of
/// depth log₂ of its length); `None` for an empty level.
pub(super) fn tree<V>(
    mut level: Vec<Ref<V>>,
    combine: impl Fn(&Ref<V>, &Ref<V>) -> Ref<V>,
) -> Option<Ref<V>> {
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => combine(a, b),
                [a] => a.clone(),
                _ => unreachable!("chunks(2) yields one or two"),
            })
            .collect();
    }
    level.pop()
}

fn mismatch(op: &'static str, left: &[usize], right: &[usize]) -> Error {
    ArrayError::ShapeMismatch { op, left: left.to_vec(), right: right.to_vec() }.into()
}

pub(super) fn store_error(error: crate::StoreError) -> Error {
    Error::Store(std::sync::Arc::new(error))
}

/// Runs `job(0..n)` on up to [`PARALLEL_TRANSFERS`] threads; the results in order, or the
/// first error.
pub(super) fn parallel<R: Send>(n: usize, job: impl Fn(usize) -> Result<R> + Sync) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let results: Vec<parking_lot::Mutex<Option<Result<R>>>> =
        (0..n).map(|_| parking_lot::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL_TRANSFERS.min(n) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let result = job(i);
                let failed = result.is_err();
                *results[i].lock() = Some(result);
                if failed {
                    // Stop handing out work; the error is reported below.
                    next.store(n, Ordering::Relaxed);
                }
            });
        }
    });
    let mut out = Vec::with_capacity(n);
    for slot in results {
        match slot.into_inner() {
            Some(result) => out.push(result?),
            None => {
                return Err(Error::Cluster("a parallel transfer stopped after another failed".into()));
            }
        }
    }
    Ok(out)
}
