//! `cargo bench -p benches --bench request_path`: what recording a metric costs the request
//! path — `Tracker::record` of a finished call's `RequestRecord` (a channel send) with the real
//! SQLite ledger draining behind it.
//!
//! The ledger cannot commit as fast as `record` accepts, so each sample times only the `record`
//! calls (`iter_custom`) and then waits, untimed, until the ledger has caught up; otherwise
//! memory would grow with the backlog and the bench would measure SQLite instead.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use keyvex_engine::RequestRecord;
use keyvex_store::{MetricsConfig, StoreConfig, Stores, Tracker};

fn setup(runtime: &tokio::runtime::Runtime, dir: &std::path::Path) -> Option<Tracker> {
    let db = dir.join("bench-metrics.sqlite3");
    let store = StoreConfig::Sqlite { path: db.clone() };
    match runtime.block_on(Stores::open(&store, MetricsConfig::new(db))) {
        Ok(stores) => Some(stores.tracker),
        Err(error) => {
            eprintln!("request_path: could not start the tracker: {error}");
            None
        }
    }
}

fn sample_record() -> RequestRecord {
    let mut rec = RequestRecord::new("bench-caller", "direct", "openai", "gpt-5.4-mini");
    rec.input_tokens = 1_200;
    rec.cached_input_tokens = 1_024;
    rec.output_tokens = 480;
    rec.cost_pico_usd = 1_234_567_890;
    rec.cost_micro_usd = 1_235;
    rec.latency_ms = 2_345;
    rec.ttft_ms = Some(412);
    rec
}

fn metrics_record(c: &mut Criterion) {
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    else {
        eprintln!("request_path: could not build a tokio runtime");
        std::process::exit(2);
    };
    let dir = std::env::temp_dir().join(format!("keyvex-bench-metrics-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_err() {
        eprintln!("request_path: could not create {}", dir.display());
        std::process::exit(2);
    }
    let Some(tracker) = setup(&runtime, &dir) else {
        std::process::exit(2);
    };
    let template = sample_record();
    let mut g = c.benchmark_group("metrics");
    g.throughput(Throughput::Elements(1));
    // The record a handler builds is moved into `record`; building it is the caller's cost, so
    // the clones are made before the clock starts.
    g.bench_function("record", |b| {
        b.iter_custom(|iters| {
            let records: Vec<RequestRecord> = (0..iters).map(|_| template.clone()).collect();
            let start = Instant::now();
            for rec in records {
                black_box(tracker.record(rec));
            }
            let took = start.elapsed();
            let accepted = tracker.health().accepted;
            let _ = runtime
                .block_on(tracker.wait_for(Duration::from_secs(120), |h| h.durable >= accepted));
            took
        });
    });
    g.finish();
    let _ =
        runtime.block_on(tracker.shutdown(tokio::time::Instant::now() + Duration::from_secs(10)));
    let _ = std::fs::remove_dir_all(&dir);
}

criterion::criterion_group!(benches, metrics_record);
criterion::criterion_main!(benches);
