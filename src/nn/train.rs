//! Training: the serializable [`TrainState`], checkpoints through a [`CheckpointStore`],
//! and the [`Trainer`] / [`Evaluator`] loops over a model's graph.
//!
//! # Checkpoint and resume
//! 1. Everything that decides the rest of a run is in [`TrainState`]: parameters,
//!    optimizer moments and step count, epoch and step, the RNG (dropout seeds) and the
//!    data loader (shuffle order, position, its own RNG).
//! 2. [`save_checkpoint`] encodes the state with bincode (f32 bits exactly) and hands the
//!    bytes to the store; [`resume`] decodes them. A resumed run therefore continues with
//!    bit-identical parameters to a run that never stopped.
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::nn::data::{fill_windows, gather_windows, window_count};
use crate::nn::{
    CpuExecutor, DType, DataLoader, Dataset, Executor, Model, NnError, Optimizer, OptimizerConfig, Params,
    Rng,
};

/// The whole state of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Parameter values.
    pub params: Params,
    /// Optimizer and its moments.
    pub optimizer: Optimizer,
    /// Completed epochs.
    pub epoch: u64,
    /// Completed optimizer steps.
    pub step: u64,
    /// Source of per-step seeds (dropout).
    pub rng: Rng,
    /// The data loader: shuffle order and position.
    pub loader: DataLoader,
}

impl TrainState {
    /// A fresh run: parameters drawn from the graph's initializers with `seed`, a fresh
    /// optimizer, and a loader over `examples` in batches of `batch`.
    pub fn new(model: &Model, config: OptimizerConfig, examples: usize, batch: usize, seed: u64) -> Self {
        let mut rng = Rng::seed(seed);
        let params = Params::init(&model.graph, &mut rng);
        let optimizer = Optimizer::new(config, &params);
        let loader = DataLoader::new(examples, batch, rng.next_u64());
        TrainState { params, optimizer, epoch: 0, step: 0, rng, loader }
    }
}

/// Saves the whole training state as a new version of `name` in the stash (type
/// `TrainState`, with `tags`); every checkpoint stays loadable by version or tag.
///
/// # Errors
/// [`NnError::Checkpoint`] naming the checkpoint if the stash fails.
pub fn save_to_stash(
    stash: &crate::Stash,
    name: &str,
    state: &TrainState,
    tags: &[(&str, &str)],
) -> Result<crate::Version, NnError> {
    stash.save(name, state, tags).map_err(|e| NnError::Checkpoint { name: name.into(), what: e.to_string() })
}

/// Loads the latest training state saved under `name` in the stash (or the given version).
///
/// # Errors
/// [`NnError::Checkpoint`] naming the checkpoint if there is none, it is damaged, or it is
/// not a `TrainState`.
pub fn resume_from_stash(
    stash: &crate::Stash,
    name: &str,
    version: Option<crate::Version>,
) -> Result<TrainState, NnError> {
    let loaded = match version {
        Some(version) => stash.load_version(name, version),
        None => stash.load(name),
    };
    loaded.map_err(|e| NnError::Checkpoint { name: name.into(), what: e.to_string() })
}

/// Where checkpoints go as named byte blobs, when not in a stash (see [`save_to_stash`]).
pub trait CheckpointStore {
    /// Stores `bytes` under `name`, replacing an older blob of that name.
    ///
    /// # Errors
    /// [`NnError::Io`] if the blob cannot be written.
    fn save_bytes(&self, name: &str, bytes: &[u8]) -> Result<(), NnError>;

    /// The bytes last stored under `name`.
    ///
    /// # Errors
    /// [`NnError::Io`] if there is no such blob or it cannot be read.
    fn load_bytes(&self, name: &str) -> Result<Vec<u8>, NnError>;
}

/// A [`CheckpointStore`] keeping one file per name in a directory (written atomically:
/// temporary file, then rename).
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// Opens (creating if needed) the directory.
    ///
    /// # Errors
    /// [`NnError::Io`] if it cannot be created.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, NnError> {
        let root = root.as_ref().to_path_buf();
        std::fs::create_dir_all(&root).map_err(|e| NnError::io(&root, e))?;
        Ok(DirStore { root })
    }

    fn path(&self, name: &str) -> PathBuf {
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
            .collect();
        self.root.join(format!("{safe}.ckpt"))
    }
}

