//! Devices and the collectives that connect them: the `Communicator` trait that gradient
//! all-reduce uses, with a TCP backend for CPUs (and an NCCL backend for GPUs later).
mod collective;

pub use collective::{segment, CollectiveError, Communicator, GroupConfig, Rendezvous, TcpGroup};
