//! The DynamoDB single-table store: request metrics, alerts, session messages and session
//! metadata in one table keyed `PK`/`SK`, with `GSI1`, `GSI2` and a `ttl` attribute. One file
//! per job: the item layout (`codec`), the batch sink the shipper writes to (`sink`), the reads
//! (`queries`: always `Query` on a key or a GSI, never `Scan`), provisioning (`schema`), and
//! every replica's open call intents with the sweep that records a lost replica's (`intents`).

mod codec;
mod intents;
mod queries;
mod schema;
mod sink;

use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::aws::AwsTimeouts;
use crate::entry::StoreError;

pub use codec::{
    alert_from_item, alert_item, entry_item, message_from_item, message_item, request_from_item,
    request_item,
};
pub use intents::{intent_from_item, intent_item};
pub use schema::{
    ACTIVE_WAIT, IndexInfo, KeyInfo, Provision, Provisioned, SCHEMA, TTL_ATTRIBUTE, TableInfo,
    TtlInfo, create_table, create_table_within, describe_table,
};
pub use sink::chunk_items;

/// BatchWriteItem accepts at most 25 requests …
pub const MAX_BATCH_ITEMS: usize = 25;
/// … and 16 MB per request (25 × 400 KB items stay under it, but the wire form is larger than
/// the stored size, so the limit is checked on an estimate anyway).
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
const REQUEST_TTL_SECS: u64 = 30 * 86_400;
const ALERT_TTL_SECS: u64 = 90 * 86_400;
/// Keeps a pathological error text from pushing an item past DynamoDB's 400 KB item limit.
const MAX_ERROR_CHARS: usize = 4_096;
const KEY_ATTRS: [&str; 7] = ["PK", "SK", "GSI1PK", "GSI1SK", "GSI2PK", "GSI2SK", "ttl"];
/// A message's content above this many bytes of JSON is stored as a truncated preview, so one
/// huge output cannot exceed the 400 KB item limit and block the outbox behind it forever.
pub const MAX_CONTENT_BYTES: usize = 350_000;

/// Error codes by which DynamoDB refuses the items themselves (too large, a bad or empty
/// attribute, an item collection over its size limit): the same items fail every time, so they
/// become [`StoreError::Rejected`] and the shipper sets them aside. A missing table or denied
/// access fails every item alike and stays an ordinary (retried) error.
const REJECTION_CODES: [&str; 3] = [
    "ValidationException",
    "ItemCollectionSizeLimitExceededException",
    "SerializationException",
];

/// The backoff of the in-sink resend loop (unprocessed items and throttling).
#[derive(Debug, Clone, Copy)]
pub struct DynamoRetry {
    pub base: Duration,
    pub cap: Duration,
    /// Attempts per 25-item request before the batch is handed back to the shipper, which keeps
    /// it in the ledger and tries again later.
    pub max_attempts: u32,
}

impl Default for DynamoRetry {
    fn default() -> Self {
        DynamoRetry {
            base: Duration::from_millis(50),
            cap: Duration::from_secs(5),
            max_attempts: 8,
        }
    }
}

/// The DynamoDB store: a [`Sink`] for the shipper and the admin queries.
#[derive(Clone)]
pub struct DynamoStore {
    pub(super) client: Client,
    pub(super) table: String,
    pub(super) retry: DynamoRetry,
}

/// A client for `DYNAMODB_ENDPOINT` (an emulator) or, when `None`, the regular AWS endpoint, with
/// `timeouts`; region and credentials come from the standard AWS variables and profiles.
pub async fn client(endpoint: Option<&str>, timeouts: &AwsTimeouts) -> Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    configure(&shared, endpoint, timeouts)
}

/// A client on `shared` (region, credentials, retry settings) for `endpoint` with `timeouts`,
/// so a hung endpoint ends in a timeout error instead of a call that never returns.
pub fn configure(shared: &SdkConfig, endpoint: Option<&str>, timeouts: &AwsTimeouts) -> Client {
    let mut config =
        aws_sdk_dynamodb::config::Builder::from(shared).timeout_config(timeouts.timeout_config());
    if let Some(url) = endpoint {
        config = config.endpoint_url(url);
    }
    Client::from_conf(config.build())
}

impl DynamoStore {
    pub fn new(client: Client, table: &str) -> DynamoStore {
        DynamoStore {
            client,
            table: table.to_owned(),
            retry: DynamoRetry::default(),
        }
    }

    pub fn with_retry(mut self, retry: DynamoRetry) -> DynamoStore {
        self.retry = retry;
        self
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub(super) fn sdk_error<E, R>(
        &self,
        operation: &'static str,
        err: &SdkError<E, R>,
    ) -> StoreError
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
        R: std::fmt::Debug,
    {
        sdk_error(&self.table, operation, err)
    }

    /// [`DynamoStore::sdk_error`] for the write path, where a refusal of the items is told
    /// apart ([`StoreError::Rejected`]) so the shipper can isolate the offending entries.
    pub(super) fn write_error<E, R>(
        &self,
        operation: &'static str,
        err: &SdkError<E, R>,
    ) -> StoreError
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
        R: std::fmt::Debug,
    {
        let code = match err {
            SdkError::ServiceError(e) => e.err().code(),
            _ => None,
        };
        if code.is_some_and(|c| REJECTION_CODES.contains(&c)) {
            return StoreError::Rejected {
                sink: "dynamodb",
                message: format!(
                    "{operation} on table {}: {}",
                    self.table,
                    DisplayErrorContext(err)
                ),
            };
        }
        self.sdk_error(operation, err)
    }
}

/// Turns an SDK error into a [`StoreError`], deciding once for every DynamoDB caller which
/// failures are worth retrying (timeouts, dispatch failures, throttling, 5xx) and which are not.
/// A timeout — of the operation, of its last attempt, or of the connect — is a
/// [`StoreError::Timeout`], so the shipper can count it apart.
pub(crate) fn sdk_error<E, R>(
    table: &str,
    operation: &'static str,
    err: &SdkError<E, R>,
) -> StoreError
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    if crate::aws::is_timeout(err) {
        return StoreError::Timeout {
            operation,
            table: table.to_owned(),
            message: DisplayErrorContext(err).to_string(),
        };
    }
    let retryable = match err {
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        SdkError::ServiceError(e) => matches!(
            e.err().code(),
            Some(
                "ThrottlingException"
                    | "ProvisionedThroughputExceededException"
                    | "RequestLimitExceeded"
                    | "InternalServerError"
                    | "ServiceUnavailable"
            )
        ),
        _ => false,
    };
    StoreError::Dynamo {
        operation,
        table: table.to_owned(),
        message: DisplayErrorContext(err).to_string(),
        retryable,
    }
}
