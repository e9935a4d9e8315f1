//! The self-contained mode: the provider simulator and the engine's HTTP server started
//! in-process on loopback ports, so `cargo run -p loadtest` demonstrates itself offline.
//!
//! The server is assembled as the engine's own server tests do it: both providers point at the
//! simulator, metrics go to a temp SQLite file, and one generated API key is accepted. Caller
//! and provider limits are raised far above what a load test sends, so the run measures the
//! engine, not its rate limiter.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use keyvex_engine::config::{ApiKeySpec, EngineConfig, MapEnv, ProviderSetup, ServerConfig};
use keyvex_engine::metrics::{ShutdownReport, start_from_env};
use keyvex_engine::provider::sim::{self, SimArgs, SimHandle, SimProfile, SimStats};
use keyvex_engine::provider::{ApiKey, ProviderConfig};
use keyvex_engine::server::{Server, ServerError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Why the local engine could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum SelfHostError {
    #[error("invalid simulator settings: {0}")]
    Sim(#[from] sim::SimArgsError),
    #[error("could not start the simulator on a loopback port: {0}")]
    SimBind(#[source] std::io::Error),
    #[error("could not create the temp metrics folder {path}: {source}")]
    TempDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start the metrics ledger: {0}")]
    Metrics(String),
    #[error("could not start the engine server: {0}")]
    Server(#[from] ServerError),
    #[error("the engine server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("the engine did not stop within {0:?}")]
    StopTimeout(Duration),
}

/// How the simulator should behave (the `--sim-*` flags).
#[derive(Debug, Clone, PartialEq)]
pub struct SimSettings {
    pub seed: u64,
    /// Time to first token; `None` keeps the realistic profile's 450 ± 150 ms.
    pub ttft_ms: Option<u64>,
    /// Output speed; `None` keeps the realistic profile's 75 tokens/s, `0` is unpaced.
    pub tps: Option<f64>,
    /// Probability that a provider request fails (429, 500, 529 or a mid-stream cut).
    pub fault_rate: f64,
}

impl Default for SimSettings {
    fn default() -> Self {
        SimSettings {
            seed: 42,
            ttft_ms: None,
            tps: None,
            fault_rate: 0.0,
        }
    }
}

/// A running simulator and engine.
pub struct SelfHost {
    pub base_url: String,
    pub api_key: String,
    sim: SimHandle,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<ShutdownReport, ServerError>>,
    dir: PathBuf,
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Starts the simulator and the engine on free loopback ports.
pub async fn start(settings: &SimSettings) -> Result<SelfHost, SelfHostError> {
    // `keyvex sim`'s own argument type, so the fault mix and validation are the simulator's.
    let config = SimArgs {
        port: 0,
        host: std::net::IpAddr::from([127, 0, 0, 1]),
        seed: settings.seed,
        ttft_ms: settings.ttft_ms,
        tps: settings.tps,
        output_tokens: None,
        fault_rate: settings.fault_rate,
        profile: SimProfile::Realistic,
        no_auth: false,
    }
    .to_config()?;
    let sim = sim::start(loopback(), config)
        .await
        .map_err(SelfHostError::SimBind)?;
    match start_engine(&sim).await {
        Ok((base_url, api_key, stop, task, dir)) => Ok(SelfHost {
            base_url,
            api_key,
            sim,
            stop,
            task,
            dir,
        }),
        Err(e) => {
            sim.shutdown().await;
            Err(e)
        }
    }
}

type Started = (
    String,
    String,
    oneshot::Sender<()>,
    JoinHandle<Result<ShutdownReport, ServerError>>,
    PathBuf,
);

async fn start_engine(sim: &SimHandle) -> Result<Started, SelfHostError> {
    let provider = ProviderConfig {
        base_url: sim.base_url(),
        api_key: ApiKey::new("sim-key"),
        connect_timeout: Duration::from_secs(2),
    };
    let engine = EngineConfig {
        providers: ProviderSetup::Real {
            openai: Some(provider.clone()),
            anthropic: Some(provider),
        },
        models_file: None,
        connect_timeout: Duration::from_secs(2),
        ttft_timeout: Duration::from_secs(20),
        stall_timeout: Duration::from_secs(30),
    };
    let dir = std::env::temp_dir().join(format!("keyvex-loadtest-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).map_err(|source| SelfHostError::TempDir {
        path: dir.display().to_string(),
        source,
    })?;
    let db = dir.join("metrics.sqlite3");
    let db_text = db.to_string_lossy().into_owned();
    let tracker = start_from_env(&MapEnv::new([
        ("KEYVEX_METRICS_DB", db_text.as_str()),
        ("KEYVEX_METRICS_FLUSH_MS", "100"),
    ]))
    .await
    .map_err(|e| SelfHostError::Metrics(e.to_string()))?;
    let api_key = format!("kvx-load-{}", uuid::Uuid::new_v4().simple());
    let spec = ApiKeySpec::parse(&format!("{api_key}=loadtest:user"))
        .map_err(|e| SelfHostError::Metrics(format!("generated key rejected: {e}")))?;
    let config = ServerConfig {
        addr: loopback(),
        api_keys: vec![spec],
        requests_per_hour: 10_000_000,
        burst: 100_000,
        provider_requests_per_minute: 1_000_000,
        provider_tokens_per_minute: 1_000_000_000,
        drain_timeout: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    let server = Server::bind(config, &engine, tracker).await?;
    let addr = server
        .local_addr()
        .map_err(|e| SelfHostError::Server(ServerError::Serve(e)))?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        // A dropped sender stops the server too.
        let _ = stopped.await;
    }));
    tracing::info!(%addr, "engine listening for the load test");
    Ok((format!("http://{addr}"), api_key, stop, task, dir))
}

impl SelfHost {
    /// What the simulator saw (requests, faults injected).
    pub fn sim_stats(&self) -> SimStats {
        self.sim.stats()
    }

    /// Stops the engine (drain, flush metrics), then the simulator, and removes the temp files.
    pub async fn stop(self) -> Result<ShutdownReport, SelfHostError> {
        let limit = Duration::from_secs(30);
        let _ = self.stop.send(());
        let report = match tokio::time::timeout(limit, self.task).await {
            Ok(joined) => joined?.map_err(SelfHostError::Server),
            Err(_) => Err(SelfHostError::StopTimeout(limit)),
        };
        self.sim.shutdown().await;
        if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            tracing::debug!(%error, dir = %self.dir.display(), "could not remove the temp metrics folder");
        }
        report
    }
}
