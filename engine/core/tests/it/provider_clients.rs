//! Integration tests: the OpenAI and Anthropic providers over real HTTP on loopback.
//!
//! Each test starts a tiny axum fixture that records what it receives and replays one canned
//! answer (an SSE body or an error status). It is a test double, not the simulator: it checks the
//! request the provider builds and how each kind of answer surfaces as `ProviderEvent`s.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use futures::StreamExt;
use keyvex_engine::provider::anthropic::AnthropicProvider;
use keyvex_engine::provider::openai::OpenAiProvider;
use keyvex_engine::provider::{
    ApiKey, ChatMessage, ChatRequest, Provider, ProviderConfig, ProviderError, ResponseSchema,
};
use keyvex_engine::stream::{FaultClass, FinishReason, ProviderEvent, Usage};
use serde_json::{Value, json};

/// One request as the fixture saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Value,
}

/// The canned answer.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    content_type: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: String,
}

impl Reply {
    fn sse(body: &str) -> Self {
        Self {
            status: 200,
            content_type: "text/event-stream",
            headers: Vec::new(),
            body: body.to_owned(),
        }
    }

    fn error(status: u16, headers: &[(&'static str, &'static str)], body: &str) -> Self {
        Self {
            status,
            content_type: "application/json",
            headers: headers.to_vec(),
            body: body.to_owned(),
        }
    }
}

struct Fixture {
    base_url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fixture {
    async fn start(reply: Reply) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let record = Arc::clone(&record);
            let reply = reply.clone();
            async move {
                record.lock().unwrap().push(Seen {
                    path: uri.path().to_owned(),
                    headers,
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                });
                let mut response = Response::builder()
                    .status(StatusCode::from_u16(reply.status).unwrap())
                    .header("content-type", reply.content_type);
                for (name, value) in reply.headers {
                    response = response.header(name, value);
                }
                response.body(Body::from(reply.body)).unwrap()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            base_url: format!("http://{addr}/v1"),
            seen,
        }
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn config(&self) -> ProviderConfig {
        config_for(&self.base_url)
    }
}

fn config_for(base_url: &str) -> ProviderConfig {
    ProviderConfig {
        base_url: base_url.to_owned(),
        api_key: ApiKey::new("test-key"),
        connect_timeout: Duration::from_secs(2),
        max_event_bytes: keyvex_engine::provider::DEFAULT_MAX_EVENT_BYTES,
    }
}

/// A base URL on a loopback port nothing listens on.
async fn refused_base_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/v1")
}

fn request(schema: bool) -> ChatRequest {
    ChatRequest {
        model: "test-model".into(),
        system: Some("Be brief.".into()),
        messages: vec![ChatMessage::user("Hi")],
        max_output_tokens: 256,
        temperature: Some(0.5),
        response_schema: schema.then(|| ResponseSchema {
            name: "answer".into(),
            schema: json!({"type": "object", "properties": {"text": {"type": "string"}},
                           "required": ["text"], "additionalProperties": false}),
        }),
    }
}

async fn collect(provider: &dyn Provider, request: ChatRequest) -> Vec<ProviderEvent> {
    tokio::time::timeout(
        Duration::from_secs(10),
        provider.stream(request).collect::<Vec<_>>(),
    )
    .await
    .expect("the provider stream must end on its own")
}

