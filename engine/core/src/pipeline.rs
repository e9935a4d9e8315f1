//! The tool pipeline: Magic Spark → Logic Architect → {Content Crafter ∥ Style Master}.
//!
//! Every event is tagged with its stage. The two last stages run concurrently (their streams are
//! polled together in the caller's task, so both model calls are in flight at once and a dropped
//! pipeline stream cancels both). The run ends with the assembled tool definition and a rollup of
//! tokens, cost, latency and TTFT per stage and for the whole run, tied together by a run id.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use agents::Process;
use futures::{Stream, StreamExt};
use serde::Serialize;

use crate::agent_run::{AgentError, AgentEvent, AgentOutcome, SessionWrites, run_agent};
use crate::call::{CallContext, Calls};
use crate::clock::unix_ms;
use crate::cost::Cost;
use crate::provider::Role;
use crate::record::{Receipt, SessionMessage};
use crate::stream::Usage;

/// What the caller gives the pipeline.
#[derive(Debug, Clone, serde::Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineInput {
    /// Magic Spark's input (business description, audience, industry, constraints).
    pub business: serde_json::Value,
    /// Which of Magic Spark's concepts to build (default: the first).
    #[serde(default)]
    pub concept_index: Option<usize>,
    /// Optional brand hints for Style Master.
    #[serde(default)]
    pub brand: Option<serde_json::Value>,
}

/// One pipeline event.
#[derive(Debug)]
pub enum PipelineEvent {
    RunStarted {
        run_id: String,
    },
    Stage {
        stage: Process,
        event: AgentEvent,
    },
    /// The run succeeded: the validated tool definition and the rollup. `messages` resolves once
    /// the run's session messages (the business input, each stage's output) are durable.
    Done {
        tool: serde_json::Value,
        rollup: RunRollup,
        messages: Receipt,
    },
    /// The run failed at `stage` (or while assembling, `stage: None`); rollup of what ran.
    Failed {
        stage: Option<Process>,
        error: String,
        rollup: RunRollup,
        messages: Receipt,
    },
}

/// Per-stage figures.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StageRollup {
    pub stage: Process,
    pub calls: usize,
    pub usage: Usage,
    pub cost: Cost,
    pub cost_usd: f64,
    pub cost_estimated: bool,
    pub fallback_used: bool,
    pub ttft_ms: Option<u64>,
    pub latency_ms: u64,
    /// Unix milliseconds, so stage overlap can be checked from the outside.
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub succeeded: bool,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRollup {
    pub run_id: String,
    pub stages: Vec<StageRollup>,
    pub usage: Usage,
    pub cost: Cost,
    pub cost_usd: f64,
    pub cost_estimated: bool,
    pub ttft_ms: Option<u64>,
    pub latency_ms: u64,
}

fn unix_ms_of(t: Option<SystemTime>) -> u64 {
    t.map_or(0, unix_ms)
}

impl StageRollup {
    fn of(stage: Process, o: &AgentOutcome, succeeded: bool) -> Self {
        let cost = o.cost();
        StageRollup {
            stage,
            calls: o.calls.len(),
            usage: o.usage(),
            cost,
            cost_usd: cost.usd(),
            cost_estimated: o.cost_estimated(),
            fallback_used: o.fallback_used(),
            ttft_ms: o.ttft.map(|d| d.as_millis() as u64),
            latency_ms: o.latency.as_millis() as u64,
            started_at_ms: unix_ms_of(o.started_at),
            finished_at_ms: unix_ms_of(o.finished_at),
            succeeded,
        }
    }
}

struct Tally {
    run_id: String,
    started: Instant,
    stages: BTreeMap<Process, StageRollup>,
    first_content: Option<Duration>,
    /// Session messages handed to the recorder so far.
    messages: Vec<Receipt>,
}

impl Tally {
    fn rollup(&self) -> RunRollup {
        let stages: Vec<StageRollup> = Process::ALL
            .iter()
            .filter_map(|p| self.stages.get(p).cloned())
            .collect();
        let mut usage = Usage::default();
        for s in &stages {
            usage.add(&s.usage);
        }
        let cost: Cost = stages.iter().map(|s| s.cost).sum();
        RunRollup {
            run_id: self.run_id.clone(),
            usage,
            cost,
            cost_usd: cost.usd(),
            cost_estimated: stages.iter().any(|s| s.cost_estimated),
            ttft_ms: self.first_content.map(|d| d.as_millis() as u64),
            latency_ms: self.started.elapsed().as_millis() as u64,
            stages,
        }
    }

