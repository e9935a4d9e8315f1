//! An OpenAI answer as provider events: `Start` once the answer's headers are in, then the body
//! decoded inline — SSE framing, `data: [DONE]`, one JSON chunk per event — and turned into
//! `Delta`* · `Usage`? · `Done`|`Error`.
//!
//! Each layer is a small struct with a `poll_next` rather than an `async_stream` generator. A
//! generator keeps, for its whole life, a slot for every value alive across any of its
//! `yield`s and `await`s (the chunk, the event, the error, the pending yield, the nested
//! generator), and these streams live as long as the answer does. Written out, the three layers
//! hold what they need between events and nothing else: about 2 KiB less per open stream.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::Stream;
use pin_project_lite::pin_project;

use super::openai::{Chunk, decode_chunk};
use super::sse_frames::{BodyStream, SseEvents, sse_events};
use super::{ProviderError, TERMINATOR_GRACE};
use crate::stream::{FinishReason, ProviderEvent, ProviderKind, Usage};

const KIND: ProviderKind = ProviderKind::OpenAi;

/// The body of a successful answer, as reqwest hands it out.
pub(crate) type BodyBytes = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A source of decoded chunks that knows whether the stream's terminator arrived.
pub(crate) trait ChunkSource: Stream<Item = Result<Chunk, ProviderError>> {
    /// Whether `data: [DONE]` arrived; asked once the source has ended.
    fn saw_done(&self) -> bool;
}

/// An answer's body bytes as provider events (after `Start`): [`sse_chunks`] then
/// [`adapt_chunks`].
pub(crate) fn answer_events<S: BodyStream>(
    bytes: S,
    max_event_bytes: usize,
) -> AdaptChunks<SseChunks<S>> {
    adapt_chunks(sse_chunks(bytes, max_event_bytes))
}

// ---------------------------------------------------------------------------------------------
// The whole answer

/// The stream of one OpenAI attempt: `setup` sends the request and resolves to the answer whose
/// body is still unread (or the call's error); then `Start`, then the body's events.
pub(crate) struct OpenAiAnswer<F> {
    /// Boxed apart from the stream: the SDK's call is several KiB of future state, freed once
    /// the answer's headers are in instead of staying inside every open stream.
    setup: Option<Pin<Box<F>>>,
    /// Handed out in `Start`.
    model: String,
    max_event_bytes: usize,
    events: Option<AdaptChunks<SseChunks<BodyBytes>>>,
}

impl<F> OpenAiAnswer<F> {
    pub(crate) fn new(setup: F, model: String, max_event_bytes: usize) -> Self {
        Self {
            setup: Some(Box::pin(setup)),
            model,
            max_event_bytes,
            events: None,
        }
    }
}

