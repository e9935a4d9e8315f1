//! Hidden entry points for the fuzz targets (`engine/fuzz`) and the split-stream properties; not
//! an API: names and shapes follow what those need.
//!
//! They drive the crate-private SSE framer and both providers' body decoding (framing, then each
//! provider's adapter) over bytes held in memory, synchronously. An in-memory body is always
//! ready, so the adapters never wait on their terminator grace timer and no runtime is needed.

use std::convert::Infallible;

use bytes::Bytes;
use futures::StreamExt;

use crate::provider::anthropic::{self, AdaptOptions};
use crate::provider::openai_answer;
use crate::provider::sse_frames::{SseEvent, SseFramer, sse_events};
use crate::stream::{ProviderEvent, ProviderKind};

/// What the SSE framer made of a body fed in pieces.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Framed {
    /// `(event, data)` of every dispatched event, in order.
    pub events: Vec<(String, String)>,
    /// The error that stopped framing (the rest of the body is not fed), if any.
    pub error: Option<String>,
    /// The longest unterminated line the framer held after any piece.
    pub max_line: usize,
    /// The most `data` of a not yet dispatched event the framer held after any piece.
    pub max_data: usize,
}

/// Feeds `pieces` to a framer capped at `max_bytes`, stopping at the first error as the provider
/// streams do.
pub fn frame(pieces: &[&[u8]], max_bytes: usize) -> Framed {
    let mut framer = SseFramer::new(max_bytes);
    let mut out: Vec<SseEvent> = Vec::new();
    let mut framed = Framed::default();
    for piece in pieces {
        let result = framer.feed(piece, &mut out);
        let (line, data) = framer.buffered();
        framed.max_line = framed.max_line.max(line);
        framed.max_data = framed.max_data.max(data);
        if let Err(err) = result {
            framed.error = Some(err.to_string());
            break;
        }
    }
    framed.events = out.into_iter().map(|e| (e.event, e.data)).collect();
    framed
}

/// An OpenAI Chat Completions body, delivered in `pieces`, through the provider's own decoding
/// (`sse_chunks`: framing capped at `max_bytes`, `[DONE]`, chunk JSON) and `adapt_chunks`.
/// The events after `Start`: `Delta`* · `Usage`? · `Done`|`Error`.
pub fn openai_events(pieces: &[&[u8]], max_bytes: usize) -> Vec<ProviderEvent> {
    let body = futures::stream::iter(pieces.iter().map(Ok::<_, Infallible>));
    let events = openai_answer::answer_events(body, max_bytes);
    futures::executor::block_on(events.collect())
}

/// An Anthropic Messages body, delivered in `pieces`, through the provider's framing (capped at
/// `max_bytes`) and `adapt_events`. `forced_tool` says the request forced a schema tool.
pub fn anthropic_events(
    pieces: &[&[u8]],
    max_bytes: usize,
    forced_tool: bool,
) -> Vec<ProviderEvent> {
    // The adapter owns its input stream (`'static`), hence the copies.
    let owned: Vec<Bytes> = pieces.iter().map(|p| Bytes::copy_from_slice(p)).collect();
    let body = futures::stream::iter(owned).map(Ok::<_, Infallible>);
    let frames = sse_events(ProviderKind::Anthropic, body, max_bytes);
    let options = AdaptOptions {
        model: "fuzz".to_owned(),
        forced_tool,
    };
    futures::executor::block_on(anthropic::adapt_events(frames, options).collect())
}

/// Checks the contract every decoded stream keeps, whatever the bytes were: non-empty `Delta`s,
/// then at most one `Usage`, then exactly one terminal event (`Done` or `Error`), last.
pub fn check_sequence(events: &[ProviderEvent]) -> Result<(), String> {
    let Some((last, body)) = events.split_last() else {
        return Err("no events: a stream must end with Done or Error".to_owned());
    };
    if !last.is_terminal() {
        return Err(format!("the last event is not terminal: {last:?}"));
    }
    let mut usage_seen = false;
    for (i, event) in body.iter().enumerate() {
        match event {
            ProviderEvent::Delta(text) if text.is_empty() => {
                return Err(format!("event {i} is an empty Delta"));
            }
            ProviderEvent::Delta(_) if usage_seen => {
                return Err(format!("event {i} is a Delta after the Usage"));
            }
            ProviderEvent::Delta(_) => {}
            ProviderEvent::Usage(_) if usage_seen => {
                return Err(format!("event {i} is a second Usage"));
            }
            ProviderEvent::Usage(_) => usage_seen = true,
            other => return Err(format!("event {i} is unexpected here: {other:?}")),
        }
    }
    Ok(())
}

/// Cuts `body` into consecutive pieces of 0 to `max_piece` bytes chosen by `seed`: empty pieces
/// included (a transport may deliver them), cuts anywhere (inside a line, a CRLF or a UTF-8
/// character).
pub fn split(body: &[u8], seed: u64, max_piece: usize) -> Vec<&[u8]> {
    let mut state = seed;
    let mut rest = body;
    let mut pieces = Vec::new();
    while !rest.is_empty() {
        // splitmix64: a fixed, well-mixed sequence from any seed.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let len = usize::try_from(z % (max_piece as u64 + 1)).unwrap_or(0);
        let (piece, tail) = rest.split_at(len.min(rest.len()));
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{FinishReason, ProviderError, Usage};

    #[test]
    fn split_covers_the_body_in_order_with_empty_pieces() {
        let body: Vec<u8> = (0..=255).collect();
        let pieces = split(&body, 7, 5);
        assert_eq!(pieces.concat(), body);
        assert!(pieces.iter().all(|p| p.len() <= 5));
        assert!(pieces.iter().any(|p| p.is_empty()), "{pieces:?}");
        assert_ne!(split(&body, 8, 5), pieces, "the seed picks the cuts");
    }

    #[test]
    fn sequence_check_accepts_the_contract_and_names_a_breach() {
        let usage = ProviderEvent::Usage(Usage::default());
        let done = ProviderEvent::Done {
            finish_reason: FinishReason::Stop,
            unterminated: false,
        };
        let delta = ProviderEvent::Delta("a".into());
        assert!(check_sequence(&[delta.clone(), usage.clone(), done.clone()]).is_ok());
        let error = ProviderEvent::Error(ProviderError::Truncated {
            provider: ProviderKind::OpenAi,
            detail: "cut".into(),
        });
        assert!(check_sequence(&[error]).is_ok());
        assert!(check_sequence(&[]).is_err());
        assert!(check_sequence(std::slice::from_ref(&delta)).is_err());
        assert!(check_sequence(&[usage.clone(), delta, done.clone()]).is_err());
        assert!(check_sequence(&[usage.clone(), usage, done.clone()]).is_err());
        assert!(check_sequence(&[ProviderEvent::Delta(String::new()), done]).is_err());
    }

    #[test]
    fn frame_reports_events_error_and_what_was_held() {
        let framed = frame(&[b"data: a", b"bc\n\ndata: ", b"0123456789"], 12);
        assert_eq!(framed.events, [(String::new(), "abc".to_owned())]);
        assert_eq!(
            framed.max_line, 7,
            "`data: a` waiting for the rest of its line"
        );
        assert!(framed.error.is_some_and(|e| e.contains("longer than 12")));
    }
}
