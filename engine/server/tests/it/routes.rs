//! The HTTP edge over a real socket: authentication and input errors with useful bodies, caller
//! limits with their headers, the OpenAI-compatible chat route through the OpenAI SDK with the
//! Prometheus counters it feeds, and health and readiness.

use std::num::NonZeroU32;
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CreateChatCompletionRequestArgs,
};
use futures::StreamExt;
use keyvex_engine::limits::Rate;
use keyvex_testkit::{business, error_of};
use serde_json::{Value, json};

use crate::support::{ADMIN, ALICE, Spec, TestServer};

fn spec() -> Spec {
    Spec::new(7)
}

/// 1,000 requests an hour per caller and route, at most 2 at once.
fn burst_of_two() -> Spec {
    let mut spec = spec();
    spec.caller_rate = Rate {
        per_period: NonZeroU32::new(1000).unwrap(),
        period: Duration::from_secs(3_600),
        burst: NonZeroU32::new(2).unwrap(),
    };
    spec
}

#[tokio::test]
async fn auth_and_bad_input_get_the_right_status_and_a_useful_body() {
    let mut spec = spec();
    spec.config.max_body_bytes = 2048;
    let h = TestServer::sqlite(spec).await;
    let agent = |key: &str| h.post("/v1/agents/magic-spark", key);

    let none = h
        .http
        .post(format!("{}/v1/agents/magic-spark", h.base))
        .json(&json!({ "input": business() }))
        .send()
        .await
        .unwrap();
    let e = error_of(none, 401).await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer")
    );
    let e = error_of(
        agent("wrong-key-000")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    assert_eq!(e["type"], "authentication_error");

    let whoami = |key: &str| {
        h.http
            .get(format!("{}/v1/admin/whoami", h.base))
            .bearer_auth(key)
            .send()
    };
    let e = error_of(whoami(ALICE).await.unwrap(), 403).await;
    assert_eq!(e["type"], "permission_error");
    let me: Value = whoami(ADMIN).await.unwrap().json().await.unwrap();
    assert_eq!(me, json!({ "caller": "root", "role": "admin" }));

    let malformed = agent(ALICE)
        .header("content-type", "application/json")
        .body("{\"input\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(malformed, 400).await["code"], "malformed_json");

    let missing = agent(ALICE)
        .json(&json!({ "sessionId": "s" }))
        .send()
        .await
        .unwrap();
    let e = error_of(missing, 400).await;
    assert_eq!(e["param"], "input");
    assert!(e["message"].as_str().unwrap().contains("input"));

    let wrong_type = agent(ALICE)
        .json(&json!({ "input": business(), "sessionId": 5 }))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(wrong_type, 400).await["param"], "sessionId");

    let bad_input = agent(ALICE)
        .json(&json!({ "input": { "industry": "x" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad_input, 400).await["param"], "input");

    let unknown = h
        .post("/v1/agents/sparkle", ALICE)
        .json(&json!({ "input": business() }))
        .send()
        .await
        .unwrap();
    let e = error_of(unknown, 404).await;
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("unknown_agent"), Some("agent"))
    );

    let model = h
        .post("/v1/chat/completions", ALICE)
        .json(&json!({ "model": "gpt-0", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    let e = error_of(model, 404).await;
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("model_not_found"), Some("model"))
    );

    let big = agent(ALICE)
        .json(&json!({ "input": { "businessDescription": "x".repeat(4096) } }))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(big, 413).await["code"], "payload_too_large");

    let text = agent(ALICE)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(text, 415).await["code"], "unsupported_media_type");
    h.stop().await;
}

#[tokio::test]
async fn callers_over_their_limit_get_429_with_headers() {
    let h = TestServer::sqlite(burst_of_two()).await;
    let get = || {
        h.http
            .get(format!("{}/v1/admin/whoami", h.base))
            .bearer_auth(ADMIN)
            .send()
    };
    let first = get().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratelimit-limit"], "1000");
    assert_eq!(first.headers()["x-ratelimit-remaining"], "1");
    get().await.unwrap();
    let refused = get().await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=4).contains(&retry_after), "{retry_after}");
    assert_eq!(refused.headers()["x-ratelimit-remaining"], "0");
    assert!(refused.headers().contains_key("x-ratelimit-reset"));
    let e = error_of(refused, 429).await;
    assert_eq!(e["type"], "rate_limit_error");
    assert!(e["message"].as_str().unwrap().contains("/v1/admin/whoami"));
    // Another endpoint has its own budget.
    let other = h
        .post("/v1/chat/completions", ADMIN)
        .json(&json!({ "model": "gpt-0", "messages": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 400);

    let metrics = h.prometheus_text().await;
    assert!(metrics.contains("keyvex_rate_limited_total"), "{metrics}");
    h.stop().await;
}

/// The model routes take the caller's limit at admission, with the budget check: a request
/// refused as invalid before that takes nothing, and the answers that took one say what is left.
#[tokio::test]
async fn model_routes_take_the_limit_at_admission_and_invalid_requests_take_none() {
    let h = TestServer::sqlite(burst_of_two()).await;
    let chat = |messages: Value| {
        h.post("/v1/chat/completions", ALICE)
            .json(&json!({ "model": "gpt-5.4-mini", "messages": messages }))
            .send()
    };
    let invalid = chat(json!([])).await.unwrap();
    assert_eq!(invalid.status(), 400);
    assert!(!invalid.headers().contains_key("x-ratelimit-remaining"));

    let hi = || json!([{ "role": "user", "content": "hi" }]);
    let first = chat(hi()).await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratelimit-limit"], "1000");
    assert_eq!(first.headers()["x-ratelimit-remaining"], "1");
    let second = chat(hi()).await.unwrap();
    assert_eq!(second.headers()["x-ratelimit-remaining"], "0");
    let refused = chat(hi()).await.unwrap();
    assert_eq!(refused.headers()["x-ratelimit-remaining"], "0");
    assert!(refused.headers().contains_key("retry-after"));
    let e = error_of(refused, 429).await;
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("/v1/chat/completions"),
        "{e}"
    );
    // The agent route counts on its own endpoint.
    let agent = h
        .post("/v1/agents/magic-spark", ALICE)
        .json(&json!({ "input": business() }))
        .send()
        .await
        .unwrap();
    assert_eq!(agent.status(), 200);
    assert_eq!(agent.headers()["x-ratelimit-remaining"], "1");
    h.stop().await;
}

