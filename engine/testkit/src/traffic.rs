//! Traffic that proves "metrics are never lost" end to end, shared by the server's in-process
//! durability tests and the binary's SIGTERM and `kill -9` tests: a mix of agent runs and chat
//! completions (streaming and not) that collects what each caller was told about, and the checks
//! that a DynamoDB table holds exactly those records under the single-table keys.

use std::collections::{BTreeSet, HashMap};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use keyvex_engine::record::RequestRecord;
use keyvex_store::{day_of, dynamo, iso_ts};
use serde_json::{Value, json};

use crate::business;
use crate::moto::{Item, n, s, scan_all};

/// DynamoDB expires request items 30 days after the request.
const TTL_SECS: u64 = 30 * 86_400;

/// The kinds of request in a mix.
#[derive(Debug, Clone, Copy)]
pub enum Call {
    Agent,
    ChatJson,
    ChatStream,
}

/// What a finished request told its caller.
pub struct Told {
    /// What identifies each record the caller was told about: an agent call's record id, a
    /// chat completion's request id.
    pub records: Vec<String>,
}

/// One request to completion. An agent run reports each model call's record in a `usage`
/// event (its `recordId`); a chat completion is one call, reported by the answer
/// (non-streaming) or the usage chunk (streaming), whose record carries the HTTP request id as
/// its correlation id (record ids are the engine's own, never shown by the chat route).
pub async fn call(http: &reqwest::Client, base: &str, key: &str, kind: Call, model: &str) -> Told {
    let req = match kind {
        Call::Agent => http
            .post(format!("{base}/v1/agents/magic-spark"))
            .json(&json!({ "input": business() })),
        Call::ChatJson => http
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({
                "model": model,
                "max_completion_tokens": 48,
                "messages": [{ "role": "user", "content": "Name one tool idea." }],
            })),
        Call::ChatStream => http
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({
                "model": model,
                "stream": true,
                "stream_options": { "include_usage": true },
                "max_completion_tokens": 48,
                "messages": [{ "role": "user", "content": "Name one tool idea." }],
            })),
    };
    let resp = req.bearer_auth(key).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{kind:?} {model}");
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    match kind {
        Call::ChatJson => {
            let body: Value = resp.json().await.unwrap();
            assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
            Told {
                records: vec![request_id],
            }
        }
        Call::ChatStream | Call::Agent => {
            let mut events = resp.bytes_stream().eventsource();
            let mut records = Vec::new();
            let mut ended = false;
            while let Some(ev) = events.next().await {
                let ev = ev.unwrap();
                if ev.data == "[DONE]" {
                    ended = true;
                    continue;
                }
                let data: Value = serde_json::from_str(&ev.data).unwrap();
                match (kind, ev.event.as_str()) {
                    (Call::Agent, "usage") => {
                        records.push(data["recordId"].as_str().unwrap().to_owned());
                    }
                    (Call::Agent, "done") => {
                        assert_eq!(data["status"], "succeeded", "{data}");
                        ended = true;
                    }
                    (Call::ChatStream, _) if !data["usage"].is_null() => {
                        records.push(request_id.clone());
                    }
                    _ => {}
                }
            }
            assert!(ended, "{kind:?} stream ended early");
            assert!(!records.is_empty(), "{kind:?} stream reported no usage");
            Told { records }
        }
    }
}

/// `rounds` × (agent run, non-streaming chat, streaming chat) with `key`, all concurrently, over both a
/// process (`magicSpark`, routed) and a catalog model (`direct`). Returns the told records
/// (record ids and chat request ids; see [`Told`]).
pub async fn drive_mix(base: &str, key: &str, rounds: usize) -> BTreeSet<String> {
    let http = reqwest::Client::new();
    let calls = (0..rounds).flat_map(|i| {
        let model = if i % 2 == 0 {
            "magicSpark"
        } else {
            "gpt-5.4-mini"
        };
        [Call::Agent, Call::ChatJson, Call::ChatStream].map(|k| (k, model))
    });
    let told = futures::future::join_all(calls.map(|(k, m)| call(&http, base, key, k, m))).await;
    let ids: Vec<String> = told.into_iter().flat_map(|t| t.records).collect();
    let set: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(set.len(), ids.len(), "record and request ids are unique");
    set
}

