//! The provider boundary: one trait, one file per wire protocol.
//!
//! A provider turns a [`ChatRequest`] into a stream of [`ProviderEvent`]s over HTTP. It knows
//! nothing of routing, retries, cost or metrics: those live above it (`router`, `cost`,
//! `metrics`). Adding a provider is a file, a `mod` line and a [`ProviderKind`] variant.

pub mod anthropic;
pub mod anthropic_version;
pub mod openai;
pub(crate) mod openai_answer;
pub(crate) mod sse_frames;
#[cfg(test)]
mod stream_properties;

pub use sse_frames::DEFAULT_MAX_EVENT_BYTES;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde::{Deserialize, Serialize};

pub use crate::stream::{ProviderError, parse_retry_after};
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
    /// Sent where the wire has it: Anthropic's API version 2026-10-21 has no sampling parameters,
    /// so a request on that version goes out without it.
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
    /// TCP connect timeout. Header, first-token, stall and total deadlines belong to the router.
    pub connect_timeout: Duration,
    /// Longest SSE line or event the provider buffers ([`DEFAULT_MAX_EVENT_BYTES`]); past it
    /// the stream ends with [`ProviderError::Oversized`].
    pub max_event_bytes: usize,
}

impl ProviderConfig {
    /// A provider at `base_url` with the default connect timeout (5 s) and event cap.
    pub fn new(base_url: impl Into<String>, api_key: ApiKey) -> Self {
        Self {
            base_url: base_url.into(),
            api_key,
            connect_timeout: Duration::from_secs(5),
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

/// Longest error body read from a provider; the rest is not read (the connection is dropped).
/// Real error bodies are a few hundred bytes.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// How long a complete answer (finish reason and usage seen) may wait for its terminator
/// (`data: [DONE]`, `message_stop`) before it is accepted without one. Real providers send the
/// terminator right behind the usage, usually in the same packet.
pub const TERMINATOR_GRACE: Duration = Duration::from_millis(250);

/// The next item of a stream whose answer is complete but for its terminator: taken at once if
/// it is already there (the usual case, which needs no timer), else awaited for at most
/// [`TERMINATOR_GRACE`]; `None` when it does not come in time.
pub(crate) async fn within_grace<F, T>(next: F) -> Option<T>
where
    F: Future<Output = Option<T>>,
{
    let mut next = std::pin::pin!(next);
    if let std::task::Poll::Ready(item) = futures::poll!(next.as_mut()) {
        return item;
    }
    tokio::time::timeout(TERMINATOR_GRACE, next)
        .await
        .unwrap_or(None)
}

/// Reads at most [`MAX_ERROR_BODY_BYTES`] of an error answer's body; the flag says whether
/// there was more. Read errors end the body where they happen (what was read is kept).
pub(crate) async fn read_error_body(mut response: reqwest::Response) -> (String, bool) {
    let mut body: Vec<u8> = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_ERROR_BODY_BYTES - body.len();
                if chunk.len() > room {
                    body.extend_from_slice(&chunk[..room]);
                    return (String::from_utf8_lossy(&body).into_owned(), true);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                if body.is_empty() {
                    return (format!("(the error body could not be read: {e})"), false);
                }
                break;
            }
        }
    }
    (String::from_utf8_lossy(&body).into_owned(), false)
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
    crate::text::ellipsized(text, MAX_DETAIL_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_debug_is_redacted() {
        assert_eq!(format!("{:?}", ApiKey::new("sk-secret")), "ApiKey(***)");
    }
}
