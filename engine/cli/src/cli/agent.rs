//! `keyvex agent <name>`: run one agent, streaming its answer, and print the validated output.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use futures::StreamExt;
use keyvex_engine::{AgentEvent, AgentStream, Process};

use super::oneshot;
use super::signal::{INTERRUPTED, stop_signal};

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// magic-spark, logic-architect, content-crafter or style-master (camelCase keys work too).
    agent: Process,
    /// JSON file with the agent's input (`-` reads standard input).
    #[arg(long, short, conflicts_with = "json")]
    input: Option<PathBuf>,
    /// The agent's input as inline JSON.
    #[arg(long)]
    json: Option<String>,
    /// Also write the validated output to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not echo the model's raw stream to stderr.
    #[arg(long)]
    quiet: bool,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let input = read_input(&args)?;
    let stop = stop_signal()?;
    let app = oneshot::start().await?;
    let events = app.engine.agent(oneshot::context(), args.agent, input);
    let code = tokio::select! {
        code = relay(&args, events) => code?,
        () = stop => {
            // Dropping the run cancels its call; the engine records it as cancelled.
            eprintln!("\nkeyvex: interrupted; the call so far is recorded as cancelled");
            ExitCode::from(INTERRUPTED)
        }
    };
    eprintln!("{}", oneshot::finish(&app).await);
    Ok(code)
}

/// Echoes the run to stderr and prints the validated output to stdout.
async fn relay(args: &AgentArgs, mut events: AgentStream) -> anyhow::Result<ExitCode> {
    let mut stderr = std::io::stderr();
    let mut code = ExitCode::FAILURE;
    while let Some(event) = events.next().await {
        match event {
            AgentEvent::Start {
                provider,
                model,
                attempt,
            } => {
                eprintln!(
                    "keyvex: {} attempt {attempt}: {provider} {model}",
                    args.agent
                );
            }
            AgentEvent::Fallback { from, to, reason } => {
                eprintln!("\nkeyvex: falling back from {from} to {to}: {reason}");
            }
            AgentEvent::Restart {
                from,
                to,
                reason,
                discarded_bytes,
                ..
            } => {
                eprintln!(
                    "\nkeyvex: the stream of {from} broke after {discarded_bytes} bytes ({reason}); restarting on {to}"
                );
            }
            AgentEvent::Delta(text) if !args.quiet => {
                stderr.write_all(text.as_bytes())?;
                stderr.flush()?;
            }
            AgentEvent::Delta(_) | AgentEvent::Partial(_) => {}
            AgentEvent::Usage(u) => {
                eprintln!(
                    "\nkeyvex: call on {} {}: tokens in {} (cached {}) / out {}, cost {}{}",
                    u.provider.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                    u.model.as_deref().unwrap_or("-"),
                    u.usage.input,
                    u.usage.cached_input,
                    u.usage.output,
                    u.cost,
                    if u.estimated { " (estimated)" } else { "" }
                );
            }
            AgentEvent::Repair { errors } => {
                eprintln!("keyvex: output invalid, asking the model to repair it once:");
                for e in errors {
                    eprintln!("  - {e}");
                }
            }
            AgentEvent::Result {
                output, outcome, ..
            } => {
                let pretty = serde_json::to_string_pretty(&output)?;
                if let Some(path) = &args.out {
                    std::fs::write(path, &pretty)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("keyvex: wrote {}", path.display());
                }
                let mut stdout = std::io::stdout();
                writeln!(stdout, "{pretty}")?;
                eprintln!(
                    "keyvex: {} done in {} ms, {} call(s), total cost {}{}",
                    args.agent,
                    outcome.latency.as_millis(),
                    outcome.calls.len(),
                    outcome.cost(),
                    if outcome.cost_estimated() {
                        " (estimated)"
                    } else {
                        ""
                    }
                );
                code = ExitCode::SUCCESS;
            }
            AgentEvent::Error { error, outcome, .. } => {
                eprintln!(
                    "\nkeyvex: {} failed: {error}\nkeyvex: cost of what ran: {}",
                    args.agent,
                    outcome.cost()
                );
            }
        }
    }
    Ok(code)
}

fn read_input(args: &AgentArgs) -> anyhow::Result<serde_json::Value> {
    let text = match (&args.input, &args.json) {
        (_, Some(json)) => json.clone(),
        (Some(path), None) if path.as_os_str() == "-" => {
            std::io::read_to_string(std::io::stdin()).context("reading the input from stdin")?
        }
        (Some(path), None) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the input file {}", path.display()))?,
        (None, None) => anyhow::bail!(
            "give the agent's input with --input FILE.json (or - for stdin) or --json '{{...}}'"
        ),
    };
    serde_json::from_str(&text).context("the agent input is not valid JSON")
}
