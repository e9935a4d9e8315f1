//! `keyvex serve` (also what the binary does with no subcommand): the HTTP API on the embedded
//! defaults, with graceful shutdown on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use keyvex_engine::config::{ApiKeySpec, CallerRole, EngineConfig, ProcessEnv, ServerConfig};
use keyvex_engine::provider::ApiKey;
use keyvex_engine::server::{Backends, Server};

#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on, HOST:PORT (default 127.0.0.1:8080; port 0 picks a free one).
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// TOML config file (also KEYVEX_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Also run the AI-processing queue worker in this process (needs
    /// SQS_AI_PROCESSING_QUEUE_URL); SIGTERM drains it together with the open streams.
    #[arg(long)]
    with_worker: bool,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // Install the signal handlers first: a SIGTERM that arrives while we start up (or right after
    // "listening on") must drain and flush, not kill the process with the default action.
    let shutdown = shutdown_signal()?;
    let env = ProcessEnv;
    let mut config =
        ServerConfig::load(&env, args.config.as_deref()).context("reading server configuration")?;
    if let Some(addr) = args.addr {
        config.addr = addr;
    }
    if config.api_keys.is_empty() {
        let key = format!("kvx-dev-{}", uuid::Uuid::new_v4().simple());
        eprintln!(
            "keyvex: no API keys configured (KEYVEX_API_KEYS); generated a development key for caller `dev` (admin), valid until exit:\nkeyvex: dev key {key}"
        );
        config.api_keys.push(ApiKeySpec {
            key: ApiKey::new(key),
            caller: "dev".to_owned(),
            role: CallerRole::Admin,
        });
    }
    let engine = EngineConfig::from_env(&env).context("reading engine configuration")?;
    let tracker = keyvex_engine::metrics::start_from_env(&env)
        .await
        .context("starting the metrics pipeline")?;
    let store = match env_var("DYNAMODB_TABLE_NAME") {
        Some(table) => format!("DynamoDB table {table}"),
        None => format!(
            "SQLite {}",
            env_var("KEYVEX_METRICS_DB").unwrap_or_else(|| "keyvex-metrics.sqlite3".to_owned())
        ),
    };
    let backends = Backends::from_env(&env, &tracker, args.with_worker)
        .await
        .context("setting up the stores and the queue")?;
    let queue = match &backends.jobs {
        Some(jobs) => format!("{} (POST /v1/jobs on)", jobs.queue_url),
        None => "off (set SQS_AI_PROCESSING_QUEUE_URL for POST /v1/jobs)".to_owned(),
    };
    let worker = match &backends.worker {
        Some(w) => format!("on, {} job(s) at once", w.concurrency),
        None if backends.jobs.is_some() => {
            "off (run `keyvex worker` or serve --with-worker to process jobs)".to_owned()
        }
        None => "off".to_owned(),
    };
    let server = Server::bind_with(config, &engine, tracker, backends).await?;
    let addr = server.local_addr().context("reading the bound address")?;
    eprintln!(
        "keyvex: providers {}",
        server.runtime().providers_description
    );
    eprintln!("keyvex: metrics store {store}");
    eprintln!("keyvex: queue {queue}");
    eprintln!("keyvex: worker {worker}");
    eprintln!("keyvex: dashboard http://{addr}/admin");
    eprintln!("keyvex: listening on http://{addr}");
    let report = server.run(shutdown).await?;
    eprintln!(
        "keyvex: stopped; metrics ledger flushed: {}, shipped {}, left for next start {}",
        report.ledger_flushed, report.shipped, report.left_in_ledger
    );
    Ok(ExitCode::SUCCESS)
}

fn env_var(name: &str) -> Option<String> {
    use keyvex_engine::config::Env;
    ProcessEnv.var(name)
}

/// Registers SIGINT (Ctrl-C) and SIGTERM handlers now and returns a future that resolves on
/// either. Registration happens here, not on first poll, so no signal is missed during start-up.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if let Err(error) = tokio::signal::ctrl_c().await {
                tracing::error!(%error, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        })
    }
}
