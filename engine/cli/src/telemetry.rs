//! Logs and, when an OTLP endpoint is configured, OpenTelemetry trace export.
//!
//! With export off the subscriber is exactly the log formatter: no OpenTelemetry layer is
//! installed, so spans cost what they always did. With export on, `tracing-opentelemetry` turns
//! the engine's spans into OpenTelemetry spans, and [`QueueProcessor`] hands each finished one
//! to a bounded queue that a thread of its own drains in batches to the OTLP/HTTP exporter.
//! The request path never waits for the collector: a full queue drops the span and counts it
//! (`keyvex_otel_spans_dropped_total` in `/metrics`), and an export that fails is counted the
//! same way rather than retried against a collector that is down.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use tracing_subscriber::Registry;
use tracing_subscriber::layer::{Filter, Layer, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{OtlpExport, TelemetryConfig, TraceSampler};
use crate::log_fields::LogFields;
pub use crate::log_filter::LogFilter;
use keyvex_server::prom::{SpanExportCounters, span_export_counters};

/// Why trace export could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the OTLP trace exporter for {endpoint} could not be built: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("the span export thread could not be started: {0}")]
    Thread(std::io::Error),
}

/// Keeps trace export running; [`Telemetry::shutdown`] flushes what is queued.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is still queued (bounded by the export timeout), then stops the thread.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "trace export did not shut down cleanly");
        }
    }
}

/// Installs the global subscriber: logs to stderr filtered by `RUST_LOG` (else `default`),
/// plus the OpenTelemetry layer when `config` exports traces. A subscriber already installed
/// (a test harness) is left alone.
pub fn init(default: &str, config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let (filter, unread) = match config.log.as_deref().map(LogFilter::parse) {
        Some(Ok(filter)) => (filter, None),
        Some(Err(error)) => (LogFilter::lossy(default), Some(error)),
        None => (LogFilter::lossy(default), None),
    };
    let telemetry = init_with_filter(filter, config)?;
    if let Some(error) = unread {
        tracing::warn!(%error, default, "RUST_LOG could not be read, so the default log filter is in force; fix RUST_LOG (e.g. info or warn,keyvex_engine=debug)");
    }
    Ok(telemetry)
}

/// [`init`] with the log filter given (the benchmarks set theirs on the command line).
pub fn init_with_filter(
    filter: LogFilter,
    config: &TelemetryConfig,
) -> Result<Telemetry, TelemetryError> {
    match filter {
        LogFilter::Targets(targets) => install(*targets, config),
        LogFilter::Env(env) => install(*env, config),
    }
}

