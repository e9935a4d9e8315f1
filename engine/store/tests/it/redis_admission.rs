//! Admission in one Redis round trip (`Engine::admit` with `admission_in_one_step`), against a
//! real redis-server and the simulator over HTTP: the caller's limit, the budget check and the
//! first call's reservations are one script; the first attempt uses what it reserved, a call
//! that goes elsewhere returns it, and every reservation ends settled to what was billed.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keyvex_engine::admission::{Admission, FirstCallOf, PrepaidStats};
use keyvex_engine::budgets::{BudgetDenied, BudgetLimits, BudgetScope, Budgets, OnUnavailable};
use keyvex_engine::cost::Cost;
use keyvex_engine::limits::{LimitsWhenDown, ProviderRates, Rate};
use keyvex_engine::provider::ChatMessage;
use keyvex_engine::{CallContext, CallEvent, CallTarget, Engine, RouteOptions, RouteRequest};
use keyvex_sim::SimHandle;
use keyvex_store::redis_limits::{RedisConfig, RedisLimits, WhenDown};
use keyvex_testkit::redis::Redis;
use keyvex_testkit::{MemoryRecorder, fast_sim, sim_engine};

const ENDPOINT: &str = "/v1/chat/completions";

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

struct Setup {
    engine: Engine,
    recorder: Arc<MemoryRecorder>,
    _sim: SimHandle,
    redis: Redis,
}

/// An engine on the simulator whose caller limit (`burst` per minute), provider budgets
/// (`rpm` requests per minute) and budgets (`limits`) all live in one Redis, admitted in one
/// step.
async fn setup(burst: u32, rpm: u32, limits: BudgetLimits) -> Setup {
    setup_on(
        Redis::start().await,
        false,
        burst,
        rpm,
        limits,
        DEFAULT_WHEN_DOWN,
    )
    .await
}

/// What rate limits and budgets do while Redis cannot be asked (the defaults: open, closed).
const DEFAULT_WHEN_DOWN: (LimitsWhenDown, OnUnavailable) =
    (LimitsWhenDown::Open, OnUnavailable::FailClosed);

async fn setup_on(
    redis: Redis,
    cluster: bool,
    burst: u32,
    rpm: u32,
    limits: BudgetLimits,
    (limits_down, budgets_down): (LimitsWhenDown, OnUnavailable),
) -> Setup {
    let sim = fast_sim(7).await;
    let config = RedisConfig {
        url: redis.url.clone(),
        timeout: Duration::from_millis(500),
        cluster,
        limits_when_down: WhenDown::Open,
        budgets_when_down: OnUnavailable::FailClosed,
    };
    let shared = RedisLimits::connect(&config).unwrap();
    let recorder = MemoryRecorder::new();
    let engine = sim_engine(&sim)
        .recorder(recorder.clone())
        .caller_rate(Rate {
            per_period: nz(burst),
            period: Duration::from_secs(60),
            burst: nz(burst),
        })
        .provider_rates(ProviderRates {
            requests_per_minute: nz(rpm),
            tokens_per_minute: nz(100_000_000),
        })
        .admission_in_one_step(Arc::new(shared.clone()))
        .shared_limits(Arc::new(shared.clone()), limits_down)
        .budgets(Budgets::new(limits, Arc::new(shared.spend()), budgets_down))
        .build()
        .unwrap();
    Setup {
        engine,
        recorder,
        _sim: sim,
        redis,
    }
}

fn question() -> RouteRequest {
    RouteRequest {
        messages: vec![ChatMessage::user("Three ideas for a bakery quiz?")],
        max_output_tokens: Some(200),
        ..RouteRequest::default()
    }
}

/// Admits a request of alice's whose first call is a chat with `gpt-5.4-mini`.
async fn admit(s: &Setup, ctx: &mut CallContext) -> Admission {
    let request = question();
    s.engine
        .admit(
            ctx,
            ENDPOINT,
            Some(FirstCallOf::Chat(
                &CallTarget::parse("gpt-5.4-mini"),
                &request,
            )),
        )
        .await
}

/// Runs a chat call to its end; whether it succeeded.
async fn call(engine: &Engine, ctx: &CallContext, model: &str) -> bool {
    let mut stream = engine
        .chat(
            ctx,
            &CallTarget::parse(model),
            question(),
            RouteOptions::default(),
        )
        .unwrap();
    while let Some(event) = stream.next().await {
        match event {
            CallEvent::Finished { record, .. } => {
                record.receipt.durable().await.unwrap();
                return true;
            }
            CallEvent::Failed { record, .. } => {
                record.receipt.durable().await.unwrap();
                return false;
            }
            _ => {}
        }
    }
    panic!("the call ended without a terminal event");
}

