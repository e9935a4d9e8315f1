//! OpenAI Chat Completions streaming provider, built on `async-openai` with its retries disabled.
//!
//! The SDK builds and sends the request and decodes error answers; this file builds the request,
//! installs a small tower service under the SDK (to own the transport, see the headers of error
//! answers and keep the body of a successful one), decodes that body inline — `eventsource-stream`
//! framing and the SDK's chunk type, noticing the `data: [DONE]` terminator on the way — and turns
//! the chunks into [`ProviderEvent`]s with [`adapt_chunks`].
//!
//! Why the body is not left to the SDK: `create_stream` reads it in a task of its own and hands
//! every chunk over an unbounded channel, one more task wake-up and hand-off per chunk, and a task
//! per stream outside our ownership. Decoding in the caller's stream keeps the relay to the tasks
//! hyper needs. The transport does not even hand the SDK an empty stand-in: it ends the SDK's call
//! with a private `BodyKept` error, since a response of any kind costs that task and channel.
//!
//! Known SDK limits: `FinishReason` and the delta `Role` are closed enums in `async-openai`, so a
//! value OpenAI (or a compatible server) adds later — e.g. role `developer` — fails decoding the
//! whole chunk and surfaces here as [`ProviderError::Malformed`] rather than being ignored.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::{OpenAIError, StreamError};
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CompletionUsage, CreateChatCompletionRequest,
    CreateChatCompletionStreamResponse, FinishReason as WireFinishReason, ResponseFormat,
    ResponseFormatJsonSchema,
};
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use reqwest::header::HeaderMap;
use serde::Deserialize;

use super::{
    ApiKey, ChatRequest, EventStream, Provider, ProviderConfig, ProviderError, ProviderInitError,
    Role, error_chain, parse_retry_after, truncate, validate_base_url,
};
use crate::stream::{FinishReason, ProviderEvent, ProviderKind, Usage};

// ---------------------------------------------------------------------------------------------
// Constants

const KIND: ProviderKind = ProviderKind::OpenAi;
/// The request id OpenAI returns on every answer; quoted in errors for support tickets.
const REQUEST_ID_HEADER: &str = "x-request-id";

// ---------------------------------------------------------------------------------------------
// Credentials

/// The SDK config for one provider. Organisation and project are set empty on purpose:
/// `OpenAIConfig::default()` would otherwise read `OPENAI_ORG_ID` / `OPENAI_PROJECT_ID` from the
/// process environment behind our back, while all configuration goes through `config::Env`.
fn sdk_config(base_url: &str, api_key: &ApiKey) -> OpenAIConfig {
    OpenAIConfig::new()
        .with_api_base(base_url)
        .with_api_key(api_key.expose())
        .with_org_id("")
        .with_project_id("")
}

// ---------------------------------------------------------------------------------------------
// Provider

/// Streams chat completions from OpenAI (or any server speaking its Chat Completions protocol).
#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    config: OpenAIConfig,
    http: reqwest::Client,
    /// `{base}/chat/completions`, for error messages.
    endpoint: String,
}

impl OpenAiProvider {
    /// Builds the client once; every [`Provider::stream`] call reuses its connection pool.
    pub fn new(config: &ProviderConfig) -> Result<Self, ProviderInitError> {
        let base_url = validate_base_url(KIND, &config.base_url)?;
        // The SDK formats `Bearer {key}` into a header with `unwrap()`: reject a key it would
        // panic on here, at start-up, instead.
        if reqwest::header::HeaderValue::from_str(&format!("Bearer {}", config.api_key.expose()))
            .is_err()
        {
            return Err(ProviderInitError::InvalidApiKey { provider: KIND });
        }
        // No overall timeout: a long generation is legitimate, and the router owns the
        // time-to-first-token and stall deadlines. Only connecting is bounded here.
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(|e| ProviderInitError::HttpClient {
                provider: KIND,
                message: e.to_string(),
            })?;
        Ok(Self {
            config: sdk_config(&base_url, &config.api_key),
            endpoint: format!("{base_url}/chat/completions"),
            http,
        })
    }

