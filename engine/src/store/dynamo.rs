//! DynamoDB single-table store (`DESIGN.md`): item codecs for request metrics, alerts and session
//! messages, the batch sink (≤ 25 items, unprocessed items resent with full jitter; session
//! metadata by conditional `UpdateItem`), table creation, and the reads (always `Query` on a key
//! or a GSI, never `Scan`).

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, PutRequest, ReturnValue, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification, WriteRequest,
};
use futures::future::BoxFuture;
use serde_json::Value;

use crate::metrics::{Alert, AlertType, RequestRecord, Severity};
use crate::store::sessions::{SessionMessage, SessionMetadata};
use crate::store::{Entry, Sink, StoreError, WriteReport, day_of, full_jitter, iso_ts};

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
    client: Client,
    table: String,
    retry: DynamoRetry,
}

/// A client for `DYNAMODB_ENDPOINT` (an emulator) or, when `None`, the regular AWS endpoint;
/// region and credentials come from the standard AWS variables and profiles.
pub async fn client(endpoint: Option<&str>) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    Client::new(&loader.load().await)
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

    /// Requests that started in `[from_ms, to_ms]`: one `Query` per UTC day partition with `SK`
    /// between the two instants, paginated; oldest first.
    pub async fn requests_between(
        &self,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        let mut out = Vec::new();
        if from_ms > to_ms {
            return Ok(out);
        }
        let lo = format!("REQUEST#{}", iso_ts(from_ms));
        // '$' sorts after '#', so every request id of the last millisecond is included.
        let hi = format!("REQUEST#{}$", iso_ts(to_ms));
        let first_day = from_ms / 86_400_000;
        let last_day = to_ms / 86_400_000;
        for day in first_day..=last_day {
            let pk = format!("METRIC#{}", day_of(day * 86_400_000));
            for item in self
                .query(None, "PK = :pk AND SK BETWEEN :lo AND :hi", &pk, &lo, &hi)
                .await?
            {
                out.push(request_from_item(&item)?);
            }
        }
        Ok(out)
    }

    /// Alerts raised in `[from_ms, to_ms]`: `Query` on GSI1 per alert type and severity.
    pub async fn alerts_between(&self, from_ms: u64, to_ms: u64) -> Result<Vec<Alert>, StoreError> {
        let mut out = Vec::new();
        for alert_type in AlertType::ALL {
            for severity in Severity::ALL {
                let pk = format!("ALERT_TYPE#{}", alert_type.as_str());
                let lo = format!("{}#{}", severity.as_str(), iso_ts(from_ms));
                let hi = format!("{}#{}$", severity.as_str(), iso_ts(to_ms));
                for item in self
                    .query(
                        Some("GSI1"),
                        "GSI1PK = :pk AND GSI1SK BETWEEN :lo AND :hi",
                        &pk,
                        &lo,
                        &hi,
                    )
                    .await?
                {
                    out.push(alert_from_item(&item)?);
                }
            }
        }
        out.sort_by(|a: &Alert, b: &Alert| {
            (a.timestamp_ms, &a.alert_id).cmp(&(b.timestamp_ms, &b.alert_id))
        });
        Ok(out)
    }

    async fn query(
        &self,
        index: Option<&str>,
        condition: &str,
        pk: &str,
        lo: &str,
        hi: &str,
    ) -> Result<Vec<HashMap<String, AttributeValue>>, StoreError> {
        self.query_all(Query {
            index,
            condition,
            values: vec![
                (":pk", AttributeValue::S(pk.to_owned())),
                (":lo", AttributeValue::S(lo.to_owned())),
                (":hi", AttributeValue::S(hi.to_owned())),
            ],
            forward: true,
            limit: None,
            consistent: false,
        })
        .await
    }

    /// Runs one `Query`, following `LastEvaluatedKey` until done or `limit` items are in.
    async fn query_all(
        &self,
        q: Query<'_>,
    ) -> Result<Vec<HashMap<String, AttributeValue>>, StoreError> {
        let mut items = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page_limit = q
                .limit
                .map(|l| i32::try_from(l.saturating_sub(items.len())).unwrap_or(i32::MAX));
            let mut req = self
                .client
                .query()
                .table_name(&self.table)
                .set_index_name(q.index.map(str::to_owned))
                .key_condition_expression(q.condition)
                .scan_index_forward(q.forward)
                .set_limit(page_limit)
                .set_exclusive_start_key(start.take());
            // Strongly consistent reads exist on the base table only (a GSI rejects them).
            if q.consistent && q.index.is_none() {
                req = req.consistent_read(true);
            }
            for (name, value) in &q.values {
                req = req.expression_attribute_values(*name, value.clone());
            }
            let out = req.send().await.map_err(|e| self.sdk_error("Query", &e))?;
            items.extend(out.items.unwrap_or_default());
            if q.limit.is_some_and(|l| items.len() >= l) {
                return Ok(items);
            }
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(items),
            }
        }
    }

    /// Requests of one process (GSI1) and/or provider (GSI2) that started in `[from_ms, to_ms]`,
    /// oldest first. With both, GSI1 is queried and the provider is matched here; with neither
    /// this is [`DynamoStore::requests_between`].
    pub async fn requests_filtered(
        &self,
        from_ms: u64,
        to_ms: u64,
        process: Option<&str>,
        provider: Option<&str>,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        if from_ms > to_ms {
            return Ok(Vec::new());
        }
        let (index, pk) = match (process, provider) {
            (None, None) => return self.requests_between(from_ms, to_ms).await,
            (Some(p), _) => ("GSI1", format!("PROCESS#{p}")),
            (None, Some(p)) => ("GSI2", format!("PROVIDER#{p}")),
        };
        let condition = format!("{index}PK = :pk AND {index}SK BETWEEN :lo AND :hi");
        // The GSI sort keys of requests are the bare timestamp, so the bounds are exact.
        let items = self
            .query(
                Some(index),
                &condition,
                &pk,
                &iso_ts(from_ms),
                &iso_ts(to_ms),
            )
            .await?;
        let mut out = Vec::with_capacity(items.len());
        for item in &items {
            let rec = request_from_item(item)?;
            if provider.is_none_or(|p| rec.provider == p) {
                out.push(rec);
            }
        }
        out.sort_by(|a, b| (a.timestamp_ms, &a.request_id).cmp(&(b.timestamp_ms, &b.request_id)));
        Ok(out)
    }

    /// A stored session's metadata and messages (oldest first): one consistent `Query` on
    /// `PK=SESSION#{id}`, which returns the `MESSAGE#…` items in time order and the `METADATA`
    /// item after them.
    pub async fn session(
        &self,
        session_id: &str,
    ) -> Result<Option<(SessionMetadata, Vec<SessionMessage>)>, StoreError> {
        let items = self
            .query_all(Query {
                index: None,
                condition: "PK = :pk",
                values: vec![(":pk", AttributeValue::S(format!("SESSION#{session_id}")))],
                forward: true,
                limit: None,
                consistent: true,
            })
            .await?;
        let mut meta = None;
        let mut messages = Vec::new();
        for item in &items {
            let sk = attr_s(item, "SK");
            if sk == "METADATA" {
                meta = Some(from_item::<SessionMetadata>(item, "session metadata item")?);
            } else if sk.starts_with("MESSAGE#") {
                messages.push(message_from_item(item)?);
            }
        }
        Ok(meta.map(|m| (m, messages)))
    }

    /// Who created the session, from its `METADATA` item alone (no messages read).
    pub async fn session_owner(&self, session_id: &str) -> Result<Option<String>, StoreError> {
        let items = self
            .query_all(Query {
                index: None,
                condition: "PK = :pk AND SK = :sk",
                values: vec![
                    (":pk", AttributeValue::S(format!("SESSION#{session_id}"))),
                    (":sk", AttributeValue::S("METADATA".to_owned())),
                ],
                forward: true,
                limit: Some(1),
                consistent: true,
            })
            .await?;
        items
            .first()
            .map(|item| {
                from_item::<SessionMetadata>(item, "session metadata item").map(|m| m.user_id)
            })
            .transpose()
    }

    /// A user's sessions, most recently active first: `Query` on GSI1 (`USER#{id}`, sort keys
    /// `SESSION#{last activity}`) backwards.
    pub async fn sessions_of_user(
        &self,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<SessionMetadata>, StoreError> {
        let items = self
            .query_all(Query {
                index: Some("GSI1"),
                condition: "GSI1PK = :pk AND begins_with(GSI1SK, :pre)",
                values: vec![
                    (":pk", AttributeValue::S(format!("USER#{user_id}"))),
                    (":pre", AttributeValue::S("SESSION#".to_owned())),
                ],
                forward: false,
                limit: Some(limit),
                consistent: false,
            })
            .await?;
        items
            .iter()
            .map(|i| from_item(i, "session metadata item"))
            .collect()
    }

    /// Moves a session's `METADATA` item forward to cover `meta`. Idempotent and
    /// order-independent: the update only applies when it is not older than what is stored
    /// (condition on `updatedAtMs`), and `createdAtMs` only ever moves back.
    async fn apply_metadata(&self, meta: &SessionMetadata) -> Result<(), StoreError> {
        let s = |v: String| AttributeValue::S(v);
        let n = |v: u64| AttributeValue::N(v.to_string());
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(format!("SESSION#{}", meta.session_id)))
            .key("SK", s("METADATA".to_owned()))
            .update_expression(
                "SET sessionId = :sid, userId = :uid, entityType = :et, GSI1PK = :gpk, \
                 GSI1SK = :gsk, updatedAtMs = :upd, lastMessageId = :last, \
                 createdAtMs = if_not_exists(createdAtMs, :created)",
            )
            .condition_expression(
                "attribute_not_exists(updatedAtMs) OR updatedAtMs < :upd \
                 OR (updatedAtMs = :upd AND lastMessageId <= :last)",
            )
            .expression_attribute_values(":sid", s(meta.session_id.clone()))
            .expression_attribute_values(":uid", s(meta.user_id.clone()))
            .expression_attribute_values(":et", s("SESSION".to_owned()))
            .expression_attribute_values(":gpk", s(format!("USER#{}", meta.user_id)))
            .expression_attribute_values(
                ":gsk",
                s(format!("SESSION#{}", iso_ts(meta.updated_at_ms))),
            )
            .expression_attribute_values(":upd", n(meta.updated_at_ms))
            .expression_attribute_values(":last", s(meta.last_message_id.clone()))
            .expression_attribute_values(":created", n(meta.created_at_ms))
            .return_values(ReturnValue::AllOld)
            .send()
            .await;
        let stored_created = match result {
            Ok(out) => out
                .attributes
                .as_ref()
                .and_then(|a| a.get("createdAtMs"))
                .and_then(|v| v.as_n().ok())
                .and_then(|v| v.parse::<u64>().ok()),
            // Newer activity is already stored; `createdAtMs` may still need to move back, and
            // the stored value is unknown here, so the conditional update below decides.
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Some(u64::MAX)
            }
            Err(err) => return Err(self.write_error("UpdateItem", &err)),
        };
        if stored_created.is_none_or(|c| c <= meta.created_at_ms) {
            return Ok(());
        }
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(format!("SESSION#{}", meta.session_id)))
            .key("SK", s("METADATA".to_owned()))
            .update_expression("SET createdAtMs = :created")
            .condition_expression("createdAtMs > :created")
            .expression_attribute_values(":created", n(meta.created_at_ms))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(err) => Err(self.write_error("UpdateItem", &err)),
        }
    }

    fn sdk_error<E, R>(&self, operation: &'static str, err: &SdkError<E, R>) -> StoreError
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
        R: std::fmt::Debug,
    {
        sdk_error(&self.table, operation, err)
    }

    /// [`DynamoStore::sdk_error`] for the write path, where a refusal of the items is told
    /// apart ([`StoreError::Rejected`]) so the shipper can isolate the offending entries.
    fn write_error<E, R>(&self, operation: &'static str, err: &SdkError<E, R>) -> StoreError
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

    /// Writes one ≤ 25-item request, resending only `UnprocessedItems` (and whole requests that
    /// were throttled) with full-jitter backoff. Returns the number of resends.
    async fn write_chunk(&self, chunk: Vec<WriteRequest>) -> Result<u64, StoreError> {
        let total = chunk.len();
        let mut pending = HashMap::from([(self.table.clone(), chunk)]);
        let mut retries = 0u64;
        for attempt in 0..self.retry.max_attempts.max(1) {
            if attempt > 0 {
                retries += 1;
                tokio::time::sleep(full_jitter(self.retry.base, self.retry.cap, attempt - 1)).await;
            }
            let result = self
                .client
                .batch_write_item()
                .set_request_items(Some(pending.clone()))
                .send()
                .await;
            match result {
                Ok(out) => {
                    let left: HashMap<String, Vec<WriteRequest>> = out
                        .unprocessed_items
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|(_, v)| !v.is_empty())
                        .collect();
                    if left.is_empty() {
                        return Ok(retries);
                    }
                    tracing::debug!(
                        left = left.values().map(Vec::len).sum::<usize>(),
                        attempt,
                        "DynamoDB returned unprocessed items; resending them"
                    );
                    pending = left;
                }
                Err(err) if is_throttle(&err) => {
                    tracing::debug!(attempt, error = %DisplayErrorContext(&err), "DynamoDB throttled a batch; backing off");
                }
                Err(err) => return Err(self.write_error("BatchWriteItem", &err)),
            }
        }
        Err(StoreError::Unprocessed {
            left: pending.values().map(Vec::len).sum(),
            total,
            attempts: self.retry.max_attempts.max(1),
        })
    }
}

