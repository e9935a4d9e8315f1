//! The one place configuration is read: every environment variable and every key of the
//! optional TOML file (`--config` or `KEYVEX_CONFIG`), parsed once into a validated [`Config`].
//!
//! Each setting is declared once in [`SETTINGS`] with its variable, its file key and what it
//! does; `keyvex --help` prints that table, and the loader looks values up through it, so the
//! three cannot drift apart. The environment wins over the file, the file over the defaults.
//! A value that does not parse is an error naming the variable (or the file and key) and what
//! is expected; an unknown file key is an error too, so a typo never silently does nothing.
//! Secrets (API keys) are never echoed back in an error.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyvex_engine::budgets::{BudgetLimits, CallerBudget, OnUnavailable, parse_usd};
use keyvex_engine::limits::{ProviderRates, Rate};
use keyvex_engine::provider::anthropic_version::AnthropicVersion;
use keyvex_engine::provider::{ApiKey, DEFAULT_MAX_EVENT_BYTES};
use keyvex_engine::router::BreakerConfig;
use keyvex_server::config::{ApiKeySpec, ServerConfig};
use keyvex_server::queue::QueueConfig;
use keyvex_sim::SimProfile;
use keyvex_store::redis_limits::{RedisConfig, WhenDown};
use keyvex_store::{AwsTimeouts, MetricsConfig, StoreConfig};

/// Read access to environment variables. Empty values count as unset.
pub trait Env: Send + Sync {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

/// A fixed map, for tests and for programs that assemble an engine as `keyvex` would.
#[derive(Debug, Clone, Default)]
pub struct MapEnv(pub HashMap<String, String>);

impl MapEnv {
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }
}

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).filter(|v| !v.trim().is_empty()).cloned()
    }
}

/// One setting: its environment variable, its key in the TOML file (if it may be set there),
/// and what it does.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub env: &'static str,
    pub file_key: Option<&'static str>,
    pub purpose: &'static str,
    /// Never echoed in an error.
    pub secret: bool,
}

const fn setting(env: &'static str, file_key: &'static str, purpose: &'static str) -> Setting {
    Setting {
        env,
        file_key: Some(file_key),
        purpose,
        secret: false,
    }
}

const fn env_only(env: &'static str, purpose: &'static str) -> Setting {
    Setting {
        env,
        file_key: None,
        purpose,
        secret: false,
    }
}

const fn secret(mut s: Setting) -> Setting {
    s.secret = true;
    s
}

