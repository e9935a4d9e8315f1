//! The run folder and our reports in it: `summary.json` (machine-readable, read back by
//! `--baseline`), `summary.md` (targets, achieved values, pass/fail, cost table), and the
//! tables printed at the end of a run. goose writes its own `report.html` and `report.json`
//! into the same folder.

use std::path::{Path, PathBuf};

use comfy_table::{Table, presets};
use serde::{Deserialize, Serialize};

use crate::open_loop::OpenLoopSummary;
use crate::stats::StatsSummary;
use crate::targets::{TargetResult, fmt_ms, fmt_usd};

/// What went wrong writing or reading reports.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("could not write {path}: {source}; check that the folder is writable")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "could not read the baseline {path}: {source}; pass a run folder that holds summary.json"
    )]
    ReadBaseline {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the baseline {path} is not a loadtest summary.json: {source}")]
    ParseBaseline {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not encode the summary: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Everything one run found; `summary.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// UTC start time, RFC 3339.
    pub started_at: String,
    /// `closed-loop (goose)` or `open-loop`.
    pub mode: String,
    pub host: String,
    /// The engine and simulator were started in-process for this run.
    pub self_hosted: bool,
    pub duration_secs: f64,
    pub users: Option<usize>,
    pub passed: bool,
    pub targets: Vec<TargetResult>,
    pub stats: StatsSummary,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_loop: Option<OpenLoopSummary>,
    /// The simulator's own counters (self-contained mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sim: Option<keyvex_sim::SimStats>,
    /// goose's threshold results, as its reports show them.
    #[serde(default)]
    pub goose_thresholds: Vec<goose::threshold::ThresholdResult>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub baseline: Vec<Delta>,
    /// The baseline folder compared with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_from: Option<String>,
}

/// A fresh run folder under `root`: `<root>/<YYYYMMDD-HHMMSS>` in UTC, with `-2`, `-3`, … when
/// a run already took the name.
pub fn run_dir(root: &Path) -> Result<PathBuf, ReportError> {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!("[year][month][day]-[hour][minute][second]");
    let stamp = now
        .format(&fmt)
        .unwrap_or_else(|_| now.unix_timestamp().to_string());
    let mut dir = root.join(&stamp);
    let mut n = 2;
    while dir.exists() {
        dir = root.join(format!("{stamp}-{n}"));
        n += 1;
    }
    std::fs::create_dir_all(&dir).map_err(|source| ReportError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    Ok(dir)
}

/// The targets table: what was asked, what was achieved, and by how much a miss missed.
pub fn targets_table(targets: &[TargetResult], markdown: bool) -> String {
    let mut t = table(markdown);
    t.set_header([
        "target",
        "limit",
        "achieved",
        "result",
        "missed by",
        "judged by",
    ]);
    for r in targets {
        t.add_row([
            r.name.clone(),
            r.limit.clone(),
            r.achieved.clone(),
            if r.passed { "PASS" } else { "FAIL" }.to_owned(),
            r.miss.clone().unwrap_or_default(),
            r.judged_by.clone(),
        ]);
    }
    t.to_string()
}

/// The per-scenario counts and money.
pub fn cost_table(s: &StatsSummary, markdown: bool) -> String {
    let mut t = table(markdown);
    t.set_header([
        "scenario",
        "requests",
        "failed",
        "fallbacks",
        "input tok",
        "output tok",
        "cost",
        "cost / request",
    ]);
    for (name, row) in &s.scenarios {
        let cost = row.cost_micro_usd as f64 / 1e6;
        t.add_row([
            name.clone(),
            row.requests.to_string(),
            row.failed.to_string(),
            row.fallbacks.to_string(),
            row.input_tokens.to_string(),
            row.output_tokens.to_string(),
            fmt_usd(cost),
            fmt_usd(cost / row.requests.max(1) as f64),
        ]);
    }
    t.to_string()
}

/// Latency distributions as one table.
pub fn latency_table(s: &StatsSummary, markdown: bool) -> String {
    let mut t = table(markdown);
    t.set_header(["metric", "count", "mean", "p50", "p90", "p95", "p99", "max"]);
    for (name, d) in [
        ("first event", &s.first_event_ms),
        ("ttft", &s.ttft_ms),
        ("e2e (request)", &s.e2e_ms),
        ("e2e (pipeline)", &s.pipeline_e2e_ms),
        ("time per output token", &s.tpot_ms),
        ("stall (longest gap)", &s.stall_ms),
    ] {
        t.add_row([
            name.to_owned(),
            d.count.to_string(),
            fmt_ms(d.mean),
            fmt_ms(d.p50),
            fmt_ms(d.p90),
            fmt_ms(d.p95),
            fmt_ms(d.p99),
            fmt_ms(d.max),
        ]);
    }
    t.to_string()
}

fn table(markdown: bool) -> Table {
    let mut t = Table::new();
    t.load_preset(if markdown {
        presets::ASCII_MARKDOWN
    } else {
        presets::UTF8_FULL_CONDENSED
    });
    t
}

/// `summary.md`.
pub fn markdown(s: &Summary) -> String {
    let st = &s.stats;
    let mut md = format!(
        "# Load test {}\n\n- mode: {}\n- host: {}{}\n- duration: {:.1} s{}\n- result: **{}**\n\n",
        s.started_at,
        s.mode,
        s.host,
        if s.self_hosted {
            " (in-process engine + simulator)"
        } else {
            ""
        },
        s.duration_secs,
        s.users.map(|u| format!(", {u} users")).unwrap_or_default(),
        if s.passed { "PASS" } else { "FAIL" },
    );
    md += "## Targets\n\n";
    md += &targets_table(&s.targets, true);
    md += &format!(
        "\n\n## Requests\n\n{} requests, {} failed ({:.2} %): {} HTTP errors, {} transport errors, {} mid-stream errors; {} fallbacks; {} rescued (a stream broken after content, finished by another call); {} costs partly estimated; {} dropped and {} late (open loop).\n\n",
        st.requests,
        st.failed,
        st.error_rate * 100.0,
        st.http_errors,
        st.transport_errors,
        st.stream_errors,
        st.fallbacks,
        st.rescued,
        st.estimated_costs,
        st.dropped,
        st.late
    );
    if !st.failures.is_empty() {
        md += "| failure | count |\n|---|---|\n";
        for (why, n) in &st.failures {
            md += &format!("| {why} | {n} |\n");
        }
        md += "\n";
    }
    md += "## Latency\n\n";
    md += &latency_table(st, true);
    md += &format!(
        "\n\n## Cost\n\nTotal {}; per request mean {} (max {}); per pipeline run mean {} (max {}).\n\n",
        fmt_usd(st.total_cost_usd),
        fmt_usd(st.cost_per_request_usd.mean),
        fmt_usd(st.cost_per_request_usd.max),
        fmt_usd(st.cost_per_pipeline_usd.mean),
        fmt_usd(st.cost_per_pipeline_usd.max),
    );
    md += &cost_table(st, true);
    md += "\n";
    if let Some(o) = &s.open_loop {
        md += &format!(
            "\n## Open loop\n\n{:.2} arrivals/s ({}), {} scheduled, {} sent, {} dropped (in-flight bound {}), {} late. Mean latency from scheduled time: first quarter {}, last quarter {}.\n",
            o.rate_per_sec,
            if o.poisson {
                "Poisson"
            } else {
                "fixed interval"
            },
            o.scheduled,
            o.sent,
            o.dropped,
            o.max_in_flight,
            o.late,
            o.first_quarter_mean_ms.map_or("n/a".to_owned(), fmt_ms),
            o.last_quarter_mean_ms.map_or("n/a".to_owned(), fmt_ms),
        );
        if !st.timeline.is_empty() {
            md += "\n| second | arrivals | mean latency from scheduled time |\n|---|---|---|\n";
            for p in &st.timeline {
                md += &format!(
                    "| {} | {} | {} |\n",
                    p.second,
                    p.arrivals,
                    fmt_ms(p.mean_latency_ms)
                );
            }
        }
    }
    if let Some(sim) = &s.sim {
        md += &format!(
            "\n## Simulator\n\n{} provider requests, {} faults injected, {} streams completed, {} aborted.\n",
            sim.requests_total, sim.faults_injected, sim.streams_completed, sim.streams_aborted
        );
    }
    if !s.baseline.is_empty() {
        md += &format!(
            "\n## Compared with {}\n\n",
            s.baseline_from.as_deref().unwrap_or("the baseline")
        );
        md += &baseline_table(&s.baseline, true);
        md += "\n";
    }
    md
}

/// Writes `summary.json` and `summary.md` into `dir`.
pub fn write(dir: &Path, s: &Summary) -> Result<(), ReportError> {
    let put = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| ReportError::Write {
            path: path.display().to_string(),
            source,
        })
    };
    put("summary.json", serde_json::to_string_pretty(s)?)?;
    put("summary.md", markdown(s))
}

/// Reads a run folder's `summary.json` (or that file itself).
pub fn load_baseline(path: &Path) -> Result<Summary, ReportError> {
    let file = if path.is_dir() {
        path.join("summary.json")
    } else {
        path.to_owned()
    };
    let text = std::fs::read_to_string(&file).map_err(|source| ReportError::ReadBaseline {
        path: file.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ReportError::ParseBaseline {
        path: file.display().to_string(),
        source,
    })
}

/// One metric, then and now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    pub metric: String,
    pub unit: String,
    pub baseline: f64,
    pub current: f64,
    pub delta: f64,
    /// `None` when the baseline was 0.
    pub delta_pct: Option<f64>,
}

/// The headline metrics of `now` against `base`.
pub fn compare(base: &StatsSummary, now: &StatsSummary) -> Vec<Delta> {
    let rows: [(&str, &str, f64, f64); 14] = [
        (
            "requests",
            "count",
            base.requests as f64,
            now.requests as f64,
        ),
        (
            "error rate",
            "%",
            base.error_rate * 100.0,
            now.error_rate * 100.0,
        ),
        (
            "fallbacks",
            "count",
            base.fallbacks as f64,
            now.fallbacks as f64,
        ),
        (
            "first event p50",
            "ms",
            base.first_event_ms.p50,
            now.first_event_ms.p50,
        ),
        ("ttft p50", "ms", base.ttft_ms.p50, now.ttft_ms.p50),
        ("ttft p95", "ms", base.ttft_ms.p95, now.ttft_ms.p95),
        ("e2e mean", "ms", base.e2e_ms.mean, now.e2e_ms.mean),
        ("e2e p95", "ms", base.e2e_ms.p95, now.e2e_ms.p95),
        (
            "pipeline e2e p95",
            "ms",
            base.pipeline_e2e_ms.p95,
            now.pipeline_e2e_ms.p95,
        ),
        (
            "time per output token mean",
            "ms",
            base.tpot_ms.mean,
            now.tpot_ms.mean,
        ),
        ("stall p99", "ms", base.stall_ms.p99, now.stall_ms.p99),
        (
            "cost per request mean",
            "$",
            base.cost_per_request_usd.mean,
            now.cost_per_request_usd.mean,
        ),
        (
            "cost per request max",
            "$",
            base.cost_per_request_usd.max,
            now.cost_per_request_usd.max,
        ),
        (
            "cost per pipeline mean",
            "$",
            base.cost_per_pipeline_usd.mean,
            now.cost_per_pipeline_usd.mean,
        ),
    ];
    rows.into_iter()
        .map(|(metric, unit, b, c)| Delta {
            metric: metric.to_owned(),
            unit: unit.to_owned(),
            baseline: b,
            current: c,
            delta: c - b,
            delta_pct: (b != 0.0).then(|| (c - b) / b * 100.0),
        })
        .collect()
}

/// The comparison as a table.
pub fn baseline_table(deltas: &[Delta], markdown: bool) -> String {
    let mut t = table(markdown);
    t.set_header(["metric", "baseline", "now", "delta", "delta %"]);
    let show = |unit: &str, v: f64| match unit {
        "ms" => fmt_ms(v),
        "$" => fmt_usd(v),
        "%" => format!("{v:.2}%"),
        _ => format!("{v:.0}"),
    };
    for d in deltas {
        t.add_row([
            d.metric.clone(),
            show(&d.unit, d.baseline),
            show(&d.unit, d.current),
            format!(
                "{}{}",
                if d.delta >= 0.0 { "+" } else { "-" },
                show(&d.unit, d.delta.abs())
            ),
            d.delta_pct
                .map_or("n/a".to_owned(), |p| format!("{p:+.1}%")),
        ]);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_deltas_are_signed_and_relative() {
        let mut base = StatsSummary::default();
        base.ttft_ms.p95 = 400.0;
        let mut now = StatsSummary::default();
        now.ttft_ms.p95 = 500.0;
        let d = compare(&base, &now);
        let ttft = d.iter().find(|d| d.metric == "ttft p95").unwrap();
        assert_eq!(ttft.delta, 100.0);
        assert_eq!(ttft.delta_pct, Some(25.0));
        assert!(baseline_table(&d, false).contains("+25.0%"));
    }
}
