//! The official Anthropic SDKs against the simulator on loopback, exactly as a new user runs them:
//! the latest `anthropic` (Python) and `@anthropic-ai/sdk` (TypeScript) with their defaults — the
//! API version they send, the header they put the key in — streaming, not streaming and with a
//! forced tool, and a hand-added `temperature` answered with the 400 of API version 2026-10-21.
//! When an SDK release changes the wire again, these tests fail before a user does.
//!
//! The scripts are `engine/sim/tests/sdk/anthropic_sdk.{py,cjs}`. The SDKs are found through
//! `KEYVEX_SDK_PYTHON` (a Python that can import `anthropic`) and `KEYVEX_SDK_NODE_MODULES` (a
//! `node_modules` holding `@anthropic-ai/sdk`), which `scripts/test.sh` sets after installing the
//! latest releases; without them, the copies that script installs under the repository are
//! used. A missing SDK fails the test with the command that installs it.

use std::path::PathBuf;
use std::time::Duration;

use keyvex_engine::provider::{ChatMessage, Role};
use keyvex_engine::tokenize::{count_prompt_tokens, count_tokens};
use keyvex_sim::{SeenRequest, SimConfig, SimHandle};
use serde_json::Value;

const MODEL: &str = "claude-sonnet-4-6";
/// What the scripts ask (kept equal to the scripts' prompt so token counts can be checked).
const SYSTEM: &str = "Be brief.";
const PROMPT: &str = "Name three ideas for a bakery's customer quiz.";
const INSTALL: &str = "run scripts/test.sh, which installs the latest official Anthropic SDKs \
                       (scripts/ensure-anthropic-sdks.sh) and points the tests at them";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(name)
}

/// A Python interpreter that can import the SDK, or a failed test saying how to get one.
fn python_with_sdk() -> PathBuf {
    let python = std::env::var_os("KEYVEX_SDK_PYTHON")
        .map_or_else(|| repo_root().join(".venv/bin/python"), PathBuf::from);
    let importable = std::process::Command::new(&python)
        .args(["-c", "import anthropic"])
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        importable,
        "the official `anthropic` Python SDK cannot be imported by {} (KEYVEX_SDK_PYTHON): {INSTALL}",
        python.display()
    );
    python
}

/// The `node_modules` holding the SDK, or a failed test saying how to get it.
fn node_modules_with_sdk() -> PathBuf {
    let modules = std::env::var_os("KEYVEX_SDK_NODE_MODULES")
        .map_or_else(|| repo_root().join(".sdk/node/node_modules"), PathBuf::from);
    assert!(
        modules.join("@anthropic-ai/sdk/package.json").is_file(),
        "the official `@anthropic-ai/sdk` is not installed in {} (KEYVEX_SDK_NODE_MODULES): {INSTALL}",
        modules.display()
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|out| out.status.success()),
        "`node` (Node.js 20 or later) is needed to run the TypeScript SDK: {INSTALL}"
    );
    modules
}

/// Runs one SDK script against `sim` and returns the JSON it printed.
async fn run(mut command: tokio::process::Command, sim: &SimHandle) -> Value {
    // The SDKs add `/v1/messages` to the server root themselves.
    let root = format!("http://{}", sim.addr());
    command
        .args([root.as_str(), MODEL])
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the SDK script did not finish within 120 s")
        .expect("the SDK script could not be started");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK script failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("the SDK script printed no JSON ({e}):\n{stdout}\n{stderr}"))
}

async fn start_sim(seed: u64) -> SimHandle {
    keyvex_sim::start(([127, 0, 0, 1], 0).into(), SimConfig::fast(seed))
        .await
        .unwrap()
}

