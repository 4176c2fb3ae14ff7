//! `tessera bench-compare`: judges a change's benchmark figures against a base's. The
//! benchmarking CI (`scripts/bench-ci.sh`) runs the suites of both builds and calls this.
//!
//! Both inputs are files of `tessera bench --json` lines. A bench may appear several times
//! in a file, a line a run; its runs are summed up by their median. A bench measured on both
//! sides is judged in its own direction (higher or lower is better):
//! - **regressed** when the head's median is worse than the base's by more than the
//!   threshold *and* every head run is worse than every base run;
//! - **improved** the same way round;
//! - **noisy** when the medians differ by more than the threshold but the runs overlap
//!   (more runs would tell);
//! - **unchanged** otherwise.
//!
//! Requiring both keeps one slow run (a neighbour on the machine) from failing a change,
//! and a real slowdown that shows in every run from hiding behind the median of a few.
//! Benches on one side only, or whose unit or direction changed, are listed, not judged.
//! Only a regression fails the comparison (exit status 1).
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;

use super::{direction, median, BenchLine};

#[derive(Args)]
pub(crate) struct CompareArgs {
    /// The base's figures: `tessera bench --json` lines, one a run of a bench.
    base: PathBuf,
    /// The change's figures, in the same form.
    head: PathBuf,
    /// How much worse (in percent of the base) a bench's median may get before it counts
    /// as a regression.
    #[arg(long, default_value_t = 10.0)]
    threshold: f64,
    /// Also write the comparison as a Markdown table to this file (for a review comment).
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// Every run of one bench in one file.
#[derive(Debug, Clone, PartialEq)]
struct Runs {
    unit: String,
    higher_is_better: bool,
    values: Vec<f64>,
}

impl Runs {
    fn median(&self) -> f64 {
        median(&mut self.values.clone())
    }

    fn best(&self) -> f64 {
        self.extreme(self.higher_is_better)
    }

    fn worst(&self) -> f64 {
        self.extreme(!self.higher_is_better)
    }

    /// The largest run (`largest`) or the smallest.
    fn extreme(&self, largest: bool) -> f64 {
        let values = self.values.iter().copied();
        if largest {
            values.fold(f64::NEG_INFINITY, f64::max)
        } else {
            values.fold(f64::INFINITY, f64::min)
        }
    }
}

/// What became of one bench.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Regressed,
    Improved,
    Noisy,
    Unchanged,
    /// Measured by the head only.
    Added,
    /// Measured by the base only.
    Removed,
    /// On both sides, but not comparable; the reason.
    Incomparable(String),
}

impl Verdict {
    fn word(&self) -> String {
        match self {
            Verdict::Regressed => "REGRESSED".into(),
            Verdict::Improved => "improved".into(),
            Verdict::Noisy => "noisy".into(),
            Verdict::Unchanged => "unchanged".into(),
            Verdict::Added => "new".into(),
            Verdict::Removed => "gone".into(),
            Verdict::Incomparable(why) => format!("not compared: {why}"),
        }
    }
}

/// One bench's line of the comparison.
#[derive(Debug)]
struct Row {
    bench: String,
    unit: String,
    base: Option<Runs>,
    head: Option<Runs>,
    /// `head / base - 1` of the medians, where both are comparable.
    change: Option<f64>,
    verdict: Verdict,
}

/// Reads a file of `tessera bench --json` lines (blank lines skipped).
fn read_runs(path: &Path) -> Result<BTreeMap<String, Runs>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_runs(&text).with_context(|| format!("in {}", path.display()))
}

fn parse_runs(text: &str) -> Result<BTreeMap<String, Runs>> {
    let mut benches: BTreeMap<String, Runs> = BTreeMap::new();
    for (index, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let number = index + 1;
        let line: BenchLine = serde_json::from_str(line)
            .with_context(|| format!("line {number} is not a `tessera bench --json` line"))?;
        let runs = benches.entry(line.bench.clone()).or_insert_with(|| Runs {
            unit: line.unit.clone(),
            higher_is_better: line.higher_is_better,
            values: Vec::new(),
        });
        ensure!(
            runs.unit == line.unit && runs.higher_is_better == line.higher_is_better,
            "line {number}: {} was measured in {} ({}) before, now in {} ({})",
            line.bench,
            runs.unit,
            direction(runs.higher_is_better),
            line.unit,
            direction(line.higher_is_better)
        );
        runs.values.push(line.value);
    }
    ensure!(!benches.is_empty(), "no benchmark lines");
    Ok(benches)
}

