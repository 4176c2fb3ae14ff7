//! `GpuTrainer`: training steps and epochs with everything on the device — parameters,
//! optimizer moments, the data set and the batch gathering — so a step queues work
//! without waiting for the GPU; the host reads the loss and accuracy once per epoch.
//!
//! Data parallelism: [`GpuTrainer::replica`] makes the trainer one replica of a group, one
//! GPU each; every step averages the gradients over the group (see `replicas.rs`) and every
//! epoch trains on this replica's shard of each global batch, as
//! [`DataParallel`](crate::nn::DataParallel) does on CPUs.
//!
//! The [`TrainState`] stays the record of the run: the trainer draws batches from its
//! loader and dropout seeds from its RNG exactly as [`Trainer`](crate::nn::Trainer) does,
//! counts its steps, and [`GpuTrainer::sync_state`] (run at the end of every epoch) copies
//! the parameters and optimizer moments back into it, so checkpoints and CPU evaluation
//! work unchanged.
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaSlice;

use super::replicas::GradientSync;
use super::GpuExecutor;
use crate::devices::{launch, segment, Gpu, GpuCommunicator};
use crate::nn::data::fill_windows;
use crate::nn::optim::adam_constants;
use crate::nn::train::{check_classifier_epoch, check_text_epoch};
use crate::nn::{CommStats, Dataset, EpochStats, Executor, Model, NnError, OptimizerConfig, TrainState};

/// A classification data set copied to the device once.
#[derive(Debug)]
pub struct GpuDataset {
    features: CudaSlice<f32>,
    labels: CudaSlice<i32>,
    len: usize,
    dim: usize,
}

impl Drop for GpuDataset {
    fn drop(&mut self) {
        // The arrays (fields) are freed after this, on this device.
        crate::devices::make_current(self.features.context());
    }
}

impl GpuDataset {
    /// Copies `data` to `gpu`, checking that every label is below `classes`.
    ///
    /// # Errors
    /// [`NnError::IdOutOfRange`] for a bad label; [`NnError::Device`].
    pub fn upload(gpu: &Gpu, data: &Dataset, classes: usize) -> Result<Self, NnError> {
        if let Some((position, &id)) =
            data.labels.iter().enumerate().find(|(_, &v)| v < 0 || v as usize >= classes)
        {
            return Err(NnError::IdOutOfRange { op: "GpuDataset::upload", id, position, limit: classes });
        }
        let labels = gpu.stream_ref().clone_htod(&data.labels).map_err(|e| gpu.driver(e))?;
        Ok(GpuDataset { features: gpu.upload(&data.features)?, labels, len: data.len(), dim: data.dim })
    }

    /// Examples.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Trains one model on one GPU with parameters and optimizer state kept on the device;
/// alone ([`GpuTrainer::new`]) or as one replica of a data-parallel group
/// ([`GpuTrainer::replica`]).
#[derive(Debug)]
pub struct GpuTrainer {
    model: Model,
    exec: GpuExecutor,
    /// First moments (momentum for SGD), by parameter.
    m: Vec<CudaSlice<f32>>,
    /// Second moments (Adam, AdamW), by parameter; empty for SGD.
    v: Vec<CudaSlice<f32>>,
    /// The data-parallel group, for a replica.
    replicas: Option<GradientSync>,
    /// Set when a replica's step failed in a collective: the group is out of step.
    failed: bool,
}

impl Drop for GpuTrainer {
    fn drop(&mut self) {
        // The optimizer moments and the executor's buffers (fields) are freed after this,
        // on this device, after what a replica's group stream still has to do with them.
        self.exec.gpu().make_current();
        if let Some(replicas) = &self.replicas {
            replicas.settle(self.exec.gpu());
        }
    }
}

impl GpuTrainer {
    /// A trainer for `model` on `gpu`, starting from `state` (parameters and optimizer
    /// moments are copied to the device).
    ///
    /// # Errors
    /// As [`GpuExecutor::new`]; [`NnError::ParamMismatch`] if `state` does not fit the model;
    /// [`NnError::Argument`] if the optimizer's moments do not have one slot of each
    /// parameter's size (second moments too for Adam and AdamW).
    pub fn new(gpu: Arc<Gpu>, model: Model, state: &TrainState) -> Result<Self, NnError> {
        let mut exec = GpuExecutor::new(gpu.clone(), &model.graph)?;
        exec.load_params(&state.params)?;
        state.optimizer.check_fits(&state.params, "GpuTrainer::new")?;
        let (m, v) = state.optimizer.moments();
        // A zero-element parameter's moments get one unused element (a zero-byte
        // allocation is an error); `sync_state` copies back only the parameter's length.
        let upload = |host: &[Vec<f32>]| {
            host.iter()
                .map(|x| if x.is_empty() { gpu.zeros(1) } else { gpu.upload(x) })
                .collect::<Result<Vec<_>, _>>()
        };
        let (m, v) = (upload(m)?, upload(v)?);
        Ok(GpuTrainer { model, exec, m, v, replicas: None, failed: false })
    }

