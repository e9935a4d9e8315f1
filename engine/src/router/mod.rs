//! The router: turns one logical request into attempts against providers and one stream of
//! [`RouteEvent`]s for the caller.
//!
//! A process has a primary and a fallback model on the other provider (`catalog`). Before the
//! first content delta the router falls back freely on retryable errors; once content flows it
//! is committed to that attempt, and a later failure ends the stream with an explicit
//! [`RouteEvent::Failed`] carrying what was produced (STYLE rule 5). Re-trying a model already
//! tried waits a jittered backoff drawn from a shared [`RetryBudget`]; each model has a circuit
//! breaker; every attempt is costed. `run.rs` holds the state machine of one route.

mod attempt;
mod breaker;
mod budget;
mod outcome;
mod run;

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use agents::Process;
use futures::Stream;
use pin_project_lite::pin_project;

use crate::catalog::{Catalog, ModelSpec};
use crate::provider::{ChatMessage, ResponseSchema, SharedProvider};
use crate::stream::ProviderKind;

pub use attempt::{AttemptError, AttemptRecord};
pub use breaker::{BreakerConfig, CircuitState};
pub use budget::{RetryBudget, RetryBudgetConfig};
pub use outcome::{AttemptSummary, RouteError, RouteFailure, RouteOutcome, RouteStatus};

/// Told about routes the caller abandoned (their stream was dropped), which cannot deliver a
/// terminal event. Called synchronously from `Drop`: keep it cheap and non-blocking (hand the
/// outcome to a channel, as `metrics::Tracker::record` does).
pub trait RouteObserver: Send + Sync + 'static {
    fn on_cancelled(&self, outcome: RouteOutcome);
}

/// How the router retries, times out and protects providers.
#[derive(Clone)]
pub struct RouterConfig {
    /// From an attempt's start to its first content delta; past it the attempt fails with
    /// `FirstTokenTimeout` and the router falls back.
    pub ttft_timeout: Duration,
    /// Longest silence between two provider events once content flows (`Stalled`).
    pub stall_timeout: Duration,
    /// Calls per route, counting the first (default 4: primary, fallback, primary, fallback).
    /// Models skipped by an open circuit do not count: they make no call.
    pub max_attempts: u32,
    /// Full-jitter backoff before re-trying a model: uniform in `0..=min(cap, base × 2^(n-1))`
    /// for its n-th retry. Switching to a different model does not wait.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// A `retry-after` longer than this skips the model for the rest of the route instead of
    /// waiting.
    pub max_retry_after: Duration,
    pub budget: RetryBudgetConfig,
    pub breaker: BreakerConfig,
    pub observer: Option<Arc<dyn RouteObserver>>,
}

impl Default for RouterConfig {
    /// Timeouts match `EngineConfig`'s defaults; backoff follows the OpenAI and Anthropic SDKs
    /// (0.5 s doubling, capped at 8 s).
    fn default() -> Self {
        Self {
            ttft_timeout: Duration::from_secs(20),
            stall_timeout: Duration::from_secs(30),
            max_attempts: 4,
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(30),
            budget: RetryBudgetConfig::default(),
            breaker: BreakerConfig::default(),
            observer: None,
        }
    }
}

impl fmt::Debug for RouterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterConfig")
            .field("ttft_timeout", &self.ttft_timeout)
            .field("stall_timeout", &self.stall_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_cap", &self.backoff_cap)
            .field("max_retry_after", &self.max_retry_after)
            .field("budget", &self.budget)
            .field("breaker", &self.breaker)
            .field("observer", &self.observer.as_ref().map(|_| "set"))
            .finish()
    }
}

/// One provider per wire protocol; a missing one makes its models unavailable.
#[derive(Clone, Default)]
pub struct Providers {
    by_kind: BTreeMap<ProviderKind, SharedProvider>,
}

impl Providers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, kind: ProviderKind, provider: SharedProvider) -> Self {
        self.by_kind.insert(kind, provider);
        self
    }

    pub fn get(&self, kind: ProviderKind) -> Option<&SharedProvider> {
        self.by_kind.get(&kind)
    }
}

impl fmt::Debug for Providers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.by_kind.keys()).finish()
    }
}

/// What to ask, in provider-neutral form. `None` settings take the process's (or model's)
/// defaults from the catalog.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RouteRequest {
    pub system: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub response_schema: Option<ResponseSchema>,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f32>,
}

/// What a route keeps for its outcome besides the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteOptions {
    /// Whether [`RouteOutcome::text`] holds the answer. A caller that relays the deltas itself
    /// turns it off, so an open stream does not also hold everything it already relayed (a long
    /// answer is tens of KiB per stream); a cut stream's output is then estimated from its byte
    /// count instead of by tokenizing the text.
    pub keep_text: bool,
}

impl Default for RouteOptions {
    fn default() -> Self {
        Self { keep_text: true }
    }
}

