//! The routes under load, how one request to each is sent and read to its end, and the goose
//! scenarios that drive them in a closed loop.
//!
//! goose times a request until its response headers, which for a stream says only that the
//! server accepted it. So every transaction reads the body chunk by chunk through the SSE parser
//! and records its own rows (`STREAM ttft`, `STREAM e2e`, …) with
//! `record_custom_request_duration`; tokens and money go to the shared [`Stats`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use agents::Process;
use goose::prelude::*;
use keyvex_engine::catalog::Catalog;
use serde_json::Value;

use crate::corpus;
use crate::sse::{Protocol, SseParser, StreamObserver, StreamOutcome};
use crate::stats::{Kind, RequestFailure, Stats};
use crate::targets::STREAM_METHOD;

/// One route under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Agent(Process),
    Pipeline,
    /// Streaming chat completions; the model (a process) rotates with the seed.
    Chat,
}

impl Route {
    /// Every route, in the order of the weights table.
    pub const ALL: [Route; 6] = [
        Route::Agent(Process::MagicSpark),
        Route::Agent(Process::LogicArchitect),
        Route::Agent(Process::ContentCrafter),
        Route::Agent(Process::StyleMaster),
        Route::Pipeline,
        Route::Chat,
    ];

    /// The name in `[weights]`, `--weight` and the cost table.
    pub fn name(self) -> &'static str {
        match self {
            Route::Agent(Process::MagicSpark) => "magic_spark",
            Route::Agent(Process::LogicArchitect) => "logic_architect",
            Route::Agent(Process::ContentCrafter) => "content_crafter",
            Route::Agent(Process::StyleMaster) => "style_master",
            Route::Pipeline => "pipeline",
            Route::Chat => "chat",
        }
    }

    pub fn from_name(name: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.name() == name)
    }

    pub fn path(self) -> String {
        match self {
            Route::Agent(p) => format!("/v1/agents/{}", p.slug()),
            Route::Pipeline => "/v1/pipelines/tool".to_owned(),
            Route::Chat => "/v1/chat/completions".to_owned(),
        }
    }

    pub fn protocol(self) -> Protocol {
        match self {
            Route::Agent(_) => Protocol::Agent,
            Route::Pipeline => Protocol::Pipeline,
            Route::Chat => Protocol::Chat,
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Route::Pipeline => Kind::Pipeline,
            _ => Kind::Request,
        }
    }

    /// The chat model of request `seed`: the four processes in turn.
    fn chat_model(seed: u64) -> &'static str {
        let i = usize::try_from(seed % 4).unwrap_or(0);
        Process::ALL[i].key()
    }

    /// The request body for `seed`, and (for chat) the model asked for.
    pub fn body(self, seed: u64) -> (Value, Option<&'static str>) {
        match self {
            Route::Agent(p) => (corpus::agent_body(p, seed), None),
            Route::Pipeline => (corpus::pipeline_body(seed), None),
            Route::Chat => {
                let model = Self::chat_model(seed);
                (corpus::chat_body(model, seed), Some(model))
            }
        }
    }
}

/// What every request needs: where to record, how to authenticate, how to price chat answers.
pub struct Ctx {
    pub stats: Stats,
    pub api_key: String,
    pub catalog: Catalog,
    pub seed: u64,
}

/// Reads `response` to its end, event by event, timing from `started`.
pub async fn read_stream(
    mut response: reqwest::Response,
    route: Route,
    model: Option<&str>,
    catalog: &Catalog,
    started: Instant,
) -> StreamOutcome {
    let mut parser = SseParser::new();
    let mut observer = StreamObserver::new(route.protocol(), started);
    if let Some(model) = model {
        observer = observer.with_catalog(catalog, model);
    }
    let mut cut = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let at = Instant::now();
                for event in parser.push(&chunk) {
                    observer.observe(&event, at);
                }
            }
            Ok(None) => break,
            Err(error) => {
                cut = Some(format!("body read failed: {}", error_kind(&error)));
                break;
            }
        }
    }
    let end = Instant::now();
    if let Some(event) = parser.finish() {
        observer.observe(&event, end);
    }
    let mut out = observer.finish(end);
    if let Some(cut) = cut {
        out.succeeded = false;
        out.failure = Some(cut);
    }
    out
}