    /// An SDK client for one attempt, executing through [`AttemptService`].
    ///
    /// Why our own service: since 0.37 `Client::with_config`/`with_http_client` install a
    /// `ReqwestExecutor` that always wraps the transport in `OpenAIRetryLayer::default()`
    /// (3 retries on 429/5xx/connect errors, sleeping up to 8 s or `retry-after`). The router owns
    /// retry and fallback policy and must see every failure at once, so we replace the whole
    /// executor with `with_http_service` (feature `middleware`), which uses exactly the tower
    /// service it is given and nothing else: one HTTP request per attempt. `Client::build` is used
    /// rather than `with_config` because the latter builds a fresh default `reqwest::Client`
    /// (TLS roots and all) on every call; the SDK builds its requests with the client given here.
    ///
    /// The service is per attempt because it also records what the SDK does not expose: the
    /// status and `retry-after`/`x-request-id` headers of the answer, and it keeps the body of a
    /// successful answer for [`sse_chunks`].
    fn attempt_client(&self, wire: Arc<AttemptWire>) -> Client<OpenAIConfig> {
        Client::build(self.http.clone(), self.config.clone()).with_http_service(AttemptService {
            http: self.http.clone(),
            wire,
        })
    }
}

impl OpenAiProvider {
    /// Sends the request through the SDK; the successful answer, whose body is still unread.
    fn open(
        &self,
        request: &ChatRequest,
    ) -> impl Future<Output = Result<reqwest::Response, ProviderError>> + Send + 'static {
        let wire = Arc::new(AttemptWire::default());
        let client = self.attempt_client(Arc::clone(&wire));
        let endpoint = self.endpoint.clone();
        let body = wire_request(request);
        async move {
            let setup = client.chat().create_stream(body).await;
            // A successful answer's body was kept by the transport, which then ended the SDK's
            // call with `BodyKept`; anything else the SDK returns is the call's error.
            match (wire.take_body(), setup) {
                (Some(response), _) => Ok(response),
                (None, Err(err)) => {
                    let err = setup_error(err, wire.answer.get(), &endpoint);
                    tracing::debug!(error = %err, "openai stream setup failed");
                    Err(err)
                }
                (None, Ok(_)) => Err(ProviderError::Transport {
                    provider: KIND,
                    message: "the answer's body was not kept by the transport; this is a bug"
                        .into(),
                }),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Trait impl

impl Provider for OpenAiProvider {
    fn kind(&self) -> ProviderKind {
        KIND
    }

    fn stream(&self, request: ChatRequest) -> EventStream {
        let model = request.model.clone();
        // Boxed apart from the stream: the SDK's call is several KiB of future state that would
        // otherwise stay allocated inside every open stream long after the answer's headers.
        let setup = Box::pin(self.open(&request));
        Box::pin(async_stream::stream! {
            let response = match setup.await {
                Ok(response) => response,
                Err(err) => {
                    yield ProviderEvent::Error(err);
                    return;
                }
            };
            yield ProviderEvent::Start { provider: KIND, model };
            let saw_done = Arc::new(AtomicBool::new(false));
            let chunks = sse_chunks(response.bytes_stream(), Arc::clone(&saw_done));
            let events = adapt_chunks(chunks, move || saw_done.load(Ordering::Acquire));
            futures::pin_mut!(events);
            while let Some(event) = events.next().await {
                yield event;
            }
        })
    }
}

/// The request body. `stream` itself is forced to `true` by `create_stream`.
fn wire_request(request: &ChatRequest) -> CreateChatCompletionRequest {
    let mut messages: Vec<ChatCompletionRequestMessage> =
        Vec::with_capacity(request.messages.len() + 1);
    if let Some(system) = &request.system {
        messages.push(ChatCompletionRequestSystemMessage::from(system.as_str()).into());
    }
    for message in &request.messages {
        messages.push(match message.role {
            Role::User => ChatCompletionRequestUserMessage::from(message.content.as_str()).into(),
            Role::Assistant => {
                ChatCompletionRequestAssistantMessage::from(message.content.as_str()).into()
            }
        });
    }
    CreateChatCompletionRequest {
        model: request.model.clone(),
        messages,
        stream: Some(true),
        // Without this OpenAI never reports usage on a stream, and cost would be a guess.
        stream_options: Some(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        }),
        // `max_tokens` is deprecated and refused by reasoning models.
        max_completion_tokens: Some(request.max_output_tokens),
        temperature: request.temperature,
        response_format: request.response_schema.as_ref().map(|schema| {
            ResponseFormat::JsonSchema {
                json_schema: ResponseFormatJsonSchema {
                    description: None,
                    name: schema.name.clone(),
                    schema: schema.schema.clone(),
                    strict: Some(true),
                },
            }
        }),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Transport: the tower service the SDK executes through

/// What one attempt learned at the HTTP level that the SDK does not pass on.
#[derive(Debug, Default)]
struct AttemptWire {
    /// Status and headers of the answer; set once (there is exactly one request per attempt).
    answer: OnceLock<AnswerMeta>,
    /// The successful answer, kept from the SDK and decoded by [`sse_chunks`] in the caller's
    /// stream.
    body: Mutex<Option<reqwest::Response>>,
}

impl AttemptWire {
    fn take_body(&self) -> Option<reqwest::Response> {
        self.body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

#[derive(Debug, Clone)]
struct AnswerMeta {
    status: u16,
    retry_after: Option<Duration>,
    request_id: Option<String>,
}

impl AnswerMeta {
    fn from_headers(status: u16, headers: &HeaderMap) -> Self {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Self {
            status,
            retry_after: parse_retry_after(header("retry-after-ms"), header("retry-after")),
            request_id: header(REQUEST_ID_HEADER).map(str::to_owned),
        }
    }
}

/// Sends the SDK's request once with our client; records the answer's metadata and keeps a
/// successful answer's body, ending the SDK's call with [`BodyKept`]. Never retries.
#[derive(Clone)]
struct AttemptService {
    http: reqwest::Client,
    wire: Arc<AttemptWire>,
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

impl tower::Service<HttpRequestFactory> for AttemptService {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = ServiceFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> Self::Future {
        let http = self.http.clone();
        let wire = Arc::clone(&self.wire);
        Box::pin(async move {
            let request = factory.build().await?;
            let response = http.execute(request).await.map_err(OpenAIError::Reqwest)?;
            let status = response.status();
            let _ = wire.answer.set(AnswerMeta::from_headers(
                status.as_u16(),
                response.headers(),
            ));
            if !status.is_success() {
                // The SDK reads and decodes the error body itself.
                return Ok(response);
            }
            *wire.body.lock().unwrap_or_else(PoisonError::into_inner) = Some(response);
            Err(OpenAIError::Boxed(Box::new(BodyKept)))
        })
    }
}

/// Ends the SDK's call once the transport kept a successful answer's body: handed a response,
/// `create_stream` would spawn a task and a channel to read it (see the module doc), even an
/// empty one, on every request.
#[derive(Debug, thiserror::Error)]
#[error("the answer's body is read by the provider, not the SDK")]
struct BodyKept;

/// A successful answer's bytes as the SDK's chunks, decoded the way `async-openai` does it
/// (`eventsource-stream` framing; `[DONE]` ends the stream, `keepalive` events are skipped, each
/// other event is one JSON chunk), without its task and channel. Sets `saw_done` when the
/// terminator line arrives.
pub(crate) fn sse_chunks<S, B, E>(
    bytes: S,
    saw_done: Arc<AtomicBool>,
) -> impl Stream<Item = Result<CreateChatCompletionStreamResponse, OpenAIError>> + Send
where
    S: Stream<Item = Result<B, E>> + Send,
    B: AsRef<[u8]> + Send,
    E: std::fmt::Display + Send,
{
    let mut scanner = DoneScanner::default();
    let tapped = bytes.map(move |piece| {
        if let Ok(piece) = &piece
            && scanner.feed(piece.as_ref())
        {
            saw_done.store(true, Ordering::Release);
        }
        piece
    });
    tapped
        .eventsource()
        .take_while(|event| {
            let more = !matches!(event, Ok(e) if e.data == "[DONE]");
            futures::future::ready(more)
        })
        .filter(|event| futures::future::ready(!matches!(event, Ok(e) if e.event == "keepalive")))
        .map(|event| match event {
            Ok(event) => serde_json::from_str::<CreateChatCompletionStreamResponse>(&event.data)
                .map_err(|e| OpenAIError::JSONDeserialize(e, event.data)),
            Err(e) => Err(OpenAIError::StreamError(Box::new(
                StreamError::EventStream(e.to_string()),
            ))),
        })
}

/// Finds a `data: [DONE]` (or `data:[DONE]`) line in an SSE byte stream fed in arbitrary pieces.
/// JSON payloads cannot contain a raw line break, so such a line is always the real terminator,
/// never model text.
#[derive(Debug, Default)]
pub(crate) struct DoneScanner {
    /// The start of the current line; longer lines are only marked as too long.
    line: Vec<u8>,
    too_long: bool,
}

impl DoneScanner {
    const LONGEST: usize = b"data: [DONE]".len();

    /// Feeds bytes; true once a complete terminator line has been seen in them.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut found = false;
        for &byte in bytes {
            if byte == b'\n' || byte == b'\r' {
                found |=
                    !self.too_long && (self.line == b"data: [DONE]" || self.line == b"data:[DONE]");
                self.line.clear();
                self.too_long = false;
            } else if self.line.len() < Self::LONGEST {
                self.line.push(byte);
            } else {
                self.too_long = true;
            }
        }
        found
    }
}

// ---------------------------------------------------------------------------------------------
// Wire structs

/// A mid-stream error payload: `{"error": {"message", "type", "code", ...}}`.
#[derive(Debug, Deserialize)]
struct WireErrorEnvelope {
    error: WireErrorBody,
}

#[derive(Debug, Deserialize)]
struct WireErrorBody {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    error_type: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

// ---------------------------------------------------------------------------------------------
// SSE-to-event adapter

/// Turns the SDK's decoded chunk stream (after `Start`) into `Delta`* · `Usage`? · `Done`|`Error`.
///
/// `saw_done` says whether the `[DONE]` terminator arrived; it is asked only after the chunk
/// stream ended. A normal end needs both a finish reason and `[DONE]`; anything less is
/// [`ProviderError::Truncated`]. The first error ends the stream (the SDK stream is dropped).
/// If the usage chunk already arrived before a failure, it is emitted just before the `Error`.
pub(crate) fn adapt_chunks<S, F>(chunks: S, saw_done: F) -> impl Stream<Item = ProviderEvent>
where
    S: Stream<Item = Result<CreateChatCompletionStreamResponse, OpenAIError>> + Send,
    F: Fn() -> bool + Send,
{
    async_stream::stream! {
        futures::pin_mut!(chunks);
        let mut usage: Option<Usage> = None;
        let mut finish: Option<FinishReason> = None;
        let mut refused = false;
        while let Some(item) = chunks.next().await {
            let chunk = match item {
                Ok(chunk) => chunk,
                Err(err) => {
                    if let Some(usage) = usage {
                        yield ProviderEvent::Usage(usage);
                    }
                    yield ProviderEvent::Error(stream_error(err));
                    return;
                }
            };
            if let Some(wire_usage) = &chunk.usage {
                usage = Some(usage_from_wire(wire_usage));
            }
            // We never ask for `n > 1`; other indexes would be another answer.
            for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
                if let Some(text) = choice.delta.content
                    && !text.is_empty()
                {
                    yield ProviderEvent::Delta(text);
                }
                if choice.delta.refusal.is_some_and(|r| !r.is_empty()) {
                    refused = true;
                }
                if let Some(reason) = choice.finish_reason {
                    finish = Some(finish_reason(reason));
                }
            }
        }
        let detail = match (&finish, saw_done()) {
            (Some(_), true) => None,
            (Some(_), false) => Some("the body ended after the finish reason but without data: [DONE]"),
            (None, true) => Some("data: [DONE] arrived without a finish reason"),
            (None, false) => Some("the body ended without a finish reason or data: [DONE]"),
        };
        if let Some(usage) = usage {
            yield ProviderEvent::Usage(usage);
        }
        match (finish, detail) {
            (Some(reason), None) => {
                if usage.is_none() {
                    tracing::warn!("openai stream completed without a usage chunk; cost will be estimated");
                }
                // A refusal streams in `delta.refusal` with finish reason `stop`; callers must
                // not take the (empty) content for an answer.
                let finish_reason = if refused { FinishReason::ContentFilter } else { reason };
                yield ProviderEvent::Done { finish_reason };
            }
            (_, detail) => {
                yield ProviderEvent::Error(ProviderError::Truncated {
                    provider: KIND,
                    detail: detail.unwrap_or("incomplete stream").to_owned(),
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions

fn usage_from_wire(usage: &CompletionUsage) -> Usage {
    // OpenAI counts cached tokens inside `prompt_tokens`: that is already our `input`.
    let details = usage.prompt_tokens_details.as_ref();
    Usage {
        input: u64::from(usage.prompt_tokens),
        cached_input: details
            .and_then(|d| d.cached_tokens)
            .map(u64::from)
            .unwrap_or(0),
        cache_write: details
            .and_then(|d| d.cache_write_tokens)
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0),
        output: u64::from(usage.completion_tokens),
    }
}

fn finish_reason(reason: WireFinishReason) -> FinishReason {
    match reason {
        WireFinishReason::Stop => FinishReason::Stop,
        WireFinishReason::Length => FinishReason::Length,
        WireFinishReason::ToolCalls | WireFinishReason::FunctionCall => FinishReason::ToolCalls,
        WireFinishReason::ContentFilter => FinishReason::ContentFilter,
    }
}

/// An error from `create_stream`, i.e. before any byte of the stream was read.
fn setup_error(err: OpenAIError, answer: Option<&AnswerMeta>, endpoint: &str) -> ProviderError {
    let http = |status: u16, error_type: Option<String>, code: Option<String>, message: String| {
        ProviderError::Http {
            provider: KIND,
            status,
            error_type,
            code,
            message,
            retry_after: answer.and_then(|a| a.retry_after),
            request_id: answer.and_then(|a| a.request_id.clone()),
        }
    };
    match err {
        OpenAIError::ApiError(api) => http(
            api.status_code.as_u16(),
            api.api_error.r#type,
            api.api_error.code,
            api.api_error.message,
        ),
        // A non-2xx answer whose body is not the usual `{"error": …}` JSON.
        OpenAIError::JSONDeserialize(_, raw) if answer.is_some_and(|a| a.status >= 300) => {
            http(answer.map_or(0, |a| a.status), None, None, truncate(&raw))
        }
        OpenAIError::Reqwest(e) if answer.is_some() => http(
            answer.map_or(0, |a| a.status),
            None,
            None,
            format!("the error body could not be read: {e}"),
        ),
        OpenAIError::Reqwest(e) if e.is_connect() || e.is_timeout() || e.is_request() => {
            ProviderError::Connect {
                provider: KIND,
                url: endpoint.to_owned(),
                message: error_chain(&e),
            }
        }
        OpenAIError::Reqwest(e) => ProviderError::Transport {
            provider: KIND,
            message: error_chain(&e),
        },
        other => stream_error(other),
    }
}

/// An error read from the chunk stream after `Start`.
fn stream_error(err: OpenAIError) -> ProviderError {
    match err {
        // A mid-stream `data: {"error": …}` does not decode as a chunk: recognise it from the raw
        // payload, as openai-python does, and classify it by its `type`.
        OpenAIError::JSONDeserialize(decode_err, raw) => {
            match serde_json::from_str::<WireErrorEnvelope>(&raw) {
                Ok(WireErrorEnvelope { error }) => ProviderError::InStream {
                    provider: KIND,
                    error_type: error
                        .error_type
                        .or_else(|| error.code.as_ref().and_then(code_string))
                        .unwrap_or_else(|| "unknown".to_owned()),
                    message: error.message.unwrap_or_default(),
                },
                Err(_) => ProviderError::Malformed {
                    provider: KIND,
                    detail: format!("{decode_err} in {}", truncate(&raw)),
                },
            }
        }
        OpenAIError::StreamError(e) => ProviderError::Transport {
            provider: KIND,
            message: e.to_string(),
        },
        OpenAIError::Reqwest(e) => ProviderError::Transport {
            provider: KIND,
            message: error_chain(&e),
        },
        OpenAIError::ApiError(api) => ProviderError::InStream {
            provider: KIND,
            error_type: api.api_error.r#type.unwrap_or_else(|| "unknown".to_owned()),
            message: api.api_error.message,
        },
        other => ProviderError::Malformed {
            provider: KIND,
            detail: other.to_string(),
        },
    }
}

fn code_string(code: &serde_json::Value) -> Option<String> {
    match code {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{ChatMessage, ResponseSchema};

    /// Decodes `data:` payloads the way the SDK does (one JSON chunk each); `[DONE]` is not
    /// passed (the SDK swallows it) and becomes the `saw_done` flag instead.
    fn sdk_items(
        payloads: &[&str],
    ) -> Vec<Result<CreateChatCompletionStreamResponse, OpenAIError>> {
        payloads
            .iter()
            .map(|p| {
                serde_json::from_str(p)
                    .map_err(|e| OpenAIError::JSONDeserialize(e, (*p).to_owned()))
            })
            .collect()
    }

    async fn run(
        items: Vec<Result<CreateChatCompletionStreamResponse, OpenAIError>>,
        done: bool,
    ) -> Vec<ProviderEvent> {
        adapt_chunks(futures::stream::iter(items), move || done)
            .collect()
            .await
    }

    const ROLE: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1760000000,"model":"gpt-5.4-mini","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null,"obfuscation":"xyz"}"#;
    const HEL: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1760000000,"model":"gpt-5.4-mini","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}],"usage":null}"#;
    const LO: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1760000000,"model":"gpt-5.4-mini","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}],"usage":null}"#;
    const STOP: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1760000000,"model":"gpt-5.4-mini","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#;
    const USAGE: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1760000000,"model":"gpt-5.4-mini","choices":[],"usage":{"prompt_tokens":2100,"completion_tokens":3,"total_tokens":2103,"prompt_tokens_details":{"cached_tokens":2048,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#;

    fn texts(events: &[ProviderEvent]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::Delta(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn normal_stream_counts_cached_tokens_inside_prompt_tokens() {
        let events = run(sdk_items(&[ROLE, HEL, LO, STOP, USAGE]), true).await;
        assert_eq!(texts(&events), "Hello");
        // The empty role delta yields no event.
        assert!(matches!(&events[0], ProviderEvent::Delta(t) if t == "Hel"));
        let n = events.len();
        assert!(matches!(
            events[n - 2],
            ProviderEvent::Usage(Usage {
                input: 2100,
                cached_input: 2048,
                cache_write: 0,
                output: 3
            })
        ));
        assert!(matches!(
            &events[n - 1],
            ProviderEvent::Done {
                finish_reason: FinishReason::Stop
            }
        ));
        let usage = match events[n - 2] {
            ProviderEvent::Usage(u) => u,
            _ => unreachable!(),
        };
        assert_eq!(usage.uncached_input(), 52);
    }

    #[tokio::test]
    async fn cache_write_tokens_are_read_when_present() {
        let usage = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":500,"completion_tokens":7,"total_tokens":507,"prompt_tokens_details":{"cached_tokens":100,"cache_write_tokens":300}}}"#;
        let events = run(sdk_items(&[HEL, STOP, usage]), true).await;
        assert!(events.iter().any(|e| matches!(
            e,
            ProviderEvent::Usage(Usage {
                input: 500,
                cached_input: 100,
                cache_write: 300,
                output: 7
            })
        )));
    }

    #[tokio::test]
    async fn json_mode_stream_passes_content_through_and_maps_length() {
        let a = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"{\"text\":"},"finish_reason":null}]}"#;
        let b = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"\"hi\"}"},"finish_reason":"length"}]}"#;
        let events = run(sdk_items(&[a, b, USAGE]), true).await;
        assert_eq!(texts(&events), r#"{"text":"hi"}"#);
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                finish_reason: FinishReason::Length
            })
        ));
    }

    #[tokio::test]
    async fn mid_stream_error_object_becomes_in_stream_error_and_stops() {
        let err = r#"{"error":{"message":"The server had an error","type":"server_error","param":null,"code":null}}"#;
        let events = run(sdk_items(&[HEL, err, LO, STOP, USAGE]), true).await;
        assert_eq!(events.len(), 2, "{events:?}");
        match &events[1] {
            ProviderEvent::Error(e @ ProviderError::InStream { error_type, .. }) => {
                assert_eq!(error_type, "server_error");
                assert!(e.is_retryable());
            }
            other => panic!("expected InStream, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn undecodable_chunk_is_malformed_including_unknown_finish_reasons() {
        let new_reason = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"brand_new"}]}"#;
        let events = run(sdk_items(&[HEL, new_reason]), true).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Malformed { .. }))
        ));
    }

