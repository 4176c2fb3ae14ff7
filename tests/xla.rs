//! XLA device tests (feature `xla`): the same graphs on the CPU executor and on the PJRT CPU
//! plugin that `scripts/install-deps.sh` installs (or the plugin `TESSERA_PJRT_PLUGIN`
//! names) give the same values and gradients, train to the same accuracy, and report what
//! they cannot run as errors.
#![cfg(feature = "xla")]

use anyhow::Result;
use tessera::nn::{
    char_gru, lenet, mlp, tiny_transformer, window_count, Activation, CpuExecutor, DType, Dataset, Evaluator,
    Executor, Graph, Init, NnError, NodeId, Op, OptimizerConfig, Params, Rng, TextCorpus, TrainState,
    Trainer, TransformerConfig, XlaExecutor, XlaTrainer,
};
use tessera::{XlaActor, XlaArray, XlaDevice, XlaElementType, XlaError};

fn device() -> XlaDevice {
    XlaDevice::open_default().expect("the PJRT CPU plugin (scripts/install-deps.sh installs it)")
}

fn close(what: &str, got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len(), "{what}: lengths");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!((g - e).abs() <= 1e-4 + 1e-3 * e.abs(), "{what}[{i}]: XLA {g}, CPU {e}");
    }
}

/// Sets the same inputs on both executors: normal f32 values, and ids below the class
/// count or vocabulary of the op that reads them.
fn set_inputs(graph: &Graph, last: NodeId, rng: &mut Rng, execs: &mut [&mut dyn Executor]) {
    for id in ids(graph, last) {
        let node = &graph.nodes()[id.index()];
        if !matches!(node.op, Op::Input) {
            continue;
        }
        match node.dtype {
            DType::I32 => {
                let limit = graph
                    .nodes()
                    .iter()
                    .find_map(|n| match n.op {
                        Op::SoftmaxCrossEntropy if n.inputs[1] == id => {
                            Some(graph.nodes()[n.inputs[0].index()].shape[1])
                        }
                        Op::Embedding if n.inputs[0] == id => {
                            Some(graph.nodes()[n.inputs[1].index()].shape[0])
                        }
                        Op::SparseMatMul if n.inputs[0] == id => Some(n.shape[0]),
                        Op::SparseMatMul if n.inputs[1] == id => {
                            Some(graph.nodes()[n.inputs[3].index()].shape[0])
                        }
                        _ => None,
                    })
                    .unwrap_or(1);
                let ids: Vec<i32> = (0..node.len()).map(|k| (k * 7 % limit) as i32).collect();
                for e in execs.iter_mut() {
                    e.set_ids(id, &ids).unwrap();
                }
            }
            _ => {
                let x: Vec<f32> = (0..node.len()).map(|_| rng.normal()).collect();
                for e in execs.iter_mut() {
                    e.set_value(id, &x).unwrap();
                }
            }
        }
    }
}

/// Forward and backward from `loss` on both executors; compares every f32 value, every
/// node gradient and every parameter gradient.
fn compare(graph: &Graph, loss: NodeId, training: bool, seed: u64) {
    let mut rng = Rng::seed(seed);
    let params = Params::init(graph, &mut rng);
    let mut cpu = CpuExecutor::new(graph);
    let mut xla = XlaExecutor::new(device(), graph);
    set_inputs(graph, loss, &mut rng, &mut [&mut cpu, &mut xla]);
    for exec in [&mut cpu as &mut dyn Executor, &mut xla] {
        exec.set_training(training);
        exec.set_seed(seed);
        exec.forward(&params, 0..loss.index() + 1).unwrap();
        exec.backward_from(&params, loss).unwrap();
    }
    let all = ids(graph, loss);
    assert_eq!(all.len(), loss.index() + 1, "every node is compared");
    for id in all {
        let node = &graph.nodes()[id.index()];
        let what = format!("node {} ({})", id.index(), node.name);
        if node.dtype == DType::F32 && !matches!(node.op, Op::Param { .. }) {
            close(&format!("{what} value"), xla.value(id).unwrap(), cpu.value(id).unwrap());
        }
        if let Ok(expected) = cpu.grad(id) {
            close(&format!("{what} gradient"), xla.grad(id).unwrap(), expected);
        }
    }
    for (index, spec) in graph.params().iter().enumerate() {
        close(&format!("{} gradient", spec.name), xla.param_grad(index), cpu.param_grad(index));
    }
}

