//! Model catalog versions through running servers, on a SQLite store and on DynamoDB (moto):
//! publish, list, activate and roll back through the admin API; an invalid catalog refused with
//! the start-up message; a stream open while a new version is activated finishes on (and is
//! costed with) its version while the next call uses the new primary and the new price; two
//! servers on one store both follow an activation made elsewhere within their poll interval; a
//! replica that cannot serve a version stays on its last good one and raises one alert.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use keyvex_engine::Catalog;
use keyvex_engine::catalog::EMBEDDED_CATALOG;
use keyvex_engine::cost::{Cost, cost};
use keyvex_engine::stream::Usage;
use keyvex_sim::{Fault, Rule};
use keyvex_store::{CatalogVersions, StoreConfig, Stores};
use keyvex_testkit::moto::{self, Moto};
use keyvex_testkit::{TempDir, business, error_of, fast_metrics, last};
use serde_json::{Value, json};

use crate::support::{ADMIN, ALICE, Spec, TestServer, WAIT};

/// The embedded catalog with `edit` applied.
fn edited(edit: impl FnOnce(&mut Value)) -> Value {
    let mut v: Value = serde_json::from_str(EMBEDDED_CATALOG).unwrap();
    edit(&mut v);
    v
}

/// Magic Spark moved to GPT-5.4 mini (fallback Claude Sonnet), whose output price doubles.
fn cheaper_spark() -> Value {
    edited(|v| {
        v["version"] = "2026-12-01".into();
        v["models"][2]["pricing"]["outputPerMTok"] = 9.0.into();
        v["processes"]["magicSpark"]["primary"] = "gpt-5.4-mini".into();
        v["processes"]["magicSpark"]["fallback"] = "claude-sonnet-4-6".into();
    })
}

/// Where the servers of a test keep their store.
enum Store {
    Sqlite {
        dir: TempDir,
        config: StoreConfig,
    },
    Dynamo {
        moto: Moto,
        table: String,
        /// The servers' ledgers.
        dir: TempDir,
    },
}

impl Store {
    fn sqlite() -> Store {
        let dir = TempDir::new("catalog");
        let config = StoreConfig::Sqlite {
            path: dir.file("store.sqlite3"),
        };
        Store::Sqlite { dir, config }
    }

    async fn dynamo() -> Store {
        let moto = Moto::start().await;
        let table = "keyvex-catalog".to_owned();
        moto::table(&moto, &table).await;
        Store::Dynamo {
            moto,
            table,
            dir: TempDir::new("catalog-ledgers"),
        }
    }

    /// A server on this store with its own ledger file `tag`.
    async fn server(&self, spec: Spec, tag: &str) -> TestServer {
        let (stores, ledger) = match self {
            Store::Sqlite { dir, config } => {
                let ledger = dir.file(&format!("{tag}-ledger.sqlite3"));
                let stores = Stores::open(config, fast_metrics(&ledger)).await.unwrap();
                (stores, ledger)
            }
            Store::Dynamo { moto, table, dir } => {
                let ledger = dir.file(&format!("{tag}-ledger.sqlite3"));
                let client = moto::client(&moto.endpoint).await;
                let stores = Stores::open_dynamo(client, table, fast_metrics(&ledger))
                    .await
                    .unwrap();
                (stores, ledger)
            }
        };
        TestServer::on_stores(spec, &stores, ledger, None).await
    }

    /// The versions as `keyvex models` reaches them: the store directly, no server.
    async fn versions(&self) -> CatalogVersions {
        match self {
            Store::Sqlite { config, .. } => config.open_catalogs().await.unwrap(),
            Store::Dynamo { moto, table, .. } => {
                CatalogVersions::dynamo(keyvex_store::catalog_store::DynamoCatalogs::new(
                    moto::client(&moto.endpoint).await,
                    table,
                ))
            }
        }
    }
}

async fn post_json(h: &TestServer, path: &str, key: &str, body: &Value) -> reqwest::Response {
    h.post(path, key).json(body).send().await.unwrap()
}

