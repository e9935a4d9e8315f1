//! The one mapping from a routed model call's outcome to its metrics record.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::metrics::RequestRecord;
use crate::router::{RouteOutcome, RouteStatus};

/// Who asked and in what context: everything a record needs that the router does not know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    /// Use this request id (the HTTP request's) instead of a fresh one; `None` draws a v7.
    pub request_id: Option<String>,
    pub user_id: String,
    /// Process key, or `None` for a direct model call (recorded as `"direct"`).
    pub process: Option<String>,
    pub run_id: Option<String>,
    pub stage: Option<String>,
    pub session_id: Option<String>,
}

impl RequestRecord {
    /// One record per routed call: usage and cost summed over its attempts, the committed (or
    /// last tried) provider and model, timing from the route's start, and the status. A failed
    /// call's error kind is the last attempt's (`rate_limited`, `ttft_timeout`, …), which says
    /// more than the route-level summary.
    pub fn from_route_outcome(outcome: &RouteOutcome, ctx: &CallContext) -> RequestRecord {
        let provider = outcome.provider.map_or("none", |p| p.as_str());
        let model = outcome.model.as_deref().unwrap_or("none");
        let process = ctx.process.as_deref().unwrap_or("direct");
        let mut rec = RequestRecord::new(&ctx.user_id, process, provider, model)
            .with_usage(&outcome.usage)
            .with_cost(outcome.cost)
            .with_cost_estimated(outcome.cost_estimated)
            .with_latency(
                outcome.latency.as_millis() as u64,
                outcome.ttft.map(|t| t.as_millis() as u64),
            )
            .with_attempts(outcome.attempts.len() as u32, outcome.fallback_used);
        if let Some(id) = &ctx.request_id {
            rec = rec.with_request_id(id);
        }
        if let Some(first) = outcome.attempts.first()
            && let Ok(since) = first.started_at.duration_since(UNIX_EPOCH)
            && first.started_at <= SystemTime::now()
        {
            rec = rec.with_timestamp_ms(since.as_millis() as u64);
        }
        rec.run_id.clone_from(&ctx.run_id);
        rec.stage.clone_from(&ctx.stage);
        rec.session_id.clone_from(&ctx.session_id);
        match outcome.status {
            RouteStatus::Succeeded => rec,
            RouteStatus::Cancelled => rec.cancelled(),
            RouteStatus::Failed => {
                let last = outcome.attempts.iter().rev().find_map(|a| a.error.as_ref());
                match last {
                    Some(e) => rec.failed(e.kind(), &e.to_string()),
                    None => rec.failed("failed", "the call failed without an attempt error"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cost::Cost;
    use crate::router::{AttemptError, AttemptRecord};
    use crate::stream::{ProviderKind, Usage};

    fn outcome(status: RouteStatus, error: Option<AttemptError>) -> RouteOutcome {
        let usage = Usage {
            input: 100,
            cached_input: 10,
            cache_write: 0,
            output: 20,
        };
        RouteOutcome {
            attempts: vec![AttemptRecord {
                provider: ProviderKind::OpenAi,
                model: "gpt-5.4-mini".into(),
                started_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000),
                latency: Duration::from_millis(900),
                ttft: Some(Duration::from_millis(200)),
                usage,
                usage_estimated: false,
                cost: Cost(1234),
                finish_reason: None,
                error,
                output_chars: 80,
            }],
            status,
            text: "x".into(),
            provider: Some(ProviderKind::OpenAi),
            model: Some("gpt-5.4-mini".into()),
            usage,
            cost: Cost(1234),
            cost_estimated: false,
            ttft: Some(Duration::from_millis(210)),
            latency: Duration::from_millis(950),
            fallback_used: false,
            finish_reason: None,
        }
    }

    #[test]
    fn maps_every_field() {
        let ctx = CallContext {
            request_id: Some("req-1".into()),
            user_id: "alice".into(),
            process: Some("magicSpark".into()),
            run_id: Some("run-1".into()),
            stage: Some("magicSpark".into()),
            session_id: Some("s-1".into()),
        };
        let rec = RequestRecord::from_route_outcome(&outcome(RouteStatus::Succeeded, None), &ctx);
        assert_eq!(rec.request_id, "req-1");
        assert_eq!(rec.timestamp_ms, 1_700_000_000_000);
        assert_eq!(
            (rec.user_id.as_str(), rec.process.as_str()),
            ("alice", "magicSpark")
        );
        assert_eq!(
            (rec.provider.as_str(), rec.model.as_str()),
            ("openai", "gpt-5.4-mini")
        );
        assert_eq!(
            (rec.input_tokens, rec.cached_input_tokens, rec.output_tokens),
            (100, 10, 20)
        );
        assert_eq!(rec.cost_pico_usd, 1234);
        assert_eq!((rec.latency_ms, rec.ttft_ms), (950, Some(210)));
        assert!(rec.success);
        assert_eq!(rec.run_id.as_deref(), Some("run-1"));
        assert_eq!(rec.session_id.as_deref(), Some("s-1"));
    }

    #[test]
    fn failed_and_cancelled_calls_say_why() {
        let ctx = CallContext {
            user_id: "u".into(),
            ..CallContext::default()
        };
        let rec = RequestRecord::from_route_outcome(
            &outcome(RouteStatus::Cancelled, Some(AttemptError::Cancelled)),
            &ctx,
        );
        assert_eq!(rec.status.as_str(), "cancelled");
        assert_eq!(rec.process, "direct");
        assert_eq!(rec.cost_pico_usd, 1234, "a cancelled call keeps its cost");
        let rec = RequestRecord::from_route_outcome(
            &outcome(
                RouteStatus::Failed,
                Some(AttemptError::CircuitOpen {
                    model: "m".into(),
                    until: None,
                }),
            ),
            &ctx,
        );
        assert!(!rec.success);
        assert_eq!(rec.error_kind.as_deref(), Some("circuit_open"));
    }
}
