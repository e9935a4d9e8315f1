//! Running one agent: render its prompt, route it to its models, stream deltas and partial JSON
//! to the caller, validate the finished output, and repair once if the model got it wrong.
//!
//! Every model call (the first attempt and the repair) is opened through `Calls` (`call.rs`), so each is
//! routed with fallback, costed and recorded with the run's context; the agent's outcome carries
//! all of them. With a session id in the context, the input and the validated output are
//! recorded as session messages too.

use std::time::{Duration, Instant, SystemTime};

use agents::Process;
use futures::{Stream, StreamExt};
use serde::Serialize;

use crate::call::{CallContext, CallEvent, Calls};
use crate::cost::Cost;
use crate::provider::{ChatMessage, ResponseSchema, Role};
use crate::record::{Receipt, Recorded, SessionMessage};
use crate::router::{CallTarget, RouteOptions, RouteOutcome, RouteRequest};
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
#[derive(Debug)]
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
    /// The model call's stream broke after content and the answer starts again on `to`: drop
    /// every `Delta` and `Partial` received since the call began; the next ones start from
    /// nothing.
    Restart {
        stage: Process,
        from: String,
        to: String,
        reason: String,
        /// Content bytes the broken stream had delivered, now discarded.
        discarded_bytes: usize,
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
    /// The validated output. `messages` resolves once the run's session messages (input and
    /// output, when the context has a session id) are durable.
    Result {
        output: serde_json::Value,
        outcome: AgentOutcome,
        messages: Receipt,
    },
    Error {
        error: AgentError,
        outcome: AgentOutcome,
        messages: Receipt,
    },
}

/// Tokens and cost of one routed model call, and its record.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallUsage {
    pub provider: Option<ProviderKind>,
    pub model: Option<String>,
    pub usage: Usage,
    pub cost: Cost,
    pub cost_usd: f64,
    pub estimated: bool,
    pub fallback_used: bool,
    /// The models whose streams broke after content and were restarted on another call.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rescued_from: Vec<String>,
    /// How the call ended: `succeeded` or `failed`.
    pub status: &'static str,
    /// The call's record id, and what resolves once that record is durable (tell a client about
    /// the cost only then).
    #[serde(skip)]
    pub record: Recorded,
}

