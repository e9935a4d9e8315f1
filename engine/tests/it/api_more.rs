//! The routes wired into the server after the first API: sessions, admin metrics/alerts/dead
//! letters, and jobs through the queue with the in-process worker, all over a real socket
//! against the simulator; and `keyvex demo-traffic` as the built binary.

// Test code: a failed unwrap is a failed test (clippy's test allowance does not reach helpers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use agents::Process;
use aws_sdk_sqs::types::QueueAttributeName;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use keyvex_engine::config::{ApiKeySpec, MapEnv, ServerConfig};
use keyvex_engine::metrics::{ShutdownReport, Tracker, start_from_env};
use keyvex_engine::provider::sim::SimHandle;
use keyvex_engine::queue::admin::{self, QueueSettings};
use keyvex_engine::queue::jobs::SqliteJobs;
use keyvex_engine::queue::worker::{WorkerConfig, WorkerCounts};
use keyvex_engine::queue::{JobStore, JobsCtx};
use keyvex_engine::server::{Backends, Server};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::support::RunningServer;
use crate::support::TempDir;
use crate::support::moto::{self, Moto};

const ALICE: &str = "alice-key-0001";
const BOB: &str = "bob-key-0002";
const ADMIN: &str = "admin-key-0003";
const WAIT: Duration = Duration::from_secs(30);

struct Harness {
    base: String,
    sim: SimHandle,
    tracker: Tracker,
    db: std::path::PathBuf,
    progress: Option<watch::Receiver<WorkerCounts>>,
    server: RunningServer,
    http: reqwest::Client,
    _dir: TempDir,
}

/// How the harness builds the server's backends.
enum With {
    /// `Backends::from_env` over the metrics file, flushing every `flush_ms`.
    Stores { flush_ms: u64 },
    /// A queue on moto with the worker inside the server (the `serve --with-worker` path).
    Queue(JobsCtx),
}

async fn harness(with: With) -> Harness {
    let dir = TempDir::new("api-more");
    let (sim, engine) = crate::support::simulated_engine(5).await;
    let db = dir.file("metrics.sqlite3");
    let flush = match &with {
        With::Stores { flush_ms } => flush_ms.to_string(),
        With::Queue(_) => "20".to_owned(),
    };
    let env = MapEnv::new([
        ("KEYVEX_METRICS_DB", db.to_str().unwrap()),
        ("KEYVEX_METRICS_FLUSH_MS", flush.as_str()),
    ]);
    let tracker = start_from_env(&env).await.unwrap();
    let backends = match with {
        With::Stores { .. } => Backends::from_env(&env, &tracker, false).await.unwrap(),
        With::Queue(ctx) => Backends {
            jobs: Some(ctx),
            worker: Some(WorkerConfig {
                concurrency: 2,
                wait_time: Duration::from_secs(1),
                heartbeat_every: Duration::from_secs(1),
                heartbeat_extend: Duration::from_secs(3),
                retry_backoff: Duration::from_secs(1),
                busy_backoff: Duration::from_secs(1),
                shutdown_grace: Duration::from_secs(5),
                ..WorkerConfig::default()
            }),
            ..Backends::default()
        },
    };
    let cfg = ServerConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        api_keys: vec![
            ApiKeySpec::parse(&format!("{ALICE}=alice:user")).unwrap(),
            ApiKeySpec::parse(&format!("{BOB}=bob:user")).unwrap(),
            ApiKeySpec::parse(&format!("{ADMIN}=root:admin")).unwrap(),
        ],
        ..ServerConfig::default()
    };
    let server = Server::bind_with(cfg, &engine, tracker.clone(), backends)
        .await
        .unwrap();
    let progress = server.worker_progress();
    let running = RunningServer::spawn(server);
    Harness {
        base: running.base.clone(),
        sim,
        tracker,
        db,
        progress,
        server: running,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Harness {
    fn post(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
    }

    async fn get(&self, path: &str, key: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }

    async fn get_json(&self, path: &str, key: &str) -> Value {
        let resp = self.get(path, key).await;
        assert_eq!(resp.status(), 200, "GET {path}");
        resp.json().await.unwrap()
    }

    /// Runs one agent to its `done` and returns the request id and the events.
    async fn agent(&self, agent: &str, body: Value) -> (String, Vec<(String, Value)>) {
        let resp = self
            .post(&format!("/v1/agents/{agent}"), ALICE)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        (id, read_sse(resp).await)
    }

    async fn stop(self) -> ShutdownReport {
        let report = self.server.stop().await;
        self.sim.shutdown().await;
        report
    }
}

fn business() -> Value {
    json!({
        "businessDescription": "A bakery that sells sourdough subscriptions in Leeds",
        "targetAudience": "busy families who want fresh bread delivered weekly",
        "industry": "food and drink"
    })
}

async fn read_sse(resp: reqwest::Response) -> Vec<(String, Value)> {
    let mut stream = resp.bytes_stream().eventsource();
    let mut out = Vec::new();
    while let Some(ev) = stream.next().await {
        let ev = ev.unwrap();
        out.push((ev.event, serde_json::from_str(&ev.data).unwrap()));
    }
    out
}

fn last<'a>(events: &'a [(String, Value)], name: &str) -> &'a Value {
    &events.iter().rev().find(|(n, _)| n == name).unwrap().1
}

