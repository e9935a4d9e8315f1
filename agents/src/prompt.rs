//! Prompt rendering: typed input in, system and user messages out (templates from `prompts/`).

use std::sync::OnceLock;

use minijinja::{Environment, UndefinedBehavior};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::Process;
use crate::content_crafter::ContentCrafterInput;
use crate::error::AgentError;
use crate::logic_architect::LogicArchitectInput;
use crate::magic_spark::{BusinessContext, MagicSparkInput};
use crate::style_master::{self, StyleMasterInput};

/// The two messages an agent sends: system instructions and the user turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedPrompt {
    pub system: String,
    pub user: String,
}

/// The templates, embedded at build time so the binary needs no files at run time.
const TEMPLATES: [(&str, &str); 8] = [
    (
        "magic-spark.system.j2",
        include_str!("../../prompts/magic-spark.system.j2"),
    ),
    (
        "magic-spark.user.j2",
        include_str!("../../prompts/magic-spark.user.j2"),
    ),
    (
        "logic-architect.system.j2",
        include_str!("../../prompts/logic-architect.system.j2"),
    ),
    (
        "logic-architect.user.j2",
        include_str!("../../prompts/logic-architect.user.j2"),
    ),
    (
        "content-crafter.system.j2",
        include_str!("../../prompts/content-crafter.system.j2"),
    ),
    (
        "content-crafter.user.j2",
        include_str!("../../prompts/content-crafter.user.j2"),
    ),
    (
        "style-master.system.j2",
        include_str!("../../prompts/style-master.system.j2"),
    ),
    (
        "style-master.user.j2",
        include_str!("../../prompts/style-master.user.j2"),
    ),
];

fn env() -> &'static Result<Environment<'static>, String> {
    static ENV: OnceLock<Result<Environment<'static>, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        // A typo in a template must fail loudly, not render an empty string into a prompt.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(false);
        for (name, source) in TEMPLATES {
            env.add_template(name, source)
                .map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(env)
    })
}

/// Deserialises `input` into the agent's input type; the error names the offending field.
pub fn parse_input<T: DeserializeOwned>(process: Process, input: &Value) -> Result<T, AgentError> {
    serde_path_to_error::deserialize(input).map_err(|e| {
        let path = e.path().to_string();
        let message = if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        };
        AgentError::InvalidInput {
            process,
            message: message.replace('`', ""),
        }
    })
}

fn check_business(process: Process, prefix: &str, b: &BusinessContext) -> Result<(), AgentError> {
    for (field, value) in [
        ("businessDescription", &b.business_description),
        ("targetAudience", &b.target_audience),
        ("industry", &b.industry),
    ] {
        if value.trim().is_empty() {
            return Err(AgentError::InvalidInput {
                process,
                message: format!("{prefix}{field} must not be empty"),
            });
        }
    }
    Ok(())
}

fn to_context<T: Serialize>(process: Process, input: &T) -> Result<Value, AgentError> {
    serde_json::to_value(input).map_err(|e| AgentError::InvalidInput {
        process,
        message: format!("cannot serialise input: {e}"),
    })
}

/// Validates `input` for `process` and returns it as the template context.
pub fn input_context(process: Process, input: &Value) -> Result<Value, AgentError> {
    match process {
        Process::MagicSpark => {
            let i: MagicSparkInput = parse_input(process, input)?;
            check_business(process, "", &i)?;
            to_context(process, &i)
        }
        Process::LogicArchitect => {
            let i: LogicArchitectInput = parse_input(process, input)?;
            check_business(process, "business.", &i.business)?;
            to_context(process, &i)
        }
        Process::ContentCrafter => {
            let i: ContentCrafterInput = parse_input(process, input)?;
            check_business(process, "business.", &i.business)?;
            let mut ctx = to_context(process, &i)?;
            let logic_json = serde_json::to_string_pretty(&i.logic).unwrap_or_default();
            if let Value::Object(map) = &mut ctx {
                map.insert("logic_json".into(), Value::String(logic_json));
                map.insert(
                    "input_names".into(),
                    json!(i.logic.inputs.iter().map(|x| &x.name).collect::<Vec<_>>()),
                );
                map.insert(
                    "band_ids".into(),
                    json!(i.logic.bands.iter().map(|b| &b.id).collect::<Vec<_>>()),
                );
            }
            Ok(ctx)
        }
        Process::StyleMaster => {
            let i: StyleMasterInput = parse_input(process, input)?;
            check_business(process, "business.", &i.business)?;
            if let Some(brand) = &i.brand {
                style_master::validate_brand(brand)
                    .map_err(|message| AgentError::InvalidInput { process, message })?;
            }
            let mut ctx = to_context(process, &i)?;
            if let Value::Object(map) = &mut ctx {
                // Absent brand hints render as "none given" rather than failing strict mode.
                map.entry("brand").or_insert(Value::Null);
            }
            Ok(ctx)
        }
    }
}

/// Renders `process`'s prompt for `input` (the agent's input as JSON).
pub fn render(process: Process, input: &Value) -> Result<RenderedPrompt, AgentError> {
    let ctx = input_context(process, input)?;
    let env = env().as_ref().map_err(|message| AgentError::Template {
        process,
        template: "(loading)",
        message: message.clone(),
    })?;
    let render_one = |template: &'static str| -> Result<String, AgentError> {
        env.get_template(template)
            .and_then(|t| t.render(&ctx))
            .map(|s| s.trim().to_owned())
            .map_err(|e| AgentError::Template {
                process,
                template,
                message: e.to_string(),
            })
    };
    let (system, user) = match process {
        Process::MagicSpark => ("magic-spark.system.j2", "magic-spark.user.j2"),
        Process::LogicArchitect => ("logic-architect.system.j2", "logic-architect.user.j2"),
        Process::ContentCrafter => ("content-crafter.system.j2", "content-crafter.user.j2"),
        Process::StyleMaster => ("style-master.system.j2", "style-master.user.j2"),
    };
    Ok(RenderedPrompt {
        system: render_one(system)?,
        user: render_one(user)?,
    })
}
