//! Criterion benches of the stash: save and load of a 16 MiB f32 array and of a small
//! serde value on the embedded store (in the temp dir). The 512 MiB figures against the
//! disk's raw limits come from `tessera bench store`.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::Array1;
use tessera::Stash;

fn bench_stash(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let stash = Stash::open(dir.path().join("stash")).expect("open stash");
    let mut group = c.benchmark_group("stash");
    group.sample_size(10);

    let n = (16 << 20) / 4;
    let mut array = Array1::from_iter((0..n).map(|i| i as f32));
    group.throughput(Throughput::Bytes((n * 4) as u64));
    let mut round = 0.0f32;
    group.bench_function(BenchmarkId::new("save_array", "16MiB"), |b| {
        b.iter(|| {
            // A new first element each time, so that one chunk is new per save.
            round += 1.0;
            array[0] = round;
            stash.save("array", &array, &[]).expect("save");
        })
    });
    group.bench_function(BenchmarkId::new("load_array", "16MiB"), |b| {
        b.iter(|| stash.load::<Array1<f32>>("array").expect("load"))
    });

    let small: Vec<(String, u64)> = (0..100).map(|i| (format!("key{i}"), i)).collect();
    group.throughput(Throughput::Elements(1));
    group.bench_function("save_small", |b| {
        b.iter(|| stash.save("small", &small, &[("k", "v")]).expect("save"))
    });
    group.bench_function("load_small", |b| {
        b.iter(|| stash.load::<Vec<(String, u64)>>("small").expect("load"))
    });
    group.finish();
}

criterion_group!(benches, bench_stash);
criterion_main!(benches);
