//! Integration tests: the router against scripted fake providers, under paused time.
//!
//! Each fake replays one script per call (events, waits, a hang) and counts calls, call times
//! and closed streams, so the tests see exactly what the router asked of each provider.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agents::Process;
use futures::StreamExt;
use keyvex_engine::catalog::{Catalog, RescuePolicy};
use keyvex_engine::cost::Cost;
use keyvex_engine::provider::{ChatMessage, ChatRequest, EventStream, Provider, ProviderError};
use keyvex_engine::router::{
    AttemptError, BreakerConfig, CircuitState, OpenReason, Providers, RetryBudgetConfig,
    RouteError, RouteEvent, RouteObserver, RouteOptions, RouteOutcome, RouteRequest, RouteStatus,
    RouteStream, Router, RouterConfig,
};
use keyvex_engine::stream::{FinishReason, ProviderEvent, ProviderKind, Usage};
use keyvex_engine::tokenize::count_tokens;
use tokio::time::Instant;

const PRIMARY: &str = "gpt-5.4";
const FALLBACK: &str = "claude-sonnet-4-6";
const OPENAI: ProviderKind = ProviderKind::OpenAi;
const ANTHROPIC: ProviderKind = ProviderKind::Anthropic;

#[derive(Clone)]
enum Step {
    Ev(ProviderEvent),
    Wait(Duration),
    Hang,
}

struct Fake {
    kind: ProviderKind,
    scripts: Mutex<VecDeque<Vec<Step>>>,
    calls: Mutex<Vec<(Instant, ChatRequest)>>,
    closed: Arc<AtomicUsize>,
}

struct CloseCounter(Arc<AtomicUsize>);

