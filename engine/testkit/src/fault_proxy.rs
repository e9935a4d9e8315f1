//! A fault-injecting HTTP proxy between the AWS SDK and moto (DynamoDB or SQS). It forwards
//! requests, and per a script answers BatchWriteItem with throttling errors, forwards only part
//! of a batch and reports the rest as `UnprocessedItems`, stores a batch in moto and never delivers
//! the answer, refuses every batch holding a chosen item with a
//! `ValidationException` (as DynamoDB refuses a whole request with an item over 400 KB), drops
//! every connection while an outage is on, or — as a black hole — accepts every connection and
//! never reads from it or answers while the black hole is on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::{Map, Value};
use tokio::net::{TcpListener, TcpStream};

/// What to do with the next BatchWriteItem request.
#[derive(Debug, Clone)]
pub enum Fault {
    Throttling,
    ProvisionedThroughputExceeded,
    /// Forward only the first `keep` write requests; report the rest as unprocessed.
    Partial {
        keep: usize,
    },
    /// Forward the request (moto stores the items) and never deliver the answer: the client
    /// cannot know the write happened, and sends it again.
    AnswerLost,
}

struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    script: Mutex<VecDeque<Fault>>,
    /// BatchWriteItem requests whose body contains this text are refused.
    reject: Mutex<Option<String>>,
    outage: Arc<AtomicBool>,
    black_hole: Arc<AtomicBool>,
    /// Connections accepted while the black hole is on: held open, never read, never answered.
    held: Arc<Mutex<Vec<TcpStream>>>,
    /// Item count of every BatchWriteItem request received (faulted or not).
    batch_sizes: Mutex<Vec<usize>>,
    /// Every request received, in order.
    log: Mutex<Vec<Logged>>,
}

/// One request as the proxy saw it: the DynamoDB operation and, for reads, the index used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// `Query`, `Scan`, `BatchWriteItem`, … (from `X-Amz-Target`).
    pub operation: String,
    pub index: Option<String>,
}

