//! The HTTP API: state, routes, middleware, and the server's life from bind to graceful
//! shutdown.
//!
//! Handlers are thin: they parse, authorise, and turn the engine's streams (`Engine::agent`,
//! `Engine::pipeline`, `Engine::chat`) into SSE or JSON. Handlers never spawn tasks; a
//! streaming response is a stream polled by the connection, so a client disconnect drops it and
//! cancels the upstream call (which the engine records as cancelled). The queue's front door and
//! worker live here too (`queue`). See `docs/API.md` for the wire contract.

pub mod auth;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod prom;
pub mod queue;
mod routes;
pub mod sse;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use futures::stream::BoxStream;
use keyvex_engine::Engine;
use keyvex_engine::record::{Receipt, ShutdownReport};
use keyvex_store::admin::MetricsReader;
use keyvex_store::sessions::SessionStore;
use keyvex_store::{Stores, Tracker};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::auth::{ApiKeys, Caller};
use crate::config::ServerConfig;
use crate::error::{ApiError, BodyLimit};
use crate::prom::ServerMetrics;
use crate::queue::worker::{Worker, WorkerConfig, WorkerCounts};
use crate::queue::{JobsCtx, QueueError};
use crate::sse::{Event, GuardConfig, Guarded};

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
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
    #[error("the AI-processing queue: {0}")]
    Queue(#[from] QueueError),
    #[error(
        "--with-worker needs the queue; set SQS_AI_PROCESSING_QUEUE_URL (printed by `keyvex queue create`)"
    )]
    WorkerWithoutQueue,
}

/// What the server reads and queues besides the engine. Each part is optional: a route whose
/// part is missing answers 503 naming what to configure, so a server built for one purpose (a
/// test, a bench) needs only what it uses.
#[derive(Clone, Default)]
pub struct Backends {
    /// `/v1/admin/metrics` and `/v1/admin/alerts`.
    pub metrics: Option<MetricsReader>,
    /// `/v1/sessions*`, and the owner check of requests that name a session.
    pub sessions: Option<SessionStore>,
    /// `/v1/jobs*`.
    pub jobs: Option<JobsCtx>,
    /// Run a queue worker inside the server (`serve --with-worker`); needs `jobs`.
    pub worker: Option<WorkerConfig>,
}

impl Backends {
    /// The metrics and session reads of `stores`; no queue.
    pub fn of(stores: &Stores) -> Backends {
        Backends {
            metrics: Some(stores.metrics.clone()),
            sessions: Some(stores.sessions.clone()),
            jobs: None,
            worker: None,
        }
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    tracker: Tracker,
    keys: ApiKeys,
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
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
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

    /// An SSE response over `events`, guarded for shutdown and counted while open.
    pub fn sse(&self, events: BoxStream<'static, Event>, shutdown_event: Event) -> Response {
        Guarded::new(
            events,
            GuardConfig {
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

/// Waits until what `receipt` covers is durable. A failure is logged: the caller is still told
/// (the data exists in the stream) and `/readyz` reports the ledger.
pub async fn await_durable(what: &str, id: &str, receipt: Receipt) {
    if let Err(error) = receipt.durable().await {
        tracing::error!(what, id, %error, "not confirmed durable");
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
        .merge(dashboard::routes())
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
    match state.inner.engine.check_caller(&caller.id, &endpoint) {
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

/// A bound server, ready to run.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: AppState,
    /// The in-process queue worker (`serve --with-worker`), started by [`Server::run`].
    worker: Option<Worker>,
}

/// What a server is built from besides its settings.
pub struct ServerParts {
    /// Every model call of the routes and the in-process worker goes through it.
    pub engine: Engine,
    /// The engine's recorder, read for `/readyz`, `/metrics` and the admin dead letters.
    pub tracker: Tracker,
    /// Counters `/metrics` renders; the engine must have been built with it as an observer.
    pub prom: Arc<ServerMetrics>,
    pub backends: Backends,
}

impl Server {
    /// Checks the settings, builds the state and binds the listener.
    pub async fn bind(config: ServerConfig, parts: ServerParts) -> Result<Server, ServerError> {
        if config.api_keys.is_empty() {
            return Err(ServerError::NoApiKeys);
        }
        let ServerParts {
            engine,
            tracker,
            prom,
            backends,
        } = parts;
        let worker = match (&backends.jobs, &backends.worker) {
            (Some(ctx), Some(cfg)) => Some(Worker::new(ctx.clone(), engine.clone(), cfg.clone())),
            (None, Some(_)) => return Err(ServerError::WorkerWithoutQueue),
            _ => None,
        };
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.addr,
                source,
            })?;
        let state = AppState {
            inner: Arc::new(Inner {
                engine,
                tracker,
                keys: ApiKeys::new(&config.api_keys),
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
            worker,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn engine(&self) -> &Engine {
        self.state.engine()
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
    /// 5. shut the engine down: flush metrics within `metrics_flush_timeout`, then stop the
    ///    in-process simulator, if any (the worker's jobs used it until step 4).
    pub async fn run(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<ShutdownReport, ServerError> {
        let Server {
            listener,
            state,
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
        let report = state.inner.engine.shutdown(flush).await;
        tracing::info!(?report, "metrics flushed");
        served.map_err(ServerError::Serve)?;
        Ok(report)
    }
}

use axum::serve::ListenerExt as _;
