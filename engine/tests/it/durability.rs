//! Metrics that are never lost, proved end to end through the server (issue "Metrics that are
//! never lost"): real HTTP traffic on the agent and chat-completions routes, the tracker's SQLite
//! ledger, and DynamoDB as moto behind the fault-injecting proxy. In-process `Server::bind`
//! where a server only has to be stopped; the built `keyvex` binary where one must die
//! (`kill -9`) or get a real SIGTERM.
//!
//! Every record a caller was told about (an agent `usage` event, a chat usage chunk, a
//! non-streaming chat answer) is identified by its record id, so the tests compare sets of ids,
//! not only counts: exactly those records, each exactly once.

// Test code: a failed unwrap is a failed test (clippy's test allowance does not reach helpers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use futures::future::BoxFuture;
use keyvex_engine::config::{ApiKeySpec, ServerConfig};
use keyvex_engine::metrics::admin::{MetricsFilter, MetricsReader};
use keyvex_engine::metrics::{GroupBy, RequestRecord, ShutdownReport, Tracker};
use keyvex_engine::provider::sim::SimHandle;
use keyvex_engine::server::Server;
use keyvex_engine::store::dynamo::{self, DynamoStore};
use keyvex_engine::store::sqlite::SqliteStore;
use keyvex_engine::store::{Entry, Sink, StoreError, WriteReport, day_of, iso_ts};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::support::RunningServer;
use crate::support::TempDir;
use crate::support::fault_proxy::{Fault, FaultProxy};
use crate::support::moto::{self, Moto};
use crate::support::{fast_metrics, fast_retry};

const USER_KEY: &str = "user-key-0001";
const WAIT: Duration = Duration::from_secs(30);
const TTL_SECS: u64 = 30 * 86_400;

// ---------------------------------------------------------------------------------------------
// Harness: an in-process server on a sink of the test's choosing.

struct Served {
    base: String,
    tracker: Tracker,
    sim: SimHandle,
    server: RunningServer,
}

async fn serve(sink: Arc<dyn Sink>, ledger: &Path, seed: u64) -> Served {
    let (sim, engine) = crate::support::simulated_engine(seed).await;
    let tracker = Tracker::start(fast_metrics(ledger), sink).await.unwrap();
    let cfg = ServerConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        api_keys: vec![ApiKeySpec::parse(&format!("{USER_KEY}=alice:user")).unwrap()],
        ..ServerConfig::default()
    };
    let server = Server::bind(cfg, &engine, tracker.clone()).await.unwrap();
    let running = RunningServer::spawn(server);
    Served {
        base: running.base.clone(),
        tracker,
        sim,
        server: running,
    }
}

impl Served {
    /// Stops the server the way SIGTERM does (drain, flush) and returns the flush report.
    async fn stop(self) -> ShutdownReport {
        let report = self.server.stop().await;
        self.sim.shutdown().await;
        report
    }

