//! The state machine of one route: pick a model, wait if it is a retry, call it under the
//! TTFT and stall deadlines, commit at first content, account every attempt, end with exactly
//! one terminal event, or report to the observer when the caller drops the stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use agents::Process;
use futures::Stream;
use tokio::time::{Instant, Sleep};

use crate::admission::{FirstCall, Prepaid};
use crate::budgets::{BudgetDenied, SpendAccount, SpendHold, worst_case_cost};
use crate::catalog::{MidStreamFailover, ModelSpec, RescuePolicy};
use crate::cost::Cost;
use crate::limits::{BudgetExceeded, ProviderHold, estimate_tokens, reserve_shared};
use crate::provider::{ChatRequest, EventStream, ProviderError, SharedProvider};
use crate::stream::{FaultClass, FinishReason, ProviderEvent, ProviderKind, Usage};
use crate::tokenize::{count_prompt_tokens, count_tokens, estimate_prompt_tokens};

use super::attempt::{AttemptError, AttemptMeter, AttemptRecord, wall_clock};
use super::breaker::{Admission, OpenReason, Refusal};
use super::outcome::{AttemptSummary, Rescue, RouteError, RouteFailure, RouteOutcome, RouteStatus};
use super::seam::{Seam, continuation};
use super::{
    CallFailed, CallStart, Funding, InSpan, Providers, RouteEvent, RouteObserver, RouteOptions,
    RouteRequest, Shared, deadline_in,
};

/// A model the route may call, with its provider resolved.
struct Candidate {
    spec: Arc<ModelSpec>,
    provider: SharedProvider,
}

/// What a route will try, fixed before it starts.
pub(super) struct Plan {
    process: Option<Process>,
    /// The route's first choice, even when its provider is missing (none when the route has no
    /// model at all).
    primary: Option<Arc<ModelSpec>>,
    candidates: Vec<Candidate>,
    /// Models left out because their provider is not configured, first one first.
    unavailable: Vec<RouteError>,
    request: RouteRequest,
    options: RouteOptions,
    /// Told about each call, and about the route if its caller drops it before the terminal
    /// event.
    observer: Option<Arc<dyn RouteObserver>>,
    /// The prompt's estimated tokens, worked out once per route (every call sends the same
    /// prompt) and only when a provider budget or an observer needs it.
    prompt_estimate: OnceLock<u64>,
    /// Whose dollar budgets each attempt reserves from, if any.
    spend: Option<SpendAccount>,
    /// Reservations made at admission, for the first attempt.
    first_call: FirstCall,
    /// What to do when the committed stream breaks after content.
    rescue: RescuePolicy,
}

impl Plan {
    pub(super) fn new(
        providers: &Providers,
        process: Option<Process>,
        models: &[&Arc<ModelSpec>],
        request: RouteRequest,
        options: RouteOptions,
        observer: Option<Arc<dyn RouteObserver>>,
        rescue: RescuePolicy,
    ) -> Self {
        let mut candidates = Vec::with_capacity(models.len());
        let mut unavailable = Vec::new();
        for spec in models {
            match providers.get(spec.provider) {
                Some(provider) => candidates.push(Candidate {
                    spec: Arc::clone(spec),
                    provider: provider.clone(),
                }),
                None => unavailable.push(RouteError::NoProvider {
                    provider: spec.provider,
                    model: spec.id.clone(),
                }),
            }
        }
        Self {
            process,
            primary: models.first().map(|m| Arc::clone(m)),
            candidates,
            unavailable,
            request,
            options,
            observer,
            prompt_estimate: OnceLock::new(),
            spend: None,
            first_call: FirstCall::default(),
            rescue: match rescue.mode {
                MidStreamFailover::Restart if options.continue_only => RescuePolicy {
                    mode: MidStreamFailover::Continue,
                    ..rescue
                },
                _ => rescue,
            },
        }
    }

    pub(super) fn funded(mut self, funding: Funding) -> Self {
        self.spend = funding.spend;
        self.first_call = funding.first_call;
        self
    }

    fn chat_request(&self, spec: &ModelSpec) -> ChatRequest {
        let wanted = self
            .request
            .max_output_tokens
            .unwrap_or(spec.max_output_tokens);
        ChatRequest {
            model: spec.id.clone(),
            system: self.request.system.clone(),
            messages: self.request.messages.clone(),
            max_output_tokens: wanted.clamp(1, spec.max_output_tokens),
            temperature: self.request.temperature,
            response_schema: self.request.response_schema.clone(),
        }
    }

    /// The id of the route's first choice ("" when it has none).
    fn primary_id(&self) -> &str {
        self.primary.as_ref().map_or("", |m| m.id.as_str())
    }

    fn prompt_tokens(&self) -> u64 {
        count_prompt_tokens(self.request.system.as_deref(), &self.request.messages)
    }

    /// The prompt's tokens by length, without the tokenizer (what budgets reserve and intents
    /// bill): nanoseconds, where counting would cost CPU before every call.
    fn prompt_estimate(&self) -> u64 {
        *self.prompt_estimate.get_or_init(|| {
            estimate_prompt_tokens(self.request.system.as_deref(), &self.request.messages)
        })
    }
}

/// The attempt being made right now.
struct InFlight {
    idx: usize,
    meter: AttemptMeter,
    admission: Admission,
    /// What the attempt reserved of its provider's budget; settled with its usage at the end.
    reservation: Option<ProviderHold>,
    /// What the attempt reserved of the caller's dollar budgets; settled to its cost at the end.
    spend: Option<SpendHold>,
    span: tracing::Span,
    started: Instant,
    /// The messages sent when they are not the plan's (a continuation of a cut answer).
    continued: Option<Vec<crate::provider::ChatMessage>>,
}

/// A provider budget (ours, in process or shared) had no room for an attempt on `provider`.
fn provider_refused(provider: ProviderKind, refused: BudgetExceeded) -> Skip {
    Skip::Budget(AttemptError::BudgetRefused {
        provider,
        which: refused.which,
        retry_after: refused.retry_after,
    })
}

/// An attempt's hold on the caller's dollar budgets, and on its provider's shared budget.
type Reserved = (
    Result<Option<SpendHold>, BudgetDenied>,
    Result<Option<ProviderHold>, Skip>,
);

/// Why a picked model was not called.
enum Skip {
    Circuit(Refusal),
    Budget(AttemptError),
}

