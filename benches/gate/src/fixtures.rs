//! The captured SSE streams the benches replay, and how they are cut into network pieces.
//!
//! Captured once from the simulator by `cargo run -p benches --bin capture` and committed, so a
//! bench run needs no server and measures the same bytes every time.

use agents::Process;
use bytes::Bytes;

/// The agent whose answer is captured: Content Crafter's is the longest of the four, so it
/// dominates streaming cost.
pub const FIXTURE_PROCESS: Process = Process::ContentCrafter;
/// Seed of the simulator and of the sample input the prompt is rendered from.
pub const FIXTURE_SEED: u64 = 7;

pub const OPENAI_FILE: &str = "openai-content-crafter.sse";
pub const ANTHROPIC_FILE: &str = "anthropic-content-crafter.sse";

/// An OpenAI Chat Completions stream (`response_format: json_schema`, usage included).
pub const OPENAI: &[u8] = include_bytes!("../fixtures/openai-content-crafter.sse");
/// An Anthropic Messages stream answering through a forced schema tool.
pub const ANTHROPIC: &[u8] = include_bytes!("../fixtures/anthropic-content-crafter.sse");

/// Cuts an SSE body after every blank line: one piece per event, which is how the simulator
/// writes them and how they arrive from a paced model (one event per TCP read).
pub fn frames(body: &[u8]) -> Vec<Bytes> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < body.len() {
        if body[i] == b'\n' && body[i + 1] == b'\n' {
            pieces.push(Bytes::copy_from_slice(&body[start..i + 2]));
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    if start < body.len() {
        pieces.push(Bytes::copy_from_slice(&body[start..]));
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_every_byte_and_end_at_blank_lines() {
        let body = b"data: a\n\nevent: x\ndata: b\n\ntail";
        let pieces = frames(body);
        assert_eq!(pieces.len(), 3);
        assert_eq!(&pieces[0][..], b"data: a\n\n");
        assert_eq!(&pieces[2][..], b"tail");
        assert_eq!(pieces.concat(), body.to_vec());
    }

    #[test]
    fn captures_are_present_and_end_with_their_terminators() {
        assert!(
            OPENAI.ends_with(b"data: [DONE]\n\n"),
            "regenerate with --bin capture"
        );
        let tail = String::from_utf8_lossy(&ANTHROPIC[ANTHROPIC.len().saturating_sub(80)..]);
        assert!(tail.contains("message_stop"), "{tail}");
        assert!(frames(OPENAI).len() > 50 && frames(ANTHROPIC).len() > 50);
    }
}
