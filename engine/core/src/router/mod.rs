//! The router: turns one logical request into attempts against providers and one stream of
//! [`RouteEvent`]s for the caller.
//!
//! A process has a primary and a fallback model on the other provider (`catalog`). Before the
//! first content delta the router falls back freely on retryable errors; once content flows it
//! is committed to that attempt. A later failure is rescued when the catalog's policy allows
//! (a [`RouteEvent::Rescue`], then the next call restarts the answer or continues it);
//! otherwise it ends the stream with an explicit [`RouteEvent::Failed`] carrying what was
//! produced, never a clean but truncated end. Re-trying a model already tried waits a jittered backoff drawn from a shared [`RetryBudget`]; each model has a circuit
//! breaker; every attempt is costed. `run.rs` holds the state machine of one route.

mod attempt;
mod breaker;
mod budget;
mod outcome;
mod run;
mod seam;

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use agents::Process;
use arc_swap::ArcSwap;
use futures::Stream;
use pin_project_lite::pin_project;

use crate::admission::FirstCall;
use crate::budgets::SpendAccount;
use crate::catalog::{Catalog, ModelSpec};
use crate::cost::Pricing;
use crate::limits::{LimitsWhenDown, ProviderBudget, ProviderRates, SharedRates};
use crate::provider::{ChatMessage, ResponseSchema, SharedProvider};
use crate::stream::ProviderKind;

pub use attempt::{AttemptError, AttemptRecord};
pub use breaker::{BreakerConfig, CircuitState, OpenReason};
pub use budget::{RetryBudget, RetryBudgetConfig};
pub use outcome::{AttemptSummary, Rescue, RouteError, RouteFailure, RouteOutcome, RouteStatus};
pub use seam::CONTINUE_INSTRUCTION;

/// Where a route's attempts reserve from: the caller's dollar budgets, and what was reserved
/// at admission for the first attempt.
#[derive(Debug, Clone, Default)]
pub struct Funding {
    pub spend: Option<SpendAccount>,
    pub first_call: FirstCall,
}

/// Told about a route while it runs: each call as it goes out, each call that failed while the
/// route goes on, and the route's end when its caller abandoned it (the stream was dropped
/// before its terminal event, which therefore cannot deliver it). Given per route (see
/// [`Router::open`]), so it knows whose route it was. Called synchronously on the route's path
/// (and from `Drop`): keep it cheap and non-blocking (hand things to a channel, as the metrics
/// ledger does).
pub trait RouteObserver: Send + Sync + 'static {
    fn on_cancelled(&self, outcome: RouteOutcome);

    /// A call is about to be sent: admitted by the breaker and the provider budget, its request
    /// built, nothing on the wire yet.
    fn on_call_start(&self, call: &CallStart<'_>) {
        let _ = call;
    }

    /// A call ended in an error and the route goes on (to a retry, the fallback, or a decision
    /// that no call is left).
    fn on_call_failed(&self, failed: &CallFailed<'_>) {
        let _ = failed;
    }
}

/// A failed call the route goes on from, as [`RouteObserver::on_call_failed`] sees it.
#[derive(Debug)]
pub struct CallFailed<'a> {
    pub attempt: &'a AttemptRecord,
    /// The model of the route's first attempt: the call's record says whether it used another.
    pub first_model: &'a str,
    /// 1-based position among the route's calls.
    pub call: u32,
    /// When the route's first call started.
    pub request_started_at: SystemTime,
}

/// A call about to be sent, as [`RouteObserver::on_call_start`] sees it.
#[derive(Debug)]
pub struct CallStart<'a> {
    /// The id its record will have (also its `AttemptRecord::record_id`).
    pub record_id: &'a str,
    pub provider: ProviderKind,
    pub model: &'a str,
    pub pricing: &'a Pricing,
    /// 1-based position among the route's calls (models skipped without a call not counted).
    pub call: u32,
    pub started_at: SystemTime,
    /// When the route's first call started (this call's own start if it is the first): the
    /// request's last record is dated from it.
    pub request_started_at: SystemTime,
    /// The prompt's tokens, estimated from its length without the tokenizer (one token per
    /// 3 bytes plus the chat framing): counting exactly would cost CPU before every call.
    pub prompt_tokens: u64,
    /// Every attempt the route made before this one, models skipped without a call included.
    pub earlier: &'a [AttemptRecord],
    /// The call's dollar reservation, if it outlives this process.
    pub spend: Option<crate::budgets::HeldSpend>,
}

