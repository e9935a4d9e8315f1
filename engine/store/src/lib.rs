//! Metrics that are never lost, and the stores behind them.
//!
//! The path of one record: `Tracker::record` (no I/O, a channel send) → ledger task (group commit
//! into the SQLite outbox, then the receipt resolves) → shipper task (batches to the [`Sink`],
//! deletes from the outbox only after the sink confirmed). A crash at any point leaves every
//! receipted record either in the sink or in the outbox, and the next start ships the outbox.
//! An entry the sink refuses for good (not a transient failure) moves to the ledger's
//! `dead_letters` table instead of blocking the outbox: counted in [`MetricsHealth`], logged,
//! listed by [`Tracker::dead_letters`] and shipped again by [`Tracker::requeue_dead_letters`].
//!
//! The two stores — SQLite (embedded default) and DynamoDB (single table) — take the shipper's
//! batches and answer the admin, session and job reads. [`Stores::open`] is where one of them is
//! chosen. The [`Tracker`] is the engine's `Recorder`.

pub mod admin;
pub mod aggregate;
pub mod alerts;
pub mod aws;
pub mod caller_budgets;
pub mod catalog_store;
pub mod demo;
pub mod dynamo;
pub mod entry;
mod error;
pub mod jobs;
mod ledger;
pub mod redis_limits;
mod session_meta;
pub mod sessions;
pub mod sqlite;
mod stores;
mod tracker;

pub use aggregate::{Aggregate, GroupBy, Percentiles, aggregate, aggregate_by};
pub use alerts::{Alert, AlertConfig, AlertType, Severity};
pub use aws::AwsTimeouts;
pub use catalog_store::{CatalogStoreError, CatalogVersions};
pub use entry::{Entry, Sink, StoreError, WriteReport, day_of, full_jitter, iso_ts};
pub use error::MetricsError;
pub use ledger::DeadLetter;
pub use stores::{StoreConfig, Stores};
pub use tracker::{MetricsConfig, MetricsHealth, Tracker};
