//! Results of an overhead run: per concurrency level and target, the latency quantiles, the
//! figures added against direct and against the floor, the verdicts against the targets, as a
//! readable table and as JSON.

use std::time::Duration;

use comfy_table::Table;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::load::Sample;
use super::{ENGINE_BASE, ENGINE_REDIS};

/// One target at one concurrency level, over all its rounds.
#[derive(Debug, Clone)]
pub struct TargetRun {
    pub name: &'static str,
    pub sample: Sample,
    /// Sum of the wall time of its rounds.
    pub wall: Duration,
    /// The TTFT median of each round, in ms, to pair rounds against each other.
    pub round_ttft_p50_ms: Vec<f64>,
    /// CPU time of the target's own server process during its rounds (the floor, the engine;
    /// for `direct` the simulator's).
    pub server_cpu: Option<Duration>,
    /// CPU time of the simulator during this target's rounds.
    pub sim_cpu: Option<Duration>,
}

impl TargetRun {
    pub fn new(name: &'static str) -> Self {
        TargetRun {
            name,
            sample: Sample::default(),
            wall: Duration::ZERO,
            round_ttft_p50_ms: Vec::new(),
            server_cpu: None,
            sim_cpu: None,
        }
    }

    pub fn streams_per_sec(&self) -> f64 {
        let secs = self.wall.as_secs_f64();
        if secs > 0.0 {
            self.sample.streams as f64 / secs
        } else {
            0.0
        }
    }

    /// Server CPU per `data:` event relayed, in µs.
    pub fn cpu_per_event_us(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        (self.sample.events > 0).then(|| cpu.as_secs_f64() * 1e6 / self.sample.events as f64)
    }
}

/// All targets at one concurrency.
#[derive(Debug, Clone)]
pub struct Level {
    pub concurrency: usize,
    pub rounds: usize,
    pub per_worker: usize,
    pub targets: Vec<TargetRun>,
}

impl Level {
    pub fn get(&self, name: &str) -> Option<&TargetRun> {
        self.targets.iter().find(|t| t.name == name)
    }
}

/// Quantile in ms.
pub fn q(h: &Histogram<u64>, quantile: f64) -> f64 {
    if h.is_empty() {
        return f64::NAN;
    }
    h.value_at_quantile(quantile) as f64 / 1e6
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        f64::midpoint(v[mid - 1], v[mid])
    } else {
        v[mid]
    }
}

/// Median over rounds of (this target's round TTFT p50 − `base`'s of the same round), in ms:
/// robust to drift between rounds.
pub fn paired_ttft_p50(level: &Level, target: &str, base: &str) -> f64 {
    let (Some(t), Some(b)) = (level.get(target), level.get(base)) else {
        return f64::NAN;
    };
    let diffs: Vec<f64> = t
        .round_ttft_p50_ms
        .iter()
        .zip(&b.round_ttft_p50_ms)
        .map(|(t, b)| t - b)
        .collect();
    median(&diffs)
}

fn stats_json(h: &Histogram<u64>) -> Value {
    json!({ "p50_ms": q(h, 0.5), "p99_ms": q(h, 0.99), "max_ms": q(h, 1.0), "count": h.len() })
}

fn target_json(t: &TargetRun) -> Value {
    let s = &t.sample;
    json!({
        "streams": s.streams,
        "failed": s.failed,
        "first_error": s.first_error,
        "events": s.events,
        "stalls": s.stalls,
        "max_gap_ms": s.max_gap.as_secs_f64() * 1e3,
        "streams_per_sec": t.streams_per_sec(),
        "headers": stats_json(&s.headers),
        "ttft": stats_json(&s.ttft),
        "chunk_gap": stats_json(&s.gap),
        "e2e": stats_json(&s.e2e),
        "round_ttft_p50_ms": t.round_ttft_p50_ms,
        "server_cpu_ms": t.server_cpu.map(|c| c.as_secs_f64() * 1e3),
        "sim_cpu_ms": t.sim_cpu.map(|c| c.as_secs_f64() * 1e3),
        "server_cpu_per_event_us": t.cpu_per_event_us(),
    })
}

