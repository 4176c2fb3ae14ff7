//! Trains multinomial logistic regression on the digits data set with SGD + momentum and
//! prints loss, accuracy and samples/s per epoch.
//!
//! `cargo run --release --example digits_logreg -- --epochs 30`
#[path = "common/digits.rs"]
mod digits;

use anyhow::Result;
use clap::Parser;
use tessera::nn::{logistic_regression, Evaluator, OptimizerConfig, TrainState, Trainer};

#[derive(Parser)]
struct Args {
    /// Training epochs.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f32,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
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
    let model = logistic_regression(args.batch, 64, 10)?;
    let config = OptimizerConfig::sgd(args.lr, args.momentum);
    let mut state = TrainState::new(&model, config, train.len(), args.batch, args.seed);
    let mut trainer = Trainer::new(model);
    let mut eval = Evaluator::new(logistic_regression(test.len(), 64, 10)?);
    for epoch in 1..=args.epochs {
        let stats = trainer.train_epoch(&mut state, &train)?;
        let e = eval.classify(&state.params, &test)?;
        println!("epoch {epoch:3}  {}", digits::summary(&stats, &e));
    }
    Ok(())
}
