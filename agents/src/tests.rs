//! Crate-level tests: prompts, validators, schemas, samples, partial JSON and the pipeline,
//! exercised through the public API the engine uses.

use serde_json::{Value, json};

use crate::logic_architect::ToolLogic;
use crate::pipeline::{self, PipelineError, ToolDefinition};
use crate::samples::{sample_input, sample_output};
use crate::schema::strict_violations;
use crate::*;

fn sample(process: Process, seed: u64) -> Value {
    let input = sample_input(process, seed);
    let prompt = render(process, &input).unwrap();
    sample_output(schema_name(process), seed, &prompt.user).unwrap()
}

fn errors_of(process: Process, value: &Value) -> OutputErrors {
    validate_value(process, value).expect_err("expected the output to be rejected")
}

// ---- prompts -------------------------------------------------------------------------------

#[test]
fn every_prompt_renders_with_its_context() {
    for p in Process::ALL {
        for seed in 0..4 {
            let input = sample_input(p, seed);
            let r = render(p, &input).unwrap();
            assert!(
                r.system.contains(schema_name(p)),
                "{p}: system names the schema"
            );
            assert!(r.user.contains("<business_context>"), "{p}");
            let industry = input
                .pointer("/industry")
                .or(input.pointer("/business/industry"))
                .unwrap();
            assert!(
                r.user.contains(industry.as_str().unwrap()),
                "{p}: user has the industry"
            );
            assert!(
                !r.user.contains("{{") && !r.system.contains("{%"),
                "{p}: fully rendered"
            );
        }
    }
    let content = render(
        Process::ContentCrafter,
        &sample_input(Process::ContentCrafter, 1),
    )
    .unwrap();
    assert!(content.user.contains("<logic>") && content.user.contains("\"bands\""));
}

#[test]
fn missing_or_wrong_fields_are_named() {
    let mut input = sample_input(Process::MagicSpark, 0);
    input.as_object_mut().unwrap().remove("businessDescription");
    let err = render(Process::MagicSpark, &input).unwrap_err();
    assert_eq!(
        err.to_string(),
        "magicSpark input: missing field businessDescription"
    );

    let mut input = sample_input(Process::LogicArchitect, 0);
    input["concept"].as_object_mut().unwrap().remove("name");
    let err = render(Process::LogicArchitect, &input)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("logicArchitect input: concept: missing field name"),
        "{err}"
    );

    let mut input = sample_input(Process::LogicArchitect, 0);
    input["concept"]["type"] = json!("spreadsheet");
    let err = render(Process::LogicArchitect, &input)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("concept.type") && err.contains("spreadsheet"),
        "{err}"
    );

    let mut input = sample_input(Process::StyleMaster, 0);
    input["brand"] = json!({"colors": ["#112233", "blue"]});
    let err = render(Process::StyleMaster, &input)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "styleMaster input: brand.colors[1]: \"blue\" is not a #RRGGBB hex colour"
    );

    let mut input = sample_input(Process::MagicSpark, 0);
    input["industry"] = json!("  ");
    let err = render(Process::MagicSpark, &input).unwrap_err().to_string();
    assert_eq!(err, "magicSpark input: industry must not be empty");
}

// ---- schemas and samples -------------------------------------------------------------------

#[test]
fn schemas_meet_openai_strict_rules() {
    for p in Process::ALL {
        let schema = output_schema(p);
        assert_eq!(strict_violations(schema), Vec::<String>::new(), "{p}");
        assert_eq!(schema["type"], "object");
        let name = schema_name(p);
        assert!(!name.is_empty() && name.len() <= 64);
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        );
        assert_eq!(process_for_schema(name), Some(p));
        assert!(
            jsonschema::validator_for(schema).is_ok(),
            "{p}: schema compiles"
        );
    }
    assert_eq!(process_for_schema("nope"), None);
    assert_eq!(sample_output("nope", 1, ""), None);
}

#[test]
fn samples_pass_schema_and_validator_for_200_seeds() {
    let validators: Vec<_> = Process::ALL
        .iter()
        .map(|p| jsonschema::validator_for(output_schema(*p)).unwrap())
        .collect();
    for seed in 0..200 {
        for (p, validator) in Process::ALL.iter().zip(&validators) {
            // Both with the rendered prompt as hint and with no hint at all.
            for value in [
                sample(*p, seed),
                sample_output(schema_name(*p), seed, "").unwrap(),
            ] {
                let schema_errors: Vec<String> = validator
                    .iter_errors(&value)
                    .map(|e| e.to_string())
                    .collect();
                assert!(
                    schema_errors.is_empty(),
                    "{p} seed {seed}: {schema_errors:?}"
                );
                let out = validate_value(*p, &value);
                assert!(out.is_ok(), "{p} seed {seed}: {out:?}");
                assert_eq!(out.unwrap(), value, "typed round trip is lossless");
            }
        }
    }
}

