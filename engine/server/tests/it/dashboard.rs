//! End-to-end test of the admin dashboard in a real headless Chromium (driven over WebDriver by
//! chromedriver) against the real server: demo traffic goes through the metrics `Tracker` into
//! SQLite before the server starts, the server serves the page at `/admin` and the admin API
//! behind its real authentication, and the test signs in, visits every tab, checks the charts
//! carry data, the alerts list the incident, and that wrong keys and failing refreshes show clear
//! messages. Screenshots are saved to `<target>/dashboard-screenshots/`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use keyvex_engine::Catalog;
use keyvex_store::MetricsConfig;
use keyvex_store::demo::{self, DemoConfig};
use keyvex_testkit::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::{ADMIN, ALICE, Spec, TestServer, sqlite_stores};

const WAIT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------ the server

/// Makes the metrics store fail and recover: the `requests` table is renamed away (every read
/// then fails with a store error the server answers with 503) and back.
struct StoreFault {
    db: PathBuf,
}

impl StoreFault {
    fn set(&self, failing: bool) {
        let sql = if failing {
            "ALTER TABLE requests RENAME TO requests_away"
        } else {
            "ALTER TABLE requests_away RENAME TO requests"
        };
        rusqlite::Connection::open(&self.db)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The real server on a fresh SQLite file, with demo traffic recorded through its tracker and
/// shipped before the first page load.
async fn start_server(dir: TempDir) -> (TestServer, StoreFault) {
    let db = dir.file("metrics.sqlite3");
    // The default alert rules: the demo's incident must raise alerts for the alerts tab.
    let mut metrics = MetricsConfig::new(&db);
    metrics.flush_interval = Duration::from_millis(20);
    let stores = sqlite_stores(&db, metrics).await;
    // The demo's full 5,000 requests over 7 days: with 1,500, the default range (the last day)
    // held about four rescued calls, and none at all at some times of day.
    let cfg = DemoConfig::new(now_ms());
    let records = demo::generate(&cfg, &Catalog::embedded().unwrap()).unwrap();
    assert_eq!(
        demo::record_all(&stores.tracker, records).await.unwrap(),
        cfg.requests as u64
    );
    let (health, shipped) = stores
        .tracker
        .wait_for(Duration::from_secs(30), |h| {
            h.pending == 0 && h.shipped >= cfg.requests as u64
        })
        .await;
    assert!(shipped, "{health:?}");
    assert!(health.alerts_raised >= 2, "{health:?}");

    let server = TestServer::on_stores(Spec::new(3), &stores, db.clone(), Some(dir)).await;
    (server, StoreFault { db })
}

// ------------------------------------------------------------------ the browser

/// Installs chromium + chromedriver with the repository's script when either is missing.
fn ensure_chromium() {
    if Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists() {
        return;
    }
    let out = std::process::Command::new("bash")
        .arg(keyvex_testkit::moto::repo_root().join("scripts/ensure-chromium.sh"))
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
    let profile = dir.file("chromium-profile");
    let (server, fault) = start_server(dir).await;
    let addr: SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();
    let (mut driver, port) = start_chromedriver().await;
    let c = browser(port, &profile).await;
    run_scenario(&c, addr, &fault).await;
    let _ = c.close().await;
    let _ = driver.kill().await;
    server.stop().await;
}

async fn run_scenario(c: &Client, addr: SocketAddr, fault: &StoreFault) {
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
    sign_in(c, ALICE).await;
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
    sign_in(c, ADMIN).await;
    wait_for(c, "body[data-state='ready']").await;
    assert!(!c.current_url().await.unwrap().as_str().contains(ADMIN));
    let stored = c
        .execute("return sessionStorage.getItem('keyvex.adminKey')", vec![])
        .await
        .unwrap();
    assert_eq!(stored, ADMIN);

    // The catalog version in force, and since when.
    let line = c
        .find(Locator::Id("catalog-line"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        line.starts_with("Model catalog version 0 (2026-11-25)")
            && line.contains("in force since this server started"),
        "{line}"
    );

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
    let performance = c
        .find(Locator::Id("panel-performance"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        performance.contains("Rescued calls by model"),
        "rescued calls per model shown"
    );
    assert!(
        count(
            c,
            "#panel-performance svg[data-chart='hbar'] .mark:not([data-value='0'])"
        )
        .await
            >= 1,
        "the demo's rescued calls drawn"
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
    fault.set(true);
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
    fault.set(false);

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
