//! Spend counters in this process: one mutex over a map, so a reservation checks and takes every
//! line in one step. Without a shared store, each replica enforces its budgets on its own.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use futures::future::{BoxFuture, FutureExt};

use super::{CallerBudget, CallerBudgetStore, LineState, SpendError, SpendLine, SpendStore};
use crate::cost::Cost;

#[derive(Debug, Default)]
struct Counter {
    spent: u64,
    reserved: u64,
    /// Past this the counter's window is over and it can be forgotten.
    expires: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct State {
    counters: HashMap<String, Counter>,
    callers: BTreeMap<String, CallerBudget>,
    /// Operations since the last sweep of expired counters.
    since_sweep: u32,
}

/// Spend counters kept in this process.
#[derive(Default)]
pub struct InProcessSpend {
    state: Mutex<State>,
    /// Where callers' own limits are also written, so a restart keeps them.
    kept_in: Option<Arc<dyn CallerBudgetStore>>,
}

impl std::fmt::Debug for InProcessSpend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Expired counters are swept every this many operations.
const SWEEP_EVERY: u32 = 4096;

impl State {
    fn limit_of(&self, line: &SpendLine) -> Option<Cost> {
        let own = line.override_of.as_ref().and_then(|c| self.callers.get(c));
        let own = own.and_then(|b| match line.scope {
            super::BudgetScope::CallerDaily => b.daily,
            super::BudgetScope::CallerMonthly => b.monthly,
            _ => None,
        });
        own.or(line.limit)
    }

    fn state_of(&self, line: &SpendLine) -> LineState {
        let counter = self.counters.get(&line.key);
        LineState {
            spent: Cost(counter.map_or(0, |c| c.spent)),
            reserved: Cost(counter.map_or(0, |c| c.reserved)),
            limit: self.limit_of(line),
        }
    }

    /// Applies `change` to `line`'s counter (made when missing) and keeps it for the line's
    /// `keep_for` from `now`. Looked up before anything is inserted: `entry` wants an owned key,
    /// which was a copy of the key on every reserve and settle, where the counter is almost
    /// always there already.
    fn update(&mut self, line: &SpendLine, now: SystemTime, change: impl FnOnce(&mut Counter)) {
        let expires = now.checked_add(line.keep_for);
        match self.counters.get_mut(&line.key) {
            Some(counter) => {
                counter.expires = expires;
                change(counter);
            }
            None => {
                let mut counter = Counter {
                    expires,
                    ..Counter::default()
                };
                change(&mut counter);
                self.counters.insert(line.key.clone(), counter);
            }
        }
    }

    fn sweep(&mut self, now: SystemTime) {
        self.since_sweep += 1;
        if self.since_sweep < SWEEP_EVERY {
            return;
        }
        self.since_sweep = 0;
        self.counters
            .retain(|_, c| c.reserved > 0 || c.expires.is_none_or(|at| at > now));
    }
}

impl InProcessSpend {
    /// Counters in this process, with callers' own limits written to `store` as they are set
    /// and starting from `callers` (what `store` held at start).
    pub fn persisted(
        store: Arc<dyn CallerBudgetStore>,
        callers: BTreeMap<String, CallerBudget>,
    ) -> InProcessSpend {
        InProcessSpend {
            state: Mutex::new(State {
                callers,
                ..State::default()
            }),
            kept_in: Some(store),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reserve_now(&self, lines: &[SpendLine], amount: Cost) -> Result<(), SpendError> {
        let now = SystemTime::now();
        let mut state = self.lock();
        state.sweep(now);
        for (index, line) in lines.iter().enumerate() {
            let current = state.state_of(line);
            if let Some(limit) = current.limit
                && current
                    .spent
                    .0
                    .saturating_add(current.reserved.0)
                    .saturating_add(amount.0)
                    > limit.0
            {
                return Err(SpendError::Refused {
                    index,
                    state: current,
                });
            }
        }
        for line in lines {
            state.update(line, now, |c| {
                c.reserved = c.reserved.saturating_add(amount.0)
            });
        }
        Ok(())
    }
}

impl SpendStore for InProcessSpend {
    fn reserve<'a>(
        &'a self,
        lines: &'a [SpendLine],
        amount: Cost,
    ) -> BoxFuture<'a, Result<(), SpendError>> {
        futures::future::ready(self.reserve_now(lines, amount)).boxed()
    }

    fn settle(&self, lines: Arc<[SpendLine]>, reserved: Cost, actual: Cost) {
        let now = SystemTime::now();
        let mut state = self.lock();
        for line in lines.iter() {
            state.update(line, now, |c| {
                c.reserved = c.reserved.saturating_sub(reserved.0);
                c.spent = c.spent.saturating_add(actual.0);
            });
        }
    }

    fn read<'a>(
        &'a self,
        lines: &'a [SpendLine],
    ) -> BoxFuture<'a, Result<Vec<LineState>, SpendError>> {
        let state = self.lock();
        let states = lines.iter().map(|l| state.state_of(l)).collect();
        futures::future::ready(Ok(states)).boxed()
    }

    fn set_caller<'a>(
        &'a self,
        caller: &'a str,
        budget: CallerBudget,
    ) -> BoxFuture<'a, Result<(), SpendError>> {
        async move {
            // Written first: a limit the store did not take is not in force either, and the
            // admin hears why.
            if let Some(store) = &self.kept_in {
                store.save(caller, budget).await.map_err(|e| {
                    SpendError::Unavailable(format!(
                        "could not keep the limit in {}: {e}",
                        store.describe()
                    ))
                })?;
            }
            let mut state = self.lock();
            if budget.is_empty() {
                state.callers.remove(caller);
            } else {
                state.callers.insert(caller.to_owned(), budget);
            }
            Ok(())
        }
        .boxed()
    }

    fn callers(&self) -> BoxFuture<'_, Result<BTreeMap<String, CallerBudget>, SpendError>> {
        let callers = self.lock().callers.clone();
        futures::future::ready(Ok(callers)).boxed()
    }

    fn restore(&self, line: &SpendLine, spent: Cost) {
        let now = SystemTime::now();
        let mut state = self.lock();
        state.update(line, now, |c| c.spent = c.spent.saturating_add(spent.0));
    }

    fn describe(&self) -> String {
        match &self.kept_in {
            None => "in this process (each replica counts its own spend)".to_owned(),
            Some(store) => format!(
                "in this process (each replica counts its own spend; callers' own limits kept in {})",
                store.describe()
            ),
        }
    }
}
