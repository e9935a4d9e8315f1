//! The AI-processing queue: long agent and pipeline work taken off the request path.
//!
//! Shape: the API calls [`enqueue`] (validate the input, write job state `queued`, send one
//! `AI_PROCESSING` message) and later [`job_status`]; a [`worker::Worker`] (alone as `keyvex
//! worker`, or inside the server) receives messages, claims the job in the [`JobStore`], runs it
//! through the same `Engine` as the API (every model call recorded with the job's caller, run
//! and stage), settles the job and deletes the message.
//!
//! Invariants:
//! - SQS delivers at least once; the job store's conditional writes make the effect exactly once
//!   (`jobs` explains the claim/settle conditions). Workers share nothing in process: any number
//!   of them may poll one queue.
//! - A bad input is refused at [`enqueue`] (HTTP 400) and never becomes a message; a message that
//!   is still unrunnable (another producer, a bad hand-sent body) is a poison message, marked
//!   `failed` and moved to the DLQ at once, never retried.
//! - Job state lives next to the metrics (`keyvex_store::jobs`): the `jobs` table of the SQLite
//!   metrics file, or the single DynamoDB table as `PK=JOB#{jobId}`, `SK=STATE`
//!   (`GSI1PK=USER#{userId}`, `GSI1SK=JOB#{createdAt}`, `ttl` 30 days). `queue` never touches
//!   the HTTP routes.

pub mod admin;
pub mod message;
pub mod worker;

use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use serde::Serialize;

use keyvex_engine::clock::now_ms;
pub use keyvex_store::jobs::{JobRecord, JobStatus, JobStore};
use keyvex_store::{AwsTimeouts, StoreError};

pub use message::{Priority, Target};

/// Errors of the queue boundary. `http_status` is what an API handler should answer.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the job request is invalid: {0}")]
    InvalidRequest(String),
    #[error("SQS {operation} failed: {message}")]
    Sqs {
        operation: &'static str,
        message: String,
        /// Throttling, timeouts, an unreachable endpoint: trying again later can work.
        retryable: bool,
    },
    /// SQS did not answer within the client's timeouts (an endpoint that accepts and stays
    /// silent, a network black hole). Transient.
    #[error(
        "SQS {operation} timed out: {message}; the endpoint did not answer within the client's connect, attempt or operation timeout; check the SQS endpoint and the network"
    )]
    Timeout {
        operation: &'static str,
        message: String,
    },
    #[error(
        "queue {name} already exists with different attributes ({message}); delete it or create it by hand with visibility {visibility_secs} s"
    )]
    QueueMismatch {
        name: String,
        visibility_secs: u64,
        message: String,
    },
    #[error("job store: {0}")]
    Store(#[from] StoreError),
    #[error("could not encode the queue message: {0}")]
    Encode(#[from] serde_json::Error),
}

impl QueueError {
    pub fn http_status(&self) -> http::StatusCode {
        match self {
            QueueError::InvalidRequest(_) => http::StatusCode::BAD_REQUEST,
            QueueError::Sqs { .. } | QueueError::Timeout { .. } | QueueError::Store(_) => {
                http::StatusCode::SERVICE_UNAVAILABLE
            }
            _ => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            QueueError::Sqs { retryable, .. } => *retryable,
            QueueError::Timeout { .. } => true,
            QueueError::Store(e) => e.is_retryable(),
            _ => false,
        }
    }

    pub(crate) fn sqs<E, R>(operation: &'static str, err: &SdkError<E, R>) -> QueueError
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
        R: std::fmt::Debug,
    {
        if keyvex_store::aws::is_timeout(err) {
            return QueueError::Timeout {
                operation,
                message: DisplayErrorContext(err).to_string(),
            };
        }
        let retryable = match err {
            SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
            SdkError::ServiceError(e) => matches!(
                e.err().code(),
                Some(
                    "ThrottlingException"
                        | "RequestThrottled"
                        | "ServiceUnavailable"
                        | "InternalError"
                        | "InternalFailure"
                        | "KmsThrottled"
                )
            ),
            _ => false,
        };
        QueueError::Sqs {
            operation,
            message: DisplayErrorContext(err).to_string(),
            retryable,
        }
    }
}

/// Where the queue is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    pub queue_url: String,
    /// `None`: read from the queue's `RedrivePolicy` when needed.
    pub dlq_url: Option<String>,
    /// An emulator's endpoint (moto); `None` is AWS.
    pub endpoint: Option<String>,
    /// Of every SQS call; a long poll gets its wait time on top (see [`client`]).
    pub timeouts: AwsTimeouts,
    pub concurrency: usize,
}

/// An SQS client for `endpoint` (an emulator) or AWS, with `timeouts`; region and credentials
/// come from the standard AWS variables.
///
/// A `ReceiveMessage` long poll is held open by SQS for up to its wait time (20 s at most), so
/// the client-wide timeouts would cut it: the worker gives each receive the client's timeouts
/// plus its wait time, per operation.
pub async fn client(endpoint: Option<&str>, timeouts: &AwsTimeouts) -> aws_sdk_sqs::Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    configure(&shared, endpoint, timeouts)
}

