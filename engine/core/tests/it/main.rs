//! Integration tests of the embeddable core, one test binary (link once): the provider clients
//! against canned HTTP answers, the router's decisions against scripted providers, routing,
//! agent runs and both Anthropic API versions against the simulator over HTTP on loopback, and
//! the engine's one call path (every call recorded exactly once, with its context).

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod agent_runs;
mod anthropic_versions;
mod call_intents;
mod engine_calls;
mod estimates;
mod mid_stream_rescue;
mod provider_clients;
mod provider_faults;
mod router_decisions;
mod routing_over_http;
