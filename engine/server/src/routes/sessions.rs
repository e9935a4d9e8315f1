//! `GET /v1/sessions/{id}` and `GET /v1/sessions`: a caller's conversation sessions, with the
//! messages the agent and pipeline routes recorded. A user sees only their own sessions; another
//! user's session is a 404, exactly like a missing one, so session ids cannot be probed.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Extension, Json};
use serde_json::Value;

use crate::auth::Caller;
use crate::config::CallerRole;
use crate::error::ApiError;
use crate::state::AppState;
use keyvex_store::admin::{get_session_json, user_sessions_json};
use keyvex_store::sessions::SessionStore;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/sessions", get(list))
        .route("/v1/sessions/{id}", get(one))
}

fn store(state: &AppState) -> Result<&SessionStore, ApiError> {
    state
        .backends()
        .sessions
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable {
            code: "sessions_not_configured",
            message: "this server was started without a session store; `keyvex serve` reads the one metrics are written to (KEYVEX_METRICS_DB or DYNAMODB_TABLE_NAME)".to_owned(),
        })
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        code: "session_not_found",
        param: Some("id".to_owned()),
        message: format!(
            "no session {id:?} for this caller; sessions are created by POST /v1/agents/{{agent}} or /v1/pipelines/tool with a sessionId"
        ),
    }
}

/// A caller may add messages to a session that is new or its own; an admin key to any. Checked
/// before a run starts, so nothing is spent or recorded for a refused request. Two callers
/// creating the same new id at the same instant can both pass (ids are meant to be random).
pub(super) async fn check_session_owner(
    state: &AppState,
    caller: &Caller,
    session_id: Option<&str>,
) -> Result<(), ApiError> {
    let (Some(id), Some(store)) = (session_id, state.backends().sessions.as_ref()) else {
        return Ok(());
    };
    if caller.role == CallerRole::Admin {
        return Ok(());
    }
    match store.owner(id).await {
        Ok(Some(owner)) if owner != caller.id => Err(ApiError::Forbidden(format!(
            "sessionId {id:?} belongs to another caller; start a new session with a new id (a UUID, for example)"
        ))),
        Ok(_) => Ok(()),
        Err(e) => Err(ApiError::Unavailable {
            code: "session_store_unavailable",
            message: format!(
                "could not check who owns session {id:?}: {e}; retry, or send the request without sessionId"
            ),
        }),
    }
}

async fn one(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let session = match get_session_json(store(&state)?, &id).await {
        Ok(v) => v,
        Err(keyvex_store::admin::AdminError::NotFound { .. }) => return Err(not_found(&id)),
        Err(e) => return Err(e.into()),
    };
    let owner = session["metadata"]["userId"].as_str();
    if caller.role != CallerRole::Admin && owner != Some(caller.id.as_str()) {
        return Err(not_found(&id));
    }
    Ok(Json(session))
}

async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        user_sessions_json(store(&state)?, &caller.id, &params).await?,
    ))
}