/// An SQS client on `shared` (region, credentials, retry settings) for `endpoint` with
/// `timeouts`.
pub fn configure(
    shared: &SdkConfig,
    endpoint: Option<&str>,
    timeouts: &AwsTimeouts,
) -> aws_sdk_sqs::Client {
    let mut config =
        aws_sdk_sqs::config::Builder::from(shared).timeout_config(timeouts.timeout_config());
    if let Some(url) = endpoint {
        config = config.endpoint_url(url);
    }
    aws_sdk_sqs::Client::from_conf(config.build())
}

/// What `enqueue` and `job_status` need: the queue and the job store.
#[derive(Clone)]
pub struct JobsCtx {
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
    pub jobs: JobStore,
}

impl JobsCtx {
    /// The queue at `config` (an SQS client for its endpoint) over `jobs`.
    pub async fn connect(config: &QueueConfig, jobs: JobStore) -> JobsCtx {
        JobsCtx {
            sqs: client(config.endpoint.as_deref(), &config.timeouts).await,
            queue_url: config.queue_url.clone(),
            jobs,
        }
    }
}

/// A job as the API submits it (`POST /v1/jobs` body).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobRequest {
    /// An agent's process key or slug, or `pipeline`.
    #[serde(alias = "process")]
    pub target: String,
    pub input: serde_json::Value,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub session_id: Option<String>,
}

/// The answer to a submission (HTTP 202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobAccepted {
    pub job_id: String,
    pub status: JobStatus,
}

/// A job as the API shows it (`GET /v1/jobs/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub id: String,
    pub process: String,
    pub status: JobStatus,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub cost_usd: f64,
    pub cost_micro_usd: u64,
    /// SQS receives of the latest claiming delivery.
    pub attempts: u32,
    /// Times a worker started running the job (1 unless a run was retried or taken over).
    pub runs: u32,
    pub queue_latency_ms: Option<u64>,
    /// RFC 3339 UTC.
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

impl JobView {
    pub fn of(rec: &JobRecord) -> JobView {
        let ts = keyvex_store::iso_ts;
        JobView {
            id: rec.job_id.clone(),
            process: rec.process.clone(),
            status: rec.status,
            result: rec.result.clone(),
            error: rec.error.clone(),
            cost_usd: rec.cost.usd(),
            cost_micro_usd: rec.cost.micro_usd(),
            attempts: rec.attempts,
            runs: rec.runs,
            queue_latency_ms: rec.queue_latency_ms,
            created_at: ts(rec.created_at_ms),
            started_at: rec.started_at_ms.map(ts),
            finished_at: rec.finished_at_ms.map(ts),
        }
    }
}

/// Validates the request, writes the job as `queued`, then sends its message. The state is
/// written first so a worker never receives a message for a job it cannot find; if the send
/// fails the job is left `queued` with no message and the error goes back to the caller (who
/// retries with a new job).
pub async fn enqueue(
    ctx: &JobsCtx,
    caller_id: &str,
    request: JobRequest,
) -> Result<JobAccepted, QueueError> {
    let target = Target::parse(&request.target).map_err(QueueError::InvalidRequest)?;
    message::validate_input(target, &request.input).map_err(QueueError::InvalidRequest)?;
    if caller_id.trim().is_empty() {
        return Err(QueueError::InvalidRequest(
            "the caller id is empty; authenticate the request first".into(),
        ));
    }
    let job_id = uuid::Uuid::now_v7().to_string();
    let now = now_ms();
    let rec = JobRecord::queued(
        &job_id,
        caller_id,
        target.key(),
        request.priority.as_str(),
        request.session_id.as_deref(),
        now,
    );
    ctx.jobs.create(&rec).await?;
    let body = serde_json::to_string(&message::AiProcessingMessage {
        message_type: message::MESSAGE_TYPE.to_owned(),
        job_id: Some(job_id.clone()),
        session_id: request.session_id,
        user_id: caller_id.to_owned(),
        process: target.key().to_owned(),
        input: request.input,
        priority: request.priority,
        timestamp: now,
    })?;
    ctx.sqs
        .send_message()
        .queue_url(&ctx.queue_url)
        .message_body(body)
        .send()
        .await
        .map_err(|e| QueueError::sqs("SendMessage", &e))?;
    tracing::info!(job_id, process = %target, caller_id, "job enqueued");
    Ok(JobAccepted {
        job_id,
        status: JobStatus::Queued,
    })
}

/// The job's current state, or `None` when no such job exists.
pub async fn job_status(ctx: &JobsCtx, job_id: &str) -> Result<Option<JobView>, QueueError> {
    Ok(ctx.jobs.get(job_id).await?.as_ref().map(JobView::of))
}

/// Whole seconds for an SQS visibility timeout, clamped to SQS's 0..=43 200 range.
pub(crate) fn visibility_secs(d: Duration) -> i32 {
    d.as_secs().min(43_200) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_request_defaults_priority_and_rejects_unknown_fields() {
        let r: JobRequest = serde_json::from_str(r#"{"target":"pipeline","input":{}}"#).unwrap();
        assert_eq!(r.priority, Priority::Normal);
        assert!(
            serde_json::from_str::<JobRequest>(r#"{"target":"x","input":{},"nope":1}"#).is_err()
        );
    }

    #[test]
    fn invalid_requests_are_400() {
        assert_eq!(
            QueueError::InvalidRequest("x".into()).http_status(),
            http::StatusCode::BAD_REQUEST
        );
    }
}
