//! What the engine hands over for every model call and every session message, and the trait it
//! hands them to.
//!
//! A [`RequestRecord`] is the one row written per routed model call (usage, exact cost, timing,
//! outcome); a [`SessionMessage`] is one input or output of an agent run made with a session id.
//! The engine never stores either itself: it gives them to a [`Recorder`] (the metrics ledger of
//! `keyvex-store`, or anything an embedding program supplies) and gets a [`Receipt`] back that
//! resolves once the recorder has made the entry durable. A leaf of the crate's module graph:
//! stores and servers name these types without pulling in the router.

use std::fmt;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::budgets::HeldSpend;
use crate::clock::now_ms;
use crate::cost::Cost;
use crate::provider::Role;
use crate::stream::Usage;

/// How a model call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    Succeeded,
    Failed,
    Cancelled,
    /// This call failed and its request went on to another call (a retry or the fallback):
    /// billed here, but the request's outcome is in its last record.
    Retried,
    /// The process stopped (a crash, `kill -9`, a lost machine) while this call was in flight,
    /// so its own record was never written: written later from the call's [`CallIntent`], with
    /// the prompt billed as estimated and the output as nothing (`costEstimated`). A request's
    /// last record, counted as a failed request.
    Interrupted,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Succeeded => "succeeded",
            RequestStatus::Failed => "failed",
            RequestStatus::Cancelled => "cancelled",
            RequestStatus::Retried => "retried",
            RequestStatus::Interrupted => "interrupted",
        }
    }

    /// Whether this is the last call of its request (every status but `Retried`): counting
    /// these counts requests, and their statuses are the requests' outcomes.
    pub fn is_final(self) -> bool {
        self != RequestStatus::Retried
    }

    /// Whether the request failed: `failed`, or `interrupted` (its process stopped under it).
    /// Cancelled requests are not failures: their caller went away.
    pub fn is_failure(self) -> bool {
        matches!(self, RequestStatus::Failed | RequestStatus::Interrupted)
    }
}

/// One model call as stored in the ledger, SQLite and DynamoDB (field names are the DynamoDB
/// attribute names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    /// UUID v7 (time-ordered), drawn by the engine for every call: the idempotency key of every
    /// write. Never taken from a client, so two calls can never share a record.
    pub request_id: String,
    /// What the caller correlates the call with: the HTTP request id (the client's
    /// `x-request-id` or the one the server drew), or the job id of a queued job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Unix milliseconds of the call's start.
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
    /// This call went to a model other than its request's first choice.
    pub fallback_used: bool,
    /// True when usage was estimated with the tokenizer (stream cut before the provider reported it).
    pub cost_estimated: bool,
    /// Calls its request had made when this record was written: on a request's last record the
    /// total (each call has its own record; 0 when every model was skipped without a call, which
    /// still leaves this one failed record); on a `retried` record, written when the next call
    /// starts, its own position.
    pub attempts: u32,
    /// This call's 1-based position among them (0 for a request that made no call).
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// The answer was complete but its stream ended without the provider's terminator.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unterminated: bool,
    /// The models whose streams broke after content and which this call's answer rescued (by
    /// restarting or continuing it), in order; empty for an answer that never broke. The broken
    /// calls have their own `retried` records, billed with what they delivered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rescued_from: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The model catalog version whose prices costed the call (0: the catalog the process
    /// started with; records written before versions existed read as 0).
    #[serde(default)]
    pub catalog_version: u64,
    /// The OpenTelemetry trace id (32 hex digits) of the request the call served, when traces
    /// were exported; records written before traces existed, or with export off, have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl RequestRecord {
    /// A successful, zero-usage record started now with a fresh v7 id; refine it with the
    /// `with_*` methods.
    pub fn new(user_id: &str, process: &str, provider: &str, model: &str) -> RequestRecord {
        RequestRecord {
            request_id: uuid::Uuid::now_v7().to_string(),
            correlation_id: None,
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
            attempt: 1,
            unterminated: false,
            rescued_from: Vec::new(),
            run_id: None,
            stage: None,
            session_id: None,
            catalog_version: 0,
            trace_id: None,
        }
    }

    pub fn with_catalog_version(mut self, version: u64) -> Self {
        self.catalog_version = version;
        self
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

    /// This call failed and its request went on to another call.
    pub fn retried(mut self, kind: &str, error: &str) -> Self {
        self.success = false;
        self.status = RequestStatus::Retried;
        self.error_kind = Some(kind.to_owned());
        self.error = Some(error.to_owned());
        self
    }

    /// This call's process stopped while it was in flight (see [`RequestStatus::Interrupted`]).
    pub fn interrupted(mut self, error: &str) -> Self {
        self.success = false;
        self.status = RequestStatus::Interrupted;
        self.error_kind = Some("interrupted".to_owned());
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

    /// When the call ended (start + latency), the clock the rolling alert windows use.
    pub fn end_ms(&self) -> u64 {
        self.timestamp_ms.saturating_add(self.latency_ms)
    }
}

fn first_attempt() -> u32 {
    1
}

/// One message of a session: an agent's input (`user`) or validated output (`assistant`), as
/// recorded, stored and returned by the session routes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionMessage {
    pub session_id: String,
    /// UUID v7, the idempotency key of the message.
    pub message_id: String,
    pub user_id: String,
    /// Unix milliseconds; messages are ordered by `(timestamp_ms, message_id)`.
    pub timestamp_ms: u64,
    pub role: Role,
    /// Process key (`magicSpark`, …) or `"direct"`.
    pub process: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The input or output as JSON (agents' inputs and outputs are JSON objects; plain text is a
    /// JSON string).
    #[serde(default)]
    pub content: serde_json::Value,
    /// The correlation id of the call that wrote it (the HTTP request id or the job id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

impl SessionMessage {
    /// A message stamped now with a fresh v7 id; refine it with the `with_*` methods.
    pub fn new(
        session_id: &str,
        user_id: &str,
        role: Role,
        process: &str,
        content: serde_json::Value,
    ) -> SessionMessage {
        SessionMessage {
            session_id: session_id.to_owned(),
            message_id: uuid::Uuid::now_v7().to_string(),
            user_id: user_id.to_owned(),
            timestamp_ms: now_ms(),
            role,
            process: process.to_owned(),
            stage: None,
            content,
            request_id: None,
            run_id: None,
        }
    }

    pub fn with_message_id(mut self, id: &str) -> Self {
        id.clone_into(&mut self.message_id);
        self
    }

    pub fn with_timestamp_ms(mut self, ms: u64) -> Self {
        self.timestamp_ms = ms;
        self
    }

    pub fn with_request(mut self, request_id: &str) -> Self {
        self.request_id = Some(request_id.to_owned());
        self
    }

    pub fn with_run(mut self, run_id: &str, stage: &str) -> Self {
        self.run_id = Some(run_id.to_owned());
        self.stage = Some(stage.to_owned());
        self
    }

    /// The order of messages within a session: time, then id.
    pub fn order_key(&self) -> (u64, &str) {
        (self.timestamp_ms, &self.message_id)
    }
}

/// Why a [`Receipt`] did not resolve to "durable".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the recorder is shut down; records are no longer accepted")]
    Closed,
    #[error(
        "the recorder stopped before committing this entry (it panicked or the runtime is shutting down)"
    )]
    Lost,
}

