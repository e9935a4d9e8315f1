//! The HTTP API over a real socket: an in-process server on port 0 in front of the simulator
//! (`SimConfig::fast`), metrics in a temp SQLite file; and the built binary for SIGTERM.

// Test code: a failed unwrap is a failed test (clippy's test allowance does not reach helpers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CreateChatCompletionRequestArgs,
};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use keyvex_engine::config::{ApiKeySpec, MapEnv, ServerConfig};
use keyvex_engine::metrics::{ShutdownReport, Tracker, start_from_env};
use keyvex_engine::provider::sim::{Fault, Rule, SimHandle};
use keyvex_engine::server::Server;
use serde_json::{Value, json};

use crate::support::RunningServer;
use crate::support::TempDir;

const USER_KEY: &str = "user-key-0001";
const ADMIN_KEY: &str = "admin-key-0001";

struct Harness {
    base: String,
    sim: SimHandle,
    tracker: Tracker,
    db: std::path::PathBuf,
    server: RunningServer,
    http: reqwest::Client,
    _dir: TempDir,
}

async fn harness(tweak: impl FnOnce(&mut ServerConfig)) -> Harness {
    let dir = TempDir::new("server");
    let (sim, engine) = crate::support::simulated_engine(7).await;
    let db = dir.file("metrics.sqlite3");
    let tracker = start_from_env(&MapEnv::new([
        ("KEYVEX_METRICS_DB", db.to_str().unwrap()),
        ("KEYVEX_METRICS_FLUSH_MS", "20"),
    ]))
    .await
    .unwrap();
    let mut cfg = ServerConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        api_keys: vec![
            ApiKeySpec::parse(&format!("{USER_KEY}=alice:user")).unwrap(),
            ApiKeySpec::parse(&format!("{ADMIN_KEY}=root:admin")).unwrap(),
        ],
        ..ServerConfig::default()
    };
    tweak(&mut cfg);
    let server = Server::bind(cfg, &engine, tracker.clone()).await.unwrap();
    let running = RunningServer::spawn(server);
    Harness {
        base: running.base.clone(),
        sim,
        tracker,
        db,
        server: running,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Harness {
    /// The Prometheus exposition at `/metrics`.
    async fn prometheus_text(&self) -> String {
        let resp = self.http.get(format!("{}/metrics", self.base)).send();
        resp.await.unwrap().text().await.unwrap()
    }

    fn post(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
    }

    async fn stop(self) -> ShutdownReport {
        let report = self.server.stop().await;
        self.sim.shutdown().await;
        report
    }
}

fn business() -> Value {
    json!({
        "businessDescription": "A solar installer serving homeowners in Arizona",
        "targetAudience": "homeowners with high summer electricity bills",
        "industry": "renewable energy"
    })
}

/// Reads an SSE response to its end as (event name, JSON data), calling `each` as events arrive.
async fn read_sse(
    resp: reqwest::Response,
    mut each: impl FnMut(&str, &Value),
) -> Vec<(String, Value)> {
    assert_eq!(resp.status(), 200, "{:?}", resp.headers());
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut stream = resp.bytes_stream().eventsource();
    let mut out = Vec::new();
    while let Some(ev) = stream.next().await {
        let ev = ev.unwrap();
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        each(&ev.event, &data);
        out.push((ev.event, data));
    }
    out
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

#[tokio::test]
async fn agent_stream_is_ordered_and_usage_is_durable_before_it_is_sent() {
    let h = harness(|_| {}).await;
    let resp = h
        .post("/v1/agents/magic-spark", USER_KEY)
        .json(&json!({ "input": business(), "sessionId": "sess-1" }))
        .send()
        .await
        .unwrap();
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let db = h.db.clone();
    let events = read_sse(resp, |name, data| {
        if name == "usage" {
            let id = data["recordId"].as_str().unwrap();
            assert!(
                record_committed(&db, id),
                "usage event for {id} sent before its record was durable"
            );
        }
    })
    .await;
    let n = names(&events);
    assert_eq!(n[0], "start", "{n:?}");
    assert_eq!(events[0].1["requestId"], request_id.as_str());
    assert_eq!(events[0].1["stage"], "magicSpark");
    let first_delta = n.iter().position(|e| *e == "delta").unwrap();
    let usage = n.iter().position(|e| *e == "usage").unwrap();
    assert!(first_delta < usage);
    assert!(n.contains(&"partial"));
    assert_eq!(&n[n.len() - 2..], ["result", "done"], "{n:?}");
    let done = &events.last().unwrap().1;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["requestId"], request_id.as_str());
    assert!(done["totals"]["costMicroUsd"].as_u64().unwrap() > 0);
    let u = &events[usage].1;
    assert!(u["tokens"]["input"].as_u64().unwrap() > 0);
    assert_eq!(
        u["recordId"],
        request_id.as_str(),
        "first call takes the request id"
    );
    assert!(events[n.len() - 2].1["output"]["concepts"].is_array());

    // The record carries caller, process and session. Shipped entries are the call's record
    // and the session's two messages (input and output).
    let (health, ok) = h
        .tracker
        .wait_for(Duration::from_secs(10), |m| {
            m.shipped >= 3 && m.pending == 0
        })
        .await;
    assert!(ok, "{health:?}");
    let rows = records(&h.db);
    let rec = rows
        .iter()
        .find(|r| r["requestId"] == request_id.as_str())
        .unwrap();
    assert_eq!(rec["userId"], "alice");
    assert_eq!(rec["process"], "magicSpark");
    assert_eq!(rec["sessionId"], "sess-1");
    assert_eq!(rec["status"], "succeeded");
    h.stop().await;
}

/// Whether metrics record `id` is committed: in the ledger's outbox or already shipped. The outbox
/// is read first: a row shipped between the two reads is then found by the second.
fn record_committed(db: &std::path::Path, id: &str) -> bool {
    let conn = rusqlite::Connection::open(db).unwrap();
    let count = |sql: &str| -> i64 { conn.query_row(sql, [id], |r| r.get(0)).unwrap() };
    count("SELECT COUNT(*) FROM metrics_outbox WHERE entry_key = ?1") > 0
        || count("SELECT COUNT(*) FROM requests WHERE request_id = ?1") > 0
}

fn records(db: &std::path::Path) -> Vec<Value> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare("SELECT body FROM requests").unwrap();
    stmt.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|b| serde_json::from_str(&b.unwrap()).unwrap())
        .collect()
}

