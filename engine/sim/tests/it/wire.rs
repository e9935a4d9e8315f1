//! The simulator's two wire protocols over real HTTP on loopback, held to the wire format by a
//! strict SSE parser and per-protocol invariant checkers (`strict_sse`).

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use keyvex_engine::provider::{ChatMessage, Role};
use keyvex_engine::stream::ProviderKind;
use keyvex_engine::tokenize::{count_prompt_tokens, count_tokens};
use keyvex_sim::{self as sim, Fault, Rule, SimConfig, SimHandle};
use serde_json::{Value, json};

use crate::strict_sse::{self, check_anthropic, check_openai, parse};

const SYSTEM: &str = "You are a concise small-business advisor.";
const USER: &str = "How should a neighbourhood bakery price its weekly bread subscriptions?";

async fn start(config: SimConfig) -> SimHandle {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    sim::start(addr, config).await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn openai_body(stream: bool) -> Value {
    let mut body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn anthropic_body(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "stream": stream,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": USER}],
    })
}

async fn openai(sim: &SimHandle, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client()
        .post(format!("{}/chat/completions", sim.base_url()))
        .bearer_auth("sk-test")
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn anthropic(sim: &SimHandle, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client()
        .post(format!("{}/messages", sim.base_url()))
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn prompt_tokens() -> u64 {
    count_prompt_tokens(
        Some(SYSTEM),
        &[ChatMessage {
            role: Role::User,
            content: USER.into(),
        }],
    )
}

#[tokio::test]
async fn openai_stream_is_wire_exact_and_usage_matches_the_text() {
    let sim = start(SimConfig::fast(1)).await;
    let resp = openai(&sim, &openai_body(true), &[("x-sim-cached-tokens", "12")]).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert!(resp.headers().contains_key("x-request-id"));
    assert!(resp.headers().contains_key("x-ratelimit-remaining-tokens"));
    let (events, partial) = parse(&resp.text().await.unwrap());
    assert!(!partial);
    let s = check_openai(&events, true);
    assert_eq!(s.finish_reason, "stop");
    assert!(s.text.split_whitespace().count() > 20, "{}", s.text);
    let usage = s.usage.unwrap();
    assert_eq!(usage["completion_tokens"], count_tokens(&s.text));
    // OpenAI: cached tokens are inside prompt_tokens.
    assert_eq!(usage["prompt_tokens"], prompt_tokens());
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 12);
    assert_eq!(
        usage["total_tokens"],
        prompt_tokens() + count_tokens(&s.text)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn openai_without_include_usage_sends_no_usage_field() {
    let sim = start(SimConfig::fast(1)).await;
    let mut body = openai_body(true);
    body.as_object_mut().unwrap().remove("stream_options");
    let (events, _) = parse(&openai(&sim, &body, &[]).await.text().await.unwrap());
    let s = check_openai(&events, false);
    assert!(s.usage.is_none());
    sim.shutdown().await;
}

#[tokio::test]
async fn anthropic_stream_is_wire_exact_with_pings_and_cache_reads_outside_input() {
    let mut config = SimConfig::fast(2);
    config.latency.tokens_per_sec = 4000.0;
    config.latency.ping_every = Duration::from_millis(5);
    config.latency.output_tokens = Some(120);
    let sim = start(config).await;
    let resp = anthropic(
        &sim,
        &anthropic_body(true),
        &[("x-sim-cached-tokens", "10")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("request-id"));
    assert!(
        resp.headers()
            .contains_key("anthropic-ratelimit-tokens-reset")
    );
    let (events, partial) = parse(&resp.text().await.unwrap());
    assert!(!partial);
    let s = check_anthropic(&events);
    assert_eq!(s.block_type, "text");
    assert_eq!(s.stop_reason, "end_turn");
    assert!(s.pings >= 2, "pings interleaved: {}", s.pings);
    assert_eq!(s.final_usage["output_tokens"], count_tokens(&s.text));
    assert!((119..=120).contains(&count_tokens(&s.text)));
    // Anthropic: input_tokens excludes cache reads.
    assert_eq!(s.start_usage["cache_read_input_tokens"], 10);
    assert_eq!(s.start_usage["input_tokens"], prompt_tokens() - 10);
    sim.shutdown().await;
}

#[tokio::test]
async fn token_limits_stop_with_length_and_max_tokens() {
    let sim = start(SimConfig::fast(3)).await;
    let mut body = openai_body(true);
    body["max_completion_tokens"] = json!(7);
    let (events, _) = parse(
        &openai(&sim, &body, &[("x-sim-output-tokens", "50")])
            .await
            .text()
            .await
            .unwrap(),
    );
    let s = check_openai(&events, true);
    assert_eq!(s.finish_reason, "length");
    let n = count_tokens(&s.text);
    assert!((1..=7).contains(&n), "{n}");
    assert_eq!(s.usage.unwrap()["completion_tokens"], n);

    let mut legacy = openai_body(false);
    legacy["max_tokens"] = json!(5);
    let v: Value = openai(&sim, &legacy, &[]).await.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 5);

    let mut body = anthropic_body(true);
    body["max_tokens"] = json!(6);
    let (events, _) = parse(&anthropic(&sim, &body, &[]).await.text().await.unwrap());
    let s = check_anthropic(&events);
    assert_eq!(s.stop_reason, "max_tokens");
    assert!(count_tokens(&s.text) <= 6);
    sim.shutdown().await;
}

#[tokio::test]
async fn http_faults_have_each_protocols_status_body_and_headers() {
    let sim = start(SimConfig::fast(4)).await;
    sim.push_rule(Rule {
        model: None,
        protocol: Some(ProviderKind::OpenAi),
        fault: Fault::Http {
            status: 429,
            retry_after: Some(Duration::from_millis(1500)),
        },
        times: Some(1),
    });
    let r = openai(&sim, &openai_body(true), &[]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "2");
    assert_eq!(r.headers()["retry-after-ms"], "1500");
    assert!(r.headers().contains_key("x-request-id"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["message"].is_string() && v["error"].get("param").is_some());

    sim.push_rule(Rule::times(Fault::InsufficientQuota, 1));
    let v: Value = openai(&sim, &openai_body(true), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["error"]["type"], "insufficient_quota");
    assert_eq!(v["error"]["code"], "insufficient_quota");

    for (status, kind) in [
        (500, "server_error"),
        (503, "server_error"),
        (400, "invalid_request_error"),
    ] {
        let r = openai(
            &sim,
            &openai_body(true),
            &[("x-sim-fault", &status.to_string())],
        )
        .await;
        assert_eq!(r.status(), status);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], kind);
    }

    for (status, kind) in [
        (529, "overloaded_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (400, "invalid_request_error"),
        (401, "authentication_error"),
    ] {
        let r = anthropic(
            &sim,
            &anthropic_body(true),
            &[("x-sim-fault", &format!("{status}:3000"))],
        )
        .await;
        assert_eq!(r.status(), status);
        assert_eq!(r.headers()["retry-after"], "3");
        assert!(
            r.headers()["request-id"]
                .to_str()
                .unwrap()
                .starts_with("req_")
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], kind);
        assert!(v["error"]["message"].is_string());
    }
    assert_eq!(sim.stats().faults_injected, 10);
    sim.shutdown().await;
}

#[tokio::test]
async fn requests_are_validated_and_authenticated_like_the_real_apis() {
    let sim = start(SimConfig::fast(5)).await;
    let url = format!("{}/chat/completions", sim.base_url());
    let r = client()
        .post(&url)
        .json(&openai_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .post(&url)
        .bearer_auth("k")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let v: Value = openai(&sim, &json!({"messages": []}), &[])
        .await
        .json()
        .await
        .unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("model"));
    let r = openai(&sim, &json!({"model": "gpt-4o-mini"}), &[]).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["param"],
        "messages"
    );

    let url = format!("{}/messages", sim.base_url());
    let r = client()
        .post(&url)
        .json(&anthropic_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "authentication_error"
    );
    let mut no_max = anthropic_body(true);
    no_max.as_object_mut().unwrap().remove("max_tokens");
    let r = anthropic(&sim, &no_max, &[]).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );
    let r = anthropic(&sim, &anthropic_body(true), &[("x-sim-fault", "bogus")]).await;
    assert_eq!(r.status(), 400);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_cut_drops_the_connection_without_a_terminator() {
    let sim = start(SimConfig::fast(6)).await;
    for protocol in ProviderKind::ALL {
        let r = match protocol {
            ProviderKind::OpenAi => {
                openai(&sim, &openai_body(true), &[("x-sim-fault", "cut:10")]).await
            }
            ProviderKind::Anthropic => {
                anthropic(&sim, &anthropic_body(true), &[("x-sim-fault", "cut:10")]).await
            }
        };
        assert_eq!(r.status(), 200);
        let mut body = r.bytes_stream();
        let mut received = Vec::new();
        let mut failed = false;
        while let Some(item) = body.next().await {
            match item {
                Ok(bytes) => received.extend_from_slice(&bytes),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "{protocol}: the body must end in a transport error");
        let text = String::from_utf8(received).unwrap();
        assert!(
            !text.contains("[DONE]") && !text.contains("message_stop"),
            "{text}"
        );
        assert!(
            text.contains("data: "),
            "{protocol}: some content before the cut"
        );
    }
    assert_eq!(sim.stats().streams_aborted, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_stall_keeps_the_connection_open_and_silent() {
    let sim = start(SimConfig::fast(7)).await;
    let r = openai(
        &sim,
        &openai_body(true),
        &[("x-sim-fault", "stall:5:30000")],
    )
    .await;
    let mut body = r.bytes_stream();
    let mut text = String::new();
    // Read what comes before the stall (it arrives at once), then expect silence.
    loop {
        match tokio::time::timeout(Duration::from_millis(300), body.next()).await {
            Ok(Some(Ok(bytes))) => text.push_str(std::str::from_utf8(&bytes).unwrap()),
            Ok(other) => panic!("stream ended during a stall: {other:?}"),
            Err(_) => break,
        }
    }
    let (events, _) = parse(&text);
    assert!(events.len() >= 2, "content before the stall: {text}");
    assert!(!text.contains("[DONE]"));
    assert_eq!(sim.stats().streams_open, 1);
    // Shutdown must not wait for the stalled stream.
    let started = std::time::Instant::now();
    sim.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn in_stream_errors_and_malformed_lines_follow_each_protocol() {
    let sim = start(SimConfig::fast(8)).await;
    let text = openai(
        &sim,
        &openai_body(true),
        &[("x-sim-fault", "error:server_error:4")],
    )
    .await
    .text()
    .await
    .unwrap();
    let (events, partial) = parse(&text);
    assert!(!partial);
    let last: Value = serde_json::from_str(&events.last().unwrap().data).unwrap();
    assert_eq!(last["error"]["type"], "server_error");
    assert!(!text.contains("[DONE]"));

    let text = anthropic(
        &sim,
        &anthropic_body(true),
        &[("x-sim-fault", "error:overloaded_error:4")],
    )
    .await
    .text()
    .await
    .unwrap();
    let (events, _) = parse(&text);
    let last = events.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"));
    let v: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(
        v,
        json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}})
    );
    assert!(!text.contains("message_stop"));

    for protocol in ProviderKind::ALL {
        let text = match protocol {
            ProviderKind::OpenAi => {
                openai(&sim, &openai_body(true), &[("x-sim-fault", "malformed:3")]).await
            }
            ProviderKind::Anthropic => {
                anthropic(
                    &sim,
                    &anthropic_body(true),
                    &[("x-sim-fault", "malformed:3")],
                )
                .await
            }
        }
        .text()
        .await
        .unwrap();
        let (events, _) = parse(&text);
        let bad = events
            .iter()
            .filter(|e| e.data != "[DONE]" && serde_json::from_str::<Value>(&e.data).is_err())
            .count();
        assert_eq!(bad, 1, "{protocol}: exactly one malformed data line");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn content_is_deterministic_per_seed_and_request() {
    let sim = start(SimConfig::fast(9)).await;
    let stream_text = |events: Vec<strict_sse::SseEvent>| check_openai(&events, true).text;
    let a = stream_text(
        parse(
            &openai(&sim, &openai_body(true), &[])
                .await
                .text()
                .await
                .unwrap(),
        )
        .0,
    );
    let b = stream_text(
        parse(
            &openai(&sim, &openai_body(true), &[])
                .await
                .text()
                .await
                .unwrap(),
        )
        .0,
    );
    assert_eq!(a, b);
    let whole: Value = openai(&sim, &openai_body(false), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        whole["choices"][0]["message"]["content"],
        a.as_str(),
        "streamed == non-streamed"
    );
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    assert_eq!(whole["usage"]["completion_tokens"], count_tokens(&a));
    let c = stream_text(
        parse(
            &openai(&sim, &openai_body(true), &[("x-sim-seed", "77")])
                .await
                .text()
                .await
                .unwrap(),
        )
        .0,
    );
    assert_ne!(a, c, "another seed, another answer");

    let other = start(SimConfig::fast(9)).await;
    let d = stream_text(
        parse(
            &openai(&other, &openai_body(true), &[])
                .await
                .text()
                .await
                .unwrap(),
        )
        .0,
    );
    assert_eq!(a, d, "same seed on another server instance");
    let msg: Value = anthropic(&sim, &anthropic_body(false), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(msg["type"], "message");
    assert_eq!(msg["content"][0]["type"], "text");
    assert_eq!(
        msg["usage"]["output_tokens"],
        count_tokens(msg["content"][0]["text"].as_str().unwrap())
    );
    other.shutdown().await;
    sim.shutdown().await;
}

fn brand_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "brandName": {"type": "string", "minLength": 2},
            "palette": {"type": "array", "minItems": 3, "maxItems": 5,
                        "items": {"type": "string", "pattern": "^#[0-9a-fA-F]{6}$"}},
            "tone": {"type": "string", "enum": ["playful", "premium", "friendly"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "sections": {"type": "array", "minItems": 2, "items": {"$ref": "#/$defs/section"}},
            "tagline": {"anyOf": [{"type": "string", "maxLength": 60}, {"type": "null"}]}
        },
        "required": ["brandName", "palette", "tone", "confidence", "sections", "tagline"],
        "additionalProperties": false,
        "$defs": {"section": {"type": "object", "properties": {
            "heading": {"type": "string"}, "order": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["heading", "order"], "additionalProperties": false}}
    })
}

#[tokio::test]
async fn schema_requests_get_valid_json_in_both_protocols() {
    let sim = start(SimConfig::fast(10)).await;
    let schema = brand_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();

    let mut body = openai_body(true);
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "brand_brief", "strict": true, "schema": schema}});
    let s = check_openai(
        &parse(&openai(&sim, &body, &[]).await.text().await.unwrap()).0,
        true,
    );
    let value: Value = serde_json::from_str(&s.text).unwrap();
    assert!(validator.is_valid(&value), "{value}");
    assert_eq!(s.usage.unwrap()["completion_tokens"], count_tokens(&s.text));

    let mut body = anthropic_body(true);
    body["tools"] =
        json!([{"name": "brand_brief", "description": "Return the brief", "input_schema": schema}]);
    body["tool_choice"] = json!({"type": "tool", "name": "brand_brief"});
    let s = check_anthropic(&parse(&anthropic(&sim, &body, &[]).await.text().await.unwrap()).0);
    assert_eq!(s.block_type, "tool_use");
    assert_eq!(s.stop_reason, "tool_use");
    let value: Value = serde_json::from_str(&s.text).unwrap();
    assert!(validator.is_valid(&value), "{value}");

    body["stream"] = json!(false);
    let msg: Value = anthropic(&sim, &body, &[]).await.json().await.unwrap();
    assert_eq!(msg["content"][0]["type"], "tool_use");
    assert_eq!(msg["content"][0]["name"], "brand_brief");
    assert!(validator.is_valid(&msg["content"][0]["input"]));

    // The served log has the two streams (not the non-streaming answer), each with its
    // protocol and schema name, and is emptied by reading it.
    let served = sim.take_served();
    let seen: Vec<(ProviderKind, Option<&str>)> = served
        .iter()
        .map(|s| (s.protocol, s.schema_name.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            (ProviderKind::OpenAi, Some("brand_brief")),
            (ProviderKind::Anthropic, Some("brand_brief"))
        ]
    );
    assert!(served.iter().all(|s| s.received_at.is_some()));
    assert!(sim.take_served().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_client_that_drops_mid_stream_is_counted() {
    let mut config = SimConfig::fast(11);
    config.latency.tokens_per_sec = 200.0;
    config.latency.output_tokens = Some(400);
    let sim = start(config).await;
    let r = openai(&sim, &openai_body(true), &[]).await;
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    assert_eq!(sim.stats().streams_open, 1);
    drop(body);
    assert!(sim.wait_for_disconnects(1, Duration::from_secs(5)).await);
    let stats = sim.stats();
    assert_eq!(stats.streams_client_closed, 1);
    assert_eq!(stats.streams_open, 0);
    assert_eq!(stats.streams_completed, 0);
    assert!(!sim.wait_for_disconnects(2, Duration::from_millis(50)).await);
    sim.shutdown().await;
}

#[tokio::test]
async fn control_endpoints_script_faults_and_report_stats() {
    let sim = start(SimConfig::fast(12)).await;
    let base = format!("http://{}", sim.addr());
    let rules = json!([{"model": "claude-sonnet-4-5", "fault": {"http": {"status": 529, "retry_after_ms": 1000}}, "times": 1}]);
    let r = client()
        .post(format!("{base}/sim/rules"))
        .json(&rules)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        anthropic(&sim, &anthropic_body(true), &[]).await.status(),
        529
    );
    assert_eq!(
        anthropic(&sim, &anthropic_body(true), &[]).await.status(),
        200
    );

    let forever = json!({"fault": {"cached_prompt_tokens": 5}});
    client()
        .post(format!("{base}/sim/rules"))
        .json(&forever)
        .send()
        .await
        .unwrap();
    let v: Value = openai(&sim, &openai_body(false), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 5);
    let r = client()
        .delete(format!("{base}/sim/rules"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let v: Value = openai(&sim, &openai_body(false), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    let stats: Value = client()
        .get(format!("{base}/sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["requests_total"], 4);
    assert_eq!(stats["requests_by_model"]["claude-sonnet-4-5"], 2);
    assert_eq!(stats["streams_completed"], 1);
    assert_eq!(stats["faults_injected"], 1);
    sim.shutdown().await;
}
