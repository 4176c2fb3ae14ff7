//! The arithmetic of every NVRTC kernel, checked on the CPU (feature `cuda`; no GPU, driver
//! or CUDA toolkit needed, only a C++20 compiler).
//!
//! The kernels' CUDA C sources ([`KERNELS`] after [`KERNEL_PRELUDE`]) are compiled as C++ by
//! the host compiler with a small shim: `blockIdx`, `threadIdx`, `blockDim` and `gridDim`
//! are variables; a launch runs its blocks one after another; a kernel without
//! `__syncthreads` runs a block's threads one after another, a kernel with it runs them as
//! OS threads meeting at a real barrier, atomics are real atomics, and launches run one at a
//! time, as on one stream. Each kernel is then
//! launched with the grid the library gives it and checked against the CPU executor (or
//! the CPU optimizer) on the buffer layouts the GPU executor uses: im2col columns as
//! `[C·KH·KW, N·OH·OW]`, convolution products as `[O, N·OH·OW]`, and so on. The matrix
//! products between kernels are done here on the host in the same orientation as the GPU
//! executor's cuBLAS calls.
//!
//! What this catches: index and formula mistakes, a kernel reading or writing the wrong
//! layout, a block reduction with a missing barrier or a lost partial sum (each seen to fail
//! here by breaking the kernel). What it cannot: a missing atomic in a kernel without
//! barriers (its threads run one after another), timing, memory coalescing, the driver and
//! cuBLAS themselves; `scripts/gpu-check.sh` covers those on a GPU.
//!
//! Without a C++ compiler the tests skip, unless `TESSERA_EXPECT_CXX=1` (set by
//! `scripts/test.sh`), which makes a missing compiler a failure.
#![cfg(feature = "cuda")]

#[path = "support/gpu_on_host.rs"]
mod gpu_on_host;

use std::ffi::{c_void, CString};
use std::process::Command;
use std::sync::OnceLock;

use tessera::nn::{
    Activation, CpuExecutor, DType, Executor, Graph, Init, NodeId, Optimizer, OptimizerConfig, Params, Rng,
};
use tessera::{KERNELS, KERNEL_PRELUDE};

/// Makes CUDA C compile and run as C++ on the host (see the module comment).
const SHIM: &str = r#"
#include <math.h>
#include <stddef.h>
#include <string.h>
#include <atomic>
#include <barrier>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

struct tessera_dim3 { unsigned int x, y, z; };
static thread_local tessera_dim3 blockIdx, threadIdx;
static tessera_dim3 blockDim, gridDim;
static std::barrier<>* tessera_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() tessera_barrier->arrive_and_wait()

static inline float atomicAdd(float* at, float v) { return std::atomic_ref<float>(*at).fetch_add(v); }
static inline unsigned int atomicAdd(unsigned int* at, unsigned int v) {
    return std::atomic_ref<unsigned int>(*at).fetch_add(v);
}
static inline float __int_as_float(int v) { float f; memcpy(&f, &v, sizeof f); return f; }

// Runs `body` as every thread of a `grid × block` launch. Launches run one at a time (the
// dimensions, the barrier and shared memory are process-wide), like kernels on one stream.
static void tessera_launch(unsigned int grid, unsigned int block, bool syncs, const std::function<void()>& body) {
    static std::mutex one_launch_at_a_time;
    std::lock_guard<std::mutex> launching(one_launch_at_a_time);
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    if (!syncs) {
        for (unsigned int b = 0; b < grid; ++b) {
            for (unsigned int t = 0; t < block; ++t) {
                blockIdx = {b, 0, 0};
                threadIdx = {t, 0, 0};
                body();
            }
        }
        return;
    }
    std::barrier<> barrier(block);
    tessera_barrier = &barrier;
    std::vector<std::thread> threads;
    for (unsigned int t = 0; t < block; ++t) {
        threads.emplace_back([&, t] {
            for (unsigned int b = 0; b < grid; ++b) {
                blockIdx = {b, 0, 0};
                threadIdx = {t, 0, 0};
                body();
                // The block ends for every thread before the next one reuses shared memory.
                barrier.arrive_and_wait();
            }
        });
    }
    for (std::thread& thread : threads) { thread.join(); }
    tessera_barrier = nullptr;
}
"#;

/// The C++ translation unit: the shim, the prelude, every kernel, and for each kernel a
/// `host_<name>(grid, block, args...)` entry point that launches it.
fn host_source() -> String {
    let mut source = format!("{SHIM}\n{KERNEL_PRELUDE}\n");
    for (name, kernel) in KERNELS {
        source.push_str(kernel);
        source.push('\n');
        let params = gpu_on_host::parameter_list(name, kernel);
        let names: Vec<&str> = params.split(',').map(|p| gpu_on_host::split_parameter(p).1).collect();
        // Block-synchronous: a barrier of its own, or a prelude block reduction's.
        let syncs = kernel.contains("__syncthreads") || kernel.contains("tessera_block_");
        source.push_str(&format!(
            "extern \"C\" void host_{name}(unsigned int tessera_grid, unsigned int tessera_block, {params}) {{\n    \
             tessera_launch(tessera_grid, tessera_block, {syncs}, [&] {{ {name}({}); }});\n}}\n",
            names.join(", ")
        ));
    }
    source
}

/// The kernels compiled into a shared library and opened.
struct HostKernels {
    library: *mut c_void,
    _dir: tempfile::TempDir,
}

// SAFETY: the library handle is only used to look up symbols, which dlsym allows from any
// thread; the library stays open for the life of the process.
unsafe impl Send for HostKernels {}
// SAFETY: as above.
unsafe impl Sync for HostKernels {}

impl HostKernels {
    /// The address of `host_<name>`.
    fn symbol(&self, name: &str) -> *mut c_void {
        let symbol = CString::new(format!("host_{name}")).expect("kernel names have no NUL");
        // SAFETY: a live handle from dlopen and a NUL-terminated name.
        let address = unsafe { libc::dlsym(self.library, symbol.as_ptr()) };
        assert!(!address.is_null(), "the host library has no host_{name}");
        address
    }

    /// Launches kernel `name` with a `(grid, block)` configuration. The arguments' types
    /// must be the C types of the kernel's parameters, in order (only those C types compile:
    /// see [`CArg`]); every buffer must hold what the kernel indexes.
    fn launch(&self, name: &str, (grid, block): (u32, u32), args: impl KernelArgs) {
        let address = self.symbol(name);
        // SAFETY: `host_<name>` takes the grid, the block and the kernel's parameters, which
        // the caller passes with their C types and buffers large enough (see above).
        unsafe { args.call(address, grid, block) }
    }
}

/// A Rust type passed as exactly one C kernel parameter type (`unsigned int`, `int`,
/// `float`, `unsigned long long`, pointers): an untyped literal or a `usize` does not
/// compile, rather than being passed with the wrong width.
trait CArg: Copy {}
impl CArg for u32 {}
impl CArg for i32 {}
impl CArg for f32 {}
impl CArg for u64 {}
impl<T> CArg for *const T {}
impl<T> CArg for *mut T {}

/// A tuple of kernel arguments, called as `host_<name>(grid, block, args...)`.
trait KernelArgs {
    /// # Safety
    /// `address` must be a function taking `(u32, u32)` then these arguments' C types.
    unsafe fn call(self, address: *mut c_void, grid: u32, block: u32);
}

macro_rules! kernel_args {
    ($($t:ident $i:tt),+) => {
        impl<$($t: CArg),+> KernelArgs for ($($t,)+) {
            unsafe fn call(self, address: *mut c_void, grid: u32, block: u32) {
                // SAFETY: the caller vouches for the function's signature.
                unsafe {
                    let function = std::mem::transmute::<*mut c_void, unsafe extern "C" fn(u32, u32, $($t),+)>(address);
                    function(grid, block, $(self.$i),+)
                }
            }
        }
    };
}
kernel_args!(A 0);
kernel_args!(A 0, B 1);
kernel_args!(A 0, B 1, C 2);
kernel_args!(A 0, B 1, C 2, D 3);
kernel_args!(A 0, B 1, C 2, D 3, E 4);
kernel_args!(A 0, B 1, C 2, D 3, E 4, F 5);
kernel_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
kernel_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
kernel_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);
kernel_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9);
kernel_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10);
kernel_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11);
kernel_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12);

/// The host kernels, compiled once per test process; `None` (a skip) without a compiler.
fn host_kernels() -> Option<&'static HostKernels> {
    static KERNELS_ON_HOST: OnceLock<Option<HostKernels>> = OnceLock::new();
    KERNELS_ON_HOST
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let (source, library) = (dir.path().join("kernels.cpp"), dir.path().join("libkernels.so"));
            std::fs::write(&source, host_source()).expect("write the C++ source");
            let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
            let output = match Command::new(&compiler)
                .args(["-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-o"])
                .arg(&library)
                .arg(&source)
                .output()
            {
                Ok(output) => output,
                Err(error) => {
                    let expected = std::env::var("TESSERA_EXPECT_CXX").is_ok_and(|v| v == "1");
                    assert!(!expected, "TESSERA_EXPECT_CXX=1 but `{compiler}` does not run: {error}");
                    eprintln!("skipped: no C++ compiler (`{compiler}`: {error})");
                    return None;
                }
            };
            assert!(
                output.status.success(),
                "the kernels do not compile as C++:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let path = CString::new(library.to_str().expect("a UTF-8 temporary path")).expect("no NUL");
            // SAFETY: opens the library just built; its initialisers only set up statics.
            let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            assert!(!handle.is_null(), "dlopen of the host kernels failed");
            Some(HostKernels { library: handle, _dir: dir })
        })
        .as_ref()
}

