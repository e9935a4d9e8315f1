//! What the server tests share: a server assembled the way `keyvex serve` assembles one (an
//! engine on a simulator over HTTP, recording into a `Tracker`, observed by the server's
//! Prometheus counters), run on its own task and stopped the way SIGTERM stops the binary.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use keyvex_engine::budgets::{BudgetLimits, Budgets};
use keyvex_engine::limits::{ProviderRates, Rate};
use keyvex_engine::record::ShutdownReport;
use keyvex_server::catalog_sync::CatalogSync;
use keyvex_server::config::{ApiKeySpec, ServerConfig};
use keyvex_server::prom::ServerMetrics;
use keyvex_server::queue::JobsCtx;
use keyvex_server::queue::admin::{self, QueueSettings, QueueUrls};
use keyvex_server::queue::worker::{WorkerConfig, WorkerCounts};
use keyvex_server::{Backends, Server, ServerError, ServerParts};
use keyvex_sim::SimHandle;
use keyvex_store::{CatalogVersions, MetricsConfig, StoreConfig, Stores, Tracker};
use keyvex_testkit::TempDir;
use keyvex_testkit::moto::{self, Moto};
use serde_json::Value;
use tokio::sync::watch;

/// How long a test waits for anything asynchronous (shipping, a worker, a queue).
pub const WAIT: Duration = Duration::from_secs(30);

/// The API keys of every test server: two users and an admin.
pub const ALICE: &str = "alice-key-0001";
pub const BOB: &str = "bob-key-0002";
pub const ADMIN: &str = "admin-key-0003";

/// A bound server running on its own task, stopped the way SIGTERM stops `keyvex serve`.
pub struct RunningServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<ShutdownReport, ServerError>>,
}

impl RunningServer {
    pub fn spawn(server: Server) -> RunningServer {
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
    pub async fn stop(mut self) -> ShutdownReport {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("server stopped in time")
            .unwrap()
            .unwrap()
    }
}

/// A queue the server's `/v1/jobs` routes (and its worker, if any) use.
pub struct Queue {
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
}

/// What a test server is built from besides its store. [`Spec::new`] gives `keyvex serve`'s
/// defaults (its caller and provider limits included) on a free loopback port.
pub struct Spec {
    /// The simulator's seed.
    pub seed: u64,
    pub config: ServerConfig,
    pub caller_rate: Rate,
    pub provider_rates: ProviderRates,
    /// How often the tracker ships, on [`TestServer::sqlite`].
    pub flush: Duration,
    /// `/v1/jobs` enqueues here; job state lives in the server's store.
    pub queue: Option<Queue>,
    /// A worker inside the server (`serve --with-worker`); needs `queue`.
    pub worker: Option<WorkerConfig>,
    /// How often the server reads the store's active catalog version (`KEYVEX_CATALOG_POLL_MS`).
    pub catalog_poll: Duration,
    /// Only the OpenAI provider is configured (a replica without an Anthropic key).
    pub openai_only: bool,
    /// Dollar budgets, counted in the server's process (as `keyvex serve` without REDIS_URL).
    pub budgets: BudgetLimits,
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

impl Spec {
    /// Callers `alice` and `bob` (users) and `root` (admin), with [`ALICE`], [`BOB`] and
    /// [`ADMIN`]; the simulator seeded with `seed`.
    pub fn new(seed: u64) -> Spec {
        let keys = [
            format!("{ALICE}=alice:user"),
            format!("{BOB}=bob:user"),
            format!("{ADMIN}=root:admin"),
        ];
        Spec {
            seed,
            config: ServerConfig {
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                api_keys: keys.iter().map(|k| ApiKeySpec::parse(k).unwrap()).collect(),
                ..ServerConfig::default()
            },
            // `keyvex serve`'s defaults (KEYVEX_RATE_LIMIT_*, KEYVEX_PROVIDER_*).
            caller_rate: Rate {
                per_period: nz(1_000),
                period: Duration::from_secs(3_600),
                burst: nz(100),
            },
            provider_rates: ProviderRates {
                requests_per_minute: nz(500),
                tokens_per_minute: nz(2_000_000),
            },
            flush: Duration::from_millis(20),
            queue: None,
            worker: None,
            catalog_poll: Duration::from_secs(5),
            openai_only: false,
            budgets: BudgetLimits::default(),
        }
    }
}

/// Metrics, sessions and jobs in one SQLite file, as `keyvex serve` keeps them without DynamoDB.
pub async fn sqlite_stores(db: &Path, metrics: MetricsConfig) -> Stores {
    let store = StoreConfig::Sqlite {
        path: db.to_owned(),
    };
    Stores::open(&store, metrics).await.unwrap()
}

/// A running server in front of its own simulator.
pub struct TestServer {
    pub base: String,
    pub sim: SimHandle,
    pub tracker: Tracker,
    /// The ledger's SQLite file (on [`TestServer::sqlite`] also the store's).
    pub db: PathBuf,
    pub http: reqwest::Client,
    /// The in-process worker's counts, when the spec asked for one.
    pub progress: Option<watch::Receiver<WorkerCounts>>,
    running: RunningServer,
    _dir: Option<TempDir>,
}

impl TestServer {
    /// A server whose metrics, sessions and jobs are in a fresh SQLite file, with the admin and
    /// session reads on it (`keyvex serve` with `KEYVEX_METRICS_DB`).
    pub async fn sqlite(spec: Spec) -> TestServer {
        let dir = TempDir::new("server");
        let db = dir.file("metrics.sqlite3");
        let mut metrics = keyvex_testkit::fast_metrics(&db);
        metrics.flush_interval = spec.flush;
        let stores = sqlite_stores(&db, metrics).await;
        TestServer::on_stores(spec, &stores, db, Some(dir)).await
    }

