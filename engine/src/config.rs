//! Configuration from the environment, read through one small trait so tests can pass a map.
//!
//! Every variable the binary reads is listed in [`ENV_VARS`]; `keyvex --help` prints that list,
//! so the two cannot drift apart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::provider::sim::SimProfile;
use crate::provider::{ApiKey, ProviderConfig};
use crate::stream::ProviderKind;

/// Read access to environment variables. Empty values count as unset.
pub trait Env: Send + Sync {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

/// A fixed map, for tests.
#[derive(Debug, Clone, Default)]
pub struct MapEnv(pub HashMap<String, String>);

impl MapEnv {
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }
}

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).filter(|v| !v.trim().is_empty()).cloned()
    }
}

/// One documented environment variable.
#[derive(Debug, Clone, Copy)]
pub struct EnvVar {
    pub name: &'static str,
    pub purpose: &'static str,
}

/// Every environment variable the `keyvex` binary reads.
pub const ENV_VARS: &[EnvVar] = &[
    EnvVar {
        name: "OPENAI_API_KEY",
        purpose: "OpenAI API key; when unset (and no Anthropic key), providers are simulated",
    },
    EnvVar {
        name: "OPENAI_BASE_URL",
        purpose: "OpenAI-compatible base URL including /v1 (default https://api.openai.com/v1)",
    },
    EnvVar {
        name: "ANTHROPIC_API_KEY",
        purpose: "Anthropic API key",
    },
    EnvVar {
        name: "ANTHROPIC_BASE_URL",
        purpose: "Anthropic base URL including /v1 (default https://api.anthropic.com/v1)",
    },
    EnvVar {
        name: "KEYVEX_SIMULATE",
        purpose: "auto (default: simulate when no provider key is set) | always | never",
    },
    EnvVar {
        name: "KEYVEX_MODELS_FILE",
        purpose: "model catalog JSON to use instead of the embedded models/default-models.json",
    },
    EnvVar {
        name: "KEYVEX_CONNECT_TIMEOUT_MS",
        purpose: "TCP connect timeout per provider call (default 5000)",
    },
    EnvVar {
        name: "KEYVEX_TTFT_TIMEOUT_MS",
        purpose: "deadline for the first content token of an attempt before falling back (default 20000)",
    },
    EnvVar {
        name: "KEYVEX_STALL_TIMEOUT_MS",
        purpose: "deadline between two chunks of a stream (default 30000)",
    },
    EnvVar {
        name: "KEYVEX_SIM_SEED",
        purpose: "seed of the in-process simulator (default 42)",
    },
    EnvVar {
        name: "KEYVEX_SIM_PROFILE",
        purpose: "timing of the in-process simulator: realistic (default, hosted-model latency) | fast (no latency, for tests and CI)",
    },
    EnvVar {
        name: "KEYVEX_CONFIG",
        purpose: "optional TOML file with [server] and [limits] settings (environment variables win)",
    },
    EnvVar {
        name: "KEYVEX_ADDR",
        purpose: "address `keyvex serve` listens on (default 127.0.0.1:8080; port 0 picks a free one)",
    },
    EnvVar {
        name: "KEYVEX_API_KEYS",
        purpose: "API keys as KEY=CALLER:ROLE, comma-separated; ROLE is user or admin (none: a development key is generated and printed)",
    },
    EnvVar {
        name: "KEYVEX_RATE_LIMIT_PER_HOUR",
        purpose: "requests per hour per API key and endpoint (default 1000)",
    },
    EnvVar {
        name: "KEYVEX_RATE_LIMIT_BURST",
        purpose: "requests an API key may make at once per endpoint before the hourly rate applies (default 100)",
    },
    EnvVar {
        name: "KEYVEX_PROVIDER_RPM",
        purpose: "requests per minute sent to each provider (default 500)",
    },
    EnvVar {
        name: "KEYVEX_PROVIDER_TPM",
        purpose: "tokens per minute (prompt + output cap reserved, real usage settled) per provider (default 2000000)",
    },
    EnvVar {
        name: "KEYVEX_MAX_BODY_BYTES",
        purpose: "largest request body the server accepts (default 1048576)",
    },
    EnvVar {
        name: "KEYVEX_DRAIN_TIMEOUT_MS",
        purpose: "on SIGTERM/SIGINT, how long open streams may run before they are ended (default 30000)",
    },
    EnvVar {
        name: "KEYVEX_METRICS_DB",
        purpose: "SQLite file of the metrics ledger and embedded store (default keyvex-metrics.sqlite3)",
    },
    EnvVar {
        name: "KEYVEX_METRICS_FLUSH_MS",
        purpose: "how often pending metrics are shipped to the store (default 500)",
    },
    EnvVar {
        name: "DYNAMODB_TABLE_NAME",
        purpose: "ship metrics to this DynamoDB table instead of the embedded SQLite store",
    },
    EnvVar {
        name: "DYNAMODB_ENDPOINT",
        purpose: "DynamoDB endpoint override (an emulator such as moto or DynamoDB Local)",
    },
    EnvVar {
        name: "AWS_REGION",
        purpose: "AWS region of the DynamoDB table",
    },
    EnvVar {
        name: "RUST_LOG",
        purpose: "log filter, e.g. info or keyvex_engine=debug (default warn for CLI commands, info for servers)",
    },
];

