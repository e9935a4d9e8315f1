//! `keyvex demo-traffic`: fills the metrics store (SQLite or DynamoDB, as configured by the
//! environment) with deterministic sample traffic so the admin dashboard has something to show.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use keyvex::{Config, ProcessEnv};
use keyvex_engine::catalog::Catalog;
use keyvex_store::Stores;
use keyvex_store::demo::{self, DemoConfig};

/// How long the final flush to the store may take before the rest is left in the ledger.
const FLUSH_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Requests to write (an incident of 43 requests that trips alerts is included).
    #[arg(long, default_value_t = 5_000)]
    requests: usize,
    /// Spread the requests over this many days before now (1 to 30).
    #[arg(long, default_value_t = 7)]
    days: u32,
    /// Distinct callers (user ids).
    #[arg(long, default_value_t = 8)]
    users: usize,
    /// Seed of the generator: the same seed gives the same traffic shape.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&ProcessEnv, None).context("reading configuration")?;
    let catalog =
        Catalog::load(config.models_file.as_deref()).context("loading the model catalog")?;
    let now_ms = keyvex_engine::clock::now_ms();
    let cfg = DemoConfig {
        requests: args.requests,
        days: args.days,
        users: args.users,
        seed: args.seed,
        end_ms: now_ms,
    };
    let records = demo::generate(&cfg, &catalog)?;
    let summary = demo::summarize(&records);

    let stores = Stores::open(&config.store, config.metrics.clone())
        .await
        .context("starting the metrics pipeline")?;
    let tracker = stores.tracker;
    let sink = tracker.health().sink;
    demo::record_all(&tracker, records).await?;
    let report = tracker
        .shutdown(tokio::time::Instant::now() + FLUSH_DEADLINE)
        .await;
    let health = tracker.health();

    let mut out = std::io::stdout();
    writeln!(
        out,
        "wrote {} requests over {} days to {sink}: {} errors, {} fallbacks, {} total cost; {} alerts raised",
        summary.requests,
        cfg.days,
        summary.errors,
        summary.fallbacks,
        summary.cost,
        health.alerts_raised
    )?;
    if report.left_in_ledger > 0 {
        eprintln!(
            "keyvex: {} entries are still in the local ledger (the store was slow or unreachable); \
             the next keyvex start ships them",
            report.left_in_ledger
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
