//! Load-test harness of the Keyvex engine: goose scenarios with stream-aware timing, a cost and
//! token aggregator, targets with pass/fail, reports, an open-loop mode, and an in-process
//! engine + simulator for running offline. `main.rs` wires them into the `loadtest` binary.

pub mod corpus;
pub mod open_loop;
pub mod report;
pub mod scenarios;
pub mod selfhost;
pub mod sse;
pub mod stats;
pub mod targets;
