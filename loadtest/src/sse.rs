//! Server-sent events read off a byte stream, and what one stream tells about its timing, tokens
//! and cost.
//!
//! [`SseParser`] frames events as the WHATWG spec says (lines end in LF, CRLF or CR; an empty line
//! ends an event; `:` starts a comment) and keeps partial lines between chunks, because a chunk
//! boundary can fall anywhere, even between the CR and LF of one line ending.
//! [`StreamObserver`] turns the engine's events (the agent/pipeline protocol and the
//! OpenAI-compatible data-only chunks of `docs/API.md`) into one [`StreamOutcome`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use keyvex_engine::catalog::Catalog;
use keyvex_engine::cost::cost;
use keyvex_engine::stream::Usage;
use serde_json::Value;

/// One dispatched event: its `event:` name (`None` means the default, `message`) and its data
/// lines joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// An incremental SSE parser: feed it chunks as they arrive, take events as they complete.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the line not yet terminated.
    line: Vec<u8>,
    /// The previous chunk ended in CR: a LF at the start of the next one belongs to it.
    after_cr: bool,
    event: Option<String>,
    data: Vec<String>,
    /// A field was seen since the last dispatch (an event with no data is still dropped, as
    /// the spec says, but its name must not leak into the next one).
    pending: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes `chunk` and returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &byte in chunk {
            if self.after_cr {
                self.after_cr = false;
                if byte == b'\n' {
                    continue;
                }
            }
            match byte {
                b'\n' => self.end_line(&mut out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut out);
                }
                _ => self.line.push(byte),
            }
        }
        out
    }

    /// Dispatches an event still open when the body ended without its blank line. The spec
    /// discards it; we keep it so a stream cut right after its last `data:` line still counts
    /// what it said.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.field(&line);
        }
        self.dispatch()
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            out.extend(self.dispatch());
        } else {
            self.field(&line);
        }
    }

    fn field(&mut self, line: &[u8]) {
        if line.first() == Some(&b':') {
            return;
        }
        let text = String::from_utf8_lossy(line);
        let (name, value) = match text.split_once(':') {
            Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
            None => (text.as_ref(), ""),
        };
        match name {
            "event" => {
                self.event = Some(value.to_owned());
                self.pending = true;
            }
            "data" => {
                self.data.push(value.to_owned());
                self.pending = true;
            }
            // `id` and `retry` steer reconnection, which a load test never does.
            _ => {}
        }
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        if !self.pending {
            return None;
        }
        self.pending = false;
        let event = self.event.take();
        if self.data.is_empty() {
            return None;
        }
        let data = std::mem::take(&mut self.data).join("\n");
        Some(SseEvent { event, data })
    }
}

/// Which wire protocol a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Named events (`start`, `delta`, `usage`, `done`, …) of `/v1/agents/*`.
    Agent,
    /// Named events of `/v1/pipelines/tool`: several stages, one `done`.
    Pipeline,
    /// OpenAI-compatible data-only chunks ending in `[DONE]`.
    Chat,
}

/// What one stream showed, with times measured from `started` (the request's send time, or its
/// scheduled send time in open-loop mode).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamOutcome {
    pub first_event: Option<Duration>,
    /// Time to the first content delta.
    pub ttft: Option<Duration>,
    pub end_to_end: Duration,
    /// Longest gap between two consecutive deltas of the same stage.
    pub stall: Option<Duration>,
    pub deltas: u64,
    pub tokens: Usage,
    /// Cost in micro-dollars, as the engine reported it (chat: computed from the catalog).
    pub cost_micro_usd: u64,
    /// The engine's cost was partly an estimate (a stream cut before the provider's usage).
    pub estimated: bool,
    pub fallbacks: u64,
    /// Streams that broke after content and were finished by another call: `restart` events,
    /// or the seams a resumed chat answer lists on its last chunk.
    pub rescues: u64,
    /// `error` events (or an error chunk on the chat route) after the stream started.
    pub stream_errors: u64,
    /// The stream ended the way a success ends (`done` with `succeeded`, or `[DONE]`).
    pub succeeded: bool,
    /// Why it did not, for the error table.
    pub failure: Option<String>,
}

