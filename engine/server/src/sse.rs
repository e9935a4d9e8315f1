//! Server-sent event streams: the encoded event type, and the body every streaming response
//! goes through (shutdown, in-flight accounting, keep-alive).
//!
//! When a client disconnects, hyper drops the response body; dropping the engine stream inside
//! it drops the call, which the engine records as cancelled with the context it was opened with.
//!
//! Why not axum's `Sse`: its `Event` grows a `BytesMut` piece by piece, and its body re-arms the
//! keep-alive timer after every event. Here an event is encoded once into one exactly-grown
//! buffer, and one sweeper per server finds the silent streams (`open_streams.rs`). The wire
//! format is the same: `event: <name>\n` (if named), `data: <json>\n`, a blank line;
//! keep-alives are `: keep-alive`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::stream::BoxStream;
use http_body::Frame;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::open_streams::Registration;
use crate::prom::ServerMetrics;

/// One server-sent event, already encoded for the wire.
#[derive(Debug, Clone)]
pub struct Event(Bytes);

impl Event {
    /// A data-only event with a fixed text (`[DONE]`); `text` must hold no line break.
    pub fn text(text: &'static str) -> Event {
        let mut buf = Vec::with_capacity(text.len() + 8);
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(text.as_bytes());
        buf.extend_from_slice(b"\n\n");
        Event(Bytes::from(buf))
    }

