//! CUDA devices through cudarc (feature `cuda`; the driver and libraries are loaded at run
//! time, so building needs no CUDA): discovery that reports a missing driver as an error,
//! never a panic; cuBLAS matrix products; NVRTC-compiled kernels (machine code for the
//! device's architecture) kept in a cache.
//!
//! bf16 matrix products (f32 accumulation) go through cuBLASLt. Sparse matrices (CSR, from
//! and to `sprs`) multiply dense vectors and matrices through cuSPARSE (`sparse.rs`). The
//! kernel sources are in `kernels.rs`; the model graph's GPU executor, which uses them, is
//! `nn::GpuExecutor`.
//!
//! The device actor that owns a `Gpu` on its own thread, and the device-resident arrays that
//! `Ref`s point to, are in `device_actor.rs`. NCCL is in `nccl.rs`.
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DriverError,
    LaunchConfig,
};
use half::bf16;
use parking_lot::Mutex;

mod kernels;
mod launch;
mod sparse;

pub use kernels::{KERNELS, KERNEL_PRELUDE};
pub(crate) use launch::{kernel_index, launch, push_checked};
pub use sparse::GpuCsr;
use sparse::SparseHandle;

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
    let count = CudaContext::device_count().map_err(|e| {
        DeviceError::NoDevice(format!("the CUDA driver failed to start: {}", driver_message(e)))
    })?;
    if count <= 0 {
        return Err(DeviceError::NoDevice("the CUDA driver sees no device".into()));
    }
    // Device queries need no context: discovery (which every node runs when it joins)
    // neither takes GPU memory nor the time to make a context on each device.
    use cudarc::driver::result::device;
    (0..count)
        .map(|index| {
            let ordinal = index as usize;
            let driver = |e: cudarc::driver::DriverError| DeviceError::Driver {
                device: ordinal,
                message: driver_message(e),
            };
            let dev = device::get(index).map_err(driver)?;
            Ok(CudaDeviceInfo {
                ordinal,
                name: device::get_name(dev).map_err(driver)?,
                // SAFETY: `dev` is a device handle the driver just gave for this ordinal.
                total_memory: unsafe { device::total_mem(dev) }.map_err(driver)?,
            })
        })
        .collect()
}

/// The driver's name and words for `e`, as `CUDA_ERROR_NO_DEVICE (no CUDA-capable device is
/// detected)`; the name alone if the driver has no words for it.
pub(crate) fn driver_message(e: DriverError) -> String {
    match (e.error_name(), e.error_string()) {
        (Ok(name), Ok(words)) => format!("{} ({})", name.to_string_lossy(), words.to_string_lossy()),
        _ => format!("{:?}", e.0),
    }
}

/// Compiles every kernel of [`KERNELS`] to PTX (needs only NVRTC, no GPU): the check CI runs.
///
/// # Errors
/// [`DeviceError::MissingLibrary`] without NVRTC; [`DeviceError::Compile`] with the log.
pub fn compile_all_kernels() -> Result<Vec<(&'static str, cudarc::nvrtc::Ptx)>> {
    KERNELS.iter().map(|(name, source)| Ok((*name, compile(name, source)?))).collect()
}

/// Compiles every kernel of [`KERNELS`] to machine code (a CUBIN) for devices of compute
/// capability `(major, minor)`, as [`Gpu`] does for its device; needs only NVRTC, no GPU.
/// Unlike PTX, this runs NVRTC's assembler too, so register and shared-memory limits of
/// that architecture are checked.
///
/// # Errors
/// [`DeviceError::MissingLibrary`] without NVRTC; [`DeviceError::Compile`] with the log
/// (also when this NVRTC does not know the architecture).
pub fn compile_all_kernels_for(compute_capability: (u32, u32)) -> Result<Vec<(&'static str, Vec<u8>)>> {
    KERNELS
        .iter()
        .map(|(name, source)| Ok((*name, compile_cubin(name, source, compute_capability)?)))
        .collect()
}

fn nvrtc_present() -> Result<()> {
    // SAFETY: only tries to load the NVRTC library.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(DeviceError::MissingLibrary { library: "libnvrtc", needed_for: "compiling kernels" })
    }
}

fn compile(name: &'static str, source: &str) -> Result<cudarc::nvrtc::Ptx> {
    nvrtc_present()?;
    cudarc::nvrtc::compile_ptx(format!("{KERNEL_PRELUDE}{source}"))
        .map_err(|e| DeviceError::Compile { kernel: name, message: e.to_string() })
}

/// The loaded NVRTC's version, as `major.minor` ("unknown" if it does not say).
fn nvrtc_version() -> String {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid places for the version; the library was loaded to compile.
    match unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result() {
        Ok(()) => format!("{major}.{minor}"),
        Err(_) => "unknown".into(),
    }
}

