//! The server's Prometheus metrics, in a registry of its own (no global recorder), so several
//! servers can run in one process (tests) without mixing their counters.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use metrics::{counter, gauge, histogram, with_local_recorder};
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
}

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
        ServerMetrics { recorder, handle }
    }

    /// One HTTP request answered.
    pub fn http_request(&self, route: &str, status: u16) {
        with_local_recorder(&self.recorder, || {
            counter!("keyvex_http_requests_total", "route" => route.to_owned(), "status" => status.to_string())
                .increment(1);
        });
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

    /// One routed model call, from its metrics record.
    fn call(&self, rec: &RequestRecord) {
        let labels = [
            ("process", rec.process.clone()),
            ("provider", rec.provider.clone()),
            ("model", rec.model.clone()),
        ];
        with_local_recorder(&self.recorder, || {
            let mut with_status = labels.to_vec();
            with_status.push(("status", rec.status.as_str().to_owned()));
            counter!("keyvex_calls_total", &with_status).increment(1);
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
            histogram!("keyvex_call_latency_seconds", &labels)
                .record(rec.latency_ms as f64 / 1000.0);
            if let Some(ttft) = rec.ttft_ms {
                histogram!("keyvex_call_ttft_seconds", &labels).record(ttft as f64 / 1000.0);
            }
            for (kind, n) in [
                ("input", rec.input_tokens),
                ("cached_input", rec.cached_input_tokens),
                ("cache_write", rec.cache_write_tokens),
                ("output", rec.output_tokens),
            ] {
                let mut l = labels.to_vec();
                l.push(("type", kind.to_owned()));
                counter!("keyvex_tokens_total", &l).increment(n);
            }
            counter!("keyvex_cost_micro_usd_total", &labels).increment(rec.cost_micro_usd);
        });
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
