//! Server-sent event framing for provider streams: bytes arriving in arbitrary pieces become
//! complete events, following the WHATWG `text/event-stream` rules (lines end in CRLF, LF or CR;
//! `data:` lines of one event are joined with `\n`; a blank line dispatches; `:` lines are
//! comments; one space after the colon is dropped).
//!
//! Written for the OpenAI stream's hot path instead of `eventsource-stream`, which builds each
//! event through a parser-combinator pass and several owned strings: here a line is sliced out of
//! one reused buffer and only the event's `data` is copied, once.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SseEvent {
    /// The `event:` field; empty when the event had none (the spec's `message`).
    pub event: String,
    pub data: String,
}

/// A stream that is not UTF-8 text: the spec decodes it as UTF-8, providers only send UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the event stream is not valid UTF-8 (a line starting {start:?})")]
pub(crate) struct NotUtf8 {
    pub start: String,
}

/// Incremental framer. Feed it pieces; complete events are appended to the caller's queue.
#[derive(Debug, Default)]
pub(crate) struct SseFramer {
    /// The current, unterminated line.
    line: Vec<u8>,
    /// The event being assembled.
    event: SseEvent,
    /// Whether any `data:` line arrived for it (an empty `data:` still makes an event).
    has_data: bool,
    /// The last piece ended in CR: a LF starting the next one belongs to that line end.
    after_cr: bool,
}

impl SseFramer {
    pub(crate) fn feed(
        &mut self,
        mut bytes: &[u8],
        out: &mut Vec<SseEvent>,
    ) -> Result<(), NotUtf8> {
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
                self.line_done(head, out)?;
            } else {
                self.line.extend_from_slice(head);
                let line = std::mem::take(&mut self.line);
                let result = self.line_done(&line, out);
                // Keep the allocation for the next split line.
                self.line = line;
                self.line.clear();
                result?;
            }
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), NotUtf8> {
        if line.is_empty() {
            if self.has_data {
                self.has_data = false;
                out.push(std::mem::take(&mut self.event));
            } else {
                self.event.event.clear();
            }
            return Ok(());
        }
        let line = std::str::from_utf8(line).map_err(|_| NotUtf8 {
            start: String::from_utf8_lossy(&line[..line.len().min(40)]).into_owned(),
        })?;
        let (field, value) = match line.split_once(':') {
            Some(("", _)) => return Ok(()), // a comment
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
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
    fn invalid_utf8_is_an_error_naming_the_line() {
        let mut framer = SseFramer::default();
        let err = framer
            .feed(b"data: \xff\xfe\n\n", &mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("data: "), "{err}");
    }
}