#[tokio::test]
async fn pipeline_stream_tags_every_event_and_ends_with_the_tool() {
    let h = harness(|_| {}).await;
    let locker = rusqlite::Connection::open(&h.db).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let resp = h
        .post("/v1/pipelines/tool", USER_KEY)
        .json(&json!({ "business": business(), "sessionId": "sess-p" }))
        .send()
        .await
        .unwrap();
    // The pipeline does not wait for a stage's record to commit before the next stage starts,
    // but each `usage` event still waits for its own record: with the ledger's database locked,
    // Logic Architect starts while no `usage` has been sent; once unlocked, all four arrive,
    // each committed, before `done`.
    let db = h.db.clone();
    let mut lock = Some(locker);
    let mut usages = 0;
    // Bounded: a pipeline that waited for the commit would wait for the lock forever.
    let events = tokio::time::timeout(
        Duration::from_secs(30),
        read_sse(resp, |name, data| {
            if name == "usage" {
                assert!(
                    lock.is_none(),
                    "usage sent while its record could not commit"
                );
                let id = data["recordId"].as_str().unwrap();
                assert!(
                    record_committed(&db, id),
                    "usage event for {id} sent before its record was durable"
                );
                usages += 1;
            }
            if name == "start"
                && data["stage"] == "logicArchitect"
                && let Some(conn) = lock.take()
            {
                assert_eq!(usages, 0);
                conn.execute_batch("ROLLBACK").unwrap();
            }
        }),
    )
    .await
    .expect("the pipeline stalled behind a metrics commit");
    assert_eq!(usages, 4);
    let n = names(&events);
    assert_eq!(n[0], "run");
    let run_id = events[0].1["runId"].as_str().unwrap().to_owned();
    assert_eq!(&n[n.len() - 2..], ["result", "done"], "{n:?}");
    for (name, data) in &events[1..events.len() - 2] {
        assert!(data["stage"].is_string(), "{name} without stage: {data}");
    }
    let stages: std::collections::BTreeSet<&str> = events
        .iter()
        .filter(|(n, _)| n == "usage")
        .map(|(_, d)| d["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages.len(), 4, "{stages:?}");
    let done = &events.last().unwrap().1;
    assert_eq!(done["runId"], run_id.as_str());
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["stages"].as_array().unwrap().len(), 4);
    assert!(events[n.len() - 2].1["tool"].is_object());
    // Four call records and five session messages (the business and four stage outputs).
    let (health, ok) = h
        .tracker
        .wait_for(Duration::from_secs(10), |m| {
            m.shipped >= 9 && m.pending == 0
        })
        .await;
    assert!(ok, "{health:?}");
    let rows = records(&h.db);
    assert!(rows.len() >= 4);
    for r in &rows {
        assert_eq!(r["runId"], run_id.as_str());
        assert_eq!(r["stage"], r["process"]);
        assert_eq!(r["sessionId"], "sess-p");
    }
    h.stop().await;
}

async fn error_of(resp: reqwest::Response, status: u16) -> Value {
    assert_eq!(resp.status(), status);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    body["error"].clone()
}

#[tokio::test]
async fn auth_and_bad_input_get_the_right_status_and_a_useful_body() {
    let h = harness(|c| c.max_body_bytes = 2048).await;
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
    let e = error_of(whoami(USER_KEY).await.unwrap(), 403).await;
    assert_eq!(e["type"], "permission_error");
    let me: Value = whoami(ADMIN_KEY).await.unwrap().json().await.unwrap();
    assert_eq!(me, json!({ "caller": "root", "role": "admin" }));

    let malformed = agent(USER_KEY)
        .header("content-type", "application/json")
        .body("{\"input\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(malformed, 400).await["code"], "malformed_json");

    let missing = agent(USER_KEY)
        .json(&json!({ "sessionId": "s" }))
        .send()
        .await
        .unwrap();
    let e = error_of(missing, 400).await;
    assert_eq!(e["param"], "input");
    assert!(e["message"].as_str().unwrap().contains("input"));

    let wrong_type = agent(USER_KEY)
        .json(&json!({ "input": business(), "sessionId": 5 }))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(wrong_type, 400).await["param"], "sessionId");

    let bad_input = agent(USER_KEY)
        .json(&json!({ "input": { "industry": "x" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad_input, 400).await["param"], "input");

    let unknown = h
        .post("/v1/agents/sparkle", USER_KEY)
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
        .post("/v1/chat/completions", USER_KEY)
        .json(&json!({ "model": "gpt-0", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    let e = error_of(model, 404).await;
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("model_not_found"), Some("model"))
    );

    let big = agent(USER_KEY)
        .json(&json!({ "input": { "businessDescription": "x".repeat(4096) } }))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(big, 413).await["code"], "payload_too_large");

    let text = agent(USER_KEY)
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
    let h = harness(|c| {
        c.requests_per_hour = 1000;
        c.burst = 2;
    })
    .await;
    let get = || {
        h.http
            .get(format!("{}/v1/admin/whoami", h.base))
            .bearer_auth(ADMIN_KEY)
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
        .post("/v1/chat/completions", ADMIN_KEY)
        .json(&json!({ "model": "gpt-0", "messages": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 400);

    let metrics = h.prometheus_text().await;
    assert!(metrics.contains("keyvex_rate_limited_total"), "{metrics}");
    h.stop().await;
}

#[tokio::test]
async fn a_client_disconnect_cancels_upstream_and_records_the_partial_cost() {
    let h = harness(|_| {}).await;
    // Slow output, so the stream is surely still running when the client leaves.
    h.sim.push_rule(Rule::always(Fault::Latency {
        ttft: Duration::ZERO,
        tokens_per_sec: 40.0,
    }));
    let resp = h
        .post("/v1/agents/magic-spark", USER_KEY)
        .json(&json!({ "input": business() }))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream().eventsource();
    loop {
        let ev = stream.next().await.unwrap().unwrap();
        if ev.event == "delta" {
            break;
        }
    }
    drop(stream);
    assert!(
        h.sim.wait_for_disconnects(1, Duration::from_secs(10)).await,
        "the simulator never saw the upstream call closed"
    );
    let (health, ok) = h
        .tracker
        .wait_for(Duration::from_secs(10), |m| m.shipped >= 1)
        .await;
    assert!(ok, "{health:?}");
    let rows = records(&h.db);
    let cancelled = rows.iter().find(|r| r["status"] == "cancelled").unwrap();
    assert!(
        cancelled["costPicoUsd"].as_u64().unwrap() > 0,
        "{cancelled}"
    );
    assert_eq!(cancelled["userId"], "alice");
    assert_eq!(cancelled["process"], "magicSpark");
    h.stop().await;
}

fn openai(h: &Harness) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", h.base))
            .with_api_key(USER_KEY),
    )
}

#[tokio::test]
async fn chat_completions_work_with_the_openai_sdk() {
    let h = harness(|_| {}).await;
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
    assert!(metrics.contains("process=\"direct\""), "{metrics}");
    assert!(metrics.contains("process=\"magicSpark\""), "{metrics}");
    h.stop().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let h = harness(|_| {}).await;
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
    let report = h.stop().await;
    assert!(report.ledger_flushed);
}

/// The built binary: SIGTERM while a stream is open ends the stream (finished or with the
/// `shutdown` error event), exits 0, and leaves the call's record in SQLite.
#[tokio::test]
async fn sigterm_drains_streams_flushes_metrics_and_exits_zero() {
    let dir = TempDir::new("server-bin");
    let db = dir.file("metrics.sqlite3");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keyvex"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .env("KEYVEX_API_KEYS", format!("{USER_KEY}=alice:user"))
        .env("KEYVEX_METRICS_DB", &db)
        .env("KEYVEX_DRAIN_TIMEOUT_MS", "300")
        .env("KEYVEX_SIMULATE", "always")
        .env("RUST_LOG", "warn")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("DYNAMODB_TABLE_NAME")
        .env_remove("SQS_AI_PROCESSING_QUEUE_URL")
        .env_remove("KEYVEX_CONFIG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    // Keep draining stderr so the child never blocks on a full pipe.
    let log = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in stderr.lines() {
            let line = line.unwrap();
            if let Some(addr) = line.strip_prefix("keyvex: listening on ") {
                let _ = addr_tx.send(addr.to_owned());
            }
            all.push(line);
        }
        all
    });
    let base = addr_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/agents/magic-spark"))
        .bearer_auth(USER_KEY)
        .json(&json!({ "input": business() }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream().eventsource();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.event, "start");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut last = None;
    while let Some(ev) = stream.next().await {
        last = Some(ev.unwrap());
    }
    let last = last.unwrap();
    let data: Value = serde_json::from_str(&last.data).unwrap();
    assert!(
        last.event == "done" || (last.event == "error" && data["kind"] == "shutdown"),
        "{} {data}",
        last.event
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let log = log.join().unwrap();
    assert!(
        status.success(),
        "exit {status:?}; stderr:\n{}",
        log.join("\n")
    );
    let rows = records(&db);
    assert!(
        !rows.is_empty(),
        "no metrics rows; stderr:\n{}",
        log.join("\n")
    );
    assert!(rows.iter().all(|r| r["userId"] == "alice"));
}

/// A provider whose local request budget is spent refuses with a retryable 429, and the router
/// falls back to the other provider instead of failing the caller.
#[tokio::test]
async fn a_spent_provider_budget_makes_the_router_fall_back() {
    let h = harness(|c| c.provider_requests_per_minute = 1).await;
    let run = || async {
        let resp = h
            .post("/v1/agents/magic-spark", USER_KEY)
            .json(&json!({ "input": business() }))
            .send()
            .await
            .unwrap();
        read_sse(resp, |_, _| {}).await
    };
    let first = run().await;
    assert!(!names(&first).contains(&"fallback"));
    let primary = first[0].1["provider"].clone();
    let second = run().await;
    let n = names(&second);
    let fallback = n.iter().position(|e| *e == "fallback").expect("a fallback");
    assert!(
        second[fallback].1["reason"]
            .as_str()
            .unwrap()
            .contains("budget"),
        "{:?}",
        second[fallback].1
    );
    let start = second.iter().find(|(n, _)| n == "start").unwrap();
    assert_ne!(start.1["provider"], primary, "the other provider answered");
    assert_eq!(second.last().unwrap().1["status"], "succeeded");
    assert_eq!(
        h.sim.stats().requests_total,
        2,
        "the refused call never reached the simulator"
    );
    h.stop().await;
}