impl CallUsage {
    fn of(o: &RouteOutcome, record: Recorded) -> Self {
        Self {
            provider: o.provider,
            model: o.model.clone(),
            usage: o.usage,
            cost: o.cost,
            cost_usd: o.cost.usd(),
            estimated: o.cost_estimated,
            fallback_used: o.fallback_used,
            rescued_from: o.rescues.iter().map(|r| r.from.clone()).collect(),
            status: o.status.as_str(),
            record,
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

/// Which session messages an agent run writes (when its context has a session id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionWrites {
    /// The input, as the `user` message (a pipeline records its business input itself).
    pub input: bool,
}

/// Runs `process` on `input` (the agent's JSON input) for `ctx`. The stream ends after `Result`
/// or `Error`; dropping it cancels the model call in flight, which is recorded as cancelled.
pub(crate) fn run_agent(
    calls: Calls,
    ctx: CallContext,
    process: Process,
    input: serde_json::Value,
    writes: SessionWrites,
) -> impl Stream<Item = AgentEvent> + Send + 'static {
    // Within a run (pipeline or job), every call says which stage it served.
    let in_run = ctx.run_id.is_some();
    let ctx = if in_run { ctx.with_stage(process) } else { ctx };
    // Within a pipeline the agent run is a stage of it; alone it is an agent run. Each model
    // call (the first, then the repair) is a `route` span under it.
    let span = tracing::info_span!(
        "agent",
        otel.name = %format_args!("{} {}", if in_run { "stage" } else { "agent" }, process.key()),
        otel.status_code = tracing::field::Empty,
        keyvex.process = process.key(),
        keyvex.run_id = ctx.run_id.as_deref(),
        keyvex.repairs = 0i64,
        keyvex.outcome = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    let events = agent_events(calls, ctx, process, input, writes);
    let ended = span.clone();
    crate::router::InSpan {
        inner: events,
        span,
    }
    .inspect(move |event| {
        let (outcome, error) = match event {
            AgentEvent::Result { .. } => ("succeeded", None),
            AgentEvent::Error { error, .. } => ("failed", Some(error.kind())),
            _ => return,
        };
        ended.record("keyvex.outcome", outcome);
        if let Some(kind) = error {
            ended.record("otel.status_code", "ERROR");
            ended.record("error.type", kind);
        }
    })
}

fn agent_events(
    calls: Calls,
    ctx: CallContext,
    process: Process,
    input: serde_json::Value,
    writes: SessionWrites,
) -> impl Stream<Item = AgentEvent> + Send + 'static {
    async_stream::stream! {
        let started = Instant::now();
        let mut outcome = AgentOutcome {
            started_at: Some(SystemTime::now()),
            ..AgentOutcome::default()
        };
        let mut messages = Vec::new();
        if writes.input {
            messages.extend(session_message(&calls, &ctx, process, Role::User, &input));
        }
        let prompt = match agents::render(process, &input) {
            Ok(p) => p,
            Err(e) => {
                outcome.finished_at = Some(SystemTime::now());
                yield AgentEvent::Error {
                    error: AgentError::InvalidInput { process, message: e.to_string() },
                    outcome,
                    messages: Receipt::all(messages),
                };
                return;
            }
        };
        let schema = ResponseSchema {
            name: agents::schema_name(process).to_owned(),
            schema: agents::output_schema(process).clone(),
        };
        let mut chat = vec![ChatMessage::user(prompt.user.clone())];
        let mut repairs = 0;
        loop {
            let request = RouteRequest {
                system: Some(prompt.system.clone()),
                messages: chat.clone(),
                response_schema: Some(schema.clone()),
                max_output_tokens: None,
                temperature: None,
            };
            let mut partial = agents::PartialJson::new();
            let mut unseen_bytes = 0usize;
            let mut route = match calls.open(&ctx, &CallTarget::Process(process), request, RouteOptions::default()) {
                Ok(route) => route,
                // A process always has a route; a failure to open one is reported, not assumed away.
                Err(e) => {
                    outcome.latency = started.elapsed();
                    outcome.finished_at = Some(SystemTime::now());
                    yield AgentEvent::Error {
                        error: AgentError::Route { process, kind: e.kind(), message: e.to_string() },
                        outcome,
                        messages: Receipt::all(messages),
                    };
                    return;
                }
            };
            let mut finished: Option<RouteOutcome> = None;
            while let Some(event) = route.next().await {
                match event {
                    CallEvent::Start { provider, model, attempt } => {
                        yield AgentEvent::Start { provider, model, attempt };
                    }
                    CallEvent::Fallback { from, to, reason } => {
                        yield AgentEvent::Fallback { from, to, reason };
                    }
                    CallEvent::Rescue(rescue) => {
                        // Structured output cannot be spliced: the answer starts again.
                        partial = agents::PartialJson::new();
                        unseen_bytes = 0;
                        yield AgentEvent::Restart {
                            stage: process,
                            from: rescue.from,
                            to: rescue.to,
                            reason: rescue.reason,
                            discarded_bytes: rescue.delivered_bytes,
                        };
                    }
                    CallEvent::Delta(text) => {
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
                    CallEvent::Finished { outcome: o, record } => {
                        yield AgentEvent::Usage(CallUsage::of(&o, record));
                        finished = Some(*o);
                    }
                    CallEvent::Failed { failure, record } => {
                        yield AgentEvent::Usage(CallUsage::of(&failure.outcome, record));
                        outcome.calls.push(failure.outcome);
                        outcome.latency = started.elapsed();
                        outcome.finished_at = Some(SystemTime::now());
                        yield AgentEvent::Error {
                            error: AgentError::Route {
                                process,
                                kind: failure.error.kind(),
                                message: failure.error.to_string(),
                            },
                            outcome,
                            messages: Receipt::all(messages),
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
                    messages: Receipt::all(messages),
                };
                return;
            };
            let text = call.text.clone();
            outcome.calls.push(call);
            match agents::parse_and_validate_with_input(process, &text, &input) {
                Ok(output) => {
                    messages.extend(session_message(&calls, &ctx, process, Role::Assistant, &output));
                    outcome.latency = started.elapsed();
                    outcome.finished_at = Some(SystemTime::now());
                    yield AgentEvent::Result { output, outcome, messages: Receipt::all(messages) };
                    return;
                }
                Err(errors) if repairs < MAX_REPAIRS => {
                    repairs += 1;
                    let listed: Vec<String> = errors.errors.iter().map(ToString::to_string).collect();
                    tracing::Span::current().record("keyvex.repairs", i64::from(repairs));
                    tracing::info!(%process, errors = listed.len(), "repair");
                    yield AgentEvent::Repair { errors: listed };
                    chat.push(ChatMessage::assistant(text.clone()));
                    chat.push(ChatMessage::user(agents::repair_prompt(process, &errors, &text)));
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
                        messages: Receipt::all(messages),
                    };
                    return;
                }
            }
        }
    }
}

/// Records one session message of `process` when the context has a session id.
fn session_message(
    calls: &Calls,
    ctx: &CallContext,
    process: Process,
    role: Role,
    content: &serde_json::Value,
) -> Option<Receipt> {
    let session = ctx.session_id.as_deref()?;
    let mut message =
        SessionMessage::new(session, &ctx.caller, role, process.key(), content.clone());
    if let Some(id) = &ctx.correlation_id {
        message = message.with_request(id);
    }
    if let Some(run) = &ctx.run_id {
        message = message.with_run(run, process.key());
    }
    Some(calls.message(message))
}
