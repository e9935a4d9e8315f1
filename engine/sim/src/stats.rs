//! Simulator counters: requests per model, streams open/completed/closed by the client, the last
//! requests received (so tests can check what a client sent), and the `Drop` guard that tells a
//! finished stream from one its client abandoned.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use keyvex_engine::provider::ChatMessage;
use keyvex_engine::stream::ProviderKind;

/// How many received requests are kept; older ones are forgotten so a long-running `keyvex sim`
/// does not grow without bound.
pub(crate) const REQUEST_LOG_LEN: usize = 64;

/// One request as the simulator parsed it (served at `GET /sim/requests`, oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenRequest {
    pub protocol: ProviderKind,
    pub model: String,
    pub system: Option<String>,
    pub messages: Vec<ChatMessage>,
    /// The name of the response schema (OpenAI `json_schema.name`, Anthropic forced tool name).
    pub schema_name: Option<String>,
    /// The API version the request was answered under (Anthropic's `anthropic-version`).
    #[serde(default)]
    pub api_version: Option<String>,
    /// The header that carried the key: `x-api-key` or `authorization` (Bearer).
    #[serde(default)]
    pub key_header: Option<String>,
    /// The sampling parameters the body carried (`temperature`, `top_p`, `top_k`), so a test can
    /// check what a client put on the wire.
    #[serde(default)]
    pub sampling: Vec<String>,
    /// The W3C `traceparent` the request carried, so a test can follow a trace onto the wire.
    #[serde(default)]
    pub traceparent: Option<String>,
    /// The output cap the body asked for (`max_completion_tokens`/`max_tokens`), if any.
    #[serde(default)]
    pub max_tokens: Option<u64>,
}

/// One stream the simulator served to its end, with how long it took from the moment its request
/// body was in hand to the last byte handed to hyper: the provider's own share of a call, which a
/// client's timing of the same call minus this is the client's (and the network's) share of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedStream {
    pub protocol: ProviderKind,
    pub model: String,
    pub schema_name: Option<String>,
    pub service: Duration,
    /// When the request body was in hand, for a caller in the same process that wants to place
    /// the stream on its own timeline (not serialized: instants mean nothing elsewhere).
    #[serde(skip)]
    pub received_at: Option<std::time::Instant>,
}

/// A snapshot of the simulator's counters (also served as JSON at `GET /sim/stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Every request to a protocol endpoint, including rejected ones.
    pub requests_total: u64,
    pub requests_by_model: BTreeMap<String, u64>,
    /// Requests answered with an injected fault (HTTP error or a broken stream).
    pub faults_injected: u64,
    /// Streaming bodies currently being sent.
    pub streams_open: u64,
    /// Streams that reached their protocol's end (`[DONE]`, `message_stop`, or an in-stream
    /// error event, which is a complete answer on the wire).
    pub streams_completed: u64,
    /// Streams the simulator broke on purpose (cut) or at shutdown.
    pub streams_aborted: u64,
    /// Streams whose client went away before the end.
    pub streams_client_closed: u64,
}

#[derive(Debug)]
pub(crate) struct Stats {
    requests_total: AtomicU64,
    by_model: Mutex<BTreeMap<String, u64>>,
    faults_injected: AtomicU64,
    streams_open: AtomicU64,
    streams_completed: AtomicU64,
    streams_aborted: AtomicU64,
    /// The client-closed count, watched by `wait_for_disconnects`.
    client_closed: watch::Sender<u64>,
    seen: Mutex<VecDeque<SeenRequest>>,
    served: Mutex<VecDeque<ServedStream>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests_total: AtomicU64::new(0),
            by_model: Mutex::new(BTreeMap::new()),
            faults_injected: AtomicU64::new(0),
            streams_open: AtomicU64::new(0),
            streams_completed: AtomicU64::new(0),
            streams_aborted: AtomicU64::new(0),
            client_closed: watch::Sender::new(0),
            seen: Mutex::new(VecDeque::with_capacity(REQUEST_LOG_LEN)),
            served: Mutex::new(VecDeque::with_capacity(REQUEST_LOG_LEN)),
        }
    }
}

impl Stats {
    pub fn request(&self, model: Option<&str>) {
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        let model = model.unwrap_or("(none)");
        let mut by_model = self
            .by_model
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *by_model.entry(model.to_owned()).or_default() += 1;
    }

    /// Keeps a parsed request in the bounded log.
    pub fn seen(&self, request: SeenRequest) {
        push_bounded(&self.seen, request);
    }

    /// The logged requests, oldest first.
    pub fn seen_requests(&self) -> Vec<SeenRequest> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Keeps a finished stream in the bounded served log.
    pub fn served(&self, stream: ServedStream) {
        push_bounded(&self.served, stream);
    }

    /// Takes the served log, oldest first, leaving it empty.
    pub fn take_served(&self) -> Vec<ServedStream> {
        self.served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect()
    }

    pub fn requests_total(&self) -> u64 {
        self.requests_total.load(Ordering::Relaxed)
    }

    pub fn fault(&self) {
        self.faults_injected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> SimStats {
        SimStats {
            requests_total: self.requests_total.load(Ordering::Relaxed),
            requests_by_model: self
                .by_model
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            faults_injected: self.faults_injected.load(Ordering::Relaxed),
            streams_open: self.streams_open.load(Ordering::Relaxed),
            streams_completed: self.streams_completed.load(Ordering::Relaxed),
            streams_aborted: self.streams_aborted.load(Ordering::Relaxed),
            streams_client_closed: *self.client_closed.borrow(),
        }
    }

    pub async fn wait_for_disconnects(&self, n: u64, within: Duration) -> bool {
        let mut rx = self.client_closed.subscribe();
        tokio::time::timeout(within, rx.wait_for(|closed| *closed >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Appends to a log that keeps the last [`REQUEST_LOG_LEN`] entries, so a long-running
/// `keyvex sim` does not grow without bound.
fn push_bounded<T>(log: &Mutex<VecDeque<T>>, item: T) {
    let mut log = log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if log.len() == REQUEST_LOG_LEN {
        log.pop_front();
    }
    log.push_back(item);
}

/// How a stream ended, as far as the simulator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Still running: if dropped in this state, the client went away.
    Running,
    Completed,
    Aborted,
}

/// Held by every streaming body. hyper drops the body when the client disconnects, so a drop
/// while still `Running` is exactly "the client closed the stream early".
pub(crate) struct StreamGuard {
    stats: std::sync::Arc<super::SimState>,
    ending: Ending,
}

impl StreamGuard {
    pub fn new(state: std::sync::Arc<super::SimState>) -> Self {
        state.stats.streams_open.fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            stats: state,
            ending: Ending::Running,
        }
    }

    pub fn end(&mut self, ending: Ending) {
        self.ending = ending;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let stats = &self.stats.stats;
        stats.streams_open.fetch_sub(1, Ordering::Relaxed);
        match self.ending {
            Ending::Completed => {
                stats.streams_completed.fetch_add(1, Ordering::Relaxed);
            }
            Ending::Aborted => {
                stats.streams_aborted.fetch_add(1, Ordering::Relaxed);
            }
            Ending::Running => {
                tracing::debug!("simulator: client closed a stream early");
                stats.client_closed.send_modify(|n| *n += 1);
            }
        }
    }
}