/// Every node id of `graph` up to `last`: those its nodes read, the parameters', and `last`
/// (`NodeId`s are made only by graphs).
fn ids(graph: &Graph, last: NodeId) -> Vec<NodeId> {
    let mut ids: Vec<NodeId> = graph.nodes().iter().flat_map(|n| n.inputs.iter().copied()).collect();
    ids.extend(graph.params().iter().map(|p| p.node));
    ids.push(last);
    ids.retain(|id| id.index() <= last.index());
    ids.sort();
    ids.dedup();
    ids
}

#[test]
fn a_missing_plugin_is_a_clear_error() {
    let err = XlaDevice::open(std::path::Path::new("/nonexistent/pjrt.so")).unwrap_err();
    assert!(err.to_string().contains("no PJRT plugin at /nonexistent/pjrt.so"), "{err}");
}

#[test]
fn the_device_is_the_cpu_plugin() {
    // Unless TESSERA_PJRT_PLUGIN names another plugin (JAX's CUDA plugin: "cuda").
    if std::env::var_os("TESSERA_PJRT_PLUGIN").is_none() {
        assert_eq!(device().platform(), "cpu");
    }
}

#[test]
fn mlp_matches_the_cpu() {
    let model = mlp(8, &[12, 16, 5]).unwrap();
    compare(&model.graph, model.loss, true, 1);
}

#[test]
fn lenet_matches_the_cpu() {
    let model = lenet(4, 8, 10).unwrap();
    compare(&model.graph, model.loss, false, 2);
}

/// Dropout in training: the XLA executor drops the elements the CPU executor drops (the
/// masks come from the same seed).
#[test]
fn lenet_in_training_matches_the_cpu() {
    let model = lenet(4, 8, 10).unwrap();
    compare(&model.graph, model.loss, true, 5);
}

/// Every other op the XLA executor runs: a strided, padded convolution with a fused tanh,
/// overlapping max-pool windows, reshape, constant, broadcast add, matmul, sigmoid, softmax,
/// a linear layer with a fused sigmoid, layer norm, GELU, sub, mul, dropout (in evaluation,
/// then in training), an embedding, and an MSE loss beside the cross-entropy.
#[test]
fn every_op_matches_the_cpu() {
    let mut g = Graph::new();
    let x = g.input("x", &[2, 3, 7, 7], DType::F32);
    let w = g.param("w", &[4, 3, 3, 3], Init::Normal { std: 0.3 }).unwrap();
    let b = g.param("b", &[4], Init::Normal { std: 0.1 }).unwrap();
    let h = g.conv2d(x, w, b, 2, 1, Activation::Tanh).unwrap(); // [2, 4, 4, 4]
    let h = g.max_pool2d(h, 2, 1).unwrap(); // [2, 4, 3, 3]
    let h = g.reshape(h, &[2, 36]).unwrap();
    let c = g.constant(&[36], 0.25);
    let h = g.add(h, c).unwrap();
    let m = g.param("m", &[36, 6], Init::Normal { std: 0.2 }).unwrap();
    let h = g.matmul(h, m).unwrap();
    let bias = g.param("bias", &[6], Init::Normal { std: 0.2 }).unwrap();
    let h = g.add(h, bias).unwrap();
    let h = g.act(h, Activation::Sigmoid).unwrap();
    let h = g.softmax(h).unwrap();
    let w2 = g.param("w2", &[6, 5], Init::Normal { std: 0.5 }).unwrap();
    let b2 = g.param("b2", &[5], Init::Zeros).unwrap();
    let h = g.linear(h, w2, b2, Activation::Sigmoid).unwrap();
    let gamma = g.param("gamma", &[5], Init::Normal { std: 1.0 }).unwrap();
    let beta = g.param("beta", &[5], Init::Normal { std: 0.1 }).unwrap();
    let h = g.layer_norm(h, gamma, beta, 1e-5).unwrap();
    let h = g.gelu(h).unwrap();
    let ids = g.input("ids", &[2], DType::I32);
    let table = g.param("table", &[9, 5], Init::Normal { std: 0.5 }).unwrap();
    let e = g.embedding(ids, table).unwrap();
    let h = g.mul(h, e).unwrap();
    let h2 = g.act(h, Activation::Tanh).unwrap();
    let h = g.sub(h, h2).unwrap();
    let h = g.dropout(h, 0.5).unwrap();
    let labels = g.input("labels", &[2], DType::I32);
    let ce = g.softmax_cross_entropy(h, labels).unwrap();
    let target = g.input("target", &[2, 5], DType::F32);
    let mse = g.mse(h, target).unwrap();
    let both = g.add(ce, mse).unwrap();
    compare(&g, both, false, 3);
    compare(&g, both, true, 6);
}

