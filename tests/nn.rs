//! Tests of `tessera::nn`: every op's gradient against finite differences, shape errors,
//! pipeline stages, accuracy on the digits data, a character model against the unigram
//! baseline, and bit-identical checkpoint resume.
use std::path::PathBuf;

use tessera::nn::{
    char_gru, lenet, mlp, resume, resume_from_stash, save_checkpoint, save_to_stash, window_count,
    Activation, CpuExecutor, DType, Dataset, DirStore, Evaluator, Executor, Graph, Init, NnError, NodeId,
    OptimizerConfig, Params, Rng, TextCorpus, TrainState, Trainer,
};

fn digits() -> Dataset {
    Dataset::digits(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv")).expect("digits.csv is committed")
}

// ---------------------------------------------------------------------------------------
// Gradient checks
// ---------------------------------------------------------------------------------------

/// What a gradient-check case builds: the output to check, plus i32 inputs to fill.
struct Case {
    out: NodeId,
    ids: Vec<(NodeId, Vec<i32>)>,
    training: bool,
}

fn param(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
    g.param(name, shape, Init::Normal { std: 1.0 }).unwrap()
}

fn dim(rng: &mut Rng, lo: usize, hi: usize) -> usize {
    lo + rng.below(hi - lo + 1)
}

/// Builds the case, reduces its output to a scalar loss (MSE against a random target unless
/// the output is already a scalar), and compares every parameter's analytic gradient with
/// central finite differences at up to 12 sampled elements per parameter.
fn gradcheck(name: &str, seed: u64, build: impl Fn(&mut Graph, &mut Rng) -> Case) {
    let mut rng = Rng::seed(seed);
    let mut g = Graph::new();
    let case = build(&mut g, &mut rng);
    let out_shape = g.shape(case.out).unwrap().to_vec();
    let mut target_val = None;
    let loss = if out_shape.is_empty() {
        case.out
    } else {
        let t = g.input("target", &out_shape, DType::F32);
        let n: usize = out_shape.iter().product();
        target_val = Some((t, (0..n).map(|_| rng.normal()).collect::<Vec<f32>>()));
        g.mse(case.out, t).unwrap()
    };
    let mut params = Params::init(&g, &mut rng);
    let mut exec = CpuExecutor::new(&g);
    exec.set_training(case.training);
    for (node, ids) in &case.ids {
        exec.set_ids(*node, ids).unwrap();
    }
    if let Some((t, v)) = &target_val {
        exec.set_value(*t, v).unwrap();
    }
    let eval = |exec: &mut CpuExecutor, params: &Params| -> f64 {
        exec.set_seed(99);
        exec.forward_all(params).unwrap();
        exec.scalar(loss).unwrap() as f64
    };
    eval(&mut exec, &params);
    exec.backward_from(&params, loss).unwrap();
    let analytic: Vec<Vec<f32>> = (0..params.tensors.len()).map(|i| exec.param_grad(i).to_vec()).collect();
    let eps = 1e-2f32;
    let mut checked = 0;
    for (p, grad) in analytic.iter().enumerate() {
        let len = params.tensors[p].len();
        let picks: Vec<usize> =
            if len <= 12 { (0..len).collect() } else { (0..12).map(|_| rng.below(len)).collect() };
        for i in picks {
            let orig = params.tensors[p].data[i];
            params.tensors[p].data[i] = orig + eps;
            let up = eval(&mut exec, &params);
            params.tensors[p].data[i] = orig - eps;
            let down = eval(&mut exec, &params);
            params.tensors[p].data[i] = orig;
            let numeric = (up - down) / (2.0 * eps as f64);
            let a = grad[i] as f64;
            // Central differences in f32 with eps 1e-2 agree to about 2.5e-4 + 1e-3 relative
            // on every op here; twice that leaves headroom for other CPUs' rounding while
            // still catching a wrong coefficient in a derivative (checked by mutation).
            let tol = 5e-4 + 2e-3 * numeric.abs().max(a.abs());
            assert!(
                (numeric - a).abs() <= tol,
                "{name}: param {} `{}` element {i}: analytic {a:.6} vs numeric {numeric:.6}",
                p,
                g.params()[p].name
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "{name}: nothing was checked");
}

fn plain(out: NodeId) -> Case {
    Case { out, ids: vec![], training: false }
}

/// Cross-entropy of a label whose probability underflows f32 is the exact loss
/// (log-sum-exp minus the label's logit), as XLA computes it, not a clamped one.
#[test]
fn cross_entropy_of_an_underflowed_probability_is_exact() {
    let mut g = Graph::new();
    let logits = g.input("logits", &[2, 3], DType::F32);
    let labels = g.input("labels", &[2], DType::I32);
    let loss = g.softmax_cross_entropy(logits, labels).unwrap();
    let params = Params::init(&g, &mut Rng::seed(1));
    let mut cpu = CpuExecutor::new(&g);
    cpu.set_value(logits, &[0.0, 0.0, -200.0, 1.0, 2.0, 3.0]).unwrap();
    cpu.set_ids(labels, &[2, 2]).unwrap();
    cpu.forward_all(&params).unwrap();
    let ordinary = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln() - 3.0;
    let expected = ((200.0 + 2f64.ln()) + ordinary) / 2.0;
    let got = cpu.value(loss).unwrap()[0] as f64;
    assert!((got - expected).abs() < 1e-3, "{got} vs {expected}");
}

#[test]
fn gradients_match_finite_differences() {
    for seed in 0..3u64 {
        gradcheck("matmul", seed, |g, r| {
            let (m, k, n) = (dim(r, 1, 5), dim(r, 1, 6), dim(r, 1, 5));
            let a = param(g, "a", &[m, k]);
            let b = param(g, "b", &[k, n]);
            plain(g.matmul(a, b).unwrap())
        });
        for act in [Activation::Identity, Activation::Relu, Activation::Sigmoid, Activation::Tanh] {
            gradcheck("linear", seed, |g, r| {
                let (m, k, n) = (dim(r, 1, 6), dim(r, 1, 7), dim(r, 1, 5));
                let x = param(g, "x", &[2, m, k]);
                let w = param(g, "w", &[k, n]);
                let b = param(g, "b", &[n]);
                plain(g.linear(x, w, b, act).unwrap())
            });
            gradcheck("activation", seed, |g, r| {
                let x = param(g, "x", &[dim(r, 1, 4), dim(r, 1, 6)]);
                plain(g.act(x, act).unwrap())
            });
        }
        for (stride, pad) in [(1, 0), (1, 1), (2, 1)] {
            gradcheck("conv2d", seed, |g, r| {
                let (n, c, h, w) = (dim(r, 1, 2), dim(r, 1, 3), dim(r, 3, 6), dim(r, 3, 6));
                let (o, k) = (dim(r, 1, 3), dim(r, 1, 3));
                let x = param(g, "x", &[n, c, h, w]);
                let wt = param(g, "w", &[o, c, k, k]);
                let b = param(g, "b", &[o]);
                plain(g.conv2d(x, wt, b, stride, pad, Activation::Tanh).unwrap())
            });
        }
        gradcheck("max_pool2d", seed, |g, r| {
            let x = param(g, "x", &[dim(r, 1, 2), dim(r, 1, 3), dim(r, 2, 6), dim(r, 2, 6)]);
            plain(g.max_pool2d(x, 2, 2).unwrap())
        });
        gradcheck("add_broadcast", seed, |g, r| {
            let (a0, a1, a2) = (dim(r, 1, 3), dim(r, 1, 4), dim(r, 1, 4));
            let a = param(g, "a", &[a0, a1, a2]);
            let b = param(g, "b", &[a1, a2]);
            plain(g.add(a, b).unwrap())
        });
        gradcheck("sub_mul", seed, |g, r| {
            let shape = [dim(r, 1, 4), dim(r, 1, 4)];
            let a = param(g, "a", &shape);
            let b = param(g, "b", &shape);
            let d = g.sub(a, b).unwrap();
            let m = g.mul(d, a).unwrap();
            plain(g.mul(m, m).unwrap())
        });
        gradcheck("gelu_reshape", seed, |g, r| {
            let (a, b) = (dim(r, 1, 4), dim(r, 1, 6));
            let x = param(g, "x", &[a, b]);
            let y = g.gelu(x).unwrap();
            plain(g.reshape(y, &[b, a]).unwrap())
        });
        gradcheck("layer_norm", seed, |g, r| {
            // Widths of 4+ keep the normalization smooth enough for finite differences.
            let d = dim(r, 4, 8);
            let x = param(g, "x", &[dim(r, 1, 4), d]);
            let gamma = param(g, "gamma", &[d]);
            let beta = param(g, "beta", &[d]);
            plain(g.layer_norm(x, gamma, beta, 1e-5).unwrap())
        });
        gradcheck("dropout", seed, |g, r| {
            let x = param(g, "x", &[dim(r, 2, 5), dim(r, 2, 6)]);
            Case { out: g.dropout(x, 0.3).unwrap(), ids: vec![], training: true }
        });
        gradcheck("embedding", seed, |g, r| {
            let (v, d, n) = (dim(r, 2, 6), dim(r, 1, 4), dim(r, 1, 7));
            let ids = g.input("ids", &[n], DType::I32);
            let table = param(g, "table", &[v, d]);
            let values = (0..n).map(|_| r.below(v) as i32).collect();
            Case { out: g.embedding(ids, table).unwrap(), ids: vec![(ids, values)], training: false }
        });
        gradcheck("sparse_matmul", seed, |g, r| {
            // Random coordinates (some repeated) of an R×C matrix, learned values, and x.
            let (rows, cols, n, entries) = (dim(r, 1, 5), dim(r, 1, 6), dim(r, 1, 4), dim(r, 1, 12));
            let row_ids = g.input("rows", &[entries], DType::I32);
            let col_ids = g.input("cols", &[entries], DType::I32);
            let values = param(g, "values", &[entries]);
            let x = param(g, "x", &[cols, n]);
            let picked_rows = (0..entries).map(|_| r.below(rows) as i32).collect();
            let picked_cols = (0..entries).map(|_| r.below(cols) as i32).collect();
            Case {
                out: g.sparse_matmul(row_ids, col_ids, values, x, rows).unwrap(),
                ids: vec![(row_ids, picked_rows), (col_ids, picked_cols)],
                training: false,
            }
        });
        gradcheck("softmax", seed, |g, r| {
            let x = param(g, "x", &[dim(r, 1, 4), dim(r, 2, 6)]);
            plain(g.softmax(x).unwrap())
        });
        gradcheck("softmax_cross_entropy", seed, |g, r| {
            let (n, c) = (dim(r, 1, 6), dim(r, 2, 7));
            let logits = param(g, "logits", &[n, c]);
            let labels = g.input("labels", &[n], DType::I32);
            let values = (0..n).map(|_| r.below(c) as i32).collect();
            Case {
                out: g.softmax_cross_entropy(logits, labels).unwrap(),
                ids: vec![(labels, values)],
                training: false,
            }
        });
        for causal in [false, true] {
            gradcheck("attention", seed, |g, r| {
                let heads = dim(r, 1, 3);
                let (b, t, d) = (dim(r, 1, 2), dim(r, 1, 5), heads * dim(r, 1, 3));
                let q = param(g, "q", &[b, t, d]);
                let k = param(g, "k", &[b, t, d]);
                let v = param(g, "v", &[b, t, d]);
                plain(g.attention(q, k, v, heads, causal).unwrap())
            });
        }
        gradcheck("select_stack", seed, |g, r| {
            let (b, t, d) = (dim(r, 1, 3), dim(r, 2, 4), dim(r, 1, 4));
            let x = param(g, "x", &[b, t, d]);
            let steps: Vec<NodeId> = (0..t).rev().map(|s| g.select_step(x, s).unwrap()).collect();
            plain(g.stack_steps(&steps).unwrap())
        });
        gradcheck("gru_cell", seed, |g, r| {
            let (b, h) = (dim(r, 1, 3), dim(r, 1, 4));
            let gx = param(g, "gx", &[b, 3 * h]);
            let h0 = param(g, "h0", &[b, h]);
            let wh = param(g, "wh", &[h, 3 * h]);
            let bh = param(g, "bh", &[3 * h]);
            let h1 = g.gru_cell(gx, h0, wh, bh).unwrap();
            // A second step reuses the weights: gradients must accumulate.
            plain(g.gru_cell(gx, h1, wh, bh).unwrap())
        });
    }
}

// ---------------------------------------------------------------------------------------
// Shape errors and pipeline stages
// ---------------------------------------------------------------------------------------

#[test]
fn shape_errors_are_typed_and_caught_at_build_time() {
    let mut g = Graph::new();
    let x = g.input("x", &[8, 64], DType::F32);
    let w = g.param("w", &[32, 10], Init::Zeros).unwrap();
    let b = g.param("b", &[10], Init::Zeros).unwrap();
    match g.linear(x, w, b, Activation::Relu) {
        Err(NnError::Shape { op: "linear", input: "weight", got, .. }) => assert_eq!(got, vec![32, 10]),
        other => panic!("expected a shape error, got {other:?}"),
    }
    let labels = g.input("labels", &[8], DType::F32);
    assert!(matches!(g.softmax_cross_entropy(x, labels), Err(NnError::DType { input: "labels", .. })));
    assert!(matches!(g.attention(x, x, x, 2, false), Err(NnError::Shape { op: "attention", .. })));
    assert!(matches!(g.param("w", &[1], Init::Zeros), Err(NnError::Argument { .. })));
    let img = g.reshape(x, &[8, 1, 8, 8]).unwrap();
    let cw = g.param("cw", &[4, 2, 3, 3], Init::Zeros).unwrap();
    let cb = g.param("cb", &[4], Init::Zeros).unwrap();
    assert!(matches!(
        g.conv2d(img, cw, cb, 1, 1, Activation::Relu),
        Err(NnError::Shape { op: "conv2d", .. })
    ));
    assert!(matches!(g.reshape(x, &[7, 64]), Err(NnError::Shape { op: "reshape", .. })));
    // Running without setting an input is an error, not a panic.
    let mut g = Graph::new();
    let x = g.input("x", &[2, 3], DType::F32);
    let y = g.relu(x).unwrap();
    let mut exec = CpuExecutor::new(&g);
    let params = Params { tensors: vec![] };
    assert!(matches!(exec.forward_all(&params), Err(NnError::MissingValue { .. })));
    exec.set_value(x, &[1.0, -1.0, 2.0, -2.0, 0.5, 3.0]).unwrap();
    exec.forward_all(&params).unwrap();
    assert_eq!(exec.value(y).unwrap(), &[1.0, 0.0, 2.0, 0.0, 0.5, 3.0]);
    assert!(matches!(exec.set_value(x, &[1.0]), Err(NnError::Length { .. })));
}

#[test]
fn pipeline_stages_reproduce_the_whole_graph() {
    let model = mlp(16, &[64, 32, 32, 10]).unwrap();
    let data = digits();
    let g = &model.graph;
    let params = Params::init(g, &mut Rng::seed(5));
    let idx: Vec<usize> = (0..16).collect();
    let mut x = vec![0.0; 16 * 64];
    let mut y = vec![0; 16];
    data.gather(&idx, &mut x, &mut y);

    let mut whole = CpuExecutor::new(g);
    whole.set_value(model.input, &x).unwrap();
    whole.set_ids(model.target, &y).unwrap();
    whole.forward_all(&params).unwrap();
    whole.backward_from(&params, model.loss).unwrap();

    // Stage 1: everything up to and including the first hidden layer's output.
    let fc2 = g.params().iter().find(|p| p.name == "fc2.weight").unwrap().node.index();
    let cut = fc2; // first node of stage 2
    let boundary = g.stage_outputs(0..cut);
    assert_eq!(g.stage_inputs(cut..g.len()), boundary);
    let mut s1 = CpuExecutor::for_stage(g, 0..cut);
    s1.set_value(model.input, &x).unwrap();
    s1.forward(&params, 0..cut).unwrap();
    let mut s2 = CpuExecutor::for_stage(g, cut..g.len());
    assert!(matches!(s2.forward(&params, 0..cut), Err(NnError::OutsideStage { .. })));
    assert!(matches!(s2.set_value(model.input, &x), Err(NnError::OutsideStage { .. })));
    for &b in &boundary {
        s2.set_value(b, s1.value(b).unwrap()).unwrap();
    }
    s2.set_ids(model.target, &y).unwrap();
    s2.forward(&params, cut..g.len()).unwrap();
    assert_eq!(s2.scalar(model.loss).unwrap().to_bits(), whole.scalar(model.loss).unwrap().to_bits());
    s2.backward(&params, cut..g.len(), &[(model.loss, &[1.0])]).unwrap();
    let seeds: Vec<(NodeId, Vec<f32>)> =
        boundary.iter().map(|&b| (b, s2.grad(b).unwrap().to_vec())).collect();
    let seeds: Vec<(NodeId, &[f32])> = seeds.iter().map(|(b, v)| (*b, v.as_slice())).collect();
    s1.backward(&params, 0..cut, &seeds).unwrap();
    // Each parameter's gradient lives in the stage that reads it, in the fixed order.
    for (i, spec) in g.params().iter().enumerate() {
        let stage = if spec.node.index() < cut { &s1 } else { &s2 };
        let other = if spec.node.index() < cut { &s2 } else { &s1 };
        assert!(other.param_grad(i).is_empty());
        assert_eq!(stage.param_grad(i), whole.param_grad(i), "gradient of {}", spec.name);
    }
}

// ---------------------------------------------------------------------------------------
// Accuracy on real data
// ---------------------------------------------------------------------------------------

/// Trains on the seeded 80/20 split with a cosine learning-rate decay; returns the final
/// test accuracy.
fn train_classifier(
    model_for: impl Fn(usize) -> tessera::nn::Model,
    config: OptimizerConfig,
    epochs: usize,
) -> f32 {
    let (train, test) = digits().split(0.2, 42);
    let model = model_for(64);
    let peak = config.lr();
    let mut state = TrainState::new(&model, config, train.len(), 64, 1);
    let mut trainer = Trainer::new(model);
    let mut eval = Evaluator::new(model_for(test.len()));
    let mut last = 0.0;
    for epoch in 0..epochs {
        state
            .optimizer
            .set_lr(peak * 0.5 * (1.0 + (std::f32::consts::PI * epoch as f32 / epochs as f32).cos()));
        let stats = trainer.train_epoch(&mut state, &train).unwrap();
        let e = eval.classify(&state.params, &test).unwrap();
        println!(
            "epoch {epoch}: loss {:.4} test acc {:.4} ({:.0} samples/s)",
            stats.loss,
            e.accuracy,
            stats.samples_per_second()
        );
        last = e.accuracy;
    }
    last
}

#[test]
fn mlp_reaches_97_percent_on_digits() {
    let acc = train_classifier(|b| mlp(b, &[64, 128, 64, 10]).unwrap(), OptimizerConfig::adam(2e-3), 40);
    assert!(acc >= 0.97, "MLP test accuracy {acc}");
}

#[test]
fn cnn_reaches_98_percent_on_digits() {
    let acc = train_classifier(|b| lenet(b, 8, 10).unwrap(), OptimizerConfig::adamw(3e-3, 1e-4), 45);
    assert!(acc >= 0.98, "CNN test accuracy {acc}");
}

#[test]
fn char_gru_beats_the_unigram_baseline() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let corpus = TextCorpus::from_files(&[root.join("README.md"), root.join("src/nn/graph.rs")]).unwrap();
    let split = corpus.ids.len() * 9 / 10;
    let (train, valid) = corpus.ids.split_at(split);
    let baseline = corpus.unigram_cross_entropy(train, valid);
    let (batch, steps) = (16, 32);
    let model = char_gru(batch, steps, corpus.vocab_size(), 32, 64).unwrap();
    let mut state =
        TrainState::new(&model, OptimizerConfig::adam(5e-3), window_count(train.len(), steps), batch, 3);
    let mut trainer = Trainer::new(model);
    let mut eval = Evaluator::new(char_gru(batch, steps, corpus.vocab_size(), 32, 64).unwrap());
    let mut loss = f32::INFINITY;
    for epoch in 0..4 {
        let stats = trainer.train_epoch_text(&mut state, train, steps).unwrap();
        loss = eval.text(&state.params, valid, steps).unwrap().loss;
        println!("epoch {epoch}: train {:.3} valid {loss:.3} unigram {baseline:.3}", stats.loss);
    }
    assert!(loss < baseline, "validation loss {loss} did not beat the unigram baseline {baseline}");
}

// ---------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------

/// Runs `steps` optimizer steps of LeNet (with dropout, so the RNG matters) from `state`.
fn run_steps(trainer: &mut Trainer, state: &mut TrainState, data: &Dataset, steps: usize) {
    let (input, target) = (trainer.model().input, trainer.model().target);
    let mut done = 0;
    while done < steps {
        let Some(idx) = state.loader.next_batch() else {
            continue;
        };
        let idx = idx.to_vec();
        let mut x = vec![0.0; idx.len() * data.dim];
        let mut y = vec![0; idx.len()];
        data.gather(&idx, &mut x, &mut y);
        trainer.executor().set_value(input, &x).unwrap();
        trainer.executor().set_ids(target, &y).unwrap();
        trainer.step(state).unwrap();
        done += 1;
    }
}

#[test]
fn an_optimizer_state_of_another_model_is_an_error_not_a_panic() {
    let data = digits();
    let model = mlp(16, &[64, 32, 10]).unwrap();
    let other = mlp(16, &[64, 48, 10]).unwrap();
    for config in [OptimizerConfig::sgd(0.1, 0.9), OptimizerConfig::adam(1e-3)] {
        // The parameters fit the model; the optimizer's moments are another model's (a
        // checkpoint mixed up with another run's, say).
        let mut state = TrainState::new(&model, config.clone(), data.len(), 16, 1);
        state.optimizer = TrainState::new(&other, config.clone(), data.len(), 16, 1).optimizer;
        let before = state.params.clone();
        let mut trainer = Trainer::new(model.clone());
        let (mut x, mut y) = (vec![0f32; 16 * 64], vec![0i32; 16]);
        data.gather(&(0..16).collect::<Vec<_>>(), &mut x, &mut y);
        trainer.executor().set_value(model.input, &x).unwrap();
        trainer.executor().set_ids(model.target, &y).unwrap();
        match trainer.step(&mut state) {
            Err(NnError::Argument { what, .. }) => assert!(what.contains("do not fit"), "{what}"),
            other => panic!("{config:?}: expected an Argument error, got {other:?}"),
        }
        assert_eq!(state.params, before, "nothing was updated");
        assert_eq!(state.step, 0);
    }
}

/// Epochs and evaluations whose model, loader or data do not fit each other are typed
/// errors before anything is gathered (these used to index out of bounds).
#[test]
fn trainers_and_evaluators_reject_data_that_does_not_fit() {
    let data = digits();
    let small = data.subset(&(0..100).collect::<Vec<_>>());
    let model = mlp(16, &[64, 10]).unwrap();
    let config = OptimizerConfig::sgd(0.1, 0.0);
    let epoch = |model: &tessera::nn::Model, examples: usize, batch: usize, data: &Dataset| {
        let mut state = TrainState::new(model, config.clone(), examples, batch, 1);
        let before = state.params.clone();
        let result = Trainer::new(model.clone()).train_epoch(&mut state, data);
        assert!(result.is_ok() || (state.params == before && state.step == 0), "an error trains nothing");
        result
    };
    // A loader over the whole set, an epoch over 100 of its examples.
    let over = epoch(&model, data.len(), 16, &small);
    assert!(matches!(over, Err(NnError::Argument { .. })), "{over:?}");
    // A loader of another batch than the model's.
    let other_batch = epoch(&model, small.len(), 8, &small);
    assert!(matches!(other_batch, Err(NnError::Argument { .. })), "{other_batch:?}");
    // Rows of 64 features into a model of 32.
    let narrow = mlp(16, &[32, 10]).unwrap();
    let features = epoch(&narrow, small.len(), 16, &small);
    assert!(matches!(features, Err(NnError::Shape { .. })), "{features:?}");
    // A model of batch 0 (the loader's batch is at least 1).
    let empty = mlp(0, &[64, 10]).unwrap();
    assert!(matches!(epoch(&empty, small.len(), 0, &small), Err(NnError::Argument { .. })));
    assert!(epoch(&model, small.len(), 16, &small).is_ok(), "what fits trains");

    let params = |model: &tessera::nn::Model| Params::init(&model.graph, &mut Rng::seed(2));
    let batch_zero = Evaluator::new(empty.clone()).classify(&params(&empty), &small);
    assert!(matches!(batch_zero, Err(NnError::Argument { .. })), "{batch_zero:?}");
    let narrow_eval = Evaluator::new(narrow.clone()).classify(&params(&narrow), &small);
    assert!(matches!(narrow_eval, Err(NnError::Shape { .. })), "{narrow_eval:?}");
    // Five classes; the digits have labels up to 9.
    let five = mlp(16, &[64, 5]).unwrap();
    let labels = Evaluator::new(five.clone()).classify(&params(&five), &small);
    assert!(matches!(labels, Err(NnError::IdOutOfRange { limit: 5, .. })), "{labels:?}");

    // A language model: a loader over more windows than the text has, or of another batch.
    let text: Vec<i32> = (0..200).map(|i| i % 7).collect();
    let (batch, steps) = (4, 8);
    let lm = char_gru(batch, steps, 7, 8, 8).unwrap();
    let windows = window_count(text.len(), steps);
    for (examples, loader_batch) in [(windows + 10, batch), (windows, batch + 1)] {
        let mut state = TrainState::new(&lm, config.clone(), examples, loader_batch, 1);
        let result = Trainer::new(lm.clone()).train_epoch_text(&mut state, &text, steps);
        assert!(
            matches!(result, Err(NnError::Argument { .. })),
            "{examples} windows, batch {loader_batch}: {result:?}"
        );
    }
    let mut state = TrainState::new(&lm, config.clone(), windows, batch, 1);
    assert!(Trainer::new(lm.clone()).train_epoch_text(&mut state, &text, steps).is_ok());
}

/// Axes of length zero (an empty batch, no steps, rows of no columns) run forward and
/// backward on the CPU as empty values with nothing added to any gradient (each of these
/// panicked inside the executor before).
#[test]
fn zero_length_axes_run_forward_and_backward() {
    type Build = fn(&mut Graph) -> NodeId;
    let cases: [(&str, Build); 4] = [
        ("softmax of rows of 0", |g| {
            let x = param(g, "x", &[3, 0]);
            g.softmax(x).unwrap()
        }),
        ("layer norm of rows of 0", |g| {
            let x = param(g, "x", &[2, 0]);
            let (gamma, beta) = (param(g, "gamma", &[0]), param(g, "beta", &[0]));
            g.layer_norm(x, gamma, beta, 1e-5).unwrap()
        }),
        ("attention over 0 steps", |g| {
            let (q, k, v) = (param(g, "q", &[2, 0, 4]), param(g, "k", &[2, 0, 4]), param(g, "v", &[2, 0, 4]));
            g.attention(q, k, v, 2, true).unwrap()
        }),
        ("convolution of a batch of 0", |g| {
            let x = param(g, "x", &[0, 2, 5, 5]);
            let (w, b) = (param(g, "w", &[3, 2, 3, 3]), param(g, "b", &[3]));
            g.conv2d(x, w, b, 1, 0, Activation::Relu).unwrap()
        }),
    ];
    for (what, build) in cases {
        let mut g = Graph::new();
        let out = build(&mut g);
        let params = Params::init(&g, &mut Rng::seed(3));
        let mut cpu = CpuExecutor::new(&g);
        cpu.forward_all(&params).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(cpu.value(out).unwrap().is_empty(), "{what}");
        cpu.backward(&params, 0..out.index() + 1, &[(out, &[])]).unwrap_or_else(|e| panic!("{what}: {e}"));
        for index in 0..g.params().len() {
            assert!(cpu.param_grad(index).iter().all(|&v| v == 0.0), "{what}: parameter {index}");
        }
    }
}

#[test]
fn resumed_training_is_bit_identical() {
    let (train, _) = digits().split(0.2, 42);
    let build = || lenet(64, 8, 10).unwrap();
    let config = OptimizerConfig::adamw(2e-3, 1e-2);
    let fresh = || TrainState::new(&build(), config.clone(), train.len(), 64, 11);

    // Uninterrupted: 50 steps (more than two epochs of 22 batches).
    let mut straight = fresh();
    run_steps(&mut Trainer::new(build()), &mut straight, &train, 50);

    // Interrupted mid-epoch at step 30, saved to the stash, resumed in a new trainer from
    // the stash (a fresh handle, as a restarted process would open it), 20 more steps.
    let dir = tempfile::tempdir().unwrap();
    let mut first = fresh();
    run_steps(&mut Trainer::new(build()), &mut first, &train, 10);
    let early = save_to_stash(&tessera::Stash::open(dir.path()).unwrap(), "lenet", &first, &[("step", "10")])
        .unwrap();
    run_steps(&mut Trainer::new(build()), &mut first, &train, 20);
    save_to_stash(&tessera::Stash::open(dir.path()).unwrap(), "lenet", &first, &[("step", "30")]).unwrap();
    drop(first);
    let stash = tessera::Stash::open(dir.path()).unwrap();
    assert_eq!(stash.history("lenet").unwrap().len(), 2, "every checkpoint is a version");
    assert_eq!(resume_from_stash(&stash, "lenet", Some(early)).unwrap().step, 10);
    let mut resumed = resume_from_stash(&stash, "lenet", None).unwrap();
    assert_eq!(resumed.step, 30);
    run_steps(&mut Trainer::new(build()), &mut resumed, &train, 20);

    // The same through a plain directory store.
    let plain = DirStore::open(dir.path().join("plain")).unwrap();
    save_checkpoint(&plain, "lenet", &resumed).unwrap();
    assert_eq!(resume(&plain, "lenet").unwrap(), resumed);

    assert_eq!(resumed.step, straight.step);
    for (a, b) in resumed.params.tensors.iter().zip(&straight.params.tensors) {
        let (a, b): (Vec<u32>, Vec<u32>) =
            (a.data.iter().map(|v| v.to_bits()).collect(), b.data.iter().map(|v| v.to_bits()).collect());
        assert_eq!(a, b);
    }
    assert_eq!(resumed, straight, "optimizer, RNG and loader state must match too");
}

// ---------------------------------------------------------------------------------------
// Steady state: no allocation per step; the graph is data
// ---------------------------------------------------------------------------------------

mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static COUNTING: Cell<bool> = const { Cell::new(false) };
        static COUNT: Cell<usize> = const { Cell::new(0) };
    }

    /// Counts allocations made by the current thread while counting is on.
    pub struct Counting;

    // SAFETY: forwards every call to the system allocator unchanged.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if COUNTING.with(Cell::get) {
                COUNT.with(|c| c.set(c.get() + 1));
            }
            // SAFETY: same contract as the caller's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: same contract as the caller's.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if COUNTING.with(Cell::get) {
                COUNT.with(|c| c.set(c.get() + 1));
            }
            // SAFETY: same contract as the caller's.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// Allocations `f` makes on this thread.
    pub fn allocations(f: impl FnOnce()) -> usize {
        COUNT.with(|c| c.set(0));
        COUNTING.with(|c| c.set(true));
        f();
        COUNTING.with(|c| c.set(false));
        COUNT.with(Cell::get)
    }
}

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