/// The added figures of `target` against `base` (quantile differences of the merged
/// histograms, plus the paired per-round TTFT median).
fn added(level: &Level, target: &str, base: &str) -> Value {
    let (Some(t), Some(b)) = (level.get(target), level.get(base)) else {
        return Value::Null;
    };
    let d = |f: fn(&Sample) -> &Histogram<u64>, quantile: f64| {
        q(f(&t.sample), quantile) - q(f(&b.sample), quantile)
    };
    json!({
        "headers_p50_ms": d(|s| &s.headers, 0.5),
        "headers_p99_ms": d(|s| &s.headers, 0.99),
        "ttft_p50_ms": d(|s| &s.ttft, 0.5),
        "ttft_p99_ms": d(|s| &s.ttft, 0.99),
        "ttft_p50_paired_ms": paired_ttft_p50(level, target, base),
        "chunk_gap_p50_ms": d(|s| &s.gap, 0.5),
        "chunk_gap_p99_ms": d(|s| &s.gap, 0.99),
        "e2e_p50_ms": d(|s| &s.e2e, 0.5),
        "e2e_p99_ms": d(|s| &s.e2e, 0.99),
    })
}

pub fn level_json(level: &Level) -> Value {
    let targets: serde_json::Map<String, Value> = level
        .targets
        .iter()
        .map(|t| (t.name.to_owned(), target_json(t)))
        .collect();
    let mut added_map = serde_json::Map::new();
    for t in &level.targets {
        if t.name != "direct" {
            added_map.insert(
                format!("{}_vs_direct", t.name),
                added(level, t.name, "direct"),
            );
        }
    }
    for (t, b) in comparisons(level) {
        added_map.insert(
            format!("{}_vs_{b}", t.replace('-', "_")),
            added(level, t, b),
        );
    }
    json!({
        "concurrency": level.concurrency,
        "rounds": level.rounds,
        "streams_per_worker_per_round": level.per_worker,
        "targets": targets,
        "added": added_map,
    })
}

/// The pairs compared beside each target's "vs direct": the engine against the floor, the
/// engine with its limits in Redis against the same engine with them in process, and the
/// engine against the build it is compared with (`--baseline-exe`).
fn comparisons(level: &Level) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
    [
        ("engine", "floor"),
        (ENGINE_REDIS, "engine"),
        (ENGINE_BASE, "floor"),
        ("engine", ENGINE_BASE),
    ]
    .into_iter()
    .filter(|(t, b)| level.get(t).is_some() && level.get(b).is_some())
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".to_owned()
    } else if v.abs() < 10.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.1}")
    }
}

/// A readable table of one level.
pub fn level_table(level: &Level) -> String {
    let mut table = Table::new();
    table.set_header([
        "target",
        "streams",
        "fail",
        "hdr p50",
        "hdr p99",
        "TTFT p50",
        "TTFT p99",
        "gap p50",
        "gap p99",
        "e2e p50",
        "e2e p99",
        "streams/s",
        "CPU µs/event",
    ]);
    for t in &level.targets {
        let s = &t.sample;
        table.add_row([
            t.name.to_owned(),
            s.streams.to_string(),
            s.failed.to_string(),
            ms(q(&s.headers, 0.5)),
            ms(q(&s.headers, 0.99)),
            ms(q(&s.ttft, 0.5)),
            ms(q(&s.ttft, 0.99)),
            ms(q(&s.gap, 0.5)),
            ms(q(&s.gap, 0.99)),
            ms(q(&s.e2e, 0.5)),
            ms(q(&s.e2e, 0.99)),
            format!("{:.1}", t.streams_per_sec()),
            t.cpu_per_event_us()
                .map_or("–".into(), |c| format!("{c:.2}")),
        ]);
    }
    let mut added_table = Table::new();
    added_table.set_header([
        "added (ms)",
        "hdr p50",
        "TTFT p50",
        "TTFT p50 paired",
        "TTFT p99",
        "gap p50",
        "gap p99",
        "e2e p50",
        "e2e p99",
    ]);
    let pairs: Vec<(&str, &str)> = level
        .targets
        .iter()
        .filter(|t| t.name != "direct")
        .map(|t| (t.name, "direct"))
        .chain(comparisons(level))
        .collect();
    for (t, b) in pairs {
        let a = added(level, t, b);
        let f = |k: &str| ms(a.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN));
        added_table.add_row([
            format!("{t} − {b}"),
            f("headers_p50_ms"),
            f("ttft_p50_ms"),
            f("ttft_p50_paired_ms"),
            f("ttft_p99_ms"),
            f("chunk_gap_p50_ms"),
            f("chunk_gap_p99_ms"),
            f("e2e_p50_ms"),
            f("e2e_p99_ms"),
        ]);
    }
    format!(
        "concurrency {} ({} rounds × {} streams per worker, times in ms)\n{table}\n{added_table}\n",
        level.concurrency, level.rounds, level.per_worker
    )
}

