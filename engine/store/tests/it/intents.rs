//! Crash-safe billing in the store: a call intent whose record never came is recorded as
//! `interrupted` — by the next tracker on the same ledger once its writer is gone (at start,
//! later while running, or by the writer itself at shutdown), and on DynamoDB by another
//! replica once the writer has been silent too long, even with its ledger lost. A call's own
//! record always wins over its intent, and nothing is recorded twice. Real SQLite files, real
//! DynamoDB API (moto).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use keyvex_engine::clock::now_ms;
use keyvex_engine::cost::Cost;
use keyvex_engine::record::{CallIntent, RequestRecord, RequestStatus};
use keyvex_store::admin::MetricsFilter;
use keyvex_store::dynamo;
use keyvex_store::sqlite::SqliteStore;
use keyvex_store::{MetricsConfig, StoreConfig, Stores};
use keyvex_testkit::moto::{Moto, n, s, scan_all, table};
use keyvex_testkit::{TempDir, fast_metrics};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(20);

/// The intent of a call of `alice` started now with `prompt` tokens, and the record it would
/// leave interrupted.
fn intent(id: &str, prompt: u64) -> CallIntent {
    let now = now_ms();
    let record = RequestRecord::new("alice", "magicSpark", "openai", "gpt-5.4-mini")
        .with_request_id(id)
        .with_timestamp_ms(now)
        .with_usage(&keyvex_engine::Usage {
            input: prompt,
            ..Default::default()
        })
        .with_cost(Cost(prompt * 750_000))
        .with_cost_estimated(true)
        .with_run("run-1", "magicSpark", None)
        .interrupted("the process stopped while this call was in flight");
    CallIntent {
        record,
        call_started_ms: now,
        spend: None,
    }
}

/// The finished record of the call `intent` stood for.
fn finished(intent: &CallIntent) -> RequestRecord {
    let mut rec = intent.record.clone();
    rec.status = RequestStatus::Succeeded;
    rec.success = true;
    rec.error_kind = None;
    rec.error = None;
    rec.cost_estimated = false;
    rec.output_tokens = 40;
    rec.with_latency(900, Some(120))
}

fn metrics(ledger: &Path, lost_after_ms: u64) -> MetricsConfig {
    let mut cfg = fast_metrics(ledger);
    cfg.replica_lost_after = Duration::from_millis(lost_after_ms);
    cfg
}

async fn sqlite(ledger: &Path, lost_after_ms: u64) -> Stores {
    sqlite_with(ledger, metrics(ledger, lost_after_ms)).await
}

async fn sqlite_with(ledger: &Path, cfg: MetricsConfig) -> Stores {
    Stores::open(
        &StoreConfig::Sqlite {
            path: ledger.to_owned(),
        },
        cfg,
    )
    .await
    .unwrap()
}

/// Hands over `intents`, then records `records`, and waits until all of it is committed (an
/// intent is committed with the group of the next record at the latest; the marker record is
/// the last thing sent).
async fn write(stores: &Stores, intents: &[CallIntent], records: &[RequestRecord]) {
    for i in intents {
        stores.tracker.record_intent(i.clone());
    }
    let mut receipts: Vec<_> = records
        .iter()
        .map(|r| stores.tracker.record(r.clone()))
        .collect();
    let marker = RequestRecord::new("marker", "direct", "openai", "m")
        .with_request_id(&format!("marker-{}", uuid::Uuid::now_v7()));
    receipts.push(stores.tracker.record(marker));
    for r in receipts {
        r.durable().await.unwrap();
    }
}

/// Waits until no process holds an owner lock of the ledger: a dropped tracker lets go once its
/// tasks have ended, as a killed process's locks go with it.
async fn wait_owners_gone(ledger: &Path) {
    let dir = ledger.with_file_name(format!(
        "{}.owners",
        ledger.file_name().unwrap().to_string_lossy()
    ));
    let deadline = Instant::now() + WAIT;
    'again: loop {
        assert!(
            Instant::now() < deadline,
            "owner locks still held in {}",
            dir.display()
        );
        for entry in std::fs::read_dir(&dir).unwrap() {
            let file = std::fs::File::options()
                .write(true)
                .open(entry.unwrap().path())
                .unwrap();
            if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue 'again;
            }
        }
        return;
    }
}

