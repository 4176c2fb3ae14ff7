//! Neural networks as data: an op graph with shapes and dtypes, reverse-mode automatic
//! differentiation, a fast CPU executor, layers, optimizers, data loading, a model zoo and
//! checkpointed training.
//!
//! # The graph is data
//! A [`Graph`] is a list of [`Node`]s, each an [`Op`] over earlier node ids with a checked
//! shape and dtype; parameters are numbered in a fixed order. Nothing in it is a closure,
//! so the same graph can be serialized, sent to another worker, split into pipeline stages
//! (any id range; see [`Graph::stage_inputs`]) and run by any [`Executor`].
//!
//! # Execution
//! [`CpuExecutor`] allocates every buffer once per graph, runs matrix products through
//! `matrixmultiply` (single-threaded, transposes as strides), convolutions by im2col + GEMM,
//! and fuses bias and activation into linear and convolution kernels. Backward walks the
//! nodes in reverse and accumulates each input's gradient.
//!
//! # Training and checkpoints
//! [`TrainState`] holds everything a run depends on and serializes with serde;
//! [`save_to_stash`] and [`resume_from_stash`] keep versioned checkpoints in a
//! [`Stash`](crate::Stash); [`save_checkpoint`] and [`resume`] move it through any
//! [`CheckpointStore`].
//!
//! # Examples
//! Build a small classifier, run one training step, and read the gradients in the fixed
//! parameter order that gradient all-reduce buckets follow:
//! ```
//! use tessera::nn::{mlp, Executor, OptimizerConfig, TrainState, Trainer};
//!
//! let model = mlp(4, &[3, 8, 2])?; // batch 4, 3 features, 2 classes
//! let mut state = TrainState::new(&model, OptimizerConfig::adam(1e-2), 4, 4, 7);
//! let (input, target) = (model.input, model.target);
//! let mut trainer = Trainer::new(model);
//! trainer.executor().set_value(input, &[0.5; 12])?;
//! trainer.executor().set_ids(target, &[0, 1, 0, 1])?;
//! let loss = trainer.step(&mut state)?;
//! assert!(loss.is_finite());
//! let names: Vec<&str> = trainer.model().graph.params().iter().map(|p| p.name.as_str()).collect();
//! assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
//! assert_eq!(trainer.executor().param_grad(0).len(), 3 * 8);
//! Ok::<(), tessera::nn::NnError>(())
//! ```
mod cpu;
mod data;
mod error;
mod executor;
#[cfg(feature = "cuda")]
mod gpu;
mod graph;
mod layers;
mod optim;
mod parallel;
mod params;
mod rng;
mod tensor;
mod train;
#[cfg(feature = "xla")]
mod xla;
mod zoo;

pub use cpu::CpuExecutor;
pub use data::{fill_windows, gather_windows, window_count, DataLoader, Dataset, TextCorpus};
pub use error::NnError;
pub use executor::Executor;
#[cfg(feature = "cuda")]
pub use gpu::{GpuDataset, GpuExecutor, GpuTrainer};
pub use graph::{Activation, Graph, Init, Node, NodeId, Op, ParamSpec};
pub use layers::{Conv2d, Dropout, Embedding, Gru, LayerNorm, Linear, MaxPool2d, MultiHeadSelfAttention};
pub use optim::{Optimizer, OptimizerConfig};
pub use parallel::{
    is_peer_lost, train_on_cluster, ClusterPipeline, ClusterReplicas, ClusterTrainingReport, CommStats,
    DataParallel, ElasticTraining, EpochReport, Pipeline, ReplicaDevice, ReplicaJob,
};
pub use params::Params;
pub use rng::Rng;
pub use tensor::{DType, Tensor};
pub use train::{
    resume, resume_from_stash, save_checkpoint, save_to_stash, CheckpointStore, DirStore, EpochStats,
    Evaluation, Evaluator, TrainState, Trainer,
};
#[cfg(feature = "xla")]
pub use xla::{XlaExecutor, XlaTrainer};
pub use zoo::{
    char_gru, gcn, gcn_adjacency, lenet, logistic_regression, mlp, tiny_transformer, CooMatrix, Gcn, Model,
    ModelSpec, TransformerConfig,
};
