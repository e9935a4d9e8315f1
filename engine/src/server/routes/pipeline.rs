//! `POST /v1/pipelines/tool`: the whole tool pipeline as SSE, every event tagged with its stage.

use std::sync::Arc;

use agents::Process;
use axum::Extension;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::agent_run::AgentEvent;
use crate::pipeline::{PipelineEvent, PipelineInput, RunRollup, run_pipeline};
use crate::server::auth::Caller;
use crate::server::error::{ApiError, ApiJson};
use crate::server::routes::agents::{
    HeldUsage, Next, check_input, check_session_id, shutdown_event, translate,
};
use crate::server::routes::sessions::check_session_owner;
use crate::server::sse::{CallScope, Event, event};
use crate::server::{AppState, request_id};
use crate::store::sessions::{Role, SessionMessage};

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/v1/pipelines/tool", post(run))
}

/// `PipelineInput` plus the session id (kept in the metric records).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PipelineBody {
    business: serde_json::Value,
    #[serde(default)]
    concept_index: Option<usize>,
    #[serde(default)]
    brand: Option<serde_json::Value>,
    #[serde(default)]
    session_id: Option<String>,
}

async fn run(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PipelineBody>,
) -> Result<Response, ApiError> {
    check_input(Process::MagicSpark, &body.business, "business")?;
    check_session_id(body.session_id.as_deref())?;
    check_session_owner(&state, &caller, body.session_id.as_deref()).await?;
    state.ensure_accepting()?;
    let request_id = request_id(&headers);
    let session = body.session_id.clone();
    let scope = CallScope::new(&caller.id, &request_id, None, body.session_id);
    // The business is Magic Spark's input: recorded as the user's message of the run once the
    // run id is known, then each stage's validated output; all awaited before `done`.
    let business = session.as_ref().map(|_| body.business.clone());
    let input = PipelineInput {
        business: body.business,
        concept_index: body.concept_index,
        brand: body.brand,
    };
    let router = state.router().clone();
    let events = {
        let state = state.clone();
        let scope = Arc::clone(&scope);
        let request_id = request_id.clone();
        let caller_id = caller.id.clone();
        async_stream::stream! {
            let mut receipts = Vec::new();
            let mut run = String::new();
            let message = |role: Role, stage: Process, run: &str, content: serde_json::Value| {
                session.as_deref().map(|sid| {
                    state.record_message(
                        SessionMessage::new(sid, &caller_id, role, stage.key(), content)
                            .with_request(&request_id)
                            .with_run(run, stage.key()),
                    )
                })
            };
            let models = |stage: Process| {
                let r = router.catalog().route(stage);
                [r.primary.clone(), r.fallback.clone()]
            };
            let mut pipeline = Box::pin(run_pipeline(router.clone(), input));
            let mut stage_error_sent = false;
            // `usage` events wait for their record to be durable, but the pipeline must not wait
            // with them: an fsync between stages would sit on the run's critical path.
            let mut held = HeldUsage::default();
            loop {
                let next = tokio::select! {
                    biased;
                    Some(usage) = held.next(), if !held.is_empty() => Next::Committed(usage),
                    ev = pipeline.next() => Next::Produced(ev),
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
                    PipelineEvent::RunStarted { run_id } => {
                        scope.set_run(&run_id);
                        run.clone_from(&run_id);
                        if let Some(business) = &business {
                            receipts.extend(message(Role::User, Process::MagicSpark, &run, business.clone()));
                        }
                        yield event("run", &json!({ "requestId": request_id, "runId": run_id }));
                    }
                    PipelineEvent::Stage { stage, event: ev } => {
                        match ev {
                            AgentEvent::Start { .. } => scope.stage_started(stage, models(stage)),
                            AgentEvent::Result { output, .. } => {
                                scope.stage_finished(stage);
                                receipts.extend(message(Role::Assistant, stage, &run, output.clone()));
                                yield event("stageResult", &json!({ "stage": stage, "output": output }));
                                continue;
                            }
                            AgentEvent::Error { error, .. } => {
                                scope.stage_finished(stage);
                                stage_error_sent = true;
                                yield event("error", &json!({ "stage": stage, "kind": error.kind(), "message": error.to_string() }));
                                continue;
                            }
                            _ => {}
                        }
                        if let Some(e) = translate(&state, &scope, &request_id, stage, ev, &mut held) {
                            yield e;
                        }
                    }
                    PipelineEvent::Done { tool, rollup } => {
                        while let Some(usage) = held.next().await {
                            yield usage;
                        }
                        state.await_durable(std::mem::take(&mut receipts)).await;
                        yield event("result", &json!({ "tool": tool }));
                        yield done(&request_id, "succeeded", None, &rollup);
                    }
                    PipelineEvent::Failed { stage, error, rollup } => {
                        while let Some(usage) = held.next().await {
                            yield usage;
                        }
                        state.await_durable(std::mem::take(&mut receipts)).await;
                        if !stage_error_sent {
                            yield event("error", &json!({ "stage": stage, "kind": "pipeline", "message": error }));
                        }
                        yield done(&request_id, "failed", Some((stage, &error)), &rollup);
                    }
                }
            }
            // The pipeline always ends with `Done` or `Failed`, which flush; this keeps a held
            // event from being dropped if that ever changed.
            while let Some(usage) = held.next().await {
                yield usage;
            }
        }
    };
    Ok(state.sse(events.boxed(), scope, shutdown_event(None)))
}

fn done(
    request_id: &str,
    status: &str,
    failure: Option<(Option<Process>, &str)>,
    rollup: &RunRollup,
) -> Event {
    event(
        "done",
        &json!({
            "requestId": request_id,
            "runId": rollup.run_id,
            "status": status,
            "failedStage": failure.and_then(|(s, _)| s),
            "error": failure.map(|(_, e)| e),
            "latencyMs": rollup.latency_ms,
            "ttftMs": rollup.ttft_ms,
            "totals": {
                "tokens": rollup.usage,
                "costUsd": rollup.cost_usd,
                "costMicroUsd": rollup.cost.micro_usd(),
                "estimated": rollup.cost_estimated,
            },
            "stages": rollup.stages,
        }),
    )
}
