//! Two real `keyvex serve` processes sharing one Redis (`REDIS_URL`): a caller's burst and a
//! dollar budget hold across both; with Redis stopped, rate limits fail open and budgets fail
//! closed (both counted in `/metrics`), and service resumes when Redis returns. Without Redis,
//! a restarted process goes on from the spend its metrics store holds.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keyvex_engine::{Cost, Engine, Process};
use keyvex_testkit::redis::Redis;
use keyvex_testkit::{MemoryRecorder, TempDir, business};
use serde_json::{Value, json};

use crate::cli_support::{get_json, prometheus_text, records};

const ALICE: &str = "alice-key-shared-1";
const ADMIN: &str = "root-key-shared-2";

/// A `keyvex serve` child, killed on drop.
struct Serve {
    child: Child,
    base: String,
    log: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Stops the process and returns what it logged.
    fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.take().unwrap().join().unwrap()
    }
}

/// `keyvex serve` on the in-process simulator (fast), its metrics in `db`, limits and budgets in
/// the Redis at `redis_url` (in the process without one), with `extra` settings.
fn serve(db: &Path, redis_url: Option<&str>, extra: &[(&str, &str)]) -> Serve {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keyvex"));
    command
        .args(["serve", "--addr", "127.0.0.1:0"])
        .env(
            "KEYVEX_API_KEYS",
            format!("{ALICE}=alice:user,{ADMIN}=root:admin"),
        )
        .env("KEYVEX_METRICS_DB", db)
        .env("KEYVEX_METRICS_FLUSH_MS", "50")
        .env("KEYVEX_SIMULATE", "always")
        .env("KEYVEX_SIM_PROFILE", "fast")
        .env("KEYVEX_REDIS_TIMEOUT_MS", "200")
        .env("RUST_LOG", "warn")
        .env("AWS_REGION", "us-east-1")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("DYNAMODB_TABLE_NAME")
        .env_remove("SQS_AI_PROCESSING_QUEUE_URL")
        .env_remove("KEYVEX_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match redis_url {
        Some(url) => command.env("REDIS_URL", url),
        None => command.env_remove("REDIS_URL"),
    };
    for (k, v) in extra {
        command.env(k, v);
    }
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
    let mut serve = Serve {
        child,
        base: String::new(),
        log: Some(log),
    };
    serve.base = addr_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("keyvex printed its address");
    serve
}

fn worst_case() -> Cost {
    Engine::builder()
        .recorder(MemoryRecorder::new())
        .build()
        .unwrap()
        .agent_worst_case(Process::MagicSpark, &business())
        .unwrap()
}

async fn run_agent(http: &reqwest::Client, base: &str) -> (u16, Value) {
    let resp = http
        .post(format!("{base}/v1/agents/magic-spark"))
        .bearer_auth(ALICE)
        .json(&json!({ "input": business() }))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    if status != 200 {
        return (status, resp.json().await.unwrap());
    }
    let events = keyvex_testkit::read_sse(resp).await;
    (status, keyvex_testkit::last(&events, "done").clone())
}

/// alice's line for this UTC day in a `GET /v1/admin/budgets` answer (null when she has none).
fn alice_day(all: &Value) -> Value {
    all["callers"]
        .as_array()
        .and_then(|callers| callers.iter().find(|c| c["caller"] == "alice"))
        .map_or(Value::Null, |c| c["day"].clone())
}

/// An agent stream that was admitted (200) and ended with `status`.
fn assert_ended(status: u16, done: &Value, expected: &str) {
    assert_eq!(
        (status, done["status"].as_str()),
        (200, Some(expected)),
        "{done}"
    );
}