fn install<F>(filter: F, config: &TelemetryConfig) -> Result<Telemetry, TelemetryError>
where
    F: Layer<Registry> + Filter<Registry> + Send + Sync + 'static,
{
    let Some(export) = &config.export else {
        // The filter in front of everything: a span or event it turns down is never built.
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(log_lines())
            .try_init();
        return Ok(Telemetry::default());
    };
    let provider = tracer_provider(export)?;
    let tracer = provider.tracer("keyvex");
    // Spans are exported whatever the log level: the engine's own spans and events at info.
    let traced = tracing_subscriber::filter::Targets::new()
        .with_target("keyvex", tracing::Level::INFO)
        .with_target("keyvex_engine", tracing::Level::INFO)
        .with_target("keyvex_server", tracing::Level::INFO)
        .with_target("keyvex_store", tracing::Level::INFO);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_filter(traced);
    let _ = tracing_subscriber::registry()
        .with(log_lines().with_filter(filter))
        .with(otel)
        .try_init();
    tracing::info!(endpoint = %export.endpoint, service = %export.service_name, "exporting traces over OTLP/HTTP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The log lines on stderr.
fn log_lines<S>() -> tracing_subscriber::fmt::Layer<
    S,
    LogFields,
    tracing_subscriber::fmt::format::Format,
    fn() -> std::io::Stderr,
>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    // Colour codes only for a terminal: in a log file or journal they are noise for whoever
    // reads it (tracing-subscriber colours by default).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt::layer()
        .fmt_fields(LogFields)
        .with_writer(std::io::stderr as fn() -> std::io::Stderr)
        .with_ansi(ansi)
}

/// The tracer provider of `export`: resource, sampler and the queue processor in front of the
/// OTLP/HTTP protobuf exporter.
pub fn tracer_provider(export: &OtlpExport) -> Result<SdkTracerProvider, TelemetryError> {
    let failed = |message: String| TelemetryError::Exporter {
        endpoint: export.endpoint.clone(),
        message,
    };
    let mut exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(export.endpoint.clone())
        .with_timeout(export.timeout)
        .with_headers(export.headers.iter().cloned().collect())
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let resource = Resource::builder_empty()
        .with_service_name(export.service_name.clone())
        .with_attributes(
            [
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("telemetry.sdk.language", "rust"),
                KeyValue::new("telemetry.sdk.name", "opentelemetry"),
            ]
            .into_iter()
            .chain(
                export
                    .resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            ),
        )
        .build();
    exporter.set_resource(&resource);
    let processor = QueueProcessor::start(
        exporter,
        QueueLimits {
            max_queue_size: export.max_queue_size,
            max_export_batch_size: export.max_export_batch_size,
            schedule_delay: export.schedule_delay,
            export_timeout: export.timeout,
        },
        span_export_counters(),
    )?;
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(sampler(export.sampler))
        .with_span_processor(processor)
        .build())
}

fn sampler(s: TraceSampler) -> Sampler {
    match s {
        TraceSampler::AlwaysOn => Sampler::AlwaysOn,
        TraceSampler::AlwaysOff => Sampler::AlwaysOff,
        TraceSampler::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
        TraceSampler::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        TraceSampler::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        TraceSampler::ParentBasedTraceIdRatio(r) => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r)))
        }
    }
}

/// How much the span queue holds and how it is drained.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_queue_size: usize,
    pub max_export_batch_size: usize,
    pub schedule_delay: Duration,
    pub export_timeout: Duration,
}

enum Message {
    Span(Box<SpanData>),
    /// Export everything queued, then answer.
    Flush(SyncSender<OTelSdkResult>),
    /// Export everything queued, answer, and stop.
    Shutdown(SyncSender<OTelSdkResult>),
}

/// A span processor with a bounded queue in front of an exporter running on a thread of its
/// own. Unlike the SDK's batch processor it reports what it drops, which `/metrics` shows.
pub struct QueueProcessor {
    queue: SyncSender<Message>,
    /// Separate from the span queue so a flush or shutdown is never refused for lack of room.
    control: SyncSender<Message>,
    counters: Arc<SpanExportCounters>,
    timeout: Duration,
}

impl fmt::Debug for QueueProcessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueProcessor").finish_non_exhaustive()
    }
}

impl QueueProcessor {
    pub fn start(
        exporter: SpanExporter,
        limits: QueueLimits,
        counters: Arc<SpanExportCounters>,
    ) -> Result<QueueProcessor, TelemetryError> {
        let (queue, spans) = mpsc::sync_channel(limits.max_queue_size.max(1));
        let (control, controls) = mpsc::sync_channel(4);
        let worker = Drain {
            exporter,
            spans,
            controls,
            limits,
            counters: Arc::clone(&counters),
        };
        std::thread::Builder::new()
            .name("otel-export".into())
            .spawn(move || worker.run())
            .map_err(TelemetryError::Thread)?;
        Ok(QueueProcessor {
            queue,
            control,
            counters,
            timeout: limits.export_timeout,
        })
    }

