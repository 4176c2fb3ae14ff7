//! Optimizers: SGD with momentum, Adam, and AdamW (decoupled weight decay), with their
//! state held in a serializable struct so that a checkpoint resumes them exactly.
use serde::{Deserialize, Serialize};

use crate::nn::{NnError, Params};

/// Magnitudes below this are flushed to zero in optimizer state and gradients.
///
/// Late in training many gradients become tiny; squaring them or decaying moments towards
/// zero produces subnormal floats, which the CPU handles tens of times slower (measured:
/// Adam went from a few % to 64% of an MLP step). Flushing values below 1e-30 keeps every
/// intermediate normal; no useful update is that small.
const TINY: f32 = 1e-30;

#[inline]
fn flush(x: f32) -> f32 {
    if x.abs() < TINY {
        0.0
    } else {
        x
    }
}

/// Gradients below this (whose square would be subnormal) count as zero.
const TINY_GRAD: f32 = 1e-15;

/// Which update rule, with its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum OptimizerConfig {
    /// `v = momentum·v + (g + wd·p); p -= lr·v`.
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum factor (0 for plain SGD).
        momentum: f32,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
    },
    /// Adam; `weight_decay` is an L2 penalty added to the gradient.
    Adam {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Added to the root of the second moment.
        eps: f32,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
    },
    /// AdamW: Adam with weight decay applied to the parameters directly.
    AdamW {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Added to the root of the second moment.
        eps: f32,
        /// Decoupled decay: `p -= lr·wd·p` each step.
        weight_decay: f32,
    },
}

impl OptimizerConfig {
    /// SGD with momentum.
    pub fn sgd(lr: f32, momentum: f32) -> Self {
        OptimizerConfig::Sgd { lr, momentum, weight_decay: 0.0 }
    }

    /// Adam with the usual betas (0.9, 0.999) and eps 1e-8.
    pub fn adam(lr: f32) -> Self {
        OptimizerConfig::Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }

    /// AdamW with the usual betas and the given decoupled weight decay.
    pub fn adamw(lr: f32, weight_decay: f32) -> Self {
        OptimizerConfig::AdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }

    /// Checks that every setting is one an update can use: a finite, non-negative learning
    /// rate and weight decay, momentum and betas in `[0, 1)`, and a finite, positive eps (a
    /// NaN learning rate would turn every parameter into NaN at the first step, silently).
    ///
    /// # Errors
    /// [`NnError::Argument`] naming `op` and the first setting out of range.
    pub(crate) fn check(&self, op: &'static str) -> Result<(), NnError> {
        let (lr, weight_decay, decays, eps) = match *self {
            OptimizerConfig::Sgd { lr, momentum, weight_decay } => (lr, weight_decay, [momentum, 0.0], 1.0),
            OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay }
            | OptimizerConfig::AdamW { lr, beta1, beta2, eps, weight_decay } => {
                (lr, weight_decay, [beta1, beta2], eps)
            }
        };
        let bad = if !(lr.is_finite() && lr >= 0.0) {
            Some(format!("the learning rate is {lr}; it must be finite and at least 0"))
        } else if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            Some(format!("the weight decay is {weight_decay}; it must be finite and at least 0"))
        } else if let Some(decay) = decays.iter().find(|d| !(0.0..1.0).contains(*d)) {
            let what = if matches!(self, OptimizerConfig::Sgd { .. }) { "the momentum" } else { "a beta" };
            Some(format!("{what} is {decay}; it must be at least 0 and below 1"))
        } else if !(eps.is_finite() && eps > 0.0) {
            Some(format!("eps is {eps}; it must be finite and above 0"))
        } else {
            None
        };
        match bad {
            Some(what) => Err(NnError::Argument { op, what: format!("optimizer: {what}") }),
            None => Ok(()),
        }
    }

    /// The learning rate.
    pub fn lr(&self) -> f32 {
        match *self {
            OptimizerConfig::Sgd { lr, .. }
            | OptimizerConfig::Adam { lr, .. }
            | OptimizerConfig::AdamW { lr, .. } => lr,
        }
    }
}

