//! The SSE events of a streamed chat completion, as OpenAI sends them: a role chunk, a chunk
//! per delta, the last chunk with the finish reason, the usage chunk when asked for, `[DONE]`.
//! A failure after content is an in-stream error event instead of the last three.
//!
//! Written as a small state machine rather than a generator: a generator keeps room for every
//! value alive across any of its `yield`s for its whole life, which was 536 bytes in every open
//! stream; this is a third of that.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};

use keyvex_engine::call::{CallEvent, CallStream};
use keyvex_engine::record::Recorded;

use super::{Delta, Meta, Peeked, committed, error_chunk, finish_reason, log_resume};
use crate::sse::Event;

/// What to do next, in order, before reading the call again.
enum Step {
    Send(Event),
    /// Wait until the call's record is durable, so what the client is told next survives a
    /// crash.
    Durable(BoxFuture<'static, ()>),
}

pub(super) struct ChatChunks {
    meta: Meta,
    include_usage: bool,
    /// Emptied, and its room given back, once the first chunks are sent; filled again at the
    /// end.
    steps: VecDeque<Step>,
    /// `None` once the call ended.
    call: Option<CallStream>,
}

impl ChatChunks {
    pub(super) fn new(meta: Meta, include_usage: bool, peeked: Peeked) -> ChatChunks {
        let mut chunks = ChatChunks {
            meta,
            include_usage,
            steps: VecDeque::with_capacity(2),
            call: None,
        };
        let role = Delta {
            role: Some("assistant"),
            content: Some(""),
        };
        chunks.send(chunks.meta.chunk(role, None));
        match peeked {
            Peeked::Finished(outcome, record) => {
                chunks.durable(record);
                let reason = finish_reason(&outcome);
                chunks.send(chunks.meta.chunk(Delta::default(), Some(reason)));
                if include_usage {
                    chunks.send(chunks.meta.usage_chunk(&outcome));
                }
                chunks.send(Event::text("[DONE]"));
            }
            Peeked::Content(first, call) => {
                chunks.send(chunks.meta.chunk(Delta::content(&first), None));
                chunks.call = Some(call);
            }
        }
        chunks
    }

    fn send(&mut self, event: Event) {
        self.steps.push_back(Step::Send(event));
    }

    fn durable(&mut self, record: Recorded) {
        self.steps
            .push_back(Step::Durable(Box::pin(committed(record))));
    }

    /// The call ended with `event`: the steps that end the stream.
    fn end(&mut self, event: CallEvent) {
        self.call = None;
        match event {
            CallEvent::Finished { outcome, record } => {
                self.durable(record);
                self.send(self.meta.last_chunk(&outcome));
                if self.include_usage {
                    self.send(self.meta.usage_chunk(&outcome));
                }
                self.send(Event::text("[DONE]"));
            }
            CallEvent::Failed { failure, record } => {
                self.durable(record);
                self.send(error_chunk(
                    &failure.error.to_string(),
                    failure.error.kind(),
                ));
            }
            CallEvent::Delta(_)
            | CallEvent::Rescue(_)
            | CallEvent::Start { .. }
            | CallEvent::Fallback { .. } => {}
        }
    }
}

impl Stream for ChatChunks {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let this = &mut *self;
        loop {
            match this.steps.pop_front() {
                Some(Step::Send(event)) => {
                    if this.steps.is_empty() && this.call.is_some() {
                        // The deltas go out one at a time and need no queue while they flow.
                        this.steps = VecDeque::new();
                    }
                    return Poll::Ready(Some(event));
                }
                Some(Step::Durable(mut wait)) => {
                    if wait.as_mut().poll(cx).is_pending() {
                        this.steps.push_front(Step::Durable(wait));
                        return Poll::Pending;
                    }
                    continue;
                }
                None => {}
            }
            let Some(call) = this.call.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(call.poll_next_unpin(cx)) {
                Some(CallEvent::Delta(text)) => {
                    return Poll::Ready(Some(this.meta.chunk(Delta::content(&text), None)));
                }
                Some(CallEvent::Rescue(rescue)) => log_resume(&rescue),
                Some(CallEvent::Start { .. } | CallEvent::Fallback { .. }) => {}
                Some(end) => this.end(end),
                None => this.call = None,
            }
        }
    }
}
