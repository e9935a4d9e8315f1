//! The router over real HTTP: the OpenAI and Anthropic client code against the simulator on
//! loopback. For each provider as primary: exact usage and cost (cached tokens included),
//! fallback before the first token on 429/500/529/connect refused/TTFT timeout, no retry on
//! 400/401, `retry-after` honoured, a cut and a stall after content ending in an explicit error
//! with an estimated cost when the mid-stream policy is off, and the circuit breaker opening and
//! recovering.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agents::Process;
use futures::StreamExt;
use keyvex_engine::catalog::{Catalog, RescuePolicy};
use keyvex_engine::cost::cost;
use keyvex_engine::provider::anthropic::AnthropicProvider;
use keyvex_engine::provider::openai::OpenAiProvider;
use keyvex_engine::provider::{ApiKey, ChatMessage, ProviderConfig};
use keyvex_engine::router::{
    BreakerConfig, CircuitState, Providers, RouteEvent, RouteFailure, RouteOutcome, RouteRequest,
    Router, RouterConfig,
};
use keyvex_engine::stream::ProviderKind;
use keyvex_engine::tokenize::{count_prompt_tokens, count_tokens};
use keyvex_sim::{self as sim, Fault, Rule, SimConfig, SimHandle};
use keyvex_testkit::process_with_primary;

struct Setup {
    sim: SimHandle,
    router: Router,
    catalog: Arc<Catalog>,
}

fn provider_config(base_url: String) -> ProviderConfig {
    ProviderConfig {
        base_url,
        api_key: ApiKey::new("test-key"),
        connect_timeout: Duration::from_secs(2),
        max_event_bytes: keyvex_engine::provider::DEFAULT_MAX_EVENT_BYTES,
    }
}

async fn setup_with(
    config: RouterConfig,
    openai_url: Option<String>,
    anthropic_url: Option<String>,
) -> Setup {
    setup_on(
        config,
        openai_url,
        anthropic_url,
        Catalog::embedded().unwrap(),
    )
    .await
}

async fn setup_on(
    config: RouterConfig,
    openai_url: Option<String>,
    anthropic_url: Option<String>,
    catalog: Catalog,
) -> Setup {
    let sim = sim::start(SocketAddr::from(([127, 0, 0, 1], 0)), SimConfig::fast(7))
        .await
        .unwrap();
    let catalog = Arc::new(catalog);
    let openai = OpenAiProvider::new(&provider_config(
        openai_url.unwrap_or_else(|| sim.base_url()),
    ))
    .unwrap();
    let anthropic = AnthropicProvider::new(&provider_config(
        anthropic_url.unwrap_or_else(|| sim.base_url()),
    ))
    .unwrap();
    let providers = Providers::new()
        .with(ProviderKind::OpenAi, Arc::new(openai))
        .with(ProviderKind::Anthropic, Arc::new(anthropic));
    let router = Router::new(catalog.clone(), providers, config);
    Setup {
        sim,
        router,
        catalog,
    }
}

async fn setup(config: RouterConfig) -> Setup {
    setup_with(config, None, None).await
}

fn fast_config() -> RouterConfig {
    RouterConfig {
        ttft_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(5),
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(50),
        ..RouterConfig::default()
    }
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

/// Runs a route to its terminal event; returns deltas seen and the terminal result.
async fn run(
    router: &Router,
    process: Process,
    req: RouteRequest,
) -> (String, Result<RouteOutcome, RouteFailure>, Vec<RouteEvent>) {
    let mut stream = router.stream_process(process, req);
    let mut text = String::new();
    let mut events = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev {
            RouteEvent::Delta(t) => text.push_str(&t),
            RouteEvent::Finished(o) => return (text, Ok(*o), events),
            RouteEvent::Failed(f) => return (text, Err(*f), events),
            other => events.push(other),
        }
    }
    panic!("route ended without a terminal event");
}

