//! The one event type every provider yields, and the token usage it reports.
//!
//! Providers translate their wire protocol into [`ProviderEvent`]s; the router and everything
//! above it only ever sees these. Usage is normalised here once, so cost never needs to know
//! which provider it came from (see [`Usage`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::provider::ProviderError;

/// Which wire protocol a model is served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    #[serde(rename = "openai")]
    OpenAi,
    Anthropic,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 2] = [ProviderKind::OpenAi, ProviderKind::Anthropic];

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Token usage of one attempt, normalised across providers.
///
/// * `input` is **every** prompt token the provider processed: uncached, read from cache and
///   written to cache. OpenAI reports exactly this as `prompt_tokens` (cached tokens are inside
///   it); Anthropic reports `input_tokens` *excluding* cache reads and writes, so its adapter adds
///   `cache_read_input_tokens` and `cache_creation_input_tokens` back in.
/// * `cached_input` and `cache_write` are the parts of `input` read from / written to the cache.
/// * `output` is every generated token, reasoning included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub output: u64,
}

impl Usage {
    /// Prompt tokens billed at the plain input price.
    pub fn uncached_input(&self) -> u64 {
        self.input
            .saturating_sub(self.cached_input)
            .saturating_sub(self.cache_write)
    }

    pub fn total(&self) -> u64 {
        self.input + self.output
    }

    pub fn add(&mut self, other: &Usage) {
        self.input += other.input;
        self.cached_input += other.cached_input;
        self.cache_write += other.cache_write;
        self.output += other.output;
    }
}

/// Why generation stopped, mapped from each provider's vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Natural end or a stop sequence (`stop`, `end_turn`, `stop_sequence`).
    Stop,
    /// Output token limit (`length`, `max_tokens`).
    Length,
    /// The model asked for a tool (`tool_calls`, `tool_use`).
    ToolCalls,
    /// Refused or filtered (`content_filter`, `refusal`).
    ContentFilter,
    /// Anything else, verbatim.
    Other(String),
}

impl FinishReason {
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::Other(s) => s,
        }
    }
}

/// One event of a provider stream.
///
/// Order contract for a provider stream: `Start` first (once the HTTP response was accepted),
/// then any number of `Delta`s, at most one `Usage` (the final, authoritative one; a provider
/// that learns usage in pieces merges them before emitting), then exactly one terminal event,
/// `Done` or `Error`. Nothing follows a terminal event. A stream that fails before `Start`
/// yields only `Error`.
///
/// Partial usage: when a stream fails *after* the provider already reported usage (Anthropic
/// sends its input side in `message_start`; OpenAI's usage chunk may arrive just before the
/// connection drops), the provider emits that `Usage` immediately before the `Error`, with the
/// input side exact and `output` the last count reported. A `Usage` followed by `Error` is
/// therefore partial: the router keeps the input side and estimates the output it did not get.
/// A `Usage` followed by `Done` is final.
#[derive(Debug, Clone)]
pub enum ProviderEvent {
    Start {
        provider: ProviderKind,
        model: String,
    },
    Delta(String),
    Usage(Usage),
    Done {
        finish_reason: FinishReason,
    },
    Error(ProviderError),
}

impl ProviderEvent {
    pub fn is_terminal(&self) -> bool {
        matches!(self, ProviderEvent::Done { .. } | ProviderEvent::Error(_))
    }
}
