//! Sparse matrices on the GPU: CSR matrices copied from and to `sprs`, and safe wrappers
//! over cuSPARSE's generic API (cudarc ships raw bindings only) for SpMV (`y = A·x`) and
//! SpMM (`C = A·B`, `B` and `C` dense and row-major).
//!
//! Every cuSPARSE descriptor is owned by a guard that destroys it on drop, so an error
//! half-way through a product leaks nothing.
use std::ffi::c_void;

use cudarc::cusparse::{self, sys as sp};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::{DeviceError, Gpu, Result};

/// A cuSPARSE handle, destroyed on drop, and the work buffer its products share.
pub(super) struct SparseHandle {
    raw: sp::cusparseHandle_t,
    /// Grown to the largest size a product has asked for and kept: products are queued on
    /// the device's one stream, which orders each one's use of it after the last.
    work: Option<CudaSlice<u8>>,
}

// SAFETY: the handle is only used under the `Gpu::sparse` mutex, one call at a time.
unsafe impl Send for SparseHandle {}

impl Drop for SparseHandle {
    fn drop(&mut self) {
        // SAFETY: the handle was made by `create` and is destroyed once.
        let _ = unsafe { cusparse::result::destroy(self.raw) };
    }
}

/// A CSR matrix in device memory (32-bit indices, f32 values).
pub struct GpuCsr {
    rows: usize,
    cols: usize,
    offsets: CudaSlice<i32>,
    columns: CudaSlice<i32>,
    values: CudaSlice<f32>,
}

impl std::fmt::Debug for GpuCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuCsr")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("nnz", &self.nnz())
            .finish()
    }
}

impl Drop for GpuCsr {
    fn drop(&mut self) {
        // The arrays (fields) are freed after this, on this device.
        super::make_current(self.values.context());
    }
}

impl GpuCsr {
    /// (rows, columns).
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Stored entries.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// The device memory its arrays take, in bytes.
    pub(crate) fn byte_len(&self) -> usize {
        (self.offsets.len() + self.columns.len() + self.values.len()) * 4
    }
}

/// Descriptors and products here are all f32 and non-transposed.
const F32: sp::cudaDataType = sp::cudaDataType::CUDA_R_32F;
const NON_TRANSPOSE: sp::cusparseOperation_t = sp::cusparseOperation_t::CUSPARSE_OPERATION_NON_TRANSPOSE;
/// The host scalars of `alpha = 1, beta = 0` (statics, so their addresses stay valid).
static ONE: f32 = 1.0;
static ZERO: f32 = 0.0;

fn check(op: &'static str, what: &str, status: sp::cusparseStatus_t) -> Result<()> {
    if status == sp::cusparseStatus_t::CUSPARSE_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(DeviceError::Blas { op, message: format!("cuSPARSE {what}: {status:?}") })
    }
}

