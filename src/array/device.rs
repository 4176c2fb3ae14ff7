//! `DeviceDArray`: a distributed f32 array whose chunks live in GPU memory, spread over the
//! device actors it was given (feature `cuda`). Each operation is work queued on those
//! actors with the chunks' device buffers as inputs, so chunks stay on their devices from
//! one operation to the next; bytes reach the host only when asked
//! ([`to_darray`](DeviceDArray::to_darray), [`to_array`](DeviceDArray::to_array),
//! [`reduce`](DeviceDArray::reduce)'s per-chunk results).
//!
//! Placement: chunk `c` of every array lives on device actor `c mod n` of its `n` actors,
//! so operations between arrays of the same grid on the same actors copy nothing; an input
//! chunk on another device is copied onto the one that needs it (counted by
//! [`DeviceActor::copies_in`]).
use ndarray::ArrayD;

use super::chunk::Chunk;
use super::ops::{BinaryOp, ReduceOp, UnaryOp};
use super::sparse::CsrBlock;
use super::{ArrayError, ChunkGrid, DArray, SparseDArray};
use crate::devices::{DeviceCsr, Gemm32};
use crate::{DeviceActor, DeviceArray, DeviceError, Ref, Result, Runtime};

/// An n-dimensional f32 array cut into a grid of chunks, each a [`Ref`] to a
/// [`DeviceArray`] in the memory of one of its GPUs. Made from a host array by
/// [`DArray::to_devices`]; operations return at once with a new array whose chunks are
/// being computed on the devices, and errors surface when the result is read.
///
/// Cloning is cheap (the chunks are shared); a chunk's device memory is freed when no array
/// and no pending work holds it.
///
/// # Examples
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tessera::{DArray, DeviceActor, Fill, ReduceOp, Runtime, UnaryOp};
/// let rt = Runtime::local()?;
/// let gpus = DeviceActor::all(&rt)?; // fails with NoDevice where there is none
/// let a = DArray::<f32>::fill(&rt, &[4096, 4096], &[1024, 1024], Fill::Uniform { seed: 1, low: -1.0, high: 1.0 })?;
/// let on_gpus = a.to_devices(&gpus)?;
/// let product = on_gpus.matmul(&on_gpus.map(UnaryOp::Relu))?;
/// let total = product.reduce(ReduceOp::Sum)?;
/// let back: DArray<f32> = product.to_darray(); // chunks copied to the host
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DeviceDArray {
    rt: Runtime,
    grid: ChunkGrid,
    devices: Vec<DeviceActor>,
    /// One per chunk, in row-major grid order; chunk `c` on `devices[c % devices.len()]`.
    chunks: Vec<Ref<DeviceArray>>,
}

impl std::fmt::Debug for DeviceDArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ordinals: Vec<usize> = self.devices.iter().map(DeviceActor::ordinal).collect();
        f.debug_struct("DeviceDArray")
            .field("shape", &self.grid.shape())
            .field("chunk", &self.grid.chunk_shape())
            .field("devices", &ordinals)
            .finish()
    }
}

impl DArray<f32> {
    /// Copies the array onto GPUs: chunk `c` onto `devices[c mod n]`, each by work on that
    /// device actor (which reads the chunk where it is held: here, or on a node process).
    ///
    /// # Errors
    /// [`ArrayError::NoDevices`] if `devices` is empty; [`ArrayError::ForeignDevice`] if one
    /// of them serves another runtime. A failed upload fails its chunk.
    pub fn to_devices(&self, devices: &[DeviceActor]) -> Result<DeviceDArray> {
        check_devices(self.runtime(), devices)?;
        let chunks = self
            .chunk_refs()
            .iter()
            .enumerate()
            .map(|(c, chunk)| {
                devices[c % devices.len()].run_from(
                    chunk,
                    |scope, chunk: Chunk<f32>| scope.upload(&chunk.data, chunk.shape),
                    DeviceArray::byte_len,
                )
            })
            .collect();
        Ok(DeviceDArray {
            rt: self.runtime().clone(),
            grid: self.grid().clone(),
            devices: devices.to_vec(),
            chunks,
        })
    }
}