/// What the caller of a route sees, in order: for each attempt that opened a stream a `Start`;
/// a `Fallback` before each switch to a different model; the committed attempt's `Delta`s; and
/// exactly one terminal `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteEvent {
    Start {
        provider: ProviderKind,
        model: String,
        /// 1-based position in the outcome's `attempts`.
        attempt: u32,
    },
    Fallback {
        from: String,
        to: String,
        reason: String,
    },
    Delta(String),
    Finished(RouteOutcome),
    Failed(RouteFailure),
}

/// The events of one route. Dropping it cancels the in-flight provider call.
pub type RouteStream = Pin<Box<dyn Stream<Item = RouteEvent> + Send>>;

/// Routes requests to models. Cheap to clone; clones share breakers and the retry budget.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Shared>,
}

/// What every route of one router shares.
struct Shared {
    catalog: Arc<Catalog>,
    providers: Providers,
    config: RouterConfig,
    breakers: breaker::Breakers,
    budget: RetryBudget,
}

impl Router {
    pub fn new(catalog: Arc<Catalog>, providers: Providers, config: RouterConfig) -> Self {
        Self {
            inner: Arc::new(Shared {
                catalog,
                providers,
                breakers: breaker::Breakers::new(config.breaker),
                budget: RetryBudget::new(config.budget),
                config,
            }),
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    pub fn config(&self) -> &RouterConfig {
        &self.inner.config
    }

    /// The circuit breaker state of a model (closed for a model never called).
    pub fn circuit_state(&self, model_id: &str) -> CircuitState {
        self.inner.breakers.state(model_id)
    }

    /// Primary, then fallback of the process, with the process's `max_output_tokens` and
    /// `temperature` as defaults. A model whose provider is not configured is left out; when
    /// none is left the stream fails with `NoProvider`.
    pub fn stream_process(&self, process: Process, request: RouteRequest) -> RouteStream {
        self.stream_process_with(process, request, RouteOptions::default())
    }

    /// [`Router::stream_process`] with `options`.
    pub fn stream_process_with(
        &self,
        process: Process,
        request: RouteRequest,
        options: RouteOptions,
    ) -> RouteStream {
        let catalog = &self.inner.catalog;
        let route = catalog.route(process);
        let models: Vec<&ModelSpec> = [&route.primary, &route.fallback]
            .into_iter()
            .filter_map(|id| catalog.model(id))
            .collect();
        let request = RouteRequest {
            max_output_tokens: request.max_output_tokens.or(Some(route.max_output_tokens)),
            temperature: request.temperature.or(route.temperature),
            ..request
        };
        let span = tracing::info_span!("route", process = %process, primary = %route.primary);
        self.start(Some(process), &models, request, options, span)
    }

    /// One catalog model, retried on the same model only (no fallback): for direct model calls.
    #[expect(
        clippy::result_large_err,
        reason = "RouteError keeps the API's shape (ProviderError inline); errors are once per request"
    )]
    pub fn stream_model(
        &self,
        model_id: &str,
        request: RouteRequest,
    ) -> Result<RouteStream, RouteError> {
        self.stream_model_with(model_id, request, RouteOptions::default())
    }

    /// [`Router::stream_model`] with `options`.
    #[expect(
        clippy::result_large_err,
        reason = "RouteError keeps the API's shape (ProviderError inline); errors are once per request"
    )]
    pub fn stream_model_with(
        &self,
        model_id: &str,
        request: RouteRequest,
        options: RouteOptions,
    ) -> Result<RouteStream, RouteError> {
        let catalog = &self.inner.catalog;
        let Some(model) = catalog.model(model_id) else {
            return Err(RouteError::UnknownModel {
                model: model_id.to_owned(),
                known: catalog.models().iter().map(|m| m.id.clone()).collect(),
            });
        };
        if self.inner.providers.get(model.provider).is_none() {
            return Err(RouteError::NoProvider {
                provider: model.provider,
                model: model.id.clone(),
            });
        }
        let span = tracing::info_span!("route", process = "-", primary = %model.id);
        Ok(self.start(None, &[model], request, options, span))
    }

    fn start(
        &self,
        process: Option<Process>,
        models: &[&ModelSpec],
        request: RouteRequest,
        options: RouteOptions,
        span: tracing::Span,
    ) -> RouteStream {
        let plan = run::Plan::new(&self.inner.providers, process, models, request, options);
        Box::pin(InSpan {
            inner: run::route(self.inner.clone(), plan),
            span,
        })
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("catalog", &self.inner.catalog.source())
            .field("providers", &self.inner.providers)
            .field("config", &self.inner.config)
            .finish()
    }
}

/// `now + after`, saturating far in the future: a configured `Duration::MAX` means "never",
/// and `Instant + Duration` would panic on overflow.
pub(crate) fn deadline_in(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(60 * 60 * 24 * 365))
}

pin_project! {
    /// Polls a stream inside a tracing span, so everything logged while it runs (router and
    /// provider) carries the span's fields.
    struct InSpan<S> {
        #[pin]
        inner: S,
        span: tracing::Span,
    }
}

impl<S: Stream> Stream for InSpan<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.project();
        let _entered = this.span.enter();
        this.inner.poll_next(cx)
    }
}
