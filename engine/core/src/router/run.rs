//! The state machine of one route: pick a model, wait if it is a retry, call it under the
//! TTFT and stall deadlines, commit at first content, account every attempt, end with exactly
//! one terminal event, or report to the observer when the caller drops the stream.

use std::sync::Arc;
use std::time::Duration;

use agents::Process;
use futures::{Stream, StreamExt};
use tokio::time::Instant;

use crate::catalog::ModelSpec;
use crate::limits::{Reservation, estimate_tokens};
use crate::provider::{ChatRequest, ProviderError, SharedProvider};
use crate::stream::{FinishReason, ProviderEvent, Usage};
use crate::tokenize::count_prompt_tokens;

use super::attempt::{AttemptError, AttemptMeter, AttemptRecord, wall_clock};
use super::breaker::{Admission, Refusal};
use super::outcome::{AttemptSummary, RouteError, RouteFailure, RouteOutcome, RouteStatus};
use super::{
    InSpan, Providers, RouteEvent, RouteObserver, RouteOptions, RouteRequest, Shared, deadline_in,
};

/// A model the route may call, with its provider resolved.
struct Candidate {
    spec: ModelSpec,
    provider: SharedProvider,
}

/// What a route will try, fixed before it starts.
pub(super) struct Plan {
    process: Option<Process>,
    /// The route's first choice, even when its provider is missing.
    primary: String,
    candidates: Vec<Candidate>,
    /// Models left out because their provider is not configured, first one first.
    unavailable: Vec<RouteError>,
    request: RouteRequest,
    options: RouteOptions,
    /// Told about the route if its caller drops it before the terminal event.
    observer: Option<Arc<dyn RouteObserver>>,
}

