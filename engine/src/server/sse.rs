//! Server-sent event streams: the encoded event type, the body every streaming response goes
//! through (shutdown, in-flight accounting, keep-alive), and the context that lets a cancelled
//! call be recorded for the right caller.
//!
//! When a client disconnects, hyper drops the response body; dropping the engine stream inside
//! it drops the route, and the router reports the cancelled call to its [`RouteObserver`] from
//! that `Drop`. The observer has no request context of its own, so [`Guarded`] enters its
//! [`CallScope`] in a thread-local for exactly as long as it polls or drops the inner stream:
//! `Drop` is synchronous, so the observer runs on that thread inside that window.
//!
//! Why not axum's `Sse`: its `Event` grows a `BytesMut` piece by piece, and its body re-arms the
//! keep-alive timer after every event. Here an event is encoded once into one exactly-grown
//! buffer, and the keep-alive timer moves only when it fires. The wire format is the same:
//! `event: <name>\n` (if named), `data: <json>\n`, a blank line; keep-alives are `: keep-alive`.

use std::cell::RefCell;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use agents::Process;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::stream::BoxStream;
use futures::task::AtomicWaker;
use http_body::Frame;
use serde::Serialize;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::metrics::{CallContext, RequestRecord, Tracker};
use crate::router::{RouteObserver, RouteOutcome};
use crate::server::prom::ServerMetrics;

/// One server-sent event, already encoded for the wire.
#[derive(Debug, Clone)]
pub struct Event(Bytes);

impl Event {
    /// A data-only event with a fixed text (`[DONE]`); `text` must hold no line break.
    pub fn text(text: &'static str) -> Event {
        let mut buf = Vec::with_capacity(text.len() + 8);
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(text.as_bytes());
        buf.extend_from_slice(b"\n\n");
        Event(Bytes::from(buf))
    }

