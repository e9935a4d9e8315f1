//! The gate binary end to end: it passes with the committed budgets, and fails — naming the
//! bench, its measurement and its budget — when a budget is set below reality.
//!
//! Each run measures a small subset briefly (milliseconds per bench), so the file stays fast;
//! the verdicts do not depend on timing precision because the margins are orders of magnitude.

#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test (the tests' allowance does not reach helpers)"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BUDGETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/budgets.toml");

/// Runs the gate on a cheap subset with short samples.
fn gate(extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gate"));
    cmd.args([
        "--only",
        "cost,route,sse/openai,budgets",
        "--samples",
        "5",
        "--sample-ms",
        "4",
        "--warm-up-ms",
        "8",
    ])
    .args(extra)
    .env_remove("KEYVEX_BENCH_BUDGET_SCALE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The committed budgets with one bench's line replaced, written to a file of this test's own.
fn budgets_with(name: &str, bench: &str, replacement: Option<&str>) -> PathBuf {
    let original = std::fs::read_to_string(BUDGETS).unwrap();
    let header = format!("[budgets.\"{bench}\"]");
    let mut out = String::new();
    let mut lines = original.lines();
    while let Some(line) = lines.next() {
        if line.trim() == header {
            // Skip the header and its one limit line.
            lines.next();
            if let Some(replacement) = replacement {
                out.push_str(&format!("{header}\n{replacement}\n"));
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert_ne!(out, original, "{bench} not found in budgets.toml");
    let path = std::env::temp_dir().join(format!("keyvex-gate-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, out).unwrap();
    path
}

#[test]
fn the_committed_budgets_pass_and_the_table_shows_every_bench() {
    let out = gate(&[], &[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for bench in [
        "calibration/sha256_4k",
        "cost/cost",
        "route/decide",
        "sse/openai",
        "budgets/worst_case_cost",
        "budgets/reserve_settle",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.contains(bench))
            .unwrap_or_else(|| panic!("{bench} missing:\n{stdout}"));
        assert!(row.contains("pass"), "{row}");
    }
    // Only the selected benches ran.
    assert!(!stdout.contains("tokenize/"), "{stdout}");
    assert!(stdout.contains("PASS"), "{stdout}");
    // The budgets are for optimised code; a debug build (this test's own profile) says that it
    // scaled them, an optimised one that it did not.
    if cfg!(debug_assertions) {
        assert!(
            stderr.contains("UNOPTIMISED build: ratio budgets ×"),
            "{stderr}"
        );
    } else {
        assert!(
            stderr.contains("optimised build") && !stderr.contains("UNOPTIMISED"),
            "{stderr}"
        );
    }
}

#[test]
fn a_budget_below_reality_fails_and_names_the_bench_and_both_numbers() {
    // 0.02 ns per 3 µs calibration: nothing real is that fast.
    let path = budgets_with("below", "cost/cost", Some("max_ratio = 0.000001"));
    let out = gate(&["--budgets", path.to_str().unwrap()], &[]);
    let _ = std::fs::remove_file(&path);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("over budget"))
        .unwrap_or_else(|| panic!("no failure line:\n{stderr}"));
    assert!(line.contains("cost/cost"), "{line}");
    // A debug build (this test's own profile) applies the file's `unoptimised_scale` to ratios.
    let unoptimised = bench_gate::gate::Budgets::load(Path::new(BUDGETS))
        .unwrap()
        .unoptimised_scale();
    let limit = if cfg!(debug_assertions) {
        1e-6 * unoptimised
    } else {
        1e-6
    };
    let limit = format!("≤ {}", bench_gate::gate::format_ratio(limit));
    assert!(
        line.contains(&limit) && line.contains("ns per iteration"),
        "{limit}: {line}"
    );
    // The other benches are within their real budgets and are not blamed; the failing one was
    // measured again twice (a real regression is over budget every time) before failing.
    assert_eq!(stderr.matches("over budget").count(), 1, "{stderr}");
    assert_eq!(
        stderr
            .matches("cost/cost above budget; measuring again")
            .count(),
        2,
        "{stderr}"
    );
    assert!(
        stdout.contains("OVER BUDGET") && stdout.contains("FAIL"),
        "{stdout}"
    );
}

#[test]
fn the_scale_variable_makes_every_bench_fail_on_purpose() {
    let out = gate(&[], &[("KEYVEX_BENCH_BUDGET_SCALE", "0.001")]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for bench in [
        "calibration/sha256_4k",
        "cost/cost",
        "route/decide",
        "sse/openai",
        "budgets/worst_case_cost",
        "budgets/reserve_settle",
    ] {
        assert!(
            stderr.contains(&format!("{bench} is over budget")),
            "{bench}: {stderr}"
        );
    }
}

#[test]
fn a_bench_without_a_budget_stops_the_gate_before_measuring() {
    let path = budgets_with("missing", "relay/router", None);
    let out = gate(&["--budgets", path.to_str().unwrap()], &[]);
    let _ = std::fs::remove_file(&path);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("relay/router has no budget"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing is measured: {}",
        text(&out.stdout)
    );
}
