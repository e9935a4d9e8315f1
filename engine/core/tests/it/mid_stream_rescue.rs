//! Streams that break after content, rescued over real HTTP against the simulator, on both wire
//! protocols and for each way a stream breaks (a cut with FIN, a reset with RST, a stall, an
//! in-stream error): a process's route restarts the answer on the next model, a call on one
//! model continues the text already sent (as an assistant prefill where the model takes one,
//! else with the continuation instruction) without repeating or losing anything at the seam.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keyvex_engine::catalog::{Catalog, MidStreamFailover, RescuePolicy};
use keyvex_engine::provider::anthropic::AnthropicProvider;
use keyvex_engine::provider::openai::OpenAiProvider;
use keyvex_engine::provider::{ApiKey, ChatMessage, ProviderConfig, Role};
use keyvex_engine::router::{
    CONTINUE_INSTRUCTION, Providers, Rescue, RouteEvent, RouteFailure, RouteOutcome, RouteRequest,
    RouteStream, Router, RouterConfig,
};
use keyvex_engine::stream::{ProviderKind, Usage};
use keyvex_sim::{self as sim, Fault, Rule, SimConfig, SimHandle};
use keyvex_testkit::process_with_primary;

struct Setup {
    sim: SimHandle,
    router: Router,
    catalog: Arc<Catalog>,
}

async fn setup(catalog: Catalog) -> Setup {
    let sim = sim::start(SocketAddr::from(([127, 0, 0, 1], 0)), SimConfig::fast(11))
        .await
        .unwrap();
    let config = |base_url: String| ProviderConfig {
        base_url,
        api_key: ApiKey::new("test-key"),
        connect_timeout: Duration::from_secs(2),
        max_event_bytes: keyvex_engine::provider::DEFAULT_MAX_EVENT_BYTES,
    };
    let providers = Providers::new()
        .with(
            ProviderKind::OpenAi,
            Arc::new(OpenAiProvider::new(&config(sim.base_url())).unwrap()),
        )
        .with(
            ProviderKind::Anthropic,
            Arc::new(AnthropicProvider::new(&config(sim.base_url())).unwrap()),
        );
    let catalog = Arc::new(catalog);
    let router = Router::new(
        catalog.clone(),
        providers,
        RouterConfig {
            ttft_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_millis(400),
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_millis(50),
            ..RouterConfig::default()
        },
    );
    Setup {
        sim,
        router,
        catalog,
    }
}

/// Every way a stream can break after it has sent content.
fn faults() -> Vec<Fault> {
    vec![
        Fault::CutAfter { tokens: 6 },
        Fault::ResetAfter { tokens: 6 },
        Fault::StallAfter {
            tokens: 6,
            stall: Duration::from_secs(30),
        },
        Fault::InStreamError {
            after_tokens: 6,
            error_type: "overloaded_error".into(),
        },
    ]
}

fn request() -> RouteRequest {
    RouteRequest {
        system: Some("You are terse.".into()),
        messages: vec![ChatMessage::user(
            "Describe a savings calculator for freelancers.",
        )],
        ..RouteRequest::default()
    }
}

/// Every event of a route, in order, and its terminal result.
async fn drain(mut stream: RouteStream) -> (Vec<RouteEvent>, Result<RouteOutcome, RouteFailure>) {
    let mut events = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev {
            RouteEvent::Finished(o) => return (events, Ok(*o)),
            RouteEvent::Failed(f) => return (events, Err(*f)),
            other => events.push(other),
        }
    }
    panic!("route ended without a terminal event");
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

