//! Dollar budgets at the HTTP edge: the check the agent, pipeline and chat routes make before
//! they open a stream (`admit`), the `x-budget-*` headers that tell a caller what remains, and
//! the admin routes `GET /v1/admin/budgets` and `PUT /v1/admin/budgets/{caller}`.

use std::time::SystemTime;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderValue;
use axum::response::Response;
use axum::routing::{get, put};
use serde::Deserialize;
use serde_json::{Value, json};

use keyvex_engine::admission::FirstCallOf;
use keyvex_engine::budgets::{BudgetScope, BudgetView, CallerBudget, parse_usd, rfc3339};
use keyvex_engine::{CallContext, Cost};

use crate::error::{ApiError, ApiJson};
use crate::layers::AdmissionLimit;
use crate::state::AppState;

pub fn admin_routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/admin/budgets", get(list))
        .route("/v1/admin/budgets/{caller}", put(set))
}

/// Admits a request to its route: takes one request from the caller's limit and checks that
/// its first call fits `ctx`'s budgets, before any stream opens (with Redis, in one round trip
/// that also reserves that call's dollars and provider budget; see `Engine::admit`). Returns
/// the budgets for the response headers; the allowance goes to the rate-limit middleware,
/// which shows it. The engine counts a budget refusal for `/metrics`.
pub(crate) async fn admit(
    state: &AppState,
    ctx: &mut CallContext,
    limit: &AdmissionLimit,
    first: FirstCallOf<'_>,
) -> Result<Vec<BudgetView>, ApiError> {
    let admission = state
        .engine()
        .admit(ctx, &limit.endpoint, Some(first))
        .await;
    match admission.allowance {
        Ok(allowance) => {
            let _ = limit.allowance.set(allowance);
        }
        Err(limited) => {
            state.prom().rate_limited(&limit.endpoint);
            return Err(ApiError::RateLimited(limited));
        }
    }
    admission.budgets.map_err(ApiError::Budget)
}

/// `x-budget-*`: the limited budget with the least left — its scope, limit, what remains
/// (spent and reserved taken off) and when it resets. Nothing when no budget is limited.
pub(crate) fn set_headers(response: &mut Response, views: &[BudgetView]) {
    let tightest = views
        .iter()
        .filter_map(|v| Some((v, v.state.remaining()?, v.state.limit?)))
        .min_by_key(|(_, remaining, _)| *remaining);
    let Some((view, remaining, limit)) = tightest else {
        return;
    };
    let h = response.headers_mut();
    h.insert(
        "x-budget-scope",
        HeaderValue::from_static(view.scope.as_str()),
    );
    if let Ok(v) = HeaderValue::from_str(&usd(limit)) {
        h.insert("x-budget-limit-usd", v);
    }
    if let Ok(v) = HeaderValue::from_str(&usd(remaining)) {
        h.insert("x-budget-remaining-usd", v);
    }
    if let Some(at) = view.resets_at
        && let Ok(v) = HeaderValue::from_str(&rfc3339(at))
    {
        h.insert("x-budget-reset", v);
    }
}