/// An optimizer and its state (moments, step count), one slot per parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Optimizer {
    /// The update rule.
    pub config: OptimizerConfig,
    /// Updates applied so far.
    pub steps: u64,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Optimizer {
    /// A fresh optimizer for parameters shaped like `params`.
    pub fn new(config: OptimizerConfig, params: &Params) -> Self {
        let zeros = || params.tensors.iter().map(|t| vec![0.0; t.len()]).collect::<Vec<_>>();
        let v = match config {
            OptimizerConfig::Sgd { .. } => Vec::new(),
            _ => zeros(),
        };
        Optimizer { config, steps: 0, m: zeros(), v }
    }

    /// Changes the learning rate (for schedules).
    pub fn set_lr(&mut self, new_lr: f32) {
        match &mut self.config {
            OptimizerConfig::Sgd { lr, .. }
            | OptimizerConfig::Adam { lr, .. }
            | OptimizerConfig::AdamW { lr, .. } => *lr = new_lr,
        }
    }

    /// The first and second moments, one vector per parameter (no second moments for
    /// SGD): what a device-side optimizer copies in and back.
    #[cfg(any(feature = "cuda", feature = "xla"))]
    pub(crate) fn moments(&self) -> (&[Vec<f32>], &[Vec<f32>]) {
        (&self.m, &self.v)
    }

    /// As [`Optimizer::moments`], mutable.
    #[cfg(any(feature = "cuda", feature = "xla"))]
    pub(crate) fn moments_mut(&mut self) -> (&mut [Vec<f32>], &mut [Vec<f32>]) {
        (&mut self.m, &mut self.v)
    }

    /// Checks that the moments have one slot of each of `params`' sizes: first moments
    /// always, second moments for Adam and AdamW (none for SGD). A state loaded from a
    /// checkpoint of another model fails here, with a typed error, instead of in
    /// [`Optimizer::step`]'s assertion (or, on a GPU, in kernels that index the moments by
    /// the parameters' lengths).
    ///
    /// # Errors
    /// [`NnError::Argument`] naming `op` and the sizes that do not fit.
    pub(crate) fn check_fits(&self, params: &Params, op: &'static str) -> Result<(), NnError> {
        // Allocation-free unless it fails: it runs on every training step.
        self.config.check(op)?;
        let adam = !matches!(self.config, OptimizerConfig::Sgd { .. });
        let fits = |slots: &[Vec<f32>]| {
            slots.len() == params.tensors.len()
                && slots.iter().zip(&params.tensors).all(|(s, t)| s.len() == t.data.len())
        };
        if fits(&self.m) && (if adam { fits(&self.v) } else { self.v.is_empty() }) {
            return Ok(());
        }
        let sizes: Vec<usize> = params.tensors.iter().map(|t| t.data.len()).collect();
        let lens = |slots: &[Vec<f32>]| slots.iter().map(Vec::len).collect::<Vec<_>>();
        Err(NnError::Argument {
            op,
            what: format!(
                "the optimizer's moments do not fit the parameters (sizes {sizes:?}): first moments \
                 {:?}, second moments {:?} ({})",
                lens(&self.m),
                lens(&self.v),
                if adam { "Adam needs both" } else { "SGD has none" }
            ),
        })
    }

    /// How many parameters the state has slots for.
    pub(crate) fn slots(&self) -> usize {
        self.m.len()
    }

    /// A copy holding the state of only the parameters for which `keep` holds (the others'
    /// slots left empty): the part a pipeline stage owns.
    pub(crate) fn part(&self, keep: impl Fn(usize) -> bool) -> Optimizer {
        let select = |slots: &Vec<Vec<f32>>| {
            slots.iter().enumerate().map(|(i, s)| if keep(i) { s.clone() } else { Vec::new() }).collect()
        };
        Optimizer { config: self.config.clone(), steps: self.steps, m: select(&self.m), v: select(&self.v) }
    }

    /// Takes over `part`'s state (and step count) for the parameters for which `keep`
    /// holds; the inverse of [`Optimizer::part`].
    pub(crate) fn absorb(&mut self, part: &Optimizer, keep: impl Fn(usize) -> bool) {
        self.steps = part.steps;
        for (mine, theirs) in [(&mut self.m, &part.m), (&mut self.v, &part.v)] {
            for (i, (slot, value)) in mine.iter_mut().zip(theirs).enumerate() {
                if keep(i) {
                    slot.clone_from(value);
                }
            }
        }
    }

    /// Applies one update; `grad(i)` is parameter `i`'s gradient.
    ///
    /// # Panics
    /// If `params` has a different layout from the one the optimizer was made for, or a
    /// gradient has the wrong length (both are programming errors).
    pub fn step<'g>(&mut self, params: &mut Params, grad: impl Fn(usize) -> &'g [f32]) {
        assert_eq!(params.tensors.len(), self.m.len(), "optimizer state does not fit the parameters");
        self.steps += 1;
        match self.config {
            OptimizerConfig::Sgd { lr, momentum, weight_decay } => {
                for (i, (p, m)) in params.tensors.iter_mut().zip(&mut self.m).enumerate() {
                    let g = grad(i);
                    assert_eq!(g.len(), p.data.len(), "gradient length");
                    for ((p, m), &g) in p.data.iter_mut().zip(m.iter_mut()).zip(g) {
                        *m = flush(momentum * *m + g + weight_decay * *p);
                        *p -= lr * *m;
                    }
                }
            }
            OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay }
            | OptimizerConfig::AdamW { lr, beta1, beta2, eps, weight_decay } => {
                let decoupled = matches!(self.config, OptimizerConfig::AdamW { .. });
                let (l2, decay, c1, c2) =
                    adam_constants(lr, beta1, beta2, weight_decay, decoupled, self.steps);
                let k = AdamStep { lr, beta1, beta2, eps, l2, decay, c1, c2 };
                for (i, ((p, m), v)) in
                    params.tensors.iter_mut().zip(&mut self.m).zip(&mut self.v).enumerate()
                {
                    let g = grad(i);
                    assert_eq!(g.len(), p.data.len(), "gradient length");
                    adam_update(&mut p.data, m, v, g, &k);
                }
            }
        }
    }
}

