//! Criterion benches of `tessera::nn`'s parallel training, in one process: a LeNet step
//! through the data-parallel machinery with a group of one (bucket copies, the
//! communication thread, averaging; no network), beside the plain trainer's step, and a
//! step of a 2-stage pipeline over 4 micro-batches. (Multi-process throughput is
//! `tessera bench train`.)
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera::nn::{lenet, DataParallel, Dataset, Executor, OptimizerConfig, Pipeline, TrainState, Trainer};
use tessera::{CollectiveError, Communicator};

/// A group of one: every collective is the identity.
struct Alone;

impl Communicator for Alone {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce(&mut self, _: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&mut self, _: &mut [f32], _: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<(), CollectiveError> {
        out.copy_from_slice(local);
        Ok(())
    }
    fn reduce_scatter(&mut self, data: &mut [f32], out: &mut [f32]) -> Result<(), CollectiveError> {
        out.copy_from_slice(data);
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

const BATCH: usize = 64;

fn batch() -> (Vec<f32>, Vec<i32>) {
    let data = Dataset::digits(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv")).expect("digits");
    let idx: Vec<usize> = (0..BATCH).collect();
    let (mut x, mut y) = (vec![0.0; BATCH * 64], vec![0; BATCH]);
    data.gather(&idx, &mut x, &mut y);
    (x, y)
}

fn benches(c: &mut Criterion) {
    let (x, y) = batch();
    let mut group = c.benchmark_group("parallel");
    group.throughput(Throughput::Elements(BATCH as u64));

    let model = lenet(BATCH, 8, 10).unwrap();
    let mut state = TrainState::new(&model, OptimizerConfig::adam(1e-3), BATCH, BATCH, 1);
    let (input, target) = (model.input, model.target);
    let mut trainer = Trainer::new(model.clone());
    trainer.executor().set_value(input, &x).unwrap();
    trainer.executor().set_ids(target, &y).unwrap();
    group.bench_function("lenet_b64_trainer_step", |b| b.iter(|| trainer.step(&mut state).unwrap()));

    for (name, mib) in
        [("lenet_b64_data_parallel_1_bucket", 25.0), ("lenet_b64_data_parallel_small_buckets", 0.01)]
    {
        let mut state = TrainState::new(&model, OptimizerConfig::adam(1e-3), BATCH, BATCH, 1);
        let mut replica = DataParallel::new(model.clone(), Box::new(Alone), mib).unwrap();
        replica.executor().set_value(input, &x).unwrap();
        replica.executor().set_ids(target, &y).unwrap();
        group.bench_function(name, |b| b.iter(|| replica.step(&mut state).unwrap()));
    }

    let micro = lenet(BATCH / 4, 8, 10).unwrap();
    let mut state = TrainState::new(&micro, OptimizerConfig::adam(1e-3), BATCH, BATCH, 1);
    let mut pipeline = Pipeline::balanced(micro, 2, 4).unwrap();
    group.bench_function("lenet_b64_pipeline_2_stages_4_micro", |b| {
        b.iter(|| pipeline.step(&mut state, &x, &y).unwrap())
    });
    group.finish();
}

criterion_group!(parallel_benches, benches);
criterion_main!(parallel_benches);
