//! Metrics that are never lost: the per-request record, the [`Tracker`] that makes it durable in
//! a local ledger before anything else, and the shipper that copies the ledger to a [`Sink`].
//!
//! The path of one record: `Tracker::record` (no I/O, a channel send) → ledger task (group commit
//! into the SQLite outbox, then the [`Receipt`] resolves) → shipper task (batches to the sink,
//! deletes from the outbox only after the sink confirmed). A crash at any point leaves every
//! receipted record either in the sink or in the outbox, and the next start ships the outbox.
//! An entry the sink refuses for good (not a transient failure) moves to the ledger's
//! `dead_letters` table instead of blocking the outbox: counted in [`MetricsHealth`], logged,
//! listed by [`Tracker::dead_letters`] and shipped again by [`Tracker::requeue_dead_letters`].
//!
//! [`Sink`]: crate::store::Sink

pub mod admin;
pub mod aggregate;
pub mod alerts;
mod from_outcome;
mod ledger;
mod record;
mod tracker;

pub use aggregate::{Aggregate, GroupBy, Percentiles, aggregate, aggregate_by};
pub use alerts::{Alert, AlertConfig, AlertType, Severity};
pub use from_outcome::CallContext;
pub use ledger::DeadLetter;
pub(crate) use record::now_ms;
pub use record::{RequestRecord, RequestStatus};
pub use tracker::{MetricsConfig, MetricsHealth, Receipt, ShutdownReport, Tracker, start_from_env};

/// Errors of the metrics boundary (ledger and tracker).
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "metrics ledger {path} could not be used: {source}; check that the directory exists and is writable"
    )]
    LedgerOpen {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("metrics ledger write failed: {0}; the records stay queued and are retried")]
    Ledger(#[from] rusqlite::Error),
    #[error("metrics store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("a metrics record could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the metrics tracker is shut down; records are no longer accepted")]
    Closed,
    #[error(
        "the metrics ledger task stopped before committing this record (it panicked or the runtime is shutting down)"
    )]
    LedgerStopped,
    #[error("invalid metrics setting {name}={value:?}: {problem}")]
    Config {
        name: &'static str,
        value: String,
        problem: String,
    },
}
