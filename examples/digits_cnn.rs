//! Trains a LeNet-style CNN (conv 3×3 ×16 → pool → conv 3×3 ×32 → pool → fc 64 → fc 10)
//! on the digits data set (8×8 images) with AdamW and a cosine learning-rate schedule, and
//! prints loss, accuracy and samples/s per epoch.
//!
//! `cargo run --release --example digits_cnn -- --epochs 60`
use anyhow::Result;
use clap::Parser;
use tessera::nn::{lenet, Dataset, Evaluator, OptimizerConfig, TrainState, Trainer};

#[derive(Parser)]
struct Args {
    /// Training epochs.
    #[arg(long, default_value_t = 45)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Peak AdamW learning rate (decays to zero on a cosine).
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Seed for initialization, shuffling and dropout.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The digits CSV.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"))]
    data: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (train, test) = Dataset::digits(&args.data)?.split(0.2, 42);
    println!("digits: {} train, {} test", train.len(), test.len());
    let model = lenet(args.batch, 8, 10)?;
    let config = OptimizerConfig::adamw(args.lr, 1e-4);
    let mut state = TrainState::new(&model, config, train.len(), args.batch, args.seed);
    let mut trainer = Trainer::new(model);
    let mut eval = Evaluator::new(lenet(test.len(), 8, 10)?);
    for epoch in 0..args.epochs {
        let lr = args.lr * 0.5 * (1.0 + (std::f32::consts::PI * epoch as f32 / args.epochs as f32).cos());
        state.optimizer.set_lr(lr);
        let stats = trainer.train_epoch(&mut state, &train)?;
        let e = eval.classify(&state.params, &test)?;
        println!(
            "epoch {:3}  lr {lr:.5}  loss {:.4}  train acc {:.2}%  test loss {:.4}  test acc {:.2}%  {:.0} samples/s",
            epoch + 1,
            stats.loss,
            100.0 * stats.accuracy,
            e.loss,
            100.0 * e.accuracy,
            stats.samples_per_second()
        );
    }
    Ok(())
}