/// How starting an attempt on a picked model went.
enum Started {
    /// The call is to be made: the provider and the request.
    Calling(SharedProvider, ChatRequest),
    /// The model was skipped (circuit open, provider budget full); pick the next.
    Skipped,
    /// The caller's dollar budget has no room: the route ends with this error.
    Denied(RouteError),
}

/// How opening an attempt on a picked model went.
enum Opened {
    Calling(Calling),
    /// The model was skipped (circuit open, provider budget full); pick the next.
    Skipped,
    /// The caller's dollar budget has no room: the route ends with this terminal event.
    Denied(RouteEvent),
}

/// A call in flight: its provider's events, and the deadlines of its first bytes.
struct Calling {
    provider: ProviderKind,
    events: InSpan<EventStream>,
    header_deadline: Instant,
    ttft_deadline: Instant,
}

/// How an attempt ended: its finish reason and whether the terminator was missing, or its
/// error.
type AttemptEnd = Result<(FinishReason, bool), ProviderError>;

/// What happened to one provider event.
enum Step {
    Nothing,
    Forward(RouteEvent),
    End(AttemptEnd),
}

/// The mutable state of one route. It is also the cancellation guard: when the caller drops
/// the stream before the terminal event, `Drop` reports a `Cancelled` outcome to the observer.
struct RouteRun {
    shared: Arc<Shared>,
    plan: Plan,
    started: Instant,
    attempts: Vec<AttemptRecord>,
    /// Per candidate, in plan order: turns taken, quick retries used, whether skipped for the
    /// rest of the route, earliest next call. One list, so an open stream keeps one allocation.
    per: Vec<PerCandidate>,
    cursor: usize,
    /// When the whole route must be over (`RouterConfig::request_timeout`).
    deadline: Instant,
    /// A candidate to call again at once, after a blip (a plain 5xx, a broken connection).
    retry_same: Option<usize>,
    /// Whether the next call is such a quick retry (a short jitter instead of the backoff).
    quick_next: bool,
    in_flight: Option<InFlight>,
    /// The candidate whose content the caller is receiving, and when its first delta came.
    committed: Option<(usize, Instant)>,
    text: String,
    /// When the caller received its first content, kept across rescues (`committed` moves to
    /// the call that took over).
    first_content: Option<Instant>,
    /// Streams that broke after content and were handed to another call.
    rescues: Vec<Rescue>,
    /// A rescue decided when a stream broke, announced once the next model is picked.
    pending_rescue: Option<Box<Rescue>>,
    /// Content bytes the running attempt has forwarded to the caller.
    forwarded_bytes: usize,
    /// Everything the caller received, kept when the policy continues cut answers (the next
    /// call must be told the text).
    sent: String,
    /// Set once a stream was cut under `continue`. Boxed, like `pending_rescue`: rare, and
    /// otherwise room kept in every open stream.
    continued: Option<Box<Continued>>,
    /// The running continuation's start, held until its overlap with `sent` is known.
    seam: Option<Box<Seam>>,
    done: bool,
    /// The route's span (the one its stream runs in): its outcome is recorded on it.
    span: tracing::Span,
}

/// What a route carries on from the streams cut under `continue`.
#[derive(Debug, Default)]
struct Continued {
    /// The text every next call continues.
    from: String,
    /// Usage of the cut calls whose text a continuation carries on: the caller is shown the
    /// sum, as it was shown one answer.
    usage: Usage,
    /// How many attempts (from the first) `usage` covers.
    upto: usize,
}

/// Where a route stands with one of its candidates.
#[derive(Debug, Clone, Copy, Default)]
struct PerCandidate {
    /// Turns taken on it: calls, and provider-budget skips (a circuit-open skip takes none).
    tried: u32,
    quick_used: u32,
    excluded: bool,
    not_before: Option<Instant>,
}

/// The event stream of one route, whose outcome is recorded on `span`.
pub(super) fn route(
    shared: Arc<Shared>,
    plan: Plan,
    span: tracing::Span,
) -> impl Stream<Item = RouteEvent> + Send {
    // Built here and used in place by the generator: a generator keeps the slot of every value
    // it captures for its whole life, so building the run inside it from a captured `plan` kept
    // a dead copy of the plan (304 bytes) beside the run in every open stream. A route dropped
    // before its first poll is therefore reported as cancelled, with no attempt to record, and
    // the route's clock (its request timeout) starts when it is opened.
    let mut run = RouteRun::new(shared, plan, span);
    async_stream::stream! {
        if run.plan.candidates.is_empty() {
            let error = run.plan.unavailable.first().cloned().unwrap_or(
                RouteError::AllAttemptsFailed { attempts: Vec::new() },
            );
            yield run.fail(error);
            return;
        }
        run.shared.budget.deposit();
        'pick: loop {
            let Some(idx) = run.pick() else {
                let error = RouteError::AllAttemptsFailed { attempts: run.summaries() };
                yield run.fail(error);
                return;
            };
            if let Some(mut rescue) = run.pending_rescue.take() {
                rescue.to.clone_from(&run.plan.candidates[idx].spec.id);
                tracing::info!(mode = rescue.mode.as_str(), from = %rescue.from, to = %rescue.to, reason = %rescue.reason, delivered_bytes = rescue.delivered_bytes as u64, "rescue");
                run.rescues.push(Rescue::clone(&rescue));
                yield RouteEvent::Rescue(rescue);
            } else if run.falls_back_to(idx) {
                yield run.fallback_event(idx);
            }
            if run.per[idx].tried > 0 {
                if !run.shared.budget.withdraw() {
                    let error = RouteError::RetryBudgetExhausted { attempts: run.summaries() };
                    yield run.fail(error);
                    return;
                }
                let wait = run.retry_wait(idx);
                if Instant::now() + wait >= run.deadline {
                    let error = run.deadline_error();
                    yield run.fail(error);
                    return;
                }
                tracing::info!(model = %run.plan.candidates[idx].spec.id, wait_ms = wait.as_millis() as u64, quick = run.quick_next, "retry");
                tokio::time::sleep(wait).await;
            }
            run.quick_next = false;
            // The generator keeps, in every open stream, a slot for each local that lives across
            // a `yield` or an `.await` (one that is borrowed, or partly moved, counts until its
            // scope closes), and a shared one for each that lives across two. So the attempt's
            // values are scoped to the block that needs them, its events are polled by
            // `poll_call`, a plain function, and nothing a step returns is borrowed or matched in
            // place across a `yield`.
            let terminal = 'attempt: {
                let mut call = {
                    // Boxed: done before the first token, while the generator would otherwise
                    // keep room for this future (about 660 bytes) in every open stream.
                    let reserved = Box::pin(run.reserve(idx)).await;
                    match run.open_attempt(idx, reserved) {
                        Opened::Calling(call) => call,
                        Opened::Skipped => continue 'pick,
                        Opened::Denied(terminal) => break 'attempt terminal,
                    }
                };
                // One timer per attempt, moved after each event: a fresh `timeout_at` per chunk
                // registered and removed a timer-wheel entry (under the driver's lock) for every
                // chunk that had to wait, while moving a registered deadline later is a single
                // atomic update.
                let timer = tokio::time::sleep_until(run.call_deadline(&call));
                tokio::pin!(timer);
                let end = loop {
                    let event = match std::future::poll_fn(|cx| run.poll_call(cx, &mut call, timer.as_mut())).await {
                        Ok(event) => event,
                        Err(end) => break end,
                    };
                    yield event;
                };
                // Close the provider's connection before any backoff.
                drop(call);
                // Read, not borrowed: `is_ok` would borrow `end` and keep its slot (120 bytes)
                // in the generator across the seam's `yield` below.
                #[expect(clippy::redundant_pattern_matching, reason = "a borrow keeps the slot")]
                let finished = matches!(end, Ok(_));
                let ended = if finished
                    && let Some(rest) = run.release_seam()
                {
                    // Rare (a continuation's held-back start): the end waits in a box rather
                    // than in a slot of every open stream.
                    let end = Box::new(end);
                    yield RouteEvent::Delta(rest);
                    run.end_attempt(*end)
                } else {
                    run.end_attempt(end)
                };
                match ended {
                    Some(terminal) => terminal,
                    None => continue 'pick,
                }
            };
            yield terminal;
            return;
        }
    }
}