pub fn unique_table(tag: &str) -> String {
    format!("dur-{tag}-{}", uuid::Uuid::now_v7().simple())
}

/// The table's request items (alerts and sessions left out), by record id. Panics on a
/// duplicate record id: one item per record is part of "exactly".
pub async fn metric_items(client: &aws_sdk_dynamodb::Client, table: &str) -> HashMap<String, Item> {
    let mut out = HashMap::new();
    for item in scan_all(client, table).await {
        if !item["PK"].as_s().unwrap().starts_with("METRIC#") {
            continue;
        }
        let id = item["requestId"].as_s().unwrap().clone();
        assert!(out.insert(id.clone(), item).is_none(), "two items for {id}");
    }
    out
}

/// What identifies each stored record the way [`Told`] does: the request id of a chat
/// completion the caller was told about (the record's correlation id), otherwise the record id.
/// Panics when two records have the same: one item per told call is part of "exactly".
pub fn told_keys(items: &HashMap<String, Item>, told: &BTreeSet<String>) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for (id, item) in items {
        let key = match item.get("correlationId").and_then(|c| c.as_s().ok()) {
            Some(request_id) if told.contains(request_id) => request_id.clone(),
            _ => id.clone(),
        };
        assert!(keys.insert(key.clone()), "two items for {key}");
    }
    keys
}

/// Exactly the told records are in the table, each under the single-table keys, both GSIs'
/// attributes and a `ttl` in epoch seconds 30 days after the request, all of `user`.
pub async fn assert_exactly(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    told: &BTreeSet<String>,
    user: &str,
) {
    let items = metric_items(client, table).await;
    let stored = told_keys(&items, told);
    assert_eq!(&stored, told, "the table holds exactly the told records");
    let now_s = keyvex_engine::clock::now_ms() / 1000;
    let mut processes = BTreeSet::new();
    for (id, item) in &items {
        let rec: RequestRecord = dynamo::request_from_item(item).unwrap();
        assert_eq!(&rec.request_id, id);
        let ts = iso_ts(rec.timestamp_ms);
        assert_eq!(
            s(item, "PK"),
            format!("METRIC#{}", day_of(rec.timestamp_ms))
        );
        assert_eq!(s(item, "SK"), format!("REQUEST#{ts}#{id}"));
        assert_eq!(s(item, "GSI1PK"), format!("PROCESS#{}", rec.process));
        assert_eq!(s(item, "GSI1SK"), ts);
        assert_eq!(s(item, "GSI2PK"), format!("PROVIDER#{}", rec.provider));
        assert_eq!(s(item, "GSI2SK"), ts);
        let ttl = n(item, "ttl");
        assert_eq!(ttl, rec.timestamp_ms / 1000 + TTL_SECS, "epoch seconds");
        assert!(
            ttl.abs_diff(now_s + TTL_SECS) < 600,
            "ttl {ttl} is about now + 30 days"
        );
        assert_eq!(rec.user_id, user);
        assert!(rec.success, "{rec:?}");
        assert!(rec.output_tokens > 0 && rec.cost_pico_usd > 0, "{rec:?}");
        processes.insert(rec.process);
    }
    if !told.is_empty() {
        assert!(processes.contains("magicSpark"), "{processes:?}");
    }
}

/// `keyvex_metrics_pending` from the server's Prometheus page.
pub async fn pending_gauge(base: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("keyvex_metrics_pending{"))
        .unwrap_or_else(|| panic!("no keyvex_metrics_pending in:\n{text}"));
    let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    value as u64
}
