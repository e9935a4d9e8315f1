//! The admin API's read side, without any server state: [`MetricsReader`] (metrics and alerts of
//! a time range from SQLite or DynamoDB), query-parameter validation ([`AdminQuery::parse`]) and
//! handler functions that return the JSON bodies; the server maps [`AdminError`] to HTTP.
//!
//! Both stores hand their records to the same pure [`aggregate_by`], so the same traffic gives
//! the same answer from either store.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;

use keyvex_engine::clock::now_ms;
use keyvex_engine::record::RequestRecord;

use crate::aggregate::{Aggregate, GroupBy, aggregate, aggregate_by};
use crate::alerts::{Alert, AlertConfig};
use crate::dynamo::DynamoStore;
use crate::entry::{StoreError, iso_ts};
use crate::sessions::SessionStore;
use crate::sqlite::SqliteStore;
use crate::tracker::{MetricsHealth, Tracker};

/// DynamoDB answers a range with one `Query` per UTC day, so ranges are capped.
pub const MAX_RANGE_DAYS: u64 = 93;
/// The window when `from` is not given: the last 24 hours before `to`.
pub const DEFAULT_RANGE_MS: u64 = 86_400_000;
pub const DEFAULT_SESSION_LIMIT: usize = 20;
pub const MAX_SESSION_LIMIT: usize = 100;
const MAX_ID_CHARS: usize = 256;
const METRICS_PARAMS: &[&str] = &[
    "from",
    "to",
    "groupBy",
    "process",
    "provider",
    "catalogVersion",
];
const RANGE_PARAMS: &[&str] = &["from", "to"];
const NOTABLE_PARAMS: &[&str] = &["from", "to", "process", "provider"];
/// Requests listed per kind (slowest, failed) by the notable-requests endpoint.
const NOTABLE_PER_KIND: usize = 10;
const SESSION_LIST_PARAMS: &[&str] = &["limit"];

/// Errors of the admin API boundary. Every message names what was wrong and what is accepted.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid query parameter {name}={value:?}: expected {expected}")]
    InvalidParam {
        name: &'static str,
        value: String,
        expected: String,
    },
    #[error("unknown query parameter {name:?}; allowed: {allowed}")]
    UnknownParam { name: String, allowed: String },
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("reading the metrics store failed: {0}")]
    Store(#[from] StoreError),
}

impl AdminError {
    pub fn status(&self) -> http::StatusCode {
        match self {
            AdminError::InvalidParam { .. } | AdminError::UnknownParam { .. } => {
                http::StatusCode::BAD_REQUEST
            }
            AdminError::NotFound { .. } => http::StatusCode::NOT_FOUND,
            AdminError::Store(e) if e.is_retryable() => http::StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Store(_) => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable machine-readable code for the error body.
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::InvalidParam { .. } => "invalid_parameter",
            AdminError::UnknownParam { .. } => "unknown_parameter",
            AdminError::NotFound { .. } => "not_found",
            AdminError::Store(_) => "store_unavailable",
        }
    }

    /// Retrying the same request later can succeed (the store was throttled or unreachable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, AdminError::Store(e) if e.is_retryable())
    }

    /// `{"error": {"code", "message"}}`, the body the server sends with [`AdminError::status`].
    pub fn body(&self) -> Value {
        serde_json::json!({ "error": { "code": self.code(), "message": self.to_string() } })
    }
}

/// Restricts metrics to one process and/or provider (DynamoDB then queries GSI1/GSI2), and/or
/// to the calls priced by one model catalog version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catalog_version: Option<u64>,
}

/// Validated parameters of the metrics and alerts endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminQuery {
    pub from_ms: u64,
    pub to_ms: u64,
    pub group_by: Option<GroupBy>,
    pub filter: MetricsFilter,
}

impl AdminQuery {
    /// Parses `from`, `to` (RFC 3339 or epoch milliseconds; default the last 24 hours up to
    /// now), `groupBy`, `process` and `provider`. Unknown parameters are rejected so a typo
    /// (`group_by`) is not silently ignored.
    pub fn parse(params: &HashMap<String, String>) -> Result<AdminQuery, AdminError> {
        AdminQuery::parse_at(params, now_ms())
    }

    /// [`AdminQuery::parse`] with an explicit "now" (pure; for tests).
    pub fn parse_at(
        params: &HashMap<String, String>,
        now_ms: u64,
    ) -> Result<AdminQuery, AdminError> {
        parse_with(params, now_ms, METRICS_PARAMS)
    }

