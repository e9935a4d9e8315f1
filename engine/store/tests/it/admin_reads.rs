//! Integration tests: the admin metrics read side gives identical answers from SQLite and from
//! DynamoDB (moto, real SDK) on the same traffic, with exact percentiles on a known
//! distribution, and its DynamoDB reads are key or GSI `Query`s, never `Scan`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keyvex_engine::cost::Cost;
use keyvex_engine::record::RequestRecord;
use keyvex_store::admin::{MetricsFilter, MetricsReader, alerts_json, metrics_json};
use keyvex_store::dynamo::{self, DynamoRetry, DynamoStore};
use keyvex_store::sqlite::SqliteStore;
use keyvex_store::{Alert, AlertType, Entry, GroupBy, MetricsConfig, Severity, Sink, Tracker};
use keyvex_testkit::TempDir;
use keyvex_testkit::fault_proxy::FaultProxy;
use keyvex_testkit::moto::{self, Moto};

/// 2025-11-25T22:00:00Z: the 40 records span two UTC days and several hours.
const T0: u64 = 1_764_108_000_000;
const STEP: u64 = 330_000; // 5.5 minutes
const PROCESSES: [&str; 4] = [
    "magicSpark",
    "logicArchitect",
    "contentCrafter",
    "styleMaster",
];

/// 40 records with latencies 10, 20, …, 400 ms (so p50/p95/p99 are the 20th/38th/40th values)
/// spread over processes, providers, models, users, hours and two days.
fn records() -> Vec<RequestRecord> {
    (0..40u64)
        .map(|i| {
            let provider = if i % 3 == 0 { "anthropic" } else { "openai" };
            let model = ["m-small", "m-large", "m-mini"][(i % 3) as usize];
            let ttft = (i % 4 != 3).then_some(5 + i);
            let mut rec = RequestRecord::new(
                &format!("user-{}", i % 5),
                PROCESSES[(i % 4) as usize],
                provider,
                model,
            )
            .with_request_id(&format!("req-{i:02}"))
            .with_timestamp_ms(T0 + i * STEP)
            .with_latency((i + 1) * 10, ttft)
            .with_cost(Cost(1_500_000 * (i + 1)));
            rec.input_tokens = 100 + i;
            rec.cached_input_tokens = i % 7;
            rec.output_tokens = 50 + 2 * i;
            match i % 9 {
                4 => rec.failed("upstream", "503"),
                8 if i == 17 => rec.cancelled(),
                _ => rec,
            }
        })
        .collect()
}

fn alerts() -> Vec<Alert> {
    (0..3u64)
        .map(|i| Alert {
            alert_id: format!("alert-{i}"),
            alert_type: [
                AlertType::ErrorRate,
                AlertType::CostPerRequest,
                AlertType::AvgLatency,
            ][i as usize],
            severity: [Severity::Critical, Severity::Warning, Severity::Warning][i as usize],
            timestamp_ms: T0 + i * 600_000,
            observed: 0.5,
            threshold: 0.05,
            message: format!("alert {i}"),
            request_id: format!("req-{i:02}"),
        })
        .collect()
}

struct Stores {
    _moto: Moto,
    proxy: FaultProxy,
    _dir: TempDir,
    sqlite: MetricsReader,
    dynamo: MetricsReader,
}

/// The same entries written to both stores through their sinks; DynamoDB reads go through the
/// proxy so its log shows every operation.
async fn stores(table: &str) -> Stores {
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.endpoint).await;
    let client = moto::client(&moto.endpoint).await;
    dynamo::create_table(&client, table).await.unwrap();
    let dir = TempDir::new("admin");
    let sqlite = SqliteStore::open(&dir.file("a.sqlite3")).unwrap();
    let writer = DynamoStore::new(client, table).with_retry(DynamoRetry::default());
    let mut entries: Vec<Entry> = records().into_iter().map(Entry::Request).collect();
    entries.extend(alerts().into_iter().map(Entry::Alert));
    sqlite.write(&entries).await.unwrap();
    writer.write(&entries).await.unwrap();
    let reader = DynamoStore::new(moto::client(&proxy.endpoint).await, table);
    Stores {
        _moto: moto,
        proxy,
        _dir: dir,
        sqlite: MetricsReader::sqlite(sqlite),
        dynamo: MetricsReader::dynamo(reader),
    }
}

