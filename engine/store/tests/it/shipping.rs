//! The ledger → sink path: records and alerts are never lost. The tracker, its SQLite ledger and
//! the stores run for real; DynamoDB is moto (the real SDK, never mocked), with a fault-injecting
//! proxy in between for batches of 25, throttling, partial batches, outages and refused items
//! (dead letters).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use keyvex_engine::cost::Cost;
use keyvex_engine::record::{RecordError, RequestRecord};
use keyvex_store::dynamo::{self, DynamoStore};
use keyvex_store::sqlite::SqliteStore;
use keyvex_store::{
    AlertConfig, AlertType, Entry, GroupBy, Severity, Sink, StoreError, Tracker, WriteReport,
    aggregate, iso_ts,
};
use keyvex_testkit::TempDir;
use keyvex_testkit::fault_proxy::{Fault, FaultProxy};
use keyvex_testkit::moto::{self, Moto, n, s, scan_all as scan, table};
use keyvex_testkit::{fast_metrics, fast_retry};
use tokio::time::Instant;

/// 2025-11-25T23:59:00Z: the records straddle midnight, so two day partitions are used.
const T0: u64 = 1_764_115_140_000;
const WAIT: Duration = Duration::from_secs(20);

fn records(n: u64) -> Vec<RequestRecord> {
    (0..n)
        .map(|i| {
            let (process, provider) = if i % 2 == 0 {
                ("magicSpark", "openai")
            } else {
                ("logicArchitect", "anthropic")
            };
            let rec = RequestRecord::new(&format!("user-{}", i % 3), process, provider, "m1")
                .with_timestamp_ms(T0 + i * 3_000)
                .with_latency(100 + i * 7, Some(20 + i))
                .with_cost(Cost(1_234_567 * (i + 1)));
            if i % 10 == 9 {
                rec.failed("upstream", "503 from provider")
            } else {
                rec
            }
        })
        .collect()
}

/// Records everything and waits until each record is durable in the ledger.
async fn record_all(tracker: &Tracker, recs: &[RequestRecord]) {
    let receipts: Vec<_> = recs.iter().map(|r| tracker.record(r.clone())).collect();
    for r in receipts {
        r.durable().await.unwrap();
    }
}

async fn wait_shipped(tracker: &Tracker, count: u64) {
    let (h, ok) = tracker
        .wait_for(WAIT, |h| h.shipped >= count && h.pending == 0)
        .await;
    assert!(ok, "not shipped in time: {h:?}");
}

fn request_items(
    items: &[HashMap<String, AttributeValue>],
) -> Vec<&HashMap<String, AttributeValue>> {
    items
        .iter()
        .filter(|i| s(i, "PK").starts_with("METRIC#"))
        .collect()
}

