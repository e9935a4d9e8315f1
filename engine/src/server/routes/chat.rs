//! `POST /v1/chat/completions`: OpenAI-compatible, streaming and not. `model` is a process
//! (`magicSpark`, routed with fallback) or a catalog model id (that model only).
//!
//! The response status is decided only when the first content arrives: a route that fails
//! before any content is an HTTP error in OpenAI's shape; after content, a failure is an
//! in-stream `data: {"error":…}` event, as OpenAI sends it.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use agents::Process;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::metrics::RequestRecord;
use crate::provider::{ChatMessage, ResponseSchema};
use crate::router::{
    AttemptError, RouteError, RouteEvent, RouteFailure, RouteOptions, RouteOutcome, RouteRequest,
    RouteStream,
};
use crate::server::auth::Caller;
use crate::server::error::{ApiError, ApiJson};
use crate::server::sse::{CallScope, Event, Scoped, data};
use crate::server::{AppState, request_id};

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/v1/chat/completions", post(completions))
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
    let mut messages = Vec::new();
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
    let all_rate_limited =
        !provider_errors.is_empty() && provider_errors.iter().all(|p| p.kind() == "rate_limited");
    let (status, code) = match e {
        RouteError::NoProvider { .. } => (StatusCode::SERVICE_UNAVAILABLE, "no_provider"),
        RouteError::RetryBudgetExhausted { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "retry_budget_exhausted")
        }
        _ if all_rate_limited => (StatusCode::TOO_MANY_REQUESTS, "upstream_rate_limited"),
        _ => (StatusCode::BAD_GATEWAY, "upstream_failed"),
    };
    ApiError::Upstream {
        status,
        code,
        message: e.to_string(),
        retry_after: provider_errors.iter().filter_map(|p| p.retry_after()).min(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
    fn chunk(&self, delta: Delta<'_>, finish_reason: Option<&str>) -> Event {
        data(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: &[Choice {
                index: 0,
                delta,
                logprobs: (),
                finish_reason,
            }],
            usage: None,
        })
    }

    fn usage_chunk(&self, o: &RouteOutcome) -> Event {
        data(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: &[],
            usage: Some(wire_usage(o)),
        })
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

/// Where the route stood when the response status was decided.
enum Peeked {
    /// Content flows: the first delta and the rest of the route.
    Content(String, RouteStream),
    /// Finished without content.
    Finished(RouteOutcome),
}

async fn record(state: &AppState, scope: &CallScope, o: &RouteOutcome) {
    state
        .record_durably(RequestRecord::from_route_outcome(o, &scope.context(None)))
        .await;
}

/// Waits for the first content (or the end), noting the answering model.
async fn peek(
    state: &AppState,
    scope: &CallScope,
    mut route: RouteStream,
    model: &mut String,
) -> Result<Peeked, ApiError> {
    while let Some(ev) = route.next().await {
        match ev {
            RouteEvent::Start { model: m, .. } => *model = m,
            RouteEvent::Fallback { .. } => {}
            RouteEvent::Delta(text) => return Ok(Peeked::Content(text, route)),
            RouteEvent::Finished(o) => return Ok(Peeked::Finished(o)),
            RouteEvent::Failed(RouteFailure { error, outcome }) => {
                record(state, scope, &outcome).await;
                return Err(upstream_error(&error));
            }
        }
    }
    Err(ApiError::Internal(
        "the route ended without a result".to_owned(),
    ))
}

async fn completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<ChatBody>,
) -> Result<Response, ApiError> {
    let request = route_request(&mut body)?;
    let process = body.model.parse::<Process>().ok();
    // The route's deltas are relayed as they come; only the non-streaming answer needs the
    // whole text, and it gathers it from the deltas itself.
    let options = RouteOptions { keep_text: false };
    let route = match process {
        Some(p) => state.router().stream_process_with(p, request, options),
        None => state
            .router()
            .stream_model_with(&body.model, request, options)
            .map_err(route_error)?,
    };
    state.ensure_accepting()?;
    let request_id = request_id(&headers);
    let scope = CallScope::new(&caller.id, &request_id, process, None);
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
        return Scoped::new(
            Arc::clone(&scope),
            complete(state, scope.clone(), route, meta),
        )
        .await;
    }

    let peeked = Scoped::new(
        Arc::clone(&scope),
        peek_owned(state.clone(), scope.clone(), route, meta.model.clone()),
    )
    .await?;
    let (peeked, model) = peeked;
    meta.model = model;
    let events = {
        let state = state.clone();
        let scope = Arc::clone(&scope);
        async_stream::stream! {
            yield meta.chunk(Delta { role: Some("assistant"), content: Some("") }, None);
            let mut route = match peeked {
                Peeked::Finished(o) => {
                    record(&state, &scope, &o).await;
                    yield meta.chunk(Delta::default(), Some(finish_reason(&o)));
                    if include_usage {
                        yield meta.usage_chunk(&o);
                    }
                    yield Event::text("[DONE]");
                    return;
                }
                Peeked::Content(first, route) => {
                    yield meta.chunk(Delta::content(&first), None);
                    route
                }
            };
            while let Some(ev) = route.next().await {
                match ev {
                    RouteEvent::Delta(text) => yield meta.chunk(Delta::content(&text), None),
                    RouteEvent::Finished(o) => {
                        record(&state, &scope, &o).await;
                        yield meta.chunk(Delta::default(), Some(finish_reason(&o)));
                        if include_usage {
                            yield meta.usage_chunk(&o);
                        }
                        yield Event::text("[DONE]");
                        return;
                    }
                    RouteEvent::Failed(f) => {
                        record(&state, &scope, &f.outcome).await;
                        yield data(&json!({ "error": {
                            "message": f.error.to_string(),
                            "type": "server_error",
                            "param": null,
                            "code": f.error.kind(),
                        }}));
                        return;
                    }
                    RouteEvent::Start { .. } | RouteEvent::Fallback { .. } => {}
                }
            }
        }
    };
    let shutdown = data(&json!({ "error": {
        "message": "the server is shutting down and ended this stream after the drain deadline; retry the request",
        "type": "server_error",
        "param": null,
        "code": "shutdown",
    }}));
    Ok(state.sse(events.boxed(), scope, shutdown))
}

