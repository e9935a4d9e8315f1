//! Dollar budgets over HTTP against the simulator: concurrent requests never take a budget past
//! its limit and the refused ones get `budget_exceeded`; a pipeline run stops before the stage
//! that would cross its run budget; a cancelled stream settles to what it billed; the admin
//! routes read and set limits; `/metrics` shows budgets and refusals.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use keyvex_engine::budgets::BudgetLimits;
use keyvex_engine::{Cost, Engine, Process};
use keyvex_sim::{Fault, Rule};
use keyvex_testkit::{MemoryRecorder, business, read_sse};
use serde_json::{Value, json};

use crate::support::{ADMIN, ALICE, BOB, Spec, TestServer, stored_records};

/// The most Magic Spark's first call on [`business`] can cost, as the server computes it.
fn magic_spark_worst_case() -> Cost {
    let engine = Engine::builder()
        .recorder(MemoryRecorder::new())
        .build()
        .unwrap();
    engine
        .agent_worst_case(Process::MagicSpark, &business())
        .unwrap()
}

fn pico(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not a picodollar amount: {v}"))
}

/// Sum of the stored records' cost for `caller` (every record is one billed call).
fn billed(db: &std::path::Path, caller: &str) -> u64 {
    stored_records(db)
        .iter()
        .filter(|r| r["userId"] == caller)
        .map(|r| pico(&r["costPicoUsd"]))
        .sum()
}

async fn wait_shipped(h: &TestServer, n: u64) {
    let (health, ok) = h
        .tracker
        .wait_for(Duration::from_secs(30), |m| {
            m.shipped >= n && m.pending == 0
        })
        .await;
    assert!(ok, "{health:?}");
}

