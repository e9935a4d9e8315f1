//! Token counts for text, used where a provider did not (or could not) report usage.
//!
//! One tokenizer (`o200k_base`, the GPT-4o/GPT-5 vocabulary, embedded in `tiktoken-rs`, no
//! network) serves both providers: for Anthropic models it is an estimate, which is why any
//! cost computed from it is flagged `estimated`. The simulator counts with the same function,
//! so its reported usage is consistent with the text it sends.

use std::sync::LazyLock;

use tiktoken_rs::CoreBPE;

use crate::provider::ChatMessage;

/// Per-message framing overhead of chat formats (role markers), and the reply primer.
const TOKENS_PER_MESSAGE: u64 = 3;
const REPLY_PRIMER_TOKENS: u64 = 3;

static BPE: LazyLock<Option<CoreBPE>> = LazyLock::new(|| tiktoken_rs::o200k_base().ok());

/// Number of tokens in `text`. Falls back to ~4 characters per token if the embedded vocabulary
/// failed to load (it never has; the fallback keeps cost estimates non-zero rather than absent).
pub fn count_tokens(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    match BPE.as_ref() {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        None => (text.chars().count() as u64).div_ceil(4),
    }
}

/// Estimated prompt tokens of a chat request: every message's tokens plus framing.
pub fn count_prompt_tokens(system: Option<&str>, messages: &[ChatMessage]) -> u64 {
    framed(system, messages, count_tokens)
}

/// Tokens of every message by `count`, plus the chat format's framing.
fn framed(system: Option<&str>, messages: &[ChatMessage], count: impl Fn(&str) -> u64) -> u64 {
    let system_tokens = system.map_or(0, |s| count(s) + TOKENS_PER_MESSAGE);
    let message_tokens: u64 = messages
        .iter()
        .map(|m| count(&m.content) + TOKENS_PER_MESSAGE)
        .sum();
    system_tokens + message_tokens + REPLY_PRIMER_TOKENS
}

/// A quick upper-leaning estimate of the tokens in `bytes` bytes of text, without the vocabulary.
///
/// Used where a count only has to be close and is corrected later (rate-limit reservations are
/// settled with the provider's reported usage): tokenizing there would cost CPU on every request
/// and load the ~40 MiB vocabulary into a process that otherwise never needs it. o200k averages
/// about 4 bytes per token on English prose and about 3 on JSON and CJK text (3-byte characters,
/// roughly a token each), so one token per 3 bytes overcounts most text and undercounts only
/// punctuation-dense code, by a few percent.
pub fn estimate_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(3)
}

/// Counts tokens of streamed text without the vocabulary, for output whose usage the provider
/// never reported (a cut or cancelled stream whose text was not kept). It mimics how the
/// `o200k` pre-tokenizer splits text: a run of letters is one token per started 10 letters
/// (common words are single tokens), a run of digits one per 3, a run of punctuation one per
/// started 3 characters (`":"`, `","`, `{"` are single tokens), a run of several blanks one, and
/// each CJK character one. Fed piece by piece as the deltas arrive; runs continue across pieces.
///
/// Measured against the tokenizer on the simulator's answers (prose and the four agents' JSON,
/// 200 answers each): within 7 % on every answer (`engine/core/tests/it/estimates.rs`), where the
/// old one-token-per-3-bytes rule was off by up to +76 % on prose.
#[derive(Debug, Clone, Default)]
pub struct TokenEstimator {
    whole: u64,
    class: Option<CharClass>,
    run: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CharClass {
    Letter,
    Digit,
    Blank,
    Punct,
}

impl TokenEstimator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, text: &str) {
        for ch in text.chars() {
            if ch.is_alphabetic() && ch.len_utf8() >= 3 {
                // CJK and similar scripts: about a token per character.
                self.flush();
                self.whole += 1;
                continue;
            }
            let class = if ch.is_alphabetic() {
                CharClass::Letter
            } else if ch.is_numeric() {
                CharClass::Digit
            } else if ch.is_whitespace() {
                CharClass::Blank
            } else {
                CharClass::Punct
            };
            if self.class == Some(class) {
                self.run += 1;
            } else {
                self.flush();
                self.class = Some(class);
                self.run = 1;
            }
        }
    }

    /// The estimate for everything fed so far.
    pub fn total(&self) -> u64 {
        self.whole + Self::run_tokens(self.class, self.run)
    }

    fn flush(&mut self) {
        self.whole += Self::run_tokens(self.class, self.run);
        self.class = None;
        self.run = 0;
    }

    fn run_tokens(class: Option<CharClass>, run: u64) -> u64 {
        match class {
            _ if run == 0 => 0,
            Some(CharClass::Letter) => 1 + (run - 1) / 10,
            Some(CharClass::Digit) => run.div_ceil(3),
            Some(CharClass::Punct) => run.div_ceil(3),
            // A single blank joins the next word's token.
            Some(CharClass::Blank) => u64::from(run > 1),
            None => 0,
        }
    }
}

