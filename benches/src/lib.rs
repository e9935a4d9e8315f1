//! Benches of the engine's hot paths and the CI budget gate over them.
//!
//! [`cases`] sets up every hot path once as a closure; `benches/hot_paths.rs` hands them to
//! criterion (`cargo bench -p benches`), and the `gate` binary times the same closures briefly
//! and checks them against `budgets.toml` ([`gate`]). [`fixtures`] holds the captured provider
//! streams the SSE and relay benches replay.

pub mod cases;
pub mod fixtures;
pub mod gate;
pub mod overhead;
pub mod pipeline_wall;