fn open_intents(ledger: &Path) -> u64 {
    let conn = rusqlite::Connection::open(ledger).unwrap();
    conn.query_row("SELECT COUNT(*) FROM call_intents", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as u64
}

async fn stored(ledger: &Path) -> Vec<RequestRecord> {
    let mut recs = SqliteStore::open(ledger)
        .unwrap()
        .requests_between(0, u64::MAX / 2)
        .await
        .unwrap();
    recs.retain(|r| r.user_id != "marker");
    recs
}

async fn shut(stores: &Stores) {
    let report = stores
        .tracker
        .shutdown(Instant::now() + Duration::from_secs(10))
        .await;
    assert!(
        report.ledger_flushed && report.left_in_ledger == 0,
        "{report:?}"
    );
}

#[tokio::test]
async fn a_stopped_process_leaves_its_calls_in_flight_as_interrupted_records_for_the_next_start() {
    let dir = TempDir::new("intents-restart");
    let ledger = dir.file("ledger.sqlite3");
    let first = sqlite(&ledger, 300_000).await;
    let (done, cut, failed_then_cut) =
        (intent("done", 100), intent("cut", 120), intent("retry", 80));
    // A call that failed and whose request was going on when the process stopped: its intent
    // says what it really cost.
    let mut retried = failed_then_cut.clone();
    retried.record = retried
        .record
        .with_cost(Cost::ZERO)
        .with_cost_estimated(false);
    retried.record.input_tokens = 0;
    write(
        &first,
        &[done.clone(), cut.clone(), failed_then_cut, retried.clone()],
        &[finished(&done)],
    )
    .await;
    assert_eq!(first.tracker.health().intents, 4);
    assert_eq!(
        open_intents(&ledger),
        2,
        "the finished call's record ended its intent"
    );
    // The process stops without a shutdown (as `kill -9` would leave it).
    drop(first);
    wait_owners_gone(&ledger).await;

    let second = sqlite(&ledger, 300_000).await;
    assert_eq!(
        second.tracker.health().recovered,
        2,
        "adopted before start returned"
    );
    assert_eq!(open_intents(&ledger), 0);
    shut(&second).await;
    let mut recs = stored(&ledger).await;
    recs.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    let ids: Vec<(&str, RequestStatus)> = recs
        .iter()
        .map(|r| (r.request_id.as_str(), r.status))
        .collect();
    assert_eq!(
        ids,
        vec![
            ("cut", RequestStatus::Interrupted),
            ("done", RequestStatus::Succeeded),
            ("retry", RequestStatus::Interrupted),
        ],
        "every call once; the finished one as finished"
    );
    assert_eq!(
        recs[0], cut.record,
        "the record is the intent's, as written"
    );
    assert!(!recs[0].success && recs[0].cost_estimated && recs[0].input_tokens == 120);
    assert_eq!(recs[2], retried.record, "the latest intent of a call wins");

    // The admin metrics count them as failed requests.
    let m = second
        .metrics
        .metrics(0, u64::MAX / 2, None, &MetricsFilter::default())
        .await
        .unwrap();
    let t = &m.totals;
    assert_eq!((t.requests, t.errors, t.interrupted), (4, 2, 2), "{t:?}");
    assert_eq!(m.pipeline.unwrap().recovered, 2);

    // A third start finds nothing more to adopt.
    let third = sqlite(&ledger, 300_000).await;
    assert_eq!(third.tracker.health().recovered, 0);
    shut(&third).await;
    assert_eq!(stored(&ledger).await.len(), 3);
}

#[tokio::test]
async fn a_running_process_keeps_its_calls_and_a_sibling_adopts_them_once_it_stops() {
    let dir = TempDir::new("intents-sibling");
    let ledger = dir.file("ledger.sqlite3");
    // Looks for stopped owners every 40 ms.
    let worker = sqlite(&ledger, 200).await;
    let server = sqlite(&ledger, 200).await;
    let open = intent("worker-call", 90);
    write(&worker, std::slice::from_ref(&open), &[]).await;
    // Several looks later, the running worker's call is still its own.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.tracker.health().recovered, 0);
    assert_eq!(open_intents(&ledger), 1);

    drop(worker);
    let (h, ok) = server
        .tracker
        .wait_for(WAIT, |h| h.recovered == 1 && h.pending == 0)
        .await;
    assert!(ok, "{h:?}");
    shut(&server).await;
    let recs = stored(&ledger).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0], open.record);
    assert_eq!(open_intents(&ledger), 0);
}