fn is_throttle<R>(err: &SdkError<BatchWriteItemError, R>) -> bool {
    matches!(
        err.as_service_error(),
        Some(
            BatchWriteItemError::ProvisionedThroughputExceededException(_)
                | BatchWriteItemError::ThrottlingException(_)
                | BatchWriteItemError::RequestLimitExceeded(_)
        )
    )
}

/// The key-condition query [`DynamoStore::query_all`] runs.
struct Query<'a> {
    index: Option<&'a str>,
    condition: &'a str,
    values: Vec<(&'a str, AttributeValue)>,
    forward: bool,
    limit: Option<usize>,
    consistent: bool,
}

impl Sink for DynamoStore {
    fn name(&self) -> &'static str {
        "dynamodb"
    }

    fn write<'a>(&'a self, entries: &'a [Entry]) -> BoxFuture<'a, Result<WriteReport, StoreError>> {
        Box::pin(async move {
            let mut retries = 0;
            for chunk in chunk_items(entries.iter().map(entry_item).collect())? {
                retries += self.write_chunk(chunk).await?;
            }
            // BatchWriteItem only puts whole items; metadata is a conditional update, one per
            // session of the batch, after its messages are stored.
            let messages = entries.iter().filter_map(|e| match e {
                Entry::Message(m) => Some(m),
                _ => None,
            });
            for meta in SessionMetadata::of_batch(messages) {
                self.apply_metadata(&meta).await?;
            }
            Ok(WriteReport { retries })
        })
    }
}

