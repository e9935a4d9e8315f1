//! Hidden entry points that let the bench cases (`bench-gate`) drive crate-private hot paths; not
//! an API.
//!
//! The providers' SSE-to-event adapters are `pub(crate)` because their inputs (framed events,
//! decoded chunk streams) are implementation details. Benches feed them captured bytes without a
//! socket, through the providers' own body decoding (`sse_events` framing, then each provider's
//! adapter), stopping where the network would start. The request side is the same in reverse:
//! each provider's own wire request, serialised as its HTTP client serialises it, without sending.

use std::convert::Infallible;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::provider::anthropic::{self, AdaptOptions};
use crate::provider::anthropic_version::AnthropicVersion;
use crate::provider::{ChatRequest, DEFAULT_MAX_EVENT_BYTES, openai, openai_answer};
use crate::stream::{ProviderEvent, ProviderKind};

/// Replays an OpenAI Chat Completions SSE body, delivered in `pieces` as the socket would, through
/// the provider's own decoding of a live body (`sse_chunks`: SSE framing, `[DONE]`, per-event JSON
/// decoding into the wire structs) and `adapt_chunks`.
///
/// Yields `Delta`* · `Usage`? · `Done`|`Error`; the `Start` the live provider sends on HTTP 200
/// is not part of this path.
pub fn openai_sse_events<I>(pieces: I) -> impl Stream<Item = ProviderEvent> + Send
where
    I: IntoIterator<Item = Bytes>,
    I::IntoIter: Send,
{
    let bytes = futures::stream::iter(pieces).map(Ok::<_, Infallible>);
    openai_answer::answer_events(bytes, DEFAULT_MAX_EVENT_BYTES)
}

/// Replays an Anthropic Messages SSE body, delivered in `pieces`, through the provider's framing
/// and `adapt_events`. Like the OpenAI replay it starts after the `Start` of a live stream.
/// `forced_tool` says the request forced a schema tool (agent JSON answers), which makes
/// `tool_use` a normal stop.
pub fn anthropic_sse_events<I>(
    pieces: I,
    model: &str,
    forced_tool: bool,
) -> impl Stream<Item = ProviderEvent> + Send + 'static
where
    I: IntoIterator<Item = Bytes>,
    I::IntoIter: Send + 'static,
{
    let bytes = futures::stream::iter(pieces).map(Ok::<_, Infallible>);
    let frames = crate::provider::sse_frames::sse_events(
        ProviderKind::Anthropic,
        bytes,
        DEFAULT_MAX_EVENT_BYTES,
    );
    let options = AdaptOptions {
        model: model.to_owned(),
        forced_tool,
    };
    anthropic::adapt_events(frames, options)
}

/// The body of an OpenAI Chat Completions request for `request`: the provider's own wire request
/// (system first, usage on the stream, the answer's JSON schema), serialised to JSON as the SDK
/// does when it sends it.
pub fn openai_request_body(request: &ChatRequest) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&openai::wire_request(request))
}

/// The body of an Anthropic Messages request for `request` on `version`: the provider's own wire
/// request (top-level system, the forced schema tool), serialised to JSON as the HTTP client does
/// when it sends it.
pub fn anthropic_request_body(
    request: &ChatRequest,
    version: AnthropicVersion,
) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&anthropic::WireRequest::new(request, version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{FinishReason, Usage};

    fn sse(event: Option<&str>, data: &str) -> Bytes {
        let name = event.map(|e| format!("event: {e}\n")).unwrap_or_default();
        Bytes::from(format!("{name}data: {data}\n\n"))
    }

    fn texts(events: &[ProviderEvent]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::Delta(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn openai_replay_needs_the_usage_and_done_lines_to_finish() {
        let chunk = |content: &str, finish: &str| {
            format!(
                r#"{{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{"content":"{content}"}},"finish_reason":{finish}}}]}}"#
            )
        };
        let usage = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#;
        let body = vec![
            sse(None, &chunk("Hel", "null")),
            sse(None, &chunk("lo", "\"stop\"")),
            sse(None, usage),
            sse(None, "[DONE]"),
        ];
        let events: Vec<_> = futures::executor::block_on(openai_sse_events(body.clone()).collect());
        assert_eq!(texts(&events), "Hello");
        assert!(matches!(
            events[events.len() - 2],
            ProviderEvent::Usage(Usage {
                input: 9,
                output: 2,
                ..
            })
        ));
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                finish_reason: FinishReason::Stop,
                unterminated: false
            })
        ));

        // Without the usage chunk and `[DONE]` the same chunks are a truncated stream, as on a
        // live connection.
        let cut = body[..2].to_vec();
        let events: Vec<_> = futures::executor::block_on(openai_sse_events(cut).collect());
        assert!(matches!(events.last(), Some(ProviderEvent::Error(_))));
    }

    #[test]
    fn anthropic_replay_splits_frames_anywhere() {
        let frames = [
            sse(
                Some("message_start"),
                r#"{"type":"message_start","message":{"usage":{"input_tokens":5,"output_tokens":1}}}"#,
            ),
            sse(
                Some("content_block_delta"),
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            ),
            sse(
                Some("message_delta"),
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":2}}"#,
            ),
            sse(Some("message_stop"), r#"{"type":"message_stop"}"#),
        ];
        let whole: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        // Seven-byte pieces cut frames mid-line, as TCP may.
        let pieces: Vec<Bytes> = whole.chunks(7).map(Bytes::copy_from_slice).collect();
        let events: Vec<_> =
            futures::executor::block_on(anthropic_sse_events(pieces, "claude", false).collect());
        assert_eq!(texts(&events), "Hi");
        assert!(matches!(
            events[events.len() - 2],
            ProviderEvent::Usage(Usage {
                input: 5,
                output: 2,
                ..
            })
        ));
        assert!(matches!(
            events.last(),
            Some(ProviderEvent::Done {
                finish_reason: FinishReason::Stop,
                unterminated: false
            })
        ));
    }

    #[test]
    fn request_bodies_are_each_providers_wire_json() {
        let request = ChatRequest {
            model: "m".to_owned(),
            system: Some("Be brief.".to_owned()),
            messages: vec![crate::provider::ChatMessage::user("Hi")],
            max_output_tokens: 64,
            temperature: Some(0.5),
            response_schema: Some(crate::provider::ResponseSchema {
                name: "answer".to_owned(),
                schema: serde_json::json!({"type": "object"}),
            }),
        };
        let openai: serde_json::Value =
            serde_json::from_slice(&openai_request_body(&request).unwrap()).unwrap();
        assert_eq!(openai["messages"][0]["role"], "system");
        assert_eq!(openai["stream_options"]["include_usage"], true);
        assert_eq!(openai["response_format"]["json_schema"]["name"], "answer");
        let anthropic: serde_json::Value = serde_json::from_slice(
            &anthropic_request_body(&request, AnthropicVersion::V2026_10_21).unwrap(),
        )
        .unwrap();
        assert_eq!(anthropic["system"], "Be brief.");
        assert_eq!(anthropic["tool_choice"]["name"], "answer");
        // That version has no sampling parameters.
        assert!(anthropic.get("temperature").is_none());
    }
}
