//! The provider boundary: one trait, one file per wire protocol.
//!
//! A provider turns a [`ChatRequest`] into a stream of [`ProviderEvent`]s over HTTP. It knows
//! nothing of routing, retries, cost or metrics: those live above it (`router`, `cost`,
//! `metrics`). Adding a provider is a file, a `mod` line and a [`ProviderKind`] variant.

pub mod anthropic;
pub mod openai;
pub mod sim;
mod sse_frames;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::stream::{ProviderEvent, ProviderKind};

/// A boxed stream of provider events; the HTTP call starts on first poll and is cancelled when
/// the stream is dropped.
pub type EventStream = Pin<Box<dyn Stream<Item = ProviderEvent> + Send>>;

/// One wire protocol (OpenAI Chat Completions, Anthropic Messages).
pub trait Provider: Send + Sync + 'static {
    fn kind(&self) -> ProviderKind;

    /// Starts a streaming completion. Never panics and never returns early: every failure,
    /// including connect errors and non-2xx answers, arrives as a terminal
    /// [`ProviderEvent::Error`].
    fn stream(&self, request: ChatRequest) -> EventStream;
}

pub type SharedProvider = Arc<dyn Provider>;

/// What a caller asks of a model, in provider-neutral form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The provider's model id (a catalog id).
    pub model: String,
    /// System instructions. OpenAI gets them as a `system` message, Anthropic as top-level
    /// `system`.
    pub system: Option<String>,
    pub messages: Vec<ChatMessage>,
    /// Upper bound on generated tokens (`max_completion_tokens` / `max_tokens`).
    pub max_output_tokens: u32,
    pub temperature: Option<f32>,
    /// When set, the model must answer with JSON matching this schema: OpenAI gets
    /// `response_format: json_schema`, Anthropic a forced tool whose `input_schema` it is (the
    /// tool input JSON is streamed as ordinary `Delta` text).
    pub response_schema: Option<ResponseSchema>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// A JSON schema the answer must follow. `name` matches `^[a-zA-Z0-9_-]{1,64}$` (OpenAI's rule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseSchema {
    pub name: String,
    pub schema: serde_json::Value,
}

/// An API key. Its `Debug` never shows the value, so it cannot leak through logs or errors.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// Where and how to reach one provider.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Base URL including the version prefix, e.g. `https://api.openai.com/v1` or
    /// `http://127.0.0.1:4010/v1`.
    pub base_url: String,
    pub api_key: ApiKey,
    /// TCP connect timeout. Time-to-first-token and stall deadlines belong to the router.
    pub connect_timeout: Duration,
}

/// Why a provider client could not be built from its [`ProviderConfig`]. Raised once at start-up,
/// never per request.
#[derive(Debug, thiserror::Error)]
pub enum ProviderInitError {
    #[error(
        "{provider} base URL {url:?} is invalid: {reason}; give an absolute http(s) URL including the version prefix, e.g. https://api.openai.com/v1"
    )]
    InvalidBaseUrl {
        provider: ProviderKind,
        url: String,
        reason: String,
    },
    #[error(
        "{provider} API key cannot be sent as an HTTP header (it contains control or non-ASCII characters); check the key for stray whitespace or quotes"
    )]
    InvalidApiKey { provider: ProviderKind },
    #[error("could not build the HTTP client for {provider}: {message}")]
    HttpClient {
        provider: ProviderKind,
        message: String,
    },
}

/// Checks that `base_url` is an absolute http(s) URL and returns it without a trailing slash, so
/// `{base}/chat/completions` and `{base}/messages` never contain `//`.
pub(crate) fn validate_base_url(
    provider: ProviderKind,
    base_url: &str,
) -> Result<String, ProviderInitError> {
    let invalid = |reason: String| ProviderInitError::InvalidBaseUrl {
        provider,
        url: base_url.to_owned(),
        reason,
    };
    let parsed = reqwest::Url::parse(base_url.trim()).map_err(|e| invalid(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "scheme {:?} is not http or https",
            parsed.scheme()
        )));
    }
    if parsed.host_str().is_none() {
        return Err(invalid("it has no host".to_owned()));
    }
    Ok(base_url.trim().trim_end_matches('/').to_owned())
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

/// Longest provider-supplied text (error bodies, undecodable data) quoted in an error.
const MAX_DETAIL_CHARS: usize = 512;

/// reqwest's `Display` hides the cause ("error sending request"); the chain says what failed
/// (connection refused, DNS, TLS).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Keeps quoted provider text to [`MAX_DETAIL_CHARS`] characters.
pub(crate) fn truncate(text: &str) -> String {
    match text.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
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

    #[test]
    fn api_key_debug_is_redacted() {
        assert_eq!(format!("{:?}", ApiKey::new("sk-secret")), "ApiKey(***)");
    }
}
