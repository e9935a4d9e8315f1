//! What the engine crates' integration tests share: a private moto server per test, a
//! fault-injecting proxy in front of it, temp directories, fast metrics settings, an engine
//! pointed at a simulator, an in-memory recorder, and SSE reading. Test-only: no engine crate
//! depends on it outside `[dev-dependencies]`.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test (the tests' allowance does not reach helpers)"
)]

pub mod fault_proxy;
pub mod moto;
pub mod redis;
pub mod traffic;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use keyvex_engine::record::{
    CallIntent, Receipt, Recorder, RequestRecord, SessionMessage, ShutdownReport,
};
use keyvex_engine::router::RouterConfig;
use keyvex_engine::{Engine, EngineBuilder};
use keyvex_sim::{SimConfig, SimHandle};
use keyvex_store::MetricsConfig;
use keyvex_store::dynamo::DynamoRetry;
use serde_json::{Value, json};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("keyvex-{tag}-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn file(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fast flushes and retries so the tests take milliseconds per round, and the rolling alert rules
/// kept quiet so counts of records are exact (alerts have their own tests).
pub fn fast_metrics(ledger: impl Into<std::path::PathBuf>) -> MetricsConfig {
    let mut cfg = MetricsConfig::new(ledger);
    cfg.flush_interval = Duration::from_millis(20);
    cfg.retry_base = Duration::from_millis(5);
    cfg.retry_cap = Duration::from_millis(50);
    cfg.alerts.min_samples = usize::MAX;
    cfg
}

/// DynamoDB retries in milliseconds, so throttling and outages are exercised quickly.
pub fn fast_retry() -> DynamoRetry {
    DynamoRetry {
        base: Duration::from_millis(2),
        cap: Duration::from_millis(20),
        max_attempts: 8,
    }
}

/// A fast simulator on a free loopback port.
pub async fn fast_sim(seed: u64) -> SimHandle {
    keyvex_sim::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig::fast(seed),
    )
    .await
    .unwrap()
}

/// An engine builder whose two providers reach `sim` through the real client code over HTTP,
/// with deadlines short enough for tests. Add a recorder (and anything else) and build.
pub fn sim_engine(sim: &SimHandle) -> EngineBuilder {
    let base = sim.base_url();
    Engine::builder()
        .connect_timeout(Duration::from_secs(2))
        .router(RouterConfig {
            ttft_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(10),
            ..RouterConfig::default()
        })
        .openai_at(&base, "sim-key")
        .anthropic_at(&base, "sim-key")
}

/// The process whose primary model is served by `kind` in the embedded catalog (its fallback is
/// on the other provider).
pub fn process_with_primary(kind: keyvex_engine::stream::ProviderKind) -> agents::Process {
    let catalog = keyvex_engine::catalog::Catalog::embedded().unwrap();
    agents::Process::ALL
        .into_iter()
        .find(|p| catalog.model(&catalog.route(*p).primary).unwrap().provider == kind)
        .unwrap()
}

/// A recorder that keeps everything in memory, durable at once: for tests of the engine alone.
#[derive(Clone, Default)]
pub struct MemoryRecorder {
    inner: Arc<Mutex<Recorded>>,
}

#[derive(Default)]
struct Recorded {
    records: Vec<RequestRecord>,
    messages: Vec<SessionMessage>,
    intents: Vec<CallIntent>,
}

impl MemoryRecorder {
    pub fn new() -> Arc<MemoryRecorder> {
        Arc::new(MemoryRecorder::default())
    }

    pub fn records(&self) -> Vec<RequestRecord> {
        self.inner.lock().unwrap().records.clone()
    }

    pub fn messages(&self) -> Vec<SessionMessage> {
        self.inner.lock().unwrap().messages.clone()
    }

    /// Every call intent handed over, in order (a call's updated intent after a failure it went
    /// on from is a second entry with the same id).
    pub fn intents(&self) -> Vec<CallIntent> {
        self.inner.lock().unwrap().intents.clone()
    }

    /// The intents whose call has no record: what a process stopping now would leave as
    /// `interrupted` (the latest intent of each such call, in order of first appearance).
    pub fn open_intents(&self) -> Vec<CallIntent> {
        let inner = self.inner.lock().unwrap();
        let mut open: Vec<CallIntent> = Vec::new();
        for intent in &inner.intents {
            let id = &intent.record.request_id;
            if inner.records.iter().any(|r| &r.request_id == id) {
                continue;
            }
            match open.iter_mut().find(|i| &i.record.request_id == id) {
                Some(earlier) => *earlier = intent.clone(),
                None => open.push(intent.clone()),
            }
        }
        open
    }

    /// Waits until at least `n` records arrived (records of abandoned calls come from `Drop`,
    /// which may run on another task just after the caller moved on).
    pub async fn wait_for_records(&self, n: usize, within: Duration) -> Vec<RequestRecord> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let records = self.records();
            if records.len() >= n || tokio::time::Instant::now() >= deadline {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Recorder for MemoryRecorder {
    fn record(&self, record: RequestRecord) -> Receipt {
        self.inner.lock().unwrap().records.push(record);
        Receipt::durable_now()
    }

    fn record_message(&self, message: SessionMessage) -> Receipt {
        self.inner.lock().unwrap().messages.push(message);
        Receipt::durable_now()
    }

    fn record_intent(&self, intent: CallIntent) {
        self.inner.lock().unwrap().intents.push(intent);
    }

    fn shutdown(&self, _deadline: tokio::time::Instant) -> BoxFuture<'_, ShutdownReport> {
        Box::pin(async {
            ShutdownReport {
                ledger_flushed: true,
                ..ShutdownReport::default()
            }
        })
    }
}

/// A business every test can run the pipeline on.
pub fn business() -> Value {
    json!({
        "businessDescription": "A solar installer serving homeowners in Arizona",
        "targetAudience": "homeowners with high summer electricity bills",
        "industry": "renewable energy"
    })
}

/// Reads an SSE response to its end as (event name, JSON data), calling `each` as events
/// arrive. Asserts a 200 `text/event-stream` answer.
pub async fn read_sse_with(
    resp: reqwest::Response,
    mut each: impl FnMut(&str, &Value),
) -> Vec<(String, Value)> {
    use eventsource_stream::Eventsource;
    assert_eq!(resp.status(), 200, "{:?}", resp.headers());
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut stream = resp.bytes_stream().eventsource();
    let mut out = Vec::new();
    while let Some(ev) = stream.next().await {
        let ev = ev.unwrap();
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        each(&ev.event, &data);
        out.push((ev.event, data));
    }
    out
}

/// [`read_sse_with`] without a callback.
pub async fn read_sse(resp: reqwest::Response) -> Vec<(String, Value)> {
    read_sse_with(resp, |_, _| {}).await
}

/// The last event named `name`.
pub fn last<'a>(events: &'a [(String, Value)], name: &str) -> &'a Value {
    &events
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} event in {events:?}"))
        .1
}

/// An error answer's `error` object, after checking its status.
pub async fn error_of(resp: reqwest::Response, status: u16) -> Value {
    assert_eq!(resp.status(), status);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    body["error"].clone()
}
