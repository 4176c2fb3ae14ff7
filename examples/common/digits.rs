//! Shared by the digits examples: the data set argument, loading with the examples' fixed
//! train/test split, the cosine learning-rate schedule, and the per-epoch report lines.
// Each example uses the part it needs.
#![allow(dead_code)]

use anyhow::Result;
use clap::Args;
use tessera::nn::{Dataset, EpochStats, Evaluation};

// `--data`: where the digits CSV is (a plain comment: a doc comment would become the
// examples' `--help` description).
#[derive(Args, Clone)]
pub struct DataArg {
    /// The digits CSV.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"))]
    pub data: String,
}

/// The digits data set, split 80/20 into (train, test) with a fixed seed.
pub fn load(data: &DataArg) -> Result<(Dataset, Dataset)> {
    Ok(Dataset::digits(&data.data)?.split(0.2, 42))
}

/// Checks `--batch` against the training set before a model is built: at least 1, and no
/// more than the training examples (else an epoch would train nothing).
pub fn check_batch(batch: usize, train: &Dataset) -> Result<()> {
    anyhow::ensure!(
        (1..=train.len()).contains(&batch),
        "--batch must be between 1 and the {} training examples (got {batch})",
        train.len()
    );
    Ok(())
}

/// `peak` decayed to zero on a cosine over `epochs` (epoch counted from 0).
pub fn cosine_lr(peak: f32, epoch: usize, epochs: usize) -> f32 {
    peak * 0.5 * (1.0 + (std::f32::consts::PI * epoch as f32 / epochs as f32).cos())
}

/// The training and test figures of one epoch, as the single-process examples print them.
pub fn summary(stats: &EpochStats, test: &Evaluation) -> String {
    format!(
        "loss {:.4}  train acc {:.2}%  test loss {:.4}  test acc {:.2}%  {:.0} samples/s",
        stats.loss,
        100.0 * stats.accuracy,
        test.loss,
        100.0 * test.accuracy,
        stats.samples_per_second()
    )
}

/// One line for epoch `epoch` (counted from 0), as the parallel examples print it.
pub fn print_epoch(epoch: usize, stats: &EpochStats, test_accuracy: f32) {
    println!(
        "  epoch {:3}  loss {:.4}  train acc {:6.2}%  test acc {:6.2}%  {:7.0} samples/s",
        epoch + 1,
        stats.loss,
        100.0 * stats.accuracy,
        100.0 * test_accuracy,
        stats.samples_per_second()
    );
}
