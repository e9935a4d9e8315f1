//! Model catalog versions against both stores (a SQLite file, and the single table in moto
//! through the real SDK): publish with a summary of the changes, list, show, diff, activate,
//! rollback; an invalid catalog refused with the start-up message and nothing stored; concurrent
//! publishes each get their own number; the DynamoDB items have the plan's keys.

use keyvex_engine::Catalog;
use keyvex_engine::catalog::EMBEDDED_CATALOG;
use keyvex_engine::catalog::diff::CatalogDiff;
use keyvex_store::catalog_store::{DynamoCatalogs, SqliteCatalogs};
use keyvex_store::{CatalogStoreError, CatalogVersions};
use keyvex_testkit::TempDir;
use keyvex_testkit::moto::{self, Moto};
use serde_json::Value;

/// The embedded catalog with `edit` applied, as JSON text.
pub fn edited(edit: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(EMBEDDED_CATALOG).unwrap();
    edit(&mut v);
    serde_json::to_string_pretty(&v).unwrap()
}

/// A store of each kind, with what keeps it alive.
enum Held {
    Sqlite(#[expect(dead_code, reason = "kept alive for the test")] TempDir),
    Dynamo(#[expect(dead_code, reason = "kept alive for the test")] Moto),
}

async fn sqlite() -> (CatalogVersions, Held) {
    let dir = TempDir::new("catalogs");
    let catalogs = SqliteCatalogs::open(&dir.file("store.sqlite3")).unwrap();
    (CatalogVersions::sqlite(catalogs), Held::Sqlite(dir))
}

async fn dynamo() -> (CatalogVersions, Held, aws_sdk_dynamodb::Client) {
    let moto = Moto::start().await;
    let client = moto::table(&moto, "catalogs").await;
    let catalogs = DynamoCatalogs::new(client.clone(), "catalogs");
    (
        CatalogVersions::dynamo(catalogs),
        Held::Dynamo(moto),
        client,
    )
}

/// Publish, list, show, diff, activate, rollback and the refusals, on one store.
async fn lifecycle(versions: &CatalogVersions) {
    let base = Catalog::embedded().unwrap();
    assert_eq!(
        versions.active().await.unwrap().version,
        0,
        "nothing activated yet"
    );
    assert!(versions.list().await.unwrap().is_empty());

    // Version 1: the embedded catalog as it is; nothing changed against version 0.
    let v1 = versions
        .publish(
            EMBEDDED_CATALOG,
            "default-models.json",
            &base,
            "ops",
            Some("as shipped"),
        )
        .await
        .unwrap();
    assert_eq!(v1.info.version, 1);
    assert_eq!(v1.info.summary, "no changes");
    assert_eq!(v1.info.note.as_deref(), Some("as shipped"));

    // Version 2: a price change and a new primary.
    let cheaper = edited(|v| {
        v["version"] = "2026-12-01".into();
        v["models"][2]["pricing"]["outputPerMTok"] = 4.0.into();
        v["processes"]["magicSpark"]["primary"] = "gpt-5.4-mini".into();
        v["processes"]["magicSpark"]["fallback"] = "claude-sonnet-4-6".into();
    });
    let v2 = versions
        .publish(&cheaper, "prices.json", &base, "alice", None)
        .await
        .unwrap();
    assert_eq!(v2.info.version, 2);
    assert_eq!(v2.info.label, "2026-12-01");
    assert_eq!(
        v2.changes,
        vec![
            "label \"2026-11-25\" → \"2026-12-01\"",
            "gpt-5.4-mini: outputPerMTok $4.5 → $4",
            "magicSpark: primary claude-sonnet-4-6 → gpt-5.4-mini",
            "magicSpark: fallback gpt-5.4 → claude-sonnet-4-6",
        ]
    );
    assert_eq!(v2.info.summary, v2.changes.join("; "));

    let listed = versions.list().await.unwrap();
    assert_eq!(listed, vec![v1.info.clone(), v2.info.clone()]);
    let shown = versions.get(2).await.unwrap().unwrap();
    assert_eq!(shown.catalog_json, cheaper.trim());
    assert_eq!(shown.info, v2.info);
    assert!(versions.get(3).await.unwrap().is_none());

    let (one, two) = (
        versions.load(1, &base).await.unwrap(),
        versions.load(2, &base).await.unwrap(),
    );
    assert_eq!((one.version(), two.version()), (1, 2));
    assert_eq!(CatalogDiff::between(&one, &two).changes, v2.changes);
    assert_eq!(versions.load(0, &base).await.unwrap().label(), base.label());

    // An invalid catalog: the message the process gives at start for the same file, and
    // nothing stored.
    let broken = edited(|v| v["processes"]["styleMaster"]["primary"] = "gpt-9".into());
    let e = versions
        .publish(&broken, "broken.json", &base, "alice", None)
        .await
        .unwrap_err();
    let at_start = Catalog::parse(&broken, "broken.json")
        .unwrap_err()
        .to_string();
    assert!(matches!(e, CatalogStoreError::Invalid(_)), "{e}");
    assert_eq!(e.to_string(), format!("{at_start}; nothing was stored"));
    assert!(
        at_start.contains("processes.styleMaster.primary"),
        "{at_start}"
    );
    let e = versions
        .publish("{\"version\": 1", "truncated.json", &base, "alice", None)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("model catalog truncated.json is not valid"),
        "{e}"
    );
    assert_eq!(
        versions.list().await.unwrap().len(),
        2,
        "nothing was stored"
    );

    // Activate, activate again (no change), an unknown version (refused, nothing changes).
    let a = versions.activate(1, "alice", &base).await.unwrap();
    assert!(a.changed);
    assert_eq!((a.active.version, a.previous), (1, 0));
    let a = versions.activate(2, "bob", &base).await.unwrap();
    assert_eq!(
        (a.active.version, a.previous, a.active.history.clone()),
        (2, 1, vec![0, 1])
    );
    assert_eq!(a.active.activated_by, "bob");
    let again = versions.activate(2, "bob", &base).await.unwrap();
    assert!(!again.changed);
    let e = versions.activate(7, "bob", &base).await.unwrap_err();
    assert!(
        matches!(e, CatalogStoreError::UnknownVersion { version: 7 }),
        "{e}"
    );
    let active = versions.active().await.unwrap();
    assert_eq!((active.version, active.history.clone()), (2, vec![0, 1]));
    assert!(active.activated_at_ms > 0);

    // Rollback walks back through the versions that were active, down to version 0.
    let r = versions.rollback("carol").await.unwrap();
    assert_eq!((r.active.version, r.previous), (1, 2));
    let r = versions.rollback("carol").await.unwrap();
    assert_eq!(r.active.version, 0);
    let e = versions.rollback("carol").await.unwrap_err();
    assert!(
        matches!(e, CatalogStoreError::NothingToRollBack { active: 0 }),
        "{e}"
    );
    assert_eq!(versions.active().await.unwrap().version, 0);
}

/// Four publishes at once get four different numbers.
async fn concurrent_publishes(versions: &CatalogVersions) {
    let base = Catalog::embedded().unwrap();
    let runs = (0..4).map(|i| {
        let versions = versions.clone();
        let base = base.clone();
        async move {
            let json = edited(|v| v["version"] = format!("race-{i}").into());
            versions
                .publish(&json, "race.json", &base, "racer", None)
                .await
                .unwrap()
        }
    });
    let mut numbers: Vec<u64> = futures::future::join_all(runs)
        .await
        .iter()
        .map(|p| p.info.version)
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn versions_in_sqlite() {
    let (versions, _held) = sqlite().await;
    lifecycle(&versions).await;
    let (versions, _held) = sqlite().await;
    concurrent_publishes(&versions).await;
}

#[tokio::test]
async fn versions_in_dynamodb() {
    let (versions, _held, client) = dynamo().await;
    lifecycle(&versions).await;
    // The plan's layout: PK=CONFIG, SK=MODEL_CONFIG#{version} and SK=ACTIVE_MODEL_CONFIG.
    let items = moto::scan_all(&client, "catalogs").await;
    let config: Vec<_> = items
        .iter()
        .filter(|i| moto::s(i, "PK") == "CONFIG")
        .collect();
    let mut keys: Vec<String> = config.iter().map(|i| moto::s(i, "SK")).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "ACTIVE_MODEL_CONFIG",
            "MODEL_CONFIG#0000000001",
            "MODEL_CONFIG#0000000002"
        ]
    );
    let v2 = config
        .iter()
        .find(|i| moto::s(i, "SK") == "MODEL_CONFIG#0000000002")
        .unwrap();
    assert_eq!(moto::n(v2, "version"), 2);
    assert_eq!(moto::s(v2, "author"), "alice");
    let stored: Value = serde_json::from_str(&moto::s(v2, "catalog")).unwrap();
    assert_eq!(stored["processes"]["magicSpark"]["primary"], "gpt-5.4-mini");
    assert!(moto::s(v2, "summary").contains("outputPerMTok $4.5 → $4"));
    let active = config
        .iter()
        .find(|i| moto::s(i, "SK") == "ACTIVE_MODEL_CONFIG")
        .unwrap();
    assert_eq!(moto::n(active, "version"), 0);

    let (versions, _held, _) = dynamo().await;
    concurrent_publishes(&versions).await;
}