    /// Waits until `n` records shipped and nothing is pending.
    async fn wait_shipped(&self, n: u64) {
        let (h, ok) = self
            .tracker
            .wait_for(WAIT, |h| h.shipped >= n && h.pending == 0)
            .await;
        assert!(ok, "not shipped in time: {h:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic: the agent route and the chat-completions route, streaming and not.

fn business() -> Value {
    json!({
        "businessDescription": "A solar installer serving homeowners in Arizona",
        "targetAudience": "homeowners with high summer electricity bills",
        "industry": "renewable energy"
    })
}

/// The kinds of request in a mix.
#[derive(Debug, Clone, Copy)]
enum Call {
    Agent,
    ChatJson,
    ChatStream,
}

/// What a finished request told its caller.
struct Told {
    /// Ids of the records the caller was told about.
    records: Vec<String>,
}

/// One request to completion. An agent run reports each model call's record in a `usage`
/// event (its `recordId`); a chat completion is one call whose record takes the HTTP request
/// id, reported by the answer (non-streaming) or the usage chunk (streaming).
async fn call(http: &reqwest::Client, base: &str, kind: Call, model: &str) -> Told {
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
    let resp = req.bearer_auth(USER_KEY).send().await.unwrap();
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

/// `rounds` × (agent run, non-streaming chat, streaming chat), all concurrently, over both a
/// process (`magicSpark`, routed) and a catalog model (`direct`). Returns the told record ids.
async fn drive_mix(base: &str, rounds: usize) -> BTreeSet<String> {
    let http = reqwest::Client::new();
    let calls = (0..rounds).flat_map(|i| {
        let model = if i % 2 == 0 {
            "magicSpark"
        } else {
            "gpt-5.4-mini"
        };
        [Call::Agent, Call::ChatJson, Call::ChatStream].map(|k| (k, model))
    });
    let told = futures::future::join_all(calls.map(|(k, m)| call(&http, base, k, m))).await;
    let ids: Vec<String> = told.into_iter().flat_map(|t| t.records).collect();
    let set: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(set.len(), ids.len(), "record ids are unique");
    set
}

// ---------------------------------------------------------------------------------------------
// DynamoDB helpers.

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn unique_table(tag: &str) -> String {
    format!("dur-{tag}-{}", uuid::Uuid::now_v7().simple())
}

async fn table(moto: &Moto, name: &str) -> aws_sdk_dynamodb::Client {
    let client = moto::client(&moto.endpoint).await;
    dynamo::create_table(&client, name).await.unwrap();
    client
}

/// The table's request items (alerts and sessions left out), by record id. Panics on a
/// duplicate record id: one item per record is part of "exactly".
async fn metric_items(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
) -> HashMap<String, HashMap<String, AttributeValue>> {
    let mut out = HashMap::new();
    let mut start = None;
    loop {
        let page = client
            .scan()
            .table_name(table)
            .set_exclusive_start_key(start)
            .send()
            .await
            .unwrap();
        for item in page.items.unwrap_or_default() {
            if !item["PK"].as_s().unwrap().starts_with("METRIC#") {
                continue;
            }
            let id = item["requestId"].as_s().unwrap().clone();
            assert!(out.insert(id.clone(), item).is_none(), "two items for {id}");
        }
        match page.last_evaluated_key {
            Some(k) if !k.is_empty() => start = Some(k),
            _ => return out,
        }
    }
}

fn s(item: &HashMap<String, AttributeValue>, name: &str) -> String {
    item[name].as_s().unwrap().clone()
}

fn n(item: &HashMap<String, AttributeValue>, name: &str) -> u64 {
    item[name].as_n().unwrap().parse().unwrap()
}

/// Exactly the told records are in the table, each under the single-table keys, both GSIs'
/// attributes and a `ttl` in epoch seconds 30 days after the request.
async fn assert_exactly(client: &aws_sdk_dynamodb::Client, table: &str, told: &BTreeSet<String>) {
    let items = metric_items(client, table).await;
    let stored: BTreeSet<String> = items.keys().cloned().collect();
    assert_eq!(&stored, told, "the table holds exactly the told records");
    let now_s = now_ms() / 1000;
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
        assert_eq!(rec.user_id, "alice");
        assert!(rec.success, "{rec:?}");
        assert!(rec.output_tokens > 0 && rec.cost_pico_usd > 0, "{rec:?}");
        processes.insert(rec.process);
    }
    if !told.is_empty() {
        assert!(processes.contains("magicSpark"), "{processes:?}");
    }
}

/// `keyvex_metrics_pending` from the server's Prometheus page.
async fn pending_gauge(base: &str) -> u64 {
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

// ---------------------------------------------------------------------------------------------
// In-process server, DynamoDB through the proxy.

struct DynamoServer {
    _moto: Moto,
    proxy: FaultProxy,
    client: aws_sdk_dynamodb::Client,
    table: String,
    served: Served,
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
    let told = drive_mix(&d.served.base, 4).await;
    assert!(told.len() >= 12, "{}", told.len());
    d.served.wait_shipped(told.len() as u64).await;
    assert_exactly(&d.client, &d.table, &told).await;
    let h = d.served.tracker.health();
    assert_eq!(
        (h.accepted, h.shipped, h.pending),
        (told.len() as u64, told.len() as u64, 0)
    );
    assert!(d.proxy.batch_sizes().iter().all(|&n| n <= 25));
    let report = d.served.stop().await;
    assert_eq!(report.left_in_ledger, 0);
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
    let told = drive_mix(&d.served.base, 4).await;
    d.served.wait_shipped(told.len() as u64).await;
    assert_exactly(&d.client, &d.table, &told).await;
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
    let told = drive_mix(&d.served.base, 3).await;
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
    d.served.wait_shipped(count).await;
    assert_eq!(
        pending_gauge(&d.served.base).await,
        0,
        "pending after recovery"
    );
    assert_exactly(&d.client, &d.table, &told).await;
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
    let told = drive_mix(&served.base, 4).await;
    let report = served.stop().await;
    assert_eq!(report.left_in_ledger, 0, "{report:?}");
    let to = now_ms() + 60_000;
    assert_exactly(&client, &name, &told).await;

    let sqlite = MetricsReader::sqlite(SqliteStore::open(&store_path).unwrap());
    let dynamo = MetricsReader::dynamo(dynamo_store);
    let filters = [
        MetricsFilter::default(),
        MetricsFilter {
            process: Some("magicSpark".into()),
            provider: None,
        },
        MetricsFilter {
            process: Some("direct".into()),
            provider: None,
        },
        MetricsFilter {
            process: None,
            provider: Some("openai".into()),
        },
        MetricsFilter {
            process: None,
            provider: Some("anthropic".into()),
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

// ---------------------------------------------------------------------------------------------
// The built binary: SIGTERM and kill -9.

/// A `keyvex serve` child process; killed on drop if a test fails before it exits.
struct Keyvex {
    /// `None` once it has exited and been reaped.
    child: Option<Child>,
    base: String,
    log: Option<std::thread::JoinHandle<Vec<String>>>,
}

/// Starts the binary with the metrics in `ledger`, shipping to `table` on `endpoint`, and the
/// in-process simulator (`profile` timing).
fn start_keyvex(
    ledger: &Path,
    endpoint: &str,
    table: &str,
    flush_ms: u64,
    profile: &str,
) -> Keyvex {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyvex"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .env("KEYVEX_API_KEYS", format!("{USER_KEY}=alice:user"))
        .env("KEYVEX_METRICS_DB", ledger)
        .env("KEYVEX_METRICS_FLUSH_MS", flush_ms.to_string())
        .env("KEYVEX_DRAIN_TIMEOUT_MS", "2000")
        .env("KEYVEX_SIMULATE", "always")
        .env("KEYVEX_SIM_PROFILE", profile)
        .env("KEYVEX_SIM_SEED", "5")
        .env("DYNAMODB_TABLE_NAME", table)
        .env("DYNAMODB_ENDPOINT", endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "warn")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("KEYVEX_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    // Keep reading stderr so the child never blocks on a full pipe.
    let log = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in stderr.lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("keyvex: listening on ") {
                let _ = addr_tx.send(addr.to_owned());
            }
            all.push(line);
        }
        all
    });
    // Owned before the wait, so a failed start still kills the child on drop.
    let mut keyvex = Keyvex {
        child: Some(child),
        base: String::new(),
        log: Some(log),
    };
    keyvex.base = addr_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("keyvex printed its address");
    keyvex
}

impl Keyvex {
    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits for the exit; returns the status and the stderr lines.
    async fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        self.wait().await
    }

    /// SIGKILL (`Child::kill`): no shutdown code runs.
    async fn kill9(mut self) -> Vec<String> {
        self.child.as_mut().unwrap().kill().unwrap();
        self.wait().await.1
    }

    async fn wait(&mut self) -> (std::process::ExitStatus, Vec<String>) {
        let mut child = self.child.take().unwrap();
        let pid = child.id();
        let waited = tokio::time::timeout(
            WAIT,
            tokio::task::spawn_blocking(move || {
                let status = child.wait();
                (child, status)
            }),
        )
        .await;
        let Ok(waited) = waited else {
            // Leave no process behind, then fail.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("keyvex (pid {pid}) did not exit within {WAIT:?}");
        };
        let status = waited.unwrap().1.unwrap();
        let log = self.log.take().unwrap().join().unwrap();
        (status, log)
    }
}

impl Drop for Keyvex {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `/readyz` until the server is ready with nothing pending, and returns that answer. A
/// separate process has no signal to wait on, so this polls.
async fn wait_drained(base: &str) -> Value {
    let http = reqwest::Client::new();
    let mut last = Value::Null;
    for _ in 0..1500 {
        if let Ok(resp) = http.get(format!("{base}/readyz")).send().await {
            last = resp.json().await.unwrap();
            if last["ready"] == true && last["metrics"]["pending"] == 0 {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{base} never reported an empty ledger: {last}");
}

/// Request records waiting in the ledger's outbox (alerts the binary may raise left out).
fn outbox_requests(ledger: &Path) -> u64 {
    let conn = rusqlite::Connection::open(ledger).unwrap();
    conn.query_row(
        "SELECT COUNT(*) FROM metrics_outbox WHERE kind = 'request'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as u64
}

/// SIGTERM flushes everything to DynamoDB before exiting 0. The flush interval is 60 s, so
/// before the signal nothing has shipped: what reaches the table is the shutdown's doing.
#[tokio::test]
async fn sigterm_flushes_every_record_to_dynamo_and_exits_zero() {
    let moto = Moto::start().await;
    let name = unique_table("sigterm");
    let client = table(&moto, &name).await;
    let dir = TempDir::new("durability-sigterm");
    let ledger = dir.file("ledger.sqlite3");
    let keyvex = start_keyvex(&ledger, &moto.endpoint, &name, 60_000, "fast");
    let told = drive_mix(&keyvex.base, 3).await;
    assert!(
        metric_items(&client, &name).await.is_empty(),
        "nothing ships before the flush interval"
    );
    let (status, log) = keyvex.terminate().await;
    assert!(
        status.success(),
        "exit {status:?}; stderr:\n{}",
        log.join("\n")
    );
    assert!(
        log.iter().any(|l| l.contains("left for next start 0")),
        "{}",
        log.join("\n")
    );
    assert_exactly(&client, &name, &told).await;
    assert_eq!(outbox_requests(&ledger), 0);
}

/// Progress of the clients under load, watched by the test to pick the moment of the kill.
#[derive(Debug, Clone, Default)]
struct Load {
    /// Record ids delivered to a client in a `usage` event (or usage chunk).
    told: Vec<String>,
    /// Streams that have delivered content and not ended.
    mid_stream: usize,
}

/// One client: streams one request after another until the server is gone.
async fn stream_until_killed(base: String, kind: Call, progress: watch::Sender<Load>) {
    let http = reqwest::Client::new();
    loop {
        let req = match kind {
            Call::Agent => http
                .post(format!("{base}/v1/agents/magic-spark"))
                .json(&json!({ "input": business() })),
            _ => http
                .post(format!("{base}/v1/chat/completions"))
                .json(&json!({
                    "model": "magicSpark",
                    "stream": true,
                    "stream_options": { "include_usage": true },
                    "max_completion_tokens": 24,
                    "messages": [{ "role": "user", "content": "One word." }],
                })),
        };
        let Ok(resp) = req.bearer_auth(USER_KEY).send().await else {
            return;
        };
        let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        let mut events = resp.bytes_stream().eventsource();
        let mut content = false;
        let mut ended = false;
        while let Some(ev) = events.next().await {
            let Ok(ev) = ev else { break };
            if ev.data == "[DONE]" {
                ended = true;
                continue;
            }
            let data: Value = serde_json::from_str(&ev.data).unwrap();
            let usage = match kind {
                Call::Agent => {
                    (ev.event == "usage").then(|| data["recordId"].as_str().unwrap().to_owned())
                }
                _ => (!data["usage"].is_null()).then(|| request_id.clone()),
            };
            let delta = match kind {
                Call::Agent => ev.event == "delta",
                _ => data["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty()),
            };
            if ev.event == "done" {
                ended = true;
            }
            progress.send_modify(|p| {
                if let Some(id) = usage {
                    p.told.push(id);
                }
                if delta && !content {
                    p.mid_stream += 1;
                }
            });
            content |= delta;
        }
        if content {
            progress.send_modify(|p| p.mid_stream -= 1);
        }
        if !ended {
            return;
        }
    }
}

/// `kill -9` under load, then a restart on the same ledger file.
///
/// What is asserted, precisely:
/// - Every record id a client received in a `usage` event (agent) or usage chunk (chat) before
///   the kill is in DynamoDB after the restart: the server sends that event only once the
///   record is committed to the ledger.
/// - The table holds exactly the ledger's outbox as the kill left it, each record once: nothing
///   shipped before the kill (60 s flush interval, fewer rows than a ship batch), so the table
///   is empty after the kill, and the restart ships the outbox, no more and no less.
/// - The only records beyond the told ones are calls whose record was committed but whose
///   usage event had not reached the client when the process died; there is at most one such
///   call per stream open at the kill. Calls cut mid-stream by the kill leave no record at all:
///   `kill -9` runs no code, so no `cancelled` record can be written for them (that happens on
///   a client disconnect, tested in `server.rs`).
#[tokio::test]
async fn kill_9_under_load_then_restart_ships_every_record_a_client_was_told_about() {
    let moto = Moto::start().await;
    let name = unique_table("kill");
    let client = table(&moto, &name).await;
    let dir = TempDir::new("durability-kill");
    let ledger = dir.file("ledger.sqlite3");
    // Realistic timing: streams take seconds, so several are mid-flight at the kill.
    let keyvex = start_keyvex(&ledger, &moto.endpoint, &name, 60_000, "realistic");
    let (tx, mut rx) = watch::channel(Load::default());
    let clients_count = 6;
    let clients: Vec<_> = (0..clients_count)
        .map(|i| {
            let kind = if i % 2 == 0 {
                Call::Agent
            } else {
                Call::ChatStream
            };
            tokio::spawn(stream_until_killed(keyvex.base.clone(), kind, tx.clone()))
        })
        .collect();
    drop(tx);
    let at_kill = tokio::time::timeout(
        Duration::from_secs(60),
        rx.wait_for(|p| p.told.len() >= 4 && p.mid_stream >= 2),
    )
    .await
    .expect("load reached 4 usage events with 2 streams mid-flight")
    .unwrap()
    .clone();
    let _ = keyvex.kill9().await;
    for c in clients {
        c.await.unwrap();
    }
    let told: BTreeSet<String> = rx.borrow().told.iter().cloned().collect();
    assert_eq!(told.len(), rx.borrow().told.len(), "record ids are unique");
    assert!(told.len() >= at_kill.told.len());
    // Each client has at most one stream open, so at most this many streams were cut.
    let open_at_kill = clients_count;

    assert!(
        metric_items(&client, &name).await.is_empty(),
        "nothing shipped before the kill"
    );
    let durable = outbox_requests(&ledger);
    assert!(durable >= told.len() as u64, "{durable} < {}", told.len());

    let restarted = start_keyvex(&ledger, &moto.endpoint, &name, 20, "fast");
    // The restart ships the outbox at once; /readyz shows it drained. (Waiting also keeps the
    // SIGTERM clear of the window after "listening on" in which the binary has no handler yet.)
    let ready = wait_drained(&restarted.base).await;
    assert_eq!(ready["metrics"]["sink"], "dynamodb", "{ready}");
    let (status, log) = restarted.terminate().await;
    assert!(
        status.success(),
        "exit {status:?}; stderr:\n{}",
        log.join("\n")
    );
    let stored: BTreeSet<String> = metric_items(&client, &name).await.into_keys().collect();
    assert!(
        told.is_subset(&stored),
        "told but lost: {:?}",
        told.difference(&stored).collect::<Vec<_>>()
    );
    assert_eq!(
        stored.len() as u64,
        durable,
        "the table holds exactly the outbox"
    );
    let extra = stored.difference(&told).count();
    assert!(
        extra <= open_at_kill,
        "{extra} untold records with {open_at_kill} streams open"
    );
    assert_eq!(outbox_requests(&ledger), 0);
}
