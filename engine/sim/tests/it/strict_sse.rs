//! A strict SSE parser and protocol checkers for OpenAI chunk streams and Anthropic event
//! streams, used to hold the simulator to the wire format. The framing rules it enforces: lines
//! end in `\n`, `\r\n` or `\r`; a blank line dispatches an event; `name: value` drops one
//! space after the colon; several `data:` lines join with `\n`; `:` lines are comments.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
    pub id: Option<String>,
}

/// Parses a complete or partial SSE body. Returns the dispatched events and whether the input
/// ended mid-event (bytes after the last blank line).
pub fn parse(text: &str) -> (Vec<SseEvent>, bool) {
    let mut events = Vec::new();
    let mut event: Option<String> = None;
    let mut data: Option<String> = None;
    let mut id: Option<String> = None;
    let mut pending = false;
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut chars = text.chars().peekable();
    let mut terminated = true;
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                lines.push(std::mem::take(&mut line));
                terminated = true;
            }
            '\n' => {
                lines.push(std::mem::take(&mut line));
                terminated = true;
            }
            c => {
                line.push(c);
                terminated = false;
            }
        }
    }
    let trailing_partial_line = !terminated && !line.is_empty();
    for line in lines {
        if line.is_empty() {
            if let Some(d) = data.take() {
                events.push(SseEvent {
                    event: event.take(),
                    data: d,
                    id: id.clone(),
                });
            }
            event = None;
            pending = false;
            continue;
        }
        pending = true;
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => event = Some(value.to_owned()),
            "data" => match data.as_mut() {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            "id" => id = Some(value.to_owned()),
            _ => {}
        }
    }
    (events, pending || trailing_partial_line)
}

/// What an OpenAI stream said, once checked.
#[derive(Debug)]
pub struct OpenAiStream {
    pub text: String,
    pub finish_reason: String,
    pub usage: Option<Value>,
}

/// Checks the invariants of a complete OpenAI chunk stream (one id, model and `created` for
/// all chunks, `finish_reason` once, usage just before `[DONE]`) and returns its content.
pub fn check_openai(events: &[SseEvent], include_usage: bool) -> OpenAiStream {
    assert!(events.len() >= 3, "too few events: {events:?}");
    assert_eq!(
        events.last().map(|e| e.data.as_str()),
        Some("[DONE]"),
        "[DONE] must be last"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| {
            assert!(
                e.event.is_none(),
                "chat completions events have no event: line"
            );
            assert_ne!(e.data, "[DONE]", "[DONE] only once, at the end");
            serde_json::from_str(&e.data)
                .unwrap_or_else(|err| panic!("not JSON ({err}): {}", e.data))
        })
        .collect();
    let id = chunks[0]["id"].as_str().unwrap().to_owned();
    let created = chunks[0]["created"].as_u64().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "");
    let mut text = String::new();
    let mut finish_reason = None;
    let mut usage = None;
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk["id"], id.as_str(), "same id in every chunk");
        assert_eq!(chunk["created"], created, "same created in every chunk");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert!(chunk.get("error").is_none());
        let last = i == chunks.len() - 1;
        if include_usage {
            if last {
                assert_eq!(
                    chunk["choices"],
                    Value::Array(vec![]),
                    "usage chunk has no choices"
                );
                assert!(chunk["usage"].is_object());
                usage = Some(chunk["usage"].clone());
                continue;
            }
            assert!(
                chunk["usage"].is_null() && chunk.get("usage").is_some(),
                "usage: null on chunk {i}"
            );
        } else {
            assert!(chunk.get("usage").is_none());
        }
        let choice = &chunk["choices"][0];
        assert_eq!(choice["index"], 0);
        assert!(
            finish_reason.is_none(),
            "nothing after the finish chunk but usage"
        );
        if let Some(c) = choice["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if let Some(r) = choice["finish_reason"].as_str() {
            assert_eq!(choice["delta"], serde_json::json!({}));
            finish_reason = Some(r.to_owned());
        }
    }
    OpenAiStream {
        text,
        finish_reason: finish_reason.expect("a finish_reason chunk"),
        usage,
    }
}

/// What an Anthropic stream said, once checked.
#[derive(Debug)]
pub struct AnthropicStream {
    pub text: String,
    pub block_type: String,
    pub stop_reason: String,
    pub start_usage: Value,
    pub final_usage: Value,
    pub pings: usize,
}

