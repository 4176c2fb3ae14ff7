//! Trains an MLP (64-128-64-10, ReLU, Adam) on the digits data set and prints loss,
//! accuracy and samples/s per epoch.
//!
//! `cargo run --release --example digits_mlp -- --epochs 40`
#[path = "common/digits.rs"]
mod digits;

use anyhow::Result;
use clap::Parser;
use tessera::nn::{mlp, Evaluator, OptimizerConfig, TrainState, Trainer};

#[derive(Parser)]
struct Args {
    /// Training epochs.
    #[arg(long, default_value_t = 40)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f32,
    /// Seed for initialization and shuffling.
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
    let sizes = [64, 128, 64, 10];
    let model = mlp(args.batch, &sizes)?;
    let mut state =
        TrainState::new(&model, OptimizerConfig::adam(args.lr), train.len(), args.batch, args.seed);
    let mut trainer = Trainer::new(model);
    let mut eval = Evaluator::new(mlp(test.len(), &sizes)?);
    for epoch in 1..=args.epochs {
        let stats = trainer.train_epoch(&mut state, &train)?;
        let e = eval.classify(&state.params, &test)?;
        println!("epoch {epoch:3}  {}", digits::summary(&stats, &e));
    }
    Ok(())
}
