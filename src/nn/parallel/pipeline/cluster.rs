//! [`ClusterPipeline`]: pipeline stages as actors on cluster node processes. Each stage
//! actor owns its node range of the graph, the parameters it reads and their optimizer
//! state; the driver on the head moves micro-batches' boundary values and gradients
//! between the stages and tells them when to step.
//!
//! # Schedule (GPipe)
//! 1. Every stage is told the step's seed; every micro-batch's forward call goes to stage
//!    0 at once (they queue in its mailbox).
//! 2. Each forward result goes on to the next stage as soon as it arrives, so stage `k`
//!    works on micro-batch `m` while stage `k - 1` works on `m + 1`.
//! 3. Right behind its last forward call, the last stage gets the backward calls of every
//!    micro-batch in reverse, then its step; each backward result goes on to the previous
//!    stage, which gets its step right behind its last backward call.
//! 4. A stage's calls run one at a time in arrival order (a hosted actor's mailbox), so a
//!    stage always sees forward, backward and step of one training step in that order,
//!    and the next training step only after the step of this one.
//!
//! # Failure
//! A stage's error, a call that fails (its node was lost: the head fails the call naming
//! the node) or no answer within the timeout ends the step with
//! [`NnError::StageOnNode`] naming the stage and its node; the pipeline then refuses
//! further steps.
use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::stage::{self, Forwarded, Grads, StagePlan, StageWork, Values};
use crate::nn::train::check_classifier_epoch;
use crate::nn::{Dataset, EpochStats, Graph, Model, NnError, Optimizer, Params, Tensor, TrainState};
use crate::{Actor, ActorHandle, Cluster, NodeId};

/// How long the driver waits for any answer before it gives up on a step.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// One pipeline stage hosted on a node: its part of the model and of the training state.
#[derive(Serialize, Deserialize)]
struct StageActor {
    /// The whole graph (taken into the executor on the first call).
    graph: Graph,
    plan: StagePlan,
    /// Every parameter slot; only those the stage reads hold values.
    params: Params,
    /// Optimizer state of the stage's parameters (the other slots empty).
    optimizer: Optimizer,
    #[serde(skip)]
    work: Option<StageWork>,
}

/// A call to a stage actor.
#[derive(Debug, Serialize, Deserialize)]
enum StageCall {
    /// Start of a training step.
    Begin {
        seed: u64,
    },
    Forward {
        mb: usize,
        values: Values,
    },
    Backward {
        mb: usize,
        grads: Grads,
    },
    /// Apply the averaged gradients with learning rate `lr`.
    Step {
        lr: f32,
    },
    GetState,
    SetState {
        params: Vec<(usize, Tensor)>,
        optimizer: Optimizer,
    },
}

/// A stage actor's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum StageReply {
    Done,
    /// The values the next stage needs.
    Forward(Values),
    /// The last stage's loss and logits.
    Loss {
        loss: f32,
        logits: Vec<f32>,
    },
    /// Gradients for the previous stage's outputs.
    Backward(Grads),
    State {
        params: Vec<(usize, Tensor)>,
        optimizer: Optimizer,
    },
}

impl Actor for StageActor {
    type Message = StageCall;
    type Reply = Result<StageReply, String>;

    fn handle(&mut self, call: StageCall) -> Self::Reply {
        self.handle_call(call).map_err(|error| error.to_string())
    }
}

crate::remote_actor!(StageActor);