#[tokio::test]
async fn shutdown_records_its_own_calls_still_in_flight_and_a_late_record_does_not_double_them() {
    let dir = TempDir::new("intents-shutdown");
    let ledger = dir.file("ledger.sqlite3");
    let stores = sqlite(&ledger, 300_000).await;
    let open = intent("open-at-shutdown", 60);
    write(&stores, std::slice::from_ref(&open), &[]).await;
    shut(&stores).await;
    assert_eq!(stores.tracker.health().recovered, 1);
    // The call's record comes after the recorder closed: refused, so the call stays recorded once.
    let late = stores.tracker.record(finished(&open));
    assert!(late.durable().await.is_err());
    let recs = stored(&ledger).await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].status, RequestStatus::Interrupted);
    assert_eq!(open_intents(&ledger), 0);
}

// ---------------------------------------------------------------------------------------------
// DynamoDB: intents in the shared table, and the sweep of a lost replica.

type Item = HashMap<String, AttributeValue>;

async fn dynamo_stores(moto: &Moto, table_name: &str, ledger: &Path, lost_after_ms: u64) -> Stores {
    let client = keyvex_testkit::moto::client(&moto.endpoint).await;
    Stores::open_dynamo(client, table_name, metrics(ledger, lost_after_ms))
        .await
        .unwrap()
}

