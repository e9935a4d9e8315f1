//! From a model's finished text to a validated output: find the JSON, check it against the
//! schema, deserialise it into the agent's type, run the semantic validator, and when something
//! is wrong, write the one repair message the engine sends back.

use std::sync::OnceLock;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Process;
use crate::content_crafter::{self, ContentCrafterInput, ToolContent};
use crate::error::{OutputError, OutputErrors, Problems};
use crate::logic_architect::{self, ToolLogic};
use crate::magic_spark::{self, MagicSparkOutput};
use crate::schema::strict_schema_for;
use crate::style_master::{self, ToolStyle};

/// The `response_format.json_schema.name` (and Anthropic tool name) of each agent's output.
pub fn schema_name(process: Process) -> &'static str {
    match process {
        Process::MagicSpark => "magic_spark_concepts",
        Process::LogicArchitect => "logic_architect_logic",
        Process::ContentCrafter => "content_crafter_content",
        Process::StyleMaster => "style_master_style",
    }
}

/// The process whose output schema is called `name`.
pub fn process_for_schema(name: &str) -> Option<Process> {
    Process::ALL.into_iter().find(|p| schema_name(*p) == name)
}

/// The root of error paths for each agent's output (`logic.inputs[2].default`).
pub fn path_root(process: Process) -> &'static str {
    match process {
        Process::MagicSpark => "spark",
        Process::LogicArchitect => "logic",
        Process::ContentCrafter => "content",
        Process::StyleMaster => "style",
    }
}

struct Compiled {
    schema: Value,
    validator: Option<jsonschema::Validator>,
}

fn compiled(process: Process) -> &'static Compiled {
    static CELLS: [OnceLock<Compiled>; 4] = [const { OnceLock::new() }; 4];
    let index = Process::ALL.iter().position(|p| *p == process).unwrap_or(0);
    CELLS[index].get_or_init(|| {
        let schema = match process {
            Process::MagicSpark => strict_schema_for::<MagicSparkOutput>(),
            Process::LogicArchitect => strict_schema_for::<ToolLogic>(),
            Process::ContentCrafter => strict_schema_for::<ToolContent>(),
            Process::StyleMaster => strict_schema_for::<ToolStyle>(),
        };
        // Our own schemas always compile (a test proves it); should one not, the typed
        // deserialisation and semantic checks still run, so nothing invalid gets through.
        let validator = jsonschema::validator_for(&schema).ok();
        Compiled { schema, validator }
    })
}

/// The strict JSON Schema of `process`'s output (OpenAI `json_schema.schema`, Anthropic tool
/// `input_schema`).
pub fn output_schema(process: Process) -> &'static Value {
    &compiled(process).schema
}

/// Finds the JSON object in a model answer: bare, inside a ```json fence, or with prose around
/// it. Returns a message saying what was wrong when there is none.
pub fn extract_json(text: &str) -> Result<Value, String> {
    let trimmed = text.trim();
    if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(trimmed) {
        return Ok(v);
    }
    // Try every `{` in turn: the first that starts a complete JSON object wins, and whatever
    // follows it (a closing fence, a sign-off) is ignored.
    let mut last_error = None;
    for (i, _) in text.match_indices('{') {
        let mut stream = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(v @ Value::Object(_))) => return Ok(v),
            Some(Err(e)) if last_error.is_none() => last_error = Some(e.to_string()),
            _ => {}
        }
    }
    Err(match last_error {
        Some(e) => {
            format!("the answer contains no complete JSON object (first attempt failed: {e})")
        }
        None => "the answer contains no JSON object; answer with one JSON object only".to_owned(),
    })
}

fn pointer_to_path(root: &str, pointer: &str) -> String {
    let mut out = root.to_owned();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.parse::<usize>().is_ok() {
            out.push_str(&format!("[{seg}]"));
        } else {
            out.push('.');
            out.push_str(&seg);
        }
    }
    out
}

fn shorten(mut s: String) -> String {
    const MAX: usize = 240;
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn schema_problems(process: Process, value: &Value) -> Problems {
    let mut p = Problems::new();
    if let Some(validator) = &compiled(process).validator {
        for e in validator.iter_errors(value) {
            // Quoting a whole object or array back at the model buries the point; scalars are
            // short and worth echoing (`"spreadsheet" is not one of …`).
            let message = if e.instance().is_object() || e.instance().is_array() {
                e.masked().to_string()
            } else {
                e.to_string()
            };
            p.push(
                pointer_to_path(path_root(process), e.instance_path().as_str()),
                shorten(message),
            );
        }
    }
    p
}

fn typed<T: DeserializeOwned>(process: Process, value: &Value) -> Result<T, Problems> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut p = Problems::new();
        let path = e.path().to_string();
        let at = if path == "." {
            path_root(process).to_owned()
        } else {
            format!("{}.{}", path_root(process), path)
        };
        p.push(at, e.inner().to_string());
        p
    })
}