impl CheckpointStore for DirStore {
    fn save_bytes(&self, name: &str, bytes: &[u8]) -> Result<(), NnError> {
        let path = self.path(name);
        let tmp = path.with_extension("ckpt.tmp");
        std::fs::write(&tmp, bytes).map_err(|e| NnError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| NnError::io(&path, e))
    }

    fn load_bytes(&self, name: &str) -> Result<Vec<u8>, NnError> {
        let path = self.path(name);
        std::fs::read(&path).map_err(|e| NnError::io(&path, e))
    }
}

/// Saves the whole training state under `name`.
///
/// # Errors
/// [`NnError::Checkpoint`] if encoding fails; the store's errors.
pub fn save_checkpoint(store: &dyn CheckpointStore, name: &str, state: &TrainState) -> Result<(), NnError> {
    let bytes = bincode::serde::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| NnError::Checkpoint { name: name.into(), what: e.to_string() })?;
    store.save_bytes(name, &bytes)
}

/// Loads the training state saved under `name`.
///
/// # Errors
/// The store's errors; [`NnError::Checkpoint`] if the bytes do not decode.
pub fn resume(store: &dyn CheckpointStore, name: &str) -> Result<TrainState, NnError> {
    let bytes = store.load_bytes(name)?;
    let (state, _) = crate::codec::decode_slice(&bytes)
        .map_err(|e| NnError::Checkpoint { name: name.into(), what: e.to_string() })?;
    Ok(state)
}

/// What one epoch of training did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// Mean training loss over the epoch's batches.
    pub loss: f32,
    /// Fraction of training predictions that were right (0 for language models).
    pub accuracy: f32,
    /// Examples (or predicted tokens) processed.
    pub samples: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl EpochStats {
    /// Training throughput.
    pub fn samples_per_second(&self) -> f64 {
        self.samples as f64 / self.seconds.max(1e-9)
    }
}

/// The index of the largest value (the first on ties).
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Checks, before an epoch of a classifier, what the epoch then relies on: the model is a
/// classifier (`[batch, features…]` input, `[batch]` i32 labels, `[batch, classes]`
/// logits), an example's `data_dim` features fill one row of its input, and the state's
/// loader draws batches of `loader_batch` rows (what the trainer takes per step) from
/// exactly `data_len` examples, so that gathering rows by its indices stays in bounds.
/// Returns the number of classes. `op` names the trainer in the error.
///
/// # Errors
/// [`NnError::Argument`] if the model is not such a classifier or the loader does not fit;
/// [`NnError::Shape`] if the features do not.
pub(crate) fn check_classifier_epoch(
    op: &'static str,
    model: &Model,
    loader: &DataLoader,
    loader_batch: usize,
    (data_len, data_dim): (usize, usize),
) -> Result<usize, NnError> {
    let graph = &model.graph;
    let (input, target, logits) =
        (graph.shape(model.input)?, graph.shape(model.target)?, graph.shape(model.logits)?);
    let argument = |what: String| NnError::Argument { op, what };
    let batch = *input.first().ok_or_else(|| argument("the model's input has no batch dimension".into()))?;
    let classifier = target == [batch]
        && graph.nodes()[model.target.index()].dtype == DType::I32
        && logits.len() == 2
        && logits[0] == batch;
    if !classifier {
        return Err(argument(format!(
            "a classifier needs labels of shape [{batch}] (i32) and logits of shape [{batch}, classes]; \
             the model has labels {target:?} and logits {logits:?}"
        )));
    }
    let features: usize = input[1..].iter().product();
    if features != data_dim {
        return Err(NnError::Shape {
            op,
            input: "data",
            got: vec![data_len, data_dim],
            expected: format!("rows of {features} features (the model's input is {input:?})"),
        });
    }
    if loader.examples() != data_len || loader.batch_size() != loader_batch {
        return Err(argument(format!(
            "the state's loader draws batches of {} from {} examples; this epoch takes batches of \
             {loader_batch} from a data set of {data_len} examples",
            loader.batch_size(),
            loader.examples(),
        )));
    }
    check_one_batch(op, loader, "examples")?;
    Ok(logits[1])
}

