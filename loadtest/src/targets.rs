//! Targets: the platform's limits (from `targets.toml` and `--target NAME=VALUE`), turned into
//! goose threshold rules where goose can judge them, and judged against our histograms otherwise.
//!
//! Every target is an upper bound. Names are `<metric>_<stat>` for times (`ttft_p95`,
//! `e2e_avg`, `stall_p99`; metrics `first_event`, `ttft`, `e2e`, `pipeline_e2e`, `tpot`, `stall`;
//! stats `avg`, `p50`, `p90`, `p95`, `p99`, `max`), `error_rate`, and `cost_per_request` /
//! `cost_per_pipeline` (the most expensive one; `_avg`, `_p95`, … judge another statistic).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::stats::{Dist, StatsSummary};

/// The goose row method of our stream timings; rows are `STREAM <metric>`.
pub const STREAM_METHOD: &str = "STREAM";

/// What was wrong with a target or the targets file.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "unknown target {0:?}; use error_rate, cost_per_request[_STAT], cost_per_pipeline[_STAT] or METRIC_STAT with METRIC one of first_event, ttft, e2e, pipeline_e2e, tpot, stall and STAT one of avg, p50, p90, p95, p99, max"
    )]
    UnknownName(String),
    #[error("target {name}: {value:?} is not a {kind}; write it like {example}")]
    BadValue {
        name: String,
        value: String,
        kind: &'static str,
        example: &'static str,
    },
    #[error("--target expects NAME=VALUE (e.g. ttft_p95=800ms), got {0:?}")]
    BadOverride(String),
    #[error("could not read the targets file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the targets file {path} is not valid: {source}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
}

/// The limit of one target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    Time(Duration),
    /// A fraction, 0..=1.
    Rate(f64),
    Usd(f64),
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Limit::Time(d) => f.write_str(&fmt_ms(d.as_secs_f64() * 1e3)),
            Limit::Rate(r) => write!(f, "{:.2}%", r * 100.0),
            Limit::Usd(u) => f.write_str(&fmt_usd(u)),
        }
    }
}

/// Milliseconds as a person reads them: `850 ms`, `4.20 s`, `0.120 ms`.
pub fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1e3)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.3} ms")
    }
}

pub fn fmt_usd(usd: f64) -> String {
    if usd >= 0.01 {
        format!("${usd:.4}")
    } else {
        format!("${usd:.6}")
    }
}

const TIME_METRICS: [&str; 6] = [
    "first_event",
    "ttft",
    "e2e",
    "pipeline_e2e",
    "tpot",
    "stall",
];
const STATS: [&str; 6] = ["avg", "p50", "p90", "p95", "p99", "max"];

/// What a target name measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    Time {
        metric: &'static str,
        stat: &'static str,
    },
    ErrorRate,
    Cost {
        pipeline: bool,
        stat: &'static str,
    },
}

fn measure(name: &str) -> Option<Measure> {
    if name == "error_rate" {
        return Some(Measure::ErrorRate);
    }
    for (prefix, pipeline) in [("cost_per_request", false), ("cost_per_pipeline", true)] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let stat = match rest.strip_prefix('_') {
                None if rest.is_empty() => "max",
                Some(stat) => STATS.into_iter().find(|s| *s == stat)?,
                None => return None,
            };
            return Some(Measure::Cost { pipeline, stat });
        }
    }
    let (metric, stat) = name.rsplit_once('_')?;
    Some(Measure::Time {
        metric: TIME_METRICS.into_iter().find(|m| *m == metric)?,
        stat: STATS.into_iter().find(|s| *s == stat)?,
    })
}

/// Parses a value for target `name`: `800ms`, `5s`, `250us` for times; `5%` or `0.05` for the
/// error rate; `$1.00` or `1.0` for money.
pub fn parse_limit(name: &str, value: &str) -> Result<Limit, TargetError> {
    let m = measure(name).ok_or_else(|| TargetError::UnknownName(name.to_owned()))?;
    let v = value.trim();
    let bad = |kind, example| TargetError::BadValue {
        name: name.to_owned(),
        value: value.to_owned(),
        kind,
        example,
    };
    match m {
        Measure::Time { .. } => {
            let (number, scale) = if let Some(n) = v.strip_suffix("ms") {
                (n, 1e-3)
            } else if let Some(n) = v.strip_suffix("us") {
                (n, 1e-6)
            } else if let Some(n) = v.strip_suffix('s') {
                (n, 1.0)
            } else {
                return Err(bad("time with a unit", "800ms, 5s or 250us"));
            };
            let n: f64 = number
                .trim()
                .parse()
                .map_err(|_| bad("time with a unit", "800ms, 5s or 250us"))?;
            if !n.is_finite() || n <= 0.0 {
                return Err(bad("positive time", "800ms"));
            }
            Ok(Limit::Time(Duration::from_secs_f64(n * scale)))
        }
        Measure::ErrorRate => {
            let (number, scale) = match v.strip_suffix('%') {
                Some(n) => (n, 0.01),
                None => (v, 1.0),
            };
            let n: f64 = number
                .trim()
                .parse()
                .map_err(|_| bad("rate", "5% or 0.05"))?;
            let rate = n * scale;
            if !(0.0..=1.0).contains(&rate) || (scale == 1.0 && n > 1.0) {
                return Err(bad("rate between 0 and 100%", "5% or 0.05"));
            }
            Ok(Limit::Rate(rate))
        }
        Measure::Cost { .. } => {
            let number = v.strip_prefix('$').unwrap_or(v);
            let n: f64 = number
                .trim()
                .parse()
                .map_err(|_| bad("dollar amount", "$1.00"))?;
            if !n.is_finite() || n < 0.0 {
                return Err(bad("non-negative dollar amount", "$1.00"));
            }
            Ok(Limit::Usd(n))
        }
    }
}