/// The library's launch configuration for grid-stride kernels (`devices::grid`).
fn grid(n: usize) -> (u32, u32) {
    ((n as u32).div_ceil(256).clamp(1, 65_535 * 16), 256)
}

/// The library's launch configuration for the row kernels (`devices::rows_config`).
fn rows_config(rows: usize, cols: usize) -> (u32, u32) {
    ((rows as u32).clamp(1, 65_535), (cols as u32).clamp(32, 256).next_power_of_two())
}

/// The library's launch configuration for `col_sums_add_f32` (`devices::column_tiles`).
fn column_tiles(cols: usize) -> (u32, u32) {
    ((cols as u32).div_ceil(32).clamp(1, 65_535), 256)
}

fn close(what: &str, got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len(), "{what}: lengths");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!((g - e).abs() <= 1e-5 + 1e-4 * e.abs(), "{what}[{i}]: host kernel {g}, CPU {e}");
    }
}

fn normal(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

/// Row-major `op(a) · op(b)` (`m×k` times `k×n`) added into `c` after scaling it by `beta`:
/// the product the GPU executor asks cuBLAS for between kernels.
#[allow(clippy::too_many_arguments)]
fn gemm(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    beta: f32,
    c: &mut [f32],
) {
    for i in 0..m {
        for j in 0..n {
            let mut sum = 0f64;
            for p in 0..k {
                let av = if trans_a { a[p * m + i] } else { a[i * k + p] };
                let bv = if trans_b { b[j * k + p] } else { b[p * n + j] };
                sum += av as f64 * bv as f64;
            }
            c[i * n + j] = beta * c[i * n + j] + sum as f32;
        }
    }
}

/// A graph's parameters, initialised from `seed`, with the CPU executor's forward values and
/// gradients after a backward pass seeded with `seed_grad` at `out`.
struct CpuRun {
    params: Params,
    exec: CpuExecutor,
}

impl CpuRun {
    fn new(graph: &Graph, out: NodeId, seed_grad: &[f32], seed: u64) -> CpuRun {
        let params = Params::init(graph, &mut Rng::seed(seed));
        let mut exec = CpuExecutor::new(graph);
        exec.forward(&params, 0..out.index() + 1).unwrap();
        exec.backward(&params, 0..out.index() + 1, &[(out, seed_grad)]).unwrap();
        CpuRun { params, exec }
    }

    fn param(&self, index: usize) -> Vec<f32> {
        self.params.tensors[index].data.clone()
    }
}

#[test]
fn every_kernel_has_a_host_entry_point() {
    let Some(kernels) = host_kernels() else { return };
    for (name, _) in KERNELS {
        kernels.symbol(name);
    }
}

#[test]
fn elementwise_kernels() {
    let Some(k) = host_kernels() else { return };
    let n = 5_000;
    let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
    let mut relu = x.clone();
    k.launch("relu_f32", grid(n), (relu.as_mut_ptr(), n as u32));
    assert_eq!(relu, x.iter().map(|v| v.max(0.0)).collect::<Vec<_>>());
    let mut y = vec![1.0f32; n];
    k.launch("axpy_f32", grid(n), (2.0f32, x.as_ptr(), y.as_mut_ptr(), n as u32));
    assert_eq!(y, x.iter().map(|v| 1.0 + 2.0 * v).collect::<Vec<_>>());
    let mut filled = vec![0.0f32; n];
    k.launch("fill_f32", grid(n), (filled.as_mut_ptr(), 0.25f32, n as u32));
    assert!(filled.iter().all(|&v| v == 0.25));
    let (a, b) = (x.clone(), vec![0.5f32; n]);
    let mut acc = vec![1.0f32; n];
    k.launch("mul_add_f32", grid(n), (a.as_ptr(), b.as_ptr(), acc.as_mut_ptr(), n as u32));
    assert_eq!(acc, x.iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>());
}

/// `act_f32`, `act_grad_f32` and `act_grad_add_f32` against the CPU executor's activations.
#[test]
fn activations_match_the_cpu() {
    let Some(k) = host_kernels() else { return };
    for (code, act) in [Activation::Identity, Activation::Relu, Activation::Sigmoid, Activation::Tanh]
        .into_iter()
        .enumerate()
    {
        let mut g = Graph::new();
        let x = g.param("x", &[3, 333], Init::Normal { std: 2.0 }).unwrap();
        let y = g.act(x, act).unwrap();
        let seed = normal(&mut Rng::seed(7), 999);
        let cpu = CpuRun::new(&g, y, &seed, code as u64);
        let (xv, n, code) = (cpu.param(0), 999usize, code as i32);
        let mut yv = vec![0f32; n];
        k.launch("act_f32", grid(n), (xv.as_ptr(), yv.as_mut_ptr(), n as u32, code));
        close(&format!("{act:?} value"), &yv, cpu.exec.value(y).unwrap());
        let mut dz = vec![0f32; n];
        k.launch("act_grad_f32", grid(n), (yv.as_ptr(), seed.as_ptr(), dz.as_mut_ptr(), n as u32, code));
        close(&format!("{act:?} gradient"), &dz, cpu.exec.param_grad(0));
        let mut dx = vec![1f32; n];
        k.launch("act_grad_add_f32", grid(n), (yv.as_ptr(), seed.as_ptr(), dx.as_mut_ptr(), n as u32, code));
        let plus_one: Vec<f32> = dz.iter().map(|v| v + 1.0).collect();
        close(&format!("{act:?} accumulated gradient"), &dx, &plus_one);
    }
}

/// A linear layer as the GPU executor runs it: product, `bias_act_f32`; backward
/// `act_grad_f32`, products with the weights and inputs, `col_sums_add_f32` for the bias.
#[test]
fn linear_matches_the_cpu() {
    let Some(k) = host_kernels() else { return };
    let (m, kk, n) = (37, 19, 300);
    for (code, act) in [Activation::Identity, Activation::Relu, Activation::Sigmoid, Activation::Tanh]
        .into_iter()
        .enumerate()
    {
        let mut g = Graph::new();
        let x = g.param("x", &[m, kk], Init::Normal { std: 1.0 }).unwrap();
        let w = g.param("w", &[kk, n], Init::Normal { std: 0.3 }).unwrap();
        let b = g.param("b", &[n], Init::Normal { std: 0.5 }).unwrap();
        let y = g.linear(x, w, b, act).unwrap();
        let seed = normal(&mut Rng::seed(11), m * n);
        let cpu = CpuRun::new(&g, y, &seed, 20 + code as u64);
        let (xv, wv, bv, code) = (cpu.param(0), cpu.param(1), cpu.param(2), code as i32);
        let len = m * n;
        let mut yv = vec![0f32; len];
        gemm((m, n, kk), &xv, false, &wv, false, 0.0, &mut yv);
        k.launch("bias_act_f32", grid(len), (yv.as_mut_ptr(), bv.as_ptr(), len as u32, n as u32, code));
        close(&format!("linear {act:?} value"), &yv, cpu.exec.value(y).unwrap());
        let mut dz = vec![0f32; len];
        k.launch("act_grad_f32", grid(len), (yv.as_ptr(), seed.as_ptr(), dz.as_mut_ptr(), len as u32, code));
        let (mut dx, mut dw, mut db) = (vec![0f32; m * kk], vec![0f32; kk * n], vec![0f32; n]);
        gemm((m, kk, n), &dz, false, &wv, true, 1.0, &mut dx);
        gemm((kk, n, m), &xv, true, &dz, false, 1.0, &mut dw);
        k.launch("col_sums_add_f32", column_tiles(n), (dz.as_ptr(), db.as_mut_ptr(), m as u32, n as u32));
        close(&format!("linear {act:?} input gradient"), &dx, cpu.exec.param_grad(0));
        close(&format!("linear {act:?} weight gradient"), &dw, cpu.exec.param_grad(1));
        close(&format!("linear {act:?} bias gradient"), &db, cpu.exec.param_grad(2));
    }
}

/// A convolution as the GPU executor runs it: `im2col_f32`, one product for the batch,
/// `conv_out_f32` (bias and activation); backward `conv_grad_out_f32`, the weight and
/// column products, `row_sums_add_f32` for the bias and `col2im_add_f32` for the input.
#[test]
fn convolution_matches_the_cpu() {
    let Some(k) = host_kernels() else { return };
    // (N, C, H, W, O, KH, KW, stride, pad, activation)
    let cases = [
        (2, 3, 7, 7, 4, 3, 3, 2, 1, Activation::Tanh),
        (3, 2, 9, 8, 5, 3, 2, 1, 0, Activation::Relu),
        (1, 1, 6, 6, 300, 5, 5, 1, 2, Activation::Sigmoid),
        (4, 2, 8, 8, 3, 2, 2, 3, 1, Activation::Identity),
    ];
    for (case, &(n, c, h, w, o, kh, kw, stride, pad, act)) in cases.iter().enumerate() {
        let mut g = Graph::new();
        let x = g.param("x", &[n, c, h, w], Init::Normal { std: 1.0 }).unwrap();
        let wt = g.param("w", &[o, c, kh, kw], Init::Normal { std: 0.3 }).unwrap();
        let b = g.param("b", &[o], Init::Normal { std: 0.2 }).unwrap();
        let y = g.conv2d(x, wt, b, stride, pad, act).unwrap();
        let shape = g.shape(y).unwrap().to_vec();
        let (oh, ow) = (shape[2], shape[3]);
        let (ckk, nohw, len) = (c * kh * kw, n * oh * ow, n * o * oh * ow);
        let seed = normal(&mut Rng::seed(case as u64), len);
        let cpu = CpuRun::new(&g, y, &seed, 30 + case as u64);
        let (xv, wv, bv) = (cpu.param(0), cpu.param(1), cpu.param(2));
        let what = format!("conv case {case} ({act:?}, stride {stride}, pad {pad})");
        let code = [Activation::Identity, Activation::Relu, Activation::Sigmoid, Activation::Tanh]
            .iter()
            .position(|a| *a == act)
            .unwrap() as i32;
        let geometry = [n, c, h, w, kh, kw, oh, ow, stride, pad].map(|v| v as u32);
        let [gn, gc, gh, gw, gkh, gkw, goh, gow, gstride, gpad] = geometry;
        let mut cols = vec![f32::NAN; ckk * nohw];
        k.launch(
            "im2col_f32",
            grid(ckk * nohw),
            (xv.as_ptr(), cols.as_mut_ptr(), gn, gc, gh, gw, gkh, gkw, goh, gow, gstride, gpad),
        );
        let mut prod = vec![0f32; o * nohw];
        gemm((o, nohw, ckk), &wv, false, &cols, false, 0.0, &mut prod);
        let mut yv = vec![f32::NAN; len];
        let ohw = (oh * ow) as u32;
        k.launch(
            "conv_out_f32",
            grid(len),
            (prod.as_ptr(), bv.as_ptr(), yv.as_mut_ptr(), gn, o as u32, ohw, code),
        );
        close(&format!("{what} value"), &yv, cpu.exec.value(y).unwrap());
        let mut dz = vec![f32::NAN; o * nohw];
        k.launch(
            "conv_grad_out_f32",
            grid(len),
            (yv.as_ptr(), seed.as_ptr(), dz.as_mut_ptr(), gn, o as u32, ohw, code),
        );
        let mut dw = vec![0f32; o * ckk];
        gemm((o, ckk, nohw), &dz, false, &cols, true, 1.0, &mut dw);
        close(&format!("{what} weight gradient"), &dw, cpu.exec.param_grad(1));
        let mut db = vec![0f32; o];
        k.launch(
            "row_sums_add_f32",
            rows_config(o, nohw),
            (dz.as_ptr(), db.as_mut_ptr(), o as u32, nohw as u32),
        );
        close(&format!("{what} bias gradient"), &db, cpu.exec.param_grad(2));
        let mut dcol = vec![0f32; ckk * nohw];
        gemm((ckk, nohw, o), &wv, true, &dz, false, 0.0, &mut dcol);
        let mut dx = vec![0f32; n * c * h * w];
        k.launch(
            "col2im_add_f32",
            grid(dx.len()),
            (dcol.as_ptr(), dx.as_mut_ptr(), gn, gc, gh, gw, gkh, gkw, goh, gow, gstride, gpad),
        );
        close(&format!("{what} input gradient"), &dx, cpu.exec.param_grad(0));
    }
}

/// `maxpool_f32` and `maxpool_grad_add_f32`, with separate and overlapping windows.
#[test]
fn max_pooling_matches_the_cpu() {
    let Some(k) = host_kernels() else { return };
    // Separate, overlapping, gapped (stride > size) windows, and windows that leave the
    // last rows and columns uncovered.
    for (case, (size, stride)) in [(2, 2), (2, 1), (3, 2), (2, 3), (3, 3)].into_iter().enumerate() {
        let (n, c, h, w) = (3, 4, 9, 8);
        let mut g = Graph::new();
        let x = g.param("x", &[n, c, h, w], Init::Normal { std: 1.0 }).unwrap();
        let y = g.max_pool2d(x, size, stride).unwrap();
        let shape = g.shape(y).unwrap().to_vec();
        let (oh, ow) = (shape[2], shape[3]);
        let len = n * c * oh * ow;
        let seed = normal(&mut Rng::seed(40 + case as u64), len);
        let cpu = CpuRun::new(&g, y, &seed, 50 + case as u64);
        let xv = cpu.param(0);
        let (mut yv, mut arg) = (vec![f32::NAN; len], vec![-1i32; len]);
        k.launch(
            "maxpool_f32",
            grid(len),
            (
                xv.as_ptr(),
                yv.as_mut_ptr(),
                arg.as_mut_ptr(),
                (n * c) as u32,
                h as u32,
                w as u32,
                oh as u32,
                ow as u32,
                size as u32,
                stride as u32,
            ),
        );
        close(&format!("max-pool {size}/{stride} value"), &yv, cpu.exec.value(y).unwrap());
        let mut dx = vec![0f32; n * c * h * w];
        let geometry = [n * c, h, w, oh, ow, size, stride].map(|v| v as u32);
        let [planes, gh, gw, goh, gow, gsize, gstride] = geometry;
        k.launch(
            "maxpool_grad_add_f32",
            grid(dx.len()),
            (seed.as_ptr(), arg.as_ptr(), dx.as_mut_ptr(), planes, gh, gw, goh, gow, gsize, gstride),
        );
        close(&format!("max-pool {size}/{stride} gradient"), &dx, cpu.exec.param_grad(0));
    }
}

/// `add_bcast_f32` forward; backward `axpy_f32` into `a` and `col_sums_add_f32` into the
/// broadcast `b`.
#[test]
fn broadcast_add_matches_the_cpu() {
    let Some(k) = host_kernels() else { return };
    let (rows, cols) = (50, 70);
    let mut g = Graph::new();
    let a = g.param("a", &[rows, cols], Init::Normal { std: 1.0 }).unwrap();
    let b = g.param("b", &[cols], Init::Normal { std: 1.0 }).unwrap();
    let y = g.add(a, b).unwrap();
    let len = rows * cols;
    let seed = normal(&mut Rng::seed(60), len);
    let cpu = CpuRun::new(&g, y, &seed, 61);
    let (av, bv) = (cpu.param(0), cpu.param(1));
    let mut yv = vec![0f32; len];
    k.launch(
        "add_bcast_f32",
        grid(len),
        (av.as_ptr(), bv.as_ptr(), yv.as_mut_ptr(), len as u32, cols as u32),
    );
    close("add value", &yv, cpu.exec.value(y).unwrap());
    let mut da = vec![0f32; len];
    k.launch("axpy_f32", grid(len), (1.0f32, seed.as_ptr(), da.as_mut_ptr(), len as u32));
    close("add gradient of a", &da, cpu.exec.param_grad(0));
    let mut db = vec![0f32; cols];
    k.launch(
        "col_sums_add_f32",
        column_tiles(cols),
        (seed.as_ptr(), db.as_mut_ptr(), rows as u32, cols as u32),
    );
    close("add gradient of b", &db, cpu.exec.param_grad(1));
}

/// `softmax_rows_f32` and `softmax_grad_add_f32`.
#[test]
fn softmax_matches_the_cpu() {
    let Some(k) = host_kernels() else { return };
    let (rows, cols) = (1_100, 9);
    let mut g = Graph::new();
    let x = g.param("x", &[rows, cols], Init::Normal { std: 3.0 }).unwrap();
    let y = g.softmax(x).unwrap();
    let seed = normal(&mut Rng::seed(70), rows * cols);
    let cpu = CpuRun::new(&g, y, &seed, 71);
    let mut yv = cpu.param(0);
    k.launch("softmax_rows_f32", rows_config(rows, cols), (yv.as_mut_ptr(), rows as u32, cols as u32));
    close("softmax value", &yv, cpu.exec.value(y).unwrap());
    let mut dx = vec![0f32; rows * cols];
    k.launch(
        "softmax_grad_add_f32",
        rows_config(rows, cols),
        (yv.as_ptr(), seed.as_ptr(), dx.as_mut_ptr(), rows as u32, cols as u32),
    );
    close("softmax gradient", &dx, cpu.exec.param_grad(0));
}

/// `softmax_xent_f32`, `mean_f32` (one block of 256 threads over more rows than threads)
/// and `xent_grad_add_f32`; a label out of range makes its row's loss NaN.
#[test]
fn softmax_cross_entropy_matches_the_cpu() {
    let Some(k) = host_kernels() else { return };
    let (rows, cols) = (700, 10);
    let mut g = Graph::new();
    let logits = g.param("logits", &[rows, cols], Init::Normal { std: 2.0 }).unwrap();
    let labels = g.input("labels", &[rows], DType::I32);
    let loss = g.softmax_cross_entropy(logits, labels).unwrap();
    let ids: Vec<i32> = (0..rows).map(|r| (r * 7 % cols) as i32).collect();
    let params = Params::init(&g, &mut Rng::seed(80));
    let mut cpu = CpuExecutor::new(&g);
    cpu.set_ids(labels, &ids).unwrap();
    cpu.forward_all(&params).unwrap();
    cpu.backward(&params, 0..loss.index() + 1, &[(loss, &[0.7])]).unwrap();
    let lv = params.tensors[0].data.clone();
    let (mut probs, mut row_loss, mut mean) = (vec![0f32; rows * cols], vec![0f32; rows], vec![0f32; 1]);
    k.launch(
        "softmax_xent_f32",
        rows_config(rows, cols),
        (lv.as_ptr(), ids.as_ptr(), probs.as_mut_ptr(), row_loss.as_mut_ptr(), rows as u32, cols as u32),
    );
    k.launch("mean_f32", (1, 256), (row_loss.as_ptr(), mean.as_mut_ptr(), rows as u32));
    close("cross-entropy loss", &mean, cpu.value(loss).unwrap());
    let (g_loss, mut dx) = (vec![0.7f32], vec![0f32; rows * cols]);
    k.launch(
        "xent_grad_add_f32",
        grid(rows * cols),
        (probs.as_ptr(), ids.as_ptr(), g_loss.as_ptr(), dx.as_mut_ptr(), rows as u32, cols as u32),
    );
    close("cross-entropy gradient", &dx, cpu.param_grad(0));
    let mut bad = ids.clone();
    bad[3] = cols as i32;
    k.launch(
        "softmax_xent_f32",
        rows_config(rows, cols),
        (lv.as_ptr(), bad.as_ptr(), probs.as_mut_ptr(), row_loss.as_mut_ptr(), rows as u32, cols as u32),
    );
    assert!(
        row_loss[3].is_nan() && row_loss.iter().filter(|v| v.is_nan()).count() == 1,
        "a bad label's row is NaN"
    );
    // A label whose probability underflows: the exact loss, log-sum-exp minus its logit
    // (ln 9 + 200 here), not a clamped one (-ln 1e-30 ≈ 69).
    let mut extreme = lv.clone();
    extreme[5 * cols..6 * cols].fill(0.0);
    extreme[5 * cols + ids[5] as usize] = -200.0;
    k.launch(
        "softmax_xent_f32",
        rows_config(rows, cols),
        (extreme.as_ptr(), ids.as_ptr(), probs.as_mut_ptr(), row_loss.as_mut_ptr(), rows as u32, cols as u32),
    );
    let exact = 200.0 + ((cols - 1) as f32).ln();
    assert!((row_loss[5] - exact).abs() < 1e-3, "underflowed row: {} vs {exact}", row_loss[5]);
}

/// `dropout_f32`: every value dropped or scaled by 1/(1-p), about p of them dropped, the
/// mask a function of the seed; backward (`mul_add_f32`) lets through only what was kept.
#[test]
fn dropout_masks_and_scales() {
    let Some(k) = host_kernels() else { return };
    let (n, p) = (20_000usize, 0.25f32);
    let x: Vec<f32> = (0..n).map(|i| 1.0 + (i % 5) as f32).collect();
    let run = |seed: u64| {
        let (mut y, mut mask) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        k.launch("dropout_f32", grid(n), (x.as_ptr(), y.as_mut_ptr(), mask.as_mut_ptr(), n as u32, p, seed));
        (y, mask)
    };
    let (y, mask) = run(9);
    let keep = 1.0 / (1.0 - p);
    for i in 0..n {
        assert!(mask[i] == 0.0 || mask[i] == keep, "mask[{i}] = {}", mask[i]);
        assert_eq!(y[i], x[i] * mask[i], "y[{i}]");
    }
    let dropped = mask.iter().filter(|&&m| m == 0.0).count();
    assert!((4_600..5_400).contains(&dropped), "{dropped} of {n} dropped at p = {p}");
    assert_eq!(run(9).1, mask, "the same seed gives the same mask");
    assert_ne!(run(10).1, mask, "another seed gives another mask");
    let g: Vec<f32> = (0..n).map(|i| (i % 3) as f32 - 1.0).collect();
    let mut dx = vec![0f32; n];
    k.launch("mul_add_f32", grid(n), (g.as_ptr(), mask.as_ptr(), dx.as_mut_ptr(), n as u32));
    assert!(dx.iter().zip(&g).zip(&mask).all(|((d, g), m)| *d == g * m));
}

/// `sgd_f32` and `adam_f32` (Adam and AdamW) over three steps against the CPU optimizer,
/// with the constants the GPU trainer derives, and gradients small enough to be flushed.
#[test]
fn optimizer_kernels_match_the_cpu_optimizer() {
    let Some(k) = host_kernels() else { return };
    let n = 4_000;
    let mut g = Graph::new();
    g.param("p", &[n], Init::Normal { std: 1.0 }).unwrap();
    let mut rng = Rng::seed(90);
    let grads: Vec<Vec<f32>> = (0..3)
        .map(|step| {
            let mut v = normal(&mut rng, n);
            // Some gradients whose squares would be subnormal, which both sides flush.
            v.iter_mut().step_by(97).for_each(|x| *x *= 1e-17);
            v[step] = 0.0;
            v
        })
        .collect();
    let configs =
        [OptimizerConfig::sgd(0.1, 0.9), OptimizerConfig::adam(1e-2), OptimizerConfig::adamw(1e-2, 0.1)];
    for config in configs {
        let mut params = Params::init(&g, &mut Rng::seed(91));
        let mut device = params.tensors[0].data.clone();
        let mut optimizer = Optimizer::new(config.clone(), &params);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        for (t, grad) in grads.iter().enumerate() {
            optimizer.step(&mut params, |_| grad.as_slice());
            match config {
                OptimizerConfig::Sgd { lr, momentum, weight_decay } => {
                    k.launch(
                        "sgd_f32",
                        grid(n),
                        (
                            device.as_mut_ptr(),
                            m.as_mut_ptr(),
                            grad.as_ptr(),
                            n as u32,
                            lr,
                            momentum,
                            weight_decay,
                        ),
                    );
                }
                OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay }
                | OptimizerConfig::AdamW { lr, beta1, beta2, eps, weight_decay } => {
                    // Step t + 1's bias corrections; Adam adds weight decay to the gradient,
                    // AdamW decays the weights.
                    let step = t as i32 + 1;
                    let c1 = 1.0 / (1.0 - (beta1 as f64).powi(step)) as f32;
                    let c2 = 1.0 / (1.0 - (beta2 as f64).powi(step)) as f32;
                    let (l2, decay) = if matches!(config, OptimizerConfig::AdamW { .. }) {
                        (0.0, 1.0 - lr * weight_decay)
                    } else {
                        (weight_decay, 1.0)
                    };
                    k.launch(
                        "adam_f32",
                        grid(n),
                        (
                            device.as_mut_ptr(),
                            m.as_mut_ptr(),
                            v.as_mut_ptr(),
                            grad.as_ptr(),
                            n as u32,
                            lr,
                            beta1,
                            beta2,
                            eps,
                            l2,
                            decay,
                            c1,
                            c2,
                        ),
                    );
                }
                _ => panic!("an optimizer this test does not know: {config:?}"),
            }
            close(&format!("{config:?} step {}", t + 1), &device, &params.tensors[0].data);
        }
    }
}

