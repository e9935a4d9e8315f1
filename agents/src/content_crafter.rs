//! Content Crafter: the tool's copy — title, intro, per-input labels and help, a message per
//! result band, the call to action and the lead form.

use std::collections::HashSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::Problems;
use crate::logic_architect::ToolLogic;
use crate::magic_spark::{BusinessContext, Concept};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContentCrafterInput {
    pub business: BusinessContext,
    pub concept: Concept,
    pub logic: ToolLogic,
}

/// Label and help text for one declared input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InputCopy {
    /// The input's `name` from the logic, exactly.
    pub name: String,
    pub label: String,
    pub help_text: String,
}

/// What the visitor reads when the score lands in one band.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultMessage {
    /// The band's `id` from the logic, exactly.
    pub band_id: String,
    pub headline: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LeadFieldKind {
    Text,
    Email,
    Tel,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeadField {
    #[schemars(regex(pattern = r"^[A-Za-z][A-Za-z0-9_]{0,39}$"))]
    pub name: String,
    pub label: String,
    pub kind: LeadFieldKind,
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeadForm {
    pub headline: String,
    /// 1–5 fields; one of them an email.
    #[schemars(length(min = 1, max = 5))]
    pub fields: Vec<LeadField>,
    pub submit_label: String,
    pub privacy_note: String,
}

/// Content Crafter's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolContent {
    pub title: String,
    pub subtitle: String,
    pub intro: String,
    /// One entry per declared input, in the logic's order.
    #[schemars(length(min = 1, max = 12))]
    pub inputs: Vec<InputCopy>,
    /// One entry per declared band, in the logic's order.
    #[schemars(length(min = 1, max = 6))]
    pub result_messages: Vec<ResultMessage>,
    pub call_to_action: String,
    pub lead_form: LeadForm,
}

/// Checks that need only the content itself; paths start at `content`.
pub fn validate(c: &ToolContent) -> Problems {
    let mut p = Problems::new();
    for (field, value) in [
        ("title", &c.title),
        ("subtitle", &c.subtitle),
        ("intro", &c.intro),
        ("callToAction", &c.call_to_action),
        ("leadForm.headline", &c.lead_form.headline),
        ("leadForm.submitLabel", &c.lead_form.submit_label),
        ("leadForm.privacyNote", &c.lead_form.privacy_note),
    ] {
        if value.trim().is_empty() {
            p.push(format!("content.{field}"), "must not be empty");
        }
    }
    if c.title.chars().count() > 80 {
        p.push(
            "content.title",
            format!("{} characters; keep it within 80", c.title.chars().count()),
        );
    }
    let mut names = HashSet::new();
    for (i, input) in c.inputs.iter().enumerate() {
        if !names.insert(input.name.as_str()) {
            p.push(
                format!("content.inputs[{i}].name"),
                format!("{:?} has copy twice", input.name),
            );
        }
        if input.label.trim().is_empty() {
            p.push(format!("content.inputs[{i}].label"), "must not be empty");
        }
        if input.help_text.trim().is_empty() {
            p.push(format!("content.inputs[{i}].helpText"), "must not be empty");
        }
    }
    let mut bands = HashSet::new();
    for (i, m) in c.result_messages.iter().enumerate() {
        if !bands.insert(m.band_id.as_str()) {
            p.push(
                format!("content.resultMessages[{i}].bandId"),
                format!("{:?} has two messages", m.band_id),
            );
        }
        if m.message.trim().is_empty() {
            p.push(
                format!("content.resultMessages[{i}].message"),
                "must not be empty",
            );
        }
    }
    let fields = &c.lead_form.fields;
    if fields.is_empty() || fields.len() > 5 {
        p.push(
            "content.leadForm.fields",
            format!("expected 1 to 5 fields, got {}", fields.len()),
        );
    }
    if !fields
        .iter()
        .any(|f| f.kind == LeadFieldKind::Email && f.required)
    {
        p.push(
            "content.leadForm.fields",
            "needs a required email field: the form exists to capture the lead",
        );
    }
    let mut field_names = HashSet::new();
    for (i, f) in fields.iter().enumerate() {
        if !field_names.insert(f.name.as_str()) {
            p.push(
                format!("content.leadForm.fields[{i}].name"),
                format!("{:?} is used twice", f.name),
            );
        }
    }
    p
}

/// Checks that the content matches the logic it was written for: copy for every declared input
/// and none other, a message for every band and none other.
pub fn validate_against(c: &ToolContent, logic: &ToolLogic) -> Problems {
    let mut p = Problems::new();
    let declared: Vec<&str> = logic.inputs.iter().map(|i| i.name.as_str()).collect();
    for name in &declared {
        if !c.inputs.iter().any(|i| i.name == *name) {
            p.push(
                "content.inputs",
                format!("no label/helpText for input `{name}`; add {{\"name\": \"{name}\", …}}"),
            );
        }
    }
    for (i, copy) in c.inputs.iter().enumerate() {
        if !declared.contains(&copy.name.as_str()) {
            p.push(
                format!("content.inputs[{i}].name"),
                format!(
                    "`{}` is not a declared input (declared: {})",
                    copy.name,
                    declared.join(", ")
                ),
            );
        }
    }
    let band_ids: Vec<&str> = logic.bands.iter().map(|b| b.id.as_str()).collect();
    for id in &band_ids {
        if !c.result_messages.iter().any(|m| m.band_id == *id) {
            p.push(
                "content.resultMessages",
                format!("no message for band `{id}`; add {{\"bandId\": \"{id}\", …}}"),
            );
        }
    }
    for (i, m) in c.result_messages.iter().enumerate() {
        if !band_ids.contains(&m.band_id.as_str()) {
            p.push(
                format!("content.resultMessages[{i}].bandId"),
                format!(
                    "`{}` is not a declared band (declared: {})",
                    m.band_id,
                    band_ids.join(", ")
                ),
            );
        }
    }
    p
}