    /// The encoded bytes (for tests and benches).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// `event: <name>\n` (when named), `data: <json>\n\n`. Compact JSON never holds a raw line
/// break (serde escapes them inside strings), so the data always fits one `data:` line.
fn encode(
    name: Option<&str>,
    data: &impl Serialize,
    fallback: impl FnOnce(String) -> String,
) -> Event {
    let mut buf = Vec::with_capacity(256);
    if let Some(name) = name {
        buf.extend_from_slice(b"event: ");
        buf.extend_from_slice(name.as_bytes());
        buf.push(b'\n');
    }
    buf.extend_from_slice(b"data: ");
    let start = buf.len();
    if let Err(e) = serde_json::to_writer(&mut buf, data) {
        buf.truncate(start);
        buf.extend_from_slice(fallback(e.to_string()).as_bytes());
    }
    buf.extend_from_slice(b"\n\n");
    Event(Bytes::from(buf))
}

/// An SSE event with a name and a JSON body. Serialization of our own types cannot fail; if it
/// ever did, the event says so rather than panicking.
pub fn event(name: &str, data: &impl Serialize) -> Event {
    encode(Some(name), data, |e| {
        format!(r#"{{"kind":"internal","message":"event could not be encoded: {e}"}}"#)
    })
}

/// A data-only event (OpenAI chunks).
pub fn data(data: &impl Serialize) -> Event {
    encode(None, data, |e| {
        format!(
            r#"{{"error":{{"message":"chunk could not be encoded: {e}","type":"server_error"}}}}"#
        )
    })
}

/// Who a stream's model calls belong to.
#[derive(Debug)]
pub struct CallScope {
    state: Mutex<ScopeState>,
}

#[derive(Debug)]
struct ScopeState {
    user_id: String,
    session_id: Option<String>,
    /// The HTTP request id, given to the first recorded call.
    unused_request_id: Option<String>,
    run_id: Option<String>,
    /// `None` for direct model calls.
    process: Option<Process>,
    /// Pipelines: stages in flight with the models that may serve them.
    active: Vec<(Process, [String; 2])>,
}

impl CallScope {
    pub fn new(
        user_id: &str,
        request_id: &str,
        process: Option<Process>,
        session_id: Option<String>,
    ) -> Arc<CallScope> {
        Arc::new(CallScope {
            state: Mutex::new(ScopeState {
                user_id: user_id.to_owned(),
                session_id,
                unused_request_id: Some(request_id.to_owned()),
                run_id: None,
                process,
                active: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ScopeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_run(&self, run_id: &str) {
        self.lock().run_id = Some(run_id.to_owned());
    }

    /// A pipeline stage started (`models`: its primary and fallback).
    pub fn stage_started(&self, stage: Process, models: [String; 2]) {
        let mut s = self.lock();
        if !s.active.iter().any(|(p, _)| *p == stage) {
            s.active.push((stage, models));
        }
    }

    pub fn stage_finished(&self, stage: Process) {
        self.lock().active.retain(|(p, _)| *p != stage);
    }

    /// The context of a call of `stage` (pipelines) or of the scope's process.
    pub fn context(&self, stage: Option<Process>) -> CallContext {
        let mut s = self.lock();
        let process = stage.or(s.process);
        CallContext {
            request_id: s.unused_request_id.take(),
            user_id: s.user_id.clone(),
            process: process.map(|p| p.key().to_owned()),
            run_id: s.run_id.clone(),
            stage: if s.run_id.is_some() {
                stage.map(|p| p.key().to_owned())
            } else {
                None
            },
            session_id: s.session_id.clone(),
        }
    }

    /// The context of a cancelled call: in a pipeline, the in-flight stage its model serves.
    fn context_for(&self, outcome: &RouteOutcome) -> CallContext {
        let stage = {
            let s = self.lock();
            let model = outcome.model.as_deref().unwrap_or_default();
            s.active
                .iter()
                .find(|(_, models)| models.iter().any(|m| m == model))
                .or(s.active.first())
                .map(|(p, _)| *p)
        };
        self.context(stage)
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<CallScope>>> = const { RefCell::new(None) };
}

/// Restores the previous scope when dropped.
struct Entered(Option<Arc<CallScope>>);

fn enter(scope: &Arc<CallScope>) -> Entered {
    Entered(CURRENT.with(|c| c.replace(Some(Arc::clone(scope)))))
}

impl Drop for Entered {
    fn drop(&mut self) {
        let previous = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

/// Records cancelled calls (the caller went away) with their partial cost.
pub struct CancelObserver {
    tracker: Tracker,
    prom: Arc<ServerMetrics>,
}

impl CancelObserver {
    pub fn new(tracker: Tracker, prom: Arc<ServerMetrics>) -> CancelObserver {
        CancelObserver { tracker, prom }
    }
}

impl RouteObserver for CancelObserver {
    fn on_cancelled(&self, outcome: RouteOutcome) {
        if outcome.attempts.is_empty() {
            // Dropped before any call was made: nothing to bill, nothing to record.
            return;
        }
        let scope = CURRENT.with(|c| c.borrow().clone());
        let ctx = match scope {
            Some(scope) => scope.context_for(&outcome),
            None => CallContext {
                user_id: "unknown".to_owned(),
                ..CallContext::default()
            },
        };
        let rec = RequestRecord::from_route_outcome(&outcome, &ctx);
        tracing::info!(request_id = %rec.request_id, user = %rec.user_id, cost_micro_usd = rec.cost_micro_usd, "recording a call cancelled by its caller");
        self.prom.call(&rec);
        // Nobody is left to tell, so the receipt is not awaited; the ledger still commits it.
        drop(self.tracker.record(rec));
    }
}

/// The keep-alive comment, sent after `interval` without an event.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// Wakes the stream's task when the drain deadline passes, and says that it did: the
/// cancellation future is then polled only when it fired, instead of taking the token's
/// shared locks on every poll of every open stream.
#[derive(Default)]
struct ForceWake {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for ForceWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// What [`Guarded`] needs from the server besides the stream.
pub struct GuardConfig {
    pub scope: Arc<CallScope>,
    pub force: WaitForCancellationFutureOwned,
    pub shutdown_event: Event,
    pub prom: Arc<ServerMetrics>,
    pub in_flight: TaskTrackerToken,
    pub keep_alive: Duration,
}

/// The body of a streaming response: relays the event stream, ends it with `shutdown_event`
/// when the drain deadline passes, sends a keep-alive comment after `keep_alive` of silence,
/// keeps the stream counted while it is open, and enters its [`CallScope`] while it polls or
/// drops the inner stream.
pub struct Guarded {
    inner: Option<BoxStream<'static, Event>>,
    scope: Arc<CallScope>,
    force: Pin<Box<WaitForCancellationFutureOwned>>,
    force_wake: Arc<ForceWake>,
    /// Whether `force` has been polled once (and so holds `force_wake` as its waker).
    force_armed: bool,
    shutdown_event: Option<Event>,
    keep_alive: Pin<Box<Sleep>>,
    keep_alive_every: Duration,
    last_sent: Instant,
    prom: Arc<ServerMetrics>,
    _in_flight: TaskTrackerToken,
}

impl Guarded {
    pub fn new(inner: BoxStream<'static, Event>, config: GuardConfig) -> Guarded {
        config.prom.stream_opened();
        let now = Instant::now();
        Guarded {
            inner: Some(inner),
            scope: config.scope,
            force: Box::pin(config.force),
            force_wake: Arc::new(ForceWake::default()),
            force_armed: false,
            shutdown_event: Some(config.shutdown_event),
            keep_alive: Box::pin(tokio::time::sleep_until(now + config.keep_alive)),
            keep_alive_every: config.keep_alive,
            last_sent: now,
            prom: config.prom,
            _in_flight: config.in_flight,
        }
    }

    /// The streaming response: `text/event-stream`, not cached, this body.
    pub fn into_response(self) -> Response {
        let mut response = Body::new(self).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }

    fn drop_inner(&mut self) {
        if self.inner.is_some() {
            let _entered = enter(&self.scope);
            self.inner = None;
        }
    }

    /// Whether the drain deadline passed. Polls the cancellation future only on the first call
    /// and after it woke us.
    fn forced(&mut self, cx: &Context<'_>) -> bool {
        self.force_wake.task.register(cx.waker());
        let fired = self.force_wake.fired.swap(false, Ordering::Acquire);
        if self.force_armed && !fired {
            return false;
        }
        self.force_armed = true;
        let waker = Waker::from(Arc::clone(&self.force_wake));
        self.force
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready()
    }

    /// A keep-alive comment when the stream has been silent for the interval; otherwise arms
    /// the timer for when it will have been.
    fn poll_keep_alive(&mut self, cx: &mut Context<'_>) -> Poll<Bytes> {
        loop {
            if self.keep_alive.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.last_sent + self.keep_alive_every;
            let now = Instant::now();
            if now >= due {
                self.last_sent = now;
                self.keep_alive.as_mut().reset(now + self.keep_alive_every);
                return Poll::Ready(Bytes::from_static(KEEP_ALIVE));
            }
            // Events were sent since the timer was armed: the silence started later.
            self.keep_alive.as_mut().reset(due);
        }
    }
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.inner.is_none() {
            return Poll::Ready(None);
        }
        if this.forced(cx) {
            tracing::warn!("drain deadline passed; ending an open stream");
            this.drop_inner();
            return Poll::Ready(this.shutdown_event.take().map(|e| Ok(Frame::data(e.0))));
        }
        let polled = {
            let _entered = enter(&this.scope);
            match this.inner.as_mut() {
                Some(inner) => inner.as_mut().poll_next(cx),
                None => Poll::Ready(None),
            }
        };
        match polled {
            Poll::Ready(Some(e)) => {
                this.last_sent = Instant::now();
                Poll::Ready(Some(Ok(Frame::data(e.0))))
            }
            Poll::Ready(None) => {
                this.drop_inner();
                Poll::Ready(None)
            }
            Poll::Pending => match this.poll_keep_alive(cx) {
                Poll::Ready(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.drop_inner();
        self.prom.stream_closed();
    }
}

/// A future run inside a [`CallScope`]: entered while polled and while dropped, so a handler
/// abandoned by its client (hyper drops the handler future) records its cancelled call.
pub struct Scoped<F> {
    inner: Option<Pin<Box<F>>>,
    scope: Arc<CallScope>,
}

impl<F: Future> Scoped<F> {
    pub fn new(scope: Arc<CallScope>, inner: F) -> Scoped<F> {
        Scoped {
            inner: Some(Box::pin(inner)),
            scope,
        }
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let _entered = enter(&this.scope);
        match this.inner.as_mut() {
            Some(inner) => {
                let out = inner.as_mut().poll(cx);
                if out.is_ready() {
                    this.inner = None;
                }
                out
            }
            // Polled after completion: a caller bug; never resolve rather than panic.
            None => Poll::Pending,
        }
    }
}

impl<F> Drop for Scoped<F> {
    fn drop(&mut self) {
        if self.inner.is_some() {
            let _entered = enter(&self.scope);
            self.inner = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;

    fn guarded(
        events: BoxStream<'static, Event>,
        force: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Guarded {
        Guarded::new(
            events,
            GuardConfig {
                scope: CallScope::new("u", "r", None, None),
                force: force.clone().cancelled_owned(),
                shutdown_event: event("error", &serde_json::json!({ "kind": "shutdown" })),
                prom: Arc::new(ServerMetrics::new()),
                in_flight: tracker.token(),
                keep_alive: Duration::from_secs(15),
            },
        )
    }

    async fn next_frame(body: &mut Guarded) -> Option<String> {
        let frame = futures::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
            .await?
            .ok()?;
        let data = frame.into_data().ok()?;
        Some(String::from_utf8_lossy(&data).into_owned())
    }

    #[test]
    fn events_are_encoded_as_axum_did() {
        let named = event("delta", &serde_json::json!({ "text": "a\nb" }));
        assert_eq!(
            named.as_bytes(),
            b"event: delta\ndata: {\"text\":\"a\\nb\"}\n\n"
        );
        let plain = data(&serde_json::json!({ "n": 1 }));
        assert_eq!(plain.as_bytes(), b"data: {\"n\":1}\n\n");
        assert_eq!(Event::text("[DONE]").as_bytes(), b"data: [DONE]\n\n");
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_comes_after_the_interval_of_silence_only() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Event>();
        let (force, tracker) = (CancellationToken::new(), TaskTracker::new());
        let mut body = guarded(rx.boxed(), &force, &tracker);

        tokio::time::sleep(Duration::from_secs(10)).await;
        tx.unbounded_send(data(&1)).unwrap();
        assert_eq!(next_frame(&mut body).await.unwrap(), "data: 1\n\n");
        let sent = tokio::time::Instant::now();
        // The silence started with that event, not when the stream opened.
        assert_eq!(next_frame(&mut body).await.unwrap(), ": keep-alive\n\n");
        assert_eq!(sent.elapsed(), Duration::from_secs(15));
        assert_eq!(next_frame(&mut body).await.unwrap(), ": keep-alive\n\n");
        assert_eq!(sent.elapsed(), Duration::from_secs(30));

        drop(tx);
        assert_eq!(next_frame(&mut body).await, None);
        drop(body);
        tracker.close();
        assert!(
            tracker.is_empty(),
            "the stream stops being counted once dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_deadline_ends_an_open_stream_with_the_shutdown_event() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Event>();
        let (force, tracker) = (CancellationToken::new(), TaskTracker::new());
        let mut body = guarded(rx.boxed(), &force, &tracker);
        tx.unbounded_send(data(&1)).unwrap();
        assert_eq!(next_frame(&mut body).await.unwrap(), "data: 1\n\n");

        let reader = tokio::spawn(async move {
            let mut frames = Vec::new();
            while let Some(frame) = next_frame(&mut body).await {
                frames.push(frame);
            }
            frames
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        force.cancel();
        let frames = reader.await.unwrap();
        assert_eq!(
            frames,
            ["event: error\ndata: {\"kind\":\"shutdown\"}\n\n".to_owned()]
        );
        assert!(tx.is_closed(), "the inner stream was dropped");
    }
}