impl<F> Stream for OpenAiAnswer<F>
where
    F: Future<Output = Result<reqwest::Response, ProviderError>>,
{
    type Item = ProviderEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ProviderEvent>> {
        let this = self.get_mut();
        if let Some(setup) = &mut this.setup {
            let answer = ready!(setup.as_mut().poll(cx));
            this.setup = None;
            return Poll::Ready(Some(match answer {
                Ok(response) => {
                    let bytes: BodyBytes = Box::pin(response.bytes_stream());
                    this.events = Some(answer_events(bytes, this.max_event_bytes));
                    ProviderEvent::Start {
                        provider: KIND,
                        model: std::mem::take(&mut this.model),
                    }
                }
                // Nothing follows a failed call: `events` stays empty and the stream ends.
                Err(err) => ProviderEvent::Error(err),
            }));
        }
        match &mut this.events {
            Some(events) => Pin::new(events).poll_next(cx),
            None => Poll::Ready(None),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Body bytes to chunks

/// A successful answer's bytes as decoded chunks: SSE framing ([`sse_events`], at most
/// `max_event_bytes` buffered), `[DONE]` ends the stream (and is remembered for
/// [`ChunkSource::saw_done`]), `keepalive` events are skipped, every other event is one JSON
/// chunk read into borrowed wire structs ([`decode_chunk`]). A transport error, an oversized
/// line or an undecodable chunk ends the stream after that error.
pub(crate) fn sse_chunks<S: BodyStream>(bytes: S, max_event_bytes: usize) -> SseChunks<S> {
    SseChunks {
        events: sse_events(KIND, bytes, max_event_bytes),
        saw_done: false,
        ended: false,
    }
}

pin_project! {
    /// The stream [`sse_chunks`] returns.
    pub(crate) struct SseChunks<S> {
        #[pin]
        events: SseEvents<S>,
        saw_done: bool,
        ended: bool,
    }
}

impl<S: BodyStream> Stream for SseChunks<S> {
    type Item = Result<Chunk, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        while !*this.ended {
            let event = match ready!(this.events.as_mut().poll_next(cx)) {
                Some(Ok(event)) => event,
                Some(Err(err)) => {
                    *this.ended = true;
                    return Poll::Ready(Some(Err(err)));
                }
                None => break,
            };
            if event.data == "[DONE]" {
                *this.saw_done = true;
                break;
            }
            if event.event == "keepalive" {
                continue;
            }
            let chunk = decode_chunk(&event.data);
            *this.ended = chunk.is_err();
            return Poll::Ready(Some(chunk));
        }
        *this.ended = true;
        Poll::Ready(None)
    }
}

impl<S: BodyStream> ChunkSource for SseChunks<S> {
    fn saw_done(&self) -> bool {
        self.saw_done
    }
}

// ---------------------------------------------------------------------------------------------
// Chunks to events

/// Turns the decoded chunk stream (after `Start`) into `Delta`* · `Usage`? · `Done`|`Error`.
///
/// A normal end has a finish reason and `[DONE]`. Once both the finish reason and the usage
/// chunk are in, the answer is complete: if `[DONE]` then does not come within
/// [`TERMINATOR_GRACE`], or the body ends (or breaks) first, it is accepted as `Done` with
/// `unterminated` set. Anything less is an error ([`ProviderError::Truncated`] for a body that
/// ended early), never a truncated success. If the usage chunk arrived before a failure, it is
/// emitted just before the `Error`.
pub(crate) fn adapt_chunks<S: ChunkSource>(chunks: S) -> AdaptChunks<S> {
    AdaptChunks {
        chunks,
        usage: None,
        finish: None,
        refused: false,
        grace: None,
        tail: VecDeque::new(),
        ended: false,
    }
}

pin_project! {
    /// The stream [`adapt_chunks`] returns.
    pub(crate) struct AdaptChunks<S> {
        #[pin]
        chunks: S,
        usage: Option<Usage>,
        finish: Option<FinishReason>,
        refused: bool,
        // Armed while a complete answer waits for its terminator; boxed, as it is rarely armed.
        grace: Option<Pin<Box<tokio::time::Sleep>>>,
        // The last events, queued once the chunks have ended.
        tail: VecDeque<ProviderEvent>,
        ended: bool,
    }
}

impl<S: ChunkSource> Stream for AdaptChunks<S> {
    type Item = ProviderEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ProviderEvent>> {
        let mut this = self.project();
        loop {
            if let Some(event) = this.tail.pop_front() {
                return Poll::Ready(Some(event));
            }
            if *this.ended {
                return Poll::Ready(None);
            }
            let complete = this.finish.is_some() && this.usage.is_some();
            let item = match this.chunks.as_mut().poll_next(cx) {
                Poll::Ready(item) => {
                    *this.grace = None;
                    item
                }
                Poll::Pending if !complete => return Poll::Pending,
                Poll::Pending => {
                    // Everything is in but the terminator: wait for it only briefly.
                    let grace = this
                        .grace
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(TERMINATOR_GRACE)));
                    ready!(grace.as_mut().poll(cx));
                    *this.grace = None;
                    None
                }
            };
            let chunk = match item {
                Some(Ok(chunk)) => chunk,
                Some(Err(err)) if !complete => {
                    if let Some(usage) = this.usage.take() {
                        this.tail.push_back(ProviderEvent::Usage(usage));
                    }
                    this.tail.push_back(ProviderEvent::Error(err));
                    *this.ended = true;
                    continue;
                }
                // The body ended, or broke once the answer was complete (which then stands).
                None | Some(Err(_)) => {
                    let terminated = this.chunks.saw_done();
                    end(
                        this.usage,
                        this.finish,
                        *this.refused,
                        terminated,
                        this.tail,
                    );
                    *this.ended = true;
                    continue;
                }
            };
            if chunk.usage.is_some() {
                *this.usage = chunk.usage;
            }
            *this.refused |= chunk.refusal;
            if chunk.finish.is_some() {
                *this.finish = chunk.finish;
            }
            if let Some(text) = chunk.content {
                return Poll::Ready(Some(ProviderEvent::Delta(text)));
            }
        }
    }
}

/// Queues the events that close a stream whose chunks ended (`terminated`: with `[DONE]`).
fn end(
    usage: &mut Option<Usage>,
    finish: &mut Option<FinishReason>,
    refused: bool,
    terminated: bool,
    tail: &mut VecDeque<ProviderEvent>,
) {
    let problem = match (&*finish, usage.is_some(), terminated) {
        (Some(_), _, true) | (Some(_), true, false) => None,
        (Some(_), false, false) => {
            Some("the body ended after the finish reason, without the usage chunk or data: [DONE]")
        }
        (None, _, true) => Some("data: [DONE] arrived without a finish reason"),
        (None, _, false) => Some("the body ended without a finish reason or data: [DONE]"),
    };
    let had_usage = usage.is_some();
    if let Some(usage) = usage.take() {
        tail.push_back(ProviderEvent::Usage(usage));
    }
    tail.push_back(match (finish.take(), problem) {
        (Some(reason), None) => {
            if !had_usage {
                tracing::warn!(
                    "openai stream completed without a usage chunk; cost will be estimated"
                );
            }
            if !terminated {
                tracing::debug!("openai answer complete without data: [DONE]");
            }
            // A refusal streams in `delta.refusal` with finish reason `stop`; callers must not
            // take the (empty) content for an answer.
            let finish_reason = if refused {
                FinishReason::ContentFilter
            } else {
                reason
            };
            ProviderEvent::Done {
                finish_reason,
                unterminated: !terminated,
            }
        }
        (_, problem) => ProviderEvent::Error(ProviderError::Truncated {
            provider: KIND,
            detail: problem.unwrap_or("incomplete stream").to_owned(),
        }),
    });
}