/// The CUDA version the driver supports, as `major.minor` ("unknown" if it does not say).
fn driver_version() -> String {
    let mut version = 0;
    // SAFETY: a valid place for the version; the driver library is loaded (a device is open).
    match unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }.result() {
        Ok(()) => format!("{}.{}", version / 1000, version % 1000 / 10),
        Err(_) => "unknown".into(),
    }
}

/// Machine code already compiled in this process, by kernel and compute capability: every
/// [`Gpu`] opened later (a test, another runtime's device actor) loads it without running
/// NVRTC again.
type CubinCache = HashMap<(&'static str, (u32, u32)), Arc<Vec<u8>>>;

/// [`compile_cubin`] through the process-wide cache.
fn cached_cubin(name: &'static str, source: &str, capability: (u32, u32)) -> Result<Arc<Vec<u8>>> {
    static CACHE: std::sync::OnceLock<Mutex<CubinCache>> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(cubin) = cache.lock().get(&(name, capability)) {
        return Ok(cubin.clone());
    }
    // Compiled outside the lock (two threads may both compile a kernel the first time; the
    // first to finish is kept).
    let cubin = Arc::new(compile_cubin(name, source, capability)?);
    Ok(cache.lock().entry((name, capability)).or_insert(cubin).clone())
}

/// An NVRTC program, destroyed on drop.
struct NvrtcProgram(cudarc::nvrtc::sys::nvrtcProgram);

impl Drop for NvrtcProgram {
    fn drop(&mut self) {
        // SAFETY: made by `create_program` and destroyed once, here.
        let _ = unsafe { cudarc::nvrtc::result::destroy_program(self.0) };
    }
}

/// Compiles kernel `name` (its `source` behind the prelude) to a CUBIN for compute
/// capability `(major, minor)`. cudarc compiles only to PTX, so this drives NVRTC itself.
fn compile_cubin(name: &'static str, source: &str, (major, minor): (u32, u32)) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result as nvrtc, sys};
    nvrtc_present()?;
    let failed = |what: &str, e: nvrtc::NvrtcError| DeviceError::Compile {
        kernel: name,
        message: format!("NVRTC {what}: {:?}", e.0),
    };
    let code = std::ffi::CString::new(format!("{KERNEL_PRELUDE}{source}"))
        .map_err(|_| DeviceError::Compile { kernel: name, message: "the source holds a NUL byte".into() })?;
    // `code` outlives the program (declared before it, so dropped after it).
    let program = NvrtcProgram(nvrtc::create_program(&code, None).map_err(|e| failed("create", e))?);
    let options = [format!("--gpu-architecture=sm_{major}{minor}")];
    // SAFETY: a live program (owned by `program`).
    if let Err(e) = unsafe { nvrtc::compile_program(program.0, &options) } {
        // SAFETY: as above.
        let log = unsafe { nvrtc::get_program_log(program.0) }.unwrap_or_default();
        let log: Vec<u8> = log.into_iter().map(|c| c as u8).take_while(|&b| b != 0).collect();
        return Err(DeviceError::Compile {
            kernel: name,
            message: format!("{:?} for sm_{major}{minor}: {}", e.0, String::from_utf8_lossy(&log).trim()),
        });
    }
    let mut size = 0usize;
    // SAFETY: a live, compiled program; `size` is a valid place for the size.
    unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) }.result().map_err(|e| failed("CUBIN size", e))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds the `size` bytes NVRTC said the CUBIN takes.
    unsafe { sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast()) }
        .result()
        .map_err(|e| failed("CUBIN", e))?;
    Ok(cubin)
}

/// Makes `context` current on the calling thread, for the `Drop`s that free device memory.
///
/// cudarc frees a `CudaSlice` on its stream without binding the stream's context, and our
/// stream is the null stream, which the driver resolves through the calling thread's
/// current context: on a thread where no context is current (a runtime worker, a fresh
/// thread dropping the last handle to a device array) the free fails, the memory leaks and
/// the failure is reported by the device's next operation; where another device's context
/// is current, the memory would be freed on that device's stream, unordered with this
/// device's work. Unlike `bind_to_thread`, this does not stop at an error recorded by an
/// earlier drop. Errors are ignored: a drop cannot report them (the free then records its
/// own, which the next operation reports).
pub(crate) fn make_current(context: &CudaContext) {
    use cudarc::driver::result::ctx;
    if ctx::get_current().ok().flatten() != Some(context.cu_ctx()) {
        // SAFETY: the handle is the live context `context` holds (it is released only when
        // `context` drops).
        let _ = unsafe { ctx::set_current(context.cu_ctx()) };
    }
}