/// Resolves once the recorder has made an entry durable. Dropping it does not cancel anything:
/// the entry is committed either way.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use keyvex_engine::{Receipt, RecordError};
///
/// // A recorder that commits later hands out the receipt and keeps the commit.
/// let (commit, receipt) = Receipt::pending();
/// commit.done();
/// assert_eq!(receipt.durable().await, Ok(()));
/// // Several entries (a run's session messages) resolve together; the first failure wins.
/// let all = Receipt::all(vec![Receipt::durable_now(), Receipt::refused(RecordError::Closed)]);
/// assert_eq!(all.durable().await, Err(RecordError::Closed));
/// # }
/// ```
pub struct Receipt(ReceiptState);

enum ReceiptState {
    Waiting(oneshot::Receiver<()>),
    Ready(Result<(), RecordError>),
    All(Vec<Receipt>),
}

/// The recorder's side of a [`Receipt`]: send it once the entry is durable.
pub struct Commit(oneshot::Sender<()>);

impl Commit {
    /// The entry is durable: resolves the receipt (a receipt nobody waits for is fine).
    pub fn done(self) {
        let _ = self.0.send(());
    }
}

impl Receipt {
    /// A receipt and the commit that resolves it. Dropping the commit unsent resolves the
    /// receipt to [`RecordError::Lost`].
    pub fn pending() -> (Commit, Receipt) {
        let (tx, rx) = oneshot::channel();
        (Commit(tx), Receipt(ReceiptState::Waiting(rx)))
    }

    /// An entry that is durable already (a recorder that writes synchronously).
    pub fn durable_now() -> Receipt {
        Receipt(ReceiptState::Ready(Ok(())))
    }

    /// An entry the recorder did not accept.
    pub fn refused(error: RecordError) -> Receipt {
        Receipt(ReceiptState::Ready(Err(error)))
    }

    /// Resolves once every one of `receipts` has; the first failure wins.
    pub fn all(receipts: Vec<Receipt>) -> Receipt {
        Receipt(ReceiptState::All(receipts))
    }

    /// Nothing to wait for.
    pub fn none() -> Receipt {
        Receipt::all(Vec::new())
    }

    pub fn durable(self) -> BoxFuture<'static, Result<(), RecordError>> {
        Box::pin(async move {
            match self.0 {
                ReceiptState::Waiting(rx) => rx.await.map_err(|_| RecordError::Lost),
                ReceiptState::Ready(result) => result,
                ReceiptState::All(receipts) => {
                    for receipt in receipts {
                        receipt.durable().await?;
                    }
                    Ok(())
                }
            }
        })
    }
}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            ReceiptState::Waiting(_) => f.write_str("Receipt(waiting)"),
            ReceiptState::Ready(r) => write!(f, "Receipt({r:?})"),
            ReceiptState::All(all) => write!(f, "Receipt(all of {})", all.len()),
        }
    }
}

