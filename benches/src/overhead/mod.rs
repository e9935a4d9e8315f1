//! The end-to-end overhead benchmark behind `cargo run --release -p benches --bin overhead`:
//! the same streaming workload against the simulator directly, a do-nothing relay (the floor of
//! one extra hop) and the engine, in alternating rounds, so what the engine adds is measured
//! against the floor in the same run.
//!
//! Every server runs as a child process of the benchmark binary ([`roles`]), so the CPU time and
//! memory of each can be read from `/proc/<pid>` ([`procfs`]) without the load client's share.
//! [`load`] drives streams and times them; [`report`] turns the histograms into a table and JSON;
//! [`soak`] plans the many-streams soak.

pub mod load;
pub mod procfs;
pub mod report;
pub mod roles;
pub mod soak;

/// The catalog OpenAI model every stream asks for.
pub const MODEL: &str = "gpt-5.4-mini";
/// The provider key the simulator is called with (it checks presence, not value).
pub const SIM_KEY: &str = "sk-overhead-bench";
/// The engine's API key for the load client.
pub const ENGINE_KEY: &str = "kvx-overhead-bench";
/// The target name of the second engine child that `--redis-url` starts: the same engine with
/// its limits and budgets in that Redis, measured in the same run as the in-process one.
pub const ENGINE_REDIS: &str = "engine-redis";
/// The target name of the engine child that `--baseline-exe` starts from another build: the
/// "before" of a change, measured in the same rounds as the "after" (`engine`).
pub const ENGINE_BASE: &str = "engine-base";
