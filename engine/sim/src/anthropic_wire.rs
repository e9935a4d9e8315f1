//! The Anthropic Messages side of the simulator (`POST /v1/messages`), streamed and not,
//! byte-compatible with the Messages streaming format (named events `message_start`,
//! `content_block_*`, `message_delta`, `message_stop`, `ping`), including forced-tool JSON answers.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use super::anthropic_version;
use super::content::Prompt;
use super::knobs::Failure;
use super::serve::ConnControl;
use super::streaming::{self, Encoder, Script};
use super::{Prepared, SeenRequest, SimState, new_id, prepare};
use keyvex_engine::provider::{ChatMessage, Role};
use keyvex_engine::stream::ProviderKind;

const REQUESTS_LIMIT: u64 = 4_000;
const TOKENS_LIMIT: u64 = 2_000_000;

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorObject<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Value>,
}

/// An HTTP error in Anthropic's shape (`{"type":"error","error":{type, message}}`), with its
/// `request-id` header.
fn error_response(
    status: StatusCode,
    kind: &str,
    message: &str,
    details: Option<Value>,
    retry_after: Option<Duration>,
) -> Response {
    let request_id = format!("req_{}", new_id());
    let body = ErrorBody {
        kind: "error",
        error: ErrorObject {
            kind,
            message,
            details,
        },
        request_id: Some(&request_id),
    };
    let mut response = (status, serde_json::to_string(&body).unwrap_or_default()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("request-id", id_header(&request_id));
    if let Some(wait) = retry_after {
        let secs = wait.as_millis().div_ceil(1000).max(1);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
    }
    response
}

fn id_header(id: &str) -> HeaderValue {
    HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("req_sim"))
}

fn bad_request(message: &str) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message,
        None,
        None,
    )
}

/// The error `type` Anthropic uses for an HTTP status.
fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

fn http_failure(status: u16, model: &str, retry_after: Option<Duration>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = error_type(status);
    let message = match kind {
        "authentication_error" => "invalid x-api-key".to_owned(),
        "not_found_error" => format!("model: {model}"),
        "rate_limit_error" => {
            "Number of request tokens has exceeded your per-minute rate limit (simulated)"
                .to_owned()
        }
        "overloaded_error" => "Overloaded".to_owned(),
        "api_error" => "Internal server error".to_owned(),
        "timeout_error" => "Request timed out".to_owned(),
        _ => "Simulated error".to_owned(),
    };
    error_response(code, kind, &message, None, retry_after)
}

/// Anthropic's "insufficient quota": a 429 whose details name the spend limit.
fn quota_failure() -> Response {
    error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        "You have reached your specified API usage limits. You will regain access on the first of next month.",
        Some(serde_json::json!({"error_code": "enforced_spend_limit_reached"})),
        None,
    )
}

struct Request {
    model: String,
    system: Option<String>,
    messages: Vec<ChatMessage>,
    stream: bool,
    max_tokens: u64,
    /// The forced tool: its name and `input_schema`.
    tool: Option<(String, Value)>,
}

