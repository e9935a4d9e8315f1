//! Dollar budgets in Redis: one hash per budget window (`spent`, `reserved`), and one hash of
//! the callers' own limits set through the admin API, read by the scripts themselves so every
//! replica applies the same limit in the same step.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use keyvex_engine::budgets::{CallerBudget, LineState, SpendError, SpendLine, SpendStore};
use keyvex_engine::cost::Cost;

use super::settles::Settle;
use super::{RedisLimits, TAG};

/// The hash of callers' own limits: field caller, value `DAILY,MONTHLY` in picodollars.
const CALLERS_KEY: &str = "{keyvex}:budget:callers";

/// Spend counters in Redis.
pub struct RedisSpend {
    limits: RedisLimits,
    reserve: redis::Script,
    read: redis::Script,
}

impl RedisSpend {
    pub(super) fn new(limits: RedisLimits) -> RedisSpend {
        RedisSpend {
            limits,
            reserve: redis::Script::new(concat!(
                include_str!("limits_in_force.lua"),
                include_str!("spend_lines.lua"),
                include_str!("reserve_spend.lua")
            )),
            read: redis::Script::new(concat!(
                include_str!("limits_in_force.lua"),
                include_str!("read_spend.lua")
            )),
        }
    }

    fn invocation<'s>(
        script: &'s redis::Script,
        lines: &[SpendLine],
        amount: Cost,
    ) -> redis::ScriptInvocation<'s> {
        let mut invocation = script.prepare_invoke();
        add_lines(&mut invocation, lines, amount);
        invocation
    }
}

/// The budget lines' keys and arguments, as the scripts that take them expect them first.
pub(super) fn add_lines(
    invocation: &mut redis::ScriptInvocation<'_>,
    lines: &[SpendLine],
    amount: Cost,
) {
    for line in lines {
        invocation.key(key_of(line));
    }
    invocation.key(CALLERS_KEY);
    let caller = lines
        .iter()
        .find_map(|l| l.override_of.clone())
        .unwrap_or_default();
    invocation.arg(amount.0).arg(lines.len()).arg(caller);
    for line in lines {
        let which = match (line.override_of.is_some(), line.scope) {
            (true, keyvex_engine::budgets::BudgetScope::CallerDaily) => "daily",
            (true, keyvex_engine::budgets::BudgetScope::CallerMonthly) => "monthly",
            _ => "",
        };
        invocation
            .arg(line.limit.map_or_else(String::new, |l| l.0.to_string()))
            .arg(which)
            .arg(keep_secs(line.keep_for));
    }
}

fn key_of(line: &SpendLine) -> String {
    format!("{TAG}:budget:{}", line.key)
}

fn keep_secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

/// A script's answer element as text (Redis turns Lua strings into bulk strings and numbers into
/// integers).
pub(super) fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::Int(n) => n.to_string(),
        redis::Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    }
}

pub(super) fn parse_cost(text: &str) -> Cost {
    Cost(text.parse::<u64>().unwrap_or(0))
}

pub(super) fn parse_limit(text: &str) -> Option<Cost> {
    (!text.is_empty()).then(|| parse_cost(text))
}

impl SpendStore for RedisSpend {
    fn reserve<'a>(
        &'a self,
        lines: &'a [SpendLine],
        amount: Cost,
    ) -> BoxFuture<'a, Result<(), SpendError>> {
        async move {
            let invocation = Self::invocation(&self.reserve, lines, amount);
            let answer: Vec<redis::Value> = self
                .limits
                .run(invocation)
                .await
                .map_err(SpendError::Unavailable)?;
            match answer.as_slice() {
                [redis::Value::Int(1)] => Ok(()),
                [redis::Value::Int(0), index, spent, reserved, limit] => {
                    let index = text(index).parse::<usize>().unwrap_or(0);
                    Err(SpendError::Refused {
                        index,
                        state: LineState {
                            spent: parse_cost(&text(spent)),
                            reserved: parse_cost(&text(reserved)),
                            limit: parse_limit(&text(limit)),
                        },
                    })
                }
                other => Err(SpendError::Unavailable(format!(
                    "unexpected answer from the reserve script: {other:?}"
                ))),
            }
        }
        .boxed()
    }

    fn settle(&self, lines: Arc<[SpendLine]>, reserved: Cost, actual: Cost) {
        let keys = lines.iter().map(key_of).collect();
        let keep = lines.iter().map(|l| keep_secs(l.keep_for)).collect();
        // The receiver lives as long as the connection; a send fails only at shutdown.
        let _ = self.limits.inner.settles.send(Settle::Spend {
            keys,
            keep,
            reserved,
            actual,
        });
    }

    fn read<'a>(
        &'a self,
        lines: &'a [SpendLine],
    ) -> BoxFuture<'a, Result<Vec<LineState>, SpendError>> {
        async move {
            let invocation = Self::invocation(&self.read, lines, Cost::ZERO);
            let answer: Vec<(String, String, String)> = self
                .limits
                .run(invocation)
                .await
                .map_err(SpendError::Unavailable)?;
            Ok(answer
                .iter()
                .map(|(spent, reserved, limit)| LineState {
                    spent: parse_cost(spent),
                    reserved: parse_cost(reserved),
                    limit: parse_limit(limit),
                })
                .collect())
        }
        .boxed()
    }

    fn set_caller<'a>(
        &'a self,
        caller: &'a str,
        budget: CallerBudget,
    ) -> BoxFuture<'a, Result<(), SpendError>> {
        async move {
            let mut conn = self.limits.inner.conn.clone();
            let mut cmd = if budget.is_empty() {
                redis::cmd("HDEL")
            } else {
                redis::cmd("HSET")
            };
            cmd.arg(CALLERS_KEY).arg(caller);
            if !budget.is_empty() {
                let part = |c: Option<Cost>| c.map_or_else(String::new, |c| c.0.to_string());
                cmd.arg(format!("{},{}", part(budget.daily), part(budget.monthly)));
            }
            match tokio::time::timeout(self.limits.inner.timeout, cmd.query_async::<i64>(&mut conn))
                .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(SpendError::Unavailable(e.to_string())),
                Err(_) => Err(SpendError::Unavailable("no answer in time".into())),
            }
        }
        .boxed()
    }

    fn callers(&self) -> BoxFuture<'_, Result<BTreeMap<String, CallerBudget>, SpendError>> {
        async move {
            let mut conn = self.limits.inner.conn.clone();
            let all = match tokio::time::timeout(
                self.limits.inner.timeout,
                redis::cmd("HGETALL")
                    .arg(CALLERS_KEY)
                    .query_async::<BTreeMap<String, String>>(&mut conn),
            )
            .await
            {
                Ok(Ok(all)) => all,
                Ok(Err(e)) => return Err(SpendError::Unavailable(e.to_string())),
                Err(_) => return Err(SpendError::Unavailable("no answer in time".into())),
            };
            Ok(all
                .into_iter()
                .map(|(caller, value)| {
                    let (daily, monthly) = value.split_once(',').unwrap_or((&value, ""));
                    (
                        caller,
                        CallerBudget {
                            daily: parse_limit(daily),
                            monthly: parse_limit(monthly),
                        },
                    )
                })
                .collect())
        }
        .boxed()
    }

    fn describe(&self) -> String {
        format!(
            "{} (shared by every replica using it)",
            self.limits.inner.shown
        )
    }

    fn outlives_process(&self) -> bool {
        true
    }
}
