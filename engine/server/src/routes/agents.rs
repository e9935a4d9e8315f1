//! `POST /v1/agents/{agent}`: one agent run as SSE.

use agents::Process;
use axum::Extension;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use serde::Deserialize;
use serde_json::json;

use keyvex_engine::admission::FirstCallOf;
use keyvex_engine::record::Recorded;
use keyvex_engine::{AgentEvent, AgentOutcome, CallContext, CallUsage};

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson};
use crate::layers::AdmissionLimit;
use crate::routes::budgets::{admit, set_headers};
use crate::routes::sessions::check_session_owner;
use crate::sse::{Event, event};
use crate::state::{AppState, await_durable, request_id};

/// The route; its caller limit is taken at admission (see `layers`).
pub(crate) const PATH: &str = "/v1/agents/{agent}";

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route(PATH, post(run))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AgentBody {
    input: serde_json::Value,
    #[serde(default)]
    session_id: Option<String>,
}

pub(super) fn parse_agent(agent: &str) -> Result<Process, ApiError> {
    agent.parse::<Process>().map_err(|e| ApiError::NotFound {
        code: "unknown_agent",
        param: Some("agent".to_owned()),
        message: e.to_string(),
    })
}

/// Rejects an input the agent's prompt cannot be rendered from, before any stream opens.
pub(super) fn check_input(
    process: Process,
    input: &serde_json::Value,
    param: &str,
) -> Result<(), ApiError> {
    if !input.is_object() {
        return Err(ApiError::bad_request(
            "invalid_field",
            Some(param),
            format!("`{param}` must be a JSON object with {process}'s input fields"),
        ));
    }
    agents::render(process, input).map(drop).map_err(|e| {
        ApiError::bad_request(
            "invalid_input",
            Some(param),
            format!("`{param}` is not a valid {process} input: {e}"),
        )
    })
}

async fn run(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    Extension(caller): Extension<Caller>,
    Extension(limit): Extension<AdmissionLimit>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<AgentBody>,
) -> Result<Response, ApiError> {
    let process = parse_agent(&agent)?;
    check_input(process, &body.input, "input")?;
    check_session_id(body.session_id.as_deref())?;
    check_session_owner(&state, &caller, body.session_id.as_deref()).await?;
    state.ensure_accepting()?;
    let request_id = request_id(&headers);
    let mut ctx = CallContext::new(&caller.id)
        .with_correlation(&request_id)
        .with_session(body.session_id);
    // Over budget: a plain 429 before any call or stream.
    let budgets = admit(
        &state,
        &mut ctx,
        &limit,
        FirstCallOf::Agent(process, &body.input),
    )
    .await?;
    let mut agent = state.engine().agent(ctx, process, body.input);
    let events = async_stream::stream! {
        let mut held = HeldUsage::default();
        loop {
            let next = tokio::select! {
                biased;
                Some(usage) = held.next(), if !held.is_empty() => Next::Committed(usage),
                ev = agent.next() => Next::Produced(ev),
            };
            let ev = match next {
                Next::Committed(usage) => {
                    yield usage;
                    continue;
                }
                Next::Produced(Some(ev)) => ev,
                Next::Produced(None) => break,
            };
            match ev {
                AgentEvent::Result { output, outcome, messages } => {
                    while let Some(usage) = held.next().await {
                        yield usage;
                    }
                    // The session holds input and output before the caller is told it is done.
                    await_durable("session messages", &request_id, messages).await;
                    yield event("result", &json!({ "stage": process, "output": output }));
                    yield done(&request_id, process, "succeeded", &outcome);
                }
                AgentEvent::Error { error, outcome, messages } => {
                    while let Some(usage) = held.next().await {
                        yield usage;
                    }
                    await_durable("session messages", &request_id, messages).await;
                    yield event("error", &json!({ "stage": process, "kind": error.kind(), "message": error.to_string() }));
                    yield done(&request_id, process, "failed", &outcome);
                }
                other => {
                    if let Some(e) = translate(&request_id, process, other, &mut held) {
                        yield e;
                    }
                }
            }
        }
        // The agent always ends with `Result` or `Error`, which flush; this keeps a held event
        // from being dropped if that ever changed.
        while let Some(usage) = held.next().await {
            yield usage;
        }
    };
    let shutdown = shutdown_event(Some(process));
    let mut response = state.sse(events.boxed(), shutdown);
    set_headers(&mut response, &budgets);
    Ok(response)
}

/// Longest accepted `sessionId`, the same bound the session read routes apply.
const MAX_SESSION_ID_CHARS: usize = 256;

