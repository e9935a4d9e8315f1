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
    fn bad_numbers_name_the_variable() {
        let env = MapEnv::new([("KEYVEX_TTFT_TIMEOUT_MS", "soon")]);
        let e = EngineConfig::from_env(&env).unwrap_err().to_string();
        assert!(e.contains("KEYVEX_TTFT_TIMEOUT_MS"), "{e}");
    }
}
