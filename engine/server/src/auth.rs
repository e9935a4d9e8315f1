//! Bearer-key authentication: keys are held only as SHA-256 digests and compared in constant
//! time; each maps to a caller id and a role.

use std::fmt;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::config::{ApiKeySpec, CallerRole};
use crate::error::ApiError;

/// Who is calling; put in request extensions by [`authenticate`].
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

const HOW: &str = "send `Authorization: Bearer <key>` with a key configured in KEYVEX_API_KEYS (KEY=CALLER:ROLE) or the config file; `keyvex serve` prints a development key at start when none is configured";

/// Middleware: requires a valid bearer key and records the caller.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(key) = presented else {
        return ApiError::Unauthenticated(format!("no API key given; {HOW}")).into_response();
    };
    let Some(caller) = state.keys().lookup(key) else {
        return ApiError::Unauthenticated(format!("the API key is not valid; {HOW}"))
            .into_response();
    };
    tracing::Span::current().record("caller", caller.id.as_str());
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Middleware for admin routes (after [`authenticate`]).
pub async fn require_admin(req: Request, next: Next) -> Response {
    match req.extensions().get::<Caller>() {
        Some(c) if c.role == CallerRole::Admin => next.run(req).await,
        Some(c) => ApiError::Forbidden(format!(
            "caller {} has role user; this route needs an admin key",
            c.id
        ))
        .into_response(),
        None => ApiError::Unauthenticated(format!("no API key given; {HOW}")).into_response(),
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
