//! The HTTP API: state, routes, middleware, and the server's life from bind to graceful
//! shutdown.
//!
//! Handlers are thin: they parse, authorise, and turn engine streams (`run_agent`,
//! `run_pipeline`, `Router::stream_*`) into SSE or JSON. Handlers never spawn tasks; a
//! streaming response is a stream polled by the connection, so a client disconnect drops it and
//! cancels the upstream call. See `docs/API.md` for the wire contract.

pub mod auth;
pub mod error;
pub mod prom;
mod routes;
pub mod sse;

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use futures::stream::BoxStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::config::{EngineConfig, Env, ServerConfig};
use crate::limits::{CallerLimits, LimitedProvider, ProviderRates, Rate};
use crate::metrics::admin::MetricsReader;
use crate::metrics::{
    MetricsConfig, MetricsError, Receipt, RequestRecord, ShutdownReport, Tracker,
};
use crate::queue::worker::{Worker, WorkerConfig, WorkerCounts};
use crate::queue::{JobsCtx, QueueError};
use crate::router::{Router, RouterConfig};
use crate::runtime::{Runtime, RuntimeError};
use crate::server::auth::{ApiKeys, Caller};
use crate::server::error::{ApiError, BodyLimit};
use crate::server::prom::ServerMetrics;
use crate::server::sse::{CallScope, CancelObserver, Event, GuardConfig, Guarded};
use crate::store::StoreError;
use crate::store::sessions::{SessionMessage, SessionStore};

pub use auth::Caller as AuthenticatedCaller;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("could not listen on {addr}: {source}; pick a free port with --addr or KEYVEX_ADDR")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error(
        "no API key is configured; set KEYVEX_API_KEYS (KEY=CALLER:ROLE) or server.api_keys in the config file"
    )]
    NoApiKeys,
    #[error("could not open the metrics store for the admin and session routes: {0}")]
    Store(#[from] StoreError),
    #[error("metrics settings: {0}")]
    Metrics(#[from] MetricsError),
    #[error("the AI-processing queue: {0}")]
    Queue(#[from] QueueError),
    #[error(
        "--with-worker needs the queue; set SQS_AI_PROCESSING_QUEUE_URL (printed by `keyvex queue create`)"
    )]
    WorkerWithoutQueue,
}

/// What the server reads and queues besides the metrics tracker. Each part is optional: a
/// route whose part is missing answers 503 naming what to configure, so a server built for one
/// purpose (a test, a bench) needs only what it uses.
#[derive(Clone, Default)]
pub struct Backends {
    /// `/v1/admin/metrics` and `/v1/admin/alerts`.
    pub metrics: Option<MetricsReader>,
    /// `/v1/sessions*`.
    pub sessions: Option<SessionStore>,
    /// `/v1/jobs*`.
    pub jobs: Option<JobsCtx>,
    /// Run a queue worker inside the server (`serve --with-worker`); needs `jobs`.
    pub worker: Option<WorkerConfig>,
}

impl Backends {
    /// The read side of the store the tracker ships to (the same choice as
    /// [`crate::metrics::start_from_env`]: DynamoDB when `DYNAMODB_TABLE_NAME` is set, else the
    /// SQLite file `KEYVEX_METRICS_DB`), reading through `tracker` for what is not shipped yet;
    /// the queue when `SQS_AI_PROCESSING_QUEUE_URL` is set; and a worker when `with_worker`.
    pub async fn from_env(
        env: &dyn Env,
        tracker: &Tracker,
        with_worker: bool,
    ) -> Result<Backends, ServerError> {
        let metrics_cfg = MetricsConfig::from_env(env)?;
        let (reader, sessions) = match env.var("DYNAMODB_TABLE_NAME") {
            Some(table) => {
                let client =
                    crate::store::dynamo::client(env.var("DYNAMODB_ENDPOINT").as_deref()).await;
                let store = crate::store::dynamo::DynamoStore::new(client, &table);
                (
                    MetricsReader::dynamo(store.clone()),
                    SessionStore::dynamo(store),
                )
            }
            None => {
                let path = metrics_cfg.ledger_path.clone();
                let store = tokio::task::spawn_blocking(move || {
                    crate::store::sqlite::SqliteStore::open(&path)
                })
                .await
                .map_err(|e| StoreError::Task(e.to_string()))??;
                (
                    MetricsReader::sqlite(store.clone()),
                    SessionStore::sqlite(store),
                )
            }
        };
        let jobs = match env.var("SQS_AI_PROCESSING_QUEUE_URL") {
            Some(_) => Some(JobsCtx::from_env(env).await?),
            None => None,
        };
        let worker = match (&jobs, with_worker) {
            (_, false) => None,
            (None, true) => return Err(ServerError::WorkerWithoutQueue),
            (Some((_, queue)), true) => Some(WorkerConfig {
                concurrency: queue.concurrency,
                dlq_url: queue.dlq_url.clone(),
                ..WorkerConfig::default()
            }),
        };
        Ok(Backends {
            metrics: Some(
                reader
                    .with_health(tracker.clone())
                    .with_alert_config(&metrics_cfg.alerts),
            ),
            sessions: Some(sessions.with_pending(Arc::new(tracker.clone()))),
            jobs: jobs.map(|(ctx, _)| ctx),
            worker,
        })
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    router: Router,
    tracker: Tracker,
    keys: ApiKeys,
    limits: CallerLimits,
    prom: Arc<ServerMetrics>,
    config: ServerConfig,
    draining: AtomicBool,
    /// Open streams, so shutdown can wait for them.
    streams: TaskTracker,
    /// Cancelled when the drain deadline passes: open streams end with a `shutdown` error.
    force_end: CancellationToken,
    backends: Backends,
}

impl AppState {
    pub fn router(&self) -> &Router {
        &self.inner.router
    }

