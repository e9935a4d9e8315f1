//! Assembles a running engine from configuration: catalog, providers (real or simulated) and
//! the router. Every entry point (CLI commands, server, worker) starts here, so "which providers,
//! which catalog" is decided in one place and printed the same way.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::catalog::{Catalog, CatalogError};
use crate::config::{EngineConfig, ProviderSetup};
use crate::provider::anthropic::AnthropicProvider;
use crate::provider::openai::OpenAiProvider;
use crate::provider::sim::{self, SimConfig, SimHandle, SimProfile};
use crate::provider::{ApiKey, ProviderConfig, SharedProvider};
use crate::router::{Providers, Router, RouterConfig};
use crate::stream::ProviderKind;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("could not start the in-process simulator on 127.0.0.1: {0}")]
    Simulator(std::io::Error),
    #[error("could not set up the {provider} client: {message}")]
    Provider {
        provider: ProviderKind,
        message: String,
    },
}

/// A configured engine: the router and what it was built from.
pub struct Runtime {
    pub catalog: Arc<Catalog>,
    pub router: Router,
    /// The in-process simulator, when providers are simulated; kept alive with the runtime.
    pub simulator: Option<SimHandle>,
    /// One line saying which providers are in use, for banners.
    pub providers_description: String,
}

impl Runtime {
    /// Loads the catalog, starts the simulator if the configuration asks for it, and builds the
    /// providers and router. `router_config` carries deadlines and the cancellation observer.
    pub async fn start(
        config: &EngineConfig,
        router_config: RouterConfig,
    ) -> Result<Runtime, RuntimeError> {
        Self::start_with(config, router_config, &|_, provider| provider).await
    }

    /// Like [`Runtime::start`], with each provider passed through `wrap` before the router gets
    /// it (the server puts its rate limiter in front of every provider this way).
    pub async fn start_with(
        config: &EngineConfig,
        mut router_config: RouterConfig,
        wrap: &(dyn Fn(ProviderKind, SharedProvider) -> SharedProvider + Send + Sync),
    ) -> Result<Runtime, RuntimeError> {
        let catalog = Arc::new(Catalog::load(config.models_file.as_deref())?);
        router_config.ttft_timeout = config.ttft_timeout;
        router_config.stall_timeout = config.stall_timeout;

        let (openai, anthropic, simulator) = match &config.providers {
            ProviderSetup::Simulated { seed, profile } => {
                let sim_config = match profile {
                    SimProfile::Fast => SimConfig::fast(*seed),
                    SimProfile::Realistic => SimConfig::realistic(*seed),
                };
                let handle = sim::start(SocketAddr::from(([127, 0, 0, 1], 0)), sim_config)
                    .await
                    .map_err(RuntimeError::Simulator)?;
                // The simulator accepts any key; a fixed one keeps the real client code paths
                // (auth headers included) exercised.
                let cfg = ProviderConfig {
                    base_url: handle.base_url(),
                    api_key: ApiKey::new("sim-key"),
                    connect_timeout: config.connect_timeout,
                };
                (Some(cfg.clone()), Some(cfg), Some(handle))
            }
            ProviderSetup::Real { openai, anthropic } => (openai.clone(), anthropic.clone(), None),
        };

        let mut providers = Providers::new();
        if let Some(cfg) = openai {
            let p = OpenAiProvider::new(&cfg).map_err(|e| RuntimeError::Provider {
                provider: ProviderKind::OpenAi,
                message: e.to_string(),
            })?;
            providers = providers.with(
                ProviderKind::OpenAi,
                wrap(ProviderKind::OpenAi, Arc::new(p)),
            );
        }
        if let Some(cfg) = anthropic {
            let p = AnthropicProvider::new(&cfg).map_err(|e| RuntimeError::Provider {
                provider: ProviderKind::Anthropic,
                message: e.to_string(),
            })?;
            providers = providers.with(
                ProviderKind::Anthropic,
                wrap(ProviderKind::Anthropic, Arc::new(p)),
            );
        }

        let providers_description = match (&simulator, &config.providers) {
            (Some(h), ProviderSetup::Simulated { profile, .. }) => format!(
                "simulated: no OPENAI_API_KEY or ANTHROPIC_API_KEY set (or KEYVEX_SIMULATE=always), so both providers are served by an in-process simulator at {} ({} timing; KEYVEX_SIM_PROFILE)",
                h.base_url(),
                match profile {
                    SimProfile::Fast => "fast",
                    SimProfile::Realistic => "realistic",
                }
            ),
            _ => config.describe_providers(),
        };
        Ok(Runtime {
            router: Router::new(catalog.clone(), providers, router_config),
            catalog,
            simulator,
            providers_description,
        })
    }

    /// Stops the in-process simulator, if any.
    pub async fn shutdown(self) {
        if let Some(sim) = self.simulator {
            sim.shutdown().await;
        }
    }
}