/// The text of a content value: a string, or the text (and tool results/inputs) of its blocks.
fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(blocks) => Some(
            blocks
                .iter()
                .filter_map(|b| match b.get("type").and_then(Value::as_str) {
                    Some("text") => b.get("text").and_then(Value::as_str).map(str::to_owned),
                    Some("tool_result") => b.get("content").and_then(text_of),
                    Some("tool_use") => b.get("input").map(Value::to_string),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        _ => None,
    }
}

/// Why a request was rejected with 400 `invalid_request_error`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Invalid(String);

impl Invalid {
    fn new(message: &str) -> Invalid {
        Invalid(message.to_owned())
    }
}

/// Whether a model continues a conversation that ends with an assistant message: the Claude 4.6
/// models answer such a request with a 400.
fn accepts_prefill(model: &str) -> bool {
    !model.contains("-4-6")
}

fn parse(value: &Value) -> Result<Request, Invalid> {
    let Some(model) = value
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
    else {
        return Err(Invalid::new("model: Field required"));
    };
    let Some(max_tokens) = value.get("max_tokens") else {
        return Err(Invalid::new("max_tokens: Field required"));
    };
    let Some(max_tokens) = max_tokens.as_u64().filter(|n| *n >= 1) else {
        return Err(Invalid::new(&format!(
            "max_tokens: Input should be an integer greater than or equal to 1, got {max_tokens}"
        )));
    };
    let Some(raw_messages) = value.get("messages").and_then(Value::as_array) else {
        return Err(Invalid::new("messages: Field required"));
    };
    let mut messages = Vec::with_capacity(raw_messages.len());
    for (i, m) in raw_messages.iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            _ => {
                return Err(Invalid::new(&format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant'"
                )));
            }
        };
        let Some(content) = m.get("content").and_then(text_of) else {
            return Err(Invalid::new(&format!(
                "messages.{i}.content: Input should be a valid string or a list of content blocks"
            )));
        };
        messages.push(ChatMessage { role, content });
    }
    if messages.is_empty() {
        return Err(Invalid::new("messages: at least one message is required"));
    }
    if let Some(last) = messages.last().filter(|m| m.role == Role::Assistant) {
        // An assistant prefill: the 4.6 models refuse one; the others refuse it with trailing
        // whitespace.
        if !accepts_prefill(model) {
            return Err(Invalid::new(
                "This model does not support assistant message prefill. The conversation must end with a user message.",
            ));
        }
        if last.content.ends_with(char::is_whitespace) {
            return Err(Invalid::new(
                "messages: final assistant content cannot end with trailing whitespace",
            ));
        }
    }
    let system = match value.get("system") {
        None | Some(Value::Null) => None,
        Some(s) => match text_of(s) {
            Some(text) => Some(text),
            None => {
                return Err(Invalid::new(
                    "system: Input should be a valid string or a list of text blocks",
                ));
            }
        },
    };
    let tool = match value.get("tool_choice") {
        Some(choice) if choice.get("type").and_then(Value::as_str) == Some("tool") => {
            let Some(name) = choice.get("name").and_then(Value::as_str) else {
                return Err(Invalid::new("tool_choice.name: Field required"));
            };
            let schema = value
                .get("tools")
                .and_then(Value::as_array)
                .and_then(|tools| {
                    tools
                        .iter()
                        .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
                })
                .and_then(|t| t.get("input_schema"));
            let Some(schema) = schema else {
                return Err(Invalid::new(&format!(
                    "tool_choice: tool '{name}' was not found in 'tools' (or has no input_schema)"
                )));
            };
            Some((name.to_owned(), schema.clone()))
        }
        _ => None,
    };
    Ok(Request {
        model: model.to_owned(),
        system,
        messages,
        stream: value
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        max_tokens,
        tool,
    })
}

fn rate_limit_headers(state: &SimState, headers: &mut HeaderMap, input_tokens: u64) {
    let used = state.stats.requests_total() % REQUESTS_LIMIT;
    let reset = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        + time::Duration::seconds(60);
    let reset = reset
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    set(
        "anthropic-ratelimit-requests-limit",
        REQUESTS_LIMIT.to_string(),
    );
    set(
        "anthropic-ratelimit-requests-remaining",
        (REQUESTS_LIMIT - used.max(1)).to_string(),
    );
    set("anthropic-ratelimit-requests-reset", reset.clone());
    for kind in ["tokens", "input-tokens", "output-tokens"] {
        let remaining = if kind == "output-tokens" {
            TOKENS_LIMIT
        } else {
            TOKENS_LIMIT.saturating_sub(input_tokens)
        };
        let (limit, rem, rst) = match kind {
            "tokens" => (
                "anthropic-ratelimit-tokens-limit",
                "anthropic-ratelimit-tokens-remaining",
                "anthropic-ratelimit-tokens-reset",
            ),
            "input-tokens" => (
                "anthropic-ratelimit-input-tokens-limit",
                "anthropic-ratelimit-input-tokens-remaining",
                "anthropic-ratelimit-input-tokens-reset",
            ),
            _ => (
                "anthropic-ratelimit-output-tokens-limit",
                "anthropic-ratelimit-output-tokens-remaining",
                "anthropic-ratelimit-output-tokens-reset",
            ),
        };
        set(limit, TOKENS_LIMIT.to_string());
        set(rem, remaining.to_string());
        set(rst, reset.clone());
    }
}