fn openai(h: &TestServer) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", h.base))
            .with_api_key(ALICE),
    )
}

#[tokio::test]
async fn chat_completions_work_with_the_openai_sdk() {
    let h = TestServer::sqlite(spec()).await;
    let client = openai(&h);

    let request = CreateChatCompletionRequestArgs::default()
        .model("gpt-5.4-mini")
        .max_completion_tokens(64u32)
        .messages([
            ChatCompletionRequestSystemMessage::from("Be brief.").into(),
            ChatCompletionRequestUserMessage::from("Say hello.").into(),
        ])
        .build()
        .unwrap();
    let answer = client.chat().create(request).await.unwrap();
    assert_eq!(answer.object, "chat.completion");
    assert_eq!(answer.model, "gpt-5.4-mini");
    assert!(
        !answer.choices[0]
            .message
            .content
            .clone()
            .unwrap()
            .is_empty()
    );
    let usage = answer.usage.unwrap();
    assert!(usage.prompt_tokens > 0 && usage.completion_tokens > 0);

    let request = CreateChatCompletionRequestArgs::default()
        .model("magicSpark")
        .stream_options(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        })
        .messages([ChatCompletionRequestUserMessage::from("Give me tool ideas.").into()])
        .build()
        .unwrap();
    let mut stream = client.chat().create_stream(request).await.unwrap();
    let (mut text, mut usage, mut finish, mut ids) = (String::new(), None, None, Vec::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        ids.push(chunk.id.clone());
        if let Some(u) = chunk.usage {
            assert!(chunk.choices.is_empty(), "the usage chunk has no choices");
            usage = Some(u);
            continue;
        }
        let choice = &chunk.choices[0];
        if let Some(t) = &choice.delta.content {
            text.push_str(t);
        }
        if choice.finish_reason.is_some() {
            finish = choice.finish_reason;
        }
    }
    assert!(!text.is_empty());
    assert!(finish.is_some());
    assert!(usage.unwrap().completion_tokens > 0);
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "one id per completion"
    );

    // Without include_usage there is no usage chunk.
    let request = CreateChatCompletionRequestArgs::default()
        .model("gpt-5.4-mini")
        .messages([ChatCompletionRequestUserMessage::from("Hi").into()])
        .build()
        .unwrap();
    let mut stream = client.chat().create_stream(request).await.unwrap();
    while let Some(chunk) = stream.next().await {
        assert!(chunk.unwrap().usage.is_none());
    }

    let metrics = h.prometheus_text().await;
    for name in [
        "keyvex_calls_total",
        "keyvex_http_requests_total",
        "keyvex_call_latency_seconds_bucket",
        "keyvex_call_ttft_seconds",
        "keyvex_tokens_total",
        "keyvex_cost_micro_usd_total",
        "keyvex_streams_in_flight",
        "keyvex_metrics_durable",
        "keyvex_metrics_oldest_pending_age_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    // The completions above were committed, so the ledger made at least one transaction.
    let commits = metrics
        .lines()
        .find(|l| l.starts_with("keyvex_metrics_ledger_commits{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(commits.is_some_and(|c| c >= 1.0), "{metrics}");
    assert!(metrics.contains("process=\"direct\""), "{metrics}");
    assert!(metrics.contains("process=\"magicSpark\""), "{metrics}");
    h.stop().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let h = TestServer::sqlite(spec()).await;
    let ok = h
        .http
        .get(format!("{}/healthz", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let ready: Value = h
        .http
        .get(format!("{}/readyz", h.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["metrics"]["sink"], "sqlite");
    let stopped = h.stop().await;
    assert!(stopped.report.ledger_flushed);
}
