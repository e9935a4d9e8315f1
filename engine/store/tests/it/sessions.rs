//! Integration tests: conversation sessions travel the durable metrics path (tracker → ledger →
//! shipper → SQLite or DynamoDB on moto) and read back in order, including messages that are
//! durable in the ledger but not shipped yet; DynamoDB reads are `Query` only.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use futures::future::BoxFuture;
use keyvex_engine::record::SessionMessage;
use keyvex_store::admin::{AdminError, get_session_json, user_sessions_json};
use keyvex_store::dynamo::{self, DynamoStore};
use keyvex_store::sessions::{Role, Session, SessionMetadata, SessionStore};
use keyvex_store::sqlite::SqliteStore;
use keyvex_store::{Entry, Sink, StoreError, Tracker, WriteReport, iso_ts};
use keyvex_testkit::TempDir;
use keyvex_testkit::fault_proxy::FaultProxy;
use keyvex_testkit::moto::{self, Moto};
use keyvex_testkit::{fast_metrics, fast_retry};
use serde_json::json;

/// 2025-11-25T14:21:07.123Z
const T0: u64 = 1_764_080_467_123;
const WAIT: Duration = Duration::from_secs(20);

/// A two-turn conversation: the user's input and the agent's output, twice.
fn conversation(session: &str, user: &str, t0: u64) -> Vec<SessionMessage> {
    let turn = |i: u64, role: Role, content: serde_json::Value| {
        SessionMessage::new(session, user, role, "magicSpark", content)
            .with_message_id(&format!("{session}-m{i}"))
            .with_timestamp_ms(t0 + i * 1_000)
            .with_request(&format!("{session}-req{}", i / 2))
            .with_run(&format!("{session}-run"), "magicSpark")
    };
    vec![
        turn(
            0,
            Role::User,
            json!({"business": "bakery", "goal": "more orders"}),
        ),
        turn(
            1,
            Role::Assistant,
            json!({"ideas": ["pre-order app", "loyalty"]}),
        ),
        turn(2, Role::User, json!("make it cheaper")),
        turn(
            3,
            Role::Assistant,
            json!({"ideas": ["loyalty"], "cost": 1.5}),
        ),
    ]
}

/// Records in a scrambled order (the read side orders by time) and waits for the receipts.
async fn record_all(tracker: &Tracker, msgs: &[SessionMessage]) {
    let mut order: Vec<&SessionMessage> = msgs.iter().collect();
    order.reverse();
    order.rotate_left(1);
    let receipts: Vec<_> = order
        .into_iter()
        .map(|m| tracker.record_session_message(m.clone()))
        .collect();
    for r in receipts {
        r.durable().await.unwrap();
    }
}

async fn wait_shipped(tracker: &Tracker) {
    let (h, ok) = tracker
        .wait_for(WAIT, |h| h.pending == 0 && h.shipped == h.durable)
        .await;
    assert!(ok, "not shipped in time: {h:?}");
}

/// Checks a read against the conversation it was recorded from.
fn assert_session(got: &Session, want: &[SessionMessage]) {
    assert_eq!(got.messages, want, "messages in time order, bodies intact");
    assert_eq!(got.message_count, want.len());
    let meta = &got.metadata;
    assert_eq!(meta.session_id, want[0].session_id);
    assert_eq!(meta.user_id, want[0].user_id);
    assert_eq!(meta.created_at_ms, want[0].timestamp_ms);
    assert_eq!(meta.updated_at_ms, want[want.len() - 1].timestamp_ms);
    assert_eq!(meta.last_message_id, want[want.len() - 1].message_id);
}

/// A sink that refuses writes until opened: "durable but not shipped" without any timing.
struct Gate {
    inner: SqliteStore,
    open: AtomicBool,
}

impl Sink for Gate {
    fn name(&self) -> &'static str {
        "gated-sqlite"
    }

    fn write<'a>(&'a self, entries: &'a [Entry]) -> BoxFuture<'a, Result<WriteReport, StoreError>> {
        Box::pin(async move {
            if !self.open.load(Ordering::SeqCst) {
                return Err(StoreError::Task("gate closed".into()));
            }
            self.inner.write(entries).await
        })
    }
}