/// The executor allocates nothing per step: every buffer is made in `CpuExecutor::new`.
/// The one allocation left is inside `matrixmultiply`, which allocates its packing buffer
/// once per matrix product; the MLP's step makes exactly 8 products (3 forward, 5
/// backward: the input needs no gradient), so it may allocate at most 8 times, and every
/// model's per-step count must be constant (no growth with steps).
#[test]
fn training_steps_do_not_allocate() {
    let data = digits();
    let models = [
        (mlp(64, &[64, 128, 64, 10]).unwrap(), Some(8)),
        (lenet(64, 8, 10).unwrap(), None),
        (char_gru(4, 8, 20, 8, 16).unwrap(), None),
        (
            tessera::nn::tiny_transformer(
                2,
                8,
                20,
                tessera::nn::TransformerConfig { width: 16, heads: 2, layers: 1, ff: 32 },
            )
            .unwrap(),
            None,
        ),
    ];
    for (model, gemm_calls) in models {
        let mut state = TrainState::new(&model, OptimizerConfig::adamw(1e-3, 1e-2), 100, 4, 1);
        let mut trainer = Trainer::new(model.clone());
        let shape = model.graph.shape(model.input).unwrap().to_vec();
        let n: usize = shape.iter().product();
        if model.graph.node(model.input).unwrap().dtype == DType::F32 {
            trainer.executor().set_value(model.input, &data.features[..n]).unwrap();
            trainer.executor().set_ids(model.target, &data.labels[..shape[0]]).unwrap();
        } else {
            let ids: Vec<i32> = (0..n as i32).map(|i| i % 20).collect();
            trainer.executor().set_ids(model.input, &ids).unwrap();
            trainer.executor().set_ids(model.target, &ids).unwrap();
        }
        trainer.step(&mut state).unwrap();
        let one = counting::allocations(|| {
            trainer.step(&mut state).unwrap();
        });
        let five = counting::allocations(|| {
            for _ in 0..5 {
                trainer.step(&mut state).unwrap();
            }
        });
        assert_eq!(five, 5 * one, "{} nodes: allocations grow with steps", model.graph.len());
        if let Some(limit) = gemm_calls {
            assert!(
                one <= limit,
                "MLP step allocated {one} times; only the {limit} GEMM packing buffers may"
            );
        }
    }
}

