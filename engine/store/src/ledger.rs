//! The local ledger: an outbox table in an embedded SQLite file that holds every accepted entry
//! until a sink confirmed it, a `dead_letters` table for entries the sink refused for good
//! (kept with the error and the time until an operator requeues them; never deleted), and the
//! intents of the model calls in flight (`intents`). Blocking (rusqlite); callers run it on the
//! blocking pool.
//!
//! Durability choice: WAL with `synchronous=FULL`. NORMAL+WAL already survives `kill -9` (the WAL
//! append is in the OS cache), but can lose the last transactions on power loss; the receipt
//! promises "committed", and group commits make the extra fsync per batch, not per record, cheap.
//! A batch of nothing but call intents is the exception: it commits with NORMAL (see
//! `ledger/intents.rs`), since intents guard against a dying process, not a dying machine.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, params};

mod intents;

use crate::entry::Entry;
use crate::error::MetricsError;
use keyvex_engine::record::SessionMessage;

use crate::sessions::PendingFilter;

/// A row read back from the outbox. `version` guards against deleting a row that was
/// re-recorded (same key, new body) while the old body was being shipped.
pub(crate) struct Pending {
    pub seq: i64,
    pub version: i64,
    pub entry: Entry,
}

/// An entry the sink refused permanently, as kept in the ledger's `dead_letters` table.
/// Serializes camelCase for the admin API.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Row id in `dead_letters` (increases with time).
    pub id: i64,
    /// The entry's idempotency key ([`Entry::key`]).
    pub key: String,
    /// `request`, `alert` or `message`.
    pub kind: String,
    /// The entry as it was queued (JSON); the raw text as a string if it was not valid JSON.
    pub entry: serde_json::Value,
    /// Why the sink refused it (or why the row could not be decoded).
    pub error: String,
    /// When the entry was first accepted (unix ms).
    pub accepted_ms: u64,
    /// When it was moved to `dead_letters` (unix ms).
    pub dead_lettered_ms: u64,
}

/// An outbox row to move to `dead_letters`: `(seq, version)` as read, and the error text.
#[derive(Clone)]
pub(crate) struct Reject {
    pub seq: i64,
    pub version: i64,
    pub error: String,
}

/// What [`Ledger::settle`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settled {
    /// Outbox rows removed because the sink confirmed them.
    pub shipped: u64,
    /// Outbox rows moved to `dead_letters`.
    pub dead_lettered: u64,
}

/// What [`Ledger::requeue_dead_letters`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Requeued {
    /// Entries put back into the outbox.
    pub moved: u64,
    /// `dead_letters` rows removed: the moved ones plus older rows of the same keys, which the
    /// moved (newer) body supersedes exactly as a re-recorded entry replaces a pending one.
    pub removed: u64,
}

pub(crate) struct Ledger {
    conn: Connection,
    /// Whether the connection was left at `synchronous=NORMAL` by an intent-only commit whose
    /// return to FULL failed: the next commit with entries puts it back first.
    relaxed: bool,
}