/// [`TokenEstimator`] over one text.
pub fn estimate_text_tokens(text: &str) -> u64 {
    let mut estimator = TokenEstimator::new();
    estimator.feed(text);
    estimator.total()
}

/// [`count_prompt_tokens`] by [`estimate_tokens`]: same framing, no vocabulary.
pub fn estimate_prompt_tokens(system: Option<&str>, messages: &[ChatMessage]) -> u64 {
    framed(system, messages, |text| estimate_tokens(text.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_plausible_and_deterministic() {
        assert_eq!(count_tokens(""), 0);
        let n = count_tokens("Hello, world! This is a short sentence.");
        assert!((5..=15).contains(&n), "{n}");
        assert_eq!(n, count_tokens("Hello, world! This is a short sentence."));
    }

    #[test]
    fn the_estimator_is_the_same_fed_whole_or_in_pieces_and_close_on_prose() {
        let text = "The quick brown fox jumps over the lazy dog, again and again: 1234567. {\"a\": [1, 2]}";
        let whole = estimate_text_tokens(text);
        let mut pieces = TokenEstimator::new();
        for piece in text.as_bytes().chunks(3) {
            // Pieces at char boundaries (the text is ASCII).
            pieces.feed(std::str::from_utf8(piece).unwrap());
        }
        assert_eq!(pieces.total(), whole);
        let exact = count_tokens(text) as f64;
        let off = (whole as f64 - exact).abs() / exact;
        assert!(off < 0.25, "estimate {whole} vs {exact}");
        assert_eq!(estimate_text_tokens(""), 0);
        assert_eq!(estimate_text_tokens("日本語"), 3);
    }

    #[test]
    fn prompt_count_includes_framing() {
        let msgs = [ChatMessage::user("Hi")];
        let bare = count_tokens("Hi");
        assert_eq!(
            count_prompt_tokens(None, &msgs),
            bare + TOKENS_PER_MESSAGE + REPLY_PRIMER_TOKENS
        );
        assert!(count_prompt_tokens(Some("Be brief."), &msgs) > count_prompt_tokens(None, &msgs));
    }

    #[test]
    fn estimate_stays_near_the_vocabulary_count() {
        let samples = [
            "Hello, world! This is a short sentence about accounting for freelancers.",
            r#"{"inputs":[{"id":"hours","label":"Billable hours","min":0,"max":80}]}"#,
            "会計事務所のための見積もり計算ツールを作成します。",
            "fn main() { println!(\"{}\", 1 + 2); }",
        ];
        for text in samples {
            let exact = count_tokens(text);
            let quick = estimate_tokens(text.len());
            assert!(
                quick * 10 >= exact * 9,
                "{text:?}: estimate {quick} over 10% below exact {exact}"
            );
            assert!(
                quick <= exact * 3,
                "{text:?}: estimate {quick} far above exact {exact}"
            );
        }
        let msgs = [ChatMessage::user("Hi there")];
        assert_eq!(
            estimate_prompt_tokens(None, &msgs),
            estimate_tokens(8) + TOKENS_PER_MESSAGE + REPLY_PRIMER_TOKENS
        );
    }
}
