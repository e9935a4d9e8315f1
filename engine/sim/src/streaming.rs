//! The protocol-neutral stream driver: timing, pacing, pings and stream faults, with each
//! protocol supplying only the bytes of its events through [`Encoder`].

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use tokio::time::Instant;

use axum::response::IntoResponse;

use super::SimState;
use super::knobs::{Failure, LineEnding};
use super::serve::ConnControl;
use super::stats::{Ending, ServedStream, StreamGuard};
use keyvex_engine::stream::ProviderKind;
use keyvex_engine::tokenize::count_tokens;

/// The bytes of one protocol's stream events.
pub(crate) trait Encoder: Send + 'static {
    /// Sent with the headers, before the time to first token (Anthropic's `message_start`).
    fn open(&mut self) -> Vec<Bytes>;
    /// Sent at the first token, before the first content (OpenAI's role chunk, Anthropic's
    /// `content_block_start`).
    fn begin(&mut self) -> Vec<Bytes>;
    fn delta(&mut self, piece: &str) -> Bytes;
    /// Everything after the last content up to the terminator: finish reason and usage.
    fn finish(&mut self) -> Vec<Bytes>;
    /// The stream's terminator (`data: [DONE]`, `message_stop`).
    fn terminator(&mut self) -> Bytes;
    /// An in-stream error event.
    fn error(&mut self, error_type: &str) -> Bytes;
    /// A `data:` line that is not JSON.
    fn malformed(&mut self) -> Bytes;
    /// A keep-alive event, if the protocol has one.
    fn ping(&mut self) -> Option<Bytes>;
}

/// What to stream and how.
pub(crate) struct Script {
    pub chunks: Vec<String>,
    pub ttft: Duration,
    pub tokens_per_sec: f64,
    pub ping_every: Duration,
    /// Only stream failures (cut, stall, in-stream error, malformed) are acted on here; HTTP
    /// failures never reach a stream.
    pub failure: Option<Failure>,
    /// What the served log says of this stream when it completes.
    pub served: Served,
    pub line_ending: LineEnding,
    /// The connection the request came in on, for a reset mid-stream.
    pub conn: Option<ConnControl>,
}

/// How long a mid-stream reset waits after the last delta, so the client has read it.
const RESET_GRACE: Duration = Duration::from_millis(100);

/// The request a stream answers, for the served log.
pub(crate) struct Served {
    pub protocol: ProviderKind,
    pub model: String,
    pub schema_name: Option<String>,
    /// When the handler had the request body.
    pub received: Instant,
}

impl Served {
    fn log(self, state: &SimState) {
        state.stats.served(ServedStream {
            protocol: self.protocol,
            model: self.model,
            schema_name: self.schema_name,
            service: self.received.elapsed(),
            received_at: Some(self.received.into_std()),
        });
    }
}

/// Sleeps until `deadline`; `false` when the simulator is shutting down first.
async fn sleep_until(state: &SimState, deadline: Instant) -> bool {
    // A timer for a past instant still waits for the next tick (~1 ms); skip it.
    if deadline <= Instant::now() {
        return !state.shutdown.is_cancelled();
    }
    tokio::select! {
        () = tokio::time::sleep_until(deadline) => true,
        () = state.shutdown.cancelled() => false,
    }
}

fn threshold(failure: &Failure) -> Option<u64> {
    match failure {
        Failure::Cut { tokens }
        | Failure::ResetAfter { tokens }
        | Failure::Stall { tokens, .. }
        | Failure::InStream { tokens, .. }
        | Failure::Malformed { tokens }
        | Failure::CleanEnd { tokens }
        | Failure::HugeLine { tokens, .. } => Some(*tokens),
        _ => None,
    }
}

/// What fills a never-ending line: 64 KiB of one byte, sent without copying.
static FILL: [u8; 64 * 1024] = [b'x'; 64 * 1024];

/// An SSE comment: what a protocol without keep-alive events sends to keep a connection busy.
const COMMENT_PING: &[u8] = b": ping\n\n";

/// `bytes` with each LF replaced by the stream's line ending. The encoders frame with LF only,
/// and their JSON payloads never hold a raw line break, so every LF is a line end.
fn framed(bytes: Bytes, ending: LineEnding) -> Bytes {
    let with: &[u8] = match ending {
        LineEnding::Lf => return bytes,
        LineEnding::Crlf => b"\r\n",
        LineEnding::Cr => b"\r",
    };
    let mut out = Vec::with_capacity(bytes.len() + 8);
    for &b in bytes.iter() {
        if b == b'\n' {
            out.extend_from_slice(with);
        } else {
            out.push(b);
        }
    }
    Bytes::from(out)
}