/// A sparse matrix in coordinate form (repeated coordinates included) times a learned
/// dense one, with learned values: values and gradients of both, as on the CPU.
#[test]
fn sparse_matmul_matches_the_cpu() {
    let mut g = Graph::new();
    let rows = g.input("rows", &[17], DType::I32);
    let cols = g.input("cols", &[17], DType::I32);
    let values = g.param("values", &[17], Init::Normal { std: 1.0 }).unwrap();
    let x = g.param("x", &[6, 4], Init::Normal { std: 1.0 }).unwrap();
    let y = g.sparse_matmul(rows, cols, values, x, 5).unwrap();
    let h = g.act(y, Activation::Tanh).unwrap();
    let target = g.input("target", &[5, 4], DType::F32);
    let loss = g.mse(h, target).unwrap();
    compare(&g, loss, false, 4);
    // The zoo's GCN: two propagations and the pick of the labelled nodes' logits.
    let model = tessera::nn::gcn(12, 30, 5, 7, 3, 4).unwrap();
    compare(&model.graph, model.loss, false, 5);
}

/// A GCN on a graph of 20 000 nodes and 120 000 adjacency entries: the sparse product is
/// lowered to gather and scatter (memory in entries × features), so it compiles and runs
/// as on the CPU. (Lowered through one-hot products, it needed two 120 000 × 20 000
/// matrices, 9.6 GB each.)
#[test]
fn a_gcn_on_a_large_graph_matches_the_cpu() {
    let model = tessera::nn::gcn(20_000, 120_000, 16, 16, 4, 500).unwrap();
    compare(&model.graph, model.loss, false, 6);
}

/// A pipeline stage's calls: forward over a middle range with its stage input set, and
/// backward seeded with the output's gradient, as on the CPU.
#[test]
fn a_stage_range_runs_as_on_the_cpu() {
    let model = mlp(4, &[6, 8, 8, 3]).unwrap();
    let g = &model.graph;
    let mut rng = Rng::seed(4);
    let params = Params::init(g, &mut rng);
    // The second linear layer as a stage.
    let linears: Vec<usize> = g
        .nodes()
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.op, Op::Linear { .. }))
        .map(|(i, _)| i)
        .collect();
    let stage = linears[0] + 1..linears[1] + 1;
    let inputs = g.stage_inputs(stage.clone());
    let outputs = ids(g, model.loss)[linears[1]];
    let mut cpu = CpuExecutor::new(g);
    let mut xla = XlaExecutor::new(device(), g);
    let act: Vec<f32> = (0..g.nodes()[inputs[0].index()].len()).map(|_| rng.normal()).collect();
    let seed: Vec<f32> = (0..g.nodes()[outputs.index()].len()).map(|_| rng.normal()).collect();
    for exec in [&mut cpu as &mut dyn Executor, &mut xla] {
        exec.set_value(inputs[0], &act).unwrap();
        exec.forward(&params, stage.clone()).unwrap();
        exec.backward(&params, stage.clone(), &[(outputs, &seed)]).unwrap();
    }
    close("stage output", xla.value(outputs).unwrap(), cpu.value(outputs).unwrap());
    close("stage input gradient", xla.grad(inputs[0]).unwrap(), cpu.grad(inputs[0]).unwrap());
    for p in g.stage_params(stage) {
        close("stage parameter gradient", xla.param_grad(p), cpu.param_grad(p));
    }
}

