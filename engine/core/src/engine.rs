//! [`Engine`], the one composition root: the catalog, the providers (real or simulated), the
//! router with its budgets and breakers, the caller limits, and the recorder every call record
//! and session message goes to. Every entry point — the HTTP server, the queue worker, the CLI,
//! the load test, an embedding program — builds one and makes its model calls through it.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use agents::Process;
use futures::Stream;
use futures::future::BoxFuture;

use crate::admission::{
    Admission, AdmitAnswer, AdmitAsk, FirstCall, FirstCallOf, Prepaid, PrepaidCounters,
    PrepaidStats, SharedAdmission,
};
use crate::agent_run::{AgentEvent, SessionWrites, run_agent};
use crate::budgets::{BudgetDenied, BudgetView, Budgets, SpendHold, worst_case_cost};
use crate::call::{CallContext, CallStream, Calls};
use crate::catalog::{Catalog, CatalogError, fit};
use crate::cost::Cost;
use crate::limits::{
    Allowance, BudgetExceeded, CallerLimited, CallerLimits, LimitsUnavailable, LimitsWhenDown,
    ProviderHold, ProviderRates, Rate, SharedRates, SharedReservation, estimate_tokens,
};
use crate::pipeline::{PipelineEvent, PipelineInput, run_pipeline};
use crate::provider::anthropic::AnthropicProvider;
use crate::provider::anthropic_version::AnthropicVersion;
use crate::provider::openai::OpenAiProvider;
use crate::provider::{
    ApiKey, ChatMessage, ChatRequest, ProviderConfig, ProviderInitError, ResponseSchema,
    SharedProvider,
};
use crate::record::{CallObserver, Recorder, ShutdownReport};
use crate::router::{
    CallTarget, CircuitState, Providers, RouteError, RouteOptions, RouteRequest, Router,
    RouterConfig,
};
use crate::stream::ProviderKind;

/// Why an engine could not be built. Raised once, at start-up.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Provider(#[from] ProviderInitError),
    #[error(
        "no recorder: every model call is recorded, so give the builder one (`.recorder(…)`: the metrics tracker of keyvex-store, or your own `Recorder`)"
    )]
    NoRecorder,
}

/// Why a catalog version was not put in force on an engine: serving it here would take away a
/// model this replica serves now (see `catalog::fit`). The engine keeps the version it has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "model catalog version {version} cannot be served here as written: {}; this replica stays on version {kept}",
    problems.join("; ")
)]
pub struct CatalogRefused {
    pub version: u64,
    pub kept: u64,
    pub problems: Vec<String>,
}

/// A provider simulator the engine points both providers at and stops on shutdown (the
/// `keyvex-sim` crate's handle implements it).
pub trait Simulator: Send + Sync + 'static {
    /// Base URL including the version prefix, e.g. `http://127.0.0.1:4010/v1`.
    fn base_url(&self) -> String;
    /// One line for start-up banners.
    fn describe(&self) -> String;
    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// The events of one agent run ([`Engine::agent`]).
pub type AgentStream = std::pin::Pin<Box<dyn Stream<Item = AgentEvent> + Send>>;
/// The events of one pipeline run ([`Engine::pipeline`]).
pub type PipelineStream = std::pin::Pin<Box<dyn Stream<Item = PipelineEvent> + Send>>;