    /// One replica of a data-parallel group, on `group`'s GPU: `model` is built for this
    /// replica's share of the global batch. Every replica first takes rank 0's parameters
    /// and optimizer moments (a broadcast, into `state` too), so all start equal; each step
    /// then averages the gradients over the group in buckets of about `bucket_mib` MiB
    /// before the update, so they stay equal. With NCCL each bucket is reduced on NCCL's
    /// stream as soon as backward has finished its gradients, overlapping the rest of
    /// backward; a host-staged group reduces the buckets after backward. Every replica must call the same steps and
    /// epochs, with equal loaders (the same seed, batch and data set size).
    ///
    /// `group` is an [`NcclGroup`](crate::devices::NcclGroup) (gradients stay on the
    /// device) or a [`HostStagedGroup`](crate::devices::HostStagedGroup) over any host
    /// group (for GPUs without NCCL, or several replicas on one GPU). Either way a
    /// collective that the other replicas cannot complete (one died or stalled) fails within
    /// the group's timeout; an NCCL group is then aborted by its watchdog, and the step,
    /// or the first wait for the GPU after it, returns the error.
    ///
    /// # Errors
    /// As [`GpuTrainer::new`]; [`NnError::Argument`] if `bucket_mib` is not a positive
    /// number; [`NnError::Collective`] if the broadcast fails.
    pub fn replica(
        group: Box<dyn GpuCommunicator>,
        model: Model,
        state: &mut TrainState,
        bucket_mib: f64,
    ) -> Result<Self, NnError> {
        state.params.check(&model.graph)?;
        state.optimizer.check_fits(&state.params, "GpuTrainer::replica")?;
        let mut sync = GradientSync::new(group, &model.graph, bucket_mib)?;
        broadcast_state(sync.group(), state)?;
        let gpu = sync.group().gpu().clone();
        let mut trainer = GpuTrainer::new(gpu, model, state)?;
        trainer.replicas = Some(sync);
        Ok(trainer)
    }

    /// This trainer's rank in its data-parallel group (0 when it trains alone).
    pub fn rank(&self) -> usize {
        self.replicas.as_ref().map_or(0, |r| r.rank_and_size().0)
    }