/// What a route serves: a process (its primary, then its fallback) or one catalog model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallTarget {
    Process(Process),
    Model(String),
}

impl CallTarget {
    /// `magicSpark`, … parse as a process; anything else is taken as a model id.
    pub fn parse(name: &str) -> CallTarget {
        match name.parse::<Process>() {
            Ok(p) => CallTarget::Process(p),
            Err(_) => CallTarget::Model(name.to_owned()),
        }
    }

    pub fn process(&self) -> Option<Process> {
        match self {
            CallTarget::Process(p) => Some(*p),
            CallTarget::Model(_) => None,
        }
    }
}

/// How the router retries, times out and protects providers.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// From an attempt's start to its first content delta; past it the attempt fails with
    /// `FirstTokenTimeout` and the router falls back.
    pub ttft_timeout: Duration,
    /// Longest silence between two provider events once content flows (`Stalled`).
    pub stall_timeout: Duration,
    /// From an attempt's start to the provider's response headers; past it the attempt fails
    /// with `HeaderTimeout` and the router falls back (a provider that accepts the connection
    /// and stays silent is given up on here, not at the first-token deadline).
    pub header_timeout: Duration,
    /// The whole route, every attempt and wait included; past it the route ends with
    /// `DeadlineExceeded` (or a mid-stream error once content flowed). Bounds a stream that
    /// drips tokens just under the stall timeout.
    pub request_timeout: Duration,
    /// Quick retries of the same model after a blip (a plain 5xx, or a connection broken
    /// before the response headers) before falling back.
    pub same_model_retries: u32,
    /// A quick retry waits a uniform random time up to this.
    pub quick_retry_delay: Duration,
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
    /// Requests and tokens per minute each provider may be sent, reserved before every attempt
    /// and settled with its usage; `None` leaves providers unlimited.
    pub provider_rates: Option<ProviderRates>,
    /// Whether each attempt's span carries the prompt and the answer's text
    /// (`gen_ai.input.messages`, `gen_ai.output.messages`). Off by default: prompts hold what
    /// users typed, and a tracing backend is rarely cleared for that.
    pub capture_content: bool,
}

impl Default for RouterConfig {
    /// Timeouts match `EngineConfig`'s defaults; backoff follows the OpenAI and Anthropic SDKs
    /// (0.5 s doubling, capped at 8 s).
    fn default() -> Self {
        Self {
            ttft_timeout: Duration::from_secs(20),
            stall_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(600),
            same_model_retries: 1,
            quick_retry_delay: Duration::from_millis(200),
            max_attempts: 4,
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(30),
            budget: RetryBudgetConfig::default(),
            breaker: BreakerConfig::default(),
            provider_rates: None,
            capture_content: false,
        }
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
    /// The caller relays one text stream it cannot take back (the chat route, `complete`): a
    /// stream that breaks after content is continued there, never restarted, whatever the
    /// process's policy (`off` stays off).
    pub continue_only: bool,
}

impl Default for RouteOptions {
    fn default() -> Self {
        Self {
            keep_text: true,
            continue_only: false,
        }
    }
}

/// What the caller of a route sees, in order: for each attempt that opened a stream a `Start`;
/// a `Fallback` before each switch to a different model; the committed attempt's `Delta`s; and
/// exactly one terminal `Finished` or `Failed`.
///
/// The once-per-route payloads are boxed: every delta is a `RouteEvent` moved through each layer
/// of the stream, and every generator that holds one at a yield keeps a slot of the enum's full
/// size, so an inline outcome (376 bytes) made each delta as large as the outcome.
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
    /// The committed stream broke after content and another call takes over: on a restart the
    /// caller drops everything it received and the new call's deltas start from nothing; on a
    /// continue its deltas carry on the text already sent.
    Rescue(Box<Rescue>),
    Delta(String),
    Finished(Box<RouteOutcome>),
    Failed(Box<RouteFailure>),
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
    /// The catalog in force. Each route loads it once when it opens and keeps that snapshot,
    /// so swapping in a new version never changes a route already open.
    catalog: ArcSwap<Catalog>,
    providers: Providers,
    config: RouterConfig,
    breakers: breaker::Breakers,
    budget: RetryBudget,
    /// Each provider's request and token budget, when `provider_rates` is set.
    provider_budgets: BTreeMap<ProviderKind, Arc<ProviderBudget>>,
    /// Where provider budgets are kept instead, when replicas share them.
    shared_rates: Option<(Arc<dyn SharedRates>, LimitsWhenDown)>,
}