/// One GPU: its context, a stream, cuBLAS and cuSPARSE (made on first use) and compiled
/// kernels.
///
/// Dropping it, or anything holding its device memory ([`GpuCsr`], the executor, trainer
/// and data set of `nn`, device arrays), on any thread is fine: their `Drop`s make the
/// context current first. The bare `CudaSlice`s its methods return are cudarc's, which
/// does not: drop them on a thread that has used this `Gpu` (every method makes the device
/// current on its calling thread).
pub struct Gpu {
    ordinal: usize,
    /// (major, minor): kernels are compiled to machine code for it.
    compute_capability: (u32, u32),
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: Mutex<Option<Arc<CudaBlas>>>,
    blaslt: Mutex<Option<Arc<CudaBlasLT>>>,
    sparse: Mutex<Option<SparseHandle>>,
    kernels: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("ordinal", &self.ordinal).finish()
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // The handles, kernels and cuBLASLt workspace (fields) are destroyed after this.
        make_current(&self.ctx);
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
            .map_err(|e| DeviceError::Driver { device: ordinal, message: driver_message(e) })?;
        // Buffers are used on this `Gpu`'s main stream, in order; the few used on a second
        // stream too (an NCCL group's, `Gpu::new_stream`) are ordered with events by their
        // users. So cudarc's per-allocation events (two made and destroyed per buffer, and
        // recorded at every use once a second stream exists) would only add work.
        // SAFETY: every user of a second stream orders each buffer it shares with the main
        // stream by events (see `Gpu::new_stream`).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| DeviceError::Driver { device: ordinal, message: driver_message(e) })?;
        Ok(Gpu {
            ordinal,
            compute_capability: (major.max(0) as u32, minor.max(0) as u32),
            ctx,
            stream,
            blas: Mutex::new(None),
            blaslt: Mutex::new(None),
            sparse: Mutex::new(None),
            kernels: Mutex::new(HashMap::new()),
        })
    }

    /// The stream, borrowed (for launch builders).
    pub(crate) fn stream_ref(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The stream that this GPU's work (copies, kernels, products) is queued on, in order:
    /// cudarc's, for ordering work of your own with it by events (for example a
    /// [`GpuCommunicator::group_stream`](crate::GpuCommunicator::group_stream)'s). cudarc
    /// does not order streams for you here: its automatic event tracking is off.
    pub fn main_stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A second stream on this device, for work that is to run beside the main stream's
    /// (it is non-blocking: neither waits for the other). Its user orders every buffer it
    /// shares with the main stream by events (cudarc does not, see `open`): the second
    /// stream waits for an event recorded after the main stream's writes it reads, and the
    /// main stream for one recorded after the second stream's work before it reuses or
    /// frees what that work touches.
    ///
    /// # Errors
    /// [`DeviceError::Driver`].
    pub(crate) fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.ctx.new_stream().map_err(|e| self.driver(e))
    }

    /// Makes this device's context current on the calling thread (device actors do it once
    /// on their own thread).
    pub(crate) fn bind_to_thread(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| self.driver(e))
    }

    /// Makes this device's context current on the calling thread before device memory is
    /// freed there (see [`make_current`]).
    pub(crate) fn make_current(&self) {
        make_current(&self.ctx);
    }

    /// Free and total device memory, in bytes.
    ///
    /// # Errors
    /// [`DeviceError::Driver`].
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(|e| self.driver(e))
    }

    /// This device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub(crate) fn driver(&self, e: DriverError) -> DeviceError {
        DeviceError::Driver { device: self.ordinal, message: driver_message(e) }
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

    /// A copy of `src`, a buffer in `source`'s memory (another device), in this device's:
    /// one device-to-device copy (the driver's peer copy, never through this process's
    /// memory), queued on this device's stream after the work queued on `source`'s before
    /// it. `source`'s stream then waits for the copy, so that `src` freed there (by its last
    /// handle) is not reused before the copy has read it.
    ///
    /// # Errors
    /// [`DeviceError::Driver`] of the device that failed.
    pub(crate) fn copy_from_peer<T: DeviceRepr>(
        &self,
        source: &Gpu,
        src: &CudaSlice<T>,
    ) -> Result<CudaSlice<T>> {
        let copy = self.stream.clone_dtod(src).map_err(|e| self.driver(e))?;
        let copied = self.stream.record_event(None).map_err(|e| self.driver(e))?;
        source.stream.wait(&copied).map_err(|e| source.driver(e))?;
        // (Waiting made `source`'s context current here.)
        self.bind_to_thread()?;
        Ok(copy)
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
        self.gemm_rm(Gemm32 { m, n, k, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 }, a, b, c)
    }

    /// Row-major `c (m×n) = alpha · op(a) · op(b) + beta · c` with cuBLAS (f32), where
    /// `op(a)` is `m×k` (stored `k×m` when `trans_a`) and `op(b)` is `k×n` (stored `n×k` when
    /// `trans_b`). Buffers may be longer than the matrices; views work too.
    ///
    /// # Errors
    /// [`DeviceError::Shape`] if a buffer is too short or a dimension exceeds i32;
    /// [`DeviceError::Blas`].
    pub(crate) fn gemm_rm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        g: Gemm32,
        a: &A,
        b: &B,
        c: &mut C,
    ) -> Result<()> {
        let Gemm32 { m, n, k, .. } = g;
        if a.len() < m * k || b.len() < k * n || c.len() < m * n {
            return Err(DeviceError::Shape {
                op: "sgemm",
                message: format!("{m}×{k} · {k}×{n} with buffers of {}, {}, {}", a.len(), b.len(), c.len()),
            });
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let config = g.column_major()?;
        let blas = self.blas()?;
        // cuBLAS runs in the calling thread's current context: make it this device's.
        self.ctx.bind_to_thread().map_err(|e| self.driver(e))?;
        // SAFETY: the lengths were checked above against m, n and k, and the leading
        // dimensions are those of the stored row-major matrices (`Gemm32::column_major`).
        unsafe { blas.gemm(config, b, a, c) }
            .map_err(|e| DeviceError::Blas { op: "sgemm", message: e.to_string() })
    }

    /// [`Gpu::gemm_rm`] over `batch` products at once (cuBLAS strided batched): operand `x`
    /// holds `batch` row-major matrices back to back, product `i` reading matrix `i` of `a`
    /// and of `b` and writing matrix `i` of `c`.
    ///
    /// # Errors
    /// As [`Gpu::gemm_rm`].
    pub(crate) fn gemm_batched_rm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        g: Gemm32,
        batch: usize,
        a: &A,
        b: &B,
        c: &mut C,
    ) -> Result<()> {
        let Gemm32 { m, n, k, .. } = g;
        if a.len() < batch * m * k || b.len() < batch * k * n || c.len() < batch * m * n {
            return Err(DeviceError::Shape {
                op: "sgemm_strided_batched",
                message: format!(
                    "{batch} × ({m}×{k} · {k}×{n}) with buffers of {}, {}, {}",
                    a.len(),
                    b.len(),
                    c.len()
                ),
            });
        }
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let config = g.strided_batched(batch)?;
        let blas = self.blas()?;
        self.ctx.bind_to_thread().map_err(|e| self.driver(e))?;
        // SAFETY: the lengths were checked above against `batch` matrices of m, n and k
        // packed back to back (the strides), with the leading dimensions of
        // `Gemm32::column_major`.
        unsafe { blas.gemm_strided_batched(config, b, a, c) }
            .map_err(|e| DeviceError::Blas { op: "sgemm_strided_batched", message: e.to_string() })
    }

    fn blaslt(&self) -> Result<Arc<CudaBlasLT>> {
        let mut lt = self.blaslt.lock();
        if let Some(lt) = lt.as_ref() {
            return Ok(lt.clone());
        }
        // SAFETY: only tries to load the cuBLASLt library.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(DeviceError::MissingLibrary {
                library: "libcublasLt",
                needed_for: "bf16 matrix products",
            });
        }
        // cudarc allocates the handle's workspace (32 MiB on Hopper, 4 MiB before) with an
        // `unwrap`: check the room first, and turn a failure that slips past the check into
        // an error rather than a panic in the caller.
        const WORKSPACE_BYTES: usize = 32 << 20;
        let (free, _) = self.memory_info()?;
        if free < WORKSPACE_BYTES {
            return Err(DeviceError::Blas {
                op: "create cuBLASLt handle",
                message: format!(
                    "{free} bytes free on the device, {WORKSPACE_BYTES} needed for the workspace"
                ),
            });
        }
        let stream = self.stream.clone();
        let created = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| CudaBlasLT::new(stream)))
            .map_err(|_| DeviceError::Blas {
                op: "create cuBLASLt handle",
                message: "allocating its workspace failed".into(),
            })?;
        let made = Arc::new(
            created
                .map_err(|e| DeviceError::Blas { op: "create cuBLASLt handle", message: e.to_string() })?,
        );
        *lt = Some(made.clone());
        Ok(made)
    }

    /// Copies `data` to the device as bf16 (rounded to nearest even).
    ///
    /// # Errors
    /// [`DeviceError::Driver`].
    pub fn upload_bf16(&self, data: &[f32]) -> Result<CudaSlice<bf16>> {
        let host: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        self.stream.clone_htod(&host).map_err(|e| self.driver(e))
    }

    /// Copies a bf16 device buffer back to the host as f32.
    ///
    /// # Errors
    /// [`DeviceError::Driver`].
    pub fn download_bf16(&self, buffer: &CudaSlice<bf16>) -> Result<Vec<f32>> {
        let host = self.stream.clone_dtoh(buffer).map_err(|e| self.driver(e))?;
        Ok(host.into_iter().map(bf16::to_f32).collect())
    }

    /// A zeroed bf16 device buffer of `len` elements.
    ///
    /// # Errors
    /// [`DeviceError::Driver`] (for example out of memory).
    pub fn zeros_bf16(&self, len: usize) -> Result<CudaSlice<bf16>> {
        self.stream.alloc_zeros(len).map_err(|e| self.driver(e))
    }

    /// Row-major `c (m×n) = a (m×k) · b (k×n)` in bf16 with f32 accumulation, through
    /// cuBLASLt (its heuristic picks the kernel; tensor cores where the device has them).
    ///
    /// # Errors
    /// [`DeviceError::Shape`] if a buffer is too short or a dimension is 0 (unlike
    /// [`Gpu::sgemm`], which takes `k = 0`); [`DeviceError::MissingLibrary`]
    /// without cuBLASLt; [`DeviceError::Blas`].
    pub fn gemm_bf16(
        &self,
        (m, n, k): (usize, usize, usize),
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        c: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        if a.len() < m * k || b.len() < k * n || c.len() < m * n || m == 0 || n == 0 || k == 0 {
            return Err(DeviceError::Shape {
                op: "gemm_bf16",
                message: format!("{m}×{k} · {k}×{n} with buffers of {}, {}, {}", a.len(), b.len(), c.len()),
            });
        }
        let lt = self.blaslt()?;
        self.ctx.bind_to_thread().map_err(|e| self.driver(e))?;
        // The same column-major reading as `gemm_rm`: C^T (n×m) = B^T (n×k) · A^T (k×m).
        let cm = Gemm32 { m, n, k, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 }.column_major()?;
        let config = MatmulConfig {
            transa: false,
            transb: false,
            transc: false,
            m: cm.m as u64,
            n: cm.n as u64,
            k: cm.k as u64,
            alpha: cm.alpha,
            lda: cm.lda.into(),
            ldb: cm.ldb.into(),
            beta: cm.beta,
            ldc: cm.ldc.into(),
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        // SAFETY: the lengths were checked above against m, n and k; no bias, no epilogue.
        unsafe { lt.matmul(config, b, a, c, None, None) }
            .map_err(|e| DeviceError::Blas { op: "gemm_bf16", message: e.to_string() })
    }

    /// The compiled kernel `name` of [`KERNELS`] (compiled and loaded on first use).
    pub(crate) fn kernel(&self, name: &'static str) -> Result<CudaFunction> {
        if let Some(function) = self.kernels.lock().get(name) {
            return Ok(function.clone());
        }
        let source = KERNELS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .ok_or(DeviceError::Compile { kernel: name, message: "no such kernel".into() })?;
        // Machine code for this device, which any driver of NVRTC's major version or newer
        // loads (PTX from an NVRTC newer than the driver would not load). An NVRTC older
        // than the device does not know its architecture: then PTX, which the driver
        // compiles for it.
        let (image, what) = match cached_cubin(name, source, self.compute_capability) {
            Ok(cubin) => (cudarc::nvrtc::Ptx::from_binary(cubin.to_vec()), "machine code"),
            Err(cubin_error) => match compile(name, source) {
                Ok(ptx) => (ptx, "PTX"),
                Err(_) => return Err(cubin_error),
            },
        };
        let loaded = self.ctx.load_module(image).and_then(|module| module.load_function(name));
        let function = loaded.map_err(|e| {
            let (major, minor) = self.compute_capability;
            DeviceError::Driver {
                device: self.ordinal,
                message: format!(
                    "loading kernel `{name}` ({what} for sm_{major}{minor} from NVRTC {}) failed: {} \
                     (the driver supports CUDA {}; an NVRTC of a newer major version than the \
                     driver's makes code it cannot load)",
                    nvrtc_version(),
                    driver_message(e),
                    driver_version()
                ),
            }
        })?;
        self.kernels.lock().insert(name, function.clone());
        Ok(function)
    }

    /// `x = max(x, 0)` in place.
    ///
    /// # Errors
    /// [`DeviceError::Compile`], [`DeviceError::Driver`].
    pub fn relu(&self, x: &mut CudaSlice<f32>) -> Result<()> {
        let n = len_u32(x.len(), "relu")?;
        launch!(self, "relu_f32", n; x, &n)
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
        let n = len_u32(x.len(), "axpy")?;
        launch!(self, "axpy_f32", n; &a, x, y, &n)
    }

    /// The sum of `x`, added in double precision in a fixed order (block partials, then
    /// one block over them), so the same bits every run.
    ///
    /// # Errors
    /// [`DeviceError::Compile`], [`DeviceError::Driver`].
    pub fn sum(&self, x: &CudaSlice<f32>) -> Result<f32> {
        Ok(self.reduce_elements(0, x)? as f32)
    }

    /// `y = f(x)` element by element, for the distributed arrays: `op` is the code of
    /// `darray_map_f32` (its source lists them) and `a` the operation's parameter.
    ///
    /// # Errors
    /// [`DeviceError::Shape`], [`DeviceError::Compile`], [`DeviceError::Driver`].
    pub(crate) fn map_elements(
        &self,
        op: i32,
        a: f32,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = same_len("map", x.len(), y.len())?;
        launch!(self, "darray_map_f32", n; x, y, &n, &op, &a)
    }

    /// `y = a op b` element by element, for the distributed arrays: `op` is the code of
    /// `darray_zip_f32`.
    ///
    /// # Errors
    /// [`DeviceError::Shape`], [`DeviceError::Compile`], [`DeviceError::Driver`].
    pub(crate) fn zip_elements(
        &self,
        op: i32,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        same_len("zip", a.len(), b.len())?;
        let n = same_len("zip", a.len(), y.len())?;
        launch!(self, "darray_zip_f32", n; a, b, y, &n, &op)
    }

    /// `y` (`cols × rows`) = the transpose of the row-major `rows × cols` matrix `x`.
    ///
    /// # Errors
    /// [`DeviceError::Shape`], [`DeviceError::Compile`], [`DeviceError::Driver`].
    pub(crate) fn transpose(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if x.len() != rows * cols || y.len() != x.len() {
            return Err(DeviceError::Shape {
                op: "transpose",
                message: format!("{rows}×{cols} from {} into {} elements", x.len(), y.len()),
            });
        }
        let (r, c) = (len_u32(rows, "transpose")?, len_u32(cols, "transpose")?);
        let tiles = r.div_ceil(32).saturating_mul(c.div_ceil(32));
        let config = LaunchConfig {
            grid_dim: (tiles.clamp(1, 4096), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "darray_transpose_f32", cfg = config; x, y, &r, &c)
    }

    /// The sum (`op` 0), minimum (1) or maximum (2) of `x`, computed in double: blocks of 256
    /// reduce their shares to partial results, which one block then reduces (a fixed order,
    /// so the result does not vary from run to run). Min and max of nothing, or of NaNs
    /// only, are NaN; a NaN loses to a number.
    ///
    /// # Errors
    /// [`DeviceError::Shape`], [`DeviceError::Compile`], [`DeviceError::Driver`].
    pub(crate) fn reduce_elements(&self, op: i32, x: &CudaSlice<f32>) -> Result<f64> {
        let n = len_u32(x.len(), "reduce")?;
        let blocks = n.div_ceil(256).clamp(1, 1024);
        let block = |blocks: u32| LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut partial = self.stream.alloc_zeros::<f64>(blocks as usize).map_err(|e| self.driver(e))?;
        launch!(self, "darray_reduce_f32", cfg = block(blocks); x, &mut partial, &n, &op)?;
        let mut total = self.stream.alloc_zeros::<f64>(1).map_err(|e| self.driver(e))?;
        launch!(self, "darray_reduce_f64", cfg = block(1); &partial, &mut total, &blocks, &op)?;
        let total = self.stream.clone_dtoh(&total).map_err(|e| self.driver(e))?;
        Ok(total[0])
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
        let (r, c) = (len_u32(rows, "softmax_rows")?, len_u32(cols, "softmax_rows")?);
        launch!(self, "softmax_rows_f32", cfg = rows_config(r, c); x, &r, &c)
    }
}

/// The shape and scalars of one f32 GEMM (see [`Gpu::gemm_rm`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gemm32 {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) trans_a: bool,
    pub(crate) trans_b: bool,
    pub(crate) alpha: f32,
    pub(crate) beta: f32,
}