impl RouteRun {
    fn new(shared: Arc<Shared>, plan: Plan, span: tracing::Span) -> Self {
        let n = plan.candidates.len();
        Self {
            plan,
            started: Instant::now(),
            attempts: Vec::new(),
            per: vec![PerCandidate::default(); n],
            cursor: 0,
            deadline: deadline_in(shared.config.request_timeout),
            shared,
            retry_same: None,
            quick_next: false,
            in_flight: None,
            committed: None,
            text: String::new(),
            first_content: None,
            rescues: Vec::new(),
            pending_rescue: None,
            forwarded_bytes: 0,
            sent: String::new(),
            continued: None,
            seam: None,
            done: false,
            span,
        }
    }

    /// The next candidate in round-robin order that is not skipped, while turns remain.
    fn pick(&mut self) -> Option<usize> {
        if !self.turns_left() {
            return None;
        }
        if let Some(idx) = self.retry_same.take()
            && !self.per[idx].excluded
        {
            self.quick_next = true;
            return Some(idx);
        }
        let n = self.plan.candidates.len();
        let idx = (0..n)
            .map(|k| (self.cursor + k) % n)
            .find(|&i| !self.per[i].excluded)?;
        self.cursor = idx + 1;
        Some(idx)
    }

    /// Whether calling `idx` is a fallback to announce: a different model than the last one
    /// tried, or than the primary when the primary's provider is missing.
    fn falls_back_to(&self, idx: usize) -> bool {
        let to = &self.plan.candidates[idx].spec.id;
        match self.attempts.last() {
            Some(last) => &last.model != to,
            None => !self.plan.unavailable.is_empty() && self.plan.primary_id() != to,
        }
    }

    /// The `Fallback` event of calling `idx` (see [`Self::falls_back_to`]), logged here.
    fn fallback_event(&self, idx: usize) -> RouteEvent {
        let to = self.plan.candidates[idx].spec.id.clone();
        let (from, reason) = match self.attempts.last() {
            Some(last) => (
                last.model.clone(),
                last.error
                    .as_ref()
                    .map_or_else(|| "previous attempt ended".to_owned(), ToString::to_string),
            ),
            None => (
                self.plan.primary_id().to_owned(),
                self.plan
                    .unavailable
                    .first()
                    .map_or_else(String::new, ToString::to_string),
            ),
        };
        tracing::info!(from = %from, to = %to, reason = %reason, "fallback");
        RouteEvent::Fallback { from, to, reason }
    }

    /// The request for candidate `idx`: the plan's, extended to continue a cut answer after a
    /// `continue` rescue.
    fn request_for(&self, idx: usize) -> ChatRequest {
        let spec = &self.plan.candidates[idx].spec;
        let mut request = self.plan.chat_request(spec);
        if let Some(Continued { from: sent, .. }) = self.continued.as_deref() {
            continuation(&mut request.messages, sent, spec.prefill);
            // The caller's output cap is for the whole answer: what was sent already counts.
            request.max_output_tokens = request
                .max_output_tokens
                .saturating_sub(u32::try_from(count_tokens(sent)).unwrap_or(u32::MAX))
                .max(1);
        }
        request
    }

    /// Full-jitter exponential backoff for this model's next retry, but never before its
    /// `retry-after` has passed.
    fn retry_wait(&self, idx: usize) -> Duration {
        let config = &self.shared.config;
        if self.quick_next {
            // A blip: one quick, jittered retry of the same model before the fallback.
            let ceiling_ns = u64::try_from(config.quick_retry_delay.as_nanos()).unwrap_or(u64::MAX);
            return Duration::from_nanos(rand::random_range(0..=ceiling_ns));
        }
        let retries_before = self.per[idx].tried.saturating_sub(1).min(30);
        let ceiling = config
            .backoff_base
            .saturating_mul(1u32 << retries_before)
            .min(config.backoff_cap);
        let ceiling_ns = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        let jitter = Duration::from_nanos(rand::random_range(0..=ceiling_ns));
        let hold = self.per[idx]
            .not_before
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        jitter.max(hold)
    }