#[test]
fn graphs_serialize_as_data() {
    let model = lenet(8, 8, 10).unwrap();
    let bytes = bincode::serde::encode_to_vec(&model.graph, bincode::config::standard()).unwrap();
    let (back, _): (Graph, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
    assert_eq!(back, model.graph);
    assert!(back.nodes().iter().any(|n| matches!(n.op, tessera::nn::Op::Conv2d { .. })));
}

// ---------------------------------------------------------------------------------------
// Data loading and checkpoint errors
// ---------------------------------------------------------------------------------------

#[test]
fn loader_shuffles_deterministically_and_covers_every_example() {
    let mut a = tessera::nn::DataLoader::new(100, 16, 7);
    let mut b = tessera::nn::DataLoader::new(100, 16, 7);
    assert_eq!(a.batches_per_epoch(), 6);
    let mut epochs = Vec::new();
    for _ in 0..2 {
        let mut seen = Vec::new();
        while let Some(batch) = a.next_batch() {
            assert_eq!(batch, b.next_batch().unwrap());
            assert_eq!(batch.len(), 16);
            seen.extend_from_slice(batch);
        }
        assert!(b.next_batch().is_none());
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 96, "a full epoch hands out distinct examples");
        epochs.push(seen);
    }
    assert_ne!(epochs[0], epochs[1], "each epoch is reshuffled");
    assert_eq!(a.epoch(), 2);
    let (train, test) = digits().split(0.2, 42);
    let (train2, test2) = digits().split(0.2, 42);
    assert_eq!((train.len(), test.len()), (1438, 359));
    assert_eq!(train, train2);
    assert_eq!(test, test2);
}