fn check_devices(rt: &Runtime, devices: &[DeviceActor]) -> Result<()> {
    if devices.is_empty() {
        return Err(ArrayError::NoDevices.into());
    }
    if let Some(foreign) = devices.iter().find(|d| !d.serves(rt)) {
        return Err(ArrayError::ForeignDevice { ordinal: foreign.ordinal() }.into());
    }
    Ok(())
}

impl DeviceDArray {
    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        self.grid.shape()
    }

    /// The chunk grid.
    pub fn grid(&self) -> &ChunkGrid {
        &self.grid
    }

    /// The device actors its chunks are spread over.
    pub fn devices(&self) -> &[DeviceActor] {
        &self.devices
    }

    /// The ordinal of the GPU that holds (or will hold) chunk `c` (row-major grid order),
    /// or `None` past the last chunk.
    pub fn device_of(&self, c: usize) -> Option<usize> {
        (c < self.chunks.len()).then(|| self.device(c).ordinal())
    }

    /// The chunks, in row-major grid order: for work of one's own on them
    /// ([`DeviceActor::run`] on the chunk's device takes it without a copy).
    pub fn chunks(&self) -> &[Ref<DeviceArray>] {
        &self.chunks
    }

    fn device(&self, c: usize) -> &DeviceActor {
        &self.devices[c % self.devices.len()]
    }

    fn with_chunks(&self, grid: ChunkGrid, chunks: Vec<Ref<DeviceArray>>) -> DeviceDArray {
        DeviceDArray { rt: self.rt.clone(), grid, devices: self.devices.clone(), chunks }
    }

    /// `op` applied to every element, on the devices.
    #[must_use]
    pub fn map(&self, op: UnaryOp) -> DeviceDArray {
        let (code, parameter) = unary_code(op);
        let chunks = (0..self.chunks.len())
            .map(|c| {
                self.device(c).run(&self.chunks[c..=c], move |scope, inputs| {
                    let x = on_device(&inputs[0])?;
                    let mut y = scope.gpu().zeros(x.len())?;
                    scope.gpu().map_elements(code, parameter, x, &mut y)?;
                    scope.array(y, inputs[0].shape().to_vec())
                })
            })
            .collect();
        self.with_chunks(self.grid.clone(), chunks)
    }

    /// `self op other`, element by element, on the device of each of `self`'s chunks (a chunk
    /// of `other` on another device is copied there).
    ///
    /// # Errors
    /// [`ArrayError::ShapeMismatch`] if the shapes differ; [`ArrayError::ChunkMismatch`] if
    /// the chunk shapes differ (arrays on devices are not rechunked: rechunk the `DArray`
    /// before [`DArray::to_devices`]).
    pub fn zip(&self, other: &DeviceDArray, op: BinaryOp) -> Result<DeviceDArray> {
        if self.shape() != other.shape() {
            return Err(shape_mismatch("zip", self.shape(), other.shape()));
        }
        if self.grid.chunk_shape() != other.grid.chunk_shape() {
            return Err(chunk_mismatch("zip", self.grid.chunk_shape(), other.grid.chunk_shape()));
        }
        let code = binary_code(op);
        let chunks = (0..self.chunks.len())
            .map(|c| {
                let inputs = [self.chunks[c].clone(), other.chunks[c].clone()];
                self.device(c).run(&inputs, move |scope, inputs| {
                    let (a, b) = (on_device(&inputs[0])?, on_device(&inputs[1])?);
                    let mut y = scope.gpu().zeros(a.len())?;
                    scope.gpu().zip_elements(code, a, b, &mut y)?;
                    scope.array(y, inputs[0].shape().to_vec())
                })
            })
            .collect();
        Ok(self.with_chunks(self.grid.clone(), chunks))
    }

    /// The matrix product `self · other` of an `m×k` and a `k×n` array with cuBLAS: output
    /// tile `(i, j)` is made on its device by one product per tile of the inner dimension,
    /// accumulated in place. The result has `self`'s row chunks and `other`'s column chunks.
    ///
    /// # Errors
    /// [`ArrayError::RankMismatch`] unless both are 2-dimensional;
    /// [`ArrayError::ShapeMismatch`] if the inner dimensions differ;
    /// [`ArrayError::ChunkMismatch`] if `other`'s row chunks differ from `self`'s column
    /// chunks.
    pub fn matmul(&self, other: &DeviceDArray) -> Result<DeviceDArray> {
        let (&[_, k], &[k2, _]) = (self.shape(), other.shape()) else {
            let got = if self.shape().len() == 2 { other.shape().len() } else { self.shape().len() };
            return Err(ArrayError::RankMismatch { op: "matmul", expected: 2, got }.into());
        };
        if k != k2 {
            return Err(shape_mismatch("matmul", self.shape(), other.shape()));
        }
        let (inner, other_inner) = (self.grid.chunk_shape()[1], other.grid.chunk_shape()[0]);
        if inner != other_inner {
            return Err(chunk_mismatch("matmul", self.grid.chunk_shape(), other.grid.chunk_shape()));
        }
        let (grid, [rows, depth, cols]) = self.grid.product_tiles(&other.grid)?;
        let mut chunks = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for j in 0..cols {
                let c = grid.linear(&[i, j]);
                let tile_shape: Vec<usize> = grid.region(c).iter().map(|r| r.end - r.start).collect();
                let mut inputs: Vec<Ref<DeviceArray>> =
                    (0..depth).map(|p| self.chunks[i * depth + p].clone()).collect();
                inputs.extend((0..depth).map(|p| other.chunks[p * cols + j].clone()));
                chunks.push(self.device(c).run(&inputs, move |scope, inputs| {
                    let (left, right) = inputs.split_at(depth);
                    let (tile_m, tile_n) = (tile_shape[0], tile_shape[1]);
                    let mut out = scope.gpu().zeros(tile_m * tile_n)?;
                    for (p, (a, b)) in left.iter().zip(right).enumerate() {
                        let tile_k = a.shape()[1];
                        let product = Gemm32 {
                            m: tile_m,
                            n: tile_n,
                            k: tile_k,
                            trans_a: false,
                            trans_b: false,
                            alpha: 1.0,
                            beta: if p == 0 { 0.0 } else { 1.0 },
                        };
                        scope.gpu().gemm_rm(product, on_device(a)?, on_device(b)?, &mut out)?;
                    }
                    scope.array(out, tile_shape)
                }));
            }
        }
        Ok(self.with_chunks(grid, chunks))
    }

    /// The transpose of a 2-dimensional array: chunk `(i, j)` of the result is chunk
    /// `(j, i)` transposed on the result chunk's device (a chunk on another device is
    /// copied there first).
    ///
    /// # Errors
    /// [`ArrayError::RankMismatch`] unless the array is 2-dimensional.
    pub fn transpose(&self) -> Result<DeviceDArray> {
        let (grid, sources) = self.grid.transposed()?;
        let chunks = sources
            .iter()
            .enumerate()
            .map(|(c, &source)| {
                self.device(c).run(&self.chunks[source..=source], |scope, inputs| {
                    let (rows, cols) = (inputs[0].shape()[0], inputs[0].shape()[1]);
                    let mut y = scope.gpu().zeros(rows * cols)?;
                    scope.gpu().transpose(on_device(&inputs[0])?, rows, cols, &mut y)?;
                    scope.array(y, vec![cols, rows])
                })
            })
            .collect();
        Ok(self.with_chunks(grid, chunks))
    }

    /// The reduction of all elements by `op`: each chunk is reduced on its device (in
    /// double), then the per-chunk results are combined here. Waits for the result.
    ///
    /// # Errors
    /// [`ArrayError::Empty`] for min or max of an empty array; a failed chunk's error.
    pub fn reduce(&self, op: ReduceOp) -> Result<f32> {
        let code = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Min => 1,
            ReduceOp::Max => 2,
        };
        if self.grid.is_empty() {
            return match op {
                ReduceOp::Sum => Ok(0.0),
                _ => Err(ArrayError::Empty { op }.into()),
            };
        }
        let partials: Vec<Ref<f64>> = (0..self.chunks.len())
            .map(|c| {
                self.device(c).run_to(
                    &self.chunks[c..=c],
                    move |scope, inputs| scope.gpu().reduce_elements(code, on_device(&inputs[0])?),
                    |_| 8,
                )
            })
            .collect();
        let mut total = match op {
            ReduceOp::Sum => 0.0,
            _ => f64::NAN,
        };
        for partial in partials {
            let partial = partial.blocking_get()?;
            total = match op {
                ReduceOp::Sum => total + partial,
                // A NaN loses to a number, as in each chunk's reduction.
                ReduceOp::Min => total.min(partial),
                ReduceOp::Max => total.max(partial),
            };
        }
        Ok(total as f32)
    }

    /// Copies every chunk to the host, as a `DArray` of the same grid (the copies are
    /// queued on the devices; the `DArray`'s chunks are ready as each copy completes).
    #[must_use]
    pub fn to_darray(&self) -> DArray<f32> {
        let chunks = (0..self.chunks.len())
            .map(|c| {
                self.device(c).run_to(
                    &self.chunks[c..=c],
                    |_, inputs| {
                        let data = inputs[0].to_host()?;
                        Ok(Chunk { shape: inputs[0].shape().to_vec(), data: data.into() })
                    },
                    |chunk: &Chunk<f32>| chunk.data.len() * 4,
                )
            })
            .collect();
        DArray::from_parts(&self.rt, self.grid.clone(), chunks)
    }

    /// Saves the array as a new version of `name`, as [`DArray::save`] does (every chunk an
    /// entry of its own, then a manifest; the same format, so [`DArray::load`] reads it back
    /// and [`DArray::to_devices`] puts it on GPUs again): each chunk is copied to the host by
    /// its device actor and saved from there.
    ///
    /// # Errors
    /// As [`DArray::save`], and a failed chunk's error.
    pub fn save(&self, stash: &crate::Stash, name: &str, tags: &[(&str, &str)]) -> Result<crate::Version> {
        self.to_darray().save(stash, name, tags)
    }

    /// Gathers the whole array into this process.
    ///
    /// # Errors
    /// A failed chunk's error.
    pub fn to_array(&self) -> Result<ArrayD<f32>> {
        self.to_darray().to_array()
    }

    /// Waits until every chunk is computed, leaving each on its device: until its work has
    /// run on its device actor (which queues the kernels on the device's stream), then until
    /// each device has finished what was queued.
    ///
    /// # Errors
    /// The first failed chunk's error (with its cause chain); [`DeviceError::Driver`] (as
    /// `Error::TaskFailed`) if a device fails.
    pub fn wait(&self) -> Result<()> {
        self.chunks.iter().try_for_each(|c| c.blocking_wait_done())?;
        synchronize(&self.devices)
    }
}

