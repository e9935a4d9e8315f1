//! The provider simulator: an axum server that speaks the OpenAI Chat Completions and Anthropic
//! Messages wire protocols, with scripted and random faults, so the engine runs offline.
//!
//! One server answers both protocols under one base URL (`http://HOST:PORT/v1`):
//! `POST /v1/chat/completions` (OpenAI) and `POST /v1/messages` (Anthropic). Control endpoints
//! (`/sim/rules`, `/sim/stats`, `/sim/requests`) and per-request `x-sim-*` headers make the same knobs reachable
//! from another process (`keyvex sim`). Content is deterministic given the seed and the request,
//! and every reported token count is the engine tokenizer's count of the text actually sent
//! (`keyvex_engine::tokenize`).
//!
//! The simulator is the other side of the wire, not a provider: the engine's real clients talk
//! to it over HTTP. It depends on the engine only for the wire-independent types it shares
//! (chat messages, provider kinds, the tokenizer); [`SimHandle`] plugs into
//! `Engine::builder().simulator(…)`.

mod anthropic_version;
mod anthropic_wire;
mod content;
mod knobs;
mod openai_wire;
mod serve;
mod stats;
mod streaming;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use knobs::{Fault, LineEnding, Rule};
pub use stats::{SeenRequest, ServedStream, SimStats};

/// Default port of `keyvex sim` (Prism's convention for mock servers).
pub const DEFAULT_PORT: u16 = 4010;

/// Largest request body accepted; agent prompts are a few kB, this leaves room for long chats.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// How the simulator behaves when no rule or header says otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Base seed of all generated content and random faults.
    pub seed: u64,
    pub latency: LatencyProfile,
    pub faults: FaultRates,
    /// Reject requests without the provider's credential headers, like the real APIs.
    pub require_auth: bool,
}

/// Timing of a simulated generation.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyProfile {
    /// Time from request to first content.
    pub ttft: Duration,
    /// TTFT is drawn uniformly from `ttft ± ttft_jitter`.
    pub ttft_jitter: Duration,
    /// Output speed; `0`, negative or infinite means "as fast as the socket allows".
    pub tokens_per_sec: f64,
    /// Length of plain-text answers; `None` draws 60–180 tokens per request.
    pub output_tokens: Option<u32>,
    /// Interval of Anthropic `ping` events (one always follows the first content block start);
    /// zero disables the periodic ones.
    pub ping_every: Duration,
}

/// Probability per request of each random fault; all zero by default. Scripted [`Rule`]s and
/// `x-sim-fault` headers take precedence over these.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultRates {
    pub http_429: f64,
    pub http_500: f64,
    pub http_503: f64,
    /// Anthropic's 529 `overloaded_error`; OpenAI has no 529 and gets a 503 instead.
    pub overloaded_529: f64,
    pub cut: f64,
    pub stall: f64,
    pub in_stream_error: f64,
    pub malformed: f64,
}

impl SimConfig {
    /// No latency and unpaced output: for tests.
    pub fn fast(seed: u64) -> Self {
        SimConfig {
            seed,
            latency: LatencyProfile {
                ttft: Duration::ZERO,
                ttft_jitter: Duration::ZERO,
                tokens_per_sec: 0.0,
                output_tokens: None,
                ping_every: Duration::ZERO,
            },
            faults: FaultRates::default(),
            require_auth: true,
        }
    }

    /// Timing close to hosted models: 300–600 ms to first token, 60–90 tokens per second.
    pub fn realistic(seed: u64) -> Self {
        SimConfig {
            seed,
            latency: LatencyProfile {
                ttft: Duration::from_millis(450),
                ttft_jitter: Duration::from_millis(150),
                tokens_per_sec: 75.0,
                output_tokens: None,
                ping_every: Duration::from_secs(5),
            },
            faults: FaultRates::default(),
            require_auth: true,
        }
    }
}

/// State shared by every handler.
pub(crate) struct SimState {
    pub config: SimConfig,
    pub rules: knobs::RuleBook,
    pub stats: stats::Stats,
    /// Cancelled by [`SimHandle::shutdown`]; open streams watch it so shutdown is not held up by
    /// a stalled stream.
    pub shutdown: CancellationToken,
}

/// A running simulator. Dropping it leaves the server running until the runtime stops; call
/// [`SimHandle::shutdown`] to stop it.
pub struct SimHandle {
    addr: SocketAddr,
    state: Arc<SimState>,
    task: JoinHandle<()>,
}

/// Binds `addr` (port 0 picks a free port), spawns the server and returns at once.
pub async fn start(addr: SocketAddr, config: SimConfig) -> std::io::Result<SimHandle> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(SimState {
        config,
        rules: knobs::RuleBook::default(),
        stats: stats::Stats::default(),
        shutdown: CancellationToken::new(),
    });
    let app = router(state.clone());
    let token = state.shutdown.clone();
    let task = tokio::spawn(serve::serve(listener, app, token));
    tracing::info!(%addr, "provider simulator listening");
    Ok(SimHandle { addr, state, task })
}

fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai_wire::chat_completions))
        .route("/v1/messages", post(anthropic_wire::messages))
        .route(
            "/sim/rules",
            get(list_rules).post(push_rules).delete(clear_rules),
        )
        .route("/sim/stats", get(get_stats))
        .route("/sim/requests", get(get_requests))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL for both providers, version prefix included.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Appends a scripted fault; rules are matched in the order pushed.
    pub fn push_rule(&self, rule: Rule) {
        self.state.rules.push(rule);
    }

    pub fn clear_rules(&self) {
        self.state.rules.clear();
    }

    pub fn stats(&self) -> SimStats {
        self.state.stats.snapshot()
    }

    /// The last requests received (up to 64, oldest first), as parsed: what a client sent.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state.stats.seen_requests()
    }

    /// The streams served to their end since the last call (up to 64, oldest first), with the
    /// simulator's own service time of each; the log is emptied so runs can be told apart.
    pub fn take_served(&self) -> Vec<ServedStream> {
        self.state.stats.take_served()
    }

    /// Waits until at least `n` streams in total were closed by their client before finishing.
    /// Returns `false` if that did not happen `within` the given time.
    pub async fn wait_for_disconnects(&self, n: u64, within: Duration) -> bool {
        self.state.stats.wait_for_disconnects(n, within).await
    }

    /// Stops accepting, ends open streams (their clients see a broken connection) and waits for
    /// the server task.
    pub async fn shutdown(self) {
        self.state.shutdown.cancel();
        let mut task = self.task;
        // Streams end on the cancellation, so this is quick; the bound protects callers from a
        // connection hyper keeps half-open.
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            tracing::warn!("simulator did not stop within 5 s; aborting it");
            task.abort();
        }
    }
}

impl keyvex_engine::Simulator for SimHandle {
    fn base_url(&self) -> String {
        SimHandle::base_url(self)
    }

    fn describe(&self) -> String {
        format!("in-process simulator at {}", SimHandle::base_url(self))
    }

    fn shutdown(self: Box<Self>) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(SimHandle::shutdown(*self))
    }
}

async fn list_rules(State(state): State<Arc<SimState>>) -> axum::Json<Vec<Rule>> {
    axum::Json(state.rules.list())
}

async fn push_rules(State(state): State<Arc<SimState>>, body: axum::body::Bytes) -> Response {
    // Accept one rule or a list, so `curl -d '{"fault":"insufficient_quota"}'` works too.
    let rules = match serde_json::from_slice::<Vec<Rule>>(&body) {
        Ok(rules) => rules,
        Err(list_error) => match serde_json::from_slice::<Rule>(&body) {
            Ok(rule) => vec![rule],
            Err(_) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!(
                        "POST /sim/rules expects a JSON rule or list of rules, e.g. \
                         [{{\"model\":null,\"protocol\":\"openai\",\"fault\":{{\"http\":{{\"status\":429,\"retry_after_ms\":500}}}},\"times\":1}}]: {list_error}"
                    ),
                )
                    .into_response();
            }
        },
    };
    let added = rules.len();
    for rule in rules {
        state.rules.push(rule);
    }
    (
        StatusCode::CREATED,
        axum::Json(serde_json::json!({ "added": added })),
    )
        .into_response()
}

async fn clear_rules(State(state): State<Arc<SimState>>) -> StatusCode {
    state.rules.clear();
    StatusCode::NO_CONTENT
}

async fn get_stats(State(state): State<Arc<SimState>>) -> axum::Json<SimStats> {
    axum::Json(state.stats.snapshot())
}

async fn get_requests(State(state): State<Arc<SimState>>) -> axum::Json<Vec<SeenRequest>> {
    axum::Json(state.stats.seen_requests())
}

async fn not_found(uri: axum::http::Uri) -> Response {
    let message = format!(
        "Unknown simulator path {uri}: use POST /v1/chat/completions, POST /v1/messages, /sim/rules, GET /sim/stats or GET /sim/requests"
    );
    openai_wire::error_response(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        None,
        &message,
        None,
        None,
    )
}

/// Which canned timing `keyvex sim` starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SimProfile {
    Fast,
    Realistic,
}

/// `keyvex sim`: serve the simulator until Ctrl-C or SIGTERM.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Port to listen on.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Seed of generated content and random faults.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Time to first token in milliseconds (overrides the profile).
    #[arg(long)]
    pub ttft_ms: Option<u64>,
    /// Output speed in tokens per second (overrides the profile; 0 = unpaced).
    #[arg(long)]
    pub tps: Option<f64>,
    /// Fixed length of plain-text answers in tokens.
    #[arg(long)]
    pub output_tokens: Option<u32>,
    /// Probability (0..=1) that a request fails, spread over 429, 500, 529 and a mid-stream cut.
    #[arg(long, default_value_t = 0.0)]
    pub fault_rate: f64,
    /// Starting timing profile.
    #[arg(long, value_enum, default_value_t = SimProfile::Realistic)]
    pub profile: SimProfile,
    /// Accept requests without credentials (real APIs reject them with 401).
    #[arg(long)]
    pub no_auth: bool,
}

