//! `POST /v1/pipelines/tool`: the whole tool pipeline as SSE, every event tagged with its stage.

use agents::Process;
use axum::Extension;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use keyvex_engine::admission::FirstCallOf;
use keyvex_engine::{AgentEvent, CallContext, PipelineEvent, PipelineInput, RunRollup};

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson};
use crate::layers::AdmissionLimit;
use crate::routes::agents::{
    HeldUsage, Next, check_input, check_session_id, shutdown_event, translate,
};
use crate::routes::budgets::{admit, set_headers};
use crate::routes::sessions::check_session_owner;
use crate::sse::{Event, event};
use crate::state::{AppState, await_durable, request_id};

/// The route; its caller limit is taken at admission (see `layers`).
pub(crate) const PATH: &str = "/v1/pipelines/tool";

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route(PATH, post(run))
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
    Extension(limit): Extension<AdmissionLimit>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PipelineBody>,
) -> Result<Response, ApiError> {
    check_input(Process::MagicSpark, &body.business, "business")?;
    check_session_id(body.session_id.as_deref())?;
    check_session_owner(&state, &caller, body.session_id.as_deref()).await?;
    state.ensure_accepting()?;
    let request_id = request_id(&headers);
    // The run id is chosen here so the run's budget can be checked before the first call.
    let mut ctx = CallContext::new(&caller.id)
        .with_correlation(&request_id)
        .with_session(body.session_id)
        .with_run(uuid::Uuid::now_v7().to_string());
    let budgets = admit(
        &state,
        &mut ctx,
        &limit,
        FirstCallOf::Agent(Process::MagicSpark, &body.business),
    )
    .await?;
    let input = PipelineInput {
        business: body.business,
        concept_index: body.concept_index,
        brand: body.brand,
    };
    let mut pipeline = state.engine().pipeline(ctx, input);
    let events = async_stream::stream! {
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
                    yield event("run", &json!({ "requestId": request_id, "runId": run_id }));
                }
                PipelineEvent::Stage { stage, event: ev } => match ev {
                    AgentEvent::Result { output, .. } => {
                        yield event("stageResult", &json!({ "stage": stage, "output": output }));
                    }
                    AgentEvent::Error { error, .. } => {
                        stage_error_sent = true;
                        yield event("error", &json!({ "stage": stage, "kind": error.kind(), "message": error.to_string() }));
                    }
                    other => {
                        if let Some(e) = translate(&request_id, stage, other, &mut held) {
                            yield e;
                        }
                    }
                },
                PipelineEvent::Done { tool, rollup, messages } => {
                    while let Some(usage) = held.next().await {
                        yield usage;
                    }
                    await_durable("session messages", &request_id, messages).await;
                    yield event("result", &json!({ "tool": tool }));
                    yield done(&request_id, "succeeded", None, &rollup);
                }
                PipelineEvent::Failed { stage, error, rollup, messages } => {
                    while let Some(usage) = held.next().await {
                        yield usage;
                    }
                    await_durable("session messages", &request_id, messages).await;
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
    };
    let mut response = state.sse(events.boxed(), shutdown_event(None));
    set_headers(&mut response, &budgets);
    Ok(response)
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
