//! `cargo bench -p benches --bench hot_paths`: every hot path of `bench_gate::cases` (the list
//! the CI gate times) under criterion, with throughput in bytes or elements where the input has
//! a natural size.

use std::hint::black_box;

use bench_gate::cases::{self, Work};
use criterion::{Criterion, Throughput};

fn hot_paths(c: &mut Criterion) {
    let cases = match cases::all() {
        Ok(cases) => cases,
        Err(error) => {
            // Without inputs there is nothing to measure; say why instead of panicking.
            eprintln!("benches: setup failed: {error}");
            std::process::exit(2);
        }
    };
    for mut case in cases {
        let name = case.name().to_owned();
        let (group, function) = name.split_once('/').unwrap_or((name.as_str(), "run"));
        let mut g = c.benchmark_group(group);
        match case.work() {
            Some(Work::Bytes(n)) => g.throughput(Throughput::Bytes(n)),
            Some(Work::Elements(n)) => g.throughput(Throughput::Elements(n)),
            None => &mut g,
        };
        g.bench_function(function, |b| b.iter(|| black_box(case.run())));
        g.finish();
    }
}

criterion::criterion_group!(benches, hot_paths);
criterion::criterion_main!(benches);
