//! Data: the digits data set, character text corpora, and a seeded, serializable loader
//! that shuffles and batches.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::nn::{NnError, Rng};

/// A classification data set held in memory: one feature row and one label per example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    /// `len() × dim` features, row-major.
    pub features: Vec<f32>,
    /// One class label per example.
    pub labels: Vec<i32>,
    /// Features per example.
    pub dim: usize,
}

impl Dataset {
    /// Reads the digits CSV (64 pixel values 0–16 then the label, no header), scaling
    /// pixels to `[0, 1]`.
    ///
    /// # Errors
    /// [`NnError::Io`] if the file cannot be read; [`NnError::Data`] naming the first bad
    /// line.
    pub fn digits(path: impl AsRef<Path>) -> Result<Dataset, NnError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| NnError::io(path, e))?;
        let mut features = Vec::new();
        let mut labels = Vec::new();
        let bad = |line: usize, what: String| NnError::Data { path: path.to_path_buf(), line, what };
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let fields: Vec<&str> = line.trim().split(',').collect();
            if fields.len() != 65 {
                return Err(bad(i + 1, format!("expected 65 fields, found {}", fields.len())));
            }
            for f in &fields[..64] {
                let v: f32 = f.trim().parse().map_err(|_| bad(i + 1, format!("bad pixel `{f}`")))?;
                features.push(v / 16.0);
            }
            let label: i32 =
                fields[64].trim().parse().map_err(|_| bad(i + 1, format!("bad label `{}`", fields[64])))?;
            if !(0..10).contains(&label) {
                return Err(bad(i + 1, format!("label {label} outside 0..10")));
            }
            labels.push(label);
        }
        Ok(Dataset { features, labels, dim: 64 })
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The examples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut features = Vec::with_capacity(indices.len() * self.dim);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            features.extend_from_slice(&self.features[i * self.dim..(i + 1) * self.dim]);
            labels.push(self.labels[i]);
        }
        Dataset { features, labels, dim: self.dim }
    }

    /// A seeded random split into `(train, test)` with `test_fraction` of the examples in
    /// test.
    pub fn split(&self, test_fraction: f32, seed: u64) -> (Dataset, Dataset) {
        let mut order: Vec<usize> = (0..self.len()).collect();
        Rng::seed(seed).shuffle(&mut order);
        let n_test = ((self.len() as f32) * test_fraction).round() as usize;
        let (test, train) = order.split_at(n_test.min(self.len()));
        (self.subset(train), self.subset(test))
    }

    /// Copies the examples at `indices` into `x` (`indices.len() × dim`) and `y`.
    pub fn gather(&self, indices: &[usize], x: &mut [f32], y: &mut [i32]) {
        self.gather_features(indices, x);
        self.gather_labels(indices, y);
    }

    /// Copies the features of the examples at `indices` into `x` (`indices.len() × dim`).
    pub(crate) fn gather_features(&self, indices: &[usize], x: &mut [f32]) {
        let dim = self.dim;
        for (k, &i) in indices.iter().enumerate() {
            x[k * dim..(k + 1) * dim].copy_from_slice(&self.features[i * dim..(i + 1) * dim]);
        }
    }

    /// Copies the labels of the examples at `indices` into `y`.
    pub(crate) fn gather_labels(&self, indices: &[usize], y: &mut [i32]) {
        for (k, &i) in indices.iter().enumerate() {
            y[k] = self.labels[i];
        }
    }
}

/// Shuffles `0..len` with a seeded generator each epoch and hands out full batches of
/// indices (the last partial batch of an epoch is dropped). Serializable: its position is
/// part of a training checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataLoader {
    batch: usize,
    order: Vec<usize>,
    pos: usize,
    epoch: u64,
    rng: Rng,
}

impl DataLoader {
    /// A loader over `len` examples in batches of `batch` (`batch ≥ 1`).
    pub fn new(len: usize, batch: usize, seed: u64) -> Self {
        let mut rng = Rng::seed(seed);
        let mut order: Vec<usize> = (0..len).collect();
        rng.shuffle(&mut order);
        DataLoader { batch: batch.max(1), order, pos: 0, epoch: 0, rng }
    }