impl StreamOutcome {
    /// Time per output token after the first: `(e2e − ttft) / (n − 1)`; `None` with fewer than
    /// two output tokens or no TTFT.
    pub fn time_per_output_token(&self) -> Option<Duration> {
        let ttft = self.ttft?;
        let n = self.tokens.output;
        if n < 2 {
            return None;
        }
        let span = self.end_to_end.checked_sub(ttft)?;
        let n = u32::try_from(n - 1).unwrap_or(u32::MAX);
        Some(span / n)
    }
}

/// Follows one stream event by event.
pub struct StreamObserver<'a> {
    protocol: Protocol,
    started: Instant,
    catalog: Option<&'a Catalog>,
    /// The chat request's `model` (a process or a model id), to spot a fallback answer.
    requested_model: Option<String>,
    out: StreamOutcome,
    last_delta: HashMap<String, Instant>,
    saw_done: bool,
}

impl<'a> StreamObserver<'a> {
    pub fn new(protocol: Protocol, started: Instant) -> Self {
        StreamObserver {
            protocol,
            started,
            catalog: None,
            requested_model: None,
            out: StreamOutcome::default(),
            last_delta: HashMap::new(),
            saw_done: false,
        }
    }

    /// For chat streams: prices answers with `catalog` and counts an answer from another model
    /// than the process's primary as a fallback.
    pub fn with_catalog(mut self, catalog: &'a Catalog, requested_model: &str) -> Self {
        self.catalog = Some(catalog);
        self.requested_model = Some(requested_model.to_owned());
        self
    }

    /// Takes one event that arrived at `at`.
    pub fn observe(&mut self, event: &SseEvent, at: Instant) {
        let elapsed = at.saturating_duration_since(self.started);
        self.out.first_event.get_or_insert(elapsed);
        match self.protocol {
            Protocol::Agent | Protocol::Pipeline => self.observe_named(event, at, elapsed),
            Protocol::Chat => self.observe_chat(event, at, elapsed),
        }
    }

    fn delta(&mut self, stage: &str, at: Instant, elapsed: Duration) {
        self.out.ttft.get_or_insert(elapsed);
        self.out.deltas += 1;
        if let Some(previous) = self.last_delta.insert(stage.to_owned(), at) {
            let gap = at.saturating_duration_since(previous);
            if self.out.stall.is_none_or(|s| gap > s) {
                self.out.stall = Some(gap);
            }
        }
    }

    fn observe_named(&mut self, event: &SseEvent, at: Instant, elapsed: Duration) {
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        let stage = data["stage"].as_str().unwrap_or("").to_owned();
        match event.event.as_deref().unwrap_or("message") {
            "delta" => self.delta(&stage, at, elapsed),
            "fallback" => self.out.fallbacks += 1,
            "restart" => self.out.rescues += 1,
            "usage" => {
                // Per call; the totals in `done` are authoritative, these count until then.
                let t = &data["tokens"];
                self.out.tokens.input += t["input"].as_u64().unwrap_or(0);
                self.out.tokens.cached_input += t["cachedInput"].as_u64().unwrap_or(0);
                self.out.tokens.cache_write += t["cacheWrite"].as_u64().unwrap_or(0);
                self.out.tokens.output += t["output"].as_u64().unwrap_or(0);
                self.out.cost_micro_usd += data["costMicroUsd"].as_u64().unwrap_or(0);
                self.out.estimated |= data["estimated"].as_bool().unwrap_or(false);
            }
            "error" => {
                self.out.stream_errors += 1;
                let kind = data["kind"].as_str().unwrap_or("unknown");
                self.out
                    .failure
                    .get_or_insert_with(|| format!("stream error: {kind}"));
            }
            "done" => {
                self.saw_done = true;
                let totals = &data["totals"];
                if let Some(micro) = totals["costMicroUsd"].as_u64() {
                    self.out.cost_micro_usd = micro;
                }
                if let Some(t) = totals.get("tokens").filter(|t| t.is_object()) {
                    self.out.tokens = Usage {
                        input: t["input"].as_u64().unwrap_or(0),
                        cached_input: t["cachedInput"].as_u64().unwrap_or(0),
                        cache_write: t["cacheWrite"].as_u64().unwrap_or(0),
                        output: t["output"].as_u64().unwrap_or(0),
                    };
                }
                self.out.estimated |= totals["estimated"].as_bool().unwrap_or(false);
                self.out.succeeded = data["status"].as_str() == Some("succeeded");
                if !self.out.succeeded {
                    let stage = data["failedStage"]
                        .as_str()
                        .or(data["stage"].as_str())
                        .unwrap_or("");
                    self.out
                        .failure
                        .get_or_insert_with(|| format!("done: failed {stage}").trim().to_owned());
                }
            }
            _ => {}
        }
    }