async fn error_of(resp: reqwest::Response, status: u16) -> Value {
    assert_eq!(resp.status(), status);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    body["error"].clone()
}

#[tokio::test]
async fn sessions_hold_input_and_output_right_after_done_for_their_owner_only() {
    // Shipping every minute: the reads right after `done` must find the messages in the ledger.
    let h = harness(With::Stores { flush_ms: 60_000 }).await;
    let (request_id, events) = h
        .agent(
            "magic-spark",
            json!({ "input": business(), "sessionId": "sess-a" }),
        )
        .await;
    assert_eq!(events.last().unwrap().0, "done");
    assert_eq!(last(&events, "done")["status"], "succeeded");
    let output = last(&events, "result")["output"].clone();

    let session = h.get_json("/v1/sessions/sess-a", ALICE).await;
    assert_eq!(session["messageCount"], 2, "{session}");
    assert_eq!(session["metadata"]["userId"], "alice");
    let msgs = session["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[0]["content"], business());
    assert_eq!(msgs[0]["process"], "magicSpark");
    assert_eq!(msgs[0]["requestId"], request_id.as_str());
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["content"], output);
    assert_eq!(h.tracker.health().shipped, 0, "read from the ledger");

    // Another user's key: the same 404 as a session that does not exist.
    let theirs = error_of(h.get("/v1/sessions/sess-a", BOB).await, 404).await;
    let missing = error_of(h.get("/v1/sessions/no-such", BOB).await, 404).await;
    assert_eq!(theirs["code"], "session_not_found");
    assert_eq!(theirs["code"], missing["code"]);
    assert_eq!(h.get_json("/v1/sessions/sess-a", ADMIN).await, session);

    // Nor can another user write into it: refused before anything runs or is recorded, on
    // both routes that take a sessionId.
    let requests_before = h.sim.stats().requests_total;
    let bobs_write = h
        .post("/v1/agents/magic-spark", BOB)
        .json(&json!({ "input": business(), "sessionId": "sess-a" }))
        .send()
        .await
        .unwrap();
    let e = error_of(bobs_write, 403).await;
    assert!(
        e["message"].as_str().unwrap().contains("another caller"),
        "{e}"
    );
    let bobs_run = h
        .post("/v1/pipelines/tool", BOB)
        .json(&json!({ "business": business(), "sessionId": "sess-a" }))
        .send()
        .await
        .unwrap();
    error_of(bobs_run, 403).await;
    assert_eq!(
        h.sim.stats().requests_total,
        requests_before,
        "no model was called"
    );
    assert_eq!(h.get_json("/v1/sessions/sess-a", ALICE).await, session);
    // The owner may add to it.
    let (_, events) = h
        .agent(
            "magic-spark",
            json!({ "input": business(), "sessionId": "sess-a" }),
        )
        .await;
    assert_eq!(last(&events, "done")["status"], "succeeded");
    let grown = h.get_json("/v1/sessions/sess-a", ALICE).await;
    assert_eq!(grown["messageCount"], 4, "{grown}");

    let mine = h.get_json("/v1/sessions?limit=5", ALICE).await;
    assert_eq!(mine["sessions"][0]["sessionId"], "sess-a", "{mine}");
    let bobs = h.get_json("/v1/sessions", BOB).await;
    assert_eq!(bobs["sessions"], json!([]));
    let e = error_of(h.get("/v1/sessions?limit=0", ALICE).await, 400).await;
    assert_eq!(e["param"], "limit");
    let bad = h
        .post("/v1/agents/magic-spark", ALICE)
        .json(&json!({ "input": business(), "sessionId": "" }))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad, 400).await["param"], "sessionId");

    // The pipeline: the business, then each stage's validated output, all in one run.
    let resp = h
        .post("/v1/pipelines/tool", ALICE)
        .json(&json!({ "business": business(), "sessionId": "sess-p" }))
        .send()
        .await
        .unwrap();
    let events = read_sse(resp).await;
    assert_eq!(last(&events, "done")["status"], "succeeded");
    let run_id = last(&events, "run")["runId"].clone();
    let session = h.get_json("/v1/sessions/sess-p", ALICE).await;
    let msgs = session["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 5, "{session}");
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[0]["content"], business());
    let stages: Vec<&str> = msgs[1..]
        .iter()
        .map(|m| {
            assert_eq!(m["role"], "assistant");
            m["stage"].as_str().unwrap()
        })
        .collect();
    assert_eq!(&stages[..2], ["magicSpark", "logicArchitect"], "{stages:?}");
    assert!(msgs.iter().all(|m| m["runId"] == run_id));
    h.stop().await;
}