/// The GPU trainer's batch gathering and accuracy count: `gather_rows_f32`, `gather_i32`
/// and `count_correct_f32` (the first of tied maxima is the prediction).
#[test]
fn gathering_and_counting() {
    let Some(k) = host_kernels() else { return };
    let (len, dim, rows) = (50, 6, 17);
    let features: Vec<f32> = (0..len * dim).map(|i| i as f32).collect();
    let labels: Vec<i32> = (0..len as i32).map(|i| i % 4).collect();
    let idx: Vec<u32> = (0..rows as u32).map(|i| (i * 13) % len as u32).collect();
    let (mut x, mut y) = (vec![f32::NAN; rows * dim], vec![-1i32; rows]);
    k.launch(
        "gather_rows_f32",
        grid(rows * dim),
        (features.as_ptr(), idx.as_ptr(), x.as_mut_ptr(), rows as u32, dim as u32),
    );
    k.launch("gather_i32", grid(rows), (labels.as_ptr(), idx.as_ptr(), y.as_mut_ptr(), rows as u32));
    for (r, &i) in idx.iter().enumerate() {
        assert_eq!(
            &x[r * dim..(r + 1) * dim],
            &features[i as usize * dim..(i as usize + 1) * dim],
            "row {r}"
        );
        assert_eq!(y[r], labels[i as usize], "label {r}");
    }
    // Logits whose largest entry is column r % 4 in row r, with a tie at column 3 in rows
    // where that is later: the first maximum wins, so rows predicting 3 with a tie at an
    // earlier column count only if the label is that earlier column.
    let cols = 4;
    let logits: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            if c == r % cols || (c == 3 && r % 2 == 0) {
                5.0
            } else {
                c as f32 * 0.1
            }
        })
        .collect();
    let truth: Vec<i32> = (0..rows as i32).map(|r| if r % 3 == 0 { r % 4 } else { 3 }).collect();
    let expected = (0..rows)
        .filter(|&r| {
            let row = &logits[r * cols..(r + 1) * cols];
            let first_max = (0..cols).fold(0, |best, c| if row[c] > row[best] { c } else { best });
            first_max as i32 == truth[r]
        })
        .count() as u32;
    let mut count = [0u32];
    k.launch(
        "count_correct_f32",
        grid(rows),
        (logits.as_ptr(), truth.as_ptr(), rows as u32, cols as u32, count.as_mut_ptr()),
    );
    assert_eq!(count[0], expected);
    assert!(expected > 0 && expected < rows as u32, "the case has both right and wrong predictions");
}

