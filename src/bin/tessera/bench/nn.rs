//! `tessera bench nn`: training throughput and accuracy of the model zoo on the CPU
//! executor (one thread: `matrixmultiply` runs without threading).
//!
//! Figures: MLP 64-128-64-10 (40 epochs) and LeNet-style CNN (45 epochs) on the digits
//! data (batch 64, seeded 80/20 split), training samples/s (median of repeated full runs,
//! evaluation excluded) and final test accuracy; a character GRU and a tiny transformer in
//! tokens/s; full-batch training steps of the zoo's GCN (hidden width 64) on a random graph
//! of 20 000 nodes and 100 000 edges, 32 features and 8 classes (steps/s).
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use tessera::nn::{
    char_gru, lenet, mlp, tiny_transformer, window_count, Dataset, EpochStats, Evaluator, Model,
    OptimizerConfig, TextCorpus, TrainState, Trainer, TransformerConfig,
};

use super::{median, Reporter};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// A trainer that runs classifier epochs (on the CPU executor, or another device's).
pub(crate) trait EpochTrainer {
    fn epoch(&mut self, state: &mut TrainState, data: &Dataset) -> Result<EpochStats>;
    fn epoch_text(&mut self, state: &mut TrainState, ids: &[i32], steps: usize) -> Result<EpochStats>;
}

impl EpochTrainer for Trainer {
    fn epoch(&mut self, state: &mut TrainState, data: &Dataset) -> Result<EpochStats> {
        Ok(self.train_epoch(state, data)?)
    }

    fn epoch_text(&mut self, state: &mut TrainState, ids: &[i32], steps: usize) -> Result<EpochStats> {
        Ok(self.train_epoch_text(state, ids, steps)?)
    }
}

/// Trains from scratch `epochs` epochs with a cosine learning-rate decay; returns the
/// training samples/s (training steps only) and the final test accuracy.
fn train_digits<T: EpochTrainer>(
    build: &dyn Fn(usize) -> Result<Model>,
    config: OptimizerConfig,
    epochs: usize,
    (train, test): (&Dataset, &Dataset),
    make_trainer: &dyn Fn(Model, &TrainState) -> Result<T>,
) -> Result<(f64, f64)> {
    let model = build(64)?;
    let peak = config.lr();
    let mut state = TrainState::new(&model, config, train.len(), 64, 1);
    let mut trainer = make_trainer(model, &state)?;
    let (mut samples, mut seconds) = (0usize, 0.0f64);
    for epoch in 0..epochs {
        let lr = peak * 0.5 * (1.0 + (std::f32::consts::PI * epoch as f32 / epochs as f32).cos());
        state.optimizer.set_lr(lr);
        let stats = trainer.epoch(&mut state, train)?;
        samples += stats.samples;
        seconds += stats.seconds;
    }
    let accuracy = Evaluator::new(build(test.len())?).classify(&state.params, test)?.accuracy;
    Ok((samples as f64 / seconds, 100.0 * accuracy as f64))
}

/// One digits case of a suite: `runs` trainings from scratch; reports
/// `<suite>/<name>_train_samples_per_s` (median) and `<suite>/<name>_test_accuracy`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn digits_case<T: EpochTrainer>(
    reporter: &Reporter,
    suite: &str,
    name: &str,
    build: &dyn Fn(usize) -> Result<Model>,
    config: OptimizerConfig,
    epochs: usize,
    runs: usize,
    make_trainer: &dyn Fn(Model, &TrainState) -> Result<T>,
) -> Result<()> {
    let (train, test) = Dataset::digits(data_dir().join("digits.csv"))?.split(0.2, 42);
    let mut rates = Vec::new();
    let mut accuracy = 0.0;
    for _ in 0..runs {
        let (rate, acc) = train_digits(build, config.clone(), epochs, (&train, &test), make_trainer)?;
        rates.push(rate);
        accuracy = acc;
    }
    reporter.report(&format!("{suite}/{name}_train_samples_per_s"), median(&mut rates), "samples/s", true);
    reporter.report(&format!("{suite}/{name}_test_accuracy"), accuracy, "%", true);
    Ok(())
}

/// The MLP and CNN digits cases, with the settings every suite uses.
pub(crate) fn digits_cases<T: EpochTrainer>(
    reporter: &Reporter,
    suite: &str,
    (mlp_runs, cnn_runs): (usize, usize),
    make_trainer: &dyn Fn(Model, &TrainState) -> Result<T>,
) -> Result<()> {
    let sizes = [64, 128, 64, 10];
    let mlp_model = |b: usize| Ok(mlp(b, &sizes)?);
    digits_case(reporter, suite, "mlp", &mlp_model, OptimizerConfig::adam(2e-3), 40, mlp_runs, make_trainer)?;
    let cnn_model = |b: usize| Ok(lenet(b, 8, 10)?);
    let cnn_config = OptimizerConfig::adamw(3e-3, 1e-4);
    digits_case(reporter, suite, "cnn", &cnn_model, cnn_config, 45, cnn_runs, make_trainer)
}