#[test]
fn bad_data_and_bad_checkpoints_are_typed_errors() {
    let dir = std::env::temp_dir().join(format!("tessera-nn-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("bad.csv");
    std::fs::write(&csv, "0,1,2\n").unwrap();
    assert!(matches!(Dataset::digits(&csv), Err(NnError::Data { line: 1, .. })));
    assert!(matches!(Dataset::digits(dir.join("missing.csv")), Err(NnError::Io { .. })));
    let store = DirStore::open(&dir).unwrap();
    use tessera::nn::CheckpointStore;
    store.save_bytes("junk", &[1, 2, 3]).unwrap();
    assert!(matches!(resume(&store, "junk"), Err(NnError::Checkpoint { .. })));
    assert!(matches!(resume(&store, "absent"), Err(NnError::Io { .. })));
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------
// Seams for the parallel trainers
// ---------------------------------------------------------------------------------------

#[test]
fn public_handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Graph>();
    send_sync::<CpuExecutor>();
    send_sync::<Trainer>();
    send_sync::<TrainState>();
    send_sync::<Params>();
}

/// Data parallelism through the fixed parameter order: two replicas on half batches,
/// gradients averaged bucket by bucket, equal the gradients of one full batch.
#[test]
fn averaged_replica_gradients_equal_the_full_batch_gradient() {
    let data = digits();
    let full = mlp(64, &[64, 32, 10]).unwrap();
    let half = mlp(32, &[64, 32, 10]).unwrap();
    let params = Params::init(&full.graph, &mut Rng::seed(9));
    let run = |model: &tessera::nn::Model, range: std::ops::Range<usize>| {
        let idx: Vec<usize> = range.collect();
        let mut x = vec![0.0; idx.len() * 64];
        let mut y = vec![0; idx.len()];
        data.gather(&idx, &mut x, &mut y);
        let mut exec = CpuExecutor::new(&model.graph);
        exec.set_value(model.input, &x).unwrap();
        exec.set_ids(model.target, &y).unwrap();
        exec.forward_all(&params).unwrap();
        exec.backward_from(&params, model.loss).unwrap();
        (0..params.tensors.len()).map(|i| exec.param_grad(i).to_vec()).collect::<Vec<_>>()
    };
    let whole = run(&full, 0..64);
    let (a, b) = (run(&half, 0..32), run(&half, 32..64));
    for (i, w) in whole.iter().enumerate() {
        for (k, &wv) in w.iter().enumerate() {
            let avg = 0.5 * (a[i][k] + b[i][k]);
            assert!((avg - wv).abs() <= 1e-5 + 1e-4 * wv.abs(), "param {i} element {k}: {avg} vs {wv}");
        }
    }
}

/// Two replicas stepping with `step_reduced`, averaging gradients in the fixed order, stay
/// identical to each other and match one replica stepping on the whole batch.
#[test]
fn replicas_with_reduced_gradients_stay_in_lockstep() {
    let data = digits();
    let sizes = [64, 32, 10];
    let half = mlp(32, &sizes).unwrap();
    let full = mlp(64, &sizes).unwrap();
    let fresh = |m: &tessera::nn::Model| TrainState::new(m, OptimizerConfig::sgd(0.1, 0.9), 64, 32, 4);
    let feed = |trainer: &mut Trainer, range: std::ops::Range<usize>| {
        let idx: Vec<usize> = range.collect();
        let mut x = vec![0.0; idx.len() * 64];
        let mut y = vec![0; idx.len()];
        data.gather(&idx, &mut x, &mut y);
        let (input, target) = (trainer.model().input, trainer.model().target);
        trainer.executor().set_value(input, &x).unwrap();
        trainer.executor().set_ids(target, &y).unwrap();
    };
    let (mut a, mut b, mut whole) =
        (Trainer::new(half.clone()), Trainer::new(half.clone()), Trainer::new(full.clone()));
    let (mut sa, mut sb, mut sw) = (fresh(&half), fresh(&half), fresh(&full));
    for _ in 0..3 {
        // Replica b's gradients first (a plain forward/backward), then a steps averaging
        // with them, then b steps averaging with a's pre-update gradients.
        feed(&mut b, 32..64);
        b.executor().forward_all(&sb.params).unwrap();
        b.executor().backward_from(&sb.params, half.loss).unwrap();
        let grads_b: Vec<Vec<f32>> =
            (0..sb.params.tensors.len()).map(|i| b.executor().param_grad(i).to_vec()).collect();
        feed(&mut a, 0..32);
        let mut grads_a = vec![Vec::new(); grads_b.len()];
        a.step_reduced(&mut sa, |i, g| {
            grads_a[i] = g.to_vec();
            g.iter_mut().zip(&grads_b[i]).for_each(|(g, o)| *g = 0.5 * (*g + o));
            Ok(())
        })
        .unwrap();
        b.step_reduced(&mut sb, |i, g| {
            g.iter_mut().zip(&grads_a[i]).for_each(|(g, o)| *g = 0.5 * (o + *g));
            Ok(())
        })
        .unwrap();
        feed(&mut whole, 0..64);
        whole.step(&mut sw).unwrap();
    }
    assert_eq!(sa.params, sb.params, "replicas diverged");
    for (r, w) in sa.params.tensors.iter().zip(&sw.params.tensors) {
        for (&rv, &wv) in r.data.iter().zip(&w.data) {
            assert!((rv - wv).abs() <= 1e-5 + 1e-4 * wv.abs(), "replica {rv} vs full batch {wv}");
        }
    }
}

/// A graph of 3 communities (a stochastic block model: ~8 neighbours inside a community,
/// ~1 outside) whose node features carry the community only faintly; 20 labelled nodes a
/// community. Returns the features, the edges and every node's community.
fn communities(seed: u64) -> (Vec<f32>, Vec<(u32, u32)>, Vec<i32>) {
    const NODES: usize = 300;
    const FEATURES: usize = 8;
    let mut rng = Rng::seed(seed);
    let community: Vec<i32> = (0..NODES).map(|i| (i % 3) as i32).collect();
    let mut features = vec![0f32; NODES * FEATURES];
    for (i, row) in features.chunks_exact_mut(FEATURES).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = rng.normal() + if j == community[i] as usize { 0.6 } else { 0.0 };
        }
    }
    let mut edges = Vec::new();
    for a in 0..NODES {
        for b in a + 1..NODES {
            let p = if community[a] == community[b] { 0.08 } else { 0.005 };
            if rng.uniform() < p {
                edges.push((a as u32, b as u32));
            }
        }
    }
    (features, edges, community)
}

