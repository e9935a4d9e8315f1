//! `keyvex complete`: one routed completion, streamed to the terminal, then its cost line.

use std::io::Write;
use std::process::ExitCode;

use agents::Process;
use anyhow::Context;
use futures::StreamExt;
use keyvex_engine::config::{EngineConfig, ProcessEnv};
use keyvex_engine::provider::ChatMessage;
use keyvex_engine::router::{RouteEvent, RouteOutcome, RouteRequest, RouterConfig};
use keyvex_engine::runtime::Runtime;

use super::record::CliMetrics;

#[derive(Debug, clap::Args)]
pub struct CompleteArgs {
    /// Process whose primary/fallback models serve the request (magicSpark, logicArchitect,
    /// contentCrafter, styleMaster, or the kebab-case names).
    #[arg(long, short)]
    process: Process,
    /// Optional system instructions.
    #[arg(long)]
    system: Option<String>,
    /// Cap on generated tokens (default: the process's setting in the catalog).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// The prompt.
    prompt: String,
}

pub async fn run(args: CompleteArgs) -> anyhow::Result<ExitCode> {
    let config = EngineConfig::from_env(&ProcessEnv).context("reading configuration")?;
    let mut metrics = CliMetrics::start().await?;
    let runtime = Runtime::start(&config, RouterConfig::default()).await?;
    eprintln!("keyvex: providers {}", runtime.providers_description);

    let request = RouteRequest {
        system: args.system,
        messages: vec![ChatMessage::user(args.prompt)],
        response_schema: None,
        max_output_tokens: args.max_tokens,
        temperature: None,
    };
    let mut stream = runtime.router.stream_process(args.process, request);
    let mut stdout = std::io::stdout();
    let mut code = ExitCode::SUCCESS;
    while let Some(event) = stream.next().await {
        match event {
            RouteEvent::Start {
                provider,
                model,
                attempt,
            } => {
                eprintln!("keyvex: attempt {attempt}: {provider} {model}");
            }
            RouteEvent::Fallback { from, to, reason } => {
                eprintln!("keyvex: falling back from {from} to {to}: {reason}");
            }
            RouteEvent::Delta(text) => {
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            RouteEvent::Finished(outcome) => {
                writeln!(stdout)?;
                eprintln!("{}", summary(&outcome));
                metrics.record(&outcome, Some(args.process), None);
            }
            RouteEvent::Failed(failure) => {
                writeln!(stdout)?;
                metrics.record(&failure.outcome, Some(args.process), None);
                eprintln!("keyvex: request failed: {}", failure.error);
                eprintln!("{}", summary(&failure.outcome));
                code = ExitCode::FAILURE;
            }
        }
    }
    drop(stream);
    runtime.shutdown().await;
    eprintln!("{}", metrics.finish().await);
    Ok(code)
}

/// The two lines printed after every completion.
fn summary(o: &RouteOutcome) -> String {
    let ms = |d: Option<std::time::Duration>| {
        d.map_or_else(|| "-".to_owned(), |d| format!("{} ms", d.as_millis()))
    };
    format!(
        "provider: {}  model: {}  fallback: {}  attempts: {}\nttft: {}  latency: {} ms  tokens: in {} (cached {}, cache write {}) / out {}  cost: {}{}",
        o.provider.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        o.model.as_deref().unwrap_or("-"),
        if o.fallback_used { "yes" } else { "no" },
        o.attempts.len(),
        ms(o.ttft),
        o.latency.as_millis(),
        o.usage.input,
        o.usage.cached_input,
        o.usage.cache_write,
        o.usage.output,
        o.cost,
        if o.cost_estimated { " (estimated)" } else { "" },
    )
}