#[tokio::test]
async fn dynamo_gets_exactly_n_items_with_keys_gsis_ttl_in_25_item_batches() {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.endpoint).await;
    let client = table(&moto, "m-exact").await;
    let dir = TempDir::new("metrics-exact");
    let store =
        DynamoStore::new(moto::client(&proxy.endpoint).await, "m-exact").with_retry(fast_retry());
    let tracker = Tracker::start(fast_metrics(dir.file("l.sqlite3")), Arc::new(store.clone()))
        .await
        .unwrap();
    let recs = records(60);
    record_all(&tracker, &recs).await;
    wait_shipped(&tracker, 60).await;

    let items = scan(&client, "m-exact").await;
    assert_eq!(items.len(), 60, "exactly one item per record");
    let by_id: HashMap<String, &RequestRecord> =
        recs.iter().map(|r| (r.request_id.clone(), r)).collect();
    for item in &items {
        let rec = by_id[&s(item, "requestId")];
        let ts = iso_ts(rec.timestamp_ms);
        assert_eq!(s(item, "PK"), format!("METRIC#{}", &ts[..10]));
        assert_eq!(s(item, "SK"), format!("REQUEST#{ts}#{}", rec.request_id));
        assert_eq!(s(item, "GSI1PK"), format!("PROCESS#{}", rec.process));
        assert_eq!(s(item, "GSI1SK"), ts);
        assert_eq!(s(item, "GSI2PK"), format!("PROVIDER#{}", rec.provider));
        assert_eq!(s(item, "GSI2SK"), ts);
        assert_eq!(
            n(item, "ttl"),
            rec.timestamp_ms / 1000 + 30 * 86_400,
            "epoch seconds"
        );
        assert_eq!(n(item, "costMicroUsd"), rec.cost_micro_usd);
        assert_eq!(n(item, "costPicoUsd"), rec.cost_pico_usd);
        assert_eq!(item["success"], AttributeValue::Bool(rec.success));
    }
    let days: std::collections::BTreeSet<String> = items.iter().map(|i| s(i, "PK")).collect();
    assert_eq!(days.len(), 2, "records straddle midnight: {days:?}");

    // 60 entries in one ship batch → BatchWriteItem requests of 25, 25, 10.
    assert_eq!(proxy.batch_sizes(), vec![25, 25, 10]);

    // Queries: per-day Query on PK; the same records as the SQLite store gives back, so the
    // aggregation is identical for both.
    let mut back = store.requests_between(T0, T0 + 60 * 3_000).await.unwrap();
    back.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    let mut expected = recs.clone();
    expected.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    assert_eq!(back, expected);
    let narrow = store
        .requests_between(T0 + 3_000, T0 + 6_000)
        .await
        .unwrap();
    assert_eq!(narrow.len(), 2);
    let sqlite = SqliteStore::open(&dir.file("s.sqlite3")).unwrap();
    let entries: Vec<_> = recs.iter().cloned().map(Entry::Request).collect();
    sqlite.write(&entries).await.unwrap();
    let from_sqlite = sqlite.requests_between(T0, T0 + 60 * 3_000).await.unwrap();
    for group in [
        GroupBy::Process,
        GroupBy::Provider,
        GroupBy::Model,
        GroupBy::Day,
    ] {
        assert_eq!(aggregate(&back, group), aggregate(&from_sqlite, group));
    }
    let by_process = aggregate(&back, GroupBy::Process);
    assert_eq!(by_process.iter().map(|a| a.requests).sum::<u64>(), 60);
    assert_eq!(by_process.iter().map(|a| a.errors).sum::<u64>(), 6);
}

#[tokio::test]
async fn throttling_and_unprocessed_items_still_give_exactly_n() {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.endpoint).await;
    let client = table(&moto, "m-throttle").await;
    proxy.script([
        Fault::Throttling,
        Fault::Partial { keep: 10 },
        Fault::ProvisionedThroughputExceeded,
        Fault::Partial { keep: 3 },
    ]);
    let dir = TempDir::new("metrics-throttle");
    let store = DynamoStore::new(moto::client(&proxy.endpoint).await, "m-throttle")
        .with_retry(fast_retry());
    let tracker = Tracker::start(fast_metrics(dir.file("l.sqlite3")), Arc::new(store))
        .await
        .unwrap();
    record_all(&tracker, &records(30)).await;
    wait_shipped(&tracker, 30).await;

    assert_eq!(request_items(&scan(&client, "m-throttle").await).len(), 30);
    // Throttled requests are resent whole; after a partial write only the unprocessed rest is.
    assert_eq!(proxy.batch_sizes(), vec![25, 25, 15, 15, 12, 5]);
    let h = tracker.health();
    assert_eq!(h.retried, 4, "{h:?}");
    assert_eq!(h.failed_writes, 0);
}

#[tokio::test]
async fn outage_keeps_records_in_the_ledger_until_dynamo_is_back() {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.endpoint).await;
    let client = table(&moto, "m-outage").await;
    let dir = TempDir::new("metrics-outage");
    proxy.set_outage(true);
    let store =
        DynamoStore::new(moto::client(&proxy.endpoint).await, "m-outage").with_retry(fast_retry());
    let tracker = Tracker::start(fast_metrics(dir.file("l.sqlite3")), Arc::new(store))
        .await
        .unwrap();
    record_all(&tracker, &records(20)).await;
    // A resolved receipt means the row is committed: another connection sees it.
    let conn = rusqlite::Connection::open(dir.file("l.sqlite3")).unwrap();
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM metrics_outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 20);
    let (h, ok) = tracker.wait_for(WAIT, |h| h.failed_writes >= 3).await;
    assert!(ok, "{h:?}");
    assert_eq!((h.durable, h.shipped, h.pending), (20, 0, 20));
    assert!(h.oldest_pending_age_ms.is_some());

    proxy.set_outage(false);
    wait_shipped(&tracker, 20).await;
    assert_eq!(request_items(&scan(&client, "m-outage").await).len(), 20);
    let h = tracker.health();
    assert!(h.retried >= 3 && h.oldest_pending_age_ms.is_none(), "{h:?}");
}

