//! Records survive SIGTERM and `kill -9` of the built `keyvex serve` binary (moved here from the
//! engine tests): SIGTERM while a stream is open drains it and exits 0 with the call's record in
//! SQLite; SIGTERM flushes every record to DynamoDB (moto) before exiting 0; and after `kill -9`
//! under load, a restart on the same ledger ships every record a client was told about.
//!
//! Every record a caller was told about (an agent `usage` event, a chat usage chunk, a
//! non-streaming chat answer) is identified — an agent call by its record id, a chat completion
//! by its request id — so the tests compare sets of ids, not only counts: exactly those records,
//! each exactly once.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use keyvex_testkit::moto::{Moto, table};
use keyvex_testkit::traffic::{
    Call, assert_exactly, drive_mix, metric_items, told_keys, unique_table,
};
use keyvex_testkit::{TempDir, business};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::cli_support::{records, signal};

/// The API key of the binary's one caller, `alice`.
const ALICE: &str = "alice-key-0001";
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The built binary, stopped with SIGTERM or `kill -9`.

/// A `keyvex serve` child process; killed on drop if a test fails before it exits.
pub(crate) struct Keyvex {
    /// `None` once it has exited and been reaped.
    child: Option<Child>,
    pub(crate) base: String,
    log: Option<std::thread::JoinHandle<Vec<String>>>,
}

/// Where the binary stores its metrics beyond the ledger.
#[derive(Debug, Clone, Copy)]
enum Store<'a> {
    /// The ledger's own SQLite file.
    Sqlite,
    /// `table` on the DynamoDB at `endpoint` (moto).
    Dynamo { endpoint: &'a str, table: &'a str },
}

/// Starts the binary with the metrics ledger in `ledger`, shipping to `store` every `flush_ms`,
/// open streams given `drain_ms` at shutdown, and the in-process simulator (`profile` timing).
fn start_keyvex(
    ledger: &Path,
    store: Store<'_>,
    flush_ms: u64,
    drain_ms: u64,
    profile: &str,
) -> Keyvex {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keyvex"));
    command
        .args(["serve", "--addr", "127.0.0.1:0"])
        .env("KEYVEX_API_KEYS", format!("{ALICE}=alice:user"))
        .env("KEYVEX_METRICS_DB", ledger)
        .env("KEYVEX_METRICS_FLUSH_MS", flush_ms.to_string())
        .env("KEYVEX_DRAIN_TIMEOUT_MS", drain_ms.to_string())
        .env("KEYVEX_SIMULATE", "always")
        .env("KEYVEX_SIM_PROFILE", profile)
        .env("KEYVEX_SIM_SEED", "5")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "warn")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("SQS_AI_PROCESSING_QUEUE_URL")
        .env_remove("KEYVEX_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match store {
        Store::Sqlite => command
            .env_remove("DYNAMODB_TABLE_NAME")
            .env_remove("DYNAMODB_ENDPOINT"),
        Store::Dynamo { endpoint, table } => command
            .env("DYNAMODB_TABLE_NAME", table)
            .env("DYNAMODB_ENDPOINT", endpoint),
    };
    spawn_serve(command)
}

