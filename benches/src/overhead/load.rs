//! The load client: streaming `POST /v1/chat/completions` requests, timed from the client's side
//! (time to headers, time to first content, gaps between content chunks, end to end).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
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
}

/// Counters shared by the streams of a soak, read while they run.
#[derive(Debug, Default)]
pub struct Progress {
    /// Streams that received their first content.
    pub flowing: AtomicU64,
    /// Streams that ended, either way.
    pub ended: AtomicU64,
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

/// Runs one stream and adds its timings to `sample`.
pub async fn one_stream(
    client: &reqwest::Client,
    target: &Target,
    body: Bytes,
    stall: Duration,
    sample: &mut Sample,
    progress: Option<&Progress>,
) {
    let start = Instant::now();
    let sent = client
        .post(&target.url)
        .bearer_auth(&target.bearer)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let mut response = match sent {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            sample.fail(format!("HTTP {status}: {text}"));
            return;
        }
        Err(e) => {
            sample.fail(format!("request failed: {e}"));
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
                sample.fail(format!("body failed: {e}"));
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
    sample.events += events;
    sample.stalls += stalls;
    sample.max_gap = sample.max_gap.max(max_gap);
    let Some(first) = first.filter(|_| done) else {
        sample.fail("the stream ended without content or without data: [DONE]".to_owned());
        return;
    };
    sample.streams += 1;
    record(&mut sample.headers, headers_at - start);
    record(&mut sample.ttft, first - start);
    for gap in gaps {
        record(&mut sample.gap, gap);
    }
    record(&mut sample.e2e, end - start);
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
            let mut sample = Sample::default();
            for _ in 0..per_worker {
                one_stream(&client, &target, body.clone(), stall, &mut sample, None).await;
            }
            sample
        });
    }
    let mut merged = Sample::default();
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(sample) => merged.merge(&sample),
            Err(e) => merged.fail(format!("a load worker panicked: {e}")),
        }
    }
    (merged, start.elapsed())
}

/// Holds `n` streams open at once (opened in batches so the listen queues keep up) and returns
/// their sample. `progress` is updated as they go.
pub async fn soak(
    client: &reqwest::Client,
    target: &Target,
    n: usize,
    stall: Duration,
    progress: Arc<Progress>,
) -> Sample {
    let body = request_body();
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..n {
        let client = client.clone();
        let target = target.clone();
        let body = body.clone();
        let progress = Arc::clone(&progress);
        streams.spawn(async move {
            let mut sample = Sample::default();
            one_stream(&client, &target, body, stall, &mut sample, Some(&progress)).await;
            sample
        });
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut merged = Sample::default();
    while let Some(done) = streams.join_next().await {
        match done {
            Ok(sample) => merged.merge(&sample),
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
}
