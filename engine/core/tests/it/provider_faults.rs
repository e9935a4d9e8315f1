//! Provider faults over real HTTP, on both wires: the engine's OpenAI and Anthropic clients
//! against the simulator's fault knobs, each ending in a complete answer or a clean error, in
//! bounded time, with one record per call that reached a model.
//!
//! Whose fault it is decides what happens: our account (quota, billing, key, access) → the
//! fallback at once and the model skipped for a while; the request (invalid, content policy,
//! too long) → the caller's error, no fallback (unless a larger context window can take it); a
//! blip (plain 5xx, reset before the headers) → one quick retry of the same model.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agents::Process;
use futures::StreamExt;
use keyvex_engine::catalog::{Catalog, RescuePolicy};
use keyvex_engine::provider::ChatMessage;
use keyvex_engine::record::{RequestRecord, RequestStatus};
use keyvex_engine::router::{
    CallTarget, RouteError, RouteFailure, RouteOptions, RouteOutcome, RouteRequest, RouterConfig,
};
use keyvex_engine::stream::{ProviderError, ProviderKind};
use keyvex_engine::tokenize::count_prompt_tokens;
use keyvex_engine::{CallContext, CallEvent, Engine};
use keyvex_sim::{Fault, LineEnding, Rule, SimHandle};
use keyvex_testkit::{MemoryRecorder, fast_sim, process_with_primary, sim_engine};

fn models(process: Process) -> (String, String) {
    let catalog = Catalog::embedded().unwrap();
    let route = catalog.route(process);
    (route.primary.clone(), route.fallback.clone())
}

fn config() -> RouterConfig {
    RouterConfig {
        ttft_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(5),
        header_timeout: Duration::from_secs(5),
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(50),
        ..RouterConfig::default()
    }
}

fn engine(sim: &SimHandle, config: RouterConfig) -> (Engine, Arc<MemoryRecorder>) {
    engine_on(sim, config, Catalog::embedded().unwrap())
}

/// [`engine`] whose broken streams are never rescued (mid-stream policy `off`), so a test sees
/// the broken call's own end.
fn engine_without_rescue(sim: &SimHandle, config: RouterConfig) -> (Engine, Arc<MemoryRecorder>) {
    let off = Catalog::embedded().unwrap().with_rescue(RescuePolicy::OFF);
    engine_on(sim, config, off)
}

fn engine_on(
    sim: &SimHandle,
    config: RouterConfig,
    catalog: Catalog,
) -> (Engine, Arc<MemoryRecorder>) {
    let recorder = MemoryRecorder::new();
    let engine = sim_engine(sim)
        .router(config)
        .catalog(catalog)
        .recorder(recorder.clone())
        .build()
        .unwrap();
    (engine, recorder)
}

fn request() -> RouteRequest {
    RouteRequest {
        system: Some("You are terse.".into()),
        messages: vec![ChatMessage::user(
            "Describe a savings calculator for freelancers.",
        )],
        max_output_tokens: Some(120),
        ..RouteRequest::default()
    }
}

fn on(model: &str, fault: Fault) -> Rule {
    Rule {
        model: Some(model.to_owned()),
        protocol: None,
        fault,
        times: Some(1),
    }
}

/// The text the caller saw and how the call ended.
struct Ran {
    text: String,
    end: Result<RouteOutcome, RouteFailure>,
    took: Duration,
}

impl Ran {
    fn ok(&self) -> &RouteOutcome {
        match &self.end {
            Ok(o) => o,
            Err(f) => panic!("expected success: {}", f.error),
        }
    }

    fn failed(&self) -> &RouteFailure {
        match &self.end {
            Ok(o) => panic!("expected a failure, got {o:?}"),
            Err(f) => f,
        }
    }
}

