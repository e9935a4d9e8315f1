//! Rate limits: per caller and endpoint at the HTTP edge, and per provider (requests and tokens
//! per minute), reserved by the router before each attempt, so it can fall back when one
//! provider's budget is spent.
//!
//! All limiters are GCRA (`governor`) over [`TokioClock`], so tests drive them with
//! `tokio::time::pause` and `advance`.
//!
//! Tokens are known only after a call, so provider budgets **reserve** an estimate (prompt tokens
//! plus the output cap) before the call and **settle** with the real usage when the stream ends.
//! GCRA cannot give cells back, so settling keeps a signed balance beside the limiter:
//! over-reservation becomes *credit* that later reservations draw from before touching the
//! limiter; under-reservation becomes *debt* that is charged to the limiter at once when it has
//! room, and otherwise paid first by the next reservation.

use std::fmt;
use std::num::NonZeroU32;
use std::ops::Add;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use governor::clock::{Clock, Reference};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};

use crate::provider::ChatRequest;
use crate::stream::ProviderKind;
use crate::tokenize::estimate_prompt_tokens;

/// A governor clock reading `tokio::time::Instant`, so paused test time drives the limiters.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

/// An instant of [`TokioClock`] (a newtype: governor's traits cannot be implemented on tokio's
/// type from here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokioInstant(tokio::time::Instant);

impl Add<Nanos> for TokioInstant {
    type Output = TokioInstant;

    fn add(self, other: Nanos) -> TokioInstant {
        TokioInstant(self.0 + Duration::from(other))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        Nanos::from(self.0.saturating_duration_since(earlier.0))
    }

    fn saturating_sub(&self, duration: Nanos) -> Self {
        TokioInstant(
            self.0
                .checked_sub(Duration::from(duration))
                .unwrap_or(self.0),
        )
    }
}

impl Clock for TokioClock {
    type Instant = TokioInstant;

    fn now(&self) -> TokioInstant {
        TokioInstant(tokio::time::Instant::now())
    }
}

type Direct = RateLimiter<NotKeyed, InMemoryState, TokioClock, StateInformationMiddleware>;
type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, TokioClock, StateInformationMiddleware>;

fn wait_of(not_until: &NotUntil<TokioInstant>) -> Duration {
    not_until.wait_time_from(TokioClock.now())
}

/// A limit setting: `per_period` cells refill evenly over `period`; up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_period: NonZeroU32,
    pub period: Duration,
    pub burst: NonZeroU32,
}

impl Rate {
    fn quota(self) -> Quota {
        // One cell every period/per_period; a zero period (nonsense) degrades to one per nanosecond
        // rather than panicking.
        let every = self.period / self.per_period.get();
        Quota::with_period(every.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(self.per_period))
            .allow_burst(self.burst)
    }

    /// Time to refill the whole burst: what `x-ratelimit-reset` reports for an empty bucket.
    pub fn full_refill(self) -> Duration {
        self.period / self.per_period.get() * self.burst.get()
    }
}

// ---------------------------------------------------------------------------------------------
// Caller + endpoint limits (HTTP edge)

/// What a caller limit decided when it let a request through; goes into `x-ratelimit-*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub limit: u32,
    pub remaining: u32,
    /// Until the burst is fully available again.
    pub reset: Duration,
}

/// A caller hit its limit on an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "rate limit for caller {caller} on {endpoint} exceeded ({limit} requests per {}s, burst {burst}); retry after {}ms",
    period.as_secs(), retry_after.as_millis()
)]
pub struct CallerLimited {
    pub caller: String,
    pub endpoint: String,
    pub limit: u32,
    pub burst: u32,
    pub period: Duration,
    pub retry_after: Duration,
}

/// Requests per caller and endpoint.
pub struct CallerLimits {
    rate: Rate,
    limiter: Keyed<(String, String)>,
}

impl fmt::Debug for CallerLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerLimits")
            .field("rate", &self.rate)
            .finish()
    }
}

