//! The self-contained mode: the provider simulator and the engine's HTTP server started
//! in-process on loopback ports, so `cargo run -p loadtest` demonstrates itself offline.
//!
//! The engine is assembled exactly as `keyvex serve` assembles it (`keyvex::App` from a
//! `Config`): both providers point at the simulator, metrics go to a temp SQLite file, and one
//! generated API key is accepted. Caller and provider limits are raised far above what a load
//! test sends, so the run measures the engine, not its rate limiter.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use keyvex::{App, Config, MapEnv};
use keyvex_engine::ShutdownReport;
use keyvex_server::{Server, ServerError};
use keyvex_sim::{self as sim, SimArgs, SimHandle, SimProfile, SimStats};
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
    #[error("could not assemble the engine: {0}")]
    Engine(String),
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
    /// Start the engine with every mid-stream policy `off` (a cut after content fails the
    /// request), to compare with the catalog's rescues.
    pub no_rescue: bool,
}

impl Default for SimSettings {
    fn default() -> Self {
        SimSettings {
            seed: 42,
            ttft_ms: None,
            tps: None,
            fault_rate: 0.0,
            no_rescue: false,
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

/// The embedded catalog with `midStreamFailover: "off"` everywhere, written into `dir`; returns
/// its path.
fn write_catalog_without_rescue(dir: &std::path::Path) -> Result<String, SelfHostError> {
    let mut catalog: serde_json::Value =
        serde_json::from_str(keyvex_engine::catalog::EMBEDDED_CATALOG)
            .map_err(|e| SelfHostError::Engine(format!("the embedded catalog: {e}")))?;
    if let Some(processes) = catalog["processes"].as_object_mut() {
        for route in processes.values_mut() {
            route["midStreamFailover"] = "off".into();
        }
    }
    catalog["chat"] = serde_json::json!({ "midStreamFailover": "off" });
    let path = dir.join("models-no-rescue.json");
    std::fs::write(&path, catalog.to_string()).map_err(|source| SelfHostError::TempDir {
        path: path.display().to_string(),
        source,
    })?;
    Ok(path.to_string_lossy().into_owned())
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
    match start_engine(&sim, settings.no_rescue).await {
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

async fn start_engine(sim: &SimHandle, no_rescue: bool) -> Result<Started, SelfHostError> {
    let dir = std::env::temp_dir().join(format!("keyvex-loadtest-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).map_err(|source| SelfHostError::TempDir {
        path: dir.display().to_string(),
        source,
    })?;
    let models_file = if no_rescue {
        Some(write_catalog_without_rescue(&dir)?)
    } else {
        None
    };
    let db = dir.join("metrics.sqlite3");
    let db = db.to_string_lossy().into_owned();
    let base = sim.base_url();
    let api_key = format!("kvx-load-{}", uuid::Uuid::new_v4().simple());
    let keys = format!("{api_key}=loadtest:user");
    let env = MapEnv::new([
        ("OPENAI_API_KEY", "sim-key"),
        ("OPENAI_BASE_URL", base.as_str()),
        ("ANTHROPIC_API_KEY", "sim-key"),
        ("ANTHROPIC_BASE_URL", base.as_str()),
        ("KEYVEX_SIMULATE", "never"),
        ("KEYVEX_CONNECT_TIMEOUT_MS", "2000"),
        ("KEYVEX_ADDR", "127.0.0.1:0"),
        ("KEYVEX_API_KEYS", keys.as_str()),
        ("KEYVEX_RATE_LIMIT_PER_HOUR", "10000000"),
        ("KEYVEX_RATE_LIMIT_BURST", "100000"),
        ("KEYVEX_PROVIDER_RPM", "1000000"),
        ("KEYVEX_PROVIDER_TPM", "1000000000"),
        ("KEYVEX_DRAIN_TIMEOUT_MS", "5000"),
        ("KEYVEX_METRICS_DB", db.as_str()),
        ("KEYVEX_METRICS_FLUSH_MS", "100"),
        ("KEYVEX_MODELS_FILE", models_file.as_deref().unwrap_or("")),
    ]);
    let config = Config::load(&env, None).map_err(|e| SelfHostError::Engine(e.to_string()))?;
    let server_config = config.server.clone();
    let app = App::start(config)
        .await
        .map_err(|e| SelfHostError::Engine(e.to_string()))?;
    let parts = app
        .server_parts(false)
        .map_err(|e| SelfHostError::Engine(e.to_string()))?;
    let server = Server::bind(server_config, parts).await?;
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
