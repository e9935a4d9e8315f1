//! The one event type every provider yields, the token usage it reports, and the error that ends
//! a provider call. A leaf: it imports nothing of the crate, so every layer can name these types.
//!
//! Providers translate their wire protocol into [`ProviderEvent`]s; the router and everything
//! above it only ever sees these. Usage is normalised here once, so cost never needs to know
//! which provider it came from (see [`Usage`]).

use std::fmt;

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which wire protocol a model is served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    #[serde(rename = "openai")]
    OpenAi,
    Anthropic,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 2] = [ProviderKind::OpenAi, ProviderKind::Anthropic];

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Token usage of one attempt, normalised across providers.
///
/// * `input` is **every** prompt token the provider processed: uncached, read from cache and
///   written to cache. OpenAI reports exactly this as `prompt_tokens` (cached tokens are inside
///   it); Anthropic reports `input_tokens` *excluding* cache reads and writes, so its adapter adds
///   `cache_read_input_tokens` and `cache_creation_input_tokens` back in.
/// * `cached_input` and `cache_write` are the parts of `input` read from / written to the cache.
/// * `output` is every generated token, reasoning included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub output: u64,
}

impl Usage {
    /// Prompt tokens billed at the plain input price.
    pub fn uncached_input(&self) -> u64 {
        self.input
            .saturating_sub(self.cached_input)
            .saturating_sub(self.cache_write)
    }

    pub fn total(&self) -> u64 {
        self.input + self.output
    }

    pub fn add(&mut self, other: &Usage) {
        self.input += other.input;
        self.cached_input += other.cached_input;
        self.cache_write += other.cache_write;
        self.output += other.output;
    }
}

/// Why generation stopped, mapped from each provider's vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Natural end or a stop sequence (`stop`, `end_turn`, `stop_sequence`).
    Stop,
    /// Output token limit (`length`, `max_tokens`).
    Length,
    /// The model asked for a tool (`tool_calls`, `tool_use`).
    ToolCalls,
    /// Refused or filtered (`content_filter`, `refusal`).
    ContentFilter,
    /// Anything else, verbatim.
    Other(String),
}

impl FinishReason {
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::Other(s) => s,
        }
    }
}

/// One event of a provider stream.
///
/// Order contract for a provider stream: `Start` first (once the HTTP response was accepted),
/// then any number of `Delta`s, at most one `Usage` (the final, authoritative one; a provider
/// that learns usage in pieces merges them before emitting), then exactly one terminal event,
/// `Done` or `Error`. Nothing follows a terminal event. A stream that fails before `Start`
/// yields only `Error`.
///
/// Partial usage: when a stream fails *after* the provider already reported usage (Anthropic
/// sends its input side in `message_start`; OpenAI's usage chunk may arrive just before the
/// connection drops), the provider emits that `Usage` immediately before the `Error`, with the
/// input side exact and `output` the last count reported. A `Usage` followed by `Error` is
/// therefore partial: the router keeps the input side and estimates the output it did not get.
/// A `Usage` followed by `Done` is final.
#[derive(Debug, Clone)]
pub enum ProviderEvent {
    Start {
        provider: ProviderKind,
        model: String,
    },
    Delta(String),
    Usage(Usage),
    Done {
        finish_reason: FinishReason,
        /// The answer was complete (finish reason and usage) but the stream ended without its
        /// terminator (`data: [DONE]`, `message_stop`): accepted, and counted.
        unterminated: bool,
    },
    Error(ProviderError),
}

impl ProviderEvent {
    pub fn is_terminal(&self) -> bool {
        matches!(self, ProviderEvent::Done { .. } | ProviderEvent::Error(_))
    }
}

