//! Integration tests of the HTTP server, one test binary (link once): an in-process server on a
//! free loopback port in front of the provider simulator, its metrics in SQLite files or
//! DynamoDB on a local AWS emulator (moto), its queue on moto's SQS, and the dashboard in a real
//! headless Chromium.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod admin;
mod budgets;
mod catalog;
mod dashboard;
mod durability;
mod jobs;
mod rescue;
mod routes;
mod sessions;
mod streams;
mod support;
mod worker;