/// `POST /v1/messages`.
pub(crate) async fn messages(
    State(state): State<Arc<SimState>>,
    conn: Option<Extension<ConnControl>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = tokio::time::Instant::now();
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            state.stats.request(None);
            return bad_request(&format!("The request body is not valid JSON: {e}"));
        }
    };
    state
        .stats
        .request(value.get("model").and_then(Value::as_str));
    // The key may come as `x-api-key` or, from the 2026-10-21 SDKs, as `Authorization: Bearer`.
    let key_header = anthropic_version::key_header(&headers);
    if state.config.require_auth && key_header.is_none() {
        return error_response(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "x-api-key header is required",
            None,
            None,
        );
    }
    let version = match anthropic_version::requested(&headers, state.config.require_auth) {
        Ok(version) => version,
        Err(message) => return bad_request(&message),
    };
    if let Err(message) = anthropic_version::check(version, &value) {
        return bad_request(&message);
    }
    let request = match parse(&value) {
        Ok(r) => r,
        Err(e) => return bad_request(&e.0),
    };
    state.stats.seen(SeenRequest {
        protocol: ProviderKind::Anthropic,
        model: request.model.clone(),
        system: request.system.clone(),
        messages: request.messages.clone(),
        schema_name: request.tool.as_ref().map(|(name, _)| name.clone()),
        max_tokens: Some(request.max_tokens),
        api_version: Some(version.as_str().to_owned()),
        key_header: key_header.map(str::to_owned),
        traceparent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        sampling: anthropic_version::sampling_parameters(&value),
    });
    let plan = match state.rules.plan(
        &request.model,
        ProviderKind::Anthropic,
        &headers,
        &state.config.latency,
        &state.config.faults,
        state.config.seed,
    ) {
        Ok(plan) => plan,
        Err(e) => return bad_request(&e.to_string()),
    };
    match plan.failure {
        Some(Failure::Http {
            status,
            retry_after,
        }) => {
            state.stats.fault();
            let mut response = http_failure(status, &request.model, retry_after);
            rate_limit_headers(&state, response.headers_mut(), 0);
            return response;
        }
        Some(Failure::Quota) => {
            state.stats.fault();
            return quota_failure();
        }
        Some(Failure::Billing) => {
            state.stats.fault();
            return error_response(
                StatusCode::PAYMENT_REQUIRED,
                "billing_error",
                "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits. (simulated)",
                None,
                None,
            );
        }
        Some(Failure::ContextTooLong) => {
            state.stats.fault();
            let tokens = prepared_input(&request.system, &request.messages);
            return bad_request(&format!(
                "prompt is too long: {tokens} tokens > {} maximum",
                tokens.saturating_sub(1)
            ));
        }
        Some(Failure::ContentPolicy) => {
            state.stats.fault();
            return bad_request("Your request was blocked by the content policy. (simulated)");
        }
        Some(ref failure @ (Failure::Silent | Failure::Reset)) => {
            return streaming::no_answer(&state, failure, conn.as_ref().map(|c| &c.0)).await;
        }
        _ => {}
    }
    let prompt = Prompt {
        model: &request.model,
        system: request.system.as_deref(),
        messages: &request.messages,
        schema: request.tool.as_ref().map(|(n, s)| (n.as_str(), s)),
    };
    let prepared = prepare(&state, &prompt, &plan, Some(request.max_tokens));
    let id = format!("msg_{}", new_id());
    let usage = usage(&prepared);
    let tool = request
        .tool
        .map(|(name, _)| (format!("toolu_{}", new_id()), name));
    let stop_reason = match (&tool, prepared.truncated) {
        (_, true) => "max_tokens",
        (Some(_), false) => "tool_use",
        (None, false) => "end_turn",
    };
    let mut response = if request.stream {
        let schema_name = tool.as_ref().map(|(_, name)| name.clone());
        let encoder = EventEncoder {
            id,
            model: request.model.clone(),
            tool,
            usage,
            stop_reason,
        };
        let script = Script {
            chunks: prepared.chunks,
            ttft: plan.ttft,
            tokens_per_sec: plan.tokens_per_sec,
            ping_every: state.config.latency.ping_every,
            failure: plan.failure,
            line_ending: plan.line_ending,
            conn: conn.as_ref().map(|c| c.0.clone()),
            served: streaming::Served {
                protocol: ProviderKind::Anthropic,
                model: request.model.clone(),
                schema_name,
                received,
            },
        };
        let mut response = streaming::body(state.clone(), script, encoder).into_response();
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    } else {
        let message = MessageObject {
            id: &id,
            kind: "message",
            role: "assistant",
            model: &request.model,
            content: vec![match &tool {
                Some((tool_id, name)) => Block::ToolUse {
                    id: tool_id,
                    name,
                    input: prepared
                        .json
                        .clone()
                        .unwrap_or(Value::Object(serde_json::Map::new())),
                },
                None => Block::Text {
                    text: &prepared.text,
                },
            }],
            stop_reason: Some(stop_reason),
            stop_sequence: None,
            usage,
        };
        match non_stream(&state, &request.model, &plan, &prepared, &message).await {
            Ok(r) => r,
            Err(r) => return r,
        }
    };
    rate_limit_headers(
        &state,
        response.headers_mut(),
        prepared_input(&request.system, &request.messages),
    );
    response
        .headers_mut()
        .insert("request-id", id_header(&format!("req_{}", new_id())));
    response
}