/// Everything that can go wrong in one provider call. Each variant knows whether a fallback may
/// be tried (`is_retryable`), how long the provider asked us to wait (`retry_after`) and a short
/// stable `kind` for metrics. No variant ever holds a secret.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    #[error("could not connect to {provider} at {url}: {message}")]
    Connect {
        provider: ProviderKind,
        url: String,
        message: String,
    },
    #[error("{provider} answered HTTP {status}{}: {message}", error_type.as_deref().map(|t| format!(" ({t})")).unwrap_or_default())]
    Http {
        provider: ProviderKind,
        status: u16,
        /// `error.type` from the body (e.g. `rate_limit_error`, `insufficient_quota`).
        error_type: Option<String>,
        /// `error.code` from the body, when the provider sends one.
        code: Option<String>,
        message: String,
        retry_after: Option<Duration>,
        /// The provider's request id header, to quote in a support ticket.
        request_id: Option<String>,
    },
    #[error("{provider} sent an error event mid-stream ({error_type}): {message}")]
    InStream {
        provider: ProviderKind,
        error_type: String,
        message: String,
    },
    #[error("{provider} sent data that could not be decoded: {detail}")]
    Malformed {
        provider: ProviderKind,
        detail: String,
    },
    #[error("{provider} ended the stream before it was complete: {detail}")]
    Truncated {
        provider: ProviderKind,
        detail: String,
    },
    #[error("{provider} lost the connection mid-stream: {message}")]
    Transport {
        provider: ProviderKind,
        message: String,
    },
    #[error("no first token from {provider} within {}ms", after.as_millis())]
    FirstTokenTimeout {
        provider: ProviderKind,
        after: Duration,
    },
    #[error("{provider} stalled: no data for {}ms", after.as_millis())]
    Stalled {
        provider: ProviderKind,
        after: Duration,
    },
    /// Connected and sent, but no response headers within the header timeout.
    #[error("{provider} sent no response headers within {}ms", after.as_millis())]
    HeaderTimeout {
        provider: ProviderKind,
        after: Duration,
    },
    /// The request's total deadline passed (a stream that drips forever ends here).
    #[error("the request's total deadline of {}ms passed while {provider} was still streaming", after.as_millis())]
    Deadline {
        provider: ProviderKind,
        after: Duration,
    },
    /// The provider sent more than we buffer: an SSE line or event, or an error body, over its cap.
    #[error("{provider} sent {what} longer than the {limit}-byte cap; the stream was closed")]
    Oversized {
        provider: ProviderKind,
        /// `"an SSE line"`, `"an SSE event"`, `"an error body"`.
        what: &'static str,
        limit: usize,
    },
}

/// Whose fault a failed provider call is, which decides what the router does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    /// Worth another try: 5xx, overload, timeouts, broken connections, garbled streams.
    Transient,
    /// The provider asked us to slow down (429 that is not about credit).
    RateLimited,
    /// About our account with this provider: out of quota or credit, a spend limit, a key it
    /// refuses (401/403), a model it does not serve us (404). Another model (usually on the
    /// other provider) can answer; this one will not for a while.
    Account,
    /// About the request itself (400, 413, 422: invalid, refused by content policy). Another
    /// model would refuse it too; the caller must change it.
    Request,
    /// The prompt does not fit the model's context window: only a model with a larger window
    /// can help.
    ContextTooLong,
    /// The request's own deadline passed: nothing more is tried.
    Deadline,
}

impl ProviderError {
    pub fn provider(&self) -> ProviderKind {
        match self {
            ProviderError::Connect { provider, .. }
            | ProviderError::Http { provider, .. }
            | ProviderError::InStream { provider, .. }
            | ProviderError::Malformed { provider, .. }
            | ProviderError::Truncated { provider, .. }
            | ProviderError::Transport { provider, .. }
            | ProviderError::FirstTokenTimeout { provider, .. }
            | ProviderError::Stalled { provider, .. }
            | ProviderError::HeaderTimeout { provider, .. }
            | ProviderError::Deadline { provider, .. }
            | ProviderError::Oversized { provider, .. } => *provider,
        }
    }

    /// Whose fault the failure is; see [`FaultClass`].
    pub fn class(&self) -> FaultClass {
        match self {
            ProviderError::Connect { .. }
            | ProviderError::Transport { .. }
            | ProviderError::Truncated { .. }
            | ProviderError::Malformed { .. }
            | ProviderError::Oversized { .. }
            | ProviderError::FirstTokenTimeout { .. }
            | ProviderError::Stalled { .. }
            | ProviderError::HeaderTimeout { .. } => FaultClass::Transient,
            ProviderError::Deadline { .. } => FaultClass::Deadline,
            ProviderError::Http {
                status,
                error_type,
                code,
                message,
                ..
            } => {
                let (error_type, code) = (error_type.as_deref(), code.as_deref());
                if is_quota_exhausted(error_type, code) {
                    return FaultClass::Account;
                }
                match status {
                    401..=404 => FaultClass::Account,
                    400 | 413 | 422 if is_context_too_long(code, message) => {
                        FaultClass::ContextTooLong
                    }
                    429 => FaultClass::RateLimited,
                    408 | 409 | 500..=599 => FaultClass::Transient,
                    _ => FaultClass::Request,
                }
            }
            ProviderError::InStream { error_type, .. } => match error_type.as_str() {
                "rate_limit_error" | "rate_limit_exceeded" => FaultClass::RateLimited,
                "insufficient_quota" | "billing_error" => FaultClass::Account,
                "authentication_error" | "permission_error" | "not_found_error" => {
                    FaultClass::Account
                }
                "invalid_request_error" | "request_too_large" => FaultClass::Request,
                _ => FaultClass::Transient,
            },
        }
    }

