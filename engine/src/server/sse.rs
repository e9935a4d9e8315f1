//! Server-sent event streams: the wrapper every streaming response goes through (shutdown,
//! in-flight accounting, keep-alive), and the context that lets a cancelled call be recorded
//! for the right caller.
//!
//! When a client disconnects, hyper drops the response body; dropping the engine stream inside
//! it drops the route, and the router reports the cancelled call to its [`RouteObserver`] from
//! that `Drop`. The observer has no request context of its own, so [`Guarded`] enters its
//! [`CallScope`] in a thread-local for exactly as long as it polls or drops the inner stream:
//! `Drop` is synchronous, so the observer runs on that thread inside that window.

use std::cell::RefCell;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use agents::Process;
use axum::response::sse::Event;
use futures::Stream;
use futures::stream::BoxStream;
use serde::Serialize;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::metrics::{CallContext, RequestRecord, Tracker};
use crate::router::{RouteObserver, RouteOutcome};
use crate::server::prom::ServerMetrics;

/// An SSE event with a name and a JSON body. Serialization of our own types cannot fail; if it
/// ever did, the event says so rather than panicking.
pub fn event(name: &str, data: &impl Serialize) -> Event {
    let json = serde_json::to_string(data).unwrap_or_else(|e| {
        format!(r#"{{"kind":"internal","message":"event could not be encoded: {e}"}}"#)
    });
    Event::default().event(name).data(json)
}

/// A data-only event (OpenAI chunks).
pub fn data(data: &impl Serialize) -> Event {
    let json = serde_json::to_string(data).unwrap_or_else(|e| {
        format!(
            r#"{{"error":{{"message":"chunk could not be encoded: {e}","type":"server_error"}}}}"#
        )
    });
    Event::default().data(json)
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

/// Wraps an event stream for the wire: ends it with `shutdown_event` when the drain deadline
/// passes, keeps the stream counted while it is open, and enters its [`CallScope`] while it
/// polls or drops the inner stream.
pub struct Guarded {
    inner: Option<BoxStream<'static, Event>>,
    scope: Arc<CallScope>,
    force: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown_event: Option<Event>,
    prom: Arc<ServerMetrics>,
    _in_flight: TaskTrackerToken,
}

impl Guarded {
    pub fn new(
        inner: BoxStream<'static, Event>,
        scope: Arc<CallScope>,
        force: WaitForCancellationFutureOwned,
        shutdown_event: Event,
        prom: Arc<ServerMetrics>,
        in_flight: TaskTrackerToken,
    ) -> Guarded {
        prom.stream_opened();
        Guarded {
            inner: Some(inner),
            scope,
            force: Box::pin(force),
            shutdown_event: Some(shutdown_event),
            prom,
            _in_flight: in_flight,
        }
    }

    fn drop_inner(&mut self) {
        if self.inner.is_some() {
            let _entered = enter(&self.scope);
            self.inner = None;
        }
    }
}

impl Stream for Guarded {
    type Item = Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.inner.is_none() {
            return Poll::Ready(None);
        }
        if this.force.as_mut().poll(cx).is_ready() {
            tracing::warn!("drain deadline passed; ending an open stream");
            this.drop_inner();
            return Poll::Ready(this.shutdown_event.take().map(Ok));
        }
        let polled = {
            let _entered = enter(&this.scope);
            match this.inner.as_mut() {
                Some(inner) => inner.as_mut().poll_next(cx),
                None => Poll::Ready(None),
            }
        };
        match polled {
            Poll::Ready(Some(e)) => Poll::Ready(Some(Ok(e))),
            Poll::Ready(None) => {
                this.drop_inner();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
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
