//! The OpenAI Chat Completions side of the simulator (`POST /v1/chat/completions`), streamed
//! and not, byte-compatible with the Chat Completions streaming format (data-only
//! `chat.completion.chunk` events, an optional usage chunk, `data: [DONE]`).

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use super::content::Prompt;
use super::knobs::Failure;
use super::streaming::{self, Encoder, Script};
use keyvex_engine::clock::unix_now;

use super::serve::ConnControl;
use super::{Prepared, SeenRequest, SimState, new_id, prepare};
use keyvex_engine::provider::{ChatMessage, Role};
use keyvex_engine::stream::ProviderKind;

const REQUESTS_LIMIT: u64 = 10_000;
const TOKENS_LIMIT: u64 = 30_000_000;

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

fn error_json(kind: &str, code: Option<&str>, message: &str, param: Option<&str>) -> String {
    let body = ErrorBody {
        error: ErrorObject {
            message,
            kind,
            param,
            code,
        },
    };
    serde_json::to_string(&body).unwrap_or_default()
}

/// An HTTP error in OpenAI's shape: `{"error":{"message","type","param","code"}}`.
pub(crate) fn error_response(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    message: &str,
    param: Option<&str>,
    retry_after: Option<Duration>,
) -> Response {
    let mut response = (status, error_json(kind, code, message, param)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-request-id", id_header(&format!("req_{}", new_id())));
    if let Some(wait) = retry_after {
        // Whole seconds, rounded up, like the real header; the exact value in `retry-after-ms`.
        let secs = wait.as_millis().div_ceil(1000).max(1);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
        headers.insert("retry-after-ms", HeaderValue::from(wait.as_millis() as u64));
    }
    response
}

fn bad_request(message: &str, param: Option<&str>, code: Option<&str>) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        code,
        message,
        param,
        None,
    )
}

fn id_header(id: &str) -> HeaderValue {
    HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("req_sim"))
}

/// The HTTP failure answers, shaped like the real ones (`{"error":{message, type, param, code}}`).
fn http_failure(status: u16, model: &str, retry_after: Option<Duration>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let not_found = format!("The model `{model}` does not exist or you do not have access to it.");
    let (kind, err_code, message): (&str, Option<&str>, &str) = match status {
        400 => ("invalid_request_error", None, "Simulated bad request."),
        401 => (
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
        ),
        403 => (
            "invalid_request_error",
            Some("unsupported_country_region_territory"),
            "Country, region, or territory not supported.",
        ),
        404 => (
            "invalid_request_error",
            Some("model_not_found"),
            not_found.as_str(),
        ),
        429 => (
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached for requests (simulated). Please try again in a moment.",
        ),
        503 => (
            "server_error",
            None,
            "The server is overloaded or not ready yet.",
        ),
        500..=599 => (
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that!",
        ),
        _ => ("invalid_request_error", None, "Simulated client error."),
    };
    error_response(code, kind, err_code, message, None, retry_after)
}

fn quota_failure() -> Response {
    error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "insufficient_quota",
        Some("insufficient_quota"),
        "You exceeded your current quota, please check your plan and billing details.",
        None,
        None,
    )
}

/// The parts of a Chat Completions request the simulator acts on.
struct Request {
    model: String,
    system: Option<String>,
    messages: Vec<ChatMessage>,
    stream: bool,
    include_usage: bool,
    max_tokens: Option<u64>,
    schema: Option<(String, Value)>,
}

fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Null => Some(String::new()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        _ => None,
    }
}

/// Why a request was rejected with 400; turned into OpenAI's error body by the handler.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Invalid {
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
}

fn invalid(message: &str, param: Option<&str>, code: Option<&'static str>) -> Invalid {
    Invalid {
        message: message.to_owned(),
        param: param.map(str::to_owned),
        code,
    }
}