#[tokio::test]
async fn restart_ships_what_an_abandoned_tracker_left_in_the_ledger() {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.endpoint).await;
    let client = table(&moto, "m-restart").await;
    let dir = TempDir::new("metrics-restart");
    let ledger = dir.file("l.sqlite3");
    proxy.set_outage(true);
    {
        let store = DynamoStore::new(moto::client(&proxy.endpoint).await, "m-restart")
            .with_retry(fast_retry());
        let tracker = Tracker::start(fast_metrics(ledger.clone()), Arc::new(store))
            .await
            .unwrap();
        record_all(&tracker, &records(15)).await;
        // Dropped without shutdown, as a crash after the receipts would.
    }
    proxy.set_outage(false);
    let store =
        DynamoStore::new(moto::client(&proxy.endpoint).await, "m-restart").with_retry(fast_retry());
    let tracker = Tracker::start(fast_metrics(ledger), Arc::new(store))
        .await
        .unwrap();
    assert_eq!(
        tracker.health().pending,
        15,
        "leftovers are counted at start"
    );
    wait_shipped(&tracker, 15).await;
    assert_eq!(request_items(&scan(&client, "m-restart").await).len(), 15);
}

#[tokio::test]
async fn shutdown_flushes_to_sqlite_and_the_store_survives_reopen() {
    let dir = TempDir::new("metrics-shutdown");
    let path = dir.file("keyvex.sqlite3");
    let mut cfg = fast_metrics(path.clone());
    // Nothing would ship before the shutdown on its own.
    cfg.flush_interval = Duration::from_secs(3600);
    let store = SqliteStore::open(&path).unwrap();
    let tracker = Tracker::start(cfg, Arc::new(store)).await.unwrap();
    let recs = records(50);
    for r in &recs {
        let _ = tracker.record(r.clone());
    }
    let report = tracker
        .shutdown(Instant::now() + Duration::from_secs(10))
        .await;
    assert!(report.ledger_flushed && !report.deadline_hit, "{report:?}");
    assert_eq!((report.shipped, report.left_in_ledger), (50, 0));
    let late = tracker.record(records(1).remove(0)).durable().await;
    assert!(matches!(late, Err(RecordError::Closed)), "{late:?}");
    drop(tracker);

    let reopened = SqliteStore::open(&path).unwrap();
    let back = reopened
        .requests_between(T0, T0 + 50 * 3_000)
        .await
        .unwrap();
    assert_eq!(back.len(), 50);
    assert_eq!(back[0], recs[0]);
}

#[tokio::test]
async fn shutdown_deadline_leaves_the_rest_in_the_ledger_for_the_next_start() {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.endpoint).await;
    let client = table(&moto, "m-deadline").await;
    let dir = TempDir::new("metrics-deadline");
    let ledger = dir.file("l.sqlite3");
    proxy.set_outage(true);
    let store = DynamoStore::new(moto::client(&proxy.endpoint).await, "m-deadline")
        .with_retry(fast_retry());
    let tracker = Tracker::start(fast_metrics(ledger.clone()), Arc::new(store))
        .await
        .unwrap();
    for r in records(10) {
        let _ = tracker.record(r);
    }
    let report = tracker
        .shutdown(Instant::now() + Duration::from_millis(300))
        .await;
    assert!(report.ledger_flushed && report.deadline_hit, "{report:?}");
    assert_eq!((report.shipped, report.left_in_ledger), (0, 10));
    drop(tracker);

    proxy.set_outage(false);
    let store = DynamoStore::new(moto::client(&proxy.endpoint).await, "m-deadline")
        .with_retry(fast_retry());
    let tracker = Tracker::start(fast_metrics(ledger), Arc::new(store))
        .await
        .unwrap();
    let report = tracker
        .shutdown(Instant::now() + Duration::from_secs(10))
        .await;
    assert_eq!(
        (report.shipped, report.left_in_ledger),
        (10, 0),
        "{report:?}"
    );
    assert_eq!(request_items(&scan(&client, "m-deadline").await).len(), 10);
}

