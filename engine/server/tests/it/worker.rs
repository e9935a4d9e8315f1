//! The queue worker against moto's SQS: the real SQS SDK, the worker running agents and the
//! pipeline through the engine against the simulator over HTTP, and the job store in SQLite (and
//! DynamoDB on moto for the end-to-end case). Each test has its own moto, queues, simulator and
//! metrics file; queues use a 2 s visibility so redelivery takes seconds. An SQS that accepts and
//! never answers (moto behind a black hole) stops neither the worker nor its later jobs. Last, the
//! worker inside the server (`serve --with-worker`) aborted at shutdown mid-stream.

use std::sync::Arc;
use std::time::Duration;

use agents::Process;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use keyvex_engine::Engine;
use keyvex_engine::router::RouterConfig;
use keyvex_server::queue::admin::{self, QueueSettings};
use keyvex_server::queue::worker::{Worker, WorkerConfig, WorkerCounts};
use keyvex_server::queue::{self, JobRequest, JobStatus, JobStore, JobsCtx, Priority, QueueError};
use keyvex_sim::{Fault, Rule, SimHandle};
use keyvex_store::jobs::{DynamoJobs, SqliteJobs};
use keyvex_store::sqlite::SqliteStore;
use keyvex_store::{AwsTimeouts, Tracker};
use keyvex_testkit::TempDir;
use keyvex_testkit::fault_proxy::FaultProxy;
use keyvex_testkit::moto::{self, Moto};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::support::{
    ALICE, MotoQueue, Spec, TestServer, WAIT, depth, fast_worker, stored_records,
};

/// An engine on `sim` recording into `tracker`, with quick backoff and the given first-token
/// deadline.
fn engine(sim: &SimHandle, tracker: &Tracker, ttft_timeout: Duration) -> Engine {
    keyvex_testkit::sim_engine(sim)
        .router(RouterConfig {
            ttft_timeout,
            stall_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_millis(50),
            ..RouterConfig::default()
        })
        .recorder(Arc::new(tracker.clone()))
        .build()
        .unwrap()
}

/// Everything one test needs.
struct Setup {
    _moto: Moto,
    moto_endpoint: String,
    sqs: aws_sdk_sqs::Client,
    urls: admin::QueueUrls,
    sim: SimHandle,
    engine: Engine,
    tracker: Tracker,
    dir: TempDir,
    ctx: JobsCtx,
}

impl Setup {
    async fn new(tag: &str, ttft_timeout: Duration) -> Setup {
        let MotoQueue { moto, sqs, urls } = MotoQueue::start(tag, Duration::from_secs(2)).await;
        let sim = keyvex_testkit::fast_sim(11).await;
        let dir = TempDir::new(&format!("queue-{tag}"));
        let db = dir.file("metrics.sqlite3");
        let tracker = Tracker::start(
            keyvex_testkit::fast_metrics(&db),
            Arc::new(SqliteStore::open(&db).unwrap()),
        )
        .await
        .unwrap();
        let engine = engine(&sim, &tracker, ttft_timeout);
        let ctx = JobsCtx {
            sqs: sqs.clone(),
            queue_url: urls.queue_url.clone(),
            jobs: JobStore::Sqlite(SqliteJobs::open(&db).unwrap()),
        };
        Setup {
            moto_endpoint: moto.endpoint.clone(),
            _moto: moto,
            sqs,
            urls,
            sim,
            engine,
            tracker,
            dir,
            ctx,
        }
    }

    /// A worker with its own connection to the job store (as another process would have).
    fn worker(&self, config: WorkerConfig) -> Worker {
        let ctx = JobsCtx {
            jobs: JobStore::Sqlite(SqliteJobs::open(&self.dir.file("metrics.sqlite3")).unwrap()),
            ..self.ctx.clone()
        };
        Worker::new(ctx, self.engine.clone(), config)
    }

    async fn enqueue(&self, process: Process, seed: u64) -> String {
        queue::enqueue(
            &self.ctx,
            "user-1",
            JobRequest {
                target: process.key().into(),
                input: agents::samples::sample_input(process, seed),
                priority: Priority::Normal,
                session_id: None,
            },
        )
        .await
        .unwrap()
        .job_id
    }