/// Waits for each device to finish the work queued on it.
fn synchronize(devices: &[DeviceActor]) -> Result<()> {
    for device in devices {
        device.gpu().synchronize().map_err(|error| crate::Error::TaskFailed {
            task: format!("device#{}", device.ordinal()),
            message: error.to_string(),
        })?;
    }
    Ok(())
}

impl SparseDArray<f32> {
    /// Copies the matrix onto GPUs as CSR: block `b` onto `devices[b mod n]` (the placement
    /// of chunk `b` of a vector cut like the blocks), each by work on that device actor.
    ///
    /// # Errors
    /// [`ArrayError::NoDevices`], [`ArrayError::ForeignDevice`] as for
    /// [`DArray::to_devices`]. A block whose indices exceed 32 bits fails its upload.
    pub fn to_devices(&self, devices: &[DeviceActor]) -> Result<DeviceSparseDArray> {
        let (rt, blocks) = self.parts();
        check_devices(rt, devices)?;
        let blocks = blocks
            .iter()
            .enumerate()
            .map(|(b, block)| {
                devices[b % devices.len()].run_from(
                    block,
                    |scope, block: CsrBlock<f32>| scope.upload_csr(&block),
                    DeviceCsr::byte_len,
                )
            })
            .collect();
        let [rows, cols] = self.shape();
        Ok(DeviceSparseDArray {
            rt: rt.clone(),
            rows,
            cols,
            block_rows: self.block_rows(),
            devices: devices.to_vec(),
            blocks,
        })
    }
}