#[test]
fn samples_are_deterministic_and_vary() {
    assert_eq!(
        sample(Process::LogicArchitect, 7),
        sample(Process::LogicArchitect, 7)
    );
    let distinct: std::collections::HashSet<String> = (0..20)
        .map(|s| sample(Process::StyleMaster, s).to_string())
        .collect();
    assert!(distinct.len() > 5);
    let spark = sample(Process::MagicSpark, 3);
    let input = sample_input(Process::MagicSpark, 3);
    let industry = input["industry"]
        .as_str()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_lowercase();
    assert!(
        spark.to_string().to_lowercase().contains(&industry),
        "concepts echo the industry"
    );
}

// ---- parse_and_validate and repair -----------------------------------------------------------

#[test]
fn parses_fenced_and_prose_wrapped_json() {
    let body = sample(Process::MagicSpark, 1).to_string();
    for text in [
        body.clone(),
        format!("```json\n{body}\n```"),
        format!(
            "Sure! Here are the concepts:\n\n```json\n{body}\n```\nLet me know {{if}} you need more."
        ),
        format!("Here you go: {body} Hope this helps."),
    ] {
        assert!(
            parse_and_validate(Process::MagicSpark, &text).is_ok(),
            "{text}"
        );
    }
    let err = parse_and_validate(Process::MagicSpark, "I cannot help with that.").unwrap_err();
    assert!(err.errors[0].message.contains("no JSON object"), "{err}");
    let err = parse_and_validate(Process::MagicSpark, "{\"concepts\": [").unwrap_err();
    assert!(
        err.errors[0].message.contains("no complete JSON object"),
        "{err}"
    );
}

#[test]
fn too_few_concepts_and_duplicate_names() {
    let mut v = sample(Process::MagicSpark, 2);
    let first = v["concepts"][0].clone();
    v["concepts"] = json!([first.clone(), first]);
    let err = errors_of(Process::MagicSpark, &v);
    assert!(
        err.has("spark.concepts", "expected 3 to 5 concepts, got 2"),
        "{err}"
    );
    assert!(
        !err.to_string().contains("leadCaptureHook"),
        "schema errors do not dump the array: {err}"
    );
    assert!(err.has("spark.concepts[1].name", "repeats"), "{err}");
}

#[test]
fn schema_errors_carry_paths() {
    let mut v = sample(Process::MagicSpark, 2);
    v["concepts"][1]["type"] = json!("spreadsheet");
    let err = errors_of(Process::MagicSpark, &v);
    assert!(err.has("spark.concepts[1].type", "spreadsheet"), "{err}");
}

fn calculator_logic() -> Value {
    json!({
        "inputs": [
            {"name": "visits", "label": "Monthly visits", "kind": "integer", "unit": null, "min": 100, "max": 10000, "step": 100, "options": null, "default": 1000},
            {"name": "conversion", "label": "Conversion rate", "kind": "percentage", "unit": "%", "min": 0.5, "max": 10, "step": 0.5, "options": null, "default": 2},
            {"name": "share", "label": "Share", "kind": "percentage", "unit": "%", "min": 0, "max": 100, "step": 1, "options": null, "default": 50}
        ],
        "formulas": [{"name": "leads", "label": "Leads", "expression": "visits * conversion / 100", "unit": null}],
        "score": {"label": "Qualified leads", "expression": "round(leads * share / 100)", "unit": null, "display": "number", "higherIsBetter": true},
        "bands": [
            {"id": "low", "label": "Low", "min": 0, "max": 100},
            {"id": "mid", "label": "Mid", "min": 100, "max": 500},
            {"id": "high", "label": "High", "min": 500, "max": 1000}
        ]
    })
}

#[test]
fn logic_fixture_is_valid() {
    let v = calculator_logic();
    assert!(
        validate_value(Process::LogicArchitect, &v).is_ok(),
        "{:?}",
        validate_value(Process::LogicArchitect, &v)
    );
}