    /// What admission reserved for this route's first attempt, if it goes to `idx` with the same
    /// figures (model, worst case, tokens). The slot is emptied either way, so a later attempt or
    /// call never finds it; reservations not used here are returned as they drop.
    fn prepaid_for(&self, idx: usize) -> Option<Prepaid> {
        let prepaid = self.plan.first_call.take()?;
        let spec = &self.plan.candidates[idx].spec;
        if prepaid.model != spec.id {
            return None;
        }
        let request = self.request_for(idx);
        let same = prepaid.amount == worst_case_cost(&request, &spec.pricing)
            && prepaid.tokens == estimate_tokens(&request);
        same.then_some(prepaid)
    }

    /// What the attempt on `idx` holds of the caller's dollar budgets and of a shared provider
    /// budget. Both are asked at once: with Redis both are round trips, and waiting for one
    /// before sending the other would put two on the way to the first token. When one refuses,
    /// the caller gives the other's hold back (a provider request already counted stays
    /// counted). The first attempt may find both reserved already, at admission.
    async fn reserve(&self, idx: usize) -> Reserved {
        match self.prepaid_for(idx) {
            Some(prepaid) => self.use_prepaid(idx, prepaid).await,
            None => futures::join!(self.reserve_spend(idx), self.reserve_shared_rates(idx)),
        }
    }

    /// The prepaid reservations as this attempt's own, answered as [`Self::reserve_spend`] and
    /// [`Self::reserve_shared_rates`] would have. Dollars not reserved at admission (none
    /// are when the provider refused) are reserved here if the attempt goes ahead.
    async fn use_prepaid(&self, idx: usize, prepaid: Prepaid) -> Reserved {
        let (spend, provider) = prepaid.take();
        let provider = match provider {
            None => Ok(None),
            Some(Ok(hold)) => Ok(Some(hold)),
            Some(Err(refused)) => Err(provider_refused(
                self.plan.candidates[idx].spec.provider,
                refused,
            )),
        };
        let spend = match spend {
            Some(hold) => Ok(Some(hold)),
            None if provider.is_ok() => self.reserve_spend(idx).await,
            None => Ok(None),
        };
        (spend, provider)
    }

    /// Reserves the worst case of the next attempt on `idx` from the caller's dollar budgets.
    async fn reserve_spend(&self, idx: usize) -> Result<Option<SpendHold>, BudgetDenied> {
        let Some(account) = &self.plan.spend else {
            return Ok(None);
        };
        let spec = &self.plan.candidates[idx].spec;
        let worst = worst_case_cost(&self.request_for(idx), &spec.pricing);
        account.reserve(worst).await.map(Some)
    }

    /// Reserves the next attempt's tokens in the shared provider budget, when the router has
    /// one (`Ok(None)` otherwise, or when it is down and limits fail open).
    async fn reserve_shared_rates(&self, idx: usize) -> Result<Option<ProviderHold>, Skip> {
        let (Some((store, when_down)), Some(rates)) =
            (&self.shared.shared_rates, self.shared.config.provider_rates)
        else {
            return Ok(None);
        };
        let spec = &self.plan.candidates[idx].spec;
        let tokens = estimate_tokens(&self.request_for(idx));
        match reserve_shared(store, *when_down, spec.provider, rates, tokens).await {
            Ok(hold) => Ok(hold.map(ProviderHold::Shared)),
            Err(refused) => Err(provider_refused(spec.provider, refused)),
        }
    }

    /// Takes what [`Self::reserve`] got for candidate `idx` and starts the attempt: money
    /// first, as a call the budget has no room for is never made, on any model.
    fn start_attempt(&mut self, idx: usize, (spend, shared): Reserved) -> Started {
        let spend = match spend {
            Ok(hold) => hold,
            Err(denied) => {
                if let Ok(Some(hold)) = shared {
                    hold.settle(0);
                }
                // On the books as the model it would have called, refused by the budget.
                let spec = &self.plan.candidates[idx].spec;
                let refused = AttemptRecord::skipped(
                    spec.provider,
                    &spec.id,
                    AttemptError::Spend(denied.clone()),
                );
                self.attempts.push(refused);
                return Started::Denied(RouteError::Budget {
                    denied,
                    attempts: self.summaries(),
                });
            }
        };
        let shared = match shared {
            Ok(hold) => hold,
            Err(skip) => {
                if let Some(hold) = spend {
                    hold.settle(Cost::ZERO);
                }
                self.per[idx].tried += 1;
                self.skip(idx, skip);
                return Started::Skipped;
            }
        };
        match self.begin_attempt(idx, spend, shared) {
            Ok((provider, request)) => Started::Calling(provider, request),
            Err(skip) => {
                self.skip(idx, skip);
                Started::Skipped
            }
        }
    }

    /// Starts the attempt on `idx` with what [`Self::reserve`] got, and opens its provider's
    /// stream inside the attempt's span (so the provider's request carries its traceparent).
    fn open_attempt(&mut self, idx: usize, reserved: Reserved) -> Opened {
        let (provider, request) = match self.start_attempt(idx, reserved) {
            Started::Calling(provider, request) => (provider, request),
            Started::Skipped => return Opened::Skipped,
            Started::Denied(error) => return Opened::Denied(self.fail(error)),
        };
        let span = self
            .in_flight
            .as_ref()
            .map_or_else(tracing::Span::none, |f| f.span.clone());
        let inner = span.in_scope(|| provider.stream(request));
        let config = &self.shared.config;
        Opened::Calling(Calling {
            provider: provider.kind(),
            events: InSpan { inner, span },
            header_deadline: deadline_in(config.header_timeout),
            ttft_deadline: deadline_in(config.ttft_timeout),
        })
    }

    /// When the running call times out as it stands: its headers and first token by their
    /// deadlines, then a stall counted from its last event, never past the route's deadline.
    fn call_deadline(&self, call: &Calling) -> Instant {
        let (content, opened) = self.progress();
        if content {
            deadline_in(self.shared.config.stall_timeout)
        } else if opened {
            call.ttft_deadline
        } else {
            call.header_deadline.min(call.ttft_deadline)
        }
        .min(self.deadline)
    }

