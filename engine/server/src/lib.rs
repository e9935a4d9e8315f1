//! The HTTP API: state, routes, middleware, and the server's life from bind to graceful
//! shutdown.
//!
//! Handlers are thin: they parse, authorise, and turn the engine's streams (`Engine::agent`,
//! `Engine::pipeline`, `Engine::chat`) into SSE or JSON. Handlers never spawn tasks; a
//! streaming response is a stream polled by the connection, so a client disconnect drops it and
//! cancels the upstream call (which the engine records as cancelled). The queue's front door and
//! worker live here too (`queue`). See `docs/API.md` for the wire contract.

pub mod auth;
pub mod catalog_sync;
pub mod config;
pub mod dashboard;
pub mod error;
mod layers;
mod open_streams;
pub mod prom;
pub mod queue;
mod routes;
pub mod sse;
mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request};
use axum::middleware;
use axum::serve::ListenerExt as _;
use keyvex_engine::Engine;
use keyvex_engine::record::ShutdownReport;
use keyvex_store::Tracker;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::config::ServerConfig;
use crate::error::{ApiError, BodyLimit};
use crate::prom::ServerMetrics;
use crate::queue::QueueError;
use crate::queue::worker::{Worker, WorkerCounts};
pub use crate::state::{AppState, Backends, await_durable, request_id};
use crate::state::{MakeV7, REQUEST_ID};

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
        .merge(routes::admin_models::admin_routes())
        .merge(routes::budgets::admin_routes())
}

/// Builds the axum app: public health routes, authenticated API routes with per-caller limits,
/// admin routes, and the edge middleware (request id, tracing, body limit).
pub fn app(state: AppState) -> axum::Router {
    let limit = state.config().max_body_bytes;
    let admin = admin_routes().route_layer(middleware::from_fn(layers::require_admin));
    let api = api_routes()
        .merge(admin)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            layers::authenticate_and_limit,
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
            layers::count_requests,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::Extension(BodyLimit(limit)))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(record_response),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeV7))
        .layer(middleware::map_request(state::cap_request_id))
        .with_state(state)
}

/// The span of one HTTP request: the server span of its trace, a child of the caller's when it
/// sent a W3C `traceparent`. It names the caller once authenticated (the key's id, never the
/// key) and the status once answered; it ends when the body does, so an SSE stream's whole
/// life is inside it.
fn request_span(req: &Request) -> tracing::Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(req.uri().path(), MatchedPath::as_str);
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{} {route}", req.method()),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        request_id = %request_id(req.headers()),
        method = %req.method(),
        route,
        caller = tracing::field::Empty,
        http.request.method = %req.method(),
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        keyvex.caller = tracing::field::Empty,
    );
    let traceparent = req
        .headers()
        .get(keyvex_engine::trace_context::TRACEPARENT)
        .and_then(|v| v.to_str().ok());
    keyvex_engine::trace_context::adopt_traceparent(&span, traceparent);
    span
}

/// Records the status on the request span (a 5xx marks it failed), then logs as before.
fn record_response(
    res: &axum::response::Response,
    latency: std::time::Duration,
    span: &tracing::Span,
) {
    let status = res.status();
    // Signed: `tracing-opentelemetry` would export an unsigned field as a string.
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    tower_http::trace::OnResponse::on_response(
        tower_http::trace::DefaultOnResponse::default(),
        res,
        latency,
        span,
    );
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
        let state = AppState::new(engine, tracker, prom, config, backends);
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
    ///
    /// While it serves, the catalog poller (when the backends have one) keeps the engine on the
    /// store's active catalog version; it stops with step 1.
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
        if let Some(sync) = state.backends().catalog.clone() {
            tasks.spawn(sync.run(stop_accepting.child_token()));
        }
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
                state.begin_drain();
                stop_accepting.cancel();
                let streams = state.streams();
                streams.close();
                let drain = state.config().drain_timeout;
                if tokio::time::timeout(drain, streams.wait()).await.is_err() {
                    tracing::warn!(
                        open = streams.len(),
                        "drain deadline passed; ending open streams"
                    );
                    state.end_open_streams();
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
        let flush = state.config().metrics_flush_timeout;
        let report = state.engine().shutdown(flush).await;
        tracing::info!(?report, "metrics flushed");
        served.map_err(ServerError::Serve)?;
        Ok(report)
    }
}