/// Splits items into BatchWriteItem requests of ≤ 25 items and ≤ 16 MB (estimated), with no
/// two puts of the same `PK`/`SK` in one request (DynamoDB rejects the whole request): the later
/// put of a key replaces the earlier one, as it would have on the table.
pub fn chunk_items(
    items: Vec<HashMap<String, AttributeValue>>,
) -> Result<Vec<Vec<WriteRequest>>, StoreError> {
    let mut unique: Vec<HashMap<String, AttributeValue>> = Vec::with_capacity(items.len());
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    for item in items {
        let key = (attr_s(&item, "PK"), attr_s(&item, "SK"));
        match index.get(&key) {
            Some(&i) => unique[i] = item,
            None => {
                index.insert(key, unique.len());
                unique.push(item);
            }
        }
    }
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0usize;
    for item in unique {
        let size = estimate_size(&item);
        if !current.is_empty()
            && (current.len() == MAX_BATCH_ITEMS || bytes + size > MAX_BATCH_BYTES)
        {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        let put = PutRequest::builder()
            .set_item(Some(item))
            .build()
            .map_err(|e| StoreError::Decode {
                what: "DynamoDB put request",
                problem: e.to_string(),
            })?;
        current.push(WriteRequest::builder().put_request(put).build());
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    Ok(chunks)
}

fn attr_s(item: &HashMap<String, AttributeValue>, name: &str) -> String {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default()
}

/// Attribute names plus values, a slight over-estimate of DynamoDB's item size rules.
fn estimate_size(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter()
        .map(|(k, v)| {
            k.len()
                + match v {
                    AttributeValue::S(s) | AttributeValue::N(s) => s.len(),
                    _ => 8,
                }
        })
        .sum::<usize>()
        + 64
}

/// The item of one entry.
pub fn entry_item(entry: &Entry) -> HashMap<String, AttributeValue> {
    match entry {
        Entry::Request(r) => request_item(r),
        Entry::Alert(a) => alert_item(a),
        Entry::Message(m) => message_item(m),
    }
}

/// `PK=SESSION#{session}`, `SK=MESSAGE#{iso}#{message}`; `content` is JSON text (a nested map
/// would need a second codec for no reader's benefit). No TTL: conversations are kept.
pub fn message_item(msg: &SessionMessage) -> HashMap<String, AttributeValue> {
    let mut flat = msg.clone();
    flat.content = Value::Null;
    let mut item = attributes_of(&flat);
    let s = |v: String| AttributeValue::S(v);
    let content = msg.content.to_string();
    if content.len() > MAX_CONTENT_BYTES {
        let mut prefix = content;
        truncate_chars(&mut prefix, MAX_CONTENT_BYTES / 4);
        let preview = serde_json::json!({ "truncated": true, "prefix": prefix });
        item.insert("content".into(), s(preview.to_string()));
        item.insert("contentTruncated".into(), AttributeValue::Bool(true));
    } else {
        item.insert("content".into(), s(content));
    }
    item.insert("PK".into(), s(format!("SESSION#{}", msg.session_id)));
    item.insert(
        "SK".into(),
        s(format!(
            "MESSAGE#{}#{}",
            iso_ts(msg.timestamp_ms),
            msg.message_id
        )),
    );
    item.insert("entityType".into(), s("MESSAGE".into()));
    item
}

pub fn message_from_item(
    item: &HashMap<String, AttributeValue>,
) -> Result<SessionMessage, StoreError> {
    let what = "session message item";
    let mut item = item.clone();
    item.remove("contentTruncated");
    let content = match item.remove("content") {
        Some(AttributeValue::S(text)) => {
            serde_json::from_str(&text).map_err(|e| StoreError::Decode {
                what,
                problem: format!("content is not JSON: {e}"),
            })?
        }
        _ => Value::Null,
    };
    let mut msg: SessionMessage = from_item(&item, what)?;
    msg.content = content;
    Ok(msg)
}

/// `PK=METRIC#{day}`, `SK=REQUEST#{iso}#{id}`, GSI1 by process, GSI2 by provider, `ttl` 30 days
/// after the request (derived from the record, not the clock, so a resend writes the same item).
pub fn request_item(rec: &RequestRecord) -> HashMap<String, AttributeValue> {
    let ts = iso_ts(rec.timestamp_ms);
    let mut rec = rec.clone();
    if let Some(err) = rec.error.as_mut() {
        truncate_chars(err, MAX_ERROR_CHARS);
    }
    let mut item = attributes_of(&rec);
    let s = |v: String| AttributeValue::S(v);
    item.insert(
        "PK".into(),
        s(format!("METRIC#{}", day_of(rec.timestamp_ms))),
    );
    item.insert("SK".into(), s(format!("REQUEST#{ts}#{}", rec.request_id)));
    item.insert("GSI1PK".into(), s(format!("PROCESS#{}", rec.process)));
    item.insert("GSI1SK".into(), s(ts.clone()));
    item.insert("GSI2PK".into(), s(format!("PROVIDER#{}", rec.provider)));
    item.insert("GSI2SK".into(), s(ts));
    item.insert(
        "ttl".into(),
        AttributeValue::N((rec.timestamp_ms / 1000 + REQUEST_TTL_SECS).to_string()),
    );
    item.insert("entityType".into(), s("REQUEST".into()));
    item
}

/// `PK=ALERT#{id}`, `SK=ALERT`, `GSI1PK=ALERT_TYPE#{type}`, `GSI1SK={severity}#{iso}`, `ttl` 90 days.
pub fn alert_item(alert: &Alert) -> HashMap<String, AttributeValue> {
    let mut item = attributes_of(alert);
    let s = |v: String| AttributeValue::S(v);
    item.insert("PK".into(), s(format!("ALERT#{}", alert.alert_id)));
    item.insert("SK".into(), s("ALERT".into()));
    item.insert(
        "GSI1PK".into(),
        s(format!("ALERT_TYPE#{}", alert.alert_type.as_str())),
    );
    item.insert(
        "GSI1SK".into(),
        s(format!(
            "{}#{}",
            alert.severity.as_str(),
            iso_ts(alert.timestamp_ms)
        )),
    );
    item.insert(
        "ttl".into(),
        AttributeValue::N((alert.timestamp_ms / 1000 + ALERT_TTL_SECS).to_string()),
    );
    item.insert("entityType".into(), s("ALERT".into()));
    item
}

pub fn request_from_item(
    item: &HashMap<String, AttributeValue>,
) -> Result<RequestRecord, StoreError> {
    from_item(item, "request item")
}

pub fn alert_from_item(item: &HashMap<String, AttributeValue>) -> Result<Alert, StoreError> {
    from_item(item, "alert item")
}

fn from_item<T: serde::de::DeserializeOwned>(
    item: &HashMap<String, AttributeValue>,
    what: &'static str,
) -> Result<T, StoreError> {
    let obj: serde_json::Map<String, Value> = item
        .iter()
        .filter(|(k, _)| !KEY_ATTRS.contains(&k.as_str()) && k.as_str() != "entityType")
        .map(|(k, v)| {
            Ok((
                k.clone(),
                json_of(v).ok_or_else(|| format!("attribute {k} has an unsupported type"))?,
            ))
        })
        .collect::<Result<_, String>>()
        .map_err(|problem| StoreError::Decode { what, problem })?;
    serde_json::from_value(Value::Object(obj)).map_err(|e| StoreError::Decode {
        what,
        problem: e.to_string(),
    })
}

/// The flat serde form of a value as DynamoDB attributes (absent options are skipped).
fn attributes_of<T: serde::Serialize>(value: &T) -> HashMap<String, AttributeValue> {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| attribute_of(v).map(|a| (k, a)))
            .collect(),
        _ => HashMap::new(),
    }
}

