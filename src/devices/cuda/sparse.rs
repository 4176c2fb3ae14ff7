//! Sparse matrices on the GPU: CSR matrices copied from and to `sprs`, and safe wrappers
//! over cuSPARSE's generic API (cudarc ships raw bindings only) for SpMV (`y = A·x`) and
//! SpMM (`C = A·B`, `B` and `C` dense and row-major).
//!
//! Every cuSPARSE descriptor is owned by a guard that destroys it on drop, so an error
//! half-way through a product leaks nothing.
use cudarc::cusparse::{self, sys as sp};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::{DeviceError, Gpu, Result};

/// A cuSPARSE handle, destroyed on drop.
pub(super) struct SparseHandle(sp::cusparseHandle_t);

// SAFETY: the handle is only used under the `Gpu::sparse` mutex, one call at a time.
unsafe impl Send for SparseHandle {}

impl Drop for SparseHandle {
    fn drop(&mut self) {
        // SAFETY: the handle was made by `create` and is destroyed once.
        let _ = unsafe { cusparse::result::destroy(self.0) };
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

impl GpuCsr {
    /// (rows, columns).
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Stored entries.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }
}

fn check(op: &'static str, what: &str, status: sp::cusparseStatus_t) -> Result<()> {
    if status == sp::cusparseStatus_t::CUSPARSE_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(DeviceError::Blas { op, message: format!("cuSPARSE {what}: {status:?}") })
    }
}

/// A sparse-matrix descriptor, destroyed on drop.
struct SpMat(sp::cusparseSpMatDescr_t);

impl Drop for SpMat {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: made by `cusparseCreateCsr`, destroyed once.
            unsafe { sp::cusparseDestroySpMat(self.0 as _) };
        }
    }
}

/// A dense-vector descriptor, destroyed on drop.
struct DnVec(sp::cusparseDnVecDescr_t);

impl Drop for DnVec {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: made by `cusparseCreateDnVec`, destroyed once.
            unsafe { sp::cusparseDestroyDnVec(self.0 as _) };
        }
    }
}

/// A dense-matrix descriptor, destroyed on drop.
struct DnMat(sp::cusparseDnMatDescr_t);

impl Drop for DnMat {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: made by `cusparseCreateDnMat`, destroyed once.
            unsafe { sp::cusparseDestroyDnMat(self.0 as _) };
        }
    }
}

impl Gpu {
    /// Copies a `sprs` matrix to the device as CSR (CSC input is converted).
    ///
    /// # Errors
    /// [`DeviceError::Shape`] beyond 32-bit indices; [`DeviceError::Driver`].
    pub fn upload_csr(&self, matrix: &sprs::CsMat<f32>) -> Result<GpuCsr> {
        let csr = if matrix.is_csr() { matrix.view().to_owned() } else { matrix.to_csr() };
        let index = |v: usize| {
            i32::try_from(v).map_err(|_| DeviceError::Shape {
                op: "upload_csr",
                message: format!("index {v} exceeds i32"),
            })
        };
        let offsets: Vec<i32> =
            csr.indptr().raw_storage().iter().map(|&v| index(v)).collect::<Result<_>>()?;
        let columns: Vec<i32> = csr.indices().iter().map(|&v| index(v)).collect::<Result<_>>()?;
        index(csr.rows())?;
        index(csr.cols())?;
        let upload_i32 = |v: &[i32]| self.stream.clone_htod(v).map_err(|e| self.driver(e));
        Ok(GpuCsr {
            rows: csr.rows(),
            cols: csr.cols(),
            offsets: upload_i32(&offsets)?,
            columns: upload_i32(&columns)?,
            values: self.upload(csr.data())?,
        })
    }