/// Judges every bench of either side; `threshold` is a fraction (0.1 for 10 %).
fn judge(base: &BTreeMap<String, Runs>, head: &BTreeMap<String, Runs>, threshold: f64) -> Vec<Row> {
    let mut names: Vec<&String> = base.keys().chain(head.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let (base, head) = (base.get(name).cloned(), head.get(name).cloned());
            let unit = head.as_ref().or(base.as_ref()).map(|runs| runs.unit.clone()).unwrap_or_default();
            let (change, verdict) = match (&base, &head) {
                (Some(base), Some(head)) => judge_one(base, head, threshold),
                (None, _) => (None, Verdict::Added),
                (_, None) => (None, Verdict::Removed),
            };
            Row { bench: name.clone(), unit, base, head, change, verdict }
        })
        .collect()
}

fn judge_one(base: &Runs, head: &Runs, threshold: f64) -> (Option<f64>, Verdict) {
    if base.unit != head.unit || base.higher_is_better != head.higher_is_better {
        let why = format!(
            "was {} ({}), is {} ({})",
            base.unit,
            direction(base.higher_is_better),
            head.unit,
            direction(head.higher_is_better)
        );
        return (None, Verdict::Incomparable(why));
    }
    let (base_median, head_median) = (base.median(), head.median());
    // A ratio needs two positive figures: a zero or negative one is a broken measurement,
    // on either side (a head of 0 is not an infinite improvement).
    if base_median <= 0.0 {
        return (None, Verdict::Incomparable(format!("the base's median is {base_median}")));
    }
    if head_median <= 0.0 {
        return (None, Verdict::Incomparable(format!("the head's median is {head_median}")));
    }
    let change = head_median / base_median - 1.0;
    // How much worse the head is, in the bench's own direction (negative: better).
    let worse = if base.higher_is_better { -change } else { change };
    let better_than = |a: f64, b: f64| if base.higher_is_better { a > b } else { a < b };
    let verdict = if worse > threshold {
        // Even the head's best run is worse than the base's worst.
        if better_than(base.worst(), head.best()) {
            Verdict::Regressed
        } else {
            Verdict::Noisy
        }
    } else if -worse > threshold {
        if better_than(head.worst(), base.best()) {
            Verdict::Improved
        } else {
            Verdict::Noisy
        }
    } else {
        Verdict::Unchanged
    };
    (Some(change), verdict)
}

fn figure(runs: &Option<Runs>) -> String {
    match runs {
        Some(runs) => format!("{} ({}×)", significant(runs.median()), runs.values.len()),
        None => "—".into(),
    }
}

/// A figure to four significant digits, without an exponent for everyday sizes.
fn significant(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return value.to_string();
    }
    let digits = (3 - value.abs().log10().floor() as i32).clamp(0, 9) as usize;
    format!("{value:.digits$}")
}

fn percent(change: Option<f64>) -> String {
    change.map_or_else(|| "—".into(), |change| format!("{:+.1}%", change * 100.0))
}

fn table(rows: &[Row]) -> String {
    let width = rows.iter().map(|row| row.bench.len()).max().unwrap_or(0).max(5);
    let mut out = format!("{:<width$}  {:>18}  {:>18}  {:>8}  verdict\n", "bench", "base", "head", "change");
    for row in rows {
        let _ = writeln!(
            out,
            "{:<width$}  {:>18}  {:>18}  {:>8}  {} [{}, {}]",
            row.bench,
            figure(&row.base),
            figure(&row.head),
            percent(row.change),
            row.verdict.word(),
            row.unit,
            direction(row.head.as_ref().or(row.base.as_ref()).is_some_and(|runs| runs.higher_is_better))
        );
    }
    out
}

