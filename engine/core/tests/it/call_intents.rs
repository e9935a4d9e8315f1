//! Call intents over HTTP against the simulator: every call that goes out hands the recorder an
//! intent first — the `interrupted` record a process stopping now would leave, with the id the
//! call's own record then has — and a call its request went on from is recorded `retried` as
//! soon as the next call starts, so at no moment is a call that reached a model neither recorded
//! nor open as an intent, and no call ever has two records.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keyvex_engine::catalog::Catalog;
use keyvex_engine::provider::ChatMessage;
use keyvex_engine::record::RequestStatus;
use keyvex_engine::{
    CallContext, CallEvent, CallTarget, Engine, Process, RouteOptions, RouteRequest,
};
use keyvex_sim::{Fault, Rule, SimHandle};
use keyvex_testkit::{MemoryRecorder, fast_sim, sim_engine};

fn request(text: &str) -> RouteRequest {
    RouteRequest {
        system: Some("You are terse.".into()),
        messages: vec![ChatMessage::user(text)],
        max_output_tokens: Some(64),
        ..RouteRequest::default()
    }
}

fn engine(sim: &SimHandle, recorder: &Arc<MemoryRecorder>) -> Engine {
    sim_engine(sim).recorder(recorder.clone()).build().unwrap()
}

fn job_ctx() -> CallContext {
    CallContext::new("alice")
        .with_correlation("job-9")
        .with_run("job-9")
        .with_session(Some("s-9".into()))
        .with_stage(Process::MagicSpark)
}

/// Every call that reached the simulator is, right now, either recorded or open as an intent,
/// never both, and no id is recorded twice.
fn assert_each_call_accounted_once(sim: &SimHandle, recorder: &MemoryRecorder) {
    let records = recorder.records();
    let open = recorder.open_intents();
    let mut ids: Vec<&str> = records
        .iter()
        .map(|r| r.request_id.as_str())
        .chain(open.iter().map(|i| i.record.request_id.as_str()))
        .collect();
    let accounted = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        accounted,
        "an id recorded twice: {records:?} {open:?}"
    );
    assert_eq!(
        accounted as u64,
        sim.stats().requests_total,
        "every call served is recorded or open: {records:?} {open:?}"
    );
}