    async fn status(&self, job_id: &str) -> queue::JobView {
        queue::job_status(&self.ctx, job_id).await.unwrap().unwrap()
    }

    /// Visible plus in-flight messages of a queue.
    async fn depth(&self, url: &str) -> u64 {
        depth(&self.sqs, url).await
    }
}

struct Running {
    cancel: CancellationToken,
    progress: watch::Receiver<WorkerCounts>,
    handle: tokio::task::JoinHandle<Result<WorkerCounts, QueueError>>,
}

fn start(worker: Worker) -> Running {
    let cancel = CancellationToken::new();
    let progress = worker.progress();
    let handle = tokio::spawn(worker.run(cancel.clone()));
    Running {
        cancel,
        progress,
        handle,
    }
}

impl Running {
    async fn until(&mut self, what: &str, pred: impl Fn(&WorkerCounts) -> bool) -> WorkerCounts {
        let reached = tokio::time::timeout(WAIT, self.progress.wait_for(|c| pred(c)))
            .await
            .map(|r| r.map(|c| c.clone()));
        match reached {
            Ok(Ok(c)) => c,
            _ => panic!("worker did not reach {what}: {:?}", *self.progress.borrow()),
        }
    }

    async fn stop(self) -> WorkerCounts {
        self.cancel.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("worker stops")
            .unwrap()
            .unwrap()
    }
}

/// Waits for state held by an external process (moto, the store, the simulator) that sends no
/// signal: polled.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn queue_create_is_idempotent_and_sets_the_plan_attributes() {
    let moto = Moto::start().await;
    let sqs = moto::sqs_client(&moto.endpoint).await;
    let first = admin::create_queues(&sqs, "plan-queue", "plan-dlq")
        .await
        .unwrap();
    let again = admin::create_queues(&sqs, "plan-queue", "plan-dlq")
        .await
        .unwrap();
    assert_eq!(first, again);
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&first.queue_url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap();
    assert_eq!(attrs[&QueueAttributeName::VisibilityTimeout], "300");
    assert_eq!(
        attrs[&QueueAttributeName::MessageRetentionPeriod],
        "1209600"
    );
    let redrive = admin::redrive_of(&sqs, &first.queue_url)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(redrive.dlq_url, first.dlq_url);
    assert_eq!(redrive.max_receives, 3);
    // Same name, different attributes: refused with a message naming the queue.
    let err = admin::create_queues_with(
        &sqs,
        "plan-queue",
        "plan-dlq",
        &QueueSettings {
            visibility: Duration::from_secs(5),
            ..QueueSettings::default()
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("plan-"), "{err}");
}