impl Router {
    pub fn new(catalog: Arc<Catalog>, providers: Providers, config: RouterConfig) -> Self {
        Self::with_shared_rates(catalog, providers, config, None)
    }

    /// A router whose provider budgets live in `shared` (when `provider_rates` is set), so
    /// every replica using that store sends each provider one budget's worth.
    pub fn with_shared_rates(
        catalog: Arc<Catalog>,
        providers: Providers,
        config: RouterConfig,
        shared: Option<(Arc<dyn SharedRates>, LimitsWhenDown)>,
    ) -> Self {
        let provider_budgets = match config.provider_rates {
            Some(rates) => providers
                .by_kind
                .keys()
                .map(|kind| (*kind, Arc::new(ProviderBudget::new(*kind, rates))))
                .collect(),
            None => BTreeMap::new(),
        };
        Self {
            inner: Arc::new(Shared {
                catalog: ArcSwap::new(catalog),
                providers,
                breakers: breaker::Breakers::new(config.breaker),
                budget: RetryBudget::new(config.budget),
                provider_budgets,
                shared_rates: shared,
                config,
            }),
        }
    }

    /// The catalog in force now (a snapshot: a later swap does not change it).
    pub fn catalog(&self) -> Arc<Catalog> {
        self.inner.catalog.load_full()
    }

    /// Makes `catalog` the one routes open on from now; routes already open keep theirs.
    /// Returns the catalog it replaced.
    pub fn replace_catalog(&self, catalog: Arc<Catalog>) -> Arc<Catalog> {
        self.inner.catalog.swap(catalog)
    }

    /// Whether calls to `kind`'s models can be made (its provider is configured).
    pub fn has_provider(&self, kind: crate::stream::ProviderKind) -> bool {
        self.inner.providers.get(kind).is_some()
    }

    pub fn config(&self) -> &RouterConfig {
        &self.inner.config
    }

    /// The circuit breaker state of a model (closed for a model never called).
    pub fn circuit_state(&self, model_id: &str) -> CircuitState {
        self.inner.breakers.state(model_id)
    }

