//! The local ledger: an outbox table in an embedded SQLite file that holds every accepted entry
//! until a sink confirmed it. Blocking (rusqlite); callers run it on the blocking pool.
//!
//! Durability choice: WAL with `synchronous=FULL`. NORMAL+WAL already survives `kill -9` (the WAL
//! append is in the OS cache), but can lose the last transactions on power loss; the receipt
//! promises "committed", and group commits make the extra fsync per batch, not per record, cheap.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::metrics::MetricsError;
use crate::store::Entry;
use crate::store::sessions::{PendingFilter, SessionMessage};

/// A row read back from the outbox. `version` guards against deleting a row that was
/// re-recorded (same key, new body) while the old body was being shipped.
pub(crate) struct Pending {
    pub seq: i64,
    pub version: i64,
    pub entry: Entry,
}

pub(crate) struct Ledger {
    conn: Connection,
}

impl Ledger {
    pub(crate) fn open(path: &Path) -> Result<Ledger, MetricsError> {
        let open_err = |source| MetricsError::LedgerOpen {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS metrics_outbox (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                entry_key TEXT NOT NULL UNIQUE,
                kind TEXT NOT NULL,
                body TEXT NOT NULL,
                accepted_ms INTEGER NOT NULL,
                version INTEGER NOT NULL DEFAULT 1
             );
             CREATE TABLE IF NOT EXISTS metrics_outbox_dead (
                seq INTEGER PRIMARY KEY,
                entry_key TEXT NOT NULL,
                body TEXT NOT NULL,
                problem TEXT NOT NULL
             );",
        )
        .map_err(open_err)?;
        Ok(Ledger { conn })
    }

