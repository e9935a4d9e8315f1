//! Conversation sessions, read side: [`SessionStore`] over SQLite or DynamoDB, which also merges
//! the messages still waiting in the ledger, so a read right after a stream sees its own
//! messages. The messages themselves travel through the metrics ledger like call records.
//!
//! Metadata (`created`/`updated`) is derived from the messages by min/max, which makes every
//! write idempotent and order-independent: a resent or late batch can never move it backwards.
//! There is deliberately no stored message counter — a counter is not idempotent under resends;
//! [`Session::message_count`] is counted from the messages themselves.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use keyvex_engine::record::SessionMessage;

use crate::dynamo::DynamoStore;
use crate::entry::StoreError;
use crate::sqlite::SqliteStore;

pub use keyvex_engine::provider::Role;

pub use crate::session_meta::{Session, SessionMetadata};

/// What to look up among the messages that are durable but not yet shipped.
#[derive(Debug, Clone, Copy)]
pub enum PendingFilter<'a> {
    Session(&'a str),
    User(&'a str),
}

/// Messages that are durable in the local ledger but not yet in the store. Implemented by
/// [`crate::tracker::Tracker`]; a trait so that `store/` does not depend on the tracker.
pub trait PendingSessions: Send + Sync + 'static {
    fn pending_messages<'a>(
        &'a self,
        filter: PendingFilter<'a>,
    ) -> BoxFuture<'a, Result<Vec<SessionMessage>, StoreError>>;
}

#[derive(Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Dynamo(DynamoStore),
}

/// The read side of sessions: the store the shipper writes to, plus (optionally) the ledger's
/// pending messages.
#[derive(Clone)]
pub struct SessionStore {
    backend: Backend,
    pending: Option<Arc<dyn PendingSessions>>,
}

impl SessionStore {
    pub fn sqlite(store: SqliteStore) -> SessionStore {
        SessionStore {
            backend: Backend::Sqlite(store),
            pending: None,
        }
    }

    pub fn dynamo(store: DynamoStore) -> SessionStore {
        SessionStore {
            backend: Backend::Dynamo(store),
            pending: None,
        }
    }

    /// Also return messages that are durable in this ledger but not shipped yet.
    pub fn with_pending(mut self, pending: Arc<dyn PendingSessions>) -> SessionStore {
        self.pending = Some(pending);
        self
    }

    /// The session and all its messages ordered by time, or `None` when nothing of it is stored
    /// or pending.
    pub async fn get_session(&self, session_id: &str) -> Result<Option<Session>, StoreError> {
        // Pending first, store second: a message shipped (and removed from the ledger) between
        // the two reads is then still seen by the second; the other order could miss it.
        let pending = self.pending(PendingFilter::Session(session_id)).await?;
        let stored = match &self.backend {
            Backend::Sqlite(s) => s.session(session_id).await?,
            Backend::Dynamo(d) => d.session(session_id).await?,
        };
        let (mut metadata, mut messages) = match stored {
            Some((meta, msgs)) => (Some(meta), msgs),
            None => (None, Vec::new()),
        };
        // Dedupe by id; the pending body is the newer one.
        let mut by_id: HashMap<String, SessionMessage> = messages
            .drain(..)
            .map(|m| (m.message_id.clone(), m))
            .collect();
        for m in pending {
            match metadata.as_mut() {
                Some(meta) => meta.absorb(&m),
                None => metadata = Some(SessionMetadata::of(&m)),
            }
            by_id.insert(m.message_id.clone(), m);
        }
        let Some(metadata) = metadata else {
            return Ok(None);
        };
        let mut messages: Vec<SessionMessage> = by_id.into_values().collect();
        messages.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        Ok(Some(Session {
            metadata,
            message_count: messages.len(),
            messages,
        }))
    }

    /// Who created the session (`None`: nothing of it is stored or pending). Reads the metadata
    /// and the ledger's pending messages only, so a long session costs no more than a new one.
    pub async fn owner(&self, session_id: &str) -> Result<Option<String>, StoreError> {
        // Pending first, store second, as in `get_session`.
        let pending = self.pending(PendingFilter::Session(session_id)).await?;
        let stored = match &self.backend {
            Backend::Sqlite(s) => s.session_owner(session_id).await?,
            Backend::Dynamo(d) => d.session_owner(session_id).await?,
        };
        // The stored metadata names the creator; before the first shipment, the earliest pending
        // message does.
        Ok(stored.or_else(|| {
            pending
                .iter()
                .min_by(|a, b| a.order_key().cmp(&b.order_key()))
                .map(|m| m.user_id.clone())
        }))
    }

    /// The user's sessions, most recently active first, at most `limit`.
    pub async fn sessions_of_user(
        &self,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<SessionMetadata>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let pending = self.pending(PendingFilter::User(user_id)).await?;
        let stored = match &self.backend {
            Backend::Sqlite(s) => s.sessions_of_user(user_id, limit).await?,
            Backend::Dynamo(d) => d.sessions_of_user(user_id, limit).await?,
        };
        let mut by_session: HashMap<String, SessionMetadata> = stored
            .into_iter()
            .map(|m| (m.session_id.clone(), m))
            .collect();
        for meta in SessionMetadata::of_batch(&pending) {
            match by_session.get_mut(&meta.session_id) {
                Some(existing) => existing.merge(&meta),
                None => {
                    by_session.insert(meta.session_id.clone(), meta);
                }
            }
        }
        let mut out: Vec<SessionMetadata> = by_session.into_values().collect();
        out.sort_by(|a, b| (b.updated_at_ms, &b.session_id).cmp(&(a.updated_at_ms, &a.session_id)));
        out.truncate(limit);
        Ok(out)
    }

    async fn pending(&self, filter: PendingFilter<'_>) -> Result<Vec<SessionMessage>, StoreError> {
        match &self.pending {
            Some(p) => p.pending_messages(filter).await,
            None => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, ts: u64) -> SessionMessage {
        SessionMessage::new(
            "s1",
            "u1",
            Role::User,
            "magicSpark",
            serde_json::json!({"a": 1}),
        )
        .with_message_id(id)
        .with_timestamp_ms(ts)
    }

    #[test]
    fn metadata_is_min_max_in_any_order_and_idempotent() {
        let msgs = [msg("b", 20), msg("a", 10), msg("c", 30), msg("b", 20)];
        let forward = SessionMetadata::of_batch(&msgs);
        let mut reversed: Vec<_> = msgs.to_vec();
        reversed.reverse();
        assert_eq!(forward, SessionMetadata::of_batch(&reversed));
        let meta = &forward[0];
        assert_eq!((meta.created_at_ms, meta.updated_at_ms), (10, 30));
        assert_eq!(meta.last_message_id, "c");
    }

    #[test]
    fn messages_serialize_camel_case() {
        let json = serde_json::to_value(msg("m", 5).with_run("r", "logic")).unwrap();
        assert_eq!(json["sessionId"], "s1");
        assert_eq!(json["role"], "user");
        assert_eq!(json["runId"], "r");
        assert_eq!(json["content"]["a"], 1);
        assert!(json.get("requestId").is_none());
    }
}
