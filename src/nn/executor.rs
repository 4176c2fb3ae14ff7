//! `Executor`: the backend-neutral seam between a [`Graph`] and the hardware that runs it.
//!
//! A backend (today [`CpuExecutor`](crate::nn::CpuExecutor); later CUDA and XLA) takes the
//! same graph and implements every op's forward and backward kernel. A pipeline stage runs
//! a sub-range of node ids: its inputs are set with [`Executor::set_value`], and in
//! backward its output gradients are passed as seeds.
//!
//! The bookkeeping every backend follows (which nodes a walk runs, which gradients backward
//! zeroes, the errors for missing or ill-fitting values) lives once, in `rules`.
use std::ops::Range;

use crate::nn::{Graph, NnError, NodeId, Params};

pub(crate) mod rules;

/// Runs a graph's nodes forward and backward over some device's buffers.
pub trait Executor {
    /// The graph being run.
    fn graph(&self) -> &Graph;

    /// Training mode (dropout active) or evaluation mode.
    fn set_training(&mut self, training: bool);

    /// Seeds the generator used by random ops (dropout) in the next forward passes.
    fn set_seed(&mut self, seed: u64);

    /// Sets an f32 node's value: a data input, or a stage input's activations.
    ///
    /// # Errors
    /// [`NnError::Length`] or [`NnError::DType`] if `data` does not fit the node.
    fn set_value(&mut self, node: NodeId, data: &[f32]) -> Result<(), NnError>;

    /// Sets an i32 node's value (labels, token ids).
    ///
    /// # Errors
    /// [`NnError::Length`] or [`NnError::DType`] if `data` does not fit the node.
    fn set_ids(&mut self, node: NodeId, data: &[i32]) -> Result<(), NnError>;

    /// Computes the nodes with ids in `range`, in order.
    ///
    /// # Errors
    /// [`NnError::MissingValue`] if a node reads a value that was neither computed nor
    /// set; [`NnError::ParamMismatch`] if `params` does not fit the graph; errors of ops that
    /// check their data (ids out of range).
    fn forward(&mut self, params: &Params, range: Range<usize>) -> Result<(), NnError>;

    /// Back-propagates through the nodes in `range`, seeded with gradients of the given
    /// nodes (the loss with `[1.0]`, or a stage's output gradients).
    ///
    /// # Errors
    /// [`NnError::MissingValue`] if `range` was not run forward; [`NnError::Length`] for a
    /// seed of the wrong size.
    fn backward(
        &mut self,
        params: &Params,
        range: Range<usize>,
        seeds: &[(NodeId, &[f32])],
    ) -> Result<(), NnError>;

    /// A computed or set f32 value.
    ///
    /// # Errors
    /// [`NnError::MissingValue`] if it has no value yet.
    fn value(&self, node: NodeId) -> Result<&[f32], NnError>;

    /// The gradient of a node (after `backward`).
    ///
    /// # Errors
    /// [`NnError::MissingValue`] if no gradient flows to the node.
    fn grad(&self, node: NodeId) -> Result<&[f32], NnError>;

    /// The gradient of parameter `index` (in the graph's fixed parameter order); empty for
    /// a parameter that a pipeline stage's executor does not read.
    fn param_grad(&self, index: usize) -> &[f32];

    /// Runs the whole graph forward.
    ///
    /// # Errors
    /// As [`Executor::forward`].
    fn forward_all(&mut self, params: &Params) -> Result<(), NnError> {
        let n = self.graph().len();
        self.forward(params, 0..n)
    }

    /// Back-propagates from the scalar `loss` through every node before it.
    ///
    /// # Errors
    /// As [`Executor::backward`].
    fn backward_from(&mut self, params: &Params, loss: NodeId) -> Result<(), NnError> {
        self.backward(params, 0..loss.index() + 1, &[(loss, &[1.0])])
    }

    /// A scalar node's value.
    ///
    /// # Errors
    /// As [`Executor::value`].
    fn scalar(&self, node: NodeId) -> Result<f32, NnError> {
        Ok(self.value(node)?[0])
    }
}
