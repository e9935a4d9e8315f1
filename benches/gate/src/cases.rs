//! The bench cases: each hot path set up once, as a closure the criterion benches and the gate
//! both run. One list, so the gate measures exactly what `cargo bench` measures.

use std::hint::black_box;
use std::sync::Arc;

use agents::{PartialJson, Process};
use futures::StreamExt;
use futures::executor::block_on;
use keyvex_engine::bench_support::{anthropic_sse_events, openai_sse_events};
use keyvex_engine::catalog::{Catalog, CatalogError};
use keyvex_engine::cost::{self, Pricing};
use keyvex_engine::provider::{ChatMessage, ChatRequest, EventStream, Provider};
use keyvex_engine::router::{Providers, RouteEvent, RouteRequest, Router, RouterConfig};
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
}

/// Every case, calibration first.
pub fn all() -> Result<Vec<Case>, SetupError> {
    let mut cases = vec![calibration()];
    cases.push(sse_openai()?);
    cases.push(sse_anthropic()?);
    cases.push(relay()?);
    cases.push(route_decide()?);
    cases.push(cost_case()?);
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
/// event per chunk. Throughput is per delta, so the figure is the per-chunk cost.
fn relay() -> Result<Case, SetupError> {
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
            let mut finished = false;
            while let Some(event) = stream.next().await {
                match event {
                    RouteEvent::Delta(text) => relayed += text.len() as u64,
                    RouteEvent::Finished(_) => finished = true,
                    _ => {}
                }
            }
            (relayed, finished)
        })
    };
    let expected: u64 = deltas.iter().map(|d| d.len() as u64).sum();
    match route() {
        (relayed, true) if relayed == expected => {}
        (relayed, finished) => {
            return Err(SetupError::Relay(format!(
                "relayed {relayed} of {expected} bytes, finished: {finished}"
            )));
        }
    }
    Ok(Case::new(
        "relay/router",
        Some(Work::Elements(deltas.len() as u64)),
        move || route().0,
    ))
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
