//! `tessera bench xla` (feature `xla`): the model zoo and a matrix product on an XLA device
//! (the PJRT plugin `TESSERA_PJRT_PLUGIN` names, else the CPU plugin that
//! `scripts/install-deps.sh` installs).
//!
//! Figures: f32 GEMM GFLOP/s at 1024³ (one compiled `dot_general`, inputs already on the
//! device, median of timed runs); MLP and CNN training on digits (samples/s and test
//! accuracy) and the character GRU and tiny transformer (tokens/s), with the settings of
//! the `nn` suite, and full-batch GCN training steps on a 20 000-node graph, to set beside
//! `nn/…` (the CPU executor); the XLA actor's cost per call, a chain of small programs
//! each taking the previous one's output `Ref`, against the same chain run directly; a
//! chain of node tasks over a 16 MiB array that stays on the node's XLA device, against
//! the same chain with each result made a host copy (what every step cost before node
//! processes kept device results) and against the program alone, run directly here.
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use tessera::nn::{Dataset, EpochStats, TrainState, XlaExecutor, XlaTrainer};
use tessera::{
    Cluster, ClusterConfig, LocalProcesses, Ref, Runtime, TaskOptions, XlaActor, XlaArray, XlaDevice,
};

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
         rhs_contracting_dimensions = [0]>, precision_config = [#stablehlo<precision HIGHEST>, \
         #stablehlo<precision HIGHEST>]}} : ({t}, {t}) -> {t}\n  return %c : {t}\n}}\n"
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
/// Elements of the node chain's array: 16 MiB of f32.
const NODE_CHAIN_LEN: usize = 1 << 22;

/// `-x` on `NODE_CHAIN_LEN` floats.
fn negate_program() -> String {
    let t = format!("tensor<{NODE_CHAIN_LEN}xf32>");
    format!("func.func @main(%x: {t}) -> {t} {{\n  %0 = stablehlo.negate %x : {t}\n  return %0 : {t}\n}}\n")
}

/// `-x` on the XLA actor of the process the task runs in (a node's).
fn negate_here(x: XlaArray) -> Result<XlaArray, String> {
    let rt = Runtime::current().ok_or("not in a task")?;
    let xla = XlaActor::get(&rt).map_err(|e| e.to_string())?;
    let negate = xla.compile(&negate_program()).map_err(|e| e.to_string())?;
    xla.call(&negate, &[rt.put(x)]).remove(0).blocking_get().map_err(|e| e.to_string())
}

tessera::task! {
    /// `NODE_CHAIN_LEN` ones on the XLA device of the node that runs it.
    fn ones_on_xla() -> Result<XlaArray, String> {
        let rt = Runtime::current().ok_or("not in a task")?;
        let xla = XlaActor::get(&rt).map_err(|e| e.to_string())?;
        xla.upload(vec![1.0f32; NODE_CHAIN_LEN], vec![NODE_CHAIN_LEN]).blocking_get().map_err(|e| e.to_string())
    }
}

tessera::task! {
    /// `-x` on the node's XLA device; the result stays there.
    fn negate_on_xla(x: XlaArray) -> Result<XlaArray, String> { negate_here(x) }
}

tessera::task! {
    /// `-x` on the node's XLA device, returned as a host copy (so the node keeps it encoded).
    fn negate_to_host(x: XlaArray) -> Result<XlaArray, String> {
        let y = negate_here(x)?;
        XlaArray::from_host(y.to_host::<f32>().map_err(|e| e.to_string())?, vec![NODE_CHAIN_LEN])
            .map_err(|e| e.to_string())
    }
}

/// Milliseconds per step of a chain of node tasks over a 16 MiB array on one node's XLA
/// device: (results kept on the device, results made host copies, the program alone run
/// directly on `device`), runs alternating.
fn node_chain_millis(device: &XlaDevice) -> Result<(f64, f64, f64)> {
    const STEPS: usize = 20;
    let rt = Runtime::local()?;
    let cluster = Cluster::start(&rt, ClusterConfig::default())?;
    cluster.launch(&LocalProcesses::new(1))?;
    cluster.wait_for_nodes(1, Duration::from_secs(30))?;
    let options = TaskOptions::new().on_xla();
    let chain = |step: &dyn Fn(&Ref<XlaArray>) -> Ref<XlaArray>| -> Result<f64> {
        let mut x = ones_on_xla::spawn_with(&rt, options);
        rt.blocking_wait(std::slice::from_ref(&x), 1, None);
        let start = Instant::now();
        for _ in 0..STEPS {
            x = step(&x);
        }
        rt.blocking_wait(std::slice::from_ref(&x), 1, None);
        let millis = start.elapsed().as_secs_f64() / STEPS as f64 * 1e3;
        let first = x.blocking_get()?.to_host::<f32>()?[0];
        ensure!(first == 1.0, "an even number of negations of 1 gave {first}");
        Ok(millis)
    };
    let negate = device.compile(&negate_program())?;
    let direct = || -> Result<f64> {
        let mut x = device.upload(&vec![1.0f32; NODE_CHAIN_LEN], &[NODE_CHAIN_LEN])?;
        let start = Instant::now();
        for _ in 0..STEPS {
            x = negate.run(&[&x])?.remove(0);
        }
        let first = x.download::<f32>()?[0];
        ensure!(first == 1.0, "an even number of negations of 1 gave {first}");
        Ok(start.elapsed().as_secs_f64() / STEPS as f64 * 1e3)
    };
    let (mut on_device, mut to_host, mut alone) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        on_device.push(chain(&|x| negate_on_xla::spawn_with(&rt, options, x))?);
        to_host.push(chain(&|x| negate_to_host::spawn_with(&rt, options, x))?);
        alone.push(direct()?);
    }
    rt.shutdown();
    Ok((median(&mut on_device), median(&mut to_host), median(&mut alone)))
}

