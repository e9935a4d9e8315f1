//! The one row written per request (or per pipeline stage): usage, exact cost, timing, outcome.

use serde::{Deserialize, Serialize};

use crate::cost::Cost;
use crate::stream::Usage;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    Succeeded,
    Failed,
    Cancelled,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Succeeded => "succeeded",
            RequestStatus::Failed => "failed",
            RequestStatus::Cancelled => "cancelled",
        }
    }
}

/// One request as stored in the ledger, SQLite and DynamoDB (field names are the DynamoDB
/// attribute names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    /// UUID v7 (time-ordered), the idempotency key of every write.
    pub request_id: String,
    /// Unix milliseconds of the request's start.
    pub timestamp_ms: u64,
    pub user_id: String,
    /// Process key (`magicSpark`, …) or `"direct"`.
    pub process: String,
    pub provider: String,
    /// The model that answered, or the last one tried when none did.
    pub model: String,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    /// Exact cost; `cost_micro_usd` is derived from it (rounded half up).
    pub cost_pico_usd: u64,
    pub cost_micro_usd: u64,
    pub latency_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u64>,
    pub success: bool,
    pub status: RequestStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub fallback_used: bool,
    /// True when usage was estimated with the tokenizer (stream cut before the provider reported it).
    pub cost_estimated: bool,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

impl RequestRecord {
    /// A successful, zero-usage record started now with a fresh v7 id; refine it with the
    /// `with_*` methods.
    pub fn new(user_id: &str, process: &str, provider: &str, model: &str) -> RequestRecord {
        RequestRecord {
            request_id: uuid::Uuid::now_v7().to_string(),
            timestamp_ms: now_ms(),
            user_id: user_id.to_owned(),
            process: process.to_owned(),
            provider: provider.to_owned(),
            model: model.to_owned(),
            input_tokens: 0,
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: 0,
            cost_pico_usd: 0,
            cost_micro_usd: 0,
            latency_ms: 0,
            ttft_ms: None,
            success: true,
            status: RequestStatus::Succeeded,
            error_kind: None,
            error: None,
            fallback_used: false,
            cost_estimated: false,
            attempts: 1,
            run_id: None,
            stage: None,
            session_id: None,
        }
    }

    pub fn with_request_id(mut self, id: &str) -> Self {
        id.clone_into(&mut self.request_id);
        self
    }

    pub fn with_timestamp_ms(mut self, ms: u64) -> Self {
        self.timestamp_ms = ms;
        self
    }

    pub fn with_usage(mut self, usage: &Usage) -> Self {
        self.input_tokens = usage.input;
        self.cached_input_tokens = usage.cached_input;
        self.cache_write_tokens = usage.cache_write;
        self.output_tokens = usage.output;
        self
    }

    /// Sets the exact cost and its derived micro-dollar figure together so they cannot disagree.
    pub fn with_cost(mut self, cost: Cost) -> Self {
        self.cost_pico_usd = cost.pico_usd();
        self.cost_micro_usd = cost.micro_usd();
        self
    }

    pub fn with_latency(mut self, latency_ms: u64, ttft_ms: Option<u64>) -> Self {
        self.latency_ms = latency_ms;
        self.ttft_ms = ttft_ms;
        self
    }

    pub fn failed(mut self, kind: &str, error: &str) -> Self {
        self.success = false;
        self.status = RequestStatus::Failed;
        self.error_kind = Some(kind.to_owned());
        self.error = Some(error.to_owned());
        self
    }

    pub fn cancelled(mut self) -> Self {
        self.success = false;
        self.status = RequestStatus::Cancelled;
        self.error_kind = Some("cancelled".to_owned());
        self
    }

    pub fn with_attempts(mut self, attempts: u32, fallback_used: bool) -> Self {
        self.attempts = attempts;
        self.fallback_used = fallback_used;
        self
    }

    pub fn with_cost_estimated(mut self, estimated: bool) -> Self {
        self.cost_estimated = estimated;
        self
    }

    pub fn with_run(mut self, run_id: &str, stage: &str, session_id: Option<&str>) -> Self {
        self.run_id = Some(run_id.to_owned());
        self.stage = Some(stage.to_owned());
        self.session_id = session_id.map(str::to_owned);
        self
    }

    pub fn cost(&self) -> Cost {
        Cost(self.cost_pico_usd)
    }

    /// When the request ended (start + latency), the clock the rolling alert windows use.
    pub fn end_ms(&self) -> u64 {
        self.timestamp_ms.saturating_add(self.latency_ms)
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_camel_case_and_skips_absent_options() {
        let rec = RequestRecord::new("u1", "magicSpark", "openai", "gpt-4o-mini")
            .with_request_id("r1")
            .with_timestamp_ms(1_700_000_000_000)
            .with_cost(Cost(1_500_000))
            .with_latency(1200, Some(300));
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["requestId"], "r1");
        assert_eq!(json["costPicoUsd"], 1_500_000);
        assert_eq!(json["costMicroUsd"], 2, "1.5 micro-dollars round half up");
        assert_eq!(json["ttftMs"], 300);
        assert_eq!(json["status"], "succeeded");
        assert!(json.get("error").is_none());
        let back: RequestRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, rec);
    }

    #[test]
    fn new_ids_are_v7() {
        let rec = RequestRecord::new("u", "direct", "openai", "m");
        let id = uuid::Uuid::parse_str(&rec.request_id).unwrap();
        assert_eq!(id.get_version_num(), 7);
    }
}
