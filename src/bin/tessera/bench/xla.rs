//! `tessera bench xla` (feature `xla`): the model zoo and a matrix product on an XLA device
//! (the PJRT plugin `TESSERA_PJRT_PLUGIN` names, else the CPU plugin that
//! `scripts/install-deps.sh` installs).
//!
//! Figures: f32 GEMM GFLOP/s at 1024³ (one compiled `dot_general`, inputs already on the
//! device, median of timed runs); MLP and CNN training on digits (samples/s and test
//! accuracy) and the character GRU and tiny transformer (tokens/s), with the settings of
//! the `nn` suite, and full-batch GCN training steps on a 20 000-node graph, to set beside
//! `nn/…` (the CPU executor); the XLA actor's cost per call, a chain of small programs
//! each taking the previous one's output `Ref`, against the same chain run directly.
use std::time::Instant;

use anyhow::{Context, Result};
use tessera::nn::{Dataset, EpochStats, TrainState, XlaExecutor, XlaTrainer};
use tessera::{Runtime, XlaActor, XlaDevice};

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

/// Microseconds per call of a chain of `CHAIN` negations of 16 floats, each taking the
/// previous output: (run directly on the device, through the XLA actor with `Ref`s; only the
/// last `Ref` is waited for). Medians of 7 chains.
fn actor_call_micros(device: &XlaDevice) -> Result<(f64, f64)> {
    const CHAIN: usize = 2000;
    let program = "func.func @main(%x: tensor<16xf32>) -> tensor<16xf32> {\n  \
                   %0 = stablehlo.negate %x : tensor<16xf32>\n  return %0 : tensor<16xf32>\n}\n";
    let data: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let exe = device.compile(program)?;
    let rt = Runtime::local()?;
    let actor = XlaActor::get(&rt)?;
    let negate = actor.compile(program)?;
    let (mut direct, mut through_actor) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let mut x = device.upload(&data, &[16])?;
        let start = Instant::now();
        for _ in 0..CHAIN {
            x = exe.run(&[&x])?.remove(0);
        }
        x.download::<f32>()?;
        direct.push(start.elapsed().as_secs_f64() / CHAIN as f64 * 1e6);

        let mut r = actor.upload(data.clone(), vec![16]);
        r.blocking_get()?;
        let start = Instant::now();
        for _ in 0..CHAIN {
            r = actor.call(&negate, &[r]).remove(0);
        }
        r.blocking_get()?.to_host::<f32>()?;
        through_actor.push(start.elapsed().as_secs_f64() / CHAIN as f64 * 1e6);
    }
    rt.shutdown();
    Ok((median(&mut direct), median(&mut through_actor)))
}

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    let device = XlaDevice::open_default().context("opening the XLA device")?;
    reporter.report("xla/gemm_f32_1024_gflops", gemm_gflops(&device, 1024)?, "GFLOP/s", true);
    let (direct, through_actor) = actor_call_micros(&device)?;
    reporter.report("xla/call_direct_us", direct, "us", false);
    reporter.report("xla/call_through_actor_us", through_actor, "us", false);
    let make_trainer = |model, state: &TrainState| Ok(XlaTrainer::new(device.clone(), model, state)?);
    digits_cases(reporter, "xla", (3, 1), &make_trainer)?;
    text_cases(reporter, "xla", &make_trainer)?;
    // The same GCN as the `nn` suite's (the sparse product as gather and scatter).
    super::nn::gcn_case(reporter, "xla/gcn_20k_train_steps_per_s", |graph| {
        XlaExecutor::new(device.clone(), graph)
    })
}
