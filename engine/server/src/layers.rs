//! The middleware of the authenticated API, in the order a request meets it: the bearer key and
//! the caller's limit on the route in one layer (`authenticate_and_limit`: one layer is one
//! boxed future and one service clone per request, where two were two), the admin role on admin
//! routes (`require_admin`); and around everything, the answered-requests counter
//! (`count_requests`).

use std::sync::{Arc, OnceLock};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use keyvex_engine::limits::Allowance;

use crate::auth::Caller;
use crate::config::CallerRole;
use crate::error::{self, ApiError};
use crate::routes;
use crate::state::AppState;

const HOW: &str = "send `Authorization: Bearer <key>` with a key configured in KEYVEX_API_KEYS (KEY=CALLER:ROLE) or the config file; `keyvex serve` prints a development key at start when none is configured";

/// Middleware for admin routes (after [`authenticate`]).
pub(crate) async fn require_admin(req: Request, next: Next) -> Response {
    match req.extensions().get::<Caller>() {
        Some(c) if c.role == CallerRole::Admin => next.run(req).await,
        Some(c) => ApiError::Forbidden(format!(
            "caller {} has role user; this route needs an admin key",
            c.id
        ))
        .into_response(),
        None => ApiError::Unauthenticated(format!("no API key given; {HOW}")).into_response(),
    }
}

/// Counts answered requests by route and status.
pub(crate) async fn count_requests(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    // A clone of the matched path shares its text (no copy per request).
    let route = req.extensions().get::<MatchedPath>().cloned();
    let response = next.run(req).await;
    state.prom().http_request(
        route.as_ref().map_or("unmatched", MatchedPath::as_str),
        response.status().as_u16(),
    );
    response
}

/// The routes that open model calls. Their handlers take the caller's limit in
/// [`admit`](crate::routes::budgets::admit), sent at the same time as the budget check: with
/// Redis each is a round trip, and one after the other would both sit before the first token.
/// A request such a handler refuses before admission (an invalid body) takes nothing from the
/// limit.
const LIMITED_AT_ADMISSION: &[&str] = &[
    routes::agents::PATH,
    routes::pipeline::PATH,
    routes::chat::PATH,
];

/// The caller's limit on a route that takes it at admission: the endpoint it counts against,
/// and the allowance once taken, for this middleware to show in `x-ratelimit-*`.
#[derive(Clone)]
pub(crate) struct AdmissionLimit {
    pub(crate) endpoint: String,
    pub(crate) allowance: Arc<OnceLock<Allowance>>,
}

/// Middleware of every authenticated route: requires a valid bearer key and records the caller,
/// then takes from the caller's limit per endpoint (the matched route), with `x-ratelimit-*` on
/// every answer that took from it. The model routes take the limit at admission instead (see
/// [`LIMITED_AT_ADMISSION`]).
pub(crate) async fn authenticate_and_limit(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(key) = presented else {
        return ApiError::Unauthenticated(format!("no API key given; {HOW}")).into_response();
    };
    let Some(caller) = state.keys().lookup(key) else {
        return ApiError::Unauthenticated(format!("the API key is not valid; {HOW}"))
            .into_response();
    };
    let span = tracing::Span::current();
    span.record("caller", caller.id.as_str());
    span.record("keyvex.caller", caller.id.as_str());
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path().to_owned(), |m| m.as_str().to_owned());
    if LIMITED_AT_ADMISSION.contains(&endpoint.as_str()) {
        let allowance = Arc::new(OnceLock::new());
        req.extensions_mut().insert(caller);
        req.extensions_mut().insert(AdmissionLimit {
            endpoint,
            allowance: Arc::clone(&allowance),
        });
        let mut response = next.run(req).await;
        if let Some(allowance) = allowance.get() {
            set_allowance(&mut response, allowance);
        }
        return response;
    }
    match state.engine().check_caller(&caller.id, &endpoint).await {
        Ok(allowance) => {
            req.extensions_mut().insert(caller);
            let mut response = next.run(req).await;
            set_allowance(&mut response, &allowance);
            response
        }
        Err(limited) => {
            state.prom().rate_limited(&endpoint);
            ApiError::RateLimited(limited).into_response()
        }
    }
}

fn set_allowance(response: &mut Response, allowance: &Allowance) {
    let h = response.headers_mut();
    h.insert("x-ratelimit-limit", HeaderValue::from(allowance.limit));
    h.insert(
        "x-ratelimit-remaining",
        HeaderValue::from(allowance.remaining),
    );
    h.insert(
        "x-ratelimit-reset",
        HeaderValue::from(error::ceil_secs(allowance.reset)),
    );
}