/// Declares a guard type owning one cuSPARSE descriptor: made by `create` (from an empty
/// guard, so a descriptor half-made by a failing call is still destroyed) and destroyed by
/// `$destroy` on drop.
macro_rules! descriptor_guard {
    ($(#[$doc:meta])* $name:ident($raw:ty), $destroy:ident) => {
        $(#[$doc])*
        struct $name($raw);

        impl $name {
            /// Runs `make` (a cuSPARSE create call) into an empty guard.
            fn create(
                op: &'static str,
                what: &str,
                make: impl FnOnce(&mut $raw) -> sp::cusparseStatus_t,
            ) -> Result<Self> {
                let mut guard = $name(std::ptr::null_mut());
                check(op, what, make(&mut guard.0))?;
                Ok(guard)
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                if !self.0.is_null() {
                    // SAFETY: a non-null descriptor was made in `create`, whose callers pass
                    // this type's cuSPARSE create call; the guard alone owns it and this
                    // destroys it once.
                    unsafe { sp::$destroy(self.0 as _) };
                }
            }
        }
    };
}

descriptor_guard!(
    /// A sparse-matrix descriptor, destroyed on drop.
    SpMat(sp::cusparseSpMatDescr_t),
    cusparseDestroySpMat
);
descriptor_guard!(
    /// A dense-vector descriptor, destroyed on drop.
    DnVec(sp::cusparseDnVecDescr_t),
    cusparseDestroyDnVec
);
descriptor_guard!(
    /// A dense-matrix descriptor, destroyed on drop.
    DnMat(sp::cusparseDnMatDescr_t),
    cusparseDestroyDnMat
);

impl DnVec {
    /// A descriptor over `len` f32 values at device address `ptr`.
    ///
    /// # Safety
    /// `ptr` must be a live device allocation of at least `len` f32 values that outlives
    /// the descriptor.
    unsafe fn over(op: &'static str, what: &str, len: usize, ptr: CUdeviceptr) -> Result<Self> {
        // SAFETY: the caller vouches for the memory; cuSPARSE only records the pointer.
        Self::create(op, what, |raw| unsafe { sp::cusparseCreateDnVec(raw, len as i64, ptr as *mut _, F32) })
    }
}

impl DnMat {
    /// A descriptor over a row-major `rows × cols` f32 matrix at device address `ptr`
    /// (leading dimension `cols`).
    ///
    /// # Safety
    /// `ptr` must be a live device allocation of at least `rows · cols` f32 values that
    /// outlives the descriptor.
    unsafe fn row_major(
        op: &'static str,
        what: &str,
        rows: usize,
        cols: usize,
        ptr: CUdeviceptr,
    ) -> Result<Self> {
        // SAFETY: the caller vouches for the memory; cuSPARSE only records the pointer.
        Self::create(op, what, |raw| unsafe {
            sp::cusparseCreateDnMat(
                raw,
                rows as i64,
                cols as i64,
                cols as i64,
                ptr as *mut _,
                F32,
                sp::cusparseOrder_t::CUSPARSE_ORDER_ROW,
            )
        })
    }
}

/// Runs a cuSPARSE two-phase product through `SparseProduct::with_work_buffer`: the size
/// query `$size` and the product `$run` get the same arguments `[..]` (cuSPARSE requires
/// it: the size holds only for them), then `&mut size` and the work buffer. The expansion
/// calls both unsafe functions, so it goes inside an `unsafe` block whose SAFETY comment
/// covers the arguments.
macro_rules! two_phase {
    ($product:expr, $op:expr, $what:literal, $size:path, $run:path, [$($arg:expr),+ $(,)?]) => {
        $product.with_work_buffer($op, $what, |size| $size($($arg),+, size), |buffer| $run($($arg),+, buffer))
    };
}

/// What a product holds while it runs: the locked cuSPARSE handle (and its work buffer),
/// the sparse operand's descriptor (destroyed before the lock is released: fields drop in
/// order), and the scalars of `1 · A · x + 0 · y`.
struct SparseProduct<'g> {
    gpu: &'g Gpu,
    handle: sp::cusparseHandle_t,
    mat: SpMat,
    alpha: *const c_void,
    beta: *const c_void,
    lock: parking_lot::MutexGuard<'g, Option<SparseHandle>>,
}

impl SparseProduct<'_> {
    /// Runs one cuSPARSE product that needs a work buffer (through `two_phase!`):
    /// `buffer_size` writes the bytes it needs, `compute` queues the product with the
    /// handle's work buffer, grown first if it is smaller. Like the other products it is
    /// asynchronous: the stream orders later uses of the output, and of the work buffer.
    fn with_work_buffer(
        &mut self,
        op: &'static str,
        what: &str,
        buffer_size: impl FnOnce(&mut usize) -> sp::cusparseStatus_t,
        compute: impl FnOnce(*mut c_void) -> sp::cusparseStatus_t,
    ) -> Result<()> {
        let mut size = 0usize;
        check(op, "buffer size", buffer_size(&mut size))?;
        let gpu = self.gpu;
        let sparse = self.lock.as_mut().ok_or(DeviceError::NoDevice("cuSPARSE handle".into()))?;
        let work = match &mut sparse.work {
            Some(work) if work.len() >= size => work,
            slot => slot.insert(gpu.stream.alloc_zeros::<u8>(size.max(1)).map_err(|e| gpu.driver(e))?),
        };
        let (buffer_ptr, _guard) = work.device_ptr_mut(&gpu.stream);
        check(op, what, compute(buffer_ptr as *mut c_void))
    }
}