fn expensive_runs() -> Vec<RequestRecord> {
    // Two runs of over-$1 requests separated by a cheap one: two episodes, two alerts.
    [2_000_000u64, 3_000_000, 1_000, 5_000_000, 5_000_000]
        .iter()
        .enumerate()
        .map(|(i, micro)| {
            RequestRecord::new("u", "styleMaster", "openai", "m")
                .with_timestamp_ms(T0 + i as u64 * 1_000)
                .with_latency(10, None)
                .with_cost(Cost::from_micro_usd(*micro))
        })
        .collect()
}

#[tokio::test]
async fn alerts_once_per_episode_in_dynamo_and_sqlite() {
    let moto = Moto::start().await;
    let client = table(&moto, "m-alerts").await;
    let dir = TempDir::new("metrics-alerts");
    let mut cfg = fast_metrics(dir.file("l.sqlite3"));
    cfg.alerts = AlertConfig::default();
    let store = DynamoStore::new(moto::client(&moto.endpoint).await, "m-alerts");
    let tracker = Tracker::start(cfg, Arc::new(store.clone())).await.unwrap();
    record_all(&tracker, &expensive_runs()).await;
    let report = tracker
        .shutdown(Instant::now() + Duration::from_secs(10))
        .await;
    assert_eq!(report.left_in_ledger, 0);
    assert_eq!(tracker.health().alerts_raised, 2);

    let items = scan(&client, "m-alerts").await;
    let alerts: Vec<_> = items
        .iter()
        .filter(|i| s(i, "PK").starts_with("ALERT#"))
        .collect();
    assert_eq!(alerts.len(), 2);
    for item in &alerts {
        assert_eq!(s(item, "SK"), "ALERT");
        assert_eq!(s(item, "GSI1PK"), "ALERT_TYPE#cost_per_request");
        assert!(s(item, "GSI1SK").starts_with("warning#2025-11-25T23:59:0"));
        assert_eq!(n(item, "ttl"), n(item, "timestampMs") / 1000 + 90 * 86_400);
    }
    let back = store.alerts_between(T0, T0 + 10_000).await.unwrap();
    assert_eq!(back.len(), 2);
    assert!(
        back.iter()
            .all(|a| a.alert_type == AlertType::CostPerRequest)
    );

    // The same records through the embedded store.
    let dir2 = TempDir::new("metrics-alerts-sqlite");
    let path = dir2.file("k.sqlite3");
    let sqlite = SqliteStore::open(&path).unwrap();
    let tracker = Tracker::start(fast_metrics(path), Arc::new(sqlite.clone()))
        .await
        .unwrap();
    record_all(&tracker, &expensive_runs()).await;
    tracker
        .shutdown(Instant::now() + Duration::from_secs(10))
        .await;
    let stored = sqlite.alerts_between(T0, T0 + 10_000).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert!(
        stored
            .iter()
            .all(|a| a.alert_type == AlertType::CostPerRequest && a.severity == Severity::Warning)
    );
}

#[tokio::test]
async fn create_table_is_idempotent_with_gsis_on_demand_and_ttl() {
    let moto = Moto::start().await;
    let client = moto::client(&moto.endpoint).await;
    dynamo::create_table(&client, "m-create").await.unwrap();
    dynamo::create_table(&client, "m-create").await.unwrap();
    let desc = client
        .describe_table()
        .table_name("m-create")
        .send()
        .await
        .unwrap();
    let t = desc.table().unwrap();
    let mut gsis: Vec<(String, String)> = t
        .global_secondary_indexes()
        .iter()
        .map(|g| {
            (
                g.index_name().unwrap().to_owned(),
                g.projection()
                    .unwrap()
                    .projection_type()
                    .unwrap()
                    .as_str()
                    .to_owned(),
            )
        })
        .collect();
    gsis.sort();
    assert_eq!(
        gsis,
        vec![("GSI1".into(), "ALL".into()), ("GSI2".into(), "ALL".into())]
    );
    assert_eq!(
        t.billing_mode_summary()
            .and_then(|b| b.billing_mode())
            .map(|b| b.as_str()),
        Some("PAY_PER_REQUEST")
    );
    let ttl = client
        .describe_time_to_live()
        .table_name("m-create")
        .send()
        .await
        .unwrap();
    let ttl = ttl.time_to_live_description().unwrap();
    assert_eq!(ttl.attribute_name(), Some("ttl"));
    assert_eq!(
        ttl.time_to_live_status().map(|s| s.as_str()),
        Some("ENABLED")
    );
}

