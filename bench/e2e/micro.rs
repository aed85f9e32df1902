//! `l4lb-bench micro-report`: criterion's results (target/criterion) as a
//! markdown table, per element where the benchmark declared a throughput.

use anyhow::{Context, Result};
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

fn collect(dir: &Path, since: u64, out: &mut Vec<Row>) -> Result<()> {
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
                .map_or(0, |d| d.as_secs());
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

pub fn report(dir: &Path, since: u64) -> Result<String> {
    let mut rows = Vec::new();
    collect(dir, since, &mut rows)?;
    rows.sort_by(|a, b| a.id.cmp(&b.id));
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