const OPENAI_DEFAULT_BASE: &str = "https://api.openai.com/v1";
const ANTHROPIC_DEFAULT_BASE: &str = "https://api.anthropic.com/v1";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {name}={value:?} is invalid: {problem}")]
    Invalid {
        name: &'static str,
        value: String,
        problem: String,
    },
    #[error("config file {path} could not be read: {message}")]
    FileRead { path: String, message: String },
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error("config file {path}: key {key} = {value:?} is invalid: {problem}")]
    FileKey {
        path: String,
        key: String,
        value: String,
        problem: String,
    },
}

/// Whether provider calls go to the real APIs or to the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimulateMode {
    /// Simulate when no provider key is configured.
    Auto,
    Always,
    Never,
}

/// How the engine reaches its providers, resolved from the environment.
#[derive(Debug, Clone)]
pub enum ProviderSetup {
    /// No keys (or `KEYVEX_SIMULATE=always`): an in-process simulator serves both protocols.
    Simulated { seed: u64, profile: SimProfile },
    /// Real providers; a provider without a key is `None` and its models are unavailable.
    Real {
        openai: Option<ProviderConfig>,
        anthropic: Option<ProviderConfig>,
    },
}

/// The engine-core settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub providers: ProviderSetup,
    pub models_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub ttft_timeout: Duration,
    pub stall_timeout: Duration,
}