#[test]
fn default_outside_range_is_reported_exactly() {
    let mut v = calculator_logic();
    v["inputs"][2]["default"] = json!(150);
    let err = errors_of(Process::LogicArchitect, &v);
    assert!(
        err.errors
            .iter()
            .any(|e| e.to_string() == "logic.inputs[2].default: 150 is outside min..max 0..100"),
        "{err}"
    );
}

#[test]
fn formula_with_undeclared_input_is_rejected() {
    let mut v = calculator_logic();
    v["score"]["expression"] = json!("leads * closeRate");
    let err = errors_of(Process::LogicArchitect, &v);
    assert!(
        err.has(
            "logic.score.expression",
            "uses `closeRate`, which is not a declared input or formula"
        ),
        "{err}"
    );
    let mut v = calculator_logic();
    v["formulas"][0]["expression"] = json!("visits * (conversion / 100");
    let err = errors_of(Process::LogicArchitect, &v);
    assert!(
        err.has("logic.formulas[0].expression", "cannot parse"),
        "{err}"
    );
}

#[test]
fn band_gap_overlap_and_coverage() {
    let mut v = calculator_logic();
    v["bands"][1]["min"] = json!(120);
    let err = errors_of(Process::LogicArchitect, &v);
    assert!(
        err.has(
            "logic.bands[1].min",
            "gap: the previous band ends at 100 but this one starts at 120"
        ),
        "{err}"
    );

    let mut v = calculator_logic();
    v["bands"][2]["min"] = json!(400);
    let err = errors_of(Process::LogicArchitect, &v);
    assert!(err.has("logic.bands[2].min", "overlap"), "{err}");

    // The score reaches round(10000 * 10/100 * 100/100) = 1000; stopping at 900 leaves a hole.
    let mut v = calculator_logic();
    v["bands"][2]["max"] = json!(900);
    let err = errors_of(Process::LogicArchitect, &v);
    assert!(
        err.has("logic.bands[2].max", "leaves scores up to 1000 uncovered"),
        "{err}"
    );

    let mut v = calculator_logic();
    v["inputs"][0]["min"] = json!(0);
    v["score"]["expression"] = json!("share / visits");
    let err = errors_of(Process::LogicArchitect, &v);
    assert!(
        err.has("logic.score.expression", "division by zero"),
        "{err}"
    );
}

#[test]
fn select_and_boolean_inputs_are_checked() {
    let mut v = calculator_logic();
    v["inputs"][2] = json!({"name": "share", "label": "Share", "kind": "select", "unit": null, "min": null, "max": null, "step": null,
        "options": [{"label": "Half", "value": 50}, {"label": "All", "value": 100}], "default": 75});
    let err = errors_of(Process::LogicArchitect, &v);
    assert!(
        err.has(
            "logic.inputs[2].default",
            "75 is not one of the option values 50, 100"
        ),
        "{err}"
    );
    v["inputs"][2]["kind"] = json!("boolean");
    v["inputs"][2]["options"] = Value::Null;
    let err = errors_of(Process::LogicArchitect, &v);
    assert!(
        err.has("logic.inputs[2].default", "must be 0 or 1"),
        "{err}"
    );
    let mut v = calculator_logic();
    v["inputs"][1]["name"] = json!("visits");
    let err = errors_of(Process::LogicArchitect, &v);
    assert!(err.has("logic.inputs[1].name", "declared twice"), "{err}");
}

#[test]
fn style_rejects_bad_hex_and_low_contrast() {
    let mut v = sample(Process::StyleMaster, 0);
    v["palette"]["accent"] = json!("orange");
    let err = errors_of(Process::StyleMaster, &v);
    assert!(err.has("style.palette.accent", "\"orange\""), "{err}");

    let mut v = sample(Process::StyleMaster, 0);
    v["palette"]["background"] = json!("#FFFFFF");
    v["palette"]["text"] = json!("#AAAAAA");
    let err = errors_of(Process::StyleMaster, &v);
    assert!(
        err.errors.iter().any(|e| e.path == "style.palette.text"
            && e.message
                .contains("has contrast 2.32:1, below the WCAG AA minimum 4.5:1")),
        "{err}"
    );
}

