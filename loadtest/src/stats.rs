//! The aggregator of everything goose's rows cannot hold: token counts, cost per request and per
//! pipeline run, fallbacks, mid-stream errors, and latency distributions in HDR histograms.
//!
//! One [`Stats`] is shared by every user (goose users and open-loop tasks) behind an
//! `Arc`; each record takes the lock once, briefly, and never across an await.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::sse::StreamOutcome;

/// Whether a stream was one model call's worth of work or a whole pipeline run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An agent route or a chat completion: one request, one (routed) model call.
    Request,
    /// `/v1/pipelines/tool`: four stages.
    Pipeline,
}

/// Shared, cheap-to-clone aggregator.
#[derive(Clone, Default)]
pub struct Stats {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    /// Times in microseconds.
    first_event: Histogram<u64>,
    ttft: Histogram<u64>,
    e2e: Histogram<u64>,
    pipeline_e2e: Histogram<u64>,
    tpot: Histogram<u64>,
    stall: Histogram<u64>,
    /// Money in micro-dollars.
    cost_request: Histogram<u64>,
    cost_pipeline: Histogram<u64>,
    requests: u64,
    failed: u64,
    http_errors: u64,
    transport_errors: u64,
    stream_errors: u64,
    fallbacks: u64,
    rescued: u64,
    estimated_costs: u64,
    dropped: u64,
    late: u64,
    scenarios: BTreeMap<String, ScenarioRow>,
    failures: BTreeMap<String, u64>,
    /// Open loop: per second of scheduled send time, the count and sum of latencies (µs).
    timeline: BTreeMap<u64, (u64, u64)>,
}

