//! Model catalog versions in the store: every published catalog is a numbered version (1, 2, …;
//! the catalog a process starts with is version 0), and one of them is active.
//!
//! In DynamoDB these are items of the single table under `PK=CONFIG`: `SK=MODEL_CONFIG#{version}`
//! (the validated catalog JSON, its author, time, note and a short diff summary against the
//! version before it) and `SK=ACTIVE_MODEL_CONFIG` (the version in force and the versions active
//! before it); in SQLite the same in two tables. A catalog is validated by the engine's own
//! parser before it is stored, so an invalid one is refused with the message the process would
//! give at start, and nothing changes.
//!
//! [`CatalogVersions`] is the one handle; `sqlite.rs` and `dynamo.rs` only store and read.

mod dynamo;
mod sqlite;

use std::sync::Arc;

use keyvex_engine::catalog::diff::CatalogDiff;
use keyvex_engine::catalog::{Catalog, CatalogError};
use keyvex_engine::clock::now_ms;
use serde::Serialize;

use crate::entry::StoreError;

pub use dynamo::DynamoCatalogs;
pub use sqlite::SqliteCatalogs;

/// A catalog's JSON larger than this is refused: a DynamoDB item holds at most 400 KB, and a
/// real catalog is a few KB.
pub const MAX_CATALOG_BYTES: usize = 300_000;
/// Most earlier active versions kept for `rollback`.
pub const MAX_HISTORY: usize = 100;
/// The summary stored with a version is cut to about this many characters.
const SUMMARY_CHARS: usize = 400;
/// Tries of a write that lost a race with another writer (two publishes taking the same number,
/// two activations at once) before giving up.
const RACE_TRIES: u32 = 8;

/// Errors of the catalog-version boundary. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CatalogStoreError {
    /// The catalog does not validate: the same message the process gives at start. (Not a
    /// `source`: the message already holds it, and error chains would print it twice.)
    #[error("{0}; nothing was stored")]
    Invalid(CatalogError),
    #[error(
        "the catalog is {bytes} bytes; at most {MAX_CATALOG_BYTES} can be stored (a DynamoDB item holds 400 KB)"
    )]
    TooLarge { bytes: usize },
    #[error(
        "model catalog version {version} does not exist; `keyvex models list` (or GET /v1/admin/models) shows the versions"
    )]
    UnknownVersion { version: u64 },
    /// A stored version this binary cannot read (written by a newer one).
    #[error("stored model catalog version {version} does not load with this binary: {problem}")]
    Unloadable { version: u64, problem: CatalogError },
    #[error(
        "nothing to roll back to: version {active} is active and no earlier version was active before it"
    )]
    NothingToRollBack { active: u64 },
    #[error(
        "another change of the catalog versions happened at the same time {RACE_TRIES} times in a row; try again"
    )]
    Contended,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CatalogStoreError {
    /// Retrying the same request later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            CatalogStoreError::Store(e) => e.is_retryable(),
            CatalogStoreError::Contended => true,
            _ => false,
        }
    }
}

/// One stored version, without its catalog. Serializes camelCase for the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub version: u64,
    /// The catalog file's own `version` field.
    pub label: String,
    /// Who published it (the admin caller, or `--author` of the CLI).
    pub author: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// What changed against the version before it (version 0 for the first).
    pub summary: String,
    /// Unix milliseconds of the publish.
    pub created_at_ms: u64,
}

/// A stored version with its catalog JSON as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    pub info: VersionInfo,
    pub catalog_json: String,
}

/// Which version is in force, and which were before it (for rollback).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ActiveVersion {
    pub version: u64,
    /// Unix milliseconds of the activation.
    pub activated_at_ms: u64,
    pub activated_by: String,
    /// The versions active before this one, the most recent last (`rollback` returns to it).
    pub history: Vec<u64>,
    /// Bumped by every change; a change is written only over the state it was computed from.
    #[serde(skip)]
    pub seq: u64,
}