#[test]
fn content_must_cover_every_input_and_band() {
    let input = sample_input(Process::ContentCrafter, 4);
    let prompt = render(Process::ContentCrafter, &input).unwrap();
    let mut content = sample_output(schema_name(Process::ContentCrafter), 4, &prompt.user).unwrap();
    let text = content.to_string();
    assert!(parse_and_validate_with_input(Process::ContentCrafter, &text, &input).is_ok());

    let removed = content["resultMessages"].as_array_mut().unwrap().remove(0);
    content["inputs"][0]["name"] = json!("mystery");
    let err = parse_and_validate_with_input(Process::ContentCrafter, &content.to_string(), &input)
        .unwrap_err();
    let band = removed["bandId"].as_str().unwrap();
    assert!(
        err.has(
            "content.resultMessages",
            &format!("no message for band `{band}`")
        ),
        "{err}"
    );
    assert!(
        err.has(
            "content.inputs[0].name",
            "`mystery` is not a declared input"
        ),
        "{err}"
    );
}

#[test]
fn repair_prompt_lists_every_problem() {
    let mut v = calculator_logic();
    v["inputs"][2]["default"] = json!(150);
    v["bands"][1]["min"] = json!(120);
    let previous = v.to_string();
    let err = parse_and_validate(Process::LogicArchitect, &previous).unwrap_err();
    let msg = repair_prompt(Process::LogicArchitect, &err, &previous);
    for e in &err.errors {
        assert!(msg.contains(&e.to_string()), "{msg}");
    }
    assert!(msg.contains("logic_architect_logic") && msg.contains("JSON object only"));
    assert!(msg.contains(&previous));
}

// ---- partial JSON --------------------------------------------------------------------------

fn last_value(chunks: &[&str]) -> Option<Value> {
    let mut p = PartialJson::new();
    let mut last = None;
    for c in chunks {
        if let Some(v) = p.push(c) {
            last = Some(v);
        }
    }
    assert_eq!(last.as_ref(), p.value());
    last
}

