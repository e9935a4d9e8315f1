//! The admin routes over a real socket: metrics and alerts from the store, dead letters listed
//! with their error and requeued once the cause is gone, all for admins only; and the job routes
//! of a server without a queue naming what to configure.

use agents::Process;
use keyvex_testkit::{business, error_of, last};
use serde_json::{Value, json};

use crate::support::{ADMIN, ALICE, Spec, TestServer, WAIT};

#[tokio::test]
async fn admin_routes_report_metrics_alerts_and_dead_letters_to_admins_only() {
    let h = TestServer::sqlite(Spec::new(5)).await;
    let mut input_tokens = 0;
    for _ in 0..3 {
        let (_, events) = h
            .run_agent("magic-spark", ALICE, json!({ "input": business() }))
            .await;
        input_tokens += last(&events, "usage")["tokens"]["input"].as_u64().unwrap();
    }
    let (health, ok) = h
        .tracker
        .wait_for(WAIT, |m| m.shipped >= 3 && m.pending == 0)
        .await;
    assert!(ok, "{health:?}");

    let m = h.get_json("/v1/admin/metrics?groupBy=process", ADMIN).await;
    assert_eq!(m["totals"]["requests"], 3, "{m}");
    assert_eq!(m["totals"]["inputTokens"], input_tokens);
    assert!(m["totals"]["costMicroUsd"].as_u64().unwrap() > 0);
    assert_eq!(m["groupBy"], "process");
    assert_eq!(m["groups"][0]["key"], "magicSpark");
    assert_eq!(m["groups"][0]["requests"], 3);
    assert_eq!(m["pipeline"]["sink"], "sqlite");
    assert!(m["thresholds"]["costPerRequestUsd"].as_f64().unwrap() > 0.0);
    let alerts = h.get_json("/v1/admin/alerts", ADMIN).await;
    assert!(
        alerts["alerts"].is_array() && alerts["from"].is_string(),
        "{alerts}"
    );

    let e = error_of(h.get("/v1/admin/metrics?groupBy=week", ADMIN).await, 400).await;
    assert_eq!(e["param"], "groupBy");
    assert!(e["message"].as_str().unwrap().contains("groupBy"), "{e}");
    for path in [
        "/v1/admin/metrics",
        "/v1/admin/alerts",
        "/v1/admin/dead-letters",
    ] {
        let e = error_of(h.get(path, ALICE).await, 403).await;
        assert_eq!(e["type"], "permission_error", "{path}");
    }
    let e = error_of(
        h.post("/v1/admin/dead-letters/requeue", ALICE)
            .send()
            .await
            .unwrap(),
        403,
    )
    .await;
    assert_eq!(e["code"], "forbidden");

    // The store refuses one process's records: they become dead letters, listed with the
    // error, and ship once requeued after the cause is gone.
    let store = rusqlite::Connection::open(&h.db).unwrap();
    store
        .execute_batch(
            "CREATE TRIGGER refuse_style BEFORE INSERT ON requests
               WHEN NEW.process = 'styleMaster'
               BEGIN SELECT RAISE(ABORT, 'styleMaster rows refused by the test'); END;",
        )
        .unwrap();
    let input = agents::samples::sample_input(Process::StyleMaster, 1);
    let (_, events) = h
        .run_agent("style-master", ALICE, json!({ "input": input }))
        .await;
    assert_eq!(last(&events, "done")["status"], "succeeded");
    let (health, ok) = h.tracker.wait_for(WAIT, |m| m.dead_letters == 1).await;
    assert!(ok, "{health:?}");
    let dead = h.get_json("/v1/admin/dead-letters?limit=10", ADMIN).await;
    assert_eq!(dead["total"], 1, "{dead}");
    let letter = &dead["deadLetters"][0];
    assert_eq!(letter["kind"], "request");
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("refused by the test"),
        "{letter}"
    );
    assert_eq!(letter["entry"]["process"], "styleMaster");
    let e = error_of(h.get("/v1/admin/dead-letters?limit=0", ADMIN).await, 400).await;
    assert_eq!(e["param"], "limit");

    store.execute_batch("DROP TRIGGER refuse_style").unwrap();
    let requeued: Value = h
        .post("/v1/admin/dead-letters/requeue", ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(requeued, json!({ "requeued": 1, "remaining": 0 }));
    let (health, ok) = h
        .tracker
        .wait_for(WAIT, |m| m.shipped >= 4 && m.pending == 0)
        .await;
    assert!(ok, "{health:?}");
    let m = h
        .get_json(
            "/v1/admin/metrics?groupBy=process&process=styleMaster",
            ADMIN,
        )
        .await;
    assert_eq!(m["totals"]["requests"], 1, "{m}");

    // No queue on this server: the job routes say which variable to set.
    let e = error_of(
        h.post("/v1/jobs", ALICE)
            .json(&json!({ "target": "magicSpark", "input": business() }))
            .send()
            .await
            .unwrap(),
        503,
    )
    .await;
    assert_eq!(e["code"], "queue_not_configured");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("SQS_AI_PROCESSING_QUEUE_URL"),
        "{e}"
    );
    error_of(h.get("/v1/jobs/some-id", ALICE).await, 503).await;
    h.stop().await;
}