fn rescues(events: &[RouteEvent]) -> Vec<(usize, &Rescue)> {
    events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            RouteEvent::Rescue(r) => Some((i, &**r)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_process_stream_broken_after_content_is_restarted_on_the_fallback() {
    for kind in ProviderKind::ALL {
        for fault in faults() {
            let s = setup(Catalog::embedded().unwrap()).await;
            let process = process_with_primary(kind);
            let route = s.catalog.route(process).clone();
            s.sim
                .push_rule(Rule::once_on(&route.primary, fault.clone()));
            let (events, result) = drain(s.router.stream_process(process, request())).await;
            let o = result.unwrap_or_else(|f| panic!("{kind} {fault:?}: {}", f.error));
            let found = rescues(&events);
            assert_eq!(found.len(), 1, "{kind} {fault:?}: {events:?}");
            let (at, rescue) = found[0];
            assert_eq!(rescue.mode, MidStreamFailover::Restart);
            assert_eq!(
                (rescue.from.as_str(), rescue.to.as_str()),
                (route.primary.as_str(), route.fallback.as_str())
            );
            // What came before the restart is what the broken stream delivered; after it, the
            // answer from nothing.
            let before = deltas(&events[..at]);
            assert!(
                !before.is_empty(),
                "{kind} {fault:?}: content came before the break"
            );
            assert_eq!(rescue.delivered_bytes, before.len());
            assert_eq!(deltas(&events[at..]), o.text, "{kind} {fault:?}");
            assert_eq!(o.model.as_deref(), Some(route.fallback.as_str()));
            assert_eq!(o.rescues.len(), 1);
            // Both calls billed: the broken one with what it delivered, estimated where its
            // usage never came.
            assert_eq!(o.attempts.len(), 2);
            let broken = &o.attempts[0];
            assert!(broken.error.is_some(), "{kind} {fault:?}");
            assert!(
                broken.cost.pico_usd() > 0,
                "{kind} {fault:?}: the broken call is billed"
            );
            assert!(broken.usage.output > 0);
            if !matches!(fault, Fault::InStreamError { .. }) {
                assert!(
                    broken.usage_estimated,
                    "{kind} {fault:?}: no usage came, so estimated"
                );
            }
            assert!(o.cost_estimated || !broken.usage_estimated);
            assert_eq!(o.cost, broken.cost + o.attempts[1].cost);
            assert_eq!(o.usage, o.attempts[1].usage, "the answer's own usage");
            s.sim.shutdown().await;
        }
    }
}

/// The canonical answer of `model` to `request()`: what an unbroken stream sends.
async fn canonical(s: &Setup, model: &str) -> String {
    let (events, result) = drain(s.router.stream_model(model, request()).unwrap()).await;
    result.unwrap_or_else(|f| panic!("{model}: {}", f.error));
    deltas(&events)
}

#[tokio::test]
async fn a_chat_stream_broken_after_content_is_continued_with_nothing_repeated_or_lost() {
    // An OpenAI model and an Anthropic one without prefill (continued by instruction, which the
    // simulator answers by restating the last words, as models do), and one with prefill.
    for model in ["gpt-5.4-mini", "claude-sonnet-4-6", "claude-haiku-4-5"] {
        for fault in faults() {
            let s = setup(Catalog::embedded().unwrap()).await;
            let prefill = s.catalog.model(model).unwrap().prefill;
            let whole = canonical(&s, model).await;
            s.sim.push_rule(Rule::once_on(model, fault.clone()));
            let (events, result) = drain(s.router.stream_model(model, request()).unwrap()).await;
            let o = result.unwrap_or_else(|f| panic!("{model} {fault:?}: {}", f.error));
            let found = rescues(&events);
            assert_eq!(found.len(), 1, "{model} {fault:?}: {events:?}");
            let (at, rescue) = found[0];
            assert_eq!(rescue.mode, MidStreamFailover::Continue);
            assert_eq!((rescue.from.as_str(), rescue.to.as_str()), (model, model));
            assert!(!deltas(&events[..at]).is_empty());
            assert_eq!(
                deltas(&events),
                whole,
                "{model} {fault:?}: one answer, seam trimmed"
            );
            assert_eq!(o.text, whole);
            // Usage is the sum of both calls; each is billed on its own.
            assert_eq!(o.attempts.len(), 2);
            let mut sum = Usage::default();
            sum.add(&o.attempts[0].usage);
            sum.add(&o.attempts[1].usage);
            assert_eq!(o.usage, sum, "{model} {fault:?}");
            assert_eq!(o.cost, o.attempts[0].cost + o.attempts[1].cost);
            // The instructed continuation restated the last words, and the seam dropped them;
            // a prefilled one went on exactly where the text stopped.
            let generated = o.attempts[0].output_chars + o.attempts[1].output_chars;
            if prefill {
                assert_eq!(generated, whole.chars().count(), "{model} {fault:?}");
            } else {
                assert!(
                    generated > whole.chars().count() + 8,
                    "{model} {fault:?}: nothing was trimmed"
                );
            }
            // What the continuation call was sent.
            let seen = s.sim.requests();
            let last = seen.last().unwrap();
            // Its output cap is what the first call's left: the whole answer keeps one cap.
            let first_cap = seen[seen.len() - 2].max_tokens.unwrap();
            let cap = last.max_tokens.unwrap();
            assert!(cap < first_cap, "{model} {fault:?}: {cap} of {first_cap}");
            let tail = last.messages.last().unwrap();
            if prefill {
                assert_eq!(tail.role, Role::Assistant, "{model}: a prefill");
                assert!(whole.starts_with(&tail.content));
            } else {
                assert_eq!(
                    tail.role,
                    Role::User,
                    "{model}: never a trailing assistant message"
                );
                assert_eq!(tail.content, CONTINUE_INSTRUCTION);
                let cut = &last.messages[last.messages.len() - 2];
                assert_eq!(cut.role, Role::Assistant);
                assert!(!cut.content.is_empty() && whole.starts_with(&cut.content));
            }
            for r in &seen {
                if !s.catalog.model(&r.model).unwrap().prefill {
                    assert_eq!(r.messages.last().unwrap().role, Role::User, "{}", r.model);
                }
            }
            s.sim.shutdown().await;
        }
    }
}

#[tokio::test]
async fn rescues_stop_at_the_policy_limit_and_off_keeps_the_explicit_error() {
    // One rescue allowed: a second break ends the call with the mid-stream error.
    let s = setup(Catalog::embedded().unwrap()).await;
    let process = process_with_primary(ProviderKind::OpenAi);
    let route = s.catalog.route(process).clone();
    s.sim
        .push_rule(Rule::once_on(&route.primary, Fault::CutAfter { tokens: 6 }));
    s.sim.push_rule(Rule::once_on(
        &route.fallback,
        Fault::CutAfter { tokens: 6 },
    ));
    let (events, result) = drain(s.router.stream_process(process, request())).await;
    let f = result.expect_err("the second break is past the limit");
    assert_eq!(f.error.kind(), "mid_stream");
    assert_eq!(rescues(&events).len(), 1);
    assert_eq!(f.outcome.attempts.len(), 2);
    s.sim.shutdown().await;

    // Two allowed: the primary again after the fallback broke too.
    let two = RescuePolicy {
        mode: MidStreamFailover::Restart,
        max_rescues: 2,
    };
    let s = setup(Catalog::embedded().unwrap().with_rescue(two)).await;
    s.sim
        .push_rule(Rule::once_on(&route.primary, Fault::CutAfter { tokens: 6 }));
    s.sim.push_rule(Rule::once_on(
        &route.fallback,
        Fault::CutAfter { tokens: 6 },
    ));
    let (events, result) = drain(s.router.stream_process(process, request())).await;
    let o = result.unwrap_or_else(|f| panic!("{}", f.error));
    let to: Vec<&str> = rescues(&events)
        .iter()
        .map(|(_, r)| r.to.as_str())
        .collect();
    assert_eq!(to, [route.fallback.as_str(), route.primary.as_str()]);
    assert_eq!(o.model.as_deref(), Some(route.primary.as_str()));
    assert_eq!(o.attempts.len(), 3);
    s.sim.shutdown().await;

    // Off: no rescue on a model call either.
    let s = setup(Catalog::embedded().unwrap().with_rescue(RescuePolicy::OFF)).await;
    s.sim.push_rule(Rule::once_on(
        "gpt-5.4-mini",
        Fault::ResetAfter { tokens: 6 },
    ));
    let (events, result) = drain(s.router.stream_model("gpt-5.4-mini", request()).unwrap()).await;
    let f = result.expect_err("off keeps today's behaviour");
    assert_eq!(f.error.kind(), "mid_stream");
    assert!(rescues(&events).is_empty());
    assert!(f.outcome.cost_estimated);
    s.sim.shutdown().await;
}

#[test]
fn the_catalog_sets_the_policy_per_process_and_for_chat() {
    let catalog = Catalog::embedded().unwrap();
    for (_, route) in catalog.routes() {
        assert_eq!(route.rescue, RescuePolicy::PROCESS_DEFAULT);
    }
    assert_eq!(catalog.model_rescue(), RescuePolicy::CHAT_DEFAULT);
    let mut json: serde_json::Value =
        serde_json::from_str(keyvex_engine::catalog::EMBEDDED_CATALOG).unwrap();
    json["processes"]["magicSpark"]["midStreamFailover"] = "off".into();
    json["processes"]["logicArchitect"]["maxRescues"] = 3.into();
    json["chat"] = serde_json::json!({ "midStreamFailover": "restart" });
    let edited = Catalog::parse(&json.to_string(), "edited.json").unwrap();
    assert_eq!(
        edited.route(agents::Process::MagicSpark).rescue,
        RescuePolicy::OFF
    );
    assert_eq!(
        edited
            .route(agents::Process::LogicArchitect)
            .rescue
            .max_rescues,
        3
    );
    assert_eq!(edited.model_rescue().mode, MidStreamFailover::Restart);
    json["chat"]["midStreamFailover"] = "sometimes".into();
    let err = Catalog::parse(&json.to_string(), "edited.json").unwrap_err();
    assert!(err.to_string().contains("edited.json"), "{err}");
}