#[tokio::test]
async fn a_call_hands_its_intent_over_before_it_goes_out_and_its_record_ends_it() {
    let sim = fast_sim(71).await;
    // Slow enough that the test sees the call mid-stream.
    sim.push_rule(Rule::always(Fault::Latency {
        ttft: Duration::from_millis(20),
        tokens_per_sec: 200.0,
    }));
    let recorder = MemoryRecorder::new();
    let engine = engine(&sim, &recorder);
    let catalog = Catalog::embedded().unwrap();
    let route = catalog.route(Process::MagicSpark);
    let primary = catalog.model(&route.primary).unwrap();

    let mut call = engine
        .chat(
            &job_ctx(),
            &CallTarget::Process(Process::MagicSpark),
            request("Name three bakery loyalty ideas."),
            RouteOptions::default(),
        )
        .unwrap();
    // Mid-stream: the call reached the model, and only its intent stands for it.
    loop {
        match call.next().await.unwrap() {
            CallEvent::Delta(_) => break,
            CallEvent::Finished { .. } | CallEvent::Failed { .. } => panic!("ended too soon"),
            _ => {}
        }
    }
    assert!(recorder.records().is_empty());
    let [intent] = recorder
        .open_intents()
        .try_into()
        .unwrap_or_else(|open: Vec<_>| panic!("one open intent for one call in flight: {open:?}"));
    assert_each_call_accounted_once(&sim, &recorder);
    let rec = &intent.record;
    assert_eq!(rec.status, RequestStatus::Interrupted);
    assert!(!rec.success);
    assert_eq!(rec.error_kind.as_deref(), Some("interrupted"));
    assert_eq!(
        (
            rec.user_id.as_str(),
            rec.process.as_str(),
            rec.stage.as_deref()
        ),
        ("alice", "magicSpark", Some("magicSpark"))
    );
    assert_eq!(
        (
            rec.run_id.as_deref(),
            rec.correlation_id.as_deref(),
            rec.session_id.as_deref()
        ),
        (Some("job-9"), Some("job-9"), Some("s-9"))
    );
    assert_eq!(
        (rec.provider.as_str(), rec.model.as_str()),
        (primary.provider.as_str(), primary.id.as_str())
    );
    assert_eq!(rec.catalog_version, 0);
    assert_eq!((rec.attempt, rec.attempts), (1, 1));
    // The prompt is billed as estimated from its length; the output is unknown, so none.
    let prompt = keyvex_engine::tokenize::estimate_prompt_tokens(
        Some("You are terse."),
        &[ChatMessage::user("Name three bakery loyalty ideas.")],
    );
    assert_eq!((rec.input_tokens, rec.output_tokens), (prompt, 0));
    assert_eq!(
        rec.cost(),
        keyvex_engine::cost::cost(
            &keyvex_engine::Usage {
                input: prompt,
                ..Default::default()
            },
            &primary.pricing
        )
    );
    assert!(rec.cost_pico_usd > 0 && rec.cost_estimated);
    let now = keyvex_engine::clock::now_ms();
    assert!(
        rec.timestamp_ms <= now && now - rec.timestamp_ms < 10_000,
        "{rec:?}"
    );
    assert!(intent.call_started_ms >= rec.timestamp_ms);

    let mut ended = None;
    while let Some(event) = call.next().await {
        if let CallEvent::Finished { record, .. } = event {
            ended = Some(record.id);
        }
    }
    let records = recorder.records();
    let [done] = records.as_slice() else {
        panic!("one record: {records:?}");
    };
    assert_eq!(done.status, RequestStatus::Succeeded);
    assert_eq!(Some(&done.request_id), ended.as_ref());
    assert_eq!(
        done.request_id, rec.request_id,
        "the record ends its intent"
    );
    assert_eq!(done.timestamp_ms, rec.timestamp_ms, "dated like its intent");
    assert!(recorder.open_intents().is_empty());
    assert_each_call_accounted_once(&sim, &recorder);

    // A call dropped mid-stream ends its intent with its `cancelled` record.
    let mut call = engine
        .chat(
            &job_ctx(),
            &CallTarget::Process(Process::MagicSpark),
            request("Once more."),
            RouteOptions::default(),
        )
        .unwrap();
    while !matches!(call.next().await.unwrap(), CallEvent::Delta(_)) {}
    assert_eq!(recorder.open_intents().len(), 1);
    drop(call);
    let records = recorder.wait_for_records(2, Duration::from_secs(5)).await;
    assert_eq!(records[1].status, RequestStatus::Cancelled);
    assert!(recorder.open_intents().is_empty());
    assert_each_call_accounted_once(&sim, &recorder);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_call_its_request_went_on_from_is_recorded_as_the_next_one_starts() {
    let sim = fast_sim(72).await;
    let catalog = Catalog::embedded().unwrap();
    let route = catalog.route(Process::MagicSpark);
    // The primary is overloaded once (before any stream): the router falls back at once.
    sim.push_rule(Rule {
        model: Some(route.primary.clone()),
        ..Rule::times(
            Fault::Http {
                status: 529,
                retry_after: None,
            },
            1,
        )
    });
    let recorder = MemoryRecorder::new();
    let engine = engine(&sim, &recorder);
    let mut call = engine
        .chat(
            &job_ctx(),
            &CallTarget::Process(Process::MagicSpark),
            request("Name three bakery loyalty ideas."),
            RouteOptions::default(),
        )
        .unwrap();
    let mut checked_at_start = false;
    while let Some(event) = call.next().await {
        match event {
            CallEvent::Start { model, .. } if model == route.fallback => {
                // The fallback is on the wire: the failed primary call is recorded already
                // (a process stopping now leaves it `retried`, not `interrupted`).
                let records = recorder.records();
                let [retried] = records.as_slice() else {
                    panic!("the retried call is recorded before the route ends: {records:?}");
                };
                assert_eq!(retried.status, RequestStatus::Retried);
                assert_eq!(retried.model, route.primary);
                assert_eq!((retried.attempt, retried.attempts), (1, 1));
                let open = recorder.open_intents();
                let [fallback] = open.as_slice() else {
                    panic!("only the fallback is open: {open:?}");
                };
                assert_eq!(fallback.record.model, route.fallback);
                assert_eq!(fallback.record.attempt, 2);
                assert!(fallback.record.fallback_used);
                assert_each_call_accounted_once(&sim, &recorder);
                checked_at_start = true;
            }
            CallEvent::Failed { failure, .. } => panic!("{}", failure.error),
            _ => {}
        }
    }
    assert!(checked_at_start, "the fallback's stream opened");
    let intents = recorder.intents();
    // Start of the primary, its update once it failed, start of the fallback.
    assert_eq!(intents.len(), 3, "{intents:?}");
    let (first, update) = (&intents[0].record, &intents[1].record);
    assert_eq!(first.request_id, update.request_id);
    assert_eq!(update.status, RequestStatus::Interrupted);
    assert_eq!(
        (update.cost_pico_usd, update.cost_estimated),
        (0, false),
        "a call refused before its stream opened cost nothing, exactly"
    );
    assert!(
        update.error.as_deref().unwrap().contains("overloaded"),
        "{update:?}"
    );
    let records = recorder.records();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0].request_id, first.request_id);
    assert_eq!(records[1].request_id, intents[2].record.request_id);
    assert_eq!(
        (records[1].status, records[1].attempt, records[1].attempts),
        (RequestStatus::Succeeded, 2, 2)
    );
    assert!(recorder.open_intents().is_empty());
    assert_each_call_accounted_once(&sim, &recorder);
    sim.shutdown().await;
}