#[tokio::test]
async fn an_enqueued_job_is_processed_and_its_result_and_cost_are_readable() {
    let mut s = Setup::new("e2e", Duration::from_secs(5)).await;
    // This test keeps job state in DynamoDB (moto), the others in SQLite.
    let ddb = moto::client(&s.moto_endpoint).await;
    keyvex_store::dynamo::create_table(&ddb, "keyvex-main-table")
        .await
        .unwrap();
    s.ctx.jobs = JobStore::Dynamo(DynamoJobs::new(ddb, "keyvex-main-table"));

    // Bad input is refused before anything is written or sent.
    let bad = queue::enqueue(
        &s.ctx,
        "user-1",
        JobRequest {
            target: "magicSpark".into(),
            input: json!({ "nothing": true }),
            priority: Priority::High,
            session_id: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(bad.http_status(), http::StatusCode::BAD_REQUEST, "{bad}");
    let unknown = queue::enqueue(
        &s.ctx,
        "user-1",
        JobRequest {
            target: "sparkle".into(),
            input: json!({}),
            priority: Priority::Normal,
            session_id: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.http_status(), http::StatusCode::BAD_REQUEST);
    assert_eq!(s.depth(&s.urls.queue_url).await, 0);

    let agent_job = s.enqueue(Process::MagicSpark, 1).await;
    let pipeline_job = queue::enqueue(
        &s.ctx,
        "user-2",
        JobRequest {
            target: "pipeline".into(),
            input: json!({
                "business": agents::samples::sample_input(Process::MagicSpark, 2)
            }),
            priority: Priority::Low,
            session_id: Some("session-9".into()),
        },
    )
    .await
    .unwrap();
    assert_eq!(pipeline_job.status, JobStatus::Queued);
    assert_eq!(s.status(&agent_job).await.status, JobStatus::Queued);

    let worker = Worker::new(s.ctx.clone(), s.engine.clone(), fast_worker());
    let mut w = start(worker);
    w.until("two successes", |c| c.succeeded == 2).await;

    let v = s.status(&agent_job).await;
    assert_eq!(v.status, JobStatus::Succeeded, "{v:?}");
    assert!(
        v.result.as_ref().unwrap().get("concepts").is_some(),
        "{v:?}"
    );
    assert!(v.cost_usd > 0.0 && v.cost_micro_usd > 0, "{v:?}");
    assert_eq!((v.attempts, v.runs), (1, 1));
    assert!(v.queue_latency_ms.is_some() && v.started_at.is_some() && v.finished_at.is_some());
    assert!(v.error.is_none());

    let p = s.status(&pipeline_job.job_id).await;
    assert_eq!(p.status, JobStatus::Succeeded, "{p:?}");
    let result = p.result.unwrap();
    assert!(result.get("tool").is_some());
    let rollup_usd = result["rollup"]["costUsd"].as_f64().unwrap();
    assert!(
        (p.cost_usd - rollup_usd).abs() < 1e-12,
        "job cost is the run's cost"
    );

    // Every model call was recorded (one or more for the agent, four or more for the pipeline).
    let (health, ok) = s.tracker.wait_for(WAIT, |h| h.durable >= 5).await;
    assert!(ok, "{health:?}");
    eventually("both messages deleted", || async {
        s.depth(&s.urls.queue_url).await == 0
    })
    .await;
    let counts = w.stop().await;
    assert_eq!((counts.failed, counts.poison, counts.retried), (0, 0, 0));
}

#[tokio::test]
async fn a_message_delivered_twice_runs_once() {
    let s = Setup::new("twice", Duration::from_secs(5)).await;
    let job = s.enqueue(Process::LogicArchitect, 3).await;
    // Copy the message: the same job is now in the queue twice.
    let got = s
        .sqs
        .receive_message()
        .queue_url(&s.urls.queue_url)
        .send()
        .await
        .unwrap();
    let msg = &got.messages()[0];
    s.sqs
        .send_message()
        .queue_url(&s.urls.queue_url)
        .message_body(msg.body().unwrap())
        .send()
        .await
        .unwrap();
    s.sqs
        .change_message_visibility()
        .queue_url(&s.urls.queue_url)
        .receipt_handle(msg.receipt_handle().unwrap())
        .visibility_timeout(0)
        .send()
        .await
        .unwrap();

    let mut w = start(s.worker(fast_worker()));
    w.until("one success", |c| c.succeeded == 1).await;
    eventually("the duplicate deleted too", || async {
        s.depth(&s.urls.queue_url).await == 0
    })
    .await;
    let requests = s.sim.stats().requests_total;
    let counts = w.stop().await;
    assert_eq!(counts.succeeded, 1, "{counts:?}");
    assert!(counts.duplicates >= 1, "{counts:?}");
    let v = s.status(&job).await;
    assert_eq!((v.status, v.runs), (JobStatus::Succeeded, 1), "{v:?}");
    assert_eq!(
        s.sim.stats().requests_total,
        requests,
        "nothing ran after the success"
    );
}

#[tokio::test]
async fn a_job_that_always_fails_is_dead_lettered_after_three_receives() {
    let s = Setup::new("dlq", Duration::from_secs(5)).await;
    s.sim.push_rule(Rule::always(Fault::Http {
        status: 500,
        retry_after: None,
    }));
    let job = s.enqueue(Process::MagicSpark, 4).await;
    let mut w = start(s.worker(fast_worker()));
    w.until("dead-lettered", |c| c.dead_lettered == 1).await;

    let v = s.status(&job).await;
    assert_eq!(v.status, JobStatus::DeadLettered, "{v:?}");
    assert_eq!((v.attempts, v.runs), (3, 3), "{v:?}");
    assert!(v.error.as_deref().unwrap().contains("500"), "{v:?}");
    // SQS's redrive moves it on the next receive, which the running worker makes.
    let dead: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    eventually("the message in the DLQ", || {
        let sqs = s.sqs.clone();
        let dlq = s.urls.dlq_url.clone();
        let found = Arc::clone(&dead);
        async move {
            let out = sqs
                .receive_message()
                .queue_url(dlq)
                .wait_time_seconds(1)
                .send()
                .await
                .unwrap();
            let mut found = found.lock().unwrap();
            if let Some(m) = out.messages().first() {
                *found = m.body().map(str::to_owned);
            }
            found.is_some()
        }
    })
    .await;
    let body = dead.lock().unwrap().clone().unwrap();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["jobId"], job.as_str());
    let counts = w.stop().await;
    assert_eq!((counts.retried, counts.succeeded), (2, 0), "{counts:?}");
    assert_eq!(s.depth(&s.urls.queue_url).await, 0);
}

/// SQS behind a proxy that can turn into a black hole (accepts, never answers), reached through
/// the engine's own client with attempt and operation timeouts far below the long poll's wait:
/// the worker's long polls still run their full wait (each gets its wait on top of the client's
/// timeouts), a silent SQS makes receives fail with timeouts that are counted while the worker
/// keeps running, and jobs run again as soon as SQS answers.
#[tokio::test]
async fn a_worker_polling_a_silent_sqs_keeps_running_and_recovers_and_its_long_polls_are_not_cut() {
    let s = Setup::new("silent", Duration::from_secs(5)).await;
    let proxy = FaultProxy::start(&s.moto_endpoint).await;
    let timeouts = AwsTimeouts {
        connect: Duration::from_secs(1),
        attempt: Duration::from_millis(300),
        operation: Duration::from_millis(1_000),
    };
    let ctx = JobsCtx {
        sqs: queue::configure(&moto::sdk_config().await, Some(&proxy.endpoint), &timeouts),
        ..s.ctx.clone()
    };
    let wait = Duration::from_secs(2);
    let mut w = start(Worker::new(
        ctx,
        s.engine.clone(),
        WorkerConfig {
            wait_time: wait,
            ..fast_worker()
        },
    ));

    // An empty queue: every receive is a 2 s long poll, past both client-wide timeouts. Over
    // two polls' time none of them failed.
    tokio::time::sleep(wait + wait / 4).await;
    assert_eq!(w.progress.borrow().receive_errors, 0, "a long poll was cut");
    let first = s.enqueue(Process::MagicSpark, 1).await;
    w.until("the first job", |c| c.succeeded == 1).await;
    eventually("the first message deleted", || async {
        s.depth(&s.urls.queue_url).await == 0
    })
    .await;

    proxy.set_black_hole(true);
    let counts = w
        .until("two failed receives", |c| c.receive_errors >= 2)
        .await;
    assert!(!w.handle.is_finished(), "the worker must keep running");
    assert_eq!(counts.errors, 0, "{counts:?}");
    assert!(
        proxy.held_connections() >= 2,
        "receives reached the black hole"
    );

    proxy.set_black_hole(false);
    let second = s.enqueue(Process::MagicSpark, 2).await;
    w.until("the second job", |c| c.succeeded == 2).await;
    for job in [first, second] {
        assert_eq!(s.status(&job).await.status, JobStatus::Succeeded);
    }
    let counts = w.stop().await;
    assert_eq!(
        (counts.received, counts.failed, counts.errors),
        (2, 0, 0),
        "{counts:?}"
    );
}

#[tokio::test]
async fn a_poison_message_does_not_stop_other_jobs() {
    let s = Setup::new("poison", Duration::from_secs(5)).await;
    for body in [
        "this is not JSON".to_owned(),
        json!({
            "messageType": "AI_PROCESSING", "jobId": "poison-1", "userId": "u",
            "process": "sparkle", "input": {}, "priority": "normal", "timestamp": 1
        })
        .to_string(),
    ] {
        s.sqs
            .send_message()
            .queue_url(&s.urls.queue_url)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }
    let good = s.enqueue(Process::StyleMaster, 5).await;
    let mut w = start(s.worker(fast_worker()));
    w.until("both poisons and the good job", |c| {
        c.poison == 2 && c.succeeded == 1
    })
    .await;

    assert_eq!(s.status(&good).await.status, JobStatus::Succeeded);
    let p = s.status("poison-1").await;
    assert_eq!(p.status, JobStatus::Failed);
    assert!(p.error.as_deref().unwrap().contains("sparkle"), "{p:?}");
    // Both went straight to the DLQ, each with its reason.
    let out = s
        .sqs
        .receive_message()
        .queue_url(&s.urls.dlq_url)
        .max_number_of_messages(10)
        .message_attribute_names("All")
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    assert_eq!(out.messages().len(), 2, "{out:?}");
    for m in out.messages() {
        let reason = m.message_attributes().unwrap()["keyvexFailureReason"]
            .string_value()
            .unwrap();
        assert!(reason.contains("poison message"), "{reason}");
    }
    let counts = w.stop().await;
    assert_eq!(
        counts.received, 3,
        "each message was received once: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_queue_and_run_each_of_fifty_jobs_once() {
    let s = Setup::new("fifty", Duration::from_secs(5)).await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(s.enqueue(Process::MagicSpark, 100 + i).await);
    }
    let mut a = start(s.worker(fast_worker()));
    let mut b = start(s.worker(fast_worker()));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let done = a.progress.borrow().succeeded + b.progress.borrow().succeeded;
        if done >= 50 {
            break;
        }
        tokio::select! {
            _ = a.progress.changed() => {}
            _ = b.progress.changed() => {}
            () = tokio::time::sleep_until(deadline) => panic!(
                "only {done} of 50 jobs done: {:?} {:?}", *a.progress.borrow(), *b.progress.borrow()
            ),
        }
    }
    let (ca, cb) = (a.stop().await, b.stop().await);
    assert_eq!(ca.succeeded + cb.succeeded, 50, "{ca:?} {cb:?}");
    for id in &ids {
        let v = s.status(id).await;
        assert_eq!((v.status, v.runs), (JobStatus::Succeeded, 1), "{v:?}");
    }
    assert_eq!(s.depth(&s.urls.queue_url).await, 0);
    eprintln!(
        "worker a ran {}, worker b ran {}; simulator served {} requests",
        ca.succeeded,
        cb.succeeded,
        s.sim.stats().requests_total
    );
}

#[tokio::test]
async fn cancelling_mid_job_releases_it_to_another_worker() {
    // Long TTFT deadline: the job must be in flight, not failing, when the worker is cancelled.
    let s = Setup::new("cancel", Duration::from_secs(60)).await;
    s.sim
        .push_rule(Rule::always(Fault::SlowFirstToken(Duration::from_secs(60))));
    let job = s.enqueue(Process::MagicSpark, 6).await;
    let a = start(s.worker(WorkerConfig {
        shutdown_grace: Duration::from_millis(300),
        ..fast_worker()
    }));
    eventually("the job running", || async {
        s.status(&job).await.status == JobStatus::Running
    })
    .await;
    let stopped = tokio::time::Instant::now();
    let counts = a.stop().await;
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(counts.released, 1, "{counts:?}");
    let v = s.status(&job).await;
    assert_eq!((v.status, v.runs), (JobStatus::Queued, 1), "{v:?}");

    // Released with visibility 0: another worker takes it at once and finishes it.
    s.sim.clear_rules();
    let mut b = start(s.worker(fast_worker()));
    b.until("the released job done", |c| c.succeeded == 1).await;
    b.stop().await;
    let v = s.status(&job).await;
    assert_eq!(
        (v.status, v.runs, v.attempts),
        (JobStatus::Succeeded, 2, 2),
        "{v:?}"
    );
}

#[tokio::test]
async fn cancelling_lets_a_short_job_in_flight_finish() {
    let s = Setup::new("drain", Duration::from_secs(10)).await;
    s.sim
        .push_rule(Rule::always(Fault::SlowFirstToken(Duration::from_millis(
            800,
        ))));
    let job = s.enqueue(Process::MagicSpark, 7).await;
    let a = start(s.worker(fast_worker()));
    eventually("the job running", || async {
        s.status(&job).await.status == JobStatus::Running
    })
    .await;
    let counts = a.stop().await;
    assert_eq!((counts.succeeded, counts.released), (1, 0), "{counts:?}");
    assert_eq!(s.status(&job).await.status, JobStatus::Succeeded);
    assert_eq!(s.depth(&s.urls.queue_url).await, 0);
}

/// The worker inside the server (`serve --with-worker`), stopped while a job's model call is
/// still streaming: after the short grace the job is released, and the call cut by the abort is
/// recorded exactly once, as cancelled, for the job's owner, with the job as its run and
/// correlation and the process as its stage. (The abort drops the engine's stream; the record
/// comes from its `Drop` with the context given when the call opened. Before the engine did
/// this, the record said user "unknown" and had no run.)
#[tokio::test]
async fn a_job_aborted_mid_stream_at_shutdown_records_its_call_once_as_cancelled_for_its_owner() {
    let queue = MotoQueue::start("abort", Duration::from_secs(5)).await;
    let mut spec = Spec::new(13);
    spec.queue = Some(queue.for_server());
    spec.worker = Some(WorkerConfig {
        shutdown_grace: Duration::from_millis(300),
        ..fast_worker()
    });
    let mut h = TestServer::sqlite(spec).await;
    let progress = h.progress.take().expect("the server runs a worker");
    // Slow output: minutes for a whole answer, so the call is mid-stream at the stop.
    h.sim.push_rule(Rule::always(Fault::Latency {
        ttft: Duration::ZERO,
        tokens_per_sec: 5.0,
    }));
    let resp = h
        .post("/v1/jobs", ALICE)
        .json(&json!({
            "target": "magicSpark",
            "input": agents::samples::sample_input(Process::MagicSpark, 8),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let accepted: serde_json::Value = resp.json().await.unwrap();
    let job_id = accepted["jobId"].as_str().unwrap().to_owned();
    eventually("the job's model call streaming", || async {
        h.sim.stats().streams_open == 1
    })
    .await;
    let job = h.get_json(&format!("/v1/jobs/{job_id}"), ALICE).await;
    assert_eq!(job["status"], "running", "{job}");
    assert_eq!(h.sim.stats().requests_total, 1);

    let stopped = tokio::time::Instant::now();
    let done = h.stop().await;
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "the grace is 300 ms: {:?}",
        stopped.elapsed()
    );
    assert!(done.report.ledger_flushed, "{:?}", done.report);
    assert_eq!(done.report.left_in_ledger, 0, "{:?}", done.report);
    let counts = progress.borrow().clone();
    assert_eq!(
        (counts.received, counts.released, counts.succeeded),
        (1, 1, 0),
        "{counts:?}"
    );

    let rows = stored_records(&done.db);
    assert_eq!(rows.len(), 1, "one call, recorded once: {rows:?}");
    let rec = &rows[0];
    assert_eq!(rec["status"], "cancelled", "{rec}");
    assert_eq!(rec["success"], false, "{rec}");
    assert_eq!(
        rec["userId"], "alice",
        "the job's owner, not \"unknown\": {rec}"
    );
    assert_eq!(rec["runId"], job_id.as_str(), "{rec}");
    assert_eq!(rec["correlationId"], job_id.as_str(), "{rec}");
    assert_eq!(rec["stage"], "magicSpark", "{rec}");
    assert_eq!(rec["process"], "magicSpark", "{rec}");
    assert!(
        rec["outputTokens"].as_u64().unwrap() > 0,
        "mid-stream: {rec}"
    );

    // Released, not failed: queued again for another worker, after one run.
    let jobs = SqliteJobs::open(&done.db).unwrap();
    let job = JobStore::Sqlite(jobs).get(&job_id).await.unwrap().unwrap();
    assert_eq!((job.status, job.runs), (JobStatus::Queued, 1), "{job:?}");
    assert_eq!(job.user_id, "alice");
}
