//! Job state: one record per job in SQLite (a `jobs` table in the metrics file) or DynamoDB
//! (`PK=JOB#{id}`, `SK=STATE`), moved between states only by conditional writes.
//!
//! The conditions are what make the worker exactly-once in effect while SQS is at-least-once:
//! - `claim` moves `queued` → `running` (or takes over a `running` job whose lease lapsed, i.e.
//!   a worker that died) and stamps a fresh claim token; a second delivery finds the job busy
//!   or finished and does not run it.
//! - `settle` writes the outcome only while the job is `running` under the caller's token, so a
//!   worker that lost its claim cannot overwrite the result of the one that took over.
//! - `extend` (the heartbeat) renews the lease under the same token.
//!
//! SQLite does each transition in one transaction that checks the status; DynamoDB uses
//! `ConditionExpression`, where `ConditionalCheckFailedException` means "someone else got there".

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::Client as DynamoClient;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use keyvex_engine::cost::Cost;
use keyvex_engine::text::truncate_chars;

use crate::entry::{StoreError, iso_ts};

/// Jobs are kept 30 days in DynamoDB (`ttl`), like request metrics.
const JOB_TTL_SECS: u64 = 30 * 86_400;
/// Keeps a long error text (every attempt listed) well under DynamoDB's 400 KB item limit.
const MAX_ERROR_CHARS: usize = 4_096;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    DeadLettered,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::DeadLettered => "dead-lettered",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::DeadLettered,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// No further transition happens (the job will not run again).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::DeadLettered
        )
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job's stored state.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub job_id: String,
    pub user_id: String,
    /// Agent process key or `pipeline`.
    pub process: String,
    pub priority: String,
    pub session_id: Option<String>,
    pub status: JobStatus,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    /// Everything the job's model calls cost, failed attempts included.
    pub cost: Cost,
    /// The SQS receive count of the latest delivery that claimed the job.
    pub attempts: u32,
    /// How many times a worker claimed the job and started running it.
    pub runs: u32,
    pub created_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// From enqueue to the first start.
    pub queue_latency_ms: Option<u64>,
    pub claim_token: Option<String>,
    pub lease_until_ms: Option<u64>,
}

impl JobRecord {
    /// A new `queued` job.
    pub fn queued(
        job_id: &str,
        user_id: &str,
        process: &str,
        priority: &str,
        session_id: Option<&str>,
        created_at_ms: u64,
    ) -> JobRecord {
        JobRecord {
            job_id: job_id.to_owned(),
            user_id: user_id.to_owned(),
            process: process.to_owned(),
            priority: priority.to_owned(),
            session_id: session_id.map(str::to_owned),
            status: JobStatus::Queued,
            result: None,
            error: None,
            cost: Cost::ZERO,
            attempts: 0,
            runs: 0,
            created_at_ms,
            started_at_ms: None,
            finished_at_ms: None,
            queue_latency_ms: None,
            claim_token: None,
            lease_until_ms: None,
        }
    }
}

/// A worker asking to run a job.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub job_id: String,
    /// Unique per delivery; only its holder may extend or settle.
    pub token: String,
    pub now_ms: u64,
    pub lease_until_ms: u64,
    pub receive_count: u32,
    pub queue_latency_ms: u64,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "one short-lived value per delivery; boxing buys nothing"
)]
pub enum Claim {
    /// The caller now owns the job (the record after the claim).
    Claimed(JobRecord),
    /// Another worker holds a live lease.
    Busy { lease_until_ms: u64 },
    /// The job already ended; nothing to run.
    Finished(JobStatus),
    /// No such job in the store.
    Missing,
}

/// The outcome a claim holder writes.
#[derive(Debug, Clone)]
pub struct Settle {
    /// `Queued` hands the job back for a retry; the others end it.
    pub status: JobStatus,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    /// This run's cost, added to the job's total.
    pub cost: Cost,
    pub now_ms: u64,
}

