//! The three servers of the benchmark, each run as a child process of the benchmark binary
//! (`overhead --role sim|floor|engine`): the simulator, the floor relay and the engine.
//!
//! A child binds `127.0.0.1:0`, prints `listening <base URL>` as its first stdout line, and
//! serves until its stdin closes — so it also ends when the benchmark dies.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use keyvex::{App, Config, MapEnv};
use keyvex_server::Server;
use keyvex_sim::{self as sim, FaultRates, LatencyProfile, SimConfig};
use tokio::io::AsyncReadExt;

use super::{ENGINE_KEY, SIM_KEY};

/// Which server a child process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Sim,
    Floor,
    Engine,
}

/// The simulator's fixed timing: every stream is the same length at the same cadence.
#[derive(Debug, Clone, Copy)]
pub struct SimTiming {
    pub ttft_ms: u64,
    pub tokens_per_sec: f64,
    pub output_tokens: u32,
}

impl SimTiming {
    fn args(self) -> Vec<String> {
        vec![
            "--sim-ttft-ms".into(),
            self.ttft_ms.to_string(),
            "--sim-tokens-per-sec".into(),
            self.tokens_per_sec.to_string(),
            "--sim-output-tokens".into(),
            self.output_tokens.to_string(),
        ]
    }
}

/// What a child needs to know.
#[derive(Debug, Clone)]
pub struct RoleConfig {
    pub role: Role,
    pub timing: SimTiming,
    /// Base URL (with `/v1`) the floor and the engine forward to.
    pub upstream: Option<String>,
    /// Log filter of the engine, like `RUST_LOG`.
    pub engine_log: String,
    /// OTLP/HTTP base URL the engine exports its traces to; `None`: no trace export.
    pub otlp_endpoint: Option<String>,
    /// Where the engine keeps its SQLite metrics ledger.
    pub work_dir: PathBuf,
    /// The Redis of the engine's limits and budgets (`REDIS_URL`); in-process without.
    pub redis_url: Option<String>,
    /// The build of this benchmark to start the role from (the benchmark passes a fresh copy,
    /// see [`fresh_copy`]); this binary when `None`.
    pub exe: Option<PathBuf>,
}

/// Runs one role until stdin closes. Builds its own runtime: a multi-threaded one with as many
/// workers as cores, like `keyvex serve`.
pub fn run(config: &RoleConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the tokio runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: &RoleConfig) -> anyhow::Result<()> {
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    match config.role {
        Role::Sim => {
            let t = config.timing;
            let handle = sim::start(
                any_port,
                SimConfig {
                    seed: 7,
                    latency: LatencyProfile {
                        ttft: Duration::from_millis(t.ttft_ms),
                        ttft_jitter: Duration::ZERO,
                        tokens_per_sec: t.tokens_per_sec,
                        output_tokens: Some(t.output_tokens),
                        ping_every: Duration::ZERO,
                    },
                    faults: FaultRates::default(),
                    require_auth: true,
                },
            )
            .await
            .context("could not start the simulator")?;
            announce(&handle.base_url())?;
            stdin_closed().await;
            handle.shutdown().await;
        }
        Role::Floor => {
            let upstream = upstream_of(config)?;
            let listener = tokio::net::TcpListener::bind(any_port).await?;
            let addr = listener.local_addr()?;
            let app = floor_app(&upstream)?;
            announce(&format!("http://{addr}/v1"))?;
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(stdin_closed())
                .await?;
        }
        Role::Engine => {
            let _telemetry = match &config.otlp_endpoint {
                Some(endpoint) => Some(init_tracing(&config.engine_log, endpoint)?),
                None => {
                    init_logging(&config.engine_log);
                    None
                }
            };
            let server = bind_engine(
                &upstream_of(config)?,
                &config.work_dir,
                config.redis_url.as_deref(),
            )
            .await?;
            announce(&format!("http://{}/v1", server.local_addr()?))?;
            let report = server.run(stdin_closed()).await?;
            tracing::info!(?report, "engine stopped");
        }
    }
    Ok(())
}