fn histogram() -> Histogram<u64> {
    // Three significant digits; auto-resizing, so nothing is clamped (`saturating_record`
    // never grows a histogram, `record` on an auto-resizing one does).
    let mut h = Histogram::new(3)
        .unwrap_or_else(|_| unreachable!("3 significant figures is within hdrhistogram's 0..=5"));
    h.auto(true);
    h
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            first_event: histogram(),
            ttft: histogram(),
            e2e: histogram(),
            pipeline_e2e: histogram(),
            tpot: histogram(),
            stall: histogram(),
            cost_request: histogram(),
            cost_pipeline: histogram(),
            requests: 0,
            failed: 0,
            http_errors: 0,
            transport_errors: 0,
            stream_errors: 0,
            fallbacks: 0,
            rescued: 0,
            estimated_costs: 0,
            dropped: 0,
            late: 0,
            scenarios: BTreeMap::new(),
            failures: BTreeMap::new(),
            timeline: BTreeMap::new(),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn put(h: &mut Histogram<u64>, value: u64) {
    // Auto-resize makes `record` fail only on a value beyond u64's range of the histogram,
    // which no duration or cost here reaches; a failure would only lose one sample.
    if let Err(error) = h.record(value) {
        tracing::debug!(%error, value, "histogram refused a value");
    }
}

/// Why a request produced no stream to observe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestFailure {
    /// A non-2xx answer.
    Status(u16),
    /// The connection failed or timed out before the headers.
    Transport(String),
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counters inconsistent in a way that
        // matters more than losing the whole report, so a poisoned lock is used as is.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a stream that was answered with 2xx and read to its end (or its cut).
    pub fn record_stream(&self, scenario: &str, kind: Kind, out: &StreamOutcome) {
        let mut s = self.lock();
        s.requests += 1;
        if !out.succeeded {
            s.failed += 1;
            let reason = out.failure.clone().unwrap_or_else(|| "failed".to_owned());
            *s.failures.entry(reason).or_default() += 1;
        }
        s.stream_errors += out.stream_errors;
        s.fallbacks += out.fallbacks;
        s.rescued += u64::from(out.rescues > 0);
        s.estimated_costs += u64::from(out.estimated);
        if let Some(d) = out.first_event {
            put(&mut s.first_event, micros(d));
        }
        if let Some(d) = out.ttft {
            put(&mut s.ttft, micros(d));
        }
        if let Some(d) = out.stall {
            put(&mut s.stall, micros(d));
        }
        match kind {
            Kind::Request => {
                put(&mut s.e2e, micros(out.end_to_end));
                put(&mut s.cost_request, out.cost_micro_usd);
                if let Some(d) = out.time_per_output_token() {
                    put(&mut s.tpot, micros(d));
                }
            }
            Kind::Pipeline => {
                put(&mut s.pipeline_e2e, micros(out.end_to_end));
                put(&mut s.cost_pipeline, out.cost_micro_usd);
            }
        }
        let row = s.scenarios.entry(scenario.to_owned()).or_default();
        row.requests += 1;
        row.failed += u64::from(!out.succeeded);
        row.fallbacks += out.fallbacks;
        row.cost_micro_usd += out.cost_micro_usd;
        row.input_tokens += out.tokens.input;
        row.output_tokens += out.tokens.output;
    }

    /// Records a request that got no stream: an HTTP error or a transport failure.
    pub fn record_failure(&self, scenario: &str, failure: &RequestFailure) {
        let mut s = self.lock();
        s.requests += 1;
        s.failed += 1;
        let reason = match failure {
            RequestFailure::Status(code) => {
                s.http_errors += 1;
                format!("HTTP {code}")
            }
            RequestFailure::Transport(why) => {
                s.transport_errors += 1;
                format!("transport: {why}")
            }
        };
        *s.failures.entry(reason).or_default() += 1;
        let row = s.scenarios.entry(scenario.to_owned()).or_default();
        row.requests += 1;
        row.failed += 1;
    }

    /// Open loop: an arrival found the in-flight bound full and was not sent. It counts as a
    /// failed request: dropping load must not make the error rate look better.
    pub fn record_dropped(&self, scenario: &str) {
        let mut s = self.lock();
        s.dropped += 1;
        s.requests += 1;
        s.failed += 1;
        *s.failures
            .entry("dropped: in-flight bound full".to_owned())
            .or_default() += 1;
        let row = s.scenarios.entry(scenario.to_owned()).or_default();
        row.requests += 1;
        row.failed += 1;
    }

    /// Open loop: an arrival was sent later than scheduled (the scheduler fell behind).
    pub fn record_late(&self) {
        self.lock().late += 1;
    }

    /// Open loop: latency from the scheduled send time of an arrival scheduled `at` into the run.
    pub fn record_timeline(&self, at: Duration, latency: Duration) {
        let mut s = self.lock();
        let slot = s.timeline.entry(at.as_secs()).or_default();
        slot.0 += 1;
        slot.1 += micros(latency);
    }

    /// Everything recorded so far.
    pub fn summary(&self) -> StatsSummary {
        let s = self.lock();
        StatsSummary {
            requests: s.requests,
            failed: s.failed,
            error_rate: if s.requests == 0 {
                0.0
            } else {
                s.failed as f64 / s.requests as f64
            },
            http_errors: s.http_errors,
            transport_errors: s.transport_errors,
            stream_errors: s.stream_errors,
            fallbacks: s.fallbacks,
            rescued: s.rescued,
            estimated_costs: s.estimated_costs,
            dropped: s.dropped,
            late: s.late,
            first_event_ms: Dist::of_micros(&s.first_event),
            ttft_ms: Dist::of_micros(&s.ttft),
            e2e_ms: Dist::of_micros(&s.e2e),
            pipeline_e2e_ms: Dist::of_micros(&s.pipeline_e2e),
            tpot_ms: Dist::of_micros(&s.tpot),
            stall_ms: Dist::of_micros(&s.stall),
            cost_per_request_usd: Dist::of_micro_usd(&s.cost_request),
            cost_per_pipeline_usd: Dist::of_micro_usd(&s.cost_pipeline),
            total_cost_usd: s
                .scenarios
                .values()
                .map(|r| r.cost_micro_usd as f64 / 1e6)
                .sum(),
            scenarios: s.scenarios.clone(),
            failures: s.failures.clone(),
            timeline: s
                .timeline
                .iter()
                .map(|(&second, &(n, sum))| TimelinePoint {
                    second,
                    arrivals: n,
                    mean_latency_ms: sum as f64 / n.max(1) as f64 / 1e3,
                })
                .collect(),
        }
    }
}

