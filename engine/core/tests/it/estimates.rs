//! The output estimator, used where a provider never reported usage (a cut or cancelled stream),
//! against the tokenizer counts the simulator reports, over HTTP: prose and each agent's JSON.

use std::time::Duration;

use futures::StreamExt;
use keyvex_engine::provider::openai::OpenAiProvider;
use keyvex_engine::provider::{
    ApiKey, ChatMessage, ChatRequest, Provider, ProviderConfig, ResponseSchema,
};
use keyvex_engine::stream::ProviderEvent;
use keyvex_engine::tokenize::TokenEstimator;
use keyvex_testkit::fast_sim;

/// Within this fraction of the real count on every answer.
const TOLERANCE: f64 = 0.15;

#[tokio::test]
async fn the_output_estimate_is_within_15_percent_on_the_simulators_answers() {
    let sim = fast_sim(70).await;
    let provider = OpenAiProvider::new(&ProviderConfig {
        connect_timeout: Duration::from_secs(2),
        ..ProviderConfig::new(sim.base_url(), ApiKey::new("k"))
    })
    .unwrap();
    let schemas: Vec<Option<ResponseSchema>> = std::iter::once(None)
        .chain(agents::Process::ALL.into_iter().map(|p| {
            Some(ResponseSchema {
                name: agents::output::schema_name(p).to_owned(),
                schema: serde_json::json!({"type": "object"}),
            })
        }))
        .collect();
    let mut report = Vec::new();
    for schema in schemas {
        let label = schema
            .as_ref()
            .map_or("prose", |s| s.name.as_str())
            .to_owned();
        let (mut worst, mut sum) = (0.0_f64, 0.0_f64);
        let n = 25;
        for i in 0..n {
            let request = ChatRequest {
                model: "gpt-5.4-mini".into(),
                system: None,
                messages: vec![ChatMessage::user(format!(
                    "Business {i}: a bakery in Lyon that sells sourdough to cafés."
                ))],
                max_output_tokens: 4000,
                temperature: None,
                response_schema: schema.clone(),
            };
            let mut estimator = TokenEstimator::new();
            let mut reported = None;
            let mut events = provider.stream(request);
            while let Some(event) = events.next().await {
                match event {
                    ProviderEvent::Delta(text) => estimator.feed(&text),
                    ProviderEvent::Usage(usage) => reported = Some(usage.output),
                    ProviderEvent::Error(e) => panic!("{label}: {e}"),
                    _ => {}
                }
            }
            let real = reported.expect("the simulator reports usage") as f64;
            let error = (estimator.total() as f64 - real) / real;
            worst = worst.max(error.abs());
            sum += error;
        }
        report.push(format!(
            "{label}: mean {:+.1}%, worst {:.1}%",
            100.0 * sum / f64::from(n),
            100.0 * worst
        ));
        assert!(worst <= TOLERANCE, "{}", report.join("; "));
    }
    // Shown with --nocapture; quoted in docs/PERFORMANCE.md.
    println!("output estimator vs reported usage: {}", report.join("; "));
    sim.shutdown().await;
}
