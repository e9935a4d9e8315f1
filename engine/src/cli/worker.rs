//! `keyvex worker`: run the AI-processing worker until SIGTERM or Ctrl-C.
//!
//! Shutdown order: the signal cancels the token → the worker stops receiving, lets jobs in
//! flight finish for `--shutdown-grace-secs`, releases the rest → the metrics tracker commits
//! and ships what it holds → the simulator (if any) stops → exit.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use keyvex_engine::config::{EngineConfig, ProcessEnv};
use keyvex_engine::metrics;
use keyvex_engine::queue::JobsCtx;
use keyvex_engine::queue::worker::{Worker, WorkerConfig};
use keyvex_engine::router::RouterConfig;
use keyvex_engine::runtime::Runtime;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Jobs run at once (default: KEYVEX_WORKER_CONCURRENCY, else 4).
    #[arg(long)]
    concurrency: Option<usize>,
    /// How long jobs in flight may finish after SIGTERM before they are released.
    #[arg(long, default_value_t = 25)]
    shutdown_grace_secs: u64,
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let config = EngineConfig::from_env(&ProcessEnv).context("reading configuration")?;
    let (ctx, queue_config) = JobsCtx::from_env(&ProcessEnv).await?;
    let runtime = Runtime::start(&config, RouterConfig::default()).await?;
    eprintln!("keyvex: providers {}", runtime.providers_description);
    let tracker = metrics::start_from_env(&ProcessEnv)
        .await
        .context("starting metrics")?;

    let worker_config = WorkerConfig {
        concurrency: args.concurrency.unwrap_or(queue_config.concurrency).max(1),
        dlq_url: queue_config.dlq_url.clone(),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        ..WorkerConfig::default()
    };
    let worker = Worker::new(ctx, runtime.router.clone(), tracker.clone(), worker_config);
    let cancel = CancellationToken::new();
    tokio::spawn(cancel_on_signal(cancel.clone()));
    eprintln!("keyvex: worker polling {}", queue_config.queue_url);
    let result = worker.run(cancel).await;

    let report = tracker
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(10))
        .await;
    if report.left_in_ledger > 0 {
        eprintln!(
            "keyvex: {} metrics records stay in the local ledger and ship at the next start",
            report.left_in_ledger
        );
    }
    runtime.shutdown().await;
    let counts = result?;
    eprintln!("keyvex: worker stopped: {counts:?}");
    Ok(ExitCode::SUCCESS)
}

/// Cancels on SIGTERM (how orchestrators stop a process) or Ctrl-C.
async fn cancel_on_signal(cancel: CancellationToken) {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C still stops the worker");
                let _ = tokio::signal::ctrl_c().await;
                cancel.cancel();
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("stop signal received");
    cancel.cancel();
}
