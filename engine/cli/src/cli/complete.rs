//! `keyvex complete`: one routed completion, streamed to the terminal, then its cost line.

use std::io::Write;
use std::process::ExitCode;

use futures::StreamExt;
use keyvex_engine::provider::ChatMessage;
use keyvex_engine::router::{CallTarget, RouteOptions, RouteOutcome, RouteRequest};
use keyvex_engine::{CallEvent, Process};

use super::oneshot;
use super::signal::{INTERRUPTED, stop_signal};

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
    let stop = stop_signal()?;
    let app = oneshot::start().await?;
    let request = RouteRequest {
        system: args.system,
        messages: vec![ChatMessage::user(args.prompt)],
        response_schema: None,
        max_output_tokens: args.max_tokens,
        temperature: None,
    };
    let call = app.engine.chat(
        &oneshot::context(),
        &CallTarget::Process(args.process),
        request,
        RouteOptions {
            keep_text: false,
            continue_only: true,
        },
    );
    let code = match call {
        Ok(call) => {
            tokio::select! {
                code = relay(call) => code?,
                () = stop => {
                    // Dropping the call cancels it; the engine records it as cancelled.
                    eprintln!("\nkeyvex: interrupted; the call so far is recorded as cancelled");
                    ExitCode::from(INTERRUPTED)
                }
            }
        }
        Err(error) => {
            eprintln!("keyvex: request refused: {error}");
            ExitCode::FAILURE
        }
    };
    eprintln!("{}", oneshot::finish(&app).await);
    Ok(code)
}

/// Streams the answer to stdout and the call's story to stderr.
async fn relay(mut call: keyvex_engine::CallStream) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout();
    let mut code = ExitCode::SUCCESS;
    while let Some(event) = call.next().await {
        match event {
            CallEvent::Start {
                provider,
                model,
                attempt,
            } => {
                eprintln!("keyvex: attempt {attempt}: {provider} {model}");
            }
            CallEvent::Fallback { from, to, reason } => {
                eprintln!("keyvex: falling back from {from} to {to}: {reason}");
            }
            CallEvent::Rescue(rescue) => {
                eprintln!(
                    "\nkeyvex: the stream of {} broke after {} bytes ({}); {} {} it",
                    rescue.from,
                    rescue.delivered_bytes,
                    rescue.reason,
                    rescue.to,
                    match rescue.mode {
                        keyvex_engine::catalog::MidStreamFailover::Restart => "restarts",
                        _ => "continues",
                    }
                );
            }
            CallEvent::Delta(text) => {
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            CallEvent::Finished { outcome, .. } => {
                writeln!(stdout)?;
                eprintln!("{}", summary(&outcome));
            }
            CallEvent::Failed { failure, .. } => {
                writeln!(stdout)?;
                eprintln!("keyvex: request failed: {}", failure.error);
                eprintln!("{}", summary(&failure.outcome));
                code = ExitCode::FAILURE;
            }
        }
    }
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
