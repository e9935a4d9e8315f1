//! Catalog versions in the embedded SQLite store: `model_config_versions` (one row per version)
//! and `model_config_active` (one row: the version in force, the versions before it, and a
//! sequence number that makes a change a compare-and-set).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use super::{ActiveVersion, StoredVersion, VersionInfo};
use crate::entry::StoreError;
use crate::sqlite::run_blocking;

#[derive(Clone)]
pub struct SqliteCatalogs {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

impl SqliteCatalogs {
    /// Opens (and creates) the tables in the store's SQLite file.
    pub fn open(path: &Path) -> Result<SqliteCatalogs, StoreError> {
        // FULL: a published version or an activation is an operator's change with no other
        // copy, unlike metrics rows, which the ledger can ship again.
        let conn = crate::sqlite::open_tables(
            path,
            "FULL",
            "CREATE TABLE IF NOT EXISTS model_config_versions (
                version INTEGER PRIMARY KEY,
                catalog TEXT NOT NULL,
                label TEXT NOT NULL,
                author TEXT NOT NULL,
                note TEXT,
                summary TEXT NOT NULL,
                created_ms INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS model_config_active (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                version INTEGER NOT NULL,
                activated_ms INTEGER NOT NULL,
                activated_by TEXT NOT NULL,
                history TEXT NOT NULL,
                seq INTEGER NOT NULL
             );",
        )?;
        Ok(SqliteCatalogs {
            path: path.to_owned(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        run_blocking(&self.conn, &self.path, f).await
    }

    pub(super) async fn active(&self) -> Result<Option<ActiveVersion>, StoreError> {
        let row = self
            .run(|c| {
                c.prepare_cached(
                    "SELECT version, activated_ms, activated_by, history, seq
                     FROM model_config_active WHERE id = 1",
                )?
                .query_row([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })
                .optional()
            })
            .await?;
        let Some((version, at, by, history, seq)) = row else {
            return Ok(None);
        };
        let history = serde_json::from_str(&history).map_err(|e| StoreError::Decode {
            what: "active model catalog row",
            problem: format!("history is not a list of versions: {e}"),
        })?;
        Ok(Some(ActiveVersion {
            version: version as u64,
            activated_at_ms: at as u64,
            activated_by: by,
            history,
            seq: seq as u64,
        }))
    }

    /// Writes `next` if the row still has sequence `expected` (0: no row yet).
    pub(super) async fn set_active(
        &self,
        next: &ActiveVersion,
        expected: u64,
    ) -> Result<bool, StoreError> {
        let history = serde_json::to_string(&next.history).map_err(|e| StoreError::Decode {
            what: "active model catalog row",
            problem: e.to_string(),
        })?;
        let next = next.clone();
        self.run(move |c| {
            let values = params![
                next.version as i64,
                next.activated_at_ms as i64,
                next.activated_by,
                history,
                next.seq as i64,
                expected as i64
            ];
            let changed = if expected == 0 {
                c.prepare_cached(
                    "INSERT INTO model_config_active (id, version, activated_ms, activated_by, history, seq)
                     SELECT 1, ?1, ?2, ?3, ?4, ?5 WHERE ?6 = 0
                     ON CONFLICT(id) DO NOTHING",
                )?
                .execute(values)?
            } else {
                c.prepare_cached(
                    "UPDATE model_config_active SET version = ?1, activated_ms = ?2,
                       activated_by = ?3, history = ?4, seq = ?5
                     WHERE id = 1 AND seq = ?6",
                )?
                .execute(values)?
            };
            Ok(changed == 1)
        })
        .await
    }

    pub(super) async fn list(&self) -> Result<Vec<VersionInfo>, StoreError> {
        self.run(|c| {
            c.prepare_cached(
                "SELECT version, label, author, note, summary, created_ms
                 FROM model_config_versions ORDER BY version",
            )?
            .query_map([], info_of_row)?
            .collect()
        })
        .await
    }

    pub(super) async fn get(&self, version: u64) -> Result<Option<StoredVersion>, StoreError> {
        self.run(move |c| {
            c.prepare_cached(
                "SELECT version, label, author, note, summary, created_ms, catalog
                 FROM model_config_versions WHERE version = ?1",
            )?
            .query_row([version as i64], |r| {
                Ok(StoredVersion {
                    info: info_of_row(r)?,
                    catalog_json: r.get(6)?,
                })
            })
            .optional()
        })
        .await
    }

    /// Stores a new version; false when its number is taken (another publish came first).
    pub(super) async fn insert(&self, stored: &StoredVersion) -> Result<bool, StoreError> {
        let s = stored.clone();
        self.run(move |c| {
            let inserted = c
                .prepare_cached(
                    "INSERT INTO model_config_versions
                       (version, catalog, label, author, note, summary, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(version) DO NOTHING",
                )?
                .execute(params![
                    s.info.version as i64,
                    s.catalog_json,
                    s.info.label,
                    s.info.author,
                    s.info.note,
                    s.info.summary,
                    s.info.created_at_ms as i64
                ])?;
            Ok(inserted == 1)
        })
        .await
    }
}

fn info_of_row(r: &rusqlite::Row<'_>) -> Result<VersionInfo, rusqlite::Error> {
    Ok(VersionInfo {
        version: r.get::<_, i64>(0)? as u64,
        label: r.get(1)?,
        author: r.get(2)?,
        note: r.get(3)?,
        summary: r.get(4)?,
        created_at_ms: r.get::<_, i64>(5)? as u64,
    })
}