fn upstream_of(config: &RoleConfig) -> anyhow::Result<String> {
    config
        .upstream
        .clone()
        .context("--upstream is required for the floor and engine roles")
}

/// Logs as `keyvex serve` does without trace export (the same subscriber, on stderr), so the
/// engine pays for its spans and log lines as it does in production.
fn init_logging(filter: &str) {
    // With no export configured this installs the log formatter alone: it cannot fail and
    // leaves nothing to shut down.
    let _ = keyvex::telemetry::init_with_filter(
        keyvex::telemetry::LogFilter::lossy(filter),
        &keyvex::config::TelemetryConfig::default(),
    );
}

/// Logs as [`init_logging`] plus OTLP trace export to `endpoint`, exactly as `keyvex serve`
/// installs it when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
fn init_tracing(filter: &str, endpoint: &str) -> anyhow::Result<keyvex::telemetry::Telemetry> {
    let env = MapEnv::new([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_SERVICE_NAME", "keyvex-overhead-bench"),
    ]);
    let config = keyvex::config::TelemetryConfig::load(&env)?;
    Ok(keyvex::telemetry::init_with_filter(
        keyvex::telemetry::LogFilter::lossy(filter),
        &config,
    )?)
}

fn announce(base_url: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {base_url}")?;
    out.flush()?;
    Ok(())
}

async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// The engine as `keyvex serve` assembles it, with the OpenAI provider pointed at `upstream`,
/// rate limits, cost accounting and metric writes on. The limits are set far above the load so
/// they are checked on every request but never refuse one. The Anthropic provider points at the
/// same upstream (the simulator speaks both), so the pipeline benchmark can use this engine too;
/// the overhead runs only call an OpenAI model.
pub async fn bind_engine(
    upstream: &str,
    work_dir: &Path,
    redis_url: Option<&str>,
) -> anyhow::Result<Server> {
    let db = work_dir.join("engine-metrics.sqlite3");
    let db = db.to_string_lossy().into_owned();
    let keys = format!("{ENGINE_KEY}=overhead:user");
    let mut env = MapEnv::new([
        ("OPENAI_API_KEY", SIM_KEY),
        ("OPENAI_BASE_URL", upstream),
        ("ANTHROPIC_API_KEY", SIM_KEY),
        ("ANTHROPIC_BASE_URL", upstream),
        ("KEYVEX_SIMULATE", "never"),
        ("KEYVEX_ADDR", "127.0.0.1:0"),
        ("KEYVEX_API_KEYS", keys.as_str()),
        ("KEYVEX_RATE_LIMIT_PER_HOUR", "1000000000"),
        ("KEYVEX_RATE_LIMIT_BURST", "1000000000"),
        ("KEYVEX_PROVIDER_RPM", "1000000000"),
        ("KEYVEX_PROVIDER_TPM", "4000000000"),
        ("KEYVEX_METRICS_DB", db.as_str()),
    ]);
    if let Some(url) = redis_url {
        env.0.insert("REDIS_URL".to_owned(), url.to_owned());
    }
    // Any `KEYVEX_*` setting in the benchmark's own environment reaches the engine (and wins
    // over the ones above), so one binary measures a setting both ways: for example
    // `KEYVEX_INTENT_LINGER_MS=0 overhead …` against the default.
    for (key, value) in std::env::vars() {
        if key.starts_with("KEYVEX_") {
            env.0.insert(key, value);
        }
    }
    let config = Config::load(&env, None)?;
    let server = config.server.clone();
    let app = App::start(config).await?;
    Ok(Server::bind(server, app.server_parts(false)?).await?)
}

// ---------------------------------------------------------------------------------------------
// The floor: forwards bytes, parses nothing

struct Floor {
    client: reqwest::Client,
    /// `http://host:port` of the upstream, without a path: the request path is kept as is.
    origin: String,
}

fn floor_app(upstream: &str) -> anyhow::Result<axum::Router> {
    let url = reqwest::Url::parse(upstream).context("--upstream is not a URL")?;
    let origin = url.origin().ascii_serialization();
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .context("could not build the floor's HTTP client")?;
    Ok(axum::Router::new()
        .fallback(relay)
        .with_state(Arc::new(Floor { client, origin })))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) a relay must not forward, plus the length, which the