fn text_case<T: EpochTrainer>(
    reporter: &Reporter,
    bench: &str,
    build: &dyn Fn() -> Result<Model>,
    steps: usize,
    ids: &[i32],
    make_trainer: &dyn Fn(Model, &TrainState) -> Result<T>,
) -> Result<()> {
    let model = build()?;
    let batch = model.graph.shape(model.input)?[0];
    let mut state =
        TrainState::new(&model, OptimizerConfig::adam(3e-3), window_count(ids.len(), steps), batch, 1);
    let mut trainer = make_trainer(model, &state)?;
    let start = Instant::now();
    let mut tokens = 0;
    while start.elapsed().as_secs_f64() < 3.0 {
        tokens += trainer.epoch_text(&mut state, ids, steps)?.samples;
    }
    reporter.report(bench, tokens as f64 / start.elapsed().as_secs_f64(), "tokens/s", true);
    Ok(())
}

/// The character GRU and tiny transformer cases (`<suite>/<model>_train_tokens_per_s`) on
/// the project's own sources.
pub(crate) fn text_cases<T: EpochTrainer>(
    reporter: &Reporter,
    suite: &str,
    make_trainer: &dyn Fn(Model, &TrainState) -> Result<T>,
) -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let corpus = TextCorpus::from_files(&[root.join("README.md"), root.join("src/nn/graph.rs")])
        .context("reading the text corpus")?;
    let vocab = corpus.vocab_size();
    let bench = format!("{suite}/char_gru_train_tokens_per_s");
    text_case(reporter, &bench, &|| Ok(char_gru(32, 32, vocab, 32, 128)?), 32, &corpus.ids, make_trainer)?;
    let cfg = TransformerConfig { width: 64, heads: 4, layers: 2, ff: 256 };
    let bench = format!("{suite}/tiny_transformer_train_tokens_per_s");
    text_case(reporter, &bench, &|| Ok(tiny_transformer(16, 64, vocab, cfg)?), 64, &corpus.ids, make_trainer)
}

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    digits_cases(reporter, "nn", (7, 3), &|model, _| Ok(Trainer::new(model)))?;
    text_cases(reporter, "nn", &|model, _| Ok(Trainer::new(model)))?;
    gcn_case(reporter, "nn/gcn_20k_train_steps_per_s", tessera::nn::CpuExecutor::new)
}

/// Full-batch GCN training steps (forward, backward, Adam) on a random graph of 20 000
/// nodes, on the executor `make` gives, reported as `figure`.
pub(crate) fn gcn_case<E: tessera::nn::Executor>(
    reporter: &Reporter,
    figure: &str,
    make: impl FnOnce(&tessera::nn::Graph) -> E,
) -> Result<()> {
    use tessera::nn::{gcn, gcn_adjacency, Optimizer, Params, Rng};
    const NODES: usize = 20_000;
    const FEATURES: usize = 32;
    const CLASSES: usize = 8;
    const LABELLED: usize = 2_000;
    let mut rng = Rng::seed(11);
    let edges: Vec<(u32, u32)> = (0..NODES * 5).map(|i| ((i / 5) as u32, rng.below(NODES) as u32)).collect();
    let adjacency = gcn_adjacency(NODES, &edges)?;
    let features: Vec<f32> = (0..NODES * FEATURES).map(|_| rng.normal()).collect();
    let labelled: Vec<i32> = (0..LABELLED as i32).collect();
    let labels: Vec<i32> = (0..LABELLED).map(|_| rng.below(CLASSES) as i32).collect();
    let model = gcn(NODES, adjacency.values.len(), FEATURES, 64, CLASSES, LABELLED)?;
    let mut params = Params::init(&model.graph, &mut rng);
    let mut exec = make(&model.graph);
    model.bind(&mut exec, &features, &adjacency, &labelled, &labels)?;
    let mut optimizer = Optimizer::new(OptimizerConfig::adam(0.01), &params);
    let mut step = |exec: &mut E, params: &mut Params| -> Result<()> {
        exec.forward_all(params)?;
        exec.backward_from(params, model.loss)?;
        optimizer.step(params, |i| exec.param_grad(i));
        Ok(())
    };
    step(&mut exec, &mut params)?;
    let mut rates = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..10 {
            step(&mut exec, &mut params)?;
        }
        rates.push(10.0 / start.elapsed().as_secs_f64());
    }
    let steps = median(&mut rates);
    reporter.report(figure, steps, "steps/s", true);
    Ok(())
}
