//! `keyvex pipeline`: the whole four-agent run with a live per-stage display, the tool definition
//! written to a file, and a per-stage cost/latency table.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use keyvex_engine::{AgentEvent, PipelineEvent, PipelineInput, PipelineStream, Process, RunRollup};

use super::oneshot;
use super::signal::{INTERRUPTED, stop_signal};

#[derive(Debug, clap::Args)]
pub struct PipelineArgs {
    /// What the business does, in a sentence or two.
    #[arg(long)]
    business: String,
    /// Who the tool is for.
    #[arg(long, default_value = "prospective clients of this business")]
    audience: String,
    /// The business's industry.
    #[arg(long, default_value = "professional services")]
    industry: String,
    /// Constraints for the tool ideas (e.g. "no more than 6 questions").
    #[arg(long)]
    constraints: Option<String>,
    /// Which Magic Spark concept to build (0-based).
    #[arg(long, default_value_t = 0)]
    concept: usize,
    /// Where to write the tool definition.
    #[arg(long, default_value = "keyvex-tool.json")]
    out: PathBuf,
}

pub async fn run(args: PipelineArgs) -> anyhow::Result<ExitCode> {
    let stop = stop_signal()?;
    let app = oneshot::start().await?;

    let mut business = serde_json::json!({
        "businessDescription": args.business,
        "targetAudience": args.audience,
        "industry": args.industry,
    });
    if let Some(c) = &args.constraints {
        business["constraints"] = serde_json::Value::String(c.clone());
    }
    let input = PipelineInput {
        business,
        concept_index: Some(args.concept),
        brand: None,
    };

    let progress = StageProgress::new();
    let events = app.engine.pipeline(oneshot::context(), input);
    let code = tokio::select! {
        code = relay(&args, &progress, events) => code?,
        () = stop => {
            // Dropping the run cancels every stage in flight; the engine records each cancelled
            // call with its stage.
            progress.finish();
            eprintln!("keyvex: interrupted; the calls so far are recorded as cancelled");
            ExitCode::from(INTERRUPTED)
        }
    };
    eprintln!("{}", oneshot::finish(&app).await);
    Ok(code)
}

/// Shows the run per stage; writes the tool and prints the cost table at the end.
async fn relay(
    args: &PipelineArgs,
    progress: &StageProgress,
    mut events: PipelineStream,
) -> anyhow::Result<ExitCode> {
    let mut code = ExitCode::FAILURE;
    while let Some(event) = events.next().await {
        match event {
            PipelineEvent::RunStarted { run_id } => {
                progress.note(&format!("run {run_id}"));
            }
            PipelineEvent::Stage { stage, event } => progress.update(stage, &event),
            PipelineEvent::Done { tool, rollup, .. } => {
                progress.finish();
                let pretty = serde_json::to_string_pretty(&tool)?;
                std::fs::write(&args.out, pretty)
                    .with_context(|| format!("writing {}", args.out.display()))?;
                eprintln!("{}", rollup_table(&rollup));
                eprintln!("keyvex: tool definition written to {}", args.out.display());
                code = ExitCode::SUCCESS;
            }
            PipelineEvent::Failed {
                stage,
                error,
                rollup,
                ..
            } => {
                progress.finish();
                eprintln!("{}", rollup_table(&rollup));
                let at =
                    stage.map_or_else(|| "assembly".to_owned(), |s| s.display_name().to_owned());
                eprintln!("keyvex: pipeline failed at {at}: {error}");
            }
        }
    }
    Ok(code)
}

/// One progress line per stage, redrawn as events arrive (plain lines when stderr is not a tty).
struct StageProgress {
    multi: MultiProgress,
    bars: HashMap<Process, ProgressBar>,
    chars: std::sync::Mutex<HashMap<Process, usize>>,
}

impl StageProgress {
    fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{spinner} {prefix:16} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bars = Process::ALL
            .into_iter()
            .map(|p| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_prefix(p.display_name());
                bar.set_message("waiting");
                (p, bar)
            })
            .collect();
        Self {
            multi,
            bars,
            chars: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn note(&self, line: &str) {
        let _ = self.multi.println(format!("keyvex: {line}"));
    }

    fn update(&self, stage: Process, event: &AgentEvent) {
        let Some(bar) = self.bars.get(&stage) else {
            return;
        };
        match event {
            AgentEvent::Start {
                provider, model, ..
            } => {
                bar.enable_steady_tick(Duration::from_millis(120));
                bar.set_message(format!("{provider} {model}: waiting for first token"));
            }
            AgentEvent::Fallback { to, reason, .. } => {
                bar.set_message(format!("fallback to {to} ({reason})"));
            }
            AgentEvent::Restart { to, reason, .. } => {
                let mut chars = self.chars.lock().unwrap_or_else(|e| e.into_inner());
                chars.insert(stage, 0);
                bar.set_message(format!("restarting on {to} ({reason})"));
            }
            AgentEvent::Delta(text) => {
                let mut chars = self.chars.lock().unwrap_or_else(|e| e.into_inner());
                let n = chars.entry(stage).or_default();
                *n += text.len();
                bar.set_message(format!("streaming: {n} bytes"));
            }
            AgentEvent::Partial(_) | AgentEvent::Usage(_) => {}
            AgentEvent::Repair { errors } => {
                bar.set_message(format!("repairing {} validation error(s)", errors.len()));
            }
            AgentEvent::Result { outcome, .. } => {
                bar.finish_with_message(format!(
                    "done in {} ms, {}",
                    outcome.latency.as_millis(),
                    outcome.cost()
                ));
            }
            AgentEvent::Error { error, .. } => {
                bar.abandon_with_message(format!("failed: {error}"));
            }
        }
    }

    fn finish(&self) {
        for bar in self.bars.values() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

fn rollup_table(r: &RunRollup) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "stage",
        "calls",
        "input tok",
        "cached",
        "output tok",
        "cost",
        "TTFT ms",
        "latency ms",
    ]);
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for s in &r.stages {
        table.add_row(vec![
            format!(
                "{}{}",
                s.stage.display_name(),
                if s.fallback_used { " (fallback)" } else { "" }
            ),
            s.calls.to_string(),
            s.usage.input.to_string(),
            s.usage.cached_input.to_string(),
            s.usage.output.to_string(),
            format!("{}{}", s.cost, if s.cost_estimated { "*" } else { "" }),
            ms(s.ttft_ms),
            s.latency_ms.to_string(),
        ]);
    }
    table.add_row(vec![
        format!("run {}", r.run_id),
        r.stages.iter().map(|s| s.calls).sum::<usize>().to_string(),
        r.usage.input.to_string(),
        r.usage.cached_input.to_string(),
        r.usage.output.to_string(),
        format!("{}{}", r.cost, if r.cost_estimated { "*" } else { "" }),
        ms(r.ttft_ms),
        r.latency_ms.to_string(),
    ]);
    table
}
