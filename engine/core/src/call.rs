//! The one place every model call passes. Whoever calls — an agent run, a pipeline stage, the
//! chat route, a queued job, the CLI — opens the call here with a [`CallContext`] given at call
//! time, and gets a [`CallStream`]. Every call that reaches a model is recorded exactly once:
//! as it goes out, its intent (a [`CallIntent`]) goes to the recorder, which keeps it until the
//! call's own record replaces it, so a process that dies mid-call still leaves an `interrupted`
//! record behind; a call its request went on from is recorded `retried` when the next call
//! starts; the last call when the route's terminal event passes through the stream (finished or
//! failed), or, if the caller drops the stream first, from the route's `Drop` through the
//! [`RouteObserver`] given with this very route (cancelled). Every record goes to the engine's
//! [`CallObserver`]s, then to its [`Recorder`].

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{SystemTime, UNIX_EPOCH};

use agents::Process;
use futures::Stream;

use crate::admission::FirstCall;
use crate::budgets::{Budgets, SpendAccount};
use crate::cost::cost;
use crate::record::{
    CallIntent, CallObserver, Receipt, Recorded, Recorder, RequestRecord, SessionMessage,
};
use crate::router::{
    AttemptError, AttemptRecord, CallFailed, CallStart, CallTarget, Funding, Rescue, RouteError,
    RouteEvent, RouteFailure, RouteObserver, RouteOptions, RouteOutcome, RouteRequest, RouteStatus,
    RouteStream, Router,
};
use crate::stream::{ProviderKind, Usage};

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
    /// Reservations [`Engine::admit`](crate::Engine::admit) made for the request's first call,
    /// waiting for its first attempt.
    pub first_call: FirstCall,
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
/// `Finished` or `Failed`, whose records (one per attempt that reached a model) have already been
/// handed to the recorder; its `record` resolves once all of them are durable. The terminal and
/// rescue payloads are boxed for the reason given on [`RouteEvent`].
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
    /// The stream broke after content and another call takes over (see
    /// [`RouteEvent::Rescue`]).
    Rescue(Box<Rescue>),
    Delta(String),
    Finished {
        outcome: Box<RouteOutcome>,
        record: Recorded,
    },
    Failed {
        failure: Box<RouteFailure>,
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
    /// The dollar budgets every call spends from, if the engine has them.
    budgets: Option<Arc<Budgets>>,
}

impl Calls {
    pub(crate) fn new(
        router: Router,
        recorder: Arc<dyn Recorder>,
        observers: Vec<Arc<dyn CallObserver>>,
        budgets: Option<Arc<Budgets>>,
    ) -> Calls {
        Calls {
            shared: Arc::new(Shared {
                router,
                recorder,
                observers,
                budgets,
            }),
        }
    }

    pub(crate) fn budgets(&self) -> Option<&Arc<Budgets>> {
        self.shared.budgets.as_ref()
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
            // The trace this call belongs to (its caller's span is current here), so a slow or
            // failed record leads to the trace that tells its story.
            trace_id: crate::trace_context::current_trace_id(),
            early: Mutex::new(Early::default()),
        });
        let observer: Arc<dyn RouteObserver> = books.clone();
        let funding = Funding {
            spend: self.shared.budgets.as_ref().map(|budgets| SpendAccount {
                budgets: Arc::clone(budgets),
                caller: ctx.caller.clone(),
                run_id: ctx.run_id.clone(),
            }),
            first_call: ctx.first_call.clone(),
        };
        let route = self.shared.router.open_spending(
            &catalog,
            target,
            request,
            options,
            Some(observer),
            funding,
        )?;
        Ok(CallStream { route, books })
    }

    /// Hands one session message to the recorder.
    pub(crate) fn message(&self, message: SessionMessage) -> Receipt {
        self.shared.recorder.record_message(message)
    }
}

/// One call's books: its context, and the way to its records.
struct Books {
    shared: Arc<Shared>,
    ctx: CallContext,
    process: Option<Process>,
    /// The catalog version the route opened on (and was priced with).
    catalog_version: u64,
    /// The OpenTelemetry trace id, when spans are exported.
    trace_id: Option<String>,
    /// Records handed over before the route ended.
    early: Mutex<Early>,
}

