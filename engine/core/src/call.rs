//! The one place every model call passes. Whoever calls — an agent run, a pipeline stage, the
//! chat route, a queued job, the CLI — opens the call here with a [`CallContext`] given at call
//! time, and gets a [`CallStream`]. The call is recorded exactly once, whichever way it ends:
//! when its terminal event passes through the stream (finished or failed), or, if the caller
//! drops the stream first, from the route's `Drop` through the [`RouteObserver`] given with this
//! very route (cancelled). Every record goes to the engine's [`CallObserver`]s, then to its
//! [`Recorder`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{SystemTime, UNIX_EPOCH};

use agents::Process;
use futures::Stream;

use crate::record::{CallObserver, Receipt, Recorded, Recorder, RequestRecord, SessionMessage};
use crate::router::{
    CallTarget, RouteError, RouteEvent, RouteFailure, RouteObserver, RouteOptions, RouteOutcome,
    RouteRequest, RouteStatus, RouteStream, Router,
};
use crate::stream::ProviderKind;

/// Who asked, and in what context: everything a record needs that the router does not know.
/// Given with every call; nothing of it is kept between calls.
///
/// ```
/// use keyvex_engine::CallContext;
///
/// // An HTTP request of caller `alice`, writing into her session:
/// let ctx = CallContext::new("alice")
///     .with_correlation("0193c1d2-request-id")
///     .with_session(Some("s-1".to_owned()));
/// assert_eq!(ctx.run_id, None);
/// // A queued job: the job id is its run, and correlates its records.
/// let job = CallContext::new("bob").with_correlation("job-7").with_run("job-7");
/// assert_eq!(job.stage, None, "the engine sets the stage of each call in a run");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    /// The caller (API key owner, job owner, `cli`): the record's `userId`.
    pub caller: String,
    /// What the caller correlates the call with (the HTTP request id, the job id): kept on each
    /// record and session message. Never the record's own key.
    pub correlation_id: Option<String>,
    /// The pipeline run or job the call belongs to.
    pub run_id: Option<String>,
    pub session_id: Option<String>,
    /// The pipeline stage (or job process) the call serves; set by the engine for calls made
    /// within a run.
    pub stage: Option<Process>,
}

impl CallContext {
    pub fn new(caller: impl Into<String>) -> CallContext {
        CallContext {
            caller: caller.into(),
            ..CallContext::default()
        }
    }

    pub fn with_correlation(mut self, id: impl Into<String>) -> CallContext {
        self.correlation_id = Some(id.into());
        self
    }

    pub fn with_run(mut self, run_id: impl Into<String>) -> CallContext {
        self.run_id = Some(run_id.into());
        self
    }

    pub fn with_session(mut self, session_id: Option<String>) -> CallContext {
        self.session_id = session_id;
        self
    }

    pub fn with_stage(mut self, stage: Process) -> CallContext {
        self.stage = Some(stage);
        self
    }
}

/// What the caller of one model call sees, in order: `Start` per attempt that opened a stream, a
/// `Fallback` before each switch of model, the committed attempt's `Delta`s, then exactly one
/// `Finished` or `Failed`, whose record has already been handed to the recorder.
#[derive(Debug)]
pub enum CallEvent {
    Start {
        provider: ProviderKind,
        model: String,
        /// 1-based position in the outcome's attempts.
        attempt: u32,
    },
    Fallback {
        from: String,
        to: String,
        reason: String,
    },
    Delta(String),
    Finished {
        outcome: RouteOutcome,
        record: Recorded,
    },
    Failed {
        failure: RouteFailure,
        record: Recorded,
    },
}

/// The router plus where records go: shared by every call of one engine.
#[derive(Clone)]
pub(crate) struct Calls {
    shared: Arc<Shared>,
}

struct Shared {
    router: Router,
    recorder: Arc<dyn Recorder>,
    observers: Vec<Arc<dyn CallObserver>>,
}

impl Calls {
    pub(crate) fn new(
        router: Router,
        recorder: Arc<dyn Recorder>,
        observers: Vec<Arc<dyn CallObserver>>,
    ) -> Calls {
        Calls {
            shared: Arc::new(Shared {
                router,
                recorder,
                observers,
            }),
        }
    }

    pub(crate) fn router(&self) -> &Router {
        &self.shared.router
    }

    pub(crate) fn recorder(&self) -> &dyn Recorder {
        self.shared.recorder.as_ref()
    }