/// The sequence ops: attention (causal and not), time-step selection and stacking, a GRU
/// cell, in evaluation and in training.
#[test]
fn sequence_ops_match_the_cpu() {
    let mut g = Graph::new();
    let x = g.input("x", &[2, 4, 6], DType::F32);
    let wq = g.param("wq", &[6, 6], Init::Normal { std: 0.4 }).unwrap();
    let bq = g.param("bq", &[6], Init::Normal { std: 0.1 }).unwrap();
    let q = g.linear(x, wq, bq, Activation::Identity).unwrap();
    let a = g.attention(q, x, x, 2, true).unwrap();
    let a = g.attention(a, q, a, 3, false).unwrap();
    let (wx, bx) = (
        g.param("wx", &[6, 9], Init::Normal { std: 0.4 }).unwrap(),
        g.param("bx", &[9], Init::Zeros).unwrap(),
    );
    let (wh, bh) = (
        g.param("wh", &[3, 9], Init::Normal { std: 0.4 }).unwrap(),
        g.param("bh", &[9], Init::Normal { std: 0.1 }).unwrap(),
    );
    let mut h = g.constant(&[2, 3], 0.0);
    let mut steps = Vec::new();
    for t in 0..4 {
        let xt = g.select_step(a, t).unwrap();
        let gx = g.linear(xt, wx, bx, Activation::Identity).unwrap();
        h = g.gru_cell(gx, h, wh, bh).unwrap();
        steps.push(h);
    }
    let seq = g.stack_steps(&steps).unwrap();
    let flat = g.reshape(seq, &[8, 3]).unwrap();
    let labels = g.input("labels", &[8], DType::I32);
    let loss = g.softmax_cross_entropy(flat, labels).unwrap();
    compare(&g, loss, false, 7);
}

#[test]
fn char_gru_matches_the_cpu() {
    let model = char_gru(3, 5, 11, 4, 6).unwrap();
    compare(&model.graph, model.loss, true, 8);
}

#[test]
fn tiny_transformer_matches_the_cpu() {
    let cfg = TransformerConfig { width: 8, heads: 2, layers: 2, ff: 16 };
    let model = tiny_transformer(2, 6, 11, cfg).unwrap();
    compare(&model.graph, model.loss, true, 9);
}

/// A language model trains on XLA as on the CPU: the same losses, epoch by epoch.
#[test]
fn char_gru_trains_on_xla_as_on_the_cpu() -> Result<()> {
    let corpus = TextCorpus::from_text(&"the quick brown fox jumps over the lazy dog. ".repeat(20));
    let (batch, steps) = (8, 16);
    let model = char_gru(batch, steps, corpus.vocab_size(), 8, 16)?;
    let windows = window_count(corpus.ids.len(), steps);
    let mut cpu_state = TrainState::new(&model, OptimizerConfig::adam(1e-2), windows, batch, 3);
    let mut xla_state = cpu_state.clone();
    let mut cpu = Trainer::new(model.clone());
    let mut xla = XlaTrainer::new(device(), model, &xla_state)?;
    let mut last = f32::INFINITY;
    for epoch in 0..4 {
        let c = cpu.train_epoch_text(&mut cpu_state, &corpus.ids, steps)?;
        let x = xla.train_epoch_text(&mut xla_state, &corpus.ids, steps)?;
        assert!(
            (c.loss - x.loss).abs() < 2e-3 * c.loss.max(1.0),
            "epoch {epoch}: XLA {} vs CPU {}",
            x.loss,
            c.loss
        );
        assert_eq!(c.samples, x.samples);
        last = x.loss;
    }
    let unigram = corpus.unigram_cross_entropy(&corpus.ids, &corpus.ids);
    assert!(last < unigram, "the XLA-trained model ({last}) beats unigram frequencies ({unigram})");
    Ok(())
}

#[test]
fn bad_inputs_are_errors_not_panics() -> Result<()> {
    let model = mlp(2, &[3, 4, 2])?;
    let params = Params::init(&model.graph, &mut Rng::seed(1));
    let mut xla = XlaExecutor::new(device(), &model.graph);
    // Wrong lengths and types.
    assert!(matches!(xla.set_value(model.input, &[1.0; 5]), Err(NnError::Length { .. })));
    assert!(matches!(xla.set_ids(model.input, &[1; 6]), Err(NnError::DType { .. })));
    // Inputs not set.
    let err = xla.forward(&params, 0..model.loss.index() + 1).unwrap_err();
    assert!(matches!(err, NnError::MissingValue { .. }), "{err}");
    // A label outside the classes.
    xla.set_value(model.input, &[0.5; 6])?;
    xla.set_ids(model.target, &[0, 2])?;
    let err = xla.forward(&params, 0..model.loss.index() + 1).unwrap_err();
    assert!(matches!(err, NnError::IdOutOfRange { id: 2, position: 1, limit: 2, .. }), "{err}");
    // Parameters of another model.
    let other = Params::init(&mlp(2, &[3, 5, 2])?.graph, &mut Rng::seed(1));
    xla.set_ids(model.target, &[0, 1])?;
    let err = xla.forward(&other, 0..model.loss.index() + 1).unwrap_err();
    assert!(matches!(err, NnError::ParamMismatch { .. }), "{err}");
    // Backward before forward.
    let err = xla.backward_from(&params, model.loss).unwrap_err();
    assert!(matches!(err, NnError::MissingValue { .. }), "{err}");
    Ok(())
}

