//! Assembly: from one [`Config`] to a running [`App`] — the stores and the metrics tracker, the
//! simulator when providers are simulated, the engine with its limits and budgets, and the
//! queue when it is configured. Every command (and the load test's and the benchmarks'
//! self-contained engines) starts here, so "which providers, which store, which limits" is
//! decided once and reported the same way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyvex_engine::budgets::{
    Budgets, InProcessSpend, OnUnavailable, RestoredSpend, Window, window_start,
};
use keyvex_engine::cost::Cost;
use keyvex_engine::limits::LimitsWhenDown;
use keyvex_engine::router::RouterConfig;
use keyvex_engine::{Engine, EngineError, ShutdownReport};
use keyvex_server::Backends;
use keyvex_server::ServerParts;
use keyvex_server::catalog_sync::{Applied, CatalogSync};
use keyvex_server::prom::ServerMetrics;
use keyvex_server::queue::JobsCtx;
use keyvex_server::queue::worker::WorkerConfig;
use keyvex_sim::{SimConfig, SimProfile};
use keyvex_store::admin::MetricsFilter;
use keyvex_store::aggregate::GroupBy;
use keyvex_store::redis_limits::{RedisLimits, RedisSetupError, WhenDown};
use keyvex_store::{MetricsError, Stores};

use crate::config::{Config, ProviderSetup};

/// Why the engine could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(
        "could not open the metrics store: {0}; set KEYVEX_METRICS_DB to a writable file (or DYNAMODB_TABLE_NAME for DynamoDB)"
    )]
    Store(#[from] MetricsError),
    #[error("could not start the in-process simulator on 127.0.0.1: {0}")]
    Simulator(#[source] std::io::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}; fix REDIS_URL or unset it to keep limits in this process")]
    Redis(#[from] RedisSetupError),
    #[error(
        "this command needs the AI-processing queue; set SQS_AI_PROCESSING_QUEUE_URL (printed by `keyvex queue create`)"
    )]
    NoQueue,
}

/// A running engine and what it runs on.
pub struct App {
    pub config: Config,
    pub engine: Engine,
    pub stores: Stores,
    /// Counts every call the engine records (an observer of the engine); `/metrics` renders it.
    pub prom: Arc<ServerMetrics>,
    /// The queue, when `SQS_AI_PROCESSING_QUEUE_URL` is set.
    pub queue: Option<JobsCtx>,
    /// Keeps the engine on the store's active model catalog version (servers and workers run
    /// its poller; one-shot commands use the version active when they started).
    pub catalog: CatalogSync,
}

