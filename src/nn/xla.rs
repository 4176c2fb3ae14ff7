//! `XlaExecutor` and `XlaTrainer` (feature `xla`): the same [`Graph`] the CPU and GPU
//! executors run, compiled by an XLA device (a PJRT plugin) into one StableHLO program per
//! forward range, backward range and training step.
//!
//! # How it runs
//! 1. The graph's ops are lowered once per distinct call (`lower.rs`); the compiled
//!    programs are cached, so a training loop compiles its step once and then only runs it.
//! 2. Values and gradients live on the host between calls (as in [`CpuExecutor`]): a call
//!    uploads what its program reads and downloads what it computes. XLA fuses each
//!    program's ops; the transfers are what a step costs beyond that.
//! 3. The bookkeeping (which values must be set, which gradients a backward resets, the
//!    errors) is `executor::rules`, shared with the other executors.
//!
//! Every op of the graph has a lowering, so every model of the zoo runs here. Dropout masks
//! are drawn on the host from the executor's seed exactly as the CPU executor draws them,
//! and passed to the program, so both executors drop the same elements.
//!
//! [`CpuExecutor`]: crate::nn::CpuExecutor
use std::collections::HashMap;
use std::ops::Range;

use crate::devices::{XlaBuffer, XlaDevice, XlaExecutable};
use crate::nn::data::fill_windows;
use crate::nn::executor::rules;
use crate::nn::optim::adam_constants;
use crate::nn::train::{check_classifier_epoch, check_text_epoch, EpochTally};
use crate::nn::{
    DType, Dataset, EpochStats, Executor, Graph, Model, NnError, NodeId, Op, OptimizerConfig, Params, Rng,
    TrainState,
};

mod hlo;
mod lower;

use lower::{Arg, Out, Program, Update};

/// Which program a call runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// A forward range, in training or not.
    Forward(Range<usize>, bool),
    /// A backward range, its seed nodes, and whether its forward pass was in training.
    Backward(Range<usize>, Vec<usize>, bool),
    /// Forward through the loss, backward from it and the optimizer's update (parameters on
    /// the device), the extra node values kept; in training or not.
    Step(usize, Vec<usize>, bool, Update),
}

/// A compiled program and what its parameters and results are.
#[derive(Debug)]
struct Compiled {
    exe: XlaExecutable,
    args: Vec<Arg>,
    outputs: Vec<Out>,
}

/// Runs a graph's nodes forward and backward on an XLA device.
#[derive(Debug)]
pub struct XlaExecutor {
    device: XlaDevice,
    graph: Graph,
    requires_grad: Vec<bool>,
    vals: Vec<Vec<f32>>,
    ids: Vec<Vec<i32>>,
    grads: Vec<Vec<f32>>,
    filled: Vec<bool>,
    /// Dropout masks, one per dropout node (empty for the others).
    masks: Vec<Vec<f32>>,
    rng: Rng,
    training: bool,
    /// Whether the last forward pass ran in training (its masks are the ones backward uses).
    forward_trained: bool,
    programs: HashMap<Key, Compiled>,
}

impl XlaExecutor {
    /// An executor for `graph` on `device` (every op of the graph has a lowering).
    pub fn new(device: XlaDevice, graph: &Graph) -> Self {
        let nodes = graph.nodes();
        let f32_len = |n: &crate::nn::Node| {
            if n.dtype == DType::F32 && !matches!(n.op, Op::Param { .. }) {
                n.len()
            } else {
                0
            }
        };
        let requires_grad = rules::requires_grad(graph);
        XlaExecutor {
            device,
            vals: nodes.iter().map(|n| vec![0.0; f32_len(n)]).collect(),
            ids: nodes.iter().map(|n| vec![0; if n.dtype == DType::I32 { n.len() } else { 0 }]).collect(),
            grads: nodes
                .iter()
                .zip(&requires_grad)
                .map(|(n, &r)| vec![0.0; if r { n.len() } else { 0 }])
                .collect(),
            filled: nodes.iter().map(|n| matches!(n.op, Op::Param { .. })).collect(),
            masks: nodes.iter().map(|n| vec![0.0; if lower::drops(n, true) { n.len() } else { 0 }]).collect(),
            rng: Rng::seed(0),
            requires_grad,
            graph: graph.clone(),
            training: false,
            forward_trained: false,
            programs: HashMap::new(),
        }
    }