fn billed(db: &Path) -> u64 {
    records(db)
        .iter()
        .map(|r| r["costPicoUsd"].as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn a_burst_and_a_dollar_budget_hold_across_two_replicas() {
    let redis = Redis::start().await;
    let dir = TempDir::new("shared-limits");
    let worst = worst_case();
    // Room for one call at its worst case and half of another.
    let limit = Cost(worst.0 * 3 / 2);
    let limit_usd = format!(
        "{}.{:012}",
        limit.0 / 1_000_000_000_000,
        limit.0 % 1_000_000_000_000
    );
    let settings = [
        ("KEYVEX_RATE_LIMIT_BURST", "5"),
        ("KEYVEX_RATE_LIMIT_PER_HOUR", "1"),
        ("KEYVEX_BUDGET_DAILY_USD", limit_usd.as_str()),
    ];
    let (db_a, db_b) = (dir.file("a.sqlite3"), dir.file("b.sqlite3"));
    let a = serve(&db_a, Some(&redis.url), &settings);
    let b = serve(&db_b, Some(&redis.url), &settings);
    let http = reqwest::Client::new();

    // The admin's burst of 5 on one endpoint, spread over both replicas: exactly 5 pass.
    let mut statuses = Vec::new();
    for i in 0..12 {
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        let resp = http
            .get(format!("{base}/v1/admin/whoami"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        7,
        "{statuses:?}"
    );

    // Alice's daily budget holds one call's worst case; five at once over both replicas (her
    // burst on the agent route is five too, so no rate limit gets in the way).
    let calls = (0..5).map(|i| {
        let base = if i % 2 == 0 {
            a.base.clone()
        } else {
            b.base.clone()
        };
        let http = http.clone();
        async move { run_agent(&http, &base).await }
    });
    let answers = futures::future::join_all(calls).await;
    let mut ok = 0;
    let mut refused = 0;
    for (status, body) in &answers {
        match status {
            200 if body["status"] == "succeeded" => ok += 1,
            // Admitted by the check, refused by the reservation (the stream's `done`).
            200 => refused += 1,
            429 => {
                assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(ok >= 1, "one worst case fits: {answers:?}");
    assert!(refused >= 1, "five at once do not: {answers:?}");
    // Both replicas read the same counter from Redis. Once every record is shipped and every
    // settle applied, it holds exactly what the two replicas billed, nothing reserved.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let spent = loop {
        let mut days = Vec::new();
        for base in [&a.base, &b.base] {
            let all: Value = get_json(&http, format!("{base}/v1/admin/budgets"), ADMIN).await;
            assert!(all["store"].as_str().unwrap().contains("redis"), "{all}");
            days.push(alice_day(&all));
        }
        let billed = billed(&db_a) + billed(&db_b);
        let settled = days
            .iter()
            .all(|d| d["reservedPicoUsd"] == 0 && d["spentPicoUsd"].as_u64() == Some(billed));
        if settled && billed > 0 {
            break billed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "billed {billed}, Redis says {days:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        spent <= limit.0,
        "billed {spent} over the shared limit {}",
        limit.0
    );
    let log = a.stop();
    assert!(
        log.iter()
            .any(|l| l.contains("limits shared by every replica")),
        "the banner says where limits are kept: {log:?}"
    );
    b.stop();
}

/// `keyvex_admission_prepaid_total` by outcome: (used, returned).
async fn prepaid(http: &reqwest::Client, base: &str) -> (u64, u64) {
    let metrics = prometheus_text(http, base).await;
    let count = |outcome: &str| {
        let prefix = format!("keyvex_admission_prepaid_total{{outcome=\"{outcome}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (count("used"), count("returned"))
}

/// With Redis, admission takes the caller's request and reserves the first call in one round
/// trip; the agent, pipeline and chat routes each price that call as the router does, so its
/// first attempt uses the reservations rather than making its own, and the budget ends holding
/// exactly what was billed.
#[tokio::test]
async fn the_model_routes_reserve_their_first_call_at_admission() {
    let redis = Redis::start().await;
    let dir = TempDir::new("shared-prepaid");
    let db = dir.file("a.sqlite3");
    let a = serve(&db, Some(&redis.url), &[("KEYVEX_BUDGET_DAILY_USD", "100")]);
    let http = reqwest::Client::new();

    let (status, agent) = run_agent(&http, &a.base).await;
    assert_ended(status, &agent, "succeeded");
    let resp = http
        .post(format!("{}/v1/pipelines/tool", a.base))
        .bearer_auth(ALICE)
        .json(&json!({ "business": business() }))
        .send()
        .await
        .unwrap();
    let events = keyvex_testkit::read_sse(resp).await;
    assert_eq!(
        keyvex_testkit::last(&events, "done")["status"],
        "succeeded",
        "{events:?}"
    );
    for stream in [false, true] {
        let resp = http
            .post(format!("{}/v1/chat/completions", a.base))
            .bearer_auth(ALICE)
            .json(&json!({
                "model": "gpt-5.4-mini",
                "stream": stream,
                "max_completion_tokens": 40,
                "messages": [{ "role": "user", "content": "One word." }],
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().contains_key("x-budget-remaining-usd"));
        resp.bytes().await.unwrap();
    }
    // One per request: the agent, the pipeline's Magic Spark, two chats. The pipeline's later
    // stages reserve for themselves.
    assert_eq!(prepaid(&http, &a.base).await, (4, 0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let all: Value = get_json(&http, format!("{}/v1/admin/budgets", a.base), ADMIN).await;
        let day = alice_day(&all);
        let billed = billed(&db);
        if day["reservedPicoUsd"] == 0 && day["spentPicoUsd"].as_u64() == Some(billed) && billed > 0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "billed {billed}, Redis says {day}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(a.stop());
}

/// `rediss://` (ElastiCache with in-transit encryption): the connection is TLS, verified against
/// the system's roots — here the test CA, given as `SSL_CERT_FILE`. Without the CA the server's
/// certificate is not trusted, Redis counts as down, and budgets fail closed.
#[tokio::test]
async fn rediss_urls_speak_tls_and_verify_the_server() {
    let redis = Redis::start_tls().await;
    let ca = redis.ca_file().unwrap();
    let ca = ca.to_str().unwrap();
    let dir = TempDir::new("shared-tls");
    let db = dir.file("a.sqlite3");
    let a = serve(
        &db,
        Some(&redis.url),
        &[("KEYVEX_BUDGET_DAILY_USD", "100"), ("SSL_CERT_FILE", ca)],
    );
    let http = reqwest::Client::new();
    let (status, agent) = run_agent(&http, &a.base).await;
    assert_ended(status, &agent, "succeeded");
    let all: Value = get_json(&http, format!("{}/v1/admin/budgets", a.base), ADMIN).await;
    assert!(
        all["store"].as_str().unwrap().contains("rediss://"),
        "{all}"
    );
    assert_eq!(prepaid(&http, &a.base).await, (1, 0));
    drop(a.stop());

    let untrusting = serve(
        &dir.file("b.sqlite3"),
        Some(&redis.url),
        &[
            ("KEYVEX_BUDGET_DAILY_USD", "100"),
            ("SSL_CERT_FILE", "/dev/null"),
        ],
    );
    let (status, body) = run_agent(&http, &untrusting.base).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "budget_unavailable", "{body}");
    drop(untrusting.stop());
}

/// A provider's requests-per-minute budget in Redis is one budget for every replica: a call on
/// one replica takes the primary provider's only request of the minute, so the next call, on the
/// other replica, goes to the fallback's provider, and a third finds both spent.
#[tokio::test]
async fn a_provider_requests_per_minute_budget_holds_across_two_replicas() {
    let redis = Redis::start().await;
    let dir = TempDir::new("shared-provider-rpm");
    let settings = [("KEYVEX_PROVIDER_RPM", "1")];
    let (db_a, db_b) = (dir.file("a.sqlite3"), dir.file("b.sqlite3"));
    let a = serve(&db_a, Some(&redis.url), &settings);
    let b = serve(&db_b, Some(&redis.url), &settings);
    let http = reqwest::Client::new();

    let (status, first) = run_agent(&http, &a.base).await;
    assert_ended(status, &first, "succeeded");
    assert_eq!(first["totals"]["fallbackUsed"], false, "{first}");
    let (status, second) = run_agent(&http, &b.base).await;
    assert_ended(status, &second, "succeeded");
    assert_eq!(second["totals"]["fallbackUsed"], true, "{second}");
    let (status, third) = run_agent(&http, &a.base).await;
    assert_ended(status, &third, "failed");
    assert_eq!(
        third["totals"]["costMicroUsd"], 0,
        "no model was called: {third}"
    );
    assert_eq!(
        third["totals"]["tokens"]["input"], 0,
        "no model was called: {third}"
    );
    drop(a.stop());
    drop(b.stop());
}

#[tokio::test]
async fn with_redis_down_rate_limits_fail_open_and_budgets_fail_closed_until_it_returns() {
    let mut redis = Redis::start().await;
    let dir = TempDir::new("redis-outage");
    let a = serve(
        &dir.file("a.sqlite3"),
        Some(&redis.url),
        &[("KEYVEX_BUDGET_DAILY_USD", "100")],
    );
    let http = reqwest::Client::new();
    assert_eq!(run_agent(&http, &a.base).await.0, 200);

    redis.stop();
    // Rate limits fail open: the admin route still answers.
    for _ in 0..3 {
        let resp = http
            .get(format!("{}/v1/admin/whoami", a.base))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // Budgets fail closed: no model call without a budget check.
    let (status, body) = run_agent(&http, &a.base).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "budget_unavailable", "{body}");
    let metrics = prometheus_text(&http, &a.base).await;
    let count = |name: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        count("keyvex_shared_limits_unavailable_total") >= 3,
        "{metrics}"
    );
    assert!(
        count("keyvex_budget_store_unavailable_total") >= 1,
        "{metrics}"
    );

    redis.restart().await;
    // Service resumes once the connection is back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = run_agent(&http, &a.base).await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no recovery: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = a.stop();
    // Logged once per episode, not once per request.
    let down = log
        .iter()
        .filter(|l| l.contains("spend store unavailable"))
        .count();
    assert_eq!(down, 1, "{log:?}");
}

/// Budgets kept in the process (no Redis) survive a restart: the new process reads what the
/// metrics store holds for today and this month (including what the killed process left
/// unshipped in its ledger), so the caller's day goes on where it was and a budget spent before
/// the restart still refuses; a caller's own limit set through the admin API is kept too.
#[tokio::test]
async fn without_redis_a_restarted_process_goes_on_from_the_spend_in_its_metrics_store() {
    let dir = TempDir::new("budget-restart");
    let db = dir.file("metrics.sqlite3");
    let usd = |c: u64| format!("{}.{:012}", c / 1_000_000_000_000, c % 1_000_000_000_000);
    let http = reqwest::Client::new();
    let first = serve(&db, None, &[]);
    let (status, done) = run_agent(&http, &first.base).await;
    assert_ended(status, &done, "succeeded");
    // Killed: its records may still be in its ledger, shipped by the next process at start.
    drop(first.stop());

    let second = serve(&db, None, &[]);
    let billed = billed(&db);
    assert!(billed > 0);
    let all: Value = get_json(&http, format!("{}/v1/admin/budgets", second.base), ADMIN).await;
    let day = alice_day(&all);
    assert_eq!(day["spentPicoUsd"].as_u64(), Some(billed), "{all}");
    assert_eq!(
        all["global"]["spentPicoUsd"].as_u64(),
        Some(billed),
        "{all}"
    );
    // A daily limit the next call's worst case fits from zero, but not on top of what the first
    // process spent.
    let resp = http
        .put(format!("{}/v1/admin/budgets/alice", second.base))
        .bearer_auth(ADMIN)
        .json(&json!({ "dailyUsd": usd(billed + worst_case().0 - 1) }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, body) = run_agent(&http, &second.base).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
    drop(second.stop());

    // The limit set through the admin API is kept in the metrics store: the next process has
    // it, and still refuses.
    let third = serve(&db, None, &[]);
    let all: Value = get_json(&http, format!("{}/v1/admin/budgets", third.base), ADMIN).await;
    let alice = all["callers"]
        .as_array()
        .and_then(|callers| callers.iter().find(|c| c["caller"] == "alice"))
        .cloned()
        .unwrap_or_default();
    assert!(alice["ownLimits"]["dailyUsd"].is_number(), "{all}");
    assert!(
        all["store"].as_str().unwrap().contains("kept in SQLite"),
        "{all}"
    );
    let (status, body) = run_agent(&http, &third.base).await;
    assert_eq!(status, 429, "{body}");
    drop(third.stop());
}