fn markdown(rows: &[Row], summary: &str) -> String {
    let mut out = String::from(
        "| bench | unit | base | head | change | verdict |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for row in rows {
        let verdict = row.verdict.word();
        let verdict = if row.verdict == Verdict::Regressed { format!("**{verdict}**") } else { verdict };
        let arrow = if row.head.as_ref().or(row.base.as_ref()).is_some_and(|runs| runs.higher_is_better) {
            "↑"
        } else {
            "↓"
        };
        let _ = writeln!(
            out,
            "| `{}` | {} {arrow} | {} | {} | {} | {verdict} |",
            row.bench,
            row.unit,
            figure(&row.base),
            figure(&row.head),
            percent(row.change)
        );
    }
    let _ = writeln!(out, "\n{summary}");
    out
}

fn summary(rows: &[Row], threshold_percent: f64) -> String {
    let count = |wanted: fn(&Verdict) -> bool| rows.iter().filter(|row| wanted(&row.verdict)).count();
    format!(
        "{} regressed, {} improved, {} noisy, {} unchanged, {} new, {} gone, {} not compared \
         (threshold {threshold_percent}%; medians, and every run beyond the other side's)",
        count(|v| *v == Verdict::Regressed),
        count(|v| *v == Verdict::Improved),
        count(|v| *v == Verdict::Noisy),
        count(|v| *v == Verdict::Unchanged),
        count(|v| *v == Verdict::Added),
        count(|v| *v == Verdict::Removed),
        count(|v| matches!(v, Verdict::Incomparable(_))),
    )
}

