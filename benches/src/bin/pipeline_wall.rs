//! `pipeline_wall`: a whole pipeline run's wall time against its critical path of model time,
//! with everything on. See `docs/PERFORMANCE.md` ("Pipeline wall time").

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use benches::pipeline_wall::{self, Report, Settings};
use clap::Parser;
use comfy_table::Table;

/// Pipeline wall time vs the critical path of its four model calls, timed by the simulator.
#[derive(Debug, Parser)]
#[command(name = "pipeline_wall")]
struct Args {
    /// Measured runs (a warm-up run is made first and not counted).
    #[arg(long, default_value_t = 12)]
    runs: usize,
    /// Simulated time to first token of every call, ms.
    #[arg(long = "sim-ttft-ms", default_value_t = 50)]
    sim_ttft_ms: u64,
    /// Simulated output speed of every call, tokens per second.
    #[arg(long = "sim-tokens-per-sec", default_value_t = 1000.0)]
    sim_tokens_per_sec: f64,
    /// Where to write the JSON report (default `target/overhead/pipeline.json`).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "pipeline_wall: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<bool> {
    if args.runs == 0 {
        anyhow::bail!("--runs must be at least 1");
    }
    let work_dir =
        std::env::temp_dir().join(format!("keyvex-pipeline-wall-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("could not create {}", work_dir.display()))?;
    let settings = Settings {
        runs: args.runs,
        ttft: Duration::from_millis(args.sim_ttft_ms),
        tokens_per_sec: args.sim_tokens_per_sec,
        work_dir: work_dir.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the tokio runtime")?;
    let report = runtime.block_on(pipeline_wall::measure(&settings));
    let _ = std::fs::remove_dir_all(&work_dir);
    let report = report?;
    print_table(&report)?;
    let path = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/overhead/pipeline.json")
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("could not write {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "report: {}", path.display())?;
    Ok(report.pass)
}

fn print_table(report: &Report) -> anyhow::Result<()> {
    let mut table = Table::new();
    table.set_header([
        "run",
        "wall ms",
        "critical path ms",
        "added ms",
        "magicSpark",
        "logicArchitect",
        "contentCrafter",
        "styleMaster",
    ]);
    for (i, r) in report.runs.iter().enumerate() {
        let mut row = vec![
            (i + 1).to_string(),
            format!("{:.1}", r.wall_ms),
            format!("{:.1}", r.critical_path_ms),
            format!("{:.2}", r.added_ms),
        ];
        row.extend(r.stage_service_ms.iter().map(|(_, ms)| format!("{ms:.1}")));
        table.add_row(row);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{table}")?;
    writeln!(
        out,
        "simulator: TTFT {} ms, {} tokens/s; added = wall − critical path (stage times by the simulator)",
        report.ttft_ms, report.tokens_per_sec
    )?;
    let p = &report.phases_p50;
    writeln!(
        out,
        "where it went (p50 of each): request → Magic Spark's request {:.2} ms; Magic Spark → Logic Architect {:.2} ms; \
         Logic Architect → last two {:.2} ms; last two starting apart {:.2} ms; last byte → done {:.2} ms",
        p.lead_in_ms, p.spark_to_logic_ms, p.logic_to_last_stages_ms, p.parallel_skew_ms, p.tail_ms
    )?;
    writeln!(
        out,
        "added p50 {:.2} ms, max {:.2} ms over {} runs (wall p50 {:.1} ms, critical path p50 {:.1} ms); target ≤ {} ms: {}",
        report.added_ms_p50,
        report.added_ms_max,
        report.runs.len(),
        report.wall_ms_p50,
        report.critical_path_ms_p50,
        report.target_added_ms,
        if report.pass { "pass" } else { "FAIL" }
    )?;
    Ok(())
}