    /// Takes the running call's events until one is for the caller (`Ok`) or the call ended
    /// (`Err`), its stream first: an event that is ready wins over a deadline that passed.
    /// `timer` is armed at [`Self::call_deadline`] and moved after each event.
    fn poll_call(
        &mut self,
        cx: &mut Context<'_>,
        call: &mut Calling,
        mut timer: Pin<&mut Sleep>,
    ) -> Poll<Result<RouteEvent, AttemptEnd>> {
        loop {
            let event = match Pin::new(&mut call.events).poll_next(cx) {
                Poll::Ready(Some(event)) => event,
                Poll::Ready(None) => ProviderEvent::Error(ProviderError::Truncated {
                    provider: call.provider,
                    detail: "the provider stream ended without a terminal event".into(),
                }),
                Poll::Pending => {
                    ready!(timer.as_mut().poll(cx));
                    let (content, opened) = self.progress();
                    ProviderEvent::Error(self.timed_out(
                        call.provider,
                        content,
                        opened,
                        call.header_deadline,
                        call.ttft_deadline,
                    ))
                }
            };
            let forward = match self.on_event(event) {
                Step::Nothing => None,
                Step::Forward(event) => Some(event),
                Step::End(end) => return Poll::Ready(Err(end)),
            };
            let deadline = self.call_deadline(call);
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if let Some(event) = forward {
                return Poll::Ready(Ok(event));
            }
        }
    }

    /// Asks the model's breaker, then its provider's budget, then opens the attempt's books.
    /// A model skipped here made no call: its reservations settle to nothing.
    fn begin_attempt(
        &mut self,
        idx: usize,
        spend: Option<SpendHold>,
        shared: Option<ProviderHold>,
    ) -> Result<(SharedProvider, ChatRequest), Skip> {
        let candidate = &self.plan.candidates[idx];
        let admission = match self.shared.breakers.admit(&candidate.spec.id) {
            Ok(admission) => admission,
            Err(refusal) => {
                if let Some(hold) = spend {
                    hold.settle(Cost::ZERO);
                }
                if let Some(hold) = shared {
                    hold.settle(0);
                }
                return Err(Skip::Circuit(refusal));
            }
        };
        let request = self.request_for(idx);
        let local = match (&shared, self.shared.shared_rates.is_some()) {
            (Some(_), _) | (None, true) => None,
            (None, false) => self.shared.provider_budgets.get(&candidate.spec.provider),
        };
        let reservation = match local {
            None => shared,
            Some(budget) => match budget.reserve(estimate_tokens(&request)) {
                Ok(reservation) => Some(ProviderHold::Local(reservation)),
                Err(refused) => {
                    if let Some(hold) = spend {
                        hold.settle(Cost::ZERO);
                    }
                    // Our own limit, not the model's health: the breaker hears nothing of it.
                    self.shared
                        .breakers
                        .on_neutral(&candidate.spec.id, admission);
                    self.per[idx].tried += 1;
                    return Err(provider_refused(candidate.spec.provider, refused));
                }
            },
        };
        self.per[idx].tried += 1;
        let attempt = self.attempts.len() + 1;
        let span = attempt_span(&candidate.spec, self.plan.process, attempt, admission);
        if self.shared.config.capture_content {
            span.record("gen_ai.input.messages", input_messages(&request).as_str());
        }
        // The record's id is drawn now, so the call's intent and its record share it.
        let meter = AttemptMeter::new(
            uuid::Uuid::now_v7().to_string(),
            Arc::clone(&candidate.spec),
            self.plan.options.keep_text,
        );
        if let Some(observer) = &self.plan.observer {
            let started_at = meter.started_at();
            observer.on_call_start(&CallStart {
                record_id: meter.record_id(),
                provider: candidate.spec.provider,
                model: &candidate.spec.id,
                pricing: &candidate.spec.pricing,
                call: self.calls_made() + 1,
                started_at,
                request_started_at: self.first_call_start().unwrap_or(started_at),
                prompt_tokens: self.plan.prompt_estimate(),
                earlier: &self.attempts,
                spend: spend.as_ref().and_then(SpendHold::held),
            });
        }
        let provider = candidate.provider.clone();
        self.forwarded_bytes = 0;
        self.seam = self
            .continued
            .as_deref()
            .map(|c| Box::new(Seam::new(&c.from, candidate.spec.prefill)));
        let continued = self.continued.is_some().then(|| request.messages.clone());
        self.in_flight = Some(InFlight {
            idx,
            meter,
            admission,
            reservation,
            spend,
            span,
            started: Instant::now(),
            continued,
        });
        Ok((provider, request))
    }

    /// Attempts so far that reached a model (skipped models made no call).
    fn calls_made(&self) -> u32 {
        self.attempts.iter().filter(|a| made_call(a)).count() as u32
    }

    /// When the route's first call started, once there was one.
    fn first_call_start(&self) -> Option<SystemTime> {
        self.attempts
            .iter()
            .find(|a| made_call(a))
            .map(|a| a.started_at)
    }

    /// Records a model that was not called. An open circuit drops it from this route (its
    /// cool-down is far longer than a route lasts); a spent budget holds it until the budget
    /// has room, or drops it when that is further off than `max_retry_after`.
    fn skip(&mut self, idx: usize, skip: Skip) {
        let spec = &self.plan.candidates[idx].spec;
        let error = match skip {
            Skip::Circuit(refusal) => {
                let (until, account) = match refusal {
                    Refusal::OpenUntil(at, OpenReason::Account(kind)) => {
                        (Some(wall_clock(at)), Some(kind))
                    }
                    Refusal::OpenUntil(at, OpenReason::Failures) => (Some(wall_clock(at)), None),
                    Refusal::TrialInFlight => (None, None),
                };
                self.per[idx].excluded = true;
                AttemptError::CircuitOpen {
                    model: spec.id.clone(),
                    until,
                    account,
                }
            }
            Skip::Budget(error) => {
                if let AttemptError::BudgetRefused { retry_after, .. } = &error {
                    if *retry_after > self.shared.config.max_retry_after {
                        self.per[idx].excluded = true;
                    } else {
                        self.per[idx].not_before = Some(deadline_in(*retry_after));
                    }
                }
                error
            }
        };
        let event = if matches!(error, AttemptError::CircuitOpen { .. }) {
            "breaker skip"
        } else {
            "budget skip"
        };
        tracing::warn!(model = %spec.id, error = %error, "{event}");
        self.attempts
            .push(AttemptRecord::skipped(spec.provider, &spec.id, error));
    }

