//! The `loadtest` binary end to end, self-contained (in-process engine and simulator), with a
//! fast simulator and runs of a few seconds: reports are written with non-zero counts, an
//! impossible target fails the exit code and is named, faults show up as errors, fallbacks and
//! rescued calls,
//! and the open loop counts drops.

#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test (the tests' allowance does not reach helpers)"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loadtest-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs the binary for 2 s against a fast simulator (20 ms to first token, unpaced output).
fn run(out: &Path, extra: &[&str]) -> Output {
    run_with_ttft(out, "20", extra)
}

fn run_with_ttft(out: &Path, ttft_ms: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "--users",
            "6",
            "--run-time",
            "2s",
            "--sim-ttft-ms",
            ttft_ms,
            "--sim-tps",
            "0",
        ])
        .arg("--output-dir")
        .arg(out)
        .args(extra)
        .env_remove("KEYVEX_API_KEY")
        .output()
        .unwrap()
}

/// The single run folder's `summary.json`.
fn summary(out: &Path) -> (PathBuf, Value) {
    let dirs: Vec<_> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let dir = dirs[0].clone();
    let json = std::fs::read_to_string(dir.join("summary.json")).unwrap();
    (dir, serde_json::from_str(&json).unwrap())
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_short_self_contained_run_passes_and_writes_every_report() {
    let out = out_dir("pass");
    let o = run(&out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let (dir, s) = summary(&out);
    for f in ["summary.json", "summary.md", "report.html", "report.json"] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    let st = &s["stats"];
    assert!(st["requests"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["failed"].as_u64(), Some(0), "{st}");
    assert!(st["ttft_ms"]["count"].as_u64().unwrap() > 0);
    assert!(st["cost_per_request_usd"]["max"].as_f64().unwrap() > 0.0);
    for scenario in [
        "magic_spark",
        "logic_architect",
        "content_crafter",
        "style_master",
        "pipeline",
        "chat",
    ] {
        let row = &st["scenarios"][scenario];
        assert!(
            row["requests"].as_u64().unwrap_or(0) > 0,
            "{scenario}: {row}"
        );
        assert!(
            row["output_tokens"].as_u64().unwrap_or(0) > 0,
            "{scenario}: {row}"
        );
    }
    assert_eq!(s["passed"], Value::Bool(true));
    // Time targets are judged by goose's thresholds on our STREAM rows.
    let ttft = s["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ttft_p95")
        .unwrap();
    assert!(
        ttft["judged_by"].as_str().unwrap().contains("STREAM ttft"),
        "{ttft}"
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("PASS: every target met"), "{stdout}");

    // A second run compares itself with the first.
    let out2 = out_dir("baseline");
    let o2 = run(
        &out2,
        &[
            "--baseline",
            dir.to_str().unwrap(),
            "--weight",
            "pipeline=0",
        ],
    );
    assert_eq!(o2.status.code(), Some(0), "{}", text(&o2));
    let (_, s2) = summary(&out2);
    assert!(
        s2["baseline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["metric"] == "ttft p95")
    );
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&out2);
}

#[test]
fn an_impossible_target_fails_the_run_and_is_named() {
    let out = out_dir("tight");
    let o = run(
        &out,
        &["--target", "ttft_p95=1ms", "--weight", "pipeline=0"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("FAIL: missed ttft_p95"), "{stdout}");
    let (_, s) = summary(&out);
    let ttft = s["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ttft_p95")
        .unwrap();
    assert_eq!(ttft["passed"], Value::Bool(false));
    assert!(ttft["miss"].as_str().unwrap().starts_with('+'), "{ttft}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn provider_faults_show_as_errors_and_fallbacks() {
    let out = out_dir("faults");
    let o = run(&out, &["--sim-fault-rate", "0.8", "--weight", "pipeline=0"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let (_, s) = summary(&out);
    let st = &s["stats"];
    assert!(st["fallbacks"].as_u64().unwrap() > 0, "{st}");
    assert!(st["failed"].as_u64().unwrap() > 0, "{st}");
    // Cuts after content are finished by another call instead of failing the request.
    let rescued = st["rescued"].as_u64().unwrap();
    assert!(rescued > 0, "{st}");
    assert!(rescued <= st["requests"].as_u64().unwrap());
    let rate = s["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "error_rate")
        .unwrap();
    assert_eq!(rate["passed"], Value::Bool(false), "{rate}");
    assert!(s["sim"]["faults_injected"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_dir_all(&out);
}

/// The same faults with and without the engine's rescues: without them every cut after content
/// fails its request, so the error rate is far higher, and nothing is rescued.
#[test]
fn without_rescues_cuts_after_content_fail_their_requests() {
    let rate_of = |name: &str, extra: &[&str]| {
        let out = out_dir(name);
        let mut args = vec!["--sim-fault-rate", "0.25", "--weight", "pipeline=0"];
        args.extend_from_slice(extra);
        run(&out, &args);
        let (_, s) = summary(&out);
        let _ = std::fs::remove_dir_all(&out);
        s["stats"].clone()
    };
    let on = rate_of("rescue-on", &[]);
    let off = rate_of("rescue-off", &["--no-rescue"]);
    assert_eq!(off["rescued"].as_u64(), Some(0), "{off}");
    assert!(on["rescued"].as_u64().unwrap() > 0, "{on}");
    let (on_rate, off_rate) = (
        on["error_rate"].as_f64().unwrap(),
        off["error_rate"].as_f64().unwrap(),
    );
    // Measured: about 8 % without rescues, under 1 % with them.
    assert!(
        off_rate > 2.0 * on_rate,
        "error rate without rescues {off_rate} vs with {on_rate}"
    );
}

#[test]
fn the_open_loop_drops_arrivals_beyond_its_in_flight_bound() {
    let out = out_dir("open");
    let o = run_with_ttft(
        &out,
        "300",
        &[
            "--open-loop",
            "--rate",
            "40/s",
            "--max-in-flight",
            "2",
            "--weight",
            "pipeline=0",
        ],
    );
    // 40 arrivals a second against 2 slots of ≥ 300 ms: most are dropped, and drops are errors.
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let (_, s) = summary(&out);
    let open = &s["open_loop"];
    assert_eq!(open["scheduled"].as_u64(), Some(80), "{open}");
    assert!(open["dropped"].as_u64().unwrap() > 40, "{open}");
    assert!(open["sent"].as_u64().unwrap() >= 2, "{open}");
    assert_eq!(s["mode"], "open-loop");
    let _ = std::fs::remove_dir_all(&out);
}
