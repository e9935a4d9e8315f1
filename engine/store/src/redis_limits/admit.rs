//! Admission in one round trip: the caller's limit, the budget lines and the first call's
//! provider budget in one script (`admit.lua`), so a request waits on Redis once before its
//! first token.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use keyvex_engine::admission::{AdmitAnswer, AdmitAsk, SharedAdmission};
use keyvex_engine::budgets::LineState;
use keyvex_engine::limits::{Allowance, BudgetExceeded, CallerLimited, LimitsUnavailable};

use super::spend::{add_lines, parse_cost, parse_limit, text};
use super::{ProviderBuckets, RedisLimits, TAG, caller_key, every_us};

impl SharedAdmission for RedisLimits {
    fn admit<'a>(
        &'a self,
        ask: AdmitAsk<'a>,
    ) -> BoxFuture<'a, Result<AdmitAnswer, LimitsUnavailable>> {
        async move {
            let mut invocation = self.inner.admit.prepare_invoke();
            let (lines, amount) = ask.spend.unwrap_or((&[], keyvex_engine::Cost::ZERO));
            add_lines(&mut invocation, lines, amount);
            invocation.key(caller_key(ask.caller, ask.endpoint));
            match ask.rate {
                Some(rate) => invocation
                    .arg("1")
                    .arg(every_us(rate.period, rate.per_period.get()))
                    .arg(rate.burst.get()),
                None => invocation.arg("0").arg(0).arg(0),
            };
            match ask.provider {
                Some((kind, rates, tokens)) => {
                    let buckets = ProviderBuckets::new(kind, rates, tokens);
                    invocation
                        .key(buckets.requests_key)
                        .key(buckets.tokens_key)
                        .arg("1")
                        .arg(buckets.every_request)
                        .arg(buckets.requests_burst)
                        .arg(buckets.every_token)
                        .arg(buckets.tokens_burst)
                        .arg(buckets.tokens);
                }
                None => {
                    invocation
                        .key(format!("{TAG}:provider:none:requests"))
                        .key(format!("{TAG}:provider:none:tokens"))
                        .arg("0");
                }
            }
            let answer: Vec<redis::Value> = self
                .run(invocation)
                .await
                .map_err(|e| self.unavailable(e))?;
            let parsed = parse(&answer, &ask, lines.len())
                .ok_or_else(|| self.unavailable(format!("unexpected answer {answer:?}")))?;
            self.answered();
            Ok(parsed)
        }
        .boxed()
    }
}

fn int(v: &redis::Value) -> Option<i64> {
    text(v).parse().ok()
}

fn micros(n: i64) -> Duration {
    Duration::from_micros(u64::try_from(n).unwrap_or(0))
}

/// The script's answer (see `admit.lua`); `None` when it is not shaped as the script answers.
fn parse(answer: &[redis::Value], ask: &AdmitAsk<'_>, lines: usize) -> Option<AdmitAnswer> {
    let allowance = |remaining: i64, full_in: i64| {
        ask.rate.map(|rate| Allowance {
            limit: rate.per_period.get(),
            remaining: u32::try_from(remaining).unwrap_or(0),
            reset: micros(full_in),
        })
    };
    let state = |spent: &redis::Value, reserved: &redis::Value, limit: &redis::Value| LineState {
        spent: parse_cost(&text(spent)),
        reserved: parse_cost(&text(reserved)),
        limit: parse_limit(&text(limit)),
    };
    match answer {
        [status, wait] if int(status)? == 0 => {
            let rate = ask.rate?;
            Some(AdmitAnswer::Limited(CallerLimited {
                caller: ask.caller.to_owned(),
                endpoint: ask.endpoint.to_owned(),
                limit: rate.per_period.get(),
                burst: rate.burst.get(),
                period: rate.period,
                retry_after: micros(int(wait)?),
            }))
        }
        [status, remaining, full_in, index, spent, reserved, limit] if int(status)? == 1 => {
            Some(AdmitAnswer::OverBudget {
                allowance: allowance(int(remaining)?, int(full_in)?),
                index: usize::try_from(int(index)?).ok()?,
                state: state(spent, reserved, limit),
            })
        }
        [
            status,
            remaining,
            full_in,
            provider,
            wait,
            which,
            states @ ..,
        ] if int(status)? == 2 && states.len() == lines * 3 => {
            let provider = match int(provider)? {
                1 => Some(Ok(())),
                0 => Some(Err(BudgetExceeded {
                    which: if int(which)? == 1 {
                        "requests"
                    } else {
                        "tokens"
                    },
                    retry_after: micros(int(wait)?),
                })),
                _ => None,
            };
            Some(AdmitAnswer::Admitted {
                allowance: allowance(int(remaining)?, int(full_in)?),
                states: states
                    .chunks_exact(3)
                    .map(|s| state(&s[0], &s[1], &s[2]))
                    .collect(),
                provider,
            })
        }
        _ => None,
    }
}
