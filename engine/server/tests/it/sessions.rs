//! The session routes over a real socket: a session holds its input and output as soon as the
//! run is `done` (read from the ledger before anything ships), only its owner (or an admin) can
//! read or write it, and a pipeline run fills one session with every stage's output.

use std::time::Duration;

use keyvex_testkit::{business, error_of, last, read_sse};
use serde_json::json;

use crate::support::{ADMIN, ALICE, BOB, Spec, TestServer};

#[tokio::test]
async fn sessions_hold_input_and_output_right_after_done_for_their_owner_only() {
    // Shipping every minute: the reads right after `done` must find the messages in the ledger.
    let mut spec = Spec::new(5);
    spec.flush = Duration::from_secs(60);
    let h = TestServer::sqlite(spec).await;
    let (request_id, events) = h
        .run_agent(
            "magic-spark",
            ALICE,
            json!({ "input": business(), "sessionId": "sess-a" }),
        )
        .await;
    assert_eq!(events.last().unwrap().0, "done");
    assert_eq!(last(&events, "done")["status"], "succeeded");
    let output = last(&events, "result")["output"].clone();

    let session = h.get_json("/v1/sessions/sess-a", ALICE).await;
    assert_eq!(session["messageCount"], 2, "{session}");
    assert_eq!(session["metadata"]["userId"], "alice");
    let msgs = session["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[0]["content"], business());
    assert_eq!(msgs[0]["process"], "magicSpark");
    assert_eq!(msgs[0]["requestId"], request_id.as_str());
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["content"], output);
    assert_eq!(h.tracker.health().shipped, 0, "read from the ledger");

    // Another user's key: the same 404 as a session that does not exist.
    let theirs = error_of(h.get("/v1/sessions/sess-a", BOB).await, 404).await;
    let missing = error_of(h.get("/v1/sessions/no-such", BOB).await, 404).await;
    assert_eq!(theirs["code"], "session_not_found");
    assert_eq!(theirs["code"], missing["code"]);
    assert_eq!(h.get_json("/v1/sessions/sess-a", ADMIN).await, session);

    // Nor can another user write into it: refused before anything runs or is recorded, on
    // both routes that take a sessionId.
    let requests_before = h.sim.stats().requests_total;
    let bobs_write = h
        .post("/v1/agents/magic-spark", BOB)
        .json(&json!({ "input": business(), "sessionId": "sess-a" }))
        .send()
        .await
        .unwrap();
    let e = error_of(bobs_write, 403).await;
    assert!(
        e["message"].as_str().unwrap().contains("another caller"),
        "{e}"
    );
    let bobs_run = h
        .post("/v1/pipelines/tool", BOB)
        .json(&json!({ "business": business(), "sessionId": "sess-a" }))
        .send()
        .await
        .unwrap();
    error_of(bobs_run, 403).await;
    assert_eq!(
        h.sim.stats().requests_total,
        requests_before,
        "no model was called"
    );
    assert_eq!(h.get_json("/v1/sessions/sess-a", ALICE).await, session);
    // The owner may add to it.
    let (_, events) = h
        .run_agent(
            "magic-spark",
            ALICE,
            json!({ "input": business(), "sessionId": "sess-a" }),
        )
        .await;
    assert_eq!(last(&events, "done")["status"], "succeeded");
    let grown = h.get_json("/v1/sessions/sess-a", ALICE).await;
    assert_eq!(grown["messageCount"], 4, "{grown}");

    let mine = h.get_json("/v1/sessions?limit=5", ALICE).await;
    assert_eq!(mine["sessions"][0]["sessionId"], "sess-a", "{mine}");
    let bobs = h.get_json("/v1/sessions", BOB).await;
    assert_eq!(bobs["sessions"], json!([]));
    let e = error_of(h.get("/v1/sessions?limit=0", ALICE).await, 400).await;
    assert_eq!(e["param"], "limit");
    let bad = h
        .post("/v1/agents/magic-spark", ALICE)
        .json(&json!({ "input": business(), "sessionId": "" }))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad, 400).await["param"], "sessionId");

    // The pipeline: the business, then each stage's validated output, all in one run.
    let resp = h
        .post("/v1/pipelines/tool", ALICE)
        .json(&json!({ "business": business(), "sessionId": "sess-p" }))
        .send()
        .await
        .unwrap();
    let events = read_sse(resp).await;
    assert_eq!(last(&events, "done")["status"], "succeeded");
    let run_id = last(&events, "run")["runId"].clone();
    let session = h.get_json("/v1/sessions/sess-p", ALICE).await;
    let msgs = session["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 5, "{session}");
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[0]["content"], business());
    let stages: Vec<&str> = msgs[1..]
        .iter()
        .map(|m| {
            assert_eq!(m["role"], "assistant");
            m["stage"].as_str().unwrap()
        })
        .collect();
    assert_eq!(&stages[..2], ["magicSpark", "logicArchitect"], "{stages:?}");
    assert!(msgs.iter().all(|m| m["runId"] == run_id));
    h.stop().await;
}