    #[tokio::test]
    async fn stream_without_finish_or_done_is_truncated() {
        let events = run(sdk_items(&[ROLE, HEL]), false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Truncated { .. }))
        ));
        // A finish reason alone is not enough: the body must also reach `[DONE]`.
        let events = run(sdk_items(&[HEL, STOP]), false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Truncated { .. }))
        ));
    }

    #[tokio::test]
    async fn usage_seen_before_a_failure_is_emitted_before_the_error() {
        let events = run(sdk_items(&[HEL, STOP, USAGE]), false).await;
        let n = events.len();
        assert!(matches!(events[n - 2], ProviderEvent::Usage(u) if u.input == 2100));
        assert!(matches!(
            events[n - 1],
            ProviderEvent::Error(ProviderError::Truncated { .. })
        ));
    }

    #[tokio::test]
    async fn transport_error_mid_stream_is_transport() {
        let mut items = sdk_items(&[HEL]);
        items.push(Err(OpenAIError::StreamError(Box::new(
            async_openai::error::StreamError::EventStream("connection reset".into()),
        ))));
        let events = run(items, false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Transport { .. }))
        ));
    }

    #[tokio::test]
    async fn refusal_finishes_as_content_filter() {
        let refusal = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"refusal":"I can't help with that."},"finish_reason":null}]}"#;
        let events = run(sdk_items(&[refusal, STOP, USAGE]), true).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                finish_reason: FinishReason::ContentFilter
            })
        ));
    }

    #[test]
    fn done_scanner_finds_the_terminator_across_chunk_borders_only_on_its_own_line() {
        let mut s = DoneScanner::default();
        assert!(!s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"data: [DONE]\"}}]}\n\n"));
        assert!(!s.feed(b"data: [DO"));
        assert!(s.feed(b"NE]\n\n"));
        let mut s = DoneScanner::default();
        assert!(s.feed(b"data:[DONE]\r\n"));
        let mut s = DoneScanner::default();
        assert!(!s.feed(b"data: [DONE]x\n"));
    }

    #[test]
    fn request_sets_usage_limits_schema_and_system_first() {
        let request = ChatRequest {
            model: "gpt-5.4-mini".into(),
            system: Some("Be brief.".into()),
            messages: vec![ChatMessage::user("Hi"), ChatMessage::assistant("Hello")],
            max_output_tokens: 256,
            temperature: Some(0.5),
            response_schema: Some(ResponseSchema {
                name: "answer".into(),
                schema: serde_json::json!({"type": "object"}),
            }),
        };
        let body = serde_json::to_value(wire_request(&request)).unwrap();
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["max_completion_tokens"], 256);
        assert_eq!(body["temperature"], 0.5);
        assert!(body.get("max_tokens").is_none());
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][1]["role"], "user");
        assert_eq!(body["messages"][2]["role"], "assistant");
        assert_eq!(body["response_format"]["type"], "json_schema");
        assert_eq!(body["response_format"]["json_schema"]["name"], "answer");
        assert_eq!(body["response_format"]["json_schema"]["strict"], true);
    }

    #[test]
    fn init_rejects_bad_urls_and_keys() {
        let config = |url: &str, key: &str| ProviderConfig {
            base_url: url.into(),
            api_key: ApiKey::new(key),
            connect_timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            OpenAiProvider::new(&config("not a url", "k")),
            Err(ProviderInitError::InvalidBaseUrl { .. })
        ));
        assert!(matches!(
            OpenAiProvider::new(&config("ftp://x/v1", "k")),
            Err(ProviderInitError::InvalidBaseUrl { .. })
        ));
        assert!(matches!(
            OpenAiProvider::new(&config("http://127.0.0.1:1/v1", "bad\nkey")),
            Err(ProviderInitError::InvalidApiKey { .. })
        ));
        let ok = OpenAiProvider::new(&config("http://127.0.0.1:1/v1/", "k")).unwrap();
        assert_eq!(ok.endpoint, "http://127.0.0.1:1/v1/chat/completions");
    }
}