    /// The alerts endpoint's parameters: only `from` and `to`.
    pub fn parse_range_at(
        params: &HashMap<String, String>,
        now_ms: u64,
    ) -> Result<AdminQuery, AdminError> {
        parse_with(params, now_ms, RANGE_PARAMS)
    }
}

fn parse_with(
    params: &HashMap<String, String>,
    now_ms: u64,
    allowed: &[&str],
) -> Result<AdminQuery, AdminError> {
    check_known(params, allowed)?;
    let get = |name: &str| params.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let to_ms = match get("to") {
        Some(v) => parse_instant("to", v)?,
        None => now_ms,
    };
    let from_ms = match get("from") {
        Some(v) => parse_instant("from", v)?,
        None => to_ms.saturating_sub(DEFAULT_RANGE_MS),
    };
    if from_ms > to_ms {
        return Err(AdminError::InvalidParam {
            name: "from",
            value: get("from").unwrap_or_default().to_owned(),
            expected: format!("an instant not after to ({})", iso_ts(to_ms)),
        });
    }
    if to_ms - from_ms > MAX_RANGE_DAYS * 86_400_000 {
        return Err(AdminError::InvalidParam {
            name: "from",
            value: get("from").unwrap_or_default().to_owned(),
            expected: format!("a range of at most {MAX_RANGE_DAYS} days before to"),
        });
    }
    let group_by = match get("groupBy") {
        None => None,
        Some(v) => Some(
            GroupBy::ALL
                .into_iter()
                .find(|g| g.as_str() == v)
                .ok_or_else(|| AdminError::InvalidParam {
                    name: "groupBy",
                    value: v.to_owned(),
                    expected: format!("one of {}", GroupBy::ALL.map(GroupBy::as_str).join(", ")),
                })?,
        ),
    };
    let filter = MetricsFilter {
        process: get("process").map(|v| parse_id("process", v)).transpose()?,
        provider: get("provider")
            .map(|v| parse_id("provider", v))
            .transpose()?,
        catalog_version: get("catalogVersion")
            .map(|v| {
                v.parse::<u64>().map_err(|_| AdminError::InvalidParam {
                    name: "catalogVersion",
                    value: v.to_owned(),
                    expected: "a model catalog version number (0, 1, 2, …)".to_owned(),
                })
            })
            .transpose()?,
    };
    Ok(AdminQuery {
        from_ms,
        to_ms,
        group_by,
        filter,
    })
}

fn check_known(params: &HashMap<String, String>, allowed: &[&str]) -> Result<(), AdminError> {
    let mut unknown: Vec<&String> = params
        .keys()
        .filter(|k| !allowed.contains(&k.as_str()))
        .collect();
    unknown.sort();
    match unknown.first() {
        Some(name) => Err(AdminError::UnknownParam {
            name: (*name).clone(),
            allowed: allowed.join(", "),
        }),
        None => Ok(()),
    }
}

/// Epoch milliseconds (all digits) or RFC 3339 (`2026-11-25T14:00:00Z`, any offset).
fn parse_instant(name: &'static str, value: &str) -> Result<u64, AdminError> {
    let invalid = || AdminError::InvalidParam {
        name,
        value: value.to_owned(),
        expected:
            "an RFC 3339 instant (2026-11-25T14:00:00Z) or epoch milliseconds (1764079200000)"
                .to_owned(),
    };
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().map_err(|_| invalid());
    }
    let dt = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map_err(|_| invalid())?;
    u64::try_from(dt.unix_timestamp_nanos() / 1_000_000).map_err(|_| invalid())
}

fn parse_id(name: &'static str, value: &str) -> Result<String, AdminError> {
    if value.chars().count() > MAX_ID_CHARS || value.chars().any(char::is_control) {
        return Err(AdminError::InvalidParam {
            name,
            value: value.chars().take(64).collect(),
            expected: format!("at most {MAX_ID_CHARS} characters without control characters"),
        });
    }
    Ok(value.to_owned())
}

/// The admin metrics response.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminMetrics {
    /// RFC 3339 bounds of the range (inclusive).
    pub from: String,
    pub to: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_by: Option<GroupBy>,
    pub filter: MetricsFilter,
    /// All requests of the range (key `"total"`).
    pub totals: Aggregate,
    /// One row per group, sorted by key; empty without `groupBy`.
    pub groups: Vec<Aggregate>,
    /// The metrics pipeline's own counters, when the reader knows the tracker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<MetricsHealth>,
    /// The alert thresholds in force, so a dashboard can draw them against the figures.
    pub thresholds: AlertThresholds,
}

