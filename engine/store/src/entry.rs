//! Where metrics and session messages end up: the [`Sink`] the shipper writes to, and the two
//! stores behind it — SQLite (embedded default) and DynamoDB (single-table schema) — with their
//! read queries.

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use keyvex_engine::record::{RequestRecord, SessionMessage};

use crate::alerts::Alert;

/// One row of the metrics outbox: a request record, an alert or a session message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Entry {
    Request(RequestRecord),
    Alert(Alert),
    Message(SessionMessage),
}

/// Outbox keys of messages carry a prefix: request and alert keys are bare ids (kept as they
/// were, so existing ledgers still dedupe), and a message id must never collide with them.
const MESSAGE_KEY_PREFIX: &str = "message:";

impl Entry {
    /// The idempotency key: writing the same entry twice leaves one row/item.
    pub fn key(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Entry::Request(r) => (&r.request_id).into(),
            Entry::Alert(a) => (&a.alert_id).into(),
            Entry::Message(m) => format!("{MESSAGE_KEY_PREFIX}{}", m.message_id).into(),
        }
    }

    /// The outbox `kind` column (the ledger filters pending messages on it).
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Request(_) => "request",
            Entry::Alert(_) => "alert",
            Entry::Message(_) => "message",
        }
    }
}

/// What a successful [`Sink::write`] had to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Resends inside the sink (unprocessed items, throttling), for the health counters.
    pub retries: u64,
}

/// A durable destination for entries. `write` must be idempotent per [`Entry::key`] (the shipper
/// resends a batch whose outcome it did not learn) and must only return `Ok` once every entry of
/// the batch is stored.
pub trait Sink: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn write<'a>(&'a self, entries: &'a [Entry]) -> BoxFuture<'a, Result<WriteReport, StoreError>>;
}

/// Errors of the store boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("SQLite store {path}: {source}; check that the file is writable and not corrupt")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("DynamoDB {operation} on table {table} failed: {message}")]
    Dynamo {
        operation: &'static str,
        table: String,
        message: String,
        /// Throttling, timeouts and unreachable endpoints: retrying later can succeed.
        retryable: bool,
    },
    /// The store accepted the connection (or not even that) but did not answer within the
    /// client's timeouts. Transient: the entries stay pending and are sent again.
    #[error(
        "DynamoDB {operation} on table {table} timed out: {message}; the endpoint did not answer within the client's connect, attempt or operation timeout; check the endpoint and the network, and retry (the metrics shipper retries by itself and keeps the entries until then)"
    )]
    Timeout {
        operation: &'static str,
        table: String,
        message: String,
    },
    #[error(
        "DynamoDB left {left} of {total} items unprocessed after {attempts} attempts (throttled); they stay in the ledger and are retried"
    )]
    Unprocessed {
        left: usize,
        total: usize,
        attempts: u32,
    },
    #[error(
        "DynamoDB table {table} exists with a schema keyvex cannot use: {}; keyvex needs {}. Nothing was changed: point DYNAMODB_TABLE_NAME (or --table) at a new name and run `keyvex table create`, or migrate or delete this table",
        differences.join("; "),
        crate::dynamo::SCHEMA
    )]
    SchemaMismatch {
        table: String,
        differences: Vec<String>,
    },
    #[error(
        "DynamoDB table {table} is still {status} after {waited_secs} s; wait and check it with `keyvex table describe`, then run `keyvex table create` again to finish (it is idempotent)"
    )]
    NotActive {
        table: String,
        status: String,
        waited_secs: u64,
    },
    #[error(
        "DynamoDB table {table} does not exist; create it with `keyvex table create` (DYNAMODB_TABLE_NAME or --table names it)"
    )]
    NoTable { table: String },
    #[error("stored {what} could not be decoded: {problem}")]
    Decode { what: &'static str, problem: String },
    #[error("store task failed: {0}")]
    Task(String),
    #[error("the local metrics ledger could not be read: {0}")]
    Ledger(String),
    /// The store refused the data itself (DynamoDB `ValidationException`: an item over 400 KB,
    /// a bad attribute): resending the same entries can never succeed. The metrics shipper
    /// isolates the offending entries and moves them to the ledger's `dead_letters` table.
    #[error(
        "{sink} rejected the write: {message}; resending cannot help, fix the entry or the store and requeue the dead letters"
    )]
    Rejected { sink: &'static str, message: String },
}

