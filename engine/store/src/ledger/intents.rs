//! The ledger's `call_intents` table: one row per model call in flight, written when the call
//! starts and ended by the call's own record in the same transaction that commits that record.
//! A row still open when its owner (the process that wrote it) is gone is a call that process
//! never recorded; adopting it turns it into its `interrupted` record in the outbox.
//!
//! With shared intents (the DynamoDB store keeps every replica's open intents, so that a lost
//! machine's calls are still recorded), a row also remembers which version of it the store has
//! (`shipped_version`), and an ended row stays until its copy in the store is removed, which
//! waits until the call's record has left the outbox (the store has it).

use rusqlite::{Connection, TransactionBehavior, params};

use keyvex_engine::record::CallIntent;

use super::Ledger;
use crate::entry::Entry;
use crate::error::MetricsError;

/// An open intent to copy to the shared store: its row's version as read.
pub(crate) struct OpenIntent {
    pub version: i64,
    pub intent: CallIntent,
}

/// An ended intent the ledger can forget; `stored` when the shared store has a copy to remove
/// first.
pub(crate) struct EndedIntent {
    pub record_id: String,
    pub stored: bool,
}

pub(super) fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS call_intents (
            record_id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            body TEXT NOT NULL,
            accepted_ms INTEGER NOT NULL,
            version INTEGER NOT NULL DEFAULT 1,
            shipped_version INTEGER NOT NULL DEFAULT 0,
            ended INTEGER NOT NULL DEFAULT 0
         );
         CREATE INDEX IF NOT EXISTS call_intents_by_owner ON call_intents (owner, ended);",
    )
}

impl Ledger {
    /// Commits one batch in one transaction: `intents` of `owner` first (a call's intent is
    /// always handed over before its record, so a batch holding both must write the intent
    /// first), then `entries`; each request entry ends its call's intent — deleted, or with
    /// `shared` intents marked ended until the store's copy is removed. Returns how many entries
    /// were new outbox rows.
    pub(crate) fn commit(
        &mut self,
        owner: &str,
        intents: &[CallIntent],
        entries: &[Entry],
        shared: bool,
        now_ms: u64,
    ) -> Result<u64, MetricsError> {
        if entries.is_empty() {
            return self.commit_intents(owner, intents, now_ms);
        }
        self.strict()?;
        let tx = self.conn.transaction()?;
        put_intents_in(&tx, owner, intents, now_ms)?;
        let inserted = Ledger::append_in(&tx, entries, now_ms)?;
        {
            let mut end = tx.prepare_cached(if shared {
                "UPDATE call_intents SET ended = 1 WHERE record_id = ?1"
            } else {
                "DELETE FROM call_intents WHERE record_id = ?1"
            })?;
            for entry in entries {
                if let Entry::Request(r) = entry {
                    end.execute([&r.request_id])?;
                }
            }
        }
        tx.commit()?;
        Ok(inserted)
    }

    /// Commits a batch of nothing but intents without waiting for the disk (`synchronous=NORMAL`
    /// for this one transaction): an intent is there for a process that dies, and a committed
    /// WAL append survives that in the OS cache; only a power loss or kernel crash in the next
    /// moments could take it back, and the next group commit's flush makes it durable with
    /// everything before it. Records keep the flush their receipts promise.
    fn commit_intents(
        &mut self,
        owner: &str,
        intents: &[CallIntent],
        now_ms: u64,
    ) -> Result<u64, MetricsError> {
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        self.relaxed = true;
        let result = self.put_intents(owner, intents, now_ms);
        // Back to FULL whatever happened: every other transaction relies on it (should this
        // fail, the next commit with entries tries again before it writes).
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.relaxed = false;
        result.map(|()| 0)
    }

    /// Puts the connection back to `synchronous=FULL` if an intent-only commit left it relaxed:
    /// records keep the flush their receipts promise.
    fn strict(&mut self) -> Result<(), MetricsError> {
        if self.relaxed {
            self.conn.pragma_update(None, "synchronous", "FULL")?;
            self.relaxed = false;
        }
        Ok(())
    }

    fn put_intents(
        &mut self,
        owner: &str,
        intents: &[CallIntent],
        now_ms: u64,
    ) -> Result<(), MetricsError> {
        let tx = self.conn.transaction()?;
        put_intents_in(&tx, owner, intents, now_ms)?;
        tx.commit()?;
        Ok(())
    }

