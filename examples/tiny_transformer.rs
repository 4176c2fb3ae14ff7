//! Trains a tiny causal transformer language model over characters of text files (default:
//! this project's own docs and sources), printing per epoch the training loss, validation
//! loss against the unigram baseline, validation accuracy and tokens/s, then samples text.
//!
//! `cargo run --release --example tiny_transformer -- --epochs 10 --layers 4 FILE...`
#[path = "common/text.rs"]
mod text;

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use tessera::nn::{
    tiny_transformer, window_count, Evaluator, OptimizerConfig, TrainState, Trainer, TransformerConfig,
};

#[derive(Parser)]
struct Args {
    /// Text files to train on (default: README.md, design docs and src/**/*.rs).
    files: Vec<PathBuf>,
    /// Training epochs.
    #[arg(long, default_value_t = 8)]
    epochs: usize,
    /// Windows per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Context length.
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    width: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let text = text::Text::load(&args.files)?;
    text.check_batch(args.batch, args.steps)?;
    let (train, valid) = (text.train(), text.valid());
    let cfg =
        TransformerConfig { width: args.width, heads: args.heads, layers: args.layers, ff: 4 * args.width };
    let v = text.corpus.vocab_size();
    let model = tiny_transformer(args.batch, args.steps, v, cfg)?;
    let windows = window_count(train.len(), args.steps);
    let mut state =
        TrainState::new(&model, OptimizerConfig::adamw(args.lr, 1e-2), windows, args.batch, args.seed);
    println!("{} parameters", state.params.count());
    let mut trainer = Trainer::new(model);
    let mut eval = Evaluator::new(tiny_transformer(args.batch, args.steps, v, cfg)?);
    for epoch in 1..=args.epochs {
        let stats = trainer.train_epoch_text(&mut state, train, args.steps)?;
        let ev = eval.text(&state.params, valid, args.steps)?;
        text.print_epoch(epoch, &stats, &ev);
    }
    let sampler = tiny_transformer(1, args.steps, v, cfg)?;
    text.print_sample(&sampler, &state.params, args.seed)?;
    Ok(())
}
