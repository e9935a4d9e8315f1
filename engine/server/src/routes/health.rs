//! Liveness, readiness, Prometheus metrics, and the smallest admin route.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json};
use serde_json::json;

use crate::auth::Caller;
use crate::state::AppState;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

pub fn admin_routes() -> axum::Router<AppState> {
    axum::Router::new().route("/v1/admin/whoami", get(whoami))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the catalog is loaded, the metrics ledger keeps up (no unrecovered commit errors)
/// and the server is not draining. `catalog.version` is the catalog version this replica's calls
/// are routed and priced with; `catalog.refusedVersion` names an active store version it could
/// not load (it then stays on its last good one, still ready).
async fn readyz(State(state): State<AppState>) -> Response {
    let health = state.tracker().health();
    let catalog = state.engine().catalog();
    let ledger_ok = health.ledger_errors == 0 || health.durable >= health.accepted;
    let draining = state.is_draining();
    let ready = ledger_ok && !draining && !catalog.models().is_empty();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "draining": draining,
        "catalog": {
            "version": catalog.version(),
            "label": catalog.label(),
            "models": catalog.models().len(),
            "activatedAtMs": catalog.activated_at_ms(),
            "refusedVersion": state.backends().catalog.as_ref().and_then(|s| s.refused()).map(|r| r.version),
        },
        "metrics": {
            "sink": health.sink,
            "ledgerWritable": ledger_ok,
            "accepted": health.accepted,
            "durable": health.durable,
            "pending": health.pending,
        },
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let engine = state.engine();
    if let Some(budgets) = engine.budgets() {
        // The global day's spend is read from the budget store at scrape time; a store that
        // cannot answer leaves the gauge as it was (and is counted by the engine).
        let global = budgets.global_view().await.ok();
        state.prom().budgets(budgets, global.as_ref());
    }
    state
        .prom()
        .shared_limit_failures(engine.shared_limit_failures());
    state.prom().prepaid(engine.prepaid_stats());
    let text = state.prom().render(&state.tracker().health());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn whoami(Extension(caller): Extension<Caller>) -> Json<serde_json::Value> {
    Json(json!({ "caller": caller.id, "role": caller.role }))
}