#[tokio::test]
async fn records_are_group_committed_and_a_full_batch_ships_without_waiting_for_the_interval() {
    let dir = TempDir::new("metrics-group");
    let path = dir.file("k.sqlite3");
    let mut cfg = fast_metrics(path.clone());
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship_batch = 1000;
    let sqlite = SqliteStore::open(&path).unwrap();
    let tracker = Tracker::start(cfg, Arc::new(sqlite.clone())).await.unwrap();
    // On this current-thread runtime the ledger runs only once we await, so all 1000 records are
    // queued by then: two transactions of at most 512 (the default commit batch).
    record_all(&tracker, &records(1000)).await;
    let h = tracker.health();
    assert_eq!(
        (h.accepted, h.durable, h.ledger_commits),
        (1000, 1000, 2),
        "{h:?}"
    );
    // 1000 pending = a full ship batch: shipped now, long before the one-hour interval.
    wait_shipped(&tracker, 1000).await;
    let back = sqlite
        .requests_between(T0, T0 + 1000 * 3_000)
        .await
        .unwrap();
    assert_eq!(back.len(), 1000);
}

/// `records(n)` with the request ids at `poisoned` replaced by `poison-{i}`, so a fault can
/// target them.
fn records_with_poison(n: u64, poisoned: &[usize]) -> Vec<RequestRecord> {
    let mut recs = records(n);
    for &i in poisoned {
        recs[i] = recs[i].clone().with_request_id(&format!("poison-{i}"));
    }
    recs
}

#[tokio::test]
async fn dynamo_refusing_one_item_ships_the_rest_dead_letters_it_and_requeue_delivers_it() {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.endpoint).await;
    let client = table(&moto, "m-dead").await;
    proxy.reject_batches_containing(Some("poison-7"));
    let dir = TempDir::new("metrics-dead");
    let ledger = dir.file("l.sqlite3");
    let store =
        DynamoStore::new(moto::client(&proxy.endpoint).await, "m-dead").with_retry(fast_retry());
    let tracker = Tracker::start(fast_metrics(ledger.clone()), Arc::new(store))
        .await
        .unwrap();
    record_all(&tracker, &records_with_poison(30, &[7])).await;
    let (h, ok) = tracker
        .wait_for(WAIT, |h| h.dead_letters == 1 && h.pending == 0)
        .await;
    assert!(ok, "{h:?}");

    let ids: Vec<String> = request_items(&scan(&client, "m-dead").await)
        .iter()
        .map(|i| s(i, "requestId"))
        .collect();
    assert_eq!(ids.len(), 29, "every other item arrived");
    assert!(!ids.contains(&"poison-7".to_owned()));
    // One 30-entry write (split 25 + 5 by the sink; the first request is refused), then halves:
    // [0,15) refused, [0,7) ok, [7,15) refused, [7,11), [7,9), [7,8) refused → dead letter,
    // then [8,9), [9,11), [11,15), [15,30) ship.
    assert_eq!(
        proxy.batch_sizes(),
        vec![25, 15, 7, 8, 4, 2, 1, 1, 2, 4, 15]
    );
    assert_eq!(
        (h.shipped, h.dead_lettered, h.dead_letters, h.failed_writes),
        (29, 1, 1, 6),
        "{h:?}"
    );
    assert_eq!((h.retried, h.consecutive_failures), (0, 0), "{h:?}");
    let last = h.last_error.as_deref().unwrap();
    assert!(last.contains("ValidationException"), "{last}");

    let dead = tracker.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].key.as_str(), dead[0].kind.as_str()),
        ("poison-7", "request")
    );
    assert_eq!(dead[0].entry["requestId"], "poison-7");
    assert!(
        dead[0]
            .error
            .contains("Item size has exceeded the maximum allowed size"),
        "{}",
        dead[0].error
    );
    assert!(dead[0].dead_lettered_ms >= dead[0].accepted_ms);
    // Kept in the ledger file itself, not only in memory.
    let conn = rusqlite::Connection::open(&ledger).unwrap();
    let held: i64 = conn
        .query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))
        .unwrap();
    assert_eq!(held, 1);

    // The operator fixes the cause and requeues: the entry arrives.
    proxy.reject_batches_containing(None);
    assert_eq!(tracker.requeue_dead_letters().await.unwrap(), 1);
    let (h, ok) = tracker
        .wait_for(WAIT, |h| h.shipped == 30 && h.pending == 0)
        .await;
    assert!(ok, "{h:?}");
    assert_eq!(
        (h.dead_letters, h.dead_lettered, h.requeued),
        (0, 1, 1),
        "{h:?}"
    );
    assert!(tracker.dead_letters(10).await.unwrap().is_empty());
    let items = scan(&client, "m-dead").await;
    assert_eq!(request_items(&items).len(), 30);
    assert!(items.iter().any(|i| s(i, "requestId") == "poison-7"));
    let report = tracker
        .shutdown(Instant::now() + Duration::from_secs(10))
        .await;
    assert_eq!(
        (
            report.left_in_ledger,
            report.dead_lettered,
            report.dead_letters
        ),
        (0, 1, 0),
        "{report:?}"
    );
}

