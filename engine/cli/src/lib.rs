//! The `keyvex` binary's library half: configuration read once into a validated
//! [`config::Config`], and the assembly of a running engine from it ([`app::App`]). The load
//! test and the benchmarks assemble their self-contained engines through it too, so they run
//! exactly what `keyvex serve` runs.

pub mod app;
pub mod config;
pub mod log_fields;
pub mod log_filter;
pub mod telemetry;

pub use app::{App, AppError};
pub use config::{Config, ConfigError, Env, MapEnv, ProcessEnv};
