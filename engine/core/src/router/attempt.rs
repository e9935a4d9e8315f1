//! One attempt against one model: what it produced, what it used and what it cost.
//!
//! Every attempt is costed, because every attempt that reached a model may be billed:
//! * usage reported and the stream ended with `Done` → exact;
//! * the stream opened (`Start`) but usage is missing or partial (reported, then an error) →
//!   estimated with the tokenizer and flagged `usage_estimated`;
//! * the stream never opened (connect refused, HTTP error, circuit open) → nothing consumed,
//!   cost 0, not estimated.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::time::Instant;

use crate::catalog::ModelSpec;
use crate::cost::{Cost, cost};
use crate::provider::ProviderError;
use crate::stream::{FinishReason, ProviderKind, Usage};
use crate::tokenize::{TokenEstimator, count_tokens};

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    /// The id of this call's record (UUID v7), drawn when the call starts so its intent and its
    /// record share it; empty for a model skipped without a call.
    pub record_id: String,
    pub provider: ProviderKind,
    pub model: String,
    pub started_at: SystemTime,
    /// From the attempt's start to its end (0 for a model skipped without a call).
    pub latency: Duration,
    /// From the attempt's start to its first content delta.
    pub ttft: Option<Duration>,
    pub usage: Usage,
    pub usage_estimated: bool,
    pub cost: Cost,
    pub finish_reason: Option<FinishReason>,
    /// `None` when the attempt finished with `Done`.
    pub error: Option<AttemptError>,
    /// Characters of content the attempt produced.
    pub output_chars: usize,
    /// The answer was complete but its stream ended without the terminator.
    pub unterminated: bool,
}

/// Why an attempt did not succeed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AttemptError {
    #[error(transparent)]
    Provider(ProviderError),
    /// The model's circuit breaker refused the call; no request was sent. `until` is `None`
    /// while the breaker is half-open and another request is making the one trial call;
    /// `account` names the account error that disabled the model, if that is why.
    #[error("{}", circuit_open_message(model, until, account))]
    CircuitOpen {
        model: String,
        until: Option<SystemTime>,
        account: Option<&'static str>,
    },
    /// Our own per-provider budget (requests or tokens per minute) had no room; no request was
    /// sent. Not the provider's fault: it never counts against the model's circuit breaker.
    #[error(
        "the local {which}-per-minute budget for {provider} is spent (KEYVEX_PROVIDER_RPM / KEYVEX_PROVIDER_TPM); room again in {} ms",
        retry_after.as_millis()
    )]
    BudgetRefused {
        provider: ProviderKind,
        /// `"requests"` or `"tokens"`.
        which: &'static str,
        retry_after: Duration,
    },
    /// A dollar budget had no room for the attempt's worst case (or could not be asked); no
    /// request was sent, and the route ends here.
    #[error(transparent)]
    Spend(crate::budgets::BudgetDenied),
    /// The caller dropped the route stream while this attempt was running.
    #[error("cancelled: the caller went away before the attempt finished")]
    Cancelled,
}

impl AttemptError {
    /// A short, stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AttemptError::Provider(e) => e.kind(),
            AttemptError::CircuitOpen { .. } => "circuit_open",
            AttemptError::BudgetRefused { .. } => "local_budget",
            AttemptError::Spend(denied) => denied.kind(),
            AttemptError::Cancelled => "cancelled",
        }
    }

    /// The attempt was refused before any request went out (open circuit, spent local or
    /// dollar budget).
    pub fn made_no_call(&self) -> bool {
        matches!(
            self,
            AttemptError::CircuitOpen { .. }
                | AttemptError::BudgetRefused { .. }
                | AttemptError::Spend(_)
        )
    }
}

fn circuit_open_message(
    model: &str,
    until: &Option<SystemTime>,
    account: &Option<&'static str>,
) -> String {
    let when = |t: &SystemTime| {
        OffsetDateTime::from(*t)
            .format(&Rfc3339)
            .unwrap_or_else(|_| format!("{t:?}"))
    };
    match (until, account) {
        (Some(t), Some(kind)) => format!(
            "model {model} is disabled until {} (the provider refused our account for it: {kind}; check the provider key, quota and billing; the router will try it again then)",
            when(t)
        ),
        (Some(t), None) => {
            format!(
                "circuit open for model {model} until {} (it failed repeatedly; the router will try it again then)",
                when(t)
            )
        }
        (None, _) => format!(
            "circuit half-open for model {model}: another request is probing it, try again shortly"
        ),
    }
}

