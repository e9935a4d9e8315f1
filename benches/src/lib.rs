//! Benchmarks that need the whole system: the overhead benchmark against a do-nothing relay and
//! the pipeline wall time. The in-process hot-path cases and the CI gate live in `bench-gate`
//! (`benches/gate/`); the criterion benches here run its case list.

pub mod overhead;
pub mod pipeline_wall;