/// The streaming response body. The guard inside counts the stream open until the body is
/// dropped, and records whether it finished, was cut, or was abandoned by its client.
pub(crate) fn body<E: Encoder>(state: Arc<SimState>, script: Script, enc: E) -> Body {
    let ending = script.line_ending;
    let events = events(state, script, enc);
    Body::from_stream(futures::StreamExt::map(events, move |item| {
        item.map(|bytes| framed(bytes, ending))
    }))
}

/// The stream's bytes, framed with LF.
fn events<E: Encoder>(
    state: Arc<SimState>,
    script: Script,
    mut enc: E,
) -> impl futures::Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
    async_stream::stream! {
        let mut guard = StreamGuard::new(state.clone());
        let shutting_down = || io::Error::other("provider simulator is shutting down");
        for bytes in enc.open() {
            yield Ok::<Bytes, io::Error>(bytes);
        }
        if let Some(Failure::PingsOnly { every }) = &script.failure {
            // Alive, never answering: only keep-alives until the client gives up.
            state.stats.fault();
            loop {
                if !sleep_until(&state, Instant::now() + *every).await {
                    guard.end(Ending::Aborted);
                    yield Err(shutting_down());
                    return;
                }
                yield Ok(enc.ping().unwrap_or_else(|| Bytes::from_static(COMMENT_PING)));
            }
        }
        // Time to first token, with keep-alives on the way like the real APIs.
        let start = Instant::now();
        let first_token_at = start + script.ttft;
        let mut last_ping = start;
        loop {
            let next_ping = (!script.ping_every.is_zero()).then(|| last_ping + script.ping_every);
            let wake = next_ping.map_or(first_token_at, |p| p.min(first_token_at));
            if !sleep_until(&state, wake).await {
                guard.end(Ending::Aborted);
                yield Err(shutting_down());
                return;
            }
            if Instant::now() >= first_token_at {
                break;
            }
            if let Some(ping) = enc.ping() {
                yield Ok(ping);
            }
            last_ping = Instant::now();
        }
        for bytes in enc.begin() {
            yield Ok(bytes);
        }
        if let Some(Failure::Drip { every }) = &script.failure {
            // One piece at a time, just often enough to look alive, forever.
            state.stats.fault();
            for piece in script.chunks.iter().cycle() {
                yield Ok(enc.delta(piece));
                if !sleep_until(&state, Instant::now() + *every).await {
                    guard.end(Ending::Aborted);
                    yield Err(shutting_down());
                    return;
                }
            }
            // An empty answer has nothing to drip: it just never ends.
            state.shutdown.cancelled().await;
            guard.end(Ending::Aborted);
            yield Err(shutting_down());
            return;
        }
        let content_start = Instant::now();
        let paced = script.tokens_per_sec.is_finite() && script.tokens_per_sec > 0.0;
        let mut failure = script.failure;
        let mut sent: u64 = 0;
        let mut index = 0;
        loop {
            // Stream faults fire once `sent` reaches their threshold, or before the terminator
            // when the answer is shorter than that.
            let at_end = index == script.chunks.len();
            let due = failure
                .as_ref()
                .and_then(threshold)
                .is_some_and(|t| sent >= t || at_end);
            if due {
                match failure.take() {
                    Some(Failure::Cut { .. }) => {
                        // Let hyper flush what was sent, then break the connection with no
                        // terminator: the client sees a body that ends mid-stream.
                        tokio::task::yield_now().await;
                        guard.end(Ending::Aborted);
                        state.stats.fault();
                        yield Err(io::Error::other("simulated connection cut"));
                        return;
                    }
                    Some(Failure::ResetAfter { .. }) => {
                        // Give the client time to read what was sent (an RST discards what the
                        // peer has not read yet), then reset the connection: no terminator, no FIN.
                        state.stats.fault();
                        if !sleep_until(&state, Instant::now() + RESET_GRACE).await {
                            guard.end(Ending::Aborted);
                            yield Err(shutting_down());
                            return;
                        }
                        guard.end(Ending::Aborted);
                        match &script.conn {
                            Some(conn) => conn.reset(),
                            None => tracing::warn!("reset fault without a connection handle; cutting the body instead"),
                        }
                        yield Err(io::Error::other("simulated connection reset"));
                        return;
                    }
                    Some(Failure::Stall { stall, .. }) => {
                        state.stats.fault();
                        if !sleep_until(&state, Instant::now() + stall).await {
                            guard.end(Ending::Aborted);
                            yield Err(shutting_down());
                            return;
                        }
                    }
                    Some(Failure::InStream { error_type, .. }) => {
                        state.stats.fault();
                        yield Ok(enc.error(&error_type));
                        guard.end(Ending::Completed);
                        return;
                    }
                    Some(Failure::Malformed { .. }) => {
                        state.stats.fault();
                        yield Ok(enc.malformed());
                    }
                    Some(Failure::CleanEnd { .. }) => {
                        // A clean end of body with no finish reason, usage or terminator.
                        state.stats.fault();
                        guard.end(Ending::Completed);
                        return;
                    }
                    Some(Failure::HugeLine { bytes, .. }) => {
                        state.stats.fault();
                        yield Ok(Bytes::from_static(b"data: "));
                        let mut left = bytes;
                        while left > 0 {
                            let n = usize::try_from(left).unwrap_or(usize::MAX).min(FILL.len());
                            yield Ok(Bytes::from_static(&FILL[..n]));
                            left -= n as u64;
                        }
                        guard.end(Ending::Aborted);
                        yield Err(io::Error::other("simulated connection cut after a huge line"));
                        return;
                    }
                    _ => {}
                }
            }
            let Some(piece) = script.chunks.get(index) else {
                break;
            };
            index += 1;
            let tokens = count_tokens(piece);
            if paced {
                // Pace by the running total so rounding does not accumulate; skip sub-ms waits,
                // which the timer would round up to a full millisecond each.
                let due_at = content_start + Duration::from_secs_f64(sent as f64 / script.tokens_per_sec);
                if due_at > Instant::now() + Duration::from_millis(1)
                    && !sleep_until(&state, due_at).await
                {
                    guard.end(Ending::Aborted);
                    yield Err(shutting_down());
                    return;
                }
            }
            yield Ok(enc.delta(piece));
            sent += tokens;
            if !script.ping_every.is_zero() && last_ping.elapsed() >= script.ping_every {
                if let Some(ping) = enc.ping() {
                    yield Ok(ping);
                }
                last_ping = Instant::now();
            }
        }
        for bytes in enc.finish() {
            yield Ok(bytes);
        }
        if let Some(Failure::NoTerminator { hold }) = failure {
            // A complete answer whose terminator never comes; the body ends cleanly later.
            state.stats.fault();
            if !sleep_until(&state, Instant::now() + hold).await {
                guard.end(Ending::Aborted);
                yield Err(shutting_down());
                return;
            }
            guard.end(Ending::Completed);
            script.served.log(&state);
            return;
        }
        yield Ok(enc.terminator());
        guard.end(Ending::Completed);
        script.served.log(&state);
    }
}

