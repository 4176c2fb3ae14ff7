//! The benchmarking CI (`scripts/bench-ci.sh`) end to end: the head is the real `tessera`
//! binary running its `tasks` suite; the base is a stand-in binary whose figures are far
//! better or far worse, so the verdict is certain. A regression, or a suite the head
//! breaks, must fail the run; an improvement must pass it with a report.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Result};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

/// Writes an executable shell script.
fn script(dir: &Path, name: &str, body: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/usr/bin/env bash\n{body}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// A base whose `tessera bench tasks --json` reports every bench `factor` times better
/// than any real machine would (a factor below 1: worse).
fn base_scaled(dir: &Path, factor: f64) -> Result<PathBuf> {
    let line = |bench: &str, value: f64, unit: &str, higher: bool| {
        format!(
            r#"echo '{{"bench":"tasks/{bench}","value":{value},"unit":"{unit}","higher_is_better":{higher}}}'"#
        )
    };
    let body = [
        line("independent", 1e6 * factor, "tasks/s", true),
        line("chain", 1.0 / factor, "us/task", false),
        line("roundtrip", 5.0 / factor, "us", false),
        line("actor_calls", 1e6 * factor, "calls/s", true),
    ]
    .join("\n");
    script(dir, "base", &body)
}

fn bench_ci(base: &Path, head: &Path, out: &Path) -> Result<Output> {
    let root = env!("CARGO_MANIFEST_DIR");
    Ok(Command::new("bash")
        .arg(format!("{root}/scripts/bench-ci.sh"))
        .args(["--runs", "1", "--settle", "0", "--base-bin"])
        .arg(base)
        .arg("--head-bin")
        .arg(head)
        .arg("--out")
        .arg(out)
        .arg("tasks")
        .output()?)
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn a_regression_fails_the_run_and_names_each_bench() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = base_scaled(dir.path(), 1e6)?;
    let output = bench_ci(&base, Path::new(TESSERA), &dir.path().join("out"))?;
    let said = text(&output);
    ensure!(output.status.code() == Some(1), "a regression must fail the run: {said}");
    ensure!(said.contains("4 bench(es) regressed by more than 10%"), "{said}");
    let report = std::fs::read_to_string(dir.path().join("out/report.md"))?;
    for bench in ["independent", "chain", "roundtrip", "actor_calls"] {
        let row = report.lines().find(|row| row.contains(&format!("`tasks/{bench}`")));
        ensure!(row.is_some_and(|row| row.contains("**REGRESSED**")), "tasks/{bench} in\n{report}");
    }
    ensure!(report.contains("runs a side: 1;"), "{report}");
    Ok(())
}

#[test]
fn an_improvement_passes_with_a_report() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = base_scaled(dir.path(), 1e-6)?;
    let out = dir.path().join("out");
    let output = bench_ci(&base, Path::new(TESSERA), &out)?;
    let said = text(&output);
    ensure!(output.status.success(), "{said}");
    ensure!(said.contains("0 regressed, 4 improved"), "{said}");
    let report = std::fs::read_to_string(out.join("report.md"))?;
    ensure!(report.contains("| `tasks/chain` | us/task ↓ |") && report.contains("| improved |"), "{report}");
    // Every run's figures are kept beside the report.
    let head = std::fs::read_to_string(out.join("head.jsonl"))?;
    ensure!(head.lines().count() == 4, "{head}");
    Ok(())
}

#[test]
fn a_suite_the_head_breaks_fails_the_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = base_scaled(dir.path(), 1.0)?;
    // A head whose suites fail; it judges with the real binary.
    let head = script(
        dir.path(),
        "head",
        &format!("if [[ $1 == bench ]]; then echo 'the suite broke' >&2; exit 3; fi\nexec {TESSERA} \"$@\""),
    )?;
    let output = bench_ci(&base, &head, &dir.path().join("out"))?;
    let said = text(&output);
    ensure!(output.status.code() == Some(1), "{said}");
    ensure!(said.contains("a suite failed with the head: tasks (run 1: exit 3"), "{said}");
    ensure!(said.contains("the suite broke"), "the suite's own error must be shown: {said}");
    Ok(())
}
