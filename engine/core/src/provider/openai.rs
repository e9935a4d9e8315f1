//! OpenAI Chat Completions streaming provider, built on `async-openai` with its retries disabled.
//!
//! The SDK builds and sends the request and decodes error answers; this file builds the request,
//! installs a small tower service under the SDK (to own the transport, see the headers of error
//! answers and keep the body of a successful one) and reads one chunk into borrowed wire structs
//! (`decode_chunk`). `openai_answer.rs` decodes the body inline — our own SSE framing
//! (`sse_frames.rs`), the `data: [DONE]` terminator noticed on the way, one chunk per event — and
//! turns the chunks into [`ProviderEvent`](crate::stream::ProviderEvent)s.
//!
//! Why the body is not left to the SDK: `create_stream` reads it in a task of its own and hands
//! every chunk over an unbounded channel, one more task wake-up and hand-off per chunk, and a task
//! per stream outside our ownership. Decoding in the caller's stream keeps the relay to the tasks
//! hyper needs. The transport does not even hand the SDK an empty stand-in: it ends the SDK's call
//! with a private `BodyKept` error, since a response of any kind costs that task and channel.
//!
//! Why not the SDK's chunk type either: it owns every field of every chunk (id, model,
//! fingerprint, role… a handful of allocations per chunk to read one piece of text), and its
//! closed enums (`FinishReason`, `Role`) fail the whole chunk on a value a compatible server adds
//! later. The wire structs here read only what the engine uses, borrow the text unless it has
//! escapes, and keep an unknown finish reason verbatim.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CreateChatCompletionRequest, ResponseFormat,
    ResponseFormatJsonSchema,
};
use reqwest::header::HeaderMap;
use serde::Deserialize;