/// [`AlertConfig`] in display units (dollars, milliseconds, a 0..1 rate).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertThresholds {
    pub cost_per_day_usd: f64,
    pub cost_per_request_usd: f64,
    pub avg_latency_ms: u64,
    pub error_rate: f64,
}

impl From<&AlertConfig> for AlertThresholds {
    fn from(cfg: &AlertConfig) -> Self {
        AlertThresholds {
            cost_per_day_usd: cfg.cost_per_day.usd(),
            cost_per_request_usd: cfg.cost_per_request.usd(),
            avg_latency_ms: cfg.avg_latency_ms,
            error_rate: cfg.error_rate,
        }
    }
}

#[derive(Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Dynamo(DynamoStore),
}

/// Read-side handle over the store the shipper writes to.
#[derive(Clone)]
pub struct MetricsReader {
    backend: Backend,
    tracker: Option<Tracker>,
    thresholds: AlertThresholds,
}

impl MetricsReader {
    pub fn sqlite(store: SqliteStore) -> MetricsReader {
        MetricsReader {
            backend: Backend::Sqlite(store),
            tracker: None,
            thresholds: AlertThresholds::from(&AlertConfig::default()),
        }
    }

    pub fn dynamo(store: DynamoStore) -> MetricsReader {
        MetricsReader {
            backend: Backend::Dynamo(store),
            tracker: None,
            thresholds: AlertThresholds::from(&AlertConfig::default()),
        }
    }

    /// Include `tracker.health()` in every [`AdminMetrics`].
    pub fn with_health(mut self, tracker: Tracker) -> MetricsReader {
        self.tracker = Some(tracker);
        self
    }

    /// Report these thresholds (the tracker's [`AlertConfig`]) instead of the defaults.
    pub fn with_alert_config(mut self, cfg: &AlertConfig) -> MetricsReader {
        self.thresholds = AlertThresholds::from(cfg);
        self
    }

    /// Totals (and groups) of the requests that started in `[from_ms, to_ms]`.
    pub async fn metrics(
        &self,
        from_ms: u64,
        to_ms: u64,
        group_by: Option<GroupBy>,
        filter: &MetricsFilter,
    ) -> Result<AdminMetrics, StoreError> {
        let records = self.requests(from_ms, to_ms, filter).await?;
        let totals = aggregate_by(&records, |_| "total".to_owned())
            .pop()
            .unwrap_or_else(|| Aggregate::empty("total"));
        Ok(AdminMetrics {
            from: iso_ts(from_ms),
            to: iso_ts(to_ms),
            group_by,
            filter: filter.clone(),
            totals,
            groups: group_by.map(|g| aggregate(&records, g)).unwrap_or_default(),
            pipeline: self.tracker.as_ref().map(Tracker::health),
            thresholds: self.thresholds.clone(),
        })
    }

    /// Alerts raised in `[from_ms, to_ms]`, newest first. (Alerts have no resolution state:
    /// the evaluator raises one per breach episode and records no recovery.)
    pub async fn alerts(&self, from_ms: u64, to_ms: u64) -> Result<Vec<Alert>, StoreError> {
        let mut alerts = match &self.backend {
            Backend::Sqlite(s) => s.alerts_between(from_ms, to_ms).await?,
            Backend::Dynamo(d) => d.alerts_between(from_ms, to_ms).await?,
        };
        alerts.sort_by(|a, b| (b.timestamp_ms, &b.alert_id).cmp(&(a.timestamp_ms, &a.alert_id)));
        Ok(alerts)
    }

    /// The slowest requests and the newest failed ones in `[from_ms, to_ms]` (final records
    /// only: a retried call is part of its request), each with its trace id when it has one.
    pub async fn notable(
        &self,
        from_ms: u64,
        to_ms: u64,
        filter: &MetricsFilter,
    ) -> Result<NotableRequests, StoreError> {
        let mut records = self.requests(from_ms, to_ms, filter).await?;
        records.retain(|r| r.status.is_final());
        let mut failed: Vec<&RequestRecord> = records
            .iter()
            .filter(|r| r.status == keyvex_engine::RequestStatus::Failed)
            .collect();
        failed
            .sort_by(|a, b| (b.timestamp_ms, &b.request_id).cmp(&(a.timestamp_ms, &a.request_id)));
        let mut slowest: Vec<&RequestRecord> = records.iter().collect();
        slowest.sort_by(|a, b| (b.latency_ms, &b.request_id).cmp(&(a.latency_ms, &a.request_id)));
        let brief = |list: Vec<&RequestRecord>| {
            list.into_iter()
                .take(NOTABLE_PER_KIND)
                .map(NotableRequest::of)
                .collect()
        };
        Ok(NotableRequests {
            from: iso_ts(from_ms),
            to: iso_ts(to_ms),
            slowest: brief(slowest),
            failed: brief(failed),
        })
    }

