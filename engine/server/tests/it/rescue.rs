//! Streams that break after content, over the HTTP API against the simulator: the agent route
//! sends a `restart` event and still returns a valid result, the pipeline completes, the chat
//! route's stream is the simulator's canonical answer with one finish reason, one `[DONE]` and
//! a resumed marker; both calls are billed, the answer's record says it was rescued, and
//! `/metrics` counts the rescue on the model whose stream broke.

use std::time::Duration;

use keyvex_sim::{Fault, Rule};
use keyvex_testkit::{business, read_sse};
use serde_json::{Value, json};

use crate::support::{ALICE, Spec, TestServer, stored_records};

/// The faults that end a stream after content without waiting out the stall timeout (a stall
/// is rescued the same way; the core's tests cover it with a short timeout).
fn faults() -> Vec<Fault> {
    vec![
        Fault::CutAfter { tokens: 6 },
        Fault::ResetAfter { tokens: 6 },
        Fault::InStreamError {
            after_tokens: 6,
            error_type: "overloaded_error".into(),
        },
    ]
}

/// The stored records of one request (its correlation id), once `n` of them are in.
async fn records_of(h: &TestServer, request_id: &str, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<Value> = stored_records(&h.db)
            .into_iter()
            .filter(|r| r["correlationId"] == request_id)
            .collect();
        if found.len() >= n || std::time::Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The broken call's record is `retried`, billed with what it delivered (estimated); the
/// answer's record names the model it rescued.
fn assert_billed_and_rescued(records: &[Value], broken: &str, answered: &str, estimated: bool) {
    assert_eq!(records.len(), 2, "{records:#?}");
    let cut = records.iter().find(|r| r["model"] == broken).unwrap();
    assert_eq!(cut["status"], "retried", "{cut}");
    if estimated {
        // The provider's usage never came: estimated, and flagged.
        assert_eq!(cut["costEstimated"], true, "{cut}");
    }
    assert!(cut["costPicoUsd"].as_u64().unwrap() > 0, "{cut}");
    assert!(cut["outputTokens"].as_u64().unwrap() > 0, "{cut}");
    let last = records.iter().find(|r| r["model"] == answered).unwrap();
    assert_eq!(last["status"], "succeeded", "{last}");
    assert_eq!(last["rescuedFrom"], json!([broken]), "{last}");
}

#[tokio::test]
async fn an_agent_stream_broken_after_content_restarts_on_the_fallback_and_validates() {
    let h = TestServer::sqlite(Spec::new(7)).await;
    // Magic Spark's primary is an Anthropic model, its fallback an OpenAI one.
    let (primary, fallback) = ("claude-sonnet-4-6", "gpt-5.4");
    for fault in faults() {
        h.sim.push_rule(Rule::once_on(primary, fault.clone()));
        let (request_id, events) = h
            .run_agent("magic-spark", ALICE, json!({ "input": business() }))
            .await;
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        let at = names
            .iter()
            .position(|n| *n == "restart")
            .unwrap_or_else(|| panic!("{fault:?}: no restart in {names:?}"));
        let restart = &events[at].1;
        assert_eq!(restart["stage"], "magicSpark");
        assert_eq!(
            (restart["from"].as_str(), restart["to"].as_str()),
            (Some(primary), Some(fallback))
        );
        assert!(restart["reason"].as_str().is_some_and(|r| !r.is_empty()));
        let discarded: usize = events[..at]
            .iter()
            .filter(|(n, _)| n == "delta")
            .map(|(_, d)| d["text"].as_str().unwrap().len())
            .sum();
        assert!(discarded > 0, "{fault:?}: content came before the break");
        assert_eq!(restart["discardedBytes"], discarded);
        assert!(
            names[at + 1..].contains(&"delta"),
            "the answer starts again"
        );
        assert_eq!(
            &names[names.len() - 2..],
            ["result", "done"],
            "{fault:?}: {names:?}"
        );
        assert!(events[names.len() - 2].1["output"]["concepts"].is_array());
        let usage = events.iter().find(|(n, _)| n == "usage").unwrap();
        assert_eq!(usage.1["rescuedFrom"], json!([primary]));
        assert_eq!(events.last().unwrap().1["status"], "succeeded");
        let records = records_of(&h, &request_id, 2).await;
        let estimated = !matches!(fault, Fault::InStreamError { .. });
        assert_billed_and_rescued(&records, primary, fallback, estimated);
    }
    let metrics = h.prometheus_text().await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("keyvex_rescued_calls_total") && l.contains(primary))
        .unwrap_or_else(|| panic!("no rescue counted:\n{metrics}"));
    assert!(line.contains("process=\"magicSpark\""), "{line}");
    assert!(line.ends_with(&format!(" {}", faults().len())), "{line}");
    h.stop().await;
}