fn prepared_input(system: &Option<String>, messages: &[ChatMessage]) -> u64 {
    keyvex_engine::tokenize::count_prompt_tokens(system.as_deref(), messages)
}

#[derive(Serialize, Clone, Copy)]
struct Usage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
}

/// Anthropic reports cache reads apart from `input_tokens`.
fn usage(prepared: &Prepared) -> Usage {
    Usage {
        input_tokens: prepared.prompt_tokens - prepared.cached_tokens,
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: prepared.cached_tokens,
        output_tokens: prepared.output_tokens,
    }
}

#[derive(Serialize)]
struct MessageObject<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<Block<'a>>,
    stop_reason: Option<&'a str>,
    stop_sequence: Option<&'a str>,
    usage: Usage,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Value,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta<'a> {
    TextDelta { text: &'a str },
    InputJsonDelta { partial_json: &'a str },
}

#[derive(Serialize)]
struct StopDelta<'a> {
    stop_reason: &'a str,
    stop_sequence: Option<&'a str>,
}

#[derive(Serialize)]
struct InStreamError<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

/// Every event; the tag is both the `event:` name and the JSON `type`.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    MessageStart {
        message: MessageObject<'a>,
    },
    ContentBlockStart {
        index: u32,
        content_block: Block<'a>,
    },
    Ping,
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta<'a>,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: StopDelta<'a>,
        usage: Usage,
    },
    MessageStop,
    Error {
        error: InStreamError<'a>,
    },
}

impl Event<'_> {
    fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::Ping => "ping",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
            Event::Error { .. } => "error",
        }
    }

    fn bytes(&self) -> Bytes {
        streaming::sse(
            Some(self.name()),
            &serde_json::to_string(self).unwrap_or_default(),
        )
    }
}

struct EventEncoder {
    id: String,
    model: String,
    /// `(tool_use id, tool name)` when answering through a forced tool.
    tool: Option<(String, String)>,
    usage: Usage,
    stop_reason: &'static str,
}

