//! `Tensor` and `DType`: the values a graph's parameters and inputs hold.
use serde::{Deserialize, Serialize};

/// The element type of a graph node's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DType {
    /// 32-bit float: activations, parameters, gradients.
    F32,
    /// 32-bit signed integer: class labels and token ids.
    I32,
}

/// A dense, row-major `f32` array with its shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    /// The extent of each axis, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` elements, row-major.
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor { shape: shape.to_vec(), data: vec![0.0; numel(shape)] }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The number of elements of a shape (1 for a scalar `[]`).
pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}
