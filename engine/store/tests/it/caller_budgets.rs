//! Callers' own limits set through the admin API, kept in both stores (a SQLite file, and the
//! single table in moto) for budgets whose counters live in the process: set, replaced, read
//! back after reopening, cleared; amounts past what an SQLite integer holds stay exact.

use keyvex_engine::budgets::CallerBudget;
use keyvex_engine::cost::Cost;
use keyvex_store::caller_budgets::CallerBudgets;
use keyvex_testkit::TempDir;
use keyvex_testkit::moto::{self, Moto};

async fn round_trip(open: impl Fn() -> CallerBudgets) {
    let store = open();
    assert!(store.load().await.unwrap().is_empty());
    let five = CallerBudget {
        daily: Some(Cost(5_000_000_000_000)),
        monthly: None,
    };
    store.save("alice", five).await.unwrap();
    // $10,000,000: more picodollars than an i64 holds.
    let large = CallerBudget {
        daily: None,
        monthly: Some(Cost(10_000_000 * 1_000_000_000_000)),
    };
    store.save("bob", large).await.unwrap();
    let replaced = CallerBudget {
        daily: Some(Cost(7)),
        monthly: Some(Cost(9)),
    };
    store.save("alice", replaced).await.unwrap();

    let reopened = open();
    let all = reopened.load().await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all["alice"], replaced);
    assert_eq!(all["bob"], large);

    reopened
        .save("alice", CallerBudget::default())
        .await
        .unwrap();
    let all = open().load().await.unwrap();
    assert_eq!(all.keys().collect::<Vec<_>>(), ["bob"]);
}

#[tokio::test]
async fn caller_limits_are_kept_in_sqlite() {
    let dir = TempDir::new("caller-budgets");
    let path = dir.file("metrics.sqlite3");
    round_trip(|| CallerBudgets::sqlite(&path).unwrap()).await;
}

#[tokio::test]
async fn caller_limits_are_kept_in_dynamodb() {
    let moto = Moto::start().await;
    let client = moto::table(&moto, "caller-budgets").await;
    round_trip(|| CallerBudgets::dynamo(client.clone(), "caller-budgets")).await;
}