    /// The device programs run on.
    pub fn device(&self) -> &XlaDevice {
        &self.device
    }

    /// How many distinct programs have been compiled (one per forward range, backward
    /// range with its seeds, and training step).
    pub fn compiled_programs(&self) -> usize {
        self.programs.len()
    }

    /// Errors if the forward pass over `range` reads ids outside the range their op
    /// accepts.
    fn check_forward(&self, range: &Range<usize>) -> Result<(), NnError> {
        let nodes = self.graph.nodes();
        for n in range.clone() {
            let node = &nodes[n];
            let checks = match node.op {
                Op::SoftmaxCrossEntropy => {
                    vec![("softmax_cross_entropy", node.inputs[1], nodes[node.inputs[0].index()].shape[1])]
                }
                Op::Embedding => vec![("embedding", node.inputs[0], nodes[node.inputs[1].index()].shape[0])],
                Op::SparseMatMul => vec![
                    ("sparse_matmul rows", node.inputs[0], node.shape[0]),
                    ("sparse_matmul cols", node.inputs[1], nodes[node.inputs[3].index()].shape[0]),
                ],
                _ => continue,
            };
            for (op, ids_input, limit) in checks {
                if !self.filled[ids_input.index()] {
                    continue; // (reported as a missing value by the walk)
                }
                let bad = self.ids[ids_input.index()]
                    .iter()
                    .enumerate()
                    .find(|(_, &v)| v < 0 || v as usize >= limit);
                if let Some((position, &id)) = bad {
                    return Err(NnError::IdOutOfRange { op, id, position, limit });
                }
            }
        }
        Ok(())
    }

    /// Compiles the program for `key` unless it is cached.
    fn compile(&mut self, key: &Key) -> Result<(), NnError> {
        if self.programs.contains_key(key) {
            return Ok(());
        }
        let program: Program = match key {
            Key::Forward(range, training) => lower::forward(&self.graph, range.clone(), *training),
            Key::Backward(range, seeds, trained) => {
                lower::backward(&self.graph, &self.requires_grad, range.clone(), seeds, *trained)
            }
            Key::Step(loss, keep, training, update) => {
                lower::train_step(&self.graph, &self.requires_grad, (*loss, keep), *training, *update)
            }
        };
        let exe = self.device.compile(&program.text)?;
        self.programs.insert(key.clone(), Compiled { exe, args: program.args, outputs: program.outputs });
        Ok(())
    }

    /// Runs the program for `key` on the current values, `params` and `seeds`, and stores
    /// its results.
    fn run(&mut self, key: &Key, params: &Params, seeds: &[(NodeId, &[f32])]) -> Result<(), NnError> {
        self.run_with(key, Some(params), seeds, None, &[])
    }

