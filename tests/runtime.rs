//! Integration tests of the in-process runtime: graphs, nesting, errors, panics, freeing,
//! actor ordering, shutdown, wait, retries and metrics.
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tessera::{Actor, Error, Fifo, Ref, RoundRobin, Runtime, TaskEntry, TaskOptions};

tessera::task! {
    fn square(x: u64) -> u64 { x * x }
}

tessera::task! {
    fn sum(values: Vec<u64>) -> u64 { values.iter().sum() }
}

tessera::task! {
    fn add(a: u64, b: u64) -> u64 { a + b }
}

tessera::task! {
    /// Divide and conquer: spawns two halves and returns a `Ref` to their sum.
    fn range_sum(lo: u64, hi: u64) -> Ref<u64> {
        let rt = Runtime::current().expect("tasks run inside a runtime");
        if hi - lo <= 16 {
            return rt.put((lo..hi).sum::<u64>());
        }
        let mid = (lo + hi) / 2;
        let left = range_sum::spawn(&rt, lo, mid);
        let right = range_sum::spawn(&rt, mid, hi);
        add::spawn(&rt, &left, &right)
    }
}

tessera::task! {
    /// Recurses `depth` levels, one nested task per level.
    fn deep(depth: u64) -> Ref<u64> {
        let rt = Runtime::current().expect("tasks run inside a runtime");
        if depth == 0 {
            rt.put(0)
        } else {
            let inner = deep::spawn(&rt, depth - 1);
            add::spawn(&rt, &inner, 1)
        }
    }
}

tessera::task! {
    fn parse(text: String) -> Result<u64, std::num::ParseIntError> { text.parse::<u64>() }
}

tessera::task! {
    fn double(x: u64) -> u64 { x * 2 }
}

tessera::task! {
    fn explode(x: u64) -> u64 {
        if x > 0 {
            panic!("boom at {x}");
        }
        x
    }
}

tessera::task! {
    fn sleepy(ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }
}

tessera::task! {
    fn bytes(len: usize) -> Vec<u8> { vec![7; len] }
}

tessera::task! {
    /// Blocks on another task from inside a task (the worker helps while it waits).
    fn nested_get(x: u64) -> u64 {
        let rt = Runtime::current().expect("tasks run inside a runtime");
        square::spawn(&rt, x).blocking_get().expect("inner task") + 1
    }
}

static FLAKY_CALLS: AtomicU32 = AtomicU32::new(0);

tessera::task! {
    fn flaky(fail_times: u32) -> Result<u32, String> {
        let call = FLAKY_CALLS.fetch_add(1, Ordering::SeqCst);
        if call < fail_times { Err(format!("transient failure {call}")) } else { Ok(call) }
    }
}

fn runtime(workers: usize) -> Result<Runtime> {
    Ok(Runtime::builder().workers(workers).build()?)
}

#[test]
fn handles_are_send_sync_and_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Runtime>();
    check::<Ref<Vec<u8>>>();
    check::<tessera::ActorHandle<Recorder>>();
}

#[test]
fn fan_out_fan_in_gives_correct_results() -> Result<()> {
    let rt = runtime(4)?;
    let squares: Vec<Ref<u64>> = (0..1000).map(|i| square::spawn(&rt, i)).collect();
    // Fan in pairwise, level by level.
    let mut level = squares;
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => add::spawn(&rt, a, b),
                [a] => a.clone(),
                _ => unreachable!(),
            })
            .collect();
    }
    let expected: u64 = (0..1000u64).map(|i| i * i).sum();
    assert_eq!(level[0].blocking_get()?, expected);
    let values: Vec<u64> = (0..10).collect();
    assert_eq!(sum::spawn(&rt, values).blocking_get()?, 45);
    rt.shutdown();
    Ok(())
}

#[test]
fn nested_divide_and_conquer() -> Result<()> {
    let rt = runtime(2)?;
    let total = range_sum::spawn(&rt, 0, 100_000).blocking_get()?;
    assert_eq!(total, (0..100_000u64).sum::<u64>());
    rt.shutdown();
    Ok(())
}

#[test]
fn nested_spawning_ten_thousand_levels_deep() -> Result<()> {
    let rt = runtime(2)?;
    let r = deep::spawn(&rt, 10_000);
    assert_eq!(r.blocking_get_timeout(Duration::from_secs(60))?, 10_000);
    rt.shutdown();
    Ok(())
}