/// The constants step `t` (counted from 1) of Adam, or with `decoupled` of AdamW, derives
/// from its configuration, as the CPU update and the GPU kernel take them: `(l2, decay, c1,
/// c2)`, the L2 penalty added to the gradient (Adam), the factor the weights are decayed by
/// (AdamW), and the bias corrections of the first and second moments.
pub(crate) fn adam_constants(
    lr: f32,
    beta1: f32,
    beta2: f32,
    weight_decay: f32,
    decoupled: bool,
    t: u64,
) -> (f32, f32, f32, f32) {
    let t = t as i32;
    let c1 = 1.0 / (1.0 - (beta1 as f64).powi(t)) as f32;
    let c2 = 1.0 / (1.0 - (beta2 as f64).powi(t)) as f32;
    let (l2, decay) = if decoupled { (0.0, 1.0 - lr * weight_decay) } else { (weight_decay, 1.0) };
    (l2, decay, c1, c2)
}

/// The constants of one Adam/AdamW step.
struct AdamStep {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    l2: f32,
    decay: f32,
    c1: f32,
    c2: f32,
}

#[inline(always)]
fn adam_kernel(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &AdamStep) {
    for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        let g = g + k.l2 * *p;
        let g = if g.abs() < TINY_GRAD { 0.0 } else { g };
        *m = flush(k.beta1 * *m + (1.0 - k.beta1) * g);
        *v = flush(k.beta2 * *v + (1.0 - k.beta2) * g * g);
        let update = (*m * k.c1) / ((*v * k.c2).sqrt() + k.eps);
        *p = *p * k.decay - k.lr * update;
    }
}

