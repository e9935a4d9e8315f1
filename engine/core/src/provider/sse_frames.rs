//! Server-sent event framing for provider streams: bytes arriving in arbitrary pieces become
//! complete events, following the WHATWG `text/event-stream` rules (lines end in CRLF, LF or CR;
//! `data:` lines of one event are joined with `\n`; a blank line dispatches; `:` lines are
//! comments; one space after the colon is dropped).
//!
//! Written for the OpenAI stream's hot path instead of `eventsource-stream`, which builds each
//! event through a parser-combinator pass and several owned strings: here a line is sliced out of
//! one reused buffer and only the event's `data` is copied, once.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::Stream;
use pin_project_lite::pin_project;

use crate::stream::{ProviderError, ProviderKind};

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SseEvent {
    /// The `event:` field; empty when the event had none (the spec's `message`).
    pub event: String,
    pub data: String,
}

/// Why a stream could not be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    /// Not UTF-8 text: the spec decodes the stream as UTF-8, and providers only send UTF-8.
    #[error("the event stream is not valid UTF-8 (a line starting {start:?})")]
    NotUtf8 { start: String },
    /// A line, or the `data` of one event, grew past the cap: a hostile or broken upstream,
    /// which must not make us buffer without bound.
    #[error("{what} longer than {limit} bytes")]
    TooLong { what: &'static str, limit: usize },
}

/// Incremental framer. Feed it pieces; complete events are appended to the caller's queue.
/// Memory is bounded: the unterminated line and the event being assembled are each kept to
/// `max_bytes`, past which `feed` fails.
#[derive(Debug)]
pub(crate) struct SseFramer {
    /// The current, unterminated line.
    line: Vec<u8>,
    /// The event being assembled.
    event: SseEvent,
    /// Whether any `data:` line arrived for it (an empty `data:` still makes an event).
    has_data: bool,
    /// The last piece ended in CR: a LF starting the next one belongs to that line end.
    after_cr: bool,
    max_bytes: usize,
}

impl Default for SseFramer {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

/// Default cap of one SSE line or event: far above any real provider event (a chunk is well
/// under 1 KiB, a long tool-call argument delta a few KiB).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

impl SseFramer {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            line: Vec::new(),
            event: SseEvent::default(),
            has_data: false,
            after_cr: false,
            max_bytes: max_bytes.max(1),
        }
    }

    pub(crate) fn feed(
        &mut self,
        mut bytes: &[u8],
        out: &mut Vec<SseEvent>,
    ) -> Result<(), FrameError> {
        if bytes.is_empty() {
            // A transport may deliver an empty piece. It must not forget a CR that ended the
            // last one: a LF starting the next piece still completes that CRLF.
            return Ok(());
        }
        if self.after_cr {
            self.after_cr = false;
            if let [b'\n', rest @ ..] = bytes {
                bytes = rest;
            }
        }
        while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (head, rest) = bytes.split_at(end);
            let line_end = rest[0];
            bytes = &rest[1..];
            if line_end == b'\r' {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
            if self.line.is_empty() {
                self.check_line(head.len())?;
                self.line_done(head, out)?;
            } else {
                self.check_line(self.line.len() + head.len())?;
                self.line.extend_from_slice(head);
                let line = std::mem::take(&mut self.line);
                let result = self.line_done(&line, out);
                // Keep the allocation for the next split line.
                self.line = line;
                self.line.clear();
                result?;
            }
        }
        self.check_line(self.line.len() + bytes.len())?;
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// What the framer holds between pieces: the bytes of its unterminated line and the `data`
    /// of the event being assembled. Each stays within the cap; the fuzz targets check it.
    pub(crate) fn buffered(&self) -> (usize, usize) {
        (self.line.len(), self.event.data.len())
    }

    fn check_line(&self, len: usize) -> Result<(), FrameError> {
        if len > self.max_bytes {
            return Err(FrameError::TooLong {
                what: "an SSE line",
                limit: self.max_bytes,
            });
        }
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), FrameError> {
        if line.is_empty() {
            if self.has_data {
                self.has_data = false;
                out.push(std::mem::take(&mut self.event));
            } else {
                self.event.event.clear();
            }
            return Ok(());
        }
        let line = std::str::from_utf8(line).map_err(|_| FrameError::NotUtf8 {
            start: String::from_utf8_lossy(&line[..line.len().min(40)]).into_owned(),
        })?;
        let (field, value) = match line.split_once(':') {
            Some(("", _)) => return Ok(()), // a comment
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.event.data.len() + value.len() + 1 > self.max_bytes {
                    return Err(FrameError::TooLong {
                        what: "an SSE event",
                        limit: self.max_bytes,
                    });
                }
                if self.has_data {
                    self.event.data.push('\n');
                }
                self.event.data.push_str(value);
                self.has_data = true;
            }
            "event" => value.clone_into(&mut self.event.event),
            // `id` and `retry` steer reconnection, which a provider call never does.
            _ => {}
        }
        Ok(())
    }
}