#[test]
fn error_propagates_through_a_three_level_chain() -> Result<()> {
    let rt = runtime(2)?;
    let parsed = parse::spawn(&rt, "not a number".to_string());
    let level2 = double::spawn(&rt, &parsed);
    let level3 = double::spawn(&rt, &level2);
    let err = level3.blocking_get().unwrap_err();
    match &err {
        Error::DependencyFailed { task, cause } => {
            assert!(task.ends_with("::double"), "{task}");
            assert!(matches!(&**cause, Error::DependencyFailed { .. }), "{cause}");
        }
        other => panic!("expected a dependency failure, got {other}"),
    }
    match err.root_cause() {
        Error::TaskFailed { task, message } => {
            assert!(task.ends_with("::parse"), "{task}");
            assert!(message.contains("invalid digit"), "{message}");
        }
        other => panic!("expected the parse failure at the root, got {other}"),
    }
    let chain = err.chain();
    assert_eq!(chain.len(), 3, "{chain:#?}");
    assert!(chain[2].contains("parse"), "{chain:#?}");
    // A good input through the same chain works.
    let ok = double::spawn(&rt, double::spawn(&rt, parse::spawn(&rt, "5".to_string())));
    assert_eq!(ok.blocking_get()?, 20);
    rt.shutdown();
    Ok(())
}

#[test]
fn a_panicking_task_leaves_the_runtime_working() -> Result<()> {
    let rt = runtime(2)?;
    let bad: Vec<_> = (1..=20).map(|i| explode::spawn(&rt, i)).collect();
    for r in &bad {
        match r.blocking_get() {
            Err(Error::TaskPanicked { task, message }) => {
                assert!(task.ends_with("::explode"));
                assert!(message.starts_with("boom at"), "{message}");
            }
            other => panic!("expected a panic error, got {other:?}"),
        }
    }
    let good: Vec<_> = (0..100).map(|i| square::spawn(&rt, i)).collect();
    for (i, r) in good.iter().enumerate() {
        assert_eq!(r.blocking_get()?, (i * i) as u64);
    }
    assert_eq!(rt.stats().tasks_failed, 20);
    rt.shutdown();
    Ok(())
}

#[test]
fn values_are_freed_when_their_last_ref_drops() -> Result<()> {
    let rt = runtime(2)?;
    assert_eq!(rt.stats().live_objects, 0);
    let data = rt.put(vec![1u8; 1 << 20]);
    let results: Vec<_> = (0..10).map(|i| bytes::spawn(&rt, 1000 + i)).collect();
    for r in &results {
        r.blocking_get()?;
    }
    let stats = rt.stats();
    assert_eq!(stats.live_objects, 11);
    assert!(stats.live_bytes >= 1 << 20, "{stats:?}");
    let copy = data.clone();
    drop(data);
    assert_eq!(rt.stats().live_objects, 11, "a clone still holds the value");
    drop(copy);
    drop(results);
    let stats = rt.stats();
    assert_eq!(stats.live_objects, 0, "{stats:?}");
    assert_eq!(stats.live_bytes, 0, "{stats:?}");

    // A value held only by a pending task lives until that task has run.
    let input = rt.put(3u64);
    let gate = sleepy::spawn(&rt, 50);
    let waiting = add::spawn(&rt, &gate, &input);
    drop(input);
    assert!(rt.stats().live_objects >= 3);
    assert_eq!(waiting.blocking_get()?, 53);
    drop(waiting);
    drop(gate);
    let deadline = Instant::now() + Duration::from_secs(5);
    while rt.stats().live_objects != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(rt.stats().live_objects, 0);
    rt.shutdown();
    Ok(())
}

/// Records every call it gets.
struct Recorder {
    seen: Vec<(usize, usize)>,
}

impl Actor for Recorder {
    type Message = Option<(usize, usize)>;
    type Reply = Vec<(usize, usize)>;
    fn handle(&mut self, message: Self::Message) -> Self::Reply {
        match message {
            Some(call) => {
                self.seen.push(call);
                Vec::new()
            }
            None => self.seen.clone(),
        }
    }
}