    pub fn tracker(&self) -> &Tracker {
        &self.inner.tracker
    }

    pub fn keys(&self) -> &ApiKeys {
        &self.inner.keys
    }

    pub fn prom(&self) -> &ServerMetrics {
        &self.inner.prom
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    pub fn backends(&self) -> &Backends {
        &self.inner.backends
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Refuses new work once shutdown started.
    pub fn ensure_accepting(&self) -> Result<(), ApiError> {
        if self.is_draining() {
            return Err(ApiError::ShuttingDown);
        }
        Ok(())
    }

    /// Records one model call: the metrics ledger and the Prometheus counters.
    pub fn record_call(&self, rec: RequestRecord) -> Receipt {
        self.inner.prom.call(&rec);
        self.inner.tracker.record(rec)
    }

    /// Records a call and waits until it is durable, so what the caller is told next survives a
    /// crash. A ledger failure is logged; the caller is still told (the data exists in the
    /// stream) and `/readyz` turns unready.
    pub async fn record_durably(&self, rec: RequestRecord) {
        self.record_committing(rec).await;
    }

    /// Records a call now and returns what resolves once it is durable (failures logged as in
    /// [`AppState::record_durably`]), for callers that must not wait for the commit themselves.
    pub fn record_committing(
        &self,
        rec: RequestRecord,
    ) -> impl Future<Output = ()> + Send + 'static {
        let id = rec.request_id.clone();
        let receipt = self.record_call(rec);
        async move {
            if let Err(error) = receipt.durable().await {
                tracing::error!(request_id = %id, %error, "metrics record not confirmed durable");
            }
        }
    }

    /// Hands a session message to the ledger; await the receipt (see
    /// [`AppState::await_durable`]) before telling the caller the exchange is done.
    pub fn record_message(&self, msg: SessionMessage) -> (String, Receipt) {
        let id = msg.message_id.clone();
        (id, self.inner.tracker.record_session_message(msg))
    }

    /// Waits for session-message receipts. A failure is logged like a metrics record's: the
    /// caller still gets the answer and `/readyz` reports the ledger.
    pub async fn await_durable(&self, receipts: Vec<(String, Receipt)>) {
        for (id, receipt) in receipts {
            if let Err(error) = receipt.durable().await {
                tracing::error!(message_id = %id, %error, "session message not confirmed durable");
            }
        }
    }

    /// An SSE response over `events`, guarded for shutdown and cancellation accounting.
    pub fn sse(
        &self,
        events: BoxStream<'static, Event>,
        scope: Arc<CallScope>,
        shutdown_event: Event,
    ) -> Response {
        Guarded::new(
            events,
            GuardConfig {
                scope,
                force: self.inner.force_end.clone().cancelled_owned(),
                shutdown_event,
                prom: Arc::clone(&self.inner.prom),
                in_flight: self.inner.streams.token(),
                keep_alive: self.inner.config.keep_alive,
            },
        )
        .into_response()
    }
}

/// Request ids are UUID v7, like metrics records, so they sort by time.
#[derive(Clone, Copy, Default)]
struct MakeV7;

impl MakeRequestId for MakeV7 {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&uuid::Uuid::now_v7().to_string())
            .ok()
            .map(RequestId::new)
    }
}

/// The request id header tower-http set (or the client sent).
pub fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned)
}

