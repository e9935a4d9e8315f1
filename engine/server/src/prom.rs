//! The server's Prometheus metrics, in a registry of its own (no global recorder), so several
//! servers can run in one process (tests) without mixing their counters.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use metrics::{Counter, Histogram, counter, gauge, histogram, with_local_recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use keyvex_engine::admission::PrepaidStats;
use keyvex_engine::budgets::{BudgetScope, BudgetView, Budgets};
use keyvex_engine::record::{CallObserver, RequestRecord};
use keyvex_store::MetricsHealth;

/// Latency buckets in seconds: tens of milliseconds (TTFT against a fast model) up to two
/// minutes (a long agent answer).
const BUCKETS: &[f64] = &[
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// What became of the spans finished while trace export was on. One set per process, like the
/// tracing subscriber that feeds it; `/metrics` shows it once export has been installed.
#[derive(Debug, Default)]
pub struct SpanExportCounters {
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans dropped because the export queue was full (the collector is slow or down).
    pub dropped_queue_full: AtomicU64,
    /// Spans dropped because their export failed (refused, unreachable, timed out).
    pub dropped_export_failed: AtomicU64,
}

static SPAN_EXPORT: OnceLock<Arc<SpanExportCounters>> = OnceLock::new();

/// The process's span export counters, created on first use (by the exporter as it starts).
pub fn span_export_counters() -> Arc<SpanExportCounters> {
    Arc::clone(SPAN_EXPORT.get_or_init(Arc::default))
}

pub struct ServerMetrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// The handles of each call label set seen, by model. A `counter!` with labels builds its
    /// key (a copy of every label and a shared slice of them) and looks it up in the registry
    /// each time: about a hundred allocations for one call's figures. Registered once per label
    /// set, a call only adds to them. The registry keeps every series it was given (no idle
    /// timeout is set), so a kept handle always reaches the exposition, and the label sets are
    /// the catalog's models times processes and statuses.
    calls: RwLock<HashMap<String, Vec<Arc<CallHandles>>>>,
    /// The HTTP request counters, by route and status, for the same reason.
    requests: RwLock<HashMap<String, Vec<(u16, Counter)>>>,
}

/// The metrics of one call label set: (process, provider, model, status); the model is the key
/// it is kept under.
struct CallHandles {
    process: String,
    provider: String,
    status: &'static str,
    calls: Counter,
    latency: Histogram,
    ttft: Histogram,
    /// Input, cached input, cache write, output.
    tokens: [Counter; 4],
    cost: Counter,
}

/// The `type` label of `keyvex_tokens_total`, in the order of [`CallHandles::tokens`].
const TOKEN_TYPES: [&str; 4] = ["input", "cached_input", "cache_write", "output"];

impl fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerMetrics")
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Every model call the engine records, whoever made it (routes, the in-process worker), is
/// counted: the engine is built with the server's metrics as an observer.
impl CallObserver for ServerMetrics {
    fn on_record(&self, record: &RequestRecord) {
        self.call(record);
    }
}

