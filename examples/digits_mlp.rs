//! Trains an MLP (64-128-64-10, ReLU, Adam) on the digits data set and prints loss,
//! accuracy and samples/s per epoch.
//!
//! `cargo run --release --example digits_mlp -- --epochs 40`
use anyhow::Result;
use clap::Parser;
use tessera::nn::{mlp, Dataset, Evaluator, OptimizerConfig, TrainState, Trainer};

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
    /// The digits CSV.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"))]
    data: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (train, test) = Dataset::digits(&args.data)?.split(0.2, 42);
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
        println!(
            "epoch {epoch:3}  loss {:.4}  train acc {:.2}%  test loss {:.4}  test acc {:.2}%  {:.0} samples/s",
            stats.loss,
            100.0 * stats.accuracy,
            e.loss,
            100.0 * e.accuracy,
            stats.samples_per_second()
        );
    }
    Ok(())
}
