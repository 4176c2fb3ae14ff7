//! Shared by the text examples: the default corpus (the project's own docs and sources),
//! its train/validation split, the per-epoch report line, and sampling from a trained
//! language model.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Result};
use tessera::nn::{
    window_count, CpuExecutor, EpochStats, Evaluation, Executor, Model, Params, Rng, TextCorpus,
};

/// A corpus split 90/10 into training and validation text.
pub struct Text {
    pub corpus: TextCorpus,
    split: usize,
    /// Validation cross-entropy of the training text's character frequencies (nats/char).
    pub baseline: f32,
}

impl Text {
    /// Reads the files given (default: see [`corpus_files`]) and prints what it read.
    pub fn load(given: &[PathBuf]) -> Result<Self> {
        let files = corpus_files(given)?;
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
        Ok(Text { corpus, split, baseline })
    }

    /// Checks, before a model is built, that `batch` and `steps` are at least 1 and that
    /// the training text holds at least one batch of windows of `steps` characters (a model
    /// unrolled over more steps than the text has would only cost memory).
    pub fn check_batch(&self, batch: usize, steps: usize) -> Result<()> {
        ensure!(batch >= 1 && steps >= 1, "--batch and --steps must be at least 1 (got {batch} and {steps})");
        let windows = window_count(self.train().len(), steps);
        ensure!(
            windows >= batch,
            "the training text ({} characters) holds {windows} windows of {steps}, fewer than one batch of \
             {batch}: give more text, or a smaller --batch or --steps",
            self.train().len()
        );
        Ok(())
    }

    /// The training ids.
    pub fn train(&self) -> &[i32] {
        &self.corpus.ids[..self.split]
    }

    /// The validation ids.
    pub fn valid(&self) -> &[i32] {
        &self.corpus.ids[self.split..]
    }

    /// Prints one epoch's training and validation figures.
    pub fn print_epoch(&self, epoch: usize, stats: &EpochStats, valid: &Evaluation) {
        println!(
            "epoch {epoch:3}  train loss {:.3}  valid loss {:.3} (unigram {:.3})  valid acc {:.1}%  {:.0} tokens/s",
            stats.loss,
            valid.loss,
            self.baseline,
            100.0 * valid.accuracy,
            stats.samples_per_second()
        );
    }

    /// Prints 200 characters that `model` (built with batch 1) writes after "pub fn ".
    pub fn print_sample(&self, model: &Model, params: &Params, seed: u64) -> Result<()> {
        let out = sample(model, params, &self.corpus, "pub fn ", 200, 0.8, seed)?;
        println!("--- sample ---\npub fn {out}");
        Ok(())
    }
}

/// The files given, or by default README.md, the design docs and `src/**/*.rs`.
fn corpus_files(given: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<PathBuf> = ["README.md", "ARCHITECTURE.md", "DESIGN.md"]
        .iter()
        .map(|f| root.join(f))
        .filter(|p| p.exists())
        .collect();
    collect_rs(&root.join("src"), &mut files)?;
    if files.is_empty() {
        bail!("no text files found under {}", root.display());
    }
    Ok(files)
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_rs(&p, out)?;
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// Generates `len` characters after `prompt` from a model built with batch 1, sampling
/// with the given temperature.
fn sample(
    model: &Model,
    params: &Params,
    corpus: &TextCorpus,
    prompt: &str,
    len: usize,
    temperature: f32,
    seed: u64,
) -> Result<String> {
    let steps = model.graph.shape(model.input)?[1];
    let mut exec = CpuExecutor::new(&model.graph);
    let mut rng = Rng::seed(seed);
    let mut ids: Vec<i32> =
        prompt.chars().filter_map(|c| corpus.vocab.binary_search(&c).ok()).map(|i| i as i32).collect();
    let start = ids.len();
    let mut window = vec![0i32; steps];
    let vocab = corpus.vocab_size();
    for _ in 0..len {
        let ctx = &ids[ids.len().saturating_sub(steps)..];
        window.fill(0);
        window[..ctx.len()].copy_from_slice(ctx);
        exec.set_ids(model.input, &window)?;
        exec.forward(params, 0..model.logits.index() + 1)?;
        let at = ctx.len().max(1) - 1;
        let row = &exec.value(model.logits)?[at * vocab..(at + 1) * vocab];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = row.iter().map(|v| ((v - max) / temperature).exp()).collect();
        let mut pick = rng.uniform() * weights.iter().sum::<f32>();
        let mut next = vocab - 1;
        for (i, w) in weights.iter().enumerate() {
            if pick < *w {
                next = i;
                break;
            }
            pick -= w;
        }
        ids.push(next as i32);
    }
    Ok(corpus.decode(&ids[start..]))
}