    fn ask(
        &self,
        message: fn(SyncSender<OTelSdkResult>) -> Message,
        wait: Duration,
    ) -> OTelSdkResult {
        let (answer, answered) = mpsc::sync_channel(1);
        self.control
            .send(message(answer))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        answered
            .recv_timeout(wait)
            .map_err(|_| OTelSdkError::Timeout(wait))?
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.queue.try_send(Message::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Message::Flush, self.timeout.saturating_mul(2))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.ask(Message::Shutdown, timeout.max(self.timeout))
    }
}

/// The export thread's side of the queue.
struct Drain {
    exporter: SpanExporter,
    spans: Receiver<Message>,
    controls: Receiver<Message>,
    limits: QueueLimits,
    counters: Arc<SpanExportCounters>,
}

impl Drain {
    fn run(self) {
        // The HTTP client is async; a runtime of this thread's own keeps its I/O off the
        // server's workers.
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(error) => {
                tracing::error!(%error, "span export runtime could not start; spans will be dropped");
                return;
            }
        };
        let mut batch: Vec<SpanData> = Vec::with_capacity(self.limits.max_export_batch_size);
        let mut next_export = Instant::now() + self.limits.schedule_delay;
        // The control channel is looked at between spans, at least every 50 ms.
        let tick = self.limits.schedule_delay.min(Duration::from_millis(50));
        loop {
            while let Ok(control) = self.controls.try_recv() {
                let (answer, stop) = match control {
                    Message::Flush(answer) => (answer, false),
                    Message::Shutdown(answer) => (answer, true),
                    Message::Span(_) => continue,
                };
                self.take_queued(&mut batch, usize::MAX);
                let result = self.export_all(&runtime, &mut batch);
                let _ = answer.send(result);
                if stop {
                    let _ = self.exporter.shutdown();
                    return;
                }
            }
            match self.spans.recv_timeout(tick) {
                Ok(Message::Span(span)) => batch.push(*span),
                Ok(Message::Flush(_) | Message::Shutdown(_)) | Err(RecvTimeoutError::Timeout) => {}
                // Every sender is gone: the provider was dropped without a shutdown.
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.export_all(&runtime, &mut batch);
                    return;
                }
            }
            if batch.len() >= self.limits.max_export_batch_size || Instant::now() >= next_export {
                let _ = self.export_all(&runtime, &mut batch);
                next_export = Instant::now() + self.limits.schedule_delay;
            }
        }
    }

    fn take_queued(&self, batch: &mut Vec<SpanData>, most: usize) {
        while batch.len() < most {
            match self.spans.try_recv() {
                Ok(Message::Span(span)) => batch.push(*span),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }

    /// Exports `batch` in chunks of the batch size; a failed chunk is counted as dropped.
    fn export_all(
        &self,
        runtime: &tokio::runtime::Runtime,
        batch: &mut Vec<SpanData>,
    ) -> OTelSdkResult {
        let mut result = Ok(());
        while !batch.is_empty() {
            let take = batch.len().min(self.limits.max_export_batch_size);
            let chunk: Vec<SpanData> = batch.drain(..take).collect();
            let n = chunk.len() as u64;
            let timeout = self.limits.export_timeout;
            let sent = runtime.block_on(async {
                tokio::time::timeout(timeout, self.exporter.export(chunk)).await
            });
            match sent {
                Ok(Ok(())) => {
                    self.counters.exported.fetch_add(n, Ordering::Relaxed);
                }
                Ok(Err(error)) => {
                    self.counters
                        .dropped_export_failed
                        .fetch_add(n, Ordering::Relaxed);
                    // At debug: a collector that is down would otherwise log every few seconds;
                    // the counter in /metrics is what tells.
                    tracing::debug!(%error, spans = n, "span export failed; spans dropped");
                    result = Err(error);
                }
                Err(_) => {
                    self.counters
                        .dropped_export_failed
                        .fetch_add(n, Ordering::Relaxed);
                    tracing::debug!(spans = n, "span export timed out; spans dropped");
                    result = Err(OTelSdkError::Timeout(timeout));
                }
            }
        }
        result
    }
}
