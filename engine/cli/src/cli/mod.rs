//! Command-line parsing and dispatch. Each command lives in its own file.

mod agent;
mod complete;
mod demo;
mod models;
mod oneshot;
mod pipeline;
mod queue;
mod serve;
mod signal;
mod table;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keyvex_sim as sim;

/// Keyvex engine: runs the four Keyvex agents as streaming pipelines over OpenAI and Anthropic,
/// with fallback, exact cost accounting and durable metrics.
#[derive(Debug, Parser)]
#[command(name = "keyvex", version, after_help = keyvex::config::help())]
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
    /// Create the DynamoDB table (keys, both GSIs, TTL), or show how it stands.
    Table(table::TableArgs),
    /// Fill the metrics store with deterministic sample traffic for the admin dashboard.
    DemoTraffic(demo::DemoArgs),
    /// Model catalog versions in the store: publish, list, show, diff, activate, rollback.
    Models(models::ModelsArgs),
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
        Command::Table(args) => {
            init_logging("warn");
            table::run(args).await
        }
        Command::DemoTraffic(args) => {
            init_logging("warn");
            demo::run(args).await
        }
        Command::Models(args) => {
            init_logging("warn");
            models::run(args).await
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

#[cfg(test)]
mod tests {
    use keyvex::config::SETTINGS;

    /// Configuration is read in one place: no source file of the engine's crates reads an
    /// environment variable except the binary's `config.rs`, and every variable read by name
    /// there is in the settings table `keyvex --help` prints.
    #[test]
    fn the_environment_is_read_in_config_rs_only_and_every_variable_is_listed() {
        let engine = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut dirs = vec![engine];
        let mut offenders = Vec::new();
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if path.is_dir() {
                    // Tests, examples and the test kit may set up their own environment.
                    if !matches!(name.as_str(), "tests" | "examples" | "target" | "testkit") {
                        dirs.push(path);
                    }
                } else if name.ends_with(".rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    // Spelled in pieces so this file does not match itself.
                    let reads = ["var(", "var_os(", "vars("]
                        .map(|f| format!("env::{f}"))
                        .into_iter()
                        .chain([format!("env = {}", '"')]);
                    let reads_env = reads.into_iter().any(|r| text.contains(&r));
                    if reads_env && !path.ends_with("src/config.rs") {
                        offenders.push(path.display().to_string());
                    }
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "environment read outside engine/cli/src/config.rs: {offenders:?}"
        );
        // Every declared setting is in the table `keyvex --help` prints.
        let config = include_str!("../config.rs");
        assert_eq!(
            config.matches(": Setting = ").count(),
            SETTINGS.len(),
            "a setting is declared in config.rs but missing from SETTINGS"
        );
    }
}