/// Alice's day in `GET /v1/admin/budgets`.
async fn alice_day(h: &TestServer) -> Value {
    let all = h.get_json("/v1/admin/budgets", ADMIN).await;
    all["callers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["caller"] == "alice")
        .unwrap_or_else(|| panic!("alice is not listed: {all}"))["day"]
        .clone()
}

#[tokio::test]
async fn fifty_concurrent_requests_never_take_a_daily_budget_past_its_limit() {
    let worst = magic_spark_worst_case();
    // Room for ten first calls at their worst case; real calls cost less, so a few more fit.
    let limit = Cost(worst.0 * 10);
    let mut spec = Spec::new(31);
    spec.budgets = BudgetLimits {
        caller_daily: Some(limit),
        ..BudgetLimits::default()
    };
    let h = TestServer::sqlite(spec).await;
    let requests = (0..50).map(|_| {
        let req = h
            .post("/v1/agents/magic-spark", ALICE)
            .json(&json!({ "input": business() }));
        async move {
            let resp = req.send().await.unwrap();
            if resp.status() == 429 {
                let retry_after = resp.headers().get("retry-after").cloned();
                let body: Value = resp.json().await.unwrap();
                return Err((body, retry_after));
            }
            let remaining = resp.headers().get("x-budget-remaining-usd").cloned();
            Ok((read_sse(resp).await, remaining))
        }
    });
    let answers = futures::future::join_all(requests).await;
    let mut succeeded = 0;
    let mut refused_in_stream = 0;
    let mut refused_before = Vec::new();
    for answer in answers {
        match answer {
            Ok((events, remaining)) => {
                assert!(remaining.is_some(), "an admitted request says what remains");
                let done = events.iter().rev().find(|(n, _)| n == "done").unwrap();
                if done.1["status"] == "succeeded" {
                    succeeded += 1;
                } else {
                    // Admitted by the check, then refused by the reservation before its call
                    // (another request took the room in between).
                    let error = events.iter().find(|(n, _)| n == "error").unwrap();
                    assert_eq!(error.1["kind"], "budget_exceeded", "{events:?}");
                    refused_in_stream += 1;
                }
            }
            Err((body, retry_after)) => refused_before.push((body, retry_after)),
        }
    }
    assert!(
        succeeded >= 10,
        "at least the ten worst cases fit: {succeeded}"
    );
    assert_eq!(
        succeeded + refused_in_stream + refused_before.len(),
        50,
        "every request is answered"
    );
    assert!(
        !refused_before.is_empty(),
        "a budget for ~10 refuses most of 50"
    );
    for (body, retry_after) in &refused_before {
        let error = &body["error"];
        assert_eq!(error["code"], "budget_exceeded", "{body}");
        assert_eq!(error["type"], "rate_limit_error");
        let budget = &error["budget"];
        assert_eq!(budget["scope"], "caller_daily");
        assert_eq!(budget["subject"], "alice");
        assert_eq!(pico(&budget["limitPicoUsd"]), limit.0);
        assert!(
            pico(&budget["spentPicoUsd"]) + pico(&budget["reservedPicoUsd"]) + worst.0 > limit.0,
            "refused only without room: {budget}"
        );
        assert!(budget["window"].as_str().unwrap().len() == 10, "{budget}");
        assert!(budget["resetsAt"].as_str().unwrap().ends_with("T00:00:00Z"));
        let wait: u64 = retry_after
            .as_ref()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (1..=86_400).contains(&wait),
            "Retry-After until midnight UTC: {wait}"
        );
    }
    wait_shipped(&h, 1).await;
    let billed = billed(&h.db, "alice");
    assert!(billed > 0);
    assert!(billed <= limit.0, "billed {billed} > limit {}", limit.0);
    // Every reservation settled to exactly what the records bill.
    let day = alice_day(&h).await;
    assert_eq!(pico(&day["spentPicoUsd"]), billed, "{day}");
    assert_eq!(pico(&day["reservedPicoUsd"]), 0, "{day}");
    // Bob's budget is his own.
    let resp = h
        .post("/v1/agents/magic-spark", BOB)
        .json(&json!({ "input": business() }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    read_sse(resp).await;
    // The refusals are in /metrics.
    let text = h.prometheus_text().await;
    let refusals: u64 = text
        .lines()
        .find(|l| l.starts_with("keyvex_budget_refusals_total{scope=\"caller_daily\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no caller_daily refusals in /metrics:\n{text}"));
    assert_eq!(
        refusals as usize,
        refused_before.len() + refused_in_stream,
        "{text}"
    );
    assert!(text.contains("keyvex_budget_limit_usd{scope=\"caller_daily\"}"));
    h.stop().await;
}

#[tokio::test]
async fn a_pipeline_run_stops_before_the_stage_that_would_cross_its_budget() {
    let worst = magic_spark_worst_case();
    // Magic Spark fits; what it leaves is less than Logic Architect's worst case.
    let mut spec = Spec::new(32);
    spec.budgets = BudgetLimits {
        run: Some(Cost(worst.0 + 1)),
        ..BudgetLimits::default()
    };
    let h = TestServer::sqlite(spec).await;
    let resp = h
        .post("/v1/pipelines/tool", ALICE)
        .json(&json!({ "business": business() }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-budget-scope"], "run");
    let events = read_sse(resp).await;
    let error = events.iter().find(|(n, _)| n == "error").unwrap();
    assert_eq!(error.1["stage"], "logicArchitect", "{events:?}");
    assert_eq!(error.1["kind"], "budget_exceeded", "{events:?}");
    let done = &events.iter().rev().find(|(n, _)| n == "done").unwrap().1;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["failedStage"], "logicArchitect");
    let run_id = done["runId"].as_str().unwrap().to_owned();
    let stages = done["stages"].as_array().unwrap();
    let spark = stages.iter().find(|s| s["stage"] == "magicSpark").unwrap();
    assert_eq!(spark["succeeded"], true);
    let spent = pico(&spark["cost"]);
    assert!(spent > 0 && spent <= worst.0 + 1, "{spark}");
    // No model was called for Logic Architect, and nothing after it ran.
    assert!(
        !events
            .iter()
            .any(|(n, v)| n == "start" && v["stage"] != "magicSpark"),
        "{events:?}"
    );
    // The spend so far is recorded: Magic Spark's call, billed under the run; and the refusal,
    // as the model Logic Architect would have called, costing nothing.
    wait_shipped(&h, 2).await;
    let rows: Vec<Value> = stored_records(&h.db)
        .into_iter()
        .filter(|r| r["runId"] == run_id.as_str())
        .collect();
    let billed: u64 = rows.iter().map(|r| pico(&r["costPicoUsd"])).sum();
    assert_eq!(billed, spent, "{rows:?}");
    assert!(
        rows.iter()
            .filter(|r| r["stage"] != "magicSpark")
            .all(|r| pico(&r["costPicoUsd"]) == 0),
        "{rows:?}"
    );
    let refused = rows
        .iter()
        .find(|r| r["stage"] == "logicArchitect")
        .unwrap_or_else(|| panic!("no record of the refused stage: {rows:?}"));
    assert_eq!(refused["status"], "failed", "{refused}");
    assert_eq!(refused["errorKind"], "budget_exceeded", "{refused}");
    assert_ne!(refused["model"], "none", "{refused}");
    assert_ne!(refused["provider"], "none", "{refused}");
    h.stop().await;
}

#[tokio::test]
async fn a_cancelled_stream_settles_to_its_billed_cost() {
    let mut spec = Spec::new(33);
    spec.budgets = BudgetLimits {
        caller_daily: Some(Cost::from_micro_usd(50_000_000)),
        ..BudgetLimits::default()
    };
    let h = TestServer::sqlite(spec).await;
    // Slow output, so the stream is surely running when the client leaves.
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
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream().eventsource();
    loop {
        let ev = stream.next().await.unwrap().unwrap();
        if ev.event == "delta" {
            break;
        }
    }
    // While it runs, its worst case is reserved.
    let day = alice_day(&h).await;
    assert!(pico(&day["reservedPicoUsd"]) > 0, "{day}");
    drop(stream);
    assert!(h.sim.wait_for_disconnects(1, Duration::from_secs(10)).await);
    wait_shipped(&h, 1).await;
    let rows = stored_records(&h.db);
    let cancelled = rows.iter().find(|r| r["status"] == "cancelled").unwrap();
    let cost = pico(&cancelled["costPicoUsd"]);
    assert!(cost > 0, "{cancelled}");
    let day = alice_day(&h).await;
    assert_eq!(pico(&day["spentPicoUsd"]), cost, "{day}");
    assert_eq!(pico(&day["reservedPicoUsd"]), 0, "{day}");
    h.stop().await;
}

#[tokio::test]
async fn admins_read_and_set_caller_limits_and_the_chat_route_refuses_over_budget() {
    let h = TestServer::sqlite(Spec::new(34)).await;
    // Unlimited by default: listed with no limit, spend counted.
    let all = h.get_json("/v1/admin/budgets", ADMIN).await;
    assert_eq!(all["defaults"]["dailyUsd"], Value::Null);
    let callers: Vec<&str> = all["callers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["caller"].as_str().unwrap())
        .collect();
    assert_eq!(callers, ["alice", "bob", "root"]);
    // A user may not set limits.
    let resp = h
        .http
        .put(format!("{}/v1/admin/budgets/bob", h.base))
        .bearer_auth(ALICE)
        .json(&json!({ "dailyUsd": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = h
        .http
        .put(format!("{}/v1/admin/budgets/bob", h.base))
        .bearer_auth(ADMIN)
        .json(&json!({ "dailyUsd": "-3" }))
        .send()
        .await
        .unwrap();
    let error = keyvex_testkit::error_of(resp, 400).await;
    assert_eq!(error["param"], "dailyUsd");
    // A limit too small for any call: bob is refused before the call.
    let resp = h
        .http
        .put(format!("{}/v1/admin/budgets/bob", h.base))
        .bearer_auth(ADMIN)
        .json(&json!({ "dailyUsd": "0.000001", "monthlyUsd": 10 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let set: Value = resp.json().await.unwrap();
    assert_eq!(set["ownLimits"]["monthlyUsd"], 10.0);
    let resp = h
        .post("/v1/chat/completions", BOB)
        .json(&json!({ "model": "magicSpark", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    let error = keyvex_testkit::error_of(resp, 429).await;
    assert_eq!(error["code"], "budget_exceeded");
    assert_eq!(error["budget"]["limitPicoUsd"], 1_000_000);
    let all = h.get_json("/v1/admin/budgets", ADMIN).await;
    let bob = all["callers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["caller"] == "bob")
        .unwrap();
    assert_eq!(bob["day"]["limitPicoUsd"], 1_000_000, "{bob}");
    assert_eq!(bob["month"]["limitUsd"], 10.0, "{bob}");
    // Cleared: bob's calls go through again, with no budget header (nothing is limited).
    let resp = h
        .http
        .put(format!("{}/v1/admin/budgets/bob", h.base))
        .bearer_auth(ADMIN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = h
        .post("/v1/chat/completions", BOB)
        .json(&json!({ "model": "magicSpark", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-budget-remaining-usd").is_none());
    h.stop().await;
}