    /// Opens one model call. An unknown model, or a model whose provider is not configured, is
    /// refused here, before anything is spent or recorded.
    #[expect(
        clippy::result_large_err,
        reason = "RouteError keeps the API's shape (ProviderError inline); errors are once per request"
    )]
    pub(crate) fn open(
        &self,
        ctx: &CallContext,
        target: &CallTarget,
        request: RouteRequest,
        options: RouteOptions,
    ) -> Result<CallStream, RouteError> {
        // One snapshot for the whole call: the route is priced with this catalog, and its
        // record says which version that was, even if another is activated meanwhile.
        let catalog = self.shared.router.catalog();
        let books = Arc::new(Books {
            shared: Arc::clone(&self.shared),
            ctx: ctx.clone(),
            process: target.process(),
            catalog_version: catalog.version(),
        });
        let observer: Arc<dyn RouteObserver> = books.clone();
        let route =
            self.shared
                .router
                .open_on(&catalog, target, request, options, Some(observer))?;
        Ok(CallStream { route, books })
    }

    /// Hands one session message to the recorder.
    pub(crate) fn message(&self, message: SessionMessage) -> Receipt {
        self.shared.recorder.record_message(message)
    }
}

/// One call's books: its context, and the way to its record.
struct Books {
    shared: Arc<Shared>,
    ctx: CallContext,
    process: Option<Process>,
    /// The catalog version the route opened on (and was priced with).
    catalog_version: u64,
}

impl Books {
    fn record(&self, outcome: &RouteOutcome) -> Recorded {
        let record =
            record_of(outcome, &self.ctx, self.process).with_catalog_version(self.catalog_version);
        let id = record.request_id.clone();
        for observer in &self.shared.observers {
            observer.on_record(&record);
        }
        Recorded {
            id,
            receipt: self.shared.recorder.record(record),
        }
    }
}

impl RouteObserver for Books {
    fn on_cancelled(&self, outcome: RouteOutcome) {
        if outcome.attempts.is_empty() {
            // Dropped before any model was even picked: nothing to bill, nothing to record.
            return;
        }
        let recorded = self.record(&outcome);
        tracing::info!(record_id = %recorded.id, caller = %self.ctx.caller, cost = %outcome.cost,
            "recorded a call its caller abandoned");
        // Nobody is left to tell; the recorder commits the record all the same.
        drop(recorded.receipt);
    }
}

/// The events of one model call. Dropping it cancels the call in flight, which is then recorded
/// as `cancelled` with what it had cost.
pub struct CallStream {
    route: RouteStream,
    books: Arc<Books>,
}

impl Stream for CallStream {
    type Item = CallEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<CallEvent>> {
        let this = &mut *self;
        let Some(event) = ready!(this.route.as_mut().poll_next(cx)) else {
            return Poll::Ready(None);
        };
        Poll::Ready(Some(match event {
            RouteEvent::Start {
                provider,
                model,
                attempt,
            } => CallEvent::Start {
                provider,
                model,
                attempt,
            },
            RouteEvent::Fallback { from, to, reason } => CallEvent::Fallback { from, to, reason },
            RouteEvent::Delta(text) => CallEvent::Delta(text),
            RouteEvent::Finished(outcome) => {
                let record = this.books.record(&outcome);
                CallEvent::Finished { outcome, record }
            }
            RouteEvent::Failed(failure) => {
                let record = this.books.record(&failure.outcome);
                CallEvent::Failed { failure, record }
            }
        }))
    }
}

