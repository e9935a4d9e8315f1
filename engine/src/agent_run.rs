//! Running one agent: render its prompt, route it to its models, stream deltas and partial JSON
//! to the caller, validate the finished output, and repair once if the model got it wrong.
//!
//! Every model call (the first attempt and the repair) goes through the router, so each is
//! routed with fallback and costed; the agent's outcome carries all of them.

use std::time::{Duration, Instant, SystemTime};

use agents::Process;
use futures::{Stream, StreamExt};
use serde::Serialize;

use crate::cost::Cost;
use crate::provider::{ChatMessage, ResponseSchema};
use crate::router::{RouteEvent, RouteOutcome, RouteRequest, Router};
use crate::stream::{ProviderKind, Usage};

/// How many times a model may be asked to fix an invalid answer.
const MAX_REPAIRS: u32 = 1;

/// A `Partial` event re-sends the whole output parsed so far, so sending one per delta would be
/// quadratic in bytes on the wire and in parsing CPU. One per this many new bytes (and one when
/// the JSON closes) keeps previews live at a linear cost.
const PARTIAL_EVERY_BYTES: usize = 256;

/// What went wrong running an agent. `kind()` is the stable label for metrics.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    #[error("{process} input is invalid: {message}")]
    InvalidInput { process: Process, message: String },
    #[error("{process}: {message}")]
    Route {
        process: Process,
        kind: &'static str,
        message: String,
    },
    #[error("{process} output is still invalid after {repairs} repair attempt(s): {errors}")]
    InvalidOutput {
        process: Process,
        repairs: u32,
        errors: String,
    },
}

impl AgentError {
    pub fn kind(&self) -> &'static str {
        match self {
            AgentError::InvalidInput { .. } => "invalid_input",
            AgentError::Route { kind, .. } => kind,
            AgentError::InvalidOutput { .. } => "invalid_output",
        }
    }
}

/// Events of one agent run, in order: per model call `Start`/`Fallback`/`Delta`/`Partial`/`Usage`,
/// possibly a `Repair` and a second call, then exactly one of `Result` or `Error`.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    Start {
        provider: ProviderKind,
        model: String,
        attempt: u32,
    },
    Fallback {
        from: String,
        to: String,
        reason: String,
    },
    Delta(String),
    /// The output parsed so far (best effort), sent when it changed.
    Partial(serde_json::Value),
    /// One model call finished (successfully or not); its tokens and cost.
    Usage(CallUsage),
    /// The answer was invalid; a repair call follows.
    Repair {
        errors: Vec<String>,
    },
    Result {
        output: serde_json::Value,
        outcome: AgentOutcome,
    },
    Error {
        error: AgentError,
        outcome: AgentOutcome,
    },
}

/// Tokens and cost of one routed model call.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallUsage {
    pub provider: Option<ProviderKind>,
    pub model: Option<String>,
    pub usage: Usage,
    pub cost: Cost,
    pub cost_usd: f64,
    pub estimated: bool,
    pub fallback_used: bool,
    /// The whole route outcome, for the metrics record of this call.
    #[serde(skip)]
    pub outcome: RouteOutcome,
}

impl CallUsage {
    fn of(o: &RouteOutcome) -> Self {
        Self {
            provider: o.provider,
            model: o.model.clone(),
            usage: o.usage,
            cost: o.cost,
            cost_usd: o.cost.usd(),
            estimated: o.cost_estimated,
            fallback_used: o.fallback_used,
            outcome: o.clone(),
        }
    }
}

/// Everything an agent run cost and how long it took.
#[derive(Debug, Clone, Default)]
pub struct AgentOutcome {
    /// One per model call (the first, then the repair if any), in order.
    pub calls: Vec<RouteOutcome>,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    /// From the start of the run to the first content delta of any call.
    pub ttft: Option<Duration>,
    pub latency: Duration,
}

impl AgentOutcome {
    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        for c in &self.calls {
            u.add(&c.usage);
        }
        u
    }

    pub fn cost(&self) -> Cost {
        self.calls.iter().map(|c| c.cost).sum()
    }

    pub fn cost_estimated(&self) -> bool {
        self.calls.iter().any(|c| c.cost_estimated)
    }

    pub fn fallback_used(&self) -> bool {
        self.calls.iter().any(|c| c.fallback_used)
    }
}