/// The same kernel compiled for AVX2 (8 lanes instead of SSE's 4). Every operation is an
/// IEEE-exact multiply, add, divide or square root (no FMA contraction), so both versions
/// give bit-identical results.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn adam_kernel_avx2(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &AdamStep) {
    adam_kernel(p, m, v, g, k);
}

fn adam_update(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &AdamStep) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { adam_kernel_avx2(p, m, v, g, k) };
        return;
    }
    adam_kernel(p, m, v, g, k);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{mlp, TrainState};

    #[test]
    fn moments_must_fit_the_parameters() {
        let model = mlp(4, &[6, 5, 3]).unwrap();
        let other = mlp(4, &[6, 7, 3]).unwrap();
        for config in [OptimizerConfig::sgd(0.1, 0.9), OptimizerConfig::adam(1e-3)] {
            let state = TrainState::new(&model, config.clone(), 16, 4, 1);
            state.optimizer.check_fits(&state.params, "test").unwrap();
            // Another model's moments: as many slots, other sizes.
            let foreign = TrainState::new(&other, config.clone(), 16, 4, 1).optimizer;
            let error = foreign.check_fits(&state.params, "test").unwrap_err();
            assert!(matches!(error, NnError::Argument { op: "test", .. }), "{error}");
            // A pipeline stage's part (the other parameters' slots emptied) does not fit.
            assert!(state.optimizer.part(|i| i == 0).check_fits(&state.params, "test").is_err());
        }
        // Adam with an SGD state's moments (no second moments) does not fit; SGD with an
        // Adam state's (second moments it does not use) does not either.
        let sgd = TrainState::new(&model, OptimizerConfig::sgd(0.1, 0.0), 16, 4, 1);
        let adam = TrainState::new(&model, OptimizerConfig::adam(1e-3), 16, 4, 1);
        let mut mixed = sgd.optimizer.clone();
        mixed.config = adam.optimizer.config.clone();
        assert!(mixed.check_fits(&sgd.params, "test").is_err());
        let mut mixed = adam.optimizer.clone();
        mixed.config = sgd.optimizer.config.clone();
        assert!(mixed.check_fits(&sgd.params, "test").is_err());
    }

    #[test]
    fn settings_an_update_cannot_use_are_errors() {
        let model = mlp(4, &[6, 5, 3]).unwrap();
        for good in
            [OptimizerConfig::sgd(0.1, 0.9), OptimizerConfig::adam(0.0), OptimizerConfig::adamw(1e-3, 1e-4)]
        {
            good.check("test").unwrap();
        }
        let bad = [
            (OptimizerConfig::adam(f32::NAN), "learning rate is NaN"),
            (OptimizerConfig::sgd(f32::INFINITY, 0.0), "learning rate is inf"),
            (OptimizerConfig::adam(-1e-3), "learning rate is -0.001"),
            (OptimizerConfig::sgd(0.1, 1.0), "momentum is 1"),
            (OptimizerConfig::adamw(1e-3, -1.0), "weight decay is -1"),
            (
                OptimizerConfig::Adam { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 0.0, weight_decay: 0.0 },
                "eps is 0",
            ),
            (
                OptimizerConfig::AdamW { lr: 1e-3, beta1: -0.1, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
                "a beta is -0.1",
            ),
        ];
        for (config, says) in bad {
            let error = config.check("test").unwrap_err().to_string();
            assert!(error.contains(says), "{config:?}: {error}");
            // Every trainer checks the state's optimizer through `check_fits`.
            let state = TrainState::new(&model, config.clone(), 16, 4, 1);
            assert!(state.optimizer.check_fits(&state.params, "test").is_err(), "{config:?}");
        }
        // A schedule that sets a NaN rate mid-training is caught at the next step too.
        let mut state = TrainState::new(&model, OptimizerConfig::adam(1e-3), 16, 4, 1);
        state.optimizer.set_lr(f32::NAN);
        assert!(state.optimizer.check_fits(&state.params, "test").is_err());
    }
}
