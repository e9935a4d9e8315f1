//! `POST /v1/chat/completions`: OpenAI-compatible, streaming and not. `model` is a process
//! (`magicSpark`, routed with fallback) or a catalog model id (that model only).
//!
//! The response status is decided only when the first content arrives: a route that fails
//! before any content is an HTTP error in OpenAI's shape; after content, a failure is an
//! in-stream `data: {"error":…}` event, as OpenAI sends it.

use std::sync::LazyLock;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use keyvex_engine::admission::FirstCallOf;
use keyvex_engine::call::{CallContext, CallEvent, CallStream};
use keyvex_engine::clock::unix_now;
use keyvex_engine::provider::{ChatMessage, ProviderError, ResponseSchema};
use keyvex_engine::record::Recorded;
use keyvex_engine::router::{
    AttemptError, CallTarget, Rescue, RouteError, RouteOptions, RouteOutcome, RouteRequest,
};

mod chunks;

use chunks::ChatChunks;

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson};
use crate::layers::AdmissionLimit;
use crate::routes::budgets::{admit, set_headers};
use crate::sse::{Event, data};
use crate::state::{AppState, await_durable, request_id};

/// The route; its caller limit is taken at admission (see `layers`).
pub(crate) const PATH: &str = "/v1/chat/completions";

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route(PATH, post(completions))
}

/// The subset of OpenAI's request we act on; other fields are accepted and ignored, as SDKs
/// send many.
#[derive(Debug, Deserialize)]
struct ChatBody {
    model: String,
    messages: Vec<InMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize)]
struct JsonSchemaFormat {
    name: String,
    #[serde(default)]
    schema: Option<Value>,
}

fn text_of(i: usize, content: Option<Content>) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.into_iter().enumerate() {
                if p.kind != "text" {
                    return Err(ApiError::bad_request(
                        "unsupported_content",
                        Some(&format!("messages[{i}].content[{j}].type")),
                        format!(
                            "content part type {:?} is not supported; send text parts",
                            p.kind
                        ),
                    ));
                }
                out.push_str(&p.text.unwrap_or_default());
            }
            Ok(out)
        }
    }
}

fn route_request(body: &mut ChatBody) -> Result<RouteRequest, ApiError> {
    if body.messages.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_field",
            Some("messages"),
            "`messages` is empty; send at least one user message",
        ));
    }
    let mut system: Vec<String> = Vec::new();
    // Sized to the request: the route keeps the messages for as long as it streams (a retry
    // sends them again), and a first push makes room for four.
    let mut messages = Vec::with_capacity(body.messages.len());
    for (i, m) in std::mem::take(&mut body.messages).into_iter().enumerate() {
        let text = text_of(i, m.content)?;
        match m.role.as_str() {
            "system" | "developer" => system.push(text),
            "user" => messages.push(ChatMessage::user(text)),
            "assistant" => messages.push(ChatMessage::assistant(text)),
            other => {
                return Err(ApiError::bad_request(
                    "unsupported_role",
                    Some(&format!("messages[{i}].role")),
                    format!(
                        "role {other:?} is not supported; use system, developer, user or assistant"
                    ),
                ));
            }
        }
    }
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_field",
            Some("messages"),
            "`messages` has no user message; add one",
        ));
    }
    let response_schema = match body.response_format.take() {
        Some(ResponseFormat::JsonSchema { json_schema }) => Some(ResponseSchema {
            name: json_schema.name,
            schema: json_schema
                .schema
                .unwrap_or_else(|| json!({ "type": "object" })),
        }),
        Some(ResponseFormat::Text | ResponseFormat::JsonObject) | None => None,
    };
    Ok(RouteRequest {
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        messages,
        response_schema,
        max_output_tokens: body.max_completion_tokens.or(body.max_tokens),
        temperature: body.temperature,
    })
}