/// A sparse f32 matrix cut into blocks of rows, each a CSR matrix in the memory of one of
/// its GPUs (block `b` on device actor `b mod n`). Made by [`SparseDArray::to_devices`];
/// its product with a [`DeviceDArray`] runs with cuSPARSE on the blocks' devices.
#[derive(Clone)]
pub struct DeviceSparseDArray {
    rt: Runtime,
    rows: usize,
    cols: usize,
    block_rows: usize,
    devices: Vec<DeviceActor>,
    blocks: Vec<Ref<DeviceCsr>>,
}

impl std::fmt::Debug for DeviceSparseDArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ordinals: Vec<usize> = self.devices.iter().map(DeviceActor::ordinal).collect();
        f.debug_struct("DeviceSparseDArray")
            .field("shape", &[self.rows, self.cols])
            .field("block_rows", &self.block_rows)
            .field("devices", &ordinals)
            .finish()
    }
}

impl DeviceSparseDArray {
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

    /// The device actors its blocks are spread over.
    pub fn devices(&self) -> &[DeviceActor] {
        &self.devices
    }

    /// The product with a vector (`cols` long) or matrix (`cols×k`) on the devices: one
    /// cuSPARSE SpMV (or SpMM) per block, on the block's device, each given the whole of
    /// `x` (its chunks joined on that device; chunks on other devices are copied there). The
    /// result has this matrix's blocks of rows as its chunks, chunk `b` on the device of
    /// block `b`, so it lines up with vectors cut like the blocks.
    ///
    /// # Errors
    /// [`ArrayError::ShapeMismatch`] unless `x` has `cols` rows;
    /// [`ArrayError::ChunkMismatch`] if a matrix `x` is cut between its columns.
    pub fn matmul(&self, x: &DeviceDArray) -> Result<DeviceDArray> {
        let k = match x.shape() {
            [n] if *n == self.cols => None,
            [n, k] if *n == self.cols => Some(*k),
            _ => return Err(shape_mismatch("sparse matmul", &[self.rows, self.cols], x.shape())),
        };
        if let Some(k) = k {
            if x.grid.chunk_shape()[1] < k {
                return Err(chunk_mismatch("sparse matmul", &[self.block_rows, k], x.grid.chunk_shape()));
            }
        }
        let (shape, chunk) = match k {
            None => (vec![self.rows], vec![self.block_rows]),
            Some(k) => (vec![self.rows, k], vec![self.block_rows, k.max(1)]),
        };
        let grid = ChunkGrid::new(&shape, &chunk)?;
        if grid.is_empty() {
            // No rows, or `x` has no columns: no elements, and no chunk (a 0 dimension
            // has no chunks along it).
            return Ok(DeviceDArray {
                rt: self.rt.clone(),
                grid,
                devices: self.devices.clone(),
                chunks: Vec::new(),
            });
        }
        let columns = k.unwrap_or(1);
        let chunks = self
            .blocks
            .iter()
            .enumerate()
            .map(|(b, block)| {
                let out_shape: Vec<usize> = grid.region(b).iter().map(|r| r.end - r.start).collect();
                self.devices[b % self.devices.len()].run_sparse(
                    block,
                    &x.chunks,
                    move |scope, csr, parts| {
                        let gpu = scope.gpu();
                        let (rows, cols) = csr.shape();
                        let mut y = gpu.zeros(rows * columns)?;
                        if rows * columns * cols > 0 {
                            let a = csr.csr().ok_or(not_on_device())?;
                            let joined;
                            let whole = match parts {
                                [one] => on_device(one)?,
                                _ => {
                                    joined = join(gpu, parts)?;
                                    &joined
                                }
                            };
                            match k {
                                None => gpu.spmv(a, whole, &mut y)?,
                                Some(_) => gpu.spmm(a, whole, columns, &mut y)?,
                            }
                        }
                        scope.array(y, out_shape)
                    },
                    DeviceArray::byte_len,
                )
            })
            .collect();
        Ok(DeviceDArray { rt: self.rt.clone(), grid, devices: self.devices.clone(), chunks })
    }

