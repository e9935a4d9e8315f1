//! Integration tests of the engine, one binary (link once). Each module exercises a real
//! boundary: the simulator over HTTP on loopback, the providers' client code, the router,
//! and the stores against a local AWS emulator.

mod admin;
mod agents;
mod api_more;
mod dashboard;
mod durability;
mod metrics;
mod providers;
mod queue;
mod router;
mod routing;
mod server;
mod sessions;
mod sim;
mod support;
