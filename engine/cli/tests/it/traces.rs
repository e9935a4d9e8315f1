//! OpenTelemetry traces as an operator gets them: the built binary exporting over OTLP/HTTP to
//! a receiver in the test that decodes the protobuf the way a collector does. One pipeline run
//! is one trace under the caller's `traceparent`: request → pipeline → stages → routed calls →
//! provider attempts, with the GenAI attributes and the token counts the records hold, and the
//! fallback the simulator forced as an event, like the rescue of a stream it cut mid-answer. A
//! queued job joins the trace of the request that
//! enqueued it across the server and the worker. With the receiver gone, requests still succeed
//! and the lost spans are counted in `/metrics`.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use keyvex_sim::{Fault, Rule, SimHandle};
use keyvex_testkit::moto::Moto;
use keyvex_testkit::{TempDir, fast_sim, read_sse};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::Event;
use prost::Message as _;
use serde_json::{Value, json};

use crate::cli_support::{
    get_json, keyvex, prometheus_text, records, signal, stdout_of, wait_until,
};

const KEY: &str = "kv-traces-alice";
const ADMIN: &str = "kv-traces-admin";
/// The caller's own trace: every span of the run must join it.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{TRACE_ID}-{CALLER_SPAN}-01")
}

/// One exported span with the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    span: Span,
}

