//! The server's settings and its API keys, as validated values. Reading them from the
//! environment and the TOML file is the `keyvex` binary's job (its `config` module).

use std::net::SocketAddr;
use std::time::Duration;

use keyvex_engine::provider::ApiKey;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallerRole {
    User,
    Admin,
}

impl CallerRole {
    pub fn as_str(self) -> &'static str {
        match self {
            CallerRole::User => "user",
            CallerRole::Admin => "admin",
        }
    }
}

/// One configured API key and who it belongs to.
#[derive(Debug, Clone)]
pub struct ApiKeySpec {
    pub key: ApiKey,
    pub caller: String,
    pub role: CallerRole,
}

impl ApiKeySpec {
    /// Parses `KEY=CALLER:ROLE` (ROLE `user` or `admin`; `:ROLE` may be left out for `user`).
    pub fn parse(spec: &str) -> Result<ApiKeySpec, String> {
        let Some((key, who)) = spec.trim().split_once('=') else {
            return Err("expected KEY=CALLER:ROLE, e.g. sk-abc=alice:admin".to_owned());
        };
        let (caller, role) = who.split_once(':').unwrap_or((who, "user"));
        let role = match role.trim() {
            "user" => CallerRole::User,
            "admin" => CallerRole::Admin,
            other => return Err(format!("role {other:?} is not user or admin")),
        };
        let (key, caller) = (key.trim(), caller.trim());
        if key.len() < 8 {
            return Err("the key is shorter than 8 characters; use a long random key".to_owned());
        }
        if caller.is_empty() {
            return Err("the caller id is empty; write KEY=CALLER:ROLE".to_owned());
        }
        Ok(ApiKeySpec {
            key: ApiKey::new(key),
            caller: caller.to_owned(),
            role,
        })
    }
}

/// Settings of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub api_keys: Vec<ApiKeySpec>,
    pub max_body_bytes: usize,
    /// On shutdown, how long open streams may run before they are ended.
    pub drain_timeout: Duration,
    /// How long shutdown may spend flushing metrics after the streams ended.
    pub metrics_flush_timeout: Duration,
    /// Silence after which an SSE stream sends a keep-alive comment. With many streams open it
    /// may come up to a fifteenth of this later (`open_streams.rs`).
    pub keep_alive: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_keys: Vec::new(),
            max_body_bytes: 1024 * 1024,
            drain_timeout: Duration::from_secs(30),
            metrics_flush_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(15),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_specs_parse_and_never_echo_the_key() {
        let spec = ApiKeySpec::parse("k-aaaaaaaa=alice:admin").unwrap();
        assert_eq!(
            (spec.caller.as_str(), spec.role),
            ("alice", CallerRole::Admin)
        );
        assert_eq!(
            ApiKeySpec::parse("k-bbbbbbbb=bob").unwrap().role,
            CallerRole::User
        );
        let e = ApiKeySpec::parse("k-secret-value=alice:root").unwrap_err();
        assert!(e.contains("root") && !e.contains("k-secret-value"), "{e}");
        assert!(ApiKeySpec::parse("short=alice").is_err());
    }
}