#[tokio::test]
async fn sqlite_session_is_readable_right_after_durable_and_after_shipping() {
    let dir = TempDir::new("sessions-sqlite");
    let path = dir.file("keyvex.sqlite3");
    let sqlite = SqliteStore::open(&path).unwrap();
    let gate = Arc::new(Gate {
        inner: sqlite.clone(),
        open: AtomicBool::new(false),
    });
    let tracker = Tracker::start(fast_metrics(path.clone()), gate.clone())
        .await
        .unwrap();
    let merged = SessionStore::sqlite(sqlite.clone()).with_pending(Arc::new(tracker.clone()));
    let stored_only = SessionStore::sqlite(sqlite.clone());
    let s1 = conversation("s1", "u1", T0);
    record_all(&tracker, &s1).await;

    // Durable, not shipped: the store has nothing, the merged read has everything.
    assert_eq!(tracker.health().pending, 4);
    assert!(stored_only.get_session("s1").await.unwrap().is_none());
    assert_session(&merged.get_session("s1").await.unwrap().unwrap(), &s1);
    // The owner is known from the pending messages alone, and only through the merged read.
    assert_eq!(merged.owner("s1").await.unwrap().as_deref(), Some("u1"));
    assert_eq!(stored_only.owner("s1").await.unwrap(), None);
    let listed = merged.sessions_of_user("u1", 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].updated_at_ms, T0 + 3_000);

    gate.open.store(true, Ordering::SeqCst);
    wait_shipped(&tracker).await;
    assert_session(&stored_only.get_session("s1").await.unwrap().unwrap(), &s1);
    assert_session(&merged.get_session("s1").await.unwrap().unwrap(), &s1);
    assert!(merged.get_session("nope").await.unwrap().is_none());
    // Shipped: the metadata row names the owner.
    assert_eq!(
        stored_only.owner("s1").await.unwrap().as_deref(),
        Some("u1")
    );
    assert_eq!(merged.owner("nope").await.unwrap(), None);

    // The handler returns the API's camelCase JSON, and a missing session is a 404.
    let body = get_session_json(&merged, "s1").await.unwrap();
    assert_eq!(body["messageCount"], 4);
    assert_eq!(body["metadata"]["userId"], "u1");
    assert_eq!(body["messages"][1]["role"], "assistant");
    assert_eq!(body["messages"][1]["content"]["ideas"][0], "pre-order app");
    assert_eq!(body["messages"][2]["content"], "make it cheaper");
    assert_eq!(body["messages"][0]["runId"], "s1-run");
    let missing = get_session_json(&merged, "nope").await.unwrap_err();
    assert!(matches!(missing, AdminError::NotFound { .. }), "{missing}");
    assert_eq!(missing.status(), http::StatusCode::NOT_FOUND);

    // The store survives a restart of everything.
    tracker.shutdown(tokio::time::Instant::now() + WAIT).await;
    drop((merged, stored_only, sqlite));
    let reopened = SessionStore::sqlite(SqliteStore::open(&path).unwrap());
    assert_session(&reopened.get_session("s1").await.unwrap().unwrap(), &s1);
}