const FROM: u64 = T0;
const TO: u64 = T0 + 40 * STEP;

fn filter(process: Option<&str>, provider: Option<&str>) -> MetricsFilter {
    MetricsFilter {
        process: process.map(str::to_owned),
        provider: provider.map(str::to_owned),
        ..MetricsFilter::default()
    }
}

#[tokio::test]
async fn sqlite_and_dynamo_answer_identically_for_every_grouping_and_filter() {
    let st = stores("a-same").await;
    let mut groupings = vec![None];
    groupings.extend(GroupBy::ALL.map(Some));
    let filters = [
        filter(None, None),
        filter(Some("logicArchitect"), None),
        filter(None, Some("anthropic")),
        filter(Some("magicSpark"), Some("openai")),
    ];
    for f in &filters {
        for g in &groupings {
            let a = st.sqlite.metrics(FROM, TO, *g, f).await.unwrap();
            let b = st.dynamo.metrics(FROM, TO, *g, f).await.unwrap();
            assert_eq!(
                serde_json::to_string(&a).unwrap(),
                serde_json::to_string(&b).unwrap(),
                "group_by {g:?}, filter {f:?}"
            );
            if g.is_some() {
                let sum: u64 = a.groups.iter().map(|r| r.requests).sum();
                assert_eq!(sum, a.totals.requests, "groups partition the totals");
            }
        }
    }
    // A sub-range is cut at the same instants in both (both bounds inclusive).
    let (from, to) = (T0 + 3 * STEP, T0 + 9 * STEP);
    let all = filter(None, None);
    let a = st.sqlite.metrics(from, to, Some(GroupBy::Hour), &all);
    let b = st.dynamo.metrics(from, to, Some(GroupBy::Hour), &all);
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(a.totals.requests, 7);
    assert_eq!(
        serde_json::to_value(&a).unwrap(),
        serde_json::to_value(&b).unwrap()
    );
    // Alerts newest first, same from both.
    let a = st.sqlite.alerts(FROM, TO).await.unwrap();
    let b = st.dynamo.alerts(FROM, TO).await.unwrap();
    assert_eq!(a, b);
    let ids: Vec<&str> = a.iter().map(|x| x.alert_id.as_str()).collect();
    assert_eq!(ids, ["alert-2", "alert-1", "alert-0"]);
}

#[tokio::test]
async fn totals_sums_and_percentiles_are_exact_on_a_known_distribution() {
    let st = stores("a-known").await;
    let recs = records();
    for reader in [&st.sqlite, &st.dynamo] {
        let m = reader
            .metrics(FROM, TO, Some(GroupBy::Day), &filter(None, None))
            .await
            .unwrap();
        let t = &m.totals;
        assert_eq!(t.key, "total");
        assert_eq!(t.requests, 40);
        let failed = recs
            .iter()
            .filter(|r| r.error_kind.as_deref() == Some("upstream"));
        assert_eq!(t.errors, failed.count() as u64);
        assert_eq!(t.cancelled, 1);
        assert!((t.error_rate - t.errors as f64 / 40.0).abs() < 1e-12);
        assert_eq!(
            t.input_tokens,
            recs.iter().map(|r| r.input_tokens).sum::<u64>()
        );
        assert_eq!(
            t.cached_input_tokens,
            recs.iter().map(|r| r.cached_input_tokens).sum::<u64>()
        );
        assert_eq!(
            t.output_tokens,
            recs.iter().map(|r| r.output_tokens).sum::<u64>()
        );
        // 1.5 µ$ × (1 + … + 40) = 1230 µ$ exactly.
        assert_eq!(t.cost_pico_usd, 1_230_000_000);
        assert_eq!(t.cost_micro_usd, 1_230);
        assert!((t.cost_usd - 0.00123).abs() < 1e-15);
        // Nearest rank over 10..=400: the 20th, 38th and 40th values.
        assert_eq!(
            (t.latency_ms.p50, t.latency_ms.p95, t.latency_ms.p99),
            (200, 380, 400)
        );
        // TTFT 5+i for the 30 records with i % 4 != 3: ranks 15, 29 and 30 of that list.
        let mut ttfts: Vec<u64> = recs.iter().filter_map(|r| r.ttft_ms).collect();
        ttfts.sort_unstable();
        let ttft = t.ttft_ms.unwrap();
        assert_eq!(
            (ttft.p50, ttft.p95, ttft.p99),
            (ttfts[14], ttfts[28], ttfts[29])
        );
        // Records 0..=21 start on 2025-11-25 (21 × 5.5 min < 2 h), the rest on the 26th.
        let days: Vec<(&str, u64)> = m
            .groups
            .iter()
            .map(|g| (g.key.as_str(), g.requests))
            .collect();
        assert_eq!(days, [("2025-11-25", 22), ("2025-11-26", 18)]);
    }
}