async fn call(engine: &Engine, process: Process) -> Ran {
    let started = Instant::now();
    let options = RouteOptions {
        keep_text: false,
        ..RouteOptions::default()
    };
    let mut stream = engine
        .chat(
            &CallContext::new("tester").with_correlation("faults"),
            &CallTarget::Process(process),
            request(),
            options,
        )
        .unwrap();
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        match event {
            CallEvent::Delta(t) => text.push_str(&t),
            CallEvent::Finished { outcome, record } => {
                record.receipt.durable().await.unwrap();
                return Ran {
                    text,
                    end: Ok(*outcome),
                    took: started.elapsed(),
                };
            }
            CallEvent::Failed { failure, record } => {
                record.receipt.durable().await.unwrap();
                return Ran {
                    text,
                    end: Err(*failure),
                    took: started.elapsed(),
                };
            }
            CallEvent::Start { .. } | CallEvent::Fallback { .. } | CallEvent::Rescue(_) => {}
        }
    }
    panic!("the call ended without a terminal event");
}

fn last_provider_error(f: &RouteFailure) -> &ProviderError {
    match &f.error {
        RouteError::MidStream { error, .. } | RouteError::Rejected { error, .. } => error,
        other => panic!("expected a provider error, got {other}"),
    }
}

fn served(sim: &SimHandle, model: &str) -> u64 {
    sim.stats()
        .requests_by_model
        .get(model)
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn account_errors_go_to_the_fallback_at_once_and_the_model_is_skipped_next_time() {
    for kind in ProviderKind::ALL {
        let process = process_with_primary(kind);
        let (primary, fallback) = models(process);
        let faults = [
            (Fault::InsufficientQuota, "quota_exhausted"),
            // Anthropic's 402 `billing_error`, OpenAI's 429 `insufficient_quota`: out of credit.
            (Fault::Billing, "quota_exhausted"),
            (
                Fault::Http {
                    status: 401,
                    retry_after: None,
                },
                "auth",
            ),
            (
                Fault::Http {
                    status: 403,
                    retry_after: None,
                },
                "auth",
            ),
            (
                Fault::Http {
                    status: 404,
                    retry_after: None,
                },
                "not_found",
            ),
        ];
        for (fault, expected) in faults {
            let sim = fast_sim(41).await;
            let (engine, recorder) = engine(&sim, config());
            sim.push_rule(on(&primary, fault));
            let ran = call(&engine, process).await;
            let outcome = ran.ok();
            assert_eq!(
                outcome.model.as_deref(),
                Some(fallback.as_str()),
                "{kind} {expected}"
            );
            let first = outcome.attempts[0].error.as_ref().unwrap();
            assert_eq!(first.kind(), expected, "{kind}: {first}");
            let records = recorder.records();
            assert_eq!(records.len(), 2, "{kind} {expected}: {records:?}");
            assert_eq!(records[0].status, RequestStatus::Retried);
            assert_eq!(records[0].error_kind.as_deref(), Some(expected));
            assert_eq!(records[1].status, RequestStatus::Succeeded);
            // The next request does not call the disabled model at all.
            let ran = call(&engine, process).await;
            assert_eq!(ran.ok().model.as_deref(), Some(fallback.as_str()));
            assert_eq!(served(&sim, &primary), 1, "{kind} {expected}: skipped");
            sim.shutdown().await;
        }
    }
}

#[tokio::test]
async fn request_errors_reach_the_caller_with_the_providers_code_and_no_fallback() {
    for kind in ProviderKind::ALL {
        let process = process_with_primary(kind);
        let (primary, fallback) = models(process);
        let sim = fast_sim(42).await;
        let (engine, recorder) = engine(&sim, config());
        sim.push_rule(on(&primary, Fault::ContentPolicy));
        let ran = call(&engine, process).await;
        let failure = ran.failed();
        assert_eq!(failure.error.kind(), "rejected", "{kind}");
        let cause = last_provider_error(failure);
        assert!(
            matches!(cause, ProviderError::Http { status: 400, .. }),
            "{cause:?}"
        );
        if kind == ProviderKind::OpenAi {
            assert!(
                matches!(cause, ProviderError::Http { code: Some(c), .. } if c == "content_policy_violation")
            );
        }
        assert_eq!(served(&sim, &fallback), 0, "{kind}: no fallback");
        let records = recorder.records();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].status, RequestStatus::Failed);
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn a_prompt_too_long_falls_back_only_to_a_larger_context_window() {
    let sim = fast_sim(43).await;
    let (engine, _) = engine(&sim, config());
    // magicSpark: claude-sonnet-4-6 (1,000,000 tokens) → gpt-5.4 (1,050,000): worth a try.
    let (primary, fallback) = models(Process::MagicSpark);
    sim.push_rule(on(&primary, Fault::ContextTooLong));
    let ran = call(&engine, Process::MagicSpark).await;
    assert_eq!(ran.ok().model.as_deref(), Some(fallback.as_str()));
    assert_eq!(
        ran.ok().attempts[0].error.as_ref().unwrap().kind(),
        "context_too_long"
    );
    // logicArchitect: gpt-5.4 → claude-sonnet-4-6, a smaller window: the caller's error.
    let (primary, fallback) = models(Process::LogicArchitect);
    sim.push_rule(on(&primary, Fault::ContextTooLong));
    let before = served(&sim, &fallback);
    let ran = call(&engine, Process::LogicArchitect).await;
    let cause = last_provider_error(ran.failed());
    assert!(
        matches!(cause, ProviderError::Http { status: 400, code: Some(c), .. } if c == "context_length_exceeded"),
        "{cause:?}"
    );
    assert_eq!(served(&sim, &fallback), before, "no fallback");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_blip_gets_one_quick_retry_of_the_same_model() {
    for kind in ProviderKind::ALL {
        let process = process_with_primary(kind);
        let (primary, fallback) = models(process);
        for fault in [
            Fault::Http {
                status: 500,
                retry_after: None,
            },
            Fault::Reset,
        ] {
            let sim = fast_sim(44).await;
            let (engine, recorder) = engine(&sim, config());
            sim.push_rule(on(&primary, fault.clone()));
            let ran = call(&engine, process).await;
            let outcome = ran.ok();
            assert_eq!(
                outcome.model.as_deref(),
                Some(primary.as_str()),
                "{kind} {fault:?}"
            );
            assert!(!outcome.fallback_used);
            assert_eq!((served(&sim, &primary), served(&sim, &fallback)), (2, 0));
            let records = recorder.records();
            assert_eq!(records.len(), 2, "{records:?}");
            assert_eq!(records[0].status, RequestStatus::Retried);
            assert!(records.iter().all(|r| r.model == primary));
            sim.shutdown().await;
        }
    }
}

#[tokio::test]
async fn a_silent_provider_is_left_at_the_header_timeout() {
    for kind in ProviderKind::ALL {
        let process = process_with_primary(kind);
        let (primary, fallback) = models(process);
        let sim = fast_sim(45).await;
        let (engine, _) = engine(
            &sim,
            RouterConfig {
                header_timeout: Duration::from_millis(300),
                ..config()
            },
        );
        sim.push_rule(on(&primary, Fault::Silent));
        let ran = call(&engine, process).await;
        assert_eq!(ran.ok().model.as_deref(), Some(fallback.as_str()));
        assert_eq!(
            ran.ok().attempts[0].error.as_ref().unwrap().kind(),
            "header_timeout"
        );
        assert!(ran.took < Duration::from_secs(3), "{kind}: {:?}", ran.took);
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn pings_without_content_end_at_the_first_token_deadline_and_close_the_stream() {
    for kind in ProviderKind::ALL {
        let process = process_with_primary(kind);
        let (primary, fallback) = models(process);
        let sim = fast_sim(46).await;
        let (engine, _) = engine(
            &sim,
            RouterConfig {
                ttft_timeout: Duration::from_millis(400),
                ..config()
            },
        );
        sim.push_rule(on(
            &primary,
            Fault::PingsOnly {
                every: Duration::from_millis(50),
            },
        ));
        let ran = call(&engine, process).await;
        assert_eq!(ran.ok().model.as_deref(), Some(fallback.as_str()));
        assert_eq!(
            ran.ok().attempts[0].error.as_ref().unwrap().kind(),
            "ttft_timeout"
        );
        assert!(
            sim.wait_for_disconnects(1, Duration::from_secs(5)).await,
            "{kind}: the upstream was closed"
        );
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn a_drip_under_the_stall_timeout_ends_at_the_total_deadline() {
    for kind in ProviderKind::ALL {
        let process = process_with_primary(kind);
        let (primary, _) = models(process);
        let sim = fast_sim(47).await;
        let (engine, recorder) = engine(
            &sim,
            RouterConfig {
                stall_timeout: Duration::from_millis(500),
                request_timeout: Duration::from_millis(1500),
                ..config()
            },
        );
        sim.push_rule(on(
            &primary,
            Fault::Drip {
                every: Duration::from_millis(100),
            },
        ));
        let ran = call(&engine, process).await;
        let failure = ran.failed();
        assert_eq!(last_provider_error(failure).kind(), "deadline", "{kind}");
        assert!(!ran.text.is_empty(), "content flowed before the deadline");
        assert!(
            ran.took >= Duration::from_millis(1500) && ran.took < Duration::from_secs(4),
            "{kind}: {:?}",
            ran.took
        );
        assert!(sim.wait_for_disconnects(1, Duration::from_secs(5)).await);
        let records = recorder.records();
        assert_eq!(records.len(), 1);
        assert!(records[0].cost_estimated && records[0].output_tokens > 0);
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn a_whole_answer_without_its_terminator_is_a_success_within_a_second() {
    for kind in ProviderKind::ALL {
        let process = process_with_primary(kind);
        let (primary, _) = models(process);
        let sim = fast_sim(48).await;
        let (engine, recorder) = engine(&sim, config());
        let normal = call(&engine, process).await;
        let expected = normal.ok().usage;
        for hold in [Duration::ZERO, Duration::from_secs(30)] {
            sim.push_rule(on(&primary, Fault::NoTerminator { hold }));
            let ran = call(&engine, process).await;
            let outcome = ran.ok();
            assert_eq!(ran.text, normal.text, "{kind} {hold:?}: the same answer");
            assert_eq!(
                outcome.usage, expected,
                "{kind}: the provider's usage, not an estimate"
            );
            assert!(!outcome.cost_estimated);
            assert!(
                ran.took < Duration::from_secs(1),
                "{kind} {hold:?}: {:?}",
                ran.took
            );
            let records = recorder.records();
            let last: &RequestRecord = records.last().unwrap();
            assert!(last.unterminated && last.status == RequestStatus::Succeeded);
        }
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn a_clean_end_without_a_finish_reason_is_never_a_success() {
    for kind in ProviderKind::ALL {
        let process = process_with_primary(kind);
        let (primary, _) = models(process);
        let sim = fast_sim(49).await;
        let (off, _) = engine_without_rescue(&sim, config());
        sim.push_rule(on(&primary, Fault::CleanEnd { tokens: 5 }));
        let ran = call(&off, process).await;
        assert!(!ran.text.is_empty());
        assert_eq!(
            last_provider_error(ran.failed()).kind(),
            "truncated",
            "{kind}"
        );
        // With the default policy the truncated stream is restarted on the fallback.
        let (engine, _) = engine(&sim, config());
        sim.push_rule(on(&primary, Fault::CleanEnd { tokens: 5 }));
        let ran = call(&engine, process).await;
        let o = ran.ok();
        assert!(o.rescued(), "{kind}");
        assert_eq!(
            o.attempts[0].error.as_ref().unwrap().kind(),
            "truncated",
            "{kind}"
        );
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn every_line_ending_gives_the_same_answer_on_both_wires() {
    for kind in ProviderKind::ALL {
        let process = process_with_primary(kind);
        let (primary, _) = models(process);
        let sim = fast_sim(50).await;
        let (engine, _) = engine(&sim, config());
        let lf = call(&engine, process).await;
        for ending in [LineEnding::Crlf, LineEnding::Cr, LineEnding::Lf] {
            sim.push_rule(on(&primary, Fault::LineEnding(ending)));
            let ran = call(&engine, process).await;
            let outcome = ran.ok();
            assert_eq!(ran.text, lf.text, "{kind} {ending:?}");
            assert_eq!(outcome.usage, lf.ok().usage, "{kind} {ending:?}");
            assert!(!outcome.fallback_used, "{kind} {ending:?}");
        }
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn usage_after_a_fallback_is_the_answering_models_own() {
    for kind in ProviderKind::ALL {
        let process = process_with_primary(kind);
        let (primary, fallback) = models(process);
        let sim = fast_sim(51).await;
        let (engine, recorder) = engine(&sim, config());
        // The primary opens its stream (Anthropic reports its input in `message_start`), then
        // fails before any content.
        sim.push_rule(on(
            &primary,
            Fault::InStreamError {
                after_tokens: 0,
                error_type: "overloaded_error".into(),
            },
        ));
        let ran = call(&engine, process).await;
        let outcome = ran.ok();
        assert_eq!(outcome.model.as_deref(), Some(fallback.as_str()));
        let r = request();
        let prompt = count_prompt_tokens(r.system.as_deref(), &r.messages);
        assert_eq!(
            outcome.usage.input, prompt,
            "{kind}: the fallback's own prompt"
        );
        let records = recorder.records();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].input_tokens, prompt);
        assert!(
            !records[1].cost_estimated,
            "{kind}: reported, not estimated"
        );
        // The failed attempt is billed in its own record.
        assert_eq!(records[0].model, primary);
        assert_eq!(records[0].status, RequestStatus::Retried);
        assert_eq!(
            outcome.cost.pico_usd(),
            records[0].cost_pico_usd + records[1].cost_pico_usd
        );
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn a_cut_stream_keeps_the_reported_prompt_and_estimates_only_the_output() {
    let process = process_with_primary(ProviderKind::Anthropic);
    let (primary, _) = models(process);
    let sim = fast_sim(52).await;
    let (engine, recorder) = engine_without_rescue(&sim, config());
    sim.push_rule(on(&primary, Fault::CutAfter { tokens: 20 }));
    let ran = call(&engine, process).await;
    ran.failed();
    let r = request();
    let prompt = count_prompt_tokens(r.system.as_deref(), &r.messages);
    let records = recorder.records();
    let rec = records.last().unwrap();
    assert_eq!(rec.input_tokens, prompt, "message_start's input is exact");
    assert!(rec.cost_estimated);
    let sent = keyvex_engine::tokenize::count_tokens(&ran.text) as f64;
    let estimated = rec.output_tokens as f64;
    assert!(
        (estimated - sent).abs() <= 0.15 * sent + 2.0,
        "estimated {estimated} output tokens for {sent} sent"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_recovered_model_serves_again_within_the_default_cool_down() {
    let config = RouterConfig {
        same_model_retries: 0,
        ..config()
    };
    let cool_down = config.breaker.cool_down;
    assert!(cool_down <= Duration::from_secs(5));
    let process = process_with_primary(ProviderKind::OpenAi);
    let (primary, fallback) = models(process);
    let sim = fast_sim(53).await;
    let (engine, _) = engine(&sim, config.clone());
    // Five overloads in a row open the primary's circuit.
    sim.push_rule(Rule {
        times: Some(config.breaker.failure_threshold),
        ..on(
            &primary,
            Fault::Http {
                status: 503,
                retry_after: None,
            },
        )
    });
    for _ in 0..config.breaker.failure_threshold {
        assert_eq!(
            call(&engine, process).await.ok().model.as_deref(),
            Some(fallback.as_str())
        );
    }
    let opened = Instant::now();
    let ran = call(&engine, process).await;
    assert_eq!(
        ran.ok().model.as_deref(),
        Some(fallback.as_str()),
        "skipped while open"
    );
    // Recovered: after the cool-down one request probes it and it serves again.
    tokio::time::sleep(cool_down.saturating_sub(opened.elapsed())).await;
    let ran = call(&engine, process).await;
    assert_eq!(ran.ok().model.as_deref(), Some(primary.as_str()));
    sim.shutdown().await;
}
