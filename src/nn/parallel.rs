//! Parallel training: data parallelism ([`DataParallel`]: replicas that all-reduce
//! gradient buckets while backward runs; [`ClusterReplicas`] and [`train_on_cluster`]: the
//! replicas as actors on cluster node processes, regrouping elastically from the last
//! stash checkpoint when a node is lost) and model parallelism ([`Pipeline`]: a graph split
//! into stages on worker threads, trained GPipe-style over micro-batches).
//!
//! # Which to use
//! Data parallelism scales throughput when the model fits one worker: each replica runs
//! the whole graph on its shard of the batch, in its own process, joined by a
//! [`Communicator`](crate::devices::Communicator). A pipeline splits a model that is too
//! large (or too slow) for one worker across several, at the price of a pipeline bubble.
mod buckets;
mod on_cluster;
mod pipeline;
mod replicas;

#[cfg(feature = "cuda")]
pub(crate) use buckets::{Buckets, Slot};
pub use on_cluster::{
    train_on_cluster, ClusterReplicas, ClusterTrainingReport, ElasticTraining, EpochReport, ReplicaDevice,
    ReplicaJob,
};
pub use pipeline::{ClusterPipeline, Pipeline};
pub use replicas::{is_peer_lost, CommStats, DataParallel};
