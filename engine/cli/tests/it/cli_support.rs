//! What the binary's tests share: the `keyvex` command with a clean environment pointed at a
//! simulator the test holds, reading the records a run left in its SQLite file, and waiting for
//! an observable condition.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keyvex_sim::SimHandle;
use serde_json::Value;

/// `keyvex` with no store, queue or config file from the test's own environment, and dummy AWS
/// credentials in `us-east-1` (for moto).
pub fn keyvex_bare() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyvex"));
    for name in [
        "DYNAMODB_TABLE_NAME",
        "DYNAMODB_ENDPOINT",
        "SQS_AI_PROCESSING_QUEUE_URL",
        "SQS_AI_PROCESSING_DLQ_URL",
        "KEYVEX_CONFIG",
        "KEYVEX_MODELS_FILE",
    ] {
        cmd.env_remove(name);
    }
    cmd.env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test");
    cmd
}

/// `keyvex` with no provider keys, store or queue from the test's own environment, talking to
/// `sim` through the real provider clients, its metrics in `db`.
pub fn keyvex(sim: &SimHandle, db: &Path) -> Command {
    let mut cmd = keyvex_bare();
    let base = sim.base_url();
    cmd.env("OPENAI_API_KEY", "sim-key")
        .env("OPENAI_BASE_URL", &base)
        .env("ANTHROPIC_API_KEY", "sim-key")
        .env("ANTHROPIC_BASE_URL", &base)
        .env("KEYVEX_SIMULATE", "never")
        .env("KEYVEX_METRICS_DB", db)
        .env("KEYVEX_METRICS_FLUSH_MS", "50");
    cmd
}

/// Runs `cmd` to its end, asserts it succeeded (showing its stderr if not), returns its stdout
/// trimmed.
pub fn stdout_of(cmd: &mut Command) -> String {
    let output = cmd.output().unwrap();
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// The call records in the SQLite store `db`, oldest first.
pub fn records(db: &Path) -> Vec<Value> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT body FROM requests ORDER BY timestamp_ms, request_id")
        .unwrap();
    stmt.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|b| serde_json::from_str(&b.unwrap()).unwrap())
        .collect()
}

/// Polls `check` until it holds; panics naming `what` after `within`. For conditions of another
/// process (a stream the simulator serves, a job's state) that send no signal to wait on.
pub async fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `signal` (e.g. `-INT`, `-TERM`) to the process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// `GET url` with `key` as the bearer, answer read as JSON.
pub async fn get_json(http: &reqwest::Client, url: impl reqwest::IntoUrl, key: &str) -> Value {
    http.get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The Prometheus text of the server at `base`.
pub async fn prometheus_text(http: &reqwest::Client, base: &str) -> String {
    http.get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