#[test]
fn actor_calls_keep_order_per_caller_under_eight_callers() -> Result<()> {
    let rt = runtime(2)?;
    let recorder = rt.actor(Recorder { seen: Vec::new() });
    const CALLERS: usize = 8;
    const CALLS: usize = 2000;
    std::thread::scope(|scope| {
        for caller in 0..CALLERS {
            let recorder = recorder.clone();
            scope.spawn(move || {
                let mut last = None;
                for seq in 0..CALLS {
                    last = Some(recorder.call(Some((caller, seq))));
                }
                last.expect("made calls").blocking_get().expect("call handled");
            });
        }
    });
    let seen = recorder.call(None).blocking_get()?;
    assert_eq!(seen.len(), CALLERS * CALLS);
    let mut next = [0usize; CALLERS];
    for (caller, seq) in seen {
        assert_eq!(seq, next[caller], "caller {caller} out of order");
        next[caller] += 1;
    }
    rt.shutdown();
    Ok(())
}

struct Fragile;

impl Actor for Fragile {
    type Message = bool;
    type Reply = u8;
    fn handle(&mut self, explode: bool) -> u8 {
        assert!(!explode, "fragile actor asked to explode");
        1
    }
}

#[test]
fn a_panicking_actor_fails_its_calls_with_a_clear_error() -> Result<()> {
    let rt = runtime(2)?;
    let fragile = rt.actor(Fragile);
    assert_eq!(fragile.call(false).blocking_get()?, 1);
    let err = fragile.call(true).blocking_get().unwrap_err();
    assert!(err.to_string().contains("fragile actor asked to explode"), "{err}");
    let later = fragile.call(false).blocking_get().unwrap_err();
    assert!(matches!(later, Error::ActorFailed { .. }), "{later}");
    // The runtime itself keeps working.
    assert_eq!(square::spawn(&rt, 9).blocking_get()?, 81);
    rt.shutdown();
    Ok(())
}

#[test]
fn shutdown_with_pending_work_returns_errors_instead_of_hanging() -> Result<()> {
    let rt = runtime(2)?;
    let running: Vec<_> = (0..2).map(|_| sleepy::spawn(&rt, 200)).collect();
    let queued: Vec<_> = (0..50).map(|_| sleepy::spawn(&rt, 200)).collect();
    let dependent = double::spawn(&rt, &queued[49]);
    let counter = rt.actor(Recorder { seen: Vec::new() });
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    rt.shutdown();
    assert!(start.elapsed() < Duration::from_secs(5), "shutdown took {:?}", start.elapsed());
    // Tasks that were running finish; queued ones fail with a clear error.
    let mut shut_down = 0;
    for r in running.iter().chain(&queued) {
        match r.blocking_get_timeout(Duration::from_secs(5)) {
            Ok(200) => {}
            Err(Error::Shutdown) => shut_down += 1,
            other => panic!("unexpected result after shutdown: {other:?}"),
        }
    }
    assert!(shut_down >= 45, "only {shut_down} tasks reported the shutdown");
    assert!(dependent.blocking_get_timeout(Duration::from_secs(5)).is_err());
    // New work after shutdown fails at once.
    assert!(matches!(square::spawn(&rt, 2).blocking_get(), Err(Error::Shutdown)));
    assert!(counter.call(None).blocking_get_timeout(Duration::from_secs(5)).is_err());
    assert!(rt.is_shut_down());
    rt.shutdown(); // twice is fine
    Ok(())
}

#[test]
fn wait_returns_ready_and_pending_with_a_timeout() -> Result<()> {
    let rt = runtime(2)?;
    let refs = vec![sleepy::spawn(&rt, 1), sleepy::spawn(&rt, 1), sleepy::spawn(&rt, 3000)];
    let start = Instant::now();
    let (ready, pending) = rt.blocking_wait(&refs, 3, Some(Duration::from_millis(300)));
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(290) && waited < Duration::from_secs(2), "{waited:?}");
    assert_eq!(ready.len(), 2);
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id(), refs[2].id());
    let (ready, pending) = rt.blocking_wait(&refs, 1, None);
    assert!(!ready.is_empty());
    assert!(pending.len() <= 1);
    rt.shutdown();
    Ok(())
}

