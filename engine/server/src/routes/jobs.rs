//! `POST /v1/jobs` and `GET /v1/jobs/{id}`: agent and pipeline work taken off the request path
//! through the AI-processing queue (`queue::enqueue`, `queue::job_status`). Without a queue
//! configured both answer 503 naming the variable to set. A user sees only their own jobs.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json};
use serde_json::Value;

use crate::auth::Caller;
use crate::config::CallerRole;
use crate::error::{ApiError, ApiJson};
use crate::queue::{self, JobAccepted, JobRequest, JobView, JobsCtx};
use crate::routes::agents::check_session_id;
use crate::routes::sessions::check_session_owner;
use crate::state::AppState;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/jobs", post(submit))
        .route("/v1/jobs/{id}", get(status))
}

fn jobs(state: &AppState) -> Result<&JobsCtx, ApiError> {
    state
        .backends()
        .jobs
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable {
            code: "queue_not_configured",
            message: "the job queue is not configured on this server; set SQS_AI_PROCESSING_QUEUE_URL (printed by `keyvex queue create`) and restart, or call /v1/agents/{agent} and /v1/pipelines/tool directly".to_owned(),
        })
}

async fn submit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(request): ApiJson<JobRequest>,
) -> Result<(StatusCode, Json<JobAccepted>), ApiError> {
    let ctx = jobs(&state)?;
    // A job with a session writes into it when it runs: the same checks as the direct routes,
    // made now, since nobody is there to refuse when the worker runs it.
    check_session_id(request.session_id.as_deref())?;
    check_session_owner(&state, &caller, request.session_id.as_deref()).await?;
    state.ensure_accepting()?;
    let accepted = queue::enqueue(ctx, &caller.id, request).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

async fn status(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let ctx = jobs(&state)?;
    let not_found = || ApiError::NotFound {
        code: "job_not_found",
        param: Some("id".to_owned()),
        message: format!("no job {id:?} for this caller; submit one with POST /v1/jobs"),
    };
    let record = ctx
        .jobs
        .get(&id)
        .await
        .map_err(|e| ApiError::from(queue::QueueError::Store(e)))?
        .ok_or_else(not_found)?;
    // Someone else's job looks exactly like a missing one, so ids cannot be probed.
    if caller.role != CallerRole::Admin && record.user_id != caller.id {
        return Err(not_found());
    }
    let view = serde_json::to_value(JobView::of(&record))
        .map_err(|e| ApiError::Internal(format!("encoding job {id}: {e}")))?;
    Ok(Json(view))
}