async fn readyz_catalog(h: &TestServer) -> Value {
    let body: Value = h
        .http
        .get(format!("{}/readyz", h.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["catalog"].clone()
}

/// Waits until `/readyz` of `h` reports catalog version `version`.
async fn wait_for_version(h: &TestServer, version: u64, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let catalog = readyz_catalog(h).await;
        if catalog["version"] == version {
            return catalog;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} still on {catalog} after {within:?}",
            h.base
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn usage_of(event: &Value) -> Usage {
    serde_json::from_value(event["tokens"].clone()).unwrap()
}

fn price(catalog: &Catalog, model: &str, usage: &Usage) -> Cost {
    cost(usage, &catalog.model(model).unwrap().pricing)
}

/// Publish, list, activate, roll back through the admin API; an in-flight stream keeps its
/// version; metrics by catalog version.
async fn admin_api_and_in_flight_switch(store: Store) {
    let h = store.server(Spec::new(16), "one").await;
    let models = h.get_json("/v1/admin/models", ADMIN).await;
    assert_eq!(models["active"]["version"], 0, "{models}");
    assert_eq!(models["loaded"]["version"], 0);
    assert_eq!(models["versions"], json!([]));
    assert_eq!(models["base"]["label"], "2026-11-25");
    assert_eq!(readyz_catalog(&h).await["version"], 0);

    // Users may not touch the catalog.
    let e = error_of(h.get("/v1/admin/models", ALICE).await, 403).await;
    assert_eq!(e["type"], "permission_error");
    let e = error_of(
        post_json(&h, "/v1/admin/models", ALICE, &json!({"catalog": {}})).await,
        403,
    )
    .await;
    assert_eq!(e["code"], "forbidden");

    // An invalid catalog: the start-up message, and nothing stored.
    let broken = edited(|v| v["processes"]["magicSpark"]["fallback"] = "claude-haiku-4-5".into());
    let e = error_of(
        post_json(
            &h,
            "/v1/admin/models",
            ADMIN,
            &json!({ "catalog": broken, "activate": true }),
        )
        .await,
        400,
    )
    .await;
    let text = serde_json::to_string_pretty(&broken).unwrap();
    let at_start = Catalog::parse(&text, "request body field `catalog`").unwrap_err();
    assert_eq!(e["code"], "invalid_catalog");
    assert_eq!(e["param"], "catalog");
    assert_eq!(e["message"], format!("{at_start}; nothing was stored"));
    assert!(at_start.to_string().contains("same provider"), "{at_start}");
    let models = h.get_json("/v1/admin/models", ADMIN).await;
    assert_eq!(models["versions"], json!([]), "nothing stored");
    assert_eq!(models["active"]["version"], 0, "nothing activated");

    // Version 1: the catalog as shipped, activated; applies on this replica at once.
    let embedded: Value = serde_json::from_str(EMBEDDED_CATALOG).unwrap();
    let resp = post_json(
        &h,
        "/v1/admin/models",
        ADMIN,
        &json!({ "catalog": embedded, "note": "as shipped", "activate": true }),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let v1: Value = resp.json().await.unwrap();
    assert_eq!(v1["version"], 1, "{v1}");
    assert_eq!(v1["author"], "root");
    assert_eq!(v1["activation"]["thisReplica"]["applied"], true, "{v1}");
    assert_eq!(readyz_catalog(&h).await["version"], 1);

    // Version 2 published but not active yet.
    let resp = post_json(
        &h,
        "/v1/admin/models",
        ADMIN,
        &json!({ "catalog": cheaper_spark(), "note": "spark on mini" }),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let v2: Value = resp.json().await.unwrap();
    assert_eq!(v2["version"], 2);
    assert!(
        v2["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "gpt-5.4-mini: outputPerMTok $4.5 → $9"),
        "{v2}"
    );
    let shown = h.get_json("/v1/admin/models/2", ADMIN).await;
    assert_eq!(
        shown["catalog"]["processes"]["magicSpark"]["primary"],
        "gpt-5.4-mini"
    );
    assert_eq!(shown["note"], "spark on mini");
    let e = error_of(h.get("/v1/admin/models/9", ADMIN).await, 404).await;
    assert_eq!(e["code"], "unknown_catalog_version");
    let e = error_of(h.get("/v1/admin/models/latest", ADMIN).await, 400).await;
    assert_eq!(e["param"], "version");

    // A Magic Spark stream opens on version 1 (Claude Sonnet) and stalls mid-answer.
    h.sim.push_rule(Rule {
        model: Some("claude-sonnet-4-6".into()),
        protocol: None,
        fault: Fault::StallAfter {
            tokens: 5,
            stall: Duration::from_secs(3),
        },
        times: Some(1),
    });
    let open = h
        .post("/v1/agents/magic-spark", ALICE)
        .json(&json!({ "input": business() }))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    let mut first = open.bytes_stream().eventsource();
    let mut first_events = Vec::new();
    while let Some(ev) = first.next().await {
        let ev = ev.unwrap();
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        let delta = ev.event == "delta";
        first_events.push((ev.event, data));
        if delta {
            break;
        }
    }
    assert_eq!(last(&first_events, "start")["model"], "claude-sonnet-4-6");

    // Version 2 is activated while that stream is open.
    let activated: Value = h
        .post("/v1/admin/models/2/activate", ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(activated["version"], 2, "{activated}");
    assert_eq!(activated["previous"], 1);
    assert_eq!(activated["thisReplica"]["applied"], true);
    assert_eq!(readyz_catalog(&h).await["version"], 2);

    // The next call uses the new primary and the new price.
    let (_, second) = h
        .run_agent("magic-spark", ALICE, json!({ "input": business() }))
        .await;
    assert_eq!(last(&second, "start")["model"], "gpt-5.4-mini");
    assert_eq!(last(&second, "done")["status"], "succeeded");
    assert_eq!(
        h.tracker.health().accepted,
        1,
        "only the second call is recorded: the first is still open (stalled)"
    );

    // The open stream finishes on version 1.
    while let Some(ev) = first.next().await {
        let ev = ev.unwrap();
        first_events.push((ev.event, serde_json::from_str(&ev.data).unwrap()));
    }
    assert_eq!(last(&first_events, "done")["status"], "succeeded");
    let first_usage = last(&first_events, "usage");
    assert_eq!(first_usage["model"], "claude-sonnet-4-6");
    let second_usage = last(&second, "usage");

    let v1_catalog = Catalog::embedded().unwrap();
    let v2_catalog = Catalog::parse(&cheaper_spark().to_string(), "v2").unwrap();
    let first_cost = price(&v1_catalog, "claude-sonnet-4-6", &usage_of(first_usage));
    let second_cost = price(&v2_catalog, "gpt-5.4-mini", &usage_of(second_usage));
    assert_ne!(
        second_cost,
        price(&v1_catalog, "gpt-5.4-mini", &usage_of(second_usage)),
        "the new output price makes a difference"
    );
    assert_eq!(first_usage["costMicroUsd"], first_cost.micro_usd());
    assert_eq!(second_usage["costMicroUsd"], second_cost.micro_usd());

    // Each record says which version priced it; the admin metrics group and filter by it.
    let (health, ok) = h
        .tracker
        .wait_for(WAIT, |m| m.shipped >= 2 && m.pending == 0)
        .await;
    assert!(ok, "{health:?}");
    let by_version = h
        .get_json("/v1/admin/metrics?groupBy=catalogVersion", ADMIN)
        .await;
    let groups: Vec<(String, u64)> = by_version["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["key"].as_str().unwrap().to_owned(),
                g["requests"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        vec![("1".to_owned(), 1), ("2".to_owned(), 1)],
        "{by_version}"
    );
    let only_v1 = h
        .get_json("/v1/admin/metrics?catalogVersion=1", ADMIN)
        .await;
    assert_eq!(only_v1["totals"]["requests"], 1);
    assert_eq!(only_v1["totals"]["costPicoUsd"], first_cost.pico_usd());
    let only_v2 = h
        .get_json("/v1/admin/metrics?catalogVersion=2", ADMIN)
        .await;
    assert_eq!(only_v2["totals"]["costPicoUsd"], second_cost.pico_usd());
    assert_eq!(only_v2["filter"]["catalogVersion"], 2);

    // Rollback returns to version 1 here at once; the list shows both versions.
    let rolled: Value = h
        .post("/v1/admin/models/rollback", ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (rolled["version"].clone(), rolled["previous"].clone()),
        (json!(1), json!(2)),
        "{rolled}"
    );
    assert_eq!(readyz_catalog(&h).await["version"], 1);
    let (_, third) = h
        .run_agent("magic-spark", ALICE, json!({ "input": business() }))
        .await;
    assert_eq!(last(&third, "start")["model"], "claude-sonnet-4-6");
    let models = h.get_json("/v1/admin/models", ADMIN).await;
    assert_eq!(models["active"]["version"], 1);
    assert_eq!(models["active"]["history"], json!([0]));
    assert_eq!(models["versions"].as_array().unwrap().len(), 2);
    // Down to version 0, then nothing is left to roll back to.
    let resp = h
        .post("/v1/admin/models/rollback", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let e = error_of(
        h.post("/v1/admin/models/rollback", ADMIN)
            .send()
            .await
            .unwrap(),
        409,
    )
    .await;
    assert_eq!(e["code"], "nothing_to_roll_back");
    assert_eq!(readyz_catalog(&h).await["version"], 0);
    h.stop().await;
}

/// Two servers on one store, a version activated by neither (as `keyvex models activate` does):
/// both switch within their poll interval.
async fn two_servers_follow(store: Store) {
    let mut spec = Spec::new(1);
    spec.catalog_poll = Duration::from_millis(200);
    let a = store.server(spec, "a").await;
    let mut spec = Spec::new(2);
    spec.catalog_poll = Duration::from_millis(200);
    let b = store.server(spec, "b").await;
    let versions = store.versions().await;
    let base = Catalog::embedded().unwrap();
    let text = serde_json::to_string_pretty(&cheaper_spark()).unwrap();
    let published = versions
        .publish(&text, "prices.json", &base, "ops", None)
        .await
        .unwrap();
    versions
        .activate(published.info.version, "ops", &base)
        .await
        .unwrap();
    // The poll interval is 200 ms; the promise to operators is 10 s.
    for h in [&a, &b] {
        let catalog = wait_for_version(h, 1, Duration::from_secs(10)).await;
        assert_eq!(catalog["label"], "2026-12-01");
        assert!(catalog["activatedAtMs"].as_u64().unwrap() > 0);
        let (_, events) = h
            .run_agent("magic-spark", ALICE, json!({ "input": business() }))
            .await;
        assert_eq!(last(&events, "start")["model"], "gpt-5.4-mini");
    }
    versions.rollback("ops").await.unwrap();
    for h in [&a, &b] {
        wait_for_version(h, 0, Duration::from_secs(10)).await;
    }
    a.stop().await;
    b.stop().await;
}

/// A replica without an Anthropic key cannot serve a version that moves Logic Architect's
/// primary to Claude: it stays on its last good version, says so in `/readyz`, raises one
/// alert, and follows the next version it can serve.
async fn a_replica_that_cannot_load_stays(store: Store) {
    let versions = store.versions().await;
    let base = Catalog::embedded().unwrap();
    versions
        .publish(EMBEDDED_CATALOG, "default.json", &base, "ops", None)
        .await
        .unwrap();
    versions.activate(1, "ops", &base).await.unwrap();

    let mut spec = Spec::new(3);
    spec.catalog_poll = Duration::from_millis(100);
    let full = store.server(spec, "full").await;
    let mut spec = Spec::new(4);
    spec.catalog_poll = Duration::from_millis(100);
    spec.openai_only = true;
    let partial = store.server(spec, "partial").await;
    assert_eq!(
        readyz_catalog(&partial).await["version"],
        1,
        "version 1 is servable there"
    );

    let moved = edited(|v| {
        v["processes"]["logicArchitect"]["primary"] = "claude-sonnet-4-6".into();
        v["processes"]["logicArchitect"]["fallback"] = "gpt-5.4".into();
    });
    let text = serde_json::to_string_pretty(&moved).unwrap();
    versions
        .publish(&text, "moved.json", &base, "ops", None)
        .await
        .unwrap();
    versions.activate(2, "ops", &base).await.unwrap();
    wait_for_version(&full, 2, Duration::from_secs(10)).await;

    // The replica without the key refuses, once, and keeps serving version 1.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let catalog = loop {
        let catalog = readyz_catalog(&partial).await;
        if catalog["refusedVersion"] == 2 {
            break catalog;
        }
        assert!(tokio::time::Instant::now() < deadline, "{catalog}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(catalog["version"], 1);
    // Several more polls: still one alert.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (health, ok) = partial
        .tracker
        .wait_for(WAIT, |m| m.alerts_raised == 1 && m.pending == 0)
        .await;
    assert!(ok, "{health:?}");
    let alerts = partial.get_json("/v1/admin/alerts", ADMIN).await;
    let catalog_alerts: Vec<&Value> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["alertType"] == "catalog_load")
        .collect();
    assert_eq!(catalog_alerts.len(), 1, "{alerts}");
    let alert = catalog_alerts[0];
    assert_eq!(alert["severity"], "critical");
    assert_eq!(
        (alert["observed"].as_f64(), alert["threshold"].as_f64()),
        (Some(2.0), Some(1.0))
    );
    let message = alert["message"].as_str().unwrap();
    assert!(
        message.contains("processes.logicArchitect.primary")
            && message.contains("anthropic")
            && message.contains("stays on version 1"),
        "{message}"
    );
    let (_, events) = partial
        .run_agent(
            "logic-architect",
            ALICE,
            json!({ "input": agents::samples::sample_input(agents::Process::LogicArchitect, 1) }),
        )
        .await;
    assert_eq!(
        last(&events, "start")["model"],
        "gpt-5.4",
        "version 1's primary"
    );
    let (_, events) = full
        .run_agent(
            "logic-architect",
            ALICE,
            json!({ "input": agents::samples::sample_input(agents::Process::LogicArchitect, 1) }),
        )
        .await;
    assert_eq!(
        last(&events, "start")["model"],
        "claude-sonnet-4-6",
        "version 2's primary"
    );

    // A price change it can serve: both follow, and the refusal is over.
    versions
        .publish(
            &serde_json::to_string_pretty(&cheaper_spark()).unwrap(),
            "prices.json",
            &base,
            "ops",
            None,
        )
        .await
        .unwrap();
    versions.activate(3, "ops", &base).await.unwrap();
    let catalog = wait_for_version(&partial, 3, Duration::from_secs(10)).await;
    assert_eq!(catalog["refusedVersion"], Value::Null);
    wait_for_version(&full, 3, Duration::from_secs(10)).await;
    full.stop().await;
    partial.stop().await;
}

#[tokio::test]
async fn admin_api_and_an_open_stream_on_sqlite() {
    admin_api_and_in_flight_switch(Store::sqlite()).await;
}

#[tokio::test]
async fn admin_api_and_an_open_stream_on_dynamodb() {
    admin_api_and_in_flight_switch(Store::dynamo().await).await;
}

#[tokio::test]
async fn two_servers_on_sqlite_follow_an_activation() {
    two_servers_follow(Store::sqlite()).await;
}

#[tokio::test]
async fn two_servers_on_dynamodb_follow_an_activation() {
    two_servers_follow(Store::dynamo().await).await;
}

#[tokio::test]
async fn a_replica_that_cannot_load_a_version_stays_on_sqlite() {
    a_replica_that_cannot_load_stays(Store::sqlite()).await;
}

#[tokio::test]
async fn a_replica_that_cannot_load_a_version_stays_on_dynamodb() {
    a_replica_that_cannot_load_stays(Store::dynamo().await).await;
}
