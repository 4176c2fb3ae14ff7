//! Criterion benches of `tessera::nn`: one optimizer step (forward, backward, update) of
//! each zoo model on the CPU executor, with preallocated buffers and a fixed batch.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera::nn::{
    char_gru, lenet, mlp, tiny_transformer, Dataset, Executor, Model, OptimizerConfig, Rng, TrainState,
    Trainer, TransformerConfig,
};

fn digits() -> Dataset {
    Dataset::digits(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv")).expect("data/digits.csv")
}

fn classifier_step(c: &mut Criterion, name: &str, model: Model) {
    let data = digits();
    let batch = model.graph.shape(model.input).unwrap()[0];
    let idx: Vec<usize> = (0..batch).collect();
    let mut x = vec![0.0; batch * 64];
    let mut y = vec![0; batch];
    data.gather(&idx, &mut x, &mut y);
    let mut state = TrainState::new(&model, OptimizerConfig::adam(1e-3), data.len(), batch, 1);
    let (input, target) = (model.input, model.target);
    let mut trainer = Trainer::new(model);
    trainer.executor().set_value(input, &x).unwrap();
    trainer.executor().set_ids(target, &y).unwrap();
    let mut group = c.benchmark_group("nn");
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function(name, |b| b.iter(|| trainer.step(&mut state).unwrap()));
    group.finish();
}

fn text_step(c: &mut Criterion, name: &str, model: Model, vocab: usize) {
    let shape = model.graph.shape(model.input).unwrap().to_vec();
    let n = shape[0] * shape[1];
    let mut rng = Rng::seed(3);
    let tokens: Vec<i32> = (0..n).map(|_| rng.below(vocab) as i32).collect();
    let mut state = TrainState::new(&model, OptimizerConfig::adam(1e-3), 1, 1, 1);
    let (input, target) = (model.input, model.target);
    let mut trainer = Trainer::new(model);
    trainer.executor().set_ids(input, &tokens).unwrap();
    trainer.executor().set_ids(target, &tokens).unwrap();
    let mut group = c.benchmark_group("nn");
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function(name, |b| b.iter(|| trainer.step(&mut state).unwrap()));
    group.finish();
}

fn benches(c: &mut Criterion) {
    classifier_step(c, "mlp_64_128_64_10_step_b64", mlp(64, &[64, 128, 64, 10]).unwrap());
    classifier_step(c, "lenet_step_b64", lenet(64, 8, 10).unwrap());
    text_step(c, "char_gru_step_b32_t32", char_gru(32, 32, 96, 32, 128).unwrap(), 96);
    let cfg = TransformerConfig { width: 64, heads: 4, layers: 2, ff: 256 };
    text_step(c, "tiny_transformer_step_b16_t64", tiny_transformer(16, 64, 96, cfg).unwrap(), 96);
}

criterion_group!(nn_benches, benches);
criterion_main!(nn_benches);
