//! The agents and the tool pipeline over real HTTP against the simulator: each agent streams
//! partial JSON before a valid result; an invalid answer gets exactly one costed repair (and a
//! second invalid one ends in `invalid_output`); a bad input never reaches a model; the pipeline
//! tags every event with its stage, runs its last two stages at the same time, rolls up exact
//! totals and, when dropped mid-run, cancels both streams while every call is still recorded
//! once, with its stage and cost.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agents::Process;
use futures::StreamExt;
use keyvex_engine::agent_run::{AgentEvent, AgentOutcome};
use keyvex_engine::catalog::Catalog;
use keyvex_engine::cost::Cost;
use keyvex_engine::pipeline::{PipelineEvent, PipelineInput, RunRollup};
use keyvex_engine::provider::Role;
use keyvex_engine::record::{RequestRecord, RequestStatus};
use keyvex_engine::router::RouterConfig;
use keyvex_engine::stream::Usage;
use keyvex_engine::tokenize::count_tokens;
use keyvex_engine::{CallContext, Engine};
use keyvex_sim::{self as sim, Fault, Rule, SimConfig, SimHandle};
use keyvex_testkit::MemoryRecorder;
use serde_json::{Value, json};

struct Setup {
    sim: SimHandle,
    engine: Engine,
    recorder: Arc<MemoryRecorder>,
    catalog: Arc<Catalog>,
}

async fn setup(config: SimConfig) -> Setup {
    let sim = sim::start(SocketAddr::from(([127, 0, 0, 1], 0)), config)
        .await
        .unwrap();
    let recorder = MemoryRecorder::new();
    let engine = keyvex_testkit::sim_engine(&sim)
        .router(RouterConfig {
            ttft_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_millis(50),
            ..RouterConfig::default()
        })
        .recorder(recorder.clone())
        .build()
        .unwrap();
    Setup {
        sim,
        catalog: engine.catalog(),
        engine,
        recorder,
    }
}

/// Every request takes exactly `ttft` to its first token and then streams at `tokens_per_sec`
/// (a rule, so there is no per-request jitter).
fn fixed_latency(s: &Setup, ttft_ms: u64, tokens_per_sec: f64) {
    s.sim.push_rule(Rule::always(Fault::Latency {
        ttft: Duration::from_millis(ttft_ms),
        tokens_per_sec,
    }));
}

async fn collect_agent(engine: &Engine, process: Process, input: Value) -> Vec<AgentEvent> {
    engine
        .agent(CallContext::new("tester"), process, input)
        .collect()
        .await
}

async fn collect_pipeline(engine: &Engine) -> Vec<PipelineEvent> {
    engine
        .pipeline(CallContext::new("tester"), business())
        .collect()
        .await
}

/// The terminal event's outcome and result (`Ok(output)` or `Err((kind, message))`).
fn terminal(events: &[AgentEvent]) -> (Result<Value, (String, String)>, AgentOutcome) {
    match events.last() {
        Some(AgentEvent::Result {
            output, outcome, ..
        }) => (Ok(output.clone()), outcome.clone()),
        Some(AgentEvent::Error { error, outcome, .. }) => (
            Err((error.kind().to_owned(), error.to_string())),
            outcome.clone(),
        ),
        other => panic!("an agent run must end with Result or Error, got {other:?}"),
    }
}

/// True when `partial` could be an earlier, cut-off view of `full`: every object key it has is
/// in `full` with a consistent value, arrays are no longer, strings are prefixes, and anything
/// else is equal.
fn is_prefix_view(partial: &Value, full: &Value) -> bool {
    match (partial, full) {
        (Value::Object(p), Value::Object(f)) => p
            .iter()
            .all(|(k, v)| f.get(k).is_some_and(|fv| is_prefix_view(v, fv))),
        (Value::Array(p), Value::Array(f)) => {
            p.len() <= f.len() && p.iter().zip(f).all(|(a, b)| is_prefix_view(a, b))
        }
        (Value::String(p), Value::String(f)) => f.starts_with(p.as_str()),
        (p, f) => p == f,
    }
}

fn primary(catalog: &Catalog, process: Process) -> String {
    catalog.route(process).primary.clone()
}

fn assert_cost_adds_up(outcome: &AgentOutcome) {
    for call in &outcome.calls {
        assert!(call.cost > Cost::ZERO, "every call is costed: {call:?}");
    }
    let sum: Cost = outcome.calls.iter().map(|c| c.cost).sum();
    assert_eq!(outcome.cost(), sum);
}

