//! Integration tests of the provider simulator, one test binary: both wire protocols over HTTP
//! on loopback, checked by a strict SSE parser; the Anthropic API versions and key headers; and
//! the official Anthropic SDKs run against it.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod connections;
mod sdk;
mod strict_sse;
mod versions;
mod wire;