/// Exact dollars with six decimals, rounded down (a remaining amount is never overstated).
fn usd(c: Cost) -> String {
    let micro = c.pico_usd() / 1_000_000;
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

fn view_json(view: &BudgetView) -> Value {
    json!({
        "scope": view.scope.as_str(),
        "window": view.window,
        "spentUsd": view.state.spent.usd(),
        "reservedUsd": view.state.reserved.usd(),
        "limitUsd": view.state.limit.map(Cost::usd),
        "remainingUsd": view.state.remaining().map(Cost::usd),
        "spentPicoUsd": view.state.spent.pico_usd(),
        "reservedPicoUsd": view.state.reserved.pico_usd(),
        "limitPicoUsd": view.state.limit.map(Cost::pico_usd),
        "resetsAt": view.resets_at.map(rfc3339),
    })
}

fn limit_json(c: Option<Cost>) -> Value {
    c.map_or(Value::Null, |c| json!(c.usd()))
}

fn budgets_of(
    state: &AppState,
) -> Result<&std::sync::Arc<keyvex_engine::budgets::Budgets>, ApiError> {
    state
        .engine()
        .budgets()
        .ok_or_else(|| ApiError::Unavailable {
            code: "budgets_not_configured",
            message:
                "this server's engine was built without budgets; `keyvex serve` always has them"
                    .to_owned(),
        })
}

fn store_error(e: keyvex_engine::budgets::SpendError) -> ApiError {
    ApiError::Unavailable {
        code: "budget_store_unavailable",
        message: format!("{e}; retry shortly"),
    }
}

/// `GET /v1/admin/budgets`: the default limits, the global day, and every caller's limits and
/// spend this day and this month (callers with an API key here, and callers with limits of
/// their own).
async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let budgets = budgets_of(&state)?;
    let own = budgets.callers().await.map_err(store_error)?;
    let mut callers = state.keys().callers();
    callers.extend(own.keys().cloned());
    callers.sort_unstable();
    callers.dedup();
    let mut rows = Vec::with_capacity(callers.len());
    for caller in &callers {
        let views = budgets.caller_view(caller).await.map_err(store_error)?;
        let find = |scope: BudgetScope| views.iter().find(|v| v.scope == scope).map(view_json);
        let mine = own.get(caller).copied().unwrap_or_default();
        rows.push(json!({
            "caller": caller,
            "ownLimits": { "dailyUsd": limit_json(mine.daily), "monthlyUsd": limit_json(mine.monthly) },
            "day": find(BudgetScope::CallerDaily),
            "month": find(BudgetScope::CallerMonthly),
        }));
    }
    let limits = budgets.limits();
    let global = budgets.global_view().await.map_err(store_error)?;
    Ok(Json(json!({
        "store": budgets.store().describe(),
        "defaults": {
            "dailyUsd": limit_json(limits.caller_daily),
            "monthlyUsd": limit_json(limits.caller_monthly),
            "runUsd": limit_json(limits.run),
            "globalDailyUsd": limit_json(limits.global_daily),
        },
        "global": view_json(&global),
        "callers": rows,
        "at": rfc3339(SystemTime::now()),
    })))
}

/// A limit in a `PUT` body: dollars as a number or a string; `null` clears it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Usd {
    Number(serde_json::Number),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SetBody {
    #[serde(default)]
    daily_usd: Option<Usd>,
    #[serde(default)]
    monthly_usd: Option<Usd>,
}

fn parse_limit(field: &str, value: Option<Usd>) -> Result<Option<Cost>, ApiError> {
    let text = match value {
        None => return Ok(None),
        Some(Usd::Number(n)) => n.to_string(),
        Some(Usd::Text(t)) => t,
    };
    parse_usd(&text).map(Some).map_err(|e| {
        ApiError::bad_request(
            "invalid_field",
            Some(field),
            format!(
                "`{field}` = {text:?}: {e}; send dollars such as 25 or \"0.50\", or null to clear"
            ),
        )
    })
}

/// `PUT /v1/admin/budgets/{caller}`: sets the caller's own daily and monthly limits (an absent or
/// `null` one falls back to the default), for every replica sharing the budget store.
async fn set(
    State(state): State<AppState>,
    Path(caller): Path<String>,
    ApiJson(body): ApiJson<SetBody>,
) -> Result<Json<Value>, ApiError> {
    if caller.trim().is_empty() || caller.len() > 256 {
        return Err(ApiError::bad_request(
            "invalid_param",
            Some("caller"),
            "the caller must be 1 to 256 characters",
        ));
    }
    let budget = CallerBudget {
        daily: parse_limit("dailyUsd", body.daily_usd)?,
        monthly: parse_limit("monthlyUsd", body.monthly_usd)?,
    };
    let budgets = budgets_of(&state)?;
    budgets
        .set_caller(&caller, budget)
        .await
        .map_err(store_error)?;
    tracing::info!(%caller, daily = ?budget.daily, monthly = ?budget.monthly, "caller budget set");
    let views = budgets.caller_view(&caller).await.map_err(store_error)?;
    Ok(Json(json!({
        "caller": caller,
        "ownLimits": { "dailyUsd": limit_json(budget.daily), "monthlyUsd": limit_json(budget.monthly) },
        "budgets": views.iter().map(view_json).collect::<Vec<_>>(),
    })))
}
