//! The engine's one call path, over HTTP against the simulator: every model call — finished,
//! failed or dropped mid-stream — is handed to the recorder exactly once, with the context given
//! at call time (caller, correlation id, run, session, stage); session messages follow the
//! context; and the engine's own provider budget refuses an attempt without touching the
//! model's circuit breaker.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keyvex_engine::catalog::{Catalog, EMBEDDED_CATALOG};
use keyvex_engine::limits::{ProviderRates, Rate};
use keyvex_engine::provider::{ChatMessage, Role};
use keyvex_engine::record::RequestStatus;
use keyvex_engine::router::{CircuitState, RouterConfig};
use keyvex_engine::{
    AgentEvent, CallContext, CallEvent, CallTarget, Engine, EngineError, PipelineEvent,
    PipelineInput, Process, RouteOptions, RouteRequest,
};
use keyvex_sim::{Fault, Rule, SimConfig, SimHandle};
use keyvex_testkit::{MemoryRecorder, business, fast_sim, sim_engine};

fn request(text: &str) -> RouteRequest {
    RouteRequest {
        messages: vec![ChatMessage::user(text)],
        max_output_tokens: Some(64),
        ..RouteRequest::default()
    }
}

fn engine(sim: &SimHandle, recorder: &Arc<MemoryRecorder>) -> Engine {
    sim_engine(sim).recorder(recorder.clone()).build().unwrap()
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

#[tokio::test]
async fn a_finished_and_a_failed_call_are_each_recorded_once_with_their_context() {
    let sim = fast_sim(31).await;
    let recorder = MemoryRecorder::new();
    let engine = engine(&sim, &recorder);
    let ctx = CallContext::new("alice").with_correlation("req-1");
    let mut call = engine
        .chat(
            &ctx,
            &CallTarget::Process(Process::MagicSpark),
            request("Name three bakery loyalty ideas."),
            RouteOptions::default(),
        )
        .unwrap();
    let mut text = String::new();
    let mut recorded_id = None;
    while let Some(event) = call.next().await {
        match event {
            CallEvent::Delta(t) => text.push_str(&t),
            CallEvent::Finished { outcome, record } => {
                assert_eq!(outcome.text, text);
                record.receipt.durable().await.unwrap();
                recorded_id = Some(record.id);
            }
            CallEvent::Failed { failure, .. } => panic!("{}", failure.error),
            CallEvent::Start { .. } | CallEvent::Fallback { .. } | CallEvent::Rescue(_) => {}
        }
    }
    let records = recorder.records();
    let [rec] = records.as_slice() else {
        panic!("one record per call: {records:?}");
    };
    assert_eq!(Some(&rec.request_id), recorded_id.as_ref());
    assert_ne!(rec.request_id, "req-1", "record ids are the engine's own");
    assert_eq!(rec.correlation_id.as_deref(), Some("req-1"));
    assert_eq!(
        (rec.user_id.as_str(), rec.process.as_str()),
        ("alice", "magicSpark")
    );
    assert_eq!(rec.status, RequestStatus::Succeeded);
    assert_eq!(rec.stage, None, "a call outside a run has no stage");

    // Every attempt of the next call fails (both models answer 500 every time).
    sim.push_rule(Rule::always(Fault::Http {
        status: 500,
        retry_after: None,
    }));
    let events: Vec<CallEvent> = engine
        .chat(
            &CallContext::new("bob"),
            &CallTarget::Model("gpt-5.4".into()),
            request("hello"),
            RouteOptions::default(),
        )
        .unwrap()
        .collect()
        .await;
    assert!(
        matches!(events.last(), Some(CallEvent::Failed { .. })),
        "{events:?}"
    );
    // One record per call that reached the model: the ones the request went on from are
    // `retried`, the last one carries the request's failure.
    let records = recorder.records();
    let bob = &records[1..];
    assert_eq!(
        bob.len() as u64,
        sim.stats().requests_total - 1,
        "one record per call served: {records:?}"
    );
    let (failed, retried) = bob.split_last().unwrap();
    assert!(!retried.is_empty());
    for r in retried {
        assert_eq!(r.status, RequestStatus::Retried);
        assert_eq!(r.error_kind.as_deref(), Some("server_error"));
    }
    assert_eq!(
        (failed.user_id.as_str(), failed.process.as_str()),
        ("bob", "direct")
    );
    assert_eq!(failed.status, RequestStatus::Failed);
    assert_eq!(failed.error_kind.as_deref(), Some("server_error"));
    assert_eq!(failed.attempt, failed.attempts);
    assert!(
        bob.iter()
            .all(|r| r.correlation_id == failed.correlation_id)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_call_dropped_mid_stream_is_recorded_once_as_cancelled_for_its_caller() {
    let sim = fast_sim(32).await;
    sim.push_rule(Rule::always(Fault::Latency {
        ttft: Duration::from_millis(20),
        tokens_per_sec: 50.0,
    }));
    let recorder = MemoryRecorder::new();
    let engine = engine(&sim, &recorder);
    let ctx = CallContext::new("carol")
        .with_correlation("job-7")
        .with_run("job-7")
        .with_stage(Process::LogicArchitect);
    let mut call = engine
        .chat(
            &ctx,
            &CallTarget::Process(Process::LogicArchitect),
            request("Explain compound interest at length."),
            RouteOptions::default(),
        )
        .unwrap();
    while let Some(event) = call.next().await {
        if matches!(event, CallEvent::Delta(_)) {
            break;
        }
    }
    assert!(
        recorder.records().is_empty(),
        "nothing is recorded mid-call"
    );
    drop(call);
    let records = recorder.wait_for_records(1, Duration::from_secs(5)).await;
    let [rec] = records.as_slice() else {
        panic!("one record for the dropped call: {records:?}");
    };
    assert_eq!(rec.status, RequestStatus::Cancelled);
    assert_eq!(rec.user_id, "carol");
    assert_eq!(rec.run_id.as_deref(), Some("job-7"));
    assert_eq!(rec.stage.as_deref(), Some("logicArchitect"));
    assert!(rec.cost_estimated && rec.cost_pico_usd > 0, "{rec:?}");
    // Nothing more arrives later: exactly once.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(recorder.records().len(), 1);
    sim.shutdown().await;
}

/// The embedded catalog with Style Master on Content Crafter's models, so the two concurrent
/// last stages of a pipeline call the same model at the same time.
fn catalog_with_shared_models() -> Catalog {
    let mut json: serde_json::Value = serde_json::from_str(EMBEDDED_CATALOG).unwrap();
    let content = json["processes"]["contentCrafter"].clone();
    json["processes"]["styleMaster"]["primary"] = content["primary"].clone();
    json["processes"]["styleMaster"]["fallback"] = content["fallback"].clone();
    Catalog::parse(&json.to_string(), "shared-models.json").unwrap()
}

#[tokio::test]
async fn two_stages_on_one_model_cancelled_together_keep_their_own_stages() {
    let sim = fast_sim(33).await;
    sim.push_rule(Rule::always(Fault::Latency {
        ttft: Duration::from_millis(50),
        tokens_per_sec: 400.0,
    }));
    let recorder = MemoryRecorder::new();
    let engine = sim_engine(&sim)
        .catalog(catalog_with_shared_models())
        .recorder(recorder.clone())
        .build()
        .unwrap();
    let shared = engine
        .catalog()
        .route(Process::ContentCrafter)
        .primary
        .clone();
    assert_eq!(engine.catalog().route(Process::StyleMaster).primary, shared);
    let input = PipelineInput {
        business: business(),
        concept_index: None,
        brand: None,
    };
    let mut run = engine.pipeline(CallContext::new("dana").with_run("run-33"), input);
    let mut streaming = 0;
    while let Some(event) = run.next().await {
        match event {
            PipelineEvent::Stage {
                stage: Process::ContentCrafter | Process::StyleMaster,
                event: AgentEvent::Start { .. },
            } => {
                streaming += 1;
                if streaming == 2 {
                    break;
                }
            }
            PipelineEvent::Done { .. } | PipelineEvent::Failed { .. } => {
                panic!("the run ended before both last stages started")
            }
            _ => {}
        }
    }
    drop(run);
    let records = recorder.wait_for_records(4, Duration::from_secs(5)).await;
    let by_stage: BTreeMap<&str, &keyvex_engine::RequestRecord> = records
        .iter()
        .map(|r| (r.stage.as_deref().unwrap(), r))
        .collect();
    assert_eq!(records.len(), 4, "{records:?}");
    assert_eq!(
        by_stage.len(),
        4,
        "each call has its own stage: {records:?}"
    );
    for stage in ["contentCrafter", "styleMaster"] {
        let r = by_stage[stage];
        assert_eq!(r.status, RequestStatus::Cancelled, "{r:?}");
        assert_eq!(r.model, shared);
        assert_eq!(r.process, stage);
        assert_eq!(r.run_id.as_deref(), Some("run-33"));
        assert_eq!(r.user_id, "dana");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn a_spent_local_budget_falls_back_and_leaves_the_breaker_closed() {
    let sim = fast_sim(34).await;
    let recorder = MemoryRecorder::new();
    let engine = sim_engine(&sim)
        .router(RouterConfig {
            ttft_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(10),
            max_retry_after: Duration::from_millis(10),
            ..RouterConfig::default()
        })
        .provider_rates(ProviderRates {
            requests_per_minute: nz(1),
            tokens_per_minute: nz(10_000_000),
        })
        .recorder(recorder.clone())
        .build()
        .unwrap();
    let route = engine.catalog().route(Process::LogicArchitect).clone();
    let target = CallTarget::Process(Process::LogicArchitect);
    let ctx = CallContext::new("erin");
    for round in 0..2 {
        let events: Vec<CallEvent> = engine
            .chat(&ctx, &target, request("hi"), RouteOptions::default())
            .unwrap()
            .collect()
            .await;
        let Some(CallEvent::Finished { outcome, .. }) = events.last() else {
            panic!("round {round}: {events:?}");
        };
        if round == 0 {
            assert_eq!(outcome.model.as_deref(), Some(route.primary.as_str()));
            assert!(!outcome.fallback_used);
        } else {
            // The primary's provider has had its one request this minute: refused locally, no
            // request sent, and the fallback on the other provider answers.
            assert_eq!(outcome.model.as_deref(), Some(route.fallback.as_str()));
            let refused = outcome.attempts[0].error.as_ref().unwrap();
            assert_eq!(refused.kind(), "local_budget", "{refused}");
            assert!(refused.made_no_call());
            assert!(outcome.fallback_used);
        }
    }
    assert_eq!(
        sim.stats().requests_total,
        2,
        "the refused attempt sent nothing"
    );
    for _ in 0..6 {
        // More refusals than the breaker's threshold: still closed, since they are ours.
        let _: Vec<CallEvent> = engine
            .chat(&ctx, &target, request("hi"), RouteOptions::default())
            .unwrap()
            .collect()
            .await;
    }
    assert_eq!(
        engine.circuit_state(&route.primary),
        CircuitState::Closed {
            consecutive_failures: 0
        }
    );
    let records = recorder.records();
    assert_eq!(records.len(), 8, "one record per request here: {records:?}");
    // The second request's only call went to the fallback; later ones found both providers'
    // budgets spent and made no call at all, which their one failed record says.
    assert!(records[1].fallback_used && records[1].attempts == 1);
    for r in &records[2..] {
        assert_eq!(r.status, RequestStatus::Failed, "{r:?}");
        assert_eq!(
            (r.attempts, r.error_kind.as_deref()),
            (0, Some("local_budget"))
        );
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn session_messages_follow_the_context_of_agent_and_pipeline_runs() {
    let sim = fast_sim(35).await;
    let recorder = MemoryRecorder::new();
    let engine = engine(&sim, &recorder);
    let ctx = CallContext::new("fay")
        .with_correlation("req-35")
        .with_session(Some("s-35".into()));
    let mut run = engine.agent(ctx.clone(), Process::MagicSpark, business());
    while let Some(event) = run.next().await {
        if let AgentEvent::Result { messages, .. } = event {
            messages.durable().await.unwrap();
        }
    }
    let messages = recorder.messages();
    let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::User, Role::Assistant]);
    for m in &messages {
        assert_eq!((m.session_id.as_str(), m.user_id.as_str()), ("s-35", "fay"));
        assert_eq!(m.request_id.as_deref(), Some("req-35"));
        assert_eq!(m.process, "magicSpark");
        assert_eq!(m.run_id, None);
    }
    assert_eq!(messages[0].content, business());

    let input = PipelineInput {
        business: business(),
        concept_index: None,
        brand: None,
    };
    let mut run = engine.pipeline(ctx, input);
    let mut run_id = String::new();
    while let Some(event) = run.next().await {
        match event {
            PipelineEvent::RunStarted { run_id: id } => run_id = id,
            PipelineEvent::Done { messages, .. } => messages.durable().await.unwrap(),
            PipelineEvent::Failed { error, .. } => panic!("{error}"),
            PipelineEvent::Stage { .. } => {}
        }
    }
    let run_messages: Vec<_> = recorder
        .messages()
        .into_iter()
        .filter(|m| m.run_id.as_deref() == Some(run_id.as_str()))
        .collect();
    let mut stages: Vec<(Role, String)> = run_messages
        .iter()
        .map(|m| (m.role, m.stage.clone().unwrap()))
        .collect();
    stages.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        run_messages.len(),
        5,
        "the business, then each stage's output"
    );
    assert_eq!(
        run_messages.iter().filter(|m| m.role == Role::User).count(),
        1
    );
    assert!(stages.contains(&(Role::User, "magicSpark".to_owned())));
    sim.shutdown().await;
}

#[tokio::test]
async fn an_engine_needs_a_recorder_and_enforces_caller_limits() {
    let Err(error) = Engine::builder().build() else {
        panic!("an engine without a recorder must be refused");
    };
    assert!(matches!(error, EngineError::NoRecorder), "{error}");
    assert!(error.to_string().contains(".recorder("), "{error}");

    let engine = Engine::builder()
        .recorder(MemoryRecorder::new())
        .caller_rate(Rate {
            per_period: nz(60),
            period: Duration::from_secs(60),
            burst: nz(2),
        })
        .build()
        .unwrap();
    assert!(engine.check_caller("gus", "/v1/agents").await.is_ok());
    assert!(engine.check_caller("gus", "/v1/agents").await.is_ok());
    let refused = engine.check_caller("gus", "/v1/agents").await.unwrap_err();
    assert_eq!(refused.caller, "gus");
    assert!(engine.check_caller("hal", "/v1/agents").await.is_ok());
    assert!(
        engine
            .providers_description()
            .contains("openai: not configured"),
        "{}",
        engine.providers_description()
    );
}

#[tokio::test]
async fn the_simulator_given_to_the_builder_is_stopped_by_shutdown() {
    let sim = keyvex_sim::start(([127, 0, 0, 1], 0).into(), SimConfig::fast(36))
        .await
        .unwrap();
    let base = sim.base_url();
    let recorder = MemoryRecorder::new();
    let engine = Engine::builder()
        .simulator(sim)
        .recorder(recorder.clone())
        .build()
        .unwrap();
    assert!(engine.providers_description().contains(&base));
    let events: Vec<CallEvent> = engine
        .chat(
            &CallContext::new("ivy"),
            &CallTarget::Model("gpt-5.4-nano".into()),
            request("hi"),
            RouteOptions::default(),
        )
        .unwrap()
        .collect()
        .await;
    assert!(matches!(events.last(), Some(CallEvent::Finished { .. })));
    let report = engine.shutdown(Duration::from_secs(1)).await;
    assert!(report.ledger_flushed);
    let refused = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .send()
        .await;
    assert!(refused.is_err(), "the simulator is stopped");
}

/// A catalog version swapped in while a call is open: the open call finishes on the version it
/// started with and is costed with its prices; the next call routes and prices with the new one.
/// A version that would move a primary to a provider this engine has no key for is refused and
/// changes nothing.
#[tokio::test]
async fn a_swapped_catalog_applies_to_the_next_call_not_the_open_one() {
    let sim = fast_sim(16).await;
    let recorder = MemoryRecorder::new();
    let engine = engine(&sim, &recorder);
    assert_eq!(engine.catalog().version(), 0);
    let mut v: serde_json::Value = serde_json::from_str(EMBEDDED_CATALOG).unwrap();
    v["models"][2]["pricing"]["outputPerMTok"] = 9.0.into();
    v["processes"]["styleMaster"]["primary"] = "gpt-5.4".into();
    let next = Catalog::parse(&v.to_string(), "v1.json")
        .unwrap()
        .as_version(1, Some(1_764_000_000_000));

    let ctx = CallContext::new("frank");
    let target = CallTarget::Process(Process::StyleMaster);
    let mut open = engine
        .chat(&ctx, &target, request("palette"), RouteOptions::default())
        .unwrap();
    // The open call has started on version 0 (its first event is out) when the swap happens.
    let first = open.next().await.unwrap();
    assert!(
        matches!(first, CallEvent::Start { ref model, .. } if model == "gpt-5.4-mini"),
        "{first:?}"
    );
    let previous = engine.swap_catalog(next.clone()).unwrap();
    assert_eq!(previous.version(), 0);
    assert_eq!(engine.catalog().activated_at_ms(), Some(1_764_000_000_000));
    while open.next().await.is_some() {}
    let mut second = engine
        .chat(&ctx, &target, request("palette"), RouteOptions::default())
        .unwrap();
    while second.next().await.is_some() {}

    let records = recorder.wait_for_records(2, Duration::from_secs(5)).await;
    let v0 = Catalog::embedded().unwrap();
    let priced = |catalog: &Catalog, r: &keyvex_engine::RequestRecord| {
        let usage = keyvex_engine::Usage {
            input: r.input_tokens,
            cached_input: r.cached_input_tokens,
            cache_write: r.cache_write_tokens,
            output: r.output_tokens,
        };
        keyvex_engine::cost::cost(&usage, &catalog.model(&r.model).unwrap().pricing).pico_usd()
    };
    assert_eq!(
        (records[0].catalog_version, records[0].model.as_str()),
        (0, "gpt-5.4-mini")
    );
    assert_eq!(records[0].cost_pico_usd, priced(&v0, &records[0]));
    assert_eq!(
        (records[1].catalog_version, records[1].model.as_str()),
        (1, "gpt-5.4")
    );
    assert_eq!(records[1].cost_pico_usd, priced(&next, &records[1]));

    // An engine with only OpenAI refuses a version that moves Logic Architect's primary (on
    // OpenAI now) to Anthropic, and keeps its catalog.
    let openai_only = Engine::builder()
        .openai_at(&sim.base_url(), "sim-key")
        .recorder(recorder.clone())
        .build()
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(EMBEDDED_CATALOG).unwrap();
    v["processes"]["logicArchitect"]["primary"] = "claude-sonnet-4-6".into();
    v["processes"]["logicArchitect"]["fallback"] = "gpt-5.4".into();
    let moved = Catalog::parse(&v.to_string(), "v2.json")
        .unwrap()
        .as_version(2, None);
    let refused = openai_only.swap_catalog(moved).unwrap_err();
    assert_eq!((refused.version, refused.kept), (2, 0));
    assert!(
        refused
            .to_string()
            .contains("processes.logicArchitect.primary"),
        "{refused}"
    );
    assert_eq!(openai_only.catalog().version(), 0);
    assert_eq!(
        openai_only.catalog().route(Process::LogicArchitect).primary,
        "gpt-5.4"
    );
    sim.shutdown().await;
}