    /// Whether the running attempt has sent content, and whether its stream opened.
    fn progress(&self) -> (bool, bool) {
        self.in_flight.as_ref().map_or((false, false), |f| {
            (f.meter.has_content(), f.meter.is_open())
        })
    }

    /// Which deadline fired for the running attempt. Every one of them drops the attempt's
    /// stream, and with it the upstream connection.
    fn timed_out(
        &self,
        provider: ProviderKind,
        content: bool,
        opened: bool,
        header_deadline: Instant,
        ttft_deadline: Instant,
    ) -> ProviderError {
        let config = &self.shared.config;
        let now = Instant::now();
        if now >= self.deadline {
            ProviderError::Deadline {
                provider,
                after: config.request_timeout,
            }
        } else if content {
            ProviderError::Stalled {
                provider,
                after: config.stall_timeout,
            }
        } else if !opened && header_deadline <= ttft_deadline && now >= header_deadline {
            ProviderError::HeaderTimeout {
                provider,
                after: config.header_timeout,
            }
        } else {
            ProviderError::FirstTokenTimeout {
                provider,
                after: config.ttft_timeout,
            }
        }
    }

    fn deadline_error(&self) -> RouteError {
        RouteError::DeadlineExceeded {
            after: self.shared.config.request_timeout,
            attempts: self.summaries(),
        }
    }

    fn on_event(&mut self, event: ProviderEvent) -> Step {
        let Some(flight) = self.in_flight.as_mut() else {
            return Step::Nothing;
        };
        match event {
            ProviderEvent::Start { provider, model } => {
                flight.meter.on_open();
                flight.span.record("gen_ai.response.model", model.as_str());
                Step::Forward(RouteEvent::Start {
                    provider,
                    model,
                    attempt: self.attempts.len() as u32 + 1,
                })
            }
            ProviderEvent::Delta(text) if text.is_empty() => Step::Nothing,
            ProviderEvent::Delta(text) => {
                if flight.meter.on_delta(&text) {
                    // Commit: from here on this attempt's content is the answer.
                    self.committed = Some((flight.idx, Instant::now()));
                    flight
                        .span
                        .record("keyvex.ttft_ms", int(millis(flight.started.elapsed())));
                    tracing::debug!(parent: &flight.span, "committed at first content");
                }
                let text = match &mut self.seam {
                    Some(seam) => match seam.push(&text) {
                        Some(released) => {
                            self.seam = None;
                            released
                        }
                        None => return Step::Nothing,
                    },
                    None => text,
                };
                if text.is_empty() {
                    return Step::Nothing;
                }
                self.forwarded_bytes += text.len();
                if self.plan.rescue.mode == MidStreamFailover::Continue {
                    self.sent.push_str(&text);
                }
                Step::Forward(RouteEvent::Delta(text))
            }
            ProviderEvent::Usage(usage) => {
                flight.meter.on_usage(usage);
                Step::Nothing
            }
            ProviderEvent::Done {
                finish_reason,
                unterminated,
            } => Step::End(Ok((finish_reason, unterminated))),
            ProviderEvent::Error(error) => Step::End(Err(error)),
        }
    }

    /// What a continuation held back at its seam, trimmed, when its stream ends before the
    /// window filled.
    fn release_seam(&mut self) -> Option<String> {
        let rest = self.seam.take()?.resolve();
        if rest.is_empty() {
            return None;
        }
        self.forwarded_bytes += rest.len();
        self.sent.push_str(&rest);
        Some(rest)
    }

    /// Closes the running attempt's books; returns the terminal event when the route ends. A
    /// failed call the route goes on from is told to the observer (what it used and cost is
    /// known now, before any backoff).
    fn end_attempt(&mut self, end: AttemptEnd) -> Option<RouteEvent> {
        let before = self.attempts.len();
        let terminal = self.close_attempt(end);
        if terminal.is_none()
            && self.attempts.len() > before
            && let (Some(observer), Some(first), Some(last)) = (
                &self.plan.observer,
                self.attempts.first(),
                self.attempts.last(),
            )
            && let Some(request_started_at) = self.first_call_start()
        {
            observer.on_call_failed(&CallFailed {
                attempt: last,
                first_model: &first.model,
                call: self.calls_made(),
                request_started_at,
            });
        }
        terminal
    }

