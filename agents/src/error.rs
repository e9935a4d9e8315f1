//! The agents' error types: one for bad inputs/rendering, one for invalid model outputs.

use std::fmt;

use serde::Serialize;

use crate::Process;

/// Something was wrong with what the caller gave an agent (before any model is called).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AgentError {
    /// The input did not match the agent's input type; `message` names the field.
    #[error("{process} input: {message}")]
    InvalidInput { process: Process, message: String },
    /// A template failed to render: a bug in `prompts/`, not in the caller's input.
    #[error("{process} prompt template {template}: {message}")]
    Template {
        process: Process,
        template: &'static str,
        message: String,
    },
}

/// One thing wrong with a model's output: where (`logic.inputs[2].default`) and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutputError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for OutputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one model output. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct OutputErrors {
    pub process: Process,
    pub errors: Vec<OutputError>,
}

impl fmt::Display for OutputErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} output has {} problem(s)",
            self.process,
            self.errors.len()
        )?;
        for e in &self.errors {
            write!(f, "; {e}")?;
        }
        Ok(())
    }
}

impl OutputErrors {
    /// True when some error's path starts with `path` and its message contains `needle`; a
    /// convenience for tests and for callers deciding whether a repair is worth it.
    pub fn has(&self, path: &str, needle: &str) -> bool {
        self.errors
            .iter()
            .any(|e| e.path.starts_with(path) && e.message.contains(needle))
    }
}

/// Collects validation problems with their paths; validators push, callers read the list.
#[derive(Debug, Default)]
pub struct Problems {
    errors: Vec<OutputError>,
}

impl Problems {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(OutputError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn extend(&mut self, other: Problems) {
        self.errors.extend(other.errors);
    }

    pub fn into_vec(self) -> Vec<OutputError> {
        self.errors
    }

    /// `Ok(())` when nothing was found, else the problems tagged with the process.
    pub fn finish(self, process: Process) -> Result<(), OutputErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(OutputErrors {
                process,
                errors: self.errors,
            })
        }
    }
}
