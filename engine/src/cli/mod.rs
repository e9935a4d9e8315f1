//! Command-line parsing and dispatch. Each command lives in its own file.

mod agent;
mod complete;
mod demo;
mod pipeline;
mod queue;
mod record;
mod serve;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keyvex_engine::config::EnvVar;
use keyvex_engine::provider::sim;

/// Keyvex engine: runs the four Keyvex agents as streaming pipelines over OpenAI and Anthropic,
/// with fallback, exact cost accounting and durable metrics.
#[derive(Debug, Parser)]
#[command(name = "keyvex", version, after_help = env_help())]
pub struct Cli {
    /// With no command, `keyvex` serves the HTTP API (`keyvex serve` on its defaults).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stream one completion for a process (with fallback) and print provider, model, TTFT,
    /// tokens and cost.
    Complete(complete::CompleteArgs),
    /// Run one agent on a JSON input, streaming its answer; prints the validated output.
    Agent(agent::AgentArgs),
    /// Run the whole pipeline (Magic Spark → Logic Architect → Content Crafter ∥ Style Master)
    /// for a business and write the tool definition to a file.
    Pipeline(pipeline::PipelineArgs),
    /// Run the provider simulator (OpenAI and Anthropic wire protocols) as a standalone server.
    Sim(sim::SimArgs),
    /// Serve the HTTP API (agents and pipeline as SSE, OpenAI-compatible chat completions,
    /// sessions, jobs, admin metrics and dashboard, health and Prometheus metrics). The default
    /// when no command is given.
    Serve(serve::ServeArgs),
    /// Create the AI-processing queues, submit a job, or show a job's state.
    Queue(queue::QueueArgs),
    /// Run the AI-processing queue worker until SIGTERM or Ctrl-C.
    Worker(worker::WorkerArgs),
    /// Fill the metrics store with deterministic sample traffic for the admin dashboard.
    DemoTraffic(demo::DemoArgs),
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli
        .command
        .unwrap_or(Command::Serve(serve::ServeArgs::default()))
    {
        Command::Serve(args) => {
            init_logging("info");
            serve::run(args).await
        }
        Command::Complete(args) => {
            init_logging("warn");
            complete::run(args).await
        }
        Command::Agent(args) => {
            init_logging("warn");
            agent::run(args).await
        }
        Command::Pipeline(args) => {
            init_logging("warn");
            pipeline::run(args).await
        }
        Command::Sim(args) => {
            init_logging("info");
            sim::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Queue(args) => {
            init_logging("warn");
            queue::run(args).await
        }
        Command::Worker(args) => {
            init_logging("info");
            worker::run(args).await
        }
        Command::DemoTraffic(args) => {
            init_logging("warn");
            demo::run(args).await
        }
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the per-command default.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour codes only for a terminal: in a log file or journal they are noise for whoever
    // reads it (tracing-subscriber colours by default).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Every variable any module reads, each once: the engine's list, then each module's own.
fn env_vars() -> Vec<&'static EnvVar> {
    let mut seen = std::collections::HashSet::new();
    keyvex_engine::config::ENV_VARS
        .iter()
        .chain(keyvex_engine::queue::ENV_VARS)
        .filter(|v| seen.insert(v.name))
        .collect()
}

fn env_help() -> String {
    let vars = env_vars();
    let width = vars.iter().map(|v| v.name.len()).max().unwrap_or(0);
    let mut help = String::from("Environment variables:\n");
    for v in vars {
        help.push_str(&format!("  {:width$}  {}\n", v.name, v.purpose));
    }
    help
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans the engine's sources for variables read by a literal name (`Env::var`, `env::var`)
    /// and checks each is in `keyvex --help`, so a new variable cannot go undocumented.
    #[test]
    fn help_lists_every_variable_read_anywhere_exactly_once() {
        let listed: Vec<&str> = env_vars().iter().map(|v| v.name).collect();
        let mut unique = listed.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), listed.len(), "a variable is listed twice");

        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut read = std::collections::BTreeSet::new();
        let mut dirs = vec![src];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for pat in ["var(\"", "var_os(\""] {
                        for (i, _) in text.match_indices(pat) {
                            let rest = &text[i + pat.len()..];
                            let name: String = rest
                                .chars()
                                .take_while(|c| {
                                    c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_'
                                })
                                .collect();
                            if !name.is_empty() && rest[name.len()..].starts_with('"') {
                                read.insert(name);
                            }
                        }
                    }
                }
            }
        }
        assert!(read.contains("SQS_AI_PROCESSING_QUEUE_URL"), "{read:?}");
        let missing: Vec<_> = read
            .iter()
            .filter(|n| !listed.contains(&n.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "read but not in keyvex --help: {missing:?}"
        );
        let help = env_help();
        assert!(help.contains("KEYVEX_WORKER_CONCURRENCY"), "{help}");
    }
}
