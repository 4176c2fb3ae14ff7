//! Shutdown leaves no thread behind. A test binary of its own, so that no other test's
//! threads come and go while it counts.
use std::time::{Duration, Instant};

use anyhow::Result;
use tessera::Runtime;

tessera::task! {
    fn square(x: u64) -> u64 { x * x }
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|dir| dir.count()).unwrap_or(0)
}

/// The names of this process's threads (for failure messages).
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| {
                    std::fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the thread count is back to `before`. `shutdown` joins every thread before
/// it returns, but a joined thread can stay listed in /proc for a moment while the kernel
/// reaps it; a thread really left behind keeps the count up past the deadline.
fn assert_back_to(before: usize, what: &str) {
    let end = Instant::now() + Duration::from_secs(5);
    while thread_count() != before {
        assert!(
            Instant::now() < end,
            "{what}: {} threads, expected {before}: {:?}",
            thread_count(),
            thread_names()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_for(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !condition() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn shutdown_and_drop_leave_no_thread_behind() -> Result<()> {
    let before = thread_count();
    // 6 workers + 5 actor threads + the actor system + the metrics publisher.
    let rt = Runtime::builder().workers(6).actor_threads(5).build()?;
    wait_for("the runtime's threads", Duration::from_secs(5), || thread_count() >= before + 13);
    assert_eq!(square::spawn(&rt, 4).blocking_get()?, 16);
    rt.shutdown();
    assert_back_to(before, "threads left after shutdown()");

    let rt = Runtime::builder().workers(3).actor_threads(2).build()?;
    let clone = rt.clone();
    assert_eq!(square::spawn(&clone, 5).blocking_get()?, 25);
    drop(rt);
    assert!(thread_count() > before, "a clone keeps the runtime running");
    drop(clone);
    assert_back_to(before, "threads left after the last handle dropped");
    Ok(())
}