#[tokio::test]
async fn a_pipeline_stage_broken_after_content_restarts_and_the_run_completes() {
    let h = TestServer::sqlite(Spec::new(7)).await;
    // Logic Architect's primary is an OpenAI model: the other wire than the agent test breaks.
    h.sim
        .push_rule(Rule::once_on("gpt-5.4", Fault::ResetAfter { tokens: 6 }));
    let resp = h
        .post("/v1/pipelines/tool", ALICE)
        .json(&json!({ "business": business() }))
        .send()
        .await
        .unwrap();
    let events = read_sse(resp).await;
    let restarts: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "restart")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(restarts.len(), 1, "{events:?}");
    assert_eq!(restarts[0]["stage"], "logicArchitect");
    assert_eq!(restarts[0]["from"], "gpt-5.4");
    let done = &events.last().unwrap().1;
    assert_eq!(done["status"], "succeeded", "{done}");
    // Every stage has its result, and the run its tool; only Logic Architect was restarted.
    assert!(
        events
            .iter()
            .any(|(n, d)| n == "result" && d["tool"].is_object())
    );
    for stage in [
        "magicSpark",
        "logicArchitect",
        "contentCrafter",
        "styleMaster",
    ] {
        assert!(
            events
                .iter()
                .any(|(n, d)| n == "stageResult" && d["stage"] == stage),
            "{stage}: {events:?}"
        );
    }
    h.stop().await;
}

/// The content, finish reasons, `[DONE]` count and last JSON chunks of a streamed chat answer.
struct ChatStream {
    text: String,
    finish_reasons: Vec<String>,
    done: usize,
    chunks: Vec<Value>,
}

async fn chat_stream(h: &TestServer, model: &str) -> ChatStream {
    let resp = h
        .post("/v1/chat/completions", ALICE)
        .json(&json!({
            "model": model,
            "stream": true,
            "stream_options": { "include_usage": true },
            "messages": [{ "role": "user", "content": "Describe a savings calculator for freelancers." }],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let mut out = ChatStream {
        text: String::new(),
        finish_reasons: Vec::new(),
        done: 0,
        chunks: Vec::new(),
    };
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            out.done += 1;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert!(chunk.get("error").is_none(), "{model}: {chunk}");
        if let Some(choice) = chunk["choices"].get(0) {
            if let Some(t) = choice["delta"]["content"].as_str() {
                out.text.push_str(t);
            }
            if let Some(r) = choice["finish_reason"].as_str() {
                out.finish_reasons.push(r.to_owned());
            }
        }
        out.chunks.push(chunk);
    }
    out
}

#[tokio::test]
async fn a_chat_stream_broken_after_content_is_resumed_as_one_answer() {
    let h = TestServer::sqlite(Spec::new(7)).await;
    // OpenAI and Anthropic without prefill (continued by instruction), Anthropic with prefill.
    for model in ["gpt-5.4-mini", "claude-sonnet-4-6", "claude-haiku-4-5"] {
        let whole = chat_stream(&h, model).await;
        assert_eq!(whole.done, 1);
        for fault in faults() {
            h.sim.push_rule(Rule::once_on(model, fault.clone()));
            let resumed = chat_stream(&h, model).await;
            assert_eq!(
                resumed.text, whole.text,
                "{model} {fault:?}: nothing repeated or lost"
            );
            assert_eq!(resumed.done, 1, "{model} {fault:?}");
            assert_eq!(
                resumed.finish_reasons, whole.finish_reasons,
                "{model} {fault:?}"
            );
            let last = resumed.chunks.last().unwrap();
            assert_eq!(
                last["keyvex"]["resumed"],
                json!([{ "from": model, "to": model }]),
                "{model} {fault:?}: {last}"
            );
            assert!(whole.chunks.iter().all(|c| c.get("keyvex").is_none()));
            // Usage sums both calls: two prompts, and more output than one unbroken answer.
            let (u, w) = (&last["usage"], &whole.chunks.last().unwrap()["usage"]);
            assert!(
                u["prompt_tokens"].as_u64() > w["prompt_tokens"].as_u64(),
                "{model} {fault:?}: {u} vs {w}"
            );
            assert!(u["completion_tokens"].as_u64() >= w["completion_tokens"].as_u64());
        }
    }
    // Not streamed: the same one answer, marked as resumed.
    let ask = |model: &str| {
        h.post("/v1/chat/completions", ALICE).json(&json!({
            "model": model,
            "messages": [{ "role": "user", "content": "Describe a savings calculator for freelancers." }],
        }))
    };
    let whole: Value = ask("gpt-5.4-mini")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    h.sim.push_rule(Rule::once_on(
        "gpt-5.4-mini",
        Fault::ResetAfter { tokens: 6 },
    ));
    let resumed: Value = ask("gpt-5.4-mini")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let content = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(content(&resumed), content(&whole));
    assert_eq!(
        resumed["keyvex"]["resumed"][0]["from"], "gpt-5.4-mini",
        "{resumed}"
    );
    assert!(whole.get("keyvex").is_none());
    // No model without prefill was ever sent a trailing assistant message.
    for seen in h.sim.requests() {
        if seen.model != "claude-haiku-4-5" {
            assert_eq!(
                seen.messages.last().unwrap().role,
                keyvex_engine::provider::Role::User,
                "{}",
                seen.model
            );
        }
    }
    h.stop().await;
}
