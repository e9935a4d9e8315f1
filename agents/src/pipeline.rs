//! The pipeline graph (Magic Spark → Logic Architect → {Content Crafter ∥ Style Master}) as
//! data, the glue that builds each stage's input from earlier outputs, and the final
//! [`ToolDefinition`] with its cross-check.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Process;
use crate::content_crafter::{self, ContentCrafterInput, ToolContent};
use crate::error::{OutputError, Problems};
use crate::logic_architect::{self, LogicArchitectInput, ToolLogic};
use crate::magic_spark::{self, BusinessContext, Concept, MagicSparkOutput};
use crate::style_master::{self, BrandHints, StyleMasterInput, ToolStyle};

/// Version of the [`ToolDefinition`] JSON shape; bump on breaking changes.
pub const SCHEMA_VERSION: u32 = 1;

/// One stage and the stages whose outputs it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage {
    pub process: Process,
    pub depends_on: &'static [Process],
}

/// The stages in a valid execution order.
pub const PIPELINE: [Stage; 4] = [
    Stage {
        process: Process::MagicSpark,
        depends_on: &[],
    },
    Stage {
        process: Process::LogicArchitect,
        depends_on: &[Process::MagicSpark],
    },
    Stage {
        process: Process::ContentCrafter,
        depends_on: &[Process::MagicSpark, Process::LogicArchitect],
    },
    Stage {
        process: Process::StyleMaster,
        depends_on: &[Process::MagicSpark, Process::LogicArchitect],
    },
];

/// The stage of `process`.
pub fn stage(process: Process) -> Stage {
    PIPELINE
        .into_iter()
        .find(|s| s.process == process)
        .unwrap_or(PIPELINE[0])
}

/// Stages grouped into waves: every stage of a wave depends only on earlier waves, so the
/// stages inside one wave may run concurrently. Here: [[magicSpark], [logicArchitect],
/// [contentCrafter, styleMaster]].
pub fn waves() -> Vec<Vec<Process>> {
    let mut done: Vec<Process> = Vec::new();
    let mut waves = Vec::new();
    while done.len() < PIPELINE.len() {
        let wave: Vec<Process> = PIPELINE
            .iter()
            .filter(|s| !done.contains(&s.process))
            .filter(|s| s.depends_on.iter().all(|d| done.contains(d)))
            .map(|s| s.process)
            .collect();
        if wave.is_empty() {
            // Only reachable with a cycle in PIPELINE, which a test rules out.
            break;
        }
        done.extend(&wave);
        waves.push(wave);
    }
    waves
}

/// True when neither stage needs the other's output (directly or through others).
pub fn may_run_concurrently(a: Process, b: Process) -> bool {
    a != b && !depends_on(a, b) && !depends_on(b, a)
}

fn depends_on(a: Process, b: Process) -> bool {
    stage(a)
        .depends_on
        .iter()
        .any(|d| *d == b || depends_on(*d, b))
}

/// Why the pipeline could not move on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PipelineError {
    /// An earlier stage's output (or the business input) does not have the expected shape.
    #[error("{what} is not usable: {message}")]
    BadValue { what: &'static str, message: String },
    #[error(
        "concept index {index} does not exist: Magic Spark returned {available} concept(s) (indexes start at 0)"
    )]
    NoSuchConcept { index: usize, available: usize },
    /// The four outputs do not fit together; each error says where.
    #[error("the assembled tool is inconsistent: {}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Inconsistent { errors: Vec<OutputError> },
}

fn parse<T: DeserializeOwned>(what: &'static str, value: &Value) -> Result<T, PipelineError> {
    serde_path_to_error::deserialize(value).map_err(|e| PipelineError::BadValue {
        what,
        message: format!("{}: {}", e.path(), e.inner()),
    })
}

fn to_value<T: Serialize>(what: &'static str, v: &T) -> Result<Value, PipelineError> {
    serde_json::to_value(v).map_err(|e| PipelineError::BadValue {
        what,
        message: e.to_string(),
    })
}