impl Gpu {
    /// Copies a `sprs` matrix to the device as CSR (CSC input is converted).
    ///
    /// # Errors
    /// [`DeviceError::Shape`] beyond 32-bit indices; [`DeviceError::Driver`].
    pub fn upload_csr(&self, matrix: &sprs::CsMat<f32>) -> Result<GpuCsr> {
        let csr = if matrix.is_csr() {
            std::borrow::Cow::Borrowed(matrix)
        } else {
            std::borrow::Cow::Owned(matrix.to_csr())
        };
        let index = |v: usize| {
            i32::try_from(v).map_err(|_| DeviceError::Shape {
                op: "upload_csr",
                message: format!("index {v} exceeds i32"),
            })
        };
        let offsets: Vec<i32> =
            csr.indptr().raw_storage().iter().map(|&v| index(v)).collect::<Result<_>>()?;
        let columns: Vec<i32> = csr.indices().iter().map(|&v| index(v)).collect::<Result<_>>()?;
        self.upload_csr_arrays(csr.rows(), csr.cols(), &offsets, &columns, csr.data())
    }

    /// Copies a CSR matrix given as its arrays (`rows + 1` offsets, and a column index per
    /// value; a valid CSR matrix, as `sprs` and `CsrBlock` guarantee) to the device.
    ///
    /// # Errors
    /// [`DeviceError::Shape`] if the lengths disagree or a dimension exceeds i32;
    /// [`DeviceError::Driver`].
    pub(crate) fn upload_csr_arrays(
        &self,
        rows: usize,
        cols: usize,
        offsets: &[i32],
        columns: &[i32],
        values: &[f32],
    ) -> Result<GpuCsr> {
        let fits = |v: usize| i32::try_from(v).is_ok();
        if offsets.len() != rows + 1 || columns.len() != values.len() || !fits(rows) || !fits(cols) {
            return Err(DeviceError::Shape {
                op: "upload_csr",
                message: format!(
                    "{rows}×{cols} with {} offsets, {} columns and {} values",
                    offsets.len(),
                    columns.len(),
                    values.len()
                ),
            });
        }
        let upload_i32 = |v: &[i32]| self.stream.clone_htod(v).map_err(|e| self.driver(e));
        Ok(GpuCsr {
            rows,
            cols,
            offsets: upload_i32(offsets)?,
            columns: upload_i32(columns)?,
            values: self.upload(values)?,
        })
    }

    /// Copies a device CSR matrix back into a `sprs` matrix.
    ///
    /// # Errors
    /// [`DeviceError::Driver`]; [`DeviceError::Shape`] if the device data is not a valid CSR.
    pub fn download_csr(&self, matrix: &GpuCsr) -> Result<sprs::CsMat<f32>> {
        let to_usize = |v: Vec<i32>| v.into_iter().map(|x| x.max(0) as usize).collect::<Vec<_>>();
        let (offsets, columns, values) = self.download_csr_arrays(matrix)?;
        let (offsets, columns) = (to_usize(offsets), to_usize(columns));
        sprs::CsMat::try_new((matrix.rows, matrix.cols), offsets, columns, values)
            .map_err(|(_, _, _, e)| DeviceError::Shape { op: "download_csr", message: e.to_string() })
    }

    /// A device CSR matrix's arrays on the host: offsets, columns, values.
    ///
    /// # Errors
    /// [`DeviceError::Driver`].
    pub(crate) fn download_csr_arrays(&self, matrix: &GpuCsr) -> Result<(Vec<i32>, Vec<i32>, Vec<f32>)> {
        let offsets = self.stream.clone_dtoh(&matrix.offsets).map_err(|e| self.driver(e))?;
        let columns = self.stream.clone_dtoh(&matrix.columns).map_err(|e| self.driver(e))?;
        Ok((offsets, columns, self.download(&matrix.values)?))
    }