impl EngineConfig {
    pub fn from_env(env: &dyn Env) -> Result<EngineConfig, ConfigError> {
        let connect_timeout = millis(env, "KEYVEX_CONNECT_TIMEOUT_MS", 5_000)?;
        let mode = match env.var("KEYVEX_SIMULATE").as_deref() {
            None | Some("auto") => SimulateMode::Auto,
            Some("always" | "1" | "true") => SimulateMode::Always,
            Some("never" | "0" | "false") => SimulateMode::Never,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "KEYVEX_SIMULATE",
                    value: other.to_owned(),
                    problem: "expected auto, always or never".into(),
                });
            }
        };
        let provider = |key_var: &str, base_var: &str, default_base: &str| {
            env.var(key_var).map(|key| ProviderConfig {
                base_url: env
                    .var(base_var)
                    .unwrap_or_else(|| default_base.to_owned())
                    .trim_end_matches('/')
                    .to_owned(),
                api_key: ApiKey::new(key),
                connect_timeout,
            })
        };
        let openai = provider("OPENAI_API_KEY", "OPENAI_BASE_URL", OPENAI_DEFAULT_BASE);
        let anthropic = provider(
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_BASE_URL",
            ANTHROPIC_DEFAULT_BASE,
        );
        let simulate = match mode {
            SimulateMode::Always => true,
            SimulateMode::Never => false,
            SimulateMode::Auto => openai.is_none() && anthropic.is_none(),
        };
        let providers = if simulate {
            ProviderSetup::Simulated {
                seed: number(env, "KEYVEX_SIM_SEED", 42)?,
                profile: sim_profile(env)?,
            }
        } else {
            ProviderSetup::Real { openai, anthropic }
        };
        Ok(EngineConfig {
            providers,
            models_file: env.var("KEYVEX_MODELS_FILE").map(PathBuf::from),
            connect_timeout,
            ttft_timeout: millis(env, "KEYVEX_TTFT_TIMEOUT_MS", 20_000)?,
            stall_timeout: millis(env, "KEYVEX_STALL_TIMEOUT_MS", 30_000)?,
        })
    }

    /// Which providers are real, for the start-up banner.
    pub fn describe_providers(&self) -> String {
        match &self.providers {
            ProviderSetup::Simulated { seed, profile } => format!(
                "simulated (no OPENAI_API_KEY/ANTHROPIC_API_KEY; in-process simulator, seed {seed}, {} timing)",
                match profile {
                    SimProfile::Fast => "fast",
                    SimProfile::Realistic => "realistic",
                }
            ),
            ProviderSetup::Real { openai, anthropic } => ProviderKind::ALL
                .iter()
                .map(|k| {
                    let cfg = match k {
                        ProviderKind::OpenAi => openai,
                        ProviderKind::Anthropic => anthropic,
                    };
                    match cfg {
                        Some(c) => format!("{k}: {}", c.base_url),
                        None => format!("{k}: not configured"),
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

fn sim_profile(env: &dyn Env) -> Result<SimProfile, ConfigError> {
    match env.var("KEYVEX_SIM_PROFILE").as_deref().map(str::trim) {
        None | Some("realistic") => Ok(SimProfile::Realistic),
        Some("fast") => Ok(SimProfile::Fast),
        Some(other) => Err(ConfigError::Invalid {
            name: "KEYVEX_SIM_PROFILE",
            value: other.to_owned(),
            problem: "expected fast or realistic".into(),
        }),
    }
}

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

/// Settings of `keyvex serve`, from the environment over an optional TOML file over defaults.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: std::net::SocketAddr,
    pub api_keys: Vec<ApiKeySpec>,
    pub requests_per_hour: u32,
    pub burst: u32,
    pub provider_requests_per_minute: u32,
    pub provider_tokens_per_minute: u32,
    pub max_body_bytes: usize,
    pub drain_timeout: Duration,
    /// How long shutdown may spend flushing metrics after the streams ended.
    pub metrics_flush_timeout: Duration,
    /// Interval of SSE keep-alive comments.
    pub keep_alive: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_keys: Vec::new(),
            requests_per_hour: 1000,
            burst: 100,
            provider_requests_per_minute: 500,
            provider_tokens_per_minute: 2_000_000,
            max_body_bytes: 1024 * 1024,
            drain_timeout: Duration::from_secs(30),
            metrics_flush_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(15),
        }
    }
}

/// The TOML file's shape. Unknown keys are errors, so a typo never silently does nothing.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    limits: FileLimits,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    addr: Option<String>,
    /// `["KEY=CALLER:ROLE", …]`
    api_keys: Option<Vec<String>>,
    max_body_bytes: Option<usize>,
    drain_timeout_ms: Option<u64>,
    keep_alive_ms: Option<u64>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    requests_per_hour: Option<u32>,
    burst: Option<u32>,
    provider_requests_per_minute: Option<u32>,
    provider_tokens_per_minute: Option<u32>,
}

impl ServerConfig {
    /// Defaults, then the file (`file`, else `KEYVEX_CONFIG`), then the environment.
    pub fn load(
        env: &dyn Env,
        file: Option<&std::path::Path>,
    ) -> Result<ServerConfig, ConfigError> {
        let mut cfg = ServerConfig::default();
        let path = file
            .map(std::path::Path::to_path_buf)
            .or_else(|| env.var("KEYVEX_CONFIG").map(PathBuf::from));
        if let Some(path) = path {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::FileRead {
                path: shown.clone(),
                message: e.to_string(),
            })?;
            let parsed: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::File {
                path: shown.clone(),
                message: e.to_string(),
            })?;
            cfg.apply_file(parsed, &shown)?;
        }
        if let Some(v) = env.var("KEYVEX_ADDR") {
            cfg.addr = v.trim().parse().map_err(|_| ConfigError::Invalid {
                name: "KEYVEX_ADDR",
                value: v.clone(),
                problem: "expected HOST:PORT with an IP host, e.g. 127.0.0.1:8080 or 0.0.0.0:8080"
                    .into(),
            })?;
        }
        if let Some(v) = env.var("KEYVEX_API_KEYS") {
            cfg.api_keys = v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(ApiKeySpec::parse)
                .collect::<Result<_, _>>()
                .map_err(|problem| ConfigError::Invalid {
                    name: "KEYVEX_API_KEYS",
                    // Never echo keys back.
                    value: "(redacted)".into(),
                    problem,
                })?;
        }
        let positive = |name: &'static str, current: u32| -> Result<u32, ConfigError> {
            let n = number(env, name, u64::from(current))?;
            u32::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or(ConfigError::Invalid {
                    name,
                    value: n.to_string(),
                    problem: "expected a whole number between 1 and 4294967295".into(),
                })
        };
        cfg.requests_per_hour = positive("KEYVEX_RATE_LIMIT_PER_HOUR", cfg.requests_per_hour)?;
        cfg.burst = positive("KEYVEX_RATE_LIMIT_BURST", cfg.burst)?;
        cfg.provider_requests_per_minute =
            positive("KEYVEX_PROVIDER_RPM", cfg.provider_requests_per_minute)?;
        cfg.provider_tokens_per_minute =
            positive("KEYVEX_PROVIDER_TPM", cfg.provider_tokens_per_minute)?;
        cfg.max_body_bytes =
            number(env, "KEYVEX_MAX_BODY_BYTES", cfg.max_body_bytes as u64)? as usize;
        cfg.drain_timeout = millis(
            env,
            "KEYVEX_DRAIN_TIMEOUT_MS",
            cfg.drain_timeout.as_millis() as u64,
        )?;
        Ok(cfg)
    }

    fn apply_file(&mut self, file: FileConfig, path: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, value: String, problem: String| ConfigError::FileKey {
            path: path.to_owned(),
            key: key.to_owned(),
            value,
            problem,
        };
        if let Some(addr) = file.server.addr {
            self.addr = addr.parse().map_err(|_| {
                bad(
                    "server.addr",
                    addr.clone(),
                    "expected HOST:PORT with an IP host, e.g. 127.0.0.1:8080".into(),
                )
            })?;
        }
        if let Some(keys) = file.server.api_keys {
            self.api_keys = keys
                .iter()
                .map(|k| ApiKeySpec::parse(k))
                .collect::<Result<_, _>>()
                .map_err(|p| bad("server.api_keys", "(redacted)".into(), p))?;
        }
        if let Some(n) = file.server.max_body_bytes {
            self.max_body_bytes = n;
        }
        if let Some(ms) = file.server.drain_timeout_ms {
            self.drain_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = file.server.keep_alive_ms {
            if ms == 0 {
                return Err(bad(
                    "server.keep_alive_ms",
                    "0".into(),
                    "must be at least 1".into(),
                ));
            }
            self.keep_alive = Duration::from_millis(ms);
        }
        let limits = [
            (
                "limits.requests_per_hour",
                file.limits.requests_per_hour,
                &mut self.requests_per_hour,
            ),
            ("limits.burst", file.limits.burst, &mut self.burst),
            (
                "limits.provider_requests_per_minute",
                file.limits.provider_requests_per_minute,
                &mut self.provider_requests_per_minute,
            ),
            (
                "limits.provider_tokens_per_minute",
                file.limits.provider_tokens_per_minute,
                &mut self.provider_tokens_per_minute,
            ),
        ];
        for (key, value, slot) in limits {
            if let Some(v) = value {
                if v == 0 {
                    return Err(bad(key, "0".into(), "must be at least 1".into()));
                }
                *slot = v;
            }
        }
        Ok(())
    }
}

