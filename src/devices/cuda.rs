//! CUDA devices through cudarc (feature `cuda`; the driver and libraries are loaded at run
//! time, so building needs no CUDA): discovery that reports a missing driver as an error,
//! never a panic; cuBLAS matrix products; NVRTC-compiled kernels kept in a cache.
//!
//! Sparse matrices (CSR, from and to `sprs`) multiply dense vectors through cuSPARSE.
//!
//! Status: the device actor, device-resident `Ref`s, bf16 GEMM, SpMM and the model-graph
//! ops are not here yet; this module is what they build on. NCCL is in `nccl.rs`.
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::cusparse;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use parking_lot::Mutex;

/// Why a CUDA operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// No usable CUDA device: no driver library, or the driver sees no device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A CUDA library the operation needs is not installed.
    #[error("the CUDA library {library} is not installed (needed for {needed_for})")]
    MissingLibrary {
        /// The library's name.
        library: &'static str,
        /// What needed it.
        needed_for: &'static str,
    },
    /// The driver reported an error.
    #[error("CUDA driver error on device {device}: {message}")]
    Driver {
        /// The device ordinal.
        device: usize,
        /// The driver's message.
        message: String,
    },
    /// cuBLAS reported an error.
    #[error("cuBLAS error in {op}: {message}")]
    Blas {
        /// The operation.
        op: &'static str,
        /// cuBLAS's message.
        message: String,
    },
    /// A kernel did not compile.
    #[error("kernel `{kernel}` does not compile: {message}")]
    Compile {
        /// The kernel's name.
        kernel: &'static str,
        /// NVRTC's log.
        message: String,
    },
    /// Buffer lengths do not match the operation's shapes.
    #[error("shape mismatch in {op}: {message}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What does not match.
        message: String,
    },
}

type Result<T, E = DeviceError> = std::result::Result<T, E>;

/// What discovery knows about one device.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CudaDeviceInfo {
    /// The device ordinal.
    pub ordinal: usize,
    /// Its name, as the driver reports it.
    pub name: String,
    /// Its memory, in bytes.
    pub total_memory: usize,
}

/// Lists the CUDA devices of this machine.
///
/// # Errors
/// [`DeviceError::NoDevice`] with the reason (no driver library, no device) — checked
/// before any context is created, since creating one without a driver would panic.
pub fn cuda_devices() -> Result<Vec<CudaDeviceInfo>> {
    // SAFETY: only tries to load the driver library; no CUDA call is made.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(DeviceError::NoDevice("the CUDA driver library (libcuda.so) is not installed".into()));
    }
    let count =
        CudaContext::device_count().map_err(|e| DeviceError::NoDevice(format!("the driver failed: {e}")))?;
    if count <= 0 {
        return Err(DeviceError::NoDevice("the CUDA driver sees no device".into()));
    }
    (0..count as usize)
        .map(|ordinal| {
            let driver = |e: cudarc::driver::DriverError| DeviceError::Driver {
                device: ordinal,
                message: e.to_string(),
            };
            let ctx = CudaContext::new(ordinal).map_err(driver)?;
            Ok(CudaDeviceInfo {
                ordinal,
                name: ctx.name().map_err(driver)?,
                total_memory: ctx.total_mem().map_err(driver)?,
            })
        })
        .collect()
}

