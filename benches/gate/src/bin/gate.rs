//! The CI budget gate: `cargo run --profile gate -p bench-gate --bin gate`. Times every hot path
//! briefly, prints a table, and exits non-zero naming each bench over its budget.
//!
//! The budgets are for the optimised `gate` profile (what CI runs); an unoptimised build applies
//! the file's `unoptimised_scale` to the ratio budgets and says so.
//!
//! Exit codes: 0 all within budget, 1 a budget was exceeded, 2 the gate could not run (bad
//! budgets file, unknown bench, broken fixture).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bench_gate::cases;
use bench_gate::gate::{self, Budgets, MeasureConfig, Report, format_ns};
use clap::Parser;

/// Checks the engine's hot paths against `benches/gate/budgets.toml`, relative to a calibration
/// workload measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "gate")]
struct Args {
    /// Budgets file.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/budgets.toml"))]
    budgets: PathBuf,
    /// Multiplies every budget; e.g. 0.001 makes the gate fail on purpose.
    #[arg(long, env = "KEYVEX_BENCH_BUDGET_SCALE", default_value_t = 1.0)]
    scale: f64,
    /// Only these benches (exact names or groups such as `sse`), comma-separated; the
    /// calibration always runs.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Samples per bench (the median is kept).
    #[arg(long, default_value_t = 15)]
    samples: usize,
    /// Target length of one sample, in milliseconds.
    #[arg(long, default_value_t = 20)]
    sample_ms: u64,
    /// Warm-up per bench, in milliseconds.
    #[arg(long, default_value_t = 60)]
    warm_up_ms: u64,
    /// Times an over-budget bench is measured again (with the calibration) before it fails; the
    /// best attempt counts, so a burst of load on a shared machine does not fail the gate while
    /// a real regression, over budget every time, still does.
    #[arg(long, default_value_t = 2)]
    retries: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) if report.passed() => ExitCode::SUCCESS,
        Ok(report) => {
            for row in report.failures() {
                eprintln!(
                    "gate: {} is over budget: median {} per iteration = {} vs the limit {} (budget {} in {}, scale {})",
                    row.measurement.name,
                    format_ns(row.measurement.median_ns),
                    row.observed(),
                    row.limit,
                    row.budget,
                    args.budgets.display(),
                    report.scale,
                );
            }
            ExitCode::from(1)
        }
        Err(error) => {
            eprintln!("gate: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<Report> {
    let started = Instant::now();
    let budgets = Budgets::load(&args.budgets)?;
    // Debug assertions are on exactly in the unoptimised profiles (dev, test); `gate` and
    // `release` turn them off with optimisation.
    let optimised = !cfg!(debug_assertions);
    let unoptimised_scale = budgets.unoptimised_scale();
    let budgets = if optimised {
        budgets
    } else {
        budgets.unoptimised()
    };
    let all = cases::all()?;
    budgets.check_names(all.iter().map(cases::Case::name))?;
    let mut selected = cases::select(all, &args.only).map_err(anyhow::Error::msg)?;
    let config = MeasureConfig {
        warm_up: Duration::from_millis(args.warm_up_ms),
        sample_time: Duration::from_millis(args.sample_ms),
        samples: args.samples,
    };
    let profile = if optimised {
        "optimised build".to_owned()
    } else {
        format!(
            "UNOPTIMISED build: ratio budgets × {unoptimised_scale} (`unoptimised_scale`); CI gates the optimised build, `--profile gate`"
        )
    };
    eprintln!(
        "gate: {} benches, {} samples of ~{} ms each, {profile}",
        selected.len(),
        config.samples,
        args.sample_ms
    );
    let (calibration_ns, measurements) = gate::measure(&mut selected, &config, |m| {
        eprintln!("gate: measured {} ({})", m.name, format_ns(m.median_ns));
    })?;
    let mut report = gate::evaluate(calibration_ns, measurements, &budgets, args.scale)?;
    for attempt in 1..=args.retries {
        let failing = report.failing_names();
        if failing.is_empty() {
            break;
        }
        eprintln!(
            "gate: {} above budget; measuring again (retry {attempt} of {})",
            failing.join(", "),
            args.retries
        );
        let mut again = cases::select(cases::all()?, &failing).map_err(anyhow::Error::msg)?;
        let (calibration_ns, measurements) = gate::measure(&mut again, &config, |m| {
            eprintln!("gate: measured {} ({})", m.name, format_ns(m.median_ns));
        })?;
        report.keep_best(gate::evaluate(
            calibration_ns,
            measurements,
            &budgets,
            args.scale,
        )?);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", report.table())?;
    writeln!(
        out,
        "calibration {} per iteration; budgets {} × {}; {} in {:.1} s",
        format_ns(calibration_ns),
        args.budgets.display(),
        args.scale,
        if report.passed() { "PASS" } else { "FAIL" },
        started.elapsed().as_secs_f64()
    )?;
    Ok(report)
}
