//! Sparse machine learning on a cluster: logistic regression on 200 000 examples of 10 000
//! sparse features (20 nonzeros each), trained by full-batch gradient descent over 2 node
//! processes on 127.0.0.1. The feature matrix is made and kept on the nodes, in blocks of
//! rows; each step is a task graph: `p = σ(X·w)`, then the gradient `Xᵀ(p − y) / n`
//! (`SparseDArray::t_matmul`, no transpose formed), then `w ← w − lr·g`. It prints the loss
//! and accuracy as it goes, and fails unless the model recovers the labels.
//!
//! Run it: `cargo run --release --example sparse_logreg`
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use tessera::{
    BinaryOp, Cluster, ClusterConfig, DArray, Fill, LocalProcesses, Runtime, SparseDArray, UnaryOp,
};

const EXAMPLES: usize = 200_000;
const FEATURES: usize = 10_000;
const PER_ROW: usize = 20;
const BLOCK_ROWS: usize = 25_000;
const STEPS: usize = 60;
const LEARNING_RATE: f64 = 1500.0;

/// Mean log loss and accuracy of probabilities `p` against labels `y` (both gathered).
fn score(p: &DArray<f64>, y: &DArray<f64>) -> Result<(f64, f64)> {
    let (p, y) = (p.to_array()?, y.to_array()?);
    let mut loss = 0.0;
    let mut right = 0usize;
    for (&pi, &yi) in p.iter().zip(y.iter()) {
        let pi = pi.clamp(1e-12, 1.0 - 1e-12);
        loss -= yi * pi.ln() + (1.0 - yi) * (1.0 - pi).ln();
        right += usize::from((pi > 0.5) == (yi > 0.5));
    }
    Ok((loss / p.len() as f64, right as f64 / p.len() as f64))
}

/// Sparse logistic regression over 2 local node processes (fails below 95 % accuracy).
/// Takes no arguments.
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

    // Features, made on the nodes; hidden weights; labels 1 where X·w* > 0 (sharpened by a
    // steep sigmoid, so they are 0 or 1 but for ties).
    let t = Instant::now();
    let x = SparseDArray::<f64>::random(&rt, [EXAMPLES, FEATURES], PER_ROW, 7, BLOCK_ROWS)?;
    let hidden =
        DArray::<f64>::fill(&rt, &[FEATURES], &[FEATURES], Fill::Normal { seed: 8, mean: 0.0, std: 1.0 })?;
    let y = x.matmul(&hidden)?.map(UnaryOp::Scale(1e3)).map(UnaryOp::Sigmoid);
    y.wait()?;
    println!(
        "data: {EXAMPLES} examples × {FEATURES} features, {PER_ROW} nonzeros each, in {} blocks, made in {:.2} s",
        x.num_blocks(),
        t.elapsed().as_secs_f64()
    );

    let mut w = DArray::<f64>::zeros(&rt, &[FEATURES], &[FEATURES])?;
    let (loss, accuracy) = score(&x.matmul(&w)?.map(UnaryOp::Sigmoid), &y)?;
    println!("step   0: loss {loss:.4}, accuracy {:.2} %", 100.0 * accuracy);
    let t = Instant::now();
    let mut last = (loss, accuracy);
    for step in 1..=STEPS {
        let p = x.matmul(&w)?.map(UnaryOp::Sigmoid);
        let gradient = x.t_matmul(&p.zip(&y, BinaryOp::Sub)?)?;
        w = w.zip(&gradient.map(UnaryOp::Scale(LEARNING_RATE / EXAMPLES as f64)), BinaryOp::Sub)?;
        if step % 10 == 0 {
            last = score(&x.matmul(&w)?.map(UnaryOp::Sigmoid), &y)?;
            println!(
                "step {step:3}: loss {:.4}, accuracy {:.2} % ({:.1} steps/s)",
                last.0,
                100.0 * last.1,
                step as f64 / t.elapsed().as_secs_f64()
            );
        }
    }
    let per_node: Vec<String> =
        cluster.nodes().iter().map(|n| format!("{}: {} tasks", n.name, n.tasks_run)).collect();
    println!("tasks run on the nodes: {}", per_node.join(", "));
    ensure!(last.0 < 0.25, "the loss fell only from {loss:.4} to {:.4}", last.0);
    ensure!(last.1 > 0.95, "accuracy {:.2} % after {STEPS} steps", 100.0 * last.1);
    Ok(())
}