impl StageActor {
    fn handle_call(&mut self, call: StageCall) -> Result<StageReply, NnError> {
        let (graph, plan) = (&mut self.graph, &self.plan);
        let work = self.work.get_or_insert_with(|| StageWork::new(&std::mem::take(graph), plan.clone()));
        Ok(match call {
            StageCall::Begin { seed } => {
                work.begin(seed);
                StageReply::Done
            }
            StageCall::Forward { mb, values } => match work.forward(&self.params, mb, values)? {
                Forwarded::Next(values) => StageReply::Forward(values),
                Forwarded::Loss(loss, logits) => StageReply::Loss { loss, logits },
            },
            StageCall::Backward { mb, grads } => {
                StageReply::Backward(work.backward(&self.params, mb, grads)?)
            }
            StageCall::Step { lr } => {
                let mut by_param: Vec<&[f32]> = vec![&[]; self.params.tensors.len()];
                for (p, g) in work.average_grads() {
                    by_param[*p] = g;
                }
                self.optimizer.set_lr(lr);
                self.optimizer.step(&mut self.params, |i| by_param[i]);
                StageReply::Done
            }
            StageCall::GetState => StageReply::State {
                params: self.plan.params.iter().map(|&p| (p, self.params.tensors[p].clone())).collect(),
                optimizer: self.optimizer.clone(),
            },
            StageCall::SetState { params, optimizer } => {
                let fits = optimizer.slots() == self.params.tensors.len()
                    && params.len() == self.plan.params.len()
                    && params.iter().zip(&self.plan.params).all(|((p, t), mine)| {
                        p == mine && t.shape == self.params.tensors[*p].shape && t.data.len() == t.len()
                    });
                if !fits {
                    return Err(NnError::Argument {
                        op: "ClusterPipeline::load_state",
                        what: format!("the state does not fit stage {}", self.plan.index),
                    });
                }
                for (p, tensor) in params {
                    self.params.tensors[p] = tensor;
                }
                self.optimizer = optimizer;
                StageReply::Done
            }
        })
    }
}

/// The driver's handle to one stage actor.
struct RemoteStage {
    handle: ActorHandle<StageActor>,
    /// The name of the node hosting it.
    node: String,
    /// The parameters it owns.
    params: Vec<usize>,
}

/// What a pending call was for.
#[derive(Debug, Clone, Copy)]
enum Tag {
    Begin,
    Forward(usize),
    Backward(usize),
    Step,
    State,
}

type Reply = crate::Ref<Result<StageReply, String>>;

/// A call sent to a stage whose answer has not been read yet.
struct Pending {
    stage: usize,
    tag: Tag,
    reply: Reply,
}

/// The calls of one training step in flight, and how far each stage is.
struct StepState {
    pending: Vec<Pending>,
    forwards: Vec<usize>,
    backwards: Vec<usize>,
    lr: f32,
}

/// A model split into pipeline stages hosted as actors on cluster nodes, trained
/// GPipe-style over micro-batches (see the module's schedule). Each stage owns its
/// parameters and their optimizer state; a step equals one step of single-worker training
/// on the whole batch (within float tolerance).
///
/// # State
/// The stages hold the parameters and optimizer moments: [`ClusterPipeline::step`] updates
/// only the state's step counters and RNG, and [`ClusterPipeline::fetch_state`] (called at
/// the end of [`ClusterPipeline::train_epoch`]) copies the stages' parameters and moments
/// back into the state, for evaluation and checkpoints. Changes to the state's learning
/// rate reach the stages with the next step.
///
/// The driver blocks its thread while it waits for the stages: do not call it from inside
/// an async runtime.
pub struct ClusterPipeline {
    model: Model,
    ranges: Vec<Range<usize>>,
    micro_batches: usize,
    stages: Vec<RemoteStage>,
    timeout: Duration,
    /// The first failure (stage and what happened), after which steps are refused.
    failed: Option<(usize, String)>,
}

impl std::fmt::Debug for ClusterPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterPipeline")
            .field("ranges", &self.ranges)
            .field("nodes", &self.stage_nodes())
            .field("micro_batches", &self.micro_batches)
            .field("failed", &self.failed)
            .finish()
    }
}