/// Per-scenario counts and money: the cost table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScenarioRow {
    pub requests: u64,
    pub failed: u64,
    pub fallbacks: u64,
    pub cost_micro_usd: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// A distribution's headline numbers (milliseconds or dollars, as the field name says).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dist {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    fn scaled(h: &Histogram<u64>, divisor: f64) -> Dist {
        if h.is_empty() {
            return Dist::default();
        }
        let q = |q: f64| h.value_at_quantile(q) as f64 / divisor;
        Dist {
            count: h.len(),
            mean: h.mean() / divisor,
            p50: q(0.50),
            p90: q(0.90),
            p95: q(0.95),
            p99: q(0.99),
            max: h.max() as f64 / divisor,
        }
    }

    fn of_micros(h: &Histogram<u64>) -> Dist {
        Self::scaled(h, 1e3)
    }

    fn of_micro_usd(h: &Histogram<u64>) -> Dist {
        Self::scaled(h, 1e6)
    }

    /// One statistic by name (`mean`, `p50`, `p90`, `p95`, `p99`, `max`).
    pub fn get(&self, stat: &str) -> Option<f64> {
        Some(match stat {
            "mean" | "avg" => self.mean,
            "p50" => self.p50,
            "p90" => self.p90,
            "p95" => self.p95,
            "p99" => self.p99,
            "max" => self.max,
            _ => return None,
        })
    }
}

/// Open loop: mean latency from scheduled send time, per second of the schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    pub second: u64,
    pub arrivals: u64,
    pub mean_latency_ms: f64,
}

/// What [`Stats::summary`] returns; part of `summary.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsSummary {
    pub requests: u64,
    pub failed: u64,
    /// `failed / requests`, 0..=1.
    pub error_rate: f64,
    pub http_errors: u64,
    pub transport_errors: u64,
    pub stream_errors: u64,
    pub fallbacks: u64,
    /// Requests whose stream broke after content and was finished by another call (restarted
    /// or continued): without the rescue each would have been a mid-stream error.
    #[serde(default)]
    pub rescued: u64,
    pub estimated_costs: u64,
    pub dropped: u64,
    pub late: u64,
    pub first_event_ms: Dist,
    pub ttft_ms: Dist,
    pub e2e_ms: Dist,
    pub pipeline_e2e_ms: Dist,
    pub tpot_ms: Dist,
    pub stall_ms: Dist,
    pub cost_per_request_usd: Dist,
    pub cost_per_pipeline_usd: Dist,
    pub total_cost_usd: f64,
    pub scenarios: BTreeMap<String, ScenarioRow>,
    pub failures: BTreeMap<String, u64>,
    pub timeline: Vec<TimelinePoint>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyvex_engine::stream::Usage;

    #[test]
    fn failures_and_streams_add_up() {
        let stats = Stats::new();
        let ok = StreamOutcome {
            ttft: Some(Duration::from_millis(100)),
            end_to_end: Duration::from_millis(900),
            tokens: Usage {
                input: 10,
                output: 9,
                ..Usage::default()
            },
            cost_micro_usd: 1500,
            succeeded: true,
            ..StreamOutcome::default()
        };
        stats.record_stream("chat", Kind::Request, &ok);
        stats.record_failure("chat", &RequestFailure::Status(502));
        let s = stats.summary();
        assert_eq!((s.requests, s.failed, s.http_errors), (2, 1, 1));
        assert!((s.error_rate - 0.5).abs() < 1e-9);
        assert!((s.tpot_ms.mean - 100.0).abs() < 1.0, "{:?}", s.tpot_ms);
        assert!((s.cost_per_request_usd.max - 0.0015).abs() < 1e-5);
        assert_eq!(s.scenarios["chat"].requests, 2);
    }
}