fn actor_call_micros(actor: &XlaActor) -> Result<(f64, f64)> {
    const CHAIN: usize = 2000;
    let program = "func.func @main(%x: tensor<16xf32>) -> tensor<16xf32> {\n  \
                   %0 = stablehlo.negate %x : tensor<16xf32>\n  return %0 : tensor<16xf32>\n}\n";
    let data: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let device = actor.device();
    let exe = device.compile(program)?;
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
    Ok((median(&mut direct), median(&mut through_actor)))
}

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    // One client in this process: the runtime's XLA actor's, which the executors and
    // trainers share.
    let rt = Runtime::local()?;
    let actor = XlaActor::get(&rt).context("opening the XLA device")?;
    let device = actor.device();
    reporter.report("xla/gemm_f32_1024_gflops", gemm_gflops(&device, 1024)?, "GFLOP/s", true);
    let (on_device, to_host, alone) = node_chain_millis(&device)?;
    reporter.report("xla/node_chain_16MiB_on_device_ms", on_device, "ms", false);
    reporter.report("xla/node_chain_16MiB_via_host_ms", to_host, "ms", false);
    reporter.report("xla/negate_16MiB_direct_ms", alone, "ms", false);
    let (direct, through_actor) = actor_call_micros(&actor)?;
    reporter.report("xla/call_direct_us", direct, "us", false);
    reporter.report("xla/call_through_actor_us", through_actor, "us", false);
    let make_trainer = |model, state: &TrainState| Ok(XlaTrainer::new(device.clone(), model, state)?);
    digits_cases(reporter, "xla", (3, 1), &make_trainer)?;
    text_cases(reporter, "xla", &make_trainer)?;
    // The same GCN as the `nn` suite's (the sparse product as gather and scatter).
    super::nn::gcn_case(reporter, "xla/gcn_20k_train_steps_per_s", |graph| {
        XlaExecutor::new(device.clone(), graph)
    })?;
    rt.shutdown();
    Ok(())
}