fn parse(value: &Value) -> Result<Request, Invalid> {
    let Some(model) = value
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
    else {
        return Err(invalid("you must provide a model parameter", None, None));
    };
    let Some(raw_messages) = value.get("messages").and_then(Value::as_array) else {
        return Err(invalid(
            "Missing required parameter: 'messages'.",
            Some("messages"),
            Some("missing_required_parameter"),
        ));
    };
    if raw_messages.is_empty() {
        return Err(invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            Some("messages"),
            Some("empty_array"),
        ));
    }
    let mut system: Vec<String> = Vec::new();
    let mut messages = Vec::new();
    for (i, m) in raw_messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let Some(content) = text_of(m.get("content").unwrap_or(&Value::Null)) else {
            return Err(invalid(
                &format!(
                    "Invalid type for 'messages[{i}].content': expected a string or an array of content parts."
                ),
                Some(&format!("messages[{i}].content")),
                Some("invalid_type"),
            ));
        };
        match role {
            "system" | "developer" => system.push(content),
            "assistant" => messages.push(ChatMessage {
                role: Role::Assistant,
                content,
            }),
            "user" | "tool" | "function" => messages.push(ChatMessage {
                role: Role::User,
                content,
            }),
            other => {
                return Err(invalid(
                    &format!(
                        "Invalid value: '{other}'. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', and 'developer'."
                    ),
                    Some(&format!("messages[{i}].role")),
                    Some("invalid_value"),
                ));
            }
        }
    }
    let stream = value
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let stream_options = value.get("stream_options").filter(|v| !v.is_null());
    if stream_options.is_some() && !stream {
        return Err(invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            Some("stream_options"),
            Some("invalid_value"),
        ));
    }
    let include_usage = stream_options
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut max_tokens = None;
    for key in ["max_completion_tokens", "max_tokens"] {
        match value.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64().filter(|n| *n >= 1) {
                Some(n) => {
                    max_tokens = Some(n);
                    break;
                }
                None => {
                    return Err(invalid(
                        &format!("Invalid '{key}': expected an integer >= 1, got {v}."),
                        Some(key),
                        Some("invalid_value"),
                    ));
                }
            },
        }
    }
    let format = value.get("response_format");
    let schema = match format.and_then(|f| f.get("type")).and_then(Value::as_str) {
        Some("json_schema") => {
            let spec = format.and_then(|f| f.get("json_schema"));
            let Some(name) = spec.and_then(|s| s.get("name")).and_then(Value::as_str) else {
                return Err(invalid(
                    "Missing required parameter: 'response_format.json_schema.name'.",
                    Some("response_format.json_schema.name"),
                    Some("missing_required_parameter"),
                ));
            };
            let schema = spec
                .and_then(|s| s.get("schema"))
                .cloned()
                .unwrap_or(Value::Object(serde_json::Map::new()));
            Some((name.to_owned(), schema))
        }
        // JSON mode: any JSON object; an object with one text field reads naturally.
        Some("json_object") => Some((
            "json_object".to_owned(),
            serde_json::json!({"type":"object","properties":{"answer":{"type":"string"}}}),
        )),
        _ => None,
    };
    Ok(Request {
        model: model.to_owned(),
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        messages,
        stream,
        include_usage,
        max_tokens,
        schema,
    })
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|key| !key.trim().is_empty())
}

