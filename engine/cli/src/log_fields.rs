//! How span and event fields appear in log lines.
//!
//! The engine's spans carry each fact twice: under a short name for people (`method`, `model`,
//! `caller`) and under its OpenTelemetry convention name for trace export
//! (`http.request.method`, `gen_ai.request.model`, `keyvex.caller`), plus the exporter's own
//! `otel.*` fields (span name, kind, status). Log lines show the short names and leave the rest
//! out: a request's log line was about 1 KB with every fact in it twice, and the formatter kept
//! that text for every open span. The trace exporter reads the fields itself and sees them all.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// Convention names whose value the same span also carries under a short name (in brackets).
const TWINS: &[&str] = &[
    "http.request.method",   // method
    "http.route",            // route
    "keyvex.caller",         // caller
    "keyvex.process",        // process
    "keyvex.primary_model",  // primary
    "gen_ai.request.model",  // model
    "gen_ai.provider.name",  // provider
    "gen_ai.operation.name", // always "chat": the span is the attempt
];

/// Whether a field stays out of log lines.
fn skipped(name: &str) -> bool {
    name.starts_with("otel.") || TWINS.contains(&name)
}

/// The log formatter's [`FormatFields`]: the default `name=value` rendering without the fields
/// that only trace export needs.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogFields;

impl<'writer> FormatFields<'writer> for LogFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = Skipping(DefaultVisitor::new(writer, true));
        fields.record(&mut visitor);
        visitor.0.finish()
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        // The default pads with a space before formatting, which would leave a stray one
        // behind a record of only skipped fields; the visitor pads before each field it writes.
        let is_empty = current.fields.is_empty();
        let mut visitor = Skipping(DefaultVisitor::new(current.as_writer(), is_empty));
        fields.record(&mut visitor);
        visitor.0.finish()
    }
}

/// Passes every field but the skipped ones to the default visitor. Only the three kinds of
/// value the default visitor writes in its own way are forwarded: numbers and booleans reach
/// `record_debug` by `Visit`'s defaults, and are checked there.
struct Skipping<'a>(DefaultVisitor<'a>);

impl Visit for Skipping<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !skipped(field.name()) {
            self.0.record_debug(field, value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if !skipped(field.name()) {
            self.0.record_str(field, value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !skipped(field.name()) {
            self.0.record_error(field, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_keep_the_short_names_and_drop_the_export_only_fields() {
        let lines = Lines::default();
        let out = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(LogFields)
            .with_writer(move || out.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                otel.name = "POST /v1/chat/completions",
                otel.status_code = tracing::field::Empty,
                method = "POST",
                http.request.method = "POST",
                caller = tracing::field::Empty,
                keyvex.caller = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
            );
            // A record of only skipped fields, then one of kept and skipped ones.
            span.record("otel.status_code", "ERROR");
            span.record("keyvex.caller", "app");
            span.record("caller", "app");
            span.record("http.response.status_code", 500i64);
            // A skipped number reaches the check through `record_debug`.
            span.in_scope(|| {
                tracing::info!(
                    gen_ai.request.model = "m",
                    otel.weight = 3i64,
                    model = "m",
                    "done"
                )
            });
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains(r#"request{method="POST" caller="app" http.response.status_code=500}: "#),
            "{text}"
        );
        assert!(text.trim_end().ends_with(r#"done model="m""#), "{text}");
        for gone in ["otel.", "http.request.method", "keyvex.caller", "gen_ai."] {
            assert!(!text.contains(gone), "{gone} in {text}");
        }
    }
}