/// The authenticated API: one line per route module.
fn api_routes() -> axum::Router<AppState> {
    axum::Router::new()
        .merge(routes::agents::routes())
        .merge(routes::pipeline::routes())
        .merge(routes::chat::routes())
        .merge(routes::sessions::routes())
        .merge(routes::jobs::routes())
}

/// Admin routes (`/v1/admin/*`): one line per route module.
fn admin_routes() -> axum::Router<AppState> {
    axum::Router::new()
        .merge(routes::health::admin_routes())
        .merge(routes::admin::admin_routes())
}

/// Builds the axum app: public health routes, authenticated API routes with per-caller limits,
/// admin routes, and the edge middleware (request id, tracing, body limit).
pub fn app(state: AppState) -> axum::Router {
    let limit = state.config().max_body_bytes;
    let admin = admin_routes().route_layer(middleware::from_fn(auth::require_admin));
    let api = api_routes()
        .merge(admin)
        .route_layer(middleware::from_fn_with_state(state.clone(), rate_limit))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    axum::Router::new()
        .merge(routes::health::routes())
        // The dashboard page is public: it holds no data and calls the admin API with the key
        // the user types.
        .merge(crate::dashboard::routes())
        .merge(api)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::Extension(BodyLimit(limit)))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let route = req
                .extensions()
                .get::<MatchedPath>()
                .map_or(req.uri().path(), MatchedPath::as_str);
            tracing::info_span!(
                "request",
                request_id = %request_id(req.headers()),
                method = %req.method(),
                route,
                caller = tracing::field::Empty,
            )
        }))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeV7))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound {
        code: "unknown_route",
        param: None,
        message: format!(
            "no route {} {}; see docs/API.md for the routes",
            req.method(),
            req.uri().path()
        ),
    }
}

/// Counts answered requests by route and status.
async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let response = next.run(req).await;
    state
        .prom()
        .http_request(&route, response.status().as_u16());
    response
}

/// Per caller and endpoint (the matched route), with `x-ratelimit-*` on every answer.
async fn rate_limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path().to_owned(), |m| m.as_str().to_owned());
    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
        return ApiError::Internal("rate limit ran before authentication".into()).into_response();
    };
    match state.inner.limits.check(&caller.id, &endpoint) {
        Ok(allowance) => {
            let mut response = next.run(req).await;
            let h = response.headers_mut();
            h.insert("x-ratelimit-limit", HeaderValue::from(allowance.limit));
            h.insert(
                "x-ratelimit-remaining",
                HeaderValue::from(allowance.remaining),
            );
            h.insert(
                "x-ratelimit-reset",
                HeaderValue::from(error::ceil_secs(allowance.reset)),
            );
            response
        }
        Err(limited) => {
            state.prom().rate_limited(&endpoint);
            ApiError::RateLimited(limited).into_response()
        }
    }
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

/// A bound server, ready to run.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: AppState,
    runtime: Runtime,
    /// The in-process queue worker (`serve --with-worker`), started by [`Server::run`].
    worker: Option<Worker>,
}

impl Server {
    /// [`Server::bind_with`] without stores or queue: the admin metrics, session and job routes
    /// answer 503 saying what to configure.
    pub async fn bind(
        config: ServerConfig,
        engine: &EngineConfig,
        tracker: Tracker,
    ) -> Result<Server, ServerError> {
        Self::bind_with(config, engine, tracker, Backends::default()).await
    }

