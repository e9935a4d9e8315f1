//! Anthropic Messages streaming provider, on `reqwest-eventsource` with reconnects disabled.
//!
//! `reqwest-eventsource` retries forever by default, re-sending the POST after any error and even
//! after a normal end of body (`reqwest-eventsource` 0.6, `src/retry.rs`): for an LLM call that is a second, billed
//! generation. So every [`EventSource`] gets the `Never` retry policy and is closed at
//! `message_stop`, and `adapt_events` stops at the first error.

use futures::{Stream, StreamExt};
use reqwest_eventsource::{Error as SseError, Event, EventSource};
use reqwest012::StatusCode;
use reqwest012::header::HeaderValue;
use serde::{Deserialize, Serialize};

use super::anthropic_version::{AnthropicVersion, AnthropicVersions, KeyHeader};
use super::{
    ChatRequest, EventStream, Provider, ProviderConfig, ProviderError, ProviderInitError, Role,
    error_chain, parse_retry_after, truncate, validate_base_url,
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
    http: reqwest012::Client,
    /// `{base}/messages`.
    messages_url: String,
    credentials: Credentials,
    /// The `anthropic-version` of each request, by model.
    versions: AnthropicVersions,
}

impl AnthropicProvider {
    /// Builds the client once; every [`Provider::stream`] call reuses its connection pool. Every
    /// model is called with API version 2023-06-01 until [`AnthropicProvider::with_versions`]
    /// says otherwise.
    pub fn new(config: &ProviderConfig) -> Result<Self, ProviderInitError> {
        let base_url = validate_base_url(KIND, &config.base_url)?;
        let credentials = Credentials::new(config)?;
        // No overall timeout: the router owns time-to-first-token and stall deadlines.
        let http = reqwest012::Client::builder()
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
        let builder = self
            .http
            .post(&self.messages_url)
            .header(key_name, key_value)
            .header("anthropic-version", version.as_str())
            .json(&WireRequest::new(&request, version));
        let options = AdaptOptions {
            model: request.model,
            forced_tool: request.response_schema.is_some(),
            url: self.messages_url.clone(),
        };
        let mut source = match EventSource::new(builder) {
            Ok(source) => source,
            // Only a streaming request body is not cloneable; ours is JSON bytes.
            Err(e) => {
                let err = ProviderError::Malformed {
                    provider: KIND,
                    detail: format!("request could not be prepared: {e}"),
                };
                return Box::pin(futures::stream::iter([ProviderEvent::Error(err)]));
            }
        };
        source.set_retry_policy(Box::new(reqwest_eventsource::retry::Never));
        Box::pin(adapt_events(source, options))
    }
}

// ---------------------------------------------------------------------------------------------
// Wire structs

#[derive(Debug, Serialize)]
struct WireRequest<'a> {
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
    fn new(request: &'a ChatRequest, version: AnthropicVersion) -> Self {
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

/// An SSE event source the adapter can close once the message is complete.
pub(crate) trait SseSource:
    Stream<Item = Result<Event, SseError>> + Unpin + Send + 'static
{
    fn close(&mut self);
}

impl SseSource for EventSource {
    fn close(&mut self) {
        EventSource::close(self);
    }
}

/// What the adapter needs to know about the request.
#[derive(Debug, Clone)]
pub(crate) struct AdaptOptions {
    pub model: String,
    /// A schema tool was forced: its `tool_use` stop is the normal end of the answer.
    pub forced_tool: bool,
    /// The endpoint, for connect errors.
    pub url: String,
}

/// Turns an event source into `Start` · `Delta`* · `Usage`? · `Done`|`Error`.
///
/// `Start` on `Open` (HTTP 200 with `text/event-stream`); `Usage` and `Done` at `message_stop`,
/// where the source is closed. The first error ends the stream; if `message_start` already told
/// us the input usage, that `Usage` is emitted just before the `Error` (partial usage).
pub(crate) fn adapt_events<S: SseSource>(
    mut source: S,
    options: AdaptOptions,
) -> impl Stream<Item = ProviderEvent> + Send + 'static {
    async_stream::stream! {
        let mut state = AdaptState::new(options);
        while let Some(item) = source.next().await {
            match state.step(item).await {
                Step::Nothing => {}
                Step::Start => yield ProviderEvent::Start {
                    provider: KIND,
                    model: state.options.model.clone(),
                },
                Step::Delta(text) => yield ProviderEvent::Delta(text),
                Step::Finish(finish_reason) => {
                    source.close();
                    match state.usage.known() {
                        Some(usage) => yield ProviderEvent::Usage(usage),
                        None => tracing::warn!("anthropic stream completed without usage; cost will be estimated"),
                    }
                    yield ProviderEvent::Done { finish_reason };
                    return;
                }
                Step::Fail(err) => {
                    source.close();
                    tracing::debug!(error = %err, "anthropic stream failed");
                    if let Some(usage) = state.usage.known() {
                        yield ProviderEvent::Usage(usage);
                    }
                    yield ProviderEvent::Error(err);
                    return;
                }
            }
        }
        // The source closed without `message_stop` (with `Never` it ends after its error).
        if let Some(usage) = state.usage.known() {
            yield ProviderEvent::Usage(usage);
        }
        yield ProviderEvent::Error(ProviderError::Truncated {
            provider: KIND,
            detail: "the event stream ended before message_stop".to_owned(),
        });
    }
}

