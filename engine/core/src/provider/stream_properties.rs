//! Properties of the providers' body decoding that must hold however TCP cuts the bytes: a valid
//! stream re-framed with LF, CRLF or CR line endings and delivered in any pieces (inside a
//! multi-byte UTF-8 character, between the CR and LF of a line end, with empty pieces) decodes to
//! exactly what the whole LF stream decodes to; and no bytes at all make the framer hold more than
//! its cap or a decoder break the event contract.
//!
//! The streams are built in the shapes the simulator sends (and the captures in
//! `benches/gate/fixtures` show); the fuzz targets in `engine/fuzz` run the same checks much
//! longer.

use proptest::prelude::*;
use serde_json::json;

use crate::fuzz_support::{anthropic_events, check_sequence, frame, openai_events, split};
use crate::provider::DEFAULT_MAX_EVENT_BYTES;
use crate::stream::{FinishReason, ProviderEvent, Usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provider {
    OpenAi,
    Anthropic,
}

const ENDINGS: [&str; 3] = ["\n", "\r\n", "\r"];

/// Text with one- to four-byte UTF-8 characters, a combining sequence and characters JSON
/// escapes, cut into deltas at character boundaries as a model streams it.
const DELTAS: [&str; 10] = [
    "Bonjour, ",
    "café ",
    "é",
    "日本",
    "語のテキスト ",
    "🎉",
    "👍🏽 naïve",
    "\n\"quoted\" \\ tab\t",
    "𝄞 ✓ — ",
    "fin.",
];

/// The usage each built stream reports, in the engine's normalised form.
const USAGE: Usage = Usage {
    input: 2100,
    cached_input: 1024,
    cache_write: 64,
    output: 37,
};

/// An OpenAI Chat Completions body as the simulator streams it: a role chunk, one chunk per
/// delta, a keep-alive comment, the finish chunk, the usage chunk, `data: [DONE]`.
fn openai_body(deltas: &[&str], ending: &str) -> Vec<u8> {
    let chunk = |choices: serde_json::Value, usage: serde_json::Value| {
        json!({
            "id": "chatcmpl-prop",
            "object": "chat.completion.chunk",
            "created": 1_795_617_712,
            "model": "gpt-5.4-mini",
            "system_fingerprint": "fp_keyvexsim",
            "choices": choices,
            "usage": usage,
        })
        .to_string()
    };
    let choice = |delta: serde_json::Value, finish: serde_json::Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let mut events = vec![chunk(
        choice(
            json!({"role": "assistant", "content": "", "refusal": null}),
            json!(null),
        ),
        json!(null),
    )];
    for delta in deltas {
        events.push(chunk(
            choice(json!({"content": delta}), json!(null)),
            json!(null),
        ));
    }
    events.push(chunk(choice(json!({}), json!("stop")), json!(null)));
    events.push(chunk(
        json!([]),
        json!({
            "prompt_tokens": USAGE.input,
            "completion_tokens": USAGE.output,
            "total_tokens": USAGE.input + USAGE.output,
            "prompt_tokens_details": {
                "cached_tokens": USAGE.cached_input,
                "cache_write_tokens": USAGE.cache_write,
            },
        }),
    ));
    let mut text = String::new();
    for (i, data) in events.iter().enumerate() {
        if i == 2 {
            text.push_str(": keep-alive\n\n");
        }
        text.push_str(&format!("data: {data}\n\n"));
    }
    text.push_str("data: [DONE]\n\n");
    with_endings(&text, ending)
}

/// An Anthropic Messages body as the simulator streams it: `message_start` with the input usage,
/// a text block with a `ping` inside, `message_delta` with the stop reason and output usage,
/// `message_stop`.
fn anthropic_body(deltas: &[&str], ending: &str) -> Vec<u8> {
    let mut events = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {
                "id": "msg_prop", "type": "message", "role": "assistant",
                "model": "claude-sonnet-4-6", "content": [], "stop_reason": null,
                "stop_sequence": null,
                "usage": {
                    "input_tokens": USAGE.input - USAGE.cached_input - USAGE.cache_write,
                    "cache_read_input_tokens": USAGE.cached_input,
                    "cache_creation_input_tokens": USAGE.cache_write,
                    "output_tokens": 1,
                },
            }}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
    ];
    for delta in deltas {
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": delta}}),
        ));
    }
    events.extend([
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta",
                   "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                   "usage": {"output_tokens": USAGE.output}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]);
    let mut text = String::new();
    for (name, data) in events {
        text.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    }
    with_endings(&text, ending)
}

/// The JSON payloads escape every control character, so the only LFs are line ends.
fn with_endings(text: &str, ending: &str) -> Vec<u8> {
    text.replace('\n', ending).into_bytes()
}

fn body(provider: Provider, deltas: &[&str], ending: &str) -> Vec<u8> {
    match provider {
        Provider::OpenAi => openai_body(deltas, ending),
        Provider::Anthropic => anthropic_body(deltas, ending),
    }
}

/// What a client of the provider sees of one decoded stream.
#[derive(Debug, PartialEq)]
struct Decoded {
    deltas: Vec<String>,
    usage: Option<Usage>,
    /// The terminal event, `Done { finish_reason, unterminated }` or the error.
    end: String,
}

fn decode(provider: Provider, pieces: &[&[u8]]) -> Decoded {
    let events = match provider {
        Provider::OpenAi => openai_events(pieces, DEFAULT_MAX_EVENT_BYTES),
        Provider::Anthropic => anthropic_events(pieces, DEFAULT_MAX_EVENT_BYTES, false),
    };
    if let Err(breach) = check_sequence(&events) {
        panic!("{provider:?}: {breach}: {events:?}");
    }
    let mut decoded = Decoded {
        deltas: Vec::new(),
        usage: None,
        end: String::new(),
    };
    for event in events {
        match event {
            ProviderEvent::Delta(text) => decoded.deltas.push(text),
            ProviderEvent::Usage(usage) => decoded.usage = Some(usage),
            terminal => decoded.end = format!("{terminal:?}"),
        }
    }
    decoded
}

fn expected(deltas: &[&str]) -> Decoded {
    Decoded {
        deltas: deltas.iter().map(|d| (*d).to_owned()).collect(),
        usage: Some(USAGE),
        end: format!(
            "{:?}",
            ProviderEvent::Done {
                finish_reason: FinishReason::Stop,
                unterminated: false,
            }
        ),
    }
}

#[test]
fn a_stream_split_at_every_byte_decodes_like_the_whole_lf_stream_on_both_wires() {
    for provider in [Provider::OpenAi, Provider::Anthropic] {
        let reference = decode(provider, &[&body(provider, &DELTAS, "\n")]);
        assert_eq!(reference, expected(&DELTAS), "{provider:?}");
        assert_eq!(reference.deltas.concat(), DELTAS.concat());
        for ending in ENDINGS {
            let wire = body(provider, &DELTAS, ending);
            assert_eq!(
                decode(provider, &[&wire]),
                reference,
                "{provider:?} {ending:?} whole"
            );
            let bytewise: Vec<&[u8]> = wire.chunks(1).collect();
            assert_eq!(
                decode(provider, &bytewise),
                reference,
                "{provider:?} {ending:?} one byte at a time"
            );
            let framed = frame(&[&wire], DEFAULT_MAX_EVENT_BYTES);
            for cut in 0..=wire.len() {
                let (head, tail) = wire.split_at(cut);
                // Event names included, which the decoders do not all look at.
                assert_eq!(
                    frame(&[head, b"", tail], DEFAULT_MAX_EVENT_BYTES).events,
                    framed.events,
                    "{provider:?} {ending:?} framed, cut at byte {cut}"
                );
                // The empty piece in between is one a transport may deliver; after a piece
                // ending in CR it must not turn a CRLF into two line ends.
                assert_eq!(
                    decode(provider, &[head, b"", tail]),
                    reference,
                    "{provider:?} {ending:?} cut at byte {cut} of {}",
                    wire.len()
                );
            }
        }
    }
}

/// One delta: ASCII, multi-byte characters, characters JSON escapes, or any non-control text.
fn delta() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z ,.]{0,6}",
        "[éüñçø日本語中文🎉👍🏽𝄞✓—]{1,3}",
        "[\\x00-\\x1f\"\\\\/]{1,2}",
        "\\PC{1,4}",
    ]
}

