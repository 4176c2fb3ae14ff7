//! `tessera bench darray`: distributed-array operations on the in-process runtime (every
//! worker) and over two local node processes, each beside the limit measured by the same
//! command: the single-thread GEMM rate of the same kernel times the workers, and the
//! memory copy bandwidth of one thread times the workers.
//!
//! Figures (median of 5): tiled f32 matmul 2048³ in 512² tiles (GFLOP/s and its fraction
//! of the GEMM limit); elementwise add of two 32 Mi-element f32 arrays (GB/s moved: two
//! reads and a write); the sum of one (GB/s read); rechunking 4096² f32 from 512² to
//! 384×640 chunks (GB/s); f64 matmul 1024³ in 256² tiles here and on 2 node processes
//! (GFLOP/s); sparse × vector for the 5-point Laplacian of a 2000² grid (4 M rows) and a
//! random 2 Mi-row matrix with 10 nonzeros a row (GB/s of matrix, x and y moved); sparse
//! × sparse for the Laplacian of a 1000² grid squared (GFLOP/s of its partial products).
//! `scripts/darray_peers.py` measures the dense cases with Dask, the sparse ones with SciPy.
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use tessera::{
    BinaryOp, Cluster, ClusterConfig, DArray, Fill, LocalProcesses, ReduceOp, Runtime, SparseDArray,
};

use super::{median, Reporter};

const RUNS: usize = 5;

/// The median seconds of `RUNS` runs of `job` (after one warm-up run).
fn time(mut job: impl FnMut() -> Result<()>) -> Result<f64> {
    job()?;
    let mut samples = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        job()?;
        samples.push(start.elapsed().as_secs_f64());
    }
    Ok(median(&mut samples))
}

/// GFLOP/s of one thread running the kernel behind every matmul tile, on one tile.
fn one_thread_gemm_gflops(tile: usize) -> Result<f64> {
    let rt = Runtime::builder().workers(1).build()?;
    let a = DArray::<f32>::fill(
        &rt,
        &[tile, tile],
        &[tile, tile],
        Fill::Uniform { seed: 1, low: -1.0, high: 1.0 },
    )?;
    a.wait()?;
    let seconds = time(|| a.matmul(&a)?.wait().map_err(Into::into))?;
    rt.shutdown();
    Ok(2.0 * (tile as f64).powi(3) / seconds / 1e9)
}

/// GB/s (read plus write) of one thread copying a buffer far larger than the caches.
fn one_thread_copy_gbps() -> Result<f64> {
    let src = vec![1.0f32; 32 << 20];
    let mut dst = vec![0.0f32; 32 << 20];
    let seconds = time(|| {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        Ok(())
    })?;
    Ok(2.0 * (src.len() * 4) as f64 / seconds / 1e9)
}