    async fn requests(
        &self,
        from_ms: u64,
        to_ms: u64,
        filter: &MetricsFilter,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        let (process, provider) = (filter.process.as_deref(), filter.provider.as_deref());
        let mut records = match &self.backend {
            Backend::Sqlite(s) => {
                s.requests_filtered(from_ms, to_ms, process, provider)
                    .await?
            }
            Backend::Dynamo(d) => {
                d.requests_filtered(from_ms, to_ms, process, provider)
                    .await?
            }
        };
        // Neither store has an index on the version; the range is read either way.
        if let Some(version) = filter.catalog_version {
            records.retain(|r| r.catalog_version == version);
        }
        Ok(records)
    }
}

/// One request as the dashboard lists it, with the trace id that leads to its spans.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NotableRequest {
    pub request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub at: String,
    pub process: String,
    pub provider: String,
    pub model: String,
    pub status: &'static str,
    pub latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// `None` for requests recorded while traces were not exported.
    pub trace_id: Option<String>,
}

impl NotableRequest {
    fn of(r: &RequestRecord) -> NotableRequest {
        NotableRequest {
            request_id: r.request_id.clone(),
            correlation_id: r.correlation_id.clone(),
            at: iso_ts(r.timestamp_ms),
            process: r.process.clone(),
            provider: r.provider.clone(),
            model: r.model.clone(),
            status: r.status.as_str(),
            latency_ms: r.latency_ms,
            ttft_ms: r.ttft_ms,
            error_kind: r.error_kind.clone(),
            trace_id: r.trace_id.clone(),
        }
    }
}

/// `GET /admin/requests/notable`: the slowest and the newest failed requests of a range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotableRequests {
    pub from: String,
    pub to: String,
    pub slowest: Vec<NotableRequest>,
    pub failed: Vec<NotableRequest>,
}

/// `GET /admin/requests/notable?from&to&process&provider`.
pub async fn notable_json(
    reader: &MetricsReader,
    params: &HashMap<String, String>,
) -> Result<Value, AdminError> {
    let q = parse_with(params, now_ms(), NOTABLE_PARAMS)?;
    to_json(&reader.notable(q.from_ms, q.to_ms, &q.filter).await?)
}

fn to_json<T: Serialize>(value: &T) -> Result<Value, AdminError> {
    serde_json::to_value(value).map_err(|e| {
        AdminError::Store(StoreError::Decode {
            what: "admin response",
            problem: e.to_string(),
        })
    })
}

/// `GET /admin/metrics?from&to&groupBy&process&provider&catalogVersion`.
pub async fn metrics_json(
    reader: &MetricsReader,
    params: &HashMap<String, String>,
) -> Result<Value, AdminError> {
    let q = AdminQuery::parse(params)?;
    let metrics = reader
        .metrics(q.from_ms, q.to_ms, q.group_by, &q.filter)
        .await?;
    to_json(&metrics)
}

/// `GET /admin/alerts?from&to`: `{"alerts": [...]}`, newest first.
pub async fn alerts_json(
    reader: &MetricsReader,
    params: &HashMap<String, String>,
) -> Result<Value, AdminError> {
    let q = AdminQuery::parse_range_at(params, now_ms())?;
    let alerts = reader.alerts(q.from_ms, q.to_ms).await?;
    Ok(
        serde_json::json!({ "from": iso_ts(q.from_ms), "to": iso_ts(q.to_ms), "alerts": to_json(&alerts)? }),
    )
}

/// `GET /sessions/{id}`: the session with its messages in order, or [`AdminError::NotFound`].
pub async fn get_session_json(store: &SessionStore, id: &str) -> Result<Value, AdminError> {
    let id = parse_id("sessionId", id)?;
    match store.get_session(&id).await? {
        Some(session) => to_json(&session),
        None => Err(AdminError::NotFound {
            what: "session",
            id,
        }),
    }
}