/// A session id must be readable back through `GET /v1/sessions/{id}`.
pub(super) fn check_session_id(id: Option<&str>) -> Result<(), ApiError> {
    let Some(id) = id else { return Ok(()) };
    if id.trim().is_empty()
        || id.chars().count() > MAX_SESSION_ID_CHARS
        || id.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request(
            "invalid_field",
            Some("sessionId"),
            format!(
                "`sessionId` must be 1 to {MAX_SESSION_ID_CHARS} characters without control characters"
            ),
        ));
    }
    Ok(())
}

/// The `error` event that ends a stream cut by shutdown.
pub(super) fn shutdown_event(stage: Option<Process>) -> Event {
    event(
        "error",
        &json!({
            "stage": stage,
            "kind": "shutdown",
            "message": "the server is shutting down and ended this stream after the drain deadline; retry the request",
        }),
    )
}

fn done(request_id: &str, stage: Process, status: &str, o: &AgentOutcome) -> Event {
    let cost = o.cost();
    event(
        "done",
        &json!({
            "requestId": request_id,
            "stage": stage,
            "status": status,
            "latencyMs": o.latency.as_millis() as u64,
            "ttftMs": o.ttft.map(|t| t.as_millis() as u64),
            "totals": {
                "calls": o.calls.len(),
                "tokens": o.usage(),
                "costUsd": cost.usd(),
                "costMicroUsd": cost.micro_usd(),
                "estimated": o.cost_estimated(),
                "fallbackUsed": o.fallback_used(),
            },
        }),
    )
}

/// One non-terminal agent event as SSE. A `Usage` is held in `held` until its record is
/// durable (it yields no event here), so a caller is never told about a cost the metrics could
/// lose.
pub(super) fn translate(
    request_id: &str,
    stage: Process,
    ev: AgentEvent,
    held: &mut HeldUsage,
) -> Option<Event> {
    Some(match ev {
        AgentEvent::Start {
            provider,
            model,
            attempt,
        } => event(
            "start",
            &json!({ "requestId": request_id, "stage": stage, "provider": provider, "model": model, "attempt": attempt }),
        ),
        AgentEvent::Fallback { from, to, reason } => event(
            "fallback",
            &json!({ "stage": stage, "from": from, "to": to, "reason": reason }),
        ),
        AgentEvent::Restart {
            stage,
            from,
            to,
            reason,
            discarded_bytes,
        } => event(
            "restart",
            &json!({ "stage": stage, "from": from, "to": to, "reason": reason, "discardedBytes": discarded_bytes }),
        ),
        AgentEvent::Delta(text) => event("delta", &json!({ "stage": stage, "text": text })),
        AgentEvent::Partial(value) => event("partial", &json!({ "stage": stage, "output": value })),
        AgentEvent::Repair { errors } => {
            event("repair", &json!({ "stage": stage, "errors": errors }))
        }
        AgentEvent::Usage(call) => {
            held.hold(stage, call);
            return None;
        }
        AgentEvent::Result { .. } | AgentEvent::Error { .. } => return None,
    })
}

/// `usage` events waiting for their records to commit, in call order. The agent or pipeline
/// that produced them goes on meanwhile: an fsync must not sit between one model call's end and
/// the next call (a pipeline stage, a repair). Routes send every held event before `done`.
#[derive(Default)]
pub(super) struct HeldUsage(FuturesOrdered<BoxFuture<'static, Event>>);

impl HeldUsage {
    fn hold(&mut self, stage: Process, call: CallUsage) {
        let usage = usage_event(stage, &call);
        let Recorded { id, receipt } = call.record;
        self.0.push_back(Box::pin(async move {
            await_durable("call record", &id, receipt).await;
            usage
        }));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The next held event once its record committed; `None` when nothing is held.
    pub(super) async fn next(&mut self) -> Option<Event> {
        self.0.next().await
    }
}

/// What a route's event loop woke for.
pub(super) enum Next<T> {
    /// A held `usage` event whose record is now durable.
    Committed(Event),
    /// The producer's next event (`None`: it ended).
    Produced(Option<T>),
}

/// The `usage` event of one model call; send it only once its record is durable.
fn usage_event(stage: Process, call: &CallUsage) -> Event {
    event(
        "usage",
        &json!({
            "stage": stage,
            "recordId": call.record.id,
            "status": call.status,
            "provider": call.provider,
            "model": call.model,
            "tokens": call.usage,
            "costUsd": call.cost_usd,
            "costMicroUsd": call.cost.micro_usd(),
            "estimated": call.estimated,
            "fallbackUsed": call.fallback_used,
            "rescuedFrom": call.rescued_from,
        }),
    )
}
