//! Limits and budgets shared by every replica through one Redis: caller rate limits, provider
//! requests and tokens per minute, and dollar budgets. Each check is one Lua script, so it is
//! atomic and one round trip; the scripts are in the `.lua` files beside this one.
//!
//! The client is `redis`'s tokio `ConnectionManager`: one multiplexed connection that pipelines
//! every concurrent command (so it stands in for a pool) and reconnects by itself. Every command
//! runs under a short timeout; past it Redis counts as unreachable, and the caller decides what
//! that means (rate limits fail open, budgets fail closed, by default).

mod admit;
mod link;
mod settles;
mod spend;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use keyvex_engine::budgets::OnUnavailable;
use keyvex_engine::limits::{
    Allowance, BudgetExceeded, CallerLimited, LimitsUnavailable, Outage, ProviderRates, Rate,
    SharedRates,
};
use keyvex_engine::stream::ProviderKind;
use tokio::sync::mpsc;

use settles::Settle;

use link::{Link, TAG};
pub use spend::RedisSpend;

/// What to do with a kind of limit while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenDown {
    /// Let the request through.
    Open,
    /// Refuse it.
    Closed,
}

/// How to reach the shared Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://HOST:PORT[/DB]`; may carry a password, so it is never printed whole.
    pub url: String,
    /// Longest wait for a connection and for one command.
    pub timeout: Duration,
    /// `url` is a node (or the configuration endpoint) of a Redis Cluster.
    pub cluster: bool,
    pub limits_when_down: WhenDown,
    pub budgets_when_down: OnUnavailable,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("timeout", &self.timeout)
            .field("cluster", &self.cluster)
            .field("limits_when_down", &self.limits_when_down)
            .field("budgets_when_down", &self.budgets_when_down)
            .finish()
    }
}

/// The URL without its password: `redis://:***@host:6379`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Why Redis could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error("REDIS_URL {url} is not a Redis URL: {message}")]
    Url { url: String, message: String },
}

/// The connection and the scripts, shared by the rate limits and the spend store.
#[derive(Clone)]
pub struct RedisLimits {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Link,
    timeout: Duration,
    shown: String,
    gcra: redis::Script,
    admit: redis::Script,
    outage: Outage,
    limits_when_down: WhenDown,
    /// Settles waiting to be sent (they come from `Drop`, which cannot wait).
    settles: mpsc::UnboundedSender<Settle>,
}

impl fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.shown)
    }
}

impl RedisLimits {
    /// Sets up the client without waiting for Redis: a replica starts while Redis is down and
    /// applies the when-down policies until it answers. Call inside a tokio runtime (a task
    /// sends the settles).
    pub fn connect(config: &RedisConfig) -> Result<RedisLimits, RedisSetupError> {
        let shown = redact(&config.url);
        let conn = Link::open(config)?;
        // Ends when the last handle (and with it the sender) is dropped.
        let settles = settles::start(conn.clone(), config.timeout);
        Ok(RedisLimits {
            inner: Arc::new(Inner {
                conn,
                timeout: config.timeout,
                shown: format!("redis at {shown}"),
                gcra: redis::Script::new(concat!(
                    include_str!("gcra_probe.lua"),
                    include_str!("gcra.lua")
                )),
                admit: redis::Script::new(concat!(
                    include_str!("gcra_probe.lua"),
                    include_str!("limits_in_force.lua"),
                    include_str!("spend_lines.lua"),
                    include_str!("admit.lua")
                )),
                outage: Outage::default(),
                limits_when_down: config.limits_when_down,
                settles,
            }),
        })
    }

    /// The dollar-budget store on the same connection.
    pub fn spend(&self) -> RedisSpend {
        RedisSpend::new(self.clone())
    }

    pub fn limits_when_down(&self) -> WhenDown {
        self.inner.limits_when_down
    }

    /// Runs one script under the timeout.
    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, String> {
        run_script(&self.inner.conn, self.inner.timeout, invocation).await
    }

    fn unavailable(&self, error: String) -> LimitsUnavailable {
        let consequence = match self.inner.limits_when_down {
            WhenDown::Open => "rate limits let requests through",
            WhenDown::Closed => "rate limits refuse requests",
        };
        self.inner
            .outage
            .failed(&self.inner.shown, &error, consequence);
        LimitsUnavailable(error)
    }

    fn answered(&self) {
        self.inner.outage.answered(&self.inner.shown);
    }
}

/// Microseconds per cell of `rate`.
fn every_us(period: Duration, per_period: u32) -> u64 {
    (period.as_micros() as u64 / u64::from(per_period.max(1))).max(1)
}

/// The caller's bucket on `endpoint`.
fn caller_key(caller: &str, endpoint: &str) -> String {
    format!("{TAG}:rate_limit:{caller}:{endpoint}")
}

/// A provider's two per-minute buckets and what one call takes from them, as the scripts take
/// them (`gcra.lua` for an attempt, `admit.lua` for a request's first call).
struct ProviderBuckets {
    requests_key: String,
    tokens_key: String,
    every_request: u64,
    requests_burst: u32,
    every_token: u64,
    tokens_burst: u64,
    /// A call bigger than a minute's budget takes the whole budget, as in-process.
    tokens: u64,
}