fn rate_limit_headers(state: &SimState, headers: &mut HeaderMap, tokens: u64) {
    let used = state.stats.requests_total() % REQUESTS_LIMIT;
    let pairs = [
        ("x-ratelimit-limit-requests", REQUESTS_LIMIT.to_string()),
        ("x-ratelimit-limit-tokens", TOKENS_LIMIT.to_string()),
        (
            "x-ratelimit-remaining-requests",
            (REQUESTS_LIMIT - used.max(1)).to_string(),
        ),
        (
            "x-ratelimit-remaining-tokens",
            TOKENS_LIMIT.saturating_sub(tokens).to_string(),
        ),
        ("x-ratelimit-reset-requests", "6ms".to_owned()),
        ("x-ratelimit-reset-tokens", "0s".to_owned()),
    ];
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    headers.insert("openai-version", HeaderValue::from_static("2020-10-01"));
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
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
            return bad_request(
                &format!(
                    "We could not parse the JSON body of your request ({e}). (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
                ),
                None,
                None,
            );
        }
    };
    state
        .stats
        .request(value.get("model").and_then(Value::as_str));
    if state.config.require_auth && !authorized(&headers) {
        return error_response(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            None,
            None,
        );
    }
    let request = match parse(&value) {
        Ok(r) => r,
        Err(e) => return bad_request(&e.message, e.param.as_deref(), e.code),
    };
    state.stats.seen(SeenRequest {
        protocol: ProviderKind::OpenAi,
        model: request.model.clone(),
        system: request.system.clone(),
        messages: request.messages.clone(),
        schema_name: request.schema.as_ref().map(|(name, _)| name.clone()),
        max_tokens: request.max_tokens,
        api_version: None,
        key_header: authorized(&headers).then(|| "authorization".to_owned()),
        traceparent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        sampling: ["temperature", "top_p"]
            .into_iter()
            .filter(|name| value.get(*name).is_some())
            .map(str::to_owned)
            .collect(),
    });
    let plan = match state.rules.plan(
        &request.model,
        ProviderKind::OpenAi,
        &headers,
        &state.config.latency,
        &state.config.faults,
        state.config.seed,
    ) {
        Ok(plan) => plan,
        Err(e) => return bad_request(&e.to_string(), None, Some("invalid_sim_header")),
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
        Some(Failure::Quota | Failure::Billing) => {
            state.stats.fault();
            return quota_failure();
        }
        Some(Failure::ContextTooLong) => {
            state.stats.fault();
            let tokens = prompt_total(&request);
            let message = format!(
                "This model's maximum context length is {} tokens. However, your messages resulted in {tokens} tokens. Please reduce the length of the messages. (simulated)",
                tokens.saturating_sub(1)
            );
            return bad_request(&message, Some("messages"), Some("context_length_exceeded"));
        }
        Some(Failure::ContentPolicy) => {
            state.stats.fault();
            return bad_request(
                "Your request was rejected as a result of our safety system. (simulated)",
                None,
                Some("content_policy_violation"),
            );
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
        schema: request.schema.as_ref().map(|(n, s)| (n.as_str(), s)),
    };
    let prepared = prepare(&state, &prompt, &plan, request.max_tokens);
    let id = format!("chatcmpl-{}", new_id());
    let created = unix_now();
    let mut response = if request.stream {
        let encoder = ChunkEncoder {
            id: id.clone(),
            created,
            model: request.model.clone(),
            include_usage: request.include_usage,
            finish_reason: finish_reason(&prepared),
            usage: usage(&prepared),
        };
        let script = Script {
            chunks: prepared.chunks,
            ttft: plan.ttft,
            tokens_per_sec: plan.tokens_per_sec,
            ping_every: Duration::ZERO,
            failure: plan.failure,
            line_ending: plan.line_ending,
            conn: conn.as_ref().map(|c| c.0.clone()),
            served: streaming::Served {
                protocol: ProviderKind::OpenAi,
                model: request.model.clone(),
                schema_name: request.schema.as_ref().map(|(name, _)| name.clone()),
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
        match non_stream(&state, &request.model, &id, created, &plan, prepared).await {
            Ok(r) => r,
            Err(r) => return r,
        }
    };
    let tokens = prompt_total(&request);
    rate_limit_headers(&state, response.headers_mut(), tokens);
    response
        .headers_mut()
        .insert("x-request-id", id_header(&format!("req_{}", new_id())));
    response
}

fn prompt_total(request: &Request) -> u64 {
    keyvex_engine::tokenize::count_prompt_tokens(request.system.as_deref(), &request.messages)
}

fn finish_reason(prepared: &Prepared) -> &'static str {
    if prepared.truncated { "length" } else { "stop" }
}

#[derive(Serialize, Clone)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptDetails,
    completion_tokens_details: CompletionDetails,
}

#[derive(Serialize, Clone)]
struct PromptDetails {
    cached_tokens: u64,
    audio_tokens: u64,
}

#[derive(Serialize, Clone)]
struct CompletionDetails {
    reasoning_tokens: u64,
    audio_tokens: u64,
    accepted_prediction_tokens: u64,
    rejected_prediction_tokens: u64,
}

/// OpenAI counts cached tokens inside `prompt_tokens`.
fn usage(prepared: &Prepared) -> Usage {
    Usage {
        prompt_tokens: prepared.prompt_tokens,
        completion_tokens: prepared.output_tokens,
        total_tokens: prepared.prompt_tokens + prepared.output_tokens,
        prompt_tokens_details: PromptDetails {
            cached_tokens: prepared.cached_tokens,
            audio_tokens: 0,
        },
        completion_tokens_details: CompletionDetails {
            reasoning_tokens: 0,
            audio_tokens: 0,
            accepted_prediction_tokens: 0,
            rejected_prediction_tokens: 0,
        },
    }
}

const FINGERPRINT: &str = "fp_keyvexsim";

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: Vec<ChunkChoice<'a>>,
    /// Absent without `include_usage`; `null` on every chunk but the usage one with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<&'a Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<Option<&'a str>>,
}

struct ChunkEncoder {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    finish_reason: &'static str,
    usage: Usage,
}