/// relay's own framing sets.
fn forwardable(name: &header::HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

async fn relay(State(floor): State<Arc<Floor>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // The request is small; collecting it keeps its length known upstream (no chunked upload).
    let Ok(body) = axum::body::to_bytes(body, 16 * 1024 * 1024).await else {
        return (StatusCode::BAD_REQUEST, "unreadable request body").into_response();
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut upstream = floor
        .client
        .request(parts.method, format!("{}{path}", floor.origin))
        .body(body);
    for (name, value) in &parts.headers {
        if forwardable(name) {
            upstream = upstream.header(name, value);
        }
    }
    let answer = match upstream.send().await {
        Ok(answer) => answer,
        Err(error) => return (StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    };
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if forwardable(name) {
            response = response.header(name, value);
        }
    }
    response
        .body(Body::from_stream(answer.bytes_stream()))
        .unwrap_or_else(|error| {
            (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
        })
}

// ---------------------------------------------------------------------------------------------
// Spawning children

/// A running child server. Dropping it closes its stdin (it shuts down) and reaps it.
pub struct Running {
    pub role: Role,
    pub base_url: String,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the child to stop and waits for it (up to 15 s, then kills it).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            self.shutdown();
        }
    }
}

/// Copies `exe` (this binary when `None`) into `dir` and returns the copy's path.
///
/// Every child runs from a file written moments ago, so builds are compared in the same state:
/// on this sandbox (Linux 6.18, ext4) a binary whose file had sat on disk for 45 minutes ran the
/// engine with twice the CPU per event and +3.5 ms TTFT at c=1 against a byte-identical copy
/// made just before the run (docs/PERFORMANCE.md, "Session 9"); how the kernel caches a file's
/// pages, not its code, decided the result.
pub fn fresh_copy(exe: Option<&Path>, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let source = exe_or_own(exe)?;
    let copy = dir.join(name);
    std::fs::copy(&source, &copy).with_context(|| {
        format!(
            "could not copy {} to {} (the children run from fresh copies)",
            source.display(),
            copy.display()
        )
    })?;
    Ok(copy)
}

fn exe_or_own(exe: Option<&Path>) -> anyhow::Result<PathBuf> {
    match exe {
        Some(exe) => Ok(exe.to_path_buf()),
        None => std::env::current_exe().context("could not find the benchmark's own binary"),
    }
}

/// Starts `config.exe` (this binary when `None`) as `role` and waits for its `listening` line.
pub fn spawn(config: &RoleConfig) -> anyhow::Result<Running> {
    let exe = exe_or_own(config.exe.as_deref())?;
    let role = match config.role {
        Role::Sim => "sim",
        Role::Floor => "floor",
        Role::Engine => "engine",
    };
    // Each child logs to its own file, as a server would, instead of the benchmark's terminal.
    let log_path = config.work_dir.join(format!("{role}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("could not create {}", log_path.display()))?;
    let mut command = Command::new(exe);
    command
        .args(["--role", role, "--engine-log", &config.engine_log])
        .args(config.timing.args())
        .arg("--work-dir")
        .arg(&config.work_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    if let Some(upstream) = &config.upstream {
        command.args(["--forward-to", upstream]);
    }
    if let Some(endpoint) = &config.otlp_endpoint {
        command.args(["--otlp-endpoint", endpoint]);
    }
    if let Some(url) = &config.redis_url {
        command.args(["--redis-url", url]);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("could not start the {role} child"))?;
    let stdin = child.stdin.take();
    let Some(stdout) = child.stdout.take() else {
        bail!("the {role} child has no stdout");
    };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let Some(base_url) = line.trim().strip_prefix("listening ") else {
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        bail!("the {role} child did not start (it printed {line:?}); its log:\n{log}");
    };
    Ok(Running {
        role: config.role,
        base_url: base_url.to_owned(),
        child,
        stdin,
    })
}
