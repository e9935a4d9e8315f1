//! The worker: long-polls the AI-processing queue, runs each job through the engine with bounded
//! concurrency, and turns at-least-once delivery into exactly-once effects via the job store.
//!
//! One message, start to end: parse (a poison message is marked `failed` and forwarded to the DLQ
//! at once) → claim the job (busy elsewhere: look again later; already finished: delete the
//! duplicate) → run the agent or pipeline while a heartbeat extends the message's visibility and
//! the claim's lease → record every model call in the metrics `Tracker` → settle the job →
//! delete the message (success, permanent failure) or leave it for redelivery (transient
//! failure, with a backoff; on the last allowed receive the job is marked `dead-lettered` and
//! SQS's redrive moves the message to the DLQ).
//!
//! Poison messages go to the DLQ directly rather than through three receives: they can never
//! succeed, and waiting would cost two visibility timeouts (10 minutes at the platform's 300 s) of
//! re-parsing before the same outcome. The copy in the DLQ carries the reason as the message
//! attribute `keyvexFailureReason`.
//!
//! Shutdown (the cancellation token): stop receiving, let jobs in flight finish until
//! `shutdown_grace`, then abort the rest and release them (job back to `queued`, message
//! visibility 0) so another worker takes them at once.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName};
use futures::StreamExt;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use keyvex_engine::clock::now_ms;
use keyvex_engine::cost::Cost;
use keyvex_engine::record::Receipt;
use keyvex_engine::{AgentError, AgentEvent, CallContext, Engine, PipelineEvent, PipelineInput};
use keyvex_store::jobs::{Claim, ClaimRequest, JobRecord, JobStatus, Settle};
use keyvex_store::{AwsTimeouts, full_jitter};

use super::message::{self, Job, Poison, Target};
use super::{JobsCtx, QueueError, admin, visibility_secs};

/// Agent error kinds worth another delivery: the providers were down, throttled or cut the
/// stream. Everything else (bad input, an answer still invalid after its repair, a 400/401)
/// would fail the same way again.
const TRANSIENT_KINDS: &[&str] = &[
    "all_attempts_failed",
    "retry_budget_exhausted",
    "mid_stream",
    "truncated",
];

/// SQS's longest `WaitTimeSeconds`.
const MAX_WAIT: Duration = Duration::from_secs(20);

/// The timeouts of one long poll: the client's own (the SQS defaults where it sets none) plus
/// the wait, since SQS holds an empty receive open for that long on purpose and the client-wide
/// timeouts (5 s per attempt by default) would cut every 20-second poll.
fn long_poll_timeouts(sqs: &aws_sdk_sqs::Client, wait: Duration) -> AwsTimeouts {
    AwsTimeouts::of_config(sqs.config().timeout_config(), AwsTimeouts::SQS).extended_by(wait)
}

/// The worker's knobs. `Default` follows the platform's queue setup (300 s visibility, jobs
/// started within 30 s); tests shrink the durations.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs run at once.
    pub concurrency: usize,
    /// `MaxNumberOfMessages` per receive (1–10); never more than the free job slots.
    pub max_messages: usize,
    /// `WaitTimeSeconds` of the long poll (0–20 s).
    pub wait_time: Duration,
    /// How often a running job renews its message's visibility and its lease …
    pub heartbeat_every: Duration,
    /// … and for how long from then. Must exceed `heartbeat_every`.
    pub heartbeat_extend: Duration,
    /// After a transient failure the message becomes visible again after
    /// `retry_backoff × receive count`, instead of spinning at once.
    pub retry_backoff: Duration,
    /// When another worker holds the job, look again after this long.
    pub busy_backoff: Duration,
    /// How long in-flight jobs may run on after cancellation before they are released.
    pub shutdown_grace: Duration,
    /// Receives before SQS dead-letters a message; `None` reads it from the queue's
    /// `RedrivePolicy` (3 when there is none).
    pub max_receives: Option<u32>,
    /// Where poison messages go; `None` reads it from the queue's `RedrivePolicy`.
    pub dlq_url: Option<String>,
    /// The platform's queue-latency target (30 s); slower starts are logged as warnings.
    pub queue_latency_target: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 4,
            max_messages: 10,
            wait_time: Duration::from_secs(20),
            heartbeat_every: Duration::from_secs(60),
            heartbeat_extend: Duration::from_secs(120),
            retry_backoff: Duration::from_secs(15),
            busy_backoff: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(25),
            max_receives: None,
            dlq_url: None,
            queue_latency_target: Duration::from_secs(30),
        }
    }
}