/// One target of the issue, measured.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub target: String,
    pub measured: String,
    pub pass: Option<bool>,
}

impl Verdict {
    pub fn json(&self) -> Value {
        json!({ "target": self.target, "measured": self.measured, "pass": self.pass })
    }
}

/// The end-to-end targets that a run of these levels can judge.
pub fn verdicts(levels: &[Level]) -> Vec<Verdict> {
    let mut out = Vec::new();
    let level = |c: usize| levels.iter().find(|l| l.concurrency == c);
    let added_q = |l: &Level, t: &str, quantile: f64| {
        let (Some(t), Some(d)) = (l.get(t), l.get("direct")) else {
            return f64::NAN;
        };
        q(&t.sample.ttft, quantile) - q(&d.sample.ttft, quantile)
    };
    if let Some(l) = level(1) {
        let (e50, f50) = (
            paired_ttft_p50(l, "engine", "direct"),
            paired_ttft_p50(l, "floor", "direct"),
        );
        out.push(Verdict {
            target: "c=1 added TTFT p50 ≤ floor's + 0.1 ms".into(),
            measured: format!("engine {e50:.3} ms, floor {f50:.3} ms (paired round medians)"),
            pass: finite(e50, f50).then_some(e50 <= f50 + 0.1),
        });
        if l.get(ENGINE_REDIS).is_some() {
            let r50 = paired_ttft_p50(l, ENGINE_REDIS, "engine");
            out.push(Verdict {
                target: "c=1 limits in Redis add ≤ 0.15 ms TTFT p50 over in-process".into(),
                measured: format!("{r50:.3} ms (paired round medians)"),
                pass: r50.is_finite().then_some(r50 <= 0.15),
            });
        }
        let (e99, f99) = (added_q(l, "engine", 0.99), added_q(l, "floor", 0.99));
        out.push(Verdict {
            target: "c=1 added TTFT p99 ≤ 2 × floor's".into(),
            measured: format!("engine {e99:.3} ms, floor {f99:.3} ms"),
            // When the floor adds nothing measurable at p99, allow the histogram's resolution.
            pass: finite(e99, f99).then(|| e99 <= (2.0 * f99).max(f99 + 0.05)),
        });
    }
    if let Some(l) = level(32) {
        let (e99, f99) = (added_q(l, "engine", 0.99), added_q(l, "floor", 0.99));
        out.push(Verdict {
            target: "c=32 added TTFT p99 ≤ floor's + 2 ms".into(),
            measured: format!("engine {e99:.3} ms, floor {f99:.3} ms"),
            pass: finite(e99, f99).then_some(e99 <= f99 + 2.0),
        });
        if let (Some(e), Some(f)) = (l.get("engine"), l.get("floor")) {
            let ratio = e.streams_per_sec() / f.streams_per_sec();
            out.push(Verdict {
                target: "c=32 streams/s ≥ 90 % of floor's".into(),
                measured: format!(
                    "engine {:.1}/s, floor {:.1}/s ({:.1} %)",
                    e.streams_per_sec(),
                    f.streams_per_sec(),
                    ratio * 100.0
                ),
                pass: ratio.is_finite().then_some(ratio >= 0.9),
            });
        }
    }
    // CPU per chunk over every level that has both.
    let (mut e_cpu, mut e_ev, mut f_cpu, mut f_ev) = (0.0, 0u64, 0.0, 0u64);
    for l in levels {
        if let (Some(e), Some(f)) = (l.get("engine"), l.get("floor"))
            && let (Some(ec), Some(fc)) = (e.server_cpu, f.server_cpu)
        {
            e_cpu += ec.as_secs_f64();
            e_ev += e.sample.events;
            f_cpu += fc.as_secs_f64();
            f_ev += f.sample.events;
        }
    }
    if e_ev > 0 && f_ev > 0 {
        let (e, f) = (e_cpu * 1e6 / e_ev as f64, f_cpu * 1e6 / f_ev as f64);
        out.push(Verdict {
            target: "CPU per chunk end to end ≤ 2 × floor's".into(),
            measured: format!("engine {e:.2} µs, floor {f:.2} µs ({:.2}×)", e / f),
            pass: Some(e <= 2.0 * f),
        });
    }
    out
}