#[tokio::test]
async fn sqlite_constraint_refusal_is_dead_lettered_reported_at_shutdown_kept_and_requeued() {
    let dir = TempDir::new("metrics-dead-sqlite");
    // Ledger and store share the file, as in the default deployment.
    let path = dir.file("keyvex.sqlite3");
    let store = SqliteStore::open(&path).unwrap();
    // A real SQLite constraint error from the store's own insert: a trigger refusing one id.
    let admin = rusqlite::Connection::open(&path).unwrap();
    admin
        .execute_batch(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON requests
               WHEN NEW.request_id = 'poison-3'
               BEGIN SELECT RAISE(ABORT, 'request poison-3 violates a check'); END;",
        )
        .unwrap();
    let mut cfg = fast_metrics(path.clone());
    cfg.flush_interval = Duration::from_secs(3600);
    let tracker = Tracker::start(cfg.clone(), Arc::new(store.clone()))
        .await
        .unwrap();
    record_all(&tracker, &records_with_poison(20, &[3])).await;
    let report = tracker
        .shutdown(Instant::now() + Duration::from_secs(10))
        .await;
    assert!(!report.deadline_hit, "{report:?}");
    assert_eq!(
        (
            report.shipped,
            report.left_in_ledger,
            report.dead_lettered,
            report.dead_letters
        ),
        (19, 0, 1, 1),
        "nothing lost: 19 shipped, 1 set aside: {report:?}"
    );
    assert_eq!(
        store.requests_between(T0, T0 + 60_000).await.unwrap().len(),
        19
    );
    drop(tracker);

    // The next start still holds it and says so.
    let tracker = Tracker::start(cfg, Arc::new(store.clone())).await.unwrap();
    let h = tracker.health();
    assert_eq!(
        (h.dead_letters, h.dead_lettered, h.pending),
        (1, 0, 0),
        "{h:?}"
    );
    let dead = tracker.dead_letters(10).await.unwrap();
    assert_eq!(dead[0].key, "poison-3");
    assert!(
        dead[0].error.contains("poison-3 violates a check"),
        "{}",
        dead[0].error
    );

    // Requeued before the cause is fixed: refused again, back in dead letters, nothing stuck.
    assert_eq!(tracker.requeue_dead_letters().await.unwrap(), 1);
    let report = tracker
        .shutdown(Instant::now() + Duration::from_secs(10))
        .await;
    assert_eq!(
        (
            report.left_in_ledger,
            report.dead_lettered,
            report.dead_letters
        ),
        (0, 1, 1),
        "{report:?}"
    );
    drop(tracker);

    admin.execute_batch("DROP TRIGGER refuse_poison").unwrap();
    let mut cfg = fast_metrics(path.clone());
    cfg.flush_interval = Duration::from_millis(20);
    let tracker = Tracker::start(cfg, Arc::new(store.clone())).await.unwrap();
    assert_eq!(tracker.requeue_dead_letters().await.unwrap(), 1);
    let (h, ok) = tracker
        .wait_for(WAIT, |h| h.shipped == 1 && h.pending == 0)
        .await;
    assert!(ok, "{h:?}");
    assert_eq!(h.dead_letters, 0, "{h:?}");
    let back = store.requests_between(T0, T0 + 60_000).await.unwrap();
    assert_eq!(back.len(), 20);
    assert!(back.iter().any(|r| r.request_id == "poison-3"));
}