/// The job state store: the same transitions over either backend.
#[derive(Clone)]
pub enum JobStore {
    Sqlite(SqliteJobs),
    Dynamo(DynamoJobs),
}

impl JobStore {
    pub fn name(&self) -> &'static str {
        match self {
            JobStore::Sqlite(_) => "sqlite",
            JobStore::Dynamo(_) => "dynamodb",
        }
    }

    /// Writes a new record; `false` when the job already exists (left unchanged).
    pub async fn create(&self, rec: &JobRecord) -> Result<bool, StoreError> {
        match self {
            JobStore::Sqlite(s) => s.create(rec.clone()).await,
            JobStore::Dynamo(d) => d.create(rec).await,
        }
    }

    pub async fn get(&self, job_id: &str) -> Result<Option<JobRecord>, StoreError> {
        match self {
            JobStore::Sqlite(s) => s.get(job_id.to_owned()).await,
            JobStore::Dynamo(d) => d.get(job_id).await,
        }
    }

    /// `queued` (or `running` with a lapsed lease) → `running` under `req.token`.
    pub async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        match self {
            JobStore::Sqlite(s) => s.claim(req.clone()).await,
            JobStore::Dynamo(d) => d.claim(req).await,
        }
    }

    /// Renews the lease; `false` when the caller no longer holds the claim.
    pub async fn extend(
        &self,
        job_id: &str,
        token: &str,
        lease_until_ms: u64,
    ) -> Result<bool, StoreError> {
        match self {
            JobStore::Sqlite(s) => {
                s.extend(job_id.to_owned(), token.to_owned(), lease_until_ms)
                    .await
            }
            JobStore::Dynamo(d) => d.extend(job_id, token, lease_until_ms).await,
        }
    }

    /// Writes the outcome of a run; `false` when the caller no longer holds the claim (then
    /// nothing is written).
    pub async fn settle(
        &self,
        job_id: &str,
        token: &str,
        settle: &Settle,
    ) -> Result<bool, StoreError> {
        let mut settle = settle.clone();
        if let Some(e) = settle.error.as_mut() {
            truncate_chars(e, MAX_ERROR_CHARS);
        }
        match self {
            JobStore::Sqlite(s) => s.settle(job_id.to_owned(), token.to_owned(), settle).await,
            JobStore::Dynamo(d) => d.settle(job_id, token, &settle).await,
        }
    }

    /// Marks a job that cannot run (poison message) as `failed` without a claim, creating the
    /// record when the job is unknown. A job that already succeeded is left alone.
    pub async fn reject(&self, rec: &JobRecord) -> Result<bool, StoreError> {
        let mut rec = rec.clone();
        rec.status = JobStatus::Failed;
        if let Some(e) = rec.error.as_mut() {
            truncate_chars(e, MAX_ERROR_CHARS);
        }
        match self {
            JobStore::Sqlite(s) => s.reject(rec).await,
            JobStore::Dynamo(d) => d.reject(&rec).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite

/// Jobs in a `jobs` table of an SQLite file (the metrics file by default). Each worker opens
/// its own connection; WAL and the busy timeout let several processes share the file.
#[derive(Clone)]
pub struct SqliteJobs {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

const JOB_COLUMNS: &str = "job_id, user_id, process, priority, session_id, status, result, error, cost_pico_usd, attempts, runs, created_at_ms, started_at_ms, finished_at_ms, queue_latency_ms, claim_token, lease_until_ms";

impl SqliteJobs {
    pub fn open(path: &Path) -> Result<SqliteJobs, StoreError> {
        // FULL (SQLite's default, kept): a claim must not be forgotten by a power loss.
        let conn = crate::sqlite::open_tables(
            path,
            "FULL",
            "CREATE TABLE IF NOT EXISTS jobs (
                job_id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL,
                process TEXT NOT NULL,
                priority TEXT NOT NULL,
                session_id TEXT,
                status TEXT NOT NULL,
                result TEXT,
                error TEXT,
                cost_pico_usd INTEGER NOT NULL DEFAULT 0,
                attempts INTEGER NOT NULL DEFAULT 0,
                runs INTEGER NOT NULL DEFAULT 0,
                created_at_ms INTEGER NOT NULL,
                started_at_ms INTEGER,
                finished_at_ms INTEGER,
                queue_latency_ms INTEGER,
                claim_token TEXT,
                lease_until_ms INTEGER
             );
             CREATE INDEX IF NOT EXISTS jobs_by_user ON jobs (user_id, created_at_ms);",
        )?;
        Ok(SqliteJobs {
            path: path.to_owned(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        crate::sqlite::run_blocking(&self.conn, &self.path, f).await
    }

    async fn create(&self, rec: JobRecord) -> Result<bool, StoreError> {
        self.run(move |c| insert(c, &rec, "INSERT OR IGNORE")).await
    }

    async fn get(&self, job_id: String) -> Result<Option<JobRecord>, StoreError> {
        self.run(move |c| select(c, &job_id)).await?.transpose()
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Claim, StoreError> {
        self.run(move |c| {
            // IMMEDIATE takes the write lock first, so the check and the update see one state
            // even when several processes share the file.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let found: Option<(String, Option<i64>)> = tx
                .query_row(
                    "SELECT status, lease_until_ms FROM jobs WHERE job_id = ?1",
                    params![req.job_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((status, lease)) = found else {
                return Ok(Ok(Claim::Missing));
            };
            let status = JobStatus::parse(&status).unwrap_or(JobStatus::Failed);
            let lease = lease.unwrap_or(0).max(0) as u64;
            match status {
                s if s.is_terminal() => return Ok(Ok(Claim::Finished(s))),
                JobStatus::Running if lease > req.now_ms => {
                    return Ok(Ok(Claim::Busy {
                        lease_until_ms: lease,
                    }));
                }
                _ => {}
            }
            tx.execute(
                "UPDATE jobs SET status = 'running', claim_token = ?2, lease_until_ms = ?3,
                   attempts = ?4, runs = runs + 1,
                   started_at_ms = COALESCE(started_at_ms, ?5),
                   queue_latency_ms = COALESCE(queue_latency_ms, ?6)
                 WHERE job_id = ?1",
                params![
                    req.job_id,
                    req.token,
                    req.lease_until_ms as i64,
                    req.receive_count,
                    req.now_ms as i64,
                    req.queue_latency_ms as i64
                ],
            )?;
            let rec = select(&tx, &req.job_id)?;
            tx.commit()?;
            Ok(match rec {
                Some(Ok(rec)) => Ok(Claim::Claimed(rec)),
                Some(Err(e)) => Err(e),
                None => Ok(Claim::Missing),
            })
        })
        .await?
    }

    async fn extend(
        &self,
        job_id: String,
        token: String,
        lease_until_ms: u64,
    ) -> Result<bool, StoreError> {
        self.run(move |c| {
            let n = c.execute(
                "UPDATE jobs SET lease_until_ms = ?3
                 WHERE job_id = ?1 AND status = 'running' AND claim_token = ?2",
                params![job_id, token, lease_until_ms as i64],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn settle(&self, job_id: String, token: String, s: Settle) -> Result<bool, StoreError> {
        let result = s.result.as_ref().map(serde_json::Value::to_string);
        let ends = s.status != JobStatus::Queued;
        self.run(move |c| {
            let n = c.execute(
                "UPDATE jobs SET status = ?3, result = COALESCE(?4, result), error = ?5,
                   cost_pico_usd = cost_pico_usd + ?6,
                   finished_at_ms = CASE WHEN ?7 THEN ?8 ELSE finished_at_ms END,
                   claim_token = NULL, lease_until_ms = NULL
                 WHERE job_id = ?1 AND status = 'running' AND claim_token = ?2",
                params![
                    job_id,
                    token,
                    s.status.as_str(),
                    result,
                    s.error,
                    s.cost.pico_usd() as i64,
                    ends,
                    s.now_ms as i64
                ],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn reject(&self, rec: JobRecord) -> Result<bool, StoreError> {
        self.run(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let inserted = insert(&tx, &rec, "INSERT OR IGNORE")?;
            let n = if inserted {
                1
            } else {
                tx.execute(
                    "UPDATE jobs SET status = 'failed', error = ?2, finished_at_ms = ?3,
                       claim_token = NULL, lease_until_ms = NULL
                     WHERE job_id = ?1 AND status <> 'succeeded'",
                    params![rec.job_id, rec.error, rec.finished_at_ms.map(|v| v as i64)],
                )?
            };
            tx.commit()?;
            Ok(n == 1)
        })
        .await
    }
}

fn insert(c: &Connection, rec: &JobRecord, verb: &str) -> Result<bool, rusqlite::Error> {
    let sql = format!(
        "{verb} INTO jobs ({JOB_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
    );
    let n = c.prepare_cached(&sql)?.execute(params![
        rec.job_id,
        rec.user_id,
        rec.process,
        rec.priority,
        rec.session_id,
        rec.status.as_str(),
        rec.result.as_ref().map(serde_json::Value::to_string),
        rec.error,
        rec.cost.pico_usd() as i64,
        rec.attempts,
        rec.runs,
        rec.created_at_ms as i64,
        rec.started_at_ms.map(|v| v as i64),
        rec.finished_at_ms.map(|v| v as i64),
        rec.queue_latency_ms.map(|v| v as i64),
        rec.claim_token,
        rec.lease_until_ms.map(|v| v as i64),
    ])?;
    Ok(n == 1)
}

/// The row, decoded; the inner error is a stored value that no longer decodes.
fn select(
    c: &Connection,
    job_id: &str,
) -> Result<Option<Result<JobRecord, StoreError>>, rusqlite::Error> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?1");
    c.query_row(&sql, params![job_id], |r| {
        let opt_u64 = |i: usize| -> Result<Option<u64>, rusqlite::Error> {
            Ok(r.get::<_, Option<i64>>(i)?.map(|v| v.max(0) as u64))
        };
        let status: String = r.get(5)?;
        let result: Option<String> = r.get(6)?;
        let decoded = (|| {
            let status = JobStatus::parse(&status).ok_or_else(|| StoreError::Decode {
                what: "job status",
                problem: format!("unknown status {status:?}"),
            })?;
            let result = result
                .map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| StoreError::Decode {
                    what: "job result",
                    problem: e.to_string(),
                })?;
            Ok::<_, StoreError>((status, result))
        })();
        let rec = |(status, result)| -> Result<JobRecord, rusqlite::Error> {
            Ok(JobRecord {
                job_id: r.get(0)?,
                user_id: r.get(1)?,
                process: r.get(2)?,
                priority: r.get(3)?,
                session_id: r.get(4)?,
                status,
                result,
                error: r.get(7)?,
                cost: Cost(r.get::<_, i64>(8)?.max(0) as u64),
                attempts: r.get(9)?,
                runs: r.get(10)?,
                created_at_ms: r.get::<_, i64>(11)?.max(0) as u64,
                started_at_ms: opt_u64(12)?,
                finished_at_ms: opt_u64(13)?,
                queue_latency_ms: opt_u64(14)?,
                claim_token: r.get(15)?,
                lease_until_ms: opt_u64(16)?,
            })
        };
        match decoded {
            Ok(parts) => Ok(Ok(rec(parts)?)),
            Err(e) => Ok(Err(e)),
        }
    })
    .optional()
}

// ---------------------------------------------------------------------------------------------
// DynamoDB

/// Jobs as items of the single table: `PK=JOB#{id}`, `SK=STATE`, and `GSI1PK=USER#{userId}`,
/// `GSI1SK=JOB#{createdAt}` so a user's jobs can be listed newest first; `ttl` 30 days.
#[derive(Clone)]
pub struct DynamoJobs {
    client: DynamoClient,
    table: String,
}

type Item = HashMap<String, AttributeValue>;

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn key(job_id: &str) -> Item {
    HashMap::from([
        ("PK".to_owned(), s(format!("JOB#{job_id}"))),
        ("SK".to_owned(), s("STATE")),
    ])
}

/// The item of a record (absent options are left out, never stored as empty strings).
pub fn job_item(rec: &JobRecord) -> Item {
    let mut item = key(&rec.job_id);
    let mut put = |k: &str, v: AttributeValue| {
        item.insert(k.to_owned(), v);
    };
    put("GSI1PK", s(format!("USER#{}", rec.user_id)));
    put("GSI1SK", s(format!("JOB#{}", iso_ts(rec.created_at_ms))));
    put("ttl", n(rec.created_at_ms / 1000 + JOB_TTL_SECS));
    put("entityType", s("JOB"));
    put("jobId", s(&rec.job_id));
    put("userId", s(&rec.user_id));
    put("process", s(&rec.process));
    put("priority", s(&rec.priority));
    put("jobStatus", s(rec.status.as_str()));
    put("costPicoUsd", n(rec.cost.pico_usd()));
    put("attempts", n(rec.attempts));
    put("runs", n(rec.runs));
    put("createdAtMs", n(rec.created_at_ms));
    if let Some(v) = &rec.session_id {
        put("sessionId", s(v));
    }
    if let Some(v) = &rec.result {
        put("result", s(v.to_string()));
    }
    if let Some(v) = &rec.error {
        put("error", s(v));
    }
    for (name, v) in [
        ("startedAtMs", rec.started_at_ms),
        ("finishedAtMs", rec.finished_at_ms),
        ("queueLatencyMs", rec.queue_latency_ms),
        ("leaseUntilMs", rec.lease_until_ms),
    ] {
        if let Some(v) = v {
            put(name, n(v));
        }
    }
    if let Some(v) = &rec.claim_token {
        put("claimToken", s(v));
    }
    item
}

/// Decodes a job item.
pub fn job_from_item(item: &Item) -> Result<JobRecord, StoreError> {
    let bad = |problem: String| StoreError::Decode {
        what: "job item",
        problem,
    };
    let text = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
    let req = |k: &str| text(k).ok_or_else(|| bad(format!("attribute {k} is missing")));
    let num = |k: &str| -> Result<Option<u64>, StoreError> {
        item.get(k)
            .and_then(|v| v.as_n().ok())
            .map(|v| v.parse::<u64>().map_err(|e| bad(format!("{k}: {e}"))))
            .transpose()
    };
    let status = req("jobStatus")?;
    let result = text("result")
        .map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| bad(format!("result: {e}")))?;
    Ok(JobRecord {
        job_id: req("jobId")?,
        user_id: req("userId")?,
        process: req("process")?,
        priority: req("priority")?,
        session_id: text("sessionId"),
        status: JobStatus::parse(&status).ok_or_else(|| bad(format!("status {status:?}")))?,
        result,
        error: text("error"),
        cost: Cost(num("costPicoUsd")?.unwrap_or(0)),
        attempts: num("attempts")?.unwrap_or(0) as u32,
        runs: num("runs")?.unwrap_or(0) as u32,
        created_at_ms: num("createdAtMs")?.unwrap_or(0),
        started_at_ms: num("startedAtMs")?,
        finished_at_ms: num("finishedAtMs")?,
        queue_latency_ms: num("queueLatencyMs")?,
        claim_token: text("claimToken"),
        lease_until_ms: num("leaseUntilMs")?,
    })
}

fn is_condition_failed<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    matches!(err, SdkError::ServiceError(e) if e.err().code() == Some("ConditionalCheckFailedException"))
}

impl DynamoJobs {
    pub fn new(client: DynamoClient, table: &str) -> DynamoJobs {
        DynamoJobs {
            client,
            table: table.to_owned(),
        }
    }

    fn error<E, R>(&self, operation: &'static str, err: &SdkError<E, R>) -> StoreError
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
        R: std::fmt::Debug,
    {
        crate::dynamo::sdk_error(&self.table, operation, err)
    }

    async fn create(&self, rec: &JobRecord) -> Result<bool, StoreError> {
        let out = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(job_item(rec)))
            .condition_expression("attribute_not_exists(PK)")
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(self.error("PutItem", &e)),
        }
    }

    async fn get(&self, job_id: &str) -> Result<Option<JobRecord>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(job_id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.error("GetItem", &e))?;
        out.item.as_ref().map(job_from_item).transpose()
    }

    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(&req.job_id)))
            .update_expression(
                "SET jobStatus = :running, claimToken = :tok, leaseUntilMs = :lease, attempts = :rc, \
                 startedAtMs = if_not_exists(startedAtMs, :now), \
                 queueLatencyMs = if_not_exists(queueLatencyMs, :ql) ADD runs :one",
            )
            .condition_expression(
                "attribute_exists(PK) AND (jobStatus = :queued OR (jobStatus = :running AND leaseUntilMs < :now))",
            )
            .expression_attribute_values(":running", s(JobStatus::Running.as_str()))
            .expression_attribute_values(":queued", s(JobStatus::Queued.as_str()))
            .expression_attribute_values(":tok", s(&req.token))
            .expression_attribute_values(":lease", n(req.lease_until_ms))
            .expression_attribute_values(":rc", n(req.receive_count))
            .expression_attribute_values(":now", n(req.now_ms))
            .expression_attribute_values(":ql", n(req.queue_latency_ms))
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match out {
            Ok(out) => match out.attributes {
                Some(item) => Ok(Claim::Claimed(job_from_item(&item)?)),
                None => Ok(Claim::Missing),
            },
            Err(e) if is_condition_failed(&e) => {
                // Lost the race or nothing to claim: read the item to say which.
                Ok(match self.get(&req.job_id).await? {
                    None => Claim::Missing,
                    Some(rec) if rec.status.is_terminal() => Claim::Finished(rec.status),
                    Some(rec) => Claim::Busy {
                        lease_until_ms: rec.lease_until_ms.unwrap_or(req.now_ms),
                    },
                })
            }
            Err(e) => Err(self.error("UpdateItem", &e)),
        }
    }

    async fn extend(
        &self,
        job_id: &str,
        token: &str,
        lease_until_ms: u64,
    ) -> Result<bool, StoreError> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(job_id)))
            .update_expression("SET leaseUntilMs = :lease")
            .condition_expression("jobStatus = :running AND claimToken = :tok")
            .expression_attribute_values(":running", s(JobStatus::Running.as_str()))
            .expression_attribute_values(":tok", s(token))
            .expression_attribute_values(":lease", n(lease_until_ms))
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(self.error("UpdateItem", &e)),
        }
    }

    async fn settle(&self, job_id: &str, token: &str, st: &Settle) -> Result<bool, StoreError> {
        let mut set = vec!["jobStatus = :status"];
        let mut remove = vec!["claimToken", "leaseUntilMs"];
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(job_id)))
            .condition_expression("jobStatus = :running AND claimToken = :tok")
            .expression_attribute_values(":running", s(JobStatus::Running.as_str()))
            .expression_attribute_values(":tok", s(token))
            .expression_attribute_values(":status", s(st.status.as_str()))
            .expression_attribute_values(":cost", n(st.cost.pico_usd()));
        if let Some(result) = &st.result {
            set.push("#result = :result");
            req = req
                .expression_attribute_names("#result", "result")
                .expression_attribute_values(":result", s(result.to_string()));
        }
        match &st.error {
            Some(e) => {
                set.push("#error = :error");
                req = req.expression_attribute_values(":error", s(e));
            }
            None => remove.push("#error"),
        }
        req = req.expression_attribute_names("#error", "error");
        if st.status != JobStatus::Queued {
            set.push("finishedAtMs = :fin");
            req = req.expression_attribute_values(":fin", n(st.now_ms));
        }
        let expr = format!(
            "SET {} REMOVE {} ADD costPicoUsd :cost",
            set.join(", "),
            remove.join(", ")
        );
        match req.update_expression(expr).send().await {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(self.error("UpdateItem", &e)),
        }
    }

    async fn reject(&self, rec: &JobRecord) -> Result<bool, StoreError> {
        if self.create(rec).await? {
            return Ok(true);
        }
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(&rec.job_id)))
            .update_expression(
                "SET jobStatus = :failed, #error = :error, finishedAtMs = :fin REMOVE claimToken, leaseUntilMs",
            )
            .condition_expression("jobStatus <> :succeeded")
            .expression_attribute_names("#error", "error")
            .expression_attribute_values(":failed", s(JobStatus::Failed.as_str()))
            .expression_attribute_values(":succeeded", s(JobStatus::Succeeded.as_str()))
            .expression_attribute_values(":error", s(rec.error.clone().unwrap_or_default()))
            .expression_attribute_values(":fin", n(rec.finished_at_ms.unwrap_or(rec.created_at_ms)))
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(self.error("UpdateItem", &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (SqliteJobs, PathBuf) {
        let path =
            std::env::temp_dir().join(format!("keyvex-jobs-{}.sqlite3", uuid::Uuid::now_v7()));
        (SqliteJobs::open(&path).unwrap(), path)
    }

    fn claim_req(job: &str, token: &str, now: u64) -> ClaimRequest {
        ClaimRequest {
            job_id: job.into(),
            token: token.into(),
            now_ms: now,
            lease_until_ms: now + 1_000,
            receive_count: 1,
            queue_latency_ms: 5,
        }
    }

    #[tokio::test]
    async fn a_job_is_claimed_once_and_settled_only_by_its_holder() {
        let (db, path) = store();
        let jobs = JobStore::Sqlite(db);
        let rec = JobRecord::queued("j1", "u1", "magicSpark", "normal", None, 100);
        assert!(jobs.create(&rec).await.unwrap());
        assert!(
            !jobs.create(&rec).await.unwrap(),
            "second create is a no-op"
        );

        let Claim::Claimed(got) = jobs.claim(&claim_req("j1", "a", 1_000)).await.unwrap() else {
            panic!("first claim must win");
        };
        assert_eq!((got.status, got.runs), (JobStatus::Running, 1));
        assert_eq!(
            jobs.claim(&claim_req("j1", "b", 1_500)).await.unwrap(),
            Claim::Busy {
                lease_until_ms: 2_000
            }
        );
        let done = Settle {
            status: JobStatus::Succeeded,
            result: Some(serde_json::json!({"ok": true})),
            error: None,
            cost: Cost(42),
            now_ms: 1_600,
        };
        assert!(
            !jobs.settle("j1", "b", &done).await.unwrap(),
            "not b's claim"
        );
        assert!(jobs.settle("j1", "a", &done).await.unwrap());
        assert!(
            !jobs.settle("j1", "a", &done).await.unwrap(),
            "settles once"
        );
        assert_eq!(
            jobs.claim(&claim_req("j1", "c", 9_000)).await.unwrap(),
            Claim::Finished(JobStatus::Succeeded)
        );
        let rec = jobs.get("j1").await.unwrap().unwrap();
        assert_eq!(rec.cost, Cost(42));
        assert_eq!(rec.result, Some(serde_json::json!({"ok": true})));
        assert_eq!(rec.finished_at_ms, Some(1_600));
        assert_eq!(rec.queue_latency_ms, Some(5));
        let _ = std::fs::remove_file(path);
    }

    #[tokio::test]
    async fn a_lapsed_lease_can_be_taken_over_and_the_old_holder_is_locked_out() {
        let (db, path) = store();
        let jobs = JobStore::Sqlite(db);
        jobs.create(&JobRecord::queued(
            "j2",
            "u",
            "pipeline",
            "low",
            Some("s1"),
            1,
        ))
        .await
        .unwrap();
        assert!(matches!(
            jobs.claim(&claim_req("j2", "a", 1_000)).await.unwrap(),
            Claim::Claimed(_)
        ));
        // The lease ran out (a dead worker): another delivery takes over.
        let Claim::Claimed(rec) = jobs.claim(&claim_req("j2", "b", 5_000)).await.unwrap() else {
            panic!("expired lease must be claimable");
        };
        assert_eq!(rec.runs, 2);
        assert!(!jobs.extend("j2", "a", 99_999).await.unwrap());
        assert!(jobs.extend("j2", "b", 99_999).await.unwrap());
        let retry = Settle {
            status: JobStatus::Queued,
            result: None,
            error: Some("provider down".into()),
            cost: Cost(7),
            now_ms: 5_100,
        };
        assert!(jobs.settle("j2", "b", &retry).await.unwrap());
        let rec = jobs.get("j2").await.unwrap().unwrap();
        assert_eq!(rec.status, JobStatus::Queued);
        assert_eq!(rec.finished_at_ms, None);
        assert_eq!(rec.claim_token, None);
        assert_eq!(rec.session_id.as_deref(), Some("s1"));
        let _ = std::fs::remove_file(path);
    }

    #[tokio::test]
    async fn reject_never_overwrites_success() {
        let (db, path) = store();
        let jobs = JobStore::Sqlite(db);
        let mut poison = JobRecord::queued("j3", "u", "?", "normal", None, 1);
        poison.error = Some("bad input".into());
        assert!(
            jobs.reject(&poison).await.unwrap(),
            "unknown job is created failed"
        );
        assert_eq!(
            jobs.get("j3").await.unwrap().unwrap().status,
            JobStatus::Failed
        );
        jobs.create(&JobRecord::queued(
            "j4",
            "u",
            "magicSpark",
            "normal",
            None,
            1,
        ))
        .await
        .unwrap();
        jobs.claim(&claim_req("j4", "a", 10)).await.unwrap();
        let done = Settle {
            status: JobStatus::Succeeded,
            result: None,
            error: None,
            cost: Cost::ZERO,
            now_ms: 11,
        };
        jobs.settle("j4", "a", &done).await.unwrap();
        let mut late = JobRecord::queued("j4", "u", "magicSpark", "normal", None, 1);
        late.error = Some("late poison copy".into());
        assert!(!jobs.reject(&late).await.unwrap());
        assert_eq!(
            jobs.get("j4").await.unwrap().unwrap().status,
            JobStatus::Succeeded
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn item_round_trips_and_skips_absent_values() {
        let mut rec = JobRecord::queued("j", "u", "magicSpark", "high", None, 1_764_080_467_123);
        rec.result = Some(serde_json::json!({"a": [1, 2]}));
        rec.cost = Cost(123);
        let item = job_item(&rec);
        assert_eq!(item["PK"].as_s().unwrap(), "JOB#j");
        assert_eq!(item["SK"].as_s().unwrap(), "STATE");
        assert_eq!(
            item["GSI1SK"].as_s().unwrap(),
            "JOB#2025-11-25T14:21:07.123Z"
        );
        assert!(!item.contains_key("sessionId") && !item.contains_key("error"));
        assert_eq!(job_from_item(&item).unwrap(), rec);
    }
}