impl CallerLimits {
    pub fn new(rate: Rate) -> CallerLimits {
        CallerLimits {
            rate,
            limiter: RateLimiter::dashmap_with_clock(rate.quota(), TokioClock)
                .with_middleware::<StateInformationMiddleware>(),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes one request from `caller`'s budget on `endpoint`.
    pub fn check(&self, caller: &str, endpoint: &str) -> Result<Allowance, CallerLimited> {
        let key = (caller.to_owned(), endpoint.to_owned());
        match self.limiter.check_key(&key) {
            Ok(state) => Ok(self.allowance(&state)),
            Err(not_until) => Err(CallerLimited {
                caller: caller.to_owned(),
                endpoint: endpoint.to_owned(),
                limit: self.rate.per_period.get(),
                burst: self.rate.burst.get(),
                period: self.rate.period,
                retry_after: wait_of(&not_until),
            }),
        }
    }

    fn allowance(&self, state: &StateSnapshot) -> Allowance {
        let remaining = state.remaining_burst_capacity();
        let used = self.rate.burst.get().saturating_sub(remaining);
        Allowance {
            limit: self.rate.per_period.get(),
            remaining,
            reset: self.rate.period / self.rate.per_period.get() * used,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Provider budgets

/// Requests and tokens per minute of one provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderRates {
    pub requests_per_minute: NonZeroU32,
    pub tokens_per_minute: NonZeroU32,
}

/// Why a provider budget refused a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetExceeded {
    /// `"requests"` or `"tokens"`.
    pub which: &'static str,
    pub retry_after: Duration,
}

/// One provider's request and token budget, with the settle balance.
pub struct ProviderBudget {
    provider: ProviderKind,
    rates: ProviderRates,
    requests: Direct,
    tokens: Direct,
    /// Positive: tokens paid for and not used (credit). Negative: tokens used and not yet charged
    /// to the limiter (debt). Bounded by one minute's budget either way.
    balance: Mutex<i64>,
}

impl fmt::Debug for ProviderBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderBudget")
            .field("provider", &self.provider)
            .field("rates", &self.rates)
            .field("balance", &self.balance())
            .finish()
    }
}

impl ProviderBudget {
    pub fn new(provider: ProviderKind, rates: ProviderRates) -> ProviderBudget {
        let minute = Duration::from_secs(60);
        let rate = |n: NonZeroU32| Rate {
            per_period: n,
            period: minute,
            burst: n,
        };
        ProviderBudget {
            provider,
            rates,
            requests: RateLimiter::direct_with_clock(
                rate(rates.requests_per_minute).quota(),
                TokioClock,
            )
            .with_middleware::<StateInformationMiddleware>(),
            tokens: RateLimiter::direct_with_clock(
                rate(rates.tokens_per_minute).quota(),
                TokioClock,
            )
            .with_middleware::<StateInformationMiddleware>(),
            balance: Mutex::new(0),
        }
    }

    pub fn provider(&self) -> ProviderKind {
        self.provider
    }

