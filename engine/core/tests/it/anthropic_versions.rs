//! The engine on both Anthropic API versions, against the simulator over HTTP on loopback: the
//! same answer, usage and cost either way; on 2026-10-21 no sampling parameter on the wire (the
//! simulator answers one with a 400, and logs what each request carried) and the key sent as
//! `Authorization: Bearer`; a catalog model that names its own version gets it whatever the
//! default.

use std::sync::Arc;

use futures::StreamExt;
use keyvex_engine::catalog::{Catalog, EMBEDDED_CATALOG};
use keyvex_engine::provider::ChatMessage;
use keyvex_engine::provider::anthropic_version::AnthropicVersion;
use keyvex_engine::record::RequestStatus;
use keyvex_engine::router::RouteOutcome;
use keyvex_engine::{
    CallContext, CallEvent, CallTarget, Engine, Process, ProviderKind, RequestRecord, RouteOptions,
    RouteRequest,
};
use keyvex_sim::{SeenRequest, SimHandle};
use keyvex_testkit::{MemoryRecorder, fast_sim, sim_engine};
use serde_json::Value;

fn request(text: &str) -> RouteRequest {
    RouteRequest {
        system: Some("Answer in one short paragraph.".into()),
        messages: vec![ChatMessage::user(text)],
        max_output_tokens: Some(200),
        ..RouteRequest::default()
    }
}

/// An engine on `version` and the recorder of its calls.
struct OnVersion {
    engine: Engine,
    recorder: Arc<MemoryRecorder>,
}

/// Runs one call to its end and returns the outcome and its record; a failure fails the test.
async fn finish(
    on: &OnVersion,
    target: CallTarget,
    request: RouteRequest,
) -> (RouteOutcome, RequestRecord) {
    let mut call = on
        .engine
        .chat(
            &CallContext::new("vera"),
            &target,
            request,
            RouteOptions::default(),
        )
        .unwrap();
    let mut streamed = String::new();
    while let Some(event) = call.next().await {
        match event {
            CallEvent::Delta(text) => streamed.push_str(&text),
            CallEvent::Finished { outcome, record } => {
                assert_eq!(outcome.text, streamed);
                let records = on.recorder.records();
                let recorded = records
                    .iter()
                    .find(|r| r.request_id == record.id)
                    .expect("the call was recorded")
                    .clone();
                return (*outcome, recorded);
            }
            CallEvent::Failed { failure, .. } => panic!("{}", failure.error),
            CallEvent::Start { .. } | CallEvent::Fallback { .. } | CallEvent::Rescue(_) => {}
        }
    }
    panic!("the call ended without Finished");
}

fn engine_on(sim: &SimHandle, catalog: Catalog, version: AnthropicVersion) -> OnVersion {
    let recorder = MemoryRecorder::new();
    let engine = sim_engine(sim)
        .catalog(catalog)
        .anthropic_version(version)
        .recorder(recorder.clone())
        .build()
        .unwrap();
    OnVersion { engine, recorder }
}

/// The last request the simulator served.
fn last_seen(sim: &SimHandle) -> SeenRequest {
    sim.requests().pop().expect("the simulator saw a request")
}

/// The embedded catalog's JSON with Magic Spark routed to an Anthropic primary (and an OpenAI
/// fallback) at temperature 0.9 — the case the version changes — plus two Anthropic models that
/// name their own version; the test does not depend on today's routes and model list.
fn catalog_json() -> Value {
    let mut json: Value = serde_json::from_str(EMBEDDED_CATALOG).unwrap();
    let models = json["models"].as_array_mut().unwrap();
    let first = |provider: &str| {
        models
            .iter()
            .find(|m| m["provider"] == provider)
            .unwrap()
            .clone()
    };
    let (anthropic, openai) = (first("anthropic"), first("openai"));
    for (id, version) in [
        ("claude-pinned-new", "2026-10-21"),
        ("claude-pinned-old", "2023-06-01"),
    ] {
        let mut pinned = anthropic.clone();
        pinned["id"] = id.into();
        pinned["anthropicVersion"] = version.into();
        models.push(pinned);
    }
    json["processes"]["magicSpark"]["primary"] = anthropic["id"].clone();
    json["processes"]["magicSpark"]["fallback"] = openai["id"].clone();
    json["processes"]["magicSpark"]["temperature"] = 0.9.into();
    json
}

fn catalog() -> Catalog {
    Catalog::parse(&catalog_json().to_string(), "versions.json").unwrap()
}

/// An Anthropic model of the catalog that names no version of its own.
fn plain_anthropic_model(catalog: &Catalog) -> String {
    catalog
        .models()
        .iter()
        .find(|m| m.provider == ProviderKind::Anthropic && m.anthropic_version.is_none())
        .unwrap()
        .id
        .clone()
}

