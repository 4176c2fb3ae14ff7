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
use tessera::nn::{char_gru, window_count, Evaluator, OptimizerConfig, TextCorpus, TrainState, Trainer};

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
    let files = text::corpus_files(&args.files)?;
    let corpus = TextCorpus::from_files(&files)?;
    let split = corpus.ids.len() * 9 / 10;
    let (train, valid) = corpus.ids.split_at(split);
    let baseline = corpus.unigram_cross_entropy(train, valid);
    println!(
        "{} files, {} characters, vocabulary {}; unigram baseline {baseline:.3} nats/char",
        files.len(),
        corpus.ids.len(),
        corpus.vocab_size()
    );
    let (v, e, h) = (corpus.vocab_size(), args.embed, args.hidden);
    let model = char_gru(args.batch, args.steps, v, e, h)?;
    let windows = window_count(train.len(), args.steps);
    let mut state = TrainState::new(&model, OptimizerConfig::adam(args.lr), windows, args.batch, args.seed);
    let mut trainer = Trainer::new(model);
    let mut eval = Evaluator::new(char_gru(args.batch, args.steps, v, e, h)?);
    for epoch in 1..=args.epochs {
        let stats = trainer.train_epoch_text(&mut state, train, args.steps)?;
        let ev = eval.text(&state.params, valid, args.steps)?;
        println!(
            "epoch {epoch:3}  train loss {:.3}  valid loss {:.3} (unigram {baseline:.3})  valid acc {:.1}%  {:.0} tokens/s",
            stats.loss,
            ev.loss,
            100.0 * ev.accuracy,
            stats.samples_per_second()
        );
    }
    let sampler = char_gru(1, args.steps, v, e, h)?;
    let out = text::sample(&sampler, &state.params, &corpus, "pub fn ", 200, 0.8, args.seed)?;
    println!("--- sample ---\npub fn {out}");
    Ok(())
}
