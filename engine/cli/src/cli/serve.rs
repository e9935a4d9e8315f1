//! `keyvex serve` (also what the binary does with no subcommand): the HTTP API on the embedded
//! defaults, with graceful shutdown on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use keyvex::{App, AppError, Config, ProcessEnv};
use keyvex_engine::provider::ApiKey;
use keyvex_server::Server;
use keyvex_server::config::{ApiKeySpec, CallerRole};

use super::signal::stop_signal;

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
    let shutdown = stop_signal()?;
    let mut config =
        Config::load(&ProcessEnv, args.config.as_deref()).context("reading configuration")?;
    if let Some(addr) = args.addr {
        config.server.addr = addr;
    }
    if config.server.api_keys.is_empty() {
        let key = format!("kvx-dev-{}", uuid::Uuid::new_v4().simple());
        eprintln!(
            "keyvex: no API keys configured (KEYVEX_API_KEYS); generated a development key for caller `dev` (admin), valid until exit:\nkeyvex: dev key {key}"
        );
        config.server.api_keys.push(ApiKeySpec {
            key: ApiKey::new(key),
            caller: "dev".to_owned(),
            role: CallerRole::Admin,
        });
    }
    if args.with_worker && config.queue.is_none() {
        return Err(AppError::NoQueue.into());
    }
    let server_config = config.server.clone();
    let app = App::start(config).await.context("starting the engine")?;
    let parts = app.server_parts(args.with_worker)?;
    let queue = match &app.queue {
        Some(jobs) => format!("{} (POST /v1/jobs on)", jobs.queue_url),
        None => "off (set SQS_AI_PROCESSING_QUEUE_URL for POST /v1/jobs)".to_owned(),
    };
    let worker = match &parts.backends.worker {
        Some(w) => format!("on, {} job(s) at once", w.concurrency),
        None if app.queue.is_some() => {
            "off (run `keyvex worker` or serve --with-worker to process jobs)".to_owned()
        }
        None => "off".to_owned(),
    };
    let server = Server::bind(server_config, parts).await?;
    let addr = server.local_addr().context("reading the bound address")?;
    for line in app.banner() {
        eprintln!("keyvex: {line}");
    }
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