    /// Whether trying again (the same model later, or the fallback) can help. Account errors
    /// count as retryable: the fallback, on another account or provider, can answer.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.class(),
            FaultClass::Transient | FaultClass::RateLimited | FaultClass::Account
        )
    }

    /// Whether the failure says the model itself is unhealthy (what a circuit breaker counts):
    /// transient failures and rate limits do; the caller's request, our account and our own
    /// deadline do not.
    pub fn counts_against_model(&self) -> bool {
        matches!(
            self.class(),
            FaultClass::Transient | FaultClass::RateLimited
        )
    }

    /// A failure before any byte of an answer that one quick retry of the same model usually
    /// cures: a plain 5xx (not an overload that asked us to wait) or a connection that broke
    /// before the response headers.
    pub fn is_blip(&self) -> bool {
        match self {
            ProviderError::Connect { .. } => true,
            ProviderError::Http {
                status,
                retry_after,
                ..
            } => matches!(status, 500 | 502 | 504) && retry_after.is_none(),
            _ => false,
        }
    }

    /// The wait the provider asked for (`retry-after` / `retry-after-ms`), if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A short, stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::Connect { .. } => "connect",
            ProviderError::Transport { .. } => "transport",
            ProviderError::Truncated { .. } => "truncated",
            ProviderError::Malformed { .. } => "malformed",
            ProviderError::FirstTokenTimeout { .. } => "ttft_timeout",
            ProviderError::Stalled { .. } => "stalled",
            ProviderError::HeaderTimeout { .. } => "header_timeout",
            ProviderError::Deadline { .. } => "deadline",
            ProviderError::Oversized { .. } => "oversized",
            ProviderError::InStream { error_type, .. } => match error_type.as_str() {
                "overloaded_error" => "overloaded",
                "rate_limit_error" | "rate_limit_exceeded" => "rate_limited",
                _ => "in_stream_error",
            },
            ProviderError::Http {
                status,
                error_type,
                code,
                ..
            } => {
                if is_quota_exhausted(error_type.as_deref(), code.as_deref()) {
                    return "quota_exhausted";
                }
                if self.class() == FaultClass::ContextTooLong {
                    return "context_too_long";
                }
                match status {
                    402 => "billing",
                    400 | 413 | 422 => "bad_request",
                    401 | 403 => "auth",
                    404 => "not_found",
                    408 => "timeout",
                    409 => "conflict",
                    429 => "rate_limited",
                    529 => "overloaded",
                    500..=599 => "server_error",
                    _ => "http_error",
                }
            }
        }
    }
}

fn is_quota_exhausted(error_type: Option<&str>, code: Option<&str>) -> bool {
    [error_type, code].into_iter().flatten().any(|s| {
        matches!(
            s,
            "insufficient_quota" | "billing_error" | "enforced_spend_limit_reached"
        )
    })
}