/// The block reductions with real barriers: `row_sums_add_f32` with more rows than blocks
/// and rows longer than a block, `mean_f32` of a length that is not a multiple of 256.
/// (`Gpu::sum` is the distributed arrays' reduction, tested with them.)
#[test]
fn block_reductions() {
    let Some(k) = host_kernels() else { return };
    let (rows, cols) = (7, 600);
    let m: Vec<f32> = (0..rows * cols).map(|i| (i % 13) as f32 - 6.0).collect();
    let mut sums = vec![1f32; rows];
    k.launch("row_sums_add_f32", (3, 256), (m.as_ptr(), sums.as_mut_ptr(), rows as u32, cols as u32));
    for (r, s) in sums.iter().enumerate() {
        let expected: f32 = 1.0 + m[r * cols..(r + 1) * cols].iter().sum::<f32>();
        assert_eq!(*s, expected, "row {r}");
    }
    let v: Vec<f32> = (0..1_000).map(|i| i as f32).collect();
    let mut mean = [0f32];
    k.launch("mean_f32", (1, 256), (v.as_ptr(), mean.as_mut_ptr(), 1_000u32));
    assert_eq!(mean[0], 499.5);
}

/// The row kernels with rows wider than a block and fewer blocks than rows (each block
/// loops over rows and each thread over columns), and rows with masked (-inf) entries;
/// `col_sums_add_f32` over more tiles than blocks, with a last partial tile and a row count
/// that is not a multiple of the 8 row groups.
#[test]
fn row_kernels_with_wide_rows_and_few_blocks() {
    let Some(k) = host_kernels() else { return };
    let (rows, cols) = (7, 600);
    let few_blocks = (3, 64);
    let mut g = Graph::new();
    let x = g.param("x", &[rows, cols], Init::Normal { std: 3.0 }).unwrap();
    let y = g.softmax(x).unwrap();
    let seed = normal(&mut Rng::seed(100), rows * cols);
    let cpu = CpuRun::new(&g, y, &seed, 101);
    let mut yv = cpu.param(0);
    k.launch("softmax_rows_f32", few_blocks, (yv.as_mut_ptr(), rows as u32, cols as u32));
    close("wide softmax value", &yv, cpu.exec.value(y).unwrap());
    let mut dx = vec![0f32; rows * cols];
    k.launch(
        "softmax_grad_add_f32",
        few_blocks,
        (yv.as_ptr(), seed.as_ptr(), dx.as_mut_ptr(), rows as u32, cols as u32),
    );
    close("wide softmax gradient", &dx, cpu.exec.param_grad(0));

    // Masked entries, as a causal attention row has them, in a row of 40 (two threads'
    // worth of columns for some) under the library's configuration.
    let (mrows, mcols) = (5, 40);
    let mut masked: Vec<f32> = normal(&mut Rng::seed(102), mrows * mcols);
    for r in 0..mrows {
        masked[r * mcols + r + 1..(r + 1) * mcols].fill(f32::NEG_INFINITY);
    }
    let mut expected = masked.clone();
    for row in expected.chunks_exact_mut(mcols) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
        row.iter_mut().for_each(|v| *v = (*v - max).exp() / sum);
    }
    k.launch(
        "softmax_rows_f32",
        rows_config(mrows, mcols),
        (masked.as_mut_ptr(), mrows as u32, mcols as u32),
    );
    close("masked softmax", &masked, &expected);

    // Cross-entropy over 1000 classes, labels spread over the row.
    let classes = 1000;
    let logits = normal(&mut Rng::seed(103), rows * classes);
    let labels: Vec<i32> = (0..rows as i32).map(|r| r * 149 % classes as i32).collect();
    let (mut probs, mut row_loss) = (vec![0f32; rows * classes], vec![0f32; rows]);
    k.launch(
        "softmax_xent_f32",
        few_blocks,
        (
            logits.as_ptr(),
            labels.as_ptr(),
            probs.as_mut_ptr(),
            row_loss.as_mut_ptr(),
            rows as u32,
            classes as u32,
        ),
    );
    for r in 0..rows {
        let row = &logits[r * classes..(r + 1) * classes];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
        let expected = lse - row[labels[r] as usize];
        assert!(
            (row_loss[r] - expected).abs() < 1e-4 * expected.abs().max(1.0),
            "row {r}: {} vs {expected}",
            row_loss[r]
        );
        let total: f32 = probs[r * classes..(r + 1) * classes].iter().sum();
        assert!((total - 1.0).abs() < 1e-4, "row {r}'s probabilities sum to {total}");
    }

    // Column sums: 100 columns (4 tiles, the last of 4 columns) over 2 blocks, 13 rows.
    let (srows, scols) = (13, 100);
    let m: Vec<f32> = (0..srows * scols).map(|i| (i % 17) as f32 - 8.0).collect();
    let mut sums = vec![0.5f32; scols];
    k.launch("col_sums_add_f32", (2, 256), (m.as_ptr(), sums.as_mut_ptr(), srows as u32, scols as u32));
    for (j, got) in sums.iter().enumerate() {
        let expected = 0.5 + (0..srows).map(|r| m[r * scols + j]).sum::<f32>();
        assert_eq!(*got, expected, "column {j}");
    }
}