impl ClusterPipeline {
    /// Splits `model` (built for one micro-batch) at the node ids in `cuts` (strictly
    /// increasing; `cuts.len() + 1` stages), starts stage `s` as an actor on `nodes[s]`
    /// with its part of `state` (parameters and optimizer moments), and runs
    /// `micro_batches` micro-batches per step.
    ///
    /// # Errors
    /// [`NnError::Argument`] for bad cuts, zero micro-batches, a node count that is not the
    /// stage count, a parameter read by two stages, or a state that does not fit the model
    /// (a stage's state and boundary values may be of any size: large ones travel through
    /// the data plane);
    /// [`NnError::StageOnNode`] if a node is not in the cluster.
    pub fn new(
        cluster: &Cluster,
        model: Model,
        cuts: &[usize],
        nodes: &[NodeId],
        micro_batches: usize,
        state: &TrainState,
    ) -> Result<Self, NnError> {
        let op = "ClusterPipeline::new";
        let bad = |what: String| NnError::Argument { op, what };
        let plans = stage::plan_stages(&model, cuts, micro_batches, op)?;
        if nodes.len() != plans.len() {
            return Err(bad(format!(
                "{} stages need {} nodes, got {}",
                plans.len(),
                plans.len(),
                nodes.len()
            )));
        }
        state.params.check(&model.graph)?;
        let specs = model.graph.params();
        if state.optimizer.slots() != specs.len() {
            return Err(bad(format!(
                "the optimizer has {} slots for {} parameters",
                state.optimizer.slots(),
                specs.len()
            )));
        }
        let mut owner: Vec<Option<usize>> = vec![None; specs.len()];
        for plan in &plans {
            for &p in &plan.params {
                if let Some(other) = owner[p].replace(plan.index) {
                    return Err(bad(format!(
                        "parameter `{}` is read by stages {other} and {}: each parameter must belong to one stage",
                        specs[p].name, plan.index
                    )));
                }
            }
        }
        let known = cluster.nodes();
        let ranges = plans.iter().map(|p| p.range.clone()).collect();
        let mut stages = Vec::new();
        for (plan, &node) in plans.into_iter().zip(nodes) {
            let index = plan.index;
            let name = known.iter().find(|n| n.id == node).map(|n| n.name.clone());
            let Some(name) = name else {
                let what = "the node is not in the cluster".to_string();
                return Err(NnError::StageOnNode { stage: index, node: node.to_string(), what });
            };
            let owned = plan.params.clone();
            let actor = StageActor {
                graph: model.graph.clone(),
                params: part_of(&state.params, &owned),
                optimizer: state.optimizer.part(|p| owned.contains(&p)),
                plan,
                work: None,
            };
            let handle = cluster.actor_on(node, &actor).map_err(|e| NnError::StageOnNode {
                stage: index,
                node: name.clone(),
                what: e.to_string(),
            })?;
            stages.push(RemoteStage { handle, node: name, params: owned });
        }
        Ok(ClusterPipeline { model, ranges, micro_batches, stages, timeout: DEFAULT_TIMEOUT, failed: None })
    }

    /// Cuts `model` into one stage per node of about equal estimated work (as
    /// [`Pipeline::balanced`](crate::nn::Pipeline::balanced)), then as
    /// [`ClusterPipeline::new`].
    ///
    /// # Errors
    /// As [`ClusterPipeline::new`]; [`NnError::Argument`] if the graph has compute nodes
    /// for fewer stages than nodes.
    pub fn balanced(
        cluster: &Cluster,
        model: Model,
        nodes: &[NodeId],
        micro_batches: usize,
        state: &TrainState,
    ) -> Result<Self, NnError> {
        let cuts = stage::balanced(&model, nodes.len(), "ClusterPipeline::balanced")?;
        Self::new(cluster, model, &cuts, nodes, micro_batches, state)
    }