/// alice's daily line once every settle has reached Redis (nothing reserved), and what the
/// records billed.
async fn settled_day(s: &Setup) -> (Cost, Cost) {
    let budgets = s.engine.budgets().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let views = budgets.caller_view("alice").await.unwrap();
        let day = views
            .iter()
            .find(|v| v.scope == BudgetScope::CallerDaily)
            .unwrap()
            .state;
        let billed = Cost(s.recorder.records().iter().map(|r| r.cost_pico_usd).sum());
        if day.reserved == Cost::ZERO {
            return (day.spent, billed);
        }
        assert!(tokio::time::Instant::now() < deadline, "{day:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn reserved_now(s: &Setup) -> Cost {
    let views = s
        .engine
        .budgets()
        .unwrap()
        .caller_view("alice")
        .await
        .unwrap();
    views[0].state.reserved
}

#[tokio::test]
async fn the_first_attempt_uses_what_admission_reserved_and_a_call_elsewhere_returns_it() {
    let s = setup(100, 1_000, BudgetLimits::default()).await;
    let target = CallTarget::parse("gpt-5.4-mini");
    let worst = s.engine.worst_case(&target, &question()).unwrap();

    let mut ctx = CallContext::new("alice");
    let admission = admit(&s, &mut ctx).await;
    assert_eq!(admission.allowance.unwrap().remaining, 99);
    assert!(admission.budgets.is_ok());
    assert!(ctx.first_call.is_waiting(), "{ctx:?}");
    assert_eq!(
        reserved_now(&s).await,
        worst,
        "the worst case is held from admission"
    );
    assert!(call(&s.engine, &ctx, "gpt-5.4-mini").await);
    assert!(!ctx.first_call.is_waiting(), "the first attempt took it");
    assert_eq!(
        s.engine.prepaid_stats(),
        PrepaidStats {
            used: 1,
            returned: 0
        }
    );
    let (spent, billed) = settled_day(&s).await;
    assert!(billed > Cost::ZERO);
    assert_eq!(spent, billed, "settled to what the record bills");

    // Admitted for one model, the call goes to another: the admission's reservations go back,
    // the attempt reserves its own, and the day still holds exactly what was billed.
    let mut ctx = CallContext::new("alice");
    admit(&s, &mut ctx).await.budgets.unwrap();
    assert!(call(&s.engine, &ctx, "claude-haiku-4-5").await);
    assert_eq!(
        s.engine.prepaid_stats(),
        PrepaidStats {
            used: 1,
            returned: 1
        }
    );
    // A request admitted and then dropped before any call returns them too.
    let mut ctx = CallContext::new("alice");
    admit(&s, &mut ctx).await.budgets.unwrap();
    drop(ctx);
    assert_eq!(s.engine.prepaid_stats().returned, 2);
    let (spent, billed) = settled_day(&s).await;
    assert_eq!(spent, billed);
    assert_eq!(s.recorder.records().len(), 2);
}

#[tokio::test]
async fn a_refusal_in_the_one_step_takes_nothing_after_it() {
    // The caller's burst is 1: the second request is limited, and reserves nothing.
    let s = setup(1, 1_000, BudgetLimits::default()).await;
    let target = CallTarget::parse("gpt-5.4-mini");
    let request = question();
    let worst = s.engine.worst_case(&target, &request).unwrap();
    let mut first = CallContext::new("alice");
    let admitted = admit(&s, &mut first).await;
    assert!(admitted.allowance.is_ok());
    let mut second = CallContext::new("alice");
    let limited = admit(&s, &mut second).await;
    let refusal = limited.allowance.unwrap_err();
    assert_eq!((refusal.burst, refusal.caller.as_str()), (1, "alice"));
    assert!(refusal.retry_after > Duration::ZERO);
    assert!(!second.first_call.is_waiting());
    assert_eq!(reserved_now(&s).await, worst, "only the first one's");
    drop(first);

    // A daily budget below the first call's worst case: refused, naming it; nothing reserved.
    let s = setup(
        100,
        1_000,
        BudgetLimits {
            caller_daily: Some(Cost(worst.0 - 1)),
            ..BudgetLimits::default()
        },
    )
    .await;
    let mut ctx = CallContext::new("alice");
    let over = admit(&s, &mut ctx).await;
    assert_eq!(over.allowance.unwrap().remaining, 99, "the request counted");
    let BudgetDenied::Exceeded(refusal) = over.budgets.unwrap_err() else {
        panic!("expected a budget refusal");
    };
    assert_eq!(refusal.scope, BudgetScope::CallerDaily);
    assert_eq!(
        (refusal.requested, refusal.limit),
        (worst, Cost(worst.0 - 1))
    );
    assert!(!ctx.first_call.is_waiting());
    assert_eq!(reserved_now(&s).await, Cost::ZERO);

    // The provider's one request of the minute is taken: the next admission is let in (the
    // call may go to a fallback) but reserves no dollars, and its first attempt is refused by
    // the provider budget without calling.
    let s = setup(100, 1, BudgetLimits::default()).await;
    let mut first = CallContext::new("alice");
    admit(&s, &mut first).await.budgets.unwrap();
    let mut second = CallContext::new("alice");
    admit(&s, &mut second).await.budgets.unwrap();
    assert_eq!(reserved_now(&s).await, worst, "only the first one's");
    assert!(
        second.first_call.is_waiting(),
        "the provider's refusal waits for the attempt"
    );
    assert!(!call(&s.engine, &second, "gpt-5.4-mini").await);
    assert!(
        s.recorder.records().iter().all(|r| r.cost_pico_usd == 0),
        "no model was called: {:?}",
        s.recorder.records()
    );
    assert!(call(&s.engine, &first, "gpt-5.4-mini").await);
    assert_eq!(
        s.engine.prepaid_stats(),
        PrepaidStats {
            used: 2,
            returned: 0
        }
    );
    let (spent, billed) = settled_day(&s).await;
    assert_eq!(spent, billed);
}

/// ElastiCache with cluster mode on: a script whose keys span hash slots is refused there
/// (`CROSSSLOT`), and the one-step admission takes a caller's keys, the global budget and the
/// provider's buckets together. Every key carries the `{keyvex}` tag, so all of it works on a
/// real (one-node) cluster through the cluster client.
#[tokio::test]
async fn on_a_redis_cluster_every_script_finds_its_keys_in_one_slot() {
    let redis = Redis::start_cluster().await;
    // The test cluster enforces slots: two untagged keys in one script are refused.
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut plain = client.get_multiplexed_async_connection().await.unwrap();
    let crossed = redis::cmd("EVAL")
        .arg("return 1")
        .arg(2)
        .arg("alice")
        .arg("bob")
        .query_async::<i64>(&mut plain)
        .await
        .unwrap_err();
    assert!(
        crossed.to_string().to_lowercase().contains("crossslot"),
        "{crossed}"
    );

    let s = setup_on(
        redis,
        true,
        100,
        1_000,
        BudgetLimits::default(),
        DEFAULT_WHEN_DOWN,
    )
    .await;
    let mut ctx = CallContext::new("alice");
    let admission = admit(&s, &mut ctx).await;
    assert_eq!(admission.allowance.unwrap().remaining, 99);
    assert!(admission.budgets.is_ok());
    assert!(call(&s.engine, &ctx, "gpt-5.4-mini").await);
    // A call on another model reserves on its own (the reserve script), and settles.
    assert!(call(&s.engine, &CallContext::new("alice"), "claude-haiku-4-5").await);
    assert_eq!(s.engine.prepaid_stats().used, 1);
    let (spent, billed) = settled_day(&s).await;
    assert!(billed > Cost::ZERO);
    assert_eq!(spent, billed);
    // The admin's per-caller limits live in the tagged hash too.
    let budgets = s.engine.budgets().unwrap();
    budgets
        .set_caller(
            "alice",
            keyvex_engine::budgets::CallerBudget {
                daily: Some(Cost(1)),
                monthly: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        budgets.callers().await.unwrap()["alice"].daily,
        Some(Cost(1))
    );
    let mut ctx = CallContext::new("alice");
    let over = admit(&s, &mut ctx).await;
    assert!(
        matches!(over.budgets, Err(BudgetDenied::Exceeded(_))),
        "{:?}",
        over.budgets
    );
    assert_eq!(s.engine.shared_limit_failures(), 0);
}

/// Redis stopped: the one-step admission cannot be asked, and each kind of limit does what its
/// policy says — rate limits refuse or let through, budgets refuse or let through uncounted —
/// with nothing left reserved for the first attempt.
#[tokio::test]
async fn with_redis_down_the_one_step_admission_follows_each_policy() {
    let policies = [
        (LimitsWhenDown::Closed, OnUnavailable::FailOpen),
        (LimitsWhenDown::Open, OnUnavailable::FailClosed),
        (LimitsWhenDown::Open, OnUnavailable::FailOpen),
    ];
    for policy in policies {
        let mut s = setup_on(
            Redis::start().await,
            false,
            100,
            1_000,
            BudgetLimits::default(),
            policy,
        )
        .await;
        s.redis.stop();
        let mut ctx = CallContext::new("alice");
        let admission = admit(&s, &mut ctx).await;
        assert!(!ctx.first_call.is_waiting(), "{policy:?}");
        assert!(s.engine.shared_limit_failures() >= 1, "{policy:?}");
        match policy {
            (LimitsWhenDown::Closed, _) => {
                let limited = admission.allowance.unwrap_err();
                assert_eq!(limited.retry_after, Duration::from_secs(1));
                assert!(admission.budgets.unwrap().is_empty(), "not asked");
            }
            (_, OnUnavailable::FailClosed) => {
                assert_eq!(admission.allowance.unwrap().remaining, u32::MAX);
                assert!(
                    matches!(admission.budgets, Err(BudgetDenied::Unavailable(_))),
                    "{:?}",
                    admission.budgets
                );
            }
            (_, OnUnavailable::FailOpen) => {
                assert_eq!(admission.allowance.unwrap().remaining, u32::MAX);
                assert!(admission.budgets.unwrap().is_empty());
                // Let through uncounted: the call goes out, its attempt unable to reserve too.
                assert!(call(&s.engine, &ctx, "gpt-5.4-mini").await);
            }
        }
    }
}
