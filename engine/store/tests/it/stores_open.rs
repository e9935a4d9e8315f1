//! `Stores::open`, the one place SQLite or DynamoDB is chosen: `StoreConfig::Sqlite` ships the
//! records into that SQLite file, and the DynamoDB side (`Stores::open_dynamo`, which
//! `StoreConfig::Dynamo` opens with a client from the standard AWS settings) into that table
//! (moto, the real SDK). The AWS-settings path itself runs in the binary's tests.

use std::time::Duration;

use keyvex_engine::cost::Cost;
use keyvex_engine::record::RequestRecord;
use keyvex_store::dynamo;
use keyvex_store::sqlite::SqliteStore;
use keyvex_store::{StoreConfig, Stores};
use keyvex_testkit::TempDir;
use keyvex_testkit::fast_metrics;
use keyvex_testkit::moto::{self, Moto};
use tokio::time::Instant;

/// 2025-11-25T23:59:00Z
const T0: u64 = 1_764_115_140_000;
const TABLE: &str = "m-open";

fn records(n: u64) -> Vec<RequestRecord> {
    (0..n)
        .map(|i| {
            RequestRecord::new("user-0", "magicSpark", "openai", "m1")
                .with_request_id(&format!("open-{i}"))
                .with_timestamp_ms(T0 + i * 3_000)
                .with_latency(100 + i, Some(20))
                .with_cost(Cost(1_234_567 * (i + 1)))
        })
        .collect()
}

/// Checks that the tracker of `stores` ships to `sink`, records three requests, waits for each
/// to be durable and shuts down with everything shipped. Returns the records.
async fn record_three(stores: Stores, sink: &str) -> Vec<RequestRecord> {
    assert_eq!(stores.tracker.health().sink, sink);
    let recs = records(3);
    let receipts: Vec<_> = recs
        .iter()
        .map(|r| stores.tracker.record(r.clone()))
        .collect();
    for r in receipts {
        r.durable().await.unwrap();
    }
    let report = stores
        .tracker
        .shutdown(Instant::now() + Duration::from_secs(10))
        .await;
    assert_eq!(
        (report.shipped, report.left_in_ledger),
        (3, 0),
        "{report:?}"
    );
    recs
}

#[tokio::test]
async fn stores_open_with_sqlite_writes_to_sqlite() {
    let dir = TempDir::new("stores-sqlite");
    let path = dir.file("keyvex.sqlite3");
    let config = StoreConfig::Sqlite { path: path.clone() };
    let stores = Stores::open(&config, fast_metrics(path.clone()))
        .await
        .unwrap();
    assert_eq!(stores.description, config.describe());
    let recs = record_three(stores, "sqlite").await;
    let mut back = SqliteStore::open(&path)
        .unwrap()
        .requests_between(T0, T0 + 10_000)
        .await
        .unwrap();
    assert_eq!(back.len(), 3);
    back.sort_by_key(|r| r.timestamp_ms);
    assert_eq!(back, recs);
}

#[tokio::test]
async fn stores_open_with_dynamo_writes_to_the_table() {
    let moto = Moto::start().await;
    let client = moto::client(&moto.endpoint).await;
    dynamo::create_table(&client, TABLE).await.unwrap();
    let dir = TempDir::new("stores-dynamo");
    let stores = Stores::open_dynamo(client.clone(), TABLE, fast_metrics(dir.file("l.sqlite3")))
        .await
        .unwrap();
    assert_eq!(
        stores.description,
        StoreConfig::Dynamo {
            table: TABLE.into(),
            endpoint: None,
            timeouts: keyvex_store::AwsTimeouts::DYNAMODB,
        }
        .describe()
    );
    record_three(stores, "dynamodb").await;

    // Three request items in the table, one per record, all on the day of T0.
    let items = moto::scan_all(&client, TABLE).await;
    let s = moto::s;
    let mut got: Vec<(String, String)> = items
        .iter()
        .map(|i| (s(i, "requestId"), s(i, "PK")))
        .collect();
    got.sort();
    let want: Vec<(String, String)> = (0..3)
        .map(|i| (format!("open-{i}"), "METRIC#2025-11-25".to_owned()))
        .collect();
    assert_eq!(got, want);
}
