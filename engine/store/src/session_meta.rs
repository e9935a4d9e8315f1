//! The session entity as the stores keep it: its metadata (derived from the messages by min and
//! max, so applying messages in any order, or one twice, gives the same result) and a session
//! with its messages. A leaf: both stores and the session reads use it.

use std::collections::BTreeMap;

use keyvex_engine::record::SessionMessage;
use serde::{Deserialize, Serialize};

/// The `METADATA` item / `sessions` row of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionMetadata {
    pub session_id: String,
    pub user_id: String,
    /// Timestamp of the earliest message.
    pub created_at_ms: u64,
    /// Timestamp of the latest message (last activity).
    pub updated_at_ms: u64,
    /// The latest message's id.
    pub last_message_id: String,
}

impl SessionMetadata {
    /// Metadata that covers one more message: min/max, so applying messages in any order, or
    /// one twice, gives the same result.
    pub fn absorb(&mut self, msg: &SessionMessage) {
        self.created_at_ms = self.created_at_ms.min(msg.timestamp_ms);
        if (msg.timestamp_ms, msg.message_id.as_str())
            >= (self.updated_at_ms, self.last_message_id.as_str())
        {
            self.updated_at_ms = msg.timestamp_ms;
            msg.message_id.clone_into(&mut self.last_message_id);
        }
    }

    pub fn of(msg: &SessionMessage) -> SessionMetadata {
        SessionMetadata {
            session_id: msg.session_id.clone(),
            user_id: msg.user_id.clone(),
            created_at_ms: msg.timestamp_ms,
            updated_at_ms: msg.timestamp_ms,
            last_message_id: msg.message_id.clone(),
        }
    }

    /// The metadata of a batch of messages, one per session (sinks apply these).
    pub fn of_batch<'a>(
        msgs: impl IntoIterator<Item = &'a SessionMessage>,
    ) -> Vec<SessionMetadata> {
        let mut by_session: BTreeMap<&str, SessionMetadata> = BTreeMap::new();
        for m in msgs {
            by_session
                .entry(m.session_id.as_str())
                .and_modify(|meta| meta.absorb(m))
                .or_insert_with(|| SessionMetadata::of(m));
        }
        by_session.into_values().collect()
    }

    /// Merges two views of the same session (stored and pending).
    pub(crate) fn merge(&mut self, other: &SessionMetadata) {
        self.created_at_ms = self.created_at_ms.min(other.created_at_ms);
        if (other.updated_at_ms, other.last_message_id.as_str())
            > (self.updated_at_ms, self.last_message_id.as_str())
        {
            self.updated_at_ms = other.updated_at_ms;
            self.last_message_id.clone_from(&other.last_message_id);
        }
    }
}

/// A session with its messages, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub metadata: SessionMetadata,
    pub message_count: usize,
    pub messages: Vec<SessionMessage>,
}