use super::openai_answer::OpenAiAnswer;
use super::{
    ApiKey, ChatRequest, EventStream, MAX_ERROR_BODY_BYTES, Provider, ProviderConfig,
    ProviderError, ProviderInitError, Role, error_chain, parse_retry_after, read_error_body,
    truncate, validate_base_url,
};
use crate::stream::{FinishReason, ProviderKind, Usage};

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
    max_event_bytes: usize,
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
            max_event_bytes: config.max_event_bytes,
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
    /// successful answer for `openai_answer::sse_chunks`.
    fn attempt_client(
        &self,
        wire: Arc<AttemptWire>,
        traceparent: Option<String>,
    ) -> Client<OpenAIConfig> {
        Client::build(self.http.clone(), self.config.clone()).with_http_service(AttemptService {
            http: self.http.clone(),
            wire,
            traceparent,
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
        // Taken now, while the attempt's span is current; the request is built later.
        let traceparent = crate::trace_context::current_traceparent();
        let client = self.attempt_client(Arc::clone(&wire), traceparent);
        let endpoint = self.endpoint.clone();
        let body = wire_request(request);
        async move {
            let setup = client.chat().create_stream(body).await;
            // A successful answer's body was kept by the transport, which then ended the SDK's
            // call with `BodyKept`; anything else the SDK returns is the call's error.
            match (wire.take_body(), setup) {
                (Some(response), _) => Ok(response),
                (None, Err(err)) => {
                    let cut = wire.error_body_cut.load(Ordering::Relaxed);
                    let err = setup_error(err, wire.answer.get(), cut, &endpoint);
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
        let setup = self.open(&request);
        Box::pin(OpenAiAnswer::new(
            setup,
            request.model,
            self.max_event_bytes,
        ))
    }
}

/// The request body. `stream` itself is forced to `true` by `create_stream`.
pub(crate) fn wire_request(request: &ChatRequest) -> CreateChatCompletionRequest {
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
    /// The successful answer, kept from the SDK and decoded by `openai_answer::sse_chunks` in
    /// the caller's stream.
    body: Mutex<Option<reqwest::Response>>,
    /// An error body was longer than [`MAX_ERROR_BODY_BYTES`] and was cut.
    error_body_cut: AtomicBool,
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
    /// The attempt span's W3C trace context, sent with the request when spans are exported.
    traceparent: Option<String>,
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
        let traceparent = self
            .traceparent
            .as_deref()
            .and_then(|v| reqwest::header::HeaderValue::from_str(v).ok());
        Box::pin(async move {
            let mut request = factory.build().await?;
            if let Some(value) = traceparent {
                request
                    .headers_mut()
                    .insert(crate::trace_context::TRACEPARENT, value);
            }
            let response = http.execute(request).await.map_err(OpenAIError::Reqwest)?;
            let status = response.status();
            let _ = wire.answer.set(AnswerMeta::from_headers(
                status.as_u16(),
                response.headers(),
            ));
            if !status.is_success() {
                // The SDK reads and decodes the error body itself, all of it: hand it at most
                // MAX_ERROR_BODY_BYTES.
                return Ok(capped_error(response, &wire).await);
            }
            *wire.body.lock().unwrap_or_else(PoisonError::into_inner) = Some(response);
            Err(OpenAIError::Boxed(Box::new(BodyKept)))
        })
    }
}

/// The error answer with its body cut to [`MAX_ERROR_BODY_BYTES`] (noted in `wire`).
async fn capped_error(response: reqwest::Response, wire: &AttemptWire) -> reqwest::Response {
    let status = response.status();
    let version = response.version();
    let mut headers = response.headers().clone();
    headers.remove(reqwest::header::CONTENT_LENGTH);
    let (body, over_cap) = read_error_body(response).await;
    wire.error_body_cut.store(over_cap, Ordering::Relaxed);
    let mut capped = http::Response::new(reqwest::Body::from(body));
    *capped.status_mut() = status;
    *capped.version_mut() = version;
    *capped.headers_mut() = headers;
    reqwest::Response::from(capped)
}

/// Ends the SDK's call once the transport kept a successful answer's body: handed a response,
/// `create_stream` would spawn a task and a channel to read it (see the module doc), even an
/// empty one, on every request.
#[derive(Debug, thiserror::Error)]
#[error("the answer's body is read by the provider, not the SDK")]
struct BodyKept;

/// What one chunk says, owned: the only allocation per chunk is its text.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Chunk {
    /// Choice 0's content, when non-empty.
    pub(super) content: Option<String>,
    pub(super) refusal: bool,
    pub(super) finish: Option<FinishReason>,
    pub(super) usage: Option<Usage>,
}

/// Decodes one `data:` payload: a chunk, or a mid-stream `{"error": …}` (classified by its
/// `type`, as openai-python does), or malformed. Unknown finish reasons are kept verbatim rather
/// than failing the chunk, so a compatible server with a new value still streams.
pub(crate) fn decode_chunk(data: &str) -> Result<Chunk, ProviderError> {
    let wire: WireChunk<'_> = serde_json::from_str(data).map_err(|e| ProviderError::Malformed {
        provider: KIND,
        detail: format!("{e} in {}", truncate(data)),
    })?;
    if let Some(error) = wire.error {
        return Err(ProviderError::InStream {
            provider: KIND,
            error_type: error
                .error_type
                .or_else(|| error.code.as_ref().and_then(code_string))
                .unwrap_or_else(|| "unknown".to_owned()),
            message: error.message.unwrap_or_default(),
        });
    }
    let Some(choice) = wire.choices else {
        return Err(ProviderError::Malformed {
            provider: KIND,
            detail: format!("a chunk without `choices` or `error`: {}", truncate(data)),
        });
    };
    Ok(Chunk {
        content: choice.content.map(Cow::into_owned),
        refusal: choice.refusal,
        finish: choice.finish.as_deref().map(finish_reason),
        usage: wire.usage.map(|u| u.normalised()),
    })
}

// ---------------------------------------------------------------------------------------------
// Wire structs

/// One chunk as sent; every field optional so that a mid-stream `{"error": …}` decodes too, and
/// strings borrowed from the payload unless they contain escapes.
#[derive(Debug, Deserialize)]
struct WireChunk<'a> {
    #[serde(default, borrow)]
    choices: Option<ChoiceZero<'a>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<WireErrorBody>,
}

/// What the `choices` of one chunk say about choice 0, read straight from the array: no
/// vector per chunk. We never ask for `n > 1`; other indexes would be another answer. Several
/// entries for index 0 in one chunk (not something servers send) merge as they come: the last
/// non-empty text and the last finish reason win, and any refusal counts.
#[derive(Debug, Default)]
struct ChoiceZero<'a> {
    content: Option<Cow<'a, str>>,
    refusal: bool,
    finish: Option<Cow<'a, str>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for ChoiceZero<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Choices<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Choices<'a> {
            type Value = ChoiceZero<'a>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of choices")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ChoiceZero<'a>, A::Error> {
                let mut zero = ChoiceZero::default();
                while let Some(choice) = seq.next_element::<WireChoice<'a>>()? {
                    if choice.index != 0 {
                        continue;
                    }
                    if let Some(delta) = choice.delta {
                        if let Some(text) = delta.content
                            && !text.is_empty()
                        {
                            zero.content = Some(text);
                        }
                        zero.refusal |= delta.refusal.is_some_and(|r| !r.is_empty());
                    }
                    if let Some(reason) = choice.finish_reason {
                        zero.finish = Some(reason);
                    }
                }
                Ok(zero)
            }
        }
        deserializer.deserialize_seq(Choices(std::marker::PhantomData))
    }
}

