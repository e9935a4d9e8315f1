//! The load client: streaming `POST /v1/chat/completions` requests, timed from the client's side
//! (time to headers, time to first content, gaps between content chunks, end to end).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::time::Instant;

use super::MODEL;

/// Where the streams go and with which key.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: &'static str,
    /// The full `…/v1/chat/completions` URL.
    pub url: String,
    pub bearer: String,
}

/// The request every stream sends.
pub fn request_body() -> Bytes {
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [
            { "role": "system", "content": "You are a concise assistant." },
            { "role": "user", "content": "Explain in a paragraph why a relay should add no latency." },
        ],
        "stream": true,
        "stream_options": { "include_usage": true },
        "max_completion_tokens": 512,
    });
    Bytes::from(body.to_string())
}

/// A client that keeps connections open between rounds, like a real SDK would.
pub fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(600))
        .build()
}

#[expect(
    clippy::expect_used,
    reason = "hdrhistogram only refuses more than 5 significant digits"
)]
fn histogram() -> Histogram<u64> {
    // Nanoseconds, 4 significant digits: 5 µs resolution at a 50 ms TTFT, so differences of a
    // tenth of a millisecond are visible. Auto-resizing, so no value is clamped.
    Histogram::new(4).expect("4 significant digits are supported")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
    // An auto-resizing histogram only refuses values beyond u64 range.
    let _ = h.record(ns);
}

/// Timings of many streams against one target.
#[derive(Debug, Clone)]
pub struct Sample {
    pub headers: Histogram<u64>,
    pub ttft: Histogram<u64>,
    pub gap: Histogram<u64>,
    pub e2e: Histogram<u64>,
    pub streams: u64,
    pub failed: u64,
    /// `data:` events received (content, role, finish, usage and `[DONE]`).
    pub events: u64,
    /// Gaps between content chunks longer than the stall threshold.
    pub stalls: u64,
    pub max_gap: Duration,
    /// The first failure, to show what went wrong.
    pub first_error: Option<String>,
}

impl Default for Sample {
    fn default() -> Self {
        Sample {
            headers: histogram(),
            ttft: histogram(),
            gap: histogram(),
            e2e: histogram(),
            streams: 0,
            failed: 0,
            events: 0,
            stalls: 0,
            max_gap: Duration::ZERO,
            first_error: None,
        }
    }
}

impl Sample {
    pub fn merge(&mut self, other: &Sample) {
        let _ = self.headers.add(&other.headers);
        let _ = self.ttft.add(&other.ttft);
        let _ = self.gap.add(&other.gap);
        let _ = self.e2e.add(&other.e2e);
        self.streams += other.streams;
        self.failed += other.failed;
        self.events += other.events;
        self.stalls += other.stalls;
        self.max_gap = self.max_gap.max(other.max_gap);
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }

    fn fail(&mut self, error: String) {
        self.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some(error);
        }
    }

    /// Adds what one stream did.
    pub fn absorb(&mut self, log: StreamLog) {
        for error in log.failures {
            self.fail(error);
        }
        self.events += log.events;
        self.stalls += log.stalls;
        self.max_gap = self.max_gap.max(log.max_gap);
        if let Some(t) = log.timings {
            self.streams += 1;
            record(&mut self.headers, t.headers);
            record(&mut self.ttft, t.ttft);
            for gap in t.gaps {
                record(&mut self.gap, gap);
            }
            record(&mut self.e2e, t.e2e);
        }
    }
}

/// What one stream did. Small on purpose: a soak holds one per open stream, and a [`Sample`]'s
/// four auto-resizing histograms start at 256 KiB each — 10,000 of them were 10 GiB.
#[derive(Debug, Default)]
pub struct StreamLog {
    failures: Vec<String>,
    events: u64,
    stalls: u64,
    max_gap: Duration,
    /// Set when the stream completed (content and `[DONE]`).
    timings: Option<StreamTimings>,
}

#[derive(Debug)]
struct StreamTimings {
    headers: Duration,
    ttft: Duration,
    gaps: Vec<Duration>,
    e2e: Duration,
}

impl StreamLog {
    fn fail(&mut self, error: String) {
        self.failures.push(error);
    }
}

/// Counters shared by the streams of a soak, read while they run.
#[derive(Debug, Default)]
pub struct Progress {
    /// Streams that received their first content.
    pub flowing: AtomicU64,
    /// Streams that ended, either way.
    pub ended: AtomicU64,
    /// Content chunks received by all streams.
    pub chunks: AtomicU64,
}

/// Whether an SSE `data:` payload carries non-empty `delta.content`. Both the simulator and the
/// engine write compact JSON, so the key is always spelled `"content":"`.
fn has_content(payload: &[u8]) -> bool {
    const KEY: &[u8] = b"\"content\":\"";
    payload
        .windows(KEY.len())
        .position(|w| w == KEY)
        .is_some_and(|i| payload.get(i + KEY.len()).is_some_and(|&b| b != b'"'))
}

