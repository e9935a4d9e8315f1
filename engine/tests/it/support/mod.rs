//! Test harness shared by the integration modules: a moto server per test and a fault-injecting
//! proxy in front of it.

// Test code: a failed unwrap is a failed test (clippy's test allowance does not reach helpers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod fault_proxy;
pub mod moto;

use std::time::Duration;

use keyvex_engine::metrics::MetricsConfig;
use keyvex_engine::store::dynamo::DynamoRetry;

/// Fast flushes and retries so the tests take milliseconds per round, and the rolling alert rules
/// kept quiet so counts of records are exact (alerts have their own tests).
pub fn fast_metrics(ledger: impl Into<std::path::PathBuf>) -> MetricsConfig {
    let mut cfg = MetricsConfig::new(ledger);
    cfg.flush_interval = Duration::from_millis(20);
    cfg.retry_base = Duration::from_millis(5);
    cfg.retry_cap = Duration::from_millis(50);
    cfg.alerts.min_samples = usize::MAX;
    cfg
}

/// DynamoDB retries in milliseconds, so throttling and outages are exercised quickly.
pub fn fast_retry() -> DynamoRetry {
    DynamoRetry {
        base: Duration::from_millis(2),
        cap: Duration::from_millis(20),
        max_attempts: 8,
    }
}

/// A bound server running on its own task, stopped the way SIGTERM stops `keyvex serve`.
pub struct RunningServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<
        Result<keyvex_engine::metrics::ShutdownReport, keyvex_engine::server::ServerError>,
    >,
}

impl RunningServer {
    pub fn spawn(server: keyvex_engine::server::Server) -> RunningServer {
        let addr = server.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        RunningServer {
            base: format!("http://{addr}"),
            stop: Some(tx),
            task,
        }
    }

    /// Drains, flushes the metrics and returns the flush report.
    pub async fn stop(mut self) -> keyvex_engine::metrics::ShutdownReport {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("server stopped in time")
            .unwrap()
            .unwrap()
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("keyvex-{tag}-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn file(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fast simulator on loopback and an engine configuration whose two providers point at it
/// through the real client code (what every server-level test starts from).
pub async fn simulated_engine(
    seed: u64,
) -> (
    keyvex_engine::provider::sim::SimHandle,
    keyvex_engine::config::EngineConfig,
) {
    use std::time::Duration;

    use keyvex_engine::config::{EngineConfig, ProviderSetup};
    use keyvex_engine::provider::sim::{self, SimConfig};
    use keyvex_engine::provider::{ApiKey, ProviderConfig};

    let sim = sim::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig::fast(seed),
    )
    .await
    .unwrap();
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
        ttft_timeout: Duration::from_secs(10),
        stall_timeout: Duration::from_secs(10),
    };
    (sim, engine)
}
