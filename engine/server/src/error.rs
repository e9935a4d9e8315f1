//! The one error type of the HTTP API and the one place it becomes a response.
//!
//! Every error body has OpenAI's shape, `{"error":{"message","type","param","code"}}`, on every
//! route: the OpenAI SDKs read it on `/v1/chat/completions`, and other callers get one shape to
//! handle. `param` names the offending field when there is one.

use std::time::Duration;

use axum::extract::FromRequest;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::queue::QueueError;
use keyvex_engine::budgets::{BudgetDenied, BudgetRefusal, rfc3339};
use keyvex_engine::limits::CallerLimited;
use keyvex_store::admin::AdminError;

/// What went wrong with a request, before any stream started.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{message}")]
    NotFound {
        code: &'static str,
        param: Option<String>,
        message: String,
    },
    #[error("{message}")]
    BadRequest {
        code: &'static str,
        param: Option<String>,
        message: String,
    },
    #[error("the request body is larger than the limit of {limit} bytes; send a smaller body")]
    PayloadTooLarge { limit: usize },
    #[error("expected Content-Type: application/json; send the body as JSON with that header")]
    UnsupportedMediaType,
    #[error("{0}")]
    RateLimited(CallerLimited),
    /// A dollar budget has no room for the request's first call (429), or cannot be checked
    /// while budgets fail closed (503).
    #[error("{0}")]
    Budget(BudgetDenied),
    /// Every model the request could use failed before producing content.
    #[error("{message}")]
    Upstream {
        status: StatusCode,
        code: &'static str,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The provider refused the request itself (invalid, refused by its content policy, too
    /// long for every model): the provider's own code and message, as a 400. Retrying the same
    /// request cannot help, which a 5xx would invite SDKs to do.
    #[error("{message}")]
    Rejected { code: String, message: String },
    /// The request conflicts with the state of what it names (e.g. nothing to roll back to).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("the server is shutting down and accepts no new work; retry against another instance")]
    ShuttingDown,
    /// A part the route needs is not configured or not reachable (the queue, the store).
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Serialize)]
struct Body<'a> {
    error: ErrorObject<'a>,
}

/// OpenAI's error object.
#[derive(Serialize)]
pub struct ErrorObject<'a> {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<String>,
    pub code: Option<String>,
    /// The budget that refused the request (`budget_exceeded` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<serde_json::Value>,
}