/// Checks that an epoch of `loader` holds at least one batch: a data set smaller than one
/// batch would train nothing, and an epoch that trains nothing is a mistake to report,
/// not a result.
fn check_one_batch(op: &'static str, loader: &DataLoader, what: &str) -> Result<(), NnError> {
    if loader.batches_per_epoch() > 0 {
        return Ok(());
    }
    Err(NnError::Argument {
        op,
        what: format!(
            "{} {what} make no batch of {}: an epoch would train nothing (use a smaller batch or more data)",
            loader.examples(),
            loader.batch_size()
        ),
    })
}

/// Checks, before an epoch of a language model over `ids_len` ids in windows of `steps`,
/// that the state's loader draws from every window of the text in batches whose windows
/// fill the model's input and targets exactly (on each of `replicas` replicas, which share
/// every batch).
///
/// # Errors
/// [`NnError::Argument`] naming `op` if they do not fit.
pub(crate) fn check_text_epoch(
    op: &'static str,
    model: &Model,
    loader: &DataLoader,
    replicas: usize,
    ids_len: usize,
    steps: usize,
) -> Result<(), NnError> {
    let graph = &model.graph;
    let (input_len, target_len) = (graph.node(model.input)?.len(), graph.node(model.target)?.len());
    let (batch, windows) = (loader.batch_size(), window_count(ids_len, steps));
    let batch_ids = batch * steps;
    if input_len * replicas != batch_ids || target_len * replicas != batch_ids || loader.examples() != windows
    {
        let shared = if replicas > 1 { format!(" on each of {replicas} replicas") } else { String::new() };
        return Err(NnError::Argument {
            op,
            what: format!(
                "the state's loader draws batches of {batch} from {} windows, and {ids_len} ids hold {windows} \
                 windows of {steps}; the model takes {input_len} ids and {target_len} targets a step{shared}",
                loader.examples(),
            ),
        });
    }
    check_one_batch(op, loader, &format!("windows of {steps} ids"))
}

/// Copies the examples at `batch` of `data` into the (preallocated) input and target
/// buffers of `model` in `exec`.
pub(crate) fn set_examples(
    exec: &mut CpuExecutor,
    model: &Model,
    data: &Dataset,
    batch: &[usize],
) -> Result<(), NnError> {
    data.gather_features(batch, exec.value_mut(model.input)?);
    data.gather_labels(batch, exec.ids_mut(model.target)?);
    Ok(())
}

/// Sums over one epoch's batches, made into [`EpochStats`] at its end: the single-process
/// trainers, the pipelines and the data-parallel replicas all count the same way.
pub(crate) struct EpochTally {
    start: Instant,
    /// Sum of the batches' mean losses.
    pub(crate) loss: f64,
    pub(crate) batches: usize,
    /// Rows classified right.
    pub(crate) correct: usize,
    pub(crate) samples: usize,
}

impl EpochTally {
    /// Starts the epoch's clock.
    pub(crate) fn start() -> Self {
        EpochTally { start: Instant::now(), loss: 0.0, batches: 0, correct: 0, samples: 0 }
    }

    /// Counts one batch of `samples` examples (or predicted tokens) with mean loss `loss`.
    pub(crate) fn batch(&mut self, loss: f32, samples: usize) {
        self.loss += loss as f64;
        self.batches += 1;
        self.samples += samples;
    }

    /// Counts the rows of `logits` (`classes` wide) whose largest value is at their label.
    pub(crate) fn classified(
        &mut self,
        logits: &[f32],
        classes: usize,
        labels: impl IntoIterator<Item = i32>,
    ) {
        for (row, label) in logits.chunks_exact(classes).zip(labels) {
            self.correct += usize::from(argmax(row) == label as usize);
        }
    }