/// `GET /users/{id}/sessions?limit`: `{"sessions": [...]}`, most recently active first.
pub async fn user_sessions_json(
    store: &SessionStore,
    user_id: &str,
    params: &HashMap<String, String>,
) -> Result<Value, AdminError> {
    check_known(params, SESSION_LIST_PARAMS)?;
    let user_id = parse_id("userId", user_id)?;
    let limit = match params.get("limit").map(|v| v.trim()) {
        None | Some("") => DEFAULT_SESSION_LIMIT,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_SESSION_LIMIT).contains(l))
            .ok_or_else(|| AdminError::InvalidParam {
                name: "limit",
                value: v.to_owned(),
                expected: format!("a whole number from 1 to {MAX_SESSION_LIMIT}"),
            })?,
    };
    let sessions = store.sessions_of_user(&user_id, limit).await?;
    Ok(serde_json::json!({ "userId": user_id, "sessions": to_json(&sessions)? }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_080_467_123; // 2025-11-25T14:21:07.123Z

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_the_last_day_and_no_grouping() {
        let q = AdminQuery::parse_at(&params(&[]), NOW).unwrap();
        assert_eq!((q.from_ms, q.to_ms), (NOW - DEFAULT_RANGE_MS, NOW));
        assert_eq!(q.group_by, None);
        assert_eq!(q.filter, MetricsFilter::default());
    }

    #[test]
    fn instants_are_rfc3339_or_epoch_ms() {
        let q = AdminQuery::parse_at(
            &params(&[
                ("from", "2025-11-25T14:00:00+01:00"),
                ("to", "1764080467123"),
                ("groupBy", "hour"),
                ("provider", "openai"),
            ]),
            NOW,
        )
        .unwrap();
        assert_eq!(q.from_ms, 1_764_075_600_000);
        assert_eq!(q.to_ms, NOW);
        assert_eq!(q.group_by, Some(GroupBy::Hour));
        assert_eq!(q.filter.provider.as_deref(), Some("openai"));
    }

    #[test]
    fn errors_name_the_parameter_and_what_is_allowed() {
        let err = |pairs: &[(&str, &str)]| {
            AdminQuery::parse_at(&params(pairs), NOW)
                .unwrap_err()
                .to_string()
        };
        let e = err(&[("groupBy", "week")]);
        assert!(e.contains("groupBy=\"week\""), "{e}");
        assert!(
            e.contains("process, provider, model, day, hour, user"),
            "{e}"
        );
        let e = err(&[("from", "yesterday")]);
        assert!(
            e.contains("from=\"yesterday\"") && e.contains("RFC 3339"),
            "{e}"
        );
        let e = err(&[("to", "2025-13-01T00:00:00Z")]);
        assert!(e.starts_with("invalid query parameter to="), "{e}");
        let e = err(&[("from", "1764080467124"), ("to", "1764080467123")]);
        assert!(e.contains("from=") && e.contains("not after to"), "{e}");
        let e = err(&[("from", "0"), ("to", "1764080467123")]);
        assert!(e.contains("at most 93 days"), "{e}");
        let e = err(&[("group_by", "day")]);
        assert!(
            e.contains("\"group_by\"")
                && e.contains("from, to, groupBy, process, provider, catalogVersion"),
            "{e}"
        );
        let e = err(&[("catalogVersion", "latest")]);
        assert!(e.contains("catalogVersion=\"latest\""), "{e}");
        let q = AdminQuery::parse_at(&params(&[("catalogVersion", "3")]), NOW).unwrap();
        assert_eq!(q.filter.catalog_version, Some(3));
        let e = AdminQuery::parse_range_at(&params(&[("groupBy", "day")]), NOW)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"groupBy\"") && e.contains("allowed: from, to"),
            "{e}"
        );
    }

    #[test]
    fn errors_map_to_statuses() {
        let bad = AdminQuery::parse_at(&params(&[("groupBy", "x")]), NOW).unwrap_err();
        assert_eq!(bad.status(), http::StatusCode::BAD_REQUEST);
        assert_eq!(bad.body()["error"]["code"], "invalid_parameter");
        let missing = AdminError::NotFound {
            what: "session",
            id: "s".into(),
        };
        assert_eq!(missing.status(), http::StatusCode::NOT_FOUND);
        let down = AdminError::Store(StoreError::Task("gone".into()));
        assert_eq!(down.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(down.is_retryable());
    }
}
