//! The SSE routes over a real socket: agent and pipeline streams in order, each `usage` event
//! sent only once its record is durable, a client disconnect cancelling the upstream call and
//! recording it, and a spent provider budget making the router fall back.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use keyvex_sim::{Fault, Rule};
use keyvex_testkit::{business, read_sse, read_sse_with};
use serde_json::{Value, json};

use crate::support::{ALICE, BOB, Spec, TestServer, stored_records};

fn spec() -> Spec {
    Spec::new(7)
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

/// Whether metrics record `id` is committed: in the ledger's outbox or already shipped. The outbox
/// is read first: a row shipped between the two reads is then found by the second.
fn record_committed(db: &std::path::Path, id: &str) -> bool {
    let conn = rusqlite::Connection::open(db).unwrap();
    let count = |sql: &str| -> i64 { conn.query_row(sql, [id], |r| r.get(0)).unwrap() };
    count("SELECT COUNT(*) FROM metrics_outbox WHERE entry_key = ?1") > 0
        || count("SELECT COUNT(*) FROM requests WHERE request_id = ?1") > 0
}

#[tokio::test]
async fn agent_stream_is_ordered_and_usage_is_durable_before_it_is_sent() {
    let h = TestServer::sqlite(spec()).await;
    let resp = h
        .post("/v1/agents/magic-spark", ALICE)
        .json(&json!({ "input": business(), "sessionId": "sess-1" }))
        .send()
        .await
        .unwrap();
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let db = h.db.clone();
    let events = read_sse_with(resp, |name, data| {
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
    // Record ids are the engine's own UUIDs; the request id is kept as the correlation id.
    let record_id = u["recordId"].as_str().unwrap().to_owned();
    assert_ne!(record_id, request_id, "record ids are the engine's own");
    assert!(uuid::Uuid::parse_str(&record_id).is_ok(), "{record_id}");
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
    let rows = stored_records(&h.db);
    let rec = rows
        .iter()
        .find(|r| r["requestId"] == record_id.as_str())
        .unwrap();
    assert_eq!(rec["correlationId"], request_id.as_str());
    assert_eq!(rec["userId"], "alice");
    assert_eq!(rec["process"], "magicSpark");
    assert_eq!(rec["sessionId"], "sess-1");
    assert_eq!(rec["status"], "succeeded");
    h.stop().await;
}

#[tokio::test]
async fn pipeline_stream_tags_every_event_and_ends_with_the_tool() {
    let h = TestServer::sqlite(spec()).await;
    let locker = rusqlite::Connection::open(&h.db).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let resp = h
        .post("/v1/pipelines/tool", ALICE)
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
        read_sse_with(resp, |name, data| {
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
    let rows = stored_records(&h.db);
    assert!(rows.len() >= 4);
    for r in &rows {
        assert_eq!(r["runId"], run_id.as_str());
        assert_eq!(r["stage"], r["process"]);
        assert_eq!(r["sessionId"], "sess-p");
    }
    h.stop().await;
}

#[tokio::test]
async fn a_client_disconnect_cancels_upstream_and_records_the_partial_cost() {
    let h = TestServer::sqlite(spec()).await;
    // Slow output, so the stream is surely still running when the client leaves.
    h.sim.push_rule(Rule::always(Fault::Latency {
        ttft: Duration::ZERO,
        tokens_per_sec: 40.0,
    }));
    let resp = h
        .post("/v1/agents/magic-spark", ALICE)
        .json(&json!({ "input": business() }))
        .send()
        .await
        .unwrap();
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
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
    let rows = stored_records(&h.db);
    let cancelled = rows.iter().find(|r| r["status"] == "cancelled").unwrap();
    assert!(
        cancelled["costPicoUsd"].as_u64().unwrap() > 0,
        "{cancelled}"
    );
    assert_eq!(cancelled["userId"], "alice");
    assert_eq!(cancelled["process"], "magicSpark");
    // Recorded from the call's `Drop` with the context given when it opened.
    assert_eq!(cancelled["correlationId"], request_id.as_str());
    h.stop().await;
}

/// The chat route on both wires, before the first token and mid-stream: once the client hangs
/// up, the upstream call is closed within 100 ms (the simulator sees its stream abandoned).
#[tokio::test]
async fn a_chat_client_hanging_up_closes_the_upstream_within_100_ms() {
    let h = TestServer::sqlite(spec()).await;
    for (ttft_ms, when) in [(2_000, "before the first token"), (0, "mid-stream")] {
        h.sim.push_rule(Rule::always(Fault::Latency {
            ttft: Duration::from_millis(ttft_ms),
            tokens_per_sec: 4.0,
        }));
        for model in ["gpt-5.4-mini", "claude-haiku-4-5"] {
            let closed = h.sim.stats().streams_client_closed;
            let resp = h
                .post("/v1/chat/completions", ALICE)
                .json(&json!({
                    "model": model,
                    "stream": true,
                    "messages": [{ "role": "user", "content": "Name three savings tips." }],
                }))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.bytes_stream();
            if ttft_ms == 0 {
                // Two pieces in: the role chunk and the first content.
                for _ in 0..2 {
                    body.next().await.unwrap().unwrap();
                }
            } else {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            drop(body);
            let hung_up = std::time::Instant::now();
            assert!(
                h.sim
                    .wait_for_disconnects(closed + 1, Duration::from_millis(100))
                    .await,
                "{model} {when}: the upstream was still open {:?} after the client left",
                hung_up.elapsed()
            );
        }
    }
    h.sim.clear_rules();
    h.stop().await;
}

/// A client-chosen `x-request-id` is a correlation field only: two requests with the same one
/// are two records, each keyed by the engine's own id; an id over 128 characters is cut to 128
/// and echoed back cut.
#[tokio::test]
async fn a_reused_or_oversized_request_id_never_overwrites_a_record() {
    let h = TestServer::sqlite(spec()).await;
    let body = json!({
        "model": "gpt-5.4-mini",
        "messages": [{ "role": "user", "content": "hello" }],
    });
    for _ in 0..2 {
        let resp = h
            .post("/v1/chat/completions", ALICE)
            .header("x-request-id", "same-id-twice")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-request-id"], "same-id-twice");
    }
    let long = "r".repeat(5_000);
    let resp = h
        .post("/v1/chat/completions", BOB)
        .header("x-request-id", &long)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echoed = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(echoed, long[..128]);
    let (health, ok) = h
        .tracker
        .wait_for(Duration::from_secs(10), |m| m.shipped >= 3)
        .await;
    assert!(ok, "{health:?}");
    let rows = stored_records(&h.db);
    let twice: Vec<&Value> = rows
        .iter()
        .filter(|r| r["correlationId"] == "same-id-twice")
        .collect();
    assert_eq!(twice.len(), 2, "two requests, two records: {rows:?}");
    assert_ne!(twice[0]["requestId"], twice[1]["requestId"]);
    assert!(rows.iter().any(|r| r["correlationId"] == echoed.as_str()));
    h.stop().await;
}

/// A request the provider refuses (a prompt too long for every model, a content policy) is the
/// caller's 400 with the provider's code, never a 502 an SDK would retry.
#[tokio::test]
async fn a_provider_refusal_of_the_request_is_a_400_with_the_providers_code() {
    let h = TestServer::sqlite(spec()).await;
    for (fault, model, code) in [
        (
            Fault::ContextTooLong,
            "gpt-5.4-mini",
            "context_length_exceeded",
        ),
        (
            Fault::ContentPolicy,
            "gpt-5.4-mini",
            "content_policy_violation",
        ),
        (
            Fault::ContentPolicy,
            "claude-haiku-4-5",
            "invalid_request_error",
        ),
    ] {
        for stream in [false, true] {
            h.sim.push_rule(Rule::times(fault.clone(), 1));
            let resp = h
                .post("/v1/chat/completions", ALICE)
                .json(&json!({
                    "model": model,
                    "stream": stream,
                    "messages": [{ "role": "user", "content": "hello" }],
                }))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 400, "{model} {code} stream={stream}");
            let err: Value = resp.json().await.unwrap();
            assert_eq!(err["error"]["code"], code, "{err}");
            assert_eq!(err["error"]["type"], "invalid_request_error");
            assert!(
                err["error"]["message"].as_str().unwrap().contains(model),
                "{err}"
            );
        }
    }
    h.stop().await;
}

/// What the router did about provider faults shows in `/metrics`: a complete answer accepted
/// without its terminator, and a model disabled because the provider refused our account.
#[tokio::test]
async fn unterminated_streams_and_disabled_models_are_counted_in_metrics() {
    let h = TestServer::sqlite(spec()).await;
    let chat = |model: &'static str| {
        h.post("/v1/chat/completions", ALICE).json(&json!({
            "model": model,
            "messages": [{ "role": "user", "content": "hello" }],
        }))
    };
    h.sim.push_rule(Rule::times(
        Fault::NoTerminator {
            hold: Duration::ZERO,
        },
        1,
    ));
    assert_eq!(chat("gpt-5.4-mini").send().await.unwrap().status(), 200);
    // Out of quota on the primary of logicArchitect: the fallback answers.
    h.sim.push_rule(Rule::times(Fault::InsufficientQuota, 1));
    assert_eq!(chat("logicArchitect").send().await.unwrap().status(), 200);
    let text = h.prometheus_text().await;
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
            .to_owned()
    };
    assert!(line("keyvex_unterminated_streams_total").ends_with(" 1"));
    let disabled = line("keyvex_model_disabled_total");
    assert!(
        disabled.contains("reason=\"quota_exhausted\"") && disabled.ends_with(" 1"),
        "{disabled}"
    );
    h.stop().await;
}

/// A provider whose local request budget is spent is refused by the router before any request
/// goes out, and the router falls back to the other provider instead of failing the caller.
#[tokio::test]
async fn a_spent_provider_budget_makes_the_router_fall_back() {
    let mut spec = spec();
    spec.provider_rates.requests_per_minute = std::num::NonZeroU32::MIN;
    let h = TestServer::sqlite(spec).await;
    let run = || async {
        let resp = h
            .post("/v1/agents/magic-spark", ALICE)
            .json(&json!({ "input": business() }))
            .send()
            .await
            .unwrap();
        read_sse(resp).await
    };
    let first = run().await;
    assert!(!names(&first).contains(&"fallback"));
    let primary = first[0].1["provider"].clone();
    let second = run().await;
    let n = names(&second);
    let fallback = n.iter().position(|e| *e == "fallback").expect("a fallback");
    let reason = second[fallback].1["reason"].as_str().unwrap();
    assert!(reason.contains("budget"), "{:?}", second[fallback].1);
    // The router's own refusal (`local_budget`), no longer a 429 from a wrapped provider.
    assert!(reason.contains("local"), "{reason}");
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