    /// Runs the program for `key`. Parameters come from `resident` (device-resident
    /// training) or else from `params`; node values, ids and masks from the host; seeds and
    /// optimizer constants as given. Values and gradients are downloaded; updated parameters
    /// and moments stay on the device, in `resident`.
    fn run_with(
        &mut self,
        key: &Key,
        params: Option<&Params>,
        seeds: &[(NodeId, &[f32])],
        mut resident: Option<&mut Resident>,
        scalars: &[f32],
    ) -> Result<(), NnError> {
        self.compile(key)?;
        let compiled = &self.programs[key];
        let nodes = self.graph.nodes();
        let mut uploaded: Vec<Option<XlaBuffer>> = Vec::with_capacity(compiled.args.len());
        for arg in &compiled.args {
            let upload = |data: &[f32], shape: &[usize]| self.device.upload(data, shape).map(Some);
            let buffer = match (*arg, &resident, params) {
                (Arg::Param(_) | Arg::Moment1(_) | Arg::Moment2(_), Some(_), _) => None,
                (Arg::Param(i), None, Some(params)) => {
                    upload(&params.tensors[i].data, &self.graph.params()[i].shape)?
                }
                (Arg::Value(n), ..) => upload(&self.vals[n], &nodes[n].shape)?,
                (Arg::Ids(n), ..) => Some(self.device.upload(&self.ids[n], &nodes[n].shape)?),
                (Arg::Mask(n), ..) => upload(&self.masks[n], &nodes[n].shape)?,
                (Arg::Seed(k), ..) => {
                    let (node, data) = seeds[k];
                    upload(data, &nodes[node.index()].shape)?
                }
                (Arg::Scalars, ..) => upload(scalars, &[scalars.len()])?,
                (arg, ..) => {
                    return Err(NnError::Argument {
                        op: "XlaExecutor::run",
                        what: format!("the program reads {arg:?}, which this call does not supply"),
                    })
                }
            };
            uploaded.push(buffer);
        }
        let mut refs: Vec<&XlaBuffer> = Vec::with_capacity(uploaded.len());
        for (arg, buffer) in compiled.args.iter().zip(&uploaded) {
            let buffer = match (buffer, arg, resident.as_deref()) {
                (Some(b), ..) => b,
                (None, Arg::Param(i), Some(r)) => &r.params[*i],
                (None, Arg::Moment1(i), Some(r)) => &r.m[*i],
                (None, Arg::Moment2(i), Some(r)) => &r.v[*i],
                _ => unreachable!("every argument was uploaded or is resident"),
            };
            refs.push(buffer);
        }
        let results = compiled.exe.run(&refs)?;
        drop(refs);
        for (out, buffer) in compiled.outputs.iter().zip(results) {
            match (*out, resident.as_deref_mut()) {
                (Out::Value(n), _) => {
                    buffer.download_into(&mut self.vals[n])?;
                    self.filled[n] = true;
                }
                (Out::Grad(n), _) => buffer.download_into(&mut self.grads[n])?,
                (Out::Param(i), Some(r)) => r.params[i] = buffer,
                (Out::Moment1(i), Some(r)) => r.m[i] = buffer,
                (Out::Moment2(i), Some(r)) => r.v[i] = buffer,
                (out, None) => {
                    return Err(NnError::Argument {
                        op: "XlaExecutor::run",
                        what: format!("the program writes {out:?}, which only a trainer's step keeps"),
                    })
                }
            }
        }
        Ok(())
    }

    /// An f32 input's host buffer, to fill in place (marks it set).
    fn value_mut(&mut self, node: NodeId) -> Result<&mut [f32], NnError> {
        rules::check_settable(&self.graph, node, DType::F32)?;
        self.filled[node.index()] = true;
        Ok(&mut self.vals[node.index()])
    }

    /// An i32 input's host buffer, to fill in place (marks it set).
    fn ids_mut(&mut self, node: NodeId) -> Result<&mut [i32], NnError> {
        rules::check_settable(&self.graph, node, DType::I32)?;
        self.filled[node.index()] = true;
        Ok(&mut self.ids[node.index()])
    }

    /// Checks that a training step through `loss` can run, and draws its dropout masks.
    fn prepare_step(&mut self, loss: NodeId) -> Result<(), NnError> {
        let range = 0..loss.index() + 1;
        rules::check_in_graph(&self.graph, &range)?;
        self.check_walk(&range)?;
        self.check_forward(&range)?;
        self.draw_masks(&range);
        Ok(())
    }

