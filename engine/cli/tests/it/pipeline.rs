//! `keyvex pipeline`: the whole run writes a valid tool and records one call per stage under
//! the caller `cli`; interrupted with SIGINT mid-run, it still records every call made so far —
//! the finished ones and the one cut short — with the run and its stage, then exits 130.

use std::process::Stdio;
use std::time::Duration;

use keyvex_sim::{Fault, Rule};
use keyvex_testkit::{TempDir, fast_sim};

use crate::cli_support::{keyvex, records, signal, wait_until};

#[test]
fn the_cli_pipeline_writes_a_valid_tool_and_prints_the_stage_table() {
    let dir = TempDir::new("cli-pipeline");
    let out = dir.file("tool.json");
    let db = dir.file("metrics.sqlite3");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keyvex"))
        .args([
            "pipeline",
            "--business",
            "Boutique accounting firm for freelancers",
        ])
        .arg("--out")
        .arg(&out)
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("KEYVEX_MODELS_FILE")
        .env("KEYVEX_SIMULATE", "always")
        .env("KEYVEX_SIM_PROFILE", "fast")
        .env("KEYVEX_METRICS_DB", &db)
        .env_remove("DYNAMODB_TABLE_NAME")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {:?}: {stderr}",
        output.status
    );
    let written = std::fs::read_to_string(&out).unwrap();
    let tool: agents::ToolDefinition = serde_json::from_str(&written).unwrap();
    assert_eq!(tool.check(), vec![]);
    for needle in [
        "Magic Spark",
        "Logic Architect",
        "Content Crafter",
        "Style Master",
        "latency ms",
        "fast timing",
        "tool definition written to",
        "keyvex: metrics: 4 call record(s)",
    ] {
        assert!(
            stderr.contains(needle),
            "stderr lacks {needle:?}:\n{stderr}"
        );
    }
    // The run's four calls are in the embedded store, one per stage, under the CLI's user.
    let records = records(&db);
    let mut stages: Vec<&str> = records
        .iter()
        .map(|r| {
            assert_eq!(r["userId"], "cli", "{r}");
            assert_eq!(r["status"], "succeeded", "{r}");
            assert!(r["runId"].is_string(), "{r}");
            r["stage"].as_str().unwrap()
        })
        .collect();
    stages.sort_unstable();
    assert_eq!(
        stages,
        [
            "contentCrafter",
            "logicArchitect",
            "magicSpark",
            "styleMaster"
        ]
    );
}

#[tokio::test]
async fn sigint_mid_pipeline_records_the_finished_and_the_cut_call_as_cli() {
    let sim = fast_sim(41).await;
    // Slow enough that Logic Architect is still streaming when the signal arrives.
    sim.push_rule(Rule::always(Fault::Latency {
        ttft: Duration::from_millis(20),
        tokens_per_sec: 100.0,
    }));
    let dir = TempDir::new("cli-sigint");
    let db = dir.file("metrics.sqlite3");
    let child = keyvex(&sim, &db)
        .args([
            "pipeline",
            "--business",
            "A cycling club selling memberships",
        ])
        .arg("--out")
        .arg(dir.file("tool.json"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Magic Spark has finished and the next stage's stream is open.
    wait_until(
        "the second stage to stream",
        Duration::from_secs(60),
        || {
            let stats = sim.stats();
            stats.streams_completed >= 1 && stats.streams_open >= 1
        },
    )
    .await;
    // Let the open stream deliver some content first (its first token comes after 20 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(child.id(), "-INT");
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(!dir.file("tool.json").exists(), "no tool from a cut run");

    let records = records(&db);
    assert_eq!(records.len(), 2, "{records:#?}");
    let run = records[0]["runId"].as_str().unwrap();
    for r in &records {
        assert_eq!(r["userId"], "cli", "{r}");
        assert_eq!(r["runId"], run, "{r}");
        assert_eq!(r["stage"], r["process"], "{r}");
    }
    assert_eq!(records[0]["stage"], "magicSpark");
    assert_eq!(records[0]["status"], "succeeded");
    assert_eq!(records[1]["stage"], "logicArchitect");
    assert_eq!(records[1]["status"], "cancelled");
    assert_eq!(records[1]["costEstimated"], true, "{}", records[1]);
    assert!(
        records[1]["costPicoUsd"].as_u64().unwrap() > 0,
        "{}",
        records[1]
    );
    assert!(
        sim.wait_for_disconnects(1, Duration::from_secs(5)).await,
        "the cut stream's connection was closed"
    );
    sim.shutdown().await;
}
