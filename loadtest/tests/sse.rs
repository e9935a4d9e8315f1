//! The SSE parser on streams split at every possible byte, and the observer's reading of the
//! engine's agent and chat streams.

use std::time::{Duration, Instant};

use keyvex_engine::catalog::Catalog;
use loadtest::sse::{Protocol, SseEvent, SseParser, StreamObserver};

const AGENT_STREAM: &str = "event: start\r\ndata: {\"requestId\":\"r1\",\"stage\":\"magicSpark\",\"provider\":\"openai\",\"model\":\"gpt\",\"attempt\":1}\r\n\r\n\
: keep-alive\r\n\r\n\
event: delta\r\ndata: {\"stage\":\"magicSpark\",\"text\":\"Hel\"}\r\n\r\n\
event: delta\ndata: {\"stage\":\"magicSpark\",\"text\":\"lo\"}\n\n\
event: usage\rdata: {\"stage\":\"magicSpark\",\"tokens\":{\"input\":40,\"cachedInput\":0,\"cacheWrite\":0,\"output\":2},\"costMicroUsd\":90,\"estimated\":false}\r\r\
event: done\r\ndata: {\"requestId\":\"r1\",\"stage\":\"magicSpark\",\"status\":\"succeeded\",\"totals\":{\"calls\":1,\"tokens\":{\"input\":40,\"cachedInput\":0,\"cacheWrite\":0,\"output\":2},\"costMicroUsd\":90,\"estimated\":false,\"fallbackUsed\":false}}\r\n\r\n";

fn parse_in_pieces(text: &[u8], cuts: &[usize]) -> Vec<SseEvent> {
    let mut p = SseParser::new();
    let mut out = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&text.len())) {
        out.extend(p.push(&text[from..cut]));
        from = cut;
    }
    out.extend(p.finish());
    out
}

