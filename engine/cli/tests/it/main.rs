//! Integration tests of the `keyvex` binary, one test binary (link once): the built binary run
//! as a user runs it — one-shot commands, `serve`, `worker` and `table` — against the in-process simulator,
//! SQLite files and a local AWS emulator, stopped with real signals.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod cli_support;
mod demo_traffic;
mod durability;
mod interrupted;
mod models;
mod pipeline;
mod shared_limits;
mod table;
mod traces;
mod worker;