    /// Assembles the engine for serving: the router's cancellation observer records into
    /// `tracker`, every provider sits behind its rate budget, the worker (if asked for) shares
    /// the router and tracker, and the listener is bound.
    pub async fn bind_with(
        config: ServerConfig,
        engine: &EngineConfig,
        tracker: Tracker,
        backends: Backends,
    ) -> Result<Server, ServerError> {
        if config.api_keys.is_empty() {
            return Err(ServerError::NoApiKeys);
        }
        if backends.worker.is_some() && backends.jobs.is_none() {
            return Err(ServerError::WorkerWithoutQueue);
        }
        let prom = Arc::new(ServerMetrics::new());
        let router_config = RouterConfig {
            observer: Some(Arc::new(CancelObserver::new(
                tracker.clone(),
                Arc::clone(&prom),
            ))),
            ..RouterConfig::default()
        };
        let rates = ProviderRates {
            requests_per_minute: nz(config.provider_requests_per_minute),
            tokens_per_minute: nz(config.provider_tokens_per_minute),
        };
        let runtime = Runtime::start_with(engine, router_config, &move |_, provider| {
            LimitedProvider::wrap(provider, rates)
        })
        .await?;
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.addr,
                source,
            })?;
        let limits = CallerLimits::new(Rate {
            per_period: nz(config.requests_per_hour),
            period: Duration::from_secs(3600),
            burst: nz(config.burst),
        });
        let worker = match (&backends.jobs, &backends.worker) {
            (Some(ctx), Some(cfg)) => Some(Worker::new(
                ctx.clone(),
                runtime.router.clone(),
                tracker.clone(),
                cfg.clone(),
            )),
            _ => None,
        };
        let state = AppState {
            inner: Arc::new(Inner {
                router: runtime.router.clone(),
                tracker,
                keys: ApiKeys::new(&config.api_keys),
                limits,
                prom,
                config,
                draining: AtomicBool::new(false),
                streams: TaskTracker::new(),
                force_end: CancellationToken::new(),
                backends,
            }),
        };
        Ok(Server {
            listener,
            state,
            runtime,
            worker,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The in-process worker's counts, updated after every message; `None` without a worker.
    pub fn worker_progress(&self) -> Option<tokio::sync::watch::Receiver<WorkerCounts>> {
        self.worker.as_ref().map(Worker::progress)
    }

    /// Serves until `signal` resolves, then shuts down in this order:
    /// 1. mark draining (`/readyz` 503, new work refused), stop accepting connections, and
    ///    cancel the worker (it stops receiving; its jobs in flight run on for its
    ///    `shutdown_grace`, then are released to other workers);
    /// 2. let open streams finish, up to `drain_timeout`;
    /// 3. end the streams still open with an `error` event of kind `shutdown`;
    /// 4. wait for every connection to close and for the worker to stop (both record metrics,
    ///    so both end before the flush);
    /// 5. flush metrics (`Tracker::shutdown`) within `metrics_flush_timeout`;
    /// 6. stop the in-process simulator, if any (the worker's jobs used it until step 4).
    pub async fn run(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<ShutdownReport, ServerError> {
        let Server {
            listener,
            state,
            runtime,
            worker,
        } = self;
        let stop_accepting = CancellationToken::new();
        let tasks = TaskTracker::new();
        let worker_stop = stop_accepting.child_token();
        if let Some(worker) = worker {
            let handle = worker.spawn(&tasks, worker_stop);
            // Watched at once, so a worker that cannot start (an unreachable queue) is reported
            // when it happens, not at shutdown.
            tasks.spawn(async move {
                match handle.await {
                    Ok(Ok(counts)) => tracing::info!(?counts, "queue worker stopped"),
                    Ok(Err(error)) => tracing::error!(%error, "queue worker failed; POST /v1/jobs still enqueues, but nothing here runs the jobs"),
                    Err(error) => tracing::error!(%error, "queue worker task panicked"),
                }
            });
        }
        tasks.spawn({
            let state = state.clone();
            let stop_accepting = stop_accepting.clone();
            async move {
                signal.await;
                tracing::info!("shutdown requested: draining open streams");
                state.inner.draining.store(true, Ordering::Release);
                stop_accepting.cancel();
                let streams = &state.inner.streams;
                streams.close();
                let drain = state.inner.config.drain_timeout;
                if tokio::time::timeout(drain, streams.wait()).await.is_err() {
                    tracing::warn!(
                        open = streams.len(),
                        "drain deadline passed; ending open streams"
                    );
                    state.inner.force_end.cancel();
                }
            }
        });
        // Token streams are many small writes: without TCP_NODELAY Nagle holds them back.
        let listener = listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "could not set TCP_NODELAY");
            }
        });
        // Given a `Router`, `axum::serve` rebuilds its route table for every connection (a
        // `with_state` per accept: ~9 KiB of map and boxed routes per open connection here,
        // found with heaptrack). Converted once and served through `into_make_service`, each
        // connection gets an `Arc` clone and requests take the same path as before.
        let routes = app(state.clone()).with_state(());
        let served = axum::serve(listener, routes.into_make_service())
            .with_graceful_shutdown(stop_accepting.clone().cancelled_owned())
            .await;
        // The server can also stop without the signal (a listener error): stop the worker then.
        stop_accepting.cancel();
        tasks.close();
        tasks.wait().await;
        let flush = state.inner.config.metrics_flush_timeout;
        let report = state
            .inner
            .tracker
            .shutdown(tokio::time::Instant::now() + flush)
            .await;
        tracing::info!(?report, "metrics flushed");
        runtime.shutdown().await;
        served.map_err(ServerError::Serve)?;
        Ok(report)
    }
}

use axum::serve::ListenerExt as _;