    /// Starts every stage again, on `nodes` (one per stage, as in [`ClusterPipeline::new`]),
    /// from `state`, keeping the cuts, the micro-batch count and the timeout: the way on
    /// after a stage failed or its node was lost. `state` is a checkpoint, say a clone of
    /// the state taken after the last good [`ClusterPipeline::train_epoch`] (or after
    /// [`ClusterPipeline::fetch_state`]): training goes on from it exactly as it would
    /// have from that point. The old stages are stopped where their nodes still run.
    ///
    /// # Errors
    /// As [`ClusterPipeline::new`]; on error the pipeline stays as it was.
    pub fn restart(
        &mut self,
        cluster: &Cluster,
        nodes: &[NodeId],
        state: &TrainState,
    ) -> Result<(), NnError> {
        let cuts: Vec<usize> = self.ranges[1..].iter().map(|range| range.start).collect();
        let mut fresh = Self::new(cluster, self.model.clone(), &cuts, nodes, self.micro_batches, state)?;
        fresh.timeout = self.timeout;
        *self = fresh;
        Ok(())
    }

    /// The model (built for one micro-batch).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Each stage's node range.
    pub fn stage_ranges(&self) -> Vec<Range<usize>> {
        self.ranges.clone()
    }

    /// The name of the node hosting each stage.
    pub fn stage_nodes(&self) -> Vec<String> {
        self.stages.iter().map(|s| s.node.clone()).collect()
    }

    /// Rows per step: micro-batches × the model's batch.
    pub fn batch_rows(&self) -> usize {
        self.micro_batches * super::micro_rows(&self.model)
    }

    /// How long a step waits for any stage's answer before it fails (default 300 s; a
    /// lost node fails its calls as soon as the head notices, long before that).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// One optimizer step on a batch of `micro_batches × model batch` rows of features `x`
    /// and labels `y`; returns the mean loss over the micro-batches. The stages update
    /// their parameters; `state` gives the seed and learning rate and counts the step.
    ///
    /// # Errors
    /// [`NnError::Length`] for inputs of the wrong size; [`NnError::StageOnNode`] if a
    /// stage failed or its node was lost (the pipeline then refuses further steps).
    pub fn step(&mut self, state: &mut TrainState, x: &[f32], y: &[i32]) -> Result<f32, NnError> {
        self.step_with_logits(state, x, y, None)
    }

    /// One epoch of a classifier over `data`, then [`ClusterPipeline::fetch_state`]; the
    /// state's loader must hand out batches of [`ClusterPipeline::batch_rows`] rows.
    ///
    /// # Errors
    /// As [`Pipeline::train_epoch`](crate::nn::Pipeline::train_epoch) for the loader and the
    /// data; as [`ClusterPipeline::step`].
    pub fn train_epoch(&mut self, state: &mut TrainState, data: &Dataset) -> Result<EpochStats, NnError> {
        let rows = self.batch_rows();
        let classes = check_classifier_epoch(
            "ClusterPipeline::train_epoch",
            &self.model,
            &state.loader,
            rows,
            (data.len(), data.dim),
        )?;
        let stats = super::run_epoch(rows, classes, state, data, |s, x, y, l| {
            self.step_with_logits(s, x, y, Some(l))
        })?;
        self.fetch_state(state)?;
        Ok(stats)
    }

    /// Copies every stage's parameters and optimizer moments into `state`.
    ///
    /// # Errors
    /// [`NnError::StageOnNode`] if a stage cannot answer or answers with a state that does
    /// not fit.
    pub fn fetch_state(&mut self, state: &mut TrainState) -> Result<(), NnError> {
        self.check_failed()?;
        let mut step = self.start(state.optimizer.config.lr());
        for k in 0..self.stages.len() {
            self.call(&mut step, k, Tag::State, StageCall::GetState);
        }
        while !step.pending.is_empty() {
            let (k, _, reply) = self.next(&mut step)?;
            let StageReply::State { params, optimizer } = reply else {
                return Err(self.fail(k, format!("unexpected answer {reply:?}")));
            };
            let owned = &self.stages[k].params;
            let specs = self.model.graph.params();
            let fits = optimizer.slots() == specs.len()
                && params.len() == owned.len()
                && params.iter().zip(owned).all(|((p, t), mine)| p == mine && t.shape == specs[*p].shape);
            if !fits {
                return Err(self.fail(k, "its state does not fit the model".into()));
            }
            for (p, tensor) in params {
                state.params.tensors[p] = tensor;
            }
            state.optimizer.absorb(&optimizer, |p| owned.contains(&p));
        }
        Ok(())
    }