/// How the load client reaches a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTP/1.1: one connection (and one descriptor on each side) per open stream.
    Http1,
    /// HTTP/2 cleartext with prior knowledge (h2c): up to `streams_per_conn` streams multiplexed
    /// on each connection.
    H2c { streams_per_conn: usize },
}

impl Transport {
    /// `http1` or `h2c`, as recorded in the results.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Http1 => "http1",
            Transport::H2c { .. } => "h2c",
        }
    }

    /// Connections a client needs to hold `streams` streams open at once.
    pub fn connections(self, streams: usize) -> usize {
        match self {
            Transport::Http1 => streams,
            Transport::H2c { streams_per_conn } => streams.div_ceil(streams_per_conn.max(1)),
        }
    }

    /// Descriptors a relay (the floor, the engine) holds for `streams` open streams: one per
    /// inbound connection and one per outbound HTTP/1.1 connection to the simulator, which stays
    /// one per stream whatever the inbound transport.
    pub fn relay_descriptors(self, streams: usize) -> usize {
        self.connections(streams) + streams
    }

    /// The most streams a relay can hold under an open-files limit of `limit`, keeping
    /// `DESCRIPTOR_RESERVE` for its listener, logs, database and runtime.
    pub fn max_streams(self, limit: u64) -> usize {
        let budget =
            usize::try_from(limit.saturating_sub(DESCRIPTOR_RESERVE)).unwrap_or(usize::MAX);
        match self {
            Transport::Http1 => budget / 2,
            // n + ceil(n / k) ≤ budget  ⇔  n ≤ budget · k / (k + 1), rounded down.
            Transport::H2c { streams_per_conn } => {
                let k = streams_per_conn.max(1);
                budget.saturating_mul(k) / (k + 1)
            }
        }
    }
}

/// Descriptors a relay process keeps besides its streams' sockets.
pub const DESCRIPTOR_RESERVE: u64 = 200;

/// The connection stream `index` of a soak runs on, out of `connections`: round robin, so no
/// connection carries more than `ceil(streams / connections)`.
pub fn connection_of(index: usize, connections: usize) -> usize {
    index % connections.max(1)
}

/// Open h2c connections to one target; streams are spread over them by [`connection_of`].
#[derive(Clone)]
pub struct H2Pool {
    senders: Arc<Vec<hyper::client::conn::http2::SendRequest<axum::body::Body>>>,
}

impl H2Pool {
    /// Opens `connections` h2c connections to the host of `target`.
    pub async fn connect(target: &Target, connections: usize) -> Result<H2Pool, String> {
        let url = reqwest::Url::parse(&target.url).map_err(|e| format!("{}: {e}", target.url))?;
        let addrs = url
            .socket_addrs(|| None)
            .map_err(|e| format!("could not resolve {}: {e}", target.url))?;
        let Some(&addr) = addrs.first() else {
            return Err(format!("{} resolves to no address", target.url));
        };
        let mut senders = Vec::with_capacity(connections);
        for _ in 0..connections.max(1) {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("could not connect to {addr}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let (sender, connection) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .map_err(|e| format!("h2c handshake with {addr} failed: {e}"))?;
            // The connection task ends when every sender is dropped and its streams are done.
            tokio::spawn(connection);
            senders.push(sender);
        }
        Ok(H2Pool {
            senders: Arc::new(senders),
        })
    }

    pub fn len(&self) -> usize {
        self.senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }
}

/// What carries a stream's request.
#[derive(Clone, Copy)]
pub enum Via<'a> {
    Http1(&'a reqwest::Client),
    /// The pool and the stream's index in the soak (which picks its connection).
    H2c(&'a H2Pool, usize),
}

/// A streaming response body of either transport.
enum Answer {
    Http1(reqwest::Response),
    H2c(axum::body::BodyDataStream),
}

impl Answer {
    async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        match self {
            Answer::Http1(response) => response.chunk().await.map_err(|e| e.to_string()),
            Answer::H2c(body) => body.next().await.transpose().map_err(|e| e.to_string()),
        }
    }
}

/// Sends the request; a non-success status is an error carrying the body's text.
async fn send(via: Via<'_>, target: &Target, body: Bytes) -> Result<Answer, String> {
    match via {
        Via::Http1(client) => {
            let sent = client
                .post(&target.url)
                .bearer_auth(&target.bearer)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => Ok(Answer::Http1(r)),
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    Err(format!("HTTP {status}: {text}"))
                }
                Err(e) => Err(format!("request failed: {e}")),
            }
        }
        Via::H2c(pool, index) => {
            let Some(sender) = pool.senders.get(connection_of(index, pool.senders.len())) else {
                return Err("the h2c pool has no connection".to_owned());
            };
            let request = axum::http::Request::post(&target.url)
                .header("authorization", format!("Bearer {}", target.bearer))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body))
                .map_err(|e| format!("could not build the request: {e}"))?;
            let mut sender = sender.clone();
            sender
                .ready()
                .await
                .map_err(|e| format!("h2c connection failed: {e}"))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let status = response.status();
            let body = axum::body::Body::new(response.into_body());
            if status.is_success() {
                return Ok(Answer::H2c(body.into_data_stream()));
            }
            let text = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&text)))
        }
    }
}