/// The `retried` records of a route handed over as its next call started: how many (they are
/// the first ones [`records_of`] maps at the end, which are therefore skipped then), and their
/// receipts, which the route's terminal event waits on with its own.
#[derive(Default)]
struct Early {
    records: usize,
    receipts: Vec<Receipt>,
}

impl Books {
    fn process_key(&self) -> &'static str {
        self.process.map_or("direct", Process::key)
    }

    /// Hands one record to the observers and the recorder.
    fn hand_over(&self, record: RequestRecord) -> Receipt {
        let mut record = record.with_catalog_version(self.catalog_version);
        record.trace_id.clone_from(&self.trace_id);
        for observer in &self.shared.observers {
            observer.on_record(&record);
        }
        self.shared.recorder.record(record)
    }

    /// Hands every record of the route not handed over yet to the observers and the recorder.
    /// The returned id is the last record's (the request's outcome); the receipt resolves once
    /// all of the route's records are durable.
    fn record(&self, outcome: &RouteOutcome) -> Recorded {
        let records = records_of(outcome, &self.ctx, self.process);
        let id = records
            .last()
            .map(|r| r.request_id.clone())
            .unwrap_or_default();
        let early = std::mem::take(&mut *self.early.lock().unwrap_or_else(PoisonError::into_inner));
        // Only `retried` records go early, and the route's last record never is one.
        let skip = early.records.min(records.len().saturating_sub(1));
        let mut receipts = early.receipts;
        receipts.reserve(records.len() - skip);
        for record in records.into_iter().skip(skip) {
            receipts.push(self.hand_over(record));
        }
        Recorded {
            id,
            receipt: Receipt::all(receipts),
        }
    }

    /// Records, as `retried`, the calls before the one starting that are not recorded yet: the
    /// route went on from them, so their outcome is final now, and a process that stops later
    /// must not turn them into `interrupted`.
    fn record_earlier(&self, earlier: &[AttemptRecord]) {
        let mut early = self.early.lock().unwrap_or_else(PoisonError::into_inner);
        let calls: Vec<&AttemptRecord> = earlier.iter().filter(|a| made_call(a)).collect();
        if calls.len() <= early.records {
            return;
        }
        let primary = earlier.first().map(|a| a.model.as_str());
        for (i, attempt) in calls.iter().enumerate().skip(early.records) {
            let record = retried_record(
                &self.ctx,
                self.process_key(),
                attempt,
                i as u32 + 1,
                primary,
            );
            let receipt = self.hand_over(record);
            early.receipts.push(receipt);
        }
        early.records = calls.len();
    }

    /// The record a call leaves should its process stop before the call's own record is
    /// written: `interrupted`, same id, dated from the request's first call like the request's
    /// last record, with context and catalog version filled in.
    fn interrupted(
        &self,
        mut rec: RequestRecord,
        record_id: &str,
        request_started_at: SystemTime,
        call: u32,
        why: &str,
    ) -> RequestRecord {
        record_id.clone_into(&mut rec.request_id);
        if let Some(ms) = unix_ms(request_started_at) {
            rec.timestamp_ms = ms;
        }
        rec.attempt = call;
        rec.attempts = call;
        rec.with_catalog_version(self.catalog_version)
            .interrupted(why)
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

    fn on_call_start(&self, call: &CallStart<'_>) {
        self.record_earlier(call.earlier);
        let primary = call
            .earlier
            .first()
            .map_or(call.model, |a| a.model.as_str());
        let prompt = Usage {
            input: call.prompt_tokens,
            ..Usage::default()
        };
        let rec = base_record(
            &self.ctx,
            self.process_key(),
            call.provider.as_str(),
            call.model,
        )
        .with_usage(&prompt)
        .with_cost(cost(&prompt, call.pricing))
        .with_cost_estimated(true)
        .with_attempts(call.call, primary != call.model);
        let record = self.interrupted(
            rec,
            call.record_id,
            call.request_started_at,
            call.call,
            "the process stopped while this call was in flight: the prompt is billed as estimated from its length, the output as none",
        );
        self.shared.recorder.record_intent(CallIntent {
            record,
            call_started_ms: unix_ms(call.started_at).unwrap_or_default(),
            spend: call.spend.clone(),
        });
    }

    fn on_call_failed(&self, failed: &CallFailed<'_>) {
        let &CallFailed {
            attempt,
            first_model,
            call,
            request_started_at,
        } = failed;
        let error = attempt.error.as_ref().map_or_else(
            || "ended without an error".to_owned(),
            |e| format!("{}: {e}", e.kind()),
        );
        let rec = retried_record(
            &self.ctx,
            self.process_key(),
            attempt,
            call,
            Some(first_model),
        );
        let record = self.interrupted(
            rec,
            &attempt.record_id,
            request_started_at,
            call,
            &format!(
                "the process stopped after this call failed ({error}) and before its request went on"
            ),
        );
        // The failed call's reservation is settled already; the intent no longer holds one.
        self.shared.recorder.record_intent(CallIntent {
            record,
            call_started_ms: unix_ms(attempt.started_at).unwrap_or_default(),
            spend: None,
        });
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
            RouteEvent::Rescue(rescue) => CallEvent::Rescue(rescue),
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

/// The one mapping from a routed call's outcome to its records: one per attempt that reached a
/// model, in order, each with that call's own provider, model, usage and cost, and the id drawn
/// when the call started. Earlier attempts are `retried` (with their error, and their own
/// position as `attempts`: that is what the request had made when its next call started and
/// they were recorded); the last one carries the route's status and, for the caller's view, the
/// route's timing (from the request's start, waits and earlier attempts included). A route that
/// never reached a model (every model skipped by an open circuit or a spent local budget) still
/// gets one `failed` record, with no usage, so the failure is seen.
pub fn records_of(
    outcome: &RouteOutcome,
    ctx: &CallContext,
    process: Option<Process>,
) -> Vec<RequestRecord> {
    let process_key = process.map_or("direct", Process::key);
    let calls: Vec<&AttemptRecord> = outcome.attempts.iter().filter(|a| made_call(a)).collect();
    let primary = outcome.attempts.first().map(|a| a.model.as_str());
    let total = calls.len() as u32;
    let Some((last, earlier)) = calls.split_last() else {
        let (provider, model, started_at) = match outcome.attempts.last() {
            Some(a) => (a.provider.as_str(), a.model.as_str(), a.started_at),
            None => ("none", "none", SystemTime::now()),
        };
        let mut rec = base_record(ctx, process_key, provider, model)
            .with_latency(outcome.latency.as_millis() as u64, None)
            .with_attempts(0, primary.is_some_and(|p| p != model));
        if let Some(ms) = unix_ms(started_at) {
            rec = rec.with_timestamp_ms(ms);
        }
        rec.attempt = 0;
        return vec![final_status(rec, outcome)];
    };
    let mut records = Vec::with_capacity(calls.len());
    for (i, attempt) in earlier.iter().enumerate() {
        records.push(retried_record(
            ctx,
            process_key,
            attempt,
            i as u32 + 1,
            primary,
        ));
    }
    let mut rec = call_record(ctx, process_key, last, primary)
        .with_latency(
            outcome.latency.as_millis() as u64,
            outcome.ttft.map(|t| t.as_millis() as u64),
        )
        .with_attempts(total, primary.is_some_and(|p| p != last.model));
    rec.attempt = total;
    rec.unterminated = last.unterminated;
    rec.rescued_from = outcome.rescues.iter().map(|r| r.from.clone()).collect();
    // A request that started on an earlier model's clock: date it from its first call.
    if let Some(ms) = calls.first().and_then(|first| unix_ms(first.started_at)) {
        rec = rec.with_timestamp_ms(ms);
    }
    records.push(final_status(rec, outcome));
    records
}

/// Whether an attempt reached a model (a skipped model made no call).
fn made_call(attempt: &AttemptRecord) -> bool {
    !attempt
        .error
        .as_ref()
        .is_some_and(AttemptError::made_no_call)
}

/// Unix milliseconds of a start time, unless it is before the epoch or in the future (a paused
/// test clock): such records keep the time they were made.
fn unix_ms(at: SystemTime) -> Option<u64> {
    let since = at.duration_since(UNIX_EPOCH).ok()?;
    (at <= SystemTime::now()).then_some(since.as_millis() as u64)
}

/// A record of `ctx`'s call to `model`, with no usage yet, stamped now.
fn base_record(ctx: &CallContext, process_key: &str, provider: &str, model: &str) -> RequestRecord {
    let mut rec = RequestRecord::new(&ctx.caller, process_key, provider, model);
    rec.correlation_id.clone_from(&ctx.correlation_id);
    rec.run_id.clone_from(&ctx.run_id);
    rec.stage = ctx.stage.map(|s| s.key().to_owned());
    rec.session_id.clone_from(&ctx.session_id);
    rec
}

/// One call's record with its own id, start, usage and cost; timing, position and status are
/// the caller's to set.
fn call_record(
    ctx: &CallContext,
    process_key: &str,
    attempt: &AttemptRecord,
    primary: Option<&str>,
) -> RequestRecord {
    let mut rec = base_record(ctx, process_key, attempt.provider.as_str(), &attempt.model)
        .with_usage(&attempt.usage)
        .with_cost(attempt.cost)
        .with_cost_estimated(attempt.usage_estimated)
        .with_attempts(0, primary.is_some_and(|p| p != attempt.model));
    if !attempt.record_id.is_empty() {
        rec.request_id.clone_from(&attempt.record_id);
    }
    if let Some(ms) = unix_ms(attempt.started_at) {
        rec = rec.with_timestamp_ms(ms);
    }
    rec
}

/// The record of a call its request went on from: its own timing, `call`-th of the request.
fn retried_record(
    ctx: &CallContext,
    process_key: &str,
    attempt: &AttemptRecord,
    call: u32,
    primary: Option<&str>,
) -> RequestRecord {
    let mut rec = call_record(ctx, process_key, attempt, primary).with_latency(
        attempt.latency.as_millis() as u64,
        attempt.ttft.map(|t| t.as_millis() as u64),
    );
    rec.attempts = call;
    rec.attempt = call;
    match &attempt.error {
        Some(e) => rec.retried(e.kind(), &e.to_string()),
        None => rec.retried("retried", "the attempt ended without an error"),
    }
}

/// The route's status on its last record. A failed call's error kind is the last attempt's
/// (`rate_limited`, `ttft_timeout`, …), which says more than the route-level summary.
fn final_status(rec: RequestRecord, outcome: &RouteOutcome) -> RequestRecord {
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
    use crate::provider::ProviderError;
    use crate::record::RequestStatus;
    use crate::stream::Usage;

    fn attempt(model: &str, error: Option<AttemptError>, input: u64, cost: u64) -> AttemptRecord {
        AttemptRecord {
            record_id: format!("id-{model}"),
            provider: ProviderKind::OpenAi,
            model: model.into(),
            started_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000),
            latency: Duration::from_millis(900),
            ttft: Some(Duration::from_millis(200)),
            usage: Usage {
                input,
                cached_input: 10,
                cache_write: 0,
                output: 20,
            },
            usage_estimated: false,
            cost: Cost(cost),
            finish_reason: None,
            error,
            output_chars: 80,
            unterminated: false,
        }
    }

    fn outcome(status: RouteStatus, attempts: Vec<AttemptRecord>) -> RouteOutcome {
        let last = attempts.last().cloned();
        RouteOutcome {
            status,
            text: "x".into(),
            provider: Some(ProviderKind::OpenAi),
            model: last.as_ref().map(|a| a.model.clone()),
            usage: last.as_ref().map(|a| a.usage).unwrap_or_default(),
            cost: attempts.iter().map(|a| a.cost).sum(),
            cost_estimated: false,
            ttft: Some(Duration::from_millis(210)),
            latency: Duration::from_millis(950),
            fallback_used: attempts.len() > 1,
            finish_reason: None,
            attempts,
            rescues: Vec::new(),
        }
    }

    #[test]
    fn maps_every_field() {
        let ctx = CallContext::new("alice")
            .with_correlation("req-1")
            .with_run("run-1")
            .with_session(Some("s-1".into()))
            .with_stage(Process::MagicSpark);
        let records = records_of(
            &outcome(
                RouteStatus::Succeeded,
                vec![attempt("gpt-5.4-mini", None, 100, 1234)],
            ),
            &ctx,
            Some(Process::MagicSpark),
        );
        let [rec] = records.as_slice() else {
            panic!("one call, one record: {records:?}");
        };
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
        assert_eq!((rec.attempt, rec.attempts), (1, 1));
        assert!(rec.success);
        assert_eq!(rec.run_id.as_deref(), Some("run-1"));
        assert_eq!(rec.stage.as_deref(), Some("magicSpark"));
        assert_eq!(rec.session_id.as_deref(), Some("s-1"));
    }

    #[test]
    fn every_call_of_a_fallback_is_its_own_record_and_usage_is_never_folded() {
        let ctx = CallContext::new("u").with_correlation("req-2");
        let overloaded = AttemptError::Provider(ProviderError::Http {
            provider: ProviderKind::OpenAi,
            status: 529,
            error_type: None,
            code: None,
            message: "Overloaded".into(),
            retry_after: None,
            request_id: None,
        });
        let skipped = AttemptError::CircuitOpen {
            model: "skipped".into(),
            until: None,
            account: None,
        };
        let records = records_of(
            &outcome(
                RouteStatus::Succeeded,
                vec![
                    attempt("primary", Some(overloaded), 16, 500),
                    attempt("skipped", Some(skipped), 0, 0),
                    attempt("fallback", None, 9, 700),
                ],
            ),
            &ctx,
            None,
        );
        assert_eq!(
            records.len(),
            2,
            "a model skipped without a call has no record"
        );
        let (first, last) = (&records[0], &records[1]);
        assert_eq!(first.status, RequestStatus::Retried);
        assert_eq!(first.error_kind.as_deref(), Some("overloaded"));
        assert_eq!((first.model.as_str(), first.input_tokens), ("primary", 16));
        assert_eq!(first.cost_pico_usd, 500);
        assert!(!first.fallback_used);
        assert_eq!(last.status, RequestStatus::Succeeded);
        assert_eq!((last.model.as_str(), last.input_tokens), ("fallback", 9));
        assert_eq!(last.cost_pico_usd, 700);
        assert!(last.fallback_used);
        assert_eq!((first.attempt, last.attempt), (1, 2));
        assert_eq!(
            (first.attempts, last.attempts),
            (1, 2),
            "a retried record counts the calls made when it was recorded"
        );
        assert_eq!(
            (first.request_id.as_str(), last.request_id.as_str()),
            ("id-primary", "id-fallback"),
            "each record has the id its call drew"
        );
        assert!(
            records
                .iter()
                .all(|r| r.correlation_id.as_deref() == Some("req-2"))
        );
        assert_ne!(first.request_id, last.request_id);
    }

    #[test]
    fn failed_and_cancelled_calls_say_why() {
        let ctx = CallContext::new("u");
        let records = records_of(
            &outcome(
                RouteStatus::Cancelled,
                vec![attempt("m", Some(AttemptError::Cancelled), 100, 1234)],
            ),
            &ctx,
            None,
        );
        let rec = &records[0];
        assert_eq!(rec.status.as_str(), "cancelled");
        assert_eq!(rec.process, "direct");
        assert_eq!(rec.stage, None);
        assert_eq!(rec.cost_pico_usd, 1234, "a cancelled call keeps its cost");
        let circuit = AttemptError::CircuitOpen {
            model: "m".into(),
            until: None,
            account: None,
        };
        let records = records_of(
            &outcome(RouteStatus::Failed, vec![attempt("m", Some(circuit), 0, 0)]),
            &ctx,
            None,
        );
        let [rec] = records.as_slice() else {
            panic!("a route that reached no model still has one record: {records:?}");
        };
        assert_eq!((rec.attempt, rec.attempts), (0, 0), "it made no call");
        assert!(!rec.success);
        assert_eq!(rec.error_kind.as_deref(), Some("circuit_open"));
    }
}
