//! `Params`: the values of a graph's parameters, in the graph's fixed parameter order.
use serde::{Deserialize, Serialize};

use crate::nn::{Graph, Init, NnError, Rng, Tensor};

/// Parameter values, one [`Tensor`] per [`ParamSpec`](crate::nn::ParamSpec), same order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// The values, indexed like `graph.params()`.
    pub tensors: Vec<Tensor>,
}

impl Params {
    /// Fresh values drawn from each parameter's initializer.
    pub fn init(graph: &Graph, rng: &mut Rng) -> Params {
        let tensors = graph
            .params()
            .iter()
            .map(|spec| {
                let mut t = Tensor::zeros(&spec.shape);
                match spec.init {
                    Init::Zeros => {}
                    Init::Ones => t.data.fill(1.0),
                    Init::Uniform { bound } => {
                        t.data.iter_mut().for_each(|v| *v = (rng.uniform() * 2.0 - 1.0) * bound)
                    }
                    Init::Normal { std } => t.data.iter_mut().for_each(|v| *v = rng.normal() * std),
                }
                t
            })
            .collect();
        Params { tensors }
    }

    /// Checks that these values fit `graph`'s parameter list.
    ///
    /// # Errors
    /// [`NnError::ParamMismatch`] naming the first parameter that does not fit.
    pub fn check(&self, graph: &Graph) -> Result<(), NnError> {
        self.check_some(graph, |_| true)
    }

    /// As [`Params::check`], but only the parameters for which `used` holds must fit; the
    /// others may be empty (a pipeline stage holds only the parameters it reads).
    pub(crate) fn check_some(&self, graph: &Graph, used: impl Fn(usize) -> bool) -> Result<(), NnError> {
        let specs = graph.params();
        for (index, spec) in specs.iter().enumerate() {
            if !used(index) && self.tensors.get(index).is_some_and(|t| t.data.is_empty()) {
                continue;
            }
            let fits = self
                .tensors
                .get(index)
                .is_some_and(|t| t.shape == spec.shape && t.data.len() == t.shape.iter().product::<usize>());
            if !fits {
                let got = self.tensors.get(index).map(|t| t.shape.clone()).unwrap_or_default();
                return Err(NnError::ParamMismatch {
                    index,
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    got,
                });
            }
        }
        if self.tensors.len() != specs.len() {
            let index = specs.len();
            return Err(NnError::ParamMismatch {
                index,
                name: "<extra>".into(),
                expected: vec![],
                got: self.tensors[index].shape.clone(),
            });
        }
        Ok(())
    }

    /// The total number of parameter elements.
    pub fn count(&self) -> usize {
        self.tensors.iter().map(Tensor::len).sum()
    }
}
