//! End-to-end test of the admin dashboard in a real headless Chromium (driven over WebDriver by
//! chromedriver): demo traffic goes through the metrics `Tracker` into SQLite, a small harness
//! app serves `dashboard::routes()` and the two admin endpoints behind a bearer check, and the
//! test signs in, visits every tab, checks the charts carry data, the alerts list the incident,
//! and that wrong keys and failing refreshes show clear messages. Screenshots are saved to
//! `<target>/dashboard-screenshots/`.
//!
//! The harness stands in for the real server (not on this branch yet); when it lands, mount the
//! real router here instead of `harness_app`.

// Test code: a failed unwrap is a failed test (clippy's test allowance does not reach helpers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fantoccini::{Client, ClientBuilder, Locator};
use http::StatusCode;
use keyvex_engine::catalog::Catalog;
use keyvex_engine::dashboard;
use keyvex_engine::demo::{self, DemoConfig};
use keyvex_engine::metrics::admin::{MetricsReader, alerts_json, metrics_json};
use keyvex_engine::metrics::{MetricsConfig, Tracker};
use keyvex_engine::store::sqlite::SqliteStore;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::TempDir;

const ADMIN_KEY: &str = "kvx_admin_test_key";
const USER_KEY: &str = "kvx_user_test_key";
const WAIT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------ the harness server

#[derive(Clone)]
struct AppState {
    reader: MetricsReader,
    /// When set, the admin endpoints answer 503 (a store outage) so the page's banner shows.
    fail: Arc<AtomicBool>,
}

fn harness_app(state: AppState) -> Router {
    let admin = Router::new()
        .route("/v1/admin/metrics", get(metrics))
        .route("/v1/admin/alerts", get(alerts))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state);
    admin.merge(dashboard::routes())
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

/// One admin key and one user key, like the server's roles.
async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match bearer {
        Some(ADMIN_KEY) if state.fail.load(Ordering::SeqCst) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the metrics store is unreachable",
        ),
        Some(ADMIN_KEY) => next.run(req).await,
        Some(USER_KEY) => error(StatusCode::FORBIDDEN, "forbidden", "admin role required"),
        _ => error(StatusCode::UNAUTHORIZED, "unauthorized", "unknown API key"),
    }
}

async fn metrics(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    match metrics_json(&state.reader, &params).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => (e.status(), Json(e.body())).into_response(),
    }
}

async fn alerts(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    match alerts_json(&state.reader, &params).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => (e.status(), Json(e.body())).into_response(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Demo traffic through the real Tracker into SQLite; returns the reader and the server address.
async fn start_harness(dir: &TempDir) -> (SocketAddr, AppState) {
    let store = SqliteStore::open(&dir.file("store.sqlite3")).unwrap();
    let tracker = Tracker::start(
        MetricsConfig::new(dir.file("ledger.sqlite3")),
        Arc::new(store.clone()),
    )
    .await
    .unwrap();
    let cfg = DemoConfig {
        requests: 1_500,
        ..DemoConfig::new(now_ms())
    };
    let records = demo::generate(&cfg, &Catalog::embedded().unwrap()).unwrap();
    assert_eq!(demo::record_all(&tracker, records).await.unwrap(), 1_500);
    let report = tracker
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(30))
        .await;
    assert_eq!(report.left_in_ledger, 0, "{report:?}");
    assert!(
        tracker.health().alerts_raised >= 2,
        "{:?}",
        tracker.health()
    );

    let state = AppState {
        reader: MetricsReader::sqlite(store).with_health(tracker),
        fail: Arc::new(AtomicBool::new(false)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = harness_app(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, state)
}

// ------------------------------------------------------------------ the browser

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Installs chromium + chromedriver with the repository's script when either is missing.
fn ensure_chromium() {
    if Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists() {
        return;
    }
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/ensure-chromium.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/ensure-chromium.sh failed; the dashboard browser test needs Debian's chromium and chromium-driver:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts chromedriver on a free loopback port and waits for its "started successfully" line.
async fn start_chromedriver() -> (Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("/usr/bin/chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("started successfully") {
                return;
            }
        }
        panic!("chromedriver exited before it was ready");
    })
    .await
    .expect("chromedriver did not start within 20 s");
    // Keep draining its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, port)
}

async fn browser(port: u16, profile: &Path) -> Client {
    let caps = serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync", "--window-size=1440,2000",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap()
}

async fn wait_for(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("waiting for {css}: {e}"))
}

async fn count(c: &Client, css: &str) -> usize {
    c.find_all(Locator::Css(css)).await.unwrap().len()
}

async fn screenshot(c: &Client, name: &str) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("..")
        .join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), c.screenshot().await.unwrap()).unwrap();
}