    /// The cuSPARSE handle (made on first use, bound to this device's stream), locked.
    fn sparse_handle(&self, op: &'static str) -> Result<parking_lot::MutexGuard<'_, Option<SparseHandle>>> {
        let mut sparse = self.sparse.lock();
        // cuSPARSE runs in the calling thread's current context: make it this device's.
        self.ctx.bind_to_thread().map_err(|e| self.driver(e))?;
        if sparse.is_none() {
            // SAFETY: only tries to load the cuSPARSE library.
            if !unsafe { sp::is_culib_present() } {
                return Err(DeviceError::MissingLibrary {
                    library: "libcusparse",
                    needed_for: "sparse products",
                });
            }
            let handle = cusparse::result::create().map_err(|e| DeviceError::Blas {
                op,
                message: format!("cuSPARSE create handle: {:?}", e.0),
            })?;
            let handle = SparseHandle { raw: handle, work: None };
            // SAFETY: a fresh handle and this device's stream, which outlives the handle
            // (both belong to `self`).
            check(op, "set stream", unsafe {
                sp::cusparseSetStream(handle.raw, self.stream.cu_stream() as _)
            })?;
            *sparse = Some(handle);
        }
        Ok(sparse)
    }

    /// A CSR descriptor over `a`'s device arrays (which must outlive it).
    fn csr_descriptor(&self, op: &'static str, a: &GpuCsr) -> Result<SpMat> {
        let (offsets, _g1) = a.offsets.device_ptr(&self.stream);
        let (columns, _g2) = a.columns.device_ptr(&self.stream);
        let (values, _g3) = a.values.device_ptr(&self.stream);
        // SAFETY: the three arrays are live device allocations of rows + 1, nnz and nnz
        // elements (by construction of `GpuCsr`); cuSPARSE only records the pointers.
        SpMat::create(op, "create CSR", |raw| unsafe {
            sp::cusparseCreateCsr(
                raw,
                a.rows as i64,
                a.cols as i64,
                a.values.len() as i64,
                offsets as *mut _,
                columns as *mut _,
                values as *mut _,
                sp::cusparseIndexType_t::CUSPARSE_INDEX_32I,
                sp::cusparseIndexType_t::CUSPARSE_INDEX_32I,
                sp::cusparseIndexBase_t::CUSPARSE_INDEX_BASE_ZERO,
                F32,
            )
        })
    }

    /// What every product starts with: the locked cuSPARSE handle and a CSR descriptor
    /// over `a` (made after the handle, so a missing cuSPARSE is reported before any
    /// cuSPARSE call).
    fn sparse_product<'g>(&'g self, op: &'static str, a: &GpuCsr) -> Result<SparseProduct<'g>> {
        let lock = self.sparse_handle(op)?;
        let handle = lock.as_ref().map(|h| h.raw).ok_or(DeviceError::NoDevice("cuSPARSE handle".into()))?;
        let mat = self.csr_descriptor(op, a)?;
        let (alpha, beta) = (std::ptr::from_ref(&ONE).cast(), std::ptr::from_ref(&ZERO).cast());
        Ok(SparseProduct { gpu: self, handle, mat, alpha, beta, lock })
    }

    /// `y = A · x` with cuSPARSE (CSR SpMV, f32), queued on the device's stream like the
    /// other products (reading `y` waits for it).
    ///
    /// # Errors
    /// [`DeviceError::Shape`] if the lengths do not match the matrix;
    /// [`DeviceError::MissingLibrary`] without cuSPARSE; [`DeviceError::Blas`] for a cuSPARSE
    /// failure.
    pub fn spmv(&self, a: &GpuCsr, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        const OP: &str = "spmv";
        if x.len() != a.cols || y.len() != a.rows {
            return Err(DeviceError::Shape {
                op: OP,
                message: format!("{}×{} matrix, x of {}, y of {}", a.rows, a.cols, x.len(), y.len()),
            });
        }
        let mut product = self.sparse_product(OP, a)?;
        let (x_ptr, _gx) = x.device_ptr(&self.stream);
        let (y_ptr, _gy) = y.device_ptr_mut(&self.stream);
        // SAFETY: x and y are live device allocations of cols and rows elements (checked
        // above), borrowed until the end of this function, after the descriptors' guards
        // have destroyed them.
        let vx = unsafe { DnVec::over(OP, "create x", a.cols, x_ptr)? };
        // SAFETY: as for x.
        let vy = unsafe { DnVec::over(OP, "create y", a.rows, y_ptr)? };
        let alg = sp::cusparseSpMVAlg_t::CUSPARSE_SPMV_ALG_DEFAULT;
        let (handle, mat, alpha, beta) = (product.handle, product.mat.0, product.alpha, product.beta);
        // SAFETY: a live handle, descriptors over live device arrays (see above), alpha and
        // beta pointing to f32 statics, and a work buffer of at least the size the query asked
        // for (descriptors may be destroyed once the product is queued: it captured them).
        unsafe {
            two_phase!(
                product,
                OP,
                "SpMV",
                sp::cusparseSpMV_bufferSize,
                sp::cusparseSpMV,
                [handle, NON_TRANSPOSE, alpha, mat as _, vx.0 as _, beta, vy.0, F32, alg]
            )
        }
    }

    /// `C = A · B` with cuSPARSE (CSR SpMM, f32): `A` is `rows × cols`, `B` a dense row-major
    /// `cols × n` matrix, `C` a dense row-major `rows × n` matrix; queued on the device's
    /// stream like the other products (reading `C` waits for it).
    ///
    /// # Errors
    /// [`DeviceError::Shape`] if the lengths do not match `A` and `n`;
    /// [`DeviceError::MissingLibrary`] without cuSPARSE; [`DeviceError::Blas`] for a cuSPARSE
    /// failure.
    pub fn spmm(&self, a: &GpuCsr, b: &CudaSlice<f32>, n: usize, c: &mut CudaSlice<f32>) -> Result<()> {
        const OP: &str = "spmm";
        if n == 0 || b.len() != a.cols * n || c.len() != a.rows * n || i32::try_from(n).is_err() {
            return Err(DeviceError::Shape {
                op: OP,
                message: format!(
                    "{}×{} matrix times {n} columns: B of {} (needs {}), C of {} (needs {})",
                    a.rows,
                    a.cols,
                    b.len(),
                    a.cols * n,
                    c.len(),
                    a.rows * n
                ),
            });
        }
        let mut product = self.sparse_product(OP, a)?;
        let (b_ptr, _gb) = b.device_ptr(&self.stream);
        let (c_ptr, _gc) = c.device_ptr_mut(&self.stream);
        // SAFETY: B and C are live device allocations of cols·n and rows·n elements (checked
        // above), row-major with leading dimension n, borrowed until the end of this
        // function, after the descriptors' guards have destroyed them.
        let mb = unsafe { DnMat::row_major(OP, "create B", a.cols, n, b_ptr)? };
        // SAFETY: as for B.
        let mc = unsafe { DnMat::row_major(OP, "create C", a.rows, n, c_ptr)? };
        let alg = sp::cusparseSpMMAlg_t::CUSPARSE_SPMM_ALG_DEFAULT;
        let (handle, mat, alpha, beta) = (product.handle, product.mat.0, product.alpha, product.beta);
        // SAFETY: a live handle, descriptors over live device arrays (see above), alpha and
        // beta pointing to f32 statics, and a work buffer of at least the size the query asked
        // for (descriptors may be destroyed once the product is queued: it captured them).
        unsafe {
            two_phase!(
                product,
                OP,
                "SpMM",
                sp::cusparseSpMM_bufferSize,
                sp::cusparseSpMM,
                [handle, NON_TRANSPOSE, NON_TRANSPOSE, alpha, mat as _, mb.0 as _, beta, mc.0, F32, alg]
            )
        }
    }
}
