//! Trains a LeNet-style CNN (conv 3×3 ×16 → pool → conv 3×3 ×32 → pool → fc 64 → fc 10)
//! on the digits data set (8×8 images) with AdamW and a cosine learning-rate schedule, and
//! prints loss, accuracy and samples/s per epoch.
//!
//! `cargo run --release --example digits_cnn -- --epochs 60`
#[path = "common/digits.rs"]
mod digits;

use anyhow::Result;
use clap::Parser;
use tessera::nn::{lenet, Evaluator, OptimizerConfig, TrainState, Trainer};

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
    #[command(flatten)]
    data: digits::DataArg,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (train, test) = digits::load(&args.data)?;
    digits::check_batch(args.batch, &train)?;
    println!("digits: {} train, {} test", train.len(), test.len());
    let model = lenet(args.batch, 8, 10)?;
    let config = OptimizerConfig::adamw(args.lr, 1e-4);
    let mut state = TrainState::new(&model, config, train.len(), args.batch, args.seed);
    let mut trainer = Trainer::new(model);
    let mut eval = Evaluator::new(lenet(test.len(), 8, 10)?);
    for epoch in 0..args.epochs {
        let lr = digits::cosine_lr(args.lr, epoch, args.epochs);
        state.optimizer.set_lr(lr);
        let stats = trainer.train_epoch(&mut state, &train)?;
        let e = eval.classify(&state.params, &test)?;
        println!("epoch {:3}  lr {lr:.5}  {}", epoch + 1, digits::summary(&stats, &e));
    }
    Ok(())
}