impl ServerMetrics {
    pub fn new() -> ServerMetrics {
        let builder = PrometheusBuilder::new();
        // The bucket list is a non-empty constant, so this cannot fail; fall back to summaries
        // rather than panic if it ever did.
        let builder = match builder.set_buckets(BUCKETS) {
            Ok(b) => b,
            Err(error) => {
                tracing::warn!(%error, "histogram buckets rejected; exporting summaries");
                PrometheusBuilder::new()
            }
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        ServerMetrics {
            recorder,
            handle,
            calls: RwLock::default(),
            requests: RwLock::default(),
        }
    }

    /// One HTTP request answered.
    pub fn http_request(&self, route: &str, status: u16) {
        let counted = |requests: &HashMap<String, Vec<(u16, Counter)>>| {
            let (_, counter) = requests.get(route)?.iter().find(|(s, _)| *s == status)?;
            counter.increment(1);
            Some(())
        };
        if counted(&self.requests.read().unwrap_or_else(PoisonError::into_inner)).is_some() {
            return;
        }
        let mut requests = self
            .requests
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        // Another thread may have registered it between the two locks.
        if counted(&requests).is_none() {
            let counter = with_local_recorder(
                &self.recorder,
                || counter!("keyvex_http_requests_total", "route" => route.to_owned(), "status" => status.to_string()),
            );
            counter.increment(1);
            requests
                .entry(route.to_owned())
                .or_default()
                .push((status, counter));
        }
    }

    /// A caller hit its rate limit.
    pub fn rate_limited(&self, endpoint: &str) {
        with_local_recorder(&self.recorder, || {
            counter!("keyvex_rate_limited_total", "scope" => "caller", "endpoint" => endpoint.to_owned())
                .increment(1);
        });
    }

    /// The budgets' figures, sampled at scrape time: refusals per scope, store failures, money
    /// reserved and settled since start, the configured limits and the global day's spend.
    pub fn budgets(&self, budgets: &Budgets, global: Option<&BudgetView>) {
        let stats = budgets.stats();
        let limits = budgets.limits();
        with_local_recorder(&self.recorder, || {
            for (scope, refused) in BudgetScope::ALL.iter().zip(stats.refused) {
                counter!("keyvex_budget_refusals_total", "scope" => scope.as_str())
                    .absolute(refused);
            }
            counter!("keyvex_budget_store_unavailable_total").absolute(stats.unavailable);
            counter!("keyvex_budget_reserved_micro_usd_total").absolute(stats.reserved.micro_usd());
            counter!("keyvex_budget_settled_micro_usd_total").absolute(stats.settled.micro_usd());
            counter!("keyvex_budget_interrupted_settled_total").absolute(stats.interrupted_settled);
            for (scope, limit) in [
                (BudgetScope::CallerDaily, limits.caller_daily),
                (BudgetScope::CallerMonthly, limits.caller_monthly),
                (BudgetScope::Run, limits.run),
                (BudgetScope::GlobalDaily, limits.global_daily),
            ] {
                if let Some(limit) = limit {
                    gauge!("keyvex_budget_limit_usd", "scope" => scope.as_str()).set(limit.usd());
                }
            }
            if let Some(global) = global {
                gauge!("keyvex_budget_global_daily_spent_usd").set(global.state.spent.usd());
                gauge!("keyvex_budget_global_daily_reserved_usd").set(global.state.reserved.usd());
            }
        });
    }

    /// Rate-limit checks the shared limit store (Redis) could not answer.
    pub fn shared_limit_failures(&self, failures: u64) {
        with_local_recorder(&self.recorder, || {
            counter!("keyvex_shared_limits_unavailable_total").absolute(failures);
        });
    }

    /// Reservations made at admission (with Redis, in the same round trip as the caller's
    /// limit) that the first attempt used, or returned because it went to another model.
    pub fn prepaid(&self, stats: PrepaidStats) {
        with_local_recorder(&self.recorder, || {
            counter!("keyvex_admission_prepaid_total", "outcome" => "used").absolute(stats.used);
            counter!("keyvex_admission_prepaid_total", "outcome" => "returned")
                .absolute(stats.returned);
        });
    }

    pub fn stream_opened(&self) {
        with_local_recorder(&self.recorder, || {
            gauge!("keyvex_streams_in_flight").increment(1.0);
        });
    }

    pub fn stream_closed(&self) {
        with_local_recorder(&self.recorder, || {
            gauge!("keyvex_streams_in_flight").decrement(1.0);
        });
    }

    /// One routed model call, from its metrics record. What every call has goes to its label
    /// set's handles; the rare figures (errors, fallbacks, rescues) are looked up as they come.
    fn call(&self, rec: &RequestRecord) {
        with_local_recorder(&self.recorder, || {
            if let Some(kind) = &rec.error_kind {
                counter!("keyvex_call_errors_total", "kind" => kind.clone(), "process" => rec.process.clone())
                    .increment(1);
            }
            // Per request (its last call): whether it ended on a fallback, and how many calls
            // before that it took.
            if rec.status.is_final() {
                if rec.fallback_used {
                    counter!("keyvex_fallbacks_total", "process" => rec.process.clone())
                        .increment(1);
                }
                if rec.attempts > 1 {
                    counter!("keyvex_call_retries_total", "process" => rec.process.clone())
                        .increment(u64::from(rec.attempts - 1));
                }
                // A stream that broke after content and was finished by another call, counted
                // on the model whose stream broke.
                for from in &rec.rescued_from {
                    counter!("keyvex_rescued_calls_total", "process" => rec.process.clone(), "model" => from.clone())
                        .increment(1);
                }
            }
            if rec.unterminated {
                counter!("keyvex_unterminated_streams_total", "provider" => rec.provider.clone(), "model" => rec.model.clone())
                    .increment(1);
            }
            if let Some(kind) = rec.error_kind.as_deref().filter(|k| is_account_error(k)) {
                // The router disabled the model for its account cool-down.
                counter!("keyvex_model_disabled_total", "provider" => rec.provider.clone(), "model" => rec.model.clone(), "reason" => kind.to_owned())
                    .increment(1);
            }
        });
        let handles = self.call_handles(rec);
        handles.calls.increment(1);
        handles.latency.record(rec.latency_ms as f64 / 1000.0);
        if let Some(ttft) = rec.ttft_ms {
            handles.ttft.record(ttft as f64 / 1000.0);
        }
        let tokens = [
            rec.input_tokens,
            rec.cached_input_tokens,
            rec.cache_write_tokens,
            rec.output_tokens,
        ];
        for (counter, n) in handles.tokens.iter().zip(tokens) {
            counter.increment(n);
        }
        handles.cost.increment(rec.cost_micro_usd);
    }

    /// The handles of `rec`'s label set, registered on its first call.
    fn call_handles(&self, rec: &RequestRecord) -> Arc<CallHandles> {
        let status = rec.status.as_str();
        let find = |calls: &HashMap<String, Vec<Arc<CallHandles>>>| {
            calls
                .get(rec.model.as_str())?
                .iter()
                .find(|h| {
                    h.status == status && h.process == rec.process && h.provider == rec.provider
                })
                .cloned()
        };
        if let Some(handles) = find(&self.calls.read().unwrap_or_else(PoisonError::into_inner)) {
            return handles;
        }
        let mut calls = self.calls.write().unwrap_or_else(PoisonError::into_inner);
        // Another thread may have registered it between the two locks.
        if let Some(handles) = find(&calls) {
            return handles;
        }
        let handles = Arc::new(self.register_call(rec, status));
        calls
            .entry(rec.model.clone())
            .or_default()
            .push(Arc::clone(&handles));
        handles
    }

    fn register_call(&self, rec: &RequestRecord, status: &'static str) -> CallHandles {
        let labels = [
            ("process", rec.process.clone()),
            ("provider", rec.provider.clone()),
            ("model", rec.model.clone()),
        ];
        with_local_recorder(&self.recorder, || {
            let mut with_status = labels.to_vec();
            with_status.push(("status", status.to_owned()));
            CallHandles {
                process: rec.process.clone(),
                provider: rec.provider.clone(),
                status,
                calls: counter!("keyvex_calls_total", &with_status),
                latency: histogram!("keyvex_call_latency_seconds", &labels),
                ttft: histogram!("keyvex_call_ttft_seconds", &labels),
                tokens: TOKEN_TYPES.map(|kind| {
                    let mut l = labels.to_vec();
                    l.push(("type", kind.to_owned()));
                    counter!("keyvex_tokens_total", &l)
                }),
                cost: counter!("keyvex_cost_micro_usd_total", &labels),
            }
        })
    }

    /// The Prometheus text exposition, with the metrics pipeline's health sampled now.
    pub fn render(&self, health: &MetricsHealth) -> String {
        with_local_recorder(&self.recorder, || {
            let sink = health.sink;
            gauge!("keyvex_metrics_accepted", "sink" => sink).set(health.accepted as f64);
            gauge!("keyvex_metrics_durable", "sink" => sink).set(health.durable as f64);
            gauge!("keyvex_metrics_shipped", "sink" => sink).set(health.shipped as f64);
            gauge!("keyvex_metrics_retried", "sink" => sink).set(health.retried as f64);
            gauge!("keyvex_metrics_failed_writes", "sink" => sink).set(health.failed_writes as f64);
            gauge!("keyvex_metrics_timeouts", "sink" => sink).set(health.timeouts as f64);
            gauge!("keyvex_metrics_pending", "sink" => sink).set(health.pending as f64);
            gauge!("keyvex_metrics_oldest_pending_age_seconds", "sink" => sink)
                .set(health.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0);
            if let Some(spans) = SPAN_EXPORT.get() {
                counter!("keyvex_otel_spans_exported_total")
                    .absolute(spans.exported.load(Ordering::Relaxed));
                counter!("keyvex_otel_spans_dropped_total", "reason" => "queue_full")
                    .absolute(spans.dropped_queue_full.load(Ordering::Relaxed));
                counter!("keyvex_otel_spans_dropped_total", "reason" => "export_failed")
                    .absolute(spans.dropped_export_failed.load(Ordering::Relaxed));
            }
            // Calls whose process stopped under them, recorded `interrupted` from their intents
            // by this process (they never pass `on_record`, so `keyvex_calls_total` lacks them).
            gauge!("keyvex_metrics_interrupted_recorded", "sink" => sink, "origin" => "ledger")
                .set(health.recovered as f64);
            gauge!("keyvex_metrics_interrupted_recorded", "sink" => sink, "origin" => "lost_replica")
                .set(health.swept as f64);
            gauge!("keyvex_metrics_intents", "sink" => sink).set(health.intents as f64);
            gauge!("keyvex_metrics_intents_skipped", "sink" => sink)
                .set(health.intents_skipped as f64);
            // With `durable`, the group-commit size: what each fsync of the ledger is paying for.
            gauge!("keyvex_metrics_ledger_commits", "sink" => sink)
                .set(health.ledger_commits as f64);
        });
        self.handle.render()
    }
}

/// Error kinds the router answers by disabling the model for its account cool-down (the
/// provider refused our account: quota, billing, key, access, model).
fn is_account_error(kind: &str) -> bool {
    matches!(kind, "quota_exhausted" | "billing" | "auth" | "not_found")
}

#[cfg(test)]
mod tests {
    use keyvex_engine::stream::Usage;