/// Everything an SDK run must show, the same for both languages.
fn check_sdk_run(out: &Value, seen: &[SeenRequest], sdk: &str) {
    let version = out["sdk_version"].as_str().unwrap_or("?");
    let context = format!("{sdk} {version}: {out}");

    // Streamed text, the streamed message and the non-streamed message agree: the simulator's
    // answer is a function of the request, and both paths carry all of it.
    let text = out["stream"]["text"].as_str().unwrap();
    assert!(!text.is_empty(), "{context}");
    assert_eq!(out["stream"]["final_text"], text, "{context}");
    assert_eq!(out["create"]["text"], text, "{context}");
    assert_eq!(out["stream"]["usage"], out["create"]["usage"], "{context}");
    assert_eq!(
        out["stream"]["stop_reason"], out["create"]["stop_reason"],
        "{context}"
    );
    let prompt = count_prompt_tokens(
        Some(SYSTEM),
        &[ChatMessage {
            role: Role::User,
            content: PROMPT.into(),
        }],
    );
    assert_eq!(out["create"]["usage"]["input_tokens"], prompt, "{context}");
    assert_eq!(
        out["create"]["usage"]["output_tokens"],
        count_tokens(text),
        "{context}"
    );

    // The raw events, in the Messages streaming order.
    let events: Vec<&str> = out["raw_event_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(events.first(), Some(&"message_start"), "{context}");
    assert_eq!(events.last(), Some(&"message_stop"), "{context}");
    for kind in [
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
    ] {
        assert!(events.contains(&kind), "{kind} missing: {context}");
    }

    // A forced tool: the SDK put the streamed JSON pieces back together.
    assert_eq!(out["tool"]["stop_reason"], "tool_use", "{context}");
    assert_eq!(out["tool"]["name"], "answer", "{context}");
    assert!(out["tool"]["input"]["ideas"].is_array(), "{context}");

    // A temperature on the SDK's own version is the API's 400, streaming or not.
    for case in ["temperature", "temperature_stream"] {
        let rejected = &out[case];
        assert_eq!(rejected["status"], 400, "{case}: {context}");
        assert_eq!(rejected["class"], "BadRequestError", "{case}: {context}");
        assert_eq!(
            rejected["type"], "invalid_request_error",
            "{case}: {context}"
        );
        assert_eq!(
            rejected["message"], "temperature: Extra inputs are not permitted",
            "{case}: {context}"
        );
        assert!(
            rejected["request_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("req_")),
            "{case}: {context}"
        );
    }
    // ... and accepted when the caller asks for 2023-06-01.
    assert!(
        out["temperature_2023"]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{context}"
    );

    // What went over the wire, as the simulator saw it: with no extra headers the SDK speaks
    // 2026-10-21 and sends the key as `Authorization: Bearer`, and no sampling parameter; the
    // one call that asked for 2023-06-01 carried its temperature. The two 400s are not logged.
    let on = |version: &str| -> Vec<&SeenRequest> {
        seen.iter()
            .filter(|r| r.api_version.as_deref() == Some(version))
            .collect()
    };
    let new = on("2026-10-21");
    assert_eq!(new.len(), 4, "stream, raw stream, create, tool: {seen:?}");
    for request in &new {
        assert_eq!(
            request.key_header.as_deref(),
            Some("authorization"),
            "{seen:?}"
        );
        assert!(request.sampling.is_empty(), "{seen:?}");
        assert_eq!(request.model, MODEL);
    }
    let old = on("2023-06-01");
    assert_eq!(old.len(), 1, "{seen:?}");
    assert_eq!(old[0].sampling, vec!["temperature".to_owned()], "{seen:?}");
    assert_eq!(seen.len(), 5, "no other version was used: {seen:?}");
}

#[tokio::test]
async fn the_latest_python_sdk_streams_and_calls_with_its_defaults_and_gets_the_temperature_400() {
    let python = python_with_sdk();
    let sim = start_sim(61).await;
    let mut command = tokio::process::Command::new(&python);
    command.arg(script("anthropic_sdk.py"));
    let out = run(command, &sim).await;
    check_sdk_run(&out, &sim.requests(), "anthropic (Python)");
    sim.shutdown().await;
}

#[tokio::test]
async fn the_latest_typescript_sdk_streams_and_calls_with_its_defaults_and_gets_the_temperature_400()
 {
    let modules = node_modules_with_sdk();
    let sim = start_sim(62).await;
    let mut command = tokio::process::Command::new("node");
    command
        .env("NODE_PATH", &modules)
        .arg(script("anthropic_sdk.cjs"));
    let out = run(command, &sim).await;
    check_sdk_run(&out, &sim.requests(), "@anthropic-ai/sdk (TypeScript)");
    sim.shutdown().await;
}

#[test]
fn the_sdk_scripts_ask_what_the_checks_assume() {
    // The token counts above are computed from these; a script edited alone would fail oddly.
    for name in ["anthropic_sdk.py", "anthropic_sdk.cjs"] {
        let text = std::fs::read_to_string(script(name)).unwrap();
        assert!(text.contains("Be brief."), "{name}");
        assert!(
            text.contains("Name three ideas for a bakery's customer quiz."),
            "{name}"
        );
    }
}
