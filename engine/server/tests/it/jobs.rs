//! `POST /v1/jobs` and `GET /v1/jobs/{id}` over a real socket, with the queue on moto's SQS and
//! the worker inside the server (`serve --with-worker`): bad jobs never become messages, a good
//! one runs to its result and writes its session, a job into someone else's session is refused,
//! and only its owner (or an admin) sees it. An SQS endpoint that never answers makes a job
//! submission a prompt 503, not a hung request.

use std::time::Duration;

use keyvex_server::queue;
use keyvex_store::AwsTimeouts;
use keyvex_testkit::fault_proxy::FaultProxy;
use keyvex_testkit::moto;
use keyvex_testkit::{business, error_of};
use serde_json::{Value, json};

use crate::support::{
    ADMIN, ALICE, BOB, MotoQueue, Queue, Spec, TestServer, WAIT, depth, fast_worker, stored_records,
};

#[tokio::test]
async fn jobs_run_on_the_in_process_worker_and_only_their_owner_sees_them() {
    let queue = MotoQueue::start("api-jobs", Duration::from_secs(5)).await;
    let mut spec = Spec::new(5);
    spec.queue = Some(queue.for_server());
    spec.worker = Some(fast_worker());
    let mut h = TestServer::sqlite(spec).await;
    let mut progress = h.progress.take().expect("the server runs a worker");
    let (sqs, queue_url) = (&queue.sqs, &queue.urls.queue_url);

    // Refused inputs never become messages.
    let bad = error_of(
        h.post("/v1/jobs", ALICE)
            .json(&json!({ "target": "magicSpark", "input": { "industry": "x" } }))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert_eq!(bad["code"], "invalid_job");
    let unknown = error_of(
        h.post("/v1/jobs", ALICE)
            .json(&json!({ "target": "sparkle", "input": business() }))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(
        unknown["message"].as_str().unwrap().contains("sparkle"),
        "{unknown}"
    );
    let extra = error_of(
        h.post("/v1/jobs", ALICE)
            .json(&json!({ "target": "magicSpark", "input": business(), "nope": 1 }))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert_eq!(extra["code"], "invalid_field");
    assert_eq!(depth(sqs, queue_url).await, 0, "nothing was sent");

    let resp = h
        .post("/v1/jobs", ALICE)
        .json(&json!({
            "target": "magicSpark", "input": business(), "priority": "high", "sessionId": "s-job-1",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let accepted: Value = resp.json().await.unwrap();
    assert_eq!(accepted["status"], "queued");
    let job_id = accepted["jobId"].as_str().unwrap().to_owned();

    let counts = tokio::time::timeout(WAIT, progress.wait_for(|c| c.succeeded >= 1))
        .await
        .expect("the in-process worker finished the job")
        .unwrap()
        .clone();
    assert_eq!(counts.received, 1, "{counts:?}");

    let job = h.get_json(&format!("/v1/jobs/{job_id}"), ALICE).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["process"], "magicSpark");
    assert!(job["result"]["concepts"].is_array(), "{job}");
    assert!(job["costMicroUsd"].as_u64().unwrap() > 0, "{job}");
    assert!(job["finishedAt"].is_string());
    // The job wrote its session like the direct route: the input, then the validated output.
    let session = h.get_json("/v1/sessions/s-job-1", ALICE).await;
    let messages = session["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant"], "{session}");
    assert!(
        messages.iter().all(|m| m["requestId"] == job_id.as_str()),
        "{session}"
    );
    assert_eq!(messages[1]["content"], job["result"]);
    // Another caller cannot queue a job into that session: refused before anything is sent.
    let depth_before = depth(sqs, queue_url).await;
    let refused = h
        .post("/v1/jobs", BOB)
        .json(&json!({ "target": "magicSpark", "input": business(), "sessionId": "s-job-1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(
        depth(sqs, queue_url).await,
        depth_before,
        "nothing was sent"
    );
    let theirs = error_of(h.get(&format!("/v1/jobs/{job_id}"), BOB).await, 404).await;
    assert_eq!(theirs["code"], "job_not_found");
    let admin_view = h.get_json(&format!("/v1/jobs/{job_id}"), ADMIN).await;
    assert_eq!(admin_view["id"], job_id.as_str());
    error_of(h.get("/v1/jobs/no-such-job", ALICE).await, 404).await;

    // The job's model call went through the server's tracker.
    let (health, ok) = h.tracker.wait_for(WAIT, |m| m.durable >= 1).await;
    assert!(ok, "{health:?}");
    let stopped = h.stop().await;
    assert!(stopped.report.ledger_flushed, "{:?}", stopped.report);
    assert_eq!(
        progress.borrow().received,
        1,
        "nothing else reached the worker"
    );
    // Recorded as the job's owner, with the job as its run and correlation, and the process
    // as its stage.
    let rows = stored_records(&stopped.db);
    let job_records: Vec<_> = rows
        .iter()
        .filter(|r| r["runId"] == job_id.as_str())
        .collect();
    assert!(!job_records.is_empty(), "{rows:?}");
    for r in job_records {
        assert_eq!(r["userId"], "alice", "{r}");
        assert_eq!(r["correlationId"], job_id.as_str(), "{r}");
        assert_eq!(r["stage"], "magicSpark", "{r}");
        assert_eq!(r["status"], "succeeded", "{r}");
    }
}

/// SQS that accepts connections and never answers (moto behind a black hole): `POST /v1/jobs`
/// ends within the SQS client's operation timeout with a 503 naming the timeout, instead of
/// hanging the caller, and the next job goes through once SQS answers again.
#[tokio::test]
async fn a_silent_sqs_endpoint_makes_post_jobs_a_503_naming_the_timeout_not_a_hang() {
    let queue = MotoQueue::start("api-silent", Duration::from_secs(5)).await;
    let proxy = FaultProxy::start(&queue.moto.endpoint).await;
    let timeouts = AwsTimeouts {
        connect: Duration::from_secs(1),
        attempt: Duration::from_millis(300),
        operation: Duration::from_millis(1_000),
    };
    let mut spec = Spec::new(5);
    spec.queue = Some(Queue {
        sqs: queue::configure(&moto::sdk_config().await, Some(&proxy.endpoint), &timeouts),
        queue_url: queue.urls.queue_url.clone(),
    });
    let h = TestServer::sqlite(spec).await;
    let job = json!({ "target": "magicSpark", "input": business() });

    proxy.set_black_hole(true);
    let started = tokio::time::Instant::now();
    let resp = tokio::time::timeout(WAIT, h.post("/v1/jobs", ALICE).json(&job).send())
        .await
        .expect("the route must answer, not hang")
        .unwrap();
    let took = started.elapsed();
    let err = error_of(resp, 503).await;
    assert_eq!(err["code"], "queue_unavailable", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("SendMessage timed out") && message.contains("retry"),
        "{message}"
    );
    assert!(
        took < timeouts.operation + Duration::from_secs(1),
        "the operation timeout did not bound the send: {took:?}"
    );
    assert!(
        proxy.held_connections() >= 1,
        "the send reached the black hole"
    );

    proxy.set_black_hole(false);
    let resp = h.post("/v1/jobs", ALICE).json(&job).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(depth(&queue.sqs, &queue.urls.queue_url).await, 1);
}