    /// Seconds since the epoch started.
    pub(crate) fn seconds(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// The epoch's mean batch loss, accuracy (0 when nothing was classified), samples and
    /// time.
    pub(crate) fn finish(&self) -> EpochStats {
        EpochStats {
            loss: (self.loss / self.batches.max(1) as f64) as f32,
            accuracy: self.correct as f32 / self.samples.max(1) as f32,
            samples: self.samples,
            seconds: self.seconds(),
        }
    }
}

/// Runs training steps of one model on a [`CpuExecutor`] with buffers made once.
#[derive(Debug)]
pub struct Trainer {
    model: Model,
    exec: CpuExecutor,
    batch: Vec<usize>,
}

impl Trainer {
    /// A trainer for `model` (allocates all buffers now).
    pub fn new(model: Model) -> Self {
        let exec = CpuExecutor::new(&model.graph);
        let batch = Vec::with_capacity(model.graph.shape(model.input).map_or(0, |s| s[0]));
        Trainer { model, exec, batch }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The executor (to fill inputs or read values and gradients).
    pub fn executor(&mut self) -> &mut CpuExecutor {
        &mut self.exec
    }

    /// One optimizer step on the batch currently set in the executor; returns the loss.
    ///
    /// # Errors
    /// As [`Executor::forward`] and [`Executor::backward`]; [`NnError::Argument`] if the
    /// optimizer's moments do not fit the parameters (a checkpoint of another model).
    pub fn step(&mut self, state: &mut TrainState) -> Result<f32, NnError> {
        self.step_reduced(state, |_, _| Ok(()))
    }

    /// As [`Trainer::step`], but between backward and the update hands each parameter's
    /// gradient to `reduce`, in the graph's fixed parameter order, to be changed in place:
    /// the hook where a data-parallel trainer all-reduces gradient buckets.
    ///
    /// # Errors
    /// As [`Trainer::step`], and whatever `reduce` returns (the update is then skipped).
    pub fn step_reduced(
        &mut self,
        state: &mut TrainState,
        mut reduce: impl FnMut(usize, &mut [f32]) -> Result<(), NnError>,
    ) -> Result<f32, NnError> {
        let loss = self.model.loss;
        state.optimizer.check_fits(&state.params, "Trainer::step")?;
        self.exec.set_training(true);
        self.exec.set_seed(state.rng.next_u64());
        self.exec.forward(&state.params, 0..loss.index() + 1)?;
        self.exec.backward_from(&state.params, loss)?;
        for i in 0..state.params.tensors.len() {
            reduce(i, self.exec.param_grad_mut(i))?;
        }
        let exec = &self.exec;
        state.optimizer.step(&mut state.params, |i| exec.param_grad(i));
        state.step += 1;
        exec.scalar(loss)
    }

    /// Copies the loader's next batch into `self.batch`; false at the end of an epoch.
    fn next_batch(&mut self, loader: &mut DataLoader) -> bool {
        match loader.next_batch() {
            Some(idx) => {
                self.batch.clear();
                self.batch.extend_from_slice(idx);
                true
            }
            None => false,
        }
    }

    /// One epoch of a classifier over `data` (full batches from the state's loader).
    ///
    /// # Errors
    /// [`NnError::Argument`] if the model is not a classifier (see `GpuTrainer::train_epoch`)
    /// or the state's loader does not draw batches of the model's size from `data`'s
    /// examples; [`NnError::Shape`] if `data`'s rows do not fit the model's input; as
    /// [`Trainer::step`].
    pub fn train_epoch(&mut self, state: &mut TrainState, data: &Dataset) -> Result<EpochStats, NnError> {
        let batch = self.model.graph.shape(self.model.input)?.first().copied().unwrap_or(0);
        let classes = check_classifier_epoch(
            "Trainer::train_epoch",
            &self.model,
            &state.loader,
            batch,
            (data.len(), data.dim),
        )?;
        let mut tally = EpochTally::start();
        let logits = self.model.logits;
        while self.next_batch(&mut state.loader) {
            set_examples(&mut self.exec, &self.model, data, &self.batch)?;
            let loss = self.step(state)?;
            tally.batch(loss, self.batch.len());
            let labels = self.batch.iter().map(|&i| data.labels[i]);
            tally.classified(self.exec.value(logits)?, classes, labels);
        }
        state.epoch += 1;
        Ok(tally.finish())
    }

    /// One epoch of a language model over windows of `ids` (the loader indexes windows of
    /// `steps` characters; see [`window_count`](crate::nn::window_count)).
    ///
    /// # Errors
    /// [`NnError::Argument`] unless the loader draws from every window of `ids` in batches
    /// whose windows fill the model's input and targets; as [`Trainer::step`].
    pub fn train_epoch_text(
        &mut self,
        state: &mut TrainState,
        ids: &[i32],
        steps: usize,
    ) -> Result<EpochStats, NnError> {
        let (input, target) = (self.model.input, self.model.target);
        check_text_epoch("Trainer::train_epoch_text", &self.model, &state.loader, 1, ids.len(), steps)?;
        let mut tally = EpochTally::start();
        while self.next_batch(&mut state.loader) {
            fill_windows(ids, &self.batch, steps, 0, self.exec.ids_mut(input)?);
            fill_windows(ids, &self.batch, steps, 1, self.exec.ids_mut(target)?);
            let loss = self.step(state)?;
            tally.batch(loss, self.batch.len() * steps);
        }
        state.epoch += 1;
        Ok(tally.finish())
    }
}

/// Loss and accuracy of a model on held-out data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean cross-entropy (nats).
    pub loss: f32,
    /// Fraction of right predictions.
    pub accuracy: f32,
}

/// Evaluates a model built for some batch size over data of any size (the last partial
/// batch is padded, and padded rows are not counted).
#[derive(Debug)]
pub struct Evaluator {
    model: Model,
    exec: CpuExecutor,
}

impl Evaluator {
    /// An evaluator for `model` (usually built with a larger batch than training).
    pub fn new(model: Model) -> Self {
        let exec = CpuExecutor::new(&model.graph);
        Evaluator { model, exec }
    }