/// The embeddable agent runtime. Cheap to clone; clones share everything.
///
/// Build it once with the providers and a [`Recorder`], then run agents, pipelines and chat calls
/// for whoever asks, each with its own [`CallContext`]:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use futures::StreamExt;
/// use keyvex_engine::{AgentEvent, CallContext, Engine, Process, Receipt, Recorder};
/// use keyvex_engine::{RequestRecord, SessionMessage};
///
/// /// Where the records of model calls go (here: nowhere but a counter).
/// #[derive(Default)]
/// struct Count(std::sync::atomic::AtomicUsize);
/// impl Recorder for Count {
///     fn record(&self, _: RequestRecord) -> Receipt {
///         self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         Receipt::durable_now()
///     }
///     fn record_message(&self, _: SessionMessage) -> Receipt {
///         Receipt::durable_now()
///     }
/// }
///
/// // Real providers are `.openai(key)` / `.anthropic(key)`; the simulator keeps this offline.
/// let sim = keyvex_sim::start(([127, 0, 0, 1], 0).into(), keyvex_sim::SimConfig::fast(1)).await?;
/// let calls = std::sync::Arc::new(Count::default());
/// let engine = Engine::builder().simulator(sim).recorder(calls.clone()).build()?;
///
/// let input = serde_json::json!({
///     "businessDescription": "Solar installer", "targetAudience": "homeowners", "industry": "energy",
/// });
/// let mut run = engine.agent(CallContext::new("alice"), Process::MagicSpark, input);
/// let mut ideas = None;
/// while let Some(event) = run.next().await {
///     if let AgentEvent::Result { output, .. } = event {
///         ideas = Some(output);
///     }
/// }
/// assert!(ideas.is_some());
/// assert_eq!(calls.0.load(std::sync::atomic::Ordering::Relaxed), 1, "one call, one record");
/// engine.shutdown(std::time::Duration::from_secs(5)).await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    calls: Calls,
    /// Serialises catalog swaps (the check and the swap are one step); calls never take it.
    swapping: Mutex<()>,
    caller_limits: Option<CallerLimits>,
    /// Where caller limits (and provider budgets) are kept when replicas share them.
    shared_rates: Option<(Arc<dyn SharedRates>, LimitsWhenDown)>,
    /// The store that admits a request in one step, when limits and budgets are kept there.
    shared_admission: Option<Arc<dyn SharedAdmission>>,
    prepaid: Arc<PrepaidCounters>,
    providers_description: String,
    simulator: Mutex<Option<Box<dyn Simulator>>>,
}

impl Engine {
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// Runs one agent for `ctx`: `Start`/`Fallback`/`Delta`/`Partial`/`Usage` per model call,
    /// maybe a `Repair`, then `Result` or `Error`. Dropping the stream cancels the call in
    /// flight, which is recorded as cancelled with its cost.
    pub fn agent(
        &self,
        ctx: CallContext,
        process: Process,
        input: serde_json::Value,
    ) -> AgentStream {
        Box::pin(run_agent(
            self.inner.calls.clone(),
            ctx,
            process,
            input,
            SessionWrites { input: true },
        ))
    }

    /// Runs the whole tool pipeline for `ctx` (with its run id, or a fresh one): Magic Spark →
    /// Logic Architect → Content Crafter ∥ Style Master, every event tagged with its stage.
    pub fn pipeline(&self, ctx: CallContext, input: PipelineInput) -> PipelineStream {
        Box::pin(run_pipeline(self.inner.calls.clone(), ctx, input))
    }