impl Encoder for EventEncoder {
    fn open(&mut self) -> Vec<Bytes> {
        // `output_tokens` in `message_start` is provisional (1), as in the real stream.
        let message = MessageObject {
            id: &self.id,
            kind: "message",
            role: "assistant",
            model: &self.model,
            content: Vec::new(),
            stop_reason: None,
            stop_sequence: None,
            usage: Usage {
                output_tokens: 1,
                ..self.usage
            },
        };
        vec![Event::MessageStart { message }.bytes()]
    }

    fn begin(&mut self) -> Vec<Bytes> {
        let content_block = match &self.tool {
            Some((id, name)) => Block::ToolUse {
                id,
                name,
                input: Value::Object(serde_json::Map::new()),
            },
            None => Block::Text { text: "" },
        };
        vec![
            Event::ContentBlockStart {
                index: 0,
                content_block,
            }
            .bytes(),
            Event::Ping.bytes(),
        ]
    }

    fn delta(&mut self, piece: &str) -> Bytes {
        let delta = match self.tool {
            Some(_) => BlockDelta::InputJsonDelta {
                partial_json: piece,
            },
            None => BlockDelta::TextDelta { text: piece },
        };
        Event::ContentBlockDelta { index: 0, delta }.bytes()
    }

    fn finish(&mut self) -> Vec<Bytes> {
        vec![
            Event::ContentBlockStop { index: 0 }.bytes(),
            Event::MessageDelta {
                delta: StopDelta {
                    stop_reason: self.stop_reason,
                    stop_sequence: None,
                },
                usage: self.usage,
            }
            .bytes(),
        ]
    }

    fn terminator(&mut self) -> Bytes {
        Event::MessageStop.bytes()
    }

    fn error(&mut self, error_type: &str) -> Bytes {
        let message = match error_type {
            "overloaded_error" => "Overloaded",
            "rate_limit_error" => "Rate limited (simulated)",
            _ => "Internal server error (simulated)",
        };
        Event::Error {
            error: InStreamError {
                kind: error_type,
                message,
            },
        }
        .bytes()
    }

    fn malformed(&mut self) -> Bytes {
        streaming::sse(
            Some("content_block_delta"),
            "{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_d",
        )
    }

    fn ping(&mut self) -> Option<Bytes> {
        Some(Event::Ping.bytes())
    }
}

/// A whole message after the generation time; stream faults map as for OpenAI.
async fn non_stream(
    state: &Arc<SimState>,
    model: &str,
    plan: &super::knobs::Plan,
    prepared: &Prepared,
    message: &MessageObject<'_>,
) -> Result<Response, Response> {
    let took = streaming::generation_time(plan.ttft, plan.tokens_per_sec, prepared.output_tokens);
    if !streaming::wait(state, took).await {
        return Err(http_failure(529, model, None));
    }
    let json = serde_json::to_string(message).unwrap_or_default();
    let body = match &plan.failure {
        Some(Failure::Cut { .. }) => {
            state.stats.fault();
            let half = json.len() / 2;
            let parts: [Result<Bytes, std::io::Error>; 2] = [
                Ok(Bytes::from(json).slice(..half)),
                Err(std::io::Error::other("simulated connection cut")),
            ];
            Body::from_stream(futures::stream::iter(parts))
        }
        Some(Failure::Stall { stall, .. }) => {
            state.stats.fault();
            if !streaming::wait(state, *stall).await {
                return Err(http_failure(529, model, None));
            }
            Body::from(json)
        }
        Some(Failure::InStream { error_type, .. }) => {
            state.stats.fault();
            let status = match error_type.as_str() {
                "overloaded_error" => 529,
                "rate_limit_error" => 429,
                "timeout_error" => 504,
                _ => 500,
            };
            return Err(http_failure(status, model, None));
        }
        Some(Failure::Malformed { .. }) => {
            state.stats.fault();
            let half = json.len() / 2;
            Body::from(Bytes::from(json).slice(..half))
        }
        _ => Body::from(json),
    };
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