#[tokio::test]
async fn each_agent_streams_partials_then_a_valid_result() {
    let s = setup(SimConfig::fast(11)).await;
    for process in Process::ALL {
        let input = agents::samples::sample_input(process, 3);
        let events = collect_agent(&s.engine, process, input).await;
        let (result, outcome) = terminal(&events);
        let output = result.unwrap_or_else(|e| panic!("{process} failed: {e:?}"));

        // The output is what the validator accepts, unchanged.
        let validated = agents::validate_value(process, &output)
            .unwrap_or_else(|e| panic!("{process} output does not validate: {e}"));
        assert_eq!(validated, output, "{process}");

        // Start first; partials stream before the result, and several of them (not one blob).
        assert!(
            matches!(events.first(), Some(AgentEvent::Start { attempt: 1, .. })),
            "{process}: {:?}",
            events.first()
        );
        let partials: Vec<&Value> = events
            .iter()
            .filter_map(|e| match e {
                AgentEvent::Partial(v) => Some(v),
                _ => None,
            })
            .collect();
        assert!(
            partials.len() >= 3,
            "{process}: expected a stream of partials, got {}",
            partials.len()
        );
        let result_at = events.len() - 1;
        let last_partial_at = events
            .iter()
            .rposition(|e| matches!(e, AgentEvent::Partial(_)))
            .unwrap();
        assert!(last_partial_at < result_at);
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, AgentEvent::Repair { .. })),
            "{process}: a valid answer needs no repair"
        );

        // Every partial is a cut-off view of the model's final answer, and the last one is that
        // answer in full (same concept names, same inputs, …).
        assert_eq!(outcome.calls.len(), 1);
        let answer: Value = serde_json::from_str(&outcome.calls[0].text).unwrap();
        for p in &partials {
            assert!(is_prefix_view(p, &answer), "{process}: {p} vs {answer}");
        }
        assert_eq!(*partials[partials.len() - 1], answer, "{process}");
        if process == Process::MagicSpark {
            let names = |v: &Value| -> Vec<String> {
                v["concepts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|c| c["name"].as_str().map(str::to_owned))
                    .collect()
            };
            assert_eq!(names(partials[partials.len() - 1]), names(&output));
            assert!(names(&output).len() >= 3);
        }

        // One Usage event per call, matching the outcome, and costed.
        let usages: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                AgentEvent::Usage(u) => Some(u),
                _ => None,
            })
            .collect();
        assert_eq!(usages.len(), 1);
        assert_eq!(usages[0].usage, outcome.usage());
        assert_eq!(usages[0].cost, outcome.cost());
        assert_eq!(
            usages[0].model.as_deref(),
            Some(primary(&s.catalog, process).as_str())
        );
        assert!(!usages[0].estimated);
        assert_cost_adds_up(&outcome);
        assert!(outcome.ttft.is_some() && outcome.started_at.is_some());
        assert!(outcome.finished_at >= outcome.started_at);
    }
    assert_eq!(s.sim.stats().requests_total, 4);
    s.sim.shutdown().await;
}

/// A Logic Architect answer that passes the JSON schema but whose score references an input
/// that was never declared.
fn logic_with_undeclared_input() -> String {
    let mut logic = agents::samples::sample_output(
        agents::schema_name(Process::LogicArchitect),
        5,
        "Type: calculator",
    )
    .unwrap();
    let expr = logic["score"]["expression"].as_str().unwrap().to_owned();
    logic["score"]["expression"] = json!(format!("({expr}) + ghostInput"));
    let text = logic.to_string();
    let errors = agents::parse_and_validate(Process::LogicArchitect, &text).unwrap_err();
    assert!(
        errors.has("logic.score.expression", "ghostInput"),
        "the fixture must fail the semantic check: {errors}"
    );
    text
}