async fn peek_owned(
    state: AppState,
    scope: Arc<CallScope>,
    route: RouteStream,
    mut model: String,
) -> Result<(Peeked, String), ApiError> {
    let peeked = peek(&state, &scope, route, &mut model).await?;
    Ok((peeked, model))
}

/// The non-streaming answer: the whole completion once the route finished.
async fn complete(
    state: AppState,
    scope: Arc<CallScope>,
    route: RouteStream,
    mut meta: Meta,
) -> Result<Response, ApiError> {
    let (outcome, text) = match peek(&state, &scope, route, &mut meta.model).await? {
        Peeked::Finished(o) => {
            record(&state, &scope, &o).await;
            (o, String::new())
        }
        Peeked::Content(first, mut route) => {
            let mut text = first;
            let mut end = None;
            while let Some(ev) = route.next().await {
                match ev {
                    RouteEvent::Delta(t) => text.push_str(&t),
                    RouteEvent::Finished(o) => {
                        record(&state, &scope, &o).await;
                        end = Some(o);
                        break;
                    }
                    RouteEvent::Failed(f) => {
                        record(&state, &scope, &f.outcome).await;
                        return Err(ApiError::Upstream {
                            status: StatusCode::BAD_GATEWAY,
                            code: "upstream_failed",
                            message: f.error.to_string(),
                            retry_after: None,
                        });
                    }
                    RouteEvent::Start { .. } | RouteEvent::Fallback { .. } => {}
                }
            }
            let Some(o) = end else {
                return Err(ApiError::Internal(
                    "the route ended without a result".to_owned(),
                ));
            };
            (o, text)
        }
    };
    let body = json!({
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
    Ok(Json(body).into_response())
}