fn route_error(e: RouteError) -> ApiError {
    match e {
        RouteError::Rejected { error, model, .. } => rejected(&model, &error),
        RouteError::Budget { denied, .. } => ApiError::Budget(denied),
        RouteError::UnknownModel { model, known } => ApiError::NotFound {
            code: "model_not_found",
            param: Some("model".to_owned()),
            message: format!(
                "model {model:?} does not exist; use a process (magicSpark, logicArchitect, contentCrafter, styleMaster) or a catalog model: {}",
                known.join(", ")
            ),
        },
        other => upstream_error(&other),
    }
}

/// The provider's refusal of the request, with its code (`context_length_exceeded`,
/// `content_policy_violation`, …) or, when it sent none, its error type or our kind.
fn rejected(model: &str, error: &ProviderError) -> ApiError {
    let (code, message) = match error {
        ProviderError::Http {
            code,
            error_type,
            message,
            ..
        } => (
            code.clone()
                .or_else(|| error_type.clone())
                .unwrap_or_else(|| error.kind().to_owned()),
            format!("{model} refused the request: {message}; change the request before retrying"),
        ),
        other => (other.kind().to_owned(), other.to_string()),
    };
    ApiError::Rejected { code, message }
}

/// A route that failed before any content, as an HTTP error.
fn upstream_error(e: &RouteError) -> ApiError {
    let attempts = e.attempts();
    let provider_errors: Vec<_> = attempts
        .iter()
        .filter_map(|(_, _, a)| match a {
            AttemptError::Provider(p) => Some(p),
            _ => None,
        })
        .collect();
    // Every attempt was refused for rate: the provider's 429s, or our own budget for it.
    let all_rate_limited = !attempts.is_empty()
        && attempts.iter().all(|(_, _, a)| match a {
            AttemptError::Provider(p) => p.kind() == "rate_limited",
            AttemptError::BudgetRefused { .. } => true,
            _ => false,
        });
    let budget_waits = attempts.iter().filter_map(|(_, _, a)| match a {
        AttemptError::BudgetRefused { retry_after, .. } => Some(*retry_after),
        _ => None,
    });
    let (status, code) = match e {
        RouteError::NoProvider { .. } => (StatusCode::SERVICE_UNAVAILABLE, "no_provider"),
        RouteError::RetryBudgetExhausted { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "retry_budget_exhausted")
        }
        RouteError::DeadlineExceeded { .. } => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
        _ if all_rate_limited => (StatusCode::TOO_MANY_REQUESTS, "upstream_rate_limited"),
        _ => (StatusCode::BAD_GATEWAY, "upstream_failed"),
    };
    ApiError::Upstream {
        status,
        code,
        message: e.to_string(),
        retry_after: provider_errors
            .iter()
            .filter_map(|p| p.retry_after())
            .chain(budget_waits)
            .min(),
    }
}

/// Identity of one completion: the same in every chunk.
struct Meta {
    id: String,
    created: u64,
    model: String,
}

/// One `chat.completion.chunk`, borrowing everything: a chunk is encoded straight from the
/// route's delta into its SSE frame, with no JSON tree and no copies of id and model.
#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    /// One choice, or none in the usage chunk.
    choices: &'a [Choice<'a>],
    usage: Option<WireUsage>,
    /// On the last chunks of an answer whose stream broke and was continued by another call:
    /// from which model to which. Not an OpenAI field; the official SDKs ignore it.
    #[serde(skip_serializing_if = "Option::is_none")]
    keyvex: Option<Resumed<'a>>,
}

/// `{"resumed": [{"from": …, "to": …}, …]}`: the continued answer's seams, in order.
#[derive(Serialize)]
struct Resumed<'a> {
    resumed: Vec<Seam<'a>>,
}

#[derive(Serialize)]
struct Seam<'a> {
    from: &'a str,
    to: &'a str,
}