#[tokio::test]
async fn an_invalid_answer_gets_exactly_one_costed_repair() {
    let s = setup(SimConfig::fast(12)).await;
    let process = Process::LogicArchitect;
    let model = primary(&s.catalog, process);
    let bad = logic_with_undeclared_input();
    s.sim.push_rule(Rule {
        model: Some(model.clone()),
        protocol: None,
        fault: Fault::BadOutput { text: bad.clone() },
        times: Some(1),
    });
    let input = agents::samples::sample_input(process, 4);
    let events = collect_agent(&s.engine, process, input).await;
    let (result, outcome) = terminal(&events);
    let output = result.unwrap_or_else(|e| panic!("the repair should succeed: {e:?}"));
    agents::validate_value(process, &output).unwrap();

    // Exactly one Repair, listing the validator's errors, between the two calls.
    let expected = agents::parse_and_validate(process, &bad).unwrap_err();
    let listed: Vec<String> = expected.errors.iter().map(ToString::to_string).collect();
    let repairs: Vec<&Vec<String>> = events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Repair { errors } => Some(errors),
            _ => None,
        })
        .collect();
    assert_eq!(repairs, vec![&listed]);
    assert!(
        listed.iter().any(|e| e.contains("ghostInput")),
        "{listed:?}"
    );
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Start { .. } => Some("start"),
            AgentEvent::Usage(_) => Some("usage"),
            AgentEvent::Repair { .. } => Some("repair"),
            AgentEvent::Result { .. } => Some("result"),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        ["start", "usage", "repair", "start", "usage", "result"]
    );

    // The simulator got two requests for the model; the second carries the bad answer and the
    // repair message built from exactly those errors.
    assert_eq!(s.sim.stats().requests_by_model.get(&model), Some(&2));
    let seen = s.sim.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].messages.len(), 1);
    let second = &seen[1].messages;
    assert_eq!(second.len(), 3, "{second:?}");
    assert_eq!(second[0], seen[0].messages[0]);
    assert_eq!(second[1].role, Role::Assistant);
    assert_eq!(second[1].content, bad);
    assert_eq!(second[2].role, Role::User);
    assert_eq!(
        second[2].content,
        agents::repair_prompt(process, &expected, &bad)
    );

    // Both calls costed; the first one's usage is that of the text the simulator sent.
    assert_eq!(outcome.calls.len(), 2);
    assert_eq!(outcome.calls[0].text, bad);
    assert_eq!(outcome.calls[0].usage.output, count_tokens(&bad));
    assert!(outcome.calls[1].usage.input > outcome.calls[0].usage.input);
    assert_cost_adds_up(&outcome);
    s.sim.shutdown().await;
}

#[tokio::test]
async fn a_second_invalid_answer_ends_in_invalid_output_with_both_calls_costed() {
    let s = setup(SimConfig::fast(13)).await;
    let process = Process::MagicSpark;
    let model = primary(&s.catalog, process);
    // Schema-shaped, but two concepts where the agent needs three to five.
    let mut spark = agents::samples::sample_output(agents::schema_name(process), 9, "").unwrap();
    spark["concepts"].as_array_mut().unwrap().truncate(2);
    let bad = spark.to_string();
    // Installed through the control endpoint, the way `keyvex sim` users script it.
    let rules = json!([{ "model": model, "fault": { "bad_output": { "text": bad } }, "times": 2 }]);
    let response = reqwest::Client::new()
        .post(format!("http://{}/sim/rules", s.sim.addr()))
        .json(&rules)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    let events = collect_agent(
        &s.engine,
        process,
        agents::samples::sample_input(process, 1),
    )
    .await;
    let (result, outcome) = terminal(&events);
    let (kind, message) = result.unwrap_err();
    assert_eq!(kind, "invalid_output");
    assert!(
        message.contains("expected 3 to 5 concepts, got 2"),
        "{message}"
    );
    assert!(message.contains("1 repair attempt"), "{message}");
    let repairs = events
        .iter()
        .filter(|e| matches!(e, AgentEvent::Repair { .. }))
        .count();
    assert_eq!(repairs, 1, "one repair, never two");
    assert_eq!(s.sim.stats().requests_by_model.get(&model), Some(&2));
    assert_eq!(outcome.calls.len(), 2);
    for call in &outcome.calls {
        assert_eq!(call.text, bad);
    }
    assert_cost_adds_up(&outcome);
    assert!(s.sim.requests()[1].messages[2].content.contains("got 2"));
    s.sim.shutdown().await;
}

