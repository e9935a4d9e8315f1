//! Metrics that are never lost, proved end to end through the in-process server: real HTTP
//! traffic on the agent and chat-completions routes, the tracker's SQLite ledger, and DynamoDB
//! as moto behind the fault-injecting proxy. (Where a server must die — `kill -9` — or get a
//! real SIGTERM, the built binary is tested by the `keyvex` crate.)
//!
//! Every record a caller was told about (an agent `usage` event, a chat usage chunk, a
//! non-streaming chat answer) is identified — an agent call by its record id, a chat completion
//! by its request id — so the tests compare sets of ids, not only counts: exactly those records,
//! each exactly once.

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use keyvex_engine::clock::now_ms;
use keyvex_store::admin::{MetricsFilter, MetricsReader};
use keyvex_store::dynamo::DynamoStore;
use keyvex_store::sqlite::SqliteStore;
use keyvex_store::{Entry, GroupBy, Sink, StoreError, Tracker, WriteReport};
use keyvex_testkit::fault_proxy::{Fault, FaultProxy};
use keyvex_testkit::moto::{self, Moto, table};
use keyvex_testkit::traffic::{
    assert_exactly, drive_mix, metric_items, pending_gauge, unique_table,
};
use keyvex_testkit::{TempDir, fast_metrics, fast_retry};

use crate::support::{ALICE, Spec, TestServer, WAIT};

// ---------------------------------------------------------------------------------------------
// Harness: an in-process server on a sink of the test's choosing.

async fn serve(sink: Arc<dyn Sink>, ledger: &Path, seed: u64) -> TestServer {
    let tracker = Tracker::start(fast_metrics(ledger), sink).await.unwrap();
    TestServer::on_tracker(Spec::new(seed), tracker, ledger).await
}

/// Waits until `n` records shipped and nothing is pending.
async fn wait_shipped(served: &TestServer, n: u64) {
    let (h, ok) = served
        .tracker
        .wait_for(WAIT, |h| h.shipped >= n && h.pending == 0)
        .await;
    assert!(ok, "not shipped in time: {h:?}");
}

// ---------------------------------------------------------------------------------------------
// In-process server, DynamoDB through the proxy.

struct DynamoServer {
    _moto: Moto,
    proxy: FaultProxy,
    client: aws_sdk_dynamodb::Client,
    table: String,
    served: TestServer,
    _dir: TempDir,
}

async fn dynamo_server(tag: &str) -> DynamoServer {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.endpoint).await;
    let name = unique_table(tag);
    let client = table(&moto, &name).await;
    let dir = TempDir::new(&format!("durability-{tag}"));
    let store =
        DynamoStore::new(moto::client(&proxy.endpoint).await, &name).with_retry(fast_retry());
    let served = serve(Arc::new(store), &dir.file("ledger.sqlite3"), 7).await;
    DynamoServer {
        _moto: moto,
        proxy,
        client,
        table: name,
        served,
        _dir: dir,
    }
}

#[tokio::test]
async fn n_requests_through_the_server_give_exactly_n_dynamo_items_with_keys_gsis_and_ttl() {
    let d = dynamo_server("exact").await;
    let told = drive_mix(&d.served.base, ALICE, 4).await;
    assert!(told.len() >= 12, "{}", told.len());
    wait_shipped(&d.served, told.len() as u64).await;
    assert_exactly(&d.client, &d.table, &told, "alice").await;
    let h = d.served.tracker.health();
    assert_eq!(
        (h.accepted, h.shipped, h.pending),
        (told.len() as u64, told.len() as u64, 0)
    );
    assert!(d.proxy.batch_sizes().iter().all(|&n| n <= 25));
    let stopped = d.served.stop().await;
    assert_eq!(stopped.report.left_in_ledger, 0);
}

#[tokio::test]
async fn throttling_and_unprocessed_items_for_a_while_still_give_exactly_n() {
    let d = dynamo_server("throttle").await;
    // More consecutive throttles than the sink's 8 attempts: the batch goes back to the ledger
    // and the shipper retries it later; then partial writes leave `UnprocessedItems` behind.
    let mut faults = vec![Fault::Throttling; 10];
    faults.extend([
        Fault::Partial { keep: 2 },
        Fault::ProvisionedThroughputExceeded,
        Fault::Partial { keep: 1 },
        Fault::Throttling,
        Fault::Partial { keep: 3 },
    ]);
    let fault_count = faults.len();
    d.proxy.script(faults);
    let told = drive_mix(&d.served.base, ALICE, 4).await;
    wait_shipped(&d.served, told.len() as u64).await;
    assert_exactly(&d.client, &d.table, &told, "alice").await;
    assert!(
        d.proxy.batch_sizes().len() > fault_count,
        "every scripted fault was served: {:?}",
        d.proxy.batch_sizes()
    );
    let h = d.served.tracker.health();
    // The first 8 throttles exhaust one sink write (a failed write the shipper retries).
    assert!(h.failed_writes >= 1 && h.retried >= 8, "{h:?}");
    assert!(h.consecutive_failures == 0 && h.dead_letters == 0, "{h:?}");
    d.served.stop().await;
}