    fn observe_chat(&mut self, event: &SseEvent, at: Instant, elapsed: Duration) {
        if event.data.trim() == "[DONE]" {
            self.saw_done = true;
            if self.out.stream_errors == 0 {
                self.out.succeeded = true;
            }
            return;
        }
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        if let Some(error) = data.get("error") {
            self.out.stream_errors += 1;
            let code = error["code"].as_str().unwrap_or("unknown");
            self.out
                .failure
                .get_or_insert_with(|| format!("stream error: {code}"));
            return;
        }
        if let Some(seams) = data["keyvex"]["resumed"].as_array() {
            // On the finish chunk and again on the usage chunk: the same seams.
            self.out.rescues = self.out.rescues.max(seams.len() as u64);
        }
        let content = data["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or("");
        if !content.is_empty() {
            self.delta("chat", at, elapsed);
        }
        let usage = &data["usage"];
        if usage.is_object() {
            let tokens = Usage {
                input: usage["prompt_tokens"].as_u64().unwrap_or(0),
                cached_input: usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0),
                cache_write: 0,
                output: usage["completion_tokens"].as_u64().unwrap_or(0),
            };
            let model = data["model"].as_str().unwrap_or("");
            if let Some(catalog) = self.catalog {
                if let Some(spec) = catalog.model(model) {
                    self.out.cost_micro_usd = cost(&tokens, &spec.pricing).micro_usd();
                }
                let primary = self
                    .requested_model
                    .as_deref()
                    .and_then(|m| m.parse::<agents::Process>().ok())
                    .map(|p| catalog.route(p).primary.as_str());
                if primary.is_some_and(|p| p != model) {
                    self.out.fallbacks += 1;
                }
            }
            self.out.tokens = tokens;
        }
    }

    /// Ends the stream at `at`: what it showed.
    pub fn finish(mut self, at: Instant) -> StreamOutcome {
        self.out.end_to_end = at.saturating_duration_since(self.started);
        if !self.saw_done && self.out.failure.is_none() {
            self.out.failure = Some("stream ended before done".to_owned());
        }
        if !self.saw_done {
            self.out.succeeded = false;
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpot_divides_the_span_after_the_first_token() {
        let out = StreamOutcome {
            ttft: Some(Duration::from_millis(100)),
            end_to_end: Duration::from_millis(1100),
            tokens: Usage {
                output: 11,
                ..Usage::default()
            },
            ..StreamOutcome::default()
        };
        assert_eq!(
            out.time_per_output_token(),
            Some(Duration::from_millis(100))
        );
    }

    #[test]
    fn an_event_without_data_does_not_leak_its_name() {
        let mut p = SseParser::new();
        let events = p.push(b"event: ping\n\ndata: x\n\n");
        assert_eq!(
            events,
            vec![SseEvent {
                event: None,
                data: "x".into()
            }]
        );
    }
}
