//! Keyvex engine: the agent runtime behind the Keyvex API.
//!
//! Read `ARCHITECTURE.md` at the repository root first. One request flows
//! `server` → `router` → `provider` → back through `cost` → `metrics`.

pub mod agent_run;
#[doc(hidden)]
pub mod bench_support;
pub mod catalog;
pub mod config;
pub mod cost;
pub mod dashboard;
pub mod demo;
pub mod limits;
pub mod metrics;
pub mod pipeline;
pub mod provider;
pub mod queue;
pub mod router;
pub mod runtime;
pub mod server;
pub mod store;
pub mod stream;
pub mod tokenize;
