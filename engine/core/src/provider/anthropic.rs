//! Anthropic Messages streaming provider: `reqwest` sends one request, and the body is decoded
//! by our own SSE framer (`sse_frames.rs`, shared with the OpenAI provider) into events.
//!
//! Why not `reqwest-eventsource`, which this provider used before: its parser
//! (`eventsource-stream` 0.2) keeps an unterminated line in an unbounded buffer and re-parses
//! that buffer on every piece that arrives, so a hostile line with no line end costs memory
//! without limit and CPU that grows with the square of its length (measured here on a debug
//! build: a 64 MiB line took 167 s to take in and 69 MiB of memory); it also never dispatches the
//! last event of a stream framed with bare CR line ends (legal SSE), which turned a complete
//! answer into a truncated one. And its default policy re-sends the POST after any error or
//! even a normal end of body: a second, billed generation. Here there is exactly one request per
//! attempt; the router owns retries.

use futures::{Stream, StreamExt};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use serde::{Deserialize, Serialize};

use super::anthropic_version::{AnthropicVersion, AnthropicVersions, KeyHeader};
use super::sse_frames::{SseEvent, sse_events};
use super::{
    ChatRequest, EventStream, Provider, ProviderConfig, ProviderError, ProviderInitError, Role,
    error_chain, parse_retry_after, read_error_body, truncate, validate_base_url,
};
use crate::stream::{FinishReason, ProviderEvent, ProviderKind, Usage};

// ---------------------------------------------------------------------------------------------
// Constants

const KIND: ProviderKind = ProviderKind::Anthropic;
const REQUEST_ID_HEADER: &str = "request-id";
/// Event names whose payload we must understand; a payload of any other event that does not
/// decode is ignored, since Anthropic may add event types at any time.
const KNOWN_EVENTS: [&str; 7] = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "error",
];

// ---------------------------------------------------------------------------------------------
// Credentials

/// The key as a header value, in both forms the API versions use, each marked sensitive so
/// `Debug` never prints it.
#[derive(Debug, Clone)]
struct Credentials {
    /// `x-api-key: <key>` (2023-06-01).
    x_api_key: HeaderValue,
    /// `Authorization: Bearer <key>` (2026-10-21).
    bearer: HeaderValue,
}

impl Credentials {
    fn new(config: &ProviderConfig) -> Result<Self, ProviderInitError> {
        let sensitive = |text: &str| {
            let mut value = HeaderValue::from_str(text)
                .map_err(|_| ProviderInitError::InvalidApiKey { provider: KIND })?;
            value.set_sensitive(true);
            Ok(value)
        };
        let key = config.api_key.expose();
        Ok(Self {
            x_api_key: sensitive(key)?,
            bearer: sensitive(&format!("Bearer {key}"))?,
        })
    }