fn serialise<T: Serialize>(process: Process, out: &T) -> Result<Value, OutputErrors> {
    serde_json::to_value(out).map_err(|e| OutputErrors {
        process,
        errors: vec![OutputError {
            path: path_root(process).to_owned(),
            message: format!("could not re-serialise the output: {e}"),
        }],
    })
}

/// Schema errors first, then (when the value still fits the Rust type) the semantic ones: the
/// single repair round should see everything, even if two messages describe one problem.
fn merge(mut schema: Problems, semantic: Problems) -> Problems {
    schema.extend(semantic);
    schema
}

fn check<T: DeserializeOwned + Serialize>(
    process: Process,
    value: &Value,
    semantic: impl FnOnce(&T) -> Problems,
) -> Result<(T, Value), OutputErrors> {
    let schema = schema_problems(process, value);
    let out: T = match typed(process, value) {
        Ok(out) => out,
        Err(type_problems) => {
            let problems = if schema.is_empty() {
                type_problems
            } else {
                schema
            };
            return Err(OutputErrors {
                process,
                errors: problems.into_vec(),
            });
        }
    };
    merge(schema, semantic(&out)).finish(process)?;
    let value = serialise(process, &out)?;
    Ok((out, value))
}

/// Validates an already-parsed output value; returns the typed output serialised.
pub fn validate_value(process: Process, value: &Value) -> Result<Value, OutputErrors> {
    match process {
        Process::MagicSpark => {
            check::<MagicSparkOutput>(process, value, magic_spark::validate).map(|(_, v)| v)
        }
        Process::LogicArchitect => {
            check::<ToolLogic>(process, value, |l| logic_architect::validate(l).0).map(|(_, v)| v)
        }
        Process::ContentCrafter => {
            check::<ToolContent>(process, value, content_crafter::validate).map(|(_, v)| v)
        }
        Process::StyleMaster => {
            check::<ToolStyle>(process, value, style_master::validate).map(|(_, v)| v)
        }
    }
}

/// Parses a model's finished answer and validates it (schema, then the agent's own rules).
pub fn parse_and_validate(process: Process, text: &str) -> Result<Value, OutputErrors> {
    let value = extract_json(text).map_err(|message| OutputErrors {
        process,
        errors: vec![OutputError {
            path: String::new(),
            message,
        }],
    })?;
    validate_value(process, &value)
}

/// Like [`parse_and_validate`], and also checks the output against the agent's input where
/// that matters: Content Crafter's copy must cover exactly the inputs and bands of the logic
/// it was given.
pub fn parse_and_validate_with_input(
    process: Process,
    text: &str,
    input: &Value,
) -> Result<Value, OutputErrors> {
    let value = parse_and_validate(process, text)?;
    if process == Process::ContentCrafter
        && let Ok(input) = serde_json::from_value::<ContentCrafterInput>(input.clone())
        && let Ok(content) = serde_json::from_value::<ToolContent>(value.clone())
    {
        content_crafter::validate_against(&content, &input.logic).finish(process)?;
    }
    Ok(value)
}

/// The user message sent once after an invalid answer: what was wrong, where, and a request for
/// the corrected JSON only.
pub fn repair_prompt(process: Process, errors: &OutputErrors, previous_text: &str) -> String {
    let mut msg = format!(
        "Your previous answer for {} was not valid. Fix every problem below and answer again.\n\nProblems ({}):\n",
        process.display_name(),
        errors.errors.len()
    );
    for e in &errors.errors {
        msg.push_str(&format!("- {e}\n"));
    }
    let previous = previous_text.trim();
    if !previous.is_empty() {
        msg.push_str("\nYour previous answer was:\n<previous_answer>\n");
        msg.push_str(previous);
        msg.push_str("\n</previous_answer>\n");
    }
    msg.push_str(&format!(
        "\nReturn the complete corrected JSON object only, matching the `{}` schema: no prose, no markdown fences, no comments. Keep everything that was already valid unchanged.",
        schema_name(process)
    ));
    msg
}