    /// One routed model call: a process (primary, then fallback) or one catalog model. An
    /// unknown model or a model whose provider is not configured is refused here, before
    /// anything is spent or recorded.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::StreamExt;
    /// use keyvex_engine::provider::ChatMessage;
    /// use keyvex_engine::{CallContext, CallEvent, CallTarget, Engine, RouteOptions, RouteRequest};
    ///
    /// # let sim = keyvex_sim::start(([127, 0, 0, 1], 0).into(), keyvex_sim::SimConfig::fast(2)).await?;
    /// # let recorder = std::sync::Arc::new(keyvex_testkit::MemoryRecorder::default());
    /// let engine = Engine::builder().simulator(sim).recorder(recorder.clone()).build()?;
    /// let request = RouteRequest {
    ///     messages: vec![ChatMessage::user("Three ideas for a bakery quiz?")],
    ///     ..RouteRequest::default()
    /// };
    /// let ctx = CallContext::new("bob").with_correlation("req-42");
    /// let target = CallTarget::parse("gpt-5.4-mini");
    /// let mut call = engine.chat(&ctx, &target, request, RouteOptions::default())?;
    /// let mut answer = String::new();
    /// while let Some(event) = call.next().await {
    ///     match event {
    ///         CallEvent::Delta(text) => answer.push_str(&text),
    ///         CallEvent::Finished { record, .. } => record.receipt.durable().await?,
    ///         CallEvent::Failed { failure, .. } => return Err(failure.error.into()),
    ///         CallEvent::Start { .. } | CallEvent::Fallback { .. } | CallEvent::Rescue(_) => {}
    ///     }
    /// }
    /// assert!(!answer.is_empty());
    /// assert_eq!(recorder.records()[0].correlation_id.as_deref(), Some("req-42"));
    ///
    /// let unknown = CallTarget::parse("gpt-9-ultra");
    /// assert!(engine.chat(&ctx, &unknown, RouteRequest::default(), RouteOptions::default()).is_err());
    /// # Ok(()) }
    /// ```
    #[expect(
        clippy::result_large_err,
        reason = "RouteError keeps the API's shape (ProviderError inline); errors are once per request"
    )]
    pub fn chat(
        &self,
        ctx: &CallContext,
        target: &CallTarget,
        request: RouteRequest,
        options: RouteOptions,
    ) -> Result<CallStream, RouteError> {
        self.inner.calls.open(ctx, target, request, options)
    }

    /// The catalog in force now. A snapshot: each call takes one when it opens and keeps it to
    /// its end, so [`Engine::swap_catalog`] never changes a call in flight.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.inner.calls.router().catalog()
    }

    /// Puts `next` in force for the calls opened from now on, atomically; calls in flight
    /// finish on (and are costed with) the version they started with. Refused, changing
    /// nothing, when `next` would route a process here to a provider this engine has no key
    /// for where the catalog in force does not. Returns the catalog it replaced.
    pub fn swap_catalog(&self, next: Catalog) -> Result<Arc<Catalog>, CatalogRefused> {
        let _one_at_a_time = self
            .inner
            .swapping
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let router = self.router();
        let current = router.catalog();
        let problems = fit::regressions(&current, &next, |kind| router.has_provider(kind));
        if !problems.is_empty() {
            return Err(CatalogRefused {
                version: next.version(),
                kept: current.version(),
                problems,
            });
        }
        Ok(router.replace_catalog(Arc::new(next)))
    }

    /// The router (tests, benches and health pages read its breakers and settings).
    pub fn router(&self) -> &Router {
        self.inner.calls.router()
    }

    pub fn recorder(&self) -> &dyn Recorder {
        self.inner.calls.recorder()
    }

    /// The circuit breaker state of a model (closed for a model never called).
    pub fn circuit_state(&self, model_id: &str) -> CircuitState {
        self.router().circuit_state(model_id)
    }

    /// Takes one request from `caller`'s limit on `endpoint`; always allowed when the engine was
    /// built without caller limits. With a shared store, the limit holds across every replica
    /// using it; while that store is unreachable the limit fails open or closed as configured.
    pub async fn check_caller(
        &self,
        caller: &str,
        endpoint: &str,
    ) -> Result<Allowance, CallerLimited> {
        let Some(limits) = &self.inner.caller_limits else {
            return Ok(UNLIMITED);
        };
        let Some((store, when_down)) = &self.inner.shared_rates else {
            return limits.check(caller, endpoint);
        };
        let rate = limits.rate();
        match store.check_caller(caller, endpoint, rate).await {
            Ok(answer) => answer,
            Err(_) if *when_down == LimitsWhenDown::Open => Ok(UNLIMITED),
            Err(_) => Err(limited_while_down(caller, endpoint, rate)),
        }
    }

    /// Rate-limit checks the shared store could not answer (0 without one).
    pub fn shared_limit_failures(&self) -> u64 {
        self.inner
            .shared_rates
            .as_ref()
            .map_or(0, |(store, _)| store.failures())
    }

    /// Where limits are kept, for start-up banners.
    pub fn limits_description(&self) -> String {
        match &self.inner.shared_rates {
            Some((store, _)) => format!("shared by every replica: {}", store.describe()),
            None => "per process (each replica enforces its own)".to_owned(),
        }
    }

    /// The dollar budgets every call spends from (`None` when the engine was built without).
    pub fn budgets(&self) -> Option<&Arc<Budgets>> {
        self.inner.calls.budgets()
    }

    /// Admits a request that opens model calls, before any stream starts: takes one request
    /// from the caller's limit on `endpoint`, and checks that the dollar budgets have room for
    /// the first call's worst case (its primary model's; nothing to price when `first` is
    /// `None` or names an unknown model). With limits and budgets in a store that takes them in
    /// one step ([`EngineBuilder::admission_in_one_step`]), that step also reserves the first
    /// call's dollars and provider budget, and leaves them in `ctx` for its first attempt.
    pub async fn admit(
        &self,
        ctx: &mut CallContext,
        endpoint: &str,
        first: Option<FirstCallOf<'_>>,
    ) -> Admission {
        let first = first.and_then(|first| match first {
            FirstCallOf::Agent(process, input) => self.first_request(
                &CallTarget::Process(process),
                &agent_request(process, input)?,
            ),
            FirstCallOf::Chat(target, request) => self.first_request(target, request),
        });
        let amount = first.as_ref().map_or(Cost::ZERO, |f| f.amount);
        let Some(store) = &self.inner.shared_admission else {
            let (allowance, budgets) = futures::join!(
                self.check_caller(&ctx.caller, endpoint),
                self.check_budget(ctx, amount)
            );
            return Admission { allowance, budgets };
        };
        let budgets = self.budgets();
        let lines = budgets.map(|b| b.lines(&ctx.caller, ctx.run_id.as_deref(), SystemTime::now()));
        let rate = self.inner.caller_limits.as_ref().map(CallerLimits::rate);
        let provider = match (
            &first,
            self.router().config().provider_rates,
            &self.inner.shared_rates,
        ) {
            (Some(f), Some(rates), Some(_)) => Some((f.provider, rates, f.tokens)),
            _ => None,
        };
        let ask = AdmitAsk {
            caller: &ctx.caller,
            endpoint,
            rate,
            spend: lines.as_deref().map(|lines| (lines, amount)),
            provider,
        };
        let answer = match store.admit(ask).await {
            Ok(answer) => answer,
            Err(LimitsUnavailable(why)) => {
                let allowance = match (rate, self.limits_when_down()) {
                    (Some(rate), LimitsWhenDown::Closed) => {
                        return Admission {
                            allowance: Err(limited_while_down(&ctx.caller, endpoint, rate)),
                            budgets: Ok(Vec::new()),
                        };
                    }
                    _ => UNLIMITED,
                };
                let budgets = budgets.map_or(Ok(Vec::new()), |b| b.unanswered(why));
                return Admission {
                    allowance: Ok(allowance),
                    budgets,
                };
            }
        };
        let (allowance, states, provider) = match answer {
            AdmitAnswer::Limited(limited) => {
                return Admission {
                    allowance: Err(limited),
                    budgets: Ok(Vec::new()),
                };
            }
            AdmitAnswer::OverBudget {
                allowance,
                index,
                state,
            } => {
                let refused = match (budgets, &lines) {
                    (Some(budgets), Some(lines)) => {
                        Err(budgets.refused_at_admission(lines, index, state, amount))
                    }
                    _ => Ok(Vec::new()),
                };
                return Admission {
                    allowance: Ok(allowance.unwrap_or(UNLIMITED)),
                    budgets: refused,
                };
            }
            AdmitAnswer::Admitted {
                allowance,
                states,
                provider,
            } => (Ok(allowance.unwrap_or(UNLIMITED)), states, provider),
        };
        // The dollars were reserved unless the provider refused (see `AdmitAnswer`).
        let views = match (budgets, lines) {
            (Some(budgets), Some(lines))
                if first.is_some() && !matches!(provider, Some(Err(_))) =>
            {
                let (hold, views) = budgets.reserved_at_admission(lines, states, amount);
                self.prepay(ctx, first, Some(hold), provider);
                return Admission {
                    allowance,
                    budgets: Ok(views),
                };
            }
            (Some(budgets), Some(lines)) => budgets.answered_at_admission(&lines, states),
            _ => Vec::new(),
        };
        self.prepay(ctx, first, None, provider);
        Admission {
            allowance,
            budgets: Ok(views),
        }
    }

    /// Leaves what admission reserved in `ctx` for the first call's first attempt.
    fn prepay(
        &self,
        ctx: &mut CallContext,
        first: Option<FirstRequest>,
        spend: Option<SpendHold>,
        provider: Option<Result<(), BudgetExceeded>>,
    ) {
        let Some(first) = first else {
            return;
        };
        let provider = match (
            provider,
            &self.inner.shared_rates,
            self.router().config().provider_rates,
        ) {
            (Some(Ok(())), Some((store, _)), Some(rates)) => Some(Ok(ProviderHold::Shared(
                SharedReservation::made(Arc::clone(store), first.provider, rates, first.tokens),
            ))),
            (Some(Err(refused)), _, _) => Some(Err(refused)),
            _ => None,
        };
        if spend.is_none() && provider.is_none() {
            return;
        }
        ctx.first_call = FirstCall::holding(Prepaid::new(
            first.model,
            first.amount,
            first.tokens,
            spend,
            provider,
            Arc::clone(&self.inner.prepaid),
        ));
    }

    /// How reservations made at admission were used, for `/metrics`.
    pub fn prepaid_stats(&self) -> PrepaidStats {
        self.inner.prepaid.stats()
    }

    fn limits_when_down(&self) -> LimitsWhenDown {
        self.inner
            .shared_rates
            .as_ref()
            .map_or(LimitsWhenDown::Open, |(_, when_down)| *when_down)
    }

    /// Whether `ctx`'s budgets have room for a first call costing up to `worst_case`, without
    /// reserving: routes ask before they open a stream, so a caller over budget is refused
    /// before any call. Each attempt's own reservation is what holds the limit. Without budgets,
    /// always room (and no views).
    pub async fn check_budget(
        &self,
        ctx: &CallContext,
        worst_case: Cost,
    ) -> Result<Vec<BudgetView>, BudgetDenied> {
        match self.budgets() {
            Some(budgets) => {
                budgets
                    .check(&ctx.caller, ctx.run_id.as_deref(), worst_case)
                    .await
            }
            None => Ok(Vec::new()),
        }
    }

    /// The most the first call to `target` with `request` can cost (its primary model's worst
    /// case; see [`worst_case_cost`]); `None` for an unknown model.
    pub fn worst_case(&self, target: &CallTarget, request: &RouteRequest) -> Option<Cost> {
        self.first_request(target, request).map(|f| f.amount)
    }

    /// What the first attempt of a call to `target` reserves: its primary model's worst case
    /// and estimated tokens, figured as the router figures them.
    fn first_request(&self, target: &CallTarget, request: &RouteRequest) -> Option<FirstRequest> {
        let catalog = self.catalog();
        let (spec, default_max) = match target {
            CallTarget::Process(process) => {
                let route = catalog.route(*process);
                (
                    catalog.model(&route.primary)?,
                    Some(route.max_output_tokens),
                )
            }
            CallTarget::Model(id) => (catalog.model(id)?, None),
        };
        let wanted = request
            .max_output_tokens
            .or(default_max)
            .unwrap_or(spec.max_output_tokens);
        let chat = ChatRequest {
            model: spec.id.clone(),
            system: request.system.clone(),
            messages: request.messages.clone(),
            max_output_tokens: wanted.clamp(1, spec.max_output_tokens),
            temperature: request.temperature,
            response_schema: request.response_schema.clone(),
        };
        Some(FirstRequest {
            model: spec.id.clone(),
            provider: spec.provider,
            amount: worst_case_cost(&chat, &spec.pricing),
            tokens: estimate_tokens(&chat),
        })
    }

    /// The most an agent's first call on `input` can cost; `None` when the input does not render.
    pub fn agent_worst_case(&self, process: Process, input: &serde_json::Value) -> Option<Cost> {
        self.worst_case(
            &CallTarget::Process(process),
            &agent_request(process, input)?,
        )
    }

    /// Which providers are in use, for start-up banners.
    pub fn providers_description(&self) -> &str {
        &self.inner.providers_description
    }

    /// Flushes the recorder (everything accepted becomes durable, and is shipped if the
    /// recorder ships, within `flush`), then stops the simulator, if any. Call it once every
    /// stream has ended.
    pub async fn shutdown(&self, flush: Duration) -> ShutdownReport {
        let deadline = tokio::time::Instant::now() + flush;
        let report = self.inner.calls.recorder().shutdown(deadline).await;
        let simulator = self
            .inner
            .simulator
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(simulator) = simulator {
            simulator.shutdown().await;
        }
        report
    }
}

