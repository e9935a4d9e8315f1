//! Writes the SSE captures the benches replay (`benches/gate/fixtures/*.sse`): one Content Crafter
//! answer per wire protocol, streamed by the in-process simulator for the real rendered prompt.
//!
//! Run `cargo run -p benches --bin capture` after changing the simulator's wire format; the
//! content is deterministic (fixed seed); only the ids and timestamps differ between captures.

use std::net::SocketAddr;
use std::path::PathBuf;

use agents::Process;
use anyhow::Context as _;
use bench_gate::fixtures::{ANTHROPIC_FILE, FIXTURE_PROCESS, FIXTURE_SEED, OPENAI_FILE};
use keyvex_engine::catalog::Catalog;
use keyvex_engine::stream::ProviderKind;
use keyvex_sim::{self as sim, SimConfig};
use serde_json::{Value, json};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/gate/fixtures")));
    let addr: SocketAddr = "127.0.0.1:0".parse()?;
    let sim = sim::start(addr, SimConfig::fast(FIXTURE_SEED)).await?;
    let base = sim.base_url();
    let process = FIXTURE_PROCESS;
    let prompt = agents::render(
        process,
        &agents::samples::sample_input(process, FIXTURE_SEED),
    )?;
    let catalog = Catalog::embedded()?;
    let http = reqwest::Client::new();

    let openai_body = json!({
        "model": model_for(&catalog, process, ProviderKind::OpenAi)?,
        "messages": [
            {"role": "system", "content": prompt.system},
            {"role": "user", "content": prompt.user},
        ],
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_completion_tokens": catalog.route(process).max_output_tokens,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": agents::schema_name(process),
            "strict": true,
            "schema": agents::output_schema(process),
        }},
    });
    let openai = http
        .post(format!("{base}/chat/completions"))
        .bearer_auth("sk-capture")
        .json(&openai_body);
    write(&dir.join(OPENAI_FILE), openai).await?;

    let anthropic_body = json!({
        "model": model_for(&catalog, process, ProviderKind::Anthropic)?,
        "max_tokens": catalog.route(process).max_output_tokens,
        "stream": true,
        "system": prompt.system,
        "messages": [{"role": "user", "content": prompt.user}],
        "tools": [{
            "name": agents::schema_name(process),
            "description": "Give the answer as JSON matching this schema.",
            "input_schema": agents::output_schema(process),
        }],
        "tool_choice": {"type": "tool", "name": agents::schema_name(process)},
    });
    let anthropic = http
        .post(format!("{base}/messages"))
        .header("x-api-key", "sk-ant-capture")
        .header("anthropic-version", "2023-06-01")
        .json(&anthropic_body);
    write(&dir.join(ANTHROPIC_FILE), anthropic).await?;

    sim.shutdown().await;
    Ok(())
}

/// The process's model on `kind` (primary or fallback), so captures name real catalog models.
fn model_for(catalog: &Catalog, process: Process, kind: ProviderKind) -> anyhow::Result<Value> {
    let route = catalog.route(process);
    [&route.primary, &route.fallback]
        .into_iter()
        .find(|id| catalog.model(id).is_some_and(|m| m.provider == kind))
        .map(|id| Value::from(id.as_str()))
        .with_context(|| format!("{process} has no {kind} model in the catalog"))
}

async fn write(path: &std::path::Path, request: reqwest::RequestBuilder) -> anyhow::Result<()> {
    let response = request.send().await?.error_for_status()?;
    let body = response.bytes().await?;
    std::fs::write(path, &body).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {} ({} bytes)", path.display(), body.len());
    Ok(())
}