async fn sign_in(c: &Client, key: &str) {
    let input = wait_for(c, "#api-key").await;
    input.clear().await.unwrap();
    input.send_keys(key).await.unwrap();
    c.find(Locator::Id("login-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Non-zero data marks drawn in a panel.
async fn data_marks(c: &Client, panel: &str) -> usize {
    let marks = c
        .find_all(Locator::Css(&format!("#panel-{panel} svg .mark")))
        .await
        .unwrap();
    let mut nonzero = 0;
    for m in marks {
        let v: f64 = m
            .attr("data-value")
            .await
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        nonzero += usize::from(v > 0.0);
    }
    nonzero
}

async fn open_tab(c: &Client, tab: &str) {
    c.find(Locator::Css(&format!("button[data-tab='{tab}']")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(c, &format!("#panel-{tab}:not([hidden]) .card")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium() {
    ensure_chromium();
    let dir = TempDir::new("dashboard-e2e");
    let (addr, state) = start_harness(&dir).await;
    let (mut driver, port) = start_chromedriver().await;
    let c = browser(port, &dir.file("chromium-profile")).await;
    let result = run_scenario(&c, addr, &state).await;
    let _ = c.close().await;
    let _ = driver.kill().await;
    result
}

async fn run_scenario(c: &Client, addr: SocketAddr, state: &AppState) {
    c.goto(&format!("http://{addr}/admin")).await.unwrap();
    wait_for(c, "body[data-state='signed-out'] #login:not([hidden])").await;

    // A key the server does not know, then a valid key without the admin role.
    sign_in(c, "kvx_not_a_key").await;
    wait_for(c, "body[data-state='auth-error']").await;
    let msg = c.find(Locator::Id("login-error")).await.unwrap();
    let text = msg.text().await.unwrap();
    assert!(text.starts_with("Unknown key"), "{text}");
    screenshot(c, "login-unknown-key.png").await;

    c.execute("document.body.dataset.state = 'retry'", vec![])
        .await
        .unwrap();
    sign_in(c, USER_KEY).await;
    wait_for(c, "body[data-state='auth-error']").await;
    let text = c
        .find(Locator::Id("login-error"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("not an admin key"), "{text}");
    assert_eq!(
        count(c, "#view:not([hidden])").await,
        0,
        "no data view for a user key"
    );
    screenshot(c, "login-not-admin.png").await;

    // The key is kept for the session only, never in the URL.
    sign_in(c, ADMIN_KEY).await;
    wait_for(c, "body[data-state='ready']").await;
    assert!(!c.current_url().await.unwrap().as_str().contains(ADMIN_KEY));
    let stored = c
        .execute("return sessionStorage.getItem('keyvex.adminKey')", vec![])
        .await
        .unwrap();
    assert_eq!(stored, ADMIN_KEY);

    // Cost: spend over time, by process/provider/model, cost-per-request percentiles.
    assert!(data_marks(c, "cost").await >= 10, "cost charts have data");
    assert_eq!(count(c, "#panel-cost svg[data-chart]").await, 5);
    let spend_by_process = count(c, "#panel-cost svg[data-chart='hbar'] .mark").await;
    assert!(spend_by_process >= 4 + 2, "processes and providers drawn");
    screenshot(c, "cost.png").await;

    open_tab(c, "usage").await;
    assert!(data_marks(c, "usage").await >= 10, "usage charts have data");
    assert!(
        count(c, "#panel-usage table.data tbody tr").await >= 5,
        "top callers listed"
    );
    screenshot(c, "usage.png").await;

    open_tab(c, "performance").await;
    assert!(
        data_marks(c, "performance").await >= 10,
        "performance charts have data"
    );
    assert!(
        count(c, "#panel-performance path.line").await >= 6,
        "percentile lines drawn"
    );
    let health = c
        .find(Locator::Css("#panel-performance .table-card"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        health.contains("sqlite") && health.contains("Pending"),
        "{health}"
    );
    screenshot(c, "performance.png").await;

    open_tab(c, "alerts").await;
    let rows = c
        .find_all(Locator::Css("#alerts-table tbody tr"))
        .await
        .unwrap();
    let mut types = Vec::new();
    for r in &rows {
        types.push(r.attr("data-alert-type").await.unwrap().unwrap());
    }
    for expected in ["error_rate", "avg_latency", "cost_per_request"] {
        assert!(
            types.iter().any(|t| t == expected),
            "{expected} in {types:?}"
        );
    }
    assert!(data_marks(c, "alerts").await >= 1, "alerts-over-time chart");
    screenshot(c, "alerts.png").await;

    // A 7-day range switches to daily buckets.
    c.find(Locator::Css("#range option[value='7d']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    open_tab(c, "cost").await;
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::XPath(
            "//p[@id='status-line' and contains(., 'day buckets')]",
        ))
        .await
        .unwrap();
    assert!(data_marks(c, "cost").await >= 7);
    screenshot(c, "cost-7d.png").await;

    // A failing store: a banner, and the last data stays on screen.
    state.fail.store(true, Ordering::SeqCst);
    c.find(Locator::Id("refresh"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(c, "body[data-state='stale']").await;
    let banner = c.find(Locator::Id("banner")).await.unwrap();
    assert!(banner.is_displayed().await.unwrap());
    let text = banner.text().await.unwrap();
    assert!(
        text.contains("Could not refresh") && text.contains("503"),
        "{text}"
    );
    assert!(data_marks(c, "cost").await >= 7, "last data kept");
    screenshot(c, "refresh-failed.png").await;
    state.fail.store(false, Ordering::SeqCst);

    // An empty range says so instead of drawing broken charts.
    c.execute(
        "const r = document.getElementById('range'); r.value = 'custom';
         r.dispatchEvent(new Event('change'));
         document.getElementById('custom-from').value = '2020-01-01T00:00';
         document.getElementById('custom-to').value = '2020-01-02T00:00';
         document.getElementById('custom-range').requestSubmit();",
        vec![],
    )
    .await
    .unwrap();
    let empty = wait_for(c, "#panel-cost .empty").await;
    assert_eq!(empty.text().await.unwrap(), "No requests in this range.");
    assert!(
        !banner.is_displayed().await.unwrap(),
        "a good refresh clears the banner"
    );
    screenshot(c, "empty-range.png").await;
}