#[tokio::test]
async fn an_invalid_input_names_the_field_and_calls_no_model() {
    let s = setup(SimConfig::fast(14)).await;
    let mut input = agents::samples::sample_input(Process::MagicSpark, 2);
    input.as_object_mut().unwrap().remove("businessDescription");
    let events = collect_agent(&s.engine, Process::MagicSpark, input).await;
    assert_eq!(events.len(), 1, "only the error: {events:?}");
    let (result, outcome) = terminal(&events);
    let (kind, message) = result.unwrap_err();
    assert_eq!(kind, "invalid_input");
    assert!(message.contains("businessDescription"), "{message}");
    assert!(outcome.calls.is_empty());
    assert_eq!(s.sim.stats().requests_total, 0);
    s.sim.shutdown().await;
}

#[tokio::test]
async fn bad_output_is_reachable_through_the_fault_header() {
    let s = setup(SimConfig::fast(15)).await;
    let text = r#"{"concepts": "not a list"}"#;
    let body: Value = reqwest::Client::new()
        .post(format!("{}/chat/completions", s.sim.base_url()))
        .bearer_auth("k")
        .header("x-sim-fault", format!("bad_output:{text}"))
        .json(&json!({
            "model": "gpt-5.4",
            "messages": [{ "role": "user", "content": "ideas please" }],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], text);
    assert_eq!(body["usage"]["completion_tokens"], count_tokens(text));
    s.sim.shutdown().await;
}

fn business() -> PipelineInput {
    PipelineInput {
        business: json!({
            "businessDescription": "Boutique accounting firm for freelancers",
            "targetAudience": "freelance designers and developers",
            "industry": "accounting",
        }),
        concept_index: None,
        brand: None,
    }
}

fn stage_of(rollup: &RunRollup, stage: Process) -> &keyvex_engine::pipeline::StageRollup {
    rollup.stages.iter().find(|s| s.stage == stage).unwrap()
}

#[tokio::test]
async fn the_pipeline_tags_stages_overlaps_the_last_two_and_rolls_up_exact_totals() {
    let s = setup(SimConfig::fast(16)).await;
    // 200 ms to first token, then paced output: every stage takes well over half a second.
    fixed_latency(&s, 200, 600.0);
    let events: Vec<PipelineEvent> = collect_pipeline(&s.engine).await;

    assert!(matches!(
        events.first(),
        Some(PipelineEvent::RunStarted { .. })
    ));
    let Some(PipelineEvent::Done { tool, rollup, .. }) = events.last() else {
        panic!("the run should succeed: {:?}", events.last());
    };

    // The tool is a consistent ToolDefinition.
    let definition: agents::ToolDefinition = serde_json::from_value(tool.clone()).unwrap();
    assert_eq!(definition.check(), vec![]);

    // Every stage event belongs to its stage: the model it started and was billed for is the
    // stage's primary, and its result validates as that stage's output.
    let mut order: Vec<Process> = Vec::new();
    let mut usage_from_events: BTreeMap<Process, (Usage, Cost)> = BTreeMap::new();
    for event in &events[1..events.len() - 1] {
        let PipelineEvent::Stage { stage, event } = event else {
            panic!("only stage events between start and end: {event:?}");
        };
        order.push(*stage);
        match event {
            AgentEvent::Start { model, .. } => {
                assert_eq!(*model, primary(&s.catalog, *stage), "{stage}");
            }
            AgentEvent::Usage(u) => {
                assert_eq!(
                    u.model.as_deref(),
                    Some(primary(&s.catalog, *stage).as_str())
                );
                let entry = usage_from_events.entry(*stage).or_default();
                entry.0.add(&u.usage);
                entry.1 += u.cost;
            }
            AgentEvent::Result { output, .. } => {
                agents::validate_value(*stage, output)
                    .unwrap_or_else(|e| panic!("{stage} result mis-tagged or invalid: {e}"));
            }
            AgentEvent::Error { error, .. } => panic!("{stage} failed: {error}"),
            _ => {}
        }
    }
    // Stage one's events all precede stage two's, which precede the last two; those two
    // interleave because they stream at the same time.
    let first_la = order
        .iter()
        .position(|p| *p == Process::LogicArchitect)
        .unwrap();
    assert!(order[..first_la].iter().all(|p| *p == Process::MagicSpark));
    let first_late = order
        .iter()
        .position(|p| matches!(p, Process::ContentCrafter | Process::StyleMaster))
        .unwrap();
    assert!(
        order[first_la..first_late]
            .iter()
            .all(|p| *p == Process::LogicArchitect)
    );
    let late = &order[first_late..];
    assert!(
        late.iter()
            .all(|p| matches!(p, Process::ContentCrafter | Process::StyleMaster))
    );
    let switches = late.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        switches >= 2,
        "the last two stages' events should interleave"
    );

    // Rollup: one successful call per stage, totals are the sums of the stages, and each stage's
    // figures are those of the Usage events it sent.
    assert_eq!(rollup.stages.len(), 4);
    let mut usage = Usage::default();
    let mut cost = Cost::ZERO;
    for st in &rollup.stages {
        assert!(st.succeeded && st.calls == 1, "{st:?}");
        assert!(st.cost > Cost::ZERO);
        assert_eq!(
            (st.usage, st.cost),
            usage_from_events[&st.stage],
            "{}",
            st.stage
        );
        usage.add(&st.usage);
        cost += st.cost;
    }
    assert_eq!(rollup.usage, usage);
    assert_eq!(rollup.cost, cost);
    assert!(!rollup.cost_estimated);

    // Timing: the first two stages run one after the other, the last two together.
    let spark = stage_of(rollup, Process::MagicSpark);
    let logic = stage_of(rollup, Process::LogicArchitect);
    let content = stage_of(rollup, Process::ContentCrafter);
    let style = stage_of(rollup, Process::StyleMaster);
    assert!(spark.finished_at_ms <= logic.started_at_ms);
    assert!(logic.finished_at_ms <= content.started_at_ms.min(style.started_at_ms));
    for st in [content, style] {
        assert!(st.latency_ms >= 500, "{}: {} ms", st.stage, st.latency_ms);
        assert!(st.ttft_ms.unwrap() >= 200);
    }
    assert!(
        content.started_at_ms < style.finished_at_ms,
        "Content Crafter started after Style Master finished: {content:?} {style:?}"
    );
    assert!(
        style.started_at_ms < content.finished_at_ms,
        "Style Master started after Content Crafter finished: {content:?} {style:?}"
    );
    s.sim.shutdown().await;
}

