//! The one place the SQLite-or-DynamoDB choice is made: [`StoreConfig`] names the store, and
//! [`Stores::open`] opens everything that lives in it — the metrics tracker (its ledger and the
//! sink it ships to), the admin metrics reader, the session store and the job table.

use std::path::PathBuf;
use std::sync::Arc;

use crate::MetricsError;
use crate::admin::MetricsReader;
use crate::dynamo::{DynamoStore, client};
use crate::entry::{Sink, StoreError};
use crate::jobs::{DynamoJobs, JobStore, SqliteJobs};
use crate::sessions::SessionStore;
use crate::sqlite::SqliteStore;
use crate::tracker::{MetricsConfig, Tracker};

/// Where metrics, alerts, sessions and jobs are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded default: tables in one SQLite file (usually the ledger's own).
    Sqlite { path: PathBuf },
    /// The single DynamoDB table; `endpoint` points at an emulator (moto, DynamoDB Local).
    /// Region and credentials are the standard AWS variables and profiles.
    Dynamo {
        table: String,
        endpoint: Option<String>,
    },
}

impl StoreConfig {
    /// One line for start-up banners.
    pub fn describe(&self) -> String {
        match self {
            StoreConfig::Sqlite { path } => format!("SQLite {}", path.display()),
            StoreConfig::Dynamo {
                table,
                endpoint: Some(url),
            } => format!("DynamoDB table {table} at {url}"),
            StoreConfig::Dynamo { table, .. } => format!("DynamoDB table {table}"),
        }
    }

    /// Only the job table (what `keyvex queue enqueue|status` needs), without a tracker.
    pub async fn open_jobs(&self) -> Result<JobStore, StoreError> {
        Ok(match self {
            StoreConfig::Sqlite { path } => {
                let path = path.clone();
                let jobs = tokio::task::spawn_blocking(move || SqliteJobs::open(&path))
                    .await
                    .map_err(|e| StoreError::Task(e.to_string()))??;
                JobStore::Sqlite(jobs)
            }
            StoreConfig::Dynamo { table, endpoint } => {
                JobStore::Dynamo(DynamoJobs::new(client(endpoint.as_deref()).await, table))
            }
        })
    }
}

/// Everything opened on one store. Cheap to clone.
#[derive(Clone)]
pub struct Stores {
    /// The engine's recorder: every call record and session message goes through its ledger.
    pub tracker: Tracker,
    /// Admin metrics and alerts, with the tracker's health.
    pub metrics: MetricsReader,
    /// Sessions, including messages still waiting in the ledger.
    pub sessions: SessionStore,
    /// Job state of the AI-processing queue.
    pub jobs: JobStore,
    pub description: String,
}

impl Stores {
    /// Opens the store and the ledger, and starts the tracker (which ships what an earlier run
    /// left in the ledger). The DynamoDB table is not created here (`keyvex table create` and
    /// `dynamo::create_table` provision it).
    pub async fn open(store: &StoreConfig, metrics: MetricsConfig) -> Result<Stores, MetricsError> {
        let alerts = metrics.alerts.clone();
        let (sink, reader, sessions, jobs): (Arc<dyn Sink>, _, _, _) = match store {
            StoreConfig::Sqlite { path } => {
                let (db, jobs) = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || {
                        Ok::<_, StoreError>((SqliteStore::open(&path)?, SqliteJobs::open(&path)?))
                    })
                    .await
                    .map_err(|e| StoreError::Task(e.to_string()))??
                };
                tracing::info!(path = %path.display(), "metrics stored in embedded SQLite");
                (
                    Arc::new(db.clone()),
                    MetricsReader::sqlite(db.clone()),
                    SessionStore::sqlite(db),
                    JobStore::Sqlite(jobs),
                )
            }
            StoreConfig::Dynamo { table, endpoint } => {
                let client = client(endpoint.as_deref()).await;
                let db = DynamoStore::new(client.clone(), table);
                tracing::info!(
                    table,
                    endpoint = endpoint.as_deref().unwrap_or("aws"),
                    "metrics ship to DynamoDB"
                );
                (
                    Arc::new(db.clone()),
                    MetricsReader::dynamo(db.clone()),
                    SessionStore::dynamo(db),
                    JobStore::Dynamo(DynamoJobs::new(client, table)),
                )
            }
        };
        let tracker = Tracker::start(metrics, sink).await?;
        Ok(Stores {
            metrics: reader
                .with_health(tracker.clone())
                .with_alert_config(&alerts),
            sessions: sessions.with_pending(Arc::new(tracker.clone())),
            jobs,
            tracker,
            description: store.describe(),
        })
    }
}