    /// The credit (positive) or debt (negative) in tokens.
    pub fn balance(&self) -> i64 {
        *self.balance.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cap(&self) -> i64 {
        i64::from(self.rates.tokens_per_minute.get())
    }

    /// Charges `n` tokens to the token limiter. An amount larger than the whole budget is charged
    /// as the whole budget: it could otherwise never pass, and one call may legitimately be
    /// bigger than a minute's allowance.
    /// Returns how many tokens were charged.
    fn charge_tokens(&self, n: u64) -> Result<i64, Duration> {
        let Some(n) = NonZeroU32::new(n.min(u64::from(self.rates.tokens_per_minute.get())) as u32)
        else {
            return Ok(0);
        };
        match self.tokens.check_n(n) {
            Ok(Ok(_)) => Ok(i64::from(n.get())),
            Ok(Err(not_until)) => Err(wait_of(&not_until)),
            // Unreachable after the clamp above; treat it as "wait a full minute" if it happens.
            Err(_) => Err(Duration::from_secs(60)),
        }
    }

    /// Reserves one request and `estimate` tokens. Credit is used first, debt is paid first.
    pub fn reserve(self: &Arc<Self>, estimate: u64) -> Result<Reservation, BudgetExceeded> {
        let estimate_i = i64::try_from(estimate).unwrap_or(i64::MAX);
        {
            let mut balance = self.balance.lock().unwrap_or_else(PoisonError::into_inner);
            let need = estimate_i.saturating_sub(*balance);
            let charged = if need > 0 {
                self.charge_tokens(need as u64)
                    .map_err(|retry_after| BudgetExceeded {
                        which: "tokens",
                        retry_after,
                    })?
            } else {
                0
            };
            // Tokens first (they can be given back as credit), then the request cell.
            if let Err(not_until) = self.requests.check() {
                *balance = (*balance + charged).min(self.cap());
                return Err(BudgetExceeded {
                    which: "requests",
                    retry_after: wait_of(&not_until),
                });
            }
            // May go below -cap while a call bigger than the budget is in flight; settle brings
            // it back within bounds.
            *balance = balance.saturating_add(charged).saturating_sub(estimate_i);
        }
        Ok(Reservation {
            budget: Arc::clone(self),
            reserved: estimate,
            settled: false,
        })
    }

    /// Reconciles a reservation of `reserved` tokens with `used`.
    fn settle(&self, reserved: u64, used: u64) {
        let mut balance = self.balance.lock().unwrap_or_else(PoisonError::into_inner);
        let diff = i64::try_from(reserved)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(used).unwrap_or(i64::MAX));
        *balance = balance.saturating_add(diff).clamp(-self.cap(), self.cap());
        if *balance < 0
            && let Ok(charged) = self.charge_tokens(balance.unsigned_abs())
        {
            *balance += charged;
        }
    }
}

/// Tokens reserved for one call. Settle it with the real usage; dropped unsettled, it settles
/// as "used exactly the estimate" (nothing known, nothing refunded).
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<ProviderBudget>,
    reserved: u64,
    settled: bool,
}

impl Reservation {
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    pub fn settle(mut self, used: u64) {
        self.settled = true;
        self.budget.settle(self.reserved, used);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.budget.settle(self.reserved, self.reserved);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Limits shared across replicas

/// Why a shared limit store could not answer (unreachable, or slower than its timeout).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the shared limit store is unavailable: {0}")]
pub struct LimitsUnavailable(pub String);

/// Caller limits and provider budgets kept outside this process, so every replica that shares
/// the store enforces one limit (Redis, in `keyvex-store`). Each check is one atomic step.
pub trait SharedRates: Send + Sync + 'static {
    /// Takes one request from `caller`'s limit on `endpoint`.
    fn check_caller<'a>(
        &'a self,
        caller: &'a str,
        endpoint: &'a str,
        rate: Rate,
    ) -> BoxFuture<'a, Result<Result<Allowance, CallerLimited>, LimitsUnavailable>>;
    /// Reserves one request and `tokens` tokens of `provider`'s per-minute budgets.
    fn reserve_provider(
        &self,
        provider: ProviderKind,
        rates: ProviderRates,
        tokens: u64,
    ) -> BoxFuture<'_, Result<Result<(), BudgetExceeded>, LimitsUnavailable>>;
    /// Gives back (or charges) the difference between `reserved` and `used` tokens. Never blocks
    /// the caller: a store doing I/O queues it.
    fn settle_provider(
        &self,
        provider: ProviderKind,
        rates: ProviderRates,
        reserved: u64,
        used: u64,
    );
    /// One line for start-up banners.
    fn describe(&self) -> String;
    /// Checks the store could not answer, since start.
    fn failures(&self) -> u64;
}