fn text(events: &[ProviderEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            ProviderEvent::Delta(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

fn only_error(events: &[ProviderEvent]) -> &ProviderError {
    match events {
        [ProviderEvent::Error(err)] => err,
        other => panic!("expected exactly one Error event, got {other:?}"),
    }
}

fn last_error(events: &[ProviderEvent]) -> &ProviderError {
    match events.last() {
        Some(ProviderEvent::Error(err)) => err,
        other => panic!("expected a terminal Error, got {other:?} in {events:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// OpenAI

const OPENAI_OK: &str = concat!(
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1760000000,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n",
    ": keep-alive comment\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1760000000,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"{\\\"text\\\":\"},\"finish_reason\":null}],\"usage\":null,\"obfuscation\":\"ab\"}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1760000000,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\\"hi\\\"}\"},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1760000000,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1760000000,\"model\":\"test-model\",\"choices\":[],\"usage\":{\"prompt_tokens\":1200,\"completion_tokens\":4,\"total_tokens\":1204,\"prompt_tokens_details\":{\"cached_tokens\":1024}}}\n\n",
    "data: [DONE]\n\n",
);

#[tokio::test]
async fn openai_streams_and_sends_the_expected_request() {
    let fixture = Fixture::start(Reply::sse(OPENAI_OK)).await;
    let provider = OpenAiProvider::new(&fixture.config()).unwrap();
    let events = collect(&provider, request(true)).await;

    assert!(matches!(&events[0], ProviderEvent::Start { model, .. } if model == "test-model"));
    assert_eq!(text(&events), r#"{"text":"hi"}"#);
    let n = events.len();
    assert!(matches!(
        events[n - 2],
        ProviderEvent::Usage(Usage {
            input: 1200,
            cached_input: 1024,
            cache_write: 0,
            output: 4
        })
    ));
    assert!(matches!(
        &events[n - 1],
        ProviderEvent::Done {
            finish_reason: FinishReason::Stop,
            ..
        }
    ));

    let seen = fixture.requests();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.path, "/v1/chat/completions");
    assert_eq!(req.headers["authorization"], "Bearer test-key");
    assert_eq!(req.body["model"], "test-model");
    assert_eq!(req.body["stream"], true);
    assert_eq!(req.body["stream_options"]["include_usage"], true);
    assert_eq!(req.body["max_completion_tokens"], 256);
    assert_eq!(req.body["temperature"], 0.5);
    assert_eq!(req.body["messages"][0]["role"], "system");
    assert_eq!(req.body["messages"][1]["content"], "Hi");
    assert_eq!(req.body["response_format"]["type"], "json_schema");
    assert_eq!(req.body["response_format"]["json_schema"]["name"], "answer");
    assert_eq!(req.body["response_format"]["json_schema"]["strict"], true);
    assert_eq!(
        req.body["response_format"]["json_schema"]["schema"]["required"],
        json!(["text"])
    );
}

#[tokio::test]
async fn openai_429_surfaces_retry_after_and_request_id_without_sdk_retries() {
    let fixture = Fixture::start(Reply::error(
        429,
        &[("retry-after", "3"), ("x-request-id", "req_abc")],
        r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
    ))
    .await;
    let provider = OpenAiProvider::new(&fixture.config()).unwrap();
    let events = collect(&provider, request(false)).await;
    let err = only_error(&events);
    assert_eq!(
        *err,
        ProviderError::Http {
            provider: keyvex_engine::stream::ProviderKind::OpenAi,
            status: 429,
            error_type: Some("requests".into()),
            code: Some("rate_limit_exceeded".into()),
            message: "Rate limit reached".into(),
            retry_after: Some(Duration::from_secs(3)),
            request_id: Some("req_abc".into()),
        }
    );
    assert!(err.is_retryable());
    // The SDK's default retry layer would have sent this 4 times.
    assert_eq!(fixture.requests().len(), 1);
}

#[tokio::test]
async fn openai_503_prefers_retry_after_ms_and_keeps_a_non_json_body() {
    let fixture = Fixture::start(Reply::error(
        503,
        &[("retry-after-ms", "1500"), ("retry-after", "9")],
        "upstream overloaded",
    ))
    .await;
    let provider = OpenAiProvider::new(&fixture.config()).unwrap();
    let events = collect(&provider, request(false)).await;
    let err = only_error(&events);
    assert!(matches!(
        err,
        ProviderError::Http { status: 503, retry_after: Some(d), message, .. }
            if *d == Duration::from_millis(1500) && message.contains("upstream overloaded")
    ));
    assert_eq!(fixture.requests().len(), 1);
}

#[tokio::test]
async fn openai_401_and_400_bodies_are_read_and_classed_by_whose_fault() {
    let fixture = Fixture::start(Reply::error(
        401,
        &[],
        r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
    ))
    .await;
    let provider = OpenAiProvider::new(&fixture.config()).unwrap();
    let err = only_error(&collect(&provider, request(false)).await).clone();
    assert!(matches!(
        &err,
        ProviderError::Http { status: 401, code: Some(code), message, .. }
            if code == "invalid_api_key" && message.starts_with("Incorrect API key")
    ));
    // Our key is refused: an account error, which the fallback (another account) can answer.
    assert_eq!(err.class(), FaultClass::Account);
    assert_eq!(err.kind(), "auth");

    let fixture = Fixture::start(Reply::error(
        400,
        &[],
        r#"{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
    ))
    .await;
    let provider = OpenAiProvider::new(&fixture.config()).unwrap();
    let err = only_error(&collect(&provider, request(false)).await).clone();
    assert!(matches!(&err, ProviderError::Http { status: 400, .. }));
    assert_eq!(err.kind(), "context_too_long");
    assert_eq!(err.class(), FaultClass::ContextTooLong);
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn openai_connection_refused_is_connect_and_sent_once() {
    let provider = OpenAiProvider::new(&config_for(&refused_base_url().await)).unwrap();
    let err = only_error(&collect(&provider, request(false)).await).clone();
    assert!(
        matches!(&err, ProviderError::Connect { url, .. } if url.ends_with("/v1/chat/completions")),
        "{err:?}"
    );
}

#[tokio::test]
async fn openai_mid_stream_error_is_an_error_and_a_whole_answer_without_done_is_not() {
    let with_error = concat!(
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
        "data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n",
    );
    let fixture = Fixture::start(Reply::sse(with_error)).await;
    let provider = OpenAiProvider::new(&fixture.config()).unwrap();
    let events = collect(&provider, request(false)).await;
    assert_eq!(text(&events), "Hel");
    assert!(matches!(
        last_error(&events),
        ProviderError::InStream { error_type, .. } if error_type == "server_error"
    ));

    // Everything but the terminator: the answer is whole (finish reason and usage in), so it
    // is a success, marked as unterminated.
    let cut = OPENAI_OK.trim_end_matches("data: [DONE]\n\n");
    let fixture = Fixture::start(Reply::sse(cut)).await;
    let provider = OpenAiProvider::new(&fixture.config()).unwrap();
    let events = collect(&provider, request(false)).await;
    assert!(matches!(
        events.last(),
        Some(ProviderEvent::Done {
            unterminated: true,
            ..
        })
    ));
    assert!(matches!(
        events[events.len() - 2],
        ProviderEvent::Usage(Usage { input: 1200, .. })
    ));
    // Cut before the usage chunk: the end may be missing, so it stays an error.
    let before_usage = &cut[..cut.rfind("data: ").unwrap()];
    let fixture = Fixture::start(Reply::sse(before_usage)).await;
    let provider = OpenAiProvider::new(&fixture.config()).unwrap();
    let events = collect(&provider, request(false)).await;
    assert!(matches!(
        last_error(&events),
        ProviderError::Truncated { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// Anthropic

const ANTHROPIC_START: &str = concat!(
    "event: message_start\n",
    "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"test-model\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":12,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":2048,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\n",
    "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_01\",\"name\":\"answer\",\"input\":{}}}\n\n",
    "event: ping\n",
    "data: {\"type\":\"ping\"}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"text\\\": \\\"Pa\"}}\n\n",
);

const ANTHROPIC_END: &str = concat!(
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"ris\\\"}\"}}\n\n",
    "event: content_block_stop\n",
    "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\n",
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
    "event: message_stop\n",
    "data: {\"type\":\"message_stop\"}\n\n",
);

#[tokio::test]
async fn anthropic_streams_tool_json_and_sends_the_expected_request() {
    let fixture = Fixture::start(Reply::sse(&format!("{ANTHROPIC_START}{ANTHROPIC_END}"))).await;
    let provider = AnthropicProvider::new(&fixture.config()).unwrap();
    let events = collect(&provider, request(true)).await;

    assert!(matches!(&events[0], ProviderEvent::Start { model, .. } if model == "test-model"));
    assert_eq!(text(&events), r#"{"text": "Paris"}"#);
    let n = events.len();
    assert!(matches!(
        events[n - 2],
        ProviderEvent::Usage(Usage {
            input: 2060,
            cached_input: 2048,
            cache_write: 0,
            output: 15
        })
    ));
    // The forced schema tool's `tool_use` stop is the normal end.
    assert!(matches!(
        &events[n - 1],
        ProviderEvent::Done {
            finish_reason: FinishReason::Stop,
            ..
        }
    ));

    let seen = fixture.requests();
    assert_eq!(seen.len(), 1, "closed at message_stop: no reconnect");
    let req = &seen[0];
    assert_eq!(req.path, "/v1/messages");
    assert_eq!(req.headers["x-api-key"], "test-key");
    assert_eq!(req.headers["anthropic-version"], "2023-06-01");
    assert!(req.headers.get("authorization").is_none());
    assert_eq!(req.body["model"], "test-model");
    assert_eq!(req.body["max_tokens"], 256);
    assert_eq!(req.body["stream"], true);
    assert_eq!(req.body["system"], "Be brief.");
    assert_eq!(req.body["temperature"], 0.5);
    assert_eq!(
        req.body["messages"],
        json!([{"role": "user", "content": "Hi"}])
    );
    assert_eq!(req.body["tools"][0]["name"], "answer");
    assert_eq!(req.body["tools"][0]["input_schema"]["type"], "object");
    assert_eq!(
        req.body["tool_choice"],
        json!({"type": "tool", "name": "answer"})
    );
}

#[tokio::test]
async fn anthropic_does_not_reconnect_when_the_server_closes_the_stream_early() {
    let fixture = Fixture::start(Reply::sse(ANTHROPIC_START)).await;
    let provider = AnthropicProvider::new(&fixture.config()).unwrap();
    let events = collect(&provider, request(true)).await;

    assert_eq!(text(&events), r#"{"text": "Pa"#);
    assert!(matches!(
        last_error(&events),
        ProviderError::Truncated { .. }
    ));
    // message_start told us the input side: it comes before the error, output as last seen.
    assert!(matches!(
        events[events.len() - 2],
        ProviderEvent::Usage(Usage {
            input: 2060,
            cached_input: 2048,
            output: 1,
            ..
        })
    ));
    // reqwest-eventsource's default policy would re-send the POST (a second billed generation).
    assert_eq!(fixture.requests().len(), 1);
}

#[tokio::test]
async fn anthropic_429_surfaces_retry_after_and_request_id() {
    let fixture = Fixture::start(Reply::error(
        429,
        &[("retry-after", "4"), ("request-id", "req_011")],
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"},"request_id":"req_011"}"#,
    ))
    .await;
    let provider = AnthropicProvider::new(&fixture.config()).unwrap();
    let events = collect(&provider, request(false)).await;
    let err = only_error(&events);
    assert!(matches!(
        err,
        ProviderError::Http { status: 429, error_type: Some(t), retry_after: Some(d), request_id: Some(id), .. }
            if t == "rate_limit_error" && *d == Duration::from_secs(4) && id == "req_011"
    ));
    assert!(err.is_retryable());
    assert_eq!(fixture.requests().len(), 1);
}

#[tokio::test]
async fn anthropic_401_body_and_overloaded_529_are_classified() {
    let fixture = Fixture::start(Reply::error(
        401,
        &[],
        r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"},"request_id":"req_401"}"#,
    ))
    .await;
    let provider = AnthropicProvider::new(&fixture.config()).unwrap();
    let err = only_error(&collect(&provider, request(false)).await).clone();
    assert!(matches!(
        &err,
        ProviderError::Http { status: 401, error_type: Some(t), message, request_id: Some(id), .. }
            if t == "authentication_error" && message == "invalid x-api-key" && id == "req_401"
    ));
    assert_eq!(err.class(), FaultClass::Account);

    let fixture = Fixture::start(Reply::error(
        529,
        &[("retry-after-ms", "250")],
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    ))
    .await;
    let provider = AnthropicProvider::new(&fixture.config()).unwrap();
    let err = only_error(&collect(&provider, request(false)).await).clone();
    assert_eq!(err.kind(), "overloaded");
    assert_eq!(err.retry_after(), Some(Duration::from_millis(250)));
    assert_eq!(fixture.requests().len(), 1);
}

#[tokio::test]
async fn anthropic_connection_refused_is_connect() {
    let provider = AnthropicProvider::new(&config_for(&refused_base_url().await)).unwrap();
    let err = only_error(&collect(&provider, request(false)).await).clone();
    assert!(
        matches!(&err, ProviderError::Connect { url, .. } if url.ends_with("/v1/messages")),
        "{err:?}"
    );
}

#[tokio::test]
async fn anthropic_in_stream_error_event_and_wrong_content_type() {
    let body = format!(
        "{ANTHROPIC_START}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}}}\n\n"
    );
    let fixture = Fixture::start(Reply::sse(&body)).await;
    let provider = AnthropicProvider::new(&fixture.config()).unwrap();
    let events = collect(&provider, request(true)).await;
    let err = last_error(&events);
    assert!(
        matches!(err, ProviderError::InStream { error_type, .. } if error_type == "overloaded_error")
    );
    assert!(err.is_retryable());
    assert_eq!(fixture.requests().len(), 1);

    // A 200 that is not an event stream (e.g. a non-streaming JSON answer).
    let mut reply = Reply::sse(r#"{"type":"message"}"#);
    reply.content_type = "application/json";
    let fixture = Fixture::start(reply).await;
    let provider = AnthropicProvider::new(&fixture.config()).unwrap();
    let err = only_error(&collect(&provider, request(false)).await).clone();
    assert!(matches!(err, ProviderError::Malformed { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Hostile answers, both wires

/// An error body far over the cap is read only up to it, and the error says so.
#[tokio::test]
async fn error_bodies_are_read_up_to_64_kib_on_both_wires() {
    let huge: &'static str = Box::leak("x".repeat(4 * 1024 * 1024).into_boxed_str());
    for kind in ["openai", "anthropic"] {
        let fixture = Fixture::start(Reply {
            status: 500,
            content_type: "text/plain",
            headers: Vec::new(),
            body: huge.to_owned(),
        })
        .await;
        let events = match kind {
            "openai" => {
                let provider = OpenAiProvider::new(&fixture.config()).unwrap();
                collect(&provider, request(false)).await
            }
            _ => {
                let provider = AnthropicProvider::new(&fixture.config()).unwrap();
                collect(&provider, request(false)).await
            }
        };
        let err = only_error(&events);
        let ProviderError::Http {
            status: 500,
            message,
            ..
        } = err
        else {
            panic!("{kind}: {err:?}");
        };
        let start: String = message.chars().take(120).collect();
        assert!(message.contains("65536-byte cap"), "{kind}: {start}…");
        assert!(message.len() < 2048, "{kind}: {} bytes", message.len());
    }
}

/// `retry-after` values a hostile or broken upstream may send never panic: a huge one is
/// clamped (and makes the router skip the model), a negative or unparsable one is ignored.
#[tokio::test]
async fn hostile_retry_after_values_are_survived_on_both_wires() {
    let body_openai = r#"{"error":{"message":"slow down","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
    let body_anthropic =
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
    for (value, expected) in [
        ("1e20", Some(keyvex_engine::stream::MAX_RETRY_AFTER)),
        ("-5", None),
        ("soon", None),
        ("0.5", Some(Duration::from_millis(500))),
    ] {
        for kind in ["openai", "anthropic"] {
            let headers: Vec<(&'static str, &'static str)> =
                vec![("retry-after", Box::leak(value.to_owned().into_boxed_str()))];
            let body = if kind == "openai" {
                body_openai
            } else {
                body_anthropic
            };
            let fixture = Fixture::start(Reply::error(429, &headers, body)).await;
            let events = if kind == "openai" {
                let provider = OpenAiProvider::new(&fixture.config()).unwrap();
                collect(&provider, request(false)).await
            } else {
                let provider = AnthropicProvider::new(&fixture.config()).unwrap();
                collect(&provider, request(false)).await
            };
            let err = only_error(&events);
            assert_eq!(err.retry_after(), expected, "{kind} retry-after: {value}");
        }
    }
}