/// Trains a GCN full-batch with Adam on the labelled nodes; its accuracy on the others.
fn gcn_accuracy(features: &[f32], edges: &[(u32, u32)], community: &[i32]) -> f64 {
    let nodes = community.len();
    let labelled: Vec<i32> = (0..60).collect(); // 20 of each community (ids cycle 0, 1, 2)
    let labels: Vec<i32> = labelled.iter().map(|&i| community[i as usize]).collect();
    let adjacency = tessera::nn::gcn_adjacency(nodes, edges).unwrap();
    let model = tessera::nn::gcn(nodes, adjacency.values.len(), 8, 16, 3, labelled.len()).unwrap();
    let mut params = Params::init(&model.graph, &mut Rng::seed(5));
    let mut exec = CpuExecutor::new(&model.graph);
    model.bind(&mut exec, features, &adjacency, &labelled, &labels).unwrap();
    let mut optimizer = tessera::nn::Optimizer::new(OptimizerConfig::adam(0.01), &params);
    for _ in 0..150 {
        exec.forward_all(&params).unwrap();
        exec.backward_from(&params, model.loss).unwrap();
        optimizer.step(&mut params, |i| exec.param_grad(i));
    }
    exec.forward_all(&params).unwrap();
    let logits = exec.value(model.logits).unwrap();
    let unseen = 60..nodes;
    let right = unseen
        .clone()
        .filter(|&i| {
            let row = &logits[i * 3..i * 3 + 3];
            let best = (0..3).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            best as i32 == community[i]
        })
        .count();
    right as f64 / unseen.len() as f64
}