/// Elementwise, reduction and softmax kernels, compiled by NVRTC on first use.
pub const KERNELS: &[(&str, &str)] = &[
    (
        "relu_f32",
        r#"extern "C" __global__ void relu_f32(float* x, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && x[i] < 0.0f) { x[i] = 0.0f; }
}"#,
    ),
    (
        "axpy_f32",
        r#"extern "C" __global__ void axpy_f32(float a, const float* x, float* y, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { y[i] += a * x[i]; }
}"#,
    ),
    (
        "sum_f32",
        r#"extern "C" __global__ void sum_f32(const float* x, float* out, unsigned int n) {
    __shared__ float partial[1024];
    unsigned int t = threadIdx.x;
    float acc = 0.0f;
    for (unsigned int i = blockIdx.x * blockDim.x + t; i < n; i += blockDim.x * gridDim.x) { acc += x[i]; }
    partial[t] = acc;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) { partial[t] += partial[t + s]; }
        __syncthreads();
    }
    if (t == 0) { atomicAdd(out, partial[0]); }
}"#,
    ),
    (
        "softmax_rows_f32",
        r#"extern "C" __global__ void softmax_rows_f32(float* x, unsigned int rows, unsigned int cols) {
    unsigned int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) { return; }
    float* row = x + (size_t)r * cols;
    float m = row[0];
    for (unsigned int j = 1; j < cols; ++j) { m = fmaxf(m, row[j]); }
    float s = 0.0f;
    for (unsigned int j = 0; j < cols; ++j) { row[j] = expf(row[j] - m); s += row[j]; }
    for (unsigned int j = 0; j < cols; ++j) { row[j] /= s; }
}"#,
    ),
];

/// Compiles every kernel of [`KERNELS`] to PTX (needs only NVRTC, no GPU): the check CI runs.
///
/// # Errors
/// [`DeviceError::MissingLibrary`] without NVRTC; [`DeviceError::Compile`] with the log.
pub fn compile_all_kernels() -> Result<Vec<(&'static str, cudarc::nvrtc::Ptx)>> {
    KERNELS.iter().map(|(name, source)| Ok((*name, compile(name, source)?))).collect()
}

fn compile(name: &'static str, source: &str) -> Result<cudarc::nvrtc::Ptx> {
    // SAFETY: only tries to load the NVRTC library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(DeviceError::MissingLibrary { library: "libnvrtc", needed_for: "compiling kernels" });
    }
    cudarc::nvrtc::compile_ptx(source)
        .map_err(|e| DeviceError::Compile { kernel: name, message: e.to_string() })
}

/// One GPU: its context, a stream, cuBLAS and cuSPARSE (made on first use) and compiled
/// kernels.
pub struct Gpu {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: Mutex<Option<Arc<CudaBlas>>>,
    sparse: Mutex<Option<SparseHandle>>,
    kernels: Mutex<HashMap<&'static str, CudaFunction>>,
}

/// A cuSPARSE handle, destroyed on drop.
struct SparseHandle(cusparse::sys::cusparseHandle_t);

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

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("ordinal", &self.ordinal).finish()
    }
}