impl StoreError {
    /// Retrying later can succeed: throttling, outages, timeouts, a busy or full disk.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Dynamo { retryable, .. } => *retryable,
            StoreError::Unprocessed { .. }
            | StoreError::Timeout { .. }
            | StoreError::NotActive { .. }
            | StoreError::Task(_)
            | StoreError::Ledger(_) => true,
            StoreError::Sqlite { .. } => !self.is_rejection(),
            StoreError::Decode { .. }
            | StoreError::Rejected { .. }
            | StoreError::SchemaMismatch { .. }
            | StoreError::NoTable { .. } => false,
        }
    }

    /// The store did not answer in time (counted apart in the shipper's health).
    pub fn is_timeout(&self) -> bool {
        matches!(self, StoreError::Timeout { .. })
    }

    /// The write failed because of what was written, not because of the store's state: the
    /// same entries will fail again however often they are resent, while other entries can
    /// succeed. A batch failing this way is split to find the entries to set aside.
    ///
    /// Errors that are permanent but not about the data (a missing table, denied access, bad
    /// credentials) are not rejections: every entry would fail the same way, so setting entries
    /// aside would only empty the outbox. Those keep the entries pending until an operator
    /// fixes the configuration.
    pub fn is_rejection(&self) -> bool {
        match self {
            StoreError::Rejected { .. } | StoreError::Decode { .. } => true,
            StoreError::Sqlite { source, .. } => sqlite_rejects_data(source),
            StoreError::Dynamo { .. }
            | StoreError::Timeout { .. }
            | StoreError::SchemaMismatch { .. }
            | StoreError::NotActive { .. }
            | StoreError::NoTable { .. }
            | StoreError::Unprocessed { .. }
            | StoreError::Task(_)
            | StoreError::Ledger(_) => false,
        }
    }
}

/// SQLite errors caused by the row itself: constraint violations (including `RAISE(ABORT)` in
/// triggers), values too big or of the wrong type. Busy, locked, I/O, full-disk and read-only
/// errors are about the database and pass with time or an operator's fix.
fn sqlite_rejects_data(err: &rusqlite::Error) -> bool {
    use rusqlite::ffi::ErrorCode;
    match err {
        rusqlite::Error::SqliteFailure(e, _) => matches!(
            e.code,
            ErrorCode::ConstraintViolation | ErrorCode::TooBig | ErrorCode::TypeMismatch
        ),
        rusqlite::Error::ToSqlConversionFailure(_)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::NulError(_) => true,
        _ => false,
    }
}

/// `yyyy-mm-dd` (UTC) of a unix-milliseconds instant: the DynamoDB partition of that day.
pub fn day_of(ms: u64) -> String {
    iso_ts(ms)[..10].to_owned()
}

/// Fixed-width RFC 3339 UTC with milliseconds (`2026-11-25T14:21:07.123Z`), so that string order
/// is time order in sort keys.
pub fn iso_ts(ms: u64) -> String {
    let dt = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}

/// Full-jitter exponential backoff: a uniform draw in `[0, min(cap, base·2^attempt)]`, so
/// retrying writers spread out instead of hammering a throttled table in lockstep.
pub fn full_jitter(
    base: std::time::Duration,
    cap: std::time::Duration,
    attempt: u32,
) -> std::time::Duration {
    use rand::Rng;
    let ceiling = base
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(cap);
    let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
    std::time::Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_fixed_width_utc() {
        assert_eq!(iso_ts(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_ts(1_764_080_467_123), "2025-11-25T14:21:07.123Z");
        assert_eq!(day_of(1_764_080_467_123), "2025-11-25");
    }

    #[test]
    fn sqlite_constraint_errors_are_rejections_and_busy_disks_are_not() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (id TEXT PRIMARY KEY, v TEXT NOT NULL);
             CREATE TRIGGER no_bad BEFORE INSERT ON t WHEN NEW.id = 'bad'
               BEGIN SELECT RAISE(ABORT, 'bad is refused'); END;",
        )
        .unwrap();
        let sqlite = |source| StoreError::Sqlite {
            path: "t.sqlite3".into(),
            source,
        };
        let not_null = conn
            .execute("INSERT INTO t (id, v) VALUES ('a', NULL)", [])
            .unwrap_err();
        let trigger = conn
            .execute("INSERT INTO t (id, v) VALUES ('bad', 'x')", [])
            .unwrap_err();
        for err in [sqlite(not_null), sqlite(trigger)] {
            assert!(err.is_rejection() && !err.is_retryable(), "{err}");
        }
        let busy = sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        ));
        assert!(!busy.is_rejection() && busy.is_retryable());
        let denied = StoreError::Dynamo {
            operation: "BatchWriteItem",
            table: "t".into(),
            message: "AccessDeniedException".into(),
            retryable: false,
        };
        assert!(
            !denied.is_rejection(),
            "a config error must not dead-letter entries"
        );
        let rejected = StoreError::Rejected {
            sink: "dynamodb",
            message: "ValidationException".into(),
        };
        assert!(rejected.is_rejection() && !rejected.is_retryable());
    }

    #[test]
    fn full_jitter_stays_under_the_capped_ceiling() {
        for attempt in 0..40 {
            let d = full_jitter(Duration::from_millis(50), Duration::from_secs(2), attempt);
            let ceiling =
                Duration::from_millis(50 * (1u64 << attempt.min(20))).min(Duration::from_secs(2));
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
        }
    }
}