/// What a worker did, by message outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerCounts {
    pub received: u64,
    pub succeeded: u64,
    /// Permanent failures (the job is `failed`).
    pub failed: u64,
    /// Transient failures left for redelivery.
    pub retried: u64,
    /// Jobs marked `dead-lettered` after their last allowed receive.
    pub dead_lettered: u64,
    /// Poison messages forwarded to the DLQ.
    pub poison: u64,
    /// Deliveries of jobs that were busy elsewhere or already finished (not run).
    pub duplicates: u64,
    /// Jobs released unfinished at shutdown.
    pub released: u64,
    /// Messages that hit a store or SQS error and were left for redelivery.
    pub errors: u64,
    /// Receives that failed (SQS unreachable, throttled, or silent past the long poll's
    /// timeouts); the worker backs off and polls again.
    pub receive_errors: u64,
}

/// A queue worker. Build it, optionally subscribe to [`Worker::progress`], then `run` or `spawn`.
pub struct Worker {
    ctx: JobsCtx,
    engine: Engine,
    config: WorkerConfig,
    counts: watch::Sender<WorkerCounts>,
}

/// How one run of a job ended.
struct JobRun {
    result: Result<serde_json::Value, Failure>,
    cost: Cost,
}

struct Failure {
    transient: bool,
    message: String,
}

impl Failure {
    fn of(e: &AgentError) -> Failure {
        Failure {
            transient: TRANSIENT_KINDS.contains(&e.kind()),
            message: e.to_string(),
        }
    }
}

impl Worker {
    pub fn new(ctx: JobsCtx, engine: Engine, config: WorkerConfig) -> Worker {
        Worker {
            ctx,
            engine,
            config,
            counts: watch::Sender::new(WorkerCounts::default()),
        }
    }

    /// Counts, updated after every message (tests and health pages wait on it).
    pub fn progress(&self) -> watch::Receiver<WorkerCounts> {
        self.counts.subscribe()
    }