    fn close_attempt(&mut self, end: AttemptEnd) -> Option<RouteEvent> {
        let InFlight {
            idx,
            meter,
            admission,
            reservation,
            spend,
            span,
            started: _,
            continued,
        } = self.in_flight.take()?;
        let model = self.plan.candidates[idx].spec.id.clone();
        let provider = self.plan.candidates[idx].spec.provider;
        let (finish_reason, error) = match &end {
            Ok((reason, _)) => (Some(reason.clone()), None),
            Err(e) => (None, Some(AttemptError::Provider(e.clone()))),
        };
        let plan = &self.plan;
        let (mut record, text) = meter.finish(finish_reason, error, || match &continued {
            Some(messages) => count_prompt_tokens(plan.request.system.as_deref(), messages),
            None => plan.prompt_tokens(),
        });
        if let Some(reservation) = reservation {
            reservation.settle(record.usage.total());
        }
        record_attempt_end(&span, &record, &end);
        if self.shared.config.capture_content {
            span.record("gen_ai.output.messages", output_messages(&text).as_str());
        }
        if let Some(hold) = spend {
            // The exact number this attempt's record bills.
            hold.settle(record.cost);
        }
        let error = match end {
            Ok((reason, unterminated)) => {
                record.unterminated = unterminated;
                self.shared.breakers.on_success(&model);
                if self.committed.is_none() {
                    // An empty but complete answer is still an answer.
                    self.committed = Some((idx, Instant::now()));
                }
                tracing::info!(parent: &span, cost = %record.cost, estimated = record.usage_estimated, "attempt succeeded");
                self.text = if self.continued.is_some() && self.plan.options.keep_text {
                    self.sent.clone()
                } else {
                    text
                };
                self.attempts.push(record);
                return Some(self.succeed(reason));
            }
            Err(error) => error,
        };
        let class = error.class();
        match class {
            FaultClass::Transient | FaultClass::RateLimited => {
                self.shared.breakers.on_failure(&model, admission);
            }
            FaultClass::Account => {
                // Our account cannot use this model now (quota, billing, key, access): skip it
                // in the next requests too, until the cool-down lets one probe through.
                self.shared.breakers.disable(&model, error.kind());
                self.per[idx].excluded = true;
            }
            FaultClass::Request | FaultClass::ContextTooLong | FaultClass::Deadline => {
                self.shared.breakers.on_neutral(&model, admission);
            }
        }
        tracing::warn!(parent: &span, error = %error, kind = error.kind(), cost = %record.cost, "attempt failed");
        let produced_chars = record.output_chars;
        let usage = record.usage;
        self.attempts.push(record);
        if self.committed.is_some() && self.may_rescue(&error) {
            let mode = self.plan.rescue.mode;
            tracing::info!(parent: &span, mode = mode.as_str(), "stream broke after content: rescuing it on the next model");
            self.first_content = self.first_content.or(self.committed.map(|(_, at)| at));
            self.committed = None;
            self.seam = None;
            self.text.clear();
            if mode == MidStreamFailover::Continue {
                let continued = self.continued.get_or_insert_default();
                continued.from.clone_from(&self.sent);
                continued.usage.add(&usage);
                continued.upto = self.attempts.len();
            }
            self.pending_rescue = Some(Box::new(Rescue {
                mode,
                from: model,
                to: String::new(),
                reason: error.to_string(),
                delivered_bytes: self.forwarded_bytes,
            }));
            return None;
        }
        if self.committed.is_some() {
            self.text = if self.continued.is_some() && self.plan.options.keep_text {
                self.sent.clone()
            } else {
                text
            };
            let error = RouteError::MidStream {
                model,
                provider,
                error,
                produced_chars,
            };
            return Some(self.fail(error));
        }
        match class {
            FaultClass::Deadline => {
                let error = self.deadline_error();
                return Some(self.fail(error));
            }
            FaultClass::ContextTooLong if self.larger_context_available(idx) => {
                tracing::info!(parent: &span, "prompt too long for {model}: trying a model with a larger context window");
                self.per[idx].excluded = true;
                return None;
            }
            FaultClass::Request | FaultClass::ContextTooLong => {
                let error = RouteError::Rejected {
                    model,
                    provider,
                    error,
                    attempts: self.summaries(),
                };
                return Some(self.fail(error));
            }
            FaultClass::Account => return None,
            FaultClass::Transient | FaultClass::RateLimited => {}
        }
        if error.is_blip() && self.per[idx].quick_used < self.shared.config.same_model_retries {
            self.per[idx].quick_used += 1;
            self.retry_same = Some(idx);
            return None;
        }
        if let Some(wait) = error.retry_after() {
            if wait > self.shared.config.max_retry_after {
                tracing::info!(parent: &span, retry_after_ms = wait.as_millis() as u64, "retry-after beyond the cap: skipping the model for this request");
                self.per[idx].excluded = true;
            } else {
                self.per[idx].not_before = Some(deadline_in(wait));
            }
        }
        None
    }

    /// Whether `max_attempts` leaves another turn. A turn is a call, or a provider-budget skip
    /// (unlike [`Self::calls_made`], which counts the calls that reached a model); the
    /// candidates' `tried` counts are the turns taken.
    fn turns_left(&self) -> bool {
        let turns: u32 = self.per.iter().map(|c| c.tried).sum();
        turns < self.shared.config.max_attempts.max(1)
    }

    /// Whether a stream that broke after content may be handed to another call: the policy
    /// allows another rescue, the request's deadline has not passed, and a call is left.
    fn may_rescue(&self, error: &ProviderError) -> bool {
        self.plan.rescue.allows(self.rescues.len() as u32)
            && !matches!(error, ProviderError::Deadline { .. })
            && Instant::now() < self.deadline
            && self.turns_left()
            && self.per.iter().any(|c| !c.excluded)
    }

    /// Whether a candidate not yet ruled out has a larger context window than `idx`'s.
    fn larger_context_available(&self, idx: usize) -> bool {
        let window = self.plan.candidates[idx].spec.context_window;
        self.plan
            .candidates
            .iter()
            .enumerate()
            .any(|(j, c)| j != idx && !self.per[j].excluded && c.spec.context_window > window)
    }

    fn summaries(&self) -> Vec<AttemptSummary> {
        self.attempts
            .iter()
            .filter_map(|a| Some((a.model.clone(), a.provider, a.error.clone()?)))
            .collect()
    }

    /// Ends the route: its terminal `Finished` event.
    fn succeed(&mut self, finish_reason: FinishReason) -> RouteEvent {
        self.done = true;
        let outcome = self.outcome(RouteStatus::Succeeded, Some(finish_reason));
        record_route_end(&self.span, &outcome, "succeeded");
        RouteEvent::Finished(Box::new(outcome))
    }

    /// Ends the route: its terminal `Failed` event.
    fn fail(&mut self, error: RouteError) -> RouteEvent {
        self.done = true;
        tracing::warn!(error = %error, kind = error.kind(), "route failed");
        let outcome = self.outcome(RouteStatus::Failed, None);
        record_route_end(&self.span, &outcome, "failed");
        self.span.record("otel.status_code", "ERROR");
        self.span.record("error.type", error.kind());
        RouteEvent::Failed(Box::new(RouteFailure { outcome, error }))
    }

    fn outcome(&self, status: RouteStatus, finish_reason: Option<FinishReason>) -> RouteOutcome {
        let called = |a: &&AttemptRecord| made_call(a);
        // The answer is the last attempt that made a call (once committed, nothing follows
        // it): its usage is what the caller is shown. Failed attempts keep their own usage and
        // cost in `attempts`, and are billed there, never folded into the answer's.
        let last_call = self.attempts.iter().rposition(made_call);
        let (continued_usage, continued_upto) = self
            .continued
            .as_deref()
            .map_or((Usage::default(), 0), |c| (c.usage, c.upto));
        let mut usage = match last_call {
            // Already in `continued_usage`: the cut call was the last one made.
            Some(i) if i < continued_upto => Usage::default(),
            Some(i) => self.attempts[i].usage,
            None => Usage::default(),
        };
        // A continued answer is one answer to the caller: its usage is every call's that wrote it.
        usage.add(&continued_usage);
        let shown = match self.committed {
            Some((idx, _)) => {
                let spec = &self.plan.candidates[idx].spec;
                Some((spec.provider, spec.id.clone()))
            }
            None => self
                .attempts
                .iter()
                .rev()
                .find(called)
                .or(self.attempts.last())
                .map(|a| (a.provider, a.model.clone())),
        };
        RouteOutcome {
            status,
            text: self.text.clone(),
            provider: shown.as_ref().map(|(p, _)| *p),
            model: shown.map(|(_, m)| m),
            usage,
            cost: self.attempts.iter().map(|a| a.cost).sum(),
            cost_estimated: self.attempts.iter().any(|a| a.usage_estimated),
            ttft: self
                .first_content
                .or(self.committed.map(|(_, at)| at))
                .map(|at| at - self.started),
            latency: self.started.elapsed(),
            fallback_used: self
                .attempts
                .iter()
                .filter(called)
                .any(|a| a.model != self.plan.primary_id()),
            finish_reason,
            attempts: self.attempts.clone(),
            rescues: self.rescues.clone(),
        }
    }
}