/// Wall-clock time of a `tokio` instant (which tests may pause), for display.
pub(crate) fn wall_clock(at: Instant) -> SystemTime {
    let now = Instant::now();
    if at >= now {
        SystemTime::now() + (at - now)
    } else {
        SystemTime::now() - (now - at)
    }
}

/// Accumulates one running attempt's events.
#[derive(Debug)]
pub(crate) struct AttemptMeter {
    record_id: String,
    /// The model called, shared with the catalog: its id and prices are only needed when the
    /// record is made, and a copy of them was kept in every open stream.
    spec: Arc<ModelSpec>,
    started_at: SystemTime,
    start: Instant,
    opened: bool,
    first_content: Option<Instant>,
    usage: Option<Usage>,
    /// The content, when the route keeps it (`RouteOptions::keep_text`).
    text: Option<String>,
    /// Counts the content as it passes when it is not kept, in case the provider never reports
    /// usage (a cut or cancelled stream).
    estimator: Option<TokenEstimator>,
    output_chars: usize,
}

impl AttemptMeter {
    pub(crate) fn new(record_id: String, spec: Arc<ModelSpec>, keep_text: bool) -> Self {
        Self {
            record_id,
            spec,
            started_at: SystemTime::now(),
            start: Instant::now(),
            opened: false,
            first_content: None,
            usage: None,
            text: keep_text.then(String::new),
            estimator: (!keep_text).then(TokenEstimator::new),
            output_chars: 0,
        }
    }

    /// The HTTP stream opened: from here on the provider may bill.
    pub(crate) fn on_open(&mut self) {
        self.opened = true;
    }

    /// Records content; returns whether it was the attempt's first.
    pub(crate) fn on_delta(&mut self, text: &str) -> bool {
        // A delta implies the stream opened even if a provider skipped `Start`.
        self.opened = true;
        self.output_chars += text.chars().count();
        if let Some(kept) = &mut self.text {
            kept.push_str(text);
        }
        if let Some(estimator) = &mut self.estimator {
            estimator.feed(text);
        }
        if self.first_content.is_some() {
            return false;
        }
        self.first_content = Some(Instant::now());
        true
    }

    pub(crate) fn on_usage(&mut self, usage: Usage) {
        self.opened = true;
        self.usage = Some(usage);
    }

    pub(crate) fn has_content(&self) -> bool {
        self.first_content.is_some()
    }

    /// The provider accepted the request (response headers in).
    pub(crate) fn is_open(&self) -> bool {
        self.opened
    }

    pub(crate) fn started_at(&self) -> SystemTime {
        self.started_at
    }

    pub(crate) fn record_id(&self) -> &str {
        &self.record_id
    }

    /// Ends the attempt. `error` is `None` when the provider sent `Done`; `prompt_tokens` is
    /// only called when usage has to be estimated (tokenizing a long prompt is not free). The
    /// text is empty when it was not kept.
    pub(crate) fn finish(
        self,
        finish_reason: Option<FinishReason>,
        error: Option<AttemptError>,
        prompt_tokens: impl FnOnce() -> u64,
    ) -> (AttemptRecord, String) {
        let (usage, usage_estimated) = match (self.usage, &error) {
            (Some(usage), None) => (usage, false),
            _ if !self.opened => (Usage::default(), false),
            (partial, _) => {
                // A partial report (e.g. Anthropic's `message_start`) knows the prompt exactly,
                // but its output count stops where the stream did: take the larger of what was
                // reported and what we counted.
                let reported = partial.unwrap_or_default();
                let input = if reported.input > 0 {
                    reported.input
                } else {
                    prompt_tokens()
                };
                let usage = Usage {
                    input,
                    cached_input: reported.cached_input.min(input),
                    cache_write: reported.cache_write.min(input),
                    output: reported.output.max(self.seen_output_tokens()),
                };
                (usage, true)
            }
        };
        let record = AttemptRecord {
            record_id: self.record_id,
            provider: self.spec.provider,
            model: self.spec.id.clone(),
            started_at: self.started_at,
            latency: self.start.elapsed(),
            ttft: self.first_content.map(|t| t - self.start),
            usage,
            usage_estimated,
            cost: cost(&usage, &self.spec.pricing),
            finish_reason,
            error,
            output_chars: self.output_chars,
            unterminated: false,
        };
        (record, self.text.unwrap_or_default())
    }

