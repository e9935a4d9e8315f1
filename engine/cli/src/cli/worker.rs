//! `keyvex worker`: run the AI-processing worker until SIGTERM or Ctrl-C.
//!
//! It runs on the same assembled engine as `keyvex serve` (provider budgets, breakers, the
//! recorder), so a job's model calls are limited and recorded exactly like the API's.
//! Shutdown order: the signal cancels the token → the worker stops receiving, lets jobs in
//! flight finish for `--shutdown-grace-secs`, releases the rest (their cut calls are recorded as
//! cancelled, with the job's caller and stage) → the engine flushes the metrics and stops the
//! simulator (if any) → exit.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use keyvex::{App, AppError, Config, ProcessEnv};
use keyvex_server::queue::worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use super::signal::stop_signal;

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
    let stop = stop_signal()?;
    let config = Config::load(&ProcessEnv, None).context("reading configuration")?;
    // Refuse before anything starts: without a queue there is nothing to work on.
    let Some(queue) = config.queue.clone() else {
        return Err(AppError::NoQueue.into());
    };
    let app = App::start(config).await.context("starting the engine")?;
    let Some(ctx) = app.queue.clone() else {
        app.shutdown(Duration::from_secs(10)).await;
        return Err(AppError::NoQueue.into());
    };
    for line in app.banner() {
        eprintln!("keyvex: {line}");
    }
    let worker_config = WorkerConfig {
        concurrency: args.concurrency.unwrap_or(queue.concurrency).max(1),
        dlq_url: queue.dlq_url.clone(),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        ..WorkerConfig::default()
    };
    let worker = Worker::new(ctx, app.engine.clone(), worker_config);
    let cancel = CancellationToken::new();
    // Jobs are routed and priced with the store's active catalog version, like the API's calls.
    let catalog_poller = tokio::spawn(app.catalog.clone().run(cancel.child_token()));
    tokio::spawn({
        let cancel = cancel.clone();
        async move {
            stop.await;
            tracing::info!("stop signal received");
            cancel.cancel();
        }
    });
    eprintln!("keyvex: worker polling {}", queue.queue_url);
    let result = worker.run(cancel.clone()).await;
    cancel.cancel();
    let _ = catalog_poller.await;

    let report = app.shutdown(Duration::from_secs(10)).await;
    if report.left_in_ledger > 0 {
        eprintln!(
            "keyvex: {} metrics records stay in the local ledger and ship at the next start",
            report.left_in_ledger
        );
    }
    let counts = result?;
    eprintln!("keyvex: worker stopped: {counts:?}");
    Ok(ExitCode::SUCCESS)
}
