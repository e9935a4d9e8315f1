//! Admin routes over the model catalog versions: `GET /v1/admin/models` (the versions, the one
//! active in the store and the one this replica runs), `GET /v1/admin/models/{version}`,
//! `POST /v1/admin/models` (publish, optionally activate), `POST
//! /v1/admin/models/{version}/activate` and `POST /v1/admin/models/rollback`. An activation made
//! here applies on this replica at once; the others follow within their poll interval.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json};
use keyvex_engine::catalog::EMBEDDED_CATALOG;
use keyvex_store::CatalogStoreError;
use keyvex_store::catalog_store::Activation;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::catalog_sync::{Applied, CatalogSync};
use crate::error::{ApiError, ApiJson};
use crate::state::AppState;

/// How a published catalog is named in its validation errors.
const BODY_SOURCE: &str = "request body field `catalog`";

pub fn admin_routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/admin/models", get(list).post(publish))
        .route("/v1/admin/models/rollback", post(rollback))
        .route("/v1/admin/models/{version}", get(show))
        .route("/v1/admin/models/{version}/activate", post(activate))
}

fn sync(state: &AppState) -> Result<&CatalogSync, ApiError> {
    state
        .backends()
        .catalog
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable {
            code: "catalog_store_not_configured",
            message: "this server was started without the catalog versions; `keyvex serve` keeps them in its store (KEYVEX_METRICS_DB or DYNAMODB_TABLE_NAME)".to_owned(),
        })
}

impl From<CatalogStoreError> for ApiError {
    fn from(e: CatalogStoreError) -> Self {
        let message = e.to_string();
        match e {
            CatalogStoreError::Invalid(_) => {
                ApiError::bad_request("invalid_catalog", Some("catalog"), message)
            }
            CatalogStoreError::TooLarge { .. } => {
                ApiError::bad_request("catalog_too_large", Some("catalog"), message)
            }
            CatalogStoreError::UnknownVersion { .. } => ApiError::NotFound {
                code: "unknown_catalog_version",
                param: Some("version".to_owned()),
                message,
            },
            CatalogStoreError::Unloadable { .. } => ApiError::Conflict {
                code: "unloadable_catalog_version",
                message,
            },
            CatalogStoreError::NothingToRollBack { .. } => ApiError::Conflict {
                code: "nothing_to_roll_back",
                message,
            },
            e if e.is_retryable() => ApiError::Unavailable {
                code: "catalog_store_unavailable",
                message: format!("{message}; retry shortly"),
            },
            _ => ApiError::Internal(message),
        }
    }
}

fn parse_version(raw: &str) -> Result<u64, ApiError> {
    raw.parse::<u64>().map_err(|_| {
        ApiError::bad_request(
            "invalid_parameter",
            Some("version"),
            format!(
                "{raw:?} is not a model catalog version; versions are whole numbers (0, 1, 2, …)"
            ),
        )
    })
}

/// This replica's catalog: what its calls are routed and priced with now.
fn loaded(sync: &CatalogSync, state: &AppState) -> Value {
    let catalog = state.engine().catalog();
    json!({
        "version": catalog.version(),
        "label": catalog.label(),
        "activatedAtMs": catalog.activated_at_ms(),
        "refused": sync.refused(),
    })
}

async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let sync = sync(&state)?;
    let (active, versions) = tokio::try_join!(sync.versions().active(), sync.versions().list())?;
    let base = sync.base();
    Ok(Json(json!({
        "active": active,
        "loaded": loaded(sync, &state),
        "base": { "version": 0, "label": base.label(), "source": base.source() },
        "pollIntervalMs": sync.interval().as_millis() as u64,
        "versions": versions,
    })))
}

async fn show(
    State(state): State<AppState>,
    Path(version): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let sync = sync(&state)?;
    let version = parse_version(&version)?;
    if version == 0 {
        let base = sync.base();
        // The embedded catalog's text is known; a `KEYVEX_MODELS_FILE` is named, not re-read.
        let catalog = base
            .source()
            .ends_with("(embedded)")
            .then(|| serde_json::from_str::<Value>(EMBEDDED_CATALOG).ok())
            .flatten();
        return Ok(Json(json!({
            "version": 0,
            "label": base.label(),
            "source": base.source(),
            "catalog": catalog,
        })));
    }
    let stored = sync
        .versions()
        .get(version)
        .await?
        .ok_or(CatalogStoreError::UnknownVersion { version })?;
    let catalog: Value = serde_json::from_str(&stored.catalog_json).map_err(|e| {
        ApiError::Internal(format!("stored catalog version {version} is not JSON: {e}"))
    })?;
    let mut body =
        serde_json::to_value(&stored.info).map_err(|e| ApiError::Internal(e.to_string()))?;
    body["catalog"] = catalog;
    Ok(Json(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    /// The catalog, in the shape of `models/default-models.json`.
    catalog: Value,
    #[serde(default)]
    note: Option<String>,
    /// Also make it the active version (and apply it here at once).
    #[serde(default)]
    activate: bool,
}

async fn publish(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<PublishBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let sync = sync(&state)?;
    let json = serde_json::to_string_pretty(&body.catalog)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let published = sync
        .versions()
        .publish(
            &json,
            BODY_SOURCE,
            sync.base(),
            &caller.id,
            body.note.as_deref(),
        )
        .await?;
    let mut answer =
        serde_json::to_value(&published).map_err(|e| ApiError::Internal(e.to_string()))?;
    if body.activate {
        let activation = sync
            .versions()
            .activate(published.info.version, &caller.id, sync.base())
            .await?;
        answer["activation"] = activated(sync, activation).await;
    }
    Ok((StatusCode::CREATED, Json(answer)))
}

async fn activate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(version): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let sync = sync(&state)?;
    let version = parse_version(&version)?;
    let activation = sync
        .versions()
        .activate(version, &caller.id, sync.base())
        .await?;
    Ok(Json(activated(sync, activation).await))
}

async fn rollback(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let sync = sync(&state)?;
    let activation = sync.versions().rollback(&caller.id).await?;
    Ok(Json(activated(sync, activation).await))
}

/// The store's change, and what applying it on this replica did.
async fn activated(sync: &CatalogSync, activation: Activation) -> Value {
    let applied = sync.apply(&activation.active).await;
    let here = match &applied {
        Applied::Unchanged { .. } | Applied::Switched { .. } => json!({ "applied": true }),
        Applied::Refused { kept, reason, .. } => {
            json!({ "applied": false, "kept": kept, "reason": reason })
        }
    };
    json!({
        "version": activation.active.version,
        "previous": activation.previous,
        "changed": activation.changed,
        "activatedAtMs": activation.active.activated_at_ms,
        "activatedBy": activation.active.activated_by,
        "thisReplica": here,
    })
}