pub const OPENAI_API_KEY: Setting = secret(env_only(
    "OPENAI_API_KEY",
    "OpenAI API key; when unset (and no Anthropic key), providers are simulated",
));
pub const OPENAI_BASE_URL: Setting = setting(
    "OPENAI_BASE_URL",
    "providers.openai_base_url",
    "OpenAI-compatible base URL including /v1 (default https://api.openai.com/v1)",
);
pub const ANTHROPIC_API_KEY: Setting = secret(env_only("ANTHROPIC_API_KEY", "Anthropic API key"));
pub const ANTHROPIC_BASE_URL: Setting = setting(
    "ANTHROPIC_BASE_URL",
    "providers.anthropic_base_url",
    "Anthropic base URL including /v1 (default https://api.anthropic.com/v1)",
);
pub const ANTHROPIC_VERSION: Setting = setting(
    "ANTHROPIC_VERSION",
    "providers.anthropic_version",
    "Anthropic API version: 2023-06-01 (default; sends the catalog's temperatures) | 2026-10-21 (no sampling parameters: temperatures are not sent; key as Authorization: Bearer); a catalog model's anthropicVersion wins",
);
pub const SIMULATE: Setting = setting(
    "KEYVEX_SIMULATE",
    "providers.simulate",
    "auto (default: simulate when no provider key is set) | always | never",
);
pub const SIM_SEED: Setting = setting(
    "KEYVEX_SIM_SEED",
    "providers.sim_seed",
    "seed of the in-process simulator (default 42)",
);
pub const SIM_PROFILE: Setting = setting(
    "KEYVEX_SIM_PROFILE",
    "providers.sim_profile",
    "timing of the in-process simulator: realistic (default, hosted-model latency) | fast (no latency, for tests and CI)",
);
pub const MODELS_FILE: Setting = setting(
    "KEYVEX_MODELS_FILE",
    "providers.models_file",
    "model catalog JSON to use instead of the embedded models/default-models.json",
);
pub const CATALOG_POLL: Setting = setting(
    "KEYVEX_CATALOG_POLL_MS",
    "providers.catalog_poll_ms",
    "how often servers and workers read which model catalog version is active in the store (default 5000, so an activation is noticed within 10 s)",
);
pub const CONNECT_TIMEOUT: Setting = setting(
    "KEYVEX_CONNECT_TIMEOUT_MS",
    "providers.connect_timeout_ms",
    "TCP connect timeout per provider call (default 5000)",
);
pub const TTFT_TIMEOUT: Setting = setting(
    "KEYVEX_TTFT_TIMEOUT_MS",
    "providers.ttft_timeout_ms",
    "deadline for the first content token of an attempt before falling back (default 20000)",
);
pub const STALL_TIMEOUT: Setting = setting(
    "KEYVEX_STALL_TIMEOUT_MS",
    "providers.stall_timeout_ms",
    "deadline between two chunks of a stream (default 30000)",
);
pub const HEADER_TIMEOUT: Setting = setting(
    "KEYVEX_HEADER_TIMEOUT_MS",
    "providers.header_timeout_ms",
    "deadline for a provider's response headers before falling back (default 10000)",
);
pub const REQUEST_TIMEOUT: Setting = setting(
    "KEYVEX_REQUEST_TIMEOUT_MS",
    "providers.request_timeout_ms",
    "total deadline of one model call, every attempt and wait included; ends a stream that drips forever (default 600000)",
);
pub const SAME_MODEL_RETRIES: Setting = setting(
    "KEYVEX_SAME_MODEL_RETRIES",
    "providers.same_model_retries",
    "quick retries of the same model after a plain 5xx or a connection broken before the headers, before the fallback (default 1; 0 turns them off)",
);
pub const MAX_EVENT_BYTES: Setting = setting(
    "KEYVEX_MAX_EVENT_BYTES",
    "providers.max_event_bytes",
    "longest SSE line or event a provider may send; a longer one ends the attempt as hostile (default 1048576)",
);
pub const BREAKER_THRESHOLD: Setting = setting(
    "KEYVEX_BREAKER_THRESHOLD",
    "breaker.failure_threshold",
    "consecutive failures of a model that open its circuit (default 5; 0 turns circuit breaking off)",
);
pub const BREAKER_COOL_DOWN: Setting = setting(
    "KEYVEX_BREAKER_COOL_DOWN_MS",
    "breaker.cool_down_ms",
    "how long an open circuit refuses a model before one probe call (default 5000)",
);
pub const BREAKER_PROBE: Setting = setting(
    "KEYVEX_BREAKER_PROBE_INTERVAL_MS",
    "breaker.probe_interval_ms",
    "after a failed probe, how long until the next one (default 5000)",
);
pub const ACCOUNT_COOL_DOWN: Setting = setting(
    "KEYVEX_ACCOUNT_COOL_DOWN_MS",
    "breaker.account_cool_down_ms",
    "how long a model is skipped after its provider refused our account for it (quota, billing, key, access) (default 60000)",
);
pub const CONFIG_FILE: Setting = env_only(
    "KEYVEX_CONFIG",
    "TOML file with the settings that have a file key (environment variables win); also --config",
);
pub const ADDR: Setting = setting(
    "KEYVEX_ADDR",
    "server.addr",
    "address `keyvex serve` listens on (default 127.0.0.1:8080; port 0 picks a free one)",
);
pub const API_KEYS: Setting = secret(setting(
    "KEYVEX_API_KEYS",
    "server.api_keys",
    "API keys as KEY=CALLER:ROLE, comma-separated (a list in the file); ROLE is user or admin (none: a development key is generated and printed)",
));
pub const MAX_BODY_BYTES: Setting = setting(
    "KEYVEX_MAX_BODY_BYTES",
    "server.max_body_bytes",
    "largest request body the server accepts (default 1048576)",
);
pub const DRAIN_TIMEOUT: Setting = setting(
    "KEYVEX_DRAIN_TIMEOUT_MS",
    "server.drain_timeout_ms",
    "on SIGTERM/SIGINT, how long open streams may run before they are ended (default 30000)",
);
pub const KEEP_ALIVE: Setting = setting(
    "KEYVEX_KEEP_ALIVE_MS",
    "server.keep_alive_ms",
    "interval of SSE keep-alive comments on a silent stream (default 15000)",
);
pub const RATE_LIMIT_PER_HOUR: Setting = setting(
    "KEYVEX_RATE_LIMIT_PER_HOUR",
    "limits.requests_per_hour",
    "requests per hour per API key and endpoint (default 1000)",
);
pub const RATE_LIMIT_BURST: Setting = setting(
    "KEYVEX_RATE_LIMIT_BURST",
    "limits.burst",
    "requests an API key may make at once per endpoint before the hourly rate applies (default 100)",
);
pub const PROVIDER_RPM: Setting = setting(
    "KEYVEX_PROVIDER_RPM",
    "limits.provider_requests_per_minute",
    "requests per minute sent to each provider, by every entry point of this process (default 500)",
);
pub const PROVIDER_TPM: Setting = setting(
    "KEYVEX_PROVIDER_TPM",
    "limits.provider_tokens_per_minute",
    "tokens per minute (prompt + output cap reserved, real usage settled) per provider (default 2000000)",
);
pub const BUDGET_DAILY: Setting = setting(
    "KEYVEX_BUDGET_DAILY_USD",
    "budgets.daily_usd",
    "dollars each API key may spend on model calls per UTC day (default unlimited; spend is counted either way)",
);
pub const BUDGET_MONTHLY: Setting = setting(
    "KEYVEX_BUDGET_MONTHLY_USD",
    "budgets.monthly_usd",
    "dollars each API key may spend per calendar month, UTC (default unlimited)",
);
pub const BUDGET_RUN: Setting = setting(
    "KEYVEX_BUDGET_RUN_USD",
    "budgets.run_usd",
    "dollars one pipeline run or job may spend; the run stops before the call that could cross it (default unlimited)",
);
pub const BUDGET_GLOBAL_DAILY: Setting = setting(
    "KEYVEX_BUDGET_GLOBAL_DAILY_USD",
    "budgets.global_daily_usd",
    "dollars all callers together may spend per UTC day (default unlimited)",
);
pub const BUDGET_CALLERS: Setting = setting(
    "KEYVEX_BUDGET_CALLERS",
    "budgets.callers",
    "per-caller limits, comma-separated CALLER:daily=USD:monthly=USD (either part optional), e.g. alice:daily=5:monthly=100; limits set through /v1/admin/budgets win",
);
pub const REDIS_URL: Setting = secret(setting(
    "REDIS_URL",
    "redis.url",
    "redis://HOST:PORT[/DB] (or rediss:// for TLS, verified against the system's CA roots or the bundle SSL_CERT_FILE names) shared by every replica: caller rate limits, provider RPM/TPM and dollar budgets are kept there (default: in this process only)",
));
pub const REDIS_TIMEOUT: Setting = setting(
    "KEYVEX_REDIS_TIMEOUT_MS",
    "redis.timeout_ms",
    "longest wait for one Redis command, and for a connection (default 100); past it Redis counts as unreachable",
);
pub const REDIS_CLUSTER: Setting = setting(
    "KEYVEX_REDIS_CLUSTER",
    "redis.cluster",
    "true when REDIS_URL is a node or the configuration endpoint of a Redis Cluster (ElastiCache with cluster mode on); every key carries the hash tag {keyvex}, so all of them share one slot (default false)",
);
pub const REDIS_LIMITS_WHEN_DOWN: Setting = setting(
    "KEYVEX_REDIS_LIMITS_WHEN_DOWN",
    "redis.limits_when_down",
    "rate limits (caller, provider RPM/TPM) while Redis is unreachable: open (default, let requests through) | closed (refuse them)",
);
pub const REDIS_BUDGETS_WHEN_DOWN: Setting = setting(
    "KEYVEX_REDIS_BUDGETS_WHEN_DOWN",
    "redis.budgets_when_down",
    "dollar budgets while Redis is unreachable: closed (default, refuse model calls) | open (let them through uncounted)",
);
pub const METRICS_DB: Setting = setting(
    "KEYVEX_METRICS_DB",
    "metrics.db",
    "SQLite file of the metrics ledger and of the embedded store (default keyvex-metrics.sqlite3)",
);
pub const METRICS_FLUSH: Setting = setting(
    "KEYVEX_METRICS_FLUSH_MS",
    "metrics.flush_ms",
    "how often pending metrics are shipped to the store (default 500)",
);
pub const INTENT_LINGER: Setting = setting(
    "KEYVEX_INTENT_LINGER_MS",
    "metrics.intent_linger_ms",
    "how long a call's intent may wait for company before the ledger commits it alone; a call that ends meanwhile writes no intent, and a process killed within this window after a call started leaves that call unrecorded (default 5, 0 = commit at once)",
);
pub const RECORD_LINGER: Setting = setting(
    "KEYVEX_RECORD_LINGER_MS",
    "metrics.record_linger_ms",
    "how long a call's record waits for the records of other calls before the ledger commits it, while at least KEYVEX_RECORD_LINGER_MIN_CALLS other calls are in flight: one fsync then serves several records, and each stream's end waits up to this much longer (default 5, 0 = commit at once)",
);
pub const RECORD_LINGER_MIN_CALLS: Setting = setting(
    "KEYVEX_RECORD_LINGER_MIN_CALLS",
    "metrics.record_linger_min_calls",
    "how many other calls must be in flight before a record waits for company (default 4)",
);
pub const REPLICA_LOST_AFTER: Setting = setting(
    "KEYVEX_REPLICA_LOST_AFTER_MS",
    "metrics.replica_lost_after_ms",
    "with DynamoDB: a replica without a heartbeat this long is taken for lost, and another records the calls it had in flight as interrupted (default 300000)",
);
pub const DYNAMODB_TABLE: Setting = setting(
    "DYNAMODB_TABLE_NAME",
    "store.dynamodb_table",
    "keep metrics, sessions and jobs in this DynamoDB table instead of the embedded SQLite store",
);
pub const DYNAMODB_ENDPOINT: Setting = setting(
    "DYNAMODB_ENDPOINT",
    "store.dynamodb_endpoint",
    "DynamoDB endpoint override (an emulator such as moto or DynamoDB Local)",
);
pub const DYNAMODB_CONNECT_TIMEOUT: Setting = setting(
    "KEYVEX_DYNAMODB_CONNECT_TIMEOUT_MS",
    "store.dynamodb_connect_timeout_ms",
    "TCP/TLS connect timeout of DynamoDB calls (default 3000)",
);
pub const DYNAMODB_ATTEMPT_TIMEOUT: Setting = setting(
    "KEYVEX_DYNAMODB_ATTEMPT_TIMEOUT_MS",
    "store.dynamodb_attempt_timeout_ms",
    "timeout of one DynamoDB request attempt; a silent endpoint is cut and the attempt retried (default 5000)",
);
pub const DYNAMODB_OPERATION_TIMEOUT: Setting = setting(
    "KEYVEX_DYNAMODB_OPERATION_TIMEOUT_MS",
    "store.dynamodb_operation_timeout_ms",
    "timeout of one DynamoDB call with its retries; the metrics shipper keeps the entries and tries again later (default 20000)",
);
pub const AWS_REGION: Setting = env_only(
    "AWS_REGION",
    "AWS region of the DynamoDB table and the SQS queues (read by the AWS SDK, with the standard AWS credentials)",
);
pub const QUEUE_URL: Setting = setting(
    "SQS_AI_PROCESSING_QUEUE_URL",
    "queue.url",
    "URL of the AI-processing queue (printed by `keyvex queue create`); needed by the worker and POST /v1/jobs",
);
pub const DLQ_URL: Setting = setting(
    "SQS_AI_PROCESSING_DLQ_URL",
    "queue.dlq_url",
    "URL of its dead-letter queue (default: read from the queue's RedrivePolicy)",
);
pub const SQS_ENDPOINT: Setting = setting(
    "SQS_ENDPOINT",
    "queue.endpoint",
    "SQS endpoint override, e.g. http://127.0.0.1:5000 for moto",
);
pub const SQS_CONNECT_TIMEOUT: Setting = setting(
    "KEYVEX_SQS_CONNECT_TIMEOUT_MS",
    "queue.connect_timeout_ms",
    "TCP/TLS connect timeout of SQS calls (default 3000)",
);
pub const SQS_ATTEMPT_TIMEOUT: Setting = setting(
    "KEYVEX_SQS_ATTEMPT_TIMEOUT_MS",
    "queue.attempt_timeout_ms",
    "timeout of one SQS request attempt; a long poll gets its wait time (up to 20 s) on top (default 5000)",
);
pub const SQS_OPERATION_TIMEOUT: Setting = setting(
    "KEYVEX_SQS_OPERATION_TIMEOUT_MS",
    "queue.operation_timeout_ms",
    "timeout of one SQS call with its retries; a long poll gets its wait time on top (default 20000)",
);
pub const WORKER_CONCURRENCY: Setting = setting(
    "KEYVEX_WORKER_CONCURRENCY",
    "queue.worker_concurrency",
    "jobs one worker runs at once (default 4)",
);
pub const RUST_LOG: Setting = env_only(
    "RUST_LOG",
    "log filter, e.g. info or keyvex_engine=debug (default warn for CLI commands, info for servers)",
);

