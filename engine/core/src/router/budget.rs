//! The retry budget: how many re-tries of a model the router may make, shared by all requests.
//!
//! A count per request ("3 retries") multiplies load on a provider that is already failing:
//! every request retries. A budget caps retries as a share of recent traffic instead, the way
//! tower's `TpsBudget` (after Finagle) does: every request deposits, every retry withdraws, and a
//! small reserve per second lets a quiet router retry at all. Deposits expire after `ttl`, so
//! the budget follows recent traffic. Time is `tokio::time` so tests can pause it.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Settings of the retry budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudgetConfig {
    /// How long a deposit counts (clamped to 1..=60 s, as Finagle does).
    pub ttl: Duration,
    /// Retries allowed per second regardless of traffic, so a router that has just started (or
    /// serves few requests) can still retry.
    pub min_per_sec: u32,
    /// Retries allowed per request on top of the reserve: `0.2` allows one retry per five
    /// requests, `2.0` two per request. Negative or non-finite values count as 0.
    pub retry_ratio: f32,
}

impl Default for RetryBudgetConfig {
    /// tower's defaults: 10 s window, 10 retries/s reserve, 20% of requests.
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            min_per_sec: 10,
            retry_ratio: 0.2,
        }
    }
}

/// Deposits and withdrawals are counted in slots of `ttl / SLOTS`; a slot older than `ttl` is
/// forgotten.
const SLOTS: usize = 10;

/// A retry budget shared by every route of one router.
#[derive(Debug)]
pub struct RetryBudget {
    /// Units added per request and taken per retry; integers so the balance is exact.
    deposit_amount: i64,
    withdraw_amount: i64,
    /// The per-second minimum, in units, over one `ttl`.
    reserve: i64,
    slot_len: Duration,
    state: Mutex<Slots>,
}

#[derive(Debug)]
struct Slots {
    /// Closed slots, oldest overwritten first.
    past: [i64; SLOTS],
    /// Index in `past` the current slot is written to when it closes.
    index: usize,
    current: i64,
    current_started: Instant,
}

impl RetryBudget {
    pub fn new(config: RetryBudgetConfig) -> Self {
        let ttl = config
            .ttl
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let ratio = if config.retry_ratio.is_finite() {
            config.retry_ratio.clamp(0.0, 1000.0)
        } else {
            0.0
        };
        // Same scaling as tower: a ratio of 0 gains nothing from deposits; ratios up to 1 are
        // "one retry per 1/ratio requests"; larger ratios use a finer unit.
        let (deposit_amount, withdraw_amount) = if ratio == 0.0 {
            (0, 1)
        } else if ratio <= 1.0 {
            (1, (1.0 / ratio) as i64)
        } else {
            (1000, (1000.0 / ratio) as i64)
        };
        let reserve = i64::from(config.min_per_sec)
            .saturating_mul(ttl.as_secs() as i64)
            .saturating_mul(withdraw_amount);
        Self {
            deposit_amount,
            withdraw_amount,
            reserve,
            slot_len: ttl / SLOTS as u32,
            state: Mutex::new(Slots {
                past: [0; SLOTS],
                index: 0,
                current: 0,
                current_started: Instant::now(),
            }),
        }
    }

    /// One request came in.
    pub fn deposit(&self) {
        let mut slots = self.slots();
        slots.current = slots.current.saturating_add(self.deposit_amount);
    }

    /// Asks for one retry; `false` means the budget is spent and the caller must not retry.
    pub fn withdraw(&self) -> bool {
        let mut slots = self.slots();
        let balance = slots
            .past
            .iter()
            .fold(slots.current, |acc, v| acc.saturating_add(*v))
            .saturating_add(self.reserve);
        if balance < self.withdraw_amount {
            return false;
        }
        slots.current -= self.withdraw_amount;
        true
    }

    /// The slots with every slot older than `ttl` forgotten.
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        let mut slots = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(slots.current_started);
        if elapsed < self.slot_len {
            return slots;
        }
        // Close the current slot. The slot we move into, and one more per further slot length
        // that passed, hold counts older than `ttl`: forget them.
        let index = slots.index;
        slots.past[index] = std::mem::take(&mut slots.current);
        let mut next = (index + 1) % SLOTS;
        slots.past[next] = 0;
        let extra = (elapsed.as_nanos() / self.slot_len.as_nanos().max(1)).saturating_sub(1);
        for _ in 0..extra.min(SLOTS as u128) {
            next = (next + 1) % SLOTS;
            slots.past[next] = 0;
        }
        slots.index = next;
        slots.current_started = now;
        slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(min_per_sec: u32, retry_ratio: f32) -> RetryBudget {
        RetryBudget::new(RetryBudgetConfig {
            ttl: Duration::from_secs(10),
            min_per_sec,
            retry_ratio,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_buy_retries_in_proportion() {
        let b = budget(0, 0.5);
        assert!(!b.withdraw(), "nothing deposited, no reserve");
        b.deposit();
        assert!(!b.withdraw(), "one request buys half a retry");
        b.deposit();
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_allows_retries_without_traffic() {
        let b = budget(1, 0.0);
        // 1 per second over a 10 s window.
        for _ in 0..10 {
            assert!(b.withdraw());
        }
        assert!(!b.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_the_ttl() {
        let b = budget(0, 1.0);
        b.deposit();
        b.deposit();
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!b.withdraw(), "deposits older than the ttl no longer count");
        b.deposit();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.withdraw(), "a deposit 5 s old still counts");
    }
}
