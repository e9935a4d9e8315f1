//! A DynamoDB endpoint that accepts connections and never answers: the store's client (built by
//! `dynamo::configure` with its timeouts, the SDK's standard retry on, as in production) turns it
//! into a timeout error within the operation timeout, and the metrics shipper keeps every record
//! pending, counts the timeouts, and ships each record exactly once when the endpoint answers
//! again. DynamoDB is moto behind the fault proxy, switched between black hole and pass-through.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use keyvex_engine::cost::Cost;
use keyvex_engine::record::RequestRecord;
use keyvex_store::dynamo::{self, DynamoStore};
use keyvex_store::{AwsTimeouts, Entry, Sink, Tracker};
use keyvex_testkit::fault_proxy::{Fault, FaultProxy};
use keyvex_testkit::moto::{self, Moto, s, scan_all, table};
use keyvex_testkit::{TempDir, fast_metrics, fast_retry};
use tokio::time::Instant;

/// Short enough that a test sees several timeouts in seconds; the attempt timeout is below the
/// operation timeout, so the SDK retries a silent attempt before the operation gives up.
const TIMEOUTS: AwsTimeouts = AwsTimeouts {
    connect: Duration::from_secs(1),
    attempt: Duration::from_millis(300),
    operation: Duration::from_millis(1_000),
};
const WAIT: Duration = Duration::from_secs(30);
/// 2025-11-25T12:00:00Z
const T0: u64 = 1_764_072_000_000;

fn records(tag: &str, n: u64) -> Vec<RequestRecord> {
    (0..n)
        .map(|i| {
            RequestRecord::new("user-0", "magicSpark", "openai", "m1")
                .with_request_id(&format!("{tag}-{i}"))
                .with_timestamp_ms(T0 + i * 1_000)
                .with_latency(100 + i, Some(20))
                .with_cost(Cost(1_000_000 * (i + 1)))
        })
        .collect()
}

/// The table's request items' ids, with a check that no id is there twice.
async fn stored_ids(client: &aws_sdk_dynamodb::Client, name: &str) -> BTreeSet<String> {
    let ids: Vec<String> = scan_all(client, name)
        .await
        .iter()
        .filter(|i| s(i, "PK").starts_with("METRIC#"))
        .map(|i| s(i, "requestId"))
        .collect();
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique.len(), ids.len(), "a record is stored twice: {ids:?}");
    unique
}

fn ids(recs: &[RequestRecord]) -> BTreeSet<String> {
    recs.iter().map(|r| r.request_id.clone()).collect()
}

/// The store as production builds it, but through the proxy.
async fn proxied_store(proxy: &FaultProxy, name: &str) -> DynamoStore {
    let client = dynamo::configure(&moto::sdk_config().await, Some(&proxy.endpoint), &TIMEOUTS);
    DynamoStore::new(client, name).with_retry(fast_retry())
}

#[tokio::test]
async fn a_write_to_a_silent_endpoint_is_a_timeout_within_the_operation_timeout_not_a_hang() {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.endpoint).await;
    let direct = table(&moto, "hung-write").await;
    let store = proxied_store(&proxy, "hung-write").await;
    let entries: Vec<Entry> = records("w", 5).into_iter().map(Entry::Request).collect();

    proxy.set_black_hole(true);
    let started = Instant::now();
    let result = tokio::time::timeout(WAIT, store.write(&entries))
        .await
        .expect("a write to a silent endpoint must end, not hang");
    let took = started.elapsed();
    let err = result.expect_err("nothing answered, so nothing can be confirmed");
    assert!(err.is_timeout(), "{err}");
    assert!(err.is_retryable() && !err.is_rejection(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("BatchWriteItem")
            && text.contains("hung-write")
            && text.contains("timed out"),
        "{text}"
    );
    // It waited for the endpoint (at least one attempt) and gave up at the operation timeout,
    // with a second of slack for the scheduler.
    assert!(
        took >= TIMEOUTS.attempt,
        "gave up before any timeout: {took:?}"
    );
    assert!(
        took < TIMEOUTS.operation + Duration::from_secs(1),
        "the operation timeout did not bound the write: {took:?}"
    );
    assert!(
        proxy.held_connections() >= 1,
        "the request reached the black hole"
    );
    assert!(stored_ids(&direct, "hung-write").await.is_empty());

    // The same store works as soon as the endpoint answers again.
    proxy.set_black_hole(false);
    store.write(&entries).await.unwrap();
    assert_eq!(
        stored_ids(&direct, "hung-write").await,
        ids(&records("w", 5))
    );
}

#[tokio::test]
async fn the_shipper_keeps_records_through_a_silent_endpoint_and_ships_each_once_when_it_answers() {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.endpoint).await;
    let direct = table(&moto, "hung-ship").await;
    let dir = TempDir::new("hung-ship");
    proxy.set_black_hole(true);
    let store = proxied_store(&proxy, "hung-ship").await;
    let tracker = Tracker::start(fast_metrics(dir.file("l.sqlite3")), Arc::new(store))
        .await
        .unwrap();
    let recs = records("s", 20);
    let receipts: Vec<_> = recs.iter().map(|r| tracker.record(r.clone())).collect();
    for r in receipts {
        r.durable().await.unwrap();
    }

    // Several rounds time out, each retried after a backoff; nothing leaves the ledger.
    let (h, ok) = tracker.wait_for(WAIT, |h| h.timeouts >= 3).await;
    assert!(ok, "the shipper did not keep retrying: {h:?}");
    assert_eq!((h.durable, h.shipped, h.pending), (20, 0, 20), "{h:?}");
    assert!(
        h.consecutive_failures >= 3 && h.failed_writes >= h.timeouts && h.retried >= 3,
        "{h:?}"
    );
    assert!(
        h.last_error
            .as_deref()
            .is_some_and(|e| e.contains("timed out")),
        "{h:?}"
    );
    assert_eq!(
        h.dead_letters, 0,
        "a timeout must never dead-letter entries"
    );

    proxy.set_black_hole(false);
    let (h, ok) = tracker
        .wait_for(WAIT, |h| h.shipped >= 20 && h.pending == 0)
        .await;
    assert!(ok, "not shipped after the endpoint came back: {h:?}");
    assert_eq!(h.consecutive_failures, 0, "{h:?}");
    assert_eq!(stored_ids(&direct, "hung-ship").await, ids(&recs));
}

#[tokio::test]
async fn a_write_whose_answer_is_lost_is_sent_again_and_stored_once() {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.endpoint).await;
    let direct = table(&moto, "hung-lost").await;
    let dir = TempDir::new("hung-lost");
    // Moto stores the first batch, but its answer never comes: the client cannot tell the write
    // happened and must send it again.
    proxy.script([Fault::AnswerLost]);
    let store = proxied_store(&proxy, "hung-lost").await;
    let tracker = Tracker::start(fast_metrics(dir.file("l.sqlite3")), Arc::new(store))
        .await
        .unwrap();
    let recs = records("l", 12);
    for r in recs.iter().map(|r| tracker.record(r.clone())) {
        r.durable().await.unwrap();
    }
    let (h, ok) = tracker
        .wait_for(WAIT, |h| h.shipped >= 12 && h.pending == 0)
        .await;
    assert!(ok, "{h:?}");
    assert!(
        proxy.batch_sizes().len() >= 2,
        "the batch was sent again: {:?}",
        proxy.batch_sizes()
    );
    assert_eq!(stored_ids(&direct, "hung-lost").await, ids(&recs));
}