    /// Output tokens of the content seen: counted when the text was kept, else estimated as it
    /// passed ([`TokenEstimator`]).
    fn seen_output_tokens(&self) -> u64 {
        match (&self.text, &self.estimator) {
            (Some(text), _) => count_tokens(text),
            (None, Some(estimator)) => estimator.total(),
            (None, None) => 0,
        }
    }
}

impl AttemptRecord {
    /// A model skipped without a call (its circuit is open, or our budget for its provider is
    /// spent): nothing consumed.
    pub(crate) fn skipped(provider: ProviderKind, model: &str, error: AttemptError) -> Self {
        Self {
            record_id: String::new(),
            provider,
            model: model.to_owned(),
            started_at: SystemTime::now(),
            latency: Duration::ZERO,
            ttft: None,
            usage: Usage::default(),
            usage_estimated: false,
            cost: Cost::ZERO,
            finish_reason: None,
            error: Some(error),
            output_chars: 0,
            unterminated: false,
        }
    }
}

impl fmt::Display for AttemptRecord {
    /// `gpt-5.4 (openai): <error>` or `gpt-5.4 (openai): ok`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.error {
            Some(e) => write!(f, "{} ({}): {e}", self.model, self.provider),
            None => write!(f, "{} ({}): ok", self.model, self.provider),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{Price, Pricing};

    fn spec() -> Arc<ModelSpec> {
        Arc::new(ModelSpec {
            id: "gpt-5.4".into(),
            provider: ProviderKind::OpenAi,
            display_name: "GPT-5.4".into(),
            pricing: Pricing {
                input: Price::from_usd_per_mtok(2.5).unwrap(),
                cached_input: Price::from_usd_per_mtok(0.25).unwrap(),
                cache_write: None,
                output: Price::from_usd_per_mtok(15.0).unwrap(),
            },
            context_window: 400_000,
            max_output_tokens: 128_000,
            anthropic_version: None,
            prefill: false,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn never_opened_costs_nothing() {
        let m = AttemptMeter::new("r".into(), spec(), true);
        let err = AttemptError::Cancelled;
        let (r, _) = m.finish(None, Some(err), || panic!("must not estimate"));
        assert_eq!(r.cost, Cost::ZERO);
        assert!(!r.usage_estimated);
    }

    #[tokio::test(start_paused = true)]
    async fn partial_usage_keeps_the_exact_prompt_and_counts_the_output() {
        let mut m = AttemptMeter::new("r".into(), spec(), true);
        m.on_open();
        m.on_usage(Usage {
            input: 100,
            cached_input: 0,
            cache_write: 0,
            output: 1,
        });
        m.on_delta("Hello there, this is several tokens long.");
        let (r, text) = m.finish(None, Some(AttemptError::Cancelled), || 7);
        assert!(r.usage_estimated);
        assert_eq!(r.usage.input, 100);
        assert!(r.usage.output > 1);
        assert_eq!(text, "Hello there, this is several tokens long.");
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_text_a_cut_stream_is_estimated_from_its_length() {
        let mut m = AttemptMeter::new("r".into(), spec(), false);
        m.on_open();
        m.on_delta("Hello there, ");
        m.on_delta("this is several tokens long. ñ");
        let (r, text) = m.finish(None, Some(AttemptError::Cancelled), || 7);
        assert!(text.is_empty());
        assert!(r.usage_estimated);
        assert_eq!(r.usage.input, 7);
        // Words, blanks and punctuation as the estimator counts them, close to the tokenizer.
        let estimate =
            crate::tokenize::estimate_text_tokens("Hello there, this is several tokens long. ñ");
        assert_eq!(r.usage.output, estimate);
        let exact = count_tokens("Hello there, this is several tokens long. ñ");
        assert!(estimate.abs_diff(exact) <= 2, "{estimate} vs {exact}");
        assert_eq!(r.output_chars, 43);
        assert!(r.cost > Cost::ZERO);
    }

    #[test]
    fn circuit_open_names_the_model() {
        let e = AttemptError::CircuitOpen {
            model: "gpt-5.4".into(),
            until: Some(SystemTime::UNIX_EPOCH),
            account: None,
        };
        assert_eq!(
            e.to_string(),
            "circuit open for model gpt-5.4 until 1970-01-01T00:00:00Z (it failed repeatedly; the router will try it again then)"
        );
    }
}
