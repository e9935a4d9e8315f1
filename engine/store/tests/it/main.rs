//! Integration tests of the store crate, one binary (link once): the tracker's ledger → sink
//! path (also through a DynamoDB endpoint that never answers), sessions and the admin reads
//! against real SQLite files and a local DynamoDB (moto).

#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod admin_reads;
mod caller_budgets;
mod catalog_versions;
mod hung_endpoint;
mod intents;
mod redis_admission;
mod redis_limits;
mod sessions;
mod shipping;
mod stores_open;