/// The targets of one run, by name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Targets {
    pub limits: BTreeMap<String, Limit>,
}

/// `targets.toml`: the `[targets]` table; `[load]` and `[weights]` are read by the CLI.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsFile {
    #[serde(default)]
    pub targets: BTreeMap<String, String>,
    #[serde(default)]
    pub load: LoadSection,
    #[serde(default)]
    pub weights: BTreeMap<String, usize>,
}

/// Defaults of the run shape, overridden by flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSection {
    pub users: Option<usize>,
    pub run_time_secs: Option<u64>,
}

/// The targets file shipped with the crate (the platform's alarm numbers, and ours).
pub const DEFAULT_TARGETS_TOML: &str = include_str!("../targets.toml");

impl TargetsFile {
    pub fn parse(text: &str, path: &str) -> Result<TargetsFile, TargetError> {
        toml::from_str(text).map_err(|source| TargetError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn load(path: Option<&Path>) -> Result<TargetsFile, TargetError> {
        match path {
            None => Self::parse(DEFAULT_TARGETS_TOML, "loadtest/targets.toml (embedded)"),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| TargetError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Self::parse(&text, &p.display().to_string())
            }
        }
    }

    /// The file's targets, then each `NAME=VALUE` override in order.
    pub fn targets(&self, overrides: &[String]) -> Result<Targets, TargetError> {
        let mut limits = BTreeMap::new();
        for (name, value) in &self.targets {
            limits.insert(name.clone(), parse_limit(name, value)?);
        }
        for o in overrides {
            let (name, value) = o
                .split_once('=')
                .ok_or_else(|| TargetError::BadOverride(o.clone()))?;
            let name = name.trim();
            limits.insert(name.to_owned(), parse_limit(name, value)?);
        }
        Ok(Targets { limits })
    }
}

/// One target's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetResult {
    pub name: String,
    /// The limit, as a person reads it.
    pub limit: String,
    /// What the run achieved, as a person reads it; `no samples` when nothing was measured.
    pub achieved: String,
    /// The achieved number: milliseconds, a 0..=1 rate, or dollars.
    pub value: Option<f64>,
    pub passed: bool,
    /// How far over the limit a miss was, e.g. `+812 ms (+16%)`.
    pub miss: Option<String>,
    /// Who judged it: `goose threshold "<rule>"` or `histogram`.
    pub judged_by: String,
}

impl Targets {
    /// The goose threshold rule of each time target, scoped to its `STREAM <metric>` row.
    pub fn goose_rules(&self) -> Vec<(String, String)> {
        self.limits
            .iter()
            .filter_map(|(name, limit)| {
                let Some(Measure::Time { metric, stat }) = measure(name) else {
                    return None;
                };
                let Limit::Time(d) = limit else { return None };
                // Microseconds keep sub-millisecond limits (tpot) exact.
                Some((
                    name.clone(),
                    format!(
                        "{stat}<{}us for {STREAM_METHOD} {metric}",
                        d.as_micros().max(1)
                    ),
                ))
            })
            .collect()
    }

    /// The longest time target that bounds a whole stream, for the client timeout.
    pub fn longest_e2e(&self) -> Option<Duration> {
        self.limits
            .iter()
            .filter_map(|(name, limit)| match (measure(name), limit) {
                (Some(Measure::Time { metric, .. }), Limit::Time(d))
                    if metric == "e2e" || metric == "pipeline_e2e" =>
                {
                    Some(*d)
                }
                _ => None,
            })
            .max()
    }

    /// Judges every target against `summary`. A target whose metric has no samples is reported
    /// as such and passes (a run without pipeline traffic has no pipeline cost); a run with no
    /// request at all fails `error_rate`.
    pub fn evaluate(&self, summary: &StatsSummary) -> Vec<TargetResult> {
        self.limits
            .iter()
            .filter_map(|(name, limit)| {
                let m = measure(name)?;
                Some(judge(name, *limit, m, summary))
            })
            .collect()
    }