pub struct FaultProxy {
    pub endpoint: String,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

/// Drops accepted connections while the outage flag is on (the client sees a reset), and holds
/// them unanswered while the black hole is on (the client sees nothing at all).
struct OutageListener {
    inner: TcpListener,
    outage: Arc<AtomicBool>,
    black_hole: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl axum::serve::Listener for OutageListener {
    type Io = TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (TcpStream, std::net::SocketAddr) {
        loop {
            let Ok((stream, addr)) = self.inner.accept().await else {
                continue;
            };
            if self.outage.load(Ordering::SeqCst) {
                drop(stream);
                continue;
            }
            if self.black_hole.load(Ordering::SeqCst) {
                self.held.lock().unwrap().push(stream);
                continue;
            }
            return (stream, addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

impl FaultProxy {
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let outage = Arc::new(AtomicBool::new(false));
        let black_hole = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(ProxyState {
            upstream: upstream.to_owned(),
            http: reqwest::Client::new(),
            script: Mutex::new(VecDeque::new()),
            reject: Mutex::new(None),
            outage: Arc::clone(&outage),
            black_hole: Arc::clone(&black_hole),
            held: Arc::clone(&held),
            batch_sizes: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&state));
        let task = tokio::spawn(async move {
            let _ = axum::serve(
                OutageListener {
                    inner: listener,
                    outage,
                    black_hole,
                    held,
                },
                app,
            )
            .await;
        });
        FaultProxy {
            endpoint: format!("http://{addr}"),
            state,
            task,
        }
    }

    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.script.lock().unwrap().extend(faults);
    }

    /// From now on, refuse every BatchWriteItem request whose body contains `needle` (e.g. a
    /// request id) with a `ValidationException`, before forwarding anything of it; `None` stops.
    pub fn reject_batches_containing(&self, needle: Option<&str>) {
        *self.state.reject.lock().unwrap() = needle.map(str::to_owned);
    }

    pub fn set_outage(&self, on: bool) {
        self.state.outage.store(on, Ordering::SeqCst);
    }

    /// On: accept every new connection and leave it silent (an endpoint that hangs). Off: pass
    /// requests through again and close the connections held so far (their clients gave up
    /// long ago). Every answer closes its connection, so no pooled connection slips past.
    pub fn set_black_hole(&self, on: bool) {
        self.state.black_hole.store(on, Ordering::SeqCst);
        if !on {
            self.state.held.lock().unwrap().clear();
        }
    }

    /// Connections accepted and left silent by the black hole so far (and still held).
    pub fn held_connections(&self) -> usize {
        self.state.held.lock().unwrap().len()
    }

    pub fn batch_sizes(&self) -> Vec<usize> {
        self.state.batch_sizes.lock().unwrap().clone()
    }

    /// Every request forwarded or faulted so far.
    pub fn log(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.state.log.lock().unwrap().clear();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn dynamo_error(kind: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "__type": format!("com.amazonaws.dynamodb.v20120810#{kind}"),
        "message": message,
    });
    json_response(StatusCode::BAD_REQUEST, body.to_string().into())
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-amz-json-1.0"),
    );
    resp
}

async fn forward(State(state): State<Arc<ProxyState>>, req: Request) -> Response {
    let mut resp = handle(&state, req).await;
    // One request per connection, so an outage also cuts off pooled keep-alive connections.
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

async fn handle(state: &ProxyState, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024).await.unwrap();
    let operation = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or_default()
        .to_owned();
    let index = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("IndexName")?.as_str().map(str::to_owned));
    state.log.lock().unwrap().push(Logged { operation, index });
    let is_batch_write = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.ends_with(".BatchWriteItem"));
    let mut unprocessed: Option<Map<String, Value>> = None;
    let mut body = body;
    if is_batch_write {
        let mut json: Value = serde_json::from_slice(&body).unwrap();
        let count: usize = json["RequestItems"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_array().unwrap().len())
            .sum();
        state.batch_sizes.lock().unwrap().push(count);
        let needle = state.reject.lock().unwrap().clone();
        if needle.is_some_and(|n| !n.is_empty() && body.windows(n.len()).any(|w| w == n.as_bytes()))
        {
            // DynamoDB's wording for an item over 400 KB; the whole request is refused.
            return dynamo_error(
                "ValidationException",
                "Item size has exceeded the maximum allowed size",
            );
        }
        const THROTTLED: &str = "Rate of requests exceeds the allowed throughput.";
        let fault = state.script.lock().unwrap().pop_front();
        match fault {
            Some(Fault::Throttling) => return dynamo_error("ThrottlingException", THROTTLED),
            Some(Fault::ProvisionedThroughputExceeded) => {
                return dynamo_error("ProvisionedThroughputExceededException", THROTTLED);
            }
            Some(Fault::AnswerLost) => {
                let _ = forward_upstream(state, &parts, body).await;
                return std::future::pending().await;
            }
            Some(Fault::Partial { keep }) => {
                let mut left = keep;
                let mut kept = Map::new();
                let mut rest = Map::new();
                for (table, writes) in json["RequestItems"].as_object().unwrap() {
                    let writes = writes.as_array().unwrap();
                    let n = left.min(writes.len());
                    left -= n;
                    if n > 0 {
                        kept.insert(table.clone(), Value::Array(writes[..n].to_vec()));
                    }
                    if n < writes.len() {
                        rest.insert(table.clone(), Value::Array(writes[n..].to_vec()));
                    }
                }
                json["RequestItems"] = Value::Object(kept);
                body = serde_json::to_vec(&json).unwrap().into();
                unprocessed = Some(rest);
            }
            None => {}
        }
    }
    let Ok(resp) = forward_upstream(state, &parts, body).await else {
        return json_response(StatusCode::BAD_GATEWAY, Bytes::from_static(b"{}"));
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap_or_default();
    let bytes = match unprocessed {
        Some(rest) if status.is_success() => {
            let mut out: Value = serde_json::from_slice(&bytes).unwrap();
            out["UnprocessedItems"] = Value::Object(rest);
            Bytes::from(serde_json::to_vec(&out).unwrap())
        }
        _ => bytes,
    };
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    for (name, value) in &headers {
        // Length and CRC32 change when the body is rewritten; hyper sets the length itself.
        if name != header::CONTENT_LENGTH
            && name != header::TRANSFER_ENCODING
            && name.as_str() != "x-amz-crc32"
        {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

/// Sends the request on to moto as it came (less the hop's host and length).
async fn forward_upstream(
    state: &ProxyState,
    parts: &axum::http::request::Parts,
    body: Bytes,
) -> reqwest::Result<reqwest::Response> {
    let mut upstream = state
        .http
        .request(
            parts.method.clone(),
            format!("{}{}", state.upstream, parts.uri),
        )
        .body(body);
    for (name, value) in &parts.headers {
        if name != header::HOST && name != header::CONTENT_LENGTH {
            upstream = upstream.header(name, value);
        }
    }
    upstream.send().await
}