    /// Owners other than `me` with open intents.
    pub(crate) fn intent_owners(&self, me: &str) -> Result<Vec<String>, MetricsError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT owner FROM call_intents WHERE ended = 0 AND owner <> ?1 ORDER BY owner",
        )?;
        let owners = stmt
            .query_map([me], |r| r.get::<_, String>(0))?
            .collect::<Result<_, _>>()?;
        Ok(owners)
    }

    /// Turns every open intent of `gone` (a process that stopped) into its `interrupted` record
    /// in the outbox, in one transaction, and ends the intents (kept for `me` to remove the
    /// store's copies when intents are `shared`). A record of the same id already pending wins:
    /// the call's own record is never replaced by its intent. An intent that does not decode is
    /// set aside in `dead_letters`. Returns the records written.
    pub(crate) fn adopt(
        &mut self,
        gone: &str,
        me: &str,
        shared: bool,
        now_ms: u64,
    ) -> Result<Vec<CallIntent>, MetricsError> {
        self.strict()?;
        // IMMEDIATE: two processes adopting the same owner take turns; the second finds nothing.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let rows: Vec<(String, String)> = tx
            .prepare_cached(
                "SELECT record_id, body FROM call_intents WHERE owner = ?1 AND ended = 0
                 ORDER BY accepted_ms, record_id",
            )?
            .query_map([gone], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut adopted = Vec::with_capacity(rows.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO metrics_outbox (entry_key, kind, body, accepted_ms) VALUES (?1, 'request', ?2, ?3)
                 ON CONFLICT(entry_key) DO NOTHING",
            )?;
            let mut dead = tx.prepare_cached(
                "INSERT INTO dead_letters (entry_key, kind, body, accepted_ms, error, dead_lettered_ms)
                 VALUES (?1, 'intent', ?2, ?3, ?4, ?3)",
            )?;
            for (record_id, body) in rows {
                match serde_json::from_str::<CallIntent>(&body) {
                    Ok(intent) => {
                        let record = &intent.record;
                        let entry = serde_json::to_string(&Entry::Request(record.clone()))?;
                        if insert.execute(params![record.request_id, entry, now_ms as i64])? == 1 {
                            adopted.push(intent);
                        }
                    }
                    Err(err) => {
                        tracing::error!(record_id, error = %err,
                            "undecodable call intent moved to dead_letters");
                        dead.execute(params![
                            record_id,
                            body,
                            now_ms as i64,
                            format!("undecodable call intent: {err}")
                        ])?;
                    }
                }
            }
        }
        if shared {
            // Each adopted intent counts as copied to the store: the stopped process may have
            // copied it and died before noting so, and a copy left there outlives its record
            // until a sweep. Removing a copy the store never had is a no-op; waiting for the
            // record to leave the outbox first (as for any copied intent) keeps the order.
            tx.execute(
                "UPDATE call_intents SET ended = 1, owner = ?2, shipped_version = MAX(shipped_version, 1)
                 WHERE owner = ?1",
                params![gone, me],
            )?;
        } else {
            tx.execute("DELETE FROM call_intents WHERE owner = ?1", [gone])?;
        }
        tx.commit()?;
        Ok(adopted)
    }

    /// Open intents of `owner` the shared store does not have in their latest version, oldest
    /// first.
    pub(crate) fn intents_to_share(
        &self,
        owner: &str,
        limit: usize,
    ) -> Result<Vec<OpenIntent>, MetricsError> {
        let rows: Vec<(i64, String)> = self
            .conn
            .prepare_cached(
                "SELECT version, body FROM call_intents
                 WHERE owner = ?1 AND ended = 0 AND shipped_version < version
                 ORDER BY accepted_ms, record_id LIMIT ?2",
            )?
            .query_map(params![owner, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for (version, body) in rows {
            // An undecodable row cannot be shipped; adoption sets it aside should it stay open.
            if let Ok(intent) = serde_json::from_str(&body) {
                out.push(OpenIntent { version, intent });
            }
        }
        Ok(out)
    }

    /// The shared store now has these `(record_id, version)`s.
    pub(crate) fn mark_shared(&mut self, shared: &[(String, i64)]) -> Result<(), MetricsError> {
        let tx = self.conn.transaction()?;
        {
            let mut mark = tx.prepare_cached(
                "UPDATE call_intents SET shipped_version = MAX(shipped_version, ?2) WHERE record_id = ?1",
            )?;
            for (id, version) in shared {
                mark.execute(params![id, version])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Ended intents of `owner` that can go: those the store never had, and those whose call's
    /// record has left the outbox (so the store has the record before its intent is removed).
    pub(crate) fn ended_intents(
        &self,
        owner: &str,
        limit: usize,
    ) -> Result<Vec<EndedIntent>, MetricsError> {
        let rows = self
            .conn
            .prepare_cached(
                "SELECT i.record_id, i.shipped_version > 0 FROM call_intents i
                 WHERE i.owner = ?1 AND i.ended = 1 AND (i.shipped_version = 0
                   OR NOT EXISTS (SELECT 1 FROM metrics_outbox o WHERE o.entry_key = i.record_id))
                 LIMIT ?2",
            )?
            .query_map(params![owner, limit as i64], |r| {
                Ok(EndedIntent {
                    record_id: r.get(0)?,
                    stored: r.get(1)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Deletes these ended intents.
    pub(crate) fn forget_intents(&mut self, record_ids: &[String]) -> Result<(), MetricsError> {
        let tx = self.conn.transaction()?;
        {
            let mut delete =
                tx.prepare_cached("DELETE FROM call_intents WHERE record_id = ?1 AND ended = 1")?;
            for id in record_ids {
                delete.execute([id])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// Writes `intents` of `owner` inside `tx`. An update of an intent whose call already ended (it
/// cannot happen: the record comes last) would not reopen it.
fn put_intents_in(
    tx: &rusqlite::Transaction<'_>,
    owner: &str,
    intents: &[CallIntent],
    now_ms: u64,
) -> Result<(), MetricsError> {
    let mut put = tx.prepare_cached(
        "INSERT INTO call_intents (record_id, owner, body, accepted_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(record_id) DO UPDATE SET body = excluded.body, version = version + 1
         WHERE ended = 0",
    )?;
    for intent in intents {
        let body = serde_json::to_string(intent)?;
        put.execute(params![
            intent.record.request_id,
            owner,
            body,
            now_ms as i64
        ])?;
    }
    Ok(())
}