fn resumed(o: &RouteOutcome) -> Option<Resumed<'_>> {
    o.rescued().then(|| Resumed {
        resumed: o
            .rescues
            .iter()
            .map(|r| Seam {
                from: &r.from,
                to: &r.to,
            })
            .collect(),
    })
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    delta: Delta<'a>,
    /// Always `null`: we never ask for log probabilities.
    logprobs: (),
    finish_reason: Option<&'a str>,
}

/// `{"role":"assistant","content":""}` first, `{"content":…}` per delta, `{}` at the end.
#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

impl<'a> Delta<'a> {
    fn content(text: &'a str) -> Self {
        Delta {
            role: None,
            content: Some(text),
        }
    }
}

/// OpenAI's `usage` object.
#[derive(Serialize)]
struct WireUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptDetails,
    completion_tokens_details: CompletionDetails,
}

#[derive(Serialize)]
struct PromptDetails {
    cached_tokens: u64,
}

#[derive(Serialize)]
struct CompletionDetails {
    reasoning_tokens: u64,
}

impl Meta {
    /// One `chat.completion.chunk` of this answer.
    fn frame<'a>(
        &'a self,
        choices: &'a [Choice<'a>],
        usage: Option<WireUsage>,
        keyvex: Option<Resumed<'a>>,
    ) -> Event {
        data(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
            keyvex,
        })
    }

    fn chunk(&self, delta: Delta<'_>, finish_reason: Option<&str>) -> Event {
        let choice = Choice {
            index: 0,
            delta,
            logprobs: (),
            finish_reason,
        };
        self.frame(&[choice], None, None)
    }

    /// The chunk with the finish reason (and, on a continued answer, where it was resumed).
    fn last_chunk(&self, o: &RouteOutcome) -> Event {
        let choice = Choice {
            index: 0,
            delta: Delta::default(),
            logprobs: (),
            finish_reason: Some(finish_reason(o)),
        };
        self.frame(&[choice], None, resumed(o))
    }

    fn usage_chunk(&self, o: &RouteOutcome) -> Event {
        self.frame(&[], Some(wire_usage(o)), resumed(o))
    }
}

fn wire_usage(o: &RouteOutcome) -> WireUsage {
    WireUsage {
        prompt_tokens: o.usage.input,
        completion_tokens: o.usage.output,
        total_tokens: o.usage.total(),
        prompt_tokens_details: PromptDetails {
            cached_tokens: o.usage.cached_input,
        },
        completion_tokens_details: CompletionDetails {
            reasoning_tokens: 0,
        },
    }
}

fn finish_reason(o: &RouteOutcome) -> &str {
    o.finish_reason.as_ref().map_or("stop", |f| f.as_str())
}

/// The chunk that ends a stream cut at the drain deadline. The same for every stream, so built
/// once and shared: a copy of its own in every open stream was about 170 bytes.
static SHUTDOWN: LazyLock<Event> = LazyLock::new(|| {
    error_chunk(
        "the server is shutting down and ended this stream after the drain deadline; retry the request",
        "shutdown",
    )
});

/// An error after the stream opened, as OpenAI sends one: a `data:` event of its own.
fn error_chunk(message: &str, code: &str) -> Event {
    data(&json!({ "error": {
        "message": message,
        "type": "server_error",
        "param": null,
        "code": code,
    }}))
}

/// Where the call stood when the response status was decided.
enum Peeked {
    /// Content flows: the first delta and the rest of the call.
    Content(String, CallStream),
    /// Finished without content.
    Finished(Box<RouteOutcome>, Recorded),
}

/// The line that says a chat answer was resumed on another call (the last chunk says it too).
fn log_resume(rescue: &Rescue) {
    tracing::info!(from = %rescue.from, to = %rescue.to, reason = %rescue.reason, delivered_bytes = rescue.delivered_bytes as u64, "chat stream resumed");
}

/// Waits until the call's record is durable, so what the client is told next survives a crash.
async fn committed(record: Recorded) {
    await_durable("call record", &record.id, record.receipt).await;
}