impl Plan {
    pub(super) fn new(
        providers: &Providers,
        process: Option<Process>,
        models: &[&ModelSpec],
        request: RouteRequest,
        options: RouteOptions,
        observer: Option<Arc<dyn RouteObserver>>,
    ) -> Self {
        let mut candidates = Vec::with_capacity(models.len());
        let mut unavailable = Vec::new();
        for spec in models {
            match providers.get(spec.provider) {
                Some(provider) => candidates.push(Candidate {
                    spec: (*spec).clone(),
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
            primary: models.first().map(|m| m.id.clone()).unwrap_or_default(),
            candidates,
            unavailable,
            request,
            options,
            observer,
        }
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

    fn prompt_tokens(&self) -> u64 {
        count_prompt_tokens(self.request.system.as_deref(), &self.request.messages)
    }
}

/// The attempt being made right now.
struct InFlight {
    idx: usize,
    meter: AttemptMeter,
    admission: Admission,
    /// What the attempt reserved of its provider's budget; settled with its usage at the end.
    reservation: Option<Reservation>,
    span: tracing::Span,
}

/// Why a picked model was not called.
enum Skip {
    Circuit(Refusal),
    Budget(AttemptError),
}

/// What happened to one provider event.
#[expect(
    clippy::large_enum_variant,
    reason = "moved once per event, like the RouteEvent it carries; boxing would allocate per delta"
)]
enum Step {
    Nothing,
    Forward(RouteEvent),
    End(Result<FinishReason, ProviderError>),
}

/// The mutable state of one route. It is also the cancellation guard: when the caller drops
/// the stream before the terminal event, `Drop` reports a `Cancelled` outcome to the observer.
struct RouteRun {
    shared: Arc<Shared>,
    plan: Plan,
    started: Instant,
    attempts: Vec<AttemptRecord>,
    /// Provider calls made (circuit-open skips make none).
    calls: u32,
    /// Per candidate: calls made, whether skipped for the rest of the route, earliest next call.
    tried: Vec<u32>,
    excluded: Vec<bool>,
    not_before: Vec<Option<Instant>>,
    cursor: usize,
    in_flight: Option<InFlight>,
    /// The candidate whose content the caller is receiving, and when its first delta came.
    committed: Option<(usize, Instant)>,
    text: String,
    done: bool,
}

/// The event stream of one route.
pub(super) fn route(shared: Arc<Shared>, plan: Plan) -> impl Stream<Item = RouteEvent> + Send {
    async_stream::stream! {
        let mut run = RouteRun::new(shared, plan);
        if run.plan.candidates.is_empty() {
            let error = run.plan.unavailable.first().cloned().unwrap_or(
                RouteError::AllAttemptsFailed { attempts: Vec::new() },
            );
            yield RouteEvent::Failed(run.fail(error));
            return;
        }
        run.shared.budget.deposit();
        loop {
            let Some(idx) = run.pick() else {
                let error = RouteError::AllAttemptsFailed { attempts: run.summaries() };
                yield RouteEvent::Failed(run.fail(error));
                return;
            };
            if let Some(event) = run.fallback_event(idx) {
                yield event;
            }
            if run.tried[idx] > 0 {
                if !run.shared.budget.withdraw() {
                    let error = RouteError::RetryBudgetExhausted { attempts: run.summaries() };
                    yield RouteEvent::Failed(run.fail(error));
                    return;
                }
                let wait = run.retry_wait(idx);
                tracing::debug!(model = %run.plan.candidates[idx].spec.id, wait_ms = wait.as_millis() as u64, "backing off before retry");
                tokio::time::sleep(wait).await;
            }
            let (provider, request) = match run.begin_attempt(idx) {
                Ok(started) => started,
                Err(skip) => {
                    run.skip(idx, skip);
                    continue;
                }
            };
            let attempt_span = run.in_flight.as_ref().map(|f| f.span.clone()).unwrap_or_else(tracing::Span::none);
            let mut events = Box::pin(InSpan { inner: provider.stream(request), span: attempt_span });
            let ttft_deadline = deadline_in(run.shared.config.ttft_timeout);
            // One timer per attempt, moved forward at each event: a fresh `timeout_at` per chunk
            // registered and removed a timer-wheel entry (under the driver's lock) for every
            // chunk that had to wait, while moving a registered deadline later is a single
            // atomic update.
            let timer = tokio::time::sleep_until(ttft_deadline);
            tokio::pin!(timer);
            let end = loop {
                let content = run.has_content();
                let deadline = if content {
                    deadline_in(run.shared.config.stall_timeout)
                } else {
                    ttft_deadline
                };
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                let next = tokio::select! {
                    biased;
                    next = events.next() => Ok(next),
                    () = &mut timer => Err(()),
                };
                let event = match next {
                    Ok(Some(event)) => event,
                    Ok(None) => ProviderEvent::Error(ProviderError::Truncated {
                        provider: provider.kind(),
                        detail: "the provider stream ended without a terminal event".into(),
                    }),
                    Err(_) if content => ProviderEvent::Error(ProviderError::Stalled {
                        provider: provider.kind(),
                        after: run.shared.config.stall_timeout,
                    }),
                    Err(_) => ProviderEvent::Error(ProviderError::FirstTokenTimeout {
                        provider: provider.kind(),
                        after: run.shared.config.ttft_timeout,
                    }),
                };
                match run.on_event(event) {
                    Step::Nothing => {}
                    Step::Forward(event) => yield event,
                    Step::End(end) => break end,
                }
            };
            // Close the provider's connection before any backoff.
            drop(events);
            if let Some(terminal) = run.end_attempt(end) {
                yield terminal;
                return;
            }
        }
    }
}

impl RouteRun {
    fn new(shared: Arc<Shared>, plan: Plan) -> Self {
        let n = plan.candidates.len();
        Self {
            shared,
            plan,
            started: Instant::now(),
            attempts: Vec::new(),
            calls: 0,
            tried: vec![0; n],
            excluded: vec![false; n],
            not_before: vec![None; n],
            cursor: 0,
            in_flight: None,
            committed: None,
            text: String::new(),
            done: false,
        }
    }

    /// The next candidate in round-robin order that is not skipped, while calls remain.
    fn pick(&mut self) -> Option<usize> {
        if self.calls >= self.shared.config.max_attempts.max(1) {
            return None;
        }
        let n = self.plan.candidates.len();
        let idx = (0..n)
            .map(|k| (self.cursor + k) % n)
            .find(|&i| !self.excluded[i])?;
        self.cursor = idx + 1;
        Some(idx)
    }

    /// A `Fallback` event when `idx` is a different model than the last one tried (or than
    /// the primary, when the primary's provider is missing).
    fn fallback_event(&self, idx: usize) -> Option<RouteEvent> {
        let to = &self.plan.candidates[idx].spec.id;
        let (from, reason) = match self.attempts.last() {
            Some(last) => (
                last.model.clone(),
                last.error
                    .as_ref()
                    .map_or_else(|| "previous attempt ended".to_owned(), ToString::to_string),
            ),
            None => (
                self.plan.primary.clone(),
                self.plan.unavailable.first()?.to_string(),
            ),
        };
        (&from != to).then(|| RouteEvent::Fallback {
            from,
            to: to.clone(),
            reason,
        })
    }

    /// Full-jitter exponential backoff for this model's next retry, but never before its
    /// `retry-after` has passed.
    fn retry_wait(&self, idx: usize) -> Duration {
        let config = &self.shared.config;
        let retries_before = self.tried[idx].saturating_sub(1).min(30);
        let ceiling = config
            .backoff_base
            .saturating_mul(1u32 << retries_before)
            .min(config.backoff_cap);
        let ceiling_ns = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        let jitter = Duration::from_nanos(rand::random_range(0..=ceiling_ns));
        let hold = self.not_before[idx]
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        jitter.max(hold)
    }

    /// Asks the model's breaker, then its provider's budget, then opens the attempt's books.
    fn begin_attempt(&mut self, idx: usize) -> Result<(SharedProvider, ChatRequest), Skip> {
        let candidate = &self.plan.candidates[idx];
        let admission = self
            .shared
            .breakers
            .admit(&candidate.spec.id)
            .map_err(Skip::Circuit)?;
        let request = self.plan.chat_request(&candidate.spec);
        let reservation = match self.shared.provider_budgets.get(&candidate.spec.provider) {
            Some(budget) => match budget.reserve(estimate_tokens(&request)) {
                Ok(reservation) => Some(reservation),
                Err(refused) => {
                    // Our own limit, not the model's health: the breaker hears nothing of it.
                    self.shared
                        .breakers
                        .on_neutral(&candidate.spec.id, admission);
                    self.calls += 1;
                    self.tried[idx] += 1;
                    return Err(Skip::Budget(AttemptError::BudgetRefused {
                        provider: candidate.spec.provider,
                        which: refused.which,
                        retry_after: refused.retry_after,
                    }));
                }
            },
            None => None,
        };
        self.calls += 1;
        self.tried[idx] += 1;
        let attempt = self.attempts.len() + 1;
        let span = tracing::info_span!(
            "attempt",
            process = %self.plan.process.map_or("-", Process::key),
            model = %candidate.spec.id,
            provider = %candidate.spec.provider,
            attempt,
            trial = admission == Admission::Trial,
        );
        self.in_flight = Some(InFlight {
            idx,
            meter: AttemptMeter::new(
                candidate.spec.provider,
                &candidate.spec.id,
                candidate.spec.pricing,
                self.plan.options.keep_text,
            ),
            admission,
            reservation,
            span,
        });
        Ok((candidate.provider.clone(), request))
    }

    /// Records a model that was not called. An open circuit drops it from this route (its
    /// cool-down is far longer than a route lasts); a spent budget holds it until the budget
    /// has room, or drops it when that is further off than `max_retry_after`.
    fn skip(&mut self, idx: usize, skip: Skip) {
        let spec = &self.plan.candidates[idx].spec;
        let error = match skip {
            Skip::Circuit(refusal) => {
                let until = match refusal {
                    Refusal::OpenUntil(at) => Some(wall_clock(at)),
                    Refusal::TrialInFlight => None,
                };
                self.excluded[idx] = true;
                AttemptError::CircuitOpen {
                    model: spec.id.clone(),
                    until,
                }
            }
            Skip::Budget(error) => {
                if let AttemptError::BudgetRefused { retry_after, .. } = &error {
                    if *retry_after > self.shared.config.max_retry_after {
                        self.excluded[idx] = true;
                    } else {
                        self.not_before[idx] = Some(deadline_in(*retry_after));
                    }
                }
                error
            }
        };
        tracing::warn!(model = %spec.id, error = %error, "skipping model");
        self.attempts
            .push(AttemptRecord::skipped(spec.provider, &spec.id, error));
    }

    fn has_content(&self) -> bool {
        self.in_flight
            .as_ref()
            .is_some_and(|f| f.meter.has_content())
    }

    fn on_event(&mut self, event: ProviderEvent) -> Step {
        let Some(flight) = self.in_flight.as_mut() else {
            return Step::Nothing;
        };
        match event {
            ProviderEvent::Start { provider, model } => {
                flight.meter.on_open();
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
                    tracing::debug!(parent: &flight.span, "committed at first content");
                }
                Step::Forward(RouteEvent::Delta(text))
            }
            ProviderEvent::Usage(usage) => {
                flight.meter.on_usage(usage);
                Step::Nothing
            }
            ProviderEvent::Done { finish_reason } => Step::End(Ok(finish_reason)),
            ProviderEvent::Error(error) => Step::End(Err(error)),
        }
    }

    /// Closes the running attempt's books; returns the terminal event when the route ends.
    fn end_attempt(&mut self, end: Result<FinishReason, ProviderError>) -> Option<RouteEvent> {
        let InFlight {
            idx,
            meter,
            admission,
            reservation,
            span,
        } = self.in_flight.take()?;
        let model = self.plan.candidates[idx].spec.id.clone();
        let provider = self.plan.candidates[idx].spec.provider;
        let (finish_reason, error) = match &end {
            Ok(reason) => (Some(reason.clone()), None),
            Err(e) => (None, Some(AttemptError::Provider(e.clone()))),
        };
        let plan = &self.plan;
        let (record, text) = meter.finish(finish_reason, error, || plan.prompt_tokens());
        if let Some(reservation) = reservation {
            reservation.settle(record.usage.total());
        }
        let error = match end {
            Ok(reason) => {
                self.shared.breakers.on_success(&model);
                if self.committed.is_none() {
                    // An empty but complete answer is still an answer.
                    self.committed = Some((idx, Instant::now()));
                }
                tracing::info!(parent: &span, cost = %record.cost, estimated = record.usage_estimated, "attempt succeeded");
                self.text = text;
                self.attempts.push(record);
                return Some(RouteEvent::Finished(self.succeed(reason)));
            }
            Err(error) => error,
        };
        if error.is_retryable() {
            self.shared.breakers.on_failure(&model, admission);
        } else {
            self.shared.breakers.on_neutral(&model, admission);
        }
        tracing::warn!(parent: &span, error = %error, kind = error.kind(), cost = %record.cost, "attempt failed");
        let produced_chars = record.output_chars;
        self.attempts.push(record);
        if self.committed.is_some() {
            self.text = text;
            let error = RouteError::MidStream {
                model,
                provider,
                error,
                produced_chars,
            };
            return Some(RouteEvent::Failed(self.fail(error)));
        }
        if !error.is_retryable() {
            let error = RouteError::NotRetryable {
                attempts: self.summaries(),
            };
            return Some(RouteEvent::Failed(self.fail(error)));
        }
        if let Some(wait) = error.retry_after() {
            if wait > self.shared.config.max_retry_after {
                tracing::info!(parent: &span, retry_after_ms = wait.as_millis() as u64, "retry-after beyond the cap: skipping the model for this request");
                self.excluded[idx] = true;
            } else {
                self.not_before[idx] = Some(deadline_in(wait));
            }
        }
        None
    }

    fn summaries(&self) -> Vec<AttemptSummary> {
        self.attempts
            .iter()
            .filter_map(|a| Some((a.model.clone(), a.provider, a.error.clone()?)))
            .collect()
    }

    fn succeed(&mut self, finish_reason: FinishReason) -> RouteOutcome {
        self.done = true;
        self.outcome(RouteStatus::Succeeded, Some(finish_reason))
    }

    fn fail(&mut self, error: RouteError) -> RouteFailure {
        self.done = true;
        tracing::warn!(error = %error, kind = error.kind(), "route failed");
        RouteFailure {
            outcome: self.outcome(RouteStatus::Failed, None),
            error,
        }
    }

    fn outcome(&self, status: RouteStatus, finish_reason: Option<FinishReason>) -> RouteOutcome {
        let mut usage = Usage::default();
        for a in &self.attempts {
            usage.add(&a.usage);
        }
        let called = |a: &&AttemptRecord| !a.error.as_ref().is_some_and(AttemptError::made_no_call);
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
            ttft: self.committed.map(|(_, at)| at - self.started),
            latency: self.started.elapsed(),
            fallback_used: self
                .attempts
                .iter()
                .filter(called)
                .any(|a| a.model != self.plan.primary),
            finish_reason,
            attempts: self.attempts.clone(),
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
            if self.committed.is_some() {
                self.text = text;
            }
            self.attempts.push(record);
        }
        let outcome = self.outcome(RouteStatus::Cancelled, None);
        tracing::info!(attempts = outcome.attempts.len(), cost = %outcome.cost, "route cancelled by the caller");
        if let Some(observer) = self.plan.observer.take() {
            observer.on_cancelled(outcome);
        }
    }
}