impl Got {
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    fn id(&self) -> String {
        hex(&self.span.span_id)
    }
    fn parent(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    fn attr(&self, key: &str) -> Option<&Any> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }
    fn text(&self, key: &str) -> Option<String> {
        string_attr(&self.span.attributes, key)
    }
    fn int(&self, key: &str) -> Option<i64> {
        match self.attr(key)? {
            Any::IntValue(n) => Some(*n),
            _ => None,
        }
    }
    fn children<'a>(&self, all: &'a [Got]) -> Vec<&'a Got> {
        all.iter().filter(|g| g.parent() == self.id()).collect()
    }
    /// The span's event called `name`; the test fails naming the span if there is none.
    fn event(&self, name: &str) -> &Event {
        self.span
            .events
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no {name} event: {self:#?}"))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP trace receiver on loopback: decodes each `ExportTraceServiceRequest` and keeps
/// its spans.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<Got>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans: Arc<Mutex<Vec<Got>>> = Arc::default();
        let kept = Arc::clone(&spans);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
                let kept = Arc::clone(&kept);
                async move {
                    assert_eq!(headers["content-type"], "application/x-protobuf");
                    let request = ExportTraceServiceRequest::decode(body).unwrap();
                    let mut kept = kept.lock().unwrap();
                    for resource in request.resource_spans {
                        let service = resource
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|kv| kv.key == "service.name")
                            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                Any::StringValue(s) => Some(s.clone()),
                                _ => None,
                            })
                            .unwrap_or_default();
                        for scope in resource.scope_spans {
                            for span in scope.spans {
                                kept.push(Got {
                                    service: service.clone(),
                                    span,
                                });
                            }
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { endpoint, spans }
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until a span named `name` (and holding `check`) has arrived; returns all spans.
    async fn wait_for(&self, name: &str, check: impl Fn(&Got) -> bool) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !self.spans().iter().any(|g| g.span.name == name && check(g)) {
            if tokio::time::Instant::now() > deadline {
                let seen: Vec<_> = self.spans().into_iter().map(|g| g.span.name).collect();
                panic!("timed out waiting for the span {name}; received {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.spans()
    }
}

/// A running `keyvex` process (killed on drop) with its stderr kept.
struct Proc {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `cmd`; for `serve`, waits for the address it prints.
    fn spawn(mut cmd: Command, serve: bool) -> Proc {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let lines = Arc::clone(&log);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("keyvex: listening on ") {
                    let _ = addr_tx.send(addr.to_owned());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let mut proc = Proc {
            child,
            base: String::new(),
            log,
        };
        if serve {
            proc.base = addr_rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("keyvex serve printed no address: {:?}", proc.log()));
        }
        proc
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// `keyvex serve` against `sim`, exporting traces to `endpoint` every 100 ms.
fn serve(sim: &SimHandle, db: &Path, endpoint: &str, extra: &[(&str, &str)]) -> Proc {
    let mut cmd = keyvex(sim, db);
    cmd.args(["serve", "--addr", "127.0.0.1:0"])
        .env(
            "KEYVEX_API_KEYS",
            format!("{KEY}=alice:user,{ADMIN}=ops:admin"),
        )
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "2000")
        .env("RUST_LOG", "warn");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Proc::spawn(cmd, true)
}

/// Every attempt span of the run under its route, every route under a stage: (model, input
/// tokens, output tokens) of each attempt, sorted.
fn attempts_of(all: &[Got], parents: &[&Got]) -> Vec<(String, i64, i64)> {
    let mut out = Vec::new();
    for stage in parents {
        for route in stage.children(all) {
            assert_eq!(
                route.span.name,
                format!("route {}", stage_key(stage)),
                "{route:?}"
            );
            for attempt in route.children(all) {
                let model = attempt.text("gen_ai.request.model").unwrap();
                assert_eq!(attempt.span.name, format!("chat {model}"));
                assert_eq!(
                    attempt.text("gen_ai.operation.name").as_deref(),
                    Some("chat")
                );
                let provider = attempt.text("gen_ai.provider.name").unwrap();
                assert!(
                    ["openai", "anthropic"].contains(&provider.as_str()),
                    "{provider}"
                );
                out.push((
                    model,
                    attempt.int("gen_ai.usage.input_tokens").unwrap(),
                    attempt.int("gen_ai.usage.output_tokens").unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn stage_key(stage: &Got) -> String {
    stage.text("keyvex.process").unwrap()
}

/// (model, input, output) of every call record, sorted: what the attempt spans must say.
fn record_tokens(records: &[Value]) -> Vec<(String, i64, i64)> {
    let mut out: Vec<_> = records
        .iter()
        .map(|r| {
            (
                r["model"].as_str().unwrap().to_owned(),
                r["inputTokens"].as_i64().unwrap(),
                r["outputTokens"].as_i64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn one_pipeline_run_is_one_trace_with_stages_attempts_tokens_and_the_forced_fallback() {
    let receiver = Receiver::start().await;
    let sim = fast_sim(181).await;
    // Magic Spark's primary is out of credit: the router must fall back to its other model.
    sim.push_rule(Rule {
        model: Some("claude-sonnet-4-6".into()),
        ..Rule::always(Fault::InsufficientQuota)
    });
    // Style Master's primary breaks once after content: its answer restarts on the fallback.
    sim.push_rule(Rule {
        model: Some("gpt-5.4-mini".into()),
        ..Rule::times(Fault::CutAfter { tokens: 6 }, 1)
    });
    let dir = TempDir::new("cli-traces-pipeline");
    let db = dir.file("metrics.sqlite3");
    let server = serve(&sim, &db, &receiver.endpoint, &[]);

    let resp = reqwest::Client::new()
        .post(format!("{}/v1/pipelines/tool", server.base))
        .bearer_auth(KEY)
        .header("traceparent", traceparent())
        .json(&json!({ "business": keyvex_testkit::business() }))
        .send()
        .await
        .unwrap();
    let events = read_sse(resp).await;
    let done = &events.last().unwrap().1;
    assert_eq!(done["status"], "succeeded", "{events:?}");

    let all = receiver
        .wait_for("POST /v1/pipelines/tool", |g| {
            g.int("http.response.status_code") == Some(200)
        })
        .await;
    // Everything the server exported for the run is in the caller's trace.
    assert!(all.iter().all(|g| g.trace_id() == TRACE_ID), "{all:#?}");
    assert!(all.iter().all(|g| g.service == "keyvex"));
    let request = all
        .iter()
        .find(|g| g.span.name == "POST /v1/pipelines/tool")
        .unwrap();
    assert_eq!(
        request.parent(),
        CALLER_SPAN,
        "the incoming traceparent is the request's parent"
    );
    assert_eq!(request.text("keyvex.caller").as_deref(), Some("alice"));
    assert!(
        request
            .span
            .attributes
            .iter()
            .all(|kv| !format!("{kv:?}").contains(KEY)),
        "the API key never reaches a span"
    );
    let [pipeline] = request.children(&all)[..] else {
        panic!(
            "one pipeline span under the request: {:#?}",
            request.children(&all)
        );
    };
    assert_eq!(pipeline.span.name, "pipeline tool");
    assert_eq!(
        pipeline.text("keyvex.outcome").as_deref(),
        Some("succeeded")
    );
    let stages = pipeline.children(&all);
    let mut names: Vec<_> = stages.iter().map(|s| s.span.name.clone()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "stage contentCrafter",
            "stage logicArchitect",
            "stage magicSpark",
            "stage styleMaster"
        ]
    );

    // The dashboard's list of slow requests leads to the trace (read once all four stages'
    // final records have shipped to the store; the retried one ships before them).
    let http = reqwest::Client::new();
    let mut notable = Value::Null;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while notable["slowest"].as_array().is_none_or(|s| s.len() < 4) {
        assert!(tokio::time::Instant::now() < deadline, "{notable}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        notable = get_json(
            &http,
            format!("{}/v1/admin/requests/notable", server.base),
            ADMIN,
        )
        .await;
    }
    let slowest = notable["slowest"].as_array().unwrap();
    assert_eq!(slowest.len(), 4, "one final record per stage: {notable}");
    assert!(
        slowest.iter().all(|r| r["traceId"] == TRACE_ID),
        "{notable}"
    );

    // Each provider call is an attempt span, with the token counts the records hold.
    let records = records(&db);
    assert_eq!(attempts_of(&all, &stages), record_tokens(&records));
    assert!(
        records.iter().all(|r| r["traceId"] == TRACE_ID),
        "{records:#?}"
    );
    let answered = all
        .iter()
        .filter(|g| g.text("gen_ai.response.model").is_some())
        .count();
    assert!(
        answered >= 4,
        "every answering attempt names its response model"
    );
    assert!(
        all.iter()
            .filter(|g| g.span.name.starts_with("chat ")
                && g.attr("gen_ai.response.finish_reasons").is_some())
            .count()
            >= 4
    );
    assert!(
        all.iter()
            .all(|g| g.attr("gen_ai.input.messages").is_none()),
        "no prompt text unless content capture is on"
    );

    // Magic Spark's route fell back, and says so as an event, after a failed attempt.
    let spark = stages
        .iter()
        .find(|s| s.span.name == "stage magicSpark")
        .unwrap();
    let route = spark.children(&all)[0];
    let fallback = route.event("fallback");
    let attr = |key: &str| string_attr(&fallback.attributes, key);
    assert_eq!(attr("from").as_deref(), Some("claude-sonnet-4-6"));
    assert_eq!(attr("to").as_deref(), Some("gpt-5.4"));
    assert_eq!(
        route.attr("keyvex.fallback_used"),
        Some(&Any::BoolValue(true))
    );
    let tried: Vec<_> = route.children(&all);
    let failed = tried
        .iter()
        .find(|a| a.text("gen_ai.request.model").as_deref() == Some("claude-sonnet-4-6"))
        .unwrap();
    assert_eq!(
        failed.text("error.type").as_deref(),
        Some("quota_exhausted")
    );

    // The route whose stream broke says it rescued it, as an event and in its outcome. That is
    // Style Master's as a rule, but Content Crafter (its primary out of credit too) falls back
    // to gpt-5.4-mini and runs beside Style Master, so on a loaded machine its request can be
    // the first to gpt-5.4-mini and take the one cut: either way exactly one route rescues.
    let rescued: Vec<(&str, &Got)> = stages
        .iter()
        .map(|s| (s.span.name.as_str(), s.children(&all)[0]))
        .filter(|(_, route)| route.span.events.iter().any(|e| e.name == "rescue"))
        .collect();
    assert_eq!(rescued.len(), 1, "one rescued route: {rescued:#?}");
    let (stage, route) = rescued[0];
    let rescue = route.event("rescue");
    let attr = |key: &str| string_attr(&rescue.attributes, key);
    assert_eq!(attr("mode").as_deref(), Some("restart"));
    assert_eq!(attr("from").as_deref(), Some("gpt-5.4-mini"));
    match stage {
        "stage styleMaster" => assert_eq!(attr("to").as_deref(), Some("claude-haiku-4-5")),
        "stage contentCrafter" => assert!(attr("to").is_some_and(|to| !to.is_empty())),
        other => panic!("{other} has no gpt-5.4-mini to cut"),
    }
    assert_eq!(route.int("keyvex.rescues"), Some(1));

    // The provider calls carried the trace onto the wire.
    let seen = sim.requests();
    assert!(!seen.is_empty());
    for request in &seen {
        let tp = request.traceparent.as_deref().unwrap_or_default();
        assert!(tp.starts_with(&format!("00-{TRACE_ID}-")), "{tp:?}");
    }
}

/// A fresh queue pair on moto; returns the queue URL.
fn create_queue(sim: &SimHandle, db: &Path, moto: &Moto) -> String {
    let name = format!("traces-{}", uuid::Uuid::new_v4().simple());
    stdout_of(
        keyvex(sim, db)
            .env("SQS_ENDPOINT", &moto.endpoint)
            .args(["queue", "create", "--name", &name, "--dlq-name"])
            .arg(format!("{name}-dlq")),
    )
}

#[tokio::test]
async fn a_queued_job_joins_the_trace_of_the_request_that_enqueued_it() {
    let moto = Moto::start().await;
    let receiver = Receiver::start().await;
    let sim = fast_sim(182).await;
    let dir = TempDir::new("cli-traces-job");
    // One store for both, as in production: the worker claims the job the server wrote.
    let api_db = dir.file("metrics.sqlite3");
    let worker_db = api_db.clone();
    let queue = create_queue(&sim, &api_db, &moto);
    let aws = [
        ("SQS_ENDPOINT", moto.endpoint.as_str()),
        ("SQS_AI_PROCESSING_QUEUE_URL", queue.as_str()),
    ];
    let server = serve(
        &sim,
        &api_db,
        &receiver.endpoint,
        &[aws[0], aws[1], ("OTEL_SERVICE_NAME", "keyvex-api")],
    );
    let mut cmd = keyvex(&sim, &worker_db);
    cmd.args(["worker"])
        .envs(aws)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_RESOURCE_ATTRIBUTES", "service.name=keyvex-worker")
        .env("RUST_LOG", "warn");
    let worker = Proc::spawn(cmd, false);

    let http = reqwest::Client::new();
    let accepted: Value = http
        .post(format!("{}/v1/jobs", server.base))
        .bearer_auth(KEY)
        .header("traceparent", traceparent())
        .json(&json!({ "target": "magicSpark", "input": keyvex_testkit::business() }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job = accepted["jobId"].as_str().unwrap().to_owned();
    receiver
        .wait_for("job magicSpark", |g| g.service == "keyvex-worker")
        .await;
    // The API exports its spans in its own batches: the worker's can arrive first.
    let all = receiver
        .wait_for("POST /v1/jobs", |g| g.service == "keyvex-api")
        .await;
    let status: Value = get_json(&http, format!("{}/v1/jobs/{job}", server.base), KEY).await;
    assert_eq!(
        status["status"],
        "succeeded",
        "{status}\n{:?}",
        worker.log()
    );

    let enqueued = all
        .iter()
        .find(|g| g.span.name == "POST /v1/jobs")
        .unwrap_or_else(|| panic!("no request span: {all:#?}"));
    assert_eq!(enqueued.service, "keyvex-api");
    assert_eq!(enqueued.trace_id(), TRACE_ID);
    assert_eq!(enqueued.parent(), CALLER_SPAN);
    let job_span = all
        .iter()
        .find(|g| g.span.name == "job magicSpark")
        .unwrap();
    assert_eq!(job_span.service, "keyvex-worker");
    assert_eq!(
        job_span.trace_id(),
        TRACE_ID,
        "the worker joins the enqueuing trace"
    );
    assert_eq!(
        job_span.parent(),
        enqueued.id(),
        "under the request that enqueued it"
    );
    let agents = job_span.children(&all);
    let agent = agents
        .iter()
        .find(|g| g.span.name == "stage magicSpark" || g.span.name == "agent magicSpark")
        .unwrap_or_else(|| panic!("no agent span under the job: {agents:#?}"));
    let attempts = attempts_of(&all, &[agent]);
    wait_until("the job's records to ship", Duration::from_secs(30), || {
        records(&worker_db).len() >= attempts.len()
    })
    .await;
    let records = records(&worker_db);
    assert_eq!(attempts, record_tokens(&records));
    assert!(
        records.iter().all(|r| r["traceId"] == TRACE_ID),
        "{records:#?}"
    );
    assert!(
        all.iter()
            .filter(|g| g.service == "keyvex-worker")
            .all(|g| g.trace_id() == TRACE_ID)
    );
    signal(worker.child.id(), "-TERM");
}

#[tokio::test]
async fn with_the_collector_down_requests_succeed_and_the_lost_spans_are_counted() {
    // A port nothing listens on: every export is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let sim = fast_sim(183).await;
    let dir = TempDir::new("cli-traces-down");
    let db = dir.file("metrics.sqlite3");
    let server = serve(&sim, &db, &endpoint, &[]);
    let http = reqwest::Client::new();
    let mut usages = 0;
    for _ in 0..2 {
        let resp = http
            .post(format!("{}/v1/pipelines/tool", server.base))
            .bearer_auth(KEY)
            .header("traceparent", traceparent())
            .json(&json!({ "business": keyvex_testkit::business() }))
            .send()
            .await
            .unwrap();
        let events = read_sse(resp).await;
        assert_eq!(
            events.last().unwrap().1["status"],
            "succeeded",
            "{events:?}"
        );
        usages += events.iter().filter(|(name, _)| name == "usage").count();
    }
    assert!(usages >= 8, "four stages a run");
    wait_until(
        "every call recorded as usual",
        Duration::from_secs(30),
        || records(&db).len() == usages,
    )
    .await;
    let dropped = || async {
        let text = prometheus_text(&http, &server.base).await;
        text.lines()
            .find(|l| l.starts_with("keyvex_otel_spans_dropped_total{reason=\"export_failed\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while dropped().await == 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dropped spans counted: {:?}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A string attribute of a span event, by key.
fn string_attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Any::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}
