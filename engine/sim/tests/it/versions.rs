//! The Anthropic side of the simulator per `anthropic-version`, over HTTP on loopback: where the
//! key may travel, which versions exist, what 2026-10-21 refuses (with the API's error shape),
//! and that both versions stream the same events.

use std::net::SocketAddr;

use keyvex_sim::{self as sim, SimConfig, SimHandle};
use serde_json::{Value, json};

use crate::strict_sse::{check_anthropic, parse};

async fn start(config: SimConfig) -> SimHandle {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    sim::start(addr, config).await.unwrap()
}

fn body(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-6",
        "max_tokens": 200,
        "stream": stream,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Three loyalty ideas for a bike shop?"}],
    })
}

/// A POST to `/v1/messages` with exactly these headers.
async fn post(sim: &SimHandle, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{}/messages", sim.base_url()))
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

const NEW: (&str, &str) = ("anthropic-version", "2026-10-21");
const OLD: (&str, &str) = ("anthropic-version", "2023-06-01");
const BEARER: (&str, &str) = ("authorization", "Bearer sk-ant-test");
const X_API_KEY: (&str, &str) = ("x-api-key", "sk-ant-test");

/// An error answer in Anthropic's shape; returns its message.
async fn anthropic_error(response: reqwest::Response, status: u16, kind: &str) -> String {
    assert_eq!(response.status(), status);
    let header_id = response.headers()["request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert_eq!(v["request_id"], header_id.as_str(), "{v}");
    assert!(header_id.starts_with("req_"), "{v}");
    v["error"]["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_key_may_come_as_x_api_key_or_bearer_and_neither_is_a_401() {
    let sim = start(SimConfig::fast(71)).await;
    for key in [X_API_KEY, BEARER] {
        for version in [OLD, NEW] {
            let r = post(&sim, &body(false), &[key, version]).await;
            assert_eq!(r.status(), 200, "{key:?} {version:?}");
        }
    }
    for headers in [
        vec![NEW],
        vec![NEW, ("authorization", "Basic c2stYW50")],
        vec![NEW, ("authorization", "Bearer ")],
        vec![OLD, ("x-api-key", "")],
    ] {
        let message = anthropic_error(
            post(&sim, &body(true), &headers).await,
            401,
            "authentication_error",
        )
        .await;
        assert!(message.contains("x-api-key"), "{message}");
    }
    let seen: Vec<_> = sim
        .requests()
        .into_iter()
        .map(|r| (r.key_header, r.api_version))
        .collect();
    let owned = |k: &str, v: &str| (Some(k.to_owned()), Some(v.to_owned()));
    assert_eq!(
        seen,
        vec![
            owned("x-api-key", "2023-06-01"),
            owned("x-api-key", "2026-10-21"),
            owned("authorization", "2023-06-01"),
            owned("authorization", "2026-10-21"),
        ]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_missing_or_unknown_version_is_a_400() {
    let sim = start(SimConfig::fast(72)).await;
    let message = anthropic_error(
        post(&sim, &body(true), &[BEARER]).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert_eq!(message, "anthropic-version: header is required");
    for unknown in ["2023-01-01", "2026-10-22", "latest"] {
        let r = post(&sim, &body(true), &[BEARER, ("anthropic-version", unknown)]).await;
        let message = anthropic_error(r, 400, "invalid_request_error").await;
        assert!(
            message.contains(unknown) && message.contains("2023-06-01, 2026-10-21"),
            "{message}"
        );
    }
    assert!(sim.requests().is_empty(), "refused requests are not served");

    // `keyvex sim --no-auth` takes a request without headers as 2023-06-01, but still refuses an
    // unknown version.
    let mut lenient = SimConfig::fast(72);
    lenient.require_auth = false;
    let open = start(lenient).await;
    let mut with_temperature = body(false);
    with_temperature["temperature"] = json!(0.3);
    assert_eq!(post(&open, &with_temperature, &[]).await.status(), 200);
    let r = post(&open, &body(false), &[("anthropic-version", "2024-01-01")]).await;
    anthropic_error(r, 400, "invalid_request_error").await;
    sim.shutdown().await;
    open.shutdown().await;
}

#[tokio::test]
async fn sampling_parameters_are_a_400_on_2026_10_21_even_at_defaults_and_fine_on_2023_06_01() {
    let sim = start(SimConfig::fast(73)).await;
    for (name, value) in [
        ("temperature", json!(1.0)),
        ("temperature", json!(0.0)),
        ("top_p", json!(0.99)),
        ("top_k", json!(40)),
    ] {
        for stream in [true, false] {
            let mut request = body(stream);
            request[name] = value.clone();
            let r = post(&sim, &request, &[BEARER, NEW]).await;
            let message = anthropic_error(r, 400, "invalid_request_error").await;
            assert_eq!(message, format!("{name}: Extra inputs are not permitted"));
            let r = post(&sim, &request, &[X_API_KEY, OLD]).await;
            assert_eq!(r.status(), 200, "{name} on 2023-06-01");
        }
    }
    let seen = sim.requests();
    assert_eq!(seen.len(), 8, "only the 2023-06-01 requests were served");
    assert!(
        seen.iter()
            .all(|r| r.api_version.as_deref() == Some("2023-06-01") && r.sampling.len() == 1),
        "{seen:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn assistant_documents_and_cited_user_text_are_a_400_on_2026_10_21_only() {
    let sim = start(SimConfig::fast(74)).await;
    let document = json!({"type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "Opening hours: 8-18."}});
    let cited = json!({"type": "text", "text": "We open at 8.", "citations": [{
        "type": "char_location", "cited_text": "Opening hours: 8-18.", "document_index": 0,
        "start_char_index": 0, "end_char_index": 20}]});
    let conversation = |role: &str, block: &Value| {
        let mut request = body(false);
        request["messages"] = json!([
            {"role": "user", "content": "When do you open?"},
            {"role": "assistant", "content": "Let me check."},
            {"role": role, "content": [block, {"type": "text", "text": "Go on."}]},
        ]);
        if role == "assistant" {
            request["messages"]
                .as_array_mut()
                .unwrap()
                .push(json!({"role": "user", "content": "Thanks."}));
        }
        request
    };
    let cases = [
        (
            "assistant",
            &document,
            "messages.2.content.0: document blocks",
        ),
        ("user", &cited, "messages.2.content.0.citations:"),
    ];
    for (role, block, expected) in cases {
        let request = conversation(role, block);
        let message = anthropic_error(
            post(&sim, &request, &[BEARER, NEW]).await,
            400,
            "invalid_request_error",
        )
        .await;
        assert!(message.starts_with(expected), "{message}");
        assert_eq!(post(&sim, &request, &[X_API_KEY, OLD]).await.status(), 200);
    }
    // The same blocks where the new version allows them.
    for (role, block) in [("user", &document), ("assistant", &cited)] {
        let request = conversation(role, block);
        assert_eq!(post(&sim, &request, &[BEARER, NEW]).await.status(), 200);
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn both_versions_stream_the_same_events_text_and_usage() {
    let sim = start(SimConfig::fast(75)).await;
    let mut streams = Vec::new();
    for headers in [[X_API_KEY, OLD], [BEARER, NEW]] {
        let r = post(&sim, &body(true), &headers).await;
        assert_eq!(r.status(), 200);
        let (events, partial) = parse(&r.text().await.unwrap());
        assert!(!partial);
        let names: Vec<Option<String>> = events.iter().map(|e| e.event.clone()).collect();
        streams.push((check_anthropic(&events), names));
    }
    let [(old, old_names), (new, new_names)] = streams.try_into().ok().unwrap();
    assert_eq!(old_names, new_names);
    assert_eq!(old.text, new.text);
    assert_eq!(old.stop_reason, new.stop_reason);
    assert_eq!(old.start_usage, new.start_usage);
    assert_eq!(old.final_usage, new.final_usage);
    sim.shutdown().await;
}