/// A response body as the pieces a transport delivers: reqwest's body stream, or a test's.
pub(crate) trait BodyStream: Stream<Item = Result<Self::Piece, Self::Error>> {
    type Piece: AsRef<[u8]>;
    type Error: std::fmt::Display;
}

impl<S, B, E> BodyStream for S
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    type Piece = B;
    type Error = E;
}

/// A response body as SSE events: framed with [`SseFramer`] (at most `max_bytes` buffered), a
/// transport error or an oversized line ends it with that error, a clean end of body ends it
/// with `None`.
pub(crate) fn sse_events<S: BodyStream>(
    provider: ProviderKind,
    bytes: S,
    max_bytes: usize,
) -> SseEvents<S> {
    SseEvents {
        bytes,
        framer: SseFramer::new(max_bytes),
        // A piece usually frames one event; a first push into an empty `Vec` would make room
        // for four (192 bytes kept for the life of the stream).
        ready: Vec::with_capacity(1),
        next: 0,
        failed: None,
        ended: false,
        provider,
    }
}

pin_project! {
    /// The stream [`sse_events`] returns. Written out rather than generated: a generator keeps a
    /// slot for every value alive across a `yield` (the event, the error, the pending yield)
    /// next to each other for the life of the stream, which is every open stream's memory.
    pub(crate) struct SseEvents<S> {
        #[pin]
        bytes: S,
        framer: SseFramer,
        // Events framed from the last piece, handed out from `next` on.
        ready: Vec<SseEvent>,
        next: usize,
        // What ends the stream once the events framed before it are out; kept as the framer's
        // error (32 bytes) rather than a `ProviderError` (120) in every open stream.
        failed: Option<FrameError>,
        ended: bool,
        provider: ProviderKind,
    }
}

