//! `loadtest`: load-tests a Keyvex engine deployment (`--host`) or, with no host, an engine and
//! provider simulator it starts in-process; prints the targets table and exits 0 only when every
//! target was met.
//!
//! Order of a run: read targets → start the local engine (self-contained mode) → run goose (or
//! the open-loop scheduler) → judge targets → write reports → stop the local engine → exit code.
//! Exit codes: 0 every target met, 1 a target missed, 2 the run could not be made.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use goose::config::GooseConfiguration;
use goose::prelude::*;
use keyvex_engine::catalog::Catalog;
use loadtest::open_loop::{self, OpenLoopConfig};
use loadtest::report::{self, Summary};
use loadtest::scenarios::{self, Ctx, Route};
use loadtest::selfhost::{self, SimSettings};
use loadtest::stats::Stats;
use loadtest::targets::{Targets, TargetsFile};

/// Load-test a Keyvex engine: closed-loop goose users (default) or an open-loop arrival rate,
/// with stream-aware timing, cost per request and pass/fail targets.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version)]
struct Args {
    /// Engine base URL (e.g. https://staging.example.com). Without it, an engine and a provider
    /// simulator are started in-process on loopback ports.
    #[arg(long, short = 'H')]
    host: Option<String>,
    /// API key for --host (Authorization: Bearer). The self-contained mode generates one.
    #[arg(long, env = "KEYVEX_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Concurrent goose users [default: targets file, else 8].
    #[arg(long, short = 'u')]
    users: Option<usize>,
    /// How long to run once users started, e.g. 45s, 2m [default: targets file, else 45s].
    #[arg(long, short = 't', value_parser = parse_secs)]
    run_time: Option<u64>,
    /// Users started per second [default: all at once].
    #[arg(long)]
    hatch_rate: Option<f64>,
    /// Targets file (TOML) [default: the embedded loadtest/targets.toml].
    #[arg(long)]
    targets: Option<PathBuf>,
    /// Override a target: NAME=VALUE, e.g. ttft_p95=800ms, error_rate=1%, cost_per_request=$0.50.
    #[arg(long = "target", value_name = "NAME=VALUE")]
    target_overrides: Vec<String>,
    /// Override a scenario weight: NAME=N (magic_spark, logic_architect, content_crafter,
    /// style_master, pipeline, chat; 0 leaves it out).
    #[arg(long = "weight", value_name = "NAME=N")]
    weights: Vec<String>,
    /// Folder the run folder is created in, relative to the current directory (run from the
    /// repository root, that is the gitignored `loadtest/runs/`).
    #[arg(long, default_value = "loadtest/runs")]
    output_dir: PathBuf,
    /// An earlier run folder to compare with (deltas per metric).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Seed of request inputs (and of the simulator).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Simulator time to first token in ms [default: 450 ± 150].
    #[arg(long)]
    sim_ttft_ms: Option<u64>,
    /// Simulator output speed in tokens/s [default: 75; 0 = unpaced].
    #[arg(long)]
    sim_tps: Option<f64>,
    /// Probability (0..=1) that a simulated provider call fails (429, 500, 529, mid-stream cut).
    #[arg(long, default_value_t = 0.0)]
    sim_fault_rate: f64,
    /// Self-hosted engine: no mid-stream rescues (every catalog policy `off`), so a stream cut
    /// after content fails its request; compare a run with and without it.
    #[arg(long)]
    no_rescue: bool,
    /// Send requests at --rate from our own scheduler instead of goose's closed loop.
    #[arg(long)]
    open_loop: bool,
    /// Open-loop arrival rate: 5/s, 300/m or 2.5.
    #[arg(long, default_value = "5/s")]
    rate: String,
    /// Open loop: exponential inter-arrival times (Poisson) instead of a fixed interval.
    #[arg(long)]
    poisson: bool,
    /// Open loop: most requests in flight; arrivals beyond it are dropped and counted.
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
}

fn parse_secs(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (n, scale) = if let Some(n) = t.strip_suffix('m') {
        (n, 60)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1)
    } else {
        (t, 1)
    };
    n.trim()
        .parse::<u64>()
        .map(|n| n * scale)
        .map_err(|_| format!("{text:?}: expected seconds like 45, 45s or 2m"))
}