/// Polls the table until `check` holds on its items (moto has no change feed to wait on).
async fn wait_table(
    client: &aws_sdk_dynamodb::Client,
    table_name: &str,
    what: &str,
    check: impl Fn(&[Item]) -> bool,
) -> Vec<Item> {
    let deadline = Instant::now() + WAIT;
    loop {
        let items = scan_all(client, table_name).await;
        if check(&items) {
            return items;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {items:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count_prefix(items: &[Item], prefix: &str) -> usize {
    items
        .iter()
        .filter(|i| s(i, "PK").starts_with(prefix))
        .count()
}

/// The request ids of the call records in the table, leaving out `write`'s markers.
fn request_ids(items: &[Item]) -> Vec<String> {
    let mut ids: Vec<String> = items
        .iter()
        .filter(|i| s(i, "PK").starts_with("METRIC#"))
        .map(|i| s(i, "requestId"))
        .filter(|id| !id.starts_with("marker-"))
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_lost_replicas_calls_in_flight_are_recorded_by_another_replica_once() {
    let moto = Moto::start().await;
    let name = "intents-lost";
    let client = table(&moto, name).await;
    let lost_dir = TempDir::new("intents-lost-a");
    let lost_ledger = lost_dir.file("ledger.sqlite3");
    let lost = dynamo_stores(&moto, name, &lost_ledger, 400).await;
    let (done, cut) = (intent("lost-done", 100), intent("lost-cut", 130));
    write(&lost, &[done.clone(), cut.clone()], &[finished(&done)]).await;
    // Its intents reach the table as they are written; the finished call's goes once its
    // record has shipped.
    let items = wait_table(
        &client,
        name,
        "the open intent alone in the table",
        |items| count_prefix(items, "INTENT#") == 1 && request_ids(items) == ["lost-done"],
    )
    .await;
    let stored_intent = items_with_prefix_in(&items, "INTENT#");
    let (replica, back) = dynamo::intent_from_item(stored_intent).unwrap();
    assert_eq!(back, cut);
    assert_eq!(s(stored_intent, "GSI1PK"), "INTENT");
    assert_eq!(
        count_prefix(&items, &format!("REPLICA#{replica}")),
        1,
        "its heartbeat"
    );
    // The machine is lost: no shutdown, and its ledger is gone with it.
    drop(lost);
    drop(lost_dir);

    let other_dir = TempDir::new("intents-lost-b");
    let other = dynamo_stores(&moto, name, &other_dir.file("ledger.sqlite3"), 400).await;
    let (h, ok) = other.tracker.wait_for(WAIT, |h| h.swept >= 1).await;
    assert!(ok, "{h:?}");
    let items = wait_table(&client, name, "the sweep's record", |items| {
        count_prefix(items, "INTENT#") == 0
    })
    .await;
    assert_eq!(
        request_ids(&items),
        ["lost-cut", "lost-done"],
        "each call once"
    );
    let cut_item = items
        .iter()
        .find(|i| s(i, "PK").starts_with("METRIC#") && s(i, "requestId") == "lost-cut")
        .unwrap();
    let rec = dynamo::request_from_item(cut_item).unwrap();
    assert_eq!(
        rec, cut.record,
        "recorded as the replica would have at its own restart"
    );
    assert_eq!(
        s(cut_item, "SK"),
        format!(
            "REQUEST#{}#lost-cut",
            keyvex_store::iso_ts(rec.timestamp_ms)
        )
    );
    assert_eq!(n(cut_item, "ttl"), rec.timestamp_ms / 1000 + 30 * 86_400);
    // Later sweeps find nothing more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(other.tracker.health().swept, 1);
    shut(&other).await;
}

/// `intent` as if its request had started `age_ms` ago and this call `call_after_ms` later.
fn stale(mut intent: CallIntent, age_ms: u64, call_after_ms: u64) -> CallIntent {
    intent.record.timestamp_ms -= age_ms;
    intent.call_started_ms = intent.record.timestamp_ms + call_after_ms;
    intent
}

fn items_with_prefix_in<'a>(items: &'a [Item], prefix: &str) -> &'a Item {
    items
        .iter()
        .find(|i| s(i, "PK").starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} item"))
}

#[tokio::test]
async fn a_live_replicas_long_call_is_left_alone_and_a_shipped_record_is_never_doubled() {
    let moto = Moto::start().await;
    let name = "intents-live";
    let client = table(&moto, name).await;
    let live_dir = TempDir::new("intents-live-a");
    let sweeper_dir = TempDir::new("intents-live-b");
    // Heartbeats every 400 ms against a 2 s lost-after time: a busy machine delaying a beat by
    // a second still does not make the live replica look lost.
    let live = dynamo_stores(&moto, name, &live_dir.file("ledger.sqlite3"), 2_000).await;
    let sweeper = dynamo_stores(&moto, name, &sweeper_dir.file("ledger.sqlite3"), 2_000).await;
    let long = stale(intent("long-call", 70), 10_000, 0);
    write(&live, std::slice::from_ref(&long), &[]).await;
    wait_table(&client, name, "the long call's intent", |items| {
        count_prefix(items, "INTENT#") == 1
    })
    .await;
    // Older than the lost-after time, but its replica beats: the sweeps of the next 2.5 s
    // (every 400 ms) leave it alone.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let items = scan_all(&client, name).await;
    assert_eq!(count_prefix(&items, "INTENT#"), 1);
    assert!(request_ids(&items).is_empty());
    assert_eq!(sweeper.tracker.health().swept, 0);
    // It finishes: its record ships, then its intent goes.
    write(&live, &[], &[finished(&long)]).await;
    let items = wait_table(&client, name, "the record instead of the intent", |items| {
        count_prefix(items, "INTENT#") == 0 && request_ids(items) == ["long-call"]
    })
    .await;
    let rec = dynamo::request_from_item(items_with_prefix_in(&items, "METRIC#")).unwrap();
    assert_eq!(rec.status, RequestStatus::Succeeded);

    // A lost replica's intents whose calls' records did reach the table (the replica shipped
    // them and died before removing the intents): the sweep only removes the intents. One
    // record is the request's last (dated from the request's start), the other a `retried` one
    // (dated from its own call's start).
    let last = stale(intent("shipped-last", 50), 20_000, 0);
    let retried = stale(intent("shipped-retried", 50), 20_000, 1_500);
    let mut retried_rec = finished(&retried);
    retried_rec.timestamp_ms = retried.call_started_ms;
    let retried_rec = retried_rec.retried("overloaded", "529");
    let gone_replica = uuid::Uuid::now_v7().to_string();
    for (i, r) in [(&last, finished(&last)), (&retried, retried_rec)] {
        client
            .put_item()
            .table_name(name)
            .set_item(Some(dynamo::intent_item(&gone_replica, i)))
            .send()
            .await
            .unwrap();
        client
            .put_item()
            .table_name(name)
            .set_item(Some(dynamo::request_item(&r)))
            .send()
            .await
            .unwrap();
    }
    let items = wait_table(&client, name, "the stale intents removed", |items| {
        count_prefix(items, "INTENT#") == 0
    })
    .await;
    assert_eq!(
        request_ids(&items),
        ["long-call", "shipped-last", "shipped-retried"],
        "no record doubled"
    );
    assert_eq!(sweeper.tracker.health().swept, 0);
    shut(&live).await;
    shut(&sweeper).await;
}

/// An intent waits `intent_linger` for company before it is committed alone: a call whose
/// record comes within that time writes no intent at all (counted as skipped), and a call that
/// outlasts it has its intent in the ledger until the record ends it.
#[tokio::test]
async fn an_intent_whose_record_comes_within_the_linger_is_never_written() {
    let dir = TempDir::new("intent-linger");
    let ledger = dir.file("metrics.sqlite3");
    let mut cfg = metrics(&ledger, 60_000);
    cfg.intent_linger = Duration::from_millis(300);
    let stores = sqlite_with(&ledger, cfg).await;
    let quick = intent("quick-1", 10);
    stores.tracker.record_intent(quick.clone());
    stores
        .tracker
        .record(finished(&quick))
        .durable()
        .await
        .unwrap();
    assert_eq!(stores.tracker.health().intents_skipped, 1);

    let slow = intent("slow-1", 10);
    stores.tracker.record_intent(slow.clone());
    let deadline = Instant::now() + WAIT;
    while open_intents(&ledger) == 0 {
        assert!(
            Instant::now() < deadline,
            "the lone intent was never committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stores
        .tracker
        .record(finished(&slow))
        .durable()
        .await
        .unwrap();
    assert_eq!(open_intents(&ledger), 0);
    assert_eq!(stores.tracker.health().intents_skipped, 1);
    shut(&stores).await;
}

/// A record waits up to `record_linger` for the records of the other calls in flight, and they
/// share one transaction; a call alone commits without waiting.
#[tokio::test]
async fn records_of_calls_in_flight_together_share_one_commit() {
    let dir = TempDir::new("record-linger");
    let ledger = dir.file("metrics.sqlite3");
    let mut cfg = metrics(&ledger, 60_000);
    // Far longer than the test waits: a record that lingered when it should not would hang it.
    cfg.record_linger = Duration::from_secs(120);
    cfg.record_linger_min_calls = 1;
    let stores = sqlite_with(&ledger, cfg).await;
    let tracker = &stores.tracker;

    // Alone: no other call is in flight, so the record does not wait.
    let lone = intent("lone-1", 10);
    tracker.record_intent(lone.clone());
    tokio::time::timeout(WAIT, tracker.record(finished(&lone)).durable())
        .await
        .expect("a lone call's record waited for company")
        .unwrap();

    // Three calls in flight: the first two records wait for the third.
    let calls: Vec<CallIntent> = ["a", "b", "c"].iter().map(|id| intent(id, 10)).collect();
    for call in &calls {
        tracker.record_intent(call.clone());
    }
    let deadline = Instant::now() + WAIT;
    while open_intents(&ledger) < 3 {
        assert!(
            Instant::now() < deadline,
            "the intents were never committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let commits_before = tracker.health().ledger_commits;
    let first = tokio::spawn(tracker.record(finished(&calls[0])).durable());
    let second = tokio::spawn(tracker.record(finished(&calls[1])).durable());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !first.is_finished() && !second.is_finished(),
        "a record with another call in flight was committed without waiting for it"
    );
    assert_eq!(tracker.health().ledger_commits, commits_before);
    tokio::time::timeout(WAIT, tracker.record(finished(&calls[2])).durable())
        .await
        .expect("the last call's record waited although no call was left in flight")
        .unwrap();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(
        tracker.health().ledger_commits,
        commits_before + 1,
        "the three records share one transaction"
    );
    assert_eq!(open_intents(&ledger), 0);
    shut(&stores).await;
}