fn primary_and_fallback(s: &Setup, process: Process) -> (String, String) {
    let r = s.catalog.route(process);
    (r.primary.clone(), r.fallback.clone())
}

fn rule(model: &str, fault: Fault, times: u32) -> Rule {
    Rule {
        model: Some(model.to_owned()),
        protocol: None,
        fault,
        times: Some(times),
    }
}

#[tokio::test]
async fn normal_stream_has_exact_usage_and_cost_with_cached_tokens() {
    for kind in ProviderKind::ALL {
        let s = setup(fast_config()).await;
        let process = process_with_primary(kind);
        let (primary, _) = primary_and_fallback(&s, process);
        s.sim
            .push_rule(rule(&primary, Fault::CachedPromptTokens(8), 1));
        let req = request();
        let (text, result, _) = run(&s.router, process, req.clone()).await;
        let o = result.unwrap_or_else(|f| panic!("{kind}: {}", f.error));
        assert_eq!(o.provider, Some(kind));
        assert_eq!(o.model.as_deref(), Some(primary.as_str()));
        assert!(!o.fallback_used);
        assert!(
            !o.cost_estimated,
            "{kind}: usage was reported, cost must be exact"
        );
        assert_eq!(o.text, text);
        assert_eq!(
            o.usage.output,
            count_tokens(&text),
            "{kind}: output tokens match the text"
        );
        let prompt = count_prompt_tokens(req.system.as_deref(), &req.messages);
        assert_eq!(
            o.usage.input, prompt,
            "{kind}: normalised input is the whole prompt"
        );
        assert_eq!(o.usage.cached_input, 8, "{kind}: cached tokens");
        let pricing = s.catalog.model(&primary).unwrap().pricing;
        assert_eq!(
            o.cost,
            cost(&o.usage, &pricing),
            "{kind}: cost is usage × price"
        );
        assert!(o.ttft.is_some());
        s.sim.shutdown().await;
    }
}

#[tokio::test]
async fn falls_back_before_the_first_token_on_retryable_http_errors() {
    for kind in ProviderKind::ALL {
        let process = process_with_primary(kind);
        // Not blips: a rate limit or an overload goes straight to the fallback (a plain 500 gets
        // a quick retry of the same model first, see `provider_faults`).
        for status in [429u16, 503, 529] {
            let s = setup(fast_config()).await;
            let (primary, fallback) = primary_and_fallback(&s, process);
            s.sim.push_rule(rule(
                &primary,
                Fault::Http {
                    status,
                    retry_after: None,
                },
                1,
            ));
            let (text, result, events) = run(&s.router, process, request()).await;
            let o = result.unwrap_or_else(|f| panic!("{kind} {status}: {}", f.error));
            assert!(o.fallback_used, "{kind} {status}");
            assert_eq!(o.model.as_deref(), Some(fallback.as_str()));
            assert!(!text.is_empty());
            assert!(
                events.iter().any(|e| matches!(e, RouteEvent::Fallback { from, to, .. } if *from == primary && *to == fallback)),
                "{kind} {status}: a Fallback event names both models"
            );
            let first = &o.attempts[0];
            assert_eq!(first.model, primary);
            assert!(first.error.is_some());
            assert_eq!(first.cost.pico_usd(), 0, "an HTTP error consumed no tokens");
            s.sim.shutdown().await;
        }
    }
}

#[tokio::test]
async fn falls_back_when_the_primary_refuses_connections() {
    // A port that was just free: nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dead = format!("http://{closed}/v1");
    for kind in ProviderKind::ALL {
        let (openai, anthropic) = match kind {
            ProviderKind::OpenAi => (Some(dead.clone()), None),
            ProviderKind::Anthropic => (None, Some(dead.clone())),
        };
        let s = setup_with(fast_config(), openai, anthropic).await;
        let process = process_with_primary(kind);
        let (_, fallback) = primary_and_fallback(&s, process);
        let (_, result, _) = run(&s.router, process, request()).await;
        let o = result.unwrap_or_else(|f| panic!("{kind}: {}", f.error));
        assert_eq!(o.model.as_deref(), Some(fallback.as_str()));
        assert_eq!(o.attempts[0].error.as_ref().unwrap().kind(), "connect");
        s.sim.shutdown().await;
    }
}