    use super::*;

    /// The value of the series whose line starts with `series` (name and labels).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    }

    #[test]
    fn each_label_set_keeps_its_own_counts_when_its_handles_are_reused() {
        let m = ServerMetrics::new();
        let usage = Usage {
            input: 10,
            cached_input: 0,
            cache_write: 0,
            output: 5,
        };
        let call = |process: &str, provider: &str, model: &str| {
            RequestRecord::new("u", process, provider, model).with_usage(&usage)
        };
        m.on_record(&call("direct", "openai", "gpt-a"));
        m.on_record(&call("direct", "openai", "gpt-a"));
        m.on_record(&call("direct", "openai", "gpt-a").failed("transient", "upstream 503"));
        m.on_record(&call("magicSpark", "openai", "gpt-a"));
        m.on_record(&call("direct", "anthropic", "claude-b"));
        m.http_request("/v1/chat/completions", 200);
        m.http_request("/v1/chat/completions", 200);
        m.http_request("/v1/chat/completions", 429);
        m.http_request("/v1/models", 200);
        let text = m.handle.render();
        let calls = |labels: &str| value(&text, &format!("keyvex_calls_total{{{labels}}}"));
        let ok = r#"process="direct",provider="openai",model="gpt-a",status="succeeded""#;
        assert_eq!(calls(ok), Some(2.0), "{text}");
        let failed = r#"process="direct",provider="openai",model="gpt-a",status="failed""#;
        assert_eq!(calls(failed), Some(1.0), "{text}");
        let other_process =
            r#"process="magicSpark",provider="openai",model="gpt-a",status="succeeded""#;
        assert_eq!(calls(other_process), Some(1.0), "{text}");
        let other_model =
            r#"process="direct",provider="anthropic",model="claude-b",status="succeeded""#;
        assert_eq!(calls(other_model), Some(1.0), "{text}");
        // Tokens are counted per (process, provider, model), whatever the status.
        let output = r#"keyvex_tokens_total{process="direct",provider="openai",model="gpt-a",type="output"}"#;
        assert_eq!(value(&text, output), Some(15.0), "{text}");
        let requests =
            |labels: &str| value(&text, &format!("keyvex_http_requests_total{{{labels}}}"));
        assert_eq!(
            requests(r#"route="/v1/chat/completions",status="200""#),
            Some(2.0)
        );
        assert_eq!(
            requests(r#"route="/v1/chat/completions",status="429""#),
            Some(1.0)
        );
        assert_eq!(requests(r#"route="/v1/models",status="200""#), Some(1.0));
    }
}