/// `binary_f32` (sub, mul), `gelu_f32`, `mse_f32` and their gradients (`axpy_f32` with ±1,
/// `mul_add_f32`, `gelu_grad_add_f32`, `mse_grad_add_f32` with the input's sign).
#[test]
fn sub_mul_gelu_and_mse_match_the_cpu() {
    let Some(k) = host_kernels() else { return };
    let n = 1_000usize;
    let build = |op: &str| {
        let mut g = Graph::new();
        let a = g.param("a", &[n], Init::Normal { std: 1.5 }).unwrap();
        let b = g.param("b", &[n], Init::Normal { std: 1.5 }).unwrap();
        let y = match op {
            "sub" => g.sub(a, b).unwrap(),
            "mul" => g.mul(a, b).unwrap(),
            "gelu" => g.gelu(a).unwrap(),
            _ => g.mse(a, b).unwrap(),
        };
        (g, y)
    };
    for (case, op) in ["sub", "mul", "gelu", "mse"].into_iter().enumerate() {
        let (g, y) = build(op);
        let out_len = g.shape(y).unwrap().iter().product::<usize>();
        let seed = normal(&mut Rng::seed(110 + case as u64), out_len);
        let cpu = CpuRun::new(&g, y, &seed, 120 + case as u64);
        let (av, bv) = (cpu.param(0), cpu.param(1));
        let mut yv = vec![f32::NAN; out_len];
        let (mut da, mut db) = (vec![0f32; n], vec![0f32; n]);
        let nn = n as u32;
        match op {
            "sub" | "mul" => {
                let code = i32::from(op == "mul");
                k.launch("binary_f32", grid(n), (av.as_ptr(), bv.as_ptr(), yv.as_mut_ptr(), nn, code));
                if op == "sub" {
                    k.launch("axpy_f32", grid(n), (1.0f32, seed.as_ptr(), da.as_mut_ptr(), nn));
                    k.launch("axpy_f32", grid(n), (-1.0f32, seed.as_ptr(), db.as_mut_ptr(), nn));
                } else {
                    k.launch("mul_add_f32", grid(n), (seed.as_ptr(), bv.as_ptr(), da.as_mut_ptr(), nn));
                    k.launch("mul_add_f32", grid(n), (seed.as_ptr(), av.as_ptr(), db.as_mut_ptr(), nn));
                }
            }
            "gelu" => {
                k.launch("gelu_f32", grid(n), (av.as_ptr(), yv.as_mut_ptr(), nn));
                k.launch("gelu_grad_add_f32", grid(n), (av.as_ptr(), seed.as_ptr(), da.as_mut_ptr(), nn));
            }
            _ => {
                k.launch("mse_f32", (1, 256), (av.as_ptr(), bv.as_ptr(), yv.as_mut_ptr(), nn));
                for (sign, d) in [(1.0f32, &mut da), (-1.0, &mut db)] {
                    k.launch(
                        "mse_grad_add_f32",
                        grid(n),
                        (av.as_ptr(), bv.as_ptr(), seed.as_ptr(), d.as_mut_ptr(), nn, sign),
                    );
                }
            }
        }
        close(&format!("{op} value"), &yv, cpu.exec.value(y).unwrap());
        close(&format!("{op} gradient of a"), &da, cpu.exec.param_grad(0));
        if op != "gelu" {
            close(&format!("{op} gradient of b"), &db, cpu.exec.param_grad(1));
        }
    }
}