/// What a caller's limit shows when callers are not limited (or a shared store that cannot
/// be asked lets requests through).
const UNLIMITED: Allowance = Allowance {
    limit: u32::MAX,
    remaining: u32::MAX,
    reset: Duration::ZERO,
};

/// The refusal of a caller limit that fails closed while its store cannot be asked.
fn limited_while_down(caller: &str, endpoint: &str, rate: Rate) -> CallerLimited {
    CallerLimited {
        caller: caller.to_owned(),
        endpoint: endpoint.to_owned(),
        limit: rate.per_period.get(),
        burst: rate.burst.get(),
        period: rate.period,
        retry_after: Duration::from_secs(1),
    }
}

/// The first attempt of a call, as admission prices and reserves it.
struct FirstRequest {
    model: String,
    provider: ProviderKind,
    amount: Cost,
    tokens: u64,
}

/// The request an agent's call on `input` makes; `None` when the input does not render.
fn agent_request(process: Process, input: &serde_json::Value) -> Option<RouteRequest> {
    let prompt = agents::render(process, input).ok()?;
    Some(RouteRequest {
        system: Some(prompt.system),
        messages: vec![ChatMessage::user(prompt.user)],
        response_schema: Some(ResponseSchema {
            name: agents::schema_name(process).to_owned(),
            schema: agents::output_schema(process).clone(),
        }),
        max_output_tokens: None,
        temperature: None,
    })
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("router", self.router())
            .field("providers", &self.inner.providers_description)
            .finish()
    }
}