/// An in-memory sink with scripted failures: while `down` it fails every write with a
/// non-retryable configuration error (which must not dead-letter anything), `script` fails the
/// next writes in order (`None` = behave normally), and it refuses any batch holding a key of
/// `refused`.
struct ScriptedSink {
    stored: std::sync::Mutex<HashMap<String, Entry>>,
    refused: Vec<String>,
    down: std::sync::atomic::AtomicBool,
    script: std::sync::Mutex<std::collections::VecDeque<Option<StoreError>>>,
}

impl Sink for ScriptedSink {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn write<'a>(
        &'a self,
        entries: &'a [Entry],
    ) -> futures::future::BoxFuture<'a, Result<WriteReport, StoreError>> {
        Box::pin(async move {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Dynamo {
                    operation: "BatchWriteItem",
                    table: "m".into(),
                    message: "AccessDeniedException: not authorized".into(),
                    retryable: false,
                });
            }
            if let Some(Some(err)) = self.script.lock().unwrap().pop_front() {
                return Err(err);
            }
            if let Some(bad) = entries
                .iter()
                .find(|e| self.refused.iter().any(|r| *r == e.key()))
            {
                return Err(StoreError::Rejected {
                    sink: "scripted",
                    message: format!("entry {} is refused", bad.key()),
                });
            }
            let mut stored = self.stored.lock().unwrap();
            for e in entries {
                stored.insert(e.key().into_owned(), e.clone());
            }
            Ok(WriteReport::default())
        })
    }
}

#[tokio::test]
async fn config_errors_never_dead_letter_and_isolation_survives_a_transient_failure() {
    let dir = TempDir::new("metrics-isolate");
    let poisoned = [0, 50, 99];
    let sink = Arc::new(ScriptedSink {
        stored: Default::default(),
        refused: poisoned.iter().map(|i| format!("poison-{i}")).collect(),
        down: true.into(),
        // Once up: the whole batch and its first half are refused, then the connection drops
        // in the middle of the search.
        script: std::sync::Mutex::new(
            [
                None,
                None,
                Some(StoreError::Task("connection reset".into())),
            ]
            .into(),
        ),
    });
    let tracker = Tracker::start(fast_metrics(dir.file("l.sqlite3")), sink.clone())
        .await
        .unwrap();
    record_all(&tracker, &records_with_poison(100, &poisoned)).await;

    // A store-wide permanent error (denied access): pending grows, nothing is set aside, and
    // health says why.
    let (h, ok) = tracker
        .wait_for(WAIT, |h| h.consecutive_failures >= 3)
        .await;
    assert!(ok, "{h:?}");
    assert_eq!(
        (h.pending, h.shipped, h.dead_lettered),
        (100, 0, 0),
        "{h:?}"
    );
    assert!(
        h.last_error.as_deref().unwrap().contains("AccessDenied"),
        "{h:?}"
    );
    assert!(h.last_error_age_ms.is_some());

    sink.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let (h, ok) = tracker
        .wait_for(WAIT, |h| h.pending == 0 && h.dead_letters == 3)
        .await;
    assert!(ok, "{h:?}");
    assert_eq!(
        (h.shipped, h.dead_lettered, h.consecutive_failures),
        (97, 3, 0),
        "{h:?}"
    );
    assert!(
        h.retried >= 4,
        "config errors and the reset were retried: {h:?}"
    );
    let stored = sink.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 97);
    assert!(stored.keys().all(|k| !k.starts_with("poison-")));
    // Newest first, and the limit holds.
    let keys: Vec<String> = tracker
        .dead_letters(2)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.key)
        .collect();
    assert_eq!(keys, vec!["poison-99", "poison-50"]);
}