/// Sparse ML: the graph carries what the features barely show. A GCN propagating over the
/// edges classifies the unlabelled nodes far better than the same network without edges
/// (`Â = I`, an MLP on the features alone).
#[test]
fn a_gcn_learns_communities_from_the_graph() {
    let (features, edges, community) = communities(3);
    let with_graph = gcn_accuracy(&features, &edges, &community);
    let features_alone = gcn_accuracy(&features, &[], &community);
    eprintln!("unlabelled nodes classified right: GCN {with_graph:.3}, features alone {features_alone:.3}");
    assert!(with_graph > 0.85, "GCN accuracy {with_graph:.3} (features alone {features_alone:.3})");
    assert!(with_graph > features_alone + 0.2, "GCN {with_graph:.3} vs features alone {features_alone:.3}");
    assert!(tessera::nn::gcn_adjacency(3, &[(0, 3)]).is_err(), "an edge outside the graph");
    // Ids outside the matrix are typed errors of the forward pass.
    let model = tessera::nn::gcn(4, 2, 1, 2, 2, 1).unwrap();
    let mut exec = CpuExecutor::new(&model.graph);
    let bad = tessera::nn::CooMatrix { rows: vec![0, 1], cols: vec![0, 4], values: vec![1.0, 1.0] };
    model.bind(&mut exec, &[0.0; 4], &bad, &[0], &[1]).unwrap();
    let params = Params::init(&model.graph, &mut Rng::seed(1));
    let err = exec.forward_all(&params).unwrap_err();
    assert!(
        matches!(err, NnError::IdOutOfRange { op: "sparse_matmul cols", id: 4, position: 1, limit: 4 }),
        "{err:?}"
    );
}