impl App {
    /// Opens the store (the tracker ships what an earlier run left), starts the simulator if
    /// providers are simulated, and builds the engine.
    pub async fn start(config: Config) -> Result<App, AppError> {
        let stores = Stores::open(&config.store, config.metrics.clone()).await?;
        let prom = Arc::new(ServerMetrics::new());
        let mut builder = Engine::builder()
            .connect_timeout(config.connect_timeout)
            .max_event_bytes(config.max_event_bytes)
            .router(RouterConfig {
                ttft_timeout: config.ttft_timeout,
                stall_timeout: config.stall_timeout,
                header_timeout: config.header_timeout,
                request_timeout: config.request_timeout,
                same_model_retries: config.same_model_retries,
                breaker: config.breaker,
                capture_content: config.capture_message_content,
                ..RouterConfig::default()
            })
            .anthropic_version(config.anthropic_version)
            .provider_rates(config.provider_rates)
            .caller_rate(config.caller_rate)
            .recorder(Arc::new(stores.tracker.clone()))
            .observer(prom.clone());
        if let Some(path) = &config.models_file {
            builder = builder.models_file(path);
        }
        // With REDIS_URL, every limit and budget lives in Redis, shared by the replicas using it.
        builder = match &config.redis {
            Some(redis) => {
                let shared = RedisLimits::connect(redis)?;
                let when_down = match redis.limits_when_down {
                    WhenDown::Open => LimitsWhenDown::Open,
                    WhenDown::Closed => LimitsWhenDown::Closed,
                };
                let spend = shared.spend();
                builder
                    // One script takes the caller's request, the budget check and the first
                    // call's reservations: one round trip before the first token.
                    .admission_in_one_step(Arc::new(shared.clone()))
                    .shared_limits(Arc::new(shared), when_down)
                    .budgets(Budgets::new(
                        config.budgets.clone(),
                        Arc::new(spend),
                        redis.budgets_when_down,
                    ))
            }
            // Without it, the counters live here; callers' own limits set through the admin
            // API are kept in the metrics store, so a restart keeps them.
            None => {
                let kept = config
                    .store
                    .open_caller_budgets()
                    .await
                    .map_err(MetricsError::Store)?;
                let callers = match kept.load().await {
                    Ok(callers) => callers,
                    Err(error) => {
                        tracing::error!(%error, "could not read the callers' own limits set through the admin API: until the store answers, only the configured limits apply (limits set from now on are kept)");
                        BTreeMap::new()
                    }
                };
                builder.budgets(Budgets::new(
                    config.budgets.clone(),
                    Arc::new(InProcessSpend::persisted(Arc::new(kept), callers)),
                    OnUnavailable::FailClosed,
                ))
            }
        };
        builder = match &config.providers {
            ProviderSetup::Simulated { seed, profile } => {
                let sim_config = match profile {
                    SimProfile::Fast => SimConfig::fast(*seed),
                    SimProfile::Realistic => SimConfig::realistic(*seed),
                };
                let sim = keyvex_sim::start(SocketAddr::from(([127, 0, 0, 1], 0)), sim_config)
                    .await
                    .map_err(AppError::Simulator)?;
                builder.simulator(sim)
            }
            ProviderSetup::Real { openai, anthropic } => {
                if let Some(u) = openai {
                    builder = builder.openai_at(&u.base_url, u.key.expose());
                }
                if let Some(u) = anthropic {
                    builder = builder.anthropic_at(&u.base_url, u.key.expose());
                }
                builder
            }
        };
        let engine = builder.build()?;
        // Calls a stopped process left in flight are recorded `interrupted` by this one; where
        // their dollar reservations outlived that process (Redis), they settle to what those
        // records bill instead of holding the budget until its window ends.
        if let Some(budgets) = engine.budgets() {
            let budgets = Arc::clone(budgets);
            stores
                .tracker
                .settle_interrupted_spend_with(Arc::new(move |held, cost| {
                    budgets.settle_interrupted(held, cost);
                }));
        }
        if config.redis.is_none()
            && let Some(budgets) = engine.budgets()
        {
            // Boxed: its reads' futures would otherwise sit inside every caller's start-up
            // future (the load test's `main` passed the compiler's layout depth limit).
            Box::pin(restore_spend(&stores, budgets)).await;
        }
        let catalog = CatalogSync::new(
            stores.catalogs.clone(),
            engine.clone(),
            stores.tracker.clone(),
            config.catalog_poll,
        );
        // Start on the active version, not on version 0 until the first poll.
        match catalog.refresh().await {
            Ok(Applied::Switched { to, .. }) => {
                tracing::info!(
                    version = to,
                    "model catalog version from the store in force"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(
                %error,
                "could not read the active model catalog version; starting on the built-in catalog (version 0) and retrying every poll interval"
            ),
        }
        let queue = match &config.queue {
            Some(q) => {
                let jobs = config
                    .store
                    .open_jobs()
                    .await
                    .map_err(MetricsError::Store)?;
                Some(JobsCtx::connect(q, jobs).await)
            }
            None => None,
        };
        Ok(App {
            config,
            engine,
            stores,
            prom,
            queue,
            catalog,
        })
    }

    /// What a server is built from: the engine, the tracker, the counters and the reads, plus
    /// the queue and, when asked, an in-process worker.
    pub fn server_parts(&self, with_worker: bool) -> Result<ServerParts, AppError> {
        let mut backends = Backends::of(&self.stores);
        backends.jobs = self.queue.clone();
        backends.catalog = Some(self.catalog.clone());
        if with_worker {
            let Some(queue) = &self.config.queue else {
                return Err(AppError::NoQueue);
            };
            backends.worker = Some(WorkerConfig {
                concurrency: queue.concurrency,
                dlq_url: queue.dlq_url.clone(),
                ..WorkerConfig::default()
            });
        }
        Ok(ServerParts {
            engine: self.engine.clone(),
            tracker: self.stores.tracker.clone(),
            prom: Arc::clone(&self.prom),
            backends,
        })
    }

    /// One line per part, for start-up banners (stderr).
    pub fn banner(&self) -> Vec<String> {
        let providers = match &self.config.providers {
            ProviderSetup::Simulated { profile, .. } => format!(
                "{} (no OPENAI_API_KEY or ANTHROPIC_API_KEY set, or KEYVEX_SIMULATE=always; {} timing, KEYVEX_SIM_PROFILE)",
                self.engine.providers_description(),
                match profile {
                    SimProfile::Fast => "fast",
                    SimProfile::Realistic => "realistic",
                }
            ),
            ProviderSetup::Real { .. } => self.engine.providers_description().to_owned(),
        };
        let rates = self.config.provider_rates;
        let catalog = self.engine.catalog();
        vec![
            format!("providers {providers}"),
            format!("metrics store {}", self.stores.description),
            format!(
                "model catalog version {} ({}; checked every {} ms, KEYVEX_CATALOG_POLL_MS)",
                catalog.version(),
                catalog.label(),
                self.config.catalog_poll.as_millis()
            ),
            format!(
                "limits {}: {} requests and {} tokens per minute per provider, {} requests per hour per API key and endpoint",
                self.engine.limits_description(),
                rates.requests_per_minute,
                rates.tokens_per_minute,
                self.config.caller_rate.per_period
            ),
            format!("budgets {}", self.budget_line()),
        ]
    }

    fn budget_line(&self) -> String {
        let b = &self.config.budgets;
        let show = |c: Option<keyvex_engine::Cost>| {
            c.map_or_else(|| "unlimited".to_owned(), |c| c.to_string())
        };
        let kept = self
            .engine
            .budgets()
            .map_or_else(|| "not counted".to_owned(), |b| b.store().describe());
        format!(
            "{} per API key per day, {} per month, {} per run, {} per day for everyone; counted {kept}",
            show(b.caller_daily),
            show(b.caller_monthly),
            show(b.run),
            show(b.global_daily),
        )
    }

    /// Flushes the metrics (within `flush`) and stops the simulator. Call once every stream ended.
    pub async fn shutdown(&self, flush: std::time::Duration) -> ShutdownReport {
        self.engine.shutdown(flush).await
    }
}

/// Budgets kept in this process start from nothing with each process, but the callers' day and
/// month do not: what earlier runs billed since this UTC day and this month began is read back
/// from the metrics store's records, so a restart does not hand every caller a fresh budget.
/// A read that fails or takes over 10 s is logged, and budgets then count from zero.
async fn restore_spend(stores: &Stores, budgets: &Budgets) {
    // An earlier run's unshipped records are shipped at open; let them reach the store first.
    let _ = stores
        .tracker
        .wait_for(Duration::from_secs(2), |h| h.pending == 0)
        .await;
    let now = SystemTime::now();
    let ms = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    };
    let filter = MetricsFilter::default();
    let read = |from: SystemTime| {
        stores
            .metrics
            .metrics(ms(from), ms(now), Some(GroupBy::User), &filter)
    };
    let both = async {
        futures::try_join!(
            read(window_start(now, Window::Month)),
            read(window_start(now, Window::Day))
        )
    };
    let (month, day) = match tokio::time::timeout(Duration::from_secs(10), both).await {
        Ok(Ok(read)) => read,
        Ok(Err(error)) => {
            tracing::error!(%error, "could not read this month's spend from the metrics store: budgets in this process count from zero");
            return;
        }
        Err(_) => {
            tracing::error!(
                "reading this month's spend from the metrics store took over 10 s: budgets in this process count from zero"
            );
            return;
        }
    };
    let mut callers: BTreeMap<String, RestoredSpend> = BTreeMap::new();
    for group in month.groups {
        callers.entry(group.key).or_default().month = Cost(group.cost_pico_usd);
    }
    for group in day.groups {
        callers.entry(group.key).or_default().day = Cost(group.cost_pico_usd);
    }
    budgets.restore(&callers, Cost(day.totals.cost_pico_usd));
    if !callers.is_empty() {
        tracing::info!(
            callers = callers.len(),
            month_usd = month.totals.cost_usd,
            "budgets in this process go on from what the metrics store holds for this month"
        );
    }
}
