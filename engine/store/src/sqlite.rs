//! The embedded store: `requests`, `alerts`, `sessions` and `session_messages` tables in the same
//! SQLite file as the ledger, so a single-binary deployment keeps its metrics and conversations
//! across restarts without any service.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;
use rusqlite::{Connection, params};

use keyvex_engine::record::{RequestRecord, SessionMessage};

use crate::alerts::Alert;
use crate::entry::{Entry, Sink, StoreError, WriteReport};
use crate::session_meta::SessionMetadata;

/// Opens a SQLite file the way every part of the engine shares one: WAL (readers do not block the
/// writer), the given `synchronous` level, and a 5 s wait for the write lock, since the server,
/// its ledger, the job table and one-shot CLI commands may all write the same file at once.
/// [`open_wal`], then creates the tables of `schema` (`CREATE TABLE IF NOT EXISTS …`), with
/// errors naming the file.
pub(crate) fn open_tables(
    path: &Path,
    synchronous: &str,
    schema: &str,
) -> Result<Connection, StoreError> {
    let err = |source| StoreError::Sqlite {
        path: path.display().to_string(),
        source,
    };
    let conn = open_wal(path, synchronous).map_err(err)?;
    conn.execute_batch(schema).map_err(err)?;
    Ok(conn)
}