/// Picks concept `choice` (default 0) from Magic Spark's output.
pub fn choose_concept(
    spark_output: &Value,
    choice: Option<usize>,
) -> Result<Concept, PipelineError> {
    let spark: MagicSparkOutput = parse("magicSpark output", spark_output)?;
    let index = choice.unwrap_or(0);
    let available = spark.concepts.len();
    spark
        .concepts
        .into_iter()
        .nth(index)
        .ok_or(PipelineError::NoSuchConcept { index, available })
}

/// Logic Architect's input: the business plus the chosen concept.
pub fn logic_architect_input(
    business: &Value,
    spark_output: &Value,
    choice: Option<usize>,
) -> Result<Value, PipelineError> {
    let input = LogicArchitectInput {
        business: parse::<BusinessContext>("business input", business)?,
        concept: choose_concept(spark_output, choice)?,
    };
    to_value("logicArchitect input", &input)
}

/// Content Crafter's input: business, concept and logic.
pub fn content_crafter_input(
    business: &Value,
    concept: &Value,
    logic: &Value,
) -> Result<Value, PipelineError> {
    let input = ContentCrafterInput {
        business: parse("business input", business)?,
        concept: parse("concept", concept)?,
        logic: parse("logicArchitect output", logic)?,
    };
    to_value("contentCrafter input", &input)
}

/// Style Master's input: business, concept, logic and optional brand hints.
pub fn style_master_input(
    business: &Value,
    concept: &Value,
    logic: &Value,
    brand: Option<&Value>,
) -> Result<Value, PipelineError> {
    let input = StyleMasterInput {
        business: parse("business input", business)?,
        concept: parse("concept", concept)?,
        logic: parse("logicArchitect output", logic)?,
        brand: brand
            .filter(|b| !b.is_null())
            .map(|b| parse::<BrandHints>("brand hints", b))
            .transpose()?,
    };
    to_value("styleMaster input", &input)
}

/// The finished tool: what the front end renders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolDefinition {
    pub schema_version: u32,
    pub concept: Concept,
    pub logic: ToolLogic,
    pub content: ToolContent,
    pub style: ToolStyle,
}

impl ToolDefinition {
    /// Puts the four parts together after checking each and their fit: the content must cover
    /// every input and band of the logic and nothing else.
    pub fn assemble(
        concept: Concept,
        logic: ToolLogic,
        content: ToolContent,
        style: ToolStyle,
    ) -> Result<Self, PipelineError> {
        let tool = ToolDefinition {
            schema_version: SCHEMA_VERSION,
            concept,
            logic,
            content,
            style,
        };
        let errors = tool.check();
        if errors.is_empty() {
            Ok(tool)
        } else {
            Err(PipelineError::Inconsistent { errors })
        }
    }

    /// Assembles from the stages' JSON outputs.
    pub fn assemble_values(
        concept: &Value,
        logic: &Value,
        content: &Value,
        style: &Value,
    ) -> Result<Self, PipelineError> {
        Self::assemble(
            parse("concept", concept)?,
            parse("logicArchitect output", logic)?,
            parse("contentCrafter output", content)?,
            parse("styleMaster output", style)?,
        )
    }

    /// Every problem in the tool as a whole (empty when consistent).
    pub fn check(&self) -> Vec<OutputError> {
        let mut p = Problems::new();
        let concept_check = magic_spark::validate(&MagicSparkOutput {
            concepts: vec![self.concept.clone()],
        });
        // A lone concept trips the "3 to 5 concepts" rule by construction; keep the rest.
        for e in concept_check.into_vec() {
            if e.path != "spark.concepts" {
                p.push(
                    e.path.replacen("spark.concepts[0]", "concept", 1),
                    e.message,
                );
            }
        }
        p.extend(logic_architect::validate(&self.logic).0);
        p.extend(content_crafter::validate(&self.content));
        p.extend(content_crafter::validate_against(
            &self.content,
            &self.logic,
        ));
        p.extend(style_master::validate(&self.style));
        p.into_vec()
    }
}