/// Tokens reserved in a shared store for one call; settled like [`Reservation`]. Dropped
/// unsettled, it keeps the estimate charged.
pub struct SharedReservation {
    store: Arc<dyn SharedRates>,
    provider: ProviderKind,
    rates: ProviderRates,
    reserved: u64,
}

impl fmt::Debug for SharedReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedReservation")
            .field("provider", &self.provider)
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl SharedReservation {
    /// A reservation the store already made (at admission, in the same step as the others).
    pub(crate) fn made(
        store: Arc<dyn SharedRates>,
        provider: ProviderKind,
        rates: ProviderRates,
        reserved: u64,
    ) -> SharedReservation {
        SharedReservation {
            store,
            provider,
            rates,
            reserved,
        }
    }

    pub fn settle(self, used: u64) {
        self.store
            .settle_provider(self.provider, self.rates, self.reserved, used);
    }
}

/// Reserves `tokens` of `provider`'s budget in `store`, deciding by `when_down` if it cannot be
/// asked: `Ok(None)` lets the call through unreserved.
pub async fn reserve_shared(
    store: &Arc<dyn SharedRates>,
    when_down: LimitsWhenDown,
    provider: ProviderKind,
    rates: ProviderRates,
    tokens: u64,
) -> Result<Option<SharedReservation>, BudgetExceeded> {
    match store.reserve_provider(provider, rates, tokens).await {
        Ok(Ok(())) => Ok(Some(SharedReservation {
            store: Arc::clone(store),
            provider,
            rates,
            reserved: tokens,
        })),
        Ok(Err(exceeded)) => Err(exceeded),
        Err(_) if when_down == LimitsWhenDown::Open => Ok(None),
        Err(_) => Err(BudgetExceeded {
            which: "limit store unavailable",
            retry_after: Duration::from_secs(1),
        }),
    }
}

/// A provider-budget reservation, local or shared.
#[derive(Debug)]
pub enum ProviderHold {
    Local(Reservation),
    Shared(SharedReservation),
}

impl ProviderHold {
    pub fn settle(self, used: u64) {
        match self {
            ProviderHold::Local(r) => r.settle(used),
            ProviderHold::Shared(r) => r.settle(used),
        }
    }
}

/// What to do with a rate limit while its shared store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LimitsWhenDown {
    /// Let requests through (the default: a limit is protection, not billing).
    #[default]
    Open,
    /// Refuse them.
    Closed,
}

/// Tells when a shared store stops and starts answering: logged once per episode, every failure
/// counted.
#[derive(Debug, Default)]
pub struct Outage {
    down: std::sync::atomic::AtomicBool,
    failures: std::sync::atomic::AtomicU64,
}

impl Outage {
    /// A failure: counted, and logged when it starts an episode.
    pub fn failed(&self, what: &str, error: &str, consequence: &str) {
        use std::sync::atomic::Ordering;
        self.failures.fetch_add(1, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::error!(%error, "{what} unavailable: {consequence} until it answers");
        }
    }

