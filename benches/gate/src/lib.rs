//! The engine's in-process hot paths as bench cases, and the CI budget gate over them.
//!
//! [`cases`] sets up every hot path once as a closure; the `benches` package hands them to
//! criterion (`cargo bench -p benches --bench hot_paths`), and the `gate` binary of this package
//! times the same closures briefly and checks them against `budgets.toml` ([`gate`]).
//! [`fixtures`] holds the captured provider streams the SSE and relay cases replay.
//!
//! A package of its own so the gate can be built optimised (the `gate` profile) without
//! compiling the server, the stores and the cloud SDKs a second time.

pub mod cases;
pub mod fixtures;
pub mod gate;