    /// Replaces the histogram verdict of time targets with goose's threshold results, so the
    /// table and goose's reports agree. `results` are goose's, rule by rule.
    pub fn apply_goose(
        &self,
        verdicts: &mut [TargetResult],
        results: &[goose::threshold::ThresholdResult],
    ) {
        let rules: BTreeMap<String, String> = self.goose_rules().into_iter().collect();
        for v in verdicts.iter_mut() {
            let Some(rule) = rules.get(&v.name) else {
                continue;
            };
            let Some(r) = results.iter().find(|r| &r.rule == rule) else {
                continue;
            };
            let Some(Limit::Time(limit)) = self.limits.get(&v.name).copied() else {
                continue;
            };
            v.judged_by = format!("goose threshold \"{rule}\"");
            v.passed = r.passed;
            match r.value {
                Some(ms) => {
                    v.value = Some(ms);
                    v.achieved = fmt_ms(ms);
                    v.miss = (!r.passed).then(|| miss_time(ms, limit));
                }
                None => {
                    v.value = None;
                    v.achieved = "no samples".to_owned();
                    v.miss = (!r.passed).then(|| "no samples".to_owned());
                }
            }
        }
    }
}

fn miss_time(ms: f64, limit: Duration) -> String {
    let limit_ms = limit.as_secs_f64() * 1e3;
    let over = ms - limit_ms;
    format!("+{} ({})", fmt_ms(over.max(0.0)), pct(over, limit_ms))
}

fn pct(over: f64, limit: f64) -> String {
    if limit > 0.0 {
        format!("+{:.0}%", over / limit * 100.0)
    } else {
        "limit is 0".to_owned()
    }
}

fn judge(name: &str, limit: Limit, m: Measure, s: &StatsSummary) -> TargetResult {
    let mut r = TargetResult {
        name: name.to_owned(),
        limit: limit.to_string(),
        achieved: "no samples".to_owned(),
        value: None,
        passed: true,
        miss: None,
        judged_by: "histogram".to_owned(),
    };
    match (m, limit) {
        (Measure::ErrorRate, Limit::Rate(max)) => {
            if s.requests == 0 {
                r.passed = false;
                r.miss = Some("no request completed".to_owned());
                return r;
            }
            r.value = Some(s.error_rate);
            r.achieved = format!(
                "{:.2}% ({} of {})",
                s.error_rate * 100.0,
                s.failed,
                s.requests
            );
            r.passed = s.error_rate < max;
            if !r.passed {
                r.miss = Some(format!(
                    "+{:.2} points ({})",
                    (s.error_rate - max) * 100.0,
                    pct(s.error_rate - max, max)
                ));
            }
        }
        (Measure::Time { metric, stat }, Limit::Time(d)) => {
            let dist = time_dist(s, metric);
            if dist.count == 0 {
                return r;
            }
            let Some(ms) = dist.get(stat) else { return r };
            r.value = Some(ms);
            r.achieved = fmt_ms(ms);
            r.passed = ms < d.as_secs_f64() * 1e3;
            if !r.passed {
                r.miss = Some(miss_time(ms, d));
            }
        }
        (Measure::Cost { pipeline, stat }, Limit::Usd(max)) => {
            let dist = if pipeline {
                &s.cost_per_pipeline_usd
            } else {
                &s.cost_per_request_usd
            };
            if dist.count == 0 {
                return r;
            }
            let Some(usd) = dist.get(stat) else { return r };
            r.value = Some(usd);
            r.achieved = format!("{} ({stat})", fmt_usd(usd));
            r.passed = usd <= max;
            if !r.passed {
                r.miss = Some(format!("+{} ({})", fmt_usd(usd - max), pct(usd - max, max)));
            }
        }
        // `parse_limit` pairs each measure with its limit kind.
        _ => {
            r.passed = false;
            r.miss = Some("limit of the wrong kind".to_owned());
        }
    }
    r
}

fn time_dist<'a>(s: &'a StatsSummary, metric: &str) -> &'a Dist {
    match metric {
        "first_event" => &s.first_event_ms,
        "ttft" => &s.ttft_ms,
        "e2e" => &s.e2e_ms,
        "pipeline_e2e" => &s.pipeline_e2e_ms,
        "tpot" => &s.tpot_ms,
        _ => &s.stall_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_parses_with_the_product_plan_numbers() {
        let file = TargetsFile::load(None).unwrap();
        let t = file.targets(&[]).unwrap();
        assert_eq!(t.limits["e2e_avg"], Limit::Time(Duration::from_secs(5)));
        assert_eq!(t.limits["error_rate"], Limit::Rate(0.05));
        assert_eq!(t.limits["cost_per_request"], Limit::Usd(1.0));
        assert!(t.limits.contains_key("ttft_p95"));
        assert!(t.limits.contains_key("stall_p99"));
        assert!(t.limits.contains_key("cost_per_pipeline"));
    }

    #[test]
    fn time_targets_become_scoped_goose_rules() {
        let t = TargetsFile::default()
            .targets(&["ttft_p95=1ms".to_owned()])
            .unwrap();
        assert_eq!(
            t.goose_rules(),
            vec![(
                "ttft_p95".to_owned(),
                "p95<1000us for STREAM ttft".to_owned()
            )]
        );
        // goose accepts what we generate.
        let rule: goose::threshold::Threshold = t.goose_rules()[0].1.parse().unwrap();
        assert_eq!(rule.to_string(), "p95<1000us for STREAM ttft");
    }
}