/// A short, stable label for a transport error (the error table groups by it).
pub fn error_kind(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else if error.is_body() || error.is_decode() {
        "body"
    } else {
        "request"
    }
}

/// The goose rows of one observed stream.
fn rows(route: Route, out: &StreamOutcome) -> Vec<(&'static str, Duration, bool)> {
    let mut rows = Vec::new();
    if let Some(d) = out.first_event {
        rows.push(("first_event", d, true));
    }
    if let Some(d) = out.ttft {
        rows.push(("ttft", d, true));
    }
    match route.kind() {
        Kind::Request => {
            rows.push(("e2e", out.end_to_end, out.succeeded));
            if let Some(d) = out.time_per_output_token() {
                rows.push(("tpot", d, true));
            }
        }
        Kind::Pipeline => rows.push(("pipeline_e2e", out.end_to_end, out.succeeded)),
    }
    if let Some(d) = out.stall {
        rows.push(("stall", d, true));
    }
    rows
}

/// One closed-loop iteration of `route` for a goose user.
async fn transaction(ctx: Arc<Ctx>, route: Route, user: &mut GooseUser) -> TransactionResult {
    // Distinct, reproducible seeds per user and iteration.
    let seed = ctx
        .seed
        .wrapping_add((user.weighted_users_index as u64).wrapping_mul(1_000_003))
        .wrapping_add(user.get_iterations() as u64);
    let (body, model) = route.body(seed);
    let path = route.path();
    let builder = user
        .get_request_builder(&GooseMethod::Post, &path)?
        .bearer_auth(&ctx.api_key)
        .json(&body);
    let name = format!("{} {}", route.name(), path);
    let request = GooseRequest::builder()
        .method(GooseMethod::Post)
        .path(path.as_str())
        .name(name.as_str())
        .set_request_builder(builder)
        .build();
    let started = Instant::now();
    let mut goose = user.request(request).await?;
    let response = match goose.response {
        Ok(r) => r,
        Err(error) => {
            ctx.stats.record_failure(
                route.name(),
                &RequestFailure::Transport(error_kind(&error).to_owned()),
            );
            // goose already counted the failed request.
            return Ok(());
        }
    };
    let status = response.status();
    if !status.is_success() {
        ctx.stats
            .record_failure(route.name(), &RequestFailure::Status(status.as_u16()));
        return Ok(());
    }
    let out = read_stream(response, route, model, &ctx.catalog, started).await;
    ctx.stats.record_stream(route.name(), route.kind(), &out);
    for (metric, d, ok) in rows(route, &out) {
        let error = (!ok).then_some(out.failure.as_deref().unwrap_or("stream failed"));
        user.record_custom_request_duration(STREAM_METHOD, metric, d, ok, None, error)
            .await?;
    }
    if !out.succeeded {
        // The HTTP row said 200; the stream did not succeed, so goose's error rate must see it.
        let why = out.failure.as_deref().unwrap_or("stream failed");
        return user.set_failure(why, &mut goose.request, None, None);
    }
    Ok(())
}

/// The goose scenario of `route` with `weight`.
pub fn scenario(ctx: &Arc<Ctx>, route: Route, weight: usize) -> Result<Scenario, GooseError> {
    let ctx = Arc::clone(ctx);
    let function: TransactionFunction = Arc::new(move |user| {
        let ctx = Arc::clone(&ctx);
        Box::pin(async move { transaction(ctx, route, user).await })
    });
    Scenario::new(route.name())
        .set_weight(weight)
        .map(|s| s.register_transaction(Transaction::new(function).set_name(route.name())))
}