    /// How many replicas train together (1 when it trains alone).
    pub fn size(&self) -> usize {
        self.replicas.as_ref().map_or(1, |r| r.rank_and_size().1)
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The executor (to set a batch, or read values and gradients).
    pub fn executor(&mut self) -> &mut GpuExecutor {
        &mut self.exec
    }

    /// One optimizer step on the batch currently set in the executor; returns the loss
    /// (which waits for the step). The parameters in `state` are not updated until
    /// [`GpuTrainer::sync_state`]. A replica averages the gradients over its group first
    /// (every replica must step together) and returns its own shard's loss.
    ///
    /// # Errors
    /// As [`Executor::forward`] and [`Executor::backward`]; [`NnError::Device`]; for a
    /// replica, [`NnError::Collective`] if the group failed, after which every step is
    /// [`NnError::WorkerGone`] (the replicas are out of step).
    pub fn step(&mut self, state: &mut TrainState) -> Result<f32, NnError> {
        self.queue_step(state)?;
        let loss = self.exec.scalar(self.model.loss)?;
        self.check_group()?;
        self.read_step_times()?;
        Ok(loss)
    }

    /// The error of every call after a replica's step failed (its group is out of step).
    fn gone(&self) -> NnError {
        NnError::WorkerGone { worker: format!("GPU replica {} (a step failed earlier)", self.rank()) }
    }

    /// For a replica, after the host waited for the GPU: an error if the group failed in
    /// the background meanwhile (an NCCL group aborted by its watchdog, which ends the wait
    /// but leaves partial sums in the gradients), after which every step fails.
    fn check_group(&mut self) -> Result<(), NnError> {
        let failure = self.replicas.as_mut().and_then(|r| r.group().failure());
        match failure {
            Some(failure) => {
                self.failed = true;
                Err(failure.into())
            }
            None => Ok(()),
        }
    }

    /// For a replica: optimizer steps taken, and the GPU time of their forward and
    /// backward passes (`compute_seconds`), of their gradient reductions (`reduce_seconds`)
    /// and of the averaging that the update waited for after backward (`wait_seconds`: with
    /// NCCL, what did not overlap backward; with a host-staged group, all of the averaging),
    /// read from GPU events at the end of every step and epoch. Zero for a trainer alone.
    pub fn comm_stats(&self) -> CommStats {
        self.replicas.as_ref().map(GradientSync::stats).unwrap_or_default()
    }

    /// Reads the GPU times of the steps queued so far into [`GpuTrainer::comm_stats`]
    /// (waits for them: called after the host has waited for the GPU).
    fn read_step_times(&mut self) -> Result<(), NnError> {
        match &mut self.replicas {
            Some(replicas) => replicas.read_all_marks(self.exec.gpu()),
            None => Ok(()),
        }
    }

    /// Forward, backward, a replica's gradient averaging, and the optimizer update, queued
    /// on the device.
    fn queue_step(&mut self, state: &mut TrainState) -> Result<(), NnError> {
        if self.failed {
            return Err(self.gone());
        }
        let loss = self.model.loss;
        self.exec.set_training(true);
        // Different dropout masks on each replica's shard, reproducibly (rank 0, and a
        // trainer alone, use the state's seed as it is).
        let salt = (self.rank() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.exec.set_seed(state.rng.next_u64() ^ salt);
        let gpu = self.exec.gpu().clone();
        let start = self.replicas.as_mut().map(|r| r.mark(&gpu, gpu.stream_ref())).transpose()?;
        self.exec.forward_resident(0..loss.index() + 1)?;
        let (params, range, seeds) = (&state.params, 0..loss.index() + 1, &[(loss, &[1.0f32][..])]);
        match (&mut self.replicas, start) {
            (Some(replicas), Some(start)) => {
                let averaged = replicas.backward_and_average(&mut self.exec, params, range, seeds, start);
                // Whatever failed here, this replica may have left the group's collectives.
                self.failed = averaged.is_err();
                averaged?;
            }
            _ => self.exec.backward(params, range, seeds)?,
        }
        self.update(state)?;
        state.step += 1;
        Ok(())
    }

    /// The optimizer update on the device: the same rule and constants as
    /// [`Optimizer::step`](crate::nn::Optimizer::step).
    fn update(&mut self, state: &mut TrainState) -> Result<(), NnError> {
        let optimizer = &mut state.optimizer;
        optimizer.config.check("GpuTrainer::step")?;
        optimizer.steps += 1;
        let gpu = self.exec.gpu().clone();
        let gpu = &*gpu;
        for i in 0..self.m.len() {
            let (p, g) = self.exec.param_and_grad(i);
            let Some(g) = g else { continue };
            let n = crate::devices::len_u32(p.len(), "optimizer")?;
            match optimizer.config {
                OptimizerConfig::Sgd { lr, momentum, weight_decay } => {
                    launch!(gpu, "sgd_f32", n; p, &mut self.m[i], g, &n, &lr, &momentum, &weight_decay)?;
                }
                OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay }
                | OptimizerConfig::AdamW { lr, beta1, beta2, eps, weight_decay } => {
                    let decoupled = matches!(optimizer.config, OptimizerConfig::AdamW { .. });
                    let (l2, decay, c1, c2) =
                        adam_constants(lr, beta1, beta2, weight_decay, decoupled, optimizer.steps);
                    let v = self.v.get_mut(i).ok_or(NnError::Argument {
                        op: "GpuTrainer",
                        what: "Adam needs second moments; the optimizer state has none".into(),
                    })?;
                    launch!(gpu, "adam_f32", n; p, &mut self.m[i], v, g, &n, &lr, &beta1, &beta2, &eps, &l2, &decay, &c1, &c2)?;
                }
            }
        }
        Ok(())
    }

    /// Copies the device parameters and optimizer moments into `state`. A replica whose
    /// group failed leaves `state` as it was: the device then holds a step that did not
    /// average the gradients over the group.
    ///
    /// # Errors
    /// [`NnError::Device`]; [`NnError::ParamMismatch`] if `state` does not fit the model;
    /// for a replica, [`NnError::Collective`] or [`NnError::WorkerGone`] if its group failed.
    pub fn sync_state(&mut self, state: &mut TrainState) -> Result<(), NnError> {
        if self.failed {
            return Err(self.gone());
        }
        let mut params = state.params.clone();
        self.exec.download_params(&mut params)?;
        let gpu = self.exec.gpu();
        let (m, v) = state.optimizer.moments();
        let (mut m, mut v) = (m.to_vec(), v.to_vec());
        for (host, device) in m.iter_mut().zip(&self.m).chain(v.iter_mut().zip(&self.v)) {
            let len = host.len();
            gpu.stream_ref()
                .memcpy_dtoh(&device.slice(0..len), host.as_mut_slice())
                .map_err(|e| gpu.driver(e))?;
        }
        // The copies waited for the GPU: a group aborted meanwhile left partial sums.
        self.check_group()?;
        state.params = params;
        let (state_m, state_v) = state.optimizer.moments_mut();
        state_m.clone_from_slice(&m);
        state_v.clone_from_slice(&v);
        Ok(())
    }

    /// One epoch of a classifier over `data` (full batches from the state's loader, as
    /// [`Trainer::train_epoch`](crate::nn::Trainer::train_epoch)); batches are gathered on
    /// the device, and loss and accuracy are read once at the end. Ends with
    /// [`GpuTrainer::sync_state`].
    ///
    /// A replica ([`GpuTrainer::replica`]) trains on its shard of each global batch (the
    /// loader's batch is the group's size × the model's batch), and the returned loss,
    /// accuracy and sample count are over all replicas.
    ///
    /// # Errors
    /// As [`GpuTrainer::step`]; [`NnError::Shape`] if `data` rows do not fit the model's
    /// input; [`NnError::Argument`] if the state's loader does not draw batches of the
    /// model's size (× the replicas) from exactly `data`'s examples, or the model is not a
    /// classifier of `[batch, features…]` inputs, `[batch]` labels and `[batch, classes]`
    /// logits.
    pub fn train_epoch(&mut self, state: &mut TrainState, data: &GpuDataset) -> Result<EpochStats, NnError> {
        const OP: &str = "GpuTrainer::train_epoch";
        let start = Instant::now();
        let (input, target, logits) = (self.model.input, self.model.target, self.model.logits);
        let batch = self.model.graph.shape(input)?.first().copied().unwrap_or(0);
        let (rank, size) = (self.rank(), self.size());
        let global = global_batch(OP, state.loader.batch_size(), batch, size)?;
        // The device gathers rows by the loader's indices without bounds checks: they must
        // index `data`, in batches of the model's size (× the replicas).
        let classes = check_classifier_epoch(OP, &self.model, &state.loader, global, (data.len, data.dim))?;
        let u32_of = |n: usize| crate::devices::len_u32(n, "GpuTrainer::train_epoch");
        let (rows, dim, cols) = (u32_of(batch)?, u32_of(data.dim)?, u32_of(classes)?);
        let (xlen, ylen) = (u32_of(batch * data.dim)?, rows);
        u32_of(data.len)?; // the batch order below holds example indices as u32
        let mut order: Vec<u32> = Vec::new();
        let mut batches = 0usize;
        while let Some(idx) = state.loader.next_batch() {
            order.extend(idx[segment(global, size, rank)].iter().map(|&i| i as u32));
            batches += 1;
        }
        let gpu = self.exec.gpu().clone();
        let gpu = &*gpu;
        let driver = |e| gpu.driver(e);
        order.push(0); // never empty (a zero-byte allocation is an error); the last is unused
        let order = gpu.stream_ref().clone_htod(&order).map_err(driver)?;
        let mut loss_sum = gpu.zeros(1)?;
        let mut correct = gpu.stream_ref().alloc_zeros::<u32>(1).map_err(driver)?;
        for b in 0..batches {
            let idx = order.slice(b * batch..(b + 1) * batch);
            let x = self.exec.value_buffer_mut(input)?;
            launch!(gpu, "gather_rows_f32", xlen; &data.features, &idx, x, &rows, &dim)?;
            let y = self.exec.ids_buffer_mut(target)?;
            launch!(gpu, "gather_i32", ylen; &data.labels, &idx, y, &ylen)?;
            self.queue_step(state)?;
            gpu.axpy(1.0, self.exec.value_buffer(self.model.loss)?, &mut loss_sum)?;
            let (lv, labels) = (self.exec.value_buffer(logits)?, self.exec.ids_buffer(target)?);
            launch!(gpu, "count_correct_f32", rows; lv, labels, &rows, &cols, &mut correct)?;
        }
        let total = gpu.download(&loss_sum)?[0];
        let correct = gpu.stream_ref().clone_dtoh(&correct).map_err(driver)?[0];
        self.check_group()?;
        self.read_step_times()?;
        state.epoch += 1;
        self.sync_state(state)?;
        let [total, correct, samples] =
            self.sum_over_replicas([total, correct as f32, (batches * batch) as f32])?;
        let batches = (batches * size).max(1);
        Ok(EpochStats {
            loss: total / batches as f32,
            accuracy: correct / samples.max(1.0),
            samples: samples as usize,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Sums an epoch's statistics over the replicas (they are returned as they are when
    /// the trainer is alone).
    fn sum_over_replicas<const N: usize>(&mut self, mut values: [f32; N]) -> Result<[f32; N], NnError> {
        if let Some(replicas) = &mut self.replicas {
            replicas.group().all_reduce(&mut values)?;
        }
        Ok(values)
    }

    /// One epoch of a language model over windows of `ids`, as
    /// [`Trainer::train_epoch_text`](crate::nn::Trainer::train_epoch_text): each batch's
    /// windows are cut on the host and uploaded (ids are checked against the vocabulary),
    /// the losses are summed on the device and read once at the end. Ends with
    /// [`GpuTrainer::sync_state`].
    ///
    /// A replica trains on its shard of each global batch's windows, as
    /// [`GpuTrainer::train_epoch`] does; the returned loss and sample count are over all
    /// replicas.
    ///
    /// # Errors
    /// [`NnError::Argument`] unless the loader draws from every window of `ids` in batches
    /// whose windows fill the model's input and targets (× the replicas);
    /// [`NnError::IdOutOfRange`] for an id outside the vocabulary; as [`GpuTrainer::step`].
    pub fn train_epoch_text(
        &mut self,
        state: &mut TrainState,
        ids: &[i32],
        steps: usize,
    ) -> Result<EpochStats, NnError> {
        const OP: &str = "GpuTrainer::train_epoch_text";
        let start = Instant::now();
        let (rank, size) = (self.rank(), self.size());
        check_text_epoch(OP, &self.model, &state.loader, size, ids.len(), steps)?;
        let (input, target) = (self.model.input, self.model.target);
        let global = state.loader.batch_size();
        let rows = global / size * steps;
        let (mut x, mut y) = (vec![0i32; rows], vec![0i32; rows]);
        let gpu = self.exec.gpu().clone();
        let mut loss_sum = gpu.zeros(1)?;
        let mut batches = 0usize;
        while let Some(windows) = state.loader.next_batch() {
            let windows = &windows[segment(global, size, rank)];
            fill_windows(ids, windows, steps, 0, &mut x);
            fill_windows(ids, windows, steps, 1, &mut y);
            self.exec.set_ids(input, &x)?;
            self.exec.set_ids(target, &y)?;
            self.queue_step(state)?;
            gpu.axpy(1.0, self.exec.value_buffer(self.model.loss)?, &mut loss_sum)?;
            batches += 1;
        }
        let total = gpu.download(&loss_sum)?[0];
        self.check_group()?;
        self.read_step_times()?;
        state.epoch += 1;
        self.sync_state(state)?;
        let [total, samples] = self.sum_over_replicas([total, (batches * rows) as f32])?;
        Ok(EpochStats {
            loss: total / (batches * size).max(1) as f32,
            accuracy: 0.0,
            samples: samples as usize,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// The global batch of an epoch, `size` replicas × the model's batch; a replica's loader
/// must hand out batches of it (for a trainer alone, `check_classifier_epoch` says so).
///
/// # Errors
/// [`NnError::Argument`] naming `op` if a replica's loader does not.
fn global_batch(
    op: &'static str,
    loader_batch: usize,
    model_batch: usize,
    size: usize,
) -> Result<usize, NnError> {
    let global = model_batch * size;
    if size > 1 && loader_batch != global {
        return Err(NnError::Argument {
            op,
            what: format!(
                "the loader's batch {loader_batch} must be {size} replicas × the model's batch {model_batch}"
            ),
        });
    }
    Ok(global)
}

/// Makes `state`'s parameters and optimizer moments rank 0's, on every rank of `group`.
///
/// # Errors
/// [`NnError::Collective`].
fn broadcast_state(group: &mut dyn GpuCommunicator, state: &mut TrainState) -> Result<(), NnError> {
    let (m, v) = state.optimizer.moments();
    let tensors = state.params.tensors.iter().map(|t| t.data.as_slice());
    let mut flat: Vec<f32> = tensors.chain(m.iter().chain(v).map(Vec::as_slice)).flatten().copied().collect();
    group.broadcast(&mut flat, 0)?;
    let mut rest = flat.as_slice();
    let mut take = |into: &mut [f32]| {
        let (head, tail) = rest.split_at(into.len());
        into.copy_from_slice(head);
        rest = tail;
    };
    state.params.tensors.iter_mut().for_each(|t| take(&mut t.data));
    let (m, v) = state.optimizer.moments_mut();
    m.iter_mut().chain(v.iter_mut()).for_each(|x| take(x));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::global_batch;

    #[test]
    fn a_replicas_loader_hands_out_the_group_size_times_the_models_batch() {
        assert_eq!(global_batch("test", 64, 32, 2).unwrap(), 64);
        assert_eq!(global_batch("test", 96, 32, 3).unwrap(), 96);
        let error = global_batch("test", 32, 32, 2).unwrap_err().to_string();
        assert!(error.contains("must be 2 replicas × the model's batch 32"), "{error}");
        // Alone, the model's batch, whatever the loader says (the epoch's own check then
        // compares them).
        assert_eq!(global_batch("test", 16, 32, 1).unwrap(), 32);
    }
}
