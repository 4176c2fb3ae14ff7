//! Criterion benches of the in-process runtime's overheads.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera::Runtime;

tessera::task! {
    fn empty() {}
}

tessera::task! {
    fn link(_previous: ()) {}
}

fn bench_tasks(c: &mut Criterion) {
    let rt = Runtime::local().expect("runtime starts");
    let mut group = c.benchmark_group("tasks");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("independent_1000", |b| {
        b.iter(|| {
            let refs: Vec<_> = (0..1000).map(|_| empty::spawn(&rt)).collect();
            for r in &refs {
                r.blocking_get().expect("task runs");
            }
        })
    });
    group.bench_function("chain_1000", |b| {
        b.iter(|| {
            let mut previous = empty::spawn(&rt);
            for _ in 1..1000 {
                previous = link::spawn(&rt, &previous);
            }
            previous.blocking_get().expect("chain runs");
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("roundtrip", |b| b.iter(|| empty::spawn(&rt).blocking_get().expect("task runs")));
    group.finish();
    rt.shutdown();
}

criterion_group!(benches, bench_tasks);
criterion_main!(benches);