/// Waits for the first content (or the end), noting the answering model. A call dropped here
/// (the client went away) is recorded by the engine as cancelled.
async fn peek(mut call: CallStream, model: &mut String) -> Result<Peeked, ApiError> {
    while let Some(ev) = call.next().await {
        match ev {
            CallEvent::Start { model: m, .. } => *model = m,
            CallEvent::Fallback { .. } => {}
            // Only after content, which `peek` never waits past.
            CallEvent::Rescue(rescue) => log_resume(&rescue),
            CallEvent::Delta(text) => return Ok(Peeked::Content(text, call)),
            CallEvent::Finished { outcome, record } => {
                return Ok(Peeked::Finished(outcome, record));
            }
            CallEvent::Failed { failure, record } => {
                committed(record).await;
                return Err(route_error(failure.error));
            }
        }
    }
    Err(ApiError::Internal(
        "the call ended without a result".to_owned(),
    ))
}

async fn completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(limit): Extension<AdmissionLimit>,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<ChatBody>,
) -> Result<Response, ApiError> {
    let request = route_request(&mut body)?;
    let target = CallTarget::parse(&body.model);
    state.ensure_accepting()?;
    let request_id = request_id(&headers);
    let mut ctx = CallContext::new(&caller.id).with_correlation(&request_id);
    let budgets = admit(
        &state,
        &mut ctx,
        &limit,
        FirstCallOf::Chat(&target, &request),
    )
    .await?;
    // The deltas are relayed as they come; only the non-streaming answer needs the whole text,
    // and it gathers it from the deltas itself.
    let options = RouteOptions {
        keep_text: false,
        continue_only: true,
    };
    let call = state
        .engine()
        .chat(&ctx, &target, request, options)
        .map_err(route_error)?;
    let mut meta = Meta {
        id: format!("chatcmpl-{request_id}"),
        created: unix_now(),
        model: body.model.clone(),
    };
    let include_usage = body
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);

    if !body.stream.unwrap_or(false) {
        let mut response = complete(call, meta).await?;
        set_headers(&mut response, &budgets);
        return Ok(response);
    }

    let peeked = peek(call, &mut meta.model).await?;
    let events = ChatChunks::new(meta, include_usage, peeked);
    let mut response = state.sse(events.boxed(), SHUTDOWN.clone());
    set_headers(&mut response, &budgets);
    Ok(response)
}

/// The non-streaming answer: the whole completion once the call finished.
async fn complete(call: CallStream, mut meta: Meta) -> Result<Response, ApiError> {
    let (outcome, text) = match peek(call, &mut meta.model).await? {
        Peeked::Finished(o, record) => {
            committed(record).await;
            (o, String::new())
        }
        Peeked::Content(first, mut call) => {
            let mut text = first;
            let mut end = None;
            while let Some(ev) = call.next().await {
                match ev {
                    CallEvent::Delta(t) => text.push_str(&t),
                    CallEvent::Finished { outcome, record } => {
                        committed(record).await;
                        end = Some(outcome);
                        break;
                    }
                    CallEvent::Failed { failure, record } => {
                        committed(record).await;
                        return Err(ApiError::Upstream {
                            status: StatusCode::BAD_GATEWAY,
                            code: "upstream_failed",
                            message: failure.error.to_string(),
                            retry_after: None,
                        });
                    }
                    CallEvent::Rescue(rescue) => log_resume(&rescue),
                    CallEvent::Start { .. } | CallEvent::Fallback { .. } => {}
                }
            }
            let Some(o) = end else {
                return Err(ApiError::Internal(
                    "the call ended without a result".to_owned(),
                ));
            };
            (o, text)
        }
    };
    let mut body = json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": outcome.model.clone().unwrap_or(meta.model),
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text, "refusal": null },
            "logprobs": null,
            "finish_reason": finish_reason(&outcome),
        }],
        "usage": wire_usage(&outcome),
    });
    if let Some(resumed) = resumed(&outcome) {
        body["keyvex"] = json!(resumed);
    }
    Ok(Json(body).into_response())
}
