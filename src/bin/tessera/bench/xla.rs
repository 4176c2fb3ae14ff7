//! `tessera bench xla` (feature `xla`): the model zoo and a matrix product on an XLA device
//! (the PJRT plugin `TESSERA_PJRT_PLUGIN` names, else the CPU plugin that
//! `scripts/install-deps.sh` installs).
//!
//! Figures: f32 GEMM GFLOP/s at 1024³ (one compiled `dot_general`, inputs already on the
//! device, median of timed runs); MLP and CNN training on digits (samples/s and test
//! accuracy) and the character GRU and tiny transformer (tokens/s), with the settings of
//! the `nn` suite, and full-batch GCN training steps on a 20 000-node graph, to set beside
//! `nn/…` (the CPU executor).
use std::time::Instant;

use anyhow::{Context, Result};
use tessera::nn::{Dataset, EpochStats, TrainState, XlaExecutor, XlaTrainer};
use tessera::XlaDevice;

use super::nn::{digits_cases, text_cases, EpochTrainer};
use super::{median, Reporter};

impl EpochTrainer for XlaTrainer {
    fn epoch(&mut self, state: &mut TrainState, data: &Dataset) -> Result<EpochStats> {
        Ok(self.train_epoch(state, data)?)
    }

    fn epoch_text(&mut self, state: &mut TrainState, ids: &[i32], steps: usize) -> Result<EpochStats> {
        Ok(self.train_epoch_text(state, ids, steps)?)
    }
}

fn gemm_gflops(device: &XlaDevice, n: usize) -> Result<f64> {
    let t = format!("tensor<{n}x{n}xf32>");
    let program = format!(
        "func.func @main(%a: {t}, %b: {t}) -> {t} {{\n  %c = \"stablehlo.dot_general\"(%a, %b) \
         {{dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [1], \
         rhs_contracting_dimensions = [0]>}} : ({t}, {t}) -> {t}\n  return %c : {t}\n}}\n"
    );
    let exe = device.compile(&program)?;
    let data: Vec<f32> = (0..n * n).map(|i| (i % 17) as f32 * 0.01).collect();
    let (a, b) = (device.upload(&data, &[n, n])?, device.upload(&data, &[n, n])?);
    exe.run(&[&a, &b])?; // warm-up
    let mut rates = Vec::new();
    for _ in 0..15 {
        let start = Instant::now();
        let out = exe.run(&[&a, &b])?;
        let seconds = start.elapsed().as_secs_f64();
        drop(out);
        rates.push(2.0 * (n * n * n) as f64 / seconds / 1e9);
    }
    Ok(median(&mut rates))
}

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    let device = XlaDevice::open_default().context("opening the XLA device")?;
    reporter.report("xla/gemm_f32_1024_gflops", gemm_gflops(&device, 1024)?, "GFLOP/s", true);
    let make_trainer = |model, state: &TrainState| Ok(XlaTrainer::new(device.clone(), model, state)?);
    digits_cases(reporter, "xla", (3, 1), &make_trainer)?;
    text_cases(reporter, "xla", &make_trainer)?;
    // The same GCN as the `nn` suite's (the sparse product as gather and scatter).
    super::nn::gcn_case(reporter, "xla/gcn_20k_train_steps_per_s", |graph| {
        XlaExecutor::new(device.clone(), graph)
    })
}