/// `layer_norm_f32` over rows wider than a block; backward `layer_norm_grad_add_f32` (x),
/// `layer_norm_gamma_grad_add_f32` (gamma) and `col_sums_add_f32` (beta).
#[test]
fn layer_norm_matches_the_cpu() {
    let Some(k) = host_kernels() else { return };
    for (case, (rows, d)) in [(5usize, 300usize), (33, 16)].into_iter().enumerate() {
        let mut g = Graph::new();
        let x = g.param("x", &[rows, d], Init::Normal { std: 2.0 }).unwrap();
        let gamma = g.param("gamma", &[d], Init::Normal { std: 1.0 }).unwrap();
        let beta = g.param("beta", &[d], Init::Normal { std: 1.0 }).unwrap();
        let y = g.layer_norm(x, gamma, beta, 1e-5).unwrap();
        let seed = normal(&mut Rng::seed(130 + case as u64), rows * d);
        let cpu = CpuRun::new(&g, y, &seed, 140 + case as u64);
        let (xv, gv, bv) = (cpu.param(0), cpu.param(1), cpu.param(2));
        let (r, dd) = (rows as u32, d as u32);
        let (mut yv, mut stats) = (vec![f32::NAN; rows * d], vec![f32::NAN; 2 * rows]);
        k.launch(
            "layer_norm_f32",
            rows_config(rows, d),
            (xv.as_ptr(), gv.as_ptr(), bv.as_ptr(), yv.as_mut_ptr(), stats.as_mut_ptr(), r, dd, 1e-5f32),
        );
        let what = format!("layer norm {rows}×{d}");
        close(&format!("{what} value"), &yv, cpu.exec.value(y).unwrap());
        let (mut dx, mut dgamma, mut dbeta) = (vec![0f32; rows * d], vec![0f32; d], vec![0f32; d]);
        k.launch(
            "layer_norm_grad_add_f32",
            rows_config(rows, d),
            (xv.as_ptr(), gv.as_ptr(), seed.as_ptr(), stats.as_ptr(), dx.as_mut_ptr(), r, dd),
        );
        k.launch(
            "layer_norm_gamma_grad_add_f32",
            column_tiles(d),
            (xv.as_ptr(), seed.as_ptr(), stats.as_ptr(), dgamma.as_mut_ptr(), r, dd),
        );
        k.launch("col_sums_add_f32", column_tiles(d), (seed.as_ptr(), dbeta.as_mut_ptr(), r, dd));
        close(&format!("{what} input gradient"), &dx, cpu.exec.param_grad(0));
        close(&format!("{what} gamma gradient"), &dgamma, cpu.exec.param_grad(1));
        close(&format!("{what} beta gradient"), &dbeta, cpu.exec.param_grad(2));
    }
}