#[tokio::test]
async fn a_dynamo_outage_shows_as_pending_in_metrics_and_then_exactly_n_arrive() {
    let d = dynamo_server("outage").await;
    d.proxy.set_outage(true);
    let told = drive_mix(&d.served.base, ALICE, 3).await;
    let count = told.len() as u64;
    // Every record is durable locally (the callers were told), none can ship.
    let (h, ok) = d
        .served
        .tracker
        .wait_for(WAIT, |h| h.durable >= count && h.failed_writes >= 3)
        .await;
    assert!(ok, "{h:?}");
    assert_eq!(h.shipped, 0, "{h:?}");
    assert_eq!(
        pending_gauge(&d.served.base).await,
        count,
        "pending during the outage"
    );
    assert!(metric_items(&d.client, &d.table).await.is_empty());

    d.proxy.set_outage(false);
    wait_shipped(&d.served, count).await;
    assert_eq!(
        pending_gauge(&d.served.base).await,
        0,
        "pending after recovery"
    );
    assert_exactly(&d.client, &d.table, &told, "alice").await;
    d.served.stop().await;
}

// ---------------------------------------------------------------------------------------------
// SQLite and DynamoDB give the same admin answers on the same traffic.

/// Writes every batch to both stores, so one server's traffic lands in both identically.
struct BothStores {
    sqlite: SqliteStore,
    dynamo: DynamoStore,
}

impl Sink for BothStores {
    fn name(&self) -> &'static str {
        "sqlite+dynamodb"
    }

    fn write<'a>(&'a self, entries: &'a [Entry]) -> BoxFuture<'a, Result<WriteReport, StoreError>> {
        Box::pin(async move {
            // Both writes are idempotent per key, so a batch resent after one of them failed
            // does no harm to the other.
            let a = self.sqlite.write(entries).await?;
            let b = self.dynamo.write(entries).await?;
            Ok(WriteReport {
                retries: a.retries + b.retries,
            })
        })
    }
}

#[tokio::test]
async fn admin_metrics_from_sqlite_and_dynamo_agree_on_the_same_traffic() {
    let moto = Moto::start().await;
    let name = unique_table("agree");
    let client = table(&moto, &name).await;
    let dir = TempDir::new("durability-agree");
    let store_path = dir.file("store.sqlite3");
    let dynamo_store =
        DynamoStore::new(moto::client(&moto.endpoint).await, &name).with_retry(fast_retry());
    let sink = BothStores {
        sqlite: SqliteStore::open(&store_path).unwrap(),
        dynamo: dynamo_store.clone(),
    };
    let from = now_ms() - 60_000;
    let served = serve(Arc::new(sink), &dir.file("ledger.sqlite3"), 11).await;
    let told = drive_mix(&served.base, ALICE, 4).await;
    let report = served.stop().await.report;
    assert_eq!(report.left_in_ledger, 0, "{report:?}");
    let to = now_ms() + 60_000;
    assert_exactly(&client, &name, &told, "alice").await;

    let sqlite = MetricsReader::sqlite(SqliteStore::open(&store_path).unwrap());
    let dynamo = MetricsReader::dynamo(dynamo_store);
    let filters = [
        MetricsFilter::default(),
        MetricsFilter {
            process: Some("magicSpark".into()),
            provider: None,
            ..MetricsFilter::default()
        },
        MetricsFilter {
            process: Some("direct".into()),
            provider: None,
            ..MetricsFilter::default()
        },
        MetricsFilter {
            process: None,
            provider: Some("openai".into()),
            ..MetricsFilter::default()
        },
        MetricsFilter {
            process: None,
            provider: Some("anthropic".into()),
            ..MetricsFilter::default()
        },
    ];
    let groupings = std::iter::once(None).chain(GroupBy::ALL.into_iter().map(Some));
    for group_by in groupings {
        for filter in &filters {
            let a = sqlite.metrics(from, to, group_by, filter).await.unwrap();
            let b = dynamo.metrics(from, to, group_by, filter).await.unwrap();
            assert_eq!(a, b, "groupBy {group_by:?}, filter {filter:?}");
        }
    }
    let all = sqlite
        .metrics(from, to, None, &MetricsFilter::default())
        .await
        .unwrap();
    assert_eq!(all.totals.requests, told.len() as u64);
    let direct = sqlite
        .metrics(
            from,
            to,
            None,
            &MetricsFilter {
                process: Some("direct".into()),
                provider: None,
                ..MetricsFilter::default()
            },
        )
        .await
        .unwrap();
    assert!(direct.totals.requests > 0 && direct.totals.requests < all.totals.requests);
    assert_eq!(
        sqlite.alerts(from, to).await.unwrap(),
        dynamo.alerts(from, to).await.unwrap()
    );
}