#[test]
fn async_api_works_from_tokio() -> Result<()> {
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let rt = runtime(2)?;
    tokio.block_on(async {
        let a = square::spawn(&rt, 12);
        assert_eq!(a.get().await?, 144);
        assert_eq!(rt.get(&add::spawn(&rt, &a, 1)).await?, 145);
        let refs = vec![sleepy::spawn(&rt, 1), sleepy::spawn(&rt, 5000)];
        let (ready, pending) = rt.wait(&refs, 2, Some(Duration::from_millis(200))).await;
        assert_eq!((ready.len(), pending.len()), (1, 1));
        // Many concurrent getters on tokio tasks.
        let handles: Vec<_> = (0..100)
            .map(|i| {
                let r = square::spawn(&rt, i);
                tokio::spawn(async move { r.get().await })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.await??, (i * i) as u64);
        }
        anyhow::Ok(())
    })?;
    rt.shutdown();
    Ok(())
}

#[test]
fn retries_rerun_a_failing_task() -> Result<()> {
    let rt = runtime(2)?;
    FLAKY_CALLS.store(0, Ordering::SeqCst);
    let r = flaky::spawn_with(&rt, TaskOptions::new().retries(3), 2);
    assert_eq!(r.blocking_get()?, 2);
    FLAKY_CALLS.store(0, Ordering::SeqCst);
    let r = flaky::spawn_with(&rt, TaskOptions::new().retries(1), 5);
    let err = r.blocking_get().unwrap_err();
    assert!(err.to_string().contains("transient failure 1"), "{err}");
    rt.shutdown();
    Ok(())
}

#[test]
fn blocking_get_inside_tasks_does_not_starve_the_pool() -> Result<()> {
    let rt = runtime(1)?;
    let refs: Vec<_> = (0..50).map(|i| nested_get::spawn(&rt, i)).collect();
    for (i, r) in refs.iter().enumerate() {
        assert_eq!(r.blocking_get_timeout(Duration::from_secs(10))?, (i * i) as u64 + 1);
    }
    rt.shutdown();
    Ok(())
}

#[test]
fn every_policy_runs_graphs_correctly() -> Result<()> {
    for rt in [
        Runtime::builder().workers(3).policy(Fifo).build()?,
        Runtime::builder().workers(3).policy(RoundRobin::default()).build()?,
    ] {
        let total = range_sum::spawn(&rt, 0, 5000).blocking_get()?;
        assert_eq!(total, (0..5000u64).sum::<u64>(), "policy {}", rt.policy_name());
        rt.shutdown();
    }
    Ok(())
}

#[test]
fn tasks_are_registered_under_stable_names_and_run_from_bytes() -> Result<()> {
    let entry = TaskEntry::find(square::NAME).expect("square is registered");
    assert_eq!(square::NAME, concat!(module_path!(), "::square"));
    let args = bincode::serde::encode_to_vec(7u64, bincode::config::standard())?;
    let run = entry.run_on_node;
    let out = run(&mut tessera::__private::NodeArgs::encoded(square::NAME, vec![args]))?.encode()?;
    let (value, _): (u64, usize) = bincode::serde::decode_from_slice(&out, bincode::config::standard())?;
    assert_eq!(value, 49);
    let mut garbage = tessera::__private::NodeArgs::encoded(square::NAME, vec![vec![0xff, 0xff]]);
    assert!(run(&mut garbage).is_err(), "garbage arguments give an error, not a panic");
    assert!(TaskEntry::find("no::such::task").is_none());
    Ok(())
}

#[test]
fn metrics_are_served_for_prometheus() -> Result<()> {
    use std::io::{Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let rt =
        Runtime::builder().workers(2).prometheus(addr).metrics_interval(Duration::from_millis(10)).build()?;
    for i in 0..10 {
        square::spawn(&rt, i).blocking_get()?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = (|| -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect(addr)?;
            stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
            let mut body = String::new();
            stream.read_to_string(&mut body)?;
            Ok(body)
        })();
        if let Ok(body) = &body {
            if body.contains("tessera_tasks_submitted_total") && body.contains("tessera_live_objects") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "metrics never appeared: {body:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    rt.shutdown();
    Ok(())
}

#[test]
fn many_runtimes_start_and_stop() -> Result<()> {
    let counter = Arc::new(AtomicU32::new(0));
    for _ in 0..20 {
        let rt = runtime(2)?;
        assert_eq!(square::spawn(&rt, 3).blocking_get()?, 9);
        counter.fetch_add(1, Ordering::SeqCst);
        rt.shutdown();
    }
    assert_eq!(counter.load(Ordering::SeqCst), 20);
    Ok(())
}
