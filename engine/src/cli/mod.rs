//! Command-line parsing and dispatch. Each command lives in its own file.

mod agent;
mod complete;
mod pipeline;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keyvex_engine::config::ENV_VARS;
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
    /// health and Prometheus metrics). The default when no command is given.
    Serve(serve::ServeArgs),
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
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the per-command default.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn env_help() -> String {
    let width = ENV_VARS.iter().map(|v| v.name.len()).max().unwrap_or(0);
    let mut help = String::from("Environment variables:\n");
    for v in ENV_VARS {
        help.push_str(&format!("  {:width$}  {}\n", v.name, v.purpose));
    }
    help
}