/// Runs one stream and writes what it did to `log`.
pub async fn one_stream(
    via: Via<'_>,
    target: &Target,
    body: Bytes,
    stall: Duration,
    log: &mut StreamLog,
    progress: Option<&Progress>,
) {
    let start = Instant::now();
    let mut response = match send(via, target, body).await {
        Ok(answer) => answer,
        Err(error) => {
            log.fail(error);
            return;
        }
    };
    let headers_at = Instant::now();
    let mut line = Vec::with_capacity(512);
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut done = false;
    let (mut events, mut stalls, mut max_gap) = (0u64, 0u64, Duration::ZERO);
    let mut gaps = Vec::new();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                log.fail(format!("body failed: {e}"));
                break;
            }
        };
        let now = Instant::now();
        for &byte in chunk.iter() {
            if byte != b'\n' {
                line.push(byte);
                continue;
            }
            if let Some(payload) = line.strip_prefix(b"data:") {
                events += 1;
                let payload = payload.trim_ascii();
                if payload == b"[DONE]" {
                    done = true;
                } else if has_content(payload) {
                    match last {
                        None => {
                            first = Some(now);
                            if let Some(p) = progress {
                                p.flowing.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Some(prev) => {
                            let gap = now - prev;
                            if gap > stall {
                                stalls += 1;
                            }
                            max_gap = max_gap.max(gap);
                            gaps.push(gap);
                        }
                    }
                    if let Some(p) = progress {
                        p.chunks.fetch_add(1, Ordering::Relaxed);
                    }
                    last = Some(now);
                }
            }
            line.clear();
        }
    }
    let end = Instant::now();
    if let Some(p) = progress {
        p.ended.fetch_add(1, Ordering::Relaxed);
    }
    log.events += events;
    log.stalls += stalls;
    log.max_gap = log.max_gap.max(max_gap);
    let Some(first) = first.filter(|_| done) else {
        log.fail("the stream ended without content or without data: [DONE]".to_owned());
        return;
    };
    log.timings = Some(StreamTimings {
        headers: headers_at - start,
        ttft: first - start,
        gaps,
        e2e: end - start,
    });
}

/// One round: `concurrency` workers, each running `per_worker` streams back to back.
/// Returns the merged sample and the round's wall time.
pub async fn round(
    client: &reqwest::Client,
    target: &Target,
    concurrency: usize,
    per_worker: usize,
    stall: Duration,
) -> (Sample, Duration) {
    let body = request_body();
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let target = target.clone();
        let body = body.clone();
        workers.spawn(async move {
            let mut logs = Vec::with_capacity(per_worker);
            for _ in 0..per_worker {
                let mut log = StreamLog::default();
                one_stream(
                    Via::Http1(&client),
                    &target,
                    body.clone(),
                    stall,
                    &mut log,
                    None,
                )
                .await;
                logs.push(log);
            }
            logs
        });
    }
    let mut merged = Sample::default();
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(logs) => logs.into_iter().for_each(|log| merged.absorb(log)),
            Err(e) => merged.fail(format!("a load worker panicked: {e}")),
        }
    }
    (merged, start.elapsed())
}

/// The client side of a soak: HTTP/1.1 through a pooling client, or h2c over a fixed set of
/// connections.
#[derive(Clone)]
pub enum SoakClient {
    Http1(reqwest::Client),
    H2c(H2Pool),
}

impl SoakClient {
    fn via(&self, index: usize) -> Via<'_> {
        match self {
            SoakClient::Http1(client) => Via::Http1(client),
            SoakClient::H2c(pool) => Via::H2c(pool, index),
        }
    }
}

/// Streams a soak opens per tick of [`OPEN_TICK`] to open `per_sec` a second.
pub fn opened_per_tick(per_sec: usize) -> usize {
    (per_sec / 100).max(1)
}

/// How often a soak opens its next batch of streams.
pub const OPEN_TICK: Duration = Duration::from_millis(10);

