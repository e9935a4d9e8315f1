//! Hidden entry points that let the `benches` crate drive crate-private hot paths; not an API.
//!
//! The providers' SSE-to-event adapters are `pub(crate)` because their inputs (decoded chunk streams,
//! `reqwest-eventsource` sources) are implementation details. Benches need to feed them captured
//! bytes without a socket: the OpenAI replay calls the provider's own body decoding
//! (`sse_chunks`); the Anthropic one rebuilds what `reqwest-eventsource` runs on a live response
//! (the same crate, in the same order) and stops where the network would start.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use reqwest_eventsource::{Error as SseError, Event};

use crate::provider::anthropic::{self, AdaptOptions, SseSource};
use crate::provider::openai;
use crate::stream::ProviderEvent;

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
    let saw_done = Arc::new(AtomicBool::new(false));
    let bytes = futures::stream::iter(pieces).map(Ok::<_, Infallible>);
    let chunks = openai::sse_chunks(bytes, Arc::clone(&saw_done));
    openai::adapt_chunks(chunks, move || saw_done.load(Ordering::Acquire))
}

/// Replays an Anthropic Messages SSE body, delivered in `pieces`, through `eventsource-stream`
/// framing (what `reqwest-eventsource` runs on the response) and `adapt_events`, starting with
/// the `Open` event a 200 `text/event-stream` answer produces. `forced_tool` says the request
/// forced a schema tool (agent JSON answers), which makes `tool_use` a normal stop.
#[expect(
    clippy::result_large_err,
    reason = "the item type is fixed by `SseSource`, i.e. by what `reqwest-eventsource` yields"
)]
pub fn anthropic_sse_events<I>(
    pieces: I,
    model: &str,
    forced_tool: bool,
) -> impl Stream<Item = ProviderEvent> + Send + 'static
where
    I: IntoIterator<Item = Bytes>,
    I::IntoIter: Send + 'static,
{
    let messages = futures::stream::iter(pieces)
        .map(Ok::<_, Infallible>)
        .eventsource()
        .map(|event| match event {
            Ok(message) => Ok(Event::Message(message)),
            Err(eventsource_stream::EventStreamError::Utf8(e)) => Err(SseError::Utf8(e)),
            Err(eventsource_stream::EventStreamError::Parser(e)) => Err(SseError::Parser(e)),
            Err(eventsource_stream::EventStreamError::Transport(never)) => match never {},
        });
    let source = Replay {
        events: futures::stream::iter([Ok(Event::Open)])
            .chain(messages)
            .boxed(),
        closed: false,
    };
    let options = AdaptOptions {
        model: model.to_owned(),
        forced_tool,
        url: "replay://anthropic/v1/messages".to_owned(),
    };
    anthropic::adapt_events(source, options)
}

/// An event source over replayed bytes that, like `EventSource`, yields nothing once closed.
struct Replay {
    events: Pin<Box<dyn Stream<Item = Result<Event, SseError>> + Send>>,
    closed: bool,
}

impl Stream for Replay {
    type Item = Result<Event, SseError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.closed {
            return Poll::Ready(None);
        }
        self.events.as_mut().poll_next(cx)
    }
}

impl SseSource for Replay {
    fn close(&mut self) {
        self.closed = true;
    }
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
    fn openai_replay_needs_the_done_line_to_finish() {
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
                finish_reason: FinishReason::Stop
            })
        ));

        // Without `[DONE]` the same chunks are a truncated stream, as on a live connection.
        let cut = body[..3].to_vec();
        let events: Vec<_> = futures::executor::block_on(openai_sse_events(cut).collect());
        assert!(matches!(events.last(), Some(ProviderEvent::Error(_))));
    }

    #[test]
    fn anthropic_replay_starts_on_open_and_splits_frames_anywhere() {
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
        assert!(matches!(events[0], ProviderEvent::Start { .. }));
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
                finish_reason: FinishReason::Stop
            })
        ));
    }
}
