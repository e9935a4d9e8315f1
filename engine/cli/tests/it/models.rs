//! `keyvex models …` as an operator runs it, on a SQLite store and on DynamoDB (moto): publish a
//! price change, list, show, diff, activate, roll back; a broken catalog file is refused with the
//! very message `keyvex` gives when it starts on that file, and nothing is stored. Then a
//! one-shot command started afterwards prices its call with the active version.

use std::path::Path;
use std::process::Command;

use keyvex_engine::catalog::EMBEDDED_CATALOG;
use keyvex_testkit::moto::{self, Moto};
use keyvex_testkit::{TempDir, fast_sim};
use serde_json::Value;

use crate::cli_support::{keyvex, records, stdout_of};

fn write_catalog(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(EMBEDDED_CATALOG).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// The operator's walk-through on whatever store `cmd()` is configured for.
fn walk_through(cmd: &dyn Fn() -> Command, dir: &TempDir) {
    let prices = dir.file("prices.json");
    write_catalog(&prices, |v| {
        v["version"] = "2026-12-01".into();
        v["models"][2]["pricing"]["outputPerMTok"] = 9.0.into();
    });
    let out = stdout_of(cmd().args(["models", "publish"]).arg(&prices).args([
        "--note",
        "mini output price up",
        "--author",
        "dana",
    ]));
    assert!(out.starts_with("published version 1"), "{out}");
    assert!(
        out.contains("gpt-5.4-mini: outputPerMTok $4.5 → $9"),
        "{out}"
    );

    // A broken file: the start-up message for that file, exit 1, nothing stored.
    let broken = dir.file("broken.json");
    write_catalog(&broken, |v| {
        v["models"][0]["pricing"]["inputPerMTok"] = (-1.0).into()
    });
    let refused = cmd()
        .args(["models", "publish"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let refused_err = String::from_utf8_lossy(&refused.stderr).to_string();
    let at_start = cmd()
        .args(["complete", "-p", "magicSpark", "hi"])
        .env("KEYVEX_MODELS_FILE", &broken)
        .output()
        .unwrap();
    assert!(!at_start.status.success());
    let start_err = String::from_utf8_lossy(&at_start.stderr).to_string();
    let message = format!(
        "model catalog {}: `models[0].pricing.inputPerMTok`",
        broken.display()
    );
    assert!(refused_err.contains(&message), "{refused_err}");
    assert!(start_err.contains(&message), "{start_err}");
    let problem = |text: &str| {
        text.lines().find(|l| l.contains(&message)).map(|l| {
            let from = l.find("model catalog").unwrap();
            l[from..]
                .trim_end_matches("; nothing was stored")
                .to_owned()
        })
    };
    assert_eq!(problem(&refused_err), problem(&start_err));

    let list = stdout_of(cmd().args(["models", "list"]));
    assert!(
        list.contains("mini output price up") && list.contains("dana"),
        "{list}"
    );
    assert!(!list.contains("broken"), "{list}");
    let second = cmd().args(["models", "show", "2"]).output().unwrap();
    assert!(
        !second.status.success(),
        "the broken catalog was not stored as version 2"
    );

    let shown: Value =
        serde_json::from_str(&stdout_of(cmd().args(["models", "show", "1"]))).unwrap();
    assert_eq!(shown["models"][2]["pricing"]["outputPerMTok"], 9.0);
    let diff = stdout_of(cmd().args(["models", "diff", "0", "1"]));
    assert_eq!(
        diff,
        "label \"2026-11-25\" → \"2026-12-01\"\ngpt-5.4-mini: outputPerMTok $4.5 → $9"
    );

    let out = stdout_of(cmd().args(["models", "activate", "1"]));
    assert!(out.starts_with("version 1 is active (was 0)"), "{out}");
    let list = stdout_of(cmd().args(["models", "list"]));
    assert!(list.contains("version 1 active since"), "{list}");

    // A command started now prices with version 1.
    stdout_of(cmd().args([
        "complete",
        "-p",
        "styleMaster",
        "Three colours for a bakery",
    ]));

    let out = stdout_of(cmd().args(["models", "rollback"]));
    assert!(out.starts_with("version 0 is active (was 1)"), "{out}");
    let nothing = cmd().args(["models", "rollback"]).output().unwrap();
    assert!(!nothing.status.success());
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("nothing to roll back to"));
    let unknown = cmd().args(["models", "activate", "5"]).output().unwrap();
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("version 5 does not exist"));
}

// The commands run as blocking child processes while the simulator serves them from this
// runtime: it needs a thread of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_commands_on_sqlite() {
    let sim = fast_sim(16).await;
    let dir = TempDir::new("cli-models");
    let db = dir.file("metrics.sqlite3");
    walk_through(&|| keyvex(&sim, &db), &dir);
    let records = records(&db);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["catalogVersion"], 1);
    assert_eq!(records[0]["model"], "gpt-5.4-mini");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_commands_on_dynamodb() {
    let sim = fast_sim(17).await;
    let moto = Moto::start().await;
    let client = moto::table(&moto, "keyvex-cli-models").await;
    let dir = TempDir::new("cli-models-ddb");
    let db = dir.file("ledger.sqlite3");
    let endpoint = moto.endpoint.clone();
    walk_through(
        &|| {
            let mut cmd = keyvex(&sim, &db);
            cmd.env("DYNAMODB_TABLE_NAME", "keyvex-cli-models")
                .env("DYNAMODB_ENDPOINT", &endpoint);
            cmd
        },
        &dir,
    );
    let items = moto::scan_all(&client, "keyvex-cli-models").await;
    let call = items
        .iter()
        .find(|i| moto::s(i, "PK").starts_with("METRIC#"))
        .expect("the call's record shipped");
    assert_eq!(moto::n(call, "catalogVersion"), 1);
    let active = items
        .iter()
        .find(|i| moto::s(i, "SK") == "ACTIVE_MODEL_CONFIG")
        .unwrap();
    assert_eq!(moto::n(active, "version"), 0);
    sim.shutdown().await;
}