#[tokio::test]
async fn admin_routes_report_metrics_alerts_and_dead_letters_to_admins_only() {
    let h = harness(With::Stores { flush_ms: 20 }).await;
    let mut input_tokens = 0;
    for _ in 0..3 {
        let (_, events) = h.agent("magic-spark", json!({ "input": business() })).await;
        input_tokens += last(&events, "usage")["tokens"]["input"].as_u64().unwrap();
    }
    let (health, ok) = h
        .tracker
        .wait_for(WAIT, |m| m.shipped >= 3 && m.pending == 0)
        .await;
    assert!(ok, "{health:?}");

    let m = h.get_json("/v1/admin/metrics?groupBy=process", ADMIN).await;
    assert_eq!(m["totals"]["requests"], 3, "{m}");
    assert_eq!(m["totals"]["inputTokens"], input_tokens);
    assert!(m["totals"]["costMicroUsd"].as_u64().unwrap() > 0);
    assert_eq!(m["groupBy"], "process");
    assert_eq!(m["groups"][0]["key"], "magicSpark");
    assert_eq!(m["groups"][0]["requests"], 3);
    assert_eq!(m["pipeline"]["sink"], "sqlite");
    assert!(m["thresholds"]["costPerRequestUsd"].as_f64().unwrap() > 0.0);
    let alerts = h.get_json("/v1/admin/alerts", ADMIN).await;
    assert!(
        alerts["alerts"].is_array() && alerts["from"].is_string(),
        "{alerts}"
    );

    let e = error_of(h.get("/v1/admin/metrics?groupBy=week", ADMIN).await, 400).await;
    assert_eq!(e["param"], "groupBy");
    assert!(e["message"].as_str().unwrap().contains("groupBy"), "{e}");
    for path in [
        "/v1/admin/metrics",
        "/v1/admin/alerts",
        "/v1/admin/dead-letters",
    ] {
        let e = error_of(h.get(path, ALICE).await, 403).await;
        assert_eq!(e["type"], "permission_error", "{path}");
    }
    let e = error_of(
        h.post("/v1/admin/dead-letters/requeue", ALICE)
            .send()
            .await
            .unwrap(),
        403,
    )
    .await;
    assert_eq!(e["code"], "forbidden");

    // The store refuses one process's records: they become dead letters, listed with the
    // error, and ship once requeued after the cause is gone.
    let store = rusqlite::Connection::open(&h.db).unwrap();
    store
        .execute_batch(
            "CREATE TRIGGER refuse_style BEFORE INSERT ON requests
               WHEN NEW.process = 'styleMaster'
               BEGIN SELECT RAISE(ABORT, 'styleMaster rows refused by the test'); END;",
        )
        .unwrap();
    let input = agents::samples::sample_input(Process::StyleMaster, 1);
    let (_, events) = h.agent("style-master", json!({ "input": input })).await;
    assert_eq!(last(&events, "done")["status"], "succeeded");
    let (health, ok) = h.tracker.wait_for(WAIT, |m| m.dead_letters == 1).await;
    assert!(ok, "{health:?}");
    let dead = h.get_json("/v1/admin/dead-letters?limit=10", ADMIN).await;
    assert_eq!(dead["total"], 1, "{dead}");
    let letter = &dead["deadLetters"][0];
    assert_eq!(letter["kind"], "request");
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("refused by the test"),
        "{letter}"
    );
    assert_eq!(letter["entry"]["process"], "styleMaster");
    let e = error_of(h.get("/v1/admin/dead-letters?limit=0", ADMIN).await, 400).await;
    assert_eq!(e["param"], "limit");

    store.execute_batch("DROP TRIGGER refuse_style").unwrap();
    let requeued: Value = h
        .post("/v1/admin/dead-letters/requeue", ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(requeued, json!({ "requeued": 1, "remaining": 0 }));
    let (health, ok) = h
        .tracker
        .wait_for(WAIT, |m| m.shipped >= 4 && m.pending == 0)
        .await;
    assert!(ok, "{health:?}");
    let m = h
        .get_json(
            "/v1/admin/metrics?groupBy=process&process=styleMaster",
            ADMIN,
        )
        .await;
    assert_eq!(m["totals"]["requests"], 1, "{m}");

    // No queue on this server: the job routes say which variable to set.
    let e = error_of(
        h.post("/v1/jobs", ALICE)
            .json(&json!({ "target": "magicSpark", "input": business() }))
            .send()
            .await
            .unwrap(),
        503,
    )
    .await;
    assert_eq!(e["code"], "queue_not_configured");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("SQS_AI_PROCESSING_QUEUE_URL"),
        "{e}"
    );
    error_of(h.get("/v1/jobs/some-id", ALICE).await, 503).await;
    h.stop().await;
}