    /// The header carrying the key the way `version`'s SDKs send it.
    fn header(&self, version: AnthropicVersion) -> (&'static str, HeaderValue) {
        match version.key_header() {
            KeyHeader::XApiKey => ("x-api-key", self.x_api_key.clone()),
            KeyHeader::Bearer => ("authorization", self.bearer.clone()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Provider

/// Streams messages from Anthropic (or any server speaking its Messages protocol).
#[derive(Debug, Clone)]
pub struct AnthropicProvider {
    http: reqwest::Client,
    /// `{base}/messages`.
    messages_url: String,
    credentials: Credentials,
    /// The `anthropic-version` of each request, by model.
    versions: AnthropicVersions,
    max_event_bytes: usize,
}

impl AnthropicProvider {
    /// Builds the client once; every [`Provider::stream`] call reuses its connection pool. Every
    /// model is called with API version 2023-06-01 until [`AnthropicProvider::with_versions`]
    /// says otherwise.
    pub fn new(config: &ProviderConfig) -> Result<Self, ProviderInitError> {
        let base_url = validate_base_url(KIND, &config.base_url)?;
        let credentials = Credentials::new(config)?;
        // No overall timeout: the router owns the header, first-token, stall and total deadlines.
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(|e| ProviderInitError::HttpClient {
                provider: KIND,
                message: e.to_string(),
            })?;
        Ok(Self {
            http,
            messages_url: format!("{base_url}/messages"),
            credentials,
            versions: AnthropicVersions::default(),
            max_event_bytes: config.max_event_bytes,
        })
    }

    /// Which API version each model is called with.
    pub fn with_versions(mut self, versions: AnthropicVersions) -> Self {
        self.versions = versions;
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Trait impl

impl Provider for AnthropicProvider {
    fn kind(&self) -> ProviderKind {
        KIND
    }

    fn stream(&self, request: ChatRequest) -> EventStream {
        let version = self.versions.for_model(&request.model);
        if request.temperature.is_some() && !version.accepts_sampling_parameters() {
            // Per request only at debug: a process's temperature is reported once, at start.
            tracing::debug!(model = %request.model, %version, "temperature not sent: this API version has no sampling parameters");
        }
        let (key_name, key_value) = self.credentials.header(version);
        let mut builder = self
            .http
            .post(&self.messages_url)
            .header(key_name, key_value)
            .header("anthropic-version", version.as_str())
            .header(ACCEPT, "text/event-stream");
        // The attempt's span is current: the provider (or a proxy in front of it) can join the trace.
        if let Some(traceparent) = crate::trace_context::current_traceparent() {
            builder = builder.header(crate::trace_context::TRACEPARENT, traceparent);
        }
        let send = builder.json(&WireRequest::new(&request, version)).send();
        let options = AdaptOptions {
            model: request.model,
            forced_tool: request.response_schema.is_some(),
        };
        let url = self.messages_url.clone();
        let max_event_bytes = self.max_event_bytes;
        Box::pin(async_stream::stream! {
            let response = match send.await {
                Ok(response) => response,
                Err(e) => {
                    yield ProviderEvent::Error(ProviderError::Connect {
                        provider: KIND,
                        url,
                        message: error_chain(&e),
                    });
                    return;
                }
            };
            let status = response.status();
            if status != StatusCode::OK {
                yield ProviderEvent::Error(http_error(status, response).await);
                return;
            }
            if !is_event_stream(response.headers().get(CONTENT_TYPE)) {
                let content_type = response.headers().get(CONTENT_TYPE).cloned();
                yield ProviderEvent::Error(ProviderError::Malformed {
                    provider: KIND,
                    detail: format!(
                        "HTTP 200 with content-type {content_type:?} instead of text/event-stream"
                    ),
                });
                return;
            }
            yield ProviderEvent::Start { provider: KIND, model: options.model.clone() };
            let frames = sse_events(KIND, response.bytes_stream(), max_event_bytes);
            let events = adapt_events(frames, options);
            futures::pin_mut!(events);
            while let Some(event) = events.next().await {
                yield event;
            }
        })
    }
}

/// `text/event-stream`, with or without parameters, in any letter case.
fn is_event_stream(value: Option<&HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("text/event-stream"))
}

// ---------------------------------------------------------------------------------------------
// Wire structs

#[derive(Debug, Serialize)]
pub(crate) struct WireRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<[WireTool<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<WireToolChoice<'a>>,
}

#[derive(Debug, Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Debug, Serialize)]
struct WireTool<'a> {
    name: &'a str,
    description: String,
    input_schema: &'a serde_json::Value,
}

#[derive(Debug, Serialize)]
struct WireToolChoice<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
}

impl<'a> WireRequest<'a> {
    /// A JSON answer is obtained by forcing one tool whose input schema is the answer's schema;
    /// the tool input then streams as `input_json_delta` pieces. On a version without sampling
    /// parameters the temperature is left out: sending it, even at its default, is a 400 there.
    pub(crate) fn new(request: &'a ChatRequest, version: AnthropicVersion) -> Self {
        let schema = request.response_schema.as_ref();
        Self {
            model: &request.model,
            max_tokens: request.max_output_tokens,
            stream: true,
            system: request.system.as_deref(),
            messages: request
                .messages
                .iter()
                .map(|m| WireMessage {
                    role: match m.role {
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    },
                    content: &m.content,
                })
                .collect(),
            temperature: request
                .temperature
                .filter(|_| version.accepts_sampling_parameters()),
            tools: schema.map(|s| {
                [WireTool {
                    name: &s.name,
                    description: s
                        .schema
                        .get("description")
                        .and_then(|d| d.as_str())
                        .map(str::to_owned)
                        .unwrap_or_else(|| {
                            format!("Give the answer as `{}` JSON matching this schema.", s.name)
                        }),
                    input_schema: &s.schema,
                }]
            }),
            tool_choice: schema.map(|s| WireToolChoice {
                kind: "tool",
                name: &s.name,
            }),
        }
    }
}

/// One SSE payload. Unknown `type`s decode as `Unknown`; unknown fields are ignored everywhere.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireEvent {
    MessageStart {
        message: WireMessageStart,
    },
    ContentBlockDelta {
        delta: WireDelta,
    },
    MessageDelta {
        delta: WireMessageDelta,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    MessageStop,
    Error {
        error: WireErrorBody,
    },
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Deserialize)]
struct WireMessageStart {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    /// `thinking_delta`, `signature_delta`, `citations_delta` and future kinds.
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct WireMessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// Every field optional: `message_delta.usage` may repeat any of them, or only `output_tokens`.
#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct WireErrorBody {
    #[serde(default, rename = "type")]
    error_type: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    details: Option<WireErrorDetails>,
}

#[derive(Debug, Deserialize)]
struct WireErrorDetails {
    #[serde(default)]
    error_code: Option<String>,
}

/// A non-2xx body: `{"type":"error","error":{"type","message"},"request_id"}`.
#[derive(Debug, Deserialize)]
struct WireHttpError {
    error: WireErrorBody,
    #[serde(default)]
    request_id: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// SSE-to-event adapter

/// What the adapter needs to know about the request.
#[derive(Debug, Clone)]
pub(crate) struct AdaptOptions {
    pub model: String,
    /// A schema tool was forced: its `tool_use` stop is the normal end of the answer.
    pub forced_tool: bool,
}

/// Turns the events of an opened stream into `Delta`* · `Usage`? · `Done`|`Error`.
///
/// `Usage` and `Done` at `message_stop`. Once `message_delta` has said why the message stopped
/// (with its usage), the answer is complete: if `message_stop` then does not come within
/// [`TERMINATOR_GRACE`], or the body ends (or breaks) first, it is accepted as `Done` with
/// `unterminated` set. Otherwise the first error, or an end of body, ends the stream with an
/// `Error`; if `message_start` already told us the input usage, that `Usage` is emitted just
/// before it (partial usage).
pub(crate) fn adapt_events<S>(
    frames: S,
    options: AdaptOptions,
) -> impl Stream<Item = ProviderEvent> + Send + 'static
where
    S: Stream<Item = Result<SseEvent, ProviderError>> + Send + 'static,
{
    // Pinned on the heap before the generator takes it (see `openai::adapt_chunks`).
    let mut frames = Box::pin(frames);
    async_stream::stream! {
        let mut state = AdaptState::new(options);
        loop {
            let next = if state.stop_reason.is_some() {
                // Complete but for the terminator: wait for it only briefly.
                match super::within_grace(frames.next()).await {
                    Some(Ok(frame)) => Some(Ok(frame)),
                    Some(Err(_)) | None => {
                        tracing::debug!("anthropic message complete without message_stop");
                        for event in state.finish(true) {
                            yield event;
                        }
                        return;
                    }
                }
            } else {
                frames.next().await
            };
            let step = match next {
                Some(Ok(frame)) => state.message(&frame.event, &frame.data),
                Some(Err(err)) => Step::Fail(err),
                None => Step::Fail(ProviderError::Truncated {
                    provider: KIND,
                    detail: "the body ended before message_stop".to_owned(),
                }),
            };
            match step {
                Step::Nothing => {}
                Step::Delta(text) => yield ProviderEvent::Delta(text),
                Step::Finish => {
                    for event in state.finish(false) {
                        yield event;
                    }
                    return;
                }
                Step::Fail(err) => {
                    tracing::debug!(error = %err, "anthropic stream failed");
                    if let Some(usage) = state.usage.known() {
                        yield ProviderEvent::Usage(usage);
                    }
                    yield ProviderEvent::Error(err);
                    return;
                }
            }
        }
    }
}

enum Step {
    Nothing,
    Delta(String),
    Finish,
    Fail(ProviderError),
}

struct AdaptState {
    options: AdaptOptions,
    usage: UsageState,
    /// Set by the `message_delta` that says why the message stopped.
    stop_reason: Option<String>,
}

impl AdaptState {
    fn new(options: AdaptOptions) -> Self {
        Self {
            options,
            usage: UsageState::default(),
            stop_reason: None,
        }
    }

    /// The end of a complete message: its usage, then `Done`.
    fn finish(&self, unterminated: bool) -> Vec<ProviderEvent> {
        let mut out = Vec::with_capacity(2);
        match self.usage.known() {
            Some(usage) => out.push(ProviderEvent::Usage(usage)),
            None => {
                tracing::warn!("anthropic stream completed without usage; cost will be estimated")
            }
        }
        out.push(ProviderEvent::Done {
            finish_reason: finish_reason(self.stop_reason.as_deref(), self.options.forced_tool),
            unterminated,
        });
        out
    }

    fn message(&mut self, name: &str, data: &str) -> Step {
        let event = match serde_json::from_str::<WireEvent>(data) {
            Ok(event) => event,
            Err(e) if KNOWN_EVENTS.contains(&name) => {
                return Step::Fail(ProviderError::Malformed {
                    provider: KIND,
                    detail: format!("{name} event: {e} in {}", truncate(data)),
                });
            }
            Err(_) => {
                tracing::debug!(event = name, "ignoring an unknown anthropic event");
                return Step::Nothing;
            }
        };
        match event {
            WireEvent::MessageStart { message } => {
                if let Some(usage) = &message.usage {
                    self.usage.apply(usage);
                }
                Step::Nothing
            }
            WireEvent::ContentBlockDelta { delta } => match delta {
                WireDelta::TextDelta { text }
                | WireDelta::InputJsonDelta { partial_json: text }
                    if !text.is_empty() =>
                {
                    Step::Delta(text)
                }
                _ => Step::Nothing,
            },
            WireEvent::MessageDelta { delta, usage } => {
                if let Some(usage) = &usage {
                    self.usage.apply(usage);
                }
                if delta.stop_reason.is_some() {
                    self.stop_reason = delta.stop_reason;
                }
                Step::Nothing
            }
            WireEvent::MessageStop => Step::Finish,
            // Classified by `error.type`: the HTTP status of this response was 200.
            WireEvent::Error { error } => Step::Fail(ProviderError::InStream {
                provider: KIND,
                error_type: error.error_type.unwrap_or_else(|| "unknown".to_owned()),
                message: error.message.unwrap_or_default(),
            }),
            WireEvent::Unknown => Step::Nothing,
        }
    }
}

/// Usage as learned so far: `message_start` first, then each `message_delta` overrides the
/// fields it carries (its counts are cumulative, so the latest value is the total).
#[derive(Debug, Default)]
struct UsageState {
    seen: bool,
    input: u64,
    cache_read: u64,
    cache_creation: u64,
    output: u64,
}

impl UsageState {
    fn apply(&mut self, usage: &WireUsage) {
        self.seen = true;
        let fields = [
            (&mut self.input, usage.input_tokens),
            (&mut self.cache_read, usage.cache_read_input_tokens),
            (&mut self.cache_creation, usage.cache_creation_input_tokens),
            (&mut self.output, usage.output_tokens),
        ];
        for (field, value) in fields {
            if let Some(value) = value {
                *field = value;
            }
        }
    }

    /// Normalised per [`Usage`]: Anthropic's `input_tokens` excludes cache reads and writes.
    fn known(&self) -> Option<Usage> {
        self.seen.then(|| Usage {
            input: self.input + self.cache_read + self.cache_creation,
            cached_input: self.cache_read,
            cache_write: self.cache_creation,
            output: self.output,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions

fn finish_reason(stop_reason: Option<&str>, forced_tool: bool) -> FinishReason {
    match stop_reason {
        Some("end_turn" | "stop_sequence") => FinishReason::Stop,
        Some("max_tokens" | "model_context_window_exceeded") => FinishReason::Length,
        // We forced the schema tool: calling it is how the answer ends.
        Some("tool_use") if forced_tool => FinishReason::Stop,
        Some("tool_use") => FinishReason::ToolCalls,
        Some("refusal") => FinishReason::ContentFilter,
        Some(other) => FinishReason::Other(other.to_owned()),
        None => FinishReason::Other("unspecified".to_owned()),
    }
}

/// Reads a non-2xx answer into [`ProviderError::Http`], keeping the wait it asks for. At most
/// [`super::MAX_ERROR_BODY_BYTES`] of the body are read.
async fn http_error(status: StatusCode, response: reqwest::Response) -> ProviderError {
    let headers = response.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let retry_after = parse_retry_after(header("retry-after-ms"), header("retry-after"));
    let header_request_id = header(REQUEST_ID_HEADER).map(str::to_owned);
    let (body, over_cap) = read_error_body(response).await;
    let parsed = serde_json::from_str::<WireHttpError>(&body).ok();
    let (error_type, code, message, body_request_id) = match parsed {
        Some(WireHttpError { error, request_id }) => (
            error.error_type,
            error.details.and_then(|d| d.error_code),
            error.message.unwrap_or_default(),
            request_id,
        ),
        None if body.trim().is_empty() => (
            None,
            None,
            status.canonical_reason().unwrap_or("no body").to_owned(),
            None,
        ),
        None if over_cap => (
            None,
            None,
            format!(
                "an error body over the {}-byte cap, starting {}",
                super::MAX_ERROR_BODY_BYTES,
                truncate(&body)
            ),
            None,
        ),
        None => (None, None, truncate(&body), None),
    };
    ProviderError::Http {
        provider: KIND,
        status: status.as_u16(),
        error_type,
        code,
        message,
        retry_after,
        request_id: header_request_id.or(body_request_id),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::provider::{ApiKey, ChatMessage, ResponseSchema};

    type Frame = Result<SseEvent, ProviderError>;

    fn frame(event: &str, data: &str) -> Frame {
        Ok(SseEvent {
            event: event.to_owned(),
            data: data.to_owned(),
        })
    }

    /// `(event, data)` frames, then `tail` (an error the body ended with), then a clean end.
    fn captured(pairs: &[(&str, &str)], tail: Option<ProviderError>) -> Vec<Frame> {
        let mut items: Vec<Frame> = pairs.iter().map(|(e, d)| frame(e, d)).collect();
        items.extend(tail.map(Err));
        items
    }

    async fn run(frames: Vec<Frame>, forced_tool: bool) -> Vec<ProviderEvent> {
        let options = AdaptOptions {
            model: "claude-sonnet-4-5".into(),
            forced_tool,
        };
        adapt_events(futures::stream::iter(frames), options)
            .collect()
            .await
    }

    const START: (&str, &str) = (
        "message_start",
        r#"{"type":"message_start","message":{"id":"msg_01","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":100,"cache_read_input_tokens":2048,"output_tokens":1,"service_tier":"standard"}}}"#,
    );
    const BLOCK: (&str, &str) = (
        "content_block_start",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    );
    const PING: (&str, &str) = ("ping", r#"{"type":"ping"}"#);
    const HELLO: (&str, &str) = (
        "content_block_delta",
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
    );
    const WORLD: (&str, &str) = (
        "content_block_delta",
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" world"}}"#,
    );
    const BLOCK_STOP: (&str, &str) = (
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    );
    const DELTA_END: (&str, &str) = (
        "message_delta",
        r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null,"stop_details":null},"usage":{"output_tokens":15}}"#,
    );
    const STOP: (&str, &str) = ("message_stop", r#"{"type":"message_stop"}"#);

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
    async fn normal_stream_adds_cache_reads_and_writes_back_into_input() {
        let source = captured(
            &[
                START, BLOCK, PING, HELLO, PING, WORLD, BLOCK_STOP, DELTA_END, STOP,
            ],
            None,
        );
        let events = run(source, false).await;
        assert_eq!(texts(&events), "Hello world");
        let n = events.len();
        let ProviderEvent::Usage(usage) = events[n - 2] else {
            panic!("expected Usage before Done: {events:?}");
        };
        assert_eq!(
            usage,
            Usage {
                input: 12 + 2048 + 100,
                cached_input: 2048,
                cache_write: 100,
                output: 15
            }
        );
        assert_eq!(usage.uncached_input(), 12);
        assert!(matches!(
            &events[n - 1],
            ProviderEvent::Done {
                finish_reason: FinishReason::Stop,
                unterminated: false
            }
        ));
    }

    #[tokio::test]
    async fn the_latest_message_delta_usage_wins() {
        let first = (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":5}}"#,
        );
        let last = (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"input_tokens":13,"cache_read_input_tokens":2048,"cache_creation_input_tokens":0,"output_tokens":40}}"#,
        );
        let events = run(captured(&[START, HELLO, first, last, STOP], None), false).await;
        assert!(events.iter().any(|e| matches!(
            e,
            ProviderEvent::Usage(Usage {
                input: 2061,
                cached_input: 2048,
                cache_write: 0,
                output: 40
            })
        )));
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                finish_reason: FinishReason::Length,
                unterminated: false
            })
        ));
    }