    /// Commits `entries` in one transaction. Returns how many were new rows (an entry whose key
    /// is already pending replaces the pending body instead).
    pub(crate) fn append(&mut self, entries: &[Entry], now_ms: u64) -> Result<u64, MetricsError> {
        let tx = self.conn.transaction()?;
        let mut inserted = 0;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO metrics_outbox (entry_key, kind, body, accepted_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(entry_key) DO UPDATE SET body = excluded.body, version = version + 1
                 RETURNING version",
            )?;
            for entry in entries {
                let body = serde_json::to_string(entry)?;
                let version: i64 = stmt.query_row(
                    params![entry.key(), entry.kind(), body, now_ms as i64],
                    |row| row.get(0),
                )?;
                if version == 1 {
                    inserted += 1;
                }
            }
        }
        tx.commit()?;
        Ok(inserted)
    }

    /// The oldest `limit` pending entries. Rows that no longer decode are moved aside to
    /// `metrics_outbox_dead` (kept, never deleted) so they cannot block the queue.
    pub(crate) fn pending(&mut self, limit: usize) -> Result<Vec<Pending>, MetricsError> {
        let rows: Vec<(i64, i64, String, String)> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT seq, version, entry_key, body FROM metrics_outbox ORDER BY seq LIMIT ?1",
            )?;
            stmt.query_map([limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<Result<_, _>>()?
        };
        let mut out = Vec::with_capacity(rows.len());
        for (seq, version, key, body) in rows {
            match serde_json::from_str::<Entry>(&body) {
                Ok(entry) => out.push(Pending {
                    seq,
                    version,
                    entry,
                }),
                Err(err) => {
                    tracing::error!(seq, key, error = %err, "undecodable metrics outbox row moved to metrics_outbox_dead");
                    let tx = self.conn.transaction()?;
                    tx.execute(
                        "INSERT OR REPLACE INTO metrics_outbox_dead (seq, entry_key, body, problem) VALUES (?1, ?2, ?3, ?4)",
                        params![seq, key, body, err.to_string()],
                    )?;
                    tx.execute("DELETE FROM metrics_outbox WHERE seq = ?1", [seq])?;
                    tx.commit()?;
                }
            }
        }
        Ok(out)
    }

    /// Removes shipped rows; returns how many were removed (a row re-recorded meanwhile stays).
    pub(crate) fn mark_shipped(&mut self, shipped: &[(i64, i64)]) -> Result<u64, MetricsError> {
        let tx = self.conn.transaction()?;
        let mut removed = 0;
        {
            let mut stmt =
                tx.prepare_cached("DELETE FROM metrics_outbox WHERE seq = ?1 AND version = ?2")?;
            for (seq, version) in shipped {
                removed += stmt.execute(params![seq, version])? as u64;
            }
        }
        tx.commit()?;
        Ok(removed)
    }

    /// Pending session messages of one session or one user. The outbox only holds what is not
    /// shipped yet (small), so filtering the JSON bodies of the `message` rows is cheap enough
    /// and needs no extra column in existing ledger files.
    pub(crate) fn pending_messages(
        &self,
        filter: PendingFilter<'_>,
    ) -> Result<Vec<SessionMessage>, MetricsError> {
        let (path, value) = match filter {
            PendingFilter::Session(id) => ("$.sessionId", id),
            PendingFilter::User(id) => ("$.userId", id),
        };
        let mut stmt = self.conn.prepare_cached(
            "SELECT body FROM metrics_outbox
             WHERE kind = 'message' AND json_extract(body, ?1) = ?2 ORDER BY seq",
        )?;
        let bodies = stmt
            .query_map(params![path, value], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(bodies.len());
        for body in bodies {
            // An undecodable row is left for `pending` to move aside; a read must not fail on it.
            if let Ok(Entry::Message(m)) = serde_json::from_str::<Entry>(&body) {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Pending row count and the oldest pending acceptance time.
    pub(crate) fn backlog(&self) -> Result<(u64, Option<u64>), MetricsError> {
        let (count, oldest): (i64, Option<i64>) = self
            .conn
            .query_row(
                "SELECT COUNT(*), MIN(accepted_ms) FROM metrics_outbox",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((0, None));
        Ok((count as u64, oldest.map(|o| o as u64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::RequestRecord;

    fn entry(id: &str) -> Entry {
        Entry::Request(RequestRecord::new("u", "direct", "openai", "m").with_request_id(id))
    }

    #[test]
    fn append_read_ship_and_reopen() {
        let dir = tempdir();
        let path = dir.join("ledger.sqlite3");
        {
            let mut l = Ledger::open(&path).unwrap();
            assert_eq!(
                l.append(&[entry("a"), entry("b"), entry("c")], 5).unwrap(),
                3
            );
            // Same key again: replaces, not a new row.
            assert_eq!(l.append(&[entry("a")], 6).unwrap(), 0);
            let p = l.pending(2).unwrap();
            assert_eq!(p.len(), 2);
            assert_eq!(p[0].entry.key(), "a");
            assert_eq!(p[0].version, 2);
            // A stale version is not deleted; the current one is.
            assert_eq!(
                l.mark_shipped(&[(p[0].seq, 1), (p[1].seq, p[1].version)])
                    .unwrap(),
                1
            );
            assert_eq!(l.backlog().unwrap(), (2, Some(5)));
        }
        let mut l = Ledger::open(&path).unwrap();
        let keys: Vec<String> = l
            .pending(10)
            .unwrap()
            .iter()
            .map(|p| p.entry.key().into_owned())
            .collect();
        assert_eq!(keys, vec!["a", "c"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pending_messages_filter_by_session_and_user() {
        use crate::store::sessions::Role;
        let dir = tempdir();
        let mut l = Ledger::open(&dir.join("l.sqlite3")).unwrap();
        let m = |session: &str, user: &str, id: &str| {
            Entry::Message(
                SessionMessage::new(session, user, Role::User, "magicSpark", "hi".into())
                    .with_message_id(id),
            )
        };
        l.append(
            &[
                m("s1", "u1", "a"),
                entry("a"),
                m("s2", "u1", "b"),
                m("s1", "u1", "c"),
            ],
            1,
        )
        .unwrap();
        let ids = |f| -> Vec<String> {
            l.pending_messages(f)
                .unwrap()
                .into_iter()
                .map(|m| m.message_id)
                .collect()
        };
        assert_eq!(ids(PendingFilter::Session("s1")), vec!["a", "c"]);
        assert_eq!(ids(PendingFilter::User("u1")), vec!["a", "b", "c"]);
        assert!(ids(PendingFilter::User("u2")).is_empty());
        // Message "a" and request "a" do not collide in the outbox.
        assert_eq!(l.backlog().unwrap().0, 4);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn undecodable_rows_are_moved_aside() {
        let dir = tempdir();
        let mut l = Ledger::open(&dir.join("l.sqlite3")).unwrap();
        l.append(&[entry("a")], 1).unwrap();
        l.conn
            .execute("INSERT INTO metrics_outbox (entry_key, kind, body, accepted_ms) VALUES ('bad', 'request', '{', 1)", [])
            .unwrap();
        assert_eq!(l.pending(10).unwrap().len(), 1);
        assert_eq!(l.backlog().unwrap().0, 1);
        let dead: i64 = l
            .conn
            .query_row("SELECT COUNT(*) FROM metrics_outbox_dead", [], |r| r.get(0))
            .unwrap();
        assert_eq!(dead, 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("keyvex-ledger-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