/// Builds an [`Engine`]. Everything has a default except the recorder.
pub struct EngineBuilder {
    catalog: Option<Catalog>,
    models_file: Option<PathBuf>,
    openai: Option<ProviderConfig>,
    anthropic: Option<ProviderConfig>,
    anthropic_version: AnthropicVersion,
    custom: Vec<(ProviderKind, SharedProvider)>,
    simulator: Option<Box<dyn Simulator>>,
    connect_timeout: Duration,
    max_event_bytes: usize,
    router: RouterConfig,
    caller_rate: Option<Rate>,
    recorder: Option<Arc<dyn Recorder>>,
    observers: Vec<Arc<dyn CallObserver>>,
    budgets: Option<Arc<Budgets>>,
    shared_rates: Option<(Arc<dyn SharedRates>, LimitsWhenDown)>,
    shared_admission: Option<Arc<dyn SharedAdmission>>,
}

impl Default for EngineBuilder {
    fn default() -> Self {
        EngineBuilder {
            catalog: None,
            models_file: None,
            openai: None,
            anthropic: None,
            anthropic_version: AnthropicVersion::default(),
            custom: Vec::new(),
            simulator: None,
            connect_timeout: Duration::from_secs(5),
            max_event_bytes: crate::provider::DEFAULT_MAX_EVENT_BYTES,
            router: RouterConfig::default(),
            caller_rate: None,
            recorder: None,
            observers: Vec::new(),
            budgets: None,
            shared_rates: None,
            shared_admission: None,
        }
    }
}