impl<S: BodyStream> Stream for SseEvents<S> {
    type Item = Result<SseEvent, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            if let Some(event) = this.ready.get_mut(*this.next) {
                *this.next += 1;
                return Poll::Ready(Some(Ok(std::mem::take(event))));
            }
            if *this.next > 0 {
                this.ready.clear();
                *this.next = 0;
            }
            if let Some(error) = this.failed.take() {
                *this.ended = true;
                return Poll::Ready(Some(Err(frame_error(*this.provider, error))));
            }
            if *this.ended {
                return Poll::Ready(None);
            }
            match ready!(this.bytes.as_mut().poll_next(cx)) {
                Some(Ok(piece)) => {
                    if let Err(e) = this.framer.feed(piece.as_ref(), this.ready) {
                        // Events framed before the bad line are still delivered, then the error.
                        *this.failed = Some(e);
                    }
                }
                Some(Err(e)) => {
                    *this.ended = true;
                    return Poll::Ready(Some(Err(ProviderError::Transport {
                        provider: *this.provider,
                        message: e.to_string(),
                    })));
                }
                None => {
                    *this.ended = true;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

fn frame_error(provider: ProviderKind, error: FrameError) -> ProviderError {
    match error {
        FrameError::TooLong { what, limit } => ProviderError::Oversized {
            provider,
            what,
            limit,
        },
        FrameError::NotUtf8 { .. } => ProviderError::Malformed {
            provider,
            detail: error.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_all(pieces: &[&[u8]]) -> Vec<SseEvent> {
        let mut framer = SseFramer::default();
        let mut out = Vec::new();
        for piece in pieces {
            framer.feed(piece, &mut out).unwrap();
        }
        out
    }

    fn data(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let wire = b"data: {\"a\":1}\n\n: comment\n\nevent: keepalive\ndata: \n\ndata: [DONE]\n\n";
        let whole = frame_all(&[wire]);
        assert_eq!(data(&whole), ["{\"a\":1}", "", "[DONE]"]);
        assert_eq!(whole[1].event, "keepalive");
        assert_eq!(
            whole[2].event, "",
            "the event name does not leak into the next event"
        );
        for split in 1..wire.len() {
            let (a, b) = wire.split_at(split);
            assert_eq!(frame_all(&[a, b]), whole, "split at {split}");
        }
        let bytewise: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(frame_all(&bytewise), whole);
    }

    #[test]
    fn every_line_ending_works_including_crlf_split_between_pieces() {
        assert_eq!(
            data(&frame_all(&[b"data: a\r\n\r\ndata: b\r\rdata: c\n\n"])),
            ["a", "b", "c"]
        );
        assert_eq!(
            data(&frame_all(&[b"data: a\r", b"\n\r", b"\ndata: b\n\n"])),
            ["a", "b"]
        );
    }

    #[test]
    fn an_empty_piece_between_the_cr_and_lf_of_a_line_end_is_one_line_end() {
        // Two line ends would end the event early: here its name would be lost, and OpenAI's
        // `keepalive` would be decoded as a chunk.
        let events = frame_all(&[b"event: keepalive\r", b"", b"\ndata: {}\r\n\r\n"]);
        assert_eq!(
            events,
            [SseEvent {
                event: "keepalive".into(),
                data: "{}".into()
            }]
        );
        let events = frame_all(&[b"data: a\r", b"", b"", b"\ndata: b\r\n\r\n"]);
        assert_eq!(data(&events), ["a\nb"]);
    }

    #[test]
    fn multi_line_data_is_joined_and_the_space_rule_holds() {
        let events = frame_all(&[b"data:x\ndata:  y\ndata\n\n"]);
        assert_eq!(data(&events), ["x\n y\n"]);
    }

    #[test]
    fn an_unterminated_event_is_not_dispatched() {
        assert!(frame_all(&[b"data: half"]).is_empty());
        assert!(frame_all(&[b"data: half\n"]).is_empty());
    }

    #[test]
    fn a_line_or_event_past_the_cap_is_an_error_and_memory_stays_bounded() {
        let mut framer = SseFramer::new(64);
        let mut out = Vec::new();
        // A line that never ends, fed in pieces: refused once it passes the cap.
        framer.feed(b"data: ", &mut out).unwrap();
        let err = (0..100)
            .find_map(|_| framer.feed(&[b'x'; 16], &mut out).err())
            .expect("the cap is enforced");
        assert_eq!(
            err,
            FrameError::TooLong {
                what: "an SSE line",
                limit: 64
            }
        );
        assert!(framer.line.capacity() <= 128, "{}", framer.line.capacity());
        // Many short data lines that add up to one huge event.
        let mut framer = SseFramer::new(64);
        let err = (0..100)
            .find_map(|_| framer.feed(b"data: 0123456789\n", &mut out).err())
            .expect("the event cap is enforced");
        assert!(matches!(
            err,
            FrameError::TooLong {
                what: "an SSE event",
                ..
            }
        ));
        // Exactly at the cap is fine.
        let mut framer = SseFramer::new(16);
        framer.feed(b"data: 0123456789\n\n", &mut out).unwrap();
        assert_eq!(out.last().map(|e| e.data.as_str()), Some("0123456789"));
    }

    #[test]
    fn the_stream_delivers_what_was_framed_before_a_bad_line_then_its_error_then_ends() {
        use futures::StreamExt;
        let cap = 32;
        let long = format!("data: {}\n\n", "x".repeat(cap));
        let piece = format!("data: a\n\ndata: b\n\n{long}data: c\n\n");
        let body = futures::stream::iter([Ok::<_, std::convert::Infallible>(piece)]);
        let events: Vec<_> =
            futures::executor::block_on(sse_events(ProviderKind::OpenAi, body, cap).collect());
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(events[0].as_ref().map(|e| e.data.as_str()), Ok("a"));
        assert_eq!(events[1].as_ref().map(|e| e.data.as_str()), Ok("b"));
        assert!(
            matches!(
                &events[2],
                Err(ProviderError::Oversized {
                    what: "an SSE line",
                    limit: 32,
                    ..
                })
            ),
            "{events:?}"
        );
    }

    #[test]
    fn invalid_utf8_is_an_error_naming_the_line() {
        let mut framer = SseFramer::default();
        let err = framer
            .feed(b"data: \xff\xfe\n\n", &mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("data: "), "{err}");
    }
}