pub(crate) fn open_wal(path: &Path, synchronous: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        // The ledger keeps the entries until this write is confirmed, so NORMAL (durable against
        // process crashes, not power loss) is enough here: a lost write is shipped again.
        let conn = open_tables(
            path,
            "NORMAL",
            "CREATE TABLE IF NOT EXISTS requests (
                request_id TEXT PRIMARY KEY,
                timestamp_ms INTEGER NOT NULL,
                process TEXT NOT NULL,
                provider TEXT NOT NULL,
                model TEXT NOT NULL,
                success INTEGER NOT NULL,
                cost_pico_usd INTEGER NOT NULL,
                body TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS requests_by_time ON requests (timestamp_ms);
             CREATE TABLE IF NOT EXISTS alerts (
                alert_id TEXT PRIMARY KEY,
                timestamp_ms INTEGER NOT NULL,
                alert_type TEXT NOT NULL,
                severity TEXT NOT NULL,
                body TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts (timestamp_ms);
             CREATE TABLE IF NOT EXISTS sessions (
                session_id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL,
                created_ms INTEGER NOT NULL,
                updated_ms INTEGER NOT NULL,
                last_message_id TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_id, updated_ms);
             CREATE TABLE IF NOT EXISTS session_messages (
                session_id TEXT NOT NULL,
                message_id TEXT NOT NULL,
                timestamp_ms INTEGER NOT NULL,
                body TEXT NOT NULL,
                PRIMARY KEY (session_id, message_id)
             );
             CREATE INDEX IF NOT EXISTS session_messages_by_time
                ON session_messages (session_id, timestamp_ms, message_id);",
        )?;
        Ok(SqliteStore {
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

    /// Requests that started in `[from_ms, to_ms]`, oldest first.
    pub async fn requests_between(
        &self,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        let bodies = self
            .run(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT body FROM requests WHERE timestamp_ms BETWEEN ?1 AND ?2 ORDER BY timestamp_ms, request_id",
                )?;
                stmt.query_map(params![from_ms as i64, to_ms as i64], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        decode_all(&bodies, "request")
    }

    /// Requests that started in `[from_ms, to_ms]` of one process and/or provider (both `None`
    /// is [`SqliteStore::requests_between`]), oldest first.
    pub async fn requests_filtered(
        &self,
        from_ms: u64,
        to_ms: u64,
        process: Option<&str>,
        provider: Option<&str>,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        let process = process.map(str::to_owned);
        let provider = provider.map(str::to_owned);
        let bodies = self
            .run(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT body FROM requests WHERE timestamp_ms BETWEEN ?1 AND ?2
                       AND (?3 IS NULL OR process = ?3) AND (?4 IS NULL OR provider = ?4)
                     ORDER BY timestamp_ms, request_id",
                )?;
                stmt.query_map(
                    params![from_ms as i64, to_ms as i64, process, provider],
                    |r| r.get::<_, String>(0),
                )?
                .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        decode_all(&bodies, "request")
    }

    /// A stored session's metadata and messages (oldest first).
    pub async fn session(
        &self,
        session_id: &str,
    ) -> Result<Option<(SessionMetadata, Vec<SessionMessage>)>, StoreError> {
        let id = session_id.to_owned();
        let found = self
            .run(move |c| {
                let meta = c
                    .prepare_cached(
                        "SELECT session_id, user_id, created_ms, updated_ms, last_message_id
                         FROM sessions WHERE session_id = ?1",
                    )?
                    .query_map([&id], metadata_of_row)?
                    .next()
                    .transpose()?;
                let Some(meta) = meta else {
                    return Ok(None);
                };
                let bodies = c
                    .prepare_cached(
                        "SELECT body FROM session_messages WHERE session_id = ?1
                         ORDER BY timestamp_ms, message_id",
                    )?
                    .query_map([&id], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Some((meta, bodies)))
            })
            .await?;
        match found {
            Some((meta, bodies)) => Ok(Some((meta, decode_all(&bodies, "session message")?))),
            None => Ok(None),
        }
    }

    /// Who created the session, from its metadata row alone (no messages read).
    pub async fn session_owner(&self, session_id: &str) -> Result<Option<String>, StoreError> {
        let id = session_id.to_owned();
        self.run(move |c| {
            c.prepare_cached("SELECT user_id FROM sessions WHERE session_id = ?1")?
                .query_map([&id], |r| r.get::<_, String>(0))?
                .next()
                .transpose()
        })
        .await
    }

    /// A user's sessions, most recently active first.
    pub async fn sessions_of_user(
        &self,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<SessionMetadata>, StoreError> {
        let user = user_id.to_owned();
        self.run(move |c| {
            c.prepare_cached(
                "SELECT session_id, user_id, created_ms, updated_ms, last_message_id
                 FROM sessions WHERE user_id = ?1
                 ORDER BY updated_ms DESC, session_id DESC LIMIT ?2",
            )?
            .query_map(params![user, limit as i64], metadata_of_row)?
            .collect()
        })
        .await
    }

    /// Alerts raised in `[from_ms, to_ms]`, oldest first.
    pub async fn alerts_between(&self, from_ms: u64, to_ms: u64) -> Result<Vec<Alert>, StoreError> {
        let bodies = self
            .run(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT body FROM alerts WHERE timestamp_ms BETWEEN ?1 AND ?2 ORDER BY timestamp_ms, alert_id",
                )?;
                stmt.query_map(params![from_ms as i64, to_ms as i64], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        decode_all(&bodies, "alert")
    }
}

fn metadata_of_row(r: &rusqlite::Row<'_>) -> Result<SessionMetadata, rusqlite::Error> {
    Ok(SessionMetadata {
        session_id: r.get(0)?,
        user_id: r.get(1)?,
        created_at_ms: r.get::<_, i64>(2)? as u64,
        updated_at_ms: r.get::<_, i64>(3)? as u64,
        last_message_id: r.get(4)?,
    })
}

fn decode_all<T: serde::de::DeserializeOwned>(
    bodies: &[String],
    what: &'static str,
) -> Result<Vec<T>, StoreError> {
    bodies
        .iter()
        .map(|b| {
            serde_json::from_str(b).map_err(|e| StoreError::Decode {
                what,
                problem: e.to_string(),
            })
        })
        .collect()
}

/// Encoded ahead of the blocking call so JSON errors are not SQLite errors.
enum Row {
    Request(RequestRecord, String),
    Alert(Alert, String),
    Message(SessionMessage, String),
}

impl Sink for SqliteStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn write<'a>(&'a self, entries: &'a [Entry]) -> BoxFuture<'a, Result<WriteReport, StoreError>> {
        Box::pin(async move {
            let rows = entries
                .iter()
                .map(|e| {
                    let body = match e {
                        Entry::Request(r) => serde_json::to_string(r),
                        Entry::Alert(a) => serde_json::to_string(a),
                        Entry::Message(m) => serde_json::to_string(m),
                    }
                    .map_err(|err| StoreError::Decode {
                        what: "entry",
                        problem: err.to_string(),
                    })?;
                    Ok(match e {
                        Entry::Request(r) => Row::Request(r.clone(), body),
                        Entry::Alert(a) => Row::Alert(a.clone(), body),
                        Entry::Message(m) => Row::Message(m.clone(), body),
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            let metadata = SessionMetadata::of_batch(entries.iter().filter_map(|e| match e {
                Entry::Message(m) => Some(m),
                _ => None,
            }));
            self.run(move |c| {
                let tx = c.transaction()?;
                for row in &rows {
                    match row {
                        Row::Request(r, body) => {
                            tx.prepare_cached(
                                "INSERT INTO requests (request_id, timestamp_ms, process, provider, model, success, cost_pico_usd, body)
                                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                                 ON CONFLICT(request_id) DO UPDATE SET timestamp_ms = excluded.timestamp_ms,
                                   process = excluded.process, provider = excluded.provider, model = excluded.model,
                                   success = excluded.success, cost_pico_usd = excluded.cost_pico_usd, body = excluded.body",
                            )?
                            .execute(params![
                                r.request_id,
                                r.timestamp_ms as i64,
                                r.process,
                                r.provider,
                                r.model,
                                r.success,
                                r.cost_pico_usd as i64,
                                body
                            ])?;
                        }
                        Row::Alert(a, body) => {
                            tx.prepare_cached(
                                "INSERT INTO alerts (alert_id, timestamp_ms, alert_type, severity, body)
                                 VALUES (?1, ?2, ?3, ?4, ?5)
                                 ON CONFLICT(alert_id) DO UPDATE SET body = excluded.body",
                            )?
                            .execute(params![
                                a.alert_id,
                                a.timestamp_ms as i64,
                                a.alert_type.as_str(),
                                a.severity.as_str(),
                                body
                            ])?;
                        }
                        Row::Message(m, body) => {
                            tx.prepare_cached(
                                "INSERT INTO session_messages (session_id, message_id, timestamp_ms, body)
                                 VALUES (?1, ?2, ?3, ?4)
                                 ON CONFLICT(session_id, message_id) DO UPDATE SET
                                   timestamp_ms = excluded.timestamp_ms, body = excluded.body",
                            )?
                            .execute(params![m.session_id, m.message_id, m.timestamp_ms as i64, body])?;
                        }
                    }
                }
                // Min/max merge: idempotent and independent of the order batches arrive in.
                for meta in &metadata {
                    tx.prepare_cached(
                        "INSERT INTO sessions (session_id, user_id, created_ms, updated_ms, last_message_id)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT(session_id) DO UPDATE SET
                           created_ms = MIN(created_ms, excluded.created_ms),
                           last_message_id = CASE
                             WHEN (excluded.updated_ms, excluded.last_message_id) >= (updated_ms, last_message_id)
                             THEN excluded.last_message_id ELSE last_message_id END,
                           updated_ms = MAX(updated_ms, excluded.updated_ms)",
                    )?
                    .execute(params![
                        meta.session_id,
                        meta.user_id,
                        meta.created_at_ms as i64,
                        meta.updated_at_ms as i64,
                        meta.last_message_id
                    ])?;
                }
                tx.commit()
            })
            .await?;
            Ok(WriteReport::default())
        })
    }
}

/// Runs `f` on a shared SQLite connection on the blocking pool (rusqlite blocks; the async
/// workers must not), mapping its error to [`StoreError::Sqlite`] with the file's path. A
/// poisoned lock is taken anyway: SQLite's own transactions keep the file consistent.
pub(crate) async fn run_blocking<T: Send + 'static>(
    conn: &Arc<Mutex<Connection>>,
    path: &std::path::Path,
    f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
) -> Result<T, StoreError> {
    let conn = Arc::clone(conn);
    let path = path.display().to_string();
    tokio::task::spawn_blocking(move || {
        let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut conn).map_err(|source| StoreError::Sqlite { path, source })
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}