    /// Sends every stage its part of `state`'s parameters and optimizer moments (to
    /// resume from a checkpoint).
    ///
    /// # Errors
    /// [`NnError::Argument`] if the state does not fit the model; [`NnError::StageOnNode`]
    /// if a stage cannot take it.
    pub fn load_state(&mut self, state: &TrainState) -> Result<(), NnError> {
        state.params.check(&self.model.graph)?;
        if state.optimizer.slots() != self.model.graph.params().len() {
            return Err(NnError::Argument {
                op: "ClusterPipeline::load_state",
                what: "the optimizer does not fit the model's parameters".into(),
            });
        }
        self.check_failed()?;
        let mut step = self.start(state.optimizer.config.lr());
        for k in 0..self.stages.len() {
            let owned = &self.stages[k].params;
            let params = owned.iter().map(|&p| (p, state.params.tensors[p].clone())).collect();
            let optimizer = state.optimizer.part(|p| owned.contains(&p));
            self.call(&mut step, k, Tag::State, StageCall::SetState { params, optimizer });
        }
        self.drain(&mut step)
    }

    fn step_with_logits(
        &mut self,
        state: &mut TrainState,
        x: &[f32],
        y: &[i32],
        mut logits_out: Option<&mut Vec<f32>>,
    ) -> Result<f32, NnError> {
        self.check_failed()?;
        stage::check_batch(&self.model, self.micro_batches, x, y)?;
        let seed = state.rng.next_u64();
        self.check_failed()?;
        let mut step = self.start(state.optimizer.config.lr());
        let last = self.stages.len() - 1;
        for k in 0..=last {
            self.call(&mut step, k, Tag::Begin, StageCall::Begin { seed });
        }
        for mb in 0..self.micro_batches {
            self.forward(&mut step, 0, mb, stage::micro_batch(&self.model, mb, x, y));
        }
        if let Some(out) = logits_out.as_deref_mut() {
            out.clear();
            out.resize(self.batch_rows() * super::classes(&self.model), 0.0);
        }
        let mut loss = 0.0f64;
        while !step.pending.is_empty() {
            match self.next(&mut step)? {
                (k, Tag::Forward(mb), StageReply::Forward(values)) if k < last => {
                    self.forward(&mut step, k + 1, mb, values);
                }
                (k, Tag::Forward(mb), StageReply::Loss { loss: l, logits }) if k == last => {
                    loss += f64::from(l);
                    if let Some(out) = logits_out.as_deref_mut() {
                        let span = mb * logits.len()..(mb + 1) * logits.len();
                        match out.get_mut(span) {
                            Some(out) => out.copy_from_slice(&logits),
                            None => return Err(self.fail(k, format!("{} logits", logits.len()))),
                        }
                    }
                }
                (k, Tag::Backward(mb), StageReply::Backward(grads)) => {
                    if k > 0 {
                        self.backward(&mut step, k - 1, mb, grads);
                    }
                }
                (_, Tag::Begin | Tag::Step, StageReply::Done) => {}
                (k, tag, reply) => {
                    return Err(self.fail(k, format!("unexpected answer {reply:?} to {tag:?}")))
                }
            }
        }
        state.step += 1;
        state.optimizer.steps += 1;
        Ok((loss / self.micro_batches as f64) as f32)
    }

    fn start(&self, lr: f32) -> StepState {
        let count = self.stages.len();
        StepState { pending: Vec::new(), forwards: vec![0; count], backwards: vec![0; count], lr }
    }