const OPENAI_DEFAULT_BASE: &str = "https://api.openai.com/v1";
const ANTHROPIC_DEFAULT_BASE: &str = "https://api.anthropic.com/v1";

impl EngineBuilder {
    /// The model catalog (default: the embedded `models/default-models.json`).
    pub fn catalog(mut self, catalog: Catalog) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// A catalog JSON file to load and validate at `build`, instead of the embedded one.
    pub fn models_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.models_file = Some(path.into());
        self
    }

    /// The real OpenAI API with `key`.
    pub fn openai(self, key: impl Into<String>) -> Self {
        self.openai_at(OPENAI_DEFAULT_BASE, key)
    }

    /// An OpenAI-compatible upstream at `base_url` (including `/v1`).
    pub fn openai_at(mut self, base_url: &str, key: impl Into<String>) -> Self {
        self.openai = Some(ProviderConfig {
            connect_timeout: self.connect_timeout,
            ..ProviderConfig::new(base_url.trim_end_matches('/'), ApiKey::new(key))
        });
        self
    }

    /// The real Anthropic API with `key`.
    pub fn anthropic(self, key: impl Into<String>) -> Self {
        self.anthropic_at(ANTHROPIC_DEFAULT_BASE, key)
    }

    /// An Anthropic-compatible upstream at `base_url` (including `/v1`).
    pub fn anthropic_at(mut self, base_url: &str, key: impl Into<String>) -> Self {
        self.anthropic = Some(ProviderConfig {
            connect_timeout: self.connect_timeout,
            ..ProviderConfig::new(base_url.trim_end_matches('/'), ApiKey::new(key))
        });
        self
    }

    /// The Anthropic API version requests go out with (default 2023-06-01), except for catalog
    /// models that name their own (`anthropicVersion`). On 2026-10-21 no temperature is sent.
    pub fn anthropic_version(mut self, version: AnthropicVersion) -> Self {
        self.anthropic_version = version;
        self
    }

    /// Both providers served by `simulator`, through the real client code over HTTP; the engine
    /// stops it on shutdown.
    pub fn simulator(self, simulator: impl Simulator) -> Self {
        let base = simulator.base_url();
        // The simulator accepts any key; a fixed one keeps the auth headers on the wire.
        let mut this = self
            .openai_at(&base, "sim-key")
            .anthropic_at(&base, "sim-key");
        this.simulator = Some(Box::new(simulator));
        this
    }

    /// A provider of your own for one wire protocol (tests and benches use recorded streams).
    pub fn provider(mut self, kind: ProviderKind, provider: SharedProvider) -> Self {
        self.custom.push((kind, provider));
        self
    }

    /// TCP connect timeout of provider calls (default 5 s). Set it before the providers.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        for cfg in [&mut self.openai, &mut self.anthropic]
            .into_iter()
            .flatten()
        {
            cfg.connect_timeout = timeout;
        }
        self
    }

    /// Longest SSE line or event a provider stream may send before it is cut off as hostile
    /// (default 1 MiB).
    pub fn max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes;
        self
    }

    /// Deadlines, retries, breakers and provider budgets (default: [`RouterConfig::default`]).
    pub fn router(mut self, config: RouterConfig) -> Self {
        self.router = config;
        self
    }

    /// Requests and tokens per minute each provider may be sent (default: unlimited).
    pub fn provider_rates(mut self, rates: ProviderRates) -> Self {
        self.router.provider_rates = Some(rates);
        self
    }

    /// Requests per caller and endpoint ([`Engine::check_caller`]; default: unlimited).
    pub fn caller_rate(mut self, rate: Rate) -> Self {
        self.caller_rate = Some(rate);
        self
    }

    /// Dollar budgets every model call reserves from before it is made (default: none).
    pub fn budgets(mut self, budgets: Budgets) -> Self {
        self.budgets = Some(Arc::new(budgets));
        self
    }

    /// Admits requests in one step of `store` ([`Engine::admit`]): the caller's limit, the
    /// budget check and the first call's reservations at once. `store` must be the store given
    /// to [`EngineBuilder::shared_limits`] and the one behind the budgets' spend store (a
    /// Redis keeps all three): the reservations it makes are settled through those.
    pub fn admission_in_one_step(mut self, store: Arc<dyn SharedAdmission>) -> Self {
        self.shared_admission = Some(store);
        self
    }

    /// Keeps caller limits and provider budgets in `store` (shared by replicas) instead of in
    /// this process; `when_down` says what they do while it cannot be reached.
    pub fn shared_limits(mut self, store: Arc<dyn SharedRates>, when_down: LimitsWhenDown) -> Self {
        self.shared_rates = Some((store, when_down));
        self
    }

    /// Where call records and session messages go. Required.
    pub fn recorder(mut self, recorder: Arc<dyn Recorder>) -> Self {
        self.recorder = Some(recorder);
        self
    }

    /// Told about every call record before the recorder is (add as many as you like).
    pub fn observer(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observers.push(observer);
        self
    }

    /// Loads and validates the catalog and builds the provider clients and the router.
    pub fn build(mut self) -> Result<Engine, EngineError> {
        let recorder = self.recorder.ok_or(EngineError::NoRecorder)?;
        let catalog = Arc::new(match (self.catalog, &self.models_file) {
            (Some(catalog), _) => catalog,
            (None, path) => Catalog::load(path.as_deref())?,
        });
        let mut providers = Providers::new();
        let mut described = Vec::new();
        for cfg in [&mut self.openai, &mut self.anthropic]
            .into_iter()
            .flatten()
        {
            cfg.max_event_bytes = self.max_event_bytes;
        }
        if let Some(cfg) = &self.openai {
            providers = providers.with(ProviderKind::OpenAi, Arc::new(OpenAiProvider::new(cfg)?));
            described.push(format!("openai: {}", cfg.base_url));
        }
        if let Some(cfg) = &self.anthropic {
            let versions = catalog.anthropic_versions(self.anthropic_version);
            // Said once here rather than per request: the catalog sets these on purpose, and
            // on this version they cannot be honoured.
            let unsent = catalog.unsent_temperatures(&versions);
            if !unsent.is_empty() {
                let list: Vec<String> = unsent.iter().map(ToString::to_string).collect();
                tracing::warn!(
                    "temperature not sent to Anthropic models on an API version without sampling parameters: {}; Anthropic API version 2023-06-01 keeps it",
                    list.join(", ")
                );
            }
            providers = providers.with(
                ProviderKind::Anthropic,
                Arc::new(AnthropicProvider::new(cfg)?.with_versions(versions)),
            );
            described.push(format!(
                "anthropic: {} (API version {})",
                cfg.base_url, self.anthropic_version
            ));
        }
        for (kind, provider) in self.custom {
            providers = providers.with(kind, provider);
            described.push(format!("{kind}: custom provider"));
        }
        for kind in ProviderKind::ALL {
            if providers.get(kind).is_none() {
                described.push(format!("{kind}: not configured"));
            }
        }
        let providers_description = match &self.simulator {
            Some(sim) => format!(
                "simulated: {} (Anthropic API version {})",
                sim.describe(),
                self.anthropic_version
            ),
            None => described.join(", "),
        };
        let router =
            Router::with_shared_rates(catalog, providers, self.router, self.shared_rates.clone());
        Ok(Engine {
            inner: Arc::new(Inner {
                calls: Calls::new(router, recorder, self.observers, self.budgets),
                swapping: Mutex::new(()),
                caller_limits: self.caller_rate.map(CallerLimits::new),
                shared_rates: self.shared_rates,
                shared_admission: self.shared_admission,
                prepaid: Arc::default(),
                providers_description,
                simulator: Mutex::new(self.simulator),
            }),
        })
    }
}