    /// Waits until every block is on its device.
    ///
    /// # Errors
    /// The first failed block's error.
    pub fn wait(&self) -> Result<()> {
        self.blocks.iter().try_for_each(|b| b.blocking_wait_done())?;
        synchronize(&self.devices)
    }
}

/// The chunks of a row-chunked array (all on this device), joined in order into one buffer.
fn join(
    gpu: &crate::Gpu,
    parts: &[DeviceArray],
) -> std::result::Result<cudarc::driver::CudaSlice<f32>, DeviceError> {
    let mut whole = gpu.zeros(parts.iter().map(DeviceArray::len).sum())?;
    let mut at = 0;
    for part in parts {
        let mut into = whole.slice_mut(at..at + part.len());
        gpu.stream_ref().memcpy_dtod(on_device(part)?, &mut into).map_err(|e| gpu.driver(e))?;
        at += part.len();
    }
    Ok(whole)
}

fn not_on_device() -> DeviceError {
    DeviceError::Shape { op: "device array", message: "input not on the device".into() }
}

/// The device buffer of a work input (inputs of device work are always on its device).
fn on_device(array: &DeviceArray) -> std::result::Result<&cudarc::driver::CudaSlice<f32>, DeviceError> {
    array.slice().ok_or_else(not_on_device)
}