    /// Runs the worker as a task of `tasks` (for `serve --with-worker`); it stops when `cancel`
    /// fires, after the shutdown described in the module docs.
    pub fn spawn(
        self,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> JoinHandle<Result<WorkerCounts, QueueError>> {
        tasks.spawn(self.run(cancel))
    }

    /// Polls until `cancel` fires, then drains. Fails only when the queue cannot be inspected at
    /// start (its redrive policy); later SQS errors are retried with backoff.
    pub async fn run(self, cancel: CancellationToken) -> Result<WorkerCounts, QueueError> {
        let config = self.config.clone();
        let (dlq_url, max_receives) = match (&config.dlq_url, config.max_receives) {
            (Some(url), Some(max)) => (Some(url.clone()), max),
            _ => {
                let redrive = admin::redrive_of(&self.ctx.sqs, &self.ctx.queue_url).await?;
                let max = config
                    .max_receives
                    .or(redrive.as_ref().map(|r| r.max_receives))
                    .unwrap_or(3);
                (config.dlq_url.clone().or(redrive.map(|r| r.dlq_url)), max)
            }
        };
        if dlq_url.is_none() {
            tracing::warn!(
                queue_url = %self.ctx.queue_url,
                "the queue has no dead-letter queue (no RedrivePolicy, no SQS_AI_PROCESSING_DLQ_URL): poison messages will be logged and deleted"
            );
        }
        tracing::info!(
            queue_url = %self.ctx.queue_url,
            dlq_url = dlq_url.as_deref().unwrap_or("-"),
            max_receives,
            concurrency = config.concurrency,
            store = self.ctx.jobs.name(),
            "worker started"
        );
        let shared = Arc::new(Shared {
            ctx: self.ctx,
            engine: self.engine,
            config: config.clone(),
            counts: self.counts,
            abort: CancellationToken::new(),
            dlq_url,
            max_receives,
        });
        let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
        let tasks = TaskTracker::new();
        let mut receive_failures = 0u32;
        loop {
            // Receive only as many messages as there are free slots: a message waiting in
            // process for a slot would burn its visibility timeout for nothing.
            let first = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                p = Arc::clone(&slots).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let mut permits = vec![first];
            while permits.len() < config.max_messages.clamp(1, 10) {
                match Arc::clone(&slots).try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let wait = config.wait_time.min(MAX_WAIT);
            let receive = shared
                .ctx
                .sqs
                .receive_message()
                .queue_url(&shared.ctx.queue_url)
                .max_number_of_messages(permits.len() as i32)
                .wait_time_seconds(wait.as_secs() as i32)
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
                .customize()
                .config_override(
                    aws_sdk_sqs::config::Builder::default()
                        .timeout_config(long_poll_timeouts(&shared.ctx.sqs, wait).timeout_config()),
                )
                .send();
            let received = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                r = receive => r,
            };
            match received {
                Ok(out) => {
                    receive_failures = 0;
                    for msg in out.messages.unwrap_or_default() {
                        let Some(permit) = permits.pop() else {
                            // SQS never returns more than asked; if it did, hand it back.
                            if let Some(r) = msg.receipt_handle() {
                                shared.change_visibility(r, Duration::ZERO).await;
                            }
                            continue;
                        };
                        let s = Arc::clone(&shared);
                        tasks.spawn(async move {
                            s.handle(msg).await;
                            drop(permit);
                        });
                    }
                }
                Err(e) => {
                    receive_failures += 1;
                    shared.bump(|c| c.receive_errors += 1);
                    let err = QueueError::sqs("ReceiveMessage", &e);
                    let pause = full_jitter(
                        Duration::from_millis(200),
                        Duration::from_secs(30),
                        receive_failures,
                    );
                    tracing::warn!(error = %err, retry_in_ms = pause.as_millis() as u64, "receiving from the queue failed");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
        tracing::info!(
            in_flight = tasks.len(),
            grace_ms = config.shutdown_grace.as_millis() as u64,
            "worker stopping: no new messages; finishing the jobs in flight"
        );
        tasks.close();
        if tokio::time::timeout(config.shutdown_grace, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = tasks.len(),
                "shutdown grace over: releasing unfinished jobs to other workers"
            );
            shared.abort.cancel();
            tasks.wait().await;
        }
        let counts = shared.counts.borrow().clone();
        tracing::info!(?counts, "worker stopped");
        Ok(counts)
    }
}

/// What every message task of one worker shares.
struct Shared {
    ctx: JobsCtx,
    engine: Engine,
    config: WorkerConfig,
    counts: watch::Sender<WorkerCounts>,
    /// Fired when the shutdown grace is over: running jobs stop and are released.
    abort: CancellationToken,
    dlq_url: Option<String>,
    max_receives: u32,
}

impl Shared {
    fn bump(&self, f: impl FnOnce(&mut WorkerCounts)) {
        self.counts.send_modify(f);
    }

    async fn handle(&self, msg: Message) {
        let Some(receipt) = msg.receipt_handle.clone() else {
            tracing::warn!("a received message has no receipt handle; skipping it");
            return;
        };
        let attr = |name: MessageSystemAttributeName| {
            msg.attributes
                .as_ref()
                .and_then(|a| a.get(&name))
                .and_then(|v| v.parse::<u64>().ok())
        };
        let receive_count = attr(MessageSystemAttributeName::ApproximateReceiveCount)
            .map_or(1, |c| c.min(u64::from(u32::MAX)) as u32);
        let sent_ms = attr(MessageSystemAttributeName::SentTimestamp);
        let message_id = msg.message_id.clone().unwrap_or_default();
        let body = msg.body.clone().unwrap_or_default();
        self.bump(|c| c.received += 1);
        match message::parse(&body, &message_id) {
            Ok(job) => {
                let span = tracing::info_span!("job", job_id = %job.job_id, process = %job.target, receive_count);
                self.run_job(job, &body, &receipt, receive_count, sent_ms)
                    .instrument(span)
                    .await;
            }
            Err(poison) => self.poison(&body, &receipt, &poison).await,
        }
    }

    async fn run_job(
        &self,
        job: Job,
        body: &str,
        receipt: &str,
        receive_count: u32,
        sent_ms: Option<u64>,
    ) {
        let now = now_ms();
        // SQS's own clock first; the producer's timestamp only when SQS did not say.
        let queue_latency_ms = now.saturating_sub(sent_ms.unwrap_or(job.enqueued_at_ms));
        let token = uuid::Uuid::now_v7().to_string();
        let req = ClaimRequest {
            job_id: job.job_id.clone(),
            token: token.clone(),
            now_ms: now,
            lease_until_ms: now + self.config.heartbeat_extend.as_millis() as u64,
            receive_count,
            queue_latency_ms,
        };
        let mut claim = self.ctx.jobs.claim(&req).await;
        if let Ok(Claim::Missing) = claim {
            // Sent by another producer (or the state write was lost): adopt it from the message.
            let rec = JobRecord::queued(
                &job.job_id,
                &job.user_id,
                job.target.key(),
                job.priority.as_str(),
                job.session_id.as_deref(),
                job.enqueued_at_ms,
            );
            claim = match self.ctx.jobs.create(&rec).await {
                Ok(_) => self.ctx.jobs.claim(&req).await,
                Err(e) => Err(e),
            };
        }
        match claim {
            Ok(Claim::Claimed(_)) => {}
            Ok(Claim::Busy { lease_until_ms }) => {
                tracing::info!(
                    lease_until_ms,
                    "another worker is running this job; looking again later"
                );
                self.change_visibility(receipt, self.config.busy_backoff)
                    .await;
                self.bump(|c| c.duplicates += 1);
                return;
            }
            Ok(Claim::Finished(JobStatus::DeadLettered)) => {
                self.forward_to_dlq(body, receipt, "the job was already dead-lettered")
                    .await;
                self.bump(|c| c.duplicates += 1);
                return;
            }
            Ok(Claim::Finished(status)) => {
                tracing::info!(%status, "job already finished; deleting the duplicate delivery");
                self.delete(receipt).await;
                self.bump(|c| c.duplicates += 1);
                return;
            }
            Ok(Claim::Missing) | Err(_) => {
                if let Err(e) = &claim {
                    tracing::error!(error = %e, "could not claim the job; leaving the message for redelivery");
                }
                self.change_visibility(receipt, self.config.retry_backoff)
                    .await;
                self.bump(|c| c.errors += 1);
                return;
            }
        }
        let target_ms = self.config.queue_latency_target.as_millis() as u64;
        if queue_latency_ms > target_ms {
            tracing::warn!(
                queue_latency_ms,
                target_ms,
                "job started later than the queue-latency target"
            );
        } else {
            tracing::info!(queue_latency_ms, "job started");
        }

        let outcome = tokio::select! {
            run = self.execute(&job) => Some(run),
            () = self.heartbeat(receipt, &job.job_id, &token) => None,
            () = self.abort.cancelled() => None,
        };
        let Some(run) = outcome else {
            self.release(&job.job_id, &token, receipt).await;
            return;
        };
        self.settle(&job, &token, receipt, receive_count, run).await;
    }

    async fn settle(&self, job: &Job, token: &str, receipt: &str, receive_count: u32, run: JobRun) {
        let now = now_ms();
        let (status, result, error) = match run.result {
            Ok(value) => (JobStatus::Succeeded, Some(value), None),
            Err(f) if !f.transient => (JobStatus::Failed, None, Some(f.message)),
            Err(f) if receive_count < self.max_receives => {
                (JobStatus::Queued, None, Some(f.message))
            }
            Err(f) => (JobStatus::DeadLettered, None, Some(f.message)),
        };
        let settle = Settle {
            status,
            result,
            error: error.clone(),
            cost: run.cost,
            now_ms: now,
        };
        match self.ctx.jobs.settle(&job.job_id, token, &settle).await {
            Ok(true) => {}
            Ok(false) => {
                // Our lease lapsed and another delivery took the job over; its holder writes the
                // outcome and deletes the message.
                tracing::warn!(%status, "lost the job's claim before settling; this run's outcome is discarded");
                self.bump(|c| c.duplicates += 1);
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, %status, "could not store the job's outcome; leaving the message for redelivery");
                self.change_visibility(receipt, self.config.retry_backoff)
                    .await;
                self.bump(|c| c.errors += 1);
                return;
            }
        }
        let cost = run.cost.to_string();
        match status {
            JobStatus::Succeeded => {
                tracing::info!(cost = %cost, "job succeeded");
                self.delete(receipt).await;
                self.bump(|c| c.succeeded += 1);
            }
            JobStatus::Failed => {
                tracing::warn!(cost = %cost, error = error.as_deref().unwrap_or(""), "job failed permanently");
                self.delete(receipt).await;
                self.bump(|c| c.failed += 1);
            }
            JobStatus::Queued => {
                let backoff = self
                    .config
                    .retry_backoff
                    .saturating_mul(receive_count.max(1));
                tracing::warn!(
                    cost = %cost,
                    retry_in_s = visibility_secs(backoff),
                    error = error.as_deref().unwrap_or(""),
                    "job failed transiently; leaving it for redelivery"
                );
                self.change_visibility(receipt, backoff).await;
                self.bump(|c| c.retried += 1);
            }
            JobStatus::DeadLettered | JobStatus::Running => {
                tracing::error!(
                    cost = %cost,
                    receive_count,
                    error = error.as_deref().unwrap_or(""),
                    "job failed on its last allowed receive; dead-lettered"
                );
                // Visible at once, so SQS's redrive moves it to the DLQ on the next receive.
                self.change_visibility(receipt, Duration::ZERO).await;
                self.bump(|c| c.dead_lettered += 1);
            }
        }
    }

    /// Gives an unfinished job back: `queued` again in the store, visible again in the queue.
    async fn release(&self, job_id: &str, token: &str, receipt: &str) {
        let settle = Settle {
            status: JobStatus::Queued,
            result: None,
            error: Some(
                "the worker shut down before the job finished; released to another worker".into(),
            ),
            cost: Cost::ZERO,
            now_ms: now_ms(),
        };
        if let Err(e) = self.ctx.jobs.settle(job_id, token, &settle).await {
            // The lease lapses on its own; the next claim takes the job over then.
            tracing::warn!(error = %e, "could not release the job in the store");
        }
        self.change_visibility(receipt, Duration::ZERO).await;
        tracing::info!("job released unfinished");
        self.bump(|c| c.released += 1);
    }

    /// Keeps the message invisible and the lease alive while the job runs. Never returns.
    async fn heartbeat(&self, receipt: &str, job_id: &str, token: &str) {
        let every = self.config.heartbeat_every.max(Duration::from_millis(100));
        let extend = self.config.heartbeat_extend;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.change_visibility(receipt, extend).await;
            match self
                .ctx
                .jobs
                .extend(job_id, token, now_ms() + extend.as_millis() as u64)
                .await
            {
                Ok(true) => tracing::debug!("heartbeat: visibility and lease extended"),
                Ok(false) => tracing::warn!(
                    "heartbeat: the claim was taken over by another delivery; this run's outcome will be discarded"
                ),
                Err(e) => tracing::warn!(error = %e, "heartbeat: could not extend the lease"),
            }
        }
    }

    /// Runs the job through the engine, as its owner: every model call is recorded with the
    /// job's caller, the job id as run (and correlation) id, and the stage it served — also a
    /// call cut short when the run is aborted at shutdown. The records and session messages are
    /// durable before the job is settled, so a finished job's cost is never lost.
    async fn execute(&self, job: &Job) -> JobRun {
        let ctx = CallContext::new(&job.user_id)
            .with_correlation(&job.job_id)
            .with_run(&job.job_id)
            .with_session(job.session_id.clone());
        let mut receipts = Vec::new();
        let run = match job.target {
            Target::Agent(process) => {
                let mut events = self.engine.agent(ctx, process, job.input.clone());
                let mut ended = None;
                while let Some(event) = events.next().await {
                    match event {
                        AgentEvent::Usage(call) => receipts.push(call.record.receipt),
                        AgentEvent::Result {
                            output,
                            outcome,
                            messages,
                        } => {
                            receipts.push(messages);
                            ended = Some(JobRun {
                                result: Ok(output),
                                cost: outcome.cost(),
                            });
                        }
                        AgentEvent::Error {
                            error,
                            outcome,
                            messages,
                        } => {
                            receipts.push(messages);
                            ended = Some(JobRun {
                                result: Err(Failure::of(&error)),
                                cost: outcome.cost(),
                            });
                        }
                        _ => {}
                    }
                }
                ended.unwrap_or_else(ended_without_result)
            }
            Target::Pipeline => {
                let input: PipelineInput = match serde_json::from_value(job.input.clone()) {
                    Ok(i) => i,
                    Err(e) => {
                        return JobRun {
                            result: Err(Failure {
                                transient: false,
                                message: format!("pipeline input: {e}"),
                            }),
                            cost: Cost::ZERO,
                        };
                    }
                };
                let mut events = self.engine.pipeline(ctx, input);
                // The first stage error is the cause; a sibling stage may fail after it.
                let mut cause: Option<AgentError> = None;
                let mut ended = None;
                while let Some(event) = events.next().await {
                    match event {
                        PipelineEvent::Stage {
                            event: AgentEvent::Usage(call),
                            ..
                        } => receipts.push(call.record.receipt),
                        PipelineEvent::Stage {
                            event: AgentEvent::Error { error, .. },
                            ..
                        } => {
                            cause.get_or_insert(error);
                        }
                        PipelineEvent::Done {
                            tool,
                            rollup,
                            messages,
                        } => {
                            receipts.push(messages);
                            let cost = rollup.cost;
                            let result = serde_json::json!({ "tool": tool, "rollup": rollup });
                            ended = Some(JobRun {
                                result: Ok(result),
                                cost,
                            });
                        }
                        PipelineEvent::Failed {
                            error,
                            rollup,
                            messages,
                            ..
                        } => {
                            receipts.push(messages);
                            let transient =
                                cause.as_ref().is_some_and(|e| Failure::of(e).transient);
                            ended = Some(JobRun {
                                result: Err(Failure {
                                    transient,
                                    message: error,
                                }),
                                cost: rollup.cost,
                            });
                        }
                        _ => {}
                    }
                }
                ended.unwrap_or_else(ended_without_result)
            }
        };
        if let Err(error) = Receipt::all(receipts).durable().await {
            tracing::error!(%error, "the job's call records or session messages were not confirmed durable");
        }
        run
    }

    async fn poison(&self, body: &str, receipt: &str, poison: &Poison) {
        tracing::warn!(
            kind = poison.kind,
            reason = %poison.reason,
            job_id = poison.job_id.as_deref().unwrap_or("-"),
            "poison message: marking its job failed and moving it to the dead-letter queue"
        );
        if let Some(job_id) = &poison.job_id {
            let now = now_ms();
            let mut rec = JobRecord::queued(
                job_id,
                poison.user_id.as_deref().unwrap_or("unknown"),
                "unknown",
                "normal",
                None,
                now,
            );
            rec.error = Some(poison.to_string());
            rec.finished_at_ms = Some(now);
            if let Err(e) = self.ctx.jobs.reject(&rec).await {
                tracing::error!(error = %e, job_id, "could not mark the poison message's job failed");
            }
        }
        self.forward_to_dlq(body, receipt, &poison.to_string())
            .await;
        self.bump(|c| c.poison += 1);
    }

    /// Sends the body to the DLQ, then deletes it from the queue (in that order, so a crash in
    /// between duplicates the dead letter rather than losing it).
    async fn forward_to_dlq(&self, body: &str, receipt: &str, reason: &str) {
        let Some(dlq) = &self.dlq_url else {
            let preview: String = body.chars().take(512).collect();
            tracing::error!(reason, body = %preview, "no dead-letter queue known; deleting the message after logging it");
            self.delete(receipt).await;
            return;
        };
        let reason: String = reason.chars().take(1024).collect();
        let attr = MessageAttributeValue::builder()
            .data_type("String")
            .string_value(reason)
            .build()
            .ok();
        // SQS refuses empty bodies; keep the dead letter anyway.
        let body = if body.is_empty() {
            "<empty body>"
        } else {
            body
        };
        let sent =
            self.ctx
                .sqs
                .send_message()
                .queue_url(dlq)
                .message_body(body)
                .set_message_attributes(attr.map(|a| {
                    std::collections::HashMap::from([("keyvexFailureReason".to_owned(), a)])
                }))
                .send()
                .await;
        match sent {
            Ok(_) => self.delete(receipt).await,
            Err(e) => {
                tracing::error!(error = %QueueError::sqs("SendMessage", &e), "could not forward to the dead-letter queue; leaving the message for redelivery");
                self.change_visibility(receipt, self.config.retry_backoff)
                    .await;
            }
        }
    }

    async fn delete(&self, receipt: &str) {
        if let Err(e) = self
            .ctx
            .sqs
            .delete_message()
            .queue_url(&self.ctx.queue_url)
            .receipt_handle(receipt)
            .send()
            .await
        {
            // The message comes back; the job store makes the redelivery a no-op.
            tracing::warn!(error = %QueueError::sqs("DeleteMessage", &e), "could not delete a handled message");
        }
    }

    async fn change_visibility(&self, receipt: &str, after: Duration) {
        if let Err(e) = self
            .ctx
            .sqs
            .change_message_visibility()
            .queue_url(&self.ctx.queue_url)
            .receipt_handle(receipt)
            .visibility_timeout(visibility_secs(after))
            .send()
            .await
        {
            tracing::warn!(error = %QueueError::sqs("ChangeMessageVisibility", &e), "could not change a message's visibility");
        }
    }
}

fn ended_without_result() -> JobRun {
    JobRun {
        result: Err(Failure {
            transient: true,
            message: "the run ended without a result".into(),
        }),
        cost: Cost::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyvex_engine::Process;

    #[test]
    fn a_long_poll_gets_its_wait_on_top_of_the_clients_timeouts() {
        let shared = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .build();
        let timeouts = AwsTimeouts {
            connect: Duration::from_secs(1),
            attempt: Duration::from_secs(2),
            operation: Duration::from_secs(4),
        };
        let sqs = super::super::configure(&shared, Some("http://127.0.0.1:9"), &timeouts);
        assert_eq!(
            long_poll_timeouts(&sqs, MAX_WAIT),
            AwsTimeouts {
                connect: Duration::from_secs(1),
                attempt: Duration::from_secs(22),
                operation: Duration::from_secs(24),
            }
        );
    }

    #[test]
    fn provider_outages_are_transient_and_bad_answers_are_not() {
        let route = |kind| AgentError::Route {
            process: Process::MagicSpark,
            kind,
            message: "x".into(),
        };
        assert!(Failure::of(&route("all_attempts_failed")).transient);
        assert!(Failure::of(&route("mid_stream")).transient);
        assert!(!Failure::of(&route("not_retryable")).transient);
        let invalid = AgentError::InvalidOutput {
            process: Process::MagicSpark,
            repairs: 1,
            errors: "e".into(),
        };
        assert!(!Failure::of(&invalid).transient);
    }
}
