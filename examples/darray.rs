//! Distributed arrays: a least-squares fit `w = (XᵀX)⁻¹ Xᵀy` whose big products (over 200 000
//! rows) run as chunk tasks over 2 node processes on 127.0.0.1 (this program, started again), then the
//! product saved to the embedded stash (each chunk written by the node holding it) and
//! loaded back. Each step prints what it computed and how long it took.
//!
//! Run it: `cargo run --release --example darray`
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use ndarray::{Array1, Array2, Ix2};
use tessera::{
    BinaryOp, Cluster, ClusterConfig, DArray, Fill, LocalProcesses, ReduceOp, Runtime, Stash, UnaryOp,
};

/// Rows of the design matrix, features, and rows per chunk.
const ROWS: usize = 200_000;
const FEATURES: usize = 64;
const CHUNK_ROWS: usize = 12_500;

/// Distributed arrays: a least-squares fit over 2 local node processes, its product saved to
/// the stash and loaded back. Takes no arguments.
#[derive(clap::Parser)]
struct Args {}

fn main() -> Result<()> {
    // A copy of this program started as a cluster node runs as one and exits here.
    tessera::init();
    // `--help` says what this runs; any argument is an error, not silently ignored.
    <Args as clap::Parser>::parse();
    let rt = Runtime::local()?;
    let cluster = Cluster::start(&rt, ClusterConfig::default())?;
    cluster.launch(&LocalProcesses::new(2))?;
    cluster.wait_for_nodes(2, Duration::from_secs(30))?;

    // X: standard normal features; y = X·w_true + noise, all made on the nodes.
    let t = Instant::now();
    let x = DArray::<f64>::fill(
        &rt,
        &[ROWS, FEATURES],
        &[CHUNK_ROWS, FEATURES],
        Fill::Normal { seed: 1, mean: 0.0, std: 1.0 },
    )?;
    let w_true = Array2::from_shape_fn((FEATURES, 1), |(i, _)| (i as f64 - 32.0) / 16.0);
    let w_true_d = DArray::from_array(&rt, &w_true, &[FEATURES, 1])?;
    let noise = DArray::<f64>::fill(
        &rt,
        &[ROWS, 1],
        &[CHUNK_ROWS, 1],
        Fill::Normal { seed: 2, mean: 0.0, std: 0.1 },
    )?;
    let y = x.matmul(&w_true_d)?.zip(&noise, BinaryOp::Add)?;
    y.wait()?;
    println!(
        "made X ({ROWS}×{FEATURES}, {} chunks) and y on the nodes in {:.0} ms",
        x.grid().num_chunks(),
        t.elapsed().as_secs_f64() * 1e3
    );

    // The normal equations, as chunk tasks: XᵀX and Xᵀy (tiled products summed by trees).
    let t = Instant::now();
    let xt = x.transpose()?;
    let xtx = xt.matmul(&x)?.to_array()?.into_dimensionality::<Ix2>()?;
    let xty = xt.matmul(&y)?.to_array()?.into_dimensionality::<Ix2>()?;
    let w = solve(xtx, xty.column(0).to_owned())?;
    let error = w.iter().zip(w_true.column(0)).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    println!("least squares: max |w - w_true| = {error:.4} in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    ensure!(error < 0.01, "the fit is off by {error}");

    // Residual statistics, computed where the chunks are.
    let t = Instant::now();
    let w_d = DArray::from_array(&rt, &w.clone().into_shape_with_order((FEATURES, 1))?, &[FEATURES, 1])?;
    let residual = x.matmul(&w_d)?.zip(&y, BinaryOp::Sub)?;
    let rss = residual.map(UnaryOp::Square).reduce(ReduceOp::Sum)?.blocking_get()?;
    let worst = residual.map(UnaryOp::Abs).reduce(ReduceOp::Max)?.blocking_get()?;
    println!(
        "residuals: RMS {:.4} (noise σ = 0.1), max {worst:.3}, in {:.0} ms",
        (rss / ROWS as f64).sqrt(),
        t.elapsed().as_secs_f64() * 1e3
    );

    // A tiled product of two 1536² matrices on the nodes.
    let t = Instant::now();
    let n = 1536;
    let a = DArray::<f32>::fill(&rt, &[n, n], &[384, 384], Fill::Uniform { seed: 3, low: -1.0, high: 1.0 })?;
    let product = a.matmul(&a)?;
    product.wait()?;
    let seconds = t.elapsed().as_secs_f64();
    println!(
        "matmul {n}³ f32 in 384² tiles: {:.1} GFLOP/s over the cluster",
        2.0 * (n as f64).powi(3) / seconds / 1e9
    );
    let per_node: Vec<String> =
        cluster.nodes().iter().map(|n| format!("{} ran {}", n.name, n.tasks_run)).collect();
    println!("chunk tasks: {}", per_node.join(", "));

    // Saved to the embedded stash, each chunk by the node that holds it, then loaded back.
    let dir = std::env::temp_dir().join(format!("tessera-darray-example-{}", std::process::id()));
    let stash = Stash::open(&dir)?;
    let t = Instant::now();
    let version = product.save(&stash, "product", &[("example", "darray")])?;
    let loaded = DArray::<f32>::load_version(&rt, &stash, "product", version)?;
    ensure!(loaded.to_array()? == product.to_array()?, "the loaded array differs");
    println!(
        "saved and loaded `product` ({} MB in {} chunks) as version {version} in {:.0} ms",
        n * n * 4 / 1_000_000,
        product.grid().num_chunks(),
        t.elapsed().as_secs_f64() * 1e3
    );
    rt.shutdown();
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Solves `a·x = b` for a symmetric positive definite `a` (Cholesky).
fn solve(a: Array2<f64>, b: Array1<f64>) -> Result<Array1<f64>> {
    let n = b.len();
    let mut l = Array2::<f64>::zeros((n, n));
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[[i, k]] * l[[j, k]]).sum();
            if i == j {
                let d = a[[i, i]] - s;
                ensure!(d > 0.0, "the matrix is not positive definite");
                l[[i, j]] = d.sqrt();
            } else {
                l[[i, j]] = (a[[i, j]] - s) / l[[j, j]];
            }
        }
    }
    let mut z = Array1::<f64>::zeros(n);
    for i in 0..n {
        z[i] = (b[i] - (0..i).map(|k| l[[i, k]] * z[k]).sum::<f64>()) / l[[i, i]];
    }
    let mut x = Array1::<f64>::zeros(n);
    for i in (0..n).rev() {
        x[i] = (z[i] - (i + 1..n).map(|k| l[[k, i]] * x[k]).sum::<f64>()) / l[[i, i]];
    }
    Ok(x)
}
