//! `keyvex demo-traffic` through the built binary (moved here from the engine tests): a fresh
//! SQLite file filled with a few days of generated traffic, everything shipped before exit.

use keyvex_testkit::TempDir;

/// The built binary writes demo traffic into a fresh SQLite file and says what it wrote.
#[tokio::test]
async fn demo_traffic_fills_a_sqlite_file_through_the_binary() {
    let dir = TempDir::new("demo-bin");
    let db = dir.file("demo.sqlite3");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyvex"))
        .args([
            "demo-traffic",
            "--requests",
            "300",
            "--days",
            "2",
            "--users",
            "3",
        ])
        .env("KEYVEX_METRICS_DB", &db)
        .env("KEYVEX_METRICS_FLUSH_MS", "20")
        .env("RUST_LOG", "warn")
        .env_remove("DYNAMODB_TABLE_NAME")
        .env_remove("KEYVEX_CONFIG")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("wrote 300 requests over 2 days to sqlite"),
        "{stdout}"
    );
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (rows, users): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT json_extract(body, '$.userId')) FROM requests",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(rows, 300);
    assert!((1..=3).contains(&users), "{users}");
    let outbox: i64 = conn
        .query_row("SELECT COUNT(*) FROM metrics_outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(outbox, 0, "everything shipped before exit");
}
