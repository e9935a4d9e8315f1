//! How a route ended: its outcome (attempts, text, usage, cost) and its error.

use std::fmt::Write as _;
use std::time::Duration;

use crate::cost::Cost;
use crate::provider::ProviderError;
use crate::stream::{FinishReason, ProviderKind, Usage};

use super::attempt::{AttemptError, AttemptRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteStatus {
    Succeeded,
    Failed,
    /// The caller dropped the stream before it ended.
    Cancelled,
}

impl RouteStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteStatus::Succeeded => "succeeded",
            RouteStatus::Failed => "failed",
            RouteStatus::Cancelled => "cancelled",
        }
    }
}

/// Everything the router knows about a finished (or abandoned) route; what metrics record.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteOutcome {
    /// Every attempt in the order tried, including models skipped by an open circuit.
    pub attempts: Vec<AttemptRecord>,
    pub status: RouteStatus,
    /// The committed content (what the caller received).
    pub text: String,
    /// The committed attempt's provider and model, or the last one tried.
    pub provider: Option<ProviderKind>,
    pub model: Option<String>,
    /// The answering attempt's own usage (for a failed route, the last attempt that made a
    /// call). Failed attempts before it have their own usage in `attempts`.
    pub usage: Usage,
    /// What the whole route cost: every attempt that reached a model, failed ones included
    /// (each is billed in its own record).
    pub cost: Cost,
    /// Whether any attempt's usage was estimated.
    pub cost_estimated: bool,
    /// From the route's start to the first content delta the caller received.
    pub ttft: Option<Duration>,
    pub latency: Duration,
    /// Whether a call went to a model other than the route's primary.
    pub fallback_used: bool,
    pub finish_reason: Option<FinishReason>,
    /// Streams that broke after content and were finished by another call, in order.
    pub rescues: Vec<Rescue>,
}

impl RouteOutcome {
    /// Whether the answer was finished by another call after a stream broke mid-answer.
    pub fn rescued(&self) -> bool {
        !self.rescues.is_empty()
    }
}

/// One stream that broke after content, and the call that took over.
#[derive(Debug, Clone, PartialEq)]
pub struct Rescue {
    /// Restart (the caller drops what it had) or continue (the caller keeps it).
    pub mode: crate::catalog::MidStreamFailover,
    /// The model whose stream broke, and the one asked to finish the answer.
    pub from: String,
    pub to: String,
    /// Why the stream broke (the provider error).
    pub reason: String,
    /// Bytes of content the broken stream had delivered: discarded on a restart, kept and
    /// continued from on a continue.
    pub delivered_bytes: usize,
}

/// A route that ended in error, with what it did and spent before that.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteFailure {
    pub error: RouteError,
    pub outcome: RouteOutcome,
}

/// One line of an error's attempt list: model, provider, what went wrong.
pub type AttemptSummary = (String, ProviderKind, AttemptError);

/// Why a route failed. `Display` lists every attempt in the order tried.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    #[error("unknown model {model:?}; the catalog has: {}", known.join(", "))]
    UnknownModel { model: String, known: Vec<String> },
    #[error(
        "model {model} needs the {provider} provider, which is not configured (set its API key, or use the simulator)"
    )]
    NoProvider {
        provider: ProviderKind,
        model: String,
    },
    #[error("{}", not_retryable_message(attempts))]
    NotRetryable { attempts: Vec<AttemptSummary> },
    #[error("all {} attempts failed: {}", attempts.len(), list(attempts))]
    AllAttemptsFailed { attempts: Vec<AttemptSummary> },
    #[error(
        "the retry budget is spent (too many retries across recent requests), stopped after {} attempts: {}",
        attempts.len(),
        list(attempts)
    )]
    RetryBudgetExhausted { attempts: Vec<AttemptSummary> },
    /// The provider refused the request itself (invalid, refused by its content policy, too
    /// long for every model): the caller must change it; no other model was tried.
    #[error("{model} ({provider}) refused the request: {error}")]
    Rejected {
        model: String,
        provider: ProviderKind,
        error: ProviderError,
        attempts: Vec<AttemptSummary>,
    },
    #[error(
        "the request's total deadline of {} ms passed after {} attempts: {}",
        after.as_millis(),
        attempts.len(),
        list(attempts)
    )]
    DeadlineExceeded {
        after: Duration,
        attempts: Vec<AttemptSummary>,
    },
    /// A dollar budget had no room for the next attempt's worst case (or could not be checked
    /// and budgets fail closed): no call was made for it.
    #[error("{denied}")]
    Budget {
        denied: crate::budgets::BudgetDenied,
        attempts: Vec<AttemptSummary>,
    },
    #[error("{model} ({provider}) failed after {produced_chars} characters had been sent: {error}")]
    MidStream {
        model: String,
        provider: ProviderKind,
        error: ProviderError,
        produced_chars: usize,
    },
}

impl RouteError {
    /// A short, stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            RouteError::UnknownModel { .. } => "unknown_model",
            RouteError::NoProvider { .. } => "no_provider",
            RouteError::NotRetryable { .. } => "not_retryable",
            RouteError::AllAttemptsFailed { .. } => "all_attempts_failed",
            RouteError::RetryBudgetExhausted { .. } => "retry_budget_exhausted",
            RouteError::MidStream { .. } => "mid_stream",
            RouteError::Rejected { .. } => "rejected",
            RouteError::DeadlineExceeded { .. } => "deadline_exceeded",
            RouteError::Budget { denied, .. } => denied.kind(),
        }
    }

    /// The attempts listed by the error, in the order tried (empty where it lists none).
    pub fn attempts(&self) -> &[AttemptSummary] {
        match self {
            RouteError::NotRetryable { attempts }
            | RouteError::AllAttemptsFailed { attempts }
            | RouteError::RetryBudgetExhausted { attempts }
            | RouteError::Rejected { attempts, .. }
            | RouteError::DeadlineExceeded { attempts, .. }
            | RouteError::Budget { attempts, .. } => attempts,
            _ => &[],
        }
    }
}

fn list(attempts: &[AttemptSummary]) -> String {
    let mut out = String::new();
    for (i, (model, provider, error)) in attempts.iter().enumerate() {
        let sep = if i == 0 { "" } else { "; " };
        let _ = write!(out, "{sep}#{} {model} ({provider}): {error}", i + 1);
    }
    out
}

fn not_retryable_message(attempts: &[AttemptSummary]) -> String {
    match attempts.last() {
        Some((model, provider, error)) => format!(
            "{model} ({provider}) failed with an error that retrying cannot fix: {error} (attempts: {})",
            list(attempts)
        ),
        None => "a request failed with an error that retrying cannot fix".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_listed_in_order() {
        let e = RouteError::AllAttemptsFailed {
            attempts: vec![
                ("a".into(), ProviderKind::OpenAi, AttemptError::Cancelled),
                ("b".into(), ProviderKind::Anthropic, AttemptError::Cancelled),
            ],
        };
        let s = e.to_string();
        let a = s.find("#1 a (openai)").unwrap();
        let b = s.find("#2 b (anthropic)").unwrap();
        assert!(a < b, "{s}");
        assert_eq!(e.kind(), "all_attempts_failed");
    }
}
