//! The bench cases: each hot path set up once, as a closure the criterion benches and the gate
//! both run. One list, so the gate measures exactly what `cargo bench` measures.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use agents::{PartialJson, Process};
use futures::StreamExt;
use futures::executor::block_on;
use keyvex_engine::bench_support::{
    anthropic_request_body, anthropic_sse_events, openai_request_body, openai_sse_events,
};
use keyvex_engine::budgets::{BudgetLimits, Budgets, SpendAccount, worst_case_cost};
use keyvex_engine::call::{CallContext, records_of};
use keyvex_engine::catalog::{Catalog, CatalogError, ModelSpec};
use keyvex_engine::cost::{self, Cost, Pricing};
use keyvex_engine::limits::{CallerLimits, ProviderBudget, ProviderRates, Rate, estimate_tokens};
use keyvex_engine::provider::anthropic_version::AnthropicVersion;
use keyvex_engine::provider::{ChatMessage, ChatRequest, EventStream, Provider, ResponseSchema};
use keyvex_engine::router::{
    Providers, RouteEvent, RouteOutcome, RouteRequest, Router, RouterConfig,
};
use keyvex_engine::stream::{FinishReason, ProviderEvent, ProviderKind, Usage};
use keyvex_engine::tokenize;
use sha2::{Digest, Sha256};

use crate::fixtures;

/// The calibration bench: a fixed CPU workload every budget ratio is taken against.
pub const CALIBRATION: &str = "calibration/sha256_4k";

/// Bytes hashed per calibration iteration.
const CALIBRATION_BYTES: usize = 4096;
/// Size of the deltas fed to `PartialJson`: about three tokens, what a model streams per event.
const PARTIAL_DELTA_BYTES: usize = 12;

/// How much work one iteration does, for throughput figures (bytes/s, elements/s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Bytes(u64),
    Elements(u64),
}

/// One hot path, ready to run. `run` performs one iteration and returns a value derived from
/// its result, which the caller passes through `black_box` so nothing is optimised away.
pub struct Case {
    name: String,
    work: Option<Work>,
    routine: Box<dyn FnMut() -> u64>,
}

impl Case {
    fn new(
        name: impl Into<String>,
        work: Option<Work>,
        routine: impl FnMut() -> u64 + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            work,
            routine: Box::new(routine),
        }
    }

    /// `group/function`, e.g. `sse/openai`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn work(&self) -> Option<Work> {
        self.work
    }

    pub fn run(&mut self) -> u64 {
        (self.routine)()
    }
}

