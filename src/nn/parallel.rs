//! Parallel training: data parallelism ([`DataParallel`]: replicas that all-reduce
//! gradient buckets while backward runs) and model parallelism ([`Pipeline`]: a graph split
//! into stages on worker threads, trained GPipe-style over micro-batches), and elastic
//! supervision ([`supervise`]: a replica that dies mid-training makes the survivors resume
//! from the last checkpoint as a smaller group).
//!
//! # Which to use
//! Data parallelism scales throughput when the model fits one worker: each replica runs
//! the whole graph on its shard of the batch, in its own process, joined by a
//! [`Communicator`](crate::devices::Communicator). A pipeline splits a model that is too
//! large (or too slow) for one worker across several, at the price of a pipeline bubble.
mod elastic;
mod pipeline;
mod replicas;

pub use elastic::{is_peer_lost, supervise, ElasticConfig, ElasticReport, Launch, PEER_LOST_EXIT_CODE};
pub use pipeline::{ClusterPipeline, Pipeline};
pub use replicas::{CommStats, DataParallel};

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
