//! The Redis scripts against a real redis-server: budget amounts past what a Lua double holds
//! exactly are compared exactly, a reservation is all lines or none, and provider budgets refuse
//! by requests or tokens and take settled tokens back.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keyvex_engine::budgets::{
    BudgetDenied, BudgetLimits, BudgetScope, Budgets, CallerBudget, OnUnavailable, SpendStore,
};
use keyvex_engine::cost::Cost;
use keyvex_engine::limits::{ProviderRates, Rate, SharedRates};
use keyvex_engine::stream::ProviderKind;
use keyvex_store::redis_limits::{RedisConfig, RedisLimits, WhenDown};
use keyvex_testkit::redis::Redis;

fn config(url: &str) -> RedisConfig {
    RedisConfig {
        url: url.to_owned(),
        timeout: Duration::from_millis(500),
        cluster: false,
        limits_when_down: WhenDown::Open,
        budgets_when_down: OnUnavailable::FailClosed,
    }
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

#[tokio::test]
async fn budgets_past_nine_thousand_dollars_are_compared_to_the_picodollar() {
    let redis = Redis::start().await;
    let limits = RedisLimits::connect(&config(&redis.url)).unwrap();
    let store = Arc::new(limits.spend());
    // $10,000.000000000001: 10^16 + 1 picodollars, which a double cannot tell from 10^16.
    let limit = Cost(10_000_000_000_000_001);
    let budgets = Arc::new(Budgets::new(
        BudgetLimits {
            global_daily: Some(limit),
            ..BudgetLimits::default()
        },
        store.clone(),
        OnUnavailable::FailClosed,
    ));
    budgets
        .reserve("a", None, Cost(10_000_000_000_000_000))
        .await
        .unwrap()
        .settle(Cost(10_000_000_000_000_000));
    settled(&budgets).await;
    let BudgetDenied::Exceeded(refusal) = budgets.reserve("b", None, Cost(2)).await.unwrap_err()
    else {
        panic!("expected a refusal");
    };
    assert_eq!(refusal.scope, BudgetScope::GlobalDaily);
    assert_eq!(refusal.spent, Cost(10_000_000_000_000_000));
    assert_eq!(refusal.limit, limit);
    // Exactly one picodollar is left, and it fits.
    let hold = budgets.reserve("b", None, Cost(1)).await.unwrap();
    // Nothing of the refused reservation was taken, on any line.
    let lines = budgets.lines("b", None, SystemTime::now());
    let states = store.read(&lines).await.unwrap();
    assert_eq!(states[0].reserved, Cost(1), "caller day: {states:?}");
    hold.settle(Cost::ZERO);
    settled(&budgets).await;
    let global = budgets.global_view().await.unwrap();
    assert_eq!(global.state.spent, Cost(10_000_000_000_000_000));
}

#[tokio::test]
async fn a_callers_own_limit_is_the_one_a_read_shows_and_a_reservation_enforces() {
    let redis = Redis::start().await;
    let limits = RedisLimits::connect(&config(&redis.url)).unwrap();
    let store = Arc::new(limits.spend());
    let budgets = Arc::new(Budgets::new(
        BudgetLimits {
            caller_daily: Some(Cost(1_000)),
            ..BudgetLimits::default()
        },
        store.clone(),
        OnUnavailable::FailClosed,
    ));
    budgets
        .set_caller(
            "tight",
            CallerBudget {
                daily: Some(Cost(100)),
                monthly: None,
            },
        )
        .await
        .unwrap();
    let views = budgets.caller_view("tight").await.unwrap();
    let day = views
        .iter()
        .find(|v| v.scope == BudgetScope::CallerDaily)
        .expect("a caller-day line");
    assert_eq!(day.state.limit, Some(Cost(100)), "{views:?}");
    let BudgetDenied::Exceeded(refusal) =
        budgets.reserve("tight", None, Cost(101)).await.unwrap_err()
    else {
        panic!("expected a refusal");
    };
    assert_eq!(refusal.limit, Cost(100));
    // Another caller still has the configured limit.
    budgets
        .reserve("other", None, Cost(101))
        .await
        .unwrap()
        .settle(Cost::ZERO);
}

/// Waits until nothing is reserved on the global day: settles are queued off the caller's path
/// and land shortly after.
async fn settled(budgets: &Budgets) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let global = budgets.global_view().await.unwrap();
        if global.state.reserved == Cost::ZERO {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{global:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn provider_budgets_refuse_by_requests_or_tokens_and_take_settled_tokens_back() {
    let redis = Redis::start().await;
    let limits = RedisLimits::connect(&config(&redis.url)).unwrap();
    let rates = ProviderRates {
        requests_per_minute: nz(3),
        tokens_per_minute: nz(1_000),
    };
    let p = ProviderKind::OpenAi;
    limits
        .reserve_provider(p, rates, 600)
        .await
        .unwrap()
        .unwrap();
    let refused = limits
        .reserve_provider(p, rates, 600)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.which, "tokens");
    assert!(refused.retry_after > Duration::from_secs(10), "{refused:?}");
    // 600 reserved, 100 used: 500 come back.
    limits.settle_provider(p, rates, 600, 100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while limits
        .reserve_provider(p, rates, 600)
        .await
        .unwrap()
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refund never landed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Three requests a minute: the fourth is refused for requests, whatever its tokens.
    limits.reserve_provider(p, rates, 1).await.unwrap().unwrap();
    let refused = limits
        .reserve_provider(p, rates, 1)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.which, "requests");
    // Another provider has its own budget.
    limits
        .reserve_provider(ProviderKind::Anthropic, rates, 600)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn caller_limits_count_the_burst_and_an_unreachable_redis_is_an_error_the_caller_decides_on()
{
    let mut redis = Redis::start().await;
    let limits = RedisLimits::connect(&config(&redis.url)).unwrap();
    let rate = Rate {
        per_period: nz(60),
        period: Duration::from_secs(60),
        burst: nz(3),
    };
    let remaining: Vec<u32> = futures::future::join_all(
        (0..3).map(|_| limits.check_caller("alice", "/v1/agents/{agent}", rate)),
    )
    .await
    .into_iter()
    .map(|r| r.unwrap().unwrap().remaining)
    .collect();
    let mut sorted = remaining.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [0, 1, 2], "{remaining:?}");
    let limited = limits
        .check_caller("alice", "/v1/agents/{agent}", rate)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        limited.retry_after > Duration::from_millis(900)
            && limited.retry_after <= Duration::from_secs(1),
        "{limited:?}"
    );
    assert!(
        limits
            .check_caller("bob", "/v1/agents/{agent}", rate)
            .await
            .unwrap()
            .is_ok()
    );
    redis.stop();
    assert!(limits.check_caller("bob", "/x", rate).await.is_err());
    assert!(limits.failures() >= 1);
}