#[tokio::test]
async fn both_versions_give_the_same_text_usage_and_cost_and_2026_10_21_sends_no_temperature() {
    let sim = fast_sim(81).await;
    let catalog = catalog();
    let route = catalog.route(Process::MagicSpark);

    let mut runs = Vec::new();
    for version in AnthropicVersion::ALL {
        let on = engine_on(&sim, catalog.clone(), version);
        let (outcome, record) = finish(
            &on,
            CallTarget::Process(Process::MagicSpark),
            request("Three quiz ideas for a bike repair shop?"),
        )
        .await;
        assert_eq!(record.status, RequestStatus::Succeeded);
        assert!(!outcome.fallback_used, "{version}: the primary answered");
        assert_eq!(outcome.model.as_deref(), Some(route.primary.as_str()));
        runs.push((version, outcome, record, last_seen(&sim)));
    }
    let [
        (_, old, old_record, old_wire),
        (_, new, new_record, new_wire),
    ] = runs.try_into().ok().unwrap();

    assert!(!old.text.is_empty());
    assert_eq!(new.text, old.text);
    assert_eq!(new.usage, old.usage);
    assert!(new.usage.input > 0 && new.usage.output > 0);
    assert_eq!(new.cost, old.cost);
    assert_eq!(
        (new_record.cost_pico_usd, new_record.output_tokens),
        (old_record.cost_pico_usd, old_record.output_tokens)
    );
    assert!(new_record.cost_pico_usd > 0 && !new_record.cost_estimated);

    // On the wire, as the simulator parsed it.
    assert_eq!(old_wire.api_version.as_deref(), Some("2023-06-01"));
    assert_eq!(old_wire.key_header.as_deref(), Some("x-api-key"));
    assert_eq!(old_wire.sampling, vec!["temperature".to_owned()]);
    assert_eq!(new_wire.api_version.as_deref(), Some("2026-10-21"));
    assert_eq!(new_wire.key_header.as_deref(), Some("authorization"));
    assert!(new_wire.sampling.is_empty(), "{new_wire:?}");
    assert_eq!(
        (&new_wire.system, &new_wire.messages),
        (&old_wire.system, &old_wire.messages)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_callers_temperature_is_not_sent_on_2026_10_21_where_the_simulator_would_refuse_it() {
    let sim = fast_sim(82).await;
    // The simulator's 400 is what sending it would cost: check that first, by hand.
    let refused = reqwest::Client::new()
        .post(format!("{}/messages", sim.base_url()))
        .bearer_auth("sim-key")
        .header("anthropic-version", "2026-10-21")
        .json(&serde_json::json!({"model": "claude-any", "max_tokens": 20,
            "temperature": 0.4, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "temperature: Extra inputs are not permitted"
    );

    let catalog = catalog();
    let model = plain_anthropic_model(&catalog);
    for version in AnthropicVersion::ALL {
        let on = engine_on(&sim, catalog.clone(), version);
        let with_temperature = RouteRequest {
            temperature: Some(0.4),
            ..request("Name one loyalty idea.")
        };
        // One catalog model, no fallback: a 400 would fail the call.
        let (outcome, _) = finish(&on, CallTarget::Model(model.clone()), with_temperature).await;
        assert_eq!(outcome.attempts.len(), 1, "{version}");
        let wire = last_seen(&sim);
        assert_eq!(wire.api_version.as_deref(), Some(version.as_str()));
        let expected: Vec<String> = if version.accepts_sampling_parameters() {
            vec!["temperature".into()]
        } else {
            Vec::new()
        };
        assert_eq!(wire.sampling, expected, "{version}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn a_catalog_model_with_its_own_version_gets_it_whatever_the_default() {
    let sim = fast_sim(83).await;
    let catalog = catalog();
    let plain = plain_anthropic_model(&catalog);
    for default in AnthropicVersion::ALL {
        let on = engine_on(&sim, catalog.clone(), default);
        for (model, expected) in [
            ("claude-pinned-new", "2026-10-21"),
            ("claude-pinned-old", "2023-06-01"),
        ] {
            let with_temperature = RouteRequest {
                temperature: Some(0.7),
                ..request("Name one loyalty idea.")
            };
            finish(&on, CallTarget::Model(model.into()), with_temperature).await;
            let wire = last_seen(&sim);
            assert_eq!(
                wire.api_version.as_deref(),
                Some(expected),
                "{model} with default {default}"
            );
            assert_eq!(
                wire.sampling.is_empty(),
                expected == "2026-10-21",
                "{model} with default {default}: {wire:?}"
            );
        }
        // The model without a version of its own follows the default.
        finish(&on, CallTarget::Model(plain.clone()), request("hi")).await;
        assert_eq!(
            last_seen(&sim).api_version.as_deref(),
            Some(default.as_str())
        );
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn the_version_in_use_is_part_of_the_providers_description() {
    let sim = fast_sim(84).await;
    let on = engine_on(&sim, catalog(), AnthropicVersion::V2026_10_21);
    let description = on.engine.providers_description();
    assert!(
        description.contains(&format!(
            "anthropic: {} (API version 2026-10-21)",
            sim.base_url()
        )),
        "{description}"
    );
    sim.shutdown().await;
}
