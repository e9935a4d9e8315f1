//! Continuing a chat answer whose stream broke: the request that asks the next call to go on
//! from the text already sent, and the trim of what the continuation repeats at the seam.

use crate::provider::ChatMessage;

/// The user turn that asks a model without assistant prefill to continue its own cut answer,
/// sent after that answer as an assistant message (so the conversation still ends with the user).
pub const CONTINUE_INSTRUCTION: &str = "Your previous answer was cut off mid-way. Continue it exactly where it stopped: do not repeat any of it, do not comment on the interruption, start with the very next characters.";

/// The continuation may repeat the end of what was sent (models restart a sentence or a word);
/// its first bytes are held back until this many have come (or the stream ends) to find that.
const SEAM_WINDOW: usize = 256;

/// A shorter match is taken for chance, not repetition: a continuation that starts with a
/// space or a common short word is not trimmed.
const MIN_OVERLAP: usize = 8;

/// `messages` extended so the next call continues `sent`: as an assistant prefill for a model
/// that accepts one (without trailing whitespace, which Anthropic refuses at the end of a
/// prefill), otherwise as the cut answer followed by [`CONTINUE_INSTRUCTION`].
pub(super) fn continuation(messages: &mut Vec<ChatMessage>, sent: &str, prefill: bool) {
    if prefill {
        messages.push(ChatMessage::assistant(sent.trim_end()));
    } else {
        messages.push(ChatMessage::assistant(sent));
        messages.push(ChatMessage::user(CONTINUE_INSTRUCTION));
    }
}

/// The start of a continuation, held until its overlap with the text already sent is known.
#[derive(Debug)]
pub(super) struct Seam {
    /// The end of the text already sent (up to the window, on a char boundary).
    tail: String,
    /// Whitespace cut off the prefill: a continuation that starts with it starts with what the
    /// caller already has.
    trimmed_ws: String,
    held: String,
}

impl Seam {
    pub(super) fn new(sent: &str, prefill: bool) -> Seam {
        let mut from = sent.len().saturating_sub(SEAM_WINDOW);
        while !sent.is_char_boundary(from) {
            from += 1;
        }
        let trimmed_ws = if prefill {
            sent[sent.trim_end().len()..].to_owned()
        } else {
            String::new()
        };
        Seam {
            tail: sent[from..].to_owned(),
            trimmed_ws,
            held: String::new(),
        }
    }

    /// Takes a delta of the continuation; returns what may be forwarded once the seam is known
    /// (`None` while still holding).
    pub(super) fn push(&mut self, delta: &str) -> Option<String> {
        self.held.push_str(delta);
        (self.held.len() >= SEAM_WINDOW).then(|| self.resolve())
    }

    /// What is held, with the repeated start removed (at the end of the stream, or once the
    /// window is full).
    pub(super) fn resolve(&mut self) -> String {
        let mut held = std::mem::take(&mut self.held);
        if !self.trimmed_ws.is_empty() && held.starts_with(&self.trimmed_ws) {
            held.drain(..self.trimmed_ws.len());
        }
        let k = overlap(&self.tail, &held);
        held.split_off(k)
    }
}

/// The length of the longest start of `next` that `sent` ends with, if at least
/// [`MIN_OVERLAP`] bytes long (else 0).
fn overlap(sent: &str, next: &str) -> usize {
    let longest = sent.len().min(next.len());
    (MIN_OVERLAP..=longest)
        .rev()
        .find(|&k| next.is_char_boundary(k) && sent.ends_with(&next[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_end_is_trimmed_and_a_chance_match_is_not() {
        let sent = "The savings calculator shows the monthly total and";
        let mut seam = Seam::new(sent, false);
        assert_eq!(seam.push(" monthly total and the yearly one."), None);
        assert_eq!(seam.resolve(), " the yearly one.");
        // A continuation that merely starts like the end ("and" + space) is kept whole.
        let mut seam = Seam::new(sent, false);
        seam.push(" and more");
        assert_eq!(seam.resolve(), " and more");
        // Nothing repeated: nothing trimmed.
        let mut seam = Seam::new(sent, false);
        seam.push(" the yearly one.");
        assert_eq!(seam.resolve(), " the yearly one.");
    }

    #[test]
    fn the_window_releases_long_continuations_and_multibyte_text_is_cut_on_boundaries() {
        let sent = "Café crème brûlée — déjà vu";
        let mut seam = Seam::new(sent, false);
        let cont = format!("brûlée — déjà vu, {}", "é".repeat(200));
        let out = seam.push(&cont).expect("past the window");
        assert_eq!(out, format!(", {}", "é".repeat(200)));
    }

    #[test]
    fn whitespace_cut_off_a_prefill_is_not_sent_twice() {
        let sent = "Line one.\n";
        let mut messages = vec![ChatMessage::user("hi")];
        continuation(&mut messages, sent, true);
        assert_eq!(
            messages.last().map(|m| m.content.as_str()),
            Some("Line one.")
        );
        let mut seam = Seam::new(sent, true);
        seam.push("\nLine two.");
        assert_eq!(seam.resolve(), "Line two.");
        let mut messages = vec![ChatMessage::user("hi")];
        continuation(&mut messages, sent, false);
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[2].content, CONTINUE_INSTRUCTION);
    }
}