/// Longest wait a `retry-after` header is taken at; anything longer (a year, `1e20`) is read as
/// this, which is far beyond every router's cap and so means "skip this model for now".
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Parses `retry-after-ms`, then `retry-after` (delay-seconds, fractional accepted, or an
/// HTTP-date). Defensive: a negative, non-finite or unparsable value is ignored, a huge one is
/// clamped to [`MAX_RETRY_AFTER`] (`Duration::from_secs_f64` would panic on `1e20`), and a date
/// in the past means "now".
pub fn parse_retry_after(
    retry_after_ms: Option<&str>,
    retry_after: Option<&str>,
) -> Option<Duration> {
    if let Some(ms) = retry_after_ms.and_then(|v| seconds(v, 1000.0)) {
        return Some(ms);
    }
    let value = retry_after?.trim();
    seconds(value, 1.0).or_else(|| {
        let at = httpdate::parse_http_date(value).ok()?;
        Some(
            at.duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .min(MAX_RETRY_AFTER),
        )
    })
}

/// A non-negative finite number of `per_second` units, clamped to [`MAX_RETRY_AFTER`].
fn seconds(value: &str, per_second: f64) -> Option<Duration> {
    let n = value.trim().parse::<f64>().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = n / per_second;
    Some(if secs >= MAX_RETRY_AFTER.as_secs_f64() {
        MAX_RETRY_AFTER
    } else {
        Duration::from_secs_f64(secs)
    })
}

/// OpenAI says `code: "context_length_exceeded"`; Anthropic says it in words ("prompt is too
/// long: 201000 tokens > 200000 maximum").
fn is_context_too_long(code: Option<&str>, message: &str) -> bool {
    code == Some("context_length_exceeded")
        || message.contains("prompt is too long")
        || message.contains("maximum context length")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, error_type: Option<&str>) -> ProviderError {
        http_with(status, error_type, None, "m", None)
    }

    fn http_with(
        status: u16,
        error_type: Option<&str>,
        code: Option<&str>,
        message: &str,
        retry_after: Option<Duration>,
    ) -> ProviderError {
        ProviderError::Http {
            provider: ProviderKind::OpenAi,
            status,
            error_type: error_type.map(str::to_owned),
            code: code.map(str::to_owned),
            message: message.into(),
            retry_after,
            request_id: None,
        }
    }

    #[test]
    fn faults_are_classed_by_whose_fault_they_are() {
        for s in [408, 409, 500, 502, 503, 529] {
            assert_eq!(http(s, None).class(), FaultClass::Transient, "{s}");
            assert!(http(s, None).is_retryable());
        }
        assert_eq!(http(429, None).class(), FaultClass::RateLimited);
        for s in [401, 402, 403, 404] {
            let e = http(s, None);
            assert_eq!(e.class(), FaultClass::Account, "{s}");
            // The fallback is on another account or provider: it can answer.
            assert!(e.is_retryable(), "{s}");
            assert!(!e.counts_against_model(), "{s}");
        }
        let quota = http(429, Some("insufficient_quota"));
        assert_eq!(quota.class(), FaultClass::Account);
        assert_eq!(quota.kind(), "quota_exhausted");
        for s in [400, 413, 422] {
            assert_eq!(http(s, None).class(), FaultClass::Request, "{s}");
            assert!(!http(s, None).is_retryable(), "{s}");
        }
        let context = http_with(
            400,
            Some("invalid_request_error"),
            Some("context_length_exceeded"),
            "m",
            None,
        );
        assert_eq!(context.class(), FaultClass::ContextTooLong);
        assert_eq!(context.kind(), "context_too_long");
        let anthropic_context = http_with(
            400,
            Some("invalid_request_error"),
            None,
            "prompt is too long: 210000 tokens > 200000 maximum",
            None,
        );
        assert_eq!(anthropic_context.class(), FaultClass::ContextTooLong);
    }

    #[test]
    fn only_plain_5xx_and_broken_connections_are_blips() {
        assert!(http(500, None).is_blip());
        assert!(http(502, None).is_blip());
        let asked_to_wait = http_with(500, None, None, "m", Some(Duration::from_secs(1)));
        assert!(!asked_to_wait.is_blip());
        assert!(!http(529, None).is_blip());
        assert!(!http(429, None).is_blip());
    }

    #[test]
    fn retry_after_prefers_milliseconds_and_survives_hostile_values() {
        assert_eq!(
            parse_retry_after(Some("1500"), Some("9")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after(None, Some("2")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_retry_after(None, Some("0.25")),
            Some(Duration::from_millis(250))
        );
        for huge in ["1e20", "18446744073709551616", "1e308"] {
            assert_eq!(parse_retry_after(None, Some(huge)), Some(MAX_RETRY_AFTER));
            assert_eq!(parse_retry_after(Some(huge), None), Some(MAX_RETRY_AFTER));
        }
        for junk in ["-1", "NaN", "inf", "-inf", "soon", ""] {
            assert_eq!(parse_retry_after(None, Some(junk)), None, "{junk}");
        }
        // A bad `retry-after-ms` falls through to `retry-after`.
        assert_eq!(
            parse_retry_after(Some("-5"), Some("3")),
            Some(Duration::from_secs(3))
        );
        // An HTTP-date in the past is "now"; one in the future is the time until it.
        assert_eq!(
            parse_retry_after(None, Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            Some(Duration::ZERO)
        );
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let wait = parse_retry_after(None, Some(&httpdate::fmt_http_date(later)))
            .expect("a future date parses");
        assert!(
            wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
    }
}