#[derive(Debug, Deserialize)]
struct WireChoice<'a> {
    #[serde(default)]
    index: u32,
    #[serde(default, borrow)]
    delta: Option<WireDelta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
struct WireDelta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
}

/// The usage chunk (`stream_options.include_usage`).
#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<WirePromptDetails>,
}

#[derive(Debug, Deserialize)]
struct WirePromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    cache_write_tokens: Option<u64>,
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
// Conversions

impl WireUsage {
    fn normalised(&self) -> Usage {
        // OpenAI counts cached tokens inside `prompt_tokens`: that is already our `input`.
        let details = self.prompt_tokens_details.as_ref();
        Usage {
            input: self.prompt_tokens,
            cached_input: details.and_then(|d| d.cached_tokens).unwrap_or(0),
            cache_write: details.and_then(|d| d.cache_write_tokens).unwrap_or(0),
            output: self.completion_tokens,
        }
    }
}

fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_owned()),
    }
}

/// An error from `create_stream`, i.e. before any byte of the stream was read.
fn setup_error(
    err: OpenAIError,
    answer: Option<&AnswerMeta>,
    body_cut: bool,
    endpoint: &str,
) -> ProviderError {
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
    let cut = |raw: &str| {
        if body_cut {
            format!(
                "an error body over the {MAX_ERROR_BODY_BYTES}-byte cap, starting {}",
                truncate(raw)
            )
        } else {
            truncate(raw)
        }
    };
    match err {
        OpenAIError::ApiError(api) => http(
            api.status_code.as_u16(),
            api.api_error.r#type,
            api.api_error.code,
            cut(&api.api_error.message),
        ),
        // A non-2xx answer whose body is not the usual `{"error": …}` JSON.
        OpenAIError::JSONDeserialize(_, raw) if answer.is_some_and(|a| a.status >= 300) => {
            http(answer.map_or(0, |a| a.status), None, None, cut(&raw))
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
        other => sdk_error(other),
    }
}

/// An SDK error other than the ones `setup_error` reads the answer for.
fn sdk_error(err: OpenAIError) -> ProviderError {
    match err {
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
        OpenAIError::JSONDeserialize(e, raw) => ProviderError::Malformed {
            provider: KIND,
            detail: format!("{e} in {}", truncate(&raw)),
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
    use futures::{Stream, StreamExt};

    use super::*;
    use crate::provider::openai_answer::{AdaptChunks, ChunkSource, adapt_chunks, answer_events};
    use crate::provider::{ChatMessage, ResponseSchema};
    use crate::stream::ProviderEvent;

    /// Decodes `data:` payloads one chunk each; `[DONE]` is not passed (the framing stops at it)
    /// and becomes the `done` of [`scripted`] instead.
    fn sdk_items(payloads: &[&str]) -> Vec<Result<Chunk, ProviderError>> {
        payloads.iter().map(|p| decode_chunk(p)).collect()
    }

    pin_project_lite::pin_project! {
        /// Chunks as a test scripts them, with whether `[DONE]` is to have arrived.
        struct Scripted<S> {
            #[pin]
            chunks: S,
            done: bool,
        }
    }

    impl<S: Stream<Item = Result<Chunk, ProviderError>>> Stream for Scripted<S> {
        type Item = Result<Chunk, ProviderError>;

        fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.project().chunks.poll_next(cx)
        }
    }

    impl<S: Stream<Item = Result<Chunk, ProviderError>>> ChunkSource for Scripted<S> {
        fn saw_done(&self) -> bool {
            self.done
        }
    }

    fn scripted<S>(chunks: S, done: bool) -> AdaptChunks<Scripted<S>>
    where
        S: Stream<Item = Result<Chunk, ProviderError>>,
    {
        adapt_chunks(Scripted { chunks, done })
    }

    async fn run(items: Vec<Result<Chunk, ProviderError>>, done: bool) -> Vec<ProviderEvent> {
        scripted(futures::stream::iter(items), done).collect().await
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
                finish_reason: FinishReason::Stop,
                unterminated: false
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
                finish_reason: FinishReason::Length,
                unterminated: false
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
    async fn undecodable_chunk_is_malformed_but_an_unknown_finish_reason_is_kept() {
        for bad in [
            r#"{"choices":"x"}"#,
            "not json",
            r#"{"id":"c","usage":null}"#,
        ] {
            let events = run(sdk_items(&[HEL, bad, LO]), true).await;
            assert_eq!(events.len(), 2, "{bad}: {events:?}");
            assert!(
                matches!(
                    events.last(),
                    Some(ProviderEvent::Error(ProviderError::Malformed { .. }))
                ),
                "{bad}: {events:?}"
            );
        }
        let new_reason = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"brand_new"}]}"#;
        let events = run(sdk_items(&[HEL, new_reason, USAGE]), true).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done { finish_reason: FinishReason::Other(r), .. }) if r == "brand_new"
        ));
    }

    #[tokio::test]
    async fn escaped_content_is_unescaped_and_other_choices_are_ignored() {
        let escaped = r#"{"choices":[{"index":1,"delta":{"content":"other"}},{"index":0,"delta":{"content":"a \"quote\"\n\u00e9"}}]}"#;
        let events = run(sdk_items(&[escaped, STOP, USAGE]), true).await;
        assert_eq!(texts(&events), "a \"quote\"\n\u{e9}");
    }

    #[tokio::test]
    async fn framing_stops_at_done_skips_keepalive_and_reports_transport_errors() {
        let wire = format!(
            "data: {HEL}\n\nevent: keepalive\ndata: {{}}\n\ndata: {LO}\r\n\r\ndata: {STOP}\n\ndata: {USAGE}\n\ndata: [DONE]\n\ndata: {HEL}\n\n"
        );
        // Delivered in 7-byte pieces, as a socket might.
        let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
            wire.as_bytes().chunks(7).map(|c| Ok(c.to_vec())).collect();
        let events: Vec<ProviderEvent> = answer_events(
            futures::stream::iter(pieces),
            crate::provider::DEFAULT_MAX_EVENT_BYTES,
        )
        .collect()
        .await;
        assert_eq!(texts(&events), "Hello", "nothing after [DONE]: {events:?}");
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                finish_reason: FinishReason::Stop,
                unterminated: false
            })
        ));

        let broken: Vec<Result<Vec<u8>, std::io::Error>> = vec![
            Ok(format!("data: {HEL}\n\n").into_bytes()),
            Err(std::io::Error::other("connection reset")),
        ];
        let events: Vec<ProviderEvent> = answer_events(
            futures::stream::iter(broken),
            crate::provider::DEFAULT_MAX_EVENT_BYTES,
        )
        .collect()
        .await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Transport { message, .. })) if message.contains("reset")
        ));
    }

    #[tokio::test]
    async fn stream_without_finish_or_done_is_truncated() {
        let events = run(sdk_items(&[ROLE, HEL]), false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Truncated { .. }))
        ));
        // A finish reason without the usage chunk or `[DONE]`: the end may have been lost.
        let events = run(sdk_items(&[HEL, STOP]), false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Truncated { .. }))
        ));
    }

    #[tokio::test]
    async fn a_complete_answer_without_done_is_accepted_and_marked() {
        let events = run(sdk_items(&[HEL, STOP, USAGE]), false).await;
        let n = events.len();
        assert!(matches!(events[n - 2], ProviderEvent::Usage(u) if u.input == 2100));
        assert!(matches!(
            events[n - 1],
            ProviderEvent::Done {
                finish_reason: FinishReason::Stop,
                unterminated: true
            }
        ));
        // Broken after the usage chunk: the answer is still whole.
        let mut items = sdk_items(&[HEL, STOP, USAGE]);
        items.push(Err(ProviderError::Transport {
            provider: KIND,
            message: "reset".into(),
        }));
        let events = run(items, false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                unterminated: true,
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_open_body_after_the_usage_ends_within_the_grace() {
        let chunks =
            futures::stream::iter(sdk_items(&[HEL, STOP, USAGE])).chain(futures::stream::pending());
        let started = tokio::time::Instant::now();
        let events: Vec<ProviderEvent> = scripted(chunks, false).collect().await;
        assert_eq!(started.elapsed(), crate::provider::TERMINATOR_GRACE);
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                unterminated: true,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn usage_seen_before_a_failure_is_emitted_before_the_error() {
        let mut items = sdk_items(&[HEL, USAGE]);
        items.push(Err(ProviderError::Transport {
            provider: KIND,
            message: "reset".into(),
        }));
        let events = run(items, false).await;
        let n = events.len();
        assert!(matches!(events[n - 2], ProviderEvent::Usage(u) if u.input == 2100));
        assert!(matches!(
            events[n - 1],
            ProviderEvent::Error(ProviderError::Transport { .. })
        ));
    }

    #[tokio::test]
    async fn refusal_finishes_as_content_filter() {
        let refusal = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"refusal":"I can't help with that."},"finish_reason":null}]}"#;
        let events = run(sdk_items(&[refusal, STOP, USAGE]), true).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                finish_reason: FinishReason::ContentFilter,
                unterminated: false
            })
        ));
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
        let config = |url: &str, key: &str| ProviderConfig::new(url, ApiKey::new(key));
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
