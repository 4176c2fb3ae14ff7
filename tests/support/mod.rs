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
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            filtered += 1;
            continue;
        }
        let t = Instant::now();
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
