//! The four Keyvex agents: prompts, typed inputs and outputs, validation and the pipeline graph.
//!
//! Pure by design: no I/O, no async runtime. The engine renders a prompt here ([`render`]),
//! streams the model answer itself (feeding deltas to [`PartialJson`] for live previews), and
//! hands the finished text back to [`parse_and_validate`]; on failure it sends
//! [`repair_prompt`] once. The output schemas ([`output_schema`], named by [`schema_name`]) go
//! to the provider as OpenAI `response_format.json_schema` or an Anthropic tool `input_schema`.

pub mod content_crafter;
pub mod error;
pub mod formula;
pub mod logic_architect;
pub mod magic_spark;
pub mod output;
pub mod partial;
pub mod pipeline;
pub mod process;
pub mod prompt;
pub mod samples;
pub mod schema;
pub mod style_master;

#[cfg(test)]
mod tests;

pub use error::{AgentError, OutputError, OutputErrors};
pub use output::{
    extract_json, output_schema, parse_and_validate, parse_and_validate_with_input,
    process_for_schema, repair_prompt, schema_name, validate_value,
};

pub use partial::PartialJson;
pub use pipeline::{PIPELINE, PipelineError, Stage, ToolDefinition};
pub use process::{Process, UnknownProcess};
pub use prompt::{RenderedPrompt, render};
