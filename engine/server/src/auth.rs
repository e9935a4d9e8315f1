//! Bearer-key authentication: keys are held only as SHA-256 digests and compared in constant
//! time; each maps to a caller id and a role.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::config::{ApiKeySpec, CallerRole};

/// Who is calling; put in request extensions by the `authenticate` middleware (`layers.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub id: String,
    pub role: CallerRole,
}

struct Entry {
    digest: [u8; 32],
    caller: Caller,
}

/// The configured keys, as digests.
pub struct ApiKeys {
    entries: Vec<Entry>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.entries.len())
            .finish()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equal without an early exit, so timing says nothing about how much of a digest matched.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl ApiKeys {
    pub fn new(specs: &[ApiKeySpec]) -> ApiKeys {
        ApiKeys {
            entries: specs
                .iter()
                .map(|s| Entry {
                    digest: digest(s.key.expose()),
                    caller: Caller {
                        id: s.caller.clone(),
                        role: s.role,
                    },
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every configured caller, once each, sorted.
    pub fn callers(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.entries.iter().map(|e| e.caller.id.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The caller a key belongs to. Every entry is compared, match or not.
    pub fn lookup(&self, key: &str) -> Option<Caller> {
        let presented = digest(key);
        let mut found = None;
        for entry in &self.entries {
            if ct_eq(&entry.digest, &presented) && found.is_none() {
                found = Some(entry.caller.clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyvex_engine::provider::ApiKey;

    #[test]
    fn lookup_finds_the_caller_and_rejects_others() {
        let keys = ApiKeys::new(&[
            ApiKeySpec {
                key: ApiKey::new("key-alice-123"),
                caller: "alice".into(),
                role: CallerRole::Admin,
            },
            ApiKeySpec {
                key: ApiKey::new("key-bob-456"),
                caller: "bob".into(),
                role: CallerRole::User,
            },
        ]);
        assert_eq!(keys.lookup("key-bob-456").unwrap().id, "bob");
        assert_eq!(
            keys.lookup("key-alice-123").unwrap().role,
            CallerRole::Admin
        );
        assert!(keys.lookup("key-bob-45").is_none());
        assert!(keys.lookup("").is_none());
        assert!(!format!("{keys:?}").contains("key-"));
    }
}
