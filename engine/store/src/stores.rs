//! The one place the SQLite-or-DynamoDB choice is made: [`StoreConfig`] names the store,
//! [`Stores::open`] opens what every server and command uses — the metrics tracker (its ledger
//! and the sink it ships to), the admin metrics reader, the session store and the model catalog
//! versions — [`StoreConfig::open_jobs`] the job table, for the processes that have a queue,
//! and [`StoreConfig::open_catalogs`] the catalog versions alone (`keyvex models`).

use std::path::PathBuf;
use std::sync::Arc;

use crate::admin::MetricsReader;
use crate::aws::AwsTimeouts;
use crate::caller_budgets::CallerBudgets;
use crate::catalog_store::{CatalogVersions, DynamoCatalogs, SqliteCatalogs};
use crate::dynamo::{DynamoStore, client};
use crate::entry::{Sink, StoreError};
use crate::error::MetricsError;
use crate::jobs::{DynamoJobs, JobStore, SqliteJobs};
use crate::sessions::SessionStore;
use crate::sqlite::SqliteStore;
use crate::tracker::{MetricsConfig, SharedIntents, Tracker};

/// Where metrics, alerts, sessions and jobs are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded default: tables in one SQLite file (usually the ledger's own).
    Sqlite { path: PathBuf },
    /// The single DynamoDB table; `endpoint` points at an emulator (moto, DynamoDB Local).
    /// Region and credentials are the standard AWS variables and profiles; `timeouts` bound
    /// every call, so a hung endpoint delays the shipper and the reads but never stops them.
    Dynamo {
        table: String,
        endpoint: Option<String>,
        timeouts: AwsTimeouts,
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
                ..
            } => format!("DynamoDB table {table} at {url}"),
            StoreConfig::Dynamo { table, .. } => format!("DynamoDB table {table}"),
        }
    }

    /// The model catalog versions, without the metrics tracker (the `keyvex models` commands).
    pub async fn open_catalogs(&self) -> Result<CatalogVersions, StoreError> {
        Ok(match self {
            StoreConfig::Sqlite { path } => {
                let path = path.clone();
                let catalogs = tokio::task::spawn_blocking(move || SqliteCatalogs::open(&path))
                    .await
                    .map_err(|e| StoreError::Task(e.to_string()))??;
                CatalogVersions::sqlite(catalogs)
            }
            StoreConfig::Dynamo {
                table,
                endpoint,
                timeouts,
            } => CatalogVersions::dynamo(DynamoCatalogs::new(
                client(endpoint.as_deref(), timeouts).await,
                table,
            )),
        })
    }

    /// Where callers' own limits set through the admin API are kept when budgets live in the
    /// process (no Redis).
    pub async fn open_caller_budgets(&self) -> Result<CallerBudgets, StoreError> {
        Ok(match self {
            StoreConfig::Sqlite { path } => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || CallerBudgets::sqlite(&path))
                    .await
                    .map_err(|e| StoreError::Task(e.to_string()))??
            }
            StoreConfig::Dynamo {
                table,
                endpoint,
                timeouts,
            } => CallerBudgets::dynamo(client(endpoint.as_deref(), timeouts).await, table),
        })
    }

    /// The job table of the AI-processing queue (the server's job routes, the worker, `keyvex
    /// queue`). Opened only where a queue is configured: on SQLite it is one more connection.
    pub async fn open_jobs(&self) -> Result<JobStore, StoreError> {
        Ok(match self {
            StoreConfig::Sqlite { path } => {
                let path = path.clone();
                let jobs = tokio::task::spawn_blocking(move || SqliteJobs::open(&path))
                    .await
                    .map_err(|e| StoreError::Task(e.to_string()))??;
                JobStore::Sqlite(jobs)
            }
            StoreConfig::Dynamo {
                table,
                endpoint,
                timeouts,
            } => JobStore::Dynamo(DynamoJobs::new(
                client(endpoint.as_deref(), timeouts).await,
                table,
            )),
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
    /// The model catalog versions and which one is active.
    pub catalogs: CatalogVersions,
    pub description: String,
}

impl Stores {
    /// Opens the store and the ledger, and starts the tracker (which ships what an earlier run
    /// left in the ledger). The DynamoDB table is not created here (`keyvex table create` and
    /// `dynamo::create_table` provision it).
    pub async fn open(store: &StoreConfig, metrics: MetricsConfig) -> Result<Stores, MetricsError> {
        match store {
            StoreConfig::Sqlite { path } => {
                let db = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                        .await
                        .map_err(|e| StoreError::Task(e.to_string()))??
                };
                let catalogs = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || SqliteCatalogs::open(&path))
                        .await
                        .map_err(|e| StoreError::Task(e.to_string()))??
                };
                tracing::info!(path = %path.display(), "metrics stored in embedded SQLite");
                let parts = Parts {
                    sink: Arc::new(db.clone()),
                    metrics: MetricsReader::sqlite(db.clone()),
                    sessions: SessionStore::sqlite(db),
                    catalogs: CatalogVersions::sqlite(catalogs),
                    // The store is the ledger's own file: no other machine could record a lost
                    // one's calls from it.
                    intents: None,
                };
                Stores::start(parts, metrics, store.describe()).await
            }
            StoreConfig::Dynamo {
                table,
                endpoint,
                timeouts,
            } => {
                tracing::info!(
                    table,
                    endpoint = endpoint.as_deref().unwrap_or("aws"),
                    attempt_timeout_ms = timeouts.attempt.as_millis() as u64,
                    operation_timeout_ms = timeouts.operation.as_millis() as u64,
                    "metrics ship to DynamoDB"
                );
                let client = client(endpoint.as_deref(), timeouts).await;
                Stores::open_dynamo(client, table, metrics).await
            }
        }
    }

    /// [`Stores::open`] on a DynamoDB table through a client of the caller's (its own
    /// credentials, region and timeouts).
    pub async fn open_dynamo(
        client: aws_sdk_dynamodb::Client,
        table: &str,
        metrics: MetricsConfig,
    ) -> Result<Stores, MetricsError> {
        let catalogs = CatalogVersions::dynamo(DynamoCatalogs::new(client.clone(), table));
        let db = DynamoStore::new(client, table);
        let parts = Parts {
            sink: Arc::new(db.clone()),
            metrics: MetricsReader::dynamo(db.clone()),
            sessions: SessionStore::dynamo(db.clone()),
            catalogs,
            intents: Some(Arc::new(db)),
        };
        Stores::start(parts, metrics, format!("DynamoDB table {table}")).await
    }

    async fn start(
        parts: Parts,
        metrics: MetricsConfig,
        description: String,
    ) -> Result<Stores, MetricsError> {
        let alerts = metrics.alerts.clone();
        let tracker = Tracker::start_with(metrics, parts.sink, parts.intents).await?;
        Ok(Stores {
            metrics: parts
                .metrics
                .with_health(tracker.clone())
                .with_alert_config(&alerts),
            sessions: parts.sessions.with_pending(Arc::new(tracker.clone())),
            catalogs: parts.catalogs,
            tracker,
            description,
        })
    }
}

/// What one store offers before the tracker starts on it.
struct Parts {
    sink: Arc<dyn Sink>,
    metrics: MetricsReader,
    sessions: SessionStore,
    catalogs: CatalogVersions,
    /// Where every replica's open call intents are kept, when the store is shared.
    intents: Option<Arc<dyn SharedIntents>>,
}