fn digits() -> Dataset {
    Dataset::digits(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv")).unwrap()
}

/// Three optimizer steps on XLA (SGD with momentum, Adam, AdamW with weight decay; the
/// update runs on the device) give the CPU trainer's losses, and after `sync_state` its
/// parameters and moments; the step is compiled once.
#[test]
fn steps_match_the_cpu_trainer() -> Result<()> {
    let data = digits();
    for config in
        [OptimizerConfig::sgd(0.1, 0.9), OptimizerConfig::adam(1e-2), OptimizerConfig::adamw(1e-2, 0.1)]
    {
        let model = mlp(32, &[64, 32, 10])?;
        let mut cpu_state = TrainState::new(&model, config.clone(), data.len(), 32, 5);
        let mut xla_state = cpu_state.clone();
        let indices: Vec<usize> = (0..32).collect();
        let (mut x, mut y) = (vec![0f32; 32 * 64], vec![0i32; 32]);
        data.gather(&indices, &mut x, &mut y);
        let mut cpu = Trainer::new(model.clone());
        let mut xla = XlaTrainer::new(device(), model.clone(), &xla_state)?;
        for _ in 0..3 {
            cpu.executor().set_value(model.input, &x)?;
            cpu.executor().set_ids(model.target, &y)?;
            let cpu_loss = cpu.step(&mut cpu_state)?;
            xla.executor().set_value(model.input, &x)?;
            xla.executor().set_ids(model.target, &y)?;
            let xla_loss = xla.step(&mut xla_state)?;
            assert!((cpu_loss - xla_loss).abs() < 1e-4, "{config:?}: loss {xla_loss} vs {cpu_loss}");
        }
        assert_eq!(xla.executor().compiled_programs(), 1);
        xla.sync_state(&mut xla_state)?;
        assert_eq!(
            (xla_state.step, xla_state.optimizer.steps, xla_state.rng.clone()),
            (cpu_state.step, cpu_state.optimizer.steps, cpu_state.rng.clone())
        );
        // Adam moves each parameter by about ±lr whatever the gradient's size, so an element
        // whose gradient is rounding noise may move the other way: allow one element in a
        // thousand to differ (SGD: none).
        let allowed =
            if matches!(config, OptimizerConfig::Sgd { .. }) { 0 } else { xla_state.params.count() / 1000 };
        let mut differ = 0;
        for (t, (a, b)) in xla_state.params.tensors.iter().zip(&cpu_state.params.tensors).enumerate() {
            for (i, (a, b)) in a.data.iter().zip(&b.data).enumerate() {
                if (a - b).abs() > 1e-4 + 1e-3 * b.abs() {
                    differ += 1;
                    eprintln!("{config:?}: parameter {t}[{i}]: XLA {a}, CPU {b}");
                }
            }
        }
        assert!(differ <= allowed, "{config:?}: {differ} parameter elements differ (allowed {allowed})");
    }
    Ok(())
}

/// A state that does not fit the model is an error when the trainer is made, and a state
/// of another optimizer kind is an error at the step.
#[test]
fn a_state_that_does_not_fit_is_an_error() -> Result<()> {
    let model = mlp(4, &[6, 5, 3])?;
    let other = mlp(4, &[6, 7, 3])?;
    let foreign = TrainState::new(&other, OptimizerConfig::adam(1e-3), 16, 4, 1);
    let err = XlaTrainer::new(device(), model.clone(), &foreign).unwrap_err();
    assert!(matches!(err, NnError::ParamMismatch { .. }), "{err}");
    let sgd = TrainState::new(&model, OptimizerConfig::sgd(0.1, 0.9), 16, 4, 1);
    let mut xla = XlaTrainer::new(device(), model.clone(), &sgd)?;
    let mut adam = TrainState::new(&model, OptimizerConfig::adam(1e-3), 16, 4, 1);
    xla.executor().set_value(model.input, &[0.5; 24])?;
    xla.executor().set_ids(model.target, &[0, 1, 2, 0])?;
    let err = xla.step(&mut adam).unwrap_err();
    assert!(matches!(err, NnError::Argument { op: "XlaTrainer::step", .. }), "{err}");
    assert_eq!(adam.step, 0, "a refused step changes nothing");
    Ok(())
}

/// The MLP and the CNN train on digits on XLA to the accuracy the CPU reaches.
#[test]
fn mlp_and_cnn_train_on_digits() -> Result<()> {
    let (train, test) = digits().split(0.2, 42);
    for (name, model, eval, epochs) in [
        ("mlp", mlp(32, &[64, 128, 64, 10])?, mlp(test.len(), &[64, 128, 64, 10])?, 15),
        ("cnn", lenet(32, 8, 10)?, lenet(test.len(), 8, 10)?, 10),
    ] {
        let config = OptimizerConfig::adam(3e-3);
        let mut cpu_state = TrainState::new(&model, config.clone(), train.len(), 32, 1);
        let mut xla_state = cpu_state.clone();
        let mut cpu = Trainer::new(model.clone());
        let mut xla = XlaTrainer::new(device(), model.clone(), &xla_state)?;
        for _ in 0..epochs {
            cpu.train_epoch(&mut cpu_state, &train)?;
            let stats = xla.train_epoch(&mut xla_state, &train)?;
            assert!(stats.loss.is_finite() && stats.samples > 0, "{stats:?}");
        }
        let mut evaluator = Evaluator::new(eval);
        let cpu_acc = evaluator.classify(&cpu_state.params, &test)?.accuracy;
        let xla_acc = evaluator.classify(&xla_state.params, &test)?.accuracy;
        eprintln!("{name}: test accuracy CPU {cpu_acc:.4}, XLA {xla_acc:.4}");
        assert!(xla_acc > 0.9, "{name}: XLA-trained accuracy {xla_acc}");
        assert!((xla_acc - cpu_acc).abs() < 0.03, "{name}: XLA {xla_acc} vs CPU {cpu_acc}");
    }
    Ok(())
}

// The XLA device actor: programs chain on the device through `Ref<XlaArray>`s.

/// `main(a, b) = (a·b, a + b)` on 2×2 f32 matrices.
const PRODUCT_AND_SUM: &str = r#"
func.func @main(%a: tensor<2x2xf32>, %b: tensor<2x2xf32>) -> (tensor<2x2xf32>, tensor<2x2xf32>) {
  %0 = "stablehlo.dot_general"(%a, %b) {dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [1], rhs_contracting_dimensions = [0]>} : (tensor<2x2xf32>, tensor<2x2xf32>) -> tensor<2x2xf32>
  %1 = stablehlo.add %a, %b : tensor<2x2xf32>
  return %0, %1 : tensor<2x2xf32>, tensor<2x2xf32>
}
"#;

/// `main(x) = x · x` elementwise on 3 i32s.
const SQUARE_I32: &str = r#"
func.func @main(%x: tensor<3xi32>) -> tensor<3xi32> {
  %0 = stablehlo.multiply %x, %x : tensor<3xi32>
  return %0 : tensor<3xi32>
}
"#;

tessera::task! {
    fn no_array() -> Result<tessera::XlaArray, String> { Err("no data today".into()) }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let start = std::time::Instant::now();
    while !done() {
        anyhow::ensure!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "timed out waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// A program's outputs are device-resident arrays that the next call takes as they are: no
/// copy in, the same buffer on every read, and the memory freed with the last handle.
#[test]
fn programs_chain_on_the_xla_actor_without_host_copies() -> Result<()> {
    let rt = tessera::Runtime::local()?;
    let xla = XlaActor::get(&rt)?;
    if std::env::var_os("TESSERA_PJRT_PLUGIN").is_none() {
        assert_eq!(xla.platform(), "cpu");
    }
    let program = xla.compile(PRODUCT_AND_SUM)?;
    assert_eq!(program.outputs(), 2);
    let a = xla.upload(vec![1.0f32, 2.0, 3.0, 4.0], vec![2, 2]);
    let b = xla.upload(vec![5.0f32, 6.0, 7.0, 8.0], vec![2, 2]);
    let first = xla.call(&program, &[a.clone(), b.clone()]);
    let second = xla.call(&xla.compile(PRODUCT_AND_SUM)?, &first);
    let (product, sum) = (second[0].blocking_get()?, second[1].blocking_get()?);
    assert_eq!(product.to_host::<f32>()?, vec![334.0, 416.0, 758.0, 944.0]);
    assert_eq!(sum.to_host::<f32>()?, vec![25.0, 30.0, 53.0, 62.0]);
    assert_eq!(first[0].blocking_get()?.to_host::<f32>()?, vec![19.0, 22.0, 43.0, 50.0]);
    assert_eq!((product.dims(), product.element_type()), (&[2, 2][..], XlaElementType::F32));
    assert!(product.is_on(&xla) && product.is_on_device());
    assert!(product.same_buffer(&second[0].blocking_get()?), "a second read is the same buffer");
    assert_eq!(xla.copies_in(), 0, "every input was already on the device");
    // Six live arrays of 16 bytes: a, b and both calls' two outputs.
    assert_eq!(xla.live_bytes(), 6 * 16);
    // The object table counts a device array at its data's size, without encoding it
    // (which would copy it to the host and count its header too).
    assert_eq!(rt.stats().live_bytes, 6 * 16);
    let put = rt.put(product.clone());
    assert_eq!(rt.stats().live_bytes, 7 * 16);
    drop(put);
    assert!(matches!(product.to_host::<i32>(), Err(XlaError::ElementType { .. })));
    drop((a, b, first, second, product, sum));
    wait_until("every buffer is freed", || xla.live_bytes() == 0)?;
    rt.shutdown();
    Ok(())
}

/// Arrays staged on the host, and arrays of another actor (another runtime's client), are
/// copied in once each and counted; a program runs only on the actor that compiled it.
#[test]
fn host_and_foreign_arrays_are_copied_in_and_counted() -> Result<()> {
    let rt = tessera::Runtime::local()?;
    let xla = XlaActor::get(&rt)?;
    let square = xla.compile(SQUARE_I32)?;
    let staged = rt.put(XlaArray::from_host(vec![1i32, -2, 3], vec![3])?);
    let squared = xla.call(&square, &[staged]).remove(0).blocking_get()?;
    assert_eq!(squared.to_host::<i32>()?, vec![1, 4, 9]);
    assert_eq!(xla.copies_in(), 1);

    // The runtime keeps its actor: getting it again (as the next task would) finds the same
    // one, with its count and compiled programs.
    drop(xla);
    let xla = XlaActor::get(&rt)?;
    assert_eq!(xla.copies_in(), 1);

    let other_rt = tessera::Runtime::local()?;
    let other = XlaActor::get(&other_rt)?;
    let theirs = other.upload(vec![4i32, 5, 6], vec![3]);
    assert!(!theirs.blocking_get()?.is_on(&xla));
    let ours = xla.call(&square, std::slice::from_ref(&theirs)).remove(0).blocking_get()?;
    assert_eq!(ours.to_host::<i32>()?, vec![16, 25, 36]);
    assert!(ours.is_on(&xla));
    assert_eq!((xla.copies_in(), other.copies_in()), (2, 0));

    let foreign_program = other.compile(SQUARE_I32)?;
    let error = xla.call(&foreign_program, &[theirs]).remove(0).blocking_get().unwrap_err();
    assert!(error.to_string().contains("compiled by another XLA actor"), "{error}");
    other_rt.shutdown();
    rt.shutdown();
    Ok(())
}

/// Bad calls fail their outputs with the reason; the actor keeps serving.
#[test]
fn bad_calls_fail_their_outputs_not_the_actor() -> Result<()> {
    let rt = tessera::Runtime::local()?;
    let xla = XlaActor::get(&rt)?;
    let program = xla.compile(PRODUCT_AND_SUM)?;
    let square = xla.compile(SQUARE_I32)?;
    let matrix = xla.upload(vec![1.0f32; 4], vec![2, 2]);
    let vector = xla.upload(vec![1.0f32; 3], vec![3]);

    let wrong_shape = xla.call(&program, &[matrix.clone(), vector.clone()]);
    for output in &wrong_shape {
        let error = output.blocking_get().unwrap_err();
        let name = format!("xla:{}", xla.platform());
        assert!(matches!(error, tessera::Error::TaskFailed { ref task, .. } if *task == name), "{error}");
    }
    let error = xla.call(&program, std::slice::from_ref(&matrix)).remove(0).blocking_get().unwrap_err();
    assert!(error.to_string().contains("takes 2 arguments, got 1"), "{error}");
    let error = xla.call(&square, std::slice::from_ref(&vector)).remove(0).blocking_get().unwrap_err();
    assert!(error.to_string().contains("main declares i32, the array holds f32"), "{error}");

    let failed_input = no_array::spawn(&rt);
    let error = xla.call(&square, &[failed_input]).remove(0).blocking_get().unwrap_err();
    assert!(matches!(error, tessera::Error::DependencyFailed { .. }), "{error}");
    assert!(error.root_cause().to_string().contains("no data today"), "{error}");

    let panicked = xla.run(std::slice::from_ref(&vector), |_, _| panic!("work that panics"));
    assert!(matches!(panicked.blocking_get(), Err(tessera::Error::TaskPanicked { .. })));
    let error = xla.compile("func.func @main( not mlir").unwrap_err();
    assert!(matches!(error, XlaError::Call { call: "PJRT_Client_Compile", .. }), "{error}");
    assert!(matches!(XlaArray::from_host(vec![1.0f32; 3], vec![2, 2]), Err(XlaError::Length { .. })));

    // Still serving: a closure over the device makes an array from its input.
    let doubled = xla.run(&[vector], |scope, inputs| {
        let data: Vec<f32> = inputs[0].to_host()?;
        scope.upload(&data.iter().map(|x| 2.0 * x).collect::<Vec<_>>(), &[3])
    });
    assert_eq!(doubled.blocking_get()?.to_host::<f32>()?, vec![2.0; 3]);
    rt.shutdown();
    Ok(())
}

/// The actor keeps the programs used last, up to its cache's capacity; a program the cache
/// dropped still runs through the handle it was given, and compiles again when asked.
#[test]
fn the_program_cache_is_bounded() -> Result<()> {
    let rt = tessera::Runtime::local()?;
    let xla = XlaActor::get(&rt)?;
    assert_eq!(xla.cached_programs(), 0);
    xla.set_program_cache(1);
    let square = xla.compile(SQUARE_I32)?;
    let product = xla.compile(PRODUCT_AND_SUM)?;
    assert_eq!(xla.cached_programs(), 1, "the capacity is one program");
    let x = xla.upload(vec![3i32, -1, 2], vec![3]);
    let squared = xla.call(&square, std::slice::from_ref(&x)).remove(0);
    assert_eq!(squared.blocking_get()?.to_host::<i32>()?, vec![9, 1, 4]);
    let again = xla.compile(SQUARE_I32)?;
    assert_eq!(xla.call(&again, &[squared]).remove(0).blocking_get()?.to_host::<i32>()?, vec![81, 1, 16]);
    assert_eq!(product.outputs(), 2);
    xla.set_program_cache(tessera::DEFAULT_XLA_PROGRAM_CACHE);
    xla.compile(PRODUCT_AND_SUM)?;
    assert_eq!(xla.cached_programs(), 2);
    rt.shutdown();
    Ok(())
}

/// A trainer built on the actor's device shares the actor's client (one client of the
/// plugin in the process), trains exactly as a trainer on a client of its own, and the
/// actor keeps serving calls from another thread meanwhile.
#[test]
fn a_trainer_on_the_actors_device_shares_its_client() -> Result<()> {
    let rt = tessera::Runtime::local()?;
    let xla = XlaActor::get(&rt)?;
    let shared = xla.device();
    assert!(shared.shares_client(&XlaActor::get(&rt)?.device()), "the runtime's actor has one client");
    let own = device();
    assert!(!own.shares_client(&shared));

    let data = digits();
    let model = mlp(32, &[64, 32, 10])?;
    let state = TrainState::new(&model, OptimizerConfig::adam(1e-2), data.len(), 32, 5);
    let (mut on_actor_state, mut own_state) = (state.clone(), state);
    let mut on_actor = XlaTrainer::new(shared, model.clone(), &on_actor_state)?;
    let mut alone = XlaTrainer::new(own, model, &own_state)?;
    let calls = {
        let xla = xla.clone();
        std::thread::spawn(move || -> Result<()> {
            let square = xla.compile(SQUARE_I32)?;
            let mut x = xla.upload(vec![1i32, -1, 1], vec![3]);
            for _ in 0..50 {
                x = xla.call(&square, &[x]).remove(0);
            }
            anyhow::ensure!(x.blocking_get()?.to_host::<i32>()? == vec![1, 1, 1]);
            Ok(())
        })
    };
    let on_actor_epoch = on_actor.train_epoch(&mut on_actor_state, &data)?;
    calls.join().map_err(|_| anyhow::anyhow!("the calling thread panicked"))??;
    let alone_epoch = alone.train_epoch(&mut own_state, &data)?;
    assert_eq!(on_actor_epoch.loss.to_bits(), alone_epoch.loss.to_bits());
    for (a, b) in on_actor_state.params.tensors.iter().zip(&own_state.params.tensors) {
        assert!(a.data.iter().zip(&b.data).all(|(a, b)| a.to_bits() == b.to_bits()), "parameters differ");
    }
    rt.shutdown();
    Ok(())
}
