//! JSON Schemas for the agents' outputs, in the form OpenAI strict structured outputs accept.
//!
//! Why generate rather than hand-write: the Rust output types are the contract the validators
//! and the pipeline use, so deriving the schema from them (with `schemars`) means the two cannot
//! drift. `schemars` output is then post-processed into OpenAI's strict subset, which Anthropic
//! accepts unchanged as a tool `input_schema`:
//! sub-schemas inlined (no `$ref`), every object `additionalProperties: false` with all its
//! properties `required` (optional values are already `["T", "null"]`), no `format` keywords,
//! `oneOf` rewritten to `anyOf`, no `$schema`/`title`/`default`.

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value};

/// The strict schema of `T`.
pub fn strict_schema_for<T: JsonSchema>() -> Value {
    let generator = SchemaSettings::draft2020_12()
        .with(|s| {
            s.meta_schema = None;
            s.inline_subschemas = true;
        })
        .into_generator();
    let mut value = generator.into_root_schema_for::<T>().to_value();
    if let Value::Object(root) = &mut value {
        root.remove("title");
        root.remove("$defs");
    }
    make_strict(&mut value);
    value
}

/// Rewrites one schema (and every sub-schema) into the strict subset.
fn make_strict(schema: &mut Value) {
    let Value::Object(map) = schema else {
        return;
    };
    for key in ["format", "$schema", "default", "title", "examples"] {
        map.remove(key);
    }
    if let Some(one_of) = map.remove("oneOf") {
        map.insert("anyOf".into(), one_of);
    }
    if let Some(Value::Object(props)) = map.get_mut("properties") {
        props.values_mut().for_each(make_strict);
        let required: Vec<Value> = props.keys().map(|k| Value::String(k.clone())).collect();
        map.insert("required".into(), Value::Array(required));
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    if let Some(items) = map.get_mut("items") {
        make_strict(items);
    }
    for key in ["anyOf", "allOf", "prefixItems"] {
        if let Some(Value::Array(list)) = map.get_mut(key) {
            list.iter_mut().for_each(make_strict);
        }
    }
}

/// Every way `schema` breaks OpenAI's strict rules, as `path: problem` strings (empty = ok).
pub fn strict_violations(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(schema, "#", &mut out);
    out
}

fn is_object_schema(map: &Map<String, Value>) -> bool {
    match map.get("type") {
        Some(Value::String(t)) => t == "object",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "object"),
        _ => map.contains_key("properties"),
    }
}

fn walk(schema: &Value, path: &str, out: &mut Vec<String>) {
    let Value::Object(map) = schema else {
        out.push(format!("{path}: a schema must be an object"));
        return;
    };
    for banned in ["format", "$ref", "oneOf", "$defs"] {
        if map.contains_key(banned) {
            out.push(format!(
                "{path}: `{banned}` is not allowed in a strict schema"
            ));
        }
    }
    if is_object_schema(map) {
        if map.get("additionalProperties") != Some(&Value::Bool(false)) {
            out.push(format!("{path}: additionalProperties must be false"));
        }
        let props = map.get("properties").and_then(Value::as_object);
        let required: Vec<&str> = map
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        match props {
            None => out.push(format!("{path}: an object must list its properties")),
            Some(props) => {
                for (name, sub) in props {
                    if !required.contains(&name.as_str()) {
                        out.push(format!("{path}: property `{name}` is not in required"));
                    }
                    walk(sub, &format!("{path}/properties/{name}"), out);
                }
            }
        }
    }
    if let Some(items) = map.get("items") {
        walk(items, &format!("{path}/items"), out);
    }
    for key in ["anyOf", "allOf"] {
        if let Some(Value::Array(list)) = map.get(key) {
            for (i, sub) in list.iter().enumerate() {
                walk(sub, &format!("{path}/{key}/{i}"), out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn violations_catch_loose_schemas() {
        let loose = json!({
            "type": "object",
            "properties": {
                "a": {"type": "string", "format": "date"},
                "b": {"type": "object", "properties": {"c": {"type": "number"}}, "required": [], "additionalProperties": false}
            },
            "required": ["a"]
        });
        let v = strict_violations(&loose);
        assert!(
            v.iter()
                .any(|m| m == "#: additionalProperties must be false"),
            "{v:?}"
        );
        assert!(
            v.iter().any(|m| m == "#: property `b` is not in required"),
            "{v:?}"
        );
        assert!(
            v.iter().any(|m| m.contains("/properties/a: `format`")),
            "{v:?}"
        );
        assert!(
            v.iter().any(|m| m.contains("/properties/b: property `c`")),
            "{v:?}"
        );
    }
}