    /// Full batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.order.len() / self.batch
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// How many examples it draws from (indices `0..examples`).
    pub fn examples(&self) -> usize {
        self.order.len()
    }

    /// The current epoch (starting at 0).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Examples handed out so far in the current epoch.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The next batch of the current epoch, or `None` when the epoch is over; the `None`
    /// also starts the next epoch (a fresh shuffle).
    pub fn next_batch(&mut self) -> Option<&[usize]> {
        if self.pos + self.batch > self.order.len() {
            self.epoch += 1;
            self.pos = 0;
            self.rng.shuffle(&mut self.order);
            return None;
        }
        let start = self.pos;
        self.pos += self.batch;
        Some(&self.order[start..start + self.batch])
    }
}

/// A character-level text corpus: the vocabulary and the text as ids.
#[derive(Debug, Clone, PartialEq)]
pub struct TextCorpus {
    /// The distinct characters, sorted; a character's id is its position.
    pub vocab: Vec<char>,
    /// The text, one id per character.
    pub ids: Vec<i32>,
}

impl TextCorpus {
    /// A corpus from text.
    pub fn from_text(text: &str) -> Self {
        let mut vocab: Vec<char> = text.chars().collect();
        vocab.sort_unstable();
        vocab.dedup();
        let ids = text.chars().map(|c| vocab.binary_search(&c).expect("in vocab") as i32).collect();
        TextCorpus { vocab, ids }
    }

    /// A corpus from the concatenation of text files.
    ///
    /// # Errors
    /// [`NnError::Io`] naming the first file that cannot be read.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self, NnError> {
        let mut text = String::new();
        for p in paths {
            text.push_str(&std::fs::read_to_string(p).map_err(|e| NnError::io(p, e))?);
            text.push('\n');
        }
        Ok(Self::from_text(&text))
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Text for ids (ids outside the vocabulary become `?`).
    pub fn decode(&self, ids: &[i32]) -> String {
        ids.iter().map(|&i| self.vocab.get(i as usize).copied().unwrap_or('?')).collect()
    }

    /// Cross-entropy (nats per character) of `eval` under a unigram model fitted to
    /// `train` with add-one smoothing: the baseline a sequence model must beat.
    pub fn unigram_cross_entropy(&self, train: &[i32], eval: &[i32]) -> f32 {
        let v = self.vocab_size();
        let mut counts = vec![1.0f64; v];
        for &i in train {
            counts[i as usize] += 1.0;
        }
        let total: f64 = counts.iter().sum();
        let nll: f64 = eval.iter().map(|&i| -(counts[i as usize] / total).ln()).sum();
        (nll / eval.len().max(1) as f64) as f32
    }
}

/// Fills `out` (`[starts.len(), steps]`) with the windows of `ids` starting at
/// `starts[b] · steps + shift` (shift 0 for inputs, 1 for next-character targets).
pub fn fill_windows(ids: &[i32], starts: &[usize], steps: usize, shift: usize, out: &mut [i32]) {
    for (b, &s) in starts.iter().enumerate() {
        let at = s * steps + shift;
        out[b * steps..(b + 1) * steps].copy_from_slice(&ids[at..at + steps]);
    }
}

/// Fills `x` and `y` (`[batch, steps]` each, row-major) with the windows of `ids` that
/// start at `starts[b] · steps`: `y` is `x` shifted by one character.
pub fn gather_windows(ids: &[i32], starts: &[usize], steps: usize, x: &mut [i32], y: &mut [i32]) {
    for (b, &s) in starts.iter().enumerate() {
        let at = s * steps;
        x[b * steps..(b + 1) * steps].copy_from_slice(&ids[at..at + steps]);
        y[b * steps..(b + 1) * steps].copy_from_slice(&ids[at + 1..at + steps + 1]);
    }
}

/// The number of whole windows of `steps` characters (plus one target) in `len` ids.
pub fn window_count(len: usize, steps: usize) -> usize {
    if len == 0 || steps == 0 {
        0
    } else {
        (len - 1) / steps
    }
}