#[tokio::test]
async fn dropping_the_pipeline_mid_run_cancels_both_streams_and_records_each_with_its_stage() {
    let s = setup(SimConfig::fast(17)).await;
    // Slow enough that the last two stages are still streaming when the test drops the run.
    fixed_latency(&s, 100, 400.0);
    let ctx = CallContext::new("tester").with_correlation("req-17");
    let mut run = s.engine.pipeline(ctx, business());
    let mut run_id = String::new();
    let mut streaming: BTreeSet<Process> = BTreeSet::new();
    let mut finished_cost: BTreeMap<Process, Cost> = BTreeMap::new();
    while let Some(event) = run.next().await {
        match event {
            PipelineEvent::RunStarted { run_id: id } => run_id = id,
            PipelineEvent::Stage {
                stage,
                event: AgentEvent::Result { outcome, .. },
            } => {
                finished_cost.insert(stage, outcome.cost());
            }
            PipelineEvent::Stage {
                stage: stage @ (Process::ContentCrafter | Process::StyleMaster),
                event: AgentEvent::Delta(_),
            } => {
                streaming.insert(stage);
                if streaming.len() == 2 {
                    break;
                }
            }
            PipelineEvent::Done { .. } | PipelineEvent::Failed { .. } => {
                panic!("the run ended before both last stages streamed")
            }
            _ => {}
        }
    }
    assert_eq!(streaming.len(), 2);
    drop(run);

    // The simulator sees both clients go away before their answers were complete.
    assert!(
        s.sim.wait_for_disconnects(2, Duration::from_secs(5)).await,
        "stats: {:?}",
        s.sim.stats()
    );
    assert_eq!(
        s.sim.stats().streams_completed,
        2,
        "only the first two stages completed"
    );

    // The first two stages' costs arrived in their events; every one of the four calls was
    // recorded exactly once, the two dropped ones as cancelled with an estimated cost, each with
    // its own stage and the run's context.
    assert_eq!(
        finished_cost.keys().copied().collect::<Vec<_>>(),
        [Process::MagicSpark, Process::LogicArchitect]
    );
    assert!(finished_cost.values().all(|c| *c > Cost::ZERO));
    let records = s.recorder.wait_for_records(4, Duration::from_secs(5)).await;
    assert_eq!(records.len(), 4, "{records:?}");
    let mut by_stage: BTreeMap<String, &RequestRecord> = BTreeMap::new();
    for r in &records {
        assert_eq!(r.user_id, "tester");
        assert_eq!(r.run_id.as_deref(), Some(run_id.as_str()));
        assert_eq!(r.correlation_id.as_deref(), Some("req-17"));
        let stage = r.stage.clone().unwrap();
        assert_eq!(r.process, stage, "a pipeline call's process is its stage");
        assert!(by_stage.insert(stage, r).is_none(), "one record per stage");
    }
    for stage in [Process::MagicSpark, Process::LogicArchitect] {
        let r = by_stage[stage.key()];
        assert_eq!(r.status, RequestStatus::Succeeded, "{r:?}");
        assert_eq!(r.cost(), finished_cost[&stage]);
    }
    for stage in [Process::ContentCrafter, Process::StyleMaster] {
        let r = by_stage[stage.key()];
        assert_eq!(r.status, RequestStatus::Cancelled, "{r:?}");
        assert_eq!(r.model, primary(&s.catalog, stage));
        assert!(r.cost() > Cost::ZERO, "{r:?}");
        assert!(
            r.cost_estimated,
            "a cut stream's output is estimated: {r:?}"
        );
        assert!(r.output_tokens > 0, "{r:?}");
    }
    s.sim.shutdown().await;
}

