//! Targets: parsing, overrides, and the verdict with how much a miss missed by.

#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test (the tests' allowance does not reach helpers)"
)]

use std::time::Duration;

use loadtest::stats::{Dist, StatsSummary};
use loadtest::targets::{Limit, TargetsFile, parse_limit};

fn summary() -> StatsSummary {
    StatsSummary {
        requests: 100,
        failed: 7,
        error_rate: 0.07,
        ttft_ms: Dist {
            count: 100,
            mean: 400.0,
            p50: 380.0,
            p90: 600.0,
            p95: 800.0,
            p99: 900.0,
            max: 950.0,
        },
        e2e_ms: Dist {
            count: 100,
            mean: 4000.0,
            p50: 3900.0,
            p90: 4500.0,
            p95: 4800.0,
            p99: 5200.0,
            max: 6000.0,
        },
        cost_per_request_usd: Dist {
            count: 100,
            mean: 0.2,
            p50: 0.2,
            p90: 0.3,
            p95: 0.4,
            p99: 1.1,
            max: 1.25,
        },
        ..StatsSummary::default()
    }
}

fn file(toml: &str) -> TargetsFile {
    TargetsFile::parse(toml, "test.toml").unwrap()
}

#[test]
fn values_parse_with_their_units() {
    assert_eq!(
        parse_limit("ttft_p95", "800ms").unwrap(),
        Limit::Time(Duration::from_millis(800))
    );
    assert_eq!(
        parse_limit("e2e_avg", "5s").unwrap(),
        Limit::Time(Duration::from_secs(5))
    );
    assert_eq!(
        parse_limit("tpot_p50", "250us").unwrap(),
        Limit::Time(Duration::from_micros(250))
    );
    assert_eq!(parse_limit("error_rate", "5%").unwrap(), Limit::Rate(0.05));
    assert_eq!(
        parse_limit("error_rate", "0.05").unwrap(),
        Limit::Rate(0.05)
    );
    assert_eq!(
        parse_limit("cost_per_request", "$1.00").unwrap(),
        Limit::Usd(1.0)
    );
    let unknown = parse_limit("latency", "5s").unwrap_err().to_string();
    assert!(unknown.contains("unknown target \"latency\""), "{unknown}");
    let unitless = parse_limit("ttft_p95", "800").unwrap_err().to_string();
    assert!(
        unitless.contains("800ms"),
        "the error shows how to write it: {unitless}"
    );
    assert!(TargetsFile::parse("[targets]\nfoo = 1\n[nope]\n", "x.toml").is_err());
}

#[test]
fn passing_targets_pass_and_misses_say_by_how_much() {
    let t = file("[targets]\ne2e_avg = \"5s\"\nttft_p95 = \"2s\"\nerror_rate = \"5%\"\ncost_per_request = \"$1.00\"\n")
        .targets(&[])
        .unwrap();
    let v = t.evaluate(&summary());
    let by = |n: &str| v.iter().find(|r| r.name == n).unwrap().clone();
    assert!(by("e2e_avg").passed);
    assert!(by("ttft_p95").passed);
    let err = by("error_rate");
    assert!(!err.passed);
    assert_eq!(err.miss.as_deref(), Some("+2.00 points (+40%)"));
    let cost = by("cost_per_request");
    assert!(
        !cost.passed,
        "the most expensive request ($1.25) is over $1.00"
    );
    assert_eq!(cost.miss.as_deref(), Some("+$0.2500 (+25%)"));
}

#[test]
fn an_override_replaces_the_file_value_and_a_tight_one_fails_by_its_margin() {
    let t = file("[targets]\nttft_p95 = \"2s\"\n")
        .targets(&["ttft_p95=400ms".to_owned()])
        .unwrap();
    let v = t.evaluate(&summary());
    assert_eq!(v.len(), 1);
    assert!(!v[0].passed);
    assert_eq!(v[0].achieved, "800 ms");
    assert_eq!(v[0].miss.as_deref(), Some("+400 ms (+100%)"));
    assert!(file("").targets(&["ttft_p95".to_owned()]).is_err());
}

#[test]
fn a_metric_without_samples_passes_but_a_run_without_requests_fails() {
    let t = file("[targets]\ncost_per_pipeline = \"$4\"\nerror_rate = \"5%\"\n")
        .targets(&[])
        .unwrap();
    let v = t.evaluate(&summary());
    let pipeline = v.iter().find(|r| r.name == "cost_per_pipeline").unwrap();
    assert!(pipeline.passed);
    assert_eq!(pipeline.achieved, "no samples");
    let empty = t.evaluate(&StatsSummary::default());
    assert!(
        !empty
            .iter()
            .find(|r| r.name == "error_rate")
            .unwrap()
            .passed
    );
}

#[test]
fn time_targets_defer_to_goose_threshold_results() {
    let t = file("[targets]\nttft_p95 = \"1ms\"\n")
        .targets(&[])
        .unwrap();
    let mut v = t.evaluate(&StatsSummary::default());
    let rule = t.goose_rules()[0].1.clone();
    let goose: Vec<goose::threshold::ThresholdResult> = serde_json::from_value(serde_json::json!([
        { "rule": rule, "observed": "30ms", "value": 30.0, "passed": false, "aborted": false }
    ]))
    .unwrap();
    t.apply_goose(&mut v, &goose);
    assert!(!v[0].passed);
    assert_eq!(v[0].achieved, "30 ms");
    assert!(v[0].judged_by.starts_with("goose threshold"));
    assert_eq!(v[0].miss.as_deref(), Some("+29 ms (+2900%)"));
}
