//! The whole tool pipeline offline, embedded: the provider simulator on loopback, an engine
//! with a metrics sink of our own, then the tool definition and what it cost.
//! Run it with `cargo run -p keyvex-engine --example pipeline`.
#![expect(clippy::print_stdout, reason = "an example prints its result")]

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keyvex_engine::{CallContext, Engine, PipelineEvent, PipelineInput};
use keyvex_engine::{Receipt, Recorder, RequestRecord, SessionMessage};

/// A metrics sink of our own: one line per model call, durable at once.
struct PrintRecords;

impl Recorder for PrintRecords {
    fn record(&self, r: RequestRecord) -> Receipt {
        let stage = r.stage.as_deref().unwrap_or("-");
        let (tokens_in, tokens_out, usd) = (r.input_tokens, r.output_tokens, r.cost().usd());
        println!(
            "call  {stage:15} {:18} {tokens_in:>5} in {tokens_out:>5} out  ${usd:.6}",
            r.model
        );
        Receipt::durable_now()
    }

    fn record_message(&self, _message: SessionMessage) -> Receipt {
        Receipt::durable_now()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sim =
        keyvex_sim::start(([127, 0, 0, 1], 0).into(), keyvex_sim::SimConfig::fast(42)).await?;
    let engine = Engine::builder()
        .simulator(sim)
        .recorder(Arc::new(PrintRecords))
        .build()?;
    let business = serde_json::json!({
        "businessDescription": "Boutique accounting firm for freelancers",
        "targetAudience": "freelance designers and developers",
        "industry": "accounting",
    });
    let input = PipelineInput {
        business,
        concept_index: None,
        brand: None,
    };
    let mut run = engine.pipeline(CallContext::new("example"), input);
    while let Some(event) = run.next().await {
        match event {
            PipelineEvent::Done { tool, rollup, .. } => {
                println!("{}", serde_json::to_string_pretty(&tool)?);
                println!(
                    "total ${:.6} for {} tokens",
                    rollup.cost_usd,
                    rollup.usage.total()
                );
            }
            PipelineEvent::Failed { error, .. } => return Err(error.into()),
            _ => {}
        }
    }
    engine.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