fn finite(a: f64, b: f64) -> bool {
    a.is_finite() && b.is_finite()
}

pub fn verdict_table(verdicts: &[Verdict]) -> String {
    let mut table = Table::new();
    table.set_header(["target", "measured", "verdict"]);
    for v in verdicts {
        table.add_row([
            v.target.clone(),
            v.measured.clone(),
            match v.pass {
                Some(true) => "pass".into(),
                Some(false) => "FAIL".into(),
                None => "n/a".into(),
            },
        ]);
    }
    table.to_string()
}

/// The engine against the build it is compared with (`--baseline-exe`), level by level: the
/// paired TTFT difference and each build's CPU per event and streams/s as a share of the
/// floor's, all from the same rounds. `None` when no baseline ran.
pub fn baseline_table(levels: &[Level]) -> Option<String> {
    let mut table = Table::new();
    table.set_header([
        "c",
        "engine − base TTFT p50 paired (ms)",
        "CPU µs/event engine / base / floor",
        "CPU ×floor engine / base",
        "streams/s engine / base / floor",
    ]);
    let mut rows = 0;
    for level in levels {
        let (Some(e), Some(b), Some(f)) = (
            level.get("engine"),
            level.get(ENGINE_BASE),
            level.get("floor"),
        ) else {
            continue;
        };
        let cpu = |t: &TargetRun| t.cpu_per_event_us().unwrap_or(f64::NAN);
        // A run too short for the floor to use a clock tick has no ratio.
        let per_floor = |t: &TargetRun| match cpu(f) {
            floor if floor > 0.0 => format!("{:.2}", cpu(t) / floor),
            _ => "–".to_owned(),
        };
        table.add_row([
            level.concurrency.to_string(),
            ms(paired_ttft_p50(level, "engine", ENGINE_BASE)),
            format!("{:.1} / {:.1} / {:.1}", cpu(e), cpu(b), cpu(f)),
            format!("{} / {}", per_floor(e), per_floor(b)),
            format!(
                "{:.1} / {:.1} / {:.1}",
                e.streams_per_sec(),
                b.streams_per_sec(),
                f.streams_per_sec()
            ),
        ]);
        rows += 1;
    }
    (rows > 0).then(|| table.to_string())
}

/// One target of a soak.
#[derive(Debug, Clone)]
pub struct SoakRow {
    pub target: &'static str,
    pub transport: &'static str,
    pub streams: usize,
    /// Client connections the streams ran on (one per stream over HTTP/1.1).
    pub connections: usize,
    pub completed: u64,
    pub failed: u64,
    pub stalls: u64,
    pub stall_ms: u64,
    pub max_gap_ms: f64,
    pub rss_fresh_mib: f64,
    pub rss_idle_mib: f64,
    pub rss_all_open_mib: f64,
    pub rss_per_stream_kib: f64,
    pub rss_max_mib: f64,
    /// From the first request to every stream having content; `None` when some stream ended
    /// before the last one started (then memory is the maximum seen).
    pub all_flowing_after_s: Option<f64>,
    /// Most streams flowing at once (with content, not ended) at one reading.
    pub peak_open: u64,
    /// Streams × tokens per second ÷ tokens per chunk.
    pub chunks_per_sec_nominal: f64,
    /// Counted while every stream was flowing.
    pub chunks_per_sec_measured: Option<f64>,
    /// All content chunks over the soak's wall time (ramp-up and tail included).
    pub chunks_per_sec_average: f64,
}