async fn depth(sqs: &aws_sdk_sqs::Client, url: &str) -> u64 {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap();
    out.attributes()
        .unwrap()
        .values()
        .map(|v| v.parse::<u64>().unwrap())
        .sum()
}

#[tokio::test]
async fn jobs_run_on_the_in_process_worker_and_only_their_owner_sees_them() {
    let moto = Moto::start().await;
    let sqs = moto::sqs_client(&moto.endpoint).await;
    let urls = admin::create_queues_with(
        &sqs,
        "api-jobs",
        "api-jobs-dlq",
        &QueueSettings {
            visibility: Duration::from_secs(5),
            ..QueueSettings::default()
        },
    )
    .await
    .unwrap();
    let jobs_dir = TempDir::new("api-jobs");
    let ctx = JobsCtx {
        sqs: sqs.clone(),
        queue_url: urls.queue_url.clone(),
        jobs: JobStore::Sqlite(SqliteJobs::open(&jobs_dir.file("jobs.sqlite3")).unwrap()),
    };
    let mut h = harness(With::Queue(ctx)).await;
    let mut progress = h.progress.take().expect("the server runs a worker");

    // Refused inputs never become messages.
    let bad = error_of(
        h.post("/v1/jobs", ALICE)
            .json(&json!({ "target": "magicSpark", "input": { "industry": "x" } }))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert_eq!(bad["code"], "invalid_job");
    let unknown = error_of(
        h.post("/v1/jobs", ALICE)
            .json(&json!({ "target": "sparkle", "input": business() }))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(
        unknown["message"].as_str().unwrap().contains("sparkle"),
        "{unknown}"
    );
    let extra = error_of(
        h.post("/v1/jobs", ALICE)
            .json(&json!({ "target": "magicSpark", "input": business(), "nope": 1 }))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert_eq!(extra["code"], "invalid_field");
    assert_eq!(depth(&sqs, &urls.queue_url).await, 0, "nothing was sent");

    let resp = h
        .post("/v1/jobs", ALICE)
        .json(&json!({ "target": "magicSpark", "input": business(), "priority": "high" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let accepted: Value = resp.json().await.unwrap();
    assert_eq!(accepted["status"], "queued");
    let job_id = accepted["jobId"].as_str().unwrap().to_owned();

    let counts = tokio::time::timeout(WAIT, progress.wait_for(|c| c.succeeded >= 1))
        .await
        .expect("the in-process worker finished the job")
        .unwrap()
        .clone();
    assert_eq!(counts.received, 1, "{counts:?}");

    let job = h.get_json(&format!("/v1/jobs/{job_id}"), ALICE).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["process"], "magicSpark");
    assert!(job["result"]["concepts"].is_array(), "{job}");
    assert!(job["costMicroUsd"].as_u64().unwrap() > 0, "{job}");
    assert!(job["finishedAt"].is_string());
    let theirs = error_of(h.get(&format!("/v1/jobs/{job_id}"), BOB).await, 404).await;
    assert_eq!(theirs["code"], "job_not_found");
    let admin_view = h.get_json(&format!("/v1/jobs/{job_id}"), ADMIN).await;
    assert_eq!(admin_view["id"], job_id.as_str());
    error_of(h.get("/v1/jobs/no-such-job", ALICE).await, 404).await;

    // The job's model call went through the server's tracker.
    let (health, ok) = h.tracker.wait_for(WAIT, |m| m.durable >= 1).await;
    assert!(ok, "{health:?}");
    let report = h.stop().await;
    assert!(report.ledger_flushed, "{report:?}");
    assert_eq!(
        progress.borrow().received,
        1,
        "nothing else reached the worker"
    );
}

/// The built binary writes demo traffic into a fresh SQLite file and says what it wrote.
#[tokio::test]
async fn demo_traffic_fills_a_sqlite_file_through_the_binary() {
    let dir = TempDir::new("demo-bin");
    let db = dir.file("demo.sqlite3");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyvex"))
        .args([
            "demo-traffic",
            "--requests",
            "300",
            "--days",
            "2",
            "--users",
            "3",
        ])
        .env("KEYVEX_METRICS_DB", &db)
        .env("KEYVEX_METRICS_FLUSH_MS", "20")
        .env("RUST_LOG", "warn")
        .env_remove("DYNAMODB_TABLE_NAME")
        .env_remove("KEYVEX_CONFIG")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("wrote 300 requests over 2 days to sqlite"),
        "{stdout}"
    );
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (rows, users): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT json_extract(body, '$.userId')) FROM requests",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(rows, 300);
    assert!((1..=3).contains(&users), "{users}");
    let outbox: i64 = conn
        .query_row("SELECT COUNT(*) FROM metrics_outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(outbox, 0, "everything shipped before exit");
}