// OpenTelemetry traces. The names and meanings are the OpenTelemetry specification's, so an
// operator's usual environment works unchanged; they are read here like every other setting.
pub const OTEL_ENDPOINT: Setting = env_only(
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTLP/HTTP base URL (e.g. http://localhost:4318); traces go to {it}/v1/traces. Setting this or the next one turns trace export on; unset, no exporter is installed at all",
);
pub const OTEL_TRACES_ENDPOINT: Setting = env_only(
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "full OTLP/HTTP traces URL, used as given (wins over OTEL_EXPORTER_OTLP_ENDPOINT)",
);
pub const OTEL_HEADERS: Setting = secret(env_only(
    "OTEL_EXPORTER_OTLP_HEADERS",
    "headers sent with every export, key1=value1,key2=value2 (percent-encoded values), e.g. an API key of the tracing backend",
));
pub const OTEL_TRACES_HEADERS: Setting = secret(env_only(
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "headers for trace exports only; added over OTEL_EXPORTER_OTLP_HEADERS",
));
pub const OTEL_PROTOCOL: Setting = env_only(
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTLP transport: http/protobuf (default and the only one built in; grpc and http/json are refused)",
);
pub const OTEL_TRACES_PROTOCOL: Setting = env_only(
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTLP transport of traces (wins over OTEL_EXPORTER_OTLP_PROTOCOL): http/protobuf",
);
pub const OTEL_TIMEOUT: Setting = env_only(
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "timeout of one export in milliseconds (default 10000)",
);
pub const OTEL_TRACES_TIMEOUT: Setting = env_only(
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "timeout of one trace export in milliseconds (wins over OTEL_EXPORTER_OTLP_TIMEOUT)",
);
pub const OTEL_SERVICE_NAME: Setting = env_only(
    "OTEL_SERVICE_NAME",
    "service.name of the traces (default: service.name from OTEL_RESOURCE_ATTRIBUTES, else keyvex)",
);
pub const OTEL_RESOURCE_ATTRIBUTES: Setting = env_only(
    "OTEL_RESOURCE_ATTRIBUTES",
    "resource attributes of the traces, key1=value1,key2=value2 (percent-encoded values), e.g. deployment.environment.name=prod",
);
pub const OTEL_SAMPLER: Setting = env_only(
    "OTEL_TRACES_SAMPLER",
    "always_on | always_off | traceidratio | parentbased_always_on (default) | parentbased_always_off | parentbased_traceidratio",
);
pub const OTEL_SAMPLER_ARG: Setting = env_only(
    "OTEL_TRACES_SAMPLER_ARG",
    "the ratio of the *traceidratio samplers, from 0 to 1 (default 1.0)",
);
pub const OTEL_BSP_QUEUE: Setting = env_only(
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "finished spans waiting for export (default 2048); when full, new spans are dropped, never waited for, and counted in /metrics",
);
pub const OTEL_BSP_BATCH: Setting = env_only(
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "spans per export request (default 512, at most the queue size)",
);
pub const OTEL_BSP_DELAY: Setting = env_only(
    "OTEL_BSP_SCHEDULE_DELAY",
    "milliseconds between two exports (default 5000); a full batch goes at once",
);
pub const OTEL_SDK_DISABLED: Setting = env_only(
    "OTEL_SDK_DISABLED",
    "true turns trace export off even with an endpoint set. The OpenTelemetry SDK itself also reads its span limits (OTEL_SPAN_*_LIMIT) and, for the exporter, OTEL_EXPORTER_OTLP_[TRACES_]HEADERS/COMPRESSION",
);
pub const OTEL_CAPTURE_CONTENT: Setting = setting(
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
    "telemetry.capture_message_content",
    "true puts prompts and answers on the model-call spans (gen_ai.input.messages / gen_ai.output.messages); default false: they hold what users typed",
);

/// Every setting, in the order `keyvex --help` lists them.
pub const SETTINGS: &[Setting] = &[
    OPENAI_API_KEY,
    OPENAI_BASE_URL,
    ANTHROPIC_API_KEY,
    ANTHROPIC_BASE_URL,
    ANTHROPIC_VERSION,
    SIMULATE,
    SIM_SEED,
    SIM_PROFILE,
    MODELS_FILE,
    CATALOG_POLL,
    CONNECT_TIMEOUT,
    TTFT_TIMEOUT,
    STALL_TIMEOUT,
    HEADER_TIMEOUT,
    REQUEST_TIMEOUT,
    SAME_MODEL_RETRIES,
    MAX_EVENT_BYTES,
    BREAKER_THRESHOLD,
    BREAKER_COOL_DOWN,
    BREAKER_PROBE,
    ACCOUNT_COOL_DOWN,
    CONFIG_FILE,
    ADDR,
    API_KEYS,
    MAX_BODY_BYTES,
    DRAIN_TIMEOUT,
    KEEP_ALIVE,
    RATE_LIMIT_PER_HOUR,
    RATE_LIMIT_BURST,
    PROVIDER_RPM,
    PROVIDER_TPM,
    BUDGET_DAILY,
    BUDGET_MONTHLY,
    BUDGET_RUN,
    BUDGET_GLOBAL_DAILY,
    BUDGET_CALLERS,
    REDIS_URL,
    REDIS_TIMEOUT,
    REDIS_CLUSTER,
    REDIS_LIMITS_WHEN_DOWN,
    REDIS_BUDGETS_WHEN_DOWN,
    METRICS_DB,
    METRICS_FLUSH,
    INTENT_LINGER,
    RECORD_LINGER,
    RECORD_LINGER_MIN_CALLS,
    REPLICA_LOST_AFTER,
    DYNAMODB_TABLE,
    DYNAMODB_ENDPOINT,
    DYNAMODB_CONNECT_TIMEOUT,
    DYNAMODB_ATTEMPT_TIMEOUT,
    DYNAMODB_OPERATION_TIMEOUT,
    AWS_REGION,
    QUEUE_URL,
    DLQ_URL,
    SQS_ENDPOINT,
    SQS_CONNECT_TIMEOUT,
    SQS_ATTEMPT_TIMEOUT,
    SQS_OPERATION_TIMEOUT,
    WORKER_CONCURRENCY,
    OTEL_ENDPOINT,
    OTEL_TRACES_ENDPOINT,
    OTEL_HEADERS,
    OTEL_TRACES_HEADERS,
    OTEL_PROTOCOL,
    OTEL_TRACES_PROTOCOL,
    OTEL_TIMEOUT,
    OTEL_TRACES_TIMEOUT,
    OTEL_SERVICE_NAME,
    OTEL_RESOURCE_ATTRIBUTES,
    OTEL_SAMPLER,
    OTEL_SAMPLER_ARG,
    OTEL_BSP_QUEUE,
    OTEL_BSP_BATCH,
    OTEL_BSP_DELAY,
    OTEL_SDK_DISABLED,
    OTEL_CAPTURE_CONTENT,
    RUST_LOG,
];

/// Why the configuration could not be read. Each message names the variable or file key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin} = {value:?} is invalid: {problem}")]
    Invalid {
        origin: String,
        value: String,
        problem: String,
    },
    #[error("config file {path} could not be read: {message}")]
    FileRead { path: String, message: String },
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error("config file {path}: unknown key {key}; the file accepts: {known}")]
    UnknownKey {
        path: String,
        key: String,
        known: String,
    },
}

/// How the engine reaches its providers.
#[derive(Debug, Clone)]
pub enum ProviderSetup {
    /// No keys (or `KEYVEX_SIMULATE=always`): an in-process simulator serves both protocols.
    Simulated { seed: u64, profile: SimProfile },
    /// Real providers; a provider without a key is `None` and its models are unavailable.
    Real {
        openai: Option<Upstream>,
        anthropic: Option<Upstream>,
    },
}