/// Errors of `keyvex sim` arguments.
#[derive(Debug, thiserror::Error)]
pub enum SimArgsError {
    #[error("--fault-rate must be between 0 and 1, got {0}")]
    FaultRate(f64),
    #[error("--tps must be a finite number >= 0, got {0}")]
    Tps(f64),
}

impl SimArgs {
    /// The simulator configuration these arguments describe.
    pub fn to_config(&self) -> Result<SimConfig, SimArgsError> {
        if !(0.0..=1.0).contains(&self.fault_rate) {
            return Err(SimArgsError::FaultRate(self.fault_rate));
        }
        let mut config = match self.profile {
            SimProfile::Fast => SimConfig::fast(self.seed),
            SimProfile::Realistic => SimConfig::realistic(self.seed),
        };
        if let Some(ms) = self.ttft_ms {
            config.latency.ttft = Duration::from_millis(ms);
            config.latency.ttft_jitter = config.latency.ttft_jitter.min(config.latency.ttft / 3);
        }
        if let Some(tps) = self.tps {
            if !tps.is_finite() || tps < 0.0 {
                return Err(SimArgsError::Tps(tps));
            }
            config.latency.tokens_per_sec = tps;
        }
        config.latency.output_tokens = self.output_tokens.or(config.latency.output_tokens);
        let share = self.fault_rate / 4.0;
        config.faults = FaultRates {
            http_429: share,
            http_500: share,
            overloaded_529: share,
            cut: share,
            ..FaultRates::default()
        };
        config.require_auth = !self.no_auth;
        Ok(config)
    }
}

/// Runs `keyvex sim`: start, print the base URL to stderr, serve until Ctrl-C or SIGTERM.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let config = args.to_config()?;
    let addr = SocketAddr::new(args.host, args.port);
    let handle = start(addr, config)
        .await
        .map_err(|e| anyhow::anyhow!("could not listen on {addr} ({e}); pick another --port"))?;
    // The official SDKs take the server root and add `/v1` themselves; the engine's base URLs
    // include it.
    eprintln!(
        "keyvex sim: serving OpenAI and Anthropic protocols at {} (set OPENAI_BASE_URL / ANTHROPIC_BASE_URL to it; the official Anthropic SDKs take http://{} without /v1); Anthropic API versions 2023-06-01 and 2026-10-21, key as x-api-key or Authorization: Bearer; Ctrl-C stops",
        handle.base_url(),
        handle.addr()
    );
    wait_for_stop_signal().await?;
    eprintln!("keyvex sim: stopping");
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            ctrl_c = tokio::signal::ctrl_c() => ctrl_c?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// The answer to one request, cut to its token limit, with the counts the protocols report.
pub(crate) struct Prepared {
    /// Exactly the text that will be sent (the stream's deltas concatenated).
    pub text: String,
    /// The JSON answer, when the request carried a schema and the answer was not cut short.
    pub json: Option<serde_json::Value>,
    pub chunks: Vec<String>,
    /// The token limit cut the answer short.
    pub truncated: bool,
    pub output_tokens: u64,
    /// All prompt tokens, cached ones included.
    pub prompt_tokens: u64,
    /// The part of `prompt_tokens` read from cache.
    pub cached_tokens: u64,
}

pub(crate) fn prepare(
    state: &SimState,
    prompt: &content::Prompt<'_>,
    plan: &knobs::Plan,
    max_tokens: Option<u64>,
) -> Prepared {
    let continued = content::continuation(prompt);
    // A continuation is answered from the canonical answer of the conversation it continues.
    let asked = continued.as_ref().map_or(prompt, |c| &c.original);
    let seed = plan.seed.unwrap_or(state.config.seed) ^ asked.hash();
    let (text, json) = match &plan.content {
        // A scripted answer is sent as given; it is JSON only if it happens to parse.
        Some(text) => (text.clone(), serde_json::from_str(text).ok()),
        None => match content::answer(asked, seed, plan.output_tokens) {
            content::Answer::Text(text) => (text, None),
            content::Answer::Json(value) => (value.to_string(), Some(value)),
        },
    };
    let (text, json) = match continued.as_ref().and_then(|c| c.rest(&text)) {
        Some(rest) => (rest, None),
        None => (text, json),
    };
    let pieces = content::split_pieces(&text);
    let keep = match max_tokens {
        Some(limit) => content::longest_prefix_within(&pieces, limit),
        None => pieces.len(),
    };
    let truncated = keep < pieces.len();
    let sent = &pieces[..keep];
    let text = sent.concat();
    let chunks = content::chunk(&mut content::Rng::new(seed.rotate_left(17)), sent);
    let prompt_tokens =
        keyvex_engine::tokenize::count_prompt_tokens(prompt.system, prompt.messages);
    Prepared {
        output_tokens: keyvex_engine::tokenize::count_tokens(&text),
        json: if truncated { None } else { json },
        text,
        chunks,
        truncated,
        prompt_tokens,
        cached_tokens: plan.cached_tokens.min(prompt_tokens),
    }
}

/// A unique id suffix (`[0-9a-f]{32}`). Ids are not part of the deterministic content.
pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