    /// The encoded bytes (for tests and benches).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// `event: <name>\n` (when named), `data: <json>\n\n`. Compact JSON never holds a raw line
/// break (serde escapes them inside strings), so the data always fits one `data:` line.
///
/// Encoded in a scratch buffer kept by the thread, then copied once into an allocation of the
/// exact size: one allocation per event. Building the event in a fresh `Vec` cost two or three
/// (the `Vec`, its growth past a first guess, and the shared header `Bytes` adds to a `Vec`
/// with spare capacity), and allocations are a tenth of the engine's samples at 32 streams.
fn encode(
    name: Option<&str>,
    data: &impl Serialize,
    fallback: impl FnOnce(String) -> String,
) -> Event {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    /// A scratch buffer that grew past this (one huge event) is let go rather than kept.
    const KEEP: usize = 64 * 1024;
    SCRATCH.with(|scratch| {
        // Not reentrant: serializing our own types never encodes another event. Should it
        // ever, the inner call takes a fresh buffer instead of panicking.
        let mut owned;
        let mut guard = scratch.try_borrow_mut();
        let buf: &mut Vec<u8> = match guard.as_deref_mut() {
            Ok(buf) => buf,
            Err(_) => {
                owned = Vec::new();
                &mut owned
            }
        };
        buf.clear();
        if let Some(name) = name {
            buf.extend_from_slice(b"event: ");
            buf.extend_from_slice(name.as_bytes());
            buf.push(b'\n');
        }
        buf.extend_from_slice(b"data: ");
        let start = buf.len();
        if let Err(e) = serde_json::to_writer(&mut *buf, data) {
            buf.truncate(start);
            buf.extend_from_slice(fallback(e.to_string()).as_bytes());
        }
        buf.extend_from_slice(b"\n\n");
        let event = Event(Bytes::copy_from_slice(buf));
        if buf.capacity() > KEEP {
            *buf = Vec::new();
        }
        event
    })
}

/// An SSE event with a name and a JSON body. Serialization of our own types cannot fail; if it
/// ever did, the event says so rather than panicking.
pub fn event(name: &str, data: &impl Serialize) -> Event {
    encode(Some(name), data, |e| {
        format!(r#"{{"kind":"internal","message":"event could not be encoded: {e}"}}"#)
    })
}

/// A data-only event (OpenAI chunks).
pub fn data(data: &impl Serialize) -> Event {
    encode(None, data, |e| {
        format!(
            r#"{{"error":{{"message":"chunk could not be encoded: {e}","type":"server_error"}}}}"#
        )
    })
}

/// The keep-alive comment, sent after the interval without an event.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// What [`Guarded`] needs from the server besides the stream.
pub(crate) struct GuardConfig {
    /// The stream's place among the server's open streams (drain deadline, keep-alive).
    pub open: Registration,
    pub shutdown_event: Event,
    pub prom: Arc<ServerMetrics>,
    pub in_flight: TaskTrackerToken,
}

/// The body of a streaming response: relays the event stream, ends it with `shutdown_event`
/// when the drain deadline passes, sends a keep-alive comment after the registry's interval of
/// silence, and keeps the stream counted while it is open.
pub(crate) struct Guarded {
    inner: Option<BoxStream<'static, Event>>,
    open: Registration,
    shutdown_event: Option<Event>,
    prom: Arc<ServerMetrics>,
    _in_flight: TaskTrackerToken,
}

impl Guarded {
    pub(crate) fn new(inner: BoxStream<'static, Event>, config: GuardConfig) -> Guarded {
        config.prom.stream_opened();
        Guarded {
            inner: Some(inner),
            open: config.open,
            shutdown_event: Some(config.shutdown_event),
            prom: config.prom,
            _in_flight: config.in_flight,
        }
    }

    /// The streaming response: `text/event-stream`, not cached, this body.
    pub(crate) fn into_response(self) -> Response {
        let mut response = Body::new(self).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }

    fn drop_inner(&mut self) {
        self.inner = None;
    }
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.inner.is_none() {
            return Poll::Ready(None);
        }
        // Registered before the flags are read: the registry sets a flag, then wakes.
        this.open.register_waker(cx.waker());
        if this.open.ended() {
            tracing::warn!("drain deadline passed; ending an open stream");
            this.drop_inner();
            return Poll::Ready(this.shutdown_event.take().map(|e| Ok(Frame::data(e.0))));
        }
        let polled = match this.inner.as_mut() {
            Some(inner) => inner.as_mut().poll_next(cx),
            None => Poll::Ready(None),
        };
        match polled {
            Poll::Ready(Some(e)) => {
                this.open.sent(Instant::now());
                Poll::Ready(Some(Ok(Frame::data(e.0))))
            }
            Poll::Ready(None) => {
                this.drop_inner();
                Poll::Ready(None)
            }
            Poll::Pending if this.open.take_keep_alive() => {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(KEEP_ALIVE)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.drop_inner();
        self.prom.stream_closed();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::open_streams::OpenStreams;

    fn guarded(
        events: BoxStream<'static, Event>,
        open: &OpenStreams,
        tracker: &TaskTracker,
    ) -> Guarded {
        Guarded::new(
            events,
            GuardConfig {
                open: open.register(),
                shutdown_event: event("error", &serde_json::json!({ "kind": "shutdown" })),
                prom: Arc::new(ServerMetrics::new()),
                in_flight: tracker.token(),
            },
        )
    }

    async fn next_frame(body: &mut Guarded) -> Option<String> {
        let frame = futures::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
            .await?
            .ok()?;
        let data = frame.into_data().ok()?;
        Some(String::from_utf8_lossy(&data).into_owned())
    }

    #[test]
    fn events_are_encoded_as_axum_did() {
        let named = event("delta", &serde_json::json!({ "text": "a\nb" }));
        assert_eq!(
            named.as_bytes(),
            b"event: delta\ndata: {\"text\":\"a\\nb\"}\n\n"
        );
        let plain = data(&serde_json::json!({ "n": 1 }));
        assert_eq!(plain.as_bytes(), b"data: {\"n\":1}\n\n");
        assert_eq!(Event::text("[DONE]").as_bytes(), b"data: [DONE]\n\n");
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_comes_after_the_interval_of_silence_only() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Event>();
        let (open, tracker) = (
            OpenStreams::new(Duration::from_secs(15)),
            TaskTracker::new(),
        );
        let mut body = guarded(rx.boxed(), &open, &tracker);

        tokio::time::sleep(Duration::from_secs(10)).await;
        tx.unbounded_send(data(&1)).unwrap();
        assert_eq!(next_frame(&mut body).await.unwrap(), "data: 1\n\n");
        let sent = tokio::time::Instant::now();
        // The silence started with that event, not when the stream opened.
        assert_eq!(next_frame(&mut body).await.unwrap(), ": keep-alive\n\n");
        assert_eq!(sent.elapsed(), Duration::from_secs(15));
        assert_eq!(next_frame(&mut body).await.unwrap(), ": keep-alive\n\n");
        assert_eq!(sent.elapsed(), Duration::from_secs(30));

        drop(tx);
        assert_eq!(next_frame(&mut body).await, None);
        drop(body);
        tracker.close();
        assert!(
            tracker.is_empty(),
            "the stream stops being counted once dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_deadline_ends_an_open_stream_with_the_shutdown_event() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Event>();
        let (open, tracker) = (
            OpenStreams::new(Duration::from_secs(15)),
            TaskTracker::new(),
        );
        let mut body = guarded(rx.boxed(), &open, &tracker);
        tx.unbounded_send(data(&1)).unwrap();
        assert_eq!(next_frame(&mut body).await.unwrap(), "data: 1\n\n");

        let reader = tokio::spawn(async move {
            let mut frames = Vec::new();
            while let Some(frame) = next_frame(&mut body).await {
                frames.push(frame);
            }
            frames
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ended = tokio::time::Instant::now();
        open.end_all();
        let frames = reader.await.unwrap();
        assert_eq!(
            frames,
            ["event: error\ndata: {\"kind\":\"shutdown\"}\n\n".to_owned()]
        );
        assert_eq!(
            ended.elapsed(),
            Duration::ZERO,
            "woken by the deadline itself, not by a later keep-alive sweep"
        );
        assert!(tx.is_closed(), "the inner stream was dropped");
    }
}