    /// Copies a device CSR matrix back into a `sprs` matrix.
    ///
    /// # Errors
    /// [`DeviceError::Driver`]; [`DeviceError::Shape`] if the device data is not a valid CSR.
    pub fn download_csr(&self, matrix: &GpuCsr) -> Result<sprs::CsMat<f32>> {
        let to_usize = |v: Vec<i32>| v.into_iter().map(|x| x.max(0) as usize).collect::<Vec<_>>();
        let offsets = to_usize(self.stream.clone_dtoh(&matrix.offsets).map_err(|e| self.driver(e))?);
        let columns = to_usize(self.stream.clone_dtoh(&matrix.columns).map_err(|e| self.driver(e))?);
        let values = self.download(&matrix.values)?;
        sprs::CsMat::try_new((matrix.rows, matrix.cols), offsets, columns, values)
            .map_err(|(_, _, _, e)| DeviceError::Shape { op: "download_csr", message: e.to_string() })
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
            let handle = SparseHandle(handle);
            // SAFETY: a fresh handle and this device's stream, which outlives the handle
            // (both belong to `self`).
            check(op, "set stream", unsafe {
                sp::cusparseSetStream(handle.0, self.stream.cu_stream() as _)
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
        let mut mat = SpMat(std::ptr::null_mut());
        // SAFETY: the three arrays are live device allocations of rows + 1, nnz and nnz
        // elements (by construction of `GpuCsr`); cuSPARSE only records the pointers.
        check(op, "create CSR", unsafe {
            sp::cusparseCreateCsr(
                &mut mat.0,
                a.rows as i64,
                a.cols as i64,
                a.values.len() as i64,
                offsets as *mut _,
                columns as *mut _,
                values as *mut _,
                sp::cusparseIndexType_t::CUSPARSE_INDEX_32I,
                sp::cusparseIndexType_t::CUSPARSE_INDEX_32I,
                sp::cusparseIndexBase_t::CUSPARSE_INDEX_BASE_ZERO,
                sp::cudaDataType::CUDA_R_32F,
            )
        })?;
        Ok(mat)
    }

    /// `y = A · x` with cuSPARSE (CSR SpMV, f32).
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
        let sparse = self.sparse_handle(OP)?;
        let handle = sparse.as_ref().map(|h| h.0).ok_or(DeviceError::NoDevice("cuSPARSE handle".into()))?;
        let mat = self.csr_descriptor(OP, a)?;
        let (x_ptr, _g4) = x.device_ptr(&self.stream);
        let (y_ptr, _g5) = y.device_ptr_mut(&self.stream);
        let (mut vx, mut vy) = (DnVec(std::ptr::null_mut()), DnVec(std::ptr::null_mut()));
        let (alpha, beta) = (1.0f32, 0.0f32);
        let non_transpose = sp::cusparseOperation_t::CUSPARSE_OPERATION_NON_TRANSPOSE;
        let alg = sp::cusparseSpMVAlg_t::CUSPARSE_SPMV_ALG_DEFAULT;
        // SAFETY: x and y are live device allocations of cols and rows elements (checked
        // above); the descriptors are destroyed by their guards after the work is done.
        unsafe {
            check(
                OP,
                "create x",
                sp::cusparseCreateDnVec(
                    &mut vx.0,
                    a.cols as i64,
                    x_ptr as *mut _,
                    sp::cudaDataType::CUDA_R_32F,
                ),
            )?;
            check(
                OP,
                "create y",
                sp::cusparseCreateDnVec(
                    &mut vy.0,
                    a.rows as i64,
                    y_ptr as *mut _,
                    sp::cudaDataType::CUDA_R_32F,
                ),
            )?;
            let mut size = 0usize;
            check(
                OP,
                "buffer size",
                sp::cusparseSpMV_bufferSize(
                    handle,
                    non_transpose,
                    (&alpha as *const f32).cast(),
                    mat.0 as _,
                    vx.0 as _,
                    (&beta as *const f32).cast(),
                    vy.0,
                    sp::cudaDataType::CUDA_R_32F,
                    alg,
                    &mut size,
                ),
            )?;
            let mut buffer = self.stream.alloc_zeros::<u8>(size.max(1)).map_err(|e| self.driver(e))?;
            let (buffer_ptr, _g6) = buffer.device_ptr_mut(&self.stream);
            check(
                OP,
                "SpMV",
                sp::cusparseSpMV(
                    handle,
                    non_transpose,
                    (&alpha as *const f32).cast(),
                    mat.0 as _,
                    vx.0 as _,
                    (&beta as *const f32).cast(),
                    vy.0,
                    sp::cudaDataType::CUDA_R_32F,
                    alg,
                    buffer_ptr as *mut _,
                ),
            )?;
            // The work buffer (freed at the end of this block) must outlive the
            // asynchronous SpMV.
            self.stream.synchronize().map_err(|e| self.driver(e))
        }
    }

    /// `C = A · B` with cuSPARSE (CSR SpMM, f32): `A` is `rows × cols`, `B` a dense row-major
    /// `cols × n` matrix, `C` a dense row-major `rows × n` matrix.
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
        let sparse = self.sparse_handle(OP)?;
        let handle = sparse.as_ref().map(|h| h.0).ok_or(DeviceError::NoDevice("cuSPARSE handle".into()))?;
        let mat = self.csr_descriptor(OP, a)?;
        let (b_ptr, _g4) = b.device_ptr(&self.stream);
        let (c_ptr, _g5) = c.device_ptr_mut(&self.stream);
        let (mut mb, mut mc) = (DnMat(std::ptr::null_mut()), DnMat(std::ptr::null_mut()));
        let (alpha, beta) = (1.0f32, 0.0f32);
        let non_transpose = sp::cusparseOperation_t::CUSPARSE_OPERATION_NON_TRANSPOSE;
        let alg = sp::cusparseSpMMAlg_t::CUSPARSE_SPMM_ALG_DEFAULT;
        let row_major = sp::cusparseOrder_t::CUSPARSE_ORDER_ROW;
        let n64 = n as i64;
        // SAFETY: B and C are live device allocations of cols·n and rows·n elements
        // (checked above), row-major with leading dimension n; the descriptors are destroyed
        // by their guards after the work is done.
        unsafe {
            check(
                OP,
                "create B",
                sp::cusparseCreateDnMat(
                    &mut mb.0,
                    a.cols as i64,
                    n64,
                    n64,
                    b_ptr as *mut _,
                    sp::cudaDataType::CUDA_R_32F,
                    row_major,
                ),
            )?;
            check(
                OP,
                "create C",
                sp::cusparseCreateDnMat(
                    &mut mc.0,
                    a.rows as i64,
                    n64,
                    n64,
                    c_ptr as *mut _,
                    sp::cudaDataType::CUDA_R_32F,
                    row_major,
                ),
            )?;
            let mut size = 0usize;
            check(
                OP,
                "buffer size",
                sp::cusparseSpMM_bufferSize(
                    handle,
                    non_transpose,
                    non_transpose,
                    (&alpha as *const f32).cast(),
                    mat.0 as _,
                    mb.0 as _,
                    (&beta as *const f32).cast(),
                    mc.0,
                    sp::cudaDataType::CUDA_R_32F,
                    alg,
                    &mut size,
                ),
            )?;
            let mut buffer = self.stream.alloc_zeros::<u8>(size.max(1)).map_err(|e| self.driver(e))?;
            let (buffer_ptr, _g6) = buffer.device_ptr_mut(&self.stream);
            check(
                OP,
                "SpMM",
                sp::cusparseSpMM(
                    handle,
                    non_transpose,
                    non_transpose,
                    (&alpha as *const f32).cast(),
                    mat.0 as _,
                    mb.0 as _,
                    (&beta as *const f32).cast(),
                    mc.0,
                    sp::cudaDataType::CUDA_R_32F,
                    alg,
                    buffer_ptr as *mut _,
                ),
            )?;
            // The work buffer (freed at the end of this block) must outlive the
            // asynchronous SpMM.
            self.stream.synchronize().map_err(|e| self.driver(e))
        }
    }
}
