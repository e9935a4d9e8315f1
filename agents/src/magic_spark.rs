//! Magic Spark: from a business description to 3–5 lead-magnet tool concepts.

use std::collections::HashSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::Problems;

/// What the business told us about itself. Magic Spark's whole input, and the context every
/// later agent receives too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BusinessContext {
    pub business_description: String,
    pub target_audience: String,
    pub industry: String,
    #[serde(default)]
    pub constraints: Option<String>,
}

/// Magic Spark's input is the business context itself.
pub type MagicSparkInput = BusinessContext;

/// The kind of interactive tool a concept is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ToolType {
    Calculator,
    Quiz,
    Assessment,
}

/// One tool idea.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Concept {
    /// Short product-style name, e.g. "Solar Savings Estimator".
    pub name: String,
    #[serde(rename = "type")]
    pub tool_type: ToolType,
    /// Why the visitor would use it, in one or two sentences.
    pub value_proposition: String,
    /// What the visitor will enter (2–8 items), in plain words.
    #[schemars(length(min = 2, max = 8))]
    pub key_inputs: Vec<String>,
    /// Why the visitor hands over contact details at the end.
    pub lead_capture_hook: String,
}

/// Magic Spark's output: 3–5 distinct concepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MagicSparkOutput {
    #[schemars(length(min = 3, max = 5))]
    pub concepts: Vec<Concept>,
}

/// Checks beyond the schema; paths start at `spark`.
pub fn validate(out: &MagicSparkOutput) -> Problems {
    let mut p = Problems::new();
    let n = out.concepts.len();
    if !(3..=5).contains(&n) {
        p.push(
            "spark.concepts",
            format!("expected 3 to 5 concepts, got {n}"),
        );
    }
    let mut names = HashSet::new();
    for (i, c) in out.concepts.iter().enumerate() {
        let at = format!("spark.concepts[{i}]");
        for (field, value) in [
            ("name", &c.name),
            ("valueProposition", &c.value_proposition),
            ("leadCaptureHook", &c.lead_capture_hook),
        ] {
            if value.trim().is_empty() {
                p.push(format!("{at}.{field}"), "must not be empty");
            }
        }
        if !c.name.trim().is_empty() && !names.insert(c.name.trim().to_lowercase()) {
            p.push(
                format!("{at}.name"),
                format!(
                    "{:?} repeats an earlier concept's name; names must be distinct",
                    c.name
                ),
            );
        }
        if !(2..=8).contains(&c.key_inputs.len()) {
            p.push(
                format!("{at}.keyInputs"),
                format!("expected 2 to 8 key inputs, got {}", c.key_inputs.len()),
            );
        }
        for (j, k) in c.key_inputs.iter().enumerate() {
            if k.trim().is_empty() {
                p.push(format!("{at}.keyInputs[{j}]"), "must not be empty");
            }
        }
    }
    p
}
