//! `l4lb-bench micro-report`: criterion's results (target/criterion) as a
//! markdown table, per element where the benchmark declared a throughput;
//! with `--samples`, as plain `benchmark nanoseconds-per-element` lines,
//! which `l4lb-bench micro-repeated` summarises over several runs.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

struct Row {
    id: String,
    /// Nanoseconds per iteration: (lower bound, estimate, upper bound).
    time: (f64, f64, f64),
    elements: Option<u64>,
}

fn estimate(v: &Value) -> Option<(f64, f64, f64)> {
    // Criterion's headline figure: the slope of the linear regression when
    // it sampled linearly, the mean otherwise.
    let e = if v["slope"].is_object() {
        &v["slope"]
    } else {
        &v["mean"]
    };
    let ci = &e["confidence_interval"];
    Some((
        ci["lower_bound"].as_f64()?,
        e["point_estimate"].as_f64()?,
        ci["upper_bound"].as_f64()?,
    ))
}

fn collect(dir: &Path, since: f64, out: &mut Vec<Row>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if !p.is_dir() {
            continue;
        }
        let new = p.join("new");
        let (est, bm) = (new.join("estimates.json"), new.join("benchmark.json"));
        if est.exists() && bm.exists() {
            let written = std::fs::metadata(&est)?
                .modified()?
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            if written < since {
                continue;
            }
            let est: Value = serde_json::from_str(&std::fs::read_to_string(&est)?)?;
            let bm: Value = serde_json::from_str(&std::fs::read_to_string(&bm)?)?;
            if let Some(time) = estimate(&est) {
                out.push(Row {
                    id: bm["full_id"].as_str().unwrap_or("?").to_string(),
                    time,
                    elements: bm["throughput"]["Elements"].as_u64(),
                });
            }
        } else if p.file_name().is_some_and(|n| n != "report") {
            collect(&p, since, out)?;
        }
    }
    Ok(())
}

fn ns(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} ms", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.2} µs", x / 1e3)
    } else {
        format!("{x:.1} ns")
    }
}

fn rows(dir: &Path, since: f64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    collect(dir, since, &mut rows)?;
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(rows)
}

/// One `benchmark nanoseconds` line per benchmark that declared a
/// throughput in elements: its estimate per element, unrounded.
pub fn samples(dir: &Path, since: f64) -> Result<String> {
    let mut o = String::new();
    for r in rows(dir, since)? {
        if let Some(n) = r.elements {
            let _ = writeln!(o, "{} {}", r.id, r.time.1 / n as f64);
        }
    }
    Ok(o)
}

/// The runs collected by [`samples`] (several outputs concatenated in
/// `text`, read from `file`) as a markdown table: per benchmark, how many
/// runs, the median of their estimates and the min–max.
pub fn repeated(file: &str, text: &str) -> Result<String> {
    let mut runs: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for (i, line) in text.lines().enumerate() {
        let at = || format!("{file}:{}", i + 1);
        let mut f = line.split_whitespace();
        let (Some(id), Some(v), None) = (f.next(), f.next(), f.next()) else {
            bail!("{}: expected \"benchmark nanoseconds\", got {line:?}", at());
        };
        let v: f64 = match v.parse() {
            Ok(v) if v > 0.0 && f64::is_finite(v) => v,
            _ => bail!("{}: {v:?} is not a time in nanoseconds", at()),
        };
        runs.entry(id).or_default().push(v);
    }
    if runs.is_empty() {
        bail!("{file}: no samples");
    }
    // Every run times the same benchmarks: a benchmark with fewer samples
    // than another is a result of some other run, picked up by mistake.
    let most = runs.values().map(Vec::len).max().unwrap_or(0);
    if let Some((id, v)) = runs.iter().find(|(_, v)| v.len() != most) {
        bail!(
            "{file}: {id} has {} sample(s), other benchmarks {most}: not all from the same runs",
            v.len()
        );
    }
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| benchmark | runs | per element: median of the runs' estimates | min–max |"
    );
    let _ = writeln!(o, "|---|---:|---:|---|");
    for (id, v) in runs {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let _ = writeln!(
            o,
            "| {id} | {} | {} | {}–{} |",
            v.len(),
            ns(super::median(v)),
            ns(lo),
            ns(hi)
        );
    }
    Ok(o)
}

pub fn report(dir: &Path, since: f64) -> Result<String> {
    let rows = rows(dir, since)?;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| benchmark | time per iteration (95 % CI) | elements | per element |"
    );
    let _ = writeln!(o, "|---|---|---:|---:|");
    for r in rows {
        let (lo, mid, hi) = r.time;
        let per = r.elements.map_or("—".to_string(), |n| {
            format!(
                "{} ({}–{})",
                ns(mid / n as f64),
                ns(lo / n as f64),
                ns(hi / n as f64)
            )
        });
        let _ = writeln!(
            o,
            "| {} | {} ({}–{}) | {} | {} |",
            r.id,
            ns(mid),
            ns(lo),
            ns(hi),
            r.elements.map_or("—".to_string(), |n| n.to_string()),
            per
        );
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_runs_give_each_benchmark_its_median_and_range() {
        let text = "pipeline/b 30.04\npipeline/a 81.0\npipeline/b 28.96\n\
                    pipeline/a 77.0\npipeline/b 29.4\npipeline/a 78.5\npipeline/a 80.5\npipeline/b 29.6\n";
        assert_eq!(
            repeated("s", text).unwrap(),
            "| benchmark | runs | per element: median of the runs' estimates | min–max |\n\
             |---|---:|---:|---|\n\
             | pipeline/a | 4 | 79.5 ns | 77.0 ns–81.0 ns |\n\
             | pipeline/b | 4 | 29.5 ns | 29.0 ns–30.0 ns |\n"
        );
    }

    #[test]
    fn a_broken_sample_line_is_located() {
        let e = repeated("/tmp/s", "pipeline/a 80.1\npipeline/a 79 ns\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/tmp/s:2: expected \"benchmark nanoseconds\", got \"pipeline/a 79 ns\""
        );
        let e = repeated("/tmp/s", "pipeline/a NaN\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/tmp/s:1: \"NaN\" is not a time in nanoseconds"
        );
        let e = repeated("/tmp/s", "").unwrap_err();
        assert_eq!(e.to_string(), "/tmp/s: no samples");
        let e = repeated("/tmp/s", "p/a 80\np/b 29\np/a 79\np/b 30\np/c 31\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/tmp/s: p/c has 1 sample(s), other benchmarks 2: not all from the same runs"
        );
    }
}
