//! Benchmarks of the engine's hot paths. The criterion benches and the budget gate arrive with
//! the performance issue; this crate only holds their place in the workspace until then.
