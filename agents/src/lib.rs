//! The four Keyvex agents: prompts, typed inputs and outputs, validation and the pipeline graph.
//!
//! Pure by design: no I/O, no async runtime. The engine renders a prompt here, streams the model
//! answer itself, and hands the finished text back here to be parsed and validated.

pub mod process;
pub mod samples;

pub use process::{Process, UnknownProcess};