/// Holds `n` streams open at once and returns their sample. They are opened about `open_per_sec`
/// a second, in batches, so the servers' listen queues keep up: a connection refused by a full
/// queue is retried by the kernel seconds later, which would stretch the ramp past the streams'
/// length. `progress` is updated as they go.
pub async fn soak(
    client: &SoakClient,
    target: &Target,
    n: usize,
    open_per_sec: usize,
    stall: Duration,
    progress: Arc<Progress>,
) -> Sample {
    let batch = opened_per_tick(open_per_sec);
    let body = request_body();
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..n {
        let client = client.clone();
        let target = target.clone();
        let body = body.clone();
        let progress = Arc::clone(&progress);
        streams.spawn(async move {
            let mut log = StreamLog::default();
            let via = client.via(i);
            one_stream(via, &target, body, stall, &mut log, Some(&progress)).await;
            log
        });
        if i % batch == batch - 1 {
            tokio::time::sleep(OPEN_TICK).await;
        }
    }
    let mut merged = Sample::default();
    while let Some(done) = streams.join_next().await {
        match done {
            Ok(log) => merged.absorb(log),
            Err(e) => merged.fail(format!("a soak stream panicked: {e}")),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_detection() {
        assert!(has_content(br#"{"choices":[{"delta":{"content":"Hi"}}]}"#));
        assert!(!has_content(
            br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#
        ));
        assert!(!has_content(
            br#"{"choices":[],"usage":{"prompt_tokens":3}}"#
        ));
    }

    #[test]
    fn opening_rate_in_batches() {
        // The old fixed pace: 200 streams every 10 ms.
        assert_eq!(opened_per_tick(20_000), 200);
        assert_eq!(opened_per_tick(1_000), 10);
        assert_eq!(opened_per_tick(1), 1);
        assert_eq!(opened_per_tick(0), 1);
    }

    #[test]
    fn streams_are_spread_over_connections_round_robin() {
        for (n, k) in [(10_000, 100), (10_001, 100), (7, 3), (1, 100), (250, 1)] {
            let t = Transport::H2c {
                streams_per_conn: k,
            };
            let conns = t.connections(n);
            let mut per_conn = vec![0usize; conns];
            for i in 0..n {
                per_conn[connection_of(i, conns)] += 1;
            }
            // Never more than the server lets run at once, and no connection left idle.
            assert!(per_conn.iter().all(|&c| c >= 1 && c <= k), "{n} {k}");
            let (min, max) = (per_conn.iter().min(), per_conn.iter().max());
            assert!(max.unwrap() - min.unwrap() <= 1, "{n} {k}");
        }
    }

    /// A soak over h2c against the simulator's own `axum::serve`: every stream completes and
    /// the streams share the pool's connections.
    #[tokio::test]
    async fn h2c_soak_streams_complete() {
        use keyvex_sim::{self as sim, SimConfig};
        let handle = sim::start(([127, 0, 0, 1], 0).into(), SimConfig::fast(3))
            .await
            .unwrap();
        let target = Target {
            name: "direct",
            url: format!("{}/chat/completions", handle.base_url()),
            bearer: crate::overhead::SIM_KEY.to_owned(),
        };
        let transport = Transport::H2c {
            streams_per_conn: 4,
        };
        let pool = H2Pool::connect(&target, transport.connections(10))
            .await
            .unwrap();
        assert_eq!(pool.len(), 3);
        let progress = Arc::new(Progress::default());
        let sample = soak(
            &SoakClient::H2c(pool),
            &target,
            10,
            20_000,
            Duration::from_secs(60),
            Arc::clone(&progress),
        )
        .await;
        assert_eq!(sample.failed, 0, "{:?}", sample.first_error);
        assert_eq!(sample.streams, 10);
        assert_eq!(progress.ended.load(Ordering::Relaxed), 10);
        assert!(progress.chunks.load(Ordering::Relaxed) >= 10);
        handle.shutdown().await;
    }

    #[tokio::test]
    async fn h2c_reports_a_refused_request() {
        use keyvex_sim::{self as sim, SimConfig};
        let handle = sim::start(([127, 0, 0, 1], 0).into(), SimConfig::fast(3))
            .await
            .unwrap();
        let target = Target {
            name: "direct",
            url: format!("{}/chat/completions", handle.base_url()),
            bearer: String::new(),
        };
        let pool = H2Pool::connect(&target, 1).await.unwrap();
        let mut log = StreamLog::default();
        one_stream(
            Via::H2c(&pool, 0),
            &target,
            request_body(),
            Duration::from_secs(60),
            &mut log,
            None,
        )
        .await;
        let mut sample = Sample::default();
        sample.absorb(log);
        assert_eq!(sample.failed, 1);
        assert!(
            sample
                .first_error
                .as_deref()
                .unwrap_or("")
                .starts_with("HTTP 401"),
            "{:?}",
            sample.first_error
        );
        handle.shutdown().await;
    }
}