/// Bytes that look like SSE (field names, colons, spaces, every line end) mixed with anything.
fn sse_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        Just(b"data:".to_vec()),
        Just(b"data: ".to_vec()),
        Just(b"event: ".to_vec()),
        Just(b":".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"[DONE]".to_vec()),
        Just("é日🎉".as_bytes().to_vec()),
        "[a-z_{}\":,0-9]{1,8}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 1..4),
    ];
    proptest::collection::vec(fragment, 0..64).prop_map(|parts| parts.concat())
}

proptest! {
    // Modest case counts: the suite runs in `cargo test` (debug); `scripts/fuzz.sh` goes long.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_deltas_any_line_ending_any_pieces_decode_like_the_whole_lf_stream(
        deltas in proptest::collection::vec(delta(), 1..12),
        ending in proptest::sample::select(ENDINGS.to_vec()),
        seed in any::<u64>(),
        max_piece in 1usize..48,
    ) {
        let deltas: Vec<&str> = deltas.iter().map(String::as_str).collect();
        let mut want = expected(&deltas);
        want.deltas.retain(|d| !d.is_empty());
        for provider in [Provider::OpenAi, Provider::Anthropic] {
            let reference = decode(provider, &[&body(provider, &deltas, "\n")]);
            prop_assert_eq!(&reference, &want, "{:?}", provider);
            let wire = body(provider, &deltas, ending);
            let pieces = split(&wire, seed, max_piece);
            prop_assert_eq!(decode(provider, &pieces), reference, "{:?}", provider);
        }
    }

    #[test]
    fn the_framer_never_holds_more_than_its_cap_and_frames_split_bytes_like_whole_ones(
        bytes in sse_like_bytes(),
        cap in 1usize..96,
        seed in any::<u64>(),
        max_piece in 0usize..24,
    ) {
        let whole = frame(&[&bytes], cap);
        let pieces = split(&bytes, seed, max_piece.max(1));
        let in_pieces = frame(&pieces, cap);
        for framed in [&whole, &in_pieces] {
            prop_assert!(framed.max_line <= cap, "line {} > cap {}", framed.max_line, cap);
            prop_assert!(framed.max_data <= cap, "data {} > cap {}", framed.max_data, cap);
            for (_, data) in &framed.events {
                prop_assert!(data.len() <= cap, "an event of {} bytes > cap {}", data.len(), cap);
            }
        }
        // What the framer held differs with the pieces; what it framed may not.
        prop_assert_eq!(in_pieces.events, whole.events);
        prop_assert_eq!(in_pieces.error, whole.error);
    }

    #[test]
    fn any_bytes_end_both_decoders_in_one_terminal_event_however_split(
        bytes in sse_like_bytes(),
        cap in prop_oneof![Just(DEFAULT_MAX_EVENT_BYTES), 1usize..64],
        seed in any::<u64>(),
        forced_tool in any::<bool>(),
    ) {
        let pieces = split(&bytes, seed, 8);
        let openai = openai_events(&[&bytes], cap);
        prop_assert!(check_sequence(&openai).is_ok(), "{:?}", openai);
        prop_assert_eq!(format!("{:?}", openai_events(&pieces, cap)), format!("{openai:?}"));
        let anthropic = anthropic_events(&[&bytes], cap, forced_tool);
        prop_assert!(check_sequence(&anthropic).is_ok(), "{:?}", anthropic);
        prop_assert_eq!(
            format!("{:?}", anthropic_events(&pieces, cap, forced_tool)),
            format!("{anthropic:?}")
        );
    }
}