fn number(env: &dyn Env, name: &'static str, default: u64) -> Result<u64, ConfigError> {
    match env.var(name) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| ConfigError::Invalid {
            name,
            value: v,
            problem: "expected a whole number".into(),
        }),
    }
}

fn millis(env: &dyn Env, name: &'static str, default: u64) -> Result<Duration, ConfigError> {
    number(env, name, default).map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_keys_means_simulated() {
        let c = EngineConfig::from_env(&MapEnv::default()).unwrap();
        assert!(matches!(
            c.providers,
            ProviderSetup::Simulated {
                seed: 42,
                profile: SimProfile::Realistic
            }
        ));
    }

    #[test]
    fn sim_profile_is_read_and_checked() {
        let env = MapEnv::new([("KEYVEX_SIM_PROFILE", "fast"), ("KEYVEX_SIM_SEED", "3")]);
        let c = EngineConfig::from_env(&env).unwrap();
        assert!(matches!(
            c.providers,
            ProviderSetup::Simulated {
                seed: 3,
                profile: SimProfile::Fast
            }
        ));
        let env = MapEnv::new([("KEYVEX_SIM_PROFILE", "slow")]);
        let e = EngineConfig::from_env(&env).unwrap_err().to_string();
        assert!(e.contains("KEYVEX_SIM_PROFILE"), "{e}");
    }

    #[test]
    fn a_key_means_real_and_base_url_is_trimmed() {
        let env = MapEnv::new([
            ("OPENAI_API_KEY", "sk-x"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
        ]);
        let c = EngineConfig::from_env(&env).unwrap();
        assert!(!c.describe_providers().contains("sk-x"));
        let ProviderSetup::Real { openai, anthropic } = c.providers else {
            panic!("expected real providers");
        };
        assert_eq!(openai.unwrap().base_url, "http://127.0.0.1:9/v1");
        assert!(anthropic.is_none());
    }

    #[test]
    fn server_config_env_over_file_over_defaults() {
        let dir = std::env::temp_dir().join(format!("keyvex-cfg-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keyvex.toml");
        std::fs::write(
            &file,
            "[server]\naddr = \"127.0.0.1:9000\"\napi_keys = [\"file-key-123=carol:admin\"]\n[limits]\nburst = 7\n",
        )
        .unwrap();
        let env = MapEnv::new([
            ("KEYVEX_ADDR", "127.0.0.1:0"),
            ("KEYVEX_RATE_LIMIT_PER_HOUR", "60"),
        ]);
        let c = ServerConfig::load(&env, Some(&file)).unwrap();
        assert_eq!(c.addr.port(), 0, "environment wins over the file");
        assert_eq!((c.requests_per_hour, c.burst), (60, 7));
        assert_eq!(c.api_keys[0].caller, "carol");
        assert_eq!(c.api_keys[0].role, CallerRole::Admin);

        std::fs::write(&file, "[server]\nadress = \"x\"\n").unwrap();
        let e = ServerConfig::load(&MapEnv::default(), Some(&file))
            .unwrap_err()
            .to_string();
        assert!(e.contains("adress") && e.contains("keyvex.toml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn api_keys_parse_and_never_echo() {
        let env = MapEnv::new([("KEYVEX_API_KEYS", "k-aaaaaaaa=alice:admin, k-bbbbbbbb=bob")]);
        let c = ServerConfig::load(&env, None).unwrap();
        assert_eq!(c.api_keys.len(), 2);
        assert_eq!(c.api_keys[1].role, CallerRole::User);
        let env = MapEnv::new([("KEYVEX_API_KEYS", "k-secret-value=alice:root")]);
        let e = ServerConfig::load(&env, None).unwrap_err().to_string();
        assert!(e.contains("root") && !e.contains("k-secret-value"), "{e}");
    }

    #[test]
    fn bad_numbers_name_the_variable() {
        let env = MapEnv::new([("KEYVEX_TTFT_TIMEOUT_MS", "soon")]);
        let e = EngineConfig::from_env(&env).unwrap_err().to_string();
        assert!(e.contains("KEYVEX_TTFT_TIMEOUT_MS"), "{e}");
    }
}