impl Gpu {
    /// Opens device `ordinal`.
    ///
    /// # Errors
    /// [`DeviceError::NoDevice`] if there is no such device (never a panic).
    pub fn open(ordinal: usize) -> Result<Gpu> {
        let devices = cuda_devices()?;
        if ordinal >= devices.len() {
            return Err(DeviceError::NoDevice(format!(
                "device {ordinal} asked for, {} present",
                devices.len()
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| DeviceError::Driver { device: ordinal, message: e.to_string() })?;
        let stream = ctx.default_stream();
        Ok(Gpu {
            ordinal,
            ctx,
            stream,
            blas: Mutex::new(None),
            sparse: Mutex::new(None),
            kernels: Mutex::new(HashMap::new()),
        })
    }

    /// The stream this device's work is queued on.
    pub(crate) fn stream(&self) -> Arc<CudaStream> {
        self.stream.clone()
    }

    fn driver(&self, e: cudarc::driver::DriverError) -> DeviceError {
        DeviceError::Driver { device: self.ordinal, message: e.to_string() }
    }

    /// Copies `data` to the device.
    ///
    /// # Errors
    /// [`DeviceError::Driver`].
    pub fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream.clone_htod(data).map_err(|e| self.driver(e))
    }

    /// Copies a device buffer back to the host.
    ///
    /// # Errors
    /// [`DeviceError::Driver`].
    pub fn download(&self, buffer: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream.clone_dtoh(buffer).map_err(|e| self.driver(e))
    }

    /// A zeroed device buffer of `len` floats.
    ///
    /// # Errors
    /// [`DeviceError::Driver`] (for example out of memory).
    pub fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros(len).map_err(|e| self.driver(e))
    }

    /// Copies `src` into `dst` on the device (both of the same length).
    ///
    /// # Errors
    /// [`DeviceError::Shape`], [`DeviceError::Driver`].
    pub fn copy(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>) -> Result<()> {
        if src.len() != dst.len() {
            return Err(DeviceError::Shape {
                op: "copy",
                message: format!("{} vs {} elements", src.len(), dst.len()),
            });
        }
        self.stream.memcpy_dtod(src, dst).map_err(|e| self.driver(e))
    }

    /// Waits for all work queued on the device.
    ///
    /// # Errors
    /// [`DeviceError::Driver`].
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| self.driver(e))
    }

    fn blas(&self) -> Result<Arc<CudaBlas>> {
        let mut blas = self.blas.lock();
        if let Some(blas) = blas.as_ref() {
            return Ok(blas.clone());
        }
        // SAFETY: only tries to load the cuBLAS library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(DeviceError::MissingLibrary { library: "libcublas", needed_for: "matrix products" });
        }
        let made = Arc::new(
            CudaBlas::new(self.stream.clone())
                .map_err(|e| DeviceError::Blas { op: "create handle", message: e.to_string() })?,
        );
        *blas = Some(made.clone());
        Ok(made)
    }

    /// Row-major `c (m×n) = a (m×k) · b (k×n)` with cuBLAS (f32).
    ///
    /// # Errors
    /// [`DeviceError::Shape`] if a buffer is too short; [`DeviceError::Blas`].
    pub fn sgemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if a.len() < m * k || b.len() < k * n || c.len() < m * n {
            return Err(DeviceError::Shape {
                op: "sgemm",
                message: format!("{m}×{k} · {k}×{n} with buffers of {}, {}, {}", a.len(), b.len(), c.len()),
            });
        }
        let dim = |x: usize| {
            i32::try_from(x)
                .map_err(|_| DeviceError::Shape { op: "sgemm", message: format!("dimension {x} too large") })
        };
        let (mi, ni, ki) = (dim(m)?, dim(n)?, dim(k)?);
        // cuBLAS is column-major: C^T (n×m) = B^T (n×k) · A^T (k×m), with the row-major
        // buffers read as their transposes.
        let config = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: ni,
            n: mi,
            k: ki,
            alpha: 1.0f32,
            lda: ni,
            ldb: ki,
            beta: 0.0f32,
            ldc: ni,
        };
        let blas = self.blas()?;
        // SAFETY: the lengths were checked above against m, n and k.
        unsafe { blas.gemm(config, b, a, c) }
            .map_err(|e| DeviceError::Blas { op: "sgemm", message: e.to_string() })
    }

    fn kernel(&self, name: &'static str) -> Result<CudaFunction> {
        if let Some(function) = self.kernels.lock().get(name) {
            return Ok(function.clone());
        }
        let source = KERNELS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .ok_or(DeviceError::Compile { kernel: name, message: "no such kernel".into() })?;
        let ptx = compile(name, source)?;
        let module = self.ctx.load_module(ptx).map_err(|e| self.driver(e))?;
        let function = module.load_function(name).map_err(|e| self.driver(e))?;
        self.kernels.lock().insert(name, function.clone());
        Ok(function)
    }

    /// `x = max(x, 0)` in place.
    ///
    /// # Errors
    /// [`DeviceError::Compile`], [`DeviceError::Driver`].
    pub fn relu(&self, x: &mut CudaSlice<f32>) -> Result<()> {
        let function = self.kernel("relu_f32")?;
        let n = len_u32(x.len(), "relu")?;
        let mut launch = self.stream.launch_builder(&function);
        launch.arg(x).arg(&n);
        // SAFETY: the kernel reads and writes `n` elements of `x`, which holds `n`.
        unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }.map(|_| ()).map_err(|e| self.driver(e))
    }

    /// `y += a · x`.
    ///
    /// # Errors
    /// [`DeviceError::Shape`], [`DeviceError::Compile`], [`DeviceError::Driver`].
    pub fn axpy(&self, a: f32, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        if x.len() != y.len() {
            return Err(DeviceError::Shape {
                op: "axpy",
                message: format!("{} vs {} elements", x.len(), y.len()),
            });
        }
        let function = self.kernel("axpy_f32")?;
        let n = len_u32(x.len(), "axpy")?;
        let mut launch = self.stream.launch_builder(&function);
        launch.arg(&a).arg(x).arg(y).arg(&n);
        // SAFETY: both buffers hold `n` elements.
        unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }.map(|_| ()).map_err(|e| self.driver(e))
    }

    /// The sum of `x`.
    ///
    /// # Errors
    /// [`DeviceError::Compile`], [`DeviceError::Driver`].
    pub fn sum(&self, x: &CudaSlice<f32>) -> Result<f32> {
        let function = self.kernel("sum_f32")?;
        let n = len_u32(x.len(), "sum")?;
        let mut out = self.zeros(1)?;
        let blocks = n.div_ceil(1024).clamp(1, 1024);
        let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        let mut launch = self.stream.launch_builder(&function);
        launch.arg(x).arg(&mut out).arg(&n);
        // SAFETY: the kernel reads `n` elements of `x` and adds into `out[0]`.
        unsafe { launch.launch(config) }.map_err(|e| self.driver(e))?;
        Ok(self.download(&out)?[0])
    }

    /// Softmax of each row of a row-major `rows × cols` matrix, in place.
    ///
    /// # Errors
    /// [`DeviceError::Shape`], [`DeviceError::Compile`], [`DeviceError::Driver`].
    pub fn softmax_rows(&self, x: &mut CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
        if rows * cols != x.len() || cols == 0 {
            return Err(DeviceError::Shape {
                op: "softmax_rows",
                message: format!("{rows}×{cols} vs {}", x.len()),
            });
        }
        let function = self.kernel("softmax_rows_f32")?;
        let (r, c) = (len_u32(rows, "softmax_rows")?, len_u32(cols, "softmax_rows")?);
        let mut launch = self.stream.launch_builder(&function);
        launch.arg(x).arg(&r).arg(&c);
        // SAFETY: the kernel touches rows × cols elements, which `x` holds.
        unsafe { launch.launch(LaunchConfig::for_num_elems(r)) }.map(|_| ()).map_err(|e| self.driver(e))
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

    /// `y = A · x` with cuSPARSE (CSR SpMV, f32).
    ///
    /// # Errors
    /// [`DeviceError::Shape`] if the lengths do not match the matrix;
    /// [`DeviceError::MissingLibrary`] without cuSPARSE; [`DeviceError::Blas`] for a cuSPARSE
    /// failure.
    pub fn spmv(&self, a: &GpuCsr, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        use cusparse::sys as sp;
        if x.len() != a.cols || y.len() != a.rows {
            return Err(DeviceError::Shape {
                op: "spmv",
                message: format!("{}×{} matrix, x of {}, y of {}", a.rows, a.cols, x.len(), y.len()),
            });
        }
        let failed = |what: &str, status: sp::cusparseStatus_t| DeviceError::Blas {
            op: "spmv",
            message: format!("{what}: {status:?}"),
        };
        let check = |what: &str, status: sp::cusparseStatus_t| {
            if status == sp::cusparseStatus_t::CUSPARSE_STATUS_SUCCESS {
                Ok(())
            } else {
                Err(failed(what, status))
            }
        };
        let mut sparse = self.sparse.lock();
        if sparse.is_none() {
            // SAFETY: only tries to load the cuSPARSE library.
            if !unsafe { sp::is_culib_present() } {
                return Err(DeviceError::MissingLibrary {
                    library: "libcusparse",
                    needed_for: "sparse products",
                });
            }
            self.ctx.bind_to_thread().map_err(|e| self.driver(e))?;
            let handle = cusparse::result::create().map_err(|e| failed("create handle", e.0))?;
            // SAFETY: a fresh handle and this device's stream.
            check("set stream", unsafe { sp::cusparseSetStream(handle, self.stream.cu_stream() as _) })?;
            *sparse = Some(SparseHandle(handle));
        }
        let handle = sparse.as_ref().map(|h| h.0).ok_or(DeviceError::NoDevice("cuSPARSE handle".into()))?;
        let (rows, cols, nnz) = (a.rows as i64, a.cols as i64, a.values.len() as i64);
        let (offsets, _g1) = a.offsets.device_ptr(&self.stream);
        let (columns, _g2) = a.columns.device_ptr(&self.stream);
        let (values, _g3) = a.values.device_ptr(&self.stream);
        let (x_ptr, _g4) = x.device_ptr(&self.stream);
        let (y_ptr, _g5) = y.device_ptr_mut(&self.stream);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let mut mat: sp::cusparseSpMatDescr_t = std::ptr::null_mut();
        let mut vx: sp::cusparseDnVecDescr_t = std::ptr::null_mut();
        let mut vy: sp::cusparseDnVecDescr_t = std::ptr::null_mut();
        // SAFETY: every pointer is a live device allocation of the stated length (checked
        // above and by construction of `GpuCsr`); descriptors are destroyed below.
        let result = unsafe {
            check(
                "create CSR",
                sp::cusparseCreateCsr(
                    &mut mat,
                    rows,
                    cols,
                    nnz,
                    offsets as *mut _,
                    columns as *mut _,
                    values as *mut _,
                    sp::cusparseIndexType_t::CUSPARSE_INDEX_32I,
                    sp::cusparseIndexType_t::CUSPARSE_INDEX_32I,
                    sp::cusparseIndexBase_t::CUSPARSE_INDEX_BASE_ZERO,
                    sp::cudaDataType::CUDA_R_32F,
                ),
            )
            .and_then(|()| {
                check(
                    "create x",
                    sp::cusparseCreateDnVec(&mut vx, cols, x_ptr as *mut _, sp::cudaDataType::CUDA_R_32F),
                )
            })
            .and_then(|()| {
                check(
                    "create y",
                    sp::cusparseCreateDnVec(&mut vy, rows, y_ptr as *mut _, sp::cudaDataType::CUDA_R_32F),
                )
            })
            .and_then(|()| {
                let mut size = 0usize;
                check(
                    "buffer size",
                    sp::cusparseSpMV_bufferSize(
                        handle,
                        sp::cusparseOperation_t::CUSPARSE_OPERATION_NON_TRANSPOSE,
                        (&alpha as *const f32).cast(),
                        mat as _,
                        vx as _,
                        (&beta as *const f32).cast(),
                        vy,
                        sp::cudaDataType::CUDA_R_32F,
                        sp::cusparseSpMVAlg_t::CUSPARSE_SPMV_ALG_DEFAULT,
                        &mut size,
                    ),
                )?;
                let mut buffer = self.stream.alloc_zeros::<u8>(size.max(1)).map_err(|e| self.driver(e))?;
                let (buffer_ptr, _g6) = buffer.device_ptr_mut(&self.stream);
                check(
                    "SpMV",
                    sp::cusparseSpMV(
                        handle,
                        sp::cusparseOperation_t::CUSPARSE_OPERATION_NON_TRANSPOSE,
                        (&alpha as *const f32).cast(),
                        mat as _,
                        vx as _,
                        (&beta as *const f32).cast(),
                        vy,
                        sp::cudaDataType::CUDA_R_32F,
                        sp::cusparseSpMVAlg_t::CUSPARSE_SPMV_ALG_DEFAULT,
                        buffer_ptr as *mut _,
                    ),
                )?;
                // The work buffer must outlive the asynchronous SpMV.
                self.stream.synchronize().map_err(|e| self.driver(e))
            })
        };
        // SAFETY: destroying the descriptors made above (null ones are skipped).
        unsafe {
            if !vy.is_null() {
                sp::cusparseDestroyDnVec(vy as _);
            }
            if !vx.is_null() {
                sp::cusparseDestroyDnVec(vx as _);
            }
            if !mat.is_null() {
                sp::cusparseDestroySpMat(mat as _);
            }
        }
        result
    }
}

fn len_u32(len: usize, op: &'static str) -> Result<u32> {
    u32::try_from(len).map_err(|_| DeviceError::Shape { op, message: format!("{len} elements exceed u32") })
}