impl ChunkEncoder {
    fn chunk(&self, choices: Vec<ChunkChoice<'_>>, usage: Option<&Usage>) -> Bytes {
        let chunk = Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            system_fingerprint: FINGERPRINT,
            choices,
            usage: self.include_usage.then_some(usage),
        };
        streaming::sse(None, &serde_json::to_string(&chunk).unwrap_or_default())
    }

    fn choice<'a>(delta: Delta<'a>, finish_reason: Option<&'a str>) -> Vec<ChunkChoice<'a>> {
        vec![ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        }]
    }
}

impl Encoder for ChunkEncoder {
    fn open(&mut self) -> Vec<Bytes> {
        Vec::new()
    }

    fn begin(&mut self) -> Vec<Bytes> {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(""),
            refusal: Some(None),
        };
        vec![self.chunk(Self::choice(delta, None), None)]
    }

    fn delta(&mut self, piece: &str) -> Bytes {
        let delta = Delta {
            content: Some(piece),
            ..Delta::default()
        };
        self.chunk(Self::choice(delta, None), None)
    }

    fn finish(&mut self) -> Vec<Bytes> {
        let mut out = vec![self.chunk(
            Self::choice(Delta::default(), Some(self.finish_reason)),
            None,
        )];
        if self.include_usage {
            out.push(self.chunk(Vec::new(), Some(&self.usage)));
        }
        out
    }

    fn terminator(&mut self) -> Bytes {
        streaming::sse(None, "[DONE]")
    }

    fn error(&mut self, error_type: &str) -> Bytes {
        let message = match error_type {
            "rate_limit_exceeded" | "rate_limit_error" => {
                "Rate limit reached mid-stream (simulated)."
            }
            "overloaded_error" => "The server is overloaded (simulated).",
            _ => "The server had an error while processing your request (simulated).",
        };
        streaming::sse(None, &error_json(error_type, None, message, None))
    }

    fn malformed(&mut self) -> Bytes {
        streaming::sse(
            None,
            &format!(
                "{{\"id\":\"{}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"delta\":",
                self.id
            ),
        )
    }

    fn ping(&mut self) -> Option<Bytes> {
        None
    }
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<CompletionChoice<'a>>,
    usage: Usage,
    system_fingerprint: &'static str,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: &'a str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<&'a str>,
    annotations: Vec<()>,
}

/// A whole `chat.completion`, after the time the generation would take. Stream faults map to
/// what a non-streamed client would see: a cut body, a late answer, an HTTP error, bad JSON.
async fn non_stream(
    state: &Arc<SimState>,
    model: &str,
    id: &str,
    created: u64,
    plan: &super::knobs::Plan,
    prepared: Prepared,
) -> Result<Response, Response> {
    let took = streaming::generation_time(plan.ttft, plan.tokens_per_sec, prepared.output_tokens);
    if !streaming::wait(state, took).await {
        return Err(http_failure(503, model, None));
    }
    let completion = Completion {
        id,
        object: "chat.completion",
        created,
        model,
        choices: vec![CompletionChoice {
            index: 0,
            message: Message {
                role: "assistant",
                content: &prepared.text,
                refusal: None,
                annotations: Vec::new(),
            },
            logprobs: None,
            finish_reason: finish_reason(&prepared),
        }],
        usage: usage(&prepared),
        system_fingerprint: FINGERPRINT,
    };
    let json = serde_json::to_string(&completion).unwrap_or_default();
    let body = match &plan.failure {
        Some(Failure::Cut { .. }) => {
            state.stats.fault();
            let half = json.len() / 2;
            let head = Bytes::from(json).slice(..half);
            let parts: [Result<Bytes, std::io::Error>; 2] = [
                Ok(head),
                Err(std::io::Error::other("simulated connection cut")),
            ];
            Body::from_stream(futures::stream::iter(parts))
        }
        Some(Failure::Stall { stall, .. }) => {
            state.stats.fault();
            if !streaming::wait(state, *stall).await {
                return Err(http_failure(503, model, None));
            }
            Body::from(json)
        }
        Some(Failure::InStream { error_type, .. }) => {
            state.stats.fault();
            let status = match error_type.as_str() {
                "rate_limit_exceeded" | "rate_limit_error" => 429,
                "overloaded_error" => 503,
                _ => 500,
            };
            return Err(http_failure(status, model, None));
        }
        Some(Failure::Malformed { .. }) => {
            state.stats.fault();
            // Half a JSON document: what a proxy that mangles bodies produces.
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
