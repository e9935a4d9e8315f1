//! The `AI_PROCESSING` message on the wire (`{messageType, sessionId, userId, process, input,
//! priority, timestamp}`, as the Keyvex API sends it) and its validation into a
//! [`Job`] the worker can run, or a [`Poison`] verdict saying why it never can.

use agents::Process;
use serde::{Deserialize, Serialize};

use keyvex_engine::pipeline::PipelineInput;

/// `messageType` of every message on the AI-processing queue.
pub const MESSAGE_TYPE: &str = "AI_PROCESSING";
/// `process` of a whole-pipeline job (the four agent keys name single-agent jobs).
pub const PIPELINE: &str = "pipeline";

/// Carried on the message and in the job state. A standard SQS queue cannot reorder, so the
/// worker does not act on it yet; separate queues per priority would be the way to honour it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        match s {
            "high" => Some(Priority::High),
            "normal" => Some(Priority::Normal),
            "low" => Some(Priority::Low),
            _ => None,
        }
    }
}

/// What a job runs: one agent, or the whole pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Agent(Process),
    Pipeline,
}

impl Target {
    /// The wire key: the agent's process key (`magicSpark`, …) or `pipeline`.
    pub fn key(self) -> &'static str {
        match self {
            Target::Agent(p) => p.key(),
            Target::Pipeline => PIPELINE,
        }
    }

    /// Accepts a process key or slug, or `pipeline`.
    pub fn parse(s: &str) -> Result<Target, String> {
        if s == PIPELINE {
            return Ok(Target::Pipeline);
        }
        s.parse::<Process>().map(Target::Agent).map_err(|e| {
            format!("{e}; a job may also target the whole pipeline with process \"{PIPELINE}\"")
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

/// The message body, field for field (camelCase JSON). `jobId` is ours: messages from other
/// producers may lack it, and then the SQS message id names the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AiProcessingMessage {
    pub message_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    pub user_id: String,
    pub process: String,
    pub input: serde_json::Value,
    #[serde(default)]
    pub priority: Priority,
    /// Unix milliseconds when the job was enqueued.
    pub timestamp: u64,
}

/// A validated message: everything the worker needs to run the job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub job_id: String,
    pub user_id: String,
    pub session_id: Option<String>,
    pub target: Target,
    pub input: serde_json::Value,
    pub priority: Priority,
    pub enqueued_at_ms: u64,
}

/// A message that can never succeed, however often it is delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("poison message ({kind}): {reason}")]
pub struct Poison {
    /// The job it belongs to, when the body got far enough to say.
    pub job_id: Option<String>,
    pub user_id: Option<String>,
    /// Stable label: `not_json`, `wrong_type`, `unknown_process`, `invalid_input`.
    pub kind: &'static str,
    pub reason: String,
}

/// Checks an input the way the run will use it, so that a bad input is rejected before it costs
/// a model call: an agent's prompt must render; a pipeline input must deserialize and its
/// business part must render Magic Spark's prompt (the first stage).
pub fn validate_input(target: Target, input: &serde_json::Value) -> Result<(), String> {
    match target {
        Target::Agent(process) => agents::render(process, input)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Target::Pipeline => {
            let parsed: PipelineInput = serde_json::from_value(input.clone())
                .map_err(|e| format!("pipeline input: {e}"))?;
            agents::render(Process::MagicSpark, &parsed.business)
                .map(|_| ())
                .map_err(|e| format!("pipeline input `business`: {e}"))
        }
    }
}

/// Parses and validates a message body. `message_id` names the job when the body has no `jobId`.
pub fn parse(body: &str, message_id: &str) -> Result<Job, Poison> {
    let raw: serde_json::Value = serde_json::from_str(body).map_err(|e| Poison {
        job_id: None,
        user_id: None,
        kind: "not_json",
        reason: format!("the body is not JSON: {e}"),
    })?;
    // Read the ids first, so a malformed message that names its job still marks that job failed.
    let job_id = raw.get("jobId").and_then(|v| v.as_str()).map(str::to_owned);
    let user_id = raw
        .get("userId")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let poison = |kind, reason| Poison {
        job_id: job_id.clone(),
        user_id: user_id.clone(),
        kind,
        reason,
    };
    let msg: AiProcessingMessage = serde_json::from_value(raw.clone())
        .map_err(|e| poison("wrong_type", format!("not an AI_PROCESSING message: {e}")))?;
    if msg.message_type != MESSAGE_TYPE {
        return Err(poison(
            "wrong_type",
            format!(
                "messageType is {:?}, this queue carries {MESSAGE_TYPE:?}",
                msg.message_type
            ),
        ));
    }
    let target = Target::parse(&msg.process).map_err(|e| poison("unknown_process", e))?;
    validate_input(target, &msg.input).map_err(|e| poison("invalid_input", e))?;
    Ok(Job {
        job_id: msg.job_id.unwrap_or_else(|| message_id.to_owned()),
        user_id: msg.user_id,
        session_id: msg.session_id,
        target,
        input: msg.input,
        priority: msg.priority,
        enqueued_at_ms: msg.timestamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(process: &str, input: serde_json::Value) -> String {
        serde_json::to_string(&AiProcessingMessage {
            message_type: MESSAGE_TYPE.into(),
            job_id: Some("job-1".into()),
            session_id: None,
            user_id: "u1".into(),
            process: process.into(),
            input,
            priority: Priority::High,
            timestamp: 1_700_000_000_000,
        })
        .unwrap()
    }

    #[test]
    fn a_valid_agent_message_parses() {
        let input = agents::samples::sample_input(Process::MagicSpark, 1);
        let job = parse(&body("magicSpark", input.clone()), "m-1").unwrap();
        assert_eq!(job.job_id, "job-1");
        assert_eq!(job.target, Target::Agent(Process::MagicSpark));
        assert_eq!(job.priority, Priority::High);
        assert_eq!(job.input, input);
    }

    #[test]
    fn wire_names_follow_the_product_plan() {
        let json: serde_json::Value =
            serde_json::from_str(&body("magicSpark", serde_json::json!({}))).unwrap();
        for key in [
            "messageType",
            "jobId",
            "userId",
            "process",
            "input",
            "priority",
            "timestamp",
        ] {
            assert!(json.get(key).is_some(), "missing {key}: {json}");
        }
        assert_eq!(json["priority"], "high");
    }

    #[test]
    fn pipeline_input_is_checked_through_its_first_stage() {
        let business = agents::samples::sample_input(Process::MagicSpark, 2);
        let ok = serde_json::json!({ "business": business });
        assert_eq!(
            parse(&body(PIPELINE, ok), "m").unwrap().target,
            Target::Pipeline
        );
        let bad = serde_json::json!({ "business": { "nothing": true } });
        let p = parse(&body(PIPELINE, bad), "m").unwrap_err();
        assert_eq!(p.kind, "invalid_input");
        assert_eq!(p.job_id.as_deref(), Some("job-1"));
    }

    #[test]
    fn poison_kinds_say_what_is_wrong() {
        assert_eq!(parse("{not json", "m").unwrap_err().kind, "not_json");
        let p = parse(&body("sparkle", serde_json::json!({})), "m").unwrap_err();
        assert_eq!(p.kind, "unknown_process");
        assert!(p.reason.contains("sparkle"), "{}", p.reason);
        let p = parse(&body("magicSpark", serde_json::json!({"x": 1})), "m").unwrap_err();
        assert_eq!(p.kind, "invalid_input");
        let p = parse(r#"{"messageType":"EMAIL_NOTIFICATION","jobId":"j"}"#, "m").unwrap_err();
        assert_eq!(p.kind, "wrong_type");
        assert_eq!(p.job_id.as_deref(), Some("j"));
    }

    #[test]
    fn the_message_id_names_a_job_without_job_id() {
        let mut msg: serde_json::Value = serde_json::from_str(&body(
            "magicSpark",
            agents::samples::sample_input(Process::MagicSpark, 3),
        ))
        .unwrap();
        msg.as_object_mut().unwrap().remove("jobId");
        let job = parse(&msg.to_string(), "sqs-message-id").unwrap();
        assert_eq!(job.job_id, "sqs-message-id");
    }
}