impl ProviderBuckets {
    fn new(provider: ProviderKind, rates: ProviderRates, tokens: u64) -> ProviderBuckets {
        let minute = Duration::from_secs(60);
        let (requests_key, tokens_key) = provider_keys(provider);
        let tokens_burst = u64::from(rates.tokens_per_minute.get());
        ProviderBuckets {
            requests_key,
            tokens_key,
            every_request: every_us(minute, rates.requests_per_minute.get()),
            requests_burst: rates.requests_per_minute.get(),
            every_token: every_us(minute, rates.tokens_per_minute.get()),
            tokens_burst,
            tokens: tokens.min(tokens_burst),
        }
    }
}

fn provider_keys(provider: ProviderKind) -> (String, String) {
    (
        format!("{TAG}:provider:{provider}:requests"),
        format!("{TAG}:provider:{provider}:tokens"),
    )
}

impl SharedRates for RedisLimits {
    fn check_caller<'a>(
        &'a self,
        caller: &'a str,
        endpoint: &'a str,
        rate: Rate,
    ) -> BoxFuture<'a, Result<Result<Allowance, CallerLimited>, LimitsUnavailable>> {
        async move {
            let every = every_us(rate.period, rate.per_period.get());
            let mut invocation = self.inner.gcra.prepare_invoke();
            invocation
                .key(caller_key(caller, endpoint))
                .arg(every)
                .arg(rate.burst.get())
                .arg(1)
                .arg("0");
            let answer: Vec<i64> = self
                .run(invocation)
                .await
                .map_err(|e| self.unavailable(e))?;
            self.answered();
            Ok(match answer.as_slice() {
                [1, remaining, full_in, ..] => Ok(Allowance {
                    limit: rate.per_period.get(),
                    remaining: u32::try_from(*remaining).unwrap_or(0),
                    reset: Duration::from_micros(u64::try_from(*full_in).unwrap_or(0)),
                }),
                [_, wait, ..] => Err(CallerLimited {
                    caller: caller.to_owned(),
                    endpoint: endpoint.to_owned(),
                    limit: rate.per_period.get(),
                    burst: rate.burst.get(),
                    period: rate.period,
                    retry_after: Duration::from_micros(u64::try_from(*wait).unwrap_or(0)),
                }),
                _ => return Err(self.unavailable(format!("unexpected answer {answer:?}"))),
            })
        }
        .boxed()
    }

    fn reserve_provider(
        &self,
        provider: ProviderKind,
        rates: ProviderRates,
        tokens: u64,
    ) -> BoxFuture<'_, Result<Result<(), BudgetExceeded>, LimitsUnavailable>> {
        async move {
            let buckets = ProviderBuckets::new(provider, rates, tokens);
            let mut invocation = self.inner.gcra.prepare_invoke();
            invocation
                .key(&buckets.requests_key)
                .key(&buckets.tokens_key)
                .arg(buckets.every_request)
                .arg(buckets.requests_burst)
                .arg(1)
                .arg("1")
                .arg(buckets.every_token)
                .arg(buckets.tokens_burst)
                .arg(buckets.tokens);
            let answer: Vec<i64> = self
                .run(invocation)
                .await
                .map_err(|e| self.unavailable(e))?;
            self.answered();
            Ok(match answer.as_slice() {
                [1, ..] => Ok(()),
                [_, wait, which, ..] => Err(BudgetExceeded {
                    which: if *which == 1 { "requests" } else { "tokens" },
                    retry_after: Duration::from_micros(u64::try_from(*wait).unwrap_or(0)),
                }),
                _ => return Err(self.unavailable(format!("unexpected answer {answer:?}"))),
            })
        }
        .boxed()
    }

    fn settle_provider(
        &self,
        provider: ProviderKind,
        rates: ProviderRates,
        reserved: u64,
        used: u64,
    ) {
        let tpm = u64::from(rates.tokens_per_minute.get());
        let cells = i64::try_from(used.min(tpm)).unwrap_or(i64::MAX)
            - i64::try_from(reserved.min(tpm)).unwrap_or(i64::MAX);
        if cells == 0 {
            return;
        }
        let every = every_us(Duration::from_secs(60), rates.tokens_per_minute.get());
        // The receiver lives as long as the connection; a send fails only at shutdown.
        let _ = self.inner.settles.send(Settle::Tokens {
            key: provider_keys(provider).1,
            every,
            cells,
        });
    }

    fn describe(&self) -> String {
        self.inner.shown.clone()
    }

    fn failures(&self) -> u64 {
        self.inner.outage.failures()
    }
}

/// Runs one script on `conn` under `timeout` (the script is loaded on first use: `EVALSHA`,
/// then `SCRIPT LOAD` if Redis does not know it).
async fn run_script<T: redis::FromRedisValue>(
    conn: &Link,
    timeout: Duration,
    invocation: redis::ScriptInvocation<'_>,
) -> Result<T, String> {
    let mut conn = conn.clone();
    match tokio::time::timeout(timeout, invocation.invoke_async(&mut conn)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}