#[tokio::test]
async fn filters_use_the_gsis_and_no_read_ever_scans() {
    let st = stores("a-gsi").await;
    let cases = [
        (filter(None, None), None),
        (filter(Some("styleMaster"), None), Some("GSI1")),
        (filter(None, Some("openai")), Some("GSI2")),
        (filter(Some("styleMaster"), Some("openai")), Some("GSI1")),
    ];
    for (f, index) in cases {
        st.proxy.clear_log();
        let m = st
            .dynamo
            .metrics(FROM, TO, Some(GroupBy::Provider), &f)
            .await
            .unwrap();
        let log = st.proxy.log();
        assert!(!log.is_empty());
        assert!(
            log.iter()
                .all(|r| r.operation == "Query" && r.index.as_deref() == index),
            "{f:?}: {log:?}"
        );
        // Unfiltered: one Query per day partition; filtered: one GSI query.
        assert_eq!(log.len(), if index.is_none() { 2 } else { 1 }, "{log:?}");
        if let Some(p) = &f.provider {
            assert!(m.groups.iter().all(|g| &g.key == p));
        }
        if let Some(p) = &f.process {
            let want = records()
                .iter()
                .filter(|r| &r.process == p && f.provider.as_ref().is_none_or(|v| &r.provider == v))
                .count();
            assert_eq!(m.totals.requests, want as u64);
        }
    }
    st.proxy.clear_log();
    st.dynamo.alerts(FROM, TO).await.unwrap();
    let log = st.proxy.log();
    assert!(
        log.iter()
            .all(|r| r.operation == "Query" && r.index.as_deref() == Some("GSI1")),
        "{log:?}"
    );
}

#[tokio::test]
async fn handlers_return_camel_case_json_with_the_pipeline_health() {
    let dir = TempDir::new("admin-handlers");
    let path = dir.file("keyvex.sqlite3");
    let sqlite = SqliteStore::open(&path).unwrap();
    let mut cfg = MetricsConfig::new(path);
    cfg.flush_interval = Duration::from_millis(20);
    cfg.alerts.min_samples = usize::MAX;
    let tracker = Tracker::start(cfg, Arc::new(sqlite.clone())).await.unwrap();
    for r in records() {
        tracker.record(r).durable().await.unwrap();
    }
    let (h, ok) = tracker
        .wait_for(Duration::from_secs(20), |h| {
            h.pending == 0 && h.shipped >= 40
        })
        .await;
    assert!(ok, "{h:?}");
    let reader = MetricsReader::sqlite(sqlite).with_health(tracker.clone());
    let params = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    };
    let body = metrics_json(
        &reader,
        &params(&[
            ("from", "2025-11-25T22:00:00Z"),
            ("to", &TO.to_string()),
            ("groupBy", "process"),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(body["from"], "2025-11-25T22:00:00.000Z");
    assert_eq!(body["groupBy"], "process");
    assert_eq!(body["totals"]["requests"], 40);
    assert_eq!(body["totals"]["latencyMs"]["p95"], 380);
    assert_eq!(body["totals"]["costMicroUsd"], 1_230);
    let keys: Vec<&str> = body["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "contentCrafter",
            "logicArchitect",
            "magicSpark",
            "styleMaster"
        ]
    );
    assert_eq!(body["pipeline"]["sink"], "sqlite");
    assert_eq!(body["pipeline"]["shipped"], 40);
    assert!(body["pipeline"]["ledgerCommits"].as_u64().unwrap() >= 1);

    let err = metrics_json(&reader, &params(&[("groupBy", "week")]))
        .await
        .unwrap_err();
    assert_eq!(err.status(), http::StatusCode::BAD_REQUEST);
    assert!(err.to_string().contains("groupBy"), "{err}");

    let body = alerts_json(&reader, &params(&[("from", "0"), ("to", "1")]))
        .await
        .unwrap();
    assert_eq!(body["alerts"], serde_json::json!([]));
}