impl Drop for RouteRun {
    /// The caller dropped the stream before its terminal event: close the running attempt's
    /// books (the provider may bill what it generated) and tell the observer.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(flight) = self.in_flight.take() {
            let model = &self.plan.candidates[flight.idx].spec.id;
            self.shared.breakers.on_neutral(model, flight.admission);
            let plan = &self.plan;
            let (record, text) = flight
                .meter
                .finish(None, Some(AttemptError::Cancelled), || plan.prompt_tokens());
            if let Some(reservation) = flight.reservation {
                reservation.settle(record.usage.total());
            }
            if let Some(hold) = flight.spend {
                hold.settle(record.cost);
            }
            if self.committed.is_some() {
                self.text = text;
            }
            self.attempts.push(record);
        }
        let outcome = self.outcome(RouteStatus::Cancelled, None);
        record_route_end(&self.span, &outcome, "cancelled");
        tracing::info!(attempts = outcome.attempts.len(), cost = %outcome.cost, "route cancelled by the caller");
        if let Some(observer) = self.plan.observer.take() {
            observer.on_cancelled(outcome);
        }
    }
}

/// The span of one provider call, named and attributed as the OpenTelemetry GenAI semantic
/// conventions ask (`{operation} {model}`, a client span, `gen_ai.*`); the response fields are
/// filled in as the attempt goes.
fn attempt_span(
    spec: &ModelSpec,
    process: Option<Process>,
    attempt: usize,
    admission: Admission,
) -> tracing::Span {
    let empty = tracing::field::Empty;
    tracing::info_span!(
        "attempt",
        otel.name = %format_args!("chat {}", spec.id),
        otel.kind = "client",
        otel.status_code = empty,
        process = %process.map_or("-", Process::key),
        model = %spec.id,
        provider = %spec.provider,
        attempt = attempt as i64,
        trial = admission == Admission::Trial,
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = spec.provider.as_str(),
        gen_ai.request.model = %spec.id,
        gen_ai.response.model = empty,
        gen_ai.usage.input_tokens = empty,
        gen_ai.usage.output_tokens = empty,
        gen_ai.input.messages = empty,
        gen_ai.output.messages = empty,
        keyvex.usage.cached_input_tokens = empty,
        keyvex.usage.estimated = empty,
        keyvex.cost_usd = empty,
        keyvex.ttft_ms = empty,
        error.type = empty,
    )
}

/// Counts as signed integers: `tracing-opentelemetry` exports an unsigned field as a string,
/// and the conventions want token counts as ints.
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Usage, cost, finish reason and error of an ended attempt, on its span.
fn record_attempt_end(
    span: &tracing::Span,
    record: &AttemptRecord,
    end: &Result<(FinishReason, bool), ProviderError>,
) {
    span.record("gen_ai.usage.input_tokens", int(record.usage.input));
    span.record("gen_ai.usage.output_tokens", int(record.usage.output));
    span.record(
        "keyvex.usage.cached_input_tokens",
        int(record.usage.cached_input),
    );
    span.record("keyvex.usage.estimated", record.usage_estimated);
    span.record("keyvex.cost_usd", record.cost.usd());
    match end {
        Ok((reason, _)) => {
            // A string array in the conventions; `tracing` fields cannot hold one, so it is set
            // through the OpenTelemetry span directly (a no-op when spans are not exported).
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let reasons = opentelemetry::Array::from(vec![opentelemetry::StringValue::from(
                reason.as_str().to_owned(),
            )]);
            span.set_attribute(
                "gen_ai.response.finish_reasons",
                opentelemetry::Value::Array(reasons),
            );
        }
        Err(error) => {
            span.record("otel.status_code", "ERROR");
            span.record("error.type", error.kind());
        }
    }
}

/// What the route ended with, on its span.
fn record_route_end(span: &tracing::Span, outcome: &RouteOutcome, status: &str) {
    span.record("keyvex.outcome", status);
    if let Some(model) = &outcome.model {
        span.record("keyvex.model", model.as_str());
    }
    span.record("keyvex.attempts", outcome.attempts.len() as i64);
    span.record("keyvex.fallback_used", outcome.fallback_used);
    span.record("keyvex.rescues", outcome.rescues.len() as i64);
    span.record("keyvex.cost_usd", outcome.cost.usd());
    if let Some(ttft) = outcome.ttft {
        span.record("keyvex.ttft_ms", int(millis(ttft)));
    }
}

/// The prompt as the conventions' `gen_ai.input.messages` JSON (only with content capture on).
fn input_messages(request: &ChatRequest) -> String {
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    if let Some(system) = &request.system {
        messages.push(
            serde_json::json!({"role": "system", "parts": [{"type": "text", "content": system}]}),
        );
    }
    for m in &request.messages {
        let role = match m.role {
            crate::provider::Role::User => "user",
            crate::provider::Role::Assistant => "assistant",
        };
        messages.push(
            serde_json::json!({"role": role, "parts": [{"type": "text", "content": m.content}]}),
        );
    }
    serde_json::Value::Array(messages).to_string()
}

/// The answer as the conventions' `gen_ai.output.messages` JSON.
fn output_messages(text: &str) -> String {
    serde_json::json!([{"role": "assistant", "parts": [{"type": "text", "content": text}]}])
        .to_string()
}

/// Whether an attempt reached a model (a skipped model made no call).
fn made_call(attempt: &AttemptRecord) -> bool {
    !attempt
        .error
        .as_ref()
        .is_some_and(AttemptError::made_no_call)
}