#[tokio::test]
async fn sessions_of_user_are_most_recent_first_in_sqlite() {
    let dir = TempDir::new("sessions-list");
    let path = dir.file("keyvex.sqlite3");
    let sqlite = SqliteStore::open(&path).unwrap();
    let tracker = Tracker::start(fast_metrics(path), Arc::new(sqlite.clone()))
        .await
        .unwrap();
    for (session, user, t0) in [
        ("a", "u1", T0),
        ("b", "u1", T0 + 60_000),
        ("c", "u1", T0 + 30_000),
        ("d", "u2", T0 + 90_000),
    ] {
        record_all(&tracker, &conversation(session, user, t0)).await;
    }
    wait_shipped(&tracker).await;
    let store = SessionStore::sqlite(sqlite);
    let ids =
        |v: Vec<SessionMetadata>| -> Vec<String> { v.into_iter().map(|m| m.session_id).collect() };
    assert_eq!(
        ids(store.sessions_of_user("u1", 10).await.unwrap()),
        ["b", "c", "a"]
    );
    assert_eq!(
        ids(store.sessions_of_user("u1", 2).await.unwrap()),
        ["b", "c"]
    );
    assert_eq!(ids(store.sessions_of_user("u2", 10).await.unwrap()), ["d"]);
    assert!(store.sessions_of_user("u3", 10).await.unwrap().is_empty());

    let body = user_sessions_json(&store, "u1", &HashMap::from([("limit".into(), "1".into())]))
        .await
        .unwrap();
    assert_eq!(body["sessions"][0]["sessionId"], "b");
    assert_eq!(body["sessions"].as_array().unwrap().len(), 1);
    let err = user_sessions_json(&store, "u1", &HashMap::from([("limit".into(), "0".into())]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("limit=\"0\"") && err.contains("1 to 100"),
        "{err}"
    );
}

/// Metadata is a min/max over messages, so batches that arrive late, out of order or twice
/// never move it backwards — in either store.
#[tokio::test]
async fn metadata_is_order_independent_and_idempotent_in_both_stores() {
    let moto = Moto::start().await;
    let client = moto::client(&moto.endpoint).await;
    dynamo::create_table(&client, "s-meta").await.unwrap();
    let dir = TempDir::new("sessions-meta");
    let sqlite = SqliteStore::open(&dir.file("s.sqlite3")).unwrap();
    let dynamo = DynamoStore::new(client, "s-meta").with_retry(fast_retry());
    let msgs: Vec<Entry> = conversation("s9", "u9", T0)
        .into_iter()
        .map(Entry::Message)
        .collect();
    // Latest turn first, then the earliest alone, then everything again.
    let batches: [&[Entry]; 3] = [&msgs[2..], &msgs[..1], &msgs];
    for batch in batches {
        sqlite.write(batch).await.unwrap();
        dynamo.write(batch).await.unwrap();
    }
    let want: Vec<SessionMessage> = conversation("s9", "u9", T0);
    for store in [SessionStore::sqlite(sqlite), SessionStore::dynamo(dynamo)] {
        assert_session(&store.get_session("s9").await.unwrap().unwrap(), &want);
    }
}

#[tokio::test]
async fn dynamo_session_items_have_single_table_keys_and_reads_never_scan() {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.endpoint).await;
    let direct = moto::client(&moto.endpoint).await;
    dynamo::create_table(&direct, "s-main").await.unwrap();
    let dir = TempDir::new("sessions-dynamo");
    let proxied =
        DynamoStore::new(moto::client(&proxy.endpoint).await, "s-main").with_retry(fast_retry());
    let tracker = Tracker::start(
        fast_metrics(dir.file("l.sqlite3")),
        Arc::new(proxied.clone()),
    )
    .await
    .unwrap();

    // DynamoDB is unreachable: the messages are durable in the ledger only, and a read (which
    // goes straight to the table) still sees them through the pending merge.
    proxy.set_outage(true);
    let s1 = conversation("s1", "u1", T0);
    record_all(&tracker, &s1).await;
    let direct_store = DynamoStore::new(direct.clone(), "s-main");
    let merged = SessionStore::dynamo(direct_store.clone()).with_pending(Arc::new(tracker.clone()));
    assert!(
        SessionStore::dynamo(direct_store.clone())
            .get_session("s1")
            .await
            .unwrap()
            .is_none()
    );
    assert_session(&merged.get_session("s1").await.unwrap().unwrap(), &s1);

    proxy.set_outage(false);
    for (session, t0) in [("s2", T0 + 60_000), ("s3", T0 + 30_000)] {
        record_all(&tracker, &conversation(session, "u1", t0)).await;
    }
    record_all(&tracker, &conversation("s4", "u2", T0)).await;
    wait_shipped(&tracker).await;

    // The items, by key shape.
    let items = direct
        .query()
        .table_name("s-main")
        .key_condition_expression("PK = :pk")
        .expression_attribute_values(":pk", AttributeValue::S("SESSION#s1".into()))
        .send()
        .await
        .unwrap()
        .items
        .unwrap();
    let s = |item: &HashMap<String, AttributeValue>, k: &str| item[k].as_s().unwrap().clone();
    let sks: Vec<String> = items.iter().map(|i| s(i, "SK")).collect();
    let mut want_sks: Vec<String> = s1
        .iter()
        .map(|m| format!("MESSAGE#{}#{}", iso_ts(m.timestamp_ms), m.message_id))
        .collect();
    want_sks.push("METADATA".into());
    assert_eq!(sks, want_sks);
    let meta = &items[4];
    assert_eq!(s(meta, "GSI1PK"), "USER#u1");
    assert_eq!(s(meta, "GSI1SK"), format!("SESSION#{}", iso_ts(T0 + 3_000)));
    assert_eq!(meta["createdAtMs"].as_n().unwrap(), &T0.to_string());
    assert_eq!(s(meta, "entityType"), "SESSION");
    let first = &items[0];
    assert_eq!(s(first, "role"), "user");
    assert_eq!(s(first, "requestId"), "s1-req0");
    assert_eq!(s(first, "runId"), "s1-run");
    assert_eq!(s(first, "stage"), "magicSpark");
    assert!(!first.contains_key("GSI1PK"), "messages stay out of GSI1");
    let content: serde_json::Value = serde_json::from_str(&s(first, "content")).unwrap();
    assert_eq!(content["business"], "bakery");

    // Reads through the proxy: the session by its partition, the user's sessions by GSI1.
    proxy.clear_log();
    let store = SessionStore::dynamo(proxied).with_pending(Arc::new(tracker.clone()));
    assert_session(&store.get_session("s1").await.unwrap().unwrap(), &s1);
    let listed: Vec<String> = store
        .sessions_of_user("u1", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.session_id)
        .collect();
    assert_eq!(listed, ["s2", "s3", "s1"]);
    let top = store.sessions_of_user("u1", 1).await.unwrap();
    assert_eq!(top.len(), 1);
    assert_eq!(top[0].session_id, "s2");
    assert_eq!(top[0].created_at_ms, T0 + 60_000);
    // The owner check reads the one METADATA item of the partition, by key.
    assert_eq!(store.owner("s4").await.unwrap().as_deref(), Some("u2"));
    assert_eq!(store.owner("nope").await.unwrap(), None);
    let log = proxy.log();
    assert!(log.iter().all(|r| r.operation == "Query"), "{log:?}");
    assert_eq!(
        log.iter().map(|r| r.index.as_deref()).collect::<Vec<_>>(),
        [None, Some("GSI1"), Some("GSI1"), None, None]
    );
}