pub(crate) fn run(args: CompareArgs) -> Result<()> {
    ensure!(
        args.threshold.is_finite() && args.threshold > 0.0 && args.threshold < 1000.0,
        "--threshold is a percentage above 0 and below 1000, not {}",
        args.threshold
    );
    let base = read_runs(&args.base)?;
    let head = read_runs(&args.head)?;
    let rows = judge(&base, &head, args.threshold / 100.0);
    ensure!(
        rows.iter().any(|row| row.change.is_some()),
        "no bench was measured comparably by both {} and {}: nothing to judge",
        args.base.display(),
        args.head.display()
    );
    let summary = summary(&rows, args.threshold);
    crate::write_stdout(&format!("{}{summary}\n", table(&rows)))?;
    if let Some(path) = &args.markdown {
        std::fs::write(path, markdown(&rows, &summary))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let regressed: Vec<&str> =
        rows.iter().filter(|row| row.verdict == Verdict::Regressed).map(|row| row.bench.as_str()).collect();
    if !regressed.is_empty() {
        bail!(
            "{} bench(es) regressed by more than {}%: {}",
            regressed.len(),
            args.threshold,
            regressed.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(bench: &str, value: f64, unit: &str, higher_is_better: bool) -> String {
        format!(
            r#"{{"bench":"{bench}","value":{value},"unit":"{unit}","higher_is_better":{higher_is_better}}}"#
        )
    }

    fn runs(bench: &str, values: &[f64], higher_is_better: bool) -> String {
        let unit = if higher_is_better { "tasks/s" } else { "ms" };
        values.iter().map(|value| line(bench, *value, unit, higher_is_better) + "\n").collect()
    }

    fn verdicts(base: &str, head: &str) -> Vec<(String, Verdict)> {
        let rows = judge(&parse_runs(base).unwrap(), &parse_runs(head).unwrap(), 0.10);
        rows.into_iter().map(|row| (row.bench, row.verdict)).collect()
    }

    fn verdict(base: &[f64], head: &[f64], higher_is_better: bool) -> Verdict {
        let found = verdicts(&runs("b", base, higher_is_better), &runs("b", head, higher_is_better));
        assert_eq!(found.len(), 1);
        found[0].1.clone()
    }

    #[test]
    fn a_slowdown_in_every_run_regresses_in_either_direction() {
        // Lower is better: 20 % slower in every run.
        assert_eq!(verdict(&[100.0, 101.0, 99.0], &[120.0, 121.0, 119.0], false), Verdict::Regressed);
        // Higher is better: 20 % fewer tasks a second.
        assert_eq!(verdict(&[100.0, 101.0, 99.0], &[80.0, 81.0, 79.0], true), Verdict::Regressed);
        // The same changes the other way round are improvements.
        assert_eq!(verdict(&[120.0, 121.0, 119.0], &[100.0, 101.0, 99.0], false), Verdict::Improved);
        assert_eq!(verdict(&[80.0, 81.0, 79.0], &[100.0, 101.0, 99.0], true), Verdict::Improved);
    }

    #[test]
    fn changes_within_the_threshold_are_unchanged() {
        assert_eq!(verdict(&[100.0, 101.0, 99.0], &[109.0, 108.0, 109.5], false), Verdict::Unchanged);
        assert_eq!(verdict(&[100.0, 101.0, 99.0], &[91.0, 92.0, 91.5], true), Verdict::Unchanged);
    }

    #[test]
    fn a_median_beyond_the_threshold_with_overlapping_runs_is_noisy() {
        // The head's median is 30 % worse, but one head run beats a base run.
        assert_eq!(verdict(&[100.0, 140.0, 99.0], &[130.0, 131.0, 98.0], false), Verdict::Noisy);
        assert_eq!(verdict(&[100.0, 60.0, 99.0], &[70.0, 71.0, 102.0], true), Verdict::Noisy);
    }

    #[test]
    fn one_run_a_side_is_judged_by_the_threshold_alone() {
        assert_eq!(verdict(&[100.0], &[111.0], false), Verdict::Regressed);
        assert_eq!(verdict(&[100.0], &[109.0], false), Verdict::Unchanged);
    }

    #[test]
    fn benches_on_one_side_or_with_another_unit_are_listed_not_judged() {
        let base =
            runs("kept", &[1.0], false) + &runs("removed", &[1.0], false) + &line("unit", 1.0, "ms", false);
        let head =
            runs("kept", &[1.0], false) + &runs("added", &[5.0], false) + &line("unit", 9.0, "s", false);
        let found = verdicts(&base, &head);
        assert_eq!(
            found,
            vec![
                ("added".to_string(), Verdict::Added),
                ("kept".to_string(), Verdict::Unchanged),
                ("removed".to_string(), Verdict::Removed),
                (
                    "unit".to_string(),
                    Verdict::Incomparable("was ms (lower is better), is s (lower is better)".into())
                ),
            ]
        );
    }

    #[test]
    fn a_zero_or_negative_figure_on_either_side_is_not_compared() {
        assert!(matches!(verdict(&[0.0], &[1.0], true), Verdict::Incomparable(_)));
        for head in [0.0, -1.0] {
            for higher_is_better in [true, false] {
                let judged = verdict(&[1.0], &[head], higher_is_better);
                assert!(
                    matches!(&judged, Verdict::Incomparable(why) if why.contains("head's median")),
                    "head {head}: {judged:?}"
                );
            }
        }
    }

    #[test]
    fn malformed_input_is_an_error_naming_the_line() {
        let bad = runs("b", &[1.0], true) + "not json\n";
        let error = format!("{:#}", parse_runs(&bad).unwrap_err());
        assert!(error.contains("line 2"), "{error}");
        let switched = runs("b", &[1.0], true) + &runs("b", &[1.0], false);
        let error = format!("{:#}", parse_runs(&switched).unwrap_err());
        assert!(error.contains("higher is better") && error.contains("lower is better"), "{error}");
        assert!(parse_runs("\n\n").is_err(), "an empty file must not pass as no regressions");
        assert!(parse_runs(&line("b", f64::NAN, "ms", false).replace("NaN", "null")).is_err());
    }

    #[test]
    fn the_table_and_markdown_show_each_bench_and_verdict() {
        let base = runs("suite/slow", &[100.0, 101.0], false) + &runs("suite/fast", &[10.0], true);
        let head = runs("suite/slow", &[130.0, 131.0], false) + &runs("suite/fast", &[10.5], true);
        let rows = judge(&parse_runs(&base).unwrap(), &parse_runs(&head).unwrap(), 0.10);
        let text = table(&rows);
        assert!(
            text.contains("suite/slow") && text.contains("+29.9%") && text.contains("REGRESSED"),
            "{text}"
        );
        assert!(
            text.contains("suite/fast") && text.contains("+5.0%") && text.contains("unchanged"),
            "{text}"
        );
        let summary = summary(&rows, 10.0);
        assert!(summary.starts_with("1 regressed, 0 improved, 0 noisy, 1 unchanged"), "{summary}");
        let md = markdown(&rows, &summary);
        assert!(
            md.contains("| `suite/slow` | ms ↓ | 100.5 (2×) | 130.5 (2×) | +29.9% | **REGRESSED** |"),
            "{md}"
        );
    }
}
