//! The server's state, shared by every handler: the engine, the tracker, the keys and the
//! counters, the optional backends, and what shutdown needs (draining flag, open streams).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;
use futures::stream::BoxStream;
use keyvex_engine::Engine;
use keyvex_engine::record::Receipt;
use keyvex_store::admin::MetricsReader;
use keyvex_store::sessions::SessionStore;
use keyvex_store::{Stores, Tracker};
use tokio_util::task::TaskTracker;
use tower_http::request_id::{MakeRequestId, RequestId};

use crate::auth::ApiKeys;
use crate::catalog_sync::CatalogSync;
use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::open_streams::OpenStreams;
use crate::prom::ServerMetrics;
use crate::queue::JobsCtx;
use crate::queue::worker::WorkerConfig;
use crate::sse::{Event, GuardConfig, Guarded};

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
    /// `/v1/admin/models*`, and the poller that keeps the engine on the store's active catalog
    /// version (it must follow the engine the server is given).
    pub catalog: Option<CatalogSync>,
}

impl Backends {
    /// The metrics and session reads of `stores`; no queue.
    pub fn of(stores: &Stores) -> Backends {
        Backends {
            metrics: Some(stores.metrics.clone()),
            sessions: Some(stores.sessions.clone()),
            jobs: None,
            worker: None,
            catalog: None,
        }
    }
}

pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    engine: Engine,
    tracker: Tracker,
    keys: ApiKeys,
    prom: Arc<ServerMetrics>,
    config: ServerConfig,
    draining: AtomicBool,
    /// Open streams, so shutdown can wait for them.
    streams: TaskTracker,
    /// The open streams' registry: at the drain deadline they end with a `shutdown` error;
    /// silent ones send keep-alives.
    open_streams: OpenStreams,
    backends: Backends,
}

impl AppState {
    pub(crate) fn new(
        engine: Engine,
        tracker: Tracker,
        prom: Arc<ServerMetrics>,
        config: ServerConfig,
        backends: Backends,
    ) -> AppState {
        let open_streams = OpenStreams::new(config.keep_alive);
        AppState {
            inner: Arc::new(Inner {
                engine,
                tracker,
                keys: ApiKeys::new(&config.api_keys),
                prom,
                config,
                draining: AtomicBool::new(false),
                streams: TaskTracker::new(),
                open_streams,
                backends,
            }),
        }
    }

    /// Shutdown's first step: `/readyz` turns 503 and new work is refused.
    pub(crate) fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    /// The open streams, so shutdown can wait for them.
    pub(crate) fn streams(&self) -> &TaskTracker {
        &self.inner.streams
    }

    /// Ends the streams still open with their `shutdown` event.
    pub(crate) fn end_open_streams(&self) {
        self.inner.open_streams.end_all();
    }

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
                open: self.inner.open_streams.register(),
                shutdown_event,
                prom: Arc::clone(&self.inner.prom),
                in_flight: self.inner.streams.token(),
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
pub(crate) struct MakeV7;

impl MakeRequestId for MakeV7 {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&uuid::Uuid::now_v7().to_string())
            .ok()
            .map(RequestId::new)
    }
}

/// Longest `x-request-id` kept from a client: room for any UUID, ULID or trace id, far below
/// what a store key or a log line should carry.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Middleware (outermost): a client's `x-request-id` is only a correlation field, echoed back.
/// One longer than [`MAX_REQUEST_ID_LEN`] is cut to it; one that is not visible ASCII is
/// dropped, so the server draws its own. Every later reader then sees one stable value.
pub(crate) async fn cap_request_id(mut req: axum::extract::Request) -> axum::extract::Request {
    let headers = req.headers_mut();
    let Some(value) = headers.get(REQUEST_ID) else {
        return req;
    };
    let visible = value
        .to_str()
        .ok()
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()));
    match visible {
        Some(v) if v.len() <= MAX_REQUEST_ID_LEN => {}
        Some(v) => {
            if let Ok(cut) = HeaderValue::from_str(&v[..MAX_REQUEST_ID_LEN]) {
                headers.insert(REQUEST_ID, cut);
            }
        }
        None => {
            headers.remove(REQUEST_ID);
        }
    }
    req
}

/// The request id header tower-http set (or the client sent).
pub fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned)
}
