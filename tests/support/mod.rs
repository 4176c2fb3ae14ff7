//! A minimal test runner for the harness-less test binaries (`harness = false`), whose
//! `main` must first decide whether this process is a member or node re-executed by a
//! test. It prints libtest-style lines, so CI reads the closing summary as usual.
use std::time::Instant;

/// One test: a name and a function.
pub type TestFn = fn() -> anyhow::Result<()>;

/// Runs `tests` (filtered by the command-line arguments, as libtest does) one after the
/// other, prints a summary, and exits with status 1 if any failed.
pub fn run(tests: &[(&str, TestFn)]) -> ! {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    println!("\nrunning {} tests", tests.len());
    let (mut passed, mut failed, mut filtered) = (0, 0, 0);
    let start = Instant::now();
    let running = watch_for_hangs();
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            filtered += 1;
            continue;
        }
        let t = Instant::now();
        *running.lock().unwrap_or_else(|e| e.into_inner()) = Some((name.to_string(), t));
        match test() {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1} s)", t.elapsed().as_secs_f64());
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED: {e:#}");
            }
        }
    }
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; {filtered} filtered out; finished in {:.2}s\n",
        start.elapsed().as_secs_f64()
    );
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

/// The longest one test may run (`TESSERA_TEST_LIMIT_S`, default 600 s) before the binary
/// fails: a test that hangs (a lost wake-up, a collective waiting for a dead rank) fails CI
/// instead of stalling it.
fn watch_for_hangs() -> std::sync::Arc<std::sync::Mutex<Option<(String, Instant)>>> {
    let limit = std::env::var("TESSERA_TEST_LIMIT_S").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let limit = std::time::Duration::from_secs(limit);
    let running = std::sync::Arc::new(std::sync::Mutex::new(None::<(String, Instant)>));
    let watched = running.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        if let Some((name, since)) = &*watched.lock().unwrap_or_else(|e| e.into_inner()) {
            if since.elapsed() > limit {
                println!("test {name} ... FAILED: still running after {limit:?} (TESSERA_TEST_LIMIT_S)");
                std::process::exit(1);
            }
        }
    });
    running
}