    /// Draws the dropout masks of the range's nodes, in node order, as the CPU executor
    /// does in its forward pass; records whether this forward pass is in training.
    fn draw_masks(&mut self, range: &Range<usize>) {
        self.forward_trained = self.training;
        for n in range.clone() {
            if let Op::Dropout { p } = self.graph.nodes()[n].op {
                if !lower::drops(&self.graph.nodes()[n], self.training) {
                    continue;
                }
                let keep = 1.0 / (1.0 - p);
                for m in &mut self.masks[n] {
                    *m = if self.rng.uniform() < p { 0.0 } else { keep };
                }
            }
        }
    }

    /// Errors as a forward walk over `range` would: an input that was not set, or a node
    /// that reads a value neither computed nor set.
    fn check_walk(&self, range: &Range<usize>) -> Result<(), NnError> {
        let mut filled = self.filled.clone();
        for n in range.clone() {
            if rules::forward_computes(&self.graph, &filled, n)? {
                filled[n] = true;
            }
        }
        Ok(())
    }
}

impl Executor for XlaExecutor {
    fn graph(&self) -> &Graph {
        &self.graph
    }

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn set_seed(&mut self, seed: u64) {
        self.rng = Rng::seed(seed);
    }

    fn set_value(&mut self, node: NodeId, data: &[f32]) -> Result<(), NnError> {
        rules::check_len(&self.graph, node, data.len())?;
        self.value_mut(node)?.copy_from_slice(data);
        Ok(())
    }

    fn set_ids(&mut self, node: NodeId, data: &[i32]) -> Result<(), NnError> {
        rules::check_len(&self.graph, node, data.len())?;
        self.ids_mut(node)?.copy_from_slice(data);
        Ok(())
    }

    fn forward(&mut self, params: &Params, range: Range<usize>) -> Result<(), NnError> {
        rules::check_in_graph(&self.graph, &range)?;
        params.check(&self.graph)?;
        self.check_walk(&range)?;
        self.check_forward(&range)?;
        self.draw_masks(&range);
        if range.clone().any(|n| !matches!(self.graph.nodes()[n].op, Op::Input | Op::Param { .. })) {
            self.run(&Key::Forward(range, self.training), params, &[])?;
        }
        Ok(())
    }

    fn backward(
        &mut self,
        params: &Params,
        range: Range<usize>,
        seeds: &[(NodeId, &[f32])],
    ) -> Result<(), NnError> {
        rules::check_in_graph(&self.graph, &range)?;
        params.check(&self.graph)?;
        for &(node, seed) in seeds {
            rules::check_len(&self.graph, node, seed.len())?;
        }
        for n in range.clone() {
            rules::backward_runs(&self.graph, &self.requires_grad, &self.filled, n)?;
        }
        let key = Key::Backward(range, seeds.iter().map(|(n, _)| n.index()).collect(), self.forward_trained);
        self.run(&key, params, seeds)
    }

    fn value(&self, node: NodeId) -> Result<&[f32], NnError> {
        rules::check_readable(&self.graph, &self.filled, node)?;
        Ok(&self.vals[node.index()])
    }

    fn grad(&self, node: NodeId) -> Result<&[f32], NnError> {
        self.graph.node(node)?;
        if !self.requires_grad[node.index()] {
            return Err(rules::missing(&self.graph, node));
        }
        Ok(&self.grads[node.index()])
    }

    fn param_grad(&self, index: usize) -> &[f32] {
        match self.graph.params().get(index) {
            Some(spec) => &self.grads[spec.node.index()],
            None => &[],
        }
    }
}

/// Parameters and optimizer moments kept on the device between training steps.
#[derive(Debug)]
struct Resident {
    params: Vec<XlaBuffer>,
    m: Vec<XlaBuffer>,
    /// Empty for SGD.
    v: Vec<XlaBuffer>,
}