impl Drop for CloseCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Fake {
    fn new(kind: ProviderKind, scripts: Vec<Vec<Step>>) -> Arc<Fake> {
        Arc::new(Fake {
            kind,
            scripts: Mutex::new(scripts.into()),
            calls: Mutex::new(Vec::new()),
            closed: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    fn call_times(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().iter().map(|(t, _)| *t).collect()
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

impl Provider for Fake {
    fn kind(&self) -> ProviderKind {
        self.kind
    }

    fn stream(&self, request: ChatRequest) -> EventStream {
        self.calls.lock().unwrap().push((Instant::now(), request));
        let script = self.scripts.lock().unwrap().pop_front().unwrap_or_else(|| {
            vec![Step::Ev(ProviderEvent::Error(ProviderError::Connect {
                provider: self.kind,
                url: "fake".into(),
                message: "the test script has no more calls".into(),
            }))]
        });
        let guard = CloseCounter(self.closed.clone());
        Box::pin(async_stream::stream! {
            let _guard = guard;
            for step in script {
                match step {
                    Step::Ev(event) => yield event,
                    Step::Wait(d) => tokio::time::sleep(d).await,
                    Step::Hang => futures::future::pending::<()>().await,
                }
            }
        })
    }
}

fn start(kind: ProviderKind, model: &str) -> Step {
    Step::Ev(ProviderEvent::Start {
        provider: kind,
        model: model.into(),
    })
}

fn delta(text: &str) -> Step {
    Step::Ev(ProviderEvent::Delta(text.into()))
}

fn usage(input: u64, cached_input: u64, output: u64) -> Step {
    Step::Ev(ProviderEvent::Usage(Usage {
        input,
        cached_input,
        cache_write: 0,
        output,
    }))
}

fn done() -> Step {
    Step::Ev(ProviderEvent::Done {
        finish_reason: FinishReason::Stop,
        unterminated: false,
    })
}

fn err(e: ProviderError) -> Step {
    Step::Ev(ProviderEvent::Error(e))
}

fn http_error(
    kind: ProviderKind,
    status: u16,
    error_type: Option<&str>,
    retry_after: Option<Duration>,
) -> ProviderError {
    ProviderError::Http {
        provider: kind,
        status,
        error_type: error_type.map(str::to_owned),
        code: None,
        message: "scripted".into(),
        retry_after,
        request_id: None,
    }
}

fn http(kind: ProviderKind, status: u16) -> Vec<Step> {
    vec![err(http_error(kind, status, None, None))]
}

fn ok(kind: ProviderKind, model: &str, text: &str) -> Vec<Step> {
    vec![start(kind, model), delta(text), usage(20, 0, 5), done()]
}

/// Quick same-model retries off, so each scripted failure moves the route on; the tests of
/// quick retries turn them on.
fn config() -> RouterConfig {
    RouterConfig {
        ttft_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(5),
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(1),
        same_model_retries: 0,
        ..RouterConfig::default()
    }
}

fn router(openai: &Arc<Fake>, anthropic: &Arc<Fake>, config: RouterConfig) -> Router {
    router_on(openai, anthropic, config, Catalog::embedded().unwrap())
}

/// [`router`] whose broken streams are never rescued (mid-stream policy `off`).
fn router_without_rescue(
    openai: &Arc<Fake>,
    anthropic: &Arc<Fake>,
    config: RouterConfig,
) -> Router {
    let off = Catalog::embedded().unwrap().with_rescue(RescuePolicy::OFF);
    router_on(openai, anthropic, config, off)
}

fn router_on(
    openai: &Arc<Fake>,
    anthropic: &Arc<Fake>,
    config: RouterConfig,
    catalog: Catalog,
) -> Router {
    let catalog = Arc::new(catalog);
    let providers = Providers::new()
        .with(OPENAI, openai.clone())
        .with(ANTHROPIC, anthropic.clone());
    Router::new(catalog, providers, config)
}

fn request() -> RouteRequest {
    RouteRequest {
        system: Some("You are terse.".into()),
        messages: vec![ChatMessage::user("Plan a birthday party for a robot.")],
        ..RouteRequest::default()
    }
}

/// `logicArchitect` routes gpt-5.4 (OpenAI) → claude-sonnet-4-6 (Anthropic).
fn process(router: &Router) -> RouteStream {
    router.stream_process(Process::LogicArchitect, request())
}

async fn collect(stream: RouteStream) -> Vec<RouteEvent> {
    stream.collect().await
}

fn finished(events: &[RouteEvent]) -> &RouteOutcome {
    match events.last() {
        Some(RouteEvent::Finished(outcome)) => outcome,
        other => panic!("expected Finished, got {other:?}"),
    }
}

fn failed(events: &[RouteEvent]) -> (&RouteError, &RouteOutcome) {
    match events.last() {
        Some(RouteEvent::Failed(f)) => (&f.error, &f.outcome),
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn deltas(events: &[RouteEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            RouteEvent::Delta(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

fn provider_error(outcome: &RouteOutcome, i: usize) -> &ProviderError {
    match &outcome.attempts[i].error {
        Some(AttemptError::Provider(e)) => e,
        other => panic!("attempt {i}: expected a provider error, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn falls_back_on_every_retryable_class() {
    let before_content = |e: ProviderError| vec![start(OPENAI, PRIMARY), err(e)];
    let cases: Vec<(&str, Vec<Step>)> = vec![
        (
            "connect",
            vec![err(ProviderError::Connect {
                provider: OPENAI,
                url: "http://x".into(),
                message: "refused".into(),
            })],
        ),
        ("timeout", http(OPENAI, 408)),
        ("conflict", http(OPENAI, 409)),
        ("rate_limited", http(OPENAI, 429)),
        ("server_error", http(OPENAI, 500)),
        ("server_error", http(OPENAI, 503)),
        ("overloaded", http(OPENAI, 529)),
        (
            "overloaded",
            before_content(ProviderError::InStream {
                provider: OPENAI,
                error_type: "overloaded_error".into(),
                message: "Overloaded".into(),
            }),
        ),
        (
            "truncated",
            before_content(ProviderError::Truncated {
                provider: OPENAI,
                detail: "eof".into(),
            }),
        ),
        (
            "malformed",
            before_content(ProviderError::Malformed {
                provider: OPENAI,
                detail: "bad json".into(),
            }),
        ),
        // The provider stream ends without a terminal event: the router calls it truncated.
        ("truncated", vec![start(OPENAI, PRIMARY)]),
    ];
    for (kind, script) in cases {
        let opened = matches!(script.first(), Some(Step::Ev(ProviderEvent::Start { .. })));
        let openai = Fake::new(OPENAI, vec![script]);
        let anthropic = Fake::new(ANTHROPIC, vec![ok(ANTHROPIC, FALLBACK, "from claude")]);
        let events = collect(process(&router(&openai, &anthropic, config()))).await;
        let outcome = finished(&events);
        assert_eq!(outcome.model.as_deref(), Some(FALLBACK), "{kind}");
        assert_eq!(outcome.text, "from claude", "{kind}");
        assert!(outcome.fallback_used, "{kind}");
        assert_eq!(provider_error(outcome, 0).kind(), kind);
        assert!(events.contains(&RouteEvent::Fallback {
            from: PRIMARY.into(),
            to: FALLBACK.into(),
            reason: provider_error(outcome, 0).to_string(),
        }));
        assert_eq!((openai.calls(), anthropic.calls()), (1, 1), "{kind}");
        // An attempt that opened a stream may be billed: it is estimated; one that did not is free.
        let first = &outcome.attempts[0];
        assert_eq!(first.usage_estimated, opened, "{kind}");
        assert_eq!(first.cost > Cost::ZERO, opened, "{kind}");
        assert_eq!(outcome.cost_estimated, opened, "{kind}");
    }
}

fn coded(
    kind: ProviderKind,
    status: u16,
    error_type: &str,
    code: Option<&str>,
    message: &str,
) -> ProviderError {
    ProviderError::Http {
        provider: kind,
        status,
        error_type: Some(error_type.to_owned()),
        code: code.map(str::to_owned),
        message: message.into(),
        retry_after: None,
        request_id: None,
    }
}

#[tokio::test(start_paused = true)]
async fn request_errors_are_rejected_without_a_fallback() {
    let cases = [
        http_error(OPENAI, 400, None, None),
        http_error(OPENAI, 413, None, None),
        http_error(OPENAI, 422, None, None),
        coded(
            OPENAI,
            400,
            "invalid_request_error",
            Some("content_policy_violation"),
            "rejected by the safety system",
        ),
    ];
    for error in cases {
        let named = error.to_string();
        let openai = Fake::new(OPENAI, vec![vec![err(error)]]);
        let anthropic = Fake::new(ANTHROPIC, vec![ok(ANTHROPIC, FALLBACK, "unused")]);
        let events = collect(process(&router(&openai, &anthropic, config()))).await;
        let (error, outcome) = failed(&events);
        let RouteError::Rejected {
            model,
            error: cause,
            ..
        } = error
        else {
            panic!("{error:?}");
        };
        assert_eq!(model, PRIMARY);
        assert_eq!(cause.to_string(), named);
        assert_eq!((openai.calls(), anthropic.calls()), (1, 0), "{named}");
        assert_eq!(outcome.status, RouteStatus::Failed);
        assert_eq!(outcome.cost, Cost::ZERO);
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, RouteEvent::Fallback { .. }))
        );
        // The request was at fault, not the model.
        assert!(matches!(
            router(&openai, &anthropic, config()).circuit_state(PRIMARY),
            CircuitState::Closed { .. }
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn account_errors_go_to_the_fallback_at_once_and_disable_the_model() {
    let cases = [
        (http_error(OPENAI, 401, None, None), "auth"),
        (http_error(OPENAI, 403, None, None), "auth"),
        (http_error(OPENAI, 404, None, None), "not_found"),
        (
            http_error(OPENAI, 402, Some("billing_error"), None),
            "quota_exhausted",
        ),
        (
            http_error(OPENAI, 429, Some("insufficient_quota"), None),
            "quota_exhausted",
        ),
    ];
    for (error, kind) in cases {
        let openai = Fake::new(
            OPENAI,
            vec![vec![err(error)], ok(OPENAI, PRIMARY, "primary is back")],
        );
        let anthropic = Fake::new(
            ANTHROPIC,
            vec![
                ok(ANTHROPIC, FALLBACK, "one"),
                ok(ANTHROPIC, FALLBACK, "two"),
            ],
        );
        let settings = config();
        let cool_down = settings.breaker.account_cool_down;
        let routes = router(&openai, &anthropic, settings);
        let events = collect(process(&routes)).await;
        let outcome = finished(&events);
        assert_eq!(
            (outcome.model.as_deref(), outcome.text.as_str()),
            (Some(FALLBACK), "one"),
            "{kind}"
        );
        assert_eq!(provider_error(outcome, 0).kind(), kind);
        let times = [openai.call_times()[0], anthropic.call_times()[0]];
        assert_eq!(times[0], times[1], "{kind}: no backoff before the fallback");
        assert!(matches!(
            routes.circuit_state(PRIMARY),
            CircuitState::Open { reason: OpenReason::Account(k), .. } if k == kind
        ));
        // The next request skips the disabled model without calling it.
        let events = collect(process(&routes)).await;
        let outcome = finished(&events);
        assert_eq!(outcome.text, "two");
        assert_eq!(
            openai.calls(),
            1,
            "{kind}: the disabled model was not called"
        );
        let skipped = outcome.attempts[0].error.as_ref().unwrap();
        assert!(
            skipped.made_no_call() && skipped.to_string().contains("refused our account"),
            "{skipped}"
        );
        // After the cool-down one request probes it, and it serves again.
        tokio::time::advance(cool_down).await;
        let events = collect(process(&routes)).await;
        assert_eq!(finished(&events).text, "primary is back", "{kind}");
        assert!(matches!(
            routes.circuit_state(PRIMARY),
            CircuitState::Closed { .. }
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn a_blip_gets_one_quick_retry_of_the_same_model_before_the_fallback() {
    let quick = RouterConfig {
        same_model_retries: 1,
        ..config()
    };
    let refused = ProviderError::Connect {
        provider: OPENAI,
        url: "http://x".into(),
        message: "connection reset before the response".into(),
    };
    for first in [http(OPENAI, 500), http(OPENAI, 502), vec![err(refused)]] {
        let openai = Fake::new(OPENAI, vec![first, ok(OPENAI, PRIMARY, "second try")]);
        let anthropic = Fake::new(ANTHROPIC, vec![]);
        let events = collect(process(&router(&openai, &anthropic, quick.clone()))).await;
        let outcome = finished(&events);
        assert_eq!(outcome.text, "second try");
        assert!(!outcome.fallback_used);
        assert_eq!((openai.calls(), anthropic.calls()), (2, 0));
        let t = openai.call_times();
        assert!(t[1] - t[0] <= quick.quick_retry_delay, "{:?}", t[1] - t[0]);
    }
    // Twice in a row: then the fallback.
    let openai = Fake::new(OPENAI, vec![http(OPENAI, 500), http(OPENAI, 500)]);
    let anthropic = Fake::new(ANTHROPIC, vec![ok(ANTHROPIC, FALLBACK, "claude")]);
    let events = collect(process(&router(&openai, &anthropic, quick.clone()))).await;
    assert_eq!(finished(&events).text, "claude");
    assert_eq!((openai.calls(), anthropic.calls()), (2, 1));
    // An overload that asks us to wait, or a rate limit, is not a blip: straight to the fallback.
    for not_blip in [http(OPENAI, 529), http(OPENAI, 429), http(OPENAI, 503)] {
        let openai = Fake::new(OPENAI, vec![not_blip]);
        let anthropic = Fake::new(ANTHROPIC, vec![ok(ANTHROPIC, FALLBACK, "claude")]);
        let events = collect(process(&router(&openai, &anthropic, quick.clone()))).await;
        assert_eq!(finished(&events).text, "claude");
        assert_eq!((openai.calls(), anthropic.calls()), (1, 1));
    }
}

#[tokio::test(start_paused = true)]
async fn a_prompt_too_long_goes_only_to_a_model_with_a_larger_context_window() {
    // magicSpark: claude-sonnet-4-6 (1,000,000 tokens) → gpt-5.4 (1,050,000): worth a try.
    let too_long = coded(
        ANTHROPIC,
        400,
        "invalid_request_error",
        None,
        "prompt is too long: 1000200 tokens > 1000000 maximum",
    );
    let anthropic = Fake::new(ANTHROPIC, vec![vec![err(too_long)]]);
    let openai = Fake::new(OPENAI, vec![ok(OPENAI, "gpt-5.4", "it fits")]);
    let spark = router(&openai, &anthropic, config());
    let events = collect(spark.stream_process(Process::MagicSpark, request())).await;
    assert_eq!(finished(&events).text, "it fits");
    // logicArchitect: gpt-5.4 (1,050,000) → claude-sonnet-4-6 (1,000,000): no model can take it.
    let too_long = coded(
        OPENAI,
        400,
        "invalid_request_error",
        Some("context_length_exceeded"),
        "This model's maximum context length is 1050000 tokens.",
    );
    let openai = Fake::new(OPENAI, vec![vec![err(too_long)]]);
    let anthropic = Fake::new(ANTHROPIC, vec![ok(ANTHROPIC, FALLBACK, "unused")]);
    let events = collect(process(&router(&openai, &anthropic, config()))).await;
    let (error, _) = failed(&events);
    let RouteError::Rejected { error: cause, .. } = error else {
        panic!("{error:?}");
    };
    assert_eq!(cause.kind(), "context_too_long");
    assert_eq!(anthropic.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_provider_that_never_answers_headers_is_left_at_the_header_timeout() {
    let silent_config = RouterConfig {
        header_timeout: Duration::from_secs(1),
        ttft_timeout: Duration::from_secs(20),
        ..config()
    };
    let openai = Fake::new(OPENAI, vec![vec![Step::Hang]]);
    let anthropic = Fake::new(ANTHROPIC, vec![ok(ANTHROPIC, FALLBACK, "claude")]);
    let events = collect(process(&router(&openai, &anthropic, silent_config))).await;
    let outcome = finished(&events);
    assert_eq!(outcome.text, "claude");
    assert_eq!(provider_error(outcome, 0).kind(), "header_timeout");
    assert_eq!(openai.closed(), 1, "the silent connection was closed");
    let t = [openai.call_times()[0], anthropic.call_times()[0]];
    assert_eq!(t[1] - t[0], Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn the_total_deadline_ends_a_stream_that_drips_under_the_stall_timeout() {
    let drip_config = RouterConfig {
        stall_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(3),
        ..config()
    };
    let mut drip = vec![start(OPENAI, PRIMARY)];
    for _ in 0..100 {
        drip.push(delta("."));
        drip.push(Step::Wait(Duration::from_millis(900)));
    }
    let openai = Fake::new(OPENAI, vec![drip]);
    let anthropic = Fake::new(ANTHROPIC, vec![]);
    let started = Instant::now();
    let events = collect(process(&router(&openai, &anthropic, drip_config))).await;
    let (error, outcome) = failed(&events);
    let RouteError::MidStream { error: cause, .. } = error else {
        panic!("{error:?}");
    };
    assert_eq!(cause.kind(), "deadline");
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    assert_eq!(openai.closed(), 1);
    assert!(outcome.cost > Cost::ZERO, "what it sent is billed");
    // Before any content the deadline ends the route the same way, with its own error.
    let silent_config = RouterConfig {
        request_timeout: Duration::from_secs(2),
        ttft_timeout: Duration::from_secs(20),
        header_timeout: Duration::from_secs(20),
        ..config()
    };
    let openai = Fake::new(OPENAI, vec![vec![start(OPENAI, PRIMARY), Step::Hang]]);
    let events = collect(process(&router(&openai, &anthropic, silent_config))).await;
    let (error, _) = failed(&events);
    assert_eq!(error.kind(), "deadline_exceeded", "{error}");
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_before_the_same_model_is_called_again() {
    let openai = Fake::new(
        OPENAI,
        vec![
            vec![err(http_error(
                OPENAI,
                503,
                None,
                Some(Duration::from_secs(3)),
            ))],
            ok(OPENAI, PRIMARY, "second time lucky"),
        ],
    );
    let anthropic = Fake::new(ANTHROPIC, vec![http(ANTHROPIC, 500)]);
    let events = collect(process(&router(&openai, &anthropic, config()))).await;
    let outcome = finished(&events);
    assert_eq!(outcome.text, "second time lucky");
    assert_eq!(outcome.model.as_deref(), Some(PRIMARY));
    // The fallback was tried at once (different provider); the primary only after 3 s.
    let (o, a) = (openai.call_times(), anthropic.call_times());
    assert_eq!(a[0], o[0], "the switch to the fallback is immediate");
    assert!(o[1] - o[0] >= Duration::from_secs(3), "{:?}", o[1] - o[0]);
    assert!(o[1] - o[0] < Duration::from_secs(4), "{:?}", o[1] - o[0]);
    assert!(outcome.fallback_used);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_the_cap_skips_the_model() {
    let openai = Fake::new(
        OPENAI,
        vec![
            vec![err(http_error(
                OPENAI,
                429,
                Some("rate_limit_error"),
                Some(Duration::from_secs(120)),
            ))],
            ok(OPENAI, PRIMARY, "must not be called"),
        ],
    );
    let anthropic = Fake::new(
        ANTHROPIC,
        vec![http(ANTHROPIC, 500), ok(ANTHROPIC, FALLBACK, "claude")],
    );
    let began = Instant::now();
    let events = collect(process(&router(&openai, &anthropic, config()))).await;
    let outcome = finished(&events);
    assert_eq!(outcome.text, "claude");
    assert_eq!((openai.calls(), anthropic.calls()), (1, 2));
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "did not wait out the 120 s"
    );
    let models: Vec<&str> = outcome.attempts.iter().map(|a| a.model.as_str()).collect();
    assert_eq!(models, [PRIMARY, FALLBACK, FALLBACK]);
}

#[tokio::test(start_paused = true)]
async fn a_missed_first_token_deadline_falls_back() {
    let openai = Fake::new(
        OPENAI,
        vec![vec![
            start(OPENAI, PRIMARY),
            Step::Wait(Duration::from_secs(60)),
            delta("too late"),
            done(),
        ]],
    );
    let anthropic = Fake::new(ANTHROPIC, vec![ok(ANTHROPIC, FALLBACK, "on time")]);
    let began = Instant::now();
    let events = collect(process(&router(&openai, &anthropic, config()))).await;
    let outcome = finished(&events);
    assert_eq!(deltas(&events), "on time");
    assert!(matches!(
        provider_error(outcome, 0),
        ProviderError::FirstTokenTimeout { after, .. } if *after == Duration::from_secs(5)
    ));
    assert_eq!(anthropic.call_times()[0] - began, Duration::from_secs(5));
    assert_eq!(openai.closed(), 1, "the slow stream was dropped");
    let starts: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            RouteEvent::Start { model, attempt, .. } => Some((model.as_str(), *attempt)),
            _ => None,
        })
        .collect();
    assert_eq!(starts, [(PRIMARY, 1), (FALLBACK, 2)]);
    assert_eq!(outcome.ttft, Some(Duration::from_secs(5)));
    assert_eq!(outcome.attempts[1].ttft, Some(Duration::ZERO));
}

#[tokio::test(start_paused = true)]
async fn a_stall_after_content_fails_with_the_partial_text_and_an_estimated_cost() {
    let openai = Fake::new(
        OPENAI,
        vec![vec![
            start(OPENAI, PRIMARY),
            delta("Hello"),
            Step::Wait(Duration::from_secs(60)),
            delta(" world"),
            done(),
        ]],
    );
    let anthropic = Fake::new(ANTHROPIC, vec![ok(ANTHROPIC, FALLBACK, "unused")]);
    let events = collect(process(&router_without_rescue(
        &openai,
        &anthropic,
        config(),
    )))
    .await;
    let (error, outcome) = failed(&events);
    assert!(
        matches!(
            error,
            RouteError::MidStream {
                error: ProviderError::Stalled { .. },
                produced_chars: 5,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(deltas(&events), "Hello");
    assert_eq!(outcome.text, "Hello");
    assert!(outcome.cost_estimated && outcome.cost > Cost::ZERO);
    assert_eq!(outcome.usage.output, count_tokens("Hello"));
    assert_eq!(anthropic.calls(), 0, "no failover once content was sent");
    assert_eq!(openai.closed(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stall_is_counted_from_the_last_content_not_the_first_token_deadline() {
    let stall_config = RouterConfig {
        ttft_timeout: Duration::from_secs(10),
        stall_timeout: Duration::from_secs(4),
        ..config()
    };
    let openai = Fake::new(
        OPENAI,
        vec![vec![
            start(OPENAI, PRIMARY),
            delta("Hello"),
            Step::Wait(Duration::from_secs(3)),
            delta(" world"),
            Step::Wait(Duration::from_secs(60)),
            done(),
        ]],
    );
    let anthropic = Fake::new(ANTHROPIC, vec![]);
    let started = Instant::now();
    let events = collect(process(&router_without_rescue(
        &openai,
        &anthropic,
        stall_config,
    )))
    .await;
    let (error, _) = failed(&events);
    assert!(
        matches!(
            error,
            RouteError::MidStream {
                error: ProviderError::Stalled { .. },
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(deltas(&events), "Hello world");
    // Three seconds to the second delta, then the four of the stall timeout.
    assert_eq!(started.elapsed(), Duration::from_secs(7));
    assert_eq!(openai.closed(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cut_after_content_fails_with_an_estimated_cost() {
    let cut = ProviderError::Transport {
        provider: OPENAI,
        message: "connection reset".into(),
    };
    let scripts = [
        // Partial usage (prompt known), then the connection drops.
        vec![
            start(OPENAI, PRIMARY),
            usage(50, 0, 1),
            delta("Hello there friend"),
            err(cut.clone()),
        ],
        // The stream just ends after content.
        vec![start(OPENAI, PRIMARY), delta("Hello there friend")],
    ];
    for (i, script) in scripts.into_iter().enumerate() {
        let openai = Fake::new(OPENAI, vec![script]);
        let anthropic = Fake::new(ANTHROPIC, vec![]);
        let events = collect(process(&router_without_rescue(
            &openai,
            &anthropic,
            config(),
        )))
        .await;
        let (error, outcome) = failed(&events);
        assert_eq!(error.kind(), "mid_stream");
        let attempt = &outcome.attempts[0];
        assert!(attempt.usage_estimated, "case {i}");
        assert_eq!(
            attempt.usage.output,
            count_tokens("Hello there friend"),
            "case {i}"
        );
        if i == 0 {
            assert_eq!(attempt.usage.input, 50, "the reported prompt count is kept");
            assert_eq!(provider_error(outcome, 0), &cut);
        } else {
            assert!(attempt.usage.input > 0);
            assert_eq!(provider_error(outcome, 0).kind(), "truncated");
        }
        assert_eq!(outcome.text, "Hello there friend");
        assert!(
            outcome.cost_estimated && outcome.cost == attempt.cost && attempt.cost > Cost::ZERO
        );
        assert_eq!(anthropic.calls(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_skips_half_opens_and_closes() {
    let openai = Fake::new(
        OPENAI,
        vec![
            http(OPENAI, 500),
            http(OPENAI, 500),
            http(OPENAI, 500), // the first half-open trial fails
            ok(OPENAI, PRIMARY, "healthy again"),
        ],
    );
    let anthropic = Fake::new(ANTHROPIC, vec![ok(ANTHROPIC, FALLBACK, "claude")]);
    let config = RouterConfig {
        max_attempts: 1,
        breaker: BreakerConfig {
            failure_threshold: 2,
            cool_down: Duration::from_secs(60),
            ..BreakerConfig::default()
        },
        ..config()
    };
    let router = router(&openai, &anthropic, config);
    let direct = || router.stream_model(PRIMARY, request()).unwrap();

    for _ in 0..2 {
        let events = collect(direct()).await;
        assert_eq!(failed(&events).0.kind(), "all_attempts_failed");
    }
    assert!(matches!(
        router.circuit_state(PRIMARY),
        CircuitState::Open { .. }
    ));

    // Open: the primary is skipped without a call and the fallback serves.
    let events = collect(process(&router)).await;
    let outcome = finished(&events);
    assert_eq!(outcome.text, "claude");
    assert_eq!(openai.calls(), 2);
    let skipped = &outcome.attempts[0];
    assert_eq!(skipped.cost, Cost::ZERO);
    let message = skipped.error.as_ref().unwrap().to_string();
    assert!(
        message.starts_with("circuit open for model gpt-5.4 until "),
        "{message}"
    );
    assert!(events.contains(&RouteEvent::Fallback {
        from: PRIMARY.into(),
        to: FALLBACK.into(),
        reason: message,
    }));

    // After the cool-down one trial goes through; it fails, so the breaker reopens.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let events = collect(direct()).await;
    failed(&events);
    assert_eq!(openai.calls(), 3);
    assert!(matches!(
        router.circuit_state(PRIMARY),
        CircuitState::Open { .. }
    ));
    let events = collect(direct()).await;
    assert!(matches!(
        failed(&events).1.attempts[0].error,
        Some(AttemptError::CircuitOpen { .. })
    ));
    assert_eq!(openai.calls(), 3);

    // Next cool-down: the trial succeeds and closes it.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let events = collect(direct()).await;
    assert_eq!(finished(&events).text, "healthy again");
    assert_eq!(
        router.circuit_state(PRIMARY),
        CircuitState::Closed {
            consecutive_failures: 0
        }
    );
}

#[tokio::test(start_paused = true)]
async fn an_empty_retry_budget_stops_retries() {
    let openai = Fake::new(
        OPENAI,
        vec![
            http(OPENAI, 500),
            http(OPENAI, 500),
            ok(OPENAI, PRIMARY, "retried"),
        ],
    );
    let anthropic = Fake::new(ANTHROPIC, vec![]);
    let config = RouterConfig {
        // One retry per two requests, no reserve.
        budget: RetryBudgetConfig {
            ttl: Duration::from_secs(10),
            min_per_sec: 0,
            retry_ratio: 0.5,
        },
        ..config()
    };
    let router = router(&openai, &anthropic, config);
    let events = collect(router.stream_model(PRIMARY, request()).unwrap()).await;
    let (error, outcome) = failed(&events);
    assert_eq!(error.kind(), "retry_budget_exhausted");
    assert!(error.to_string().contains("retry budget"), "{error}");
    assert_eq!(outcome.attempts.len(), 1);
    assert_eq!(openai.calls(), 1);
    // A second request deposits enough for one retry.
    let events = collect(router.stream_model(PRIMARY, request()).unwrap()).await;
    assert_eq!(finished(&events).text, "retried");
    assert_eq!(openai.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn when_everything_fails_the_error_lists_every_attempt_in_order() {
    let openai = Fake::new(OPENAI, vec![http(OPENAI, 500), http(OPENAI, 502)]);
    let anthropic = Fake::new(ANTHROPIC, vec![http(ANTHROPIC, 503), http(ANTHROPIC, 529)]);
    let events = collect(process(&router(&openai, &anthropic, config()))).await;
    let (error, outcome) = failed(&events);
    let RouteError::AllAttemptsFailed { attempts } = error else {
        panic!("{error:?}");
    };
    let tried: Vec<(&str, ProviderKind, String)> = attempts
        .iter()
        .map(|(m, p, e)| (m.as_str(), *p, e.to_string()))
        .collect();
    assert_eq!(
        tried,
        [
            (
                PRIMARY,
                OPENAI,
                "openai answered HTTP 500: scripted".to_owned()
            ),
            (
                FALLBACK,
                ANTHROPIC,
                "anthropic answered HTTP 503: scripted".to_owned()
            ),
            (
                PRIMARY,
                OPENAI,
                "openai answered HTTP 502: scripted".to_owned()
            ),
            (
                FALLBACK,
                ANTHROPIC,
                "anthropic answered HTTP 529: scripted".to_owned()
            ),
        ]
    );
    let message = error.to_string();
    let positions: Vec<usize> = ["#1 gpt-5.4", "#2 claude", "#3 gpt-5.4", "#4 claude"]
        .iter()
        .map(|s| {
            message
                .find(s)
                .unwrap_or_else(|| panic!("{s} missing: {message}"))
        })
        .collect();
    assert!(positions.is_sorted(), "{message}");
    assert_eq!(outcome.attempts.len(), 4);
    assert_eq!(outcome.cost, Cost::ZERO);
    assert_eq!(
        outcome.model.as_deref(),
        Some(FALLBACK),
        "the last one tried"
    );
}

#[tokio::test(start_paused = true)]
async fn reported_usage_is_costed_exactly() {
    let openai = Fake::new(
        OPENAI,
        vec![vec![
            start(OPENAI, PRIMARY),
            delta("Hi"),
            delta(" there"),
            usage(1000, 400, 200),
            done(),
        ]],
    );
    let anthropic = Fake::new(ANTHROPIC, vec![]);
    let events = collect(process(&router(&openai, &anthropic, config()))).await;
    let outcome = finished(&events);
    // gpt-5.4: 600 × $2.50 + 400 × $0.25 + 200 × $15 per MTok = $0.004600.
    assert_eq!(outcome.cost, Cost::from_micro_usd(4600));
    assert!(!outcome.cost_estimated);
    assert_eq!(outcome.usage.output, 200);
    assert_eq!(outcome.text, "Hi there");
    assert_eq!(outcome.finish_reason, Some(FinishReason::Stop));
    assert_eq!(outcome.provider, Some(OPENAI));
    assert!(!outcome.fallback_used);
    assert_eq!(outcome.attempts.len(), 1);
    // The process's defaults reached the provider.
    let sent = openai.calls.lock().unwrap()[0].1.clone();
    assert_eq!(sent.max_output_tokens, 8192);
    assert_eq!(sent.temperature, Some(0.2));
}

#[derive(Default)]
struct Collect(Mutex<Vec<RouteOutcome>>);

impl RouteObserver for Collect {
    fn on_cancelled(&self, outcome: RouteOutcome) {
        self.0.lock().unwrap().push(outcome);
    }
}

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_cancels_the_call_and_reports_to_the_observer() {
    let openai = Fake::new(OPENAI, vec![http(OPENAI, 500)]);
    let anthropic = Fake::new(
        ANTHROPIC,
        vec![vec![
            start(ANTHROPIC, FALLBACK),
            delta("partial answer"),
            Step::Hang,
        ]],
    );
    let observer = Arc::new(Collect::default());
    let router = router(&openai, &anthropic, config());
    let mut stream = observed(&router, &observer);
    while let Some(event) = stream.next().await {
        if matches!(event, RouteEvent::Delta(_)) {
            break;
        }
    }
    assert_eq!(anthropic.closed(), 0);
    drop(stream);
    assert_eq!(anthropic.closed(), 1, "the provider stream was dropped");
    let outcomes = observer.0.lock().unwrap();
    let [outcome] = outcomes.as_slice() else {
        panic!("expected one cancelled outcome, got {outcomes:?}");
    };
    assert_eq!(outcome.status, RouteStatus::Cancelled);
    assert_eq!(outcome.text, "partial answer");
    assert_eq!(outcome.attempts.len(), 2);
    assert_eq!(outcome.attempts[0].cost, Cost::ZERO);
    let cancelled = &outcome.attempts[1];
    assert_eq!(cancelled.error, Some(AttemptError::Cancelled));
    assert!(cancelled.usage_estimated && cancelled.cost > Cost::ZERO);
    assert_eq!(outcome.cost, cancelled.cost);
    assert!(outcome.fallback_used && outcome.cost_estimated);
}

#[tokio::test(start_paused = true)]
async fn a_route_that_ends_normally_does_not_call_the_observer() {
    let openai = Fake::new(OPENAI, vec![ok(OPENAI, PRIMARY, "done")]);
    let anthropic = Fake::new(ANTHROPIC, vec![]);
    let observer = Arc::new(Collect::default());
    let router = router(&openai, &anthropic, config());
    let events = collect(observed(&router, &observer)).await;
    finished(&events);
    assert!(observer.0.lock().unwrap().is_empty());
}

/// A process route with `observer` as its own cancellation observer.
fn observed(router: &Router, observer: &Arc<Collect>) -> RouteStream {
    let observer: Arc<dyn RouteObserver> = observer.clone();
    router.open_process(
        Process::LogicArchitect,
        request(),
        RouteOptions::default(),
        Some(observer),
    )
}

#[tokio::test(start_paused = true)]
async fn stream_model_rejects_unknown_and_unconfigured_models() {
    let anthropic = Fake::new(ANTHROPIC, vec![ok(ANTHROPIC, FALLBACK, "claude")]);
    let router = Router::new(
        Arc::new(Catalog::embedded().unwrap()),
        Providers::new().with(ANTHROPIC, anthropic.clone()),
        config(),
    );
    let Err(error) = router.stream_model("gpt-9-ultra", request()) else {
        panic!("an unknown model must be rejected");
    };
    assert_eq!(error.kind(), "unknown_model");
    assert!(error.to_string().contains("\"gpt-9-ultra\""), "{error}");
    let Err(error) = router.stream_model(PRIMARY, request()) else {
        panic!("a model without a provider must be rejected");
    };
    assert!(
        matches!(
            error,
            RouteError::NoProvider {
                provider: OPENAI,
                ..
            }
        ),
        "{error:?}"
    );

    // A process whose primary provider is missing goes straight to the fallback and says why.
    let events = collect(process(&router)).await;
    assert_eq!(finished(&events).text, "claude");
    assert!(
        matches!(&events[0], RouteEvent::Fallback { reason, .. } if reason.contains("not configured"))
    );
}