#[test]
fn every_split_point_gives_the_same_events() {
    let bytes = AGENT_STREAM.as_bytes();
    let whole = parse_in_pieces(bytes, &[]);
    let names: Vec<_> = whole
        .iter()
        .map(|e| e.event.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(names, ["start", "delta", "delta", "usage", "done"]);
    assert_eq!(whole[1].data, "{\"stage\":\"magicSpark\",\"text\":\"Hel\"}");
    for a in 1..bytes.len() {
        assert_eq!(parse_in_pieces(bytes, &[a]), whole, "split at {a}");
    }
    // Byte by byte: every CR/LF pair is split, every line is partial across chunks.
    let all: Vec<usize> = (1..bytes.len()).collect();
    assert_eq!(parse_in_pieces(bytes, &all), whole);
}

#[test]
fn multi_line_data_is_joined_and_comments_are_skipped() {
    let events = parse_in_pieces(b": hi\ndata: a\ndata:b\n\ndata: [DONE]\n\n", &[7, 13]);
    assert_eq!(
        events,
        vec![
            SseEvent {
                event: None,
                data: "a\nb".into()
            },
            SseEvent {
                event: None,
                data: "[DONE]".into()
            },
        ]
    );
}

#[test]
fn a_final_event_without_its_blank_line_is_kept() {
    let events = parse_in_pieces(b"data: last", &[3]);
    assert_eq!(
        events,
        vec![SseEvent {
            event: None,
            data: "last".into()
        }]
    );
}

#[test]
fn the_observer_reads_timing_tokens_and_cost_of_an_agent_stream() {
    let t0 = Instant::now();
    let mut obs = StreamObserver::new(Protocol::Agent, t0);
    let events = parse_in_pieces(AGENT_STREAM.as_bytes(), &[]);
    for (i, e) in events.iter().enumerate() {
        obs.observe(e, t0 + Duration::from_millis(100 * (i as u64 + 1)));
    }
    let out = obs.finish(t0 + Duration::from_millis(600));
    assert_eq!(out.first_event, Some(Duration::from_millis(100)));
    assert_eq!(out.ttft, Some(Duration::from_millis(200)));
    assert_eq!(out.stall, Some(Duration::from_millis(100)));
    assert_eq!(out.end_to_end, Duration::from_millis(600));
    assert_eq!((out.tokens.input, out.tokens.output), (40, 2));
    assert_eq!(out.cost_micro_usd, 90);
    assert!(out.succeeded);
    // (600 − 200) / (2 − 1)
    assert_eq!(
        out.time_per_output_token(),
        Some(Duration::from_millis(400))
    );
}

#[test]
fn a_stream_cut_before_done_fails_and_an_error_event_is_counted() {
    let t0 = Instant::now();
    let mut obs = StreamObserver::new(Protocol::Agent, t0);
    for e in parse_in_pieces(
        b"event: fallback\ndata: {\"stage\":\"magicSpark\",\"from\":\"a\",\"to\":\"b\",\"reason\":\"429\"}\n\nevent: error\ndata: {\"stage\":\"magicSpark\",\"kind\":\"stream_cut\",\"message\":\"x\"}\n\n",
        &[],
    ) {
        obs.observe(&e, t0);
    }
    let out = obs.finish(t0);
    assert!(!out.succeeded);
    assert_eq!((out.fallbacks, out.stream_errors), (1, 1));
    assert_eq!(out.failure.as_deref(), Some("stream error: stream_cut"));
}

#[test]
fn a_restart_and_a_resumed_chat_answer_count_as_one_rescue_each() {
    let t0 = Instant::now();
    let mut obs = StreamObserver::new(Protocol::Agent, t0);
    for e in parse_in_pieces(
        b"event: delta\ndata: {\"stage\":\"magicSpark\",\"text\":\"{\\\"a\"}\n\nevent: restart\ndata: {\"stage\":\"magicSpark\",\"from\":\"a\",\"to\":\"b\",\"reason\":\"cut\",\"discardedBytes\":3}\n\nevent: done\ndata: {\"status\":\"succeeded\",\"totals\":{}}\n\n",
        &[7],
    ) {
        obs.observe(&e, t0);
    }
    let out = obs.finish(t0);
    assert!(out.succeeded);
    assert_eq!((out.rescues, out.stream_errors), (1, 0));

    let mut obs = StreamObserver::new(Protocol::Chat, t0);
    let resumed = r#"{"resumed":[{"from":"m","to":"m"}]}"#;
    let body = format!(
        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"Hi\"}}}}],\"usage\":null}}\n\n\
         data: {{\"choices\":[{{\"delta\":{{}},\"finish_reason\":\"stop\"}}],\"usage\":null,\"keyvex\":{resumed}}}\n\n\
         data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}},\"keyvex\":{resumed}}}\n\n\
         data: [DONE]\n\n"
    );
    for e in parse_in_pieces(body.as_bytes(), &[]) {
        obs.observe(&e, t0);
    }
    let out = obs.finish(t0);
    assert!(out.succeeded);
    assert_eq!(out.rescues, 1, "the seams are listed twice, counted once");
}

#[test]
fn chat_streams_are_priced_from_the_catalog_and_a_fallback_model_is_counted() {
    let catalog = Catalog::embedded().unwrap();
    let route = catalog.route(agents::Process::MagicSpark);
    let fallback = route.fallback.clone();
    let t0 = Instant::now();
    let mut obs = StreamObserver::new(Protocol::Chat, t0).with_catalog(&catalog, "magicSpark");
    let body = format!(
        "data: {{\"choices\":[{{\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}}}}],\"usage\":null}}\n\n\
         data: {{\"choices\":[{{\"delta\":{{\"content\":\"Hi\"}}}}],\"usage\":null}}\n\n\
         data: {{\"model\":\"{fallback}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":1000000,\"completion_tokens\":0,\"total_tokens\":1000000}}}}\n\n\
         data: [DONE]\n\n"
    );
    for (i, e) in parse_in_pieces(body.as_bytes(), &[5, 50])
        .iter()
        .enumerate()
    {
        obs.observe(e, t0 + Duration::from_millis(10 * i as u64));
    }
    let out = obs.finish(t0 + Duration::from_millis(50));
    assert!(out.succeeded);
    assert_eq!(out.ttft, Some(Duration::from_millis(10)));
    assert_eq!(out.fallbacks, 1);
    // One million input tokens cost exactly the model's input price per million.
    let price = catalog
        .model(&fallback)
        .unwrap()
        .pricing
        .input
        .usd_per_mtok();
    assert_eq!(out.cost_micro_usd, (price * 1e6).round() as u64);
}
