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
            | ProviderError::Stalled { provider, .. } => *provider,
        }
    }

    /// Whether trying again (the same model later, or the fallback) can help.
    ///
    /// Never retried: 400/401/403/404/413/422, and out-of-credit answers (`insufficient_quota`,
    /// Anthropic's spend limit), which look like 429 but will not go away.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Connect { .. }
            | ProviderError::Transport { .. }
            | ProviderError::Truncated { .. }
            | ProviderError::Malformed { .. }
            | ProviderError::FirstTokenTimeout { .. }
            | ProviderError::Stalled { .. } => true,
            ProviderError::Http {
                status,
                error_type,
                code,
                ..
            } => {
                if is_quota_exhausted(error_type.as_deref(), code.as_deref()) {
                    return false;
                }
                matches!(status, 408 | 409 | 429 | 500..=599)
            }
            ProviderError::InStream { error_type, .. } => matches!(
                error_type.as_str(),
                "overloaded_error"
                    | "api_error"
                    | "rate_limit_error"
                    | "timeout_error"
                    | "server_error"
                    | "rate_limit_exceeded"
            ),
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
                match status {
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

/// Parses `retry-after-ms`, then `retry-after` (seconds or an HTTP date is not supported: a date
/// yields `None`, and the router falls back to its own backoff).
pub fn parse_retry_after(
    retry_after_ms: Option<&str>,
    retry_after: Option<&str>,
) -> Option<Duration> {
    if let Some(ms) = retry_after_ms.and_then(|v| v.trim().parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let secs = retry_after.and_then(|v| v.trim().parse::<f64>().ok())?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, error_type: Option<&str>) -> ProviderError {
        ProviderError::Http {
            provider: ProviderKind::OpenAi,
            status,
            error_type: error_type.map(str::to_owned),
            code: None,
            message: "m".into(),
            retry_after: None,
            request_id: None,
        }
    }

    #[test]
    fn retry_classification_follows_the_sdks() {
        for s in [408, 409, 429, 500, 502, 503, 529] {
            assert!(http(s, None).is_retryable(), "{s} should be retryable");
        }
        for s in [400, 401, 403, 404, 413, 422] {
            assert!(!http(s, None).is_retryable(), "{s} must not be retried");
        }
        assert!(!http(429, Some("insufficient_quota")).is_retryable());
        assert_eq!(
            http(429, Some("insufficient_quota")).kind(),
            "quota_exhausted"
        );
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        assert_eq!(
            parse_retry_after(Some("1500"), Some("9")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after(None, Some("2")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_retry_after(None, Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            None
        );
    }
}