/// An entry handed to the recorder: its key, and what resolves once it is durable.
#[derive(Debug)]
pub struct Recorded {
    /// The record's `request_id` (or the message's `message_id`).
    pub id: String,
    pub receipt: Receipt,
}

/// What a [`Recorder`] achieved when it was shut down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Every accepted entry reached durable storage.
    pub ledger_flushed: bool,
    /// Entries shipped to the final store during this process's life.
    pub shipped: u64,
    /// Entries still waiting in local storage, shipped by the next start (never dropped).
    pub left_in_ledger: u64,
    /// Entries the store refused permanently during this process's life (set aside).
    pub dead_lettered: u64,
    /// Entries set aside at shutdown, including earlier runs'; kept until an operator requeues
    /// them.
    pub dead_letters: u64,
    pub deadline_hit: bool,
}

/// A model call at its start, before its outcome is known: what a recorder keeps so that a call
/// whose process stops before the call's own record is written is still recorded.
///
/// `record` is the record to write in that case: status `interrupted`, the same `requestId` the
/// call's own record will have (so the two are one entry, and whichever is written last of the
/// same id never doubles it), dated like that record would be (from its request's first call),
/// with the prompt billed as estimated and no output (`costEstimated`). A call that fails while
/// its request goes on is handed over again with what it really used and cost, still as
/// `interrupted`: should the process stop before the next call, that is what it cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallIntent {
    pub record: RequestRecord,
    /// Unix milliseconds of this call's own start (a `retried` record is dated from it, the
    /// request's last record from the request's first call).
    pub call_started_ms: u64,
    /// The call's dollar reservation, when it outlives the process (budgets in Redis): the
    /// process that records the call `interrupted` settles it to the record's cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend: Option<HeldSpend>,
}

/// Where the engine hands every call record and session message. `record` and
/// `record_message` are called on the request path (and from `Drop` when a caller abandons a
/// stream): they must not block or await I/O — queue the entry and resolve the receipt later.
pub trait Recorder: Send + Sync + 'static {
    /// Takes one model call's record.
    fn record(&self, record: RequestRecord) -> Receipt;

    /// Takes one session message.
    fn record_message(&self, message: SessionMessage) -> Receipt;

    /// Takes the intent of a model call about to be sent (and again, updated, when it failed and
    /// its request goes on). Called on the request path before the call goes out: queue it,
    /// never wait for it. The engine hands a call's intents over before the call's record, on
    /// the same task; a recorder that keeps intents must keep that order, and treat the record
    /// as the end of the intent with the same id. Recorders that cannot outlive their process
    /// (in memory, printing) have nothing to recover and keep the default, which drops it.
    fn record_intent(&self, intent: CallIntent) {
        let _ = intent;
    }

    /// Makes everything accepted durable (and shipped, if the recorder ships) before `deadline`,
    /// then refuses new entries. Called once, by [`crate::Engine::shutdown`].
    fn shutdown(&self, deadline: tokio::time::Instant) -> BoxFuture<'_, ShutdownReport> {
        let _ = deadline;
        Box::pin(async {
            ShutdownReport {
                ledger_flushed: true,
                ..ShutdownReport::default()
            }
        })
    }
}

/// Told about every call record before it goes to the [`Recorder`] (Prometheus counters, logs).
/// Called on the request path and from `Drop`: keep it cheap and non-blocking.
pub trait CallObserver: Send + Sync + 'static {
    fn on_record(&self, record: &RequestRecord);
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
        assert!(json.get("correlationId").is_none());
        // Rows written before traces existed (or with export off) have no traceId.
        assert!(json.get("traceId").is_none());
        let back: RequestRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, rec);
        let mut traced = rec.clone();
        traced.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
        let json = serde_json::to_value(&traced).unwrap();
        assert_eq!(json["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            serde_json::from_value::<RequestRecord>(json).unwrap(),
            traced
        );
    }

    #[test]
    fn new_ids_are_v7() {
        let rec = RequestRecord::new("u", "direct", "openai", "m");
        let id = uuid::Uuid::parse_str(&rec.request_id).unwrap();
        assert_eq!(id.get_version_num(), 7);
    }

    #[tokio::test]
    async fn receipts_resolve_lose_and_combine() {
        let (commit, receipt) = Receipt::pending();
        commit.done();
        assert_eq!(receipt.durable().await, Ok(()));

        let (commit, receipt) = Receipt::pending();
        drop(commit);
        assert_eq!(receipt.durable().await, Err(RecordError::Lost));

        let (commit, waiting) = Receipt::pending();
        let all = Receipt::all(vec![Receipt::durable_now(), waiting]);
        commit.done();
        assert_eq!(all.durable().await, Ok(()));
        let all = Receipt::all(vec![
            Receipt::durable_now(),
            Receipt::refused(RecordError::Closed),
        ]);
        assert_eq!(all.durable().await, Err(RecordError::Closed));
        assert_eq!(Receipt::none().durable().await, Ok(()));
    }
}