#[test]
fn partial_closes_what_is_open() {
    let cases: [(&str, Value); 8] = [
        (r#"{"name":"Ac"#, json!({"name": "Ac"})),
        (r#"{"a":12"#, json!({})),
        (r#"{"a":12,"b":tr"#, json!({"a": 12})),
        (r#"{"a":[1,2,{"b":"x\"#, json!({"a": [1, 2, {"b": "x"}]})),
        (r#"{"a":"é\u00e"#, json!({"a": "é"})),
        (r#"{"a":1,"ke"#, json!({"a": 1})),
        (r#"{"a":1,"key":"#, json!({"a": 1})),
        (
            "Here it is:\n```json\n{\"a\":[true,null,",
            json!({"a": [true, null]}),
        ),
    ];
    for (text, want) in cases {
        assert_eq!(last_value(&[text]), Some(want), "{text}");
    }
    assert_eq!(last_value(&["no json here"]), None);
    let mut p = PartialJson::new();
    assert!(p.push("{\"a\":1}").is_some());
    assert!(p.is_complete());
    assert_eq!(
        p.push("\n```\nThanks!"),
        None,
        "trailing prose changes nothing"
    );
}

#[test]
fn partial_final_value_is_independent_of_splits() {
    for (i, p) in Process::ALL.into_iter().enumerate() {
        let value = sample(p, i as u64 + 11);
        let text = format!(
            "```json\n{}\n```",
            serde_json::to_string_pretty(&value).unwrap()
        );
        let boundaries: Vec<usize> = (0..=text.len())
            .filter(|i| text.is_char_boundary(*i))
            .collect();
        for &cut in &boundaries {
            assert_eq!(
                last_value(&[&text[..cut], &text[cut..]]),
                Some(value.clone()),
                "{p} cut at {cut}"
            );
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(last_value(&refs), Some(value.clone()), "{p} char by char");
    }
}

#[test]
fn partial_values_only_grow_while_streaming() {
    // Every intermediate value is a prefix-closure of the final one: objects never lose keys.
    let value = sample(Process::MagicSpark, 5);
    let text = value.to_string();
    let mut p = PartialJson::new();
    let mut keys_seen = 0;
    for c in text.chars() {
        if let Some(Value::Object(map)) = p.push(&c.to_string()) {
            assert!(map.len() >= keys_seen);
            keys_seen = map.len();
        }
    }
    assert_eq!(p.value(), Some(&value));
}

#[test]
fn partial_nesting_up_to_the_parsers_limit_gives_a_value_and_deeper_none() {
    let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let deepest = nested(127);
    let want: Value = serde_json::from_str(&deepest).expect("serde_json parses 127 levels");
    assert_eq!(last_value(&[&deepest]), Some(want));
    // One level more is refused by serde_json; the scanner gives up at the same depth instead of
    // scanning the rest of a document that can never produce a value.
    assert!(serde_json::from_str::<Value>(&nested(128)).is_err());
    assert_eq!(last_value(&[&nested(128)]), None);
}

#[test]
fn partial_never_panics_on_garbage() {
    let alphabet: Vec<char> = "{}[]\":,\\u0123456789abcdefntrlse.-+ \n\t`é😀"
        .chars()
        .collect();
    let mut state = 42u64;
    for _ in 0..300 {
        let mut p = PartialJson::new();
        for _ in 0..60 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (state >> 60) as usize;
            let s: String = (0..len)
                .map(|k| alphabet[(state.rotate_right(k as u32 * 5) as usize) % alphabet.len()])
                .collect();
            let _ = p.push(&s);
        }
    }
}

// ---- pipeline -----------------------------------------------------------------------------

#[test]
fn graph_waves_and_concurrency() {
    use Process::*;
    assert_eq!(
        pipeline::waves(),
        vec![
            vec![MagicSpark],
            vec![LogicArchitect],
            vec![ContentCrafter, StyleMaster]
        ]
    );
    assert!(pipeline::may_run_concurrently(ContentCrafter, StyleMaster));
    assert!(!pipeline::may_run_concurrently(MagicSpark, StyleMaster));
    assert!(!pipeline::may_run_concurrently(
        LogicArchitect,
        ContentCrafter
    ));
}

/// Runs the whole pipeline on samples the way the engine will (render → model → validate →
/// glue), with `sample_output` standing in for the model.
fn simulate(seed: u64, choice: Option<usize>) -> Result<ToolDefinition, PipelineError> {
    let model = |p: Process, input: &Value| -> Value {
        let prompt = render(p, input).unwrap();
        let text = sample_output(schema_name(p), seed, &prompt.user)
            .unwrap()
            .to_string();
        parse_and_validate_with_input(p, &text, input).unwrap()
    };
    let business = sample_input(Process::MagicSpark, seed);
    let spark = model(Process::MagicSpark, &business);
    let logic_input = pipeline::logic_architect_input(&business, &spark, choice)?;
    let logic = model(Process::LogicArchitect, &logic_input);
    let concept = &logic_input["concept"];
    let content = model(
        Process::ContentCrafter,
        &pipeline::content_crafter_input(&business, concept, &logic)?,
    );
    let brand = json!({"colors": ["#0F766E"], "mood": "calm"});
    let style = model(
        Process::StyleMaster,
        &pipeline::style_master_input(&business, concept, &logic, Some(&brand))?,
    );
    ToolDefinition::assemble_values(concept, &logic, &content, &style)
}

#[test]
fn simulated_pipeline_assembles_for_many_seeds() {
    for seed in 0..40 {
        let tool = simulate(seed, Some((seed % 3) as usize)).unwrap();
        assert_eq!(tool.schema_version, pipeline::SCHEMA_VERSION);
        assert_eq!(tool.content.inputs.len(), tool.logic.inputs.len());
        assert_eq!(
            tool.style.palette.primary, "#0F766E",
            "brand colour is used"
        );
        let json = serde_json::to_value(&tool).unwrap();
        assert!(json.get("schemaVersion").is_some() && json.get("style").is_some());
    }
    assert!(matches!(
        simulate(0, Some(9)),
        Err(PipelineError::NoSuchConcept { index: 9, .. })
    ));
}

#[test]
fn assembly_cross_check_names_what_is_missing() {
    let mut tool = simulate(3, None).unwrap();
    let band = tool.logic.bands[0].id.clone();
    tool.content.result_messages.retain(|m| m.band_id != band);
    let removed_input = tool.content.inputs.pop().unwrap().name;
    let err =
        ToolDefinition::assemble(tool.concept, tool.logic, tool.content, tool.style).unwrap_err();
    let PipelineError::Inconsistent { errors } = &err else {
        panic!("{err}")
    };
    assert!(
        errors
            .iter()
            .any(|e| e.message.contains(&format!("no message for band `{band}`"))),
        "{err}"
    );
    assert!(
        errors.iter().any(|e| e
            .message
            .contains(&format!("no label/helpText for input `{removed_input}`"))),
        "{err}"
    );
}

#[test]
fn glue_errors_say_what_is_wrong() {
    let business = sample_input(Process::MagicSpark, 0);
    let err =
        pipeline::logic_architect_input(&business, &json!({"concepts": "nope"}), None).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("magicSpark output is not usable: concepts"),
        "{err}"
    );
    let logic: ToolLogic = serde_json::from_value(calculator_logic()).unwrap();
    assert_eq!(logic.inputs.len(), 3);
}