#[tokio::test]
async fn falls_back_when_the_first_token_is_too_slow() {
    for kind in ProviderKind::ALL {
        let config = RouterConfig {
            ttft_timeout: Duration::from_millis(300),
            ..fast_config()
        };
        let s = setup(config).await;
        let process = process_with_primary(kind);
        let (primary, fallback) = primary_and_fallback(&s, process);
        s.sim.push_rule(rule(
            &primary,
            Fault::SlowFirstToken(Duration::from_secs(10)),
            1,
        ));
        let started = Instant::now();
        let (_, result, _) = run(&s.router, process, request()).await;
        let o = result.unwrap_or_else(|f| panic!("{kind}: {}", f.error));
        assert_eq!(o.model.as_deref(), Some(fallback.as_str()));
        assert_eq!(o.attempts[0].error.as_ref().unwrap().kind(), "ttft_timeout");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "did not wait for the slow model"
        );
        // The abandoned slow stream is closed, not left running.
        assert!(s.sim.wait_for_disconnects(1, Duration::from_secs(5)).await);
        s.sim.shutdown().await;
    }
}

#[tokio::test]
async fn a_400_is_final_and_a_401_goes_to_the_fallback() {
    for kind in ProviderKind::ALL {
        let s = setup(fast_config()).await;
        let process = process_with_primary(kind);
        let (primary, fallback) = primary_and_fallback(&s, process);
        s.sim.push_rule(rule(
            &primary,
            Fault::Http {
                status: 400,
                retry_after: None,
            },
            1,
        ));
        let (_, result, _) = run(&s.router, process, request()).await;
        let f = result.expect_err("a 400 is about the request: final");
        assert_eq!(f.error.kind(), "rejected", "{kind}");
        assert_eq!(f.outcome.attempts.len(), 1, "{kind}: exactly one attempt");
        assert_eq!(s.sim.stats().requests_total, 1, "{kind}: one HTTP request");
        assert!(f.error.to_string().contains("400"), "{kind}: {}", f.error);

        // A 401 is about our key for that provider: the fallback (other provider) answers.
        s.sim.push_rule(rule(
            &primary,
            Fault::Http {
                status: 401,
                retry_after: None,
            },
            1,
        ));
        let (_, result, _) = run(&s.router, process, request()).await;
        let o = result.unwrap_or_else(|f| panic!("{kind}: {}", f.error));
        assert_eq!(o.model.as_deref(), Some(fallback.as_str()), "{kind}");
        assert_eq!(o.attempts[0].error.as_ref().unwrap().kind(), "auth");
        s.sim.shutdown().await;
    }
}

#[tokio::test]
async fn honours_retry_after_before_calling_a_model_again() {
    for kind in ProviderKind::ALL {
        let s = setup(fast_config()).await;
        let process = process_with_primary(kind);
        let (primary, fallback) = primary_and_fallback(&s, process);
        let wait = Duration::from_millis(1200);
        s.sim.push_rule(rule(
            &primary,
            Fault::Http {
                status: 429,
                retry_after: Some(wait),
            },
            1,
        ));
        s.sim.push_rule(rule(
            &fallback,
            Fault::Http {
                status: 503,
                retry_after: None,
            },
            1,
        ));
        let started = Instant::now();
        let (_, result, _) = run(&s.router, process, request()).await;
        let o = result.unwrap_or_else(|f| panic!("{kind}: {}", f.error));
        assert_eq!(
            o.model.as_deref(),
            Some(primary.as_str()),
            "third attempt is the primary again"
        );
        assert_eq!(o.attempts.len(), 3);
        // retry-after is whole seconds on the wire for Anthropic and ms for OpenAI's -ms header;
        // either way the router may not call the primary again before it elapsed.
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{kind}: retried after {:?}",
            started.elapsed()
        );
        s.sim.shutdown().await;
    }
}