/// Why the cases could not be set up. Each one means the inputs are broken, not slow.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "fixture {file} does not replay to a complete answer: {problem}; regenerate it with `cargo run -p benches --bin capture`"
    )]
    Fixture { file: &'static str, problem: String },
    #[error("the embedded model catalog does not load: {0}")]
    Catalog(#[from] CatalogError),
    #[error("cannot build the tokio runtime for the relay bench: {0}")]
    Runtime(std::io::Error),
    #[error("agent {process}: {problem}; the agents' samples or templates changed, fix them first")]
    Agent { process: Process, problem: String },
    #[error("the relay bench did not finish its route: {0}")]
    Relay(String),
    #[error("the {case} bench's first run failed: {problem}; the engine's API changed under it")]
    RequestPath { case: &'static str, problem: String },
}

/// Every case, calibration first.
pub fn all() -> Result<Vec<Case>, SetupError> {
    let mut cases = vec![calibration()];
    cases.push(sse_openai()?);
    cases.push(sse_anthropic()?);
    let (relay, outcome) = relay()?;
    cases.push(relay);
    cases.push(route_decide()?);
    cases.push(cost_case()?);
    cases.push(caller_limit_case()?);
    cases.push(provider_budget_case()?);
    cases.push(worst_case_cost_case()?);
    cases.push(spend_reserve_settle_case()?);
    cases.push(records_case(outcome)?);
    cases.extend(request_body_cases()?);
    cases.push(tokenize_case()?);
    for process in Process::ALL {
        cases.extend(agent_cases(process)?);
    }
    Ok(cases)
}

fn calibration() -> Case {
    // Deterministic, incompressible-looking bytes; the content does not change SHA-256's cost.
    let buf: Vec<u8> = (0..CALIBRATION_BYTES as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    Case::new(
        CALIBRATION,
        Some(Work::Bytes(CALIBRATION_BYTES as u64)),
        move || u64::from(Sha256::digest(black_box(&buf))[0]),
    )
}

/// Sums what a stream of provider events carries, so every event is really produced.
fn weigh(events: &[ProviderEvent]) -> u64 {
    events
        .iter()
        .map(|e| match e {
            ProviderEvent::Delta(text) => text.len() as u64,
            _ => 1,
        })
        .sum()
}

/// The deltas' text, checking the replay ended in `Done` after a `Usage`.
fn replay_text(file: &'static str, events: &[ProviderEvent]) -> Result<String, SetupError> {
    let fail = |problem: String| SetupError::Fixture { file, problem };
    let n = events.len();
    if n < 2 || !matches!(events[n - 2], ProviderEvent::Usage(_)) {
        return Err(fail("no usage before the end".into()));
    }
    if !matches!(events[n - 1], ProviderEvent::Done { .. }) {
        return Err(fail(format!("it ends with {:?}", events[n - 1])));
    }
    let text: String = events
        .iter()
        .filter_map(|e| match e {
            ProviderEvent::Delta(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    agents::parse_and_validate(fixtures::FIXTURE_PROCESS, &text)
        .map_err(|e| fail(format!("its answer is not a valid agent output: {e}")))?;
    Ok(text)
}

fn sse_openai() -> Result<Case, SetupError> {
    let pieces = fixtures::frames(fixtures::OPENAI);
    let events: Vec<_> = block_on(openai_sse_events(pieces.clone()).collect());
    replay_text(fixtures::OPENAI_FILE, &events)?;
    Ok(Case::new(
        "sse/openai",
        Some(Work::Bytes(fixtures::OPENAI.len() as u64)),
        move || {
            let events: Vec<_> = block_on(openai_sse_events(pieces.clone()).collect());
            weigh(&events)
        },
    ))
}

fn sse_anthropic() -> Result<Case, SetupError> {
    const MODEL: &str = "replayed";
    let pieces = fixtures::frames(fixtures::ANTHROPIC);
    let events: Vec<_> = block_on(anthropic_sse_events(pieces.clone(), MODEL, true).collect());
    replay_text(fixtures::ANTHROPIC_FILE, &events)?;
    Ok(Case::new(
        "sse/anthropic",
        Some(Work::Bytes(fixtures::ANTHROPIC.len() as u64)),
        move || {
            let events: Vec<_> =
                block_on(anthropic_sse_events(pieces.clone(), MODEL, true).collect());
            weigh(&events)
        },
    ))
}

/// A provider that answers every request with the same recorded events, at once.
struct Recorded {
    kind: ProviderKind,
    events: Arc<Vec<ProviderEvent>>,
}

impl Provider for Recorded {
    fn kind(&self) -> ProviderKind {
        self.kind
    }

    fn stream(&self, _request: ChatRequest) -> EventStream {
        // Cloning allocates each delta's String, as decoding a live chunk does.
        futures::stream::iter(self.events.as_ref().clone()).boxed()
    }
}

/// A router over the embedded catalog whose providers replay `deltas` with exact usage.
fn recorded_router(deltas: &[String]) -> Result<Router, SetupError> {
    let catalog = Arc::new(Catalog::embedded()?);
    let mut providers = Providers::new();
    for kind in ProviderKind::ALL {
        let mut events = vec![ProviderEvent::Start {
            provider: kind,
            model: "recorded".to_owned(),
        }];
        events.extend(deltas.iter().cloned().map(ProviderEvent::Delta));
        events.push(ProviderEvent::Usage(Usage {
            input: 1200,
            cached_input: 0,
            cache_write: 0,
            output: deltas.len() as u64,
        }));
        events.push(ProviderEvent::Done {
            finish_reason: FinishReason::Stop,
            unterminated: false,
        });
        let provider = Recorded {
            kind,
            events: Arc::new(events),
        };
        providers = providers.with(kind, Arc::new(provider));
    }
    Ok(Router::new(catalog, providers, RouterConfig::default()))
}

/// The provider event → router event path: one route relaying a whole captured answer, one
/// event per chunk. Throughput is per delta, so the figure is the per-chunk cost. Also returns
/// the outcome of that route, which the call-record case turns into records.
fn relay() -> Result<(Case, RouteOutcome), SetupError> {
    let events: Vec<_> = block_on(openai_sse_events(fixtures::frames(fixtures::OPENAI)).collect());
    let deltas: Vec<String> = events
        .into_iter()
        .filter_map(|e| match e {
            ProviderEvent::Delta(t) => Some(t),
            _ => None,
        })
        .collect();
    let router = recorded_router(&deltas)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(SetupError::Runtime)?;
    let request = RouteRequest {
        system: Some("You write landing page copy.".to_owned()),
        messages: vec![ChatMessage::user("Write it.")],
        ..RouteRequest::default()
    };
    let route = move || {
        runtime.block_on(async {
            let mut stream = router.stream_process(fixtures::FIXTURE_PROCESS, request.clone());
            let mut relayed = 0u64;
            let mut finished = None;
            while let Some(event) = stream.next().await {
                match event {
                    RouteEvent::Delta(text) => relayed += text.len() as u64,
                    RouteEvent::Finished(outcome) => finished = Some(outcome),
                    _ => {}
                }
            }
            (relayed, finished)
        })
    };
    let expected: u64 = deltas.iter().map(|d| d.len() as u64).sum();
    let outcome = match route() {
        (relayed, Some(outcome)) if relayed == expected => outcome,
        (relayed, finished) => {
            return Err(SetupError::Relay(format!(
                "relayed {relayed} of {expected} bytes, finished: {}",
                finished.is_some()
            )));
        }
    };
    let case = Case::new(
        "relay/router",
        Some(Work::Elements(deltas.len() as u64)),
        move || route().0,
    );
    Ok((case, *outcome))
}

/// Catalog lookup and the routing decision (route, models, providers, attempt plan) for every
/// process, up to the point where the first provider call would be made.
fn route_decide() -> Result<Case, SetupError> {
    let router = recorded_router(&[])?;
    let request = RouteRequest {
        messages: vec![ChatMessage::user("Hi")],
        ..RouteRequest::default()
    };
    Ok(Case::new(
        "route/decide",
        Some(Work::Elements(Process::ALL.len() as u64)),
        move || {
            let mut n = 0u64;
            for process in Process::ALL {
                // One snapshot per decision, as every call takes (the catalog can be swapped).
                let catalog = router.catalog();
                let route = catalog.route(black_box(process));
                n += catalog
                    .model(&route.primary)
                    .map_or(0, |m| m.context_window);
                // Built but never polled: planning happens here, the call on first poll.
                drop(black_box(router.stream_process(process, request.clone())));
            }
            n
        },
    ))
}

fn cost_case() -> Result<Case, SetupError> {
    let catalog = Catalog::embedded()?;
    let pricing: Vec<Pricing> = catalog.models().iter().map(|m| m.pricing).collect();
    let usage = Usage {
        input: 2160,
        cached_input: 2048,
        cache_write: 100,
        output: 815,
    };
    Ok(Case::new(
        "cost/cost",
        Some(Work::Elements(pricing.len() as u64)),
        move || {
            pricing
                .iter()
                .map(|p| cost::cost(black_box(&usage), black_box(p)).pico_usd())
                .fold(0u64, u64::wrapping_add)
        },
    ))
}

/// A `u32` limit no bench run can exhaust: a long criterion run takes tens of millions of
/// iterations, and a refused check would time the refusal path instead.
const UNREACHABLE: NonZeroU32 = NonZeroU32::MAX;
/// Callers the caller-limit case cycles through, so the keyed limiter holds a realistic
/// population rather than one hot entry.
const CALLERS: usize = 64;

fn request_path_failed(case: &'static str, problem: impl std::fmt::Display) -> SetupError {
    SetupError::RequestPath {
        case,
        problem: problem.to_string(),
    }
}

/// The HTTP edge's per-caller, per-endpoint limit check (a keyed GCRA cell), as every request
/// to the API takes before anything else.
fn caller_limit_case() -> Result<Case, SetupError> {
    const NAME: &str = "limits/caller_check";
    let limits = CallerLimits::new(Rate {
        per_period: UNREACHABLE,
        period: Duration::from_secs(1),
        burst: UNREACHABLE,
    });
    let callers: Vec<String> = (0..CALLERS).map(|i| format!("caller-{i:04}")).collect();
    for caller in &callers {
        limits
            .check(caller, "agents")
            .map_err(|e| request_path_failed(NAME, e))?;
    }
    let mut next = 0usize;
    Ok(Case::new(NAME, Some(Work::Elements(1)), move || {
        next = (next + 1) % CALLERS;
        limits
            .check(black_box(&callers[next]), black_box("agents"))
            .map_or(0, |a| u64::from(a.limit) + u64::from(a.remaining))
    }))
}

/// The Content Crafter request as an attempt sends it to `model`: its rendered prompt, the
/// answer's JSON schema, the model's output cap.
fn agent_request(model: &ModelSpec) -> Result<ChatRequest, SetupError> {
    let process = fixtures::FIXTURE_PROCESS;
    let prompt = render(process)?;
    Ok(ChatRequest {
        model: model.id.clone(),
        system: Some(prompt.system),
        messages: vec![ChatMessage::user(prompt.user)],
        max_output_tokens: model.max_output_tokens,
        temperature: None,
        response_schema: Some(ResponseSchema {
            name: agents::schema_name(process).to_owned(),
            schema: agents::output_schema(process).clone(),
        }),
    })
}

/// The catalog's primary model of the fixture's process, and its first OpenAI and first
/// Anthropic models.
fn models(catalog: &Catalog) -> Result<(ModelSpec, ModelSpec, ModelSpec), SetupError> {
    let route = catalog.route(fixtures::FIXTURE_PROCESS);
    let primary = catalog
        .model(&route.primary)
        .map(|m| ModelSpec::clone(m))
        .ok_or_else(|| {
            request_path_failed(
                "request",
                format!("route names unknown model {}", route.primary),
            )
        })?;
    let of = |kind: ProviderKind| {
        catalog
            .models()
            .iter()
            .find(|m| m.provider == kind)
            .map(|m| ModelSpec::clone(m))
            .ok_or_else(|| request_path_failed("request", format!("no {kind:?} model")))
    };
    Ok((
        primary,
        of(ProviderKind::OpenAi)?,
        of(ProviderKind::Anthropic)?,
    ))
}

/// A provider's local request and token budget around one attempt: the byte-length token
/// estimate, the reservation before the call, the settle with the usage after it.
fn provider_budget_case() -> Result<Case, SetupError> {
    const NAME: &str = "limits/provider_reserve";
    let catalog = Catalog::embedded()?;
    let (primary, _, _) = models(&catalog)?;
    let request = agent_request(&primary)?;
    let budget = Arc::new(ProviderBudget::new(
        primary.provider,
        ProviderRates {
            requests_per_minute: UNREACHABLE,
            tokens_per_minute: UNREACHABLE,
        },
    ));
    // Each cycle charges the limiter what the attempt used beyond its estimate's refund; a few
    // tokens a cycle keep 4.29e9 a minute out of reach, and the arithmetic costs the same.
    const USED: u64 = 8;
    let run = move || {
        let estimate = estimate_tokens(black_box(&request));
        match budget.reserve(estimate) {
            Ok(reservation) => {
                let reserved = reservation.reserved();
                reservation.settle(black_box(USED));
                reserved
            }
            Err(_) => 0,
        }
    };
    if run() == 0 {
        return Err(request_path_failed(NAME, "the reservation was refused"));
    }
    Ok(Case::new(NAME, Some(Work::Elements(1)), run))
}

/// The most an attempt can cost, which the dollar budgets reserve before it: the whole prompt
/// and the schema's JSON as tokens, plus the output cap.
fn worst_case_cost_case() -> Result<Case, SetupError> {
    const NAME: &str = "budgets/worst_case_cost";
    let catalog = Catalog::embedded()?;
    let (primary, _, _) = models(&catalog)?;
    let request = agent_request(&primary)?;
    let pricing = primary.pricing;
    if worst_case_cost(&request, &pricing).pico_usd() == 0 {
        return Err(request_path_failed(NAME, "the worst case costs nothing"));
    }
    Ok(Case::new(NAME, Some(Work::Elements(1)), move || {
        worst_case_cost(black_box(&request), black_box(&pricing)).pico_usd()
    }))
}

/// The caller's dollar budgets around one attempt, counted in this process: the budget lines of
/// caller, month, global day and run (with their window keys), the reservation of the worst
/// case on all of them, and the settle to the attempt's real cost.
fn spend_reserve_settle_case() -> Result<Case, SetupError> {
    const NAME: &str = "budgets/reserve_settle";
    let catalog = Catalog::embedded()?;
    let (primary, _, _) = models(&catalog)?;
    let request = agent_request(&primary)?;
    let worst = worst_case_cost(&request, &primary.pricing);
    let actual = cost::cost(
        &Usage {
            input: 2160,
            cached_input: 2048,
            cache_write: 0,
            output: 815,
        },
        &primary.pricing,
    );
    // $10 million per budget: a settle costs a fraction of a cent, so no run of any length
    // reaches it and every reservation fits (a refusal would time another path).
    let ample = Cost::from_micro_usd(10_000_000_000_000);
    let account = SpendAccount {
        budgets: Arc::new(Budgets::in_process(BudgetLimits {
            caller_daily: Some(ample),
            caller_monthly: Some(ample),
            run: Some(ample),
            global_daily: Some(ample),
            ..BudgetLimits::default()
        })),
        caller: "caller-0007".to_owned(),
        run_id: Some("run-0190a1b2".to_owned()),
    };
    let run = move || match block_on(account.reserve(black_box(worst))) {
        Ok(hold) => {
            let reserved = hold.reserved().pico_usd();
            hold.settle(black_box(actual));
            reserved
        }
        Err(_) => 0,
    };
    if run() == 0 {
        return Err(request_path_failed(NAME, "the reservation was refused"));
    }
    Ok(Case::new(NAME, Some(Work::Elements(1)), run))
}

/// A finished route's records, as the call layer builds them for the recorder: one per attempt
/// that reached a model, with its usage, cost, timing and the call's context.
fn records_case(outcome: RouteOutcome) -> Result<Case, SetupError> {
    const NAME: &str = "record/records_of";
    let process = fixtures::FIXTURE_PROCESS;
    let ctx = CallContext::new("caller-0007")
        .with_correlation("req-0190a1b2c3d4")
        .with_run("run-0190a1b2")
        .with_stage(process);
    let weigh = move || {
        records_of(black_box(&outcome), black_box(&ctx), Some(process))
            .iter()
            .map(|r| r.output_tokens + 1)
            .sum::<u64>()
    };
    if weigh() == 0 {
        return Err(request_path_failed(NAME, "the route made no record"));
    }
    Ok(Case::new(NAME, Some(Work::Elements(1)), weigh))
}

/// Each provider's request body for the Content Crafter request: its wire request built from
/// the engine's, serialised to JSON, as every attempt does before it sends.
fn request_body_cases() -> Result<Vec<Case>, SetupError> {
    let catalog = Catalog::embedded()?;
    let (_, openai, anthropic) = models(&catalog)?;
    let openai_request = agent_request(&openai)?;
    let anthropic_request = agent_request(&anthropic)?;
    let version = anthropic
        .anthropic_version
        .unwrap_or(AnthropicVersion::default());
    let openai_len = openai_request_body(&openai_request)
        .map_err(|e| request_path_failed("request_body/openai", e))?
        .len();
    let anthropic_len = anthropic_request_body(&anthropic_request, version)
        .map_err(|e| request_path_failed("request_body/anthropic", e))?
        .len();
    Ok(vec![
        Case::new(
            "request_body/openai",
            Some(Work::Bytes(openai_len as u64)),
            move || openai_request_body(black_box(&openai_request)).map_or(0, |b| b.len() as u64),
        ),
        Case::new(
            "request_body/anthropic",
            Some(Work::Bytes(anthropic_len as u64)),
            move || {
                anthropic_request_body(black_box(&anthropic_request), version)
                    .map_or(0, |b| b.len() as u64)
            },
        ),
    ])
}

fn tokenize_case() -> Result<Case, SetupError> {
    let process = fixtures::FIXTURE_PROCESS;
    let prompt = render(process)?;
    let text = format!("{}\n{}", prompt.system, prompt.user);
    // The vocabulary loads lazily; load it here, not in the first measured iteration.
    tokenize::count_tokens("warm up");
    Ok(Case::new(
        "tokenize/count_tokens",
        Some(Work::Bytes(text.len() as u64)),
        move || tokenize::count_tokens(black_box(&text)),
    ))
}

fn render(process: Process) -> Result<agents::RenderedPrompt, SetupError> {
    let input = agents::samples::sample_input(process, fixtures::FIXTURE_SEED);
    agents::render(process, &input).map_err(|e| SetupError::Agent {
        process,
        problem: format!("sample input does not render: {e}"),
    })
}

/// Prompt rendering, output validation and incremental JSON for one agent.
fn agent_cases(process: Process) -> Result<Vec<Case>, SetupError> {
    let input = agents::samples::sample_input(process, fixtures::FIXTURE_SEED);
    let prompt = render(process)?;
    let output = agents::samples::sample_output(
        agents::schema_name(process),
        fixtures::FIXTURE_SEED,
        &prompt.user,
    )
    .ok_or_else(|| SetupError::Agent {
        process,
        problem: "no sample output for its schema".into(),
    })?;
    let text = output.to_string();
    agents::parse_and_validate(process, &text).map_err(|e| SetupError::Agent {
        process,
        problem: format!("sample output is not valid: {e}"),
    })?;
    let deltas = split_deltas(&text, PARTIAL_DELTA_BYTES);
    let key = process.key();

    let render_case = Case::new(format!("render/{key}"), None, move || {
        agents::render(process, black_box(&input))
            .map_or(0, |p| (p.system.len() + p.user.len()) as u64)
    });
    let validate_text = text.clone();
    let validate_case = Case::new(
        format!("validate/{key}"),
        Some(Work::Bytes(text.len() as u64)),
        move || agents::parse_and_validate(process, black_box(&validate_text)).map_or(0, |_| 1),
    );
    let partial_case = Case::new(
        format!("partial_json/{key}"),
        Some(Work::Elements(deltas.len() as u64)),
        move || {
            let mut partial = PartialJson::new();
            deltas
                .iter()
                .map(|d| u64::from(partial.push(black_box(d)).is_some()))
                .sum()
        },
    );
    Ok(vec![render_case, validate_case, partial_case])
}

/// Cuts `text` into pieces of about `size` bytes, on char boundaries.
fn split_deltas(text: &str, size: usize) -> Vec<String> {
    let mut deltas = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        current.push(c);
        if current.len() >= size {
            deltas.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        deltas.push(current);
    }
    deltas
}

/// Keeps only the cases named in `only` (exact names, or group prefixes such as `sse`); the
/// calibration case is always kept because every ratio needs it.
pub fn select(cases: Vec<Case>, only: &[String]) -> Result<Vec<Case>, String> {
    if only.is_empty() {
        return Ok(cases);
    }
    let matches = |name: &str, wanted: &str| {
        name == wanted || name.split('/').next() == Some(wanted.trim_end_matches('/'))
    };
    if let Some(unknown) = only
        .iter()
        .find(|w| !cases.iter().any(|c| matches(c.name(), w)))
    {
        let known: Vec<&str> = cases.iter().map(Case::name).collect();
        return Err(format!(
            "no bench is called {unknown:?}; known: {}",
            known.join(", ")
        ));
    }
    Ok(cases
        .into_iter()
        .filter(|c| c.name() == CALIBRATION || only.iter().any(|w| matches(c.name(), w)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_sets_up_and_runs() {
        let mut cases = all().unwrap();
        assert_eq!(cases[0].name(), CALIBRATION);
        let names: Vec<String> = cases.iter().map(|c| c.name().to_owned()).collect();
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(
            unique.len(),
            names.len(),
            "duplicate bench names: {names:?}"
        );
        for case in &mut cases {
            // Every routine does real work: a zero would mean it skipped its input.
            assert!(case.run() > 0, "{} returned 0", case.name());
        }
    }

    #[test]
    fn select_keeps_calibration_and_rejects_unknown_names() {
        let picked = select(all().unwrap(), &["sse".into(), "cost/cost".into()]).unwrap();
        let names: Vec<&str> = picked.iter().map(Case::name).collect();
        assert_eq!(
            names,
            [CALIBRATION, "sse/openai", "sse/anthropic", "cost/cost"]
        );
        let err = select(all().unwrap(), &["sse/gemini".into()])
            .err()
            .unwrap();
        assert!(
            err.contains("sse/gemini") && err.contains("sse/openai"),
            "{err}"
        );
    }

    #[test]
    fn deltas_cover_the_text_on_char_boundaries() {
        let text = "héllo wörld, ünïcode";
        let deltas = split_deltas(text, 4);
        assert_eq!(deltas.concat(), text);
        assert!(deltas.iter().all(|d| d.len() <= 4 + 3));
    }
}
