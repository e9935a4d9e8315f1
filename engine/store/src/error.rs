//! The error of the metrics boundary (ledger and tracker). A leaf, so every part of the crate can
//! name it.

use crate::entry::StoreError;

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
    #[error(
        "the owner locks of the metrics ledger in {path} could not be used: {source}; check that the ledger's directory is writable"
    )]
    Owner {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics ledger write failed: {0}; the records stay queued and are retried")]
    Ledger(#[from] rusqlite::Error),
    #[error("metrics store: {0}")]
    Store(#[from] StoreError),
    #[error("a metrics entry could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(
        "the metrics ledger task stopped before finishing this work (it panicked or the runtime is shutting down)"
    )]
    LedgerStopped,
}