/// Checks the order and naming of a complete Anthropic event stream (`message_start`, blocks
/// started, delta'd and stopped by index, `message_delta`, `message_stop`; `ping` anywhere).
pub fn check_anthropic(events: &[SseEvent]) -> AnthropicStream {
    let mut parsed = Vec::new();
    for e in events {
        let name = e
            .event
            .clone()
            .expect("every Anthropic event has an event: line");
        let json: Value = serde_json::from_str(&e.data)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", e.data));
        assert_eq!(json["type"], name.as_str(), "event name equals JSON type");
        parsed.push((name, json));
    }
    let pings = parsed.iter().filter(|(n, _)| n == "ping").count();
    let seq: Vec<&(String, Value)> = parsed.iter().filter(|(n, _)| n != "ping").collect();
    assert_eq!(seq.first().map(|(n, _)| n.as_str()), Some("message_start"));
    assert_eq!(seq.last().map(|(n, _)| n.as_str()), Some("message_stop"));
    let start = &seq[0].1["message"];
    assert_eq!(start["type"], "message");
    assert_eq!(start["role"], "assistant");
    assert_eq!(start["content"], Value::Array(vec![]));
    assert!(start["stop_reason"].is_null());
    let start_usage = start["usage"].clone();
    assert_eq!(start_usage["output_tokens"], 1, "provisional output tokens");
    let mut open_block: Option<u64> = None;
    let mut next_index = 0u64;
    let mut text = String::new();
    let mut block_type = String::new();
    let mut deltas_seen = false;
    let mut final_usage = None;
    let mut stop_reason = None;
    for (name, json) in &seq[1..seq.len() - 1] {
        match name.as_str() {
            "content_block_start" => {
                assert!(open_block.is_none() && final_usage.is_none());
                assert_eq!(json["index"], next_index);
                open_block = Some(next_index);
                block_type = json["content_block"]["type"].as_str().unwrap().to_owned();
            }
            "content_block_delta" => {
                assert_eq!(
                    Some(json["index"].as_u64().unwrap()),
                    open_block,
                    "delta index"
                );
                let d = &json["delta"];
                match d["type"].as_str().unwrap() {
                    "text_delta" => text.push_str(d["text"].as_str().unwrap()),
                    "input_json_delta" => text.push_str(d["partial_json"].as_str().unwrap()),
                    other => panic!("unexpected delta {other}"),
                }
                deltas_seen = true;
            }
            "content_block_stop" => {
                assert_eq!(Some(json["index"].as_u64().unwrap()), open_block);
                open_block = None;
                next_index += 1;
            }
            "message_delta" => {
                assert!(open_block.is_none(), "message_delta after the blocks close");
                let out = json["usage"]["output_tokens"].as_u64().unwrap();
                if let Some(prev) = final_usage
                    .as_ref()
                    .and_then(|u: &Value| u["output_tokens"].as_u64())
                {
                    assert!(out >= prev, "cumulative usage never decreases");
                }
                final_usage = Some(json["usage"].clone());
                stop_reason = json["delta"]["stop_reason"].as_str().map(str::to_owned);
            }
            other => panic!("unexpected event {other} in the middle"),
        }
    }
    assert!(deltas_seen || text.is_empty());
    AnthropicStream {
        text,
        block_type,
        stop_reason: stop_reason.expect("message_delta with stop_reason"),
        start_usage,
        final_usage: final_usage.expect("a message_delta"),
        pings,
    }
}

#[test]
fn parser_follows_the_framing_rules() {
    let text = ": keep-alive\r\nevent: a\r\ndata: one\r\ndata:two\r\n\r\ndata:  spaced\rid: 7\r\rdata: x\n\nevent: lost\n\ndata: partial";
    let (events, partial) = parse(text);
    assert_eq!(
        events,
        vec![
            SseEvent {
                event: Some("a".into()),
                data: "one\ntwo".into(),
                id: None
            },
            SseEvent {
                event: None,
                data: " spaced".into(),
                id: Some("7".into())
            },
            SseEvent {
                event: None,
                data: "x".into(),
                id: Some("7".into())
            },
        ]
    );
    assert!(
        partial,
        "a trailing event without a blank line is incomplete"
    );
    let (_, partial) = parse("data: done\n\n");
    assert!(!partial);
}