fn attribute_of(v: Value) -> Option<AttributeValue> {
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(AttributeValue::Bool(b)),
        Value::Number(n) => Some(AttributeValue::N(n.to_string())),
        Value::String(s) => Some(AttributeValue::S(s)),
        // Records are flat; nested values never occur, keep them readable if they ever do.
        other => Some(AttributeValue::S(other.to_string())),
    }
}

fn json_of(v: &AttributeValue) -> Option<Value> {
    match v {
        AttributeValue::S(s) => Some(Value::String(s.clone())),
        AttributeValue::Bool(b) => Some(Value::Bool(*b)),
        AttributeValue::Null(_) => Some(Value::Null),
        AttributeValue::N(n) => {
            if let Ok(u) = n.parse::<u64>() {
                Some(Value::from(u))
            } else if let Ok(i) = n.parse::<i64>() {
                Some(Value::from(i))
            } else {
                n.parse::<f64>().ok().map(Value::from)
            }
        }
        _ => None,
    }
}

fn truncate_chars(s: &mut String, max: usize) {
    if let Some((idx, _)) = s.char_indices().nth(max) {
        s.truncate(idx);
    }
}

/// Creates the single table (PK/SK, GSI1, GSI2 with projection ALL, on-demand) and enables TTL
/// on `ttl`. Idempotent: an existing table and an already enabled TTL are fine.
pub async fn create_table(client: &Client, name: &str) -> Result<(), StoreError> {
    let build_err = |e: aws_sdk_dynamodb::error::BuildError| StoreError::Dynamo {
        operation: "CreateTable",
        table: name.to_owned(),
        message: e.to_string(),
        retryable: false,
    };
    let attr = |n: &str| {
        AttributeDefinition::builder()
            .attribute_name(n)
            .attribute_type(ScalarAttributeType::S)
            .build()
    };
    let key = |n: &str, t: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(n)
            .key_type(t)
            .build()
    };
    let gsi = |index: &str, pk: &str, sk: &str| {
        GlobalSecondaryIndex::builder()
            .index_name(index)
            .key_schema(key(pk, KeyType::Hash)?)
            .key_schema(key(sk, KeyType::Range)?)
            .projection(
                Projection::builder()
                    .projection_type(ProjectionType::All)
                    .build(),
            )
            .build()
    };
    let mut req = client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key("PK", KeyType::Hash).map_err(build_err)?)
        .key_schema(key("SK", KeyType::Range).map_err(build_err)?)
        .global_secondary_indexes(gsi("GSI1", "GSI1PK", "GSI1SK").map_err(build_err)?)
        .global_secondary_indexes(gsi("GSI2", "GSI2PK", "GSI2SK").map_err(build_err)?);
    for a in ["PK", "SK", "GSI1PK", "GSI1SK", "GSI2PK", "GSI2SK"] {
        req = req.attribute_definitions(attr(a).map_err(build_err)?);
    }
    let store = DynamoStore::new(client.clone(), name);
    match req.send().await {
        Ok(_) => tracing::info!(table = name, "created DynamoDB table"),
        Err(err)
            if err
                .as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception()) =>
        {
            tracing::debug!(table = name, "DynamoDB table already exists");
        }
        Err(err) => return Err(store.sdk_error("CreateTable", &err)),
    }
    // A new table is CREATING for a few seconds on AWS (ACTIVE at once on emulators).
    for _ in 0..120 {
        let desc = client
            .describe_table()
            .table_name(name)
            .send()
            .await
            .map_err(|e| store.sdk_error("DescribeTable", &e))?;
        if desc.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ttl = client
        .describe_time_to_live()
        .table_name(name)
        .send()
        .await
        .map_err(|e| store.sdk_error("DescribeTimeToLive", &e))?;
    let enabled = ttl.time_to_live_description().is_some_and(|d| {
        d.attribute_name() == Some("ttl")
            && matches!(
                d.time_to_live_status(),
                Some(
                    aws_sdk_dynamodb::types::TimeToLiveStatus::Enabled
                        | aws_sdk_dynamodb::types::TimeToLiveStatus::Enabling
                )
            )
    });
    if enabled {
        return Ok(());
    }
    let spec = TimeToLiveSpecification::builder()
        .attribute_name("ttl")
        .enabled(true)
        .build()
        .map_err(build_err)?;
    match client
        .update_time_to_live()
        .table_name(name)
        .time_to_live_specification(spec)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        // AWS rejects a second update while the first is in progress or when already enabled.
        Err(err)
            if err
                .as_service_error()
                .and_then(|e| e.message())
                .is_some_and(|m| m.contains("already enabled")) =>
        {
            Ok(())
        }
        Err(err) => Err(store.sdk_error("UpdateTimeToLive", &err)),
    }
}