/// `ids` grouped as the GPU executor's `set_ids` groups them: the distinct ids ascending,
/// where each one's entries start (then the entry count), and the entries by id.
fn grouped(ids: &[i32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut by_id: std::collections::BTreeMap<i32, Vec<u32>> = Default::default();
    for (e, &id) in ids.iter().enumerate() {
        by_id.entry(id).or_default().push(e as u32);
    }
    let (mut keys, mut starts, mut order) = (Vec::new(), Vec::new(), Vec::new());
    for (id, entries) in by_id {
        keys.push(id as u32);
        starts.push(order.len() as u32);
        order.extend(entries);
    }
    starts.push(order.len() as u32);
    (keys, starts, order)
}

/// `embedding_f32`, and the table gradient both ways: `embedding_grad_add_f32` (atomics)
/// and `embedding_grad_grouped_f32` (the entries grouped by id, added in ascending order:
/// the CPU's bits); an id outside the table gives a row of NaN and adds nothing.
#[test]
fn embedding_matches_the_cpu() {
    let Some(k) = host_kernels() else { return };
    let (batch, steps, vocab, d) = (4, 9, 7, 12);
    let n = batch * steps;
    let mut g = Graph::new();
    let ids = g.input("ids", &[batch, steps], DType::I32);
    let table = g.param("table", &[vocab, d], Init::Normal { std: 1.0 }).unwrap();
    let y = g.embedding(ids, table).unwrap();
    let idv: Vec<i32> = (0..n as i32).map(|i| i * 5 % vocab as i32).collect();
    let params = Params::init(&g, &mut Rng::seed(150));
    let seed = normal(&mut Rng::seed(151), n * d);
    let mut cpu = CpuExecutor::new(&g);
    cpu.set_ids(ids, &idv).unwrap();
    cpu.forward_all(&params).unwrap();
    cpu.backward(&params, 0..y.index() + 1, &[(y, &seed)]).unwrap();
    let tv = params.tensors[0].data.clone();
    let (nn, dd, vv) = (n as u32, d as u32, vocab as u32);
    let mut yv = vec![0f32; n * d];
    k.launch("embedding_f32", grid(n * d), (idv.as_ptr(), tv.as_ptr(), yv.as_mut_ptr(), nn, dd, vv));
    close("embedding value", &yv, cpu.value(y).unwrap());
    let mut dt = vec![0f32; vocab * d];
    k.launch(
        "embedding_grad_add_f32",
        grid(n * d),
        (idv.as_ptr(), seed.as_ptr(), dt.as_mut_ptr(), nn, dd, vv),
    );
    close("embedding table gradient", &dt, cpu.param_grad(0));
    let (keys, starts, order) = grouped(&idv);
    let groups = keys.len() as u32;
    let mut dt = vec![0f32; vocab * d];
    let args =
        (keys.as_ptr(), starts.as_ptr(), order.as_ptr(), seed.as_ptr(), dt.as_mut_ptr(), groups, dd, vv);
    k.launch("embedding_grad_grouped_f32", grid(keys.len() * d), args);
    assert_eq!(dt, cpu.param_grad(0), "the grouped embedding gradient, bit for bit");
    let before = dt.clone();
    let outside = [vocab as u32];
    let args = (outside.as_ptr(), starts.as_ptr(), order.as_ptr(), seed.as_ptr(), dt.as_mut_ptr(), 1, dd, vv);
    k.launch("embedding_grad_grouped_f32", grid(d), args);
    assert_eq!(dt, before, "an id outside the table adds nothing (grouped)");
    let mut bad = idv.clone();
    bad[5] = vocab as i32;
    k.launch("embedding_f32", grid(n * d), (bad.as_ptr(), tv.as_ptr(), yv.as_mut_ptr(), nn, dd, vv));
    assert!(yv[5 * d..6 * d].iter().all(|v| v.is_nan()) && yv.iter().filter(|v| v.is_nan()).count() == d);
    let before = dt.clone();
    let ones = vec![1f32; n * d];
    let mut only_bad = vec![-1i32; n];
    only_bad[0] = -3;
    k.launch(
        "embedding_grad_add_f32",
        grid(n * d),
        (only_bad.as_ptr(), ones.as_ptr(), dt.as_mut_ptr(), nn, dd, vv),
    );
    assert_eq!(dt, before, "ids outside the table add nothing");
}

/// `sparse_matmul_add_f32` (atomics) and `sparse_matmul_grouped_f32` (the entries grouped
/// by row, or by column), each forward and for the input gradient with the roles swapped,
/// and `sparse_matmul_values_grad_add_f32`, with repeated coordinates; an entry whose id is
/// out of range adds nothing.
#[test]
fn sparse_matmul_matches_the_cpu() {
    let Some(k) = host_kernels() else { return };
    let (rows, cols, n, entries) = (5usize, 7usize, 6usize, 23usize);
    let mut g = Graph::new();
    let row_ids = g.input("rows", &[entries], DType::I32);
    let col_ids = g.input("cols", &[entries], DType::I32);
    let values = g.param("values", &[entries], Init::Normal { std: 1.0 }).unwrap();
    let x = g.param("x", &[cols, n], Init::Normal { std: 1.0 }).unwrap();
    let y = g.sparse_matmul(row_ids, col_ids, values, x, rows).unwrap();
    let rv: Vec<i32> = (0..entries as i32).map(|e| e * 3 % rows as i32).collect();
    let cv: Vec<i32> = (0..entries as i32).map(|e| e * 5 % cols as i32).collect();
    let params = Params::init(&g, &mut Rng::seed(160));
    let seed = normal(&mut Rng::seed(161), rows * n);
    let mut cpu = CpuExecutor::new(&g);
    cpu.set_ids(row_ids, &rv).unwrap();
    cpu.set_ids(col_ids, &cv).unwrap();
    cpu.forward_all(&params).unwrap();
    cpu.backward(&params, 0..y.index() + 1, &[(y, &seed)]).unwrap();
    let (vv, xv) = (params.tensors[0].data.clone(), params.tensors[1].data.clone());
    let (ee, nn, rr, cc) = (entries as u32, n as u32, rows as u32, cols as u32);
    let mut yv = vec![0f32; rows * n];
    let args = (rv.as_ptr(), cv.as_ptr(), vv.as_ptr(), xv.as_ptr(), yv.as_mut_ptr(), ee, nn, rr, cc);
    k.launch("sparse_matmul_add_f32", grid(entries * n), args);
    close("sparse_matmul value", &yv, cpu.value(y).unwrap());
    let mut dx = vec![0f32; cols * n];
    let args = (cv.as_ptr(), rv.as_ptr(), vv.as_ptr(), seed.as_ptr(), dx.as_mut_ptr(), ee, nn, cc, rr);
    k.launch("sparse_matmul_add_f32", grid(entries * n), args);
    close("sparse_matmul x gradient", &dx, cpu.param_grad(1));
    let mut dv = vec![0f32; entries];
    let args = (rv.as_ptr(), cv.as_ptr(), seed.as_ptr(), xv.as_ptr(), dv.as_mut_ptr(), ee, nn, rr, cc);
    k.launch("sparse_matmul_values_grad_add_f32", grid(entries), args);
    close("sparse_matmul values gradient", &dv, cpu.param_grad(0));
    let (keys, starts, order) = grouped(&rv);
    let mut yv = vec![0f32; rows * n];
    let args = (
        keys.as_ptr(),
        starts.as_ptr(),
        order.as_ptr(),
        cv.as_ptr(),
        vv.as_ptr(),
        xv.as_ptr(),
        yv.as_mut_ptr(),
        keys.len() as u32,
        nn,
        rr,
        cc,
    );
    k.launch("sparse_matmul_grouped_f32", grid(keys.len() * n), args);
    close("grouped sparse_matmul value", &yv, cpu.value(y).unwrap());
    let (keys, starts, order) = grouped(&cv);
    let mut dx = vec![0f32; cols * n];
    let args = (
        keys.as_ptr(),
        starts.as_ptr(),
        order.as_ptr(),
        rv.as_ptr(),
        vv.as_ptr(),
        seed.as_ptr(),
        dx.as_mut_ptr(),
        keys.len() as u32,
        nn,
        cc,
        rr,
    );
    k.launch("sparse_matmul_grouped_f32", grid(keys.len() * n), args);
    close("grouped sparse_matmul x gradient", &dx, cpu.param_grad(1));
    // The first column's group again, with its first entry's row out of range: only the
    // group's other entries add, in order; other columns and a key out of range add nothing.
    let first = order[0] as usize;
    let mut bad_rows = rv.clone();
    bad_rows[first] = -1;
    let before = dx.clone();
    let args = (
        keys.as_ptr(),
        starts.as_ptr(),
        order.as_ptr(),
        bad_rows.as_ptr(),
        vv.as_ptr(),
        seed.as_ptr(),
        dx.as_mut_ptr(),
        1,
        nn,
        cc,
        rr,
    );
    k.launch("sparse_matmul_grouped_f32", grid(n), args);
    let column = keys[0] as usize;
    let mut expected = before.clone();
    for (j, sum) in expected[column * n..(column + 1) * n].iter_mut().enumerate() {
        for &e in order[1..starts[1] as usize].iter() {
            *sum += vv[e as usize] * seed[rv[e as usize] as usize * n + j];
        }
    }
    assert_eq!(dx, expected, "the first column's rows, without entry {first}");
    let outside = [cols as u32];
    let args = (
        outside.as_ptr(),
        starts.as_ptr(),
        order.as_ptr(),
        rv.as_ptr(),
        vv.as_ptr(),
        seed.as_ptr(),
        dx.as_mut_ptr(),
        1,
        nn,
        cc,
        rr,
    );
    k.launch("sparse_matmul_grouped_f32", grid(n), args);
    assert_eq!(dx, expected, "a key outside the matrix adds nothing");
    // Out-of-range ids (which set_ids refuses) add nothing rather than write outside.
    let (mut bad_rows, mut bad_cols) = (rv.clone(), cv.clone());
    bad_rows.iter_mut().for_each(|r| *r = rows as i32);
    bad_cols[0] = -1;
    let before = yv.clone();
    let args =
        (bad_rows.as_ptr(), bad_cols.as_ptr(), vv.as_ptr(), xv.as_ptr(), yv.as_mut_ptr(), ee, nn, rr, cc);
    k.launch("sparse_matmul_add_f32", grid(entries * n), args);
    assert_eq!(yv, before, "entries outside the matrix add nothing");
}

/// `step_gather_f32` and `step_scatter_f32` as select-step and stack-steps run them,
/// forward (assigning) and backward (adding).
#[test]
fn time_steps_match_the_cpu() {
    let Some(k) = host_kernels() else { return };
    let (b, t, d) = (3usize, 4usize, 5usize);
    let mut g = Graph::new();
    let x = g.param("x", &[b, t, d], Init::Normal { std: 1.0 }).unwrap();
    let s = g.select_step(x, 2).unwrap();
    let cpu = CpuRun::new(&g, s, &normal(&mut Rng::seed(160), b * d), 161);
    let seed = normal(&mut Rng::seed(160), b * d);
    let xv = cpu.param(0);
    let (bb, tt, dd) = (b as u32, t as u32, d as u32);
    let mut yv = vec![f32::NAN; b * d];
    k.launch("step_gather_f32", grid(b * d), (xv.as_ptr(), yv.as_mut_ptr(), bb, tt, dd, 2u32, 0i32));
    close("select-step value", &yv, cpu.exec.value(s).unwrap());
    // Gradients are added to what is there (here 1 everywhere).
    let plus_one = |v: &[f32]| v.iter().map(|x| x + 1.0).collect::<Vec<f32>>();
    let mut dx = vec![1f32; b * t * d];
    k.launch("step_scatter_f32", grid(b * d), (seed.as_ptr(), dx.as_mut_ptr(), bb, tt, dd, 2u32, 1i32));
    close("select-step gradient", &dx, &plus_one(cpu.exec.param_grad(0)));

    let mut g = Graph::new();
    let steps: Vec<NodeId> =
        (0..t).map(|i| g.param(&format!("s{i}"), &[b, d], Init::Normal { std: 1.0 }).unwrap()).collect();
    let y = g.stack_steps(&steps).unwrap();
    let seed = normal(&mut Rng::seed(162), b * t * d);
    let cpu = CpuRun::new(&g, y, &seed, 163);
    let mut yv = vec![f32::NAN; b * t * d];
    for i in 0..t {
        let sv = cpu.param(i);
        k.launch("step_scatter_f32", grid(b * d), (sv.as_ptr(), yv.as_mut_ptr(), bb, tt, dd, i as u32, 0i32));
    }
    close("stack-steps value", &yv, cpu.exec.value(y).unwrap());
    for i in 0..t {
        let mut ds = vec![1f32; b * d];
        k.launch(
            "step_gather_f32",
            grid(b * d),
            (seed.as_ptr(), ds.as_mut_ptr(), bb, tt, dd, i as u32, 1i32),
        );
        close(&format!("stack-steps gradient of step {i}"), &ds, &plus_one(cpu.exec.param_grad(i)));
    }
}

/// A GRU cell as the GPU executor runs it: `broadcast_rows_f32` of the hidden bias, the
/// product `h · wh` added on top, `gru_gates_f32`; backward `gru_grad_f32`, then each
/// input's share (input projection, hidden state, weights, bias).
#[test]
fn gru_cell_matches_the_cpu() {
    let Some(k) = host_kernels() else { return };
    let (b, h) = (6usize, 10usize);
    let mut g = Graph::new();
    let gx = g.param("gx", &[b, 3 * h], Init::Normal { std: 1.0 }).unwrap();
    let hv = g.param("h", &[b, h], Init::Normal { std: 1.0 }).unwrap();
    let wh = g.param("wh", &[h, 3 * h], Init::Normal { std: 0.4 }).unwrap();
    let bh = g.param("bh", &[3 * h], Init::Normal { std: 0.3 }).unwrap();
    let y = g.gru_cell(gx, hv, wh, bh).unwrap();
    let seed = normal(&mut Rng::seed(170), b * h);
    let cpu = CpuRun::new(&g, y, &seed, 171);
    let (gxv, hvv, whv, bhv) = (cpu.param(0), cpu.param(1), cpu.param(2), cpu.param(3));
    let (bb, hh) = (b as u32, h as u32);
    let mut gh = vec![f32::NAN; b * 3 * h];
    k.launch(
        "broadcast_rows_f32",
        grid(b * 3 * h),
        (bhv.as_ptr(), gh.as_mut_ptr(), (b * 3 * h) as u32, (3 * h) as u32),
    );
    gemm((b, 3 * h, h), &hvv, false, &whv, false, 1.0, &mut gh);
    let (mut gates, mut yv) = (vec![f32::NAN; 3 * b * h], vec![f32::NAN; b * h]);
    k.launch(
        "gru_gates_f32",
        grid(b * h),
        (gxv.as_ptr(), gh.as_ptr(), hvv.as_ptr(), gates.as_mut_ptr(), yv.as_mut_ptr(), bb, hh),
    );
    close("GRU value", &yv, cpu.exec.value(y).unwrap());
    let (mut dga, mut dgh) = (vec![f32::NAN; b * 3 * h], vec![f32::NAN; b * 3 * h]);
    k.launch(
        "gru_grad_f32",
        grid(b * h),
        (
            seed.as_ptr(),
            hvv.as_ptr(),
            gh.as_ptr(),
            gates.as_ptr(),
            dga.as_mut_ptr(),
            dgh.as_mut_ptr(),
            bb,
            hh,
        ),
    );
    close("GRU input-projection gradient", &dga, cpu.exec.param_grad(0));
    let mut dh = vec![0f32; b * h];
    let z = &gates[b * h..2 * b * h];
    k.launch("mul_add_f32", grid(b * h), (seed.as_ptr(), z.as_ptr(), dh.as_mut_ptr(), bb * hh));
    gemm((b, h, 3 * h), &dgh, false, &whv, true, 1.0, &mut dh);
    close("GRU hidden-state gradient", &dh, cpu.exec.param_grad(1));
    let mut dwh = vec![0f32; h * 3 * h];
    gemm((h, 3 * h, b), &hvv, true, &dgh, false, 1.0, &mut dwh);
    close("GRU weight gradient", &dwh, cpu.exec.param_grad(2));
    let mut dbh = vec![0f32; 3 * h];
    k.launch("col_sums_add_f32", column_tiles(3 * h), (dgh.as_ptr(), dbh.as_mut_ptr(), bb, 3 * hh));
    close("GRU bias gradient", &dbh, cpu.exec.param_grad(3));
}

/// [`gemm`] over `batch` matrices packed back to back in each operand: the GPU executor's
/// strided-batched cuBLAS products.
#[allow(clippy::too_many_arguments)]
fn gemm_batched(
    batch: usize,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    beta: f32,
    c: &mut [f32],
) {
    for i in 0..batch {
        let (a, b) = (&a[i * m * k..(i + 1) * m * k], &b[i * k * n..(i + 1) * k * n]);
        gemm((m, n, k), a, trans_a, b, trans_b, beta, &mut c[i * m * n..(i + 1) * m * n]);
    }
}

/// Multi-head attention as the GPU executor runs it: `heads_split_f32` of q, k and v into
/// per-head matrices, batched products around `attention_softmax_f32` (scaled scores,
/// causal or not), `heads_merge_f32`; backward the split of the output gradient,
/// `attention_softmax_grad_f32`, and the three input gradients merged in (added).
#[test]
fn attention_matches_the_cpu() {
    let Some(k) = host_kernels() else { return };
    for (case, (b, t, d, heads, causal)) in
        [(2, 5, 6, 2, true), (3, 4, 8, 4, false), (1, 40, 4, 1, true)].into_iter().enumerate()
    {
        let mut g = Graph::new();
        let q = g.param("q", &[b, t, d], Init::Normal { std: 1.0 }).unwrap();
        let kk = g.param("k", &[b, t, d], Init::Normal { std: 1.0 }).unwrap();
        let v = g.param("v", &[b, t, d], Init::Normal { std: 1.0 }).unwrap();
        let y = g.attention(q, kk, v, heads, causal).unwrap();
        let len = b * t * d;
        let seed = normal(&mut Rng::seed(180 + case as u64), len);
        let cpu = CpuRun::new(&g, y, &seed, 190 + case as u64);
        let what = format!("attention case {case} ({b}×{t}×{d}, {heads} heads, causal {causal})");
        let (bh, dh) = (b * heads, d / heads);
        let geometry = (b as u32, t as u32, d as u32, heads as u32);
        let split = |x: &[f32]| {
            let mut xh = vec![f32::NAN; len];
            let (gb, gt, gd, gh) = geometry;
            k.launch("heads_split_f32", grid(len), (x.as_ptr(), xh.as_mut_ptr(), gb, gt, gd, gh));
            xh
        };
        let merge = |xh: &[f32], x: &mut [f32], add: i32| {
            let (gb, gt, gd, gh) = geometry;
            k.launch("heads_merge_f32", grid(len), (xh.as_ptr(), x.as_mut_ptr(), gb, gt, gd, gh, add));
        };
        let (qh, kh, vh) = (split(&cpu.param(0)), split(&cpu.param(1)), split(&cpu.param(2)));
        let scale = 1.0 / (dh as f32).sqrt();
        let mut p = vec![0f32; bh * t * t];
        gemm_batched(bh, (t, t, dh), &qh, false, &kh, true, 0.0, &mut p);
        p.iter_mut().for_each(|x| *x *= scale);
        let rows = bh * t;
        k.launch(
            "attention_softmax_f32",
            rows_config(rows, t),
            (p.as_mut_ptr(), rows as u32, t as u32, i32::from(causal)),
        );
        let mut yh = vec![0f32; len];
        gemm_batched(bh, (t, dh, t), &p, false, &vh, false, 0.0, &mut yh);
        let mut yv = vec![f32::NAN; len];
        merge(&yh, &mut yv, 0);
        close(&format!("{what} value"), &yv, cpu.exec.value(y).unwrap());

        let gh = split(&seed);
        let mut ds = vec![0f32; bh * t * t];
        gemm_batched(bh, (t, t, dh), &gh, false, &vh, true, 0.0, &mut ds);
        k.launch(
            "attention_softmax_grad_f32",
            rows_config(rows, t),
            (p.as_ptr(), ds.as_mut_ptr(), rows as u32, t as u32, scale),
        );
        let products: [(&str, &[f32], bool, &[f32]); 3] =
            [("q", &ds, false, &kh), ("k", &ds, true, &qh), ("v", &p, true, &gh)];
        for (input, (name, left, trans, right)) in products.into_iter().enumerate() {
            let mut part = vec![0f32; len];
            gemm_batched(bh, (t, dh, t), left, trans, right, false, 0.0, &mut part);
            let mut grad = vec![1f32; len];
            merge(&part, &mut grad, 1);
            let expected: Vec<f32> = cpu.exec.param_grad(input).iter().map(|x| x + 1.0).collect();
            close(&format!("{what} gradient of {name} (added to 1)"), &grad, &expected);
        }
    }
}

/// The distributed arrays' reduction in two passes as `Gpu::reduce_elements` launches it
/// (blocks of 256, at most 1024 of them, so a long input loops in every thread; then one
/// block over the partials), for sum, min and max, with NaNs that lose to numbers.
#[test]
fn darray_reductions_in_two_passes() {
    let Some(k) = host_kernels() else { return };
    let n = 300_001;
    let mut x: Vec<f32> = (0..n).map(|i| ((i * 37 % 1001) as f32 - 500.0) / 64.0).collect();
    x[12_345] = f32::NAN;
    x[299_999] = -9.5;
    let numbers = || x.iter().filter(|v| !v.is_nan()).map(|&v| v as f64);
    let blocks = (n as u32).div_ceil(256).clamp(1, 1024);
    for (op, expected) in
        [(1, numbers().fold(f64::INFINITY, f64::min)), (2, numbers().fold(f64::NEG_INFINITY, f64::max))]
    {
        let mut partial = vec![0f64; blocks as usize];
        let mut total = [0f64];
        k.launch("darray_reduce_f32", (blocks, 256), (x.as_ptr(), partial.as_mut_ptr(), n as u32, op));
        k.launch("darray_reduce_f64", (1, 256), (partial.as_ptr(), total.as_mut_ptr(), blocks, op));
        assert_eq!(total[0], expected, "op {op}");
    }
    x[12_345] = 0.25;
    let exact: f64 = x.iter().map(|&v| v as f64).sum();
    let mut partial = vec![0f64; blocks as usize];
    let mut total = [0f64];
    k.launch("darray_reduce_f32", (blocks, 256), (x.as_ptr(), partial.as_mut_ptr(), n as u32, 0i32));
    k.launch("darray_reduce_f64", (1, 256), (partial.as_ptr(), total.as_mut_ptr(), blocks, 0i32));
    assert!((total[0] - exact).abs() < 1e-9 * exact.abs().max(1.0), "sum {} vs {exact}", total[0]);
    // Nothing to reduce: 0 for a sum, NaN for min and max.
    let mut partial = [1f64];
    k.launch("darray_reduce_f32", (1, 256), (x.as_ptr(), partial.as_mut_ptr(), 0u32, 1i32));
    assert!(partial[0].is_nan());
}

/// The distributed arrays' tiled transpose as `Gpu::transpose` launches it, for shapes that
/// are and are not multiples of the 32×32 tile, with fewer blocks than tiles.
#[test]
fn darray_transpose_over_tiles() {
    let Some(k) = host_kernels() else { return };
    for (rows, cols, blocks) in [(64usize, 32usize, 2u32), (70, 45, 3), (1, 100, 1), (33, 1, 4)] {
        let x: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let mut y = vec![-1f32; rows * cols];
        k.launch(
            "darray_transpose_f32",
            (blocks, 256),
            (x.as_ptr(), y.as_mut_ptr(), rows as u32, cols as u32),
        );
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(y[c * rows + r], x[r * cols + c], "{rows}×{cols}: ({r}, {c})");
            }
        }
    }
}