/// Frames one SSE event: an optional `event:` line, one `data:` line, a blank line.
pub(crate) fn sse(event: Option<&str>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 32);
    if let Some(event) = event {
        out.push_str("event: ");
        out.push_str(event);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(data);
    out.push_str("\n\n");
    Bytes::from(out)
}

/// How long a non-streamed answer of `tokens` tokens takes to generate.
pub(crate) fn generation_time(ttft: Duration, tokens_per_sec: f64, tokens: u64) -> Duration {
    if tokens_per_sec.is_finite() && tokens_per_sec > 0.0 {
        ttft + Duration::from_secs_f64(tokens as f64 / tokens_per_sec)
    } else {
        ttft
    }
}

/// The answer to a request that gets none: held until the simulator shuts down (`silent`), or
/// its connection reset (`reset`). Either way the client sees no byte of a response.
pub(crate) async fn no_answer(
    state: &SimState,
    failure: &Failure,
    conn: Option<&ConnControl>,
) -> axum::response::Response {
    state.stats.fault();
    match (failure, conn) {
        (Failure::Reset, Some(conn)) => conn.reset(),
        (Failure::Reset, None) => {
            tracing::warn!("reset fault without a connection handle; holding the request instead");
        }
        _ => {}
    }
    state.shutdown.cancelled().await;
    axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response()
}

/// Sleeps `d` unless the simulator shuts down first (`false` then).
pub(crate) async fn wait(state: &SimState, d: Duration) -> bool {
    d.is_zero() || sleep_until(state, Instant::now() + d).await
}