    /// Notes timing from an agent event and takes its session receipts into the run's; returns
    /// the stage's terminal result, if this is one.
    fn observe(
        &mut self,
        stage: Process,
        event: &mut AgentEvent,
    ) -> Option<Result<serde_json::Value, AgentError>> {
        match event {
            AgentEvent::Delta(_) if self.first_content.is_none() => {
                self.first_content = Some(self.started.elapsed());
                None
            }
            AgentEvent::Result {
                output,
                outcome,
                messages,
            } => {
                self.stages
                    .insert(stage, StageRollup::of(stage, outcome, true));
                self.messages
                    .push(std::mem::replace(messages, Receipt::none()));
                Some(Ok(output.clone()))
            }
            AgentEvent::Error {
                error,
                outcome,
                messages,
            } => {
                self.stages
                    .insert(stage, StageRollup::of(stage, outcome, false));
                self.messages
                    .push(std::mem::replace(messages, Receipt::none()));
                Some(Err(error.clone()))
            }
            _ => None,
        }
    }

    /// The run's session receipts so far, for its terminal event.
    fn messages(&mut self) -> Receipt {
        Receipt::all(std::mem::take(&mut self.messages))
    }
}

/// Runs the whole pipeline for `ctx` (its run id, or a fresh one). Dropping the stream cancels
/// every stage in flight; each cancelled call is recorded with its stage.
pub(crate) fn run_pipeline(
    calls: Calls,
    ctx: CallContext,
    input: PipelineInput,
) -> impl Stream<Item = PipelineEvent> + Send + 'static {
    let run_id = ctx
        .run_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let ctx = ctx.with_run(run_id.clone());
    // The run's span: each stage's agent span, and so every model call, nests under it.
    let span = tracing::info_span!(
        "pipeline",
        otel.name = "pipeline tool",
        otel.status_code = tracing::field::Empty,
        keyvex.run_id = %run_id,
        keyvex.caller = %ctx.caller,
        keyvex.outcome = tracing::field::Empty,
        keyvex.failed_stage = tracing::field::Empty,
        keyvex.cost_usd = tracing::field::Empty,
    );
    let ended = span.clone();
    let events = pipeline_events(calls, ctx, input, run_id);
    crate::router::InSpan {
        inner: events,
        span,
    }
    .inspect(move |event| match event {
        PipelineEvent::Done { rollup, .. } => {
            ended.record("keyvex.outcome", "succeeded");
            ended.record("keyvex.cost_usd", rollup.cost.usd());
        }
        PipelineEvent::Failed { stage, rollup, .. } => {
            ended.record("keyvex.outcome", "failed");
            ended.record("otel.status_code", "ERROR");
            ended.record("keyvex.cost_usd", rollup.cost.usd());
            if let Some(stage) = stage {
                ended.record("keyvex.failed_stage", stage.key());
            }
        }
        _ => {}
    })
}