/// A readable table of a soak, one row per target.
pub fn soak_table(rows: &[SoakRow]) -> String {
    let mut table = Table::new();
    table.set_header([
        "target",
        "transport",
        "streams",
        "conns",
        "done",
        "fail",
        "stalls (> ms)",
        "max gap ms",
        "RSS fresh MiB",
        "idle MiB",
        "all open MiB",
        "KiB/stream",
        "max MiB",
        "all flowing after s",
        "chunks/s nominal / flowing / avg",
    ]);
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("–".to_owned(), |v| format!("{v:.digits$}"));
    for r in rows {
        table.add_row([
            r.target.to_owned(),
            r.transport.to_owned(),
            r.streams.to_string(),
            r.connections.to_string(),
            r.completed.to_string(),
            r.failed.to_string(),
            format!("{} (> {})", r.stalls, r.stall_ms),
            format!("{:.0}", r.max_gap_ms),
            format!("{:.1}", r.rss_fresh_mib),
            format!("{:.1}", r.rss_idle_mib),
            format!("{:.1}", r.rss_all_open_mib),
            format!("{:.1}", r.rss_per_stream_kib),
            format!("{:.1}", r.rss_max_mib),
            r.all_flowing_after_s.map_or_else(
                || format!("never (peak {})", r.peak_open),
                |s| format!("{s:.1}"),
            ),
            format!(
                "{:.0} / {} / {:.0}",
                r.chunks_per_sec_nominal,
                opt(r.chunks_per_sec_measured, 0),
                r.chunks_per_sec_average
            ),
        ]);
    }
    table.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &'static str, rounds: &[f64], cpu_ms: u64, events: u64) -> TargetRun {
        let mut t = TargetRun::new(name);
        t.round_ttft_p50_ms = rounds.to_vec();
        t.server_cpu = Some(Duration::from_millis(cpu_ms));
        t.sample.events = events;
        t.sample.streams = 10;
        t.wall = Duration::from_secs(2);
        t
    }

    fn level(targets: Vec<TargetRun>) -> Level {
        Level {
            concurrency: 32,
            rounds: 3,
            per_worker: 5,
            targets,
        }
    }

    #[test]
    fn no_baseline_no_table() {
        let l = level(vec![
            run("floor", &[1.0, 1.0, 1.0], 10, 1000),
            run("engine", &[2.0, 2.0, 2.0], 20, 1000),
        ]);
        assert!(baseline_table(&[l]).is_none());
    }

    #[test]
    fn the_baseline_is_paired_round_by_round_and_set_against_the_same_floor() {
        let l = level(vec![
            run("floor", &[1.0, 1.0, 1.0], 10, 1000),
            run("engine", &[3.0, 2.0, 9.0], 20, 1000),
            run(ENGINE_BASE, &[2.5, 1.5, 2.0], 30, 1000),
        ]);
        // Round differences 0.5, 0.5 and 7.0: the median keeps the outlying round out.
        assert_eq!(paired_ttft_p50(&l, "engine", ENGINE_BASE), 0.5);
        let table = baseline_table(std::slice::from_ref(&l)).expect("a baseline ran");
        assert!(table.contains("0.500"), "{table}");
        // CPU per event 20, 30 and 10 µs: 2.00 and 3.00 times the floor's.
        assert!(table.contains("20.0 / 30.0 / 10.0"), "{table}");
        assert!(table.contains("2.00 / 3.00"), "{table}");
        let pairs: Vec<_> = comparisons(&l).collect();
        assert!(pairs.contains(&("engine", ENGINE_BASE)), "{pairs:?}");
        assert!(pairs.contains(&(ENGINE_BASE, "floor")), "{pairs:?}");
    }
}