    #[tokio::test]
    async fn forced_tool_streams_its_json_and_ends_as_stop() {
        let tool_start = (
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_01","name":"answer","input":{}}}"#,
        );
        let piece = |json: &str| {
            format!(
                r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"input_json_delta","partial_json":{}}}}}"#,
                serde_json::to_string(json).unwrap()
            )
        };
        let (p0, p1, p2) = (piece(""), piece("{\"text\": \"Pa"), piece("ris\"}"));
        let tool_stop = (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":9}}"#,
        );
        let pairs = [
            START,
            tool_start,
            ("content_block_delta", p0.as_str()),
            ("content_block_delta", p1.as_str()),
            ("content_block_delta", p2.as_str()),
            BLOCK_STOP,
            tool_stop,
            STOP,
        ];
        let events = run(captured(&pairs, None), true).await;
        assert_eq!(texts(&events), r#"{"text": "Paris"}"#);
        // The empty piece yields no Delta.
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, ProviderEvent::Delta(_)))
                .count(),
            2
        );
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                finish_reason: FinishReason::Stop,
                unterminated: false
            })
        ));
        // Without a forced tool, the same stop means the model wants a tool.
        let events = run(captured(&pairs, None), false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                finish_reason: FinishReason::ToolCalls,
                unterminated: false
            })
        ));
    }

    #[tokio::test]
    async fn error_event_after_message_start_emits_partial_usage_then_in_stream_error() {
        let overloaded = (
            "error",
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        let source = captured(&[START, HELLO, overloaded, WORLD, STOP], None);
        let events = run(source, false).await;
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(matches!(
            events[1],
            ProviderEvent::Usage(Usage {
                input: 2160,
                output: 1,
                ..
            })
        ));
        match &events[2] {
            ProviderEvent::Error(e @ ProviderError::InStream { error_type, .. }) => {
                assert_eq!(error_type, "overloaded_error");
                assert_eq!(e.kind(), "overloaded");
                assert!(e.is_retryable());
            }
            other => panic!("expected InStream, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_body_that_ends_before_the_stop_reason_is_truncated() {
        let events = run(captured(&[START, HELLO], None), false).await;
        assert!(matches!(events[events.len() - 2], ProviderEvent::Usage(_)));
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Truncated { .. }))
        ));
        // Content blocks closed but no `message_delta` with a stop reason: still incomplete.
        let events = run(captured(&[START, HELLO, BLOCK_STOP], None), false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Truncated { .. }))
        ));
    }

    #[tokio::test]
    async fn a_complete_message_without_message_stop_is_done_but_marked() {
        // Clean end right after the stop reason.
        let events = run(captured(&[START, HELLO, DELTA_END], None), false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                finish_reason: FinishReason::Stop,
                unterminated: true
            })
        ));
        assert!(matches!(
            events[events.len() - 2],
            ProviderEvent::Usage(Usage { output: 15, .. })
        ));
        // The connection breaks after the stop reason: the answer is still whole.
        let broken = ProviderError::Transport {
            provider: KIND,
            message: "reset".into(),
        };
        let events = run(captured(&[START, HELLO, DELTA_END], Some(broken)), false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                unterminated: true,
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_open_stream_after_the_stop_reason_ends_within_the_grace() {
        let frames = futures::stream::iter(captured(&[START, HELLO, DELTA_END], None))
            .chain(futures::stream::pending());
        let options = AdaptOptions {
            model: "claude-sonnet-4-5".into(),
            forced_tool: false,
        };
        let started = tokio::time::Instant::now();
        let events: Vec<ProviderEvent> = adapt_events(frames, options).collect().await;
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
    async fn nothing_after_message_stop_is_read() {
        let source = captured(&[START, HELLO, DELTA_END, STOP, WORLD], None);
        let events = run(source, false).await;
        assert_eq!(texts(&events), "Hello");
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                unterminated: false,
                ..
            })
        ));
        assert_eq!(
            events.iter().filter(|e| e.is_terminal()).count(),
            1,
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn unknown_events_and_delta_types_are_ignored_but_bad_known_events_are_malformed() {
        let unknown_json = ("brand_new_event", r#"{"type":"brand_new_event","x":1}"#);
        let unknown_text = ("another_new_event", "not json at all");
        let thinking = (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hmm"}}"#,
        );
        let events = run(
            captured(
                &[
                    START,
                    unknown_json,
                    unknown_text,
                    thinking,
                    HELLO,
                    DELTA_END,
                    STOP,
                ],
                None,
            ),
            false,
        )
        .await;
        assert_eq!(texts(&events), "Hello");
        assert!(matches!(events.last(), Some(ProviderEvent::Done { .. })));

        let broken = ("content_block_delta", r#"{"type":"content_block_delta""#);
        let events = run(captured(&[START, broken, HELLO], None), false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Malformed { .. }))
        ));
    }

    #[tokio::test]
    async fn a_broken_body_or_oversized_line_mid_stream_is_that_error() {
        let broken = ProviderError::Transport {
            provider: KIND,
            message: "connection reset".into(),
        };
        let events = run(captured(&[START, HELLO], Some(broken)), false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Transport { .. }))
        ));
        let oversized = ProviderError::Oversized {
            provider: KIND,
            what: "an SSE line",
            limit: 1024,
        };
        let events = run(captured(&[START, HELLO], Some(oversized)), false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Oversized { .. }))
        ));
    }

    #[tokio::test]
    async fn http_error_body_and_headers_are_read() {
        let response = http::Response::builder()
            .status(429)
            .header("retry-after", "7")
            .header("request-id", "req_123")
            .body(
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"Slow down","details":{"error_code":"enforced_spend_limit_reached"}},"request_id":"req_body"}"#,
            )
            .unwrap();
        let err = http_error(
            StatusCode::TOO_MANY_REQUESTS,
            reqwest::Response::from(response),
        )
        .await;
        assert_eq!(
            err,
            ProviderError::Http {
                provider: KIND,
                status: 429,
                error_type: Some("rate_limit_error".into()),
                code: Some("enforced_spend_limit_reached".into()),
                message: "Slow down".into(),
                retry_after: Some(Duration::from_secs(7)),
                request_id: Some("req_123".into()),
            }
        );
        // A spend cap looks like a rate limit but is about our account: the fallback answers.
        assert_eq!(err.class(), crate::stream::FaultClass::Account);
    }

    #[tokio::test]
    async fn an_error_body_over_the_cap_is_cut_and_said_so() {
        let huge = "x".repeat(super::super::MAX_ERROR_BODY_BYTES * 4);
        let response = http::Response::builder().status(500).body(huge).unwrap();
        let err = http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            reqwest::Response::from(response),
        )
        .await;
        let ProviderError::Http { message, .. } = &err else {
            panic!("{err:?}");
        };
        assert!(message.contains("over the 65536-byte cap"), "{message}");
        assert!(
            message.len() < 2048,
            "the quoted part is short: {}",
            message.len()
        );
    }

    #[test]
    fn request_body_has_top_level_system_and_forced_schema_tool() {
        let request = ChatRequest {
            model: "claude-sonnet-4-5".into(),
            system: Some("Be brief.".into()),
            messages: vec![ChatMessage::user("Hi")],
            max_output_tokens: 300,
            temperature: Some(0.25),
            response_schema: Some(ResponseSchema {
                name: "answer".into(),
                schema: serde_json::json!({"type": "object", "properties": {"text": {"type": "string"}}}),
            }),
        };
        let body = serde_json::to_value(WireRequest::new(&request, AnthropicVersion::V2023_06_01))
            .unwrap();
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], 300);
        assert_eq!(body["system"], "Be brief.");
        assert_eq!(body["temperature"], 0.25);
        assert_eq!(body["messages"][0]["role"], "user");
        assert_eq!(body["tools"][0]["name"], "answer");
        assert_eq!(body["tools"][0]["input_schema"]["type"], "object");
        assert!(body["tools"][0]["description"].is_string());
        assert_eq!(
            body["tool_choice"],
            serde_json::json!({"type": "tool", "name": "answer"})
        );
        // 2026-10-21 has no sampling parameters: the same request goes out without it.
        let body = serde_json::to_value(WireRequest::new(&request, AnthropicVersion::V2026_10_21))
            .unwrap();
        assert!(body.get("temperature").is_none(), "{body}");
        assert_eq!(body["tools"][0]["name"], "answer");
        let plain = ChatRequest {
            response_schema: None,
            system: None,
            temperature: None,
            ..request
        };
        let body =
            serde_json::to_value(WireRequest::new(&plain, AnthropicVersion::V2023_06_01)).unwrap();
        for absent in ["tools", "tool_choice", "system", "temperature"] {
            assert!(body.get(absent).is_none(), "{absent} should be omitted");
        }
    }

    #[test]
    fn the_key_travels_in_the_header_of_the_version() {
        let config = ProviderConfig::new("http://127.0.0.1:1/v1", ApiKey::new("sk-ant-secret"));
        let credentials = Credentials::new(&config).unwrap();
        let (name, value) = credentials.header(AnthropicVersion::V2023_06_01);
        assert_eq!(
            (name, value.to_str().unwrap()),
            ("x-api-key", "sk-ant-secret")
        );
        let (name, value) = credentials.header(AnthropicVersion::V2026_10_21);
        assert_eq!(
            (name, value.to_str().unwrap()),
            ("authorization", "Bearer sk-ant-secret")
        );
        assert!(value.is_sensitive());
    }

    #[test]
    fn init_rejects_a_key_that_cannot_be_a_header_and_hides_it_in_debug() {
        let config = |key: &str| ProviderConfig::new("http://127.0.0.1:1/v1", ApiKey::new(key));
        assert!(matches!(
            AnthropicProvider::new(&config("bad\nkey")),
            Err(ProviderInitError::InvalidApiKey { .. })
        ));
        let provider = AnthropicProvider::new(&config("sk-ant-secret")).unwrap();
        assert!(!format!("{provider:?}").contains("sk-ant-secret"));
        assert_eq!(provider.messages_url, "http://127.0.0.1:1/v1/messages");
    }
}