    /// A server on stores the test opened (and may already have filled).
    pub async fn on_stores(
        spec: Spec,
        stores: &Stores,
        db: PathBuf,
        dir: Option<TempDir>,
    ) -> TestServer {
        let mut backends = Backends::of(stores);
        if let Some(q) = &spec.queue {
            let jobs = StoreConfig::Sqlite { path: db.clone() }
                .open_jobs()
                .await
                .unwrap();
            backends.jobs = Some(JobsCtx {
                sqs: q.sqs.clone(),
                queue_url: q.queue_url.clone(),
                jobs,
            });
        }
        backends.worker = spec.worker.clone();
        let catalogs = Some(stores.catalogs.clone());
        TestServer::assemble(spec, stores.tracker.clone(), backends, catalogs, db, dir).await
    }

    /// A server that only records into `tracker` (no admin reads, sessions or queue): the
    /// durability tests put sinks of their own behind it.
    pub async fn on_tracker(spec: Spec, tracker: Tracker, ledger: &Path) -> TestServer {
        assert!(
            spec.queue.is_none() && spec.worker.is_none(),
            "a queue needs a job store: use TestServer::sqlite"
        );
        let backends = Backends::default();
        TestServer::assemble(spec, tracker, backends, None, ledger.to_owned(), None).await
    }

    async fn assemble(
        spec: Spec,
        tracker: Tracker,
        mut backends: Backends,
        catalogs: Option<CatalogVersions>,
        db: PathBuf,
        dir: Option<TempDir>,
    ) -> TestServer {
        let sim = keyvex_testkit::fast_sim(spec.seed).await;
        let prom = Arc::new(ServerMetrics::new());
        let builder = if spec.openai_only {
            keyvex_engine::Engine::builder()
                .router(keyvex_engine::router::RouterConfig {
                    ttft_timeout: Duration::from_secs(10),
                    stall_timeout: Duration::from_secs(10),
                    ..Default::default()
                })
                .openai_at(&sim.base_url(), "sim-key")
        } else {
            keyvex_testkit::sim_engine(&sim)
        };
        let engine = builder
            .recorder(Arc::new(tracker.clone()))
            .observer(prom.clone())
            .caller_rate(spec.caller_rate)
            .provider_rates(spec.provider_rates)
            .budgets(Budgets::in_process(spec.budgets.clone()))
            .build()
            .unwrap();
        // As `keyvex serve` does: start on the store's active catalog version, then poll.
        if let Some(catalogs) = catalogs {
            let sync =
                CatalogSync::new(catalogs, engine.clone(), tracker.clone(), spec.catalog_poll);
            sync.refresh().await.unwrap();
            backends.catalog = Some(sync);
        }
        let parts = ServerParts {
            engine,
            tracker: tracker.clone(),
            prom,
            backends,
        };
        let server = Server::bind(spec.config, parts).await.unwrap();
        let progress = server.worker_progress();
        let running = RunningServer::spawn(server);
        TestServer {
            base: running.base.clone(),
            sim,
            tracker,
            db,
            http: reqwest::Client::new(),
            progress,
            running,
            _dir: dir,
        }
    }

