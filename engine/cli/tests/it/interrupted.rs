//! Crash-safe billing with the built binary: `kill -9` of `keyvex serve` (DynamoDB on moto, and
//! SQLite) and of `keyvex worker` (SQS on moto) while calls stream from a simulator the test
//! holds, then a restart on the same working directory. Afterwards every call the simulator
//! served has exactly one record — `succeeded`, `retried`, `cancelled` or `interrupted` — and
//! the number of records equals the number of requests the simulator served.
//!
//! The kill comes once the calls in flight are streaming and their intents are committed (the
//! test reads the ledger file, as an operator could): an intent is committed off the request
//! path, a few milliseconds after its call went out, so a kill inside that window would leave
//! the call unrecorded. That window is documented; the test does not aim into it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use keyvex_engine::Process;
use keyvex_sim::{Fault, Rule, SimHandle};
use keyvex_testkit::moto::{Moto, s, scan_all, table};
use keyvex_testkit::traffic::{Call, call, metric_items, unique_table};
use keyvex_testkit::{TempDir, fast_sim};
use serde_json::{Value, json};

use crate::cli_support::{get_json, keyvex, prometheus_text, records, signal, wait_until};
use crate::durability::{Keyvex, spawn_serve, wait_drained};

const USER: &str = "alice-key-0001";
const ADMIN: &str = "ops-key-0001";
const WAIT: Duration = Duration::from_secs(60);

/// `keyvex serve` on `ledger`, its providers the test's simulator, shipping to DynamoDB when
/// `dynamo` names an endpoint and a table.
fn serve(
    sim: &SimHandle,
    ledger: &Path,
    dynamo: Option<(&str, &str)>,
    extra: &[(&str, &str)],
) -> Keyvex {
    let mut cmd: Command = keyvex(sim, ledger);
    cmd.args(["serve", "--addr", "127.0.0.1:0"])
        .env(
            "KEYVEX_API_KEYS",
            format!("{USER}=alice:user,{ADMIN}=ops:admin"),
        )
        .env("KEYVEX_DRAIN_TIMEOUT_MS", "2000")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "warn")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some((endpoint, table)) = dynamo {
        cmd.env("DYNAMODB_TABLE_NAME", table)
            .env("DYNAMODB_ENDPOINT", endpoint);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    spawn_serve(cmd)
}

/// Open call intents (calls in flight) in the ledger file.
fn open_intents(ledger: &Path) -> u64 {
    let conn = rusqlite::Connection::open(ledger).unwrap();
    conn.query_row(
        "SELECT COUNT(*) FROM call_intents WHERE ended = 0",
        [],
        |r| r.get::<_, i64>(0),
    )
    .unwrap_or(0) as u64
}

/// Where the records shipped from the ledger land.
#[derive(Clone, Copy)]
enum Store<'a> {
    /// The embedded SQLite store (in the ledger's own file).
    Sqlite,
    Dynamo(&'a aws_sdk_dynamodb::Client, &'a str),
}