/// Trains a model on an XLA device with the parameters and optimizer moments kept on the
/// device: each step is one compiled program (forward, backward and the optimizer's
/// update), whose only transfers are the batch in and the loss and logits out.
///
/// The [`TrainState`] stays the record of the run, as with
/// `GpuTrainer` (feature `cuda`): the trainer draws batches from its loader and
/// dropout seeds from its RNG exactly as [`Trainer`](crate::nn::Trainer) does, counts its
/// steps, and [`XlaTrainer::sync_state`] (run at the end of every epoch) copies the
/// parameters and moments back into it, so checkpoints and CPU evaluation work unchanged.
#[derive(Debug)]
pub struct XlaTrainer {
    model: Model,
    exec: XlaExecutor,
    resident: Resident,
    update: Update,
}

impl XlaTrainer {
    /// A trainer for `model` on `device`, starting from `state` (parameters and moments are
    /// copied to the device), with its training step compiled now (so that a program the
    /// device rejects fails here, and epochs time only training).
    ///
    /// # Errors
    /// [`NnError::ParamMismatch`] if `state` does not fit the model; [`NnError::Argument`]
    /// if the optimizer's moments do not fit the parameters; [`NnError::UnknownNode`] if the
    /// model's loss is not in its graph; [`NnError::Xla`] if the step does not compile or
    /// the upload fails.
    pub fn new(device: XlaDevice, model: Model, state: &TrainState) -> Result<Self, NnError> {
        let mut exec = XlaExecutor::new(device, &model.graph);
        rules::check_in_graph(&model.graph, &(0..model.loss.index() + 1))?;
        state.params.check(&model.graph)?;
        state.optimizer.check_fits(&state.params, "XlaTrainer::new")?;
        let update = match state.optimizer.config {
            OptimizerConfig::Sgd { .. } => Update::Sgd,
            _ => Update::Adam,
        };
        let shapes: Vec<&[usize]> = model.graph.params().iter().map(|p| p.shape.as_slice()).collect();
        let upload_all = |values: &mut dyn Iterator<Item = &[f32]>| -> Result<Vec<XlaBuffer>, NnError> {
            values.zip(&shapes).map(|(v, shape)| Ok(exec.device.upload(v, shape)?)).collect()
        };
        let (m, v) = state.optimizer.moments();
        let resident = Resident {
            params: upload_all(&mut state.params.tensors.iter().map(|t| t.data.as_slice()))?,
            m: upload_all(&mut m.iter().map(Vec::as_slice))?,
            v: upload_all(&mut v.iter().map(Vec::as_slice))?,
        };
        exec.compile(&Self::step_key(&model, update))?;
        Ok(XlaTrainer { model, exec, resident, update })
    }

    fn step_key(model: &Model, update: Update) -> Key {
        Key::Step(model.loss.index(), vec![model.logits.index()], true, update)
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The executor (to set inputs or read values).
    pub fn executor(&mut self) -> &mut XlaExecutor {
        &mut self.exec
    }

    /// One optimizer step on the batch currently set in the executor; returns the loss. The
    /// parameters are updated on the device: [`XlaTrainer::sync_state`] copies them into
    /// `state`.
    ///
    /// # Errors
    /// As [`Executor::forward`]; [`NnError::Xla`].
    pub fn step(&mut self, state: &mut TrainState) -> Result<f32, NnError> {
        let optimizer = &mut state.optimizer;
        optimizer.config.check("XlaTrainer::step")?;
        let scalars: Vec<f32> = match (&optimizer.config, self.update) {
            (&OptimizerConfig::Sgd { lr, momentum, weight_decay }, Update::Sgd) => {
                vec![lr, momentum, weight_decay]
            }
            (
                &OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay }
                | &OptimizerConfig::AdamW { lr, beta1, beta2, eps, weight_decay },
                Update::Adam,
            ) => {
                let decoupled = matches!(optimizer.config, OptimizerConfig::AdamW { .. });
                let (l2, decay, c1, c2) =
                    adam_constants(lr, beta1, beta2, weight_decay, decoupled, optimizer.steps + 1);
                vec![lr, beta1, beta2, eps, l2, decay, c1, c2]
            }
            _ => {
                return Err(NnError::Argument {
                    op: "XlaTrainer::step",
                    what: "the state's optimizer is not the kind this trainer was made with".into(),
                })
            }
        };
        let loss = self.model.loss;
        self.exec.set_training(true);
        self.exec.set_seed(state.rng.next_u64());
        self.exec.prepare_step(loss)?;
        let key = Self::step_key(&self.model, self.update);
        self.exec.run_with(&key, None, &[], Some(&mut self.resident), &scalars)?;
        state.optimizer.steps += 1;
        state.step += 1;
        self.exec.scalar(loss)
    }