/// Turns an SDK error into a [`StoreError::Dynamo`], deciding once for every DynamoDB caller which
/// failures are worth retrying (timeouts, dispatch failures, throttling, 5xx) and which are not.
pub(crate) fn sdk_error<E, R>(
    table: &str,
    operation: &'static str,
    err: &SdkError<E, R>,
) -> StoreError
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    let retryable = match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Cost;

    fn rec(i: u64) -> RequestRecord {
        RequestRecord::new("u1", "magicSpark", "openai", "gpt-4o-mini")
            .with_request_id(&format!("req-{i:03}"))
            .with_timestamp_ms(1_764_080_467_123 + i)
            .with_cost(Cost(2_500_000))
            .with_latency(900, Some(120))
    }

    #[test]
    fn request_item_has_the_single_table_keys() {
        let item = request_item(&rec(0));
        assert_eq!(attr_s(&item, "PK"), "METRIC#2025-11-25");
        assert_eq!(
            attr_s(&item, "SK"),
            "REQUEST#2025-11-25T14:21:07.123Z#req-000"
        );
        assert_eq!(attr_s(&item, "GSI1PK"), "PROCESS#magicSpark");
        assert_eq!(attr_s(&item, "GSI2PK"), "PROVIDER#openai");
        assert_eq!(attr_s(&item, "GSI2SK"), "2025-11-25T14:21:07.123Z");
        assert_eq!(
            item["ttl"],
            AttributeValue::N((1_764_080_467 + 30 * 86_400).to_string())
        );
        assert_eq!(item["costMicroUsd"], AttributeValue::N("3".into()));
        assert_eq!(item["success"], AttributeValue::Bool(true));
        assert!(!item.contains_key("error"));
        assert_eq!(request_from_item(&item).unwrap(), rec(0));
    }

    #[test]
    fn chunks_respect_25_items_and_drop_duplicate_keys() {
        let mut items: Vec<_> = (0..60).map(|i| request_item(&rec(i))).collect();
        items.push(request_item(&rec(3)));
        let chunks = chunk_items(items).unwrap();
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![25, 25, 10]);
    }

    #[test]
    fn chunks_respect_the_byte_limit() {
        let big = "x".repeat(300_000);
        let items: Vec<_> = (0..120)
            .map(|i| {
                let mut item = request_item(&rec(i));
                item.insert("pad".into(), AttributeValue::S(big.clone()));
                item
            })
            .collect();
        for chunk in chunk_items(items).unwrap() {
            let bytes: usize = chunk
                .iter()
                .map(|w| estimate_size(w.put_request().map(|p| p.item()).unwrap()))
                .sum();
            assert!(bytes <= MAX_BATCH_BYTES && chunk.len() <= MAX_BATCH_ITEMS);
        }
    }

    #[test]
    fn message_items_round_trip_and_huge_content_is_cut_to_a_preview() {
        use crate::store::sessions::Role;
        let msg = SessionMessage::new(
            "s1",
            "u1",
            Role::Assistant,
            "magicSpark",
            serde_json::json!({"ideas": ["a", "b"], "n": 1.5}),
        )
        .with_message_id("m1")
        .with_timestamp_ms(1_764_080_467_123)
        .with_run("r1", "magicSpark");
        let item = message_item(&msg);
        assert_eq!(attr_s(&item, "PK"), "SESSION#s1");
        assert_eq!(attr_s(&item, "SK"), "MESSAGE#2025-11-25T14:21:07.123Z#m1");
        assert_eq!(message_from_item(&item).unwrap(), msg);

        let huge = SessionMessage {
            content: serde_json::Value::String("x".repeat(MAX_CONTENT_BYTES)),
            ..msg
        };
        let item = message_item(&huge);
        assert!(estimate_size(&item) < 400_000);
        assert_eq!(item["contentTruncated"], AttributeValue::Bool(true));
        let back = message_from_item(&item).unwrap();
        assert_eq!(back.content["truncated"], true);
    }

    #[test]
    fn long_errors_are_truncated() {
        let r = rec(1).failed("upstream", &"é".repeat(10_000));
        let item = request_item(&r);
        assert_eq!(
            item["error"].as_s().unwrap().chars().count(),
            MAX_ERROR_CHARS
        );
    }
}