    /// Sends micro-batch `mb` forward to stage `k`; behind the last stage's last forward,
    /// its backward calls (in reverse) and its step.
    fn forward(&self, step: &mut StepState, k: usize, mb: usize, values: Values) {
        self.call(step, k, Tag::Forward(mb), StageCall::Forward { mb, values });
        step.forwards[k] += 1;
        if k + 1 == self.stages.len() && step.forwards[k] == self.micro_batches {
            for mb in (0..self.micro_batches).rev() {
                self.backward(step, k, mb, Grads::new());
            }
        }
    }

    /// Sends micro-batch `mb` backward to stage `k`; behind its last backward, its step.
    fn backward(&self, step: &mut StepState, k: usize, mb: usize, grads: Grads) {
        self.call(step, k, Tag::Backward(mb), StageCall::Backward { mb, grads });
        step.backwards[k] += 1;
        if step.backwards[k] == self.micro_batches {
            let lr = step.lr;
            self.call(step, k, Tag::Step, StageCall::Step { lr });
        }
    }

    fn call(&self, step: &mut StepState, stage: usize, tag: Tag, message: StageCall) {
        let reply = self.stages[stage].handle.call(message);
        step.pending.push(Pending { stage, tag, reply });
    }

    /// Waits for every pending call, expecting `Done`.
    fn drain(&mut self, step: &mut StepState) -> Result<(), NnError> {
        while !step.pending.is_empty() {
            match self.next(step)? {
                (_, _, StageReply::Done) => {}
                (k, tag, reply) => {
                    return Err(self.fail(k, format!("unexpected answer {reply:?} to {tag:?}")))
                }
            }
        }
        Ok(())
    }

    /// The next answer of any pending call: its stage, what it was for and the reply.
    fn next(&mut self, step: &mut StepState) -> Result<(usize, Tag, StageReply), NnError> {
        let replies: Vec<Reply> = step.pending.iter().map(|p| p.reply.clone()).collect();
        let (ready, _) = crate::actors::runtime::wait_blocking(&replies, 1, Some(self.timeout));
        let answered = ready.first().and_then(|r| step.pending.iter().position(|p| p.reply.id() == r.id()));
        let Some(i) = answered else {
            let timeout = self.timeout;
            let mut waiting: Vec<usize> = step.pending.iter().map(|p| p.stage).collect();
            waiting.sort_unstable();
            waiting.dedup();
            let what = format!("no answer in {:.1} s (waiting on stages {waiting:?})", timeout.as_secs_f64());
            return Err(self.fail(waiting.first().copied().unwrap_or(0), what));
        };
        let call = step.pending.swap_remove(i);
        // Ready: this does not wait.
        match call.reply.blocking_get() {
            Ok(Ok(reply)) => Ok((call.stage, call.tag, reply)),
            Ok(Err(what)) => Err(self.fail(call.stage, what)),
            Err(error) => Err(self.fail(call.stage, error.to_string())),
        }
    }

    /// Refuses work after a failure, repeating it.
    fn check_failed(&self) -> Result<(), NnError> {
        match &self.failed {
            None => Ok(()),
            Some((stage, what)) => Err(NnError::StageOnNode {
                stage: *stage,
                node: self.stages[*stage].node.clone(),
                what: format!("failed earlier: {what}"),
            }),
        }
    }

    /// Records a failure of `stage` (refusing further steps) and returns its error.
    fn fail(&mut self, stage: usize, what: String) -> NnError {
        self.failed = Some((stage, what.clone()));
        NnError::StageOnNode { stage, node: self.stages[stage].node.clone(), what }
    }
}

/// `params` with only the tensors in `owned` kept (the others empty).
fn part_of(params: &Params, owned: &[usize]) -> Params {
    let tensors = params
        .tensors
        .iter()
        .enumerate()
        .map(
            |(i, t)| if owned.contains(&i) { t.clone() } else { Tensor { shape: vec![0], data: Vec::new() } },
        )
        .collect();
    Params { tensors }
}