    /// Opens a route to `target`: a process, or one catalog model retried on itself (an
    /// unknown model, or one whose provider is not configured, is an error here). `observer`
    /// hears of the route if its caller drops it before the terminal event.
    #[expect(
        clippy::result_large_err,
        reason = "RouteError keeps the API's shape (ProviderError inline); errors are once per request"
    )]
    pub fn open(
        &self,
        target: &CallTarget,
        request: RouteRequest,
        options: RouteOptions,
        observer: Option<Arc<dyn RouteObserver>>,
    ) -> Result<RouteStream, RouteError> {
        self.open_on(&self.catalog(), target, request, options, observer)
    }

    /// [`Router::open`] on a catalog snapshot the caller took (so it can record which version
    /// the route was priced with).
    #[expect(
        clippy::result_large_err,
        reason = "RouteError keeps the API's shape (ProviderError inline); errors are once per request"
    )]
    pub fn open_on(
        &self,
        catalog: &Catalog,
        target: &CallTarget,
        request: RouteRequest,
        options: RouteOptions,
        observer: Option<Arc<dyn RouteObserver>>,
    ) -> Result<RouteStream, RouteError> {
        self.open_spending(
            catalog,
            target,
            request,
            options,
            observer,
            Funding::default(),
        )
    }

    /// [`Router::open_on`] spending from `funding`'s budgets: every attempt reserves its worst
    /// case there before it calls (the first one may find it reserved at admission), and
    /// settles to its cost when it ends.
    #[expect(
        clippy::result_large_err,
        reason = "RouteError keeps the API's shape (ProviderError inline); errors are once per request"
    )]
    pub fn open_spending(
        &self,
        catalog: &Catalog,
        target: &CallTarget,
        request: RouteRequest,
        options: RouteOptions,
        observer: Option<Arc<dyn RouteObserver>>,
        funding: Funding,
    ) -> Result<RouteStream, RouteError> {
        let model_id = match target {
            CallTarget::Process(process) => {
                return Ok(
                    self.open_process_on(catalog, *process, request, options, observer, funding)
                );
            }
            CallTarget::Model(model_id) => model_id,
        };
        let Some(model) = catalog.model(model_id) else {
            return Err(RouteError::UnknownModel {
                model: model_id.clone(),
                known: catalog.models().iter().map(|m| m.id.clone()).collect(),
            });
        };
        if self.inner.providers.get(model.provider).is_none() {
            return Err(RouteError::NoProvider {
                provider: model.provider,
                model: model.id.clone(),
            });
        }
        let span = route_span("-", &model.id);
        let plan = run::Plan::new(
            &self.inner.providers,
            None,
            &[model],
            request,
            options,
            observer,
            catalog.model_rescue(),
        )
        .funded(funding);
        Ok(self.start(plan, span))
    }

    /// Primary, then fallback of the process, with the process's `max_output_tokens` and
    /// `temperature` as defaults. A model whose provider is not configured is left out; when
    /// none is left the stream fails with `NoProvider`.
    pub fn open_process(
        &self,
        process: Process,
        request: RouteRequest,
        options: RouteOptions,
        observer: Option<Arc<dyn RouteObserver>>,
    ) -> RouteStream {
        self.open_process_on(
            &self.catalog(),
            process,
            request,
            options,
            observer,
            Funding::default(),
        )
    }

    fn open_process_on(
        &self,
        catalog: &Catalog,
        process: Process,
        request: RouteRequest,
        options: RouteOptions,
        observer: Option<Arc<dyn RouteObserver>>,
        funding: Funding,
    ) -> RouteStream {
        let route = catalog.route(process);
        let models: Vec<&Arc<ModelSpec>> = [&route.primary, &route.fallback]
            .into_iter()
            .filter_map(|id| catalog.model(id))
            .collect();
        let request = RouteRequest {
            max_output_tokens: request.max_output_tokens.or(Some(route.max_output_tokens)),
            temperature: request.temperature.or(route.temperature),
            ..request
        };
        let span = route_span(process.key(), &route.primary);
        let plan = run::Plan::new(
            &self.inner.providers,
            Some(process),
            &models,
            request,
            options,
            observer,
            route.rescue,
        )
        .funded(funding);
        self.start(plan, span)
    }

    /// A process's route with default options and no observer (tests and benches).
    pub fn stream_process(&self, process: Process, request: RouteRequest) -> RouteStream {
        self.open_process(process, request, RouteOptions::default(), None)
    }

    /// One catalog model, retried on itself, with default options and no observer.
    #[expect(
        clippy::result_large_err,
        reason = "RouteError keeps the API's shape (ProviderError inline); errors are once per request"
    )]
    pub fn stream_model(
        &self,
        model_id: &str,
        request: RouteRequest,
    ) -> Result<RouteStream, RouteError> {
        self.open(
            &CallTarget::Model(model_id.to_owned()),
            request,
            RouteOptions::default(),
            None,
        )
    }

    fn start(&self, plan: run::Plan, span: tracing::Span) -> RouteStream {
        Box::pin(InSpan {
            inner: run::route(self.inner.clone(), plan, span.clone()),
            span,
        })
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("catalog", &self.inner.catalog.load().source())
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

/// The span of one routed call. Its children are the attempts; its events say why the route
/// moved on: `retry`, `fallback`, `breaker skip`, `budget skip`, and `rescue` (a stream that
/// broke after content handed to the next call). The outcome fields are filled in when the
/// route ends.
fn route_span(process: &str, primary: &str) -> tracing::Span {
    tracing::info_span!(
        "route",
        otel.name = %format_args!("route {process}"),
        otel.status_code = tracing::field::Empty,
        process = %process,
        primary = %primary,
        keyvex.process = %process,
        keyvex.primary_model = %primary,
        keyvex.outcome = tracing::field::Empty,
        keyvex.model = tracing::field::Empty,
        keyvex.attempts = tracing::field::Empty,
        keyvex.fallback_used = tracing::field::Empty,
        keyvex.rescues = tracing::field::Empty,
        keyvex.cost_usd = tracing::field::Empty,
        keyvex.ttft_ms = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

pin_project! {
    /// Polls a stream inside a tracing span, so everything logged while it runs (router and
    /// provider) carries the span's fields.
    pub(crate) struct InSpan<S> {
        #[pin]
        pub(crate) inner: S,
        pub(crate) span: tracing::Span,
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
