//! `keyvex worker` as operators run it — the built binary against SQS on moto and a simulator
//! the test holds — on the same assembled engine as `keyvex serve`: a job whose model call is cut
//! by SIGTERM (no grace left) has that call recorded once as cancelled, with the job's caller,
//! run and stage; and the process-wide provider budget holds for jobs, so with one request per
//! minute the second job's call goes to the fallback on the other provider.

use std::process::{Child, Stdio};
use std::time::Duration;

use keyvex_sim::{Fault, Rule, SimHandle};
use keyvex_testkit::moto::Moto;
use keyvex_testkit::{TempDir, fast_sim};
use serde_json::Value;

use crate::cli_support::{keyvex, records, signal, stdout_of, wait_until};

/// A fresh queue pair on moto; returns the queue URL (what `keyvex queue create` prints).
fn create_queue(sim: &SimHandle, db: &std::path::Path, moto: &Moto, tag: &str) -> String {
    let name = format!("jobs-{tag}-{}", uuid::Uuid::new_v4().simple());
    stdout_of(
        keyvex(sim, db)
            .env("SQS_ENDPOINT", &moto.endpoint)
            .args(["queue", "create", "--name", &name, "--dlq-name"])
            .arg(format!("{name}-dlq")),
    )
}

/// `keyvex queue enqueue magicSpark` as `user`; returns the job id.
fn enqueue(sim: &SimHandle, db: &std::path::Path, moto: &Moto, queue: &str, user: &str) -> String {
    let input = serde_json::to_string(&keyvex_testkit::business()).unwrap();
    stdout_of(
        keyvex(sim, db)
            .env("SQS_ENDPOINT", &moto.endpoint)
            .env("SQS_AI_PROCESSING_QUEUE_URL", queue)
            .args([
                "queue",
                "enqueue",
                "magicSpark",
                "--user",
                user,
                "--json",
                &input,
            ]),
    )
}

/// `keyvex worker` on `queue`, with `extra` environment.
fn worker(
    sim: &SimHandle,
    db: &std::path::Path,
    moto: &Moto,
    queue: &str,
    grace_secs: u64,
    extra: &[(&str, &str)],
) -> Child {
    let mut cmd = keyvex(sim, db);
    cmd.env("SQS_ENDPOINT", &moto.endpoint)
        .env("SQS_AI_PROCESSING_QUEUE_URL", queue)
        .env("KEYVEX_WORKER_CONCURRENCY", "1")
        .args(["worker", "--shutdown-grace-secs", &grace_secs.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// A job's state as `keyvex queue status` prints it.
fn status(
    sim: &SimHandle,
    db: &std::path::Path,
    moto: &Moto,
    queue: &str,
    job: &str,
) -> Option<Value> {
    let output = keyvex(sim, db)
        .env("SQS_ENDPOINT", &moto.endpoint)
        .env("SQS_AI_PROCESSING_QUEUE_URL", queue)
        .args(["queue", "status", job])
        .output()
        .unwrap();
    output
        .status
        .success()
        .then(|| serde_json::from_slice(&output.stdout).unwrap())
}

/// SIGTERM, then the exit and everything the worker printed.
async fn stop(mut child: Child) -> String {
    signal(child.id(), "-TERM");
    let output = tokio::task::spawn_blocking(move || {
        let stderr = child.stderr.take();
        let status = child.wait().unwrap();
        let mut text = String::new();
        if let Some(mut e) = stderr {
            use std::io::Read;
            e.read_to_string(&mut text).unwrap();
        }
        (status, text)
    })
    .await
    .unwrap();
    assert!(
        output.0.success(),
        "worker exit {:?}: {}",
        output.0,
        output.1
    );
    output.1
}

#[tokio::test]
async fn a_job_cut_by_sigterm_records_its_call_with_the_jobs_caller_run_and_stage() {
    let moto = Moto::start().await;
    let sim = fast_sim(51).await;
    // The job's one model call streams for seconds: it is mid-stream when the worker stops.
    sim.push_rule(Rule::always(Fault::Latency {
        ttft: Duration::from_millis(20),
        tokens_per_sec: 50.0,
    }));
    let dir = TempDir::new("cli-worker-abort");
    let db = dir.file("metrics.sqlite3");
    let queue = create_queue(&sim, &db, &moto, "abort");
    let job = enqueue(&sim, &db, &moto, &queue, "alice");
    let child = worker(&sim, &db, &moto, &queue, 0, &[]);
    wait_until(
        "the job's model call to stream",
        Duration::from_secs(60),
        || sim.stats().streams_open >= 1,
    )
    .await;
    // Let the open stream deliver some content first (its first token comes after 20 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = stop(child).await;
    assert!(log.contains("released"), "{log}");

    let records = records(&db);
    let [rec] = records.as_slice() else {
        panic!("exactly one record for the cut call: {records:#?}\n{log}");
    };
    assert_eq!(rec["status"], "cancelled", "{rec}");
    assert_eq!(rec["userId"], "alice", "{rec}");
    assert_eq!(rec["runId"], job.as_str(), "{rec}");
    assert_eq!(rec["correlationId"], job.as_str(), "{rec}");
    assert_eq!(rec["stage"], "magicSpark", "{rec}");
    assert_eq!(rec["costEstimated"], true, "{rec}");
    // Released, not failed: another worker takes it over.
    let state = status(&sim, &db, &moto, &queue, &job).unwrap();
    assert_eq!(state["status"], "queued", "{state}");
    sim.shutdown().await;
}

#[tokio::test]
async fn with_one_request_per_minute_the_second_jobs_call_goes_to_the_fallback() {
    let moto = Moto::start().await;
    let sim = fast_sim(52).await;
    let dir = TempDir::new("cli-worker-budget");
    let db = dir.file("metrics.sqlite3");
    let queue = create_queue(&sim, &db, &moto, "budget");
    let first = enqueue(&sim, &db, &moto, &queue, "bob");
    let second = enqueue(&sim, &db, &moto, &queue, "bob");
    let child = worker(&sim, &db, &moto, &queue, 5, &[("KEYVEX_PROVIDER_RPM", "1")]);
    for job in [&first, &second] {
        wait_until("both jobs to succeed", Duration::from_secs(60), || {
            status(&sim, &db, &moto, &queue, job).is_some_and(|s| s["status"] == "succeeded")
        })
        .await;
    }
    let log = stop(child).await;

    let records = records(&db);
    assert_eq!(records.len(), 2, "{records:#?}\n{log}");
    let catalog = keyvex_engine::Catalog::embedded().unwrap();
    let route = catalog.route(keyvex_engine::Process::MagicSpark);
    let primary = records
        .iter()
        .find(|r| r["model"] == route.primary.as_str())
        .unwrap_or_else(|| panic!("one job ran on the primary: {records:#?}"));
    assert_eq!(primary["attempts"], 1, "{primary}");
    let fallback = records
        .iter()
        .find(|r| r["model"] == route.fallback.as_str())
        .unwrap_or_else(|| panic!("the other ran on the fallback: {records:#?}"));
    assert_eq!(fallback["fallbackUsed"], true, "{fallback}");
    // `attempts` counts the calls that reached a model: the refused one sent nothing.
    assert_eq!(fallback["attempts"], 1, "only the fallback was called");
    assert_eq!(fallback["status"], "succeeded");
    // The refused attempt sent nothing: the simulator served exactly two requests.
    assert_eq!(sim.stats().requests_total, 2);
    sim.shutdown().await;
}