#[tokio::test]
async fn prose_instead_of_json_is_repaired_like_any_invalid_answer() {
    let s = setup(SimConfig::fast(18)).await;
    let process = Process::StyleMaster;
    let model = primary(&s.catalog, process);
    let prose = "Sorry, I would rather describe the palette in words: calm blues.";
    s.sim.push_rule(Rule {
        model: Some(model.clone()),
        protocol: None,
        fault: Fault::BadOutput {
            text: prose.to_owned(),
        },
        times: Some(1),
    });
    let events = collect_agent(
        &s.engine,
        process,
        agents::samples::sample_input(process, 2),
    )
    .await;
    let (result, outcome) = terminal(&events);
    agents::validate_value(process, &result.unwrap()).unwrap();
    // Nothing parseable streamed from the prose, so no partial precedes the repair.
    let repair_at = events
        .iter()
        .position(|e| matches!(e, AgentEvent::Repair { .. }))
        .unwrap();
    assert!(
        !events[..repair_at]
            .iter()
            .any(|e| matches!(e, AgentEvent::Partial(_)))
    );
    assert_eq!(outcome.calls.len(), 2);
    assert_eq!(outcome.calls[0].usage.output, count_tokens(prose));
    assert_cost_adds_up(&outcome);
    assert_eq!(s.sim.stats().requests_by_model.get(&model), Some(&2));
    s.sim.shutdown().await;
}

#[tokio::test]
async fn a_stage_that_stays_invalid_fails_the_pipeline_before_the_last_stages() {
    let s = setup(SimConfig::fast(19)).await;
    let logic_model = primary(&s.catalog, Process::LogicArchitect);
    s.sim.push_rule(Rule {
        model: Some(logic_model.clone()),
        protocol: None,
        fault: Fault::BadOutput {
            text: logic_with_undeclared_input(),
        },
        times: Some(2),
    });
    let events: Vec<PipelineEvent> = collect_pipeline(&s.engine).await;
    let Some(PipelineEvent::Failed {
        stage,
        error,
        rollup,
        ..
    }) = events.last()
    else {
        panic!("the run should fail: {:?}", events.last());
    };
    assert_eq!(*stage, Some(Process::LogicArchitect));
    assert!(error.contains("ghostInput"), "{error}");
    // What ran is rolled up: Magic Spark's call and Logic Architect's two; nothing after.
    let stages: Vec<(Process, usize, bool)> = rollup
        .stages
        .iter()
        .map(|st| (st.stage, st.calls, st.succeeded))
        .collect();
    assert_eq!(
        stages,
        [
            (Process::MagicSpark, 1, true),
            (Process::LogicArchitect, 2, false)
        ]
    );
    assert_eq!(rollup.cost, rollup.stages.iter().map(|st| st.cost).sum());
    assert!(!events.iter().any(|e| matches!(
        e,
        PipelineEvent::Stage {
            stage: Process::ContentCrafter | Process::StyleMaster,
            ..
        }
    )));
    assert_eq!(s.sim.stats().requests_total, 3);
    s.sim.shutdown().await;
}