/// The one mapping from a routed call's outcome to its record: usage and cost summed over its
/// attempts, the committed (or last tried) provider and model, timing from the route's start,
/// and the status. A failed call's error kind is the last attempt's (`rate_limited`,
/// `ttft_timeout`, …), which says more than the route-level summary.
pub fn record_of(
    outcome: &RouteOutcome,
    ctx: &CallContext,
    process: Option<Process>,
) -> RequestRecord {
    let provider = outcome.provider.map_or("none", |p| p.as_str());
    let model = outcome.model.as_deref().unwrap_or("none");
    let process_key = process.map_or("direct", Process::key);
    let mut rec = RequestRecord::new(&ctx.caller, process_key, provider, model)
        .with_usage(&outcome.usage)
        .with_cost(outcome.cost)
        .with_cost_estimated(outcome.cost_estimated)
        .with_latency(
            outcome.latency.as_millis() as u64,
            outcome.ttft.map(|t| t.as_millis() as u64),
        )
        .with_attempts(outcome.attempts.len() as u32, outcome.fallback_used);
    if let Some(first) = outcome.attempts.first()
        && let Ok(since) = first.started_at.duration_since(UNIX_EPOCH)
        && first.started_at <= SystemTime::now()
    {
        rec = rec.with_timestamp_ms(since.as_millis() as u64);
    }
    rec.correlation_id.clone_from(&ctx.correlation_id);
    rec.run_id.clone_from(&ctx.run_id);
    rec.stage = ctx.stage.map(|s| s.key().to_owned());
    rec.session_id.clone_from(&ctx.session_id);
    match outcome.status {
        RouteStatus::Succeeded => rec,
        RouteStatus::Cancelled => rec.cancelled(),
        RouteStatus::Failed => {
            let last = outcome.attempts.iter().rev().find_map(|a| a.error.as_ref());
            match last {
                Some(e) => rec.failed(e.kind(), &e.to_string()),
                None => rec.failed("failed", "the call failed without an attempt error"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cost::Cost;
    use crate::router::{AttemptError, AttemptRecord};
    use crate::stream::Usage;

    fn outcome(status: RouteStatus, error: Option<AttemptError>) -> RouteOutcome {
        let usage = Usage {
            input: 100,
            cached_input: 10,
            cache_write: 0,
            output: 20,
        };
        RouteOutcome {
            attempts: vec![AttemptRecord {
                provider: ProviderKind::OpenAi,
                model: "gpt-5.4-mini".into(),
                started_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000),
                latency: Duration::from_millis(900),
                ttft: Some(Duration::from_millis(200)),
                usage,
                usage_estimated: false,
                cost: Cost(1234),
                finish_reason: None,
                error,
                output_chars: 80,
            }],
            status,
            text: "x".into(),
            provider: Some(ProviderKind::OpenAi),
            model: Some("gpt-5.4-mini".into()),
            usage,
            cost: Cost(1234),
            cost_estimated: false,
            ttft: Some(Duration::from_millis(210)),
            latency: Duration::from_millis(950),
            fallback_used: false,
            finish_reason: None,
        }
    }

    #[test]
    fn maps_every_field() {
        let ctx = CallContext::new("alice")
            .with_correlation("req-1")
            .with_run("run-1")
            .with_session(Some("s-1".into()))
            .with_stage(Process::MagicSpark);
        let rec = record_of(
            &outcome(RouteStatus::Succeeded, None),
            &ctx,
            Some(Process::MagicSpark),
        );
        assert_ne!(rec.request_id, "req-1", "record ids are the engine's own");
        assert_eq!(rec.correlation_id.as_deref(), Some("req-1"));
        assert_eq!(rec.timestamp_ms, 1_700_000_000_000);
        assert_eq!(
            (rec.user_id.as_str(), rec.process.as_str()),
            ("alice", "magicSpark")
        );
        assert_eq!(
            (rec.provider.as_str(), rec.model.as_str()),
            ("openai", "gpt-5.4-mini")
        );
        assert_eq!(
            (rec.input_tokens, rec.cached_input_tokens, rec.output_tokens),
            (100, 10, 20)
        );
        assert_eq!(rec.cost_pico_usd, 1234);
        assert_eq!((rec.latency_ms, rec.ttft_ms), (950, Some(210)));
        assert!(rec.success);
        assert_eq!(rec.run_id.as_deref(), Some("run-1"));
        assert_eq!(rec.stage.as_deref(), Some("magicSpark"));
        assert_eq!(rec.session_id.as_deref(), Some("s-1"));
    }

    #[test]
    fn failed_and_cancelled_calls_say_why() {
        let ctx = CallContext::new("u");
        let rec = record_of(
            &outcome(RouteStatus::Cancelled, Some(AttemptError::Cancelled)),
            &ctx,
            None,
        );
        assert_eq!(rec.status.as_str(), "cancelled");
        assert_eq!(rec.process, "direct");
        assert_eq!(rec.stage, None);
        assert_eq!(rec.cost_pico_usd, 1234, "a cancelled call keeps its cost");
        let rec = record_of(
            &outcome(
                RouteStatus::Failed,
                Some(AttemptError::CircuitOpen {
                    model: "m".into(),
                    until: None,
                }),
            ),
            &ctx,
            None,
        );
        assert!(!rec.success);
        assert_eq!(rec.error_kind.as_deref(), Some("circuit_open"));
    }
}