/// A refused budget as the API shows it: which budget, its window, spent, reserved, limit,
/// what the call needed, and when it resets (`null` for a run budget, which never does).
pub fn budget_json(refusal: &BudgetRefusal) -> serde_json::Value {
    serde_json::json!({
        "scope": refusal.scope.as_str(),
        "subject": refusal.subject,
        "window": refusal.window,
        "spentUsd": refusal.spent.usd(),
        "reservedUsd": refusal.reserved.usd(),
        "limitUsd": refusal.limit.usd(),
        "requestedUsd": refusal.requested.usd(),
        "spentPicoUsd": refusal.spent.pico_usd(),
        "reservedPicoUsd": refusal.reserved.pico_usd(),
        "limitPicoUsd": refusal.limit.pico_usd(),
        "requestedPicoUsd": refusal.requested.pico_usd(),
        "resetsAt": refusal.resets_at.map(rfc3339),
    })
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::BadRequest { .. } | ApiError::Rejected { .. } => StatusCode::BAD_REQUEST,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Budget(BudgetDenied::Exceeded(_)) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Budget(BudgetDenied::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Upstream { status, .. } => *status,
            ApiError::ShuttingDown | ApiError::Unavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` and the `code`: our stable one, or the provider's for a rejection.
    fn kind_and_code(&self) -> (&'static str, &str) {
        match self {
            ApiError::Rejected { code, .. } => ("invalid_request_error", code),
            ApiError::Unauthenticated(_) => ("authentication_error", "invalid_api_key"),
            ApiError::Forbidden(_) => ("permission_error", "forbidden"),
            ApiError::NotFound { code, .. } => ("not_found_error", code),
            ApiError::BadRequest { code, .. } => ("invalid_request_error", code),
            ApiError::Conflict { code, .. } => ("invalid_request_error", code),
            ApiError::PayloadTooLarge { .. } => ("invalid_request_error", "payload_too_large"),
            ApiError::UnsupportedMediaType => ("invalid_request_error", "unsupported_media_type"),
            ApiError::RateLimited(_) => ("rate_limit_error", "rate_limit_exceeded"),
            ApiError::Budget(BudgetDenied::Exceeded(_)) => ("rate_limit_error", "budget_exceeded"),
            ApiError::Budget(BudgetDenied::Unavailable(_)) => {
                ("server_error", "budget_unavailable")
            }
            ApiError::Upstream { code, .. } => ("api_error", code),
            ApiError::ShuttingDown => ("server_error", "shutting_down"),
            ApiError::Unavailable { code, .. } => ("server_error", code),
            ApiError::Internal(_) => ("server_error", "internal"),
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            ApiError::NotFound { param, .. } | ApiError::BadRequest { param, .. } => param.clone(),
            _ => None,
        }
    }

    /// The error object, for callers that put it inside a stream.
    pub fn object(&self) -> ErrorObject<'static> {
        let (kind, code) = self.kind_and_code();
        ErrorObject {
            message: self.to_string(),
            kind,
            param: self.param(),
            code: Some(code.to_owned()),
            budget: match self {
                ApiError::Budget(BudgetDenied::Exceeded(refusal)) => Some(budget_json(refusal)),
                _ => None,
            },
        }
    }

    pub fn bad_request(
        code: &'static str,
        param: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        ApiError::BadRequest {
            code,
            param: param.map(str::to_owned),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::info!(error = %self, status = status.as_u16(), "request rejected");
        }
        let body = Body {
            error: self.object(),
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        let retry_after = match &self {
            ApiError::RateLimited(limited) => {
                let reset = limited.retry_after;
                headers.insert("x-ratelimit-limit", HeaderValue::from(limited.limit));
                headers.insert("x-ratelimit-remaining", HeaderValue::from(0u32));
                headers.insert("x-ratelimit-reset", HeaderValue::from(ceil_secs(reset)));
                Some(reset)
            }
            ApiError::Upstream { retry_after, .. } => *retry_after,
            ApiError::Budget(BudgetDenied::Exceeded(refusal)) => {
                refusal.retry_after(std::time::SystemTime::now())
            }
            ApiError::Budget(BudgetDenied::Unavailable(_)) => Some(Duration::from_secs(1)),
            ApiError::Unauthenticated(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                None
            }
            _ => None,
        };
        if let Some(wait) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(ceil_secs(wait)));
        }
        response
    }
}

impl From<AdminError> for ApiError {
    /// The admin boundary's status, code and message, in the server's error shape.
    fn from(e: AdminError) -> Self {
        let message = e.to_string();
        let code = e.code();
        match e {
            AdminError::InvalidParam { name, .. } => ApiError::BadRequest {
                code,
                param: Some(name.to_owned()),
                message,
            },
            AdminError::UnknownParam { name, .. } => ApiError::BadRequest {
                code,
                param: Some(name),
                message,
            },
            AdminError::NotFound { .. } => ApiError::NotFound {
                code,
                param: None,
                message,
            },
            AdminError::Store(ref store) if store.is_retryable() => ApiError::Unavailable {
                code,
                message: format!("{message}; retry shortly"),
            },
            AdminError::Store(_) => ApiError::Internal(message),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::InvalidRequest(_) => ApiError::BadRequest {
                code: "invalid_job",
                param: None,
                message: format!("{e}; see docs/API.md for POST /v1/jobs"),
            },
            _ if e.http_status() == StatusCode::SERVICE_UNAVAILABLE => ApiError::Unavailable {
                code: "queue_unavailable",
                message: format!("{e}; retry shortly"),
            },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// Whole seconds, rounded up so a client waiting that long is never early.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000) as u64
}

/// `axum::Json` with its rejections turned into [`ApiError`]s that name the field.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(from_json_rejection(&rejection, limit)),
        }
    }
}

/// The configured body limit, put in request extensions so the 413 message can say it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

fn from_json_rejection(rejection: &JsonRejection, limit: usize) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
        JsonRejection::JsonSyntaxError(_) => ApiError::bad_request(
            "malformed_json",
            None,
            format!(
                "the body is not valid JSON ({}); send a JSON object",
                path_error(rejection).map_or_else(|| rejection.body_text(), |(_, msg)| msg)
            ),
        ),
        JsonRejection::JsonDataError(_) => match path_error(rejection) {
            Some((param, message)) => ApiError::BadRequest {
                code: "invalid_field",
                message: match &param {
                    Some(p) => {
                        format!("field `{p}`: {message}; see docs/API.md for the body shape")
                    }
                    None => format!("{message}; see docs/API.md for the body shape"),
                },
                param,
            },
            None => ApiError::bad_request("invalid_field", None, rejection.body_text()),
        },
        JsonRejection::BytesRejection(_) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge { limit }
        }
        other => ApiError::bad_request(
            "unreadable_body",
            None,
            format!("the body could not be read: {}", other.body_text()),
        ),
    }
}

/// The field path and the bare serde message of a JSON rejection. A missing field is reported
/// by serde at its parent; the path then gets the field's name appended.
fn path_error(rejection: &JsonRejection) -> Option<(Option<String>, String)> {
    let mut source: Option<&(dyn std::error::Error + 'static)> =
        std::error::Error::source(rejection);
    while let Some(err) = source {
        if let Some(e) = err.downcast_ref::<serde_path_to_error::Error<serde_json::Error>>() {
            let inner = e.inner();
            let message = inner.to_string();
            // Drop serde_json's " at line 1 column 2" tail; the path says where.
            let bare = message
                .rsplit_once(" at line ")
                .map_or(message.as_str(), |(head, _)| head)
                .to_owned();
            let mut path = e.path().to_string();
            if path == "." {
                path.clear();
            }
            if let Some(field) = bare
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
            {
                path = if path.is_empty() {
                    field.to_owned()
                } else {
                    format!("{path}.{field}")
                };
            }
            return Some(((!path.is_empty()).then_some(path), bare));
        }
        source = err.source();
    }
    None
}