/// Runs `process` on `input` (the agent's JSON input). The stream ends after `Result` or `Error`;
/// dropping it cancels the model call in flight (the router reports the cancelled call's cost to
/// its observer).
pub fn run_agent(
    router: Router,
    process: Process,
    input: serde_json::Value,
) -> impl Stream<Item = AgentEvent> + Send + 'static {
    async_stream::stream! {
        let started = Instant::now();
        let mut outcome = AgentOutcome {
            started_at: Some(SystemTime::now()),
            ..AgentOutcome::default()
        };
        let prompt = match agents::render(process, &input) {
            Ok(p) => p,
            Err(e) => {
                outcome.finished_at = Some(SystemTime::now());
                yield AgentEvent::Error {
                    error: AgentError::InvalidInput { process, message: e.to_string() },
                    outcome,
                };
                return;
            }
        };
        let schema = ResponseSchema {
            name: agents::schema_name(process).to_owned(),
            schema: agents::output_schema(process).clone(),
        };
        let mut messages = vec![ChatMessage::user(prompt.user.clone())];
        let mut repairs = 0;
        loop {
            let request = RouteRequest {
                system: Some(prompt.system.clone()),
                messages: messages.clone(),
                response_schema: Some(schema.clone()),
                max_output_tokens: None,
                temperature: None,
            };
            let mut partial = agents::PartialJson::new();
            let mut unseen_bytes = 0usize;
            let mut route = router.stream_process(process, request);
            let mut finished: Option<RouteOutcome> = None;
            while let Some(event) = route.next().await {
                match event {
                    RouteEvent::Start { provider, model, attempt } => {
                        yield AgentEvent::Start { provider, model, attempt };
                    }
                    RouteEvent::Fallback { from, to, reason } => {
                        yield AgentEvent::Fallback { from, to, reason };
                    }
                    RouteEvent::Delta(text) => {
                        if outcome.ttft.is_none() {
                            outcome.ttft = Some(started.elapsed());
                        }
                        partial.append(&text);
                        unseen_bytes += text.len();
                        let update = if unseen_bytes >= PARTIAL_EVERY_BYTES || partial.is_complete() {
                            unseen_bytes = 0;
                            partial.snapshot()
                        } else {
                            None
                        };
                        yield AgentEvent::Delta(text);
                        if let Some(value) = update {
                            yield AgentEvent::Partial(value);
                        }
                    }
                    RouteEvent::Finished(o) => {
                        finished = Some(o);
                    }
                    RouteEvent::Failed(f) => {
                        yield AgentEvent::Usage(CallUsage::of(&f.outcome));
                        outcome.calls.push(f.outcome);
                        outcome.latency = started.elapsed();
                        outcome.finished_at = Some(SystemTime::now());
                        yield AgentEvent::Error {
                            error: AgentError::Route {
                                process,
                                kind: f.error.kind(),
                                message: f.error.to_string(),
                            },
                            outcome,
                        };
                        return;
                    }
                }
            }
            let Some(call) = finished else {
                // The router always ends with a terminal event; if it did not, say so rather
                // than pretend the call finished.
                outcome.latency = started.elapsed();
                outcome.finished_at = Some(SystemTime::now());
                yield AgentEvent::Error {
                    error: AgentError::Route {
                        process,
                        kind: "truncated",
                        message: "the model stream ended without a result".into(),
                    },
                    outcome,
                };
                return;
            };
            yield AgentEvent::Usage(CallUsage::of(&call));
            let text = call.text.clone();
            outcome.calls.push(call);
            match agents::parse_and_validate_with_input(process, &text, &input) {
                Ok(output) => {
                    outcome.latency = started.elapsed();
                    outcome.finished_at = Some(SystemTime::now());
                    yield AgentEvent::Result { output, outcome };
                    return;
                }
                Err(errors) if repairs < MAX_REPAIRS => {
                    repairs += 1;
                    let listed: Vec<String> = errors.errors.iter().map(ToString::to_string).collect();
                    tracing::info!(%process, errors = listed.len(), "agent output invalid; asking for a repair");
                    yield AgentEvent::Repair { errors: listed };
                    messages.push(ChatMessage::assistant(text.clone()));
                    messages.push(ChatMessage::user(agents::repair_prompt(process, &errors, &text)));
                }
                Err(errors) => {
                    outcome.latency = started.elapsed();
                    outcome.finished_at = Some(SystemTime::now());
                    yield AgentEvent::Error {
                        error: AgentError::InvalidOutput {
                            process,
                            repairs,
                            errors: errors.to_string(),
                        },
                        outcome,
                    };
                    return;
                }
            }
        }
    }
}