impl Ledger {
    pub(crate) fn open(path: &Path) -> Result<Ledger, MetricsError> {
        let open_err = |source| MetricsError::LedgerOpen {
            path: path.display().to_string(),
            source,
        };
        // FULL: a receipt promises the entry survives power loss, not just a process crash.
        let conn = crate::sqlite::open_wal(path, "FULL").map_err(open_err)?;
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
             );
             CREATE TABLE IF NOT EXISTS dead_letters (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                entry_key TEXT NOT NULL,
                kind TEXT NOT NULL,
                body TEXT NOT NULL,
                accepted_ms INTEGER NOT NULL,
                error TEXT NOT NULL,
                dead_lettered_ms INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS dead_letters_by_key ON dead_letters (entry_key);
             -- Rows set aside by earlier versions (undecodable bodies) join the one table the
             -- admin API shows; the old table stays, empty, for older binaries.
             BEGIN;
             INSERT INTO dead_letters (entry_key, kind, body, accepted_ms, error, dead_lettered_ms)
                SELECT entry_key, 'unknown', body, 0, 'undecodable outbox row: ' || problem, 0
                FROM metrics_outbox_dead ORDER BY seq;
             DELETE FROM metrics_outbox_dead;
             COMMIT;",
        )
        .map_err(open_err)?;
        intents::create(&conn).map_err(open_err)?;
        Ok(Ledger {
            conn,
            relaxed: false,
        })
    }

    /// Commits `entries` in one transaction. Returns how many were new rows (an entry whose key
    /// is already pending replaces the pending body instead).
    pub(crate) fn append(&mut self, entries: &[Entry], now_ms: u64) -> Result<u64, MetricsError> {
        let tx = self.conn.transaction()?;
        let inserted = Ledger::append_in(&tx, entries, now_ms)?;
        tx.commit()?;
        Ok(inserted)
    }

    /// [`Ledger::append`] inside a transaction of the caller's.
    fn append_in(
        tx: &Transaction<'_>,
        entries: &[Entry],
        now_ms: u64,
    ) -> Result<u64, MetricsError> {
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
        Ok(inserted)
    }

    /// The oldest `limit` pending entries, and how many rows were set aside on the way: rows
    /// that no longer decode are moved to `dead_letters` (kept, never deleted) so they cannot
    /// block the queue.
    pub(crate) fn pending(
        &mut self,
        limit: usize,
        now_ms: u64,
    ) -> Result<(Vec<Pending>, u64), MetricsError> {
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
        let mut undecodable = Vec::new();
        for (seq, version, key, body) in rows {
            match serde_json::from_str::<Entry>(&body) {
                Ok(entry) => out.push(Pending {
                    seq,
                    version,
                    entry,
                }),
                Err(err) => {
                    tracing::error!(seq, entry_key = key, error = %err,
                        "undecodable metrics outbox row moved to dead_letters");
                    undecodable.push(Reject {
                        seq,
                        version,
                        error: format!("undecodable outbox row: {err}"),
                    });
                }
            }
        }
        let moved = if undecodable.is_empty() {
            0
        } else {
            self.settle(&[], &undecodable, now_ms)?.dead_lettered
        };
        Ok((out, moved))
    }

    /// In one transaction: removes the rows the sink confirmed and moves the rows it refused to
    /// `dead_letters` with their error and `now_ms`. Both only touch the version that was read:
    /// a row re-recorded meanwhile (new body, new version) stays pending, since the new body may
    /// be fine and has not been tried.
    pub(crate) fn settle(
        &mut self,
        shipped: &[(i64, i64)],
        rejected: &[Reject],
        now_ms: u64,
    ) -> Result<Settled, MetricsError> {
        let tx = self.conn.transaction()?;
        let mut out = Settled::default();
        {
            let mut delete =
                tx.prepare_cached("DELETE FROM metrics_outbox WHERE seq = ?1 AND version = ?2")?;
            for (seq, version) in shipped {
                out.shipped += delete.execute(params![seq, version])? as u64;
            }
            let mut copy = tx.prepare_cached(
                "INSERT INTO dead_letters (entry_key, kind, body, accepted_ms, error, dead_lettered_ms)
                 SELECT entry_key, kind, body, accepted_ms, ?3, ?4 FROM metrics_outbox
                 WHERE seq = ?1 AND version = ?2",
            )?;
            for r in rejected {
                if copy.execute(params![r.seq, r.version, r.error, now_ms as i64])? == 1 {
                    out.dead_lettered += delete.execute(params![r.seq, r.version])? as u64;
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// The newest `limit` dead letters, newest first.
    pub(crate) fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, MetricsError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, entry_key, kind, body, error, accepted_ms, dead_lettered_ms
             FROM dead_letters ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt
            .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                let body: String = r.get(3)?;
                Ok(DeadLetter {
                    id: r.get(0)?,
                    key: r.get(1)?,
                    kind: r.get(2)?,
                    entry: serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
                    error: r.get(4)?,
                    accepted_ms: r.get::<_, i64>(5)? as u64,
                    dead_lettered_ms: r.get::<_, i64>(6)? as u64,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Rows in `dead_letters`.
    pub(crate) fn dead_letter_count(&self) -> Result<u64, MetricsError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// Moves dead letters back to the outbox (at its end, keeping their acceptance time), for an
    /// operator who fixed the cause. Per key only the newest dead letter goes back; a key that
    /// is pending again keeps its dead letters until that pending row has shipped (the pending
    /// body is newer and must not be overwritten by an older one), so a later call moves them.
    pub(crate) fn requeue_dead_letters(&mut self) -> Result<Requeued, MetricsError> {
        let tx = self.conn.transaction()?;
        let mut out = Requeued::default();
        {
            let newest: Vec<(i64, String)> = tx
                .prepare_cached(
                    "SELECT MAX(id), entry_key FROM dead_letters d
                     WHERE NOT EXISTS (SELECT 1 FROM metrics_outbox o WHERE o.entry_key = d.entry_key)
                     GROUP BY entry_key ORDER BY MAX(id)",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO metrics_outbox (entry_key, kind, body, accepted_ms)
                 SELECT entry_key, kind, body, accepted_ms FROM dead_letters WHERE id = ?1",
            )?;
            let mut remove = tx.prepare_cached("DELETE FROM dead_letters WHERE entry_key = ?1")?;
            for (id, key) in newest {
                out.moved += insert.execute([id])? as u64;
                out.removed += remove.execute([key])? as u64;
            }
        }
        tx.commit()?;
        Ok(out)
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
    use keyvex_engine::record::RequestRecord;

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
            let (p, _) = l.pending(2, 0).unwrap();
            assert_eq!(p.len(), 2);
            assert_eq!(p[0].entry.key(), "a");
            assert_eq!(p[0].version, 2);
            // A stale version is not deleted; the current one is.
            assert_eq!(
                l.settle(&[(p[0].seq, 1), (p[1].seq, p[1].version)], &[], 0)
                    .unwrap()
                    .shipped,
                1
            );
            assert_eq!(l.backlog().unwrap(), (2, Some(5)));
        }
        let mut l = Ledger::open(&path).unwrap();
        let keys: Vec<String> = l
            .pending(10, 0)
            .unwrap()
            .0
            .iter()
            .map(|p| p.entry.key().into_owned())
            .collect();
        assert_eq!(keys, vec!["a", "c"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pending_messages_filter_by_session_and_user() {
        use crate::sessions::Role;
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
        let (rows, moved) = l.pending(10, 7).unwrap();
        assert_eq!((rows.len(), moved), (1, 1));
        assert_eq!(l.backlog().unwrap().0, 1);
        let dead = l.dead_letters(10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].key.as_str(), dead[0].kind.as_str()),
            ("bad", "request")
        );
        assert_eq!(dead[0].entry, serde_json::Value::String("{".into()));
        assert!(
            dead[0].error.starts_with("undecodable"),
            "{}",
            dead[0].error
        );
        assert_eq!(dead[0].dead_lettered_ms, 7);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A process can copy intents to the store and stop before noting it. Whoever adopts them
    /// must remove the store's copies once their records have shipped, not forget them unseen.
    #[test]
    fn adopted_shared_intents_are_removed_from_the_store_after_their_records_ship() {
        use keyvex_engine::record::CallIntent;
        let dir = tempdir();
        let mut l = Ledger::open(&dir.join("l.sqlite3")).unwrap();
        let intent = CallIntent {
            record: RequestRecord::new("u", "direct", "openai", "m").with_request_id("r1"),
            call_started_ms: 1,
            spend: None,
        };
        // Committed by the process that stops, and never marked as copied.
        l.commit("gone", std::slice::from_ref(&intent), &[], true, 1)
            .unwrap();
        let adopted = l.adopt("gone", "me", true, 2).unwrap();
        assert_eq!(adopted.len(), 1);
        // Its record waits in the outbox: the store's copy must stay until the record is there.
        assert!(l.ended_intents("me", 10).unwrap().is_empty());
        let (pending, _) = l.pending(10, 3).unwrap();
        let shipped: Vec<(i64, i64)> = pending.iter().map(|p| (p.seq, p.version)).collect();
        l.settle(&shipped, &[], 3).unwrap();
        let ended = l.ended_intents("me", 10).unwrap();
        assert_eq!(ended.len(), 1);
        assert!(
            ended[0].stored,
            "the adopter removes the copy from the store"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rows_set_aside_by_older_versions_join_dead_letters_on_open() {
        let dir = tempdir();
        let path = dir.join("l.sqlite3");
        drop(Ledger::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "INSERT INTO metrics_outbox_dead (seq, entry_key, body, problem) VALUES (3, 'old', '{', 'eof')",
            [],
        )
        .unwrap();
        drop(conn);
        let l = Ledger::open(&path).unwrap();
        let dead = l.dead_letters(10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].key, "old");
        assert_eq!(dead[0].error, "undecodable outbox row: eof");
        // Opening again does not duplicate them.
        drop(l);
        assert_eq!(Ledger::open(&path).unwrap().dead_letter_count().unwrap(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn settle_ships_and_dead_letters_in_one_step_and_requeue_puts_them_back() {
        let dir = tempdir();
        let mut l = Ledger::open(&dir.join("l.sqlite3")).unwrap();
        l.append(&[entry("a"), entry("b"), entry("c"), entry("d")], 5)
            .unwrap();
        let (p, _) = l.pending(10, 0).unwrap();
        let reject = |i: usize, version: i64| Reject {
            seq: p[i].seq,
            version,
            error: "too large".into(),
        };
        // "d" was re-recorded after it was read: its stale version is neither shipped nor
        // dead-lettered, the new body stays pending.
        l.append(&[entry("d")], 6).unwrap();
        let settled = l
            .settle(
                &[(p[0].seq, p[0].version)],
                &[reject(1, p[1].version), reject(3, p[3].version)],
                9,
            )
            .unwrap();
        assert_eq!(
            settled,
            Settled {
                shipped: 1,
                dead_lettered: 1
            }
        );
        assert_eq!(l.backlog().unwrap(), (2, Some(5)));
        let dead = l.dead_letters(10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].key.as_str(), dead[0].error.as_str()),
            ("b", "too large")
        );
        assert_eq!((dead[0].accepted_ms, dead[0].dead_lettered_ms), (5, 9));
        assert_eq!(dead[0].entry["requestId"], "b");

        // "b" is recorded again and rejected again: two dead letters of one key.
        l.append(&[entry("b")], 10).unwrap();
        let (p, _) = l.pending(10, 0).unwrap();
        let b = p.iter().find(|p| p.entry.key() == "b").unwrap();
        let again = Reject {
            seq: b.seq,
            version: b.version,
            error: "still too large".into(),
        };
        l.settle(&[], &[again], 11).unwrap();
        assert_eq!(l.dead_letter_count().unwrap(), 2);

        // While "b" is pending again, its dead letters stay; once it is not, the newest goes
        // back (once) and the older one is superseded.
        l.append(&[entry("b")], 12).unwrap();
        assert_eq!(
            l.requeue_dead_letters().unwrap(),
            Requeued {
                moved: 0,
                removed: 0
            }
        );
        let (p, _) = l.pending(10, 0).unwrap();
        let shipped: Vec<_> = p.iter().map(|p| (p.seq, p.version)).collect();
        l.settle(&shipped, &[], 0).unwrap();
        assert_eq!(
            l.requeue_dead_letters().unwrap(),
            Requeued {
                moved: 1,
                removed: 2
            }
        );
        assert_eq!(l.dead_letter_count().unwrap(), 0);
        let (p, _) = l.pending(10, 0).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].entry.key(), "b");
        // The acceptance time of the requeued entry is its original one.
        assert_eq!(l.backlog().unwrap(), (1, Some(10)));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("keyvex-ledger-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