/// With the catalog's mid-stream policy `off`, a broken stream is not rescued (the default
/// policies, which are, are tested in `mid_stream_rescue`).
#[tokio::test]
async fn a_cut_or_stall_after_content_ends_in_an_explicit_error_with_estimated_cost() {
    for kind in ProviderKind::ALL {
        for fault in [
            Fault::CutAfter { tokens: 6 },
            Fault::StallAfter {
                tokens: 6,
                stall: Duration::from_secs(30),
            },
        ] {
            let config = RouterConfig {
                stall_timeout: Duration::from_millis(400),
                ..fast_config()
            };
            let off = Catalog::embedded().unwrap().with_rescue(RescuePolicy::OFF);
            let s = setup_on(config, None, None, off).await;
            let process = process_with_primary(kind);
            let (primary, _) = primary_and_fallback(&s, process);
            s.sim.push_rule(rule(&primary, fault.clone(), 1));
            let (text, result, _) = run(&s.router, process, request()).await;
            let f = result.expect_err("a broken stream after content must not end cleanly");
            assert!(
                !text.is_empty(),
                "{kind} {fault:?}: content was relayed before the failure"
            );
            assert_eq!(f.outcome.text, text);
            assert_eq!(f.outcome.attempts.len(), 1, "no failover after content");
            assert!(
                f.outcome.cost_estimated,
                "{kind} {fault:?}: cost is an estimate"
            );
            assert!(
                f.outcome.cost.pico_usd() > 0,
                "{kind} {fault:?}: the partial answer is costed"
            );
            assert_eq!(
                f.error.kind(),
                "mid_stream",
                "{kind} {fault:?}: {}",
                f.error
            );
            s.sim.shutdown().await;
        }
    }
}

#[tokio::test]
async fn circuit_breaker_opens_and_recovers() {
    for kind in ProviderKind::ALL {
        let config = RouterConfig {
            breaker: BreakerConfig {
                failure_threshold: 2,
                cool_down: Duration::from_millis(400),
                ..BreakerConfig::default()
            },
            ..fast_config()
        };
        let s = setup(config).await;
        let process = process_with_primary(kind);
        let (primary, fallback) = primary_and_fallback(&s, process);
        s.sim.push_rule(rule(
            &primary,
            Fault::Http {
                status: 500,
                retry_after: None,
            },
            2,
        ));
        for _ in 0..2 {
            let (_, result, _) = run(&s.router, process, request()).await;
            assert_eq!(result.unwrap().model.as_deref(), Some(fallback.as_str()));
        }
        assert!(matches!(
            s.router.circuit_state(&primary),
            CircuitState::Open { .. }
        ));
        let before = s.sim.stats().requests_total;
        let (_, result, _) = run(&s.router, process, request()).await;
        let o = result.unwrap();
        assert_eq!(o.model.as_deref(), Some(fallback.as_str()));
        assert_eq!(
            s.sim.stats().requests_total,
            before + 1,
            "an open circuit makes no call to the primary"
        );
        assert_eq!(o.attempts[0].error.as_ref().unwrap().kind(), "circuit_open");

        tokio::time::sleep(Duration::from_millis(450)).await;
        let (_, result, _) = run(&s.router, process, request()).await;
        assert_eq!(
            result.unwrap().model.as_deref(),
            Some(primary.as_str()),
            "half-open trial succeeds"
        );
        assert!(matches!(
            s.router.circuit_state(&primary),
            CircuitState::Closed { .. }
        ));
        s.sim.shutdown().await;
    }
}
