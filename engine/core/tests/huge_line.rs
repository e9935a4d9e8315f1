//! A hostile upstream that sends one line of 1 GiB with no line end, on both wires: the
//! provider refuses it at its event cap, the process's memory stays bounded, and the answer
//! comes from the fallback (restarted there, once content flowed) long
//! before any deadline. Its own test binary, so the memory reading is this test's alone.

#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use keyvex_engine::catalog::Catalog;
use keyvex_engine::provider::ChatMessage;
use keyvex_engine::router::{CallTarget, RouteOptions, RouteRequest, RouterConfig};
use keyvex_engine::stream::ProviderKind;
use keyvex_engine::{CallContext, CallEvent};
use keyvex_sim::{Fault, Rule};
use keyvex_testkit::{MemoryRecorder, fast_sim, sim_engine};

const GIB: u64 = 1 << 30;

/// Resident set size of this process, in KiB (Linux).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_line_is_refused_at_the_cap_on_both_wires() {
    let catalog = Catalog::embedded().unwrap();
    let sim = fast_sim(60).await;
    let recorder = MemoryRecorder::new();
    let engine = sim_engine(&sim)
        .router(RouterConfig {
            ttft_timeout: Duration::from_secs(20),
            stall_timeout: Duration::from_secs(20),
            same_model_retries: 0,
            ..RouterConfig::default()
        })
        .recorder(recorder.clone())
        .build()
        .unwrap();
    let request = RouteRequest {
        messages: vec![ChatMessage::user("Describe a savings calculator.")],
        max_output_tokens: Some(120),
        ..RouteRequest::default()
    };
    let baseline = rss_kib();
    for kind in ProviderKind::ALL {
        let process = keyvex_testkit::process_with_primary(kind);
        let route = catalog.route(process).clone();
        // Before any content: the attempt fails at the cap and the fallback answers; after
        // content: the stream breaks at the cap and the fallback restarts the answer (the
        // processes' mid-stream policy).
        for (after_tokens, rescued) in [(0, false), (10, true)] {
            sim.push_rule(Rule {
                model: Some(route.primary.clone()),
                protocol: None,
                fault: Fault::HugeLine {
                    bytes: GIB,
                    tokens: after_tokens,
                },
                times: Some(1),
            });
            let started = Instant::now();
            let mut stream = engine
                .chat(
                    &CallContext::new("hostile"),
                    &CallTarget::Process(process),
                    request.clone(),
                    RouteOptions {
                        keep_text: false,
                        ..RouteOptions::default()
                    },
                )
                .unwrap();
            let mut ended = None;
            while let Some(event) = stream.next().await {
                match event {
                    CallEvent::Finished { outcome, .. } => ended = Some(Ok(outcome)),
                    CallEvent::Failed { failure, .. } => ended = Some(Err(failure)),
                    _ => {}
                }
            }
            let took = started.elapsed();
            let first_error = match ended.unwrap() {
                Ok(outcome) => {
                    assert_eq!(outcome.rescued(), rescued, "{kind}");
                    assert_eq!(outcome.model.as_deref(), Some(route.fallback.as_str()));
                    outcome.attempts[0].error.clone().unwrap().to_string()
                }
                Err(failure) => panic!("{kind}: the fallback answers: {}", failure.error),
            };
            assert!(
                first_error.contains("1048576-byte cap"),
                "{kind}: {first_error}"
            );
            assert!(took < Duration::from_secs(10), "{kind}: {took:?}");
            let grown_mib = rss_kib().saturating_sub(baseline) / 1024;
            assert!(
                grown_mib < 64,
                "{kind}: resident memory grew {grown_mib} MiB for a 1 GiB line"
            );
        }
    }
    sim.shutdown().await;
}