/// One real provider endpoint.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub base_url: String,
    pub key: ApiKey,
}

/// Everything `keyvex` runs on, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub providers: ProviderSetup,
    /// The Anthropic API version of every Anthropic model that does not name its own.
    pub anthropic_version: AnthropicVersion,
    pub models_file: Option<PathBuf>,
    /// Between two reads of the store's active catalog version.
    pub catalog_poll: Duration,
    pub connect_timeout: Duration,
    pub ttft_timeout: Duration,
    pub stall_timeout: Duration,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub same_model_retries: u32,
    pub max_event_bytes: usize,
    pub breaker: BreakerConfig,
    /// Per API key and endpoint.
    pub caller_rate: Rate,
    /// Per provider.
    pub provider_rates: ProviderRates,
    /// Dollar budgets (limits; the store that counts is chosen by `redis`).
    pub budgets: BudgetLimits,
    /// The shared Redis of limits and budgets, when `REDIS_URL` is set.
    pub redis: Option<RedisConfig>,
    pub store: StoreConfig,
    /// The DynamoDB endpoint override, also without a table name (`keyvex table`).
    pub dynamodb_endpoint: Option<String>,
    /// Of every DynamoDB call (also in `store` when it is DynamoDB).
    pub dynamodb_timeouts: AwsTimeouts,
    pub metrics: MetricsConfig,
    pub server: ServerConfig,
    /// The AI-processing queue, when its URL is set.
    pub queue: Option<QueueConfig>,
    /// The SQS endpoint override, also without a queue URL (`keyvex queue create`).
    pub sqs_endpoint: Option<String>,
    /// Of every SQS call (also in `queue`).
    pub sqs_timeouts: AwsTimeouts,
    pub worker_concurrency: usize,
    /// Whether model-call spans carry prompt and answer text.
    pub capture_message_content: bool,
}

/// Which traces are kept (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TraceSampler {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