enum Step {
    Nothing,
    Start,
    Delta(String),
    Finish(FinishReason),
    Fail(ProviderError),
}

struct AdaptState {
    options: AdaptOptions,
    opened: bool,
    usage: UsageState,
    stop_reason: Option<String>,
}

impl AdaptState {
    fn new(options: AdaptOptions) -> Self {
        Self {
            options,
            opened: false,
            usage: UsageState::default(),
            stop_reason: None,
        }
    }

    async fn step(&mut self, item: Result<Event, SseError>) -> Step {
        match item {
            Ok(Event::Open) => {
                self.opened = true;
                Step::Start
            }
            Ok(Event::Message(message)) => self.message(&message.event, &message.data),
            Err(err) => Step::Fail(self.error(err).await),
        }
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
                if delta.stop_reason.is_some() {
                    self.stop_reason = delta.stop_reason;
                }
                if let Some(usage) = &usage {
                    self.usage.apply(usage);
                }
                Step::Nothing
            }
            WireEvent::MessageStop => Step::Finish(finish_reason(
                self.stop_reason.as_deref(),
                self.options.forced_tool,
            )),
            // Classified by `error.type`: the HTTP status of this response was 200.
            WireEvent::Error { error } => Step::Fail(ProviderError::InStream {
                provider: KIND,
                error_type: error.error_type.unwrap_or_else(|| "unknown".to_owned()),
                message: error.message.unwrap_or_default(),
            }),
            WireEvent::Unknown => Step::Nothing,
        }
    }

    async fn error(&self, err: SseError) -> ProviderError {
        match err {
            SseError::InvalidStatusCode(status, response) => http_error(status, response).await,
            SseError::InvalidContentType(content_type, _) => ProviderError::Malformed {
                provider: KIND,
                detail: format!(
                    "HTTP 200 with content-type {content_type:?} instead of text/event-stream"
                ),
            },
            SseError::Transport(e) if !self.opened => ProviderError::Connect {
                provider: KIND,
                url: self.options.url.clone(),
                message: error_chain(&e),
            },
            SseError::Transport(e) => ProviderError::Transport {
                provider: KIND,
                message: error_chain(&e),
            },
            SseError::StreamEnded => ProviderError::Truncated {
                provider: KIND,
                detail: "the body ended before message_stop".to_owned(),
            },
            other @ (SseError::Utf8(_) | SseError::Parser(_) | SseError::InvalidLastEventId(_)) => {
                ProviderError::Malformed {
                    provider: KIND,
                    detail: other.to_string(),
                }
            }
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

/// Reads a non-2xx answer into [`ProviderError::Http`], keeping the wait it asks for.
async fn http_error(status: StatusCode, response: reqwest012::Response) -> ProviderError {
    let headers = response.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let retry_after = parse_retry_after(header("retry-after-ms"), header("retry-after"));
    let header_request_id = header(REQUEST_ID_HEADER).map(str::to_owned);
    let body = match response.text().await {
        Ok(body) => body,
        Err(e) => format!("(the error body could not be read: {e})"),
    };
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
#[expect(
    clippy::result_large_err,
    reason = "the captured items' type is fixed by `reqwest_eventsource`; its error is large but not ours to box"
)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use eventsource_stream::Event as MessageEvent;

    use super::*;
    use crate::provider::{ApiKey, ChatMessage, ResponseSchema};

    /// A captured stream: hand-made events, recording whether the adapter closed it and
    /// refusing to yield anything after `close()` (as the real `EventSource` does).
    struct Captured {
        items: std::collections::VecDeque<Result<Event, SseError>>,
        closed: bool,
    }

    impl Stream for Captured {
        type Item = Result<Event, SseError>;
        fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            if self.closed {
                return Poll::Ready(None);
            }
            Poll::Ready(self.items.pop_front())
        }
    }

    impl SseSource for Captured {
        fn close(&mut self) {
            self.closed = true;
        }
    }

    fn msg(event: &str, data: &str) -> Result<Event, SseError> {
        Ok(Event::Message(MessageEvent {
            event: event.to_owned(),
            data: data.to_owned(),
            id: String::new(),
            retry: None,
        }))
    }

    /// `(event, data)` pairs after an `Open`, then `tail`.
    fn captured(pairs: &[(&str, &str)], tail: Option<SseError>) -> Captured {
        let mut items: std::collections::VecDeque<_> = [Ok(Event::Open)].into();
        items.extend(pairs.iter().map(|(e, d)| msg(e, d)));
        items.extend(tail.map(Err));
        Captured {
            items,
            closed: false,
        }
    }

    async fn run(source: Captured, forced_tool: bool) -> Vec<ProviderEvent> {
        let options = AdaptOptions {
            model: "claude-sonnet-4-5".into(),
            forced_tool,
            url: "http://127.0.0.1:1/v1/messages".into(),
        };
        adapt_events(source, options).collect().await
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
        assert!(
            matches!(&events[0], ProviderEvent::Start { model, .. } if model == "claude-sonnet-4-5")
        );
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
                finish_reason: FinishReason::Stop
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
                finish_reason: FinishReason::Length
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
                finish_reason: FinishReason::Stop
            })
        ));
        // Without a forced tool, the same stop means the model wants a tool.
        let events = run(captured(&pairs, None), false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                finish_reason: FinishReason::ToolCalls
            })
        ));
    }

    #[tokio::test]
    async fn error_event_after_message_start_emits_partial_usage_then_in_stream_error() {
        let overloaded = (
            "error",
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        let mut source = captured(&[START, HELLO, overloaded, WORLD, STOP], None);
        source.items.push_back(Err(SseError::StreamEnded));
        let events = run(source, false).await;
        assert_eq!(events.len(), 4, "{events:?}");
        assert!(matches!(
            events[2],
            ProviderEvent::Usage(Usage {
                input: 2160,
                output: 1,
                ..
            })
        ));
        match &events[3] {
            ProviderEvent::Error(e @ ProviderError::InStream { error_type, .. }) => {
                assert_eq!(error_type, "overloaded_error");
                assert_eq!(e.kind(), "overloaded");
                assert!(e.is_retryable());
            }
            other => panic!("expected InStream, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn stream_ended_before_message_stop_is_truncated() {
        let source = captured(&[START, HELLO], Some(SseError::StreamEnded));
        let events = run(source, false).await;
        assert!(matches!(events[events.len() - 2], ProviderEvent::Usage(_)));
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Truncated { .. }))
        ));
        // A source that simply stops is truncated too.
        let events = run(captured(&[START, HELLO], None), false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Truncated { .. }))
        ));
    }

    #[tokio::test]
    async fn message_stop_closes_the_source_and_ends_the_stream() {
        // Anything after message_stop (here a StreamEnded the real source would report) is
        // never read: the source is closed and the adapter has returned.
        let source = captured(
            &[START, HELLO, DELTA_END, STOP],
            Some(SseError::StreamEnded),
        );
        let events = run(source, false).await;
        assert!(matches!(events.last(), Some(ProviderEvent::Done { .. })));
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
    async fn transport_errors_are_connect_before_open_and_transport_after() {
        // A real reqwest transport error: nothing listens on port 1.
        let transport_error = || async {
            let err = reqwest012::Client::new()
                .get("http://127.0.0.1:1/")
                .send()
                .await
                .unwrap_err();
            SseError::Transport(err)
        };
        let before = Captured {
            items: [Err(transport_error().await)].into(),
            closed: false,
        };
        let events = run(before, false).await;
        assert_eq!(events.len(), 1);
        assert!(matches!(
            &events[0],
            ProviderEvent::Error(ProviderError::Connect { .. })
        ));
        let after = captured(&[START, HELLO], Some(transport_error().await));
        let events = run(after, false).await;
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Error(ProviderError::Transport { .. }))
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
        let source = Captured {
            items: [Err(SseError::InvalidStatusCode(
                StatusCode::TOO_MANY_REQUESTS,
                reqwest012::Response::from(response),
            ))]
            .into(),
            closed: false,
        };
        let events = run(source, false).await;
        let [ProviderEvent::Error(err)] = events.as_slice() else {
            panic!("expected one error: {events:?}");
        };
        assert_eq!(
            *err,
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
        // A spend cap looks like a rate limit but will not go away.
        assert!(!err.is_retryable());
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
        let config = ProviderConfig {
            base_url: "http://127.0.0.1:1/v1".into(),
            api_key: ApiKey::new("sk-ant-secret"),
            connect_timeout: Duration::from_secs(1),
        };
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
        let config = |key: &str| ProviderConfig {
            base_url: "http://127.0.0.1:1/v1".into(),
            api_key: ApiKey::new(key),
            connect_timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            AnthropicProvider::new(&config("bad\nkey")),
            Err(ProviderInitError::InvalidApiKey { .. })
        ));
        let provider = AnthropicProvider::new(&config("sk-ant-secret")).unwrap();
        assert!(!format!("{provider:?}").contains("sk-ant-secret"));
        assert_eq!(provider.messages_url, "http://127.0.0.1:1/v1/messages");
    }
}