fn pipeline_events(
    calls: Calls,
    ctx: CallContext,
    input: PipelineInput,
    run_id: String,
) -> impl Stream<Item = PipelineEvent> + Send + 'static {
    let stage_writes = SessionWrites { input: false };
    async_stream::stream! {
        let mut tally = Tally {
            run_id,
            started: Instant::now(),
            stages: BTreeMap::new(),
            first_content: None,
            messages: Vec::new(),
        };
        tracing::info!(run_id = %tally.run_id, "pipeline run started");
        if let Some(session) = &ctx.session_id {
            let mut message = SessionMessage::new(session, &ctx.caller, Role::User, Process::MagicSpark.key(), input.business.clone())
                .with_run(&tally.run_id, Process::MagicSpark.key());
            if let Some(id) = &ctx.correlation_id {
                message = message.with_request(id);
            }
            tally.messages.push(calls.message(message));
        }
        yield PipelineEvent::RunStarted { run_id: tally.run_id.clone() };

        // Stages one and two run in sequence; each needs the previous one's output.
        let mut outputs: BTreeMap<Process, serde_json::Value> = BTreeMap::new();
        let mut next_input = input.business.clone();
        for stage in [Process::MagicSpark, Process::LogicArchitect] {
            let mut events = Box::pin(run_agent(calls.clone(), ctx.clone(), stage, next_input.clone(), stage_writes));
            let mut result = None;
            while let Some(mut event) = events.next().await {
                if let Some(r) = tally.observe(stage, &mut event) {
                    result = Some(r);
                }
                yield PipelineEvent::Stage { stage, event };
            }
            match result {
                Some(Ok(output)) => {
                    outputs.insert(stage, output);
                }
                Some(Err(e)) => {
                    yield PipelineEvent::Failed { stage: Some(stage), error: e.to_string(), rollup: tally.rollup(), messages: tally.messages() };
                    return;
                }
                None => {
                    yield PipelineEvent::Failed { stage: Some(stage), error: format!("{stage} ended without a result"), rollup: tally.rollup(), messages: tally.messages() };
                    return;
                }
            }
            if stage == Process::MagicSpark {
                match agents::pipeline::logic_architect_input(&input.business, &outputs[&Process::MagicSpark], input.concept_index) {
                    Ok(v) => next_input = v,
                    Err(e) => {
                        yield PipelineEvent::Failed { stage: Some(Process::LogicArchitect), error: e.to_string(), rollup: tally.rollup(), messages: tally.messages() };
                        return;
                    }
                }
            }
        }

        // Content Crafter and Style Master depend only on concept + logic: run them together.
        let finishing = agents::pipeline::choose_concept(&outputs[&Process::MagicSpark], input.concept_index)
            .and_then(|concept| serde_json::to_value(concept).map_err(|e| agents::PipelineError::BadValue {
                what: "concept",
                message: e.to_string(),
            }))
            .and_then(|concept| {
                let logic = &outputs[&Process::LogicArchitect];
                let content = agents::pipeline::content_crafter_input(&input.business, &concept, logic)?;
                let style = agents::pipeline::style_master_input(&input.business, &concept, logic, input.brand.as_ref())?;
                Ok((concept, content, style))
            });
        let (concept, content_input, style_input) = match finishing {
            Ok(inputs) => inputs,
            Err(e) => {
                yield PipelineEvent::Failed { stage: Some(Process::ContentCrafter), error: e.to_string(), rollup: tally.rollup(), messages: tally.messages() };
                return;
            }
        };
        let content = run_agent(calls.clone(), ctx.clone(), Process::ContentCrafter, content_input, stage_writes)
            .map(|e| (Process::ContentCrafter, e));
        let style = run_agent(calls.clone(), ctx.clone(), Process::StyleMaster, style_input, stage_writes)
            .map(|e| (Process::StyleMaster, e));
        // If one of the two fails, the other still runs to its end: the run is failed either way,
        // but this keeps the rollup a complete account of every token paid for.
        let mut both = futures::stream::select(Box::pin(content), Box::pin(style));
        let mut failure: Option<(Process, AgentError)> = None;
        while let Some((stage, mut event)) = both.next().await {
            match tally.observe(stage, &mut event) {
                Some(Ok(output)) => {
                    outputs.insert(stage, output);
                }
                Some(Err(e)) if failure.is_none() => failure = Some((stage, e)),
                _ => {}
            }
            yield PipelineEvent::Stage { stage, event };
        }
        if let Some((stage, e)) = failure {
            yield PipelineEvent::Failed { stage: Some(stage), error: e.to_string(), rollup: tally.rollup(), messages: tally.messages() };
            return;
        }

        let assembled = agents::ToolDefinition::assemble_values(
            &concept,
            &outputs[&Process::LogicArchitect],
            &outputs[&Process::ContentCrafter],
            &outputs[&Process::StyleMaster],
        )
        .and_then(|tool| serde_json::to_value(tool).map_err(|e| agents::PipelineError::BadValue {
            what: "tool definition",
            message: e.to_string(),
        }));
        match assembled {
            Ok(tool) => yield PipelineEvent::Done { tool, rollup: tally.rollup(), messages: tally.messages() },
            Err(e) => yield PipelineEvent::Failed { stage: None, error: e.to_string(), rollup: tally.rollup(), messages: tally.messages() },
        }
    }
}