/// Times `matrix · x` for a vector of ones; reports the bytes it must move per second.
fn spmv_case(
    reporter: &Reporter,
    rt: &Runtime,
    bench: &str,
    matrix: &SparseDArray<f32>,
    nnz: usize,
) -> Result<()> {
    matrix.wait()?;
    let [rows, cols] = matrix.shape();
    let x = DArray::<f32>::fill(rt, &[cols], &[cols], Fill::Constant(1.0))?;
    x.wait()?;
    let seconds = time(|| matrix.matmul(&x)?.wait().map_err(Into::into))?;
    let bytes = nnz * (4 + 4) + (rows + 1) * 8 + cols * 4 + rows * 4;
    reporter.report(bench, bytes as f64 / seconds / 1e9, "GB/s", true);
    Ok(())
}

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    let rt = Runtime::local()?;
    let workers = rt.workers() as f64;
    eprintln!("bench darray: {} workers, {RUNS} runs a figure", rt.workers());

    // Tiled matmul against the single-thread GEMM rate times the workers.
    let (n, tile) = (2048, 512);
    let a =
        DArray::<f32>::fill(&rt, &[n, n], &[tile, tile], Fill::Uniform { seed: 1, low: -1.0, high: 1.0 })?;
    let b =
        DArray::<f32>::fill(&rt, &[n, n], &[tile, tile], Fill::Uniform { seed: 2, low: -1.0, high: 1.0 })?;
    a.wait()?;
    b.wait()?;
    let seconds = time(|| a.matmul(&b)?.wait().map_err(Into::into))?;
    let gflops = 2.0 * (n as f64).powi(3) / seconds / 1e9;
    let limit = one_thread_gemm_gflops(tile)? * workers;
    reporter.report("darray/matmul_f32_2048", gflops, "GFLOP/s", true);
    reporter.report("darray/matmul_of_gemm_limit", gflops / limit, "ratio", true);
    eprintln!("bench darray: gemm limit {limit:.1} GFLOP/s ({workers} × one thread)");

    // The f64 product run on the cluster below, here first: the difference is the cost of
    // moving tiles between processes.
    let a64 = DArray::<f64>::fill(
        &rt,
        &[1024, 1024],
        &[256, 256],
        Fill::Uniform { seed: 3, low: -1.0, high: 1.0 },
    )?;
    a64.wait()?;
    let seconds = time(|| a64.matmul(&a64)?.wait().map_err(Into::into))?;
    reporter.report("darray/matmul_f64_1024", 2.0 * 1024f64.powi(3) / seconds / 1e9, "GFLOP/s", true);
    drop(a64);

    // Elementwise and reduction against the copy bandwidth times the workers.
    let len = 32 << 20;
    let x = DArray::<f32>::fill(&rt, &[len], &[1 << 20], Fill::Index)?;
    let y = DArray::<f32>::fill(&rt, &[len], &[1 << 20], Fill::Constant(1.0))?;
    x.wait()?;
    y.wait()?;
    let seconds = time(|| x.zip(&y, BinaryOp::Add)?.wait().map_err(Into::into))?;
    reporter.report("darray/add_32Mi_f32", 3.0 * (len * 4) as f64 / seconds / 1e9, "GB/s", true);
    let mut total = 0.0;
    let seconds = time(|| {
        total = y.reduce(ReduceOp::Sum)?.blocking_get()?;
        Ok(())
    })?;
    ensure!(total == len as f32, "sum of ones is {total}");
    reporter.report("darray/sum_32Mi_f32", (len * 4) as f64 / seconds / 1e9, "GB/s", true);
    let copy_limit = one_thread_copy_gbps()? * workers;
    reporter.report("darray/copy_limit", copy_limit, "GB/s", true);

    // Rechunking: every new chunk assembled from the up to four old ones it overlaps.
    let big = DArray::<f32>::fill(&rt, &[4096, 4096], &[512, 512], Fill::Index)?;
    big.wait()?;
    let seconds = time(|| big.rechunk(&[384, 640])?.wait().map_err(Into::into))?;
    reporter.report("darray/rechunk_4096sq_f32", (4096 * 4096 * 4) as f64 / seconds / 1e9, "GB/s", true);
    drop((a, b, x, y, big));

    // SpMV: bytes of the matrix (values, column indices, row offsets), x and y, per second.
    let n = 2000;
    let poisson = SparseDArray::<f32>::poisson_2d(&rt, n, (n * n).div_ceil(16))?;
    spmv_case(reporter, &rt, "darray/spmv_poisson_4M_f32", &poisson, 5 * n * n - 4 * n)?;
    let rows = 1 << 21;
    let random = SparseDArray::<f32>::random(&rt, [rows, rows], 10, 7, rows / 16)?;
    spmv_case(reporter, &rt, "darray/spmv_random_nnz10_2M_f32", &random, 10 * rows)?;
    drop((poisson, random));

    // SpGEMM: the Laplacian of a 1000² grid squared, in 16 blocks of rows; GFLOP/s of its
    // partial products (a multiply and an add each).
    let n = 1000;
    let laplacian = SparseDArray::<f32>::poisson_2d(&rt, n, (n * n).div_ceil(16))?;
    let csr = laplacian.to_csr()?;
    let partial_products: usize = csr
        .outer_iterator()
        .map(|row| row.indices().iter().map(|&k| csr.outer_view(k).map_or(0, |r| r.nnz())).sum::<usize>())
        .sum();
    let seconds = time(|| laplacian.matmul_sparse(&laplacian)?.wait().map_err(Into::into))?;
    reporter.report(
        "darray/spgemm_poisson_1M_f32",
        2.0 * partial_products as f64 / seconds / 1e9,
        "GFLOP/s",
        true,
    );
    drop((laplacian, csr));

    // Over two node processes: the chunks are made and multiplied on the nodes.
    let cluster = Cluster::start(&rt, ClusterConfig::default())?;
    cluster.launch(&LocalProcesses::new(2))?;
    cluster.wait_for_nodes(2, Duration::from_secs(30))?;
    let n = 1024;
    let a = DArray::<f64>::fill(&rt, &[n, n], &[256, 256], Fill::Uniform { seed: 3, low: -1.0, high: 1.0 })?;
    a.wait()?;
    let seconds = time(|| a.matmul(&a)?.wait().map_err(Into::into))?;
    reporter.report(
        "darray/cluster_matmul_f64_1024",
        2.0 * (n as f64).powi(3) / seconds / 1e9,
        "GFLOP/s",
        true,
    );
    let per_node: Vec<String> =
        cluster.nodes().iter().map(|n| format!("{}={}", n.name, n.tasks_run)).collect();
    eprintln!("bench darray: chunk tasks per node: {}", per_node.join(", "));
    rt.shutdown();
    Ok(())
}