/// Spawns `command` (a `keyvex serve` with stderr piped) and waits for the address it prints.
pub(crate) fn spawn_serve(mut command: Command) -> Keyvex {
    let mut child = command.spawn().unwrap();
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
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM (`kill -TERM`).
    fn send_sigterm(&self) {
        signal(self.pid(), "-TERM");
    }

    /// Sends SIGTERM and waits for the exit; returns the status and the stderr lines.
    pub(crate) async fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        self.send_sigterm();
        self.wait().await
    }

    /// SIGKILL (`Child::kill`): no shutdown code runs.
    pub(crate) async fn kill9(mut self) -> Vec<String> {
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
pub(crate) async fn wait_drained(base: &str) -> Value {
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

// ---------------------------------------------------------------------------------------------
// SIGTERM with a stream open, metrics in SQLite.

/// SIGTERM while a stream is open ends the stream (finished or with the `shutdown` error
/// event), exits 0, and leaves the call's record in SQLite.
#[tokio::test]
async fn sigterm_drains_streams_flushes_metrics_and_exits_zero() {
    let dir = TempDir::new("server-bin");
    let db = dir.file("metrics.sqlite3");
    let mut keyvex = start_keyvex(&db, Store::Sqlite, 500, 300, "fast");
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/agents/magic-spark", keyvex.base))
        .bearer_auth(ALICE)
        .json(&json!({ "input": business() }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream().eventsource();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.event, "start");
    keyvex.send_sigterm();
    let mut last = None;
    while let Some(ev) = stream.next().await {
        last = Some(ev.unwrap());
    }
    let last = last.unwrap();
    let data: Value = serde_json::from_str(&last.data).unwrap();
    assert!(
        last.event == "done" || (last.event == "error" && data["kind"] == "shutdown"),
        "{} {data}",
        last.event
    );
    let (status, log) = keyvex.wait().await;
    assert!(
        status.success(),
        "exit {status:?}; stderr:\n{}",
        log.join("\n")
    );
    let rows = records(&db);
    assert!(
        !rows.is_empty(),
        "no metrics rows; stderr:\n{}",
        log.join("\n")
    );
    assert!(rows.iter().all(|r| r["userId"] == "alice"));
}

/// `table` on `moto`.
fn dynamo_at<'a>(moto: &'a Moto, table: &'a str) -> Store<'a> {
    Store::Dynamo {
        endpoint: &moto.endpoint,
        table,
    }
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
    let keyvex = start_keyvex(&ledger, dynamo_at(&moto, &name), 60_000, 2_000, "fast");
    let told = drive_mix(&keyvex.base, ALICE, 3).await;
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
    assert_exactly(&client, &name, &told, "alice").await;
    assert_eq!(outbox_requests(&ledger), 0);
}

/// Progress of the clients under load, watched by the test to pick the moment of the kill.
#[derive(Debug, Clone, Default)]
struct Load {
    /// Record ids delivered to a client in a `usage` event, request ids of chat completions whose
    /// usage chunk was delivered.
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
        let Ok(resp) = req.bearer_auth(ALICE).send().await else {
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
/// - Every record a client was told about before the kill — by its record id in a `usage` event
///   (agent), by the request id of a usage chunk (chat) — is in DynamoDB after the restart: the
///   server sends that event only once the record is committed to the ledger.
/// - The table holds exactly the ledger's outbox as the kill left it plus one `interrupted`
///   record per call intent left open, each record once: nothing shipped before the kill (60 s
///   flush interval, fewer rows than a ship batch), so the table is empty after the kill, and
///   the restart records the open intents and ships the outbox, no more and no less.
/// - The only records beyond the told ones are calls whose record was committed but whose
///   usage event had not reached the client when the process died, and calls cut mid-stream by
///   the kill (`interrupted`, from their intents; `kill -9` runs no code, so nothing else could
///   record them); there is at most one such call per stream open at the kill. That every call
///   the provider served is recorded is `interrupted.rs`'s subject.
#[tokio::test]
async fn kill_9_under_load_then_restart_ships_every_record_a_client_was_told_about() {
    let moto = Moto::start().await;
    let name = unique_table("kill");
    let client = table(&moto, &name).await;
    let dir = TempDir::new("durability-kill");
    let ledger = dir.file("ledger.sqlite3");
    // Realistic timing: streams take seconds, so several are mid-flight at the kill.
    let keyvex = start_keyvex(&ledger, dynamo_at(&moto, &name), 60_000, 2_000, "realistic");
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
    assert_eq!(
        told.len(),
        rx.borrow().told.len(),
        "record and request ids are unique"
    );
    assert!(told.len() >= at_kill.told.len());
    // Each client has at most one stream open, so at most this many streams were cut.
    let open_at_kill = clients_count;

    assert!(
        metric_items(&client, &name).await.is_empty(),
        "nothing shipped before the kill"
    );
    let durable = outbox_requests(&ledger);
    assert!(durable >= told.len() as u64, "{durable} < {}", told.len());
    let open_intents = {
        let conn = rusqlite::Connection::open(&ledger).unwrap();
        conn.query_row(
            "SELECT COUNT(*) FROM call_intents WHERE ended = 0",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64
    };

    let restarted = start_keyvex(&ledger, dynamo_at(&moto, &name), 20, 2_000, "fast");
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
    let stored = told_keys(&metric_items(&client, &name).await, &told);
    assert!(
        told.is_subset(&stored),
        "told but lost: {:?}",
        told.difference(&stored).collect::<Vec<_>>()
    );
    assert_eq!(
        stored.len() as u64,
        durable + open_intents,
        "the table holds exactly the outbox and the open intents' records"
    );
    let items = metric_items(&client, &name).await;
    let interrupted = items
        .values()
        .filter(|i| {
            keyvex_store::dynamo::request_from_item(i).unwrap().status
                == keyvex_engine::RequestStatus::Interrupted
        })
        .count() as u64;
    assert_eq!(interrupted, open_intents, "one record per open intent");
    let extra = stored.difference(&told).count();
    assert!(
        extra <= open_at_kill,
        "{extra} untold records with {open_at_kill} streams open"
    );
    assert_eq!(outbox_requests(&ledger), 0);
}