/// Where and how traces are exported over OTLP/HTTP with protobuf bodies.
#[derive(Debug, Clone)]
pub struct OtlpExport {
    /// The full traces URL (`…/v1/traces`).
    pub endpoint: String,
    /// Sent with every export; the values may be credentials and are never logged.
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES` besides `service.name`.
    pub resource: Vec<(String, String)>,
    pub sampler: TraceSampler,
    pub max_queue_size: usize,
    pub max_export_batch_size: usize,
    pub schedule_delay: Duration,
}

/// Log and trace export settings.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// `RUST_LOG`, when set and not blank; each command has its own default.
    pub log: Option<String>,
    /// `None` when no OTLP endpoint is set (or `OTEL_SDK_DISABLED=true`).
    pub export: Option<OtlpExport>,
}

impl TelemetryConfig {
    /// Reads `RUST_LOG`, and the `OTEL_*` variables the way the OpenTelemetry specification
    /// defines them.
    pub fn load(env: &dyn Env) -> Result<TelemetryConfig, ConfigError> {
        let src = Sources { env, file: None };
        Ok(TelemetryConfig {
            log: src.text(&RUST_LOG).filter(|d| !d.trim().is_empty()),
            export: Self::export(&src)?,
        })
    }

    fn export(src: &Sources<'_>) -> Result<Option<OtlpExport>, ConfigError> {
        let disabled = src.parsed(&OTEL_SDK_DISABLED, false, parse_bool)?;
        let endpoint = match (src.url(&OTEL_TRACES_ENDPOINT)?, src.url(&OTEL_ENDPOINT)?) {
            _ if disabled => return Ok(None),
            (Some(traces), _) => traces,
            (None, Some(base)) => format!("{base}/v1/traces"),
            (None, None) => return Ok(None),
        };
        for protocol in [&OTEL_TRACES_PROTOCOL, &OTEL_PROTOCOL] {
            if let Some(found) = src.get(protocol) {
                if found.value.trim() != "http/protobuf" {
                    return Err(found.invalid(
                        "only http/protobuf is built into keyvex; send to a collector's OTLP/HTTP port (4318) with http/protobuf",
                    ));
                }
                break;
            }
        }
        let mut headers = Vec::new();
        for s in [&OTEL_HEADERS, &OTEL_TRACES_HEADERS] {
            if let Some(found) = src.get(s) {
                let pairs = parse_key_values(&found.value).map_err(|p| found.invalid(p))?;
                for (key, value) in pairs {
                    headers.retain(|(k, _): &(String, String)| !k.eq_ignore_ascii_case(&key));
                    headers.push((key, value));
                }
            }
        }
        let timeout_ms = |s: &Setting| {
            src.parsed(s, None, |v| {
                v.parse::<u64>()
                    .ok()
                    .filter(|ms| *ms > 0)
                    .map(|ms| Some(Duration::from_millis(ms)))
                    .ok_or_else(|| "expected whole milliseconds above 0, e.g. 10000".to_owned())
            })
        };
        let timeout = match timeout_ms(&OTEL_TRACES_TIMEOUT)? {
            Some(t) => t,
            None => timeout_ms(&OTEL_TIMEOUT)?.unwrap_or(Duration::from_secs(10)),
        };
        let mut resource = match src.get(&OTEL_RESOURCE_ATTRIBUTES) {
            Some(found) => parse_key_values(&found.value).map_err(|p| found.invalid(p))?,
            None => Vec::new(),
        };
        let from_resource = resource
            .iter()
            .position(|(k, _)| k == "service.name")
            .map(|i| resource.remove(i).1);
        let service_name = src
            .text(&OTEL_SERVICE_NAME)
            .or(from_resource)
            .unwrap_or_else(|| "keyvex".to_owned());
        let ratio = src.parsed(&OTEL_SAMPLER_ARG, 1.0, |v| {
            v.parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| "expected a ratio from 0 to 1, e.g. 0.25".to_owned())
        })?;
        let sampler = src.parsed(&OTEL_SAMPLER, TraceSampler::ParentBasedAlwaysOn, |v| {
            Ok(match v {
                "always_on" => TraceSampler::AlwaysOn,
                "always_off" => TraceSampler::AlwaysOff,
                "traceidratio" => TraceSampler::TraceIdRatio(ratio),
                "parentbased_always_on" => TraceSampler::ParentBasedAlwaysOn,
                "parentbased_always_off" => TraceSampler::ParentBasedAlwaysOff,
                "parentbased_traceidratio" => TraceSampler::ParentBasedTraceIdRatio(ratio),
                _ => return Err("expected always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio".to_owned()),
            })
        })?;
        let count = |s: &Setting, default: usize| {
            src.parsed(s, default, |v| {
                v.parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1_000_000).contains(n))
                    .ok_or_else(|| "expected a whole number from 1 to 1000000".to_owned())
            })
        };
        let max_queue_size = count(&OTEL_BSP_QUEUE, 2048)?;
        let max_export_batch_size = count(&OTEL_BSP_BATCH, 512)?.min(max_queue_size);
        let schedule_delay = src.parsed(&OTEL_BSP_DELAY, Duration::from_secs(5), |v| {
            v.parse::<u64>()
                .ok()
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
                .ok_or_else(|| "expected whole milliseconds above 0, e.g. 5000".to_owned())
        })?;
        Ok(Some(OtlpExport {
            endpoint,
            headers,
            timeout,
            service_name,
            resource,
            sampler,
            max_queue_size,
            max_export_batch_size,
            schedule_delay,
        }))
    }
}

/// A parser of whole milliseconds from `min` to `max`, for `Sources::parsed`.
fn millis_between(min: u64, max: u64) -> impl Fn(&str) -> Result<Duration, String> {
    move |v| {
        v.parse::<u64>()
            .ok()
            .filter(|ms| (min..=max).contains(ms))
            .map(Duration::from_millis)
            .ok_or_else(|| format!("expected whole milliseconds between {min} and {max}"))
    }
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err("expected true or false".to_owned()),
    }
}

/// `key1=value1,key2=value2` with percent-encoded values, as `OTEL_RESOURCE_ATTRIBUTES` and
/// `OTEL_EXPORTER_OTLP_HEADERS` are written. The error never repeats a value (it may be a secret).
fn parse_key_values(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    for (i, item) in text.split(',').enumerate() {
        if item.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!(
                "item {} has no '=': expected key1=value1,key2=value2",
                i + 1
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("item {} has an empty key", i + 1));
        }
        let value = percent_decode(value.trim())
            .ok_or_else(|| format!("the value of {key} is not valid percent-encoded UTF-8"))?;
        pairs.push((key.to_owned(), value));
    }
    Ok(pairs)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A value and where it came from, for error messages.
struct Found {
    value: String,
    origin: String,
    secret: bool,
}

impl Found {
    fn invalid(&self, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.clone(),
            value: if self.secret {
                "(redacted)".to_owned()
            } else {
                self.value.clone()
            },
            problem: problem.into(),
        }
    }
}

/// The environment over the file.
struct Sources<'a> {
    env: &'a dyn Env,
    file: Option<(String, BTreeMap<String, String>)>,
}

impl Sources<'_> {
    fn get(&self, s: &Setting) -> Option<Found> {
        if let Some(value) = self.env.var(s.env) {
            return Some(Found {
                value,
                origin: format!("environment variable {}", s.env),
                secret: s.secret,
            });
        }
        let (path, values) = self.file.as_ref()?;
        let key = s.file_key?;
        values.get(key).map(|value| Found {
            value: value.clone(),
            origin: format!("config file {path} key {key}"),
            secret: s.secret,
        })
    }

    fn text(&self, s: &Setting) -> Option<String> {
        self.get(s).map(|f| f.value.trim().to_owned())
    }

    fn parsed<T>(
        &self,
        s: &Setting,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.get(s) {
            None => Ok(default),
            Some(found) => parse(found.value.trim()).map_err(|problem| found.invalid(problem)),
        }
    }

    fn millis(&self, s: &Setting, default_ms: u64) -> Result<Duration, ConfigError> {
        self.parsed(s, Duration::from_millis(default_ms), |v| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| "expected whole milliseconds, e.g. 5000".to_owned())
        })
    }

    fn positive(&self, s: &Setting, default: u32) -> Result<NonZeroU32, ConfigError> {
        self.parsed(
            s,
            NonZeroU32::new(default).unwrap_or(NonZeroU32::MIN),
            |v| {
                v.parse::<u32>()
                    .ok()
                    .and_then(NonZeroU32::new)
                    .ok_or_else(|| "expected a whole number between 1 and 4294967295".to_owned())
            },
        )
    }

    /// The three timeouts of an AWS client, each in whole milliseconds above zero, with an
    /// attempt no longer than its operation.
    fn aws_timeouts(
        &self,
        [connect, attempt, operation]: [&Setting; 3],
        default: AwsTimeouts,
    ) -> Result<AwsTimeouts, ConfigError> {
        let positive = |s: &Setting, default: Duration| {
            self.parsed(s, default, |v| {
                v.parse::<u64>()
                    .ok()
                    .filter(|ms| *ms > 0)
                    .map(Duration::from_millis)
                    .ok_or_else(|| "expected whole milliseconds above 0, e.g. 5000".to_owned())
            })
        };
        let timeouts = AwsTimeouts {
            connect: positive(connect, default.connect)?,
            attempt: positive(attempt, default.attempt)?,
            operation: positive(operation, default.operation)?,
        };
        match timeouts.validate() {
            Ok(()) => Ok(timeouts),
            // Blame the one of the pair that was set (the attempt when both were).
            Err(problem) => match self.get(attempt).or_else(|| self.get(operation)) {
                Some(found) => Err(found.invalid(problem)),
                None => Ok(default),
            },
        }
    }

    fn url(&self, s: &Setting) -> Result<Option<String>, ConfigError> {
        let Some(found) = self.get(s) else {
            return Ok(None);
        };
        let value = found.value.trim().trim_end_matches('/');
        if !(value.starts_with("http://") || value.starts_with("https://")) {
            return Err(found.invalid("expected an http:// or https:// URL"));
        }
        Ok(Some(value.to_owned()))
    }
}

impl Config {
    /// Defaults, then the TOML file (`file`, else `KEYVEX_CONFIG`), then the environment.
    pub fn load(env: &dyn Env, file: Option<&Path>) -> Result<Config, ConfigError> {
        let path = file
            .map(Path::to_path_buf)
            .or_else(|| env.var(CONFIG_FILE.env).map(PathBuf::from));
        let file = match path {
            Some(path) => Some(read_file(&path)?),
            None => None,
        };
        let src = Sources { env, file };

        let connect_timeout = src.millis(&CONNECT_TIMEOUT, 5_000)?;
        let simulate = src.parsed(&SIMULATE, None, |v| match v {
            "auto" => Ok(None),
            "always" | "1" | "true" => Ok(Some(true)),
            "never" | "0" | "false" => Ok(Some(false)),
            _ => Err("expected auto, always or never".to_owned()),
        })?;
        let upstream = |key: &Setting, base: &Setting, default: &str| {
            Ok::<_, ConfigError>(match src.text(key) {
                Some(k) => Some(Upstream {
                    base_url: src.url(base)?.unwrap_or_else(|| default.to_owned()),
                    key: ApiKey::new(k),
                }),
                None => None,
            })
        };
        let openai = upstream(
            &OPENAI_API_KEY,
            &OPENAI_BASE_URL,
            "https://api.openai.com/v1",
        )?;
        let anthropic = upstream(
            &ANTHROPIC_API_KEY,
            &ANTHROPIC_BASE_URL,
            "https://api.anthropic.com/v1",
        )?;
        let providers = if simulate.unwrap_or(openai.is_none() && anthropic.is_none()) {
            ProviderSetup::Simulated {
                seed: src.parsed(&SIM_SEED, 42, |v| {
                    v.parse().map_err(|_| "expected a whole number".to_owned())
                })?,
                profile: src.parsed(&SIM_PROFILE, SimProfile::Realistic, |v| match v {
                    "realistic" => Ok(SimProfile::Realistic),
                    "fast" => Ok(SimProfile::Fast),
                    _ => Err("expected fast or realistic".to_owned()),
                })?,
            }
        } else {
            ProviderSetup::Real { openai, anthropic }
        };

        let mut server = ServerConfig::default();
        server.addr = src.parsed(&ADDR, server.addr, |v| {
            v.parse::<SocketAddr>().map_err(|_| {
                "expected HOST:PORT with an IP host, e.g. 127.0.0.1:8080 or 0.0.0.0:8080".to_owned()
            })
        })?;
        server.api_keys = src.parsed(&API_KEYS, Vec::new(), |v| {
            v.split(',')
                .filter(|s| !s.trim().is_empty())
                .map(ApiKeySpec::parse)
                .collect()
        })?;
        server.max_body_bytes = src.parsed(&MAX_BODY_BYTES, server.max_body_bytes, |v| {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| "expected a positive number of bytes".to_owned())
        })?;
        server.drain_timeout = src.millis(&DRAIN_TIMEOUT, 30_000)?;
        server.keep_alive = src.millis(&KEEP_ALIVE, 15_000)?;
        if server.keep_alive.is_zero()
            && let Some(found) = src.get(&KEEP_ALIVE)
        {
            return Err(found.invalid("must be at least 1"));
        }

        let caller_rate = Rate {
            per_period: src.positive(&RATE_LIMIT_PER_HOUR, 1_000)?,
            period: Duration::from_secs(3_600),
            burst: src.positive(&RATE_LIMIT_BURST, 100)?,
        };
        let provider_rates = ProviderRates {
            requests_per_minute: src.positive(&PROVIDER_RPM, 500)?,
            tokens_per_minute: src.positive(&PROVIDER_TPM, 2_000_000)?,
        };

        let usd = |s: &Setting| src.parsed(s, None, |v| parse_usd(v).map(Some));
        let budgets = BudgetLimits {
            caller_daily: usd(&BUDGET_DAILY)?,
            caller_monthly: usd(&BUDGET_MONTHLY)?,
            run: usd(&BUDGET_RUN)?,
            global_daily: usd(&BUDGET_GLOBAL_DAILY)?,
            callers: src.parsed(&BUDGET_CALLERS, BTreeMap::new(), parse_caller_budgets)?,
        };
        let redis = match src.get(&REDIS_URL) {
            None => None,
            Some(found) => {
                let url = found.value.trim().to_owned();
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(found.invalid("expected redis://HOST:PORT[/DB] or rediss://…"));
                }
                let timeout = src.millis(&REDIS_TIMEOUT, 100)?;
                if timeout.is_zero() {
                    return Err(ConfigError::Invalid {
                        origin: REDIS_TIMEOUT.env.to_owned(),
                        value: "0".to_owned(),
                        problem: "must be at least 1".to_owned(),
                    });
                }
                let when_down = |s: &Setting, default: WhenDown| {
                    src.parsed(s, default, |v| match v {
                        "open" => Ok(WhenDown::Open),
                        "closed" => Ok(WhenDown::Closed),
                        _ => Err("expected open or closed".to_owned()),
                    })
                };
                Some(RedisConfig {
                    url,
                    timeout,
                    cluster: src.parsed(&REDIS_CLUSTER, false, parse_bool)?,
                    limits_when_down: when_down(&REDIS_LIMITS_WHEN_DOWN, WhenDown::Open)?,
                    budgets_when_down: match when_down(&REDIS_BUDGETS_WHEN_DOWN, WhenDown::Closed)?
                    {
                        WhenDown::Open => OnUnavailable::FailOpen,
                        WhenDown::Closed => OnUnavailable::FailClosed,
                    },
                })
            }
        };

        let ledger = PathBuf::from(
            src.text(&METRICS_DB)
                .unwrap_or_else(|| "keyvex-metrics.sqlite3".to_owned()),
        );
        let mut metrics = MetricsConfig::new(ledger.clone());
        let ms = |s, default, min, max| src.parsed(s, default, millis_between(min, max));
        metrics.flush_interval = ms(&METRICS_FLUSH, metrics.flush_interval, 1, 60_000)?;
        metrics.intent_linger = ms(&INTENT_LINGER, metrics.intent_linger, 0, 1_000)?;
        metrics.record_linger = ms(&RECORD_LINGER, metrics.record_linger, 0, 1_000)?;
        metrics.record_linger_min_calls = src.parsed(
            &RECORD_LINGER_MIN_CALLS,
            metrics.record_linger_min_calls,
            |v| {
                v.parse::<usize>()
                    .ok()
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or_else(|| "expected a whole number between 1 and 100000".to_owned())
            },
        )?;
        metrics.replica_lost_after =
            src.parsed(&REPLICA_LOST_AFTER, metrics.replica_lost_after, |v| {
                v.parse::<u64>()
                    .ok()
                    .filter(|ms| (100..=86_400_000).contains(ms))
                    .map(Duration::from_millis)
                    .ok_or_else(|| {
                        "expected whole milliseconds between 100 and 86400000 (a day)".to_owned()
                    })
            })?;
        let dynamodb_endpoint = src.url(&DYNAMODB_ENDPOINT)?;
        let dynamodb_timeouts = src.aws_timeouts(
            [
                &DYNAMODB_CONNECT_TIMEOUT,
                &DYNAMODB_ATTEMPT_TIMEOUT,
                &DYNAMODB_OPERATION_TIMEOUT,
            ],
            AwsTimeouts::DYNAMODB,
        )?;
        let store = match src.text(&DYNAMODB_TABLE) {
            Some(table) => StoreConfig::Dynamo {
                table,
                endpoint: dynamodb_endpoint.clone(),
                timeouts: dynamodb_timeouts,
            },
            None => StoreConfig::Sqlite { path: ledger },
        };

        let sqs_endpoint = src.url(&SQS_ENDPOINT)?;
        let sqs_timeouts = src.aws_timeouts(
            [
                &SQS_CONNECT_TIMEOUT,
                &SQS_ATTEMPT_TIMEOUT,
                &SQS_OPERATION_TIMEOUT,
            ],
            AwsTimeouts::SQS,
        )?;
        let worker_concurrency = src.parsed(&WORKER_CONCURRENCY, 4, |v| match v.parse() {
            Ok(n @ 1..=256) => Ok(n),
            _ => Err("expected a whole number from 1 to 256".to_owned()),
        })?;
        let queue = match src.get(&QUEUE_URL) {
            None => None,
            Some(found) => {
                let url = found.value.trim();
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(found.invalid(
                        "expected a queue URL such as https://sqs.us-east-1.amazonaws.com/123456789012/keyvex-ai-processing-queue",
                    ));
                }
                Some(QueueConfig {
                    queue_url: url.to_owned(),
                    dlq_url: src.url(&DLQ_URL)?,
                    endpoint: sqs_endpoint.clone(),
                    timeouts: sqs_timeouts,
                    concurrency: worker_concurrency,
                })
            }
        };

        let anthropic_version =
            src.parsed(&ANTHROPIC_VERSION, AnthropicVersion::default(), |v| {
                v.parse::<AnthropicVersion>().map_err(|_| {
                    format!(
                        "expected an Anthropic API version the engine speaks: {}",
                        AnthropicVersion::known_list()
                    )
                })
            })?;

        Ok(Config {
            providers,
            anthropic_version,
            models_file: src.text(&MODELS_FILE).map(PathBuf::from),
            catalog_poll: src.parsed(&CATALOG_POLL, Duration::from_secs(5), |v| {
                v.parse::<u64>()
                    .ok()
                    .filter(|ms| (50..=600_000).contains(ms))
                    .map(Duration::from_millis)
                    .ok_or_else(|| "expected whole milliseconds between 50 and 600000".to_owned())
            })?,
            connect_timeout,
            ttft_timeout: src.millis(&TTFT_TIMEOUT, 20_000)?,
            stall_timeout: src.millis(&STALL_TIMEOUT, 30_000)?,
            header_timeout: src.millis(&HEADER_TIMEOUT, 10_000)?,
            request_timeout: src.millis(&REQUEST_TIMEOUT, 600_000)?,
            same_model_retries: src.parsed(&SAME_MODEL_RETRIES, 1, |v| match v.parse() {
                Ok(n @ 0..=5) => Ok(n),
                _ => Err("expected a whole number from 0 to 5".to_owned()),
            })?,
            max_event_bytes: src.parsed(&MAX_EVENT_BYTES, DEFAULT_MAX_EVENT_BYTES, |v| match v
                .parse::<usize>()
            {
                Ok(n @ 1024..=268_435_456) => Ok(n),
                _ => Err("expected a byte count from 1024 to 268435456 (256 MiB)".to_owned()),
            })?,
            breaker: BreakerConfig {
                failure_threshold: src.parsed(&BREAKER_THRESHOLD, 5, |v| {
                    v.parse::<u32>().map_err(|_| {
                        "expected a whole number (0 turns circuit breaking off)".to_owned()
                    })
                })?,
                cool_down: src.millis(&BREAKER_COOL_DOWN, 5_000)?,
                probe_interval: src.millis(&BREAKER_PROBE, 5_000)?,
                account_cool_down: src.millis(&ACCOUNT_COOL_DOWN, 60_000)?,
            },
            caller_rate,
            provider_rates,
            budgets,
            redis,
            store,
            dynamodb_endpoint,
            dynamodb_timeouts,
            metrics,
            server,
            queue,
            sqs_endpoint,
            sqs_timeouts,
            worker_concurrency,
            capture_message_content: src.parsed(&OTEL_CAPTURE_CONTENT, false, parse_bool)?,
        })
    }
}

/// `alice:daily=5:monthly=100,bob:daily=0.5` into per-caller limits.
fn parse_caller_budgets(text: &str) -> Result<BTreeMap<String, CallerBudget>, String> {
    let mut callers = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let mut parts = item.split(':');
        let caller = parts.next().unwrap_or_default().trim();
        if caller.is_empty() {
            return Err(format!("{item:?}: expected CALLER:daily=USD:monthly=USD"));
        }
        let mut budget = CallerBudget::default();
        for part in parts {
            let (name, value) = part.split_once('=').ok_or_else(|| {
                format!("{item:?}: expected daily=USD or monthly=USD after {caller}:")
            })?;
            let amount = parse_usd(value).map_err(|e| format!("{item:?}: {e}"))?;
            match name.trim() {
                "daily" => budget.daily = Some(amount),
                "monthly" => budget.monthly = Some(amount),
                other => {
                    return Err(format!(
                        "{item:?}: unknown limit {other:?}; expected daily or monthly"
                    ));
                }
            }
        }
        if budget.is_empty() {
            return Err(format!("{item:?}: name a daily= or monthly= limit"));
        }
        callers.insert(caller.to_owned(), budget);
    }
    Ok(callers)
}

/// Reads the TOML file into `section.key` → text (lists joined with commas), refusing keys no
/// setting declares.
fn read_file(path: &Path) -> Result<(String, BTreeMap<String, String>), ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::FileRead {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::File {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    let known: Vec<&str> = SETTINGS.iter().filter_map(|s| s.file_key).collect();
    let mut values = BTreeMap::new();
    for (section, entries) in table {
        let toml::Value::Table(entries) = entries else {
            return Err(ConfigError::File {
                path: shown,
                message: format!(
                    "{section} must be a [section]; settings live under [server], [limits], [budgets], [redis], [providers], [breaker], [metrics], [store], [queue] or [telemetry]"
                ),
            });
        };
        for (name, value) in entries {
            let key = format!("{section}.{name}");
            if !known.contains(&key.as_str()) {
                return Err(ConfigError::UnknownKey {
                    path: shown,
                    key,
                    known: known.join(", "),
                });
            }
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(items) => items
                    .iter()
                    .map(|i| match i {
                        toml::Value::String(s) => Ok(s.clone()),
                        other => Err(other.to_string()),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|item| ConfigError::File {
                        path: shown.clone(),
                        message: format!("{key}: list items must be strings, got {item}"),
                    })?
                    .join(","),
                toml::Value::Datetime(_) | toml::Value::Table(_) => {
                    return Err(ConfigError::File {
                        path: shown,
                        message: format!("{key} must be a string, a number or a list of strings"),
                    });
                }
            };
            values.insert(key, text);
        }
    }
    Ok((shown, values))
}

/// The settings table as `keyvex --help` prints it.
pub fn help() -> String {
    let width = SETTINGS.iter().map(|s| s.env.len()).max().unwrap_or(0);
    let mut help = String::from(
        "Settings (environment variable, then its key in the --config TOML file, where it has one):\n",
    );
    for s in SETTINGS {
        let key = s
            .file_key
            .map_or_else(String::new, |k| format!(" [file: {k}]"));
        help.push_str(&format!("  {:width$}  {}{key}\n", s.env, s.purpose));
    }
    help
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_keys_means_simulated() {
        let c = Config::load(&MapEnv::default(), None).unwrap();
        assert!(matches!(
            c.providers,
            ProviderSetup::Simulated {
                seed: 42,
                profile: SimProfile::Realistic
            }
        ));
        assert_eq!(
            c.store,
            StoreConfig::Sqlite {
                path: "keyvex-metrics.sqlite3".into()
            }
        );
        assert!(c.queue.is_none());
    }

    #[test]
    fn sim_profile_is_read_and_checked() {
        let env = MapEnv::new([("KEYVEX_SIM_PROFILE", "fast"), ("KEYVEX_SIM_SEED", "3")]);
        let c = Config::load(&env, None).unwrap();
        assert!(matches!(
            c.providers,
            ProviderSetup::Simulated {
                seed: 3,
                profile: SimProfile::Fast
            }
        ));
        let env = MapEnv::new([("KEYVEX_SIM_PROFILE", "slow")]);
        let e = Config::load(&env, None).unwrap_err().to_string();
        assert!(e.contains("KEYVEX_SIM_PROFILE"), "{e}");
    }

    #[test]
    fn a_key_means_real_and_base_url_is_trimmed() {
        let env = MapEnv::new([
            ("OPENAI_API_KEY", "sk-x"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
        ]);
        let c = Config::load(&env, None).unwrap();
        let ProviderSetup::Real { openai, anthropic } = c.providers else {
            panic!("expected real providers");
        };
        assert_eq!(openai.unwrap().base_url, "http://127.0.0.1:9/v1");
        assert!(anthropic.is_none());
    }

    #[test]
    fn env_over_file_over_defaults_and_typos_are_errors() {
        let dir = std::env::temp_dir().join(format!("keyvex-cfg-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keyvex.toml");
        std::fs::write(
            &file,
            "[server]\naddr = \"127.0.0.1:9000\"\napi_keys = [\"file-key-123=carol:admin\"]\n\
             [limits]\nburst = 7\n[store]\ndynamodb_table = \"t1\"\n[queue]\nurl = \"http://127.0.0.1:5000/1/q\"\nworker_concurrency = 2\n",
        )
        .unwrap();
        let env = MapEnv::new([
            ("KEYVEX_ADDR", "127.0.0.1:0"),
            ("KEYVEX_RATE_LIMIT_PER_HOUR", "60"),
        ]);
        let c = Config::load(&env, Some(&file)).unwrap();
        assert_eq!(c.server.addr.port(), 0, "environment wins over the file");
        assert_eq!(
            (c.caller_rate.per_period.get(), c.caller_rate.burst.get()),
            (60, 7)
        );
        assert_eq!(c.server.api_keys[0].caller, "carol");
        assert!(matches!(c.store, StoreConfig::Dynamo { ref table, .. } if table == "t1"));
        assert_eq!(c.queue.as_ref().map(|q| q.concurrency), Some(2));

        std::fs::write(&file, "[server]\nadress = \"x\"\n").unwrap();
        let e = Config::load(&MapEnv::default(), Some(&file))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.adress") && e.contains("keyvex.toml") && e.contains("server.addr"),
            "{e}"
        );
        std::fs::write(&file, "[limits]\nburst = 0\n").unwrap();
        let e = Config::load(&MapEnv::default(), Some(&file))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("limits.burst") && e.contains("keyvex.toml"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn anthropic_version_is_read_from_env_or_file_and_checked() {
        let c = Config::load(&MapEnv::default(), None).unwrap();
        assert_eq!(c.anthropic_version, AnthropicVersion::V2023_06_01);
        let env = MapEnv::new([("ANTHROPIC_VERSION", "2026-10-21")]);
        let c = Config::load(&env, None).unwrap();
        assert_eq!(c.anthropic_version, AnthropicVersion::V2026_10_21);

        let dir = std::env::temp_dir().join(format!("keyvex-cfg-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keyvex.toml");
        std::fs::write(&file, "[providers]\nanthropic_version = \"2026-10-21\"\n").unwrap();
        let c = Config::load(&MapEnv::default(), Some(&file)).unwrap();
        assert_eq!(c.anthropic_version, AnthropicVersion::V2026_10_21);

        let env = MapEnv::new([("ANTHROPIC_VERSION", "2025-01-01")]);
        let e = Config::load(&env, None).unwrap_err().to_string();
        assert!(
            e.contains("ANTHROPIC_VERSION")
                && e.contains("2025-01-01")
                && e.contains("2023-06-01, 2026-10-21"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn budgets_and_redis_are_read_from_the_file_and_the_environment() {
        let c = Config::load(&MapEnv::default(), None).unwrap();
        assert_eq!(c.budgets, BudgetLimits::default(), "unlimited by default");
        assert!(c.redis.is_none(), "limits in process by default");
        let dir = fresh_dir();
        let file = dir.join("budgets.toml");
        std::fs::write(
            &file,
            "[budgets]\ndaily_usd = 5\nrun_usd = \"0.25\"\ncallers = [\"vip:daily=50:monthly=1000\", \"low:monthly=1\"]\n\
             [redis]\nurl = \"redis://:pw@10.0.0.5:6379/2\"\nbudgets_when_down = \"open\"\n",
        )
        .unwrap();
        let env = MapEnv::new([("KEYVEX_BUDGET_GLOBAL_DAILY_USD", "100.5")]);
        let c = Config::load(&env, Some(&file)).unwrap();
        let usd = |d: u64| Some(keyvex_engine::Cost::from_micro_usd(d * 1_000_000));
        assert_eq!(c.budgets.caller_daily, usd(5));
        assert_eq!(c.budgets.caller_monthly, None);
        assert_eq!(c.budgets.run, Some(keyvex_engine::Cost(250_000_000_000)));
        assert_eq!(
            c.budgets.global_daily,
            Some(keyvex_engine::Cost(100_500_000_000_000))
        );
        assert_eq!(c.budgets.callers["vip"].monthly, usd(1000));
        assert_eq!(c.budgets.callers["low"].daily, None);
        let redis = c.redis.unwrap();
        assert_eq!(redis.timeout, Duration::from_millis(100));
        assert_eq!(redis.limits_when_down, WhenDown::Open);
        assert_eq!(redis.budgets_when_down, OnUnavailable::FailOpen);
        assert!(
            !format!("{redis:?}").contains("pw"),
            "the password is never shown"
        );
        for (name, value) in [
            ("KEYVEX_BUDGET_DAILY_USD", "-1"),
            ("KEYVEX_BUDGET_CALLERS", "alice:weekly=3"),
            ("KEYVEX_BUDGET_CALLERS", "alice"),
            ("REDIS_URL", "http://localhost:6379"),
        ] {
            let e = Config::load(&MapEnv::new([(name, value)]), None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(name), "{e}");
        }
        let e = Config::load(
            &MapEnv::new([
                ("REDIS_URL", "redis://127.0.0.1:6379"),
                ("KEYVEX_REDIS_LIMITS_WHEN_DOWN", "maybe"),
            ]),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("open or closed"), "{e}");
    }

    fn fresh_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keyvex-config-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn api_keys_never_echo() {
        let env = MapEnv::new([("KEYVEX_API_KEYS", "k-aaaaaaaa=alice:admin, k-bbbbbbbb=bob")]);
        let c = Config::load(&env, None).unwrap();
        assert_eq!(c.server.api_keys.len(), 2);
        let env = MapEnv::new([("KEYVEX_API_KEYS", "k-secret-value=alice:root")]);
        let e = Config::load(&env, None).unwrap_err().to_string();
        assert!(e.contains("root") && !e.contains("k-secret-value"), "{e}");
    }

    #[test]
    fn otel_settings_follow_the_specification() {
        let off = TelemetryConfig::load(&MapEnv::new([("OTEL_SERVICE_NAME", "x")])).unwrap();
        assert!(off.export.is_none(), "no endpoint, no export");
        let base = TelemetryConfig::load(&MapEnv::new([
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-api-key=abc%3D%3D, x-team=core",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "X-Team=edge"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=from-attrs,deployment.environment.name=prod",
            ),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ]))
        .unwrap()
        .export
        .unwrap();
        assert_eq!(base.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(
            base.headers,
            vec![
                ("x-api-key".to_owned(), "abc==".to_owned()),
                ("X-Team".to_owned(), "edge".to_owned())
            ]
        );
        assert_eq!(base.service_name, "from-attrs");
        assert_eq!(
            base.resource,
            vec![("deployment.environment.name".to_owned(), "prod".to_owned())]
        );
        assert_eq!(base.sampler, TraceSampler::ParentBasedTraceIdRatio(0.25));
        assert_eq!(base.timeout, Duration::from_secs(10));
        let traces = TelemetryConfig::load(&MapEnv::new([
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://wrong:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://right:4318/custom",
            ),
            ("OTEL_SERVICE_NAME", "api"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "250"),
        ]))
        .unwrap()
        .export
        .unwrap();
        assert_eq!(traces.endpoint, "http://right:4318/custom");
        assert_eq!(traces.service_name, "api");
        assert_eq!(traces.timeout, Duration::from_millis(250));
        let disabled = TelemetryConfig::load(&MapEnv::new([
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ]))
        .unwrap();
        assert!(disabled.export.is_none());
    }

    #[test]
    fn bad_otel_settings_name_the_variable_and_never_echo_headers() {
        let err = |pairs: &[(&str, &str)]| {
            let mut all = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")];
            all.extend_from_slice(pairs);
            TelemetryConfig::load(&MapEnv::new(all))
                .unwrap_err()
                .to_string()
        };
        let grpc = err(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]);
        assert!(
            grpc.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && grpc.contains("http/protobuf"),
            "{grpc}"
        );
        let sampler = err(&[("OTEL_TRACES_SAMPLER", "jaeger_remote")]);
        assert!(
            sampler.contains("OTEL_TRACES_SAMPLER") && sampler.contains("traceidratio"),
            "{sampler}"
        );
        let ratio = err(&[("OTEL_TRACES_SAMPLER_ARG", "2")]);
        assert!(ratio.contains("OTEL_TRACES_SAMPLER_ARG"), "{ratio}");
        let headers = err(&[(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "authorization=Bearer%zzsecret",
        )]);
        assert!(headers.contains("OTEL_EXPORTER_OTLP_HEADERS"), "{headers}");
        assert!(!headers.contains("secret"), "{headers}");
        let url = TelemetryConfig::load(&MapEnv::new([(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "collector:4318",
        )]))
        .unwrap_err()
        .to_string();
        assert!(url.contains("http://"), "{url}");
    }

    #[test]
    fn bad_numbers_name_the_variable() {
        for (name, value) in [
            ("KEYVEX_TTFT_TIMEOUT_MS", "soon"),
            ("KEYVEX_WORKER_CONCURRENCY", "zero"),
            ("KEYVEX_METRICS_FLUSH_MS", "0"),
            ("KEYVEX_CATALOG_POLL_MS", "10"),
            ("SQS_AI_PROCESSING_QUEUE_URL", "queue"),
            ("KEYVEX_RECORD_LINGER_MS", "5001"),
            ("KEYVEX_RECORD_LINGER_MIN_CALLS", "0"),
        ] {
            let e = Config::load(&MapEnv::new([(name, value)]), None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn the_record_linger_is_read_and_zero_turns_it_off() {
        let c = Config::load(&MapEnv::default(), None).unwrap();
        assert_eq!(c.metrics.record_linger, Duration::from_millis(5));
        assert_eq!(c.metrics.record_linger_min_calls, 4);
        let c = Config::load(
            &MapEnv::new([
                ("KEYVEX_RECORD_LINGER_MS", "0"),
                ("KEYVEX_RECORD_LINGER_MIN_CALLS", "16"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(c.metrics.record_linger, Duration::ZERO);
        assert_eq!(c.metrics.record_linger_min_calls, 16);
    }

    #[test]
    fn aws_timeouts_default_are_read_and_checked() {
        let c = Config::load(&MapEnv::default(), None).unwrap();
        assert_eq!(
            (c.dynamodb_timeouts, c.sqs_timeouts),
            (AwsTimeouts::DYNAMODB, AwsTimeouts::SQS)
        );
        let dir = std::env::temp_dir().join(format!("keyvex-cfg-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keyvex.toml");
        std::fs::write(
            &file,
            "[store]\ndynamodb_table = \"t1\"\ndynamodb_operation_timeout_ms = 1500\n\
             [queue]\nurl = \"http://127.0.0.1:5000/1/q\"\nattempt_timeout_ms = 400\n",
        )
        .unwrap();
        let env = MapEnv::new([
            ("KEYVEX_DYNAMODB_ATTEMPT_TIMEOUT_MS", "250"),
            ("KEYVEX_SQS_CONNECT_TIMEOUT_MS", "700"),
        ]);
        let c = Config::load(&env, Some(&file)).unwrap();
        let dynamo = AwsTimeouts {
            attempt: Duration::from_millis(250),
            operation: Duration::from_millis(1_500),
            ..AwsTimeouts::DYNAMODB
        };
        assert_eq!(c.dynamodb_timeouts, dynamo);
        assert!(matches!(c.store, StoreConfig::Dynamo { timeouts, .. } if timeouts == dynamo));
        let sqs = AwsTimeouts {
            connect: Duration::from_millis(700),
            attempt: Duration::from_millis(400),
            ..AwsTimeouts::SQS
        };
        assert_eq!(c.sqs_timeouts, sqs);
        assert_eq!(c.queue.map(|q| q.timeouts), Some(sqs));
        std::fs::remove_dir_all(&dir).unwrap();

        // An attempt that could never fire, and a zero, name the variable and say why.
        let env = MapEnv::new([("KEYVEX_DYNAMODB_ATTEMPT_TIMEOUT_MS", "30000")]);
        let e = Config::load(&env, None).unwrap_err().to_string();
        assert!(
            e.contains("KEYVEX_DYNAMODB_ATTEMPT_TIMEOUT_MS") && e.contains("operation timeout"),
            "{e}"
        );
        let env = MapEnv::new([("KEYVEX_SQS_OPERATION_TIMEOUT_MS", "1000")]);
        let e = Config::load(&env, None).unwrap_err().to_string();
        assert!(e.contains("KEYVEX_SQS_OPERATION_TIMEOUT_MS"), "{e}");
        let env = MapEnv::new([("KEYVEX_SQS_CONNECT_TIMEOUT_MS", "0")]);
        let e = Config::load(&env, None).unwrap_err().to_string();
        assert!(e.contains("KEYVEX_SQS_CONNECT_TIMEOUT_MS"), "{e}");
    }

    #[test]
    fn every_setting_is_listed_once_and_file_keys_are_unique() {
        let mut envs: Vec<_> = SETTINGS.iter().map(|s| s.env).collect();
        envs.sort_unstable();
        envs.dedup();
        assert_eq!(
            envs.len(),
            SETTINGS.len(),
            "an environment variable is listed twice"
        );
        let mut keys: Vec<_> = SETTINGS.iter().filter_map(|s| s.file_key).collect();
        let n = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), n, "a file key is listed twice");
        let h = help();
        assert!(h.contains("KEYVEX_WORKER_CONCURRENCY") && h.contains("queue.worker_concurrency"));
    }
}