impl ActiveVersion {
    /// The pointer of a store where no version was ever activated: version 0, the catalog each
    /// process started with.
    fn none() -> ActiveVersion {
        ActiveVersion {
            version: 0,
            activated_at_ms: 0,
            activated_by: String::new(),
            history: Vec::new(),
            seq: 0,
        }
    }
}

/// What a publish stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    #[serde(flatten)]
    pub info: VersionInfo,
    /// Every change against the version before it, one per line.
    pub changes: Vec<String>,
}

/// What an activation or a rollback changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Activation {
    pub active: ActiveVersion,
    /// The version that was active before.
    pub previous: u64,
    /// False when the version was already the active one (nothing was written).
    pub changed: bool,
}

/// Storage of versions and the active pointer; the logic is in [`CatalogVersions`].
#[derive(Clone)]
enum Backend {
    Sqlite(SqliteCatalogs),
    Dynamo(DynamoCatalogs),
}

/// Catalog versions in the SQLite or DynamoDB store. Cheap to clone.
#[derive(Clone)]
pub struct CatalogVersions {
    backend: Arc<Backend>,
}

impl CatalogVersions {
    pub fn sqlite(store: SqliteCatalogs) -> CatalogVersions {
        CatalogVersions {
            backend: Arc::new(Backend::Sqlite(store)),
        }
    }

    pub fn dynamo(store: DynamoCatalogs) -> CatalogVersions {
        CatalogVersions {
            backend: Arc::new(Backend::Dynamo(store)),
        }
    }

