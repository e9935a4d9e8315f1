//! Admin routes over the metrics store and ledger: `GET /v1/admin/metrics`,
//! `GET /v1/admin/alerts`, `GET /v1/admin/dead-letters`, `POST /v1/admin/dead-letters/requeue`.
//! The work is in `metrics::admin` and `Tracker`; these handlers only map errors.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::state::AppState;
use keyvex_store::admin::{MetricsReader, alerts_json, metrics_json, notable_json};

/// Dead letters listed when `limit` is not given, and the most one call returns.
const DEFAULT_DEAD_LETTERS: usize = 50;
const MAX_DEAD_LETTERS: usize = 500;

pub fn admin_routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/admin/metrics", get(metrics))
        .route("/v1/admin/alerts", get(alerts))
        .route("/v1/admin/requests/notable", get(notable))
        .route("/v1/admin/dead-letters", get(dead_letters))
        .route("/v1/admin/dead-letters/requeue", post(requeue))
}

fn reader(state: &AppState) -> Result<&MetricsReader, ApiError> {
    state
        .backends()
        .metrics
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable {
            code: "metrics_store_not_configured",
            message: "this server was started without a metrics reader; `keyvex serve` reads the store metrics are written to (KEYVEX_METRICS_DB or DYNAMODB_TABLE_NAME)".to_owned(),
        })
}

async fn metrics(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(metrics_json(reader(&state)?, &params).await?))
}

async fn alerts(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(alerts_json(reader(&state)?, &params).await?))
}

/// The slowest and newest failed requests of a range, with their trace ids (the dashboard's
/// way from a bad request to its trace).
async fn notable(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(notable_json(reader(&state)?, &params).await?))
}

fn parse_limit(params: &HashMap<String, String>) -> Result<usize, ApiError> {
    if let Some(name) = params.keys().find(|k| k.as_str() != "limit") {
        return Err(ApiError::bad_request(
            "unknown_parameter",
            Some(name),
            format!("unknown query parameter {name:?}; allowed: limit"),
        ));
    }
    match params.get("limit").map(|v| v.trim()) {
        None | Some("") => Ok(DEFAULT_DEAD_LETTERS),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_DEAD_LETTERS).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_parameter",
                    Some("limit"),
                    format!(
                        "invalid query parameter limit={v:?}: expected a whole number from 1 to {MAX_DEAD_LETTERS}"
                    ),
                )
            }),
    }
}

/// The entries the sink refused for good, newest first, with the pipeline's counters.
async fn dead_letters(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = parse_limit(&params)?;
    let letters = state
        .tracker()
        .dead_letters(limit)
        .await
        .map_err(|e| ApiError::Unavailable {
            code: "ledger_unavailable",
            message: format!("reading the dead letters failed: {e}"),
        })?;
    let health = state.tracker().health();
    Ok(Json(json!({
        "total": health.dead_letters,
        "deadLetteredSinceStart": health.dead_lettered,
        "requeuedSinceStart": health.requeued,
        "deadLetters": letters,
    })))
}

/// Moves every dead letter back to the outbox (for after the cause was fixed).
async fn requeue(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let moved =
        state
            .tracker()
            .requeue_dead_letters()
            .await
            .map_err(|e| ApiError::Unavailable {
                code: "ledger_unavailable",
                message: format!("requeueing the dead letters failed: {e}"),
            })?;
    Ok(Json(json!({
        "requeued": moved,
        "remaining": state.tracker().health().dead_letters,
    })))
}
