//! `tessera bench nn`: training throughput and accuracy of the model zoo on the CPU
//! executor (one thread: `matrixmultiply` runs without threading).
//!
//! Figures: MLP 64-128-64-10 (40 epochs) and LeNet-style CNN (45 epochs) on the digits
//! data (batch 64, seeded 80/20 split), training samples/s (median of repeated full runs,
//! evaluation excluded) and final test accuracy; a character GRU and a tiny transformer in
//! tokens/s.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use tessera::nn::{
    char_gru, lenet, mlp, tiny_transformer, window_count, Dataset, Evaluator, Model, OptimizerConfig,
    TextCorpus, TrainState, Trainer, TransformerConfig,
};

use super::{median, Reporter};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// Trains from scratch `epochs` epochs with a cosine learning-rate decay; returns the
/// training samples/s (training steps only) and the final test accuracy.
fn train_digits(
    build: &dyn Fn(usize) -> Result<Model>,
    config: OptimizerConfig,
    epochs: usize,
    train: &Dataset,
    test: &Dataset,
) -> Result<(f64, f64)> {
    let model = build(64)?;
    let peak = config.lr();
    let mut state = TrainState::new(&model, config, train.len(), 64, 1);
    let mut trainer = Trainer::new(model);
    let (mut samples, mut seconds) = (0usize, 0.0f64);
    for epoch in 0..epochs {
        let lr = peak * 0.5 * (1.0 + (std::f32::consts::PI * epoch as f32 / epochs as f32).cos());
        state.optimizer.set_lr(lr);
        let stats = trainer.train_epoch(&mut state, train)?;
        samples += stats.samples;
        seconds += stats.seconds;
    }
    let accuracy = Evaluator::new(build(test.len())?).classify(&state.params, test)?.accuracy;
    Ok((samples as f64 / seconds, 100.0 * accuracy as f64))
}

fn digits_case(
    reporter: &Reporter,
    name: &str,
    build: &dyn Fn(usize) -> Result<Model>,
    config: OptimizerConfig,
    epochs: usize,
    runs: usize,
) -> Result<()> {
    let (train, test) = Dataset::digits(data_dir().join("digits.csv"))?.split(0.2, 42);
    let mut rates = Vec::new();
    let mut accuracy = 0.0;
    for _ in 0..runs {
        let (rate, acc) = train_digits(build, config.clone(), epochs, &train, &test)?;
        rates.push(rate);
        accuracy = acc;
    }
    reporter.report(&format!("nn/{name}_train_samples_per_s"), median(&mut rates), "samples/s", true);
    reporter.report(&format!("nn/{name}_test_accuracy"), accuracy, "%", true);
    Ok(())
}

fn text_case(
    reporter: &Reporter,
    name: &str,
    build: &dyn Fn() -> Result<Model>,
    steps: usize,
    ids: &[i32],
) -> Result<()> {
    let model = build()?;
    let batch = model.graph.shape(model.input)?[0];
    let mut state =
        TrainState::new(&model, OptimizerConfig::adam(3e-3), window_count(ids.len(), steps), batch, 1);
    let mut trainer = Trainer::new(model);
    let start = Instant::now();
    let mut tokens = 0;
    while start.elapsed().as_secs_f64() < 3.0 {
        tokens += trainer.train_epoch_text(&mut state, ids, steps)?.samples;
    }
    reporter.report(
        &format!("nn/{name}_train_tokens_per_s"),
        tokens as f64 / start.elapsed().as_secs_f64(),
        "tokens/s",
        true,
    );
    Ok(())
}

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    let sizes = [64, 128, 64, 10];
    digits_case(reporter, "mlp", &|b| Ok(mlp(b, &sizes)?), OptimizerConfig::adam(2e-3), 40, 7)?;
    digits_case(reporter, "cnn", &|b| Ok(lenet(b, 8, 10)?), OptimizerConfig::adamw(3e-3, 1e-4), 45, 3)?;

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let corpus = TextCorpus::from_files(&[root.join("README.md"), root.join("src/nn/graph.rs")])
        .context("reading the text corpus")?;
    let vocab = corpus.vocab_size();
    text_case(reporter, "char_gru", &|| Ok(char_gru(32, 32, vocab, 32, 128)?), 32, &corpus.ids)?;
    let cfg = TransformerConfig { width: 64, heads: 4, layers: 2, ff: 256 };
    text_case(reporter, "tiny_transformer", &|| Ok(tiny_transformer(16, 64, vocab, cfg)?), 64, &corpus.ids)?;
    Ok(())
}