    pub fn post(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
    }

    pub async fn get(&self, path: &str, key: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str, key: &str) -> Value {
        let resp = self.get(path, key).await;
        assert_eq!(resp.status(), 200, "GET {path}");
        resp.json().await.unwrap()
    }

    /// Runs one agent as `key`'s caller to its end; returns the request id and the events.
    pub async fn run_agent(
        &self,
        agent: &str,
        key: &str,
        body: Value,
    ) -> (String, Vec<(String, Value)>) {
        let resp = self
            .post(&format!("/v1/agents/{agent}"), key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        (id, keyvex_testkit::read_sse(resp).await)
    }

    /// The Prometheus exposition at `/metrics`.
    pub async fn prometheus_text(&self) -> String {
        let resp = self.http.get(format!("{}/metrics", self.base)).send();
        resp.await.unwrap().text().await.unwrap()
    }

    /// Stops the server like SIGTERM (drain, stop the worker, flush), then the simulator.
    pub async fn stop(self) -> Stopped {
        let report = self.running.stop().await;
        self.sim.shutdown().await;
        Stopped {
            report,
            db: self.db,
            _dir: self._dir,
        }
    }
}

/// A stopped server's flush report, and its files, kept until this is dropped.
pub struct Stopped {
    pub report: ShutdownReport,
    pub db: PathBuf,
    _dir: Option<TempDir>,
}

/// The call records in the store's `requests` table (`TestServer::sqlite`), as JSON.
pub fn stored_records(db: &Path) -> Vec<Value> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare("SELECT body FROM requests").unwrap();
    stmt.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|b| serde_json::from_str(&b.unwrap()).unwrap())
        .collect()
}

/// Visible plus in-flight messages of a queue.
pub async fn depth(sqs: &aws_sdk_sqs::Client, url: &str) -> u64 {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap();
    out.attributes()
        .unwrap()
        .values()
        .map(|v| v.parse::<u64>().unwrap())
        .sum()
}

/// A private moto with a queue and its dead-letter queue (SQS's redrive after 3 receives),
/// whose messages reappear `visibility` after a receive.
pub struct MotoQueue {
    /// Keeps moto running.
    pub moto: Moto,
    pub sqs: aws_sdk_sqs::Client,
    pub urls: QueueUrls,
}

impl MotoQueue {
    pub async fn start(tag: &str, visibility: Duration) -> MotoQueue {
        let moto = Moto::start().await;
        let sqs = moto::sqs_client(&moto.endpoint).await;
        let settings = QueueSettings {
            visibility,
            ..QueueSettings::default()
        };
        let urls = admin::create_queues_with(
            &sqs,
            &format!("{tag}-queue"),
            &format!("{tag}-dlq"),
            &settings,
        )
        .await
        .unwrap();
        MotoQueue { moto, sqs, urls }
    }

    /// The queue, for a server's `/v1/jobs` routes.
    pub fn for_server(&self) -> Queue {
        Queue {
            sqs: self.sqs.clone(),
            queue_url: self.urls.queue_url.clone(),
        }
    }
}

/// Worker settings in seconds instead of minutes, so redelivery and shutdown take seconds.
pub fn fast_worker() -> WorkerConfig {
    WorkerConfig {
        concurrency: 4,
        max_messages: 10,
        wait_time: Duration::from_secs(1),
        heartbeat_every: Duration::from_secs(1),
        heartbeat_extend: Duration::from_secs(3),
        retry_backoff: Duration::from_secs(1),
        busy_backoff: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(5),
        max_receives: None,
        dlq_url: None,
        queue_latency_target: Duration::from_secs(30),
    }
}