    fn score(
        &mut self,
        rows: usize,
        valid: usize,
        targets: &[i32],
        acc: &mut (f64, usize, usize),
    ) -> Result<(), NnError> {
        let logits = self.exec.value(self.model.logits)?;
        let classes = logits.len() / rows.max(1);
        for (position, (row, &t)) in logits.chunks_exact(classes.max(1)).zip(targets).take(valid).enumerate()
        {
            if t < 0 || t as usize >= classes {
                return Err(NnError::IdOutOfRange { op: "Evaluator", id: t, position, limit: classes });
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            acc.0 += (lse - row[t as usize]) as f64;
            acc.1 += usize::from(argmax(row) == t as usize);
            acc.2 += 1;
        }
        Ok(())
    }

    /// The model's batch: the first axis of its input, at least 1.
    fn batch(&self, op: &'static str) -> Result<usize, NnError> {
        match self.model.graph.shape(self.model.input)?.first() {
            Some(&batch) if batch > 0 => Ok(batch),
            _ => Err(NnError::Argument {
                op,
                what: "the model's input needs a batch axis of at least 1".into(),
            }),
        }
    }

    /// Classifier loss and accuracy on `data`.
    ///
    /// # Errors
    /// [`NnError::Argument`] for a model without a batch axis; [`NnError::Shape`] if
    /// `data`'s rows do not fit the model's input; [`NnError::IdOutOfRange`] for a label
    /// that is not one of the model's classes; as [`Executor::forward`].
    pub fn classify(&mut self, params: &Params, data: &Dataset) -> Result<Evaluation, NnError> {
        self.exec.set_training(false);
        let batch = self.batch("Evaluator::classify")?;
        let features = self.exec.value_mut(self.model.input)?.len() / batch;
        if features != data.dim {
            return Err(NnError::Shape {
                op: "Evaluator::classify",
                input: "data",
                got: vec![data.len(), data.dim],
                expected: format!("rows of {features} features"),
            });
        }
        let logits = self.model.logits;
        let mut acc = (0.0, 0, 0);
        let indices: Vec<usize> = (0..data.len()).collect();
        let mut labels = vec![0i32; batch];
        for chunk in indices.chunks(batch) {
            let x = self.exec.value_mut(self.model.input)?;
            x.fill(0.0);
            data.gather(chunk, x, &mut labels[..chunk.len()]);
            self.exec.forward(params, 0..logits.index() + 1)?;
            self.score(batch, chunk.len(), &labels, &mut acc)?;
        }
        Ok(Evaluation {
            loss: (acc.0 / acc.2.max(1) as f64) as f32,
            accuracy: acc.1 as f32 / acc.2.max(1) as f32,
        })
    }

    /// Language-model loss (nats per character) and next-character accuracy over every
    /// whole window of `steps` characters in `ids`.
    ///
    /// # Errors
    /// [`NnError::Argument`] for a model without a batch axis; [`NnError::Length`] if the
    /// model's input is not `[batch, steps]` ids; [`NnError::IdOutOfRange`] for an id that
    /// is not in the model's vocabulary; as [`Executor::forward`].
    pub fn text(&mut self, params: &Params, ids: &[i32], steps: usize) -> Result<Evaluation, NnError> {
        self.exec.set_training(false);
        let batch = self.batch("Evaluator::text")?;
        let logits = self.model.logits;
        let windows = crate::nn::data::window_count(ids.len(), steps);
        let starts: Vec<usize> = (0..windows).collect();
        let mut acc = (0.0, 0, 0);
        let mut x = vec![0i32; batch * steps];
        let mut y = vec![0i32; batch * steps];
        for chunk in starts.chunks(batch) {
            x.fill(0);
            y.fill(0);
            gather_windows(ids, chunk, steps, &mut x, &mut y);
            self.exec.set_ids(self.model.input, &x)?;
            self.exec.forward(params, 0..logits.index() + 1)?;
            self.score(batch * steps, chunk.len() * steps, &y, &mut acc)?;
        }
        Ok(Evaluation {
            loss: (acc.0 / acc.2.max(1) as f64) as f32,
            accuracy: acc.1 as f32 / acc.2.max(1) as f32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{check_classifier_epoch, check_text_epoch};
    use crate::nn::{char_gru, mlp, window_count, DataLoader};

    #[test]
    fn a_text_epoch_fits_a_loader_of_the_models_batch_times_the_replicas() {
        let (steps, ids) = (12, 1_000);
        let windows = window_count(ids, steps);
        let model = char_gru(4, steps, 9, 8, 16).unwrap();
        let fits = |replicas, batch| {
            check_text_epoch("test", &model, &DataLoader::new(windows, batch, 1), replicas, ids, steps)
        };
        assert!(fits(1, 4).is_ok());
        assert!(fits(2, 8).is_ok());
        assert!(fits(3, 12).is_ok());
        let alone = fits(1, 8).unwrap_err().to_string();
        assert!(alone.contains("batches of 8") && !alone.contains("replicas"), "{alone}");
        let shared = fits(2, 4).unwrap_err().to_string();
        assert!(shared.contains("on each of 2 replicas"), "{shared}");
        // Every window of the text, not fewer.
        let loader = DataLoader::new(windows - 1, 4, 1);
        assert!(check_text_epoch("test", &model, &loader, 1, ids, steps).is_err());
    }

    #[test]
    fn an_epoch_without_one_full_batch_is_an_error() {
        // A text of fewer windows than one batch.
        let (steps, ids) = (12, 40);
        let windows = window_count(ids, steps);
        let model = char_gru(64, steps, 9, 8, 16).unwrap();
        let loader = DataLoader::new(windows, 64, 1);
        let error = check_text_epoch("test", &model, &loader, 1, ids, steps).unwrap_err().to_string();
        assert!(error.contains("no batch of 64") && error.contains("train nothing"), "{error}");
        // A data set of fewer examples than one batch; one batch exactly is fine.
        let model = mlp(64, &[4, 5, 3]).unwrap();
        let error = check_classifier_epoch("test", &model, &DataLoader::new(63, 64, 1), 64, (63, 4))
            .unwrap_err()
            .to_string();
        assert!(error.contains("63 examples make no batch of 64"), "{error}");
        assert_eq!(
            check_classifier_epoch("test", &model, &DataLoader::new(64, 64, 1), 64, (64, 4)).unwrap(),
            3
        );
    }
}