/// `op`'s code in `darray_map_f32`, and its parameter.
fn unary_code(op: UnaryOp) -> (i32, f32) {
    match op {
        UnaryOp::Neg => (0, 0.0),
        UnaryOp::Abs => (1, 0.0),
        UnaryOp::Sqrt => (2, 0.0),
        UnaryOp::Exp => (3, 0.0),
        UnaryOp::Ln => (4, 0.0),
        UnaryOp::Square => (5, 0.0),
        UnaryOp::Relu => (6, 0.0),
        UnaryOp::Scale(a) => (7, a as f32),
        UnaryOp::Offset(a) => (8, a as f32),
        UnaryOp::Powf(a) => (9, a as f32),
        UnaryOp::Sigmoid => (10, 0.0),
    }
}

/// `op`'s code in `darray_zip_f32`.
fn binary_code(op: BinaryOp) -> i32 {
    match op {
        BinaryOp::Add => 0,
        BinaryOp::Sub => 1,
        BinaryOp::Mul => 2,
        BinaryOp::Div => 3,
        BinaryOp::Min => 4,
        BinaryOp::Max => 5,
    }
}

fn shape_mismatch(op: &'static str, left: &[usize], right: &[usize]) -> crate::Error {
    ArrayError::ShapeMismatch { op, left: left.to_vec(), right: right.to_vec() }.into()
}

fn chunk_mismatch(op: &'static str, left: &[usize], right: &[usize]) -> crate::Error {
    ArrayError::ChunkMismatch { op, left: left.to_vec(), right: right.to_vec() }.into()
}