impl Gemm32 {
    /// The column-major cuBLAS call that computes this row-major product when given the
    /// buffers as `(b, a, c)`: a row-major matrix read column-major is its transpose, so
    /// `Cᵀ (n×m) = op(B)ᵀ (n×k) · op(A)ᵀ (k×m)`. Leading dimensions are those of the stored
    /// matrices, at least 1 (as BLAS requires even for empty ones).
    ///
    /// # Errors
    /// [`DeviceError::Shape`] if a dimension exceeds `i32`.
    pub(crate) fn column_major(&self) -> Result<GemmConfig<f32>> {
        let dim = |x: usize| {
            i32::try_from(x)
                .map_err(|_| DeviceError::Shape { op: "sgemm", message: format!("dimension {x} too large") })
        };
        let (m, n, k) = (dim(self.m)?, dim(self.n)?, dim(self.k)?);
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        Ok(GemmConfig {
            transa: op(self.trans_b),
            transb: op(self.trans_a),
            m: n,
            n: m,
            k,
            alpha: self.alpha,
            lda: (if self.trans_b { k } else { n }).max(1),
            ldb: (if self.trans_a { m } else { k }).max(1),
            beta: self.beta,
            ldc: n.max(1),
        })
    }
}

impl Gemm32 {
    /// The cuBLAS strided-batched call for `batch` of these products with the matrices of
    /// each operand back to back: [`Gemm32::column_major`] (operands passed as `(b, a, c)`)
    /// with the strides of `b`, `a` and `c`.
    ///
    /// # Errors
    /// [`DeviceError::Shape`] if a dimension, stride or the batch exceeds cuBLAS's integers.
    pub(crate) fn strided_batched(&self, batch: usize) -> Result<StridedBatchedConfig<f32>> {
        let too_large = |what: usize| DeviceError::Shape {
            op: "sgemm_strided_batched",
            message: format!("{what} too large for cuBLAS"),
        };
        let stride = |len: usize| i64::try_from(len).map_err(|_| too_large(len));
        let Gemm32 { m, n, k, .. } = *self;
        Ok(StridedBatchedConfig {
            gemm: self.column_major()?,
            batch_size: i32::try_from(batch).map_err(|_| too_large(batch))?,
            stride_a: stride(k * n)?,
            stride_b: stride(m * k)?,
            stride_c: stride(m * n)?,
        })
    }
}

