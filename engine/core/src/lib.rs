//! Keyvex engine: the embeddable agent runtime behind the Keyvex API.
//!
//! Build one [`Engine`] ([`Engine::builder`]) with the providers to call and a [`Recorder`] for
//! the records of those calls, then run an agent ([`Engine::agent`]), the whole tool pipeline
//! ([`Engine::pipeline`]) or one routed chat call ([`Engine::chat`]), each for a
//! [`CallContext`] given at call time. Every model call passes one place (`call.rs`): routed with
//! fallback, retries, deadlines, circuit breakers and provider budgets, costed from the usage the
//! provider reported, and recorded exactly once however it ends.
//!
//! No HTTP server, no database and no cloud SDK live here: stores come in through [`Recorder`],
//! the simulator through [`Simulator`]. `ARCHITECTURE.md` at the repository root maps the crates.

pub mod admission;
pub mod agent_run;
#[doc(hidden)]
pub mod bench_support;
pub mod budgets;
pub mod call;
pub mod catalog;
pub mod clock;
pub mod cost;
pub mod engine;
#[doc(hidden)]
pub mod fuzz_support;
pub mod limits;
pub mod pipeline;
pub mod provider;
pub mod record;
pub mod router;
pub mod stream;
pub mod text;
pub mod tokenize;
pub mod trace_context;

/// The four agents' types (inputs, outputs, validation, the pipeline graph), re-exported so an
/// embedding program needs one dependency.
pub use agents;
pub use agents::Process;

pub use agent_run::{AgentError, AgentEvent, AgentOutcome, CallUsage};
pub use call::{CallContext, CallEvent, CallStream};
pub use catalog::Catalog;
pub use cost::Cost;
pub use engine::{
    AgentStream, CatalogRefused, Engine, EngineBuilder, EngineError, PipelineStream, Simulator,
};
pub use pipeline::{PipelineEvent, PipelineInput, RunRollup, StageRollup};
pub use record::{
    CallIntent, CallObserver, Receipt, RecordError, Recorded, Recorder, RequestRecord,
    RequestStatus, SessionMessage, ShutdownReport,
};
pub use router::{CallTarget, RouteOptions, RouteRequest};
pub use stream::{ProviderKind, Usage};
