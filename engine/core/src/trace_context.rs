//! W3C trace context (`traceparent`) in and out of the engine's `tracing` spans.
//!
//! The engine only speaks the OpenTelemetry API: which span a `tracing` span maps to, and the
//! header that carries it across a process boundary (an HTTP request to a provider, an SQS
//! message). Whether spans are exported at all is the binary's choice: without an OpenTelemetry
//! layer on the subscriber every span's context is empty, so nothing here writes a header and
//! nothing is parsed into a span that would go nowhere.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C trace context header name.
pub const TRACEPARENT: &str = "traceparent";

/// The span context of the current `tracing` span, when it has one that is exported.
fn current_span_context() -> Option<SpanContext> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.clone())
}

/// `traceparent` of the current span (`00-{trace id}-{span id}-{flags}`), or `None` when spans
/// are not exported.
pub fn current_traceparent() -> Option<String> {
    current_span_context().map(|sc| traceparent_of(&sc))
}

/// The 32-hex-digit trace id of the current span, or `None` when spans are not exported.
pub fn current_trace_id() -> Option<String> {
    current_span_context().map(|sc| sc.trace_id().to_string())
}

fn traceparent_of(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Parses a `traceparent` header value. Version `00` must be exactly four fields; a later
/// version may append fields, which are ignored (the W3C rule for forward compatibility).
/// All-zero ids, version `ff` and anything that is not lowercase hex are refused.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let value = value.trim();
    let mut parts = value.split('-');
    let (version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !lower_hex(trace_id, 32) || !lower_hex(span_id, 16) || !lower_hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        // Only the sampled bit is defined; the others are not passed on.
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// Makes `span` a child of the remote span `traceparent` names. An absent or malformed header
/// leaves the span a root, as the W3C spec asks; without an OpenTelemetry layer it does nothing.
pub fn adopt_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(sc) = traceparent.and_then(parse_traceparent) else {
        return;
    };
    let cx = opentelemetry::Context::new().with_remote_span_context(sc);
    // Fails only for a span that is already started under the layer, which callers never pass.
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_round_trips() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(value).unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(traceparent_of(&sc), value);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?} was accepted");
        }
        // A later version may add fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what")
                .is_some()
        );
    }

    #[test]
    fn without_an_opentelemetry_layer_there_is_no_context_to_send() {
        let span = tracing::info_span!("x");
        let _entered = span.enter();
        assert_eq!(current_traceparent(), None);
        assert_eq!(current_trace_id(), None);
    }
}
