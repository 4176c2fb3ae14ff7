//! Trains a character-level GRU language model on text files (default: this project's own
//! docs and sources), printing per epoch the training loss, validation loss against the
//! unigram baseline, validation accuracy and tokens/s, then samples some text.
//!
//! `cargo run --release --example char_rnn -- --epochs 20 FILE...`
#[path = "common/text.rs"]
mod text;

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use tessera::nn::{char_gru, window_count, Evaluator, OptimizerConfig, TrainState, Trainer};

#[derive(Parser)]
struct Args {
    /// Text files to train on (default: README.md, design docs and src/**/*.rs).
    files: Vec<PathBuf>,
    /// Training epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Windows per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Characters per window (steps of back-propagation through time).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Embedding width.
    #[arg(long, default_value_t = 32)]
    embed: usize,
    /// GRU hidden width.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Adam learning rate.
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
    let (v, e, h) = (text.corpus.vocab_size(), args.embed, args.hidden);
    let model = char_gru(args.batch, args.steps, v, e, h)?;
    let windows = window_count(train.len(), args.steps);
    let mut state = TrainState::new(&model, OptimizerConfig::adam(args.lr), windows, args.batch, args.seed);
    let mut trainer = Trainer::new(model);
    let mut eval = Evaluator::new(char_gru(args.batch, args.steps, v, e, h)?);
    for epoch in 1..=args.epochs {
        let stats = trainer.train_epoch_text(&mut state, train, args.steps)?;
        let ev = eval.text(&state.params, valid, args.steps)?;
        text.print_epoch(epoch, &stats, &ev);
    }
    let sampler = char_gru(1, args.steps, v, e, h)?;
    text.print_sample(&sampler, &state.params, args.seed)?;
    Ok(())
}