    /// `sqlite` or `dynamodb`, for messages.
    pub fn store_name(&self) -> &'static str {
        match &*self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Dynamo(_) => "dynamodb",
        }
    }

    /// The version in force: one keyed read of the active pointer (version 0 when none was
    /// ever activated). This is what every replica reads once per poll interval.
    pub async fn active(&self) -> Result<ActiveVersion, CatalogStoreError> {
        let found = match &*self.backend {
            Backend::Sqlite(s) => s.active().await?,
            Backend::Dynamo(d) => d.active().await?,
        };
        Ok(found.unwrap_or_else(ActiveVersion::none))
    }

    /// Every stored version, oldest first (catalogs left out).
    pub async fn list(&self) -> Result<Vec<VersionInfo>, CatalogStoreError> {
        Ok(match &*self.backend {
            Backend::Sqlite(s) => s.list().await?,
            Backend::Dynamo(d) => d.list().await?,
        })
    }

    /// One stored version with its catalog JSON (`None` for an unknown number; version 0 is
    /// not stored: it is each process's own starting catalog).
    pub async fn get(&self, version: u64) -> Result<Option<StoredVersion>, CatalogStoreError> {
        Ok(match &*self.backend {
            Backend::Sqlite(s) => s.get(version).await?,
            Backend::Dynamo(d) => d.get(version).await?,
        })
    }

    /// The catalog of `version`, parsed and validated by this binary: `base` (this process's
    /// starting catalog) for version 0, else the stored JSON. The result carries its version
    /// number; the activation time is the caller's to set.
    pub async fn load(&self, version: u64, base: &Catalog) -> Result<Catalog, CatalogStoreError> {
        if version == 0 {
            return Ok(base.clone().as_version(0, None));
        }
        let stored = self
            .get(version)
            .await?
            .ok_or(CatalogStoreError::UnknownVersion { version })?;
        let catalog = Catalog::parse(&stored.catalog_json, &format!("store version {version}"))
            .map_err(|problem| CatalogStoreError::Unloadable { version, problem })?;
        Ok(catalog.as_version(version, None))
    }

    /// Validates `json` (named `source` in errors, like a file at start) and stores it as the
    /// next version, with a summary of its changes against the latest version (or `base`, this
    /// process's starting catalog, for the first). Refused, storing nothing, when it does not
    /// validate. Does not activate it.
    pub async fn publish(
        &self,
        json: &str,
        source: &str,
        base: &Catalog,
        author: &str,
        note: Option<&str>,
    ) -> Result<Published, CatalogStoreError> {
        let json = json.trim();
        let catalog = Catalog::parse(json, source).map_err(CatalogStoreError::Invalid)?;
        if json.len() > MAX_CATALOG_BYTES {
            return Err(CatalogStoreError::TooLarge { bytes: json.len() });
        }
        let note = note
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        for _ in 0..RACE_TRIES {
            let latest = self.list().await?.last().map_or(0, |v| v.version);
            let previous = match self.load(latest, base).await {
                Ok(previous) => Some(previous),
                // A latest version this binary cannot read still gets a successor.
                Err(CatalogStoreError::Unloadable { .. }) => None,
                Err(e) => return Err(e),
            };
            let diff = previous.map(|p| CatalogDiff::between(&p, &catalog));
            let info = VersionInfo {
                version: latest + 1,
                label: catalog.label().to_owned(),
                author: author.to_owned(),
                note: note.clone(),
                summary: diff.as_ref().map_or_else(
                    || format!("version {latest} does not load with this binary; no summary"),
                    |d| d.summary(SUMMARY_CHARS),
                ),
                created_at_ms: now_ms(),
            };
            let stored = StoredVersion {
                info,
                catalog_json: json.to_owned(),
            };
            let inserted = match &*self.backend {
                Backend::Sqlite(s) => s.insert(&stored).await?,
                Backend::Dynamo(d) => d.insert(&stored).await?,
            };
            if inserted {
                tracing::info!(version = stored.info.version, author, summary = %stored.info.summary, "model catalog version published");
                return Ok(Published {
                    info: stored.info,
                    changes: diff.map(|d| d.changes).unwrap_or_default(),
                });
            }
        }
        Err(CatalogStoreError::Contended)
    }

    /// Makes `version` the active one (0: every process's starting catalog). The version must
    /// exist and load with this binary; the one active before is remembered for `rollback`.
    pub async fn activate(
        &self,
        version: u64,
        by: &str,
        base: &Catalog,
    ) -> Result<Activation, CatalogStoreError> {
        self.load(version, base).await?;
        self.change(by, |current| {
            if current.version == version {
                return Ok(None);
            }
            let mut history = current.history.clone();
            history.push(current.version);
            let excess = history.len().saturating_sub(MAX_HISTORY);
            history.drain(..excess);
            Ok(Some((version, history)))
        })
        .await
    }

    /// Makes the version that was active before the current one active again (repeated
    /// rollbacks walk further back).
    pub async fn rollback(&self, by: &str) -> Result<Activation, CatalogStoreError> {
        self.change(by, |current| {
            let mut history = current.history.clone();
            match history.pop() {
                Some(previous) => Ok(Some((previous, history))),
                None => Err(CatalogStoreError::NothingToRollBack {
                    active: current.version,
                }),
            }
        })
        .await
    }

    /// Reads the pointer, computes the next one with `next` (`None`: nothing to change) and
    /// writes it only over the state it read, retrying when another writer came first.
    async fn change(
        &self,
        by: &str,
        next: impl Fn(&ActiveVersion) -> Result<Option<(u64, Vec<u64>)>, CatalogStoreError>,
    ) -> Result<Activation, CatalogStoreError> {
        for _ in 0..RACE_TRIES {
            let current = self.active().await?;
            let Some((version, history)) = next(&current)? else {
                return Ok(Activation {
                    previous: current.version,
                    active: current,
                    changed: false,
                });
            };
            let active = ActiveVersion {
                version,
                activated_at_ms: now_ms(),
                activated_by: by.to_owned(),
                history,
                seq: current.seq + 1,
            };
            let written = match &*self.backend {
                Backend::Sqlite(s) => s.set_active(&active, current.seq).await?,
                Backend::Dynamo(d) => d.set_active(&active, current.seq).await?,
            };
            if written {
                tracing::info!(
                    version,
                    previous = current.version,
                    by,
                    "model catalog version activated"
                );
                return Ok(Activation {
                    active,
                    previous: current.version,
                    changed: true,
                });
            }
        }
        Err(CatalogStoreError::Contended)
    }
}