/// A launch configuration for a grid-stride kernel over `n` elements (256 threads a block).
pub(crate) fn grid(n: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65_535 * 16), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch configuration for the row kernels (softmax, softmax cross-entropy, softmax
/// gradient, row sums): a block per row (blocks loop over rows beyond 65 535), of a power
/// of two from 32 to 256 threads, enough to give each of `cols` columns a thread where
/// it can (the kernels reduce in a `__shared__` array of 256).
pub(crate) fn rows_config(rows: u32, cols: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, 65_535), 1, 1),
        block_dim: (cols.clamp(32, 256).next_power_of_two(), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The launch configuration of the one-block reductions (`mean_f32`, `mse_f32`): one block
/// of 256 threads.
pub(crate) fn one_block() -> LaunchConfig {
    LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// The launch configuration of `col_sums_add_f32`: blocks of 256 threads over tiles of 32
/// columns (blocks loop over tiles beyond 65 535).
pub(crate) fn column_tiles(cols: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(32).clamp(1, 65_535), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// An element count or dimension passed to a kernel (as `unsigned int`): at most 2³¹ − 1,
/// so that a grid-stride loop's `i += blockDim.x * gridDim.x` (at most 2²⁸, see [`grid`])
/// cannot wrap past 2³² and loop forever.
pub(crate) fn len_u32(len: usize, op: &'static str) -> Result<u32> {
    match u32::try_from(len) {
        Ok(n) if n <= i32::MAX as u32 => Ok(n),
        _ => {
            Err(DeviceError::Shape { op, message: format!("{len} elements exceed the kernels' 2³¹ − 1") })
        }
    }
}

/// The common length of two buffers an elementwise kernel reads and writes, as a kernel
/// argument.
fn same_len(op: &'static str, a: usize, b: usize) -> Result<u32> {
    if a != b {
        return Err(DeviceError::Shape { op, message: format!("{a} vs {b} elements") });
    }
    len_u32(a, op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_lengths_leave_room_for_the_grid_stride() {
        assert_eq!(len_u32(i32::MAX as usize, "t").unwrap(), i32::MAX as u32);
        assert!(matches!(len_u32(i32::MAX as usize + 1, "t"), Err(DeviceError::Shape { .. })));
        assert!(matches!(len_u32(usize::MAX, "t"), Err(DeviceError::Shape { .. })));
        // The largest grid-stride step stays below 2³¹, so i + step never wraps.
        let widest = grid(u32::MAX);
        let step = widest.grid_dim.0 as u64 * widest.block_dim.0 as u64;
        assert!(step <= 1 << 31, "{step}");
    }

    /// Reference BLAS `sgemm` (column-major, as cuBLAS defines it), checking the argument
    /// rules cuBLAS checks (it answers `CUBLAS_STATUS_INVALID_VALUE` when one fails).
    fn blas_sgemm(cfg: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (cfg.m as usize, cfg.n as usize, cfg.k as usize);
        let (lda, ldb, ldc) = (cfg.lda as usize, cfg.ldb as usize, cfg.ldc as usize);
        let (ta, tb) =
            (cfg.transa == cublasOperation_t::CUBLAS_OP_T, cfg.transb == cublasOperation_t::CUBLAS_OP_T);
        assert!(lda >= (if ta { k } else { m }).max(1), "lda {lda} too small: {cfg:?}");
        assert!(ldb >= (if tb { n } else { k }).max(1), "ldb {ldb} too small: {cfg:?}");
        assert!(ldc >= m.max(1), "ldc {ldc} too small: {cfg:?}");
        for j in 0..n {
            for i in 0..m {
                let mut sum = 0f64;
                for p in 0..k {
                    let av = if ta { a[p + i * lda] } else { a[i + p * lda] };
                    let bv = if tb { b[j + p * ldb] } else { b[p + j * ldb] };
                    sum += av as f64 * bv as f64;
                }
                let at = i + j * ldc;
                c[at] = cfg.alpha * sum as f32 + cfg.beta * c[at];
            }
        }
    }

    /// The row-major product `Gemm32` promises, computed directly.
    fn row_major(g: &Gemm32, a: &[f32], b: &[f32], c: &mut [f32]) {
        for i in 0..g.m {
            for j in 0..g.n {
                let mut sum = 0f64;
                for p in 0..g.k {
                    let av = if g.trans_a { a[p * g.m + i] } else { a[i * g.k + p] };
                    let bv = if g.trans_b { b[j * g.k + p] } else { b[p * g.n + j] };
                    sum += av as f64 * bv as f64;
                }
                c[i * g.n + j] = g.alpha * sum as f32 + g.beta * c[i * g.n + j];
            }
        }
    }

    /// Every transpose combination, with empty, single and uneven dimensions: the cuBLAS
    /// call `gemm_rm` makes (buffers passed as `b, a, c`) computes the row-major product and
    /// passes cuBLAS's argument checks.
    #[test]
    fn the_column_major_call_computes_the_row_major_product() {
        let shapes = [(1, 1, 1), (3, 5, 7), (7, 3, 5), (5, 7, 1), (1, 6, 4), (6, 1, 4), (4, 4, 0), (2, 9, 3)];
        for (m, n, k) in shapes {
            for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
                for (alpha, beta) in [(1.0, 0.0), (1.0, 1.0), (0.5, -2.0)] {
                    let g = Gemm32 { m, n, k, trans_a, trans_b, alpha, beta };
                    let a: Vec<f32> = (0..m * k).map(|i| (i * 7 % 13) as f32 - 6.0).collect();
                    let b: Vec<f32> = (0..k * n).map(|i| (i * 5 % 11) as f32 - 5.0).collect();
                    let c0: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32).collect();
                    let mut expected = c0.clone();
                    row_major(&g, &a, &b, &mut expected);
                    let mut got = c0;
                    blas_sgemm(&g.column_major().unwrap(), &b, &a, &mut got);
                    assert_eq!(got, expected, "{g:?}");
                }
            }
        }
    }

    /// The strided-batched call: each product of the batch, read at its strides, computes
    /// the row-major product of its matrices.
    #[test]
    fn the_strided_batched_call_computes_each_row_major_product() {
        for (m, n, k) in [(3, 5, 7), (4, 4, 2), (1, 6, 3)] {
            for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
                let g = Gemm32 { m, n, k, trans_a, trans_b, alpha: 0.5, beta: 1.0 };
                let batch = 3;
                let a: Vec<f32> = (0..batch * m * k).map(|i| (i * 7 % 13) as f32 - 6.0).collect();
                let b: Vec<f32> = (0..batch * k * n).map(|i| (i * 5 % 11) as f32 - 5.0).collect();
                let c0: Vec<f32> = (0..batch * m * n).map(|i| (i % 3) as f32).collect();
                let config = g.strided_batched(batch).unwrap();
                assert_eq!(config.batch_size, batch as i32);
                let mut got = c0.clone();
                for i in 0..batch {
                    let (sa, sb, sc) =
                        (config.stride_a as usize, config.stride_b as usize, config.stride_c as usize);
                    // cuBLAS's A is our b, its B our a.
                    blas_sgemm(&config.gemm, &b[i * sa..], &a[i * sb..], &mut got[i * sc..(i + 1) * sc]);
                }
                let mut expected = c0;
                for i in 0..batch {
                    let c = &mut expected[i * m * n..(i + 1) * m * n];
                    row_major(&g, &a[i * m * k..(i + 1) * m * k], &b[i * k * n..(i + 1) * k * n], c);
                }
                assert_eq!(got, expected, "{g:?}");
            }
        }
    }

    /// Machine code is compiled once per kernel and architecture in a process.
    #[test]
    fn compiled_machine_code_is_cached() {
        let expected = std::env::var("TESSERA_EXPECT_NVRTC").is_ok_and(|v| v == "1");
        let (name, source) = KERNELS[0];
        let first = match cached_cubin(name, source, (9, 0)) {
            Ok(cubin) => cubin,
            Err(error) => {
                assert!(!expected, "TESSERA_EXPECT_NVRTC=1 but NVRTC failed: {error}");
                eprintln!("skipped: {error}");
                return;
            }
        };
        let again = cached_cubin(name, source, (9, 0)).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "compiled twice");
        let other = cached_cubin(name, source, (8, 0)).unwrap();
        assert!(!Arc::ptr_eq(&first, &other), "one image for two architectures");
    }

    #[test]
    fn dimensions_beyond_i32_are_shape_errors() {
        let g = Gemm32 { m: 1 << 31, n: 1, k: 1, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
        assert!(matches!(g.column_major(), Err(DeviceError::Shape { .. })));
    }
}