    /// An answer: ends an episode, logging that it did.
    pub fn answered(&self, what: &str) {
        use std::sync::atomic::Ordering;
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::warn!("{what} answers again");
        }
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_down(&self) -> bool {
        self.down.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Tokens a request may use: its prompt plus its output cap. The prompt side is a byte-length
/// estimate, not a tokenizer count: the reservation is settled with the provider's usage when the
/// stream ends, so exactness here would buy nothing and cost a tokenizer pass per request.
pub fn estimate_tokens(request: &ChatRequest) -> u64 {
    estimate_prompt_tokens(request.system.as_deref(), &request.messages)
        + u64::from(request.max_output_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn caller_burst_then_refill() {
        let limits = CallerLimits::new(Rate {
            per_period: nz(60),
            period: Duration::from_secs(60),
            burst: nz(3),
        });
        let a = limits.check("alice", "agents").unwrap();
        assert_eq!((a.limit, a.remaining), (60, 2));
        limits.check("alice", "agents").unwrap();
        let last = limits.check("alice", "agents").unwrap();
        assert_eq!(last.remaining, 0);
        assert_eq!(last.reset, Duration::from_secs(3));
        let refused = limits.check("alice", "agents").unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        // Other callers and other endpoints have their own buckets.
        limits.check("bob", "agents").unwrap();
        limits.check("alice", "chat").unwrap();
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(limits.check("alice", "agents").is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(limits.check("alice", "agents").unwrap().remaining, 0);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(limits.check("alice", "agents").unwrap().remaining, 2);
    }

    fn budget(rpm: u32, tpm: u32) -> Arc<ProviderBudget> {
        Arc::new(ProviderBudget::new(
            ProviderKind::OpenAi,
            ProviderRates {
                requests_per_minute: nz(rpm),
                tokens_per_minute: nz(tpm),
            },
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_refuse_and_refill() {
        let b = budget(2, 1_000_000);
        b.reserve(10).unwrap().settle(10);
        b.reserve(10).unwrap().settle(10);
        let refused = b.reserve(10).unwrap_err();
        assert_eq!(refused.which, "requests");
        assert_eq!(refused.retry_after, Duration::from_secs(30));
        // The tokens charged for the refused call came back as credit.
        assert_eq!(b.balance(), 10);
        tokio::time::advance(Duration::from_secs(30)).await;
        b.reserve(10).unwrap().settle(10);
        assert_eq!(b.balance(), 0, "the credit paid for the next reservation");
    }

    #[tokio::test(start_paused = true)]
    async fn over_reservation_becomes_credit_that_later_calls_use() {
        let b = budget(100, 1000);
        // Reserve 600, use 100: 500 tokens of credit.
        b.reserve(600).unwrap().settle(100);
        assert_eq!(b.balance(), 500);
        // The limiter has 400 left, but credit covers 500 more: 800 fits (500 credit + 300).
        b.reserve(800).unwrap().settle(800);
        assert_eq!(b.balance(), 0);
        // Now the limiter has 100 left.
        let refused = b.reserve(200).unwrap_err();
        assert_eq!(refused.which, "tokens");
        assert_eq!(
            refused.retry_after,
            Duration::from_secs(6),
            "100 more tokens at 1000/min"
        );
        b.reserve(100).unwrap().settle(100);
    }

    #[tokio::test(start_paused = true)]
    async fn under_reservation_is_charged_or_carried_as_debt() {
        let b = budget(100, 1000);
        // Used 300 more than reserved, and the limiter has room: charged at once.
        b.reserve(100).unwrap().settle(400);
        assert_eq!(b.balance(), 0);
        // 600 left; reserve all of it, then overrun by 200 with no room: debt.
        b.reserve(600).unwrap().settle(800);
        assert_eq!(b.balance(), -200);
        // The next reservation pays the debt first: after 30 s 500 tokens refilled, so a
        // 400-token call (600 with the debt) does not fit but a 300-token one does.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.reserve(400).unwrap_err().which, "tokens");
        b.reserve(300).unwrap().settle(300);
        assert_eq!(b.balance(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_reservation_keeps_the_estimate_charged() {
        let b = budget(100, 1000);
        drop(b.reserve(700).unwrap());
        assert_eq!(b.balance(), 0);
        assert_eq!(b.reserve(400).unwrap_err().which, "tokens");
    }

    #[tokio::test(start_paused = true)]
    async fn huge_estimates_take_the_whole_budget_instead_of_never_passing() {
        let b = budget(100, 1000);
        b.reserve(5000).unwrap().settle(50);
        // 1000 charged (the whole budget), 50 used: 950 of credit, no more.
        assert_eq!(b.balance(), 950);
        b.reserve(950).unwrap().settle(950);
        assert_eq!(b.reserve(10).unwrap_err().which, "tokens");
    }
}