/// Durable records with `status`: still in the ledger's outbox, or already shipped to `store`
/// (a record in both while its shipment is confirmed counts twice, so callers ask for "at
/// least").
async fn durable_with_status(ledger: &Path, store: Store<'_>, status: &str) -> u64 {
    let shipped = match store {
        Store::Sqlite => records(ledger)
            .iter()
            .filter(|r| r["status"] == status)
            .count(),
        Store::Dynamo(client, table) => metric_items(client, table)
            .await
            .values()
            .filter(|item| {
                keyvex_store::dynamo::request_from_item(item)
                    .is_ok_and(|r| r.status.as_str() == status)
            })
            .count(),
    } as u64;
    let conn = rusqlite::Connection::open(ledger).unwrap();
    let pending = conn
        .query_row(
            "SELECT COUNT(*) FROM metrics_outbox WHERE kind = 'request' AND json_extract(body, '$.status') = ?1",
            [status],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64;
    shipped + pending
}

/// Opens a streaming call: an agent run or a chat completion.
async fn open_stream(base: &str, kind: Call) -> reqwest::Response {
    let http = reqwest::Client::new();
    let req = match kind {
        Call::Agent => http
            .post(format!("{base}/v1/agents/magic-spark"))
            .json(&json!({ "input": keyvex_testkit::business() })),
        _ => http
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({
                "model": "magicSpark",
                "stream": true,
                "stream_options": { "include_usage": true },
                "max_completion_tokens": 64,
                "messages": [{ "role": "user", "content": "Name one tool idea." }],
            })),
    };
    let resp = req.bearer_auth(USER).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

/// Reads `resp` until its first content, then hands the rest to a task that reads to the end.
async fn stream_until_content(resp: reqwest::Response, kind: Call) -> tokio::task::JoinHandle<()> {
    let mut events = resp.bytes_stream().eventsource();
    while let Some(Ok(ev)) = events.next().await {
        let content = match kind {
            Call::Agent => ev.event == "delta",
            _ => serde_json::from_str::<Value>(&ev.data).is_ok_and(|d| {
                d["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            }),
        };
        if content {
            break;
        }
    }
    tokio::spawn(async move { while let Some(Ok(_)) = events.next().await {} })
}

/// The simulator's primary and fallback of Magic Spark.
fn magic_spark_models() -> (String, String) {
    let catalog = keyvex_engine::Catalog::embedded().unwrap();
    let route = catalog.route(Process::MagicSpark);
    (route.primary.clone(), route.fallback.clone())
}

/// Finished calls (two of them on the fallback after an overloaded primary), `streaming` calls
/// held mid-stream plus one the client abandons, then `kill -9` once every intent is committed.
/// Returns how many calls were in flight at the kill.
async fn load_then_kill(
    sim: &SimHandle,
    server: Keyvex,
    ledger: &Path,
    store: Store<'_>,
    streaming: usize,
) -> u64 {
    let (primary, _) = magic_spark_models();
    sim.push_rule(Rule {
        model: Some(primary),
        ..Rule::times(
            Fault::Http {
                status: 529,
                retry_after: None,
            },
            2,
        )
    });
    let http = reqwest::Client::new();
    let finished = [Call::Agent, Call::ChatStream, Call::Agent, Call::ChatJson];
    futures::future::join_all(
        finished
            .into_iter()
            .map(|kind| call(&http, &server.base, USER, kind, "magicSpark")),
    )
    .await;
    // From here on, calls stream slowly: the shortest answer (64 tokens) takes 32 s, far longer
    // than reaching the kill takes on a busy machine.
    sim.push_rule(Rule::always(Fault::Latency {
        ttft: Duration::from_millis(20),
        tokens_per_sec: 2.0,
    }));
    let kinds: Vec<Call> = (0..=streaming)
        .map(|i| {
            if i % 2 == 0 {
                Call::Agent
            } else {
                Call::ChatStream
            }
        })
        .collect();
    let opened =
        futures::future::join_all(kinds.iter().map(|k| open_stream(&server.base, *k))).await;
    let mut readers = Vec::new();
    for (resp, kind) in opened.into_iter().zip(kinds.iter()) {
        readers.push(stream_until_content(resp, *kind).await);
    }
    // The client of the last one goes away mid-stream: its call is recorded `cancelled`.
    readers.pop().unwrap().abort();
    let in_flight = streaming as u64;
    // Polled: these are states of other processes. The abandoned call's record may ship (and
    // leave the outbox) between two looks, so it is looked for in the store too.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if sim.stats().streams_open == in_flight
            && open_intents(ledger) == in_flight
            && durable_with_status(ledger, store, "cancelled").await >= 1
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for the abandoned call's record and every open call's intent: {:?}, {} open intents",
            sim.stats(),
            open_intents(ledger)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = server.kill9().await;
    for r in readers {
        let _ = r.await;
    }
    in_flight
}

/// Statuses of `records` (JSON bodies) counted.
fn by_status<'a>(records: impl Iterator<Item = &'a Value>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in records {
        *out.entry(r["status"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    out
}

/// What every test checks of the records after the restart: one per request the simulator
/// served, none twice, each of a model the simulator was asked for as often, and the calls
/// that were in flight as `interrupted` with their prompt billed and their cost flagged.
fn assert_one_record_per_served_call(
    sim: &SimHandle,
    records: &[Value],
    in_flight: u64,
    user: &str,
) {
    let stats = sim.stats();
    let mut ids: Vec<&str> = records
        .iter()
        .map(|r| r["requestId"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), records.len(), "a record written twice");
    assert_eq!(
        records.len() as u64,
        stats.requests_total,
        "one record per call served: {:?} {stats:?}",
        by_status(records.iter())
    );
    let mut models: BTreeMap<String, u64> = BTreeMap::new();
    for r in records {
        *models
            .entry(r["model"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        models, stats.requests_by_model,
        "records by model = calls by model"
    );
    let statuses = by_status(records.iter());
    assert_eq!(
        statuses.get("interrupted").copied().unwrap_or(0),
        in_flight,
        "{statuses:?}"
    );
    for r in records.iter().filter(|r| r["status"] == "interrupted") {
        assert_eq!(r["userId"], user, "{r}");
        assert_eq!(r["success"], false, "{r}");
        assert_eq!(r["errorKind"], "interrupted", "{r}");
        assert_eq!(r["costEstimated"], true, "{r}");
        assert!(
            r["inputTokens"].as_u64().unwrap() > 0,
            "the prompt is billed: {r}"
        );
        assert_eq!(r["outputTokens"], 0, "{r}");
        assert!(r["costPicoUsd"].as_u64().unwrap() > 0, "{r}");
    }
    assert!(
        statuses
            .keys()
            .all(|s| ["succeeded", "retried", "cancelled", "interrupted"].contains(&s.as_str())),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn kill_9_of_serve_under_streaming_load_leaves_one_record_per_call_in_dynamo() {
    let moto = Moto::start().await;
    let name = unique_table("interrupted");
    let client = table(&moto, &name).await;
    let sim = fast_sim(81).await;
    let dir = TempDir::new("interrupted-serve");
    let ledger = dir.file("ledger.sqlite3");
    let dynamo = Some((moto.endpoint.as_str(), name.as_str()));
    let server = serve(&sim, &ledger, dynamo, &[]);
    let in_flight = load_then_kill(&sim, server, &ledger, Store::Dynamo(&client, &name), 8).await;

    // The restart on the same directory records the calls the kill cut as interrupted. Both
    // ways of recording them are in play: its own start (the ledger), and with a lost-after
    // time this short, its sweep of the dead replica's intents in the table (the restart is a
    // new replica): still one record each.
    let restarted = serve(
        &sim,
        &ledger,
        dynamo,
        &[("KEYVEX_REPLICA_LOST_AFTER_MS", "500")],
    );
    let ready = wait_drained(&restarted.base).await;
    assert_eq!(ready["metrics"]["sink"], "dynamodb", "{ready}");
    let http = reqwest::Client::new();
    let metrics: Value =
        get_json(&http, format!("{}/v1/admin/metrics", restarted.base), ADMIN).await;
    let totals = &metrics["totals"];
    assert_eq!(totals["interrupted"], in_flight, "{metrics}");
    assert!(totals["errors"].as_u64().unwrap() >= in_flight, "{metrics}");
    let recovered = metrics["pipeline"]["recovered"].as_u64().unwrap()
        + metrics["pipeline"]["swept"].as_u64().unwrap();
    assert!(recovered >= in_flight, "{metrics}");
    let prom = prometheus_text(&http, &restarted.base).await;
    assert!(
        prom.lines()
            .any(|l| l.starts_with("keyvex_metrics_interrupted_recorded{")
                && l.contains("origin=\"ledger\"")),
        "{prom}"
    );
    let (status, log) = restarted.terminate().await;
    assert!(
        status.success(),
        "exit {status:?}; stderr:\n{}",
        log.join("\n")
    );

    let items = metric_items(&client, &name).await;
    let records: Vec<Value> = items
        .values()
        .map(|item| {
            serde_json::to_value(keyvex_store::dynamo::request_from_item(item).unwrap()).unwrap()
        })
        .collect();
    assert_one_record_per_served_call(&sim, &records, in_flight, "alice");
    let statuses = by_status(records.iter());
    assert_eq!(statuses.get("retried"), Some(&2), "{statuses:?}");
    assert_eq!(statuses.get("cancelled"), Some(&1), "{statuses:?}");
    let left: Vec<_> = scan_all(&client, &name)
        .await
        .into_iter()
        .filter(|i| s(i, "PK").starts_with("INTENT#"))
        .collect();
    assert!(left.is_empty(), "no intent left in the table: {left:#?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn kill_9_of_serve_under_streaming_load_leaves_one_record_per_call_in_sqlite() {
    let sim = fast_sim(82).await;
    let dir = TempDir::new("interrupted-serve-sqlite");
    let db = dir.file("metrics.sqlite3");
    let server = serve(&sim, &db, None, &[]);
    let in_flight = load_then_kill(&sim, server, &db, Store::Sqlite, 6).await;
    let restarted = serve(&sim, &db, None, &[]);
    wait_drained(&restarted.base).await;
    let (status, log) = restarted.terminate().await;
    assert!(
        status.success(),
        "exit {status:?}; stderr:\n{}",
        log.join("\n")
    );
    let records = records(&db);
    assert_one_record_per_served_call(&sim, &records, in_flight, "alice");
    assert_eq!(open_intents(&db), 0);
    sim.shutdown().await;
}

/// With budgets in Redis a call's dollar reservation outlives its process. After `kill -9`
/// the restart records the calls in flight `interrupted` and settles each one's reservation to
/// what its record bills: the caller's day ends holding exactly what the ledger billed, with
/// nothing left reserved (without the settle, the killed calls' worst cases would stay reserved
/// until the day ends).
#[tokio::test]
async fn kill_9_with_budgets_in_redis_settles_the_reservations_of_interrupted_calls() {
    let redis = keyvex_testkit::redis::Redis::start().await;
    let sim = fast_sim(83).await;
    let dir = TempDir::new("interrupted-redis");
    let db = dir.file("metrics.sqlite3");
    let env = [
        ("REDIS_URL", redis.url.as_str()),
        ("KEYVEX_BUDGET_DAILY_USD", "1000"),
        // The test polls the admin API until the counter settles.
        ("KEYVEX_RATE_LIMIT_BURST", "100000"),
    ];
    let server = serve(&sim, &db, None, &env);
    let in_flight = load_then_kill(&sim, server, &db, Store::Sqlite, 4).await;
    let restarted = serve(&sim, &db, None, &env);
    wait_drained(&restarted.base).await;
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let (day, billed) = loop {
        let all: Value =
            get_json(&http, format!("{}/v1/admin/budgets", restarted.base), ADMIN).await;
        let day = all["callers"]
            .as_array()
            .unwrap_or_else(|| panic!("not a budgets answer: {all}"))
            .iter()
            .find(|c| c["caller"] == "alice")
            .map(|c| c["day"].clone())
            .unwrap_or(Value::Null);
        let billed: u64 = records(&db)
            .iter()
            .map(|r| r["costPicoUsd"].as_u64().unwrap())
            .sum();
        if day["reservedPicoUsd"] == 0 && day["spentPicoUsd"].as_u64() == Some(billed) {
            break (day, billed);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "billed {billed}; Redis says {day}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let interrupted = records(&db)
        .iter()
        .filter(|r| r["status"] == "interrupted")
        .count() as u64;
    assert_eq!(interrupted, in_flight, "{day}");
    assert!(billed > 0);
    let metrics = prometheus_text(&http, &restarted.base).await;
    assert!(
        metrics.contains(&format!(
            "keyvex_budget_interrupted_settled_total {in_flight}"
        )),
        "{metrics}"
    );
    let (status, log) = restarted.terminate().await;
    assert!(
        status.success(),
        "exit {status:?}; stderr:\n{}",
        log.join("\n")
    );
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The worker.

fn create_queue(sim: &SimHandle, db: &Path, moto: &Moto) -> String {
    let name = format!("jobs-interrupted-{}", uuid::Uuid::new_v4().simple());
    crate::cli_support::stdout_of(
        keyvex(sim, db)
            .env("SQS_ENDPOINT", &moto.endpoint)
            .args(["queue", "create", "--name", &name, "--dlq-name"])
            .arg(format!("{name}-dlq")),
    )
}

fn enqueue(sim: &SimHandle, db: &Path, moto: &Moto, queue: &str) -> String {
    let input = serde_json::to_string(&keyvex_testkit::business()).unwrap();
    crate::cli_support::stdout_of(
        keyvex(sim, db)
            .env("SQS_ENDPOINT", &moto.endpoint)
            .env("SQS_AI_PROCESSING_QUEUE_URL", queue)
            .args([
                "queue",
                "enqueue",
                "magicSpark",
                "--user",
                "bob",
                "--json",
                &input,
            ]),
    )
}

fn worker(
    sim: &SimHandle,
    db: &Path,
    moto: &Moto,
    queue: &str,
    concurrency: usize,
) -> std::process::Child {
    keyvex(sim, db)
        .env("SQS_ENDPOINT", &moto.endpoint)
        .env("SQS_AI_PROCESSING_QUEUE_URL", queue)
        .env("KEYVEX_WORKER_CONCURRENCY", concurrency.to_string())
        .env("RUST_LOG", "warn")
        .args(["worker", "--shutdown-grace-secs", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn kill_9_of_a_worker_mid_job_leaves_one_record_per_call_after_its_restart() {
    let moto = Moto::start().await;
    let sim = fast_sim(83).await;
    let dir = TempDir::new("interrupted-worker");
    let db = dir.file("metrics.sqlite3");
    let queue = create_queue(&sim, &db, &moto);
    // Every job's one model call streams for seconds.
    sim.push_rule(Rule::always(Fault::Latency {
        ttft: Duration::from_millis(20),
        tokens_per_sec: 2.0,
    }));
    let jobs: Vec<String> = (0..4).map(|_| enqueue(&sim, &db, &moto, &queue)).collect();
    let mut child = worker(&sim, &db, &moto, &queue, jobs.len());
    wait_until(
        "every job's call streaming with its intent committed",
        WAIT,
        || sim.stats().streams_open == jobs.len() as u64 && open_intents(&db) == jobs.len() as u64,
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();

    // The restart records the killed worker's calls before it takes any job (the jobs' messages
    // stay invisible for the queue's visibility timeout, so it has none to take here).
    let restarted = worker(&sim, &db, &moto, &queue, 1);
    wait_until(
        "the killed worker's calls recorded and shipped",
        WAIT,
        || records(&db).len() as u64 >= jobs.len() as u64,
    )
    .await;
    signal(restarted.id(), "-TERM");
    let output = tokio::task::spawn_blocking(move || restarted.wait_with_output().unwrap())
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "worker exit {:?}: {log}",
        output.status
    );
    assert!(log.contains("interrupted"), "{log}");

    let records = records(&db);
    assert_one_record_per_served_call(&sim, &records, jobs.len() as u64, "bob");
    let mut runs: Vec<&str> = records
        .iter()
        .map(|r| r["runId"].as_str().unwrap())
        .collect();
    runs.sort_unstable();
    let mut want: Vec<&str> = jobs.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(runs, want, "each job's call, with the job as its run");
    assert!(
        records
            .iter()
            .all(|r| r["stage"] == "magicSpark" && r["correlationId"] == r["runId"])
    );
    assert_eq!(open_intents(&db), 0);
    sim.shutdown().await;
}