    /// Copies the device parameters and optimizer moments into `state`.
    ///
    /// # Errors
    /// [`NnError::ParamMismatch`] or [`NnError::Argument`] if `state` does not fit the
    /// model; [`NnError::Xla`].
    pub fn sync_state(&self, state: &mut TrainState) -> Result<(), NnError> {
        state.params.check(&self.model.graph)?;
        state.optimizer.check_fits(&state.params, "XlaTrainer::sync_state")?;
        for (t, buffer) in state.params.tensors.iter_mut().zip(&self.resident.params) {
            buffer.download_into(&mut t.data)?;
        }
        let (m, v) = state.optimizer.moments_mut();
        for (slot, buffer) in m.iter_mut().zip(&self.resident.m).chain(v.iter_mut().zip(&self.resident.v)) {
            buffer.download_into(slot)?;
        }
        Ok(())
    }

    /// One epoch of a classifier over `data` (full batches from the state's loader); the
    /// state holds the epoch's parameters at its end.
    ///
    /// # Errors
    /// As [`Trainer::train_epoch`](crate::nn::Trainer::train_epoch).
    pub fn train_epoch(&mut self, state: &mut TrainState, data: &Dataset) -> Result<EpochStats, NnError> {
        let (input, target, logits) = (self.model.input, self.model.target, self.model.logits);
        let batch = self.model.graph.shape(input)?.first().copied().unwrap_or(0);
        let classes = check_classifier_epoch(
            "XlaTrainer::train_epoch",
            &self.model,
            &state.loader,
            batch,
            (data.len(), data.dim),
        )?;
        let mut tally = EpochTally::start();
        while let Some(rows) = state.loader.next_batch() {
            data.gather_features(rows, self.exec.value_mut(input)?);
            data.gather_labels(rows, self.exec.ids_mut(target)?);
            let count = rows.len();
            let loss = self.step(state)?;
            tally.batch(loss, count);
            let labels = self.exec.ids[target.index()].iter().copied();
            tally.classified(self.exec.value(logits)?, classes, labels);
        }
        state.epoch += 1;
        self.sync_state(state)?;
        Ok(tally.finish())
    }

    /// One epoch of a language model over windows of `ids`, as
    /// [`Trainer::train_epoch_text`](crate::nn::Trainer::train_epoch_text) does it; the
    /// state holds the epoch's parameters at its end.
    ///
    /// # Errors
    /// As [`Trainer::train_epoch_text`](crate::nn::Trainer::train_epoch_text).
    pub fn train_epoch_text(
        &mut self,
        state: &mut TrainState,
        ids: &[i32],
        steps: usize,
    ) -> Result<EpochStats, NnError> {
        let (input, target) = (self.model.input, self.model.target);
        check_text_epoch("XlaTrainer::train_epoch_text", &self.model, &state.loader, 1, ids.len(), steps)?;
        let mut tally = EpochTally::start();
        while let Some(starts) = state.loader.next_batch() {
            fill_windows(ids, starts, steps, 0, self.exec.ids_mut(input)?);
            fill_windows(ids, starts, steps, 1, self.exec.ids_mut(target)?);
            let count = starts.len();
            let loss = self.step(state)?;
            tally.batch(loss, count * steps);
        }
        state.epoch += 1;
        self.sync_state(state)?;
        Ok(tally.finish())
    }
}