/// Why a run could not be made (exit code 2).
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Target(#[from] loadtest::targets::TargetError),
    #[error(transparent)]
    Report(#[from] report::ReportError),
    #[error(transparent)]
    SelfHost(#[from] selfhost::SelfHostError),
    #[error(transparent)]
    Rate(#[from] open_loop::RateError),
    #[error("the model catalog failed to load: {0}")]
    Catalog(String),
    #[error("{0}")]
    Usage(String),
    #[error("goose could not run the load test: {0}")]
    Goose(Box<GooseError>),
    #[error("the open-loop HTTP client failed to start: {0}")]
    Client(#[from] reqwest::Error),
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(args).await {
        Ok((summary, dir)) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", report::latency_table(&summary.stats, false));
            let _ = writeln!(out, "{}", report::cost_table(&summary.stats, false));
            if !summary.baseline.is_empty() {
                let _ = writeln!(out, "{}", report::baseline_table(&summary.baseline, false));
            }
            let _ = writeln!(out, "{}", report::targets_table(&summary.targets, false));
            let missed: Vec<&str> = summary
                .targets
                .iter()
                .filter(|t| !t.passed)
                .map(|t| t.name.as_str())
                .collect();
            let _ = writeln!(out, "reports: {}", dir.display());
            if missed.is_empty() {
                let _ = writeln!(out, "PASS: every target met");
                ExitCode::SUCCESS
            } else {
                let _ = writeln!(out, "FAIL: missed {}", missed.join(", "));
                ExitCode::from(1)
            }
        }
        Err(error) => {
            eprintln!("loadtest: {error}");
            ExitCode::from(2)
        }
    }
}

/// The scenario weights: the targets file's, then `--weight` overrides.
fn weights(file: &TargetsFile, overrides: &[String]) -> Result<Vec<(Route, usize)>, RunError> {
    let mut w: BTreeMap<&'static str, usize> = Route::ALL.iter().map(|r| (r.name(), 1)).collect();
    let mut set = |name: &str, n: usize| match Route::from_name(name) {
        Some(r) => {
            w.insert(r.name(), n);
            Ok(())
        }
        None => Err(RunError::Usage(format!(
            "unknown scenario {name:?}; use one of {}",
            Route::ALL.map(Route::name).join(", ")
        ))),
    };
    for (name, n) in &file.weights {
        set(name, *n)?;
    }
    for o in overrides {
        let parsed = o
            .split_once('=')
            .and_then(|(n, v)| Some((n.trim(), v.trim().parse::<usize>().ok()?)));
        let Some((name, n)) = parsed else {
            return Err(RunError::Usage(format!(
                "--weight expects NAME=N (e.g. pipeline=0), got {o:?}"
            )));
        };
        set(name, n)?;
    }
    let list: Vec<(Route, usize)> = Route::ALL
        .into_iter()
        .map(|r| (r, w[r.name()]))
        .filter(|(_, n)| *n > 0)
        .collect();
    if list.is_empty() {
        return Err(RunError::Usage(
            "every scenario weight is 0: nothing to run".into(),
        ));
    }
    Ok(list)
}

async fn run(args: Args) -> Result<(Summary, PathBuf), RunError> {
    let file = TargetsFile::load(args.targets.as_deref())?;
    let targets = file.targets(&args.target_overrides)?;
    let routes = weights(&file, &args.weights)?;
    let users = args.users.or(file.load.users).unwrap_or(8).max(1);
    let run_secs = args
        .run_time
        .or(file.load.run_time_secs)
        .unwrap_or(45)
        .max(1);
    // A stream must never hit the client's whole-body timeout before it would miss its target.
    let timeout = targets
        .longest_e2e()
        .map_or(Duration::ZERO, |d| d * 3)
        .max(Duration::from_secs(120));
    let baseline = args
        .baseline
        .as_deref()
        .map(report::load_baseline)
        .transpose()?;
    let catalog = Catalog::embedded().map_err(|e| RunError::Catalog(e.to_string()))?;

    let local = match &args.host {
        Some(_) => None,
        None => {
            let settings = SimSettings {
                seed: args.seed,
                ttft_ms: args.sim_ttft_ms,
                tps: args.sim_tps,
                fault_rate: args.sim_fault_rate,
                no_rescue: args.no_rescue,
            };
            let host = selfhost::start(&settings).await?;
            eprintln!(
                "loadtest: no --host given; started the engine at {} with an in-process provider simulator",
                host.base_url
            );
            Some(host)
        }
    };
    let (base_url, api_key) = match (&local, &args.host) {
        (Some(h), _) => (h.base_url.clone(), h.api_key.clone()),
        (None, Some(host)) => {
            let Some(key) = args.api_key.clone() else {
                return Err(RunError::Usage(
                    "--host needs an API key: pass --api-key or set KEYVEX_API_KEY".into(),
                ));
            };
            (host.trim_end_matches('/').to_owned(), key)
        }
        (None, None) => return Err(RunError::Usage("no host to test".into())),
    };

    let dir = report::run_dir(&args.output_dir)?;
    let stats = Stats::new();
    let ctx = Arc::new(Ctx {
        stats: stats.clone(),
        api_key,
        catalog,
        seed: args.seed,
    });
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let clock = Instant::now();
    let outcome = if args.open_loop {
        run_open_loop(&args, &ctx, &base_url, &routes, run_secs, timeout).await
    } else {
        run_goose(
            &ctx, &base_url, &routes, &targets, users, run_secs, &args, timeout, &dir,
        )
        .await
        .map(|t| (t, None))
    };
    let duration_secs = clock.elapsed().as_secs_f64();
    let sim = local.as_ref().map(selfhost::SelfHost::sim_stats);
    if let Some(host) = local
        && let Err(error) = host.stop().await
    {
        tracing::warn!(%error, "the local engine did not stop cleanly");
    }
    let (goose_thresholds, open) = outcome?;

    let summary_stats = stats.summary();
    let mut verdicts = targets.evaluate(&summary_stats);
    targets.apply_goose(&mut verdicts, &goose_thresholds);
    let mut summary = Summary {
        started_at,
        mode: if args.open_loop {
            "open-loop".to_owned()
        } else {
            "closed-loop (goose)".to_owned()
        },
        host: base_url,
        self_hosted: args.host.is_none(),
        duration_secs,
        users: (!args.open_loop).then_some(users),
        passed: verdicts.iter().all(|v| v.passed),
        targets: verdicts,
        stats: summary_stats,
        open_loop: open,
        sim,
        goose_thresholds,
        ..Summary::default()
    };
    if let (Some(base), Some(path)) = (baseline, &args.baseline) {
        summary.baseline = report::compare(&base.stats, &summary.stats);
        summary.baseline_from = Some(path.display().to_string());
    }
    report::write(&dir, &summary)?;
    Ok((summary, dir))
}

async fn run_open_loop(
    args: &Args,
    ctx: &Arc<Ctx>,
    base_url: &str,
    routes: &[(Route, usize)],
    run_secs: u64,
    timeout: Duration,
) -> Result<
    (
        Vec<goose::threshold::ThresholdResult>,
        Option<open_loop::OpenLoopSummary>,
    ),
    RunError,
> {
    let cfg = OpenLoopConfig {
        rate: open_loop::parse_rate(&args.rate)?,
        poisson: args.poisson,
        duration: Duration::from_secs(run_secs),
        max_in_flight: args.max_in_flight,
        late_after: Duration::from_millis(25),
        timeout,
    };
    // Each route once per unit of weight, interleaved so a short run still sees every route.
    let max = routes.iter().map(|(_, w)| *w).max().unwrap_or(1);
    let mut order = Vec::new();
    for round in 0..max {
        for (route, w) in routes {
            if round < *w {
                order.push(*route);
            }
        }
    }
    let summary = open_loop::run(&cfg, Arc::clone(ctx), base_url, &order).await?;
    Ok((Vec::new(), Some(summary)))
}

#[expect(
    clippy::too_many_arguments,
    reason = "the run's parts, each used once; a struct for one call site would only rename them"
)]
async fn run_goose(
    ctx: &Arc<Ctx>,
    base_url: &str,
    routes: &[(Route, usize)],
    targets: &Targets,
    users: usize,
    run_secs: u64,
    args: &Args,
    timeout: Duration,
    dir: &std::path::Path,
) -> Result<Vec<goose::threshold::ThresholdResult>, RunError> {
    let mut config = GooseConfiguration::default();
    config.host = Some(base_url.to_owned());
    config.users = Some(users);
    config.increase_rate = Some(
        args.hatch_rate
            .map_or_else(|| users.to_string(), |r| r.to_string()),
    );
    config.run_time = Some(run_secs.to_string());
    config.report_file = vec![
        dir.join("report.html").display().to_string(),
        dir.join("report.json").display().to_string(),
    ];
    config.threshold = targets.goose_rules().into_iter().map(|(_, r)| r).collect();
    // Judge at the end, like the other targets, so one slow start never cuts the run short.
    config.no_threshold_abort = true;
    config.timeout = Some(timeout.as_secs().to_string());
    // Compression would make the client buffer a stream's bytes before we see them.
    config.no_gzip = true;
    // Our Stats never reset; goose's rows must cover the same requests.
    config.no_reset_metrics = true;
    config.no_print_metrics = true;
    config.no_telnet = true;
    config.quiet = 1;
    let mut attack =
        GooseAttack::initialize_with_config(config).map_err(|e| RunError::Goose(Box::new(e)))?;
    for (route, weight) in routes {
        let scenario =
            scenarios::scenario(ctx, *route, *weight).map_err(|e| RunError::Goose(Box::new(e)))?;
        attack = attack.register_scenario(scenario);
    }
    match attack.execute().await {
        Ok(metrics) => Ok(metrics.thresholds.clone()),
        Err(GooseError::ThresholdsFailed { metrics, .. }) => Ok(metrics.thresholds.clone()),
        Err(e) => Err(RunError::Goose(Box::new(e))),
    }
}
