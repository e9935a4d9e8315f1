//! DynamoDB single-table store (`DESIGN.md`): item codecs for request metrics and alerts, the
//! batch sink (≤ 25 items, unprocessed items resent with full jitter), table creation, and the
//! time-range queries (always `Query` on a key, never `Scan`).

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, PutRequest, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification, WriteRequest,
};
use futures::future::BoxFuture;
use serde_json::Value;

use crate::metrics::{Alert, AlertType, RequestRecord, Severity};
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
        let mut items = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .set_index_name(index.map(str::to_owned))
                .key_condition_expression(condition)
                .expression_attribute_values(":pk", AttributeValue::S(pk.to_owned()))
                .expression_attribute_values(":lo", AttributeValue::S(lo.to_owned()))
                .expression_attribute_values(":hi", AttributeValue::S(hi.to_owned()))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.sdk_error("Query", &e))?;
            items.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(items),
            }
        }
    }

    fn sdk_error<E, R>(&self, operation: &'static str, err: &SdkError<E, R>) -> StoreError
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
        R: std::fmt::Debug,
    {
        let retryable = match err {
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => true,
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
            table: self.table.clone(),
            message: DisplayErrorContext(err).to_string(),
            retryable,
        }
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
                Err(err) => return Err(self.sdk_error("BatchWriteItem", &err)),
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
    }
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
    fn long_errors_are_truncated() {
        let r = rec(1).failed("upstream", &"é".repeat(10_000));
        let item = request_item(&r);
        assert_eq!(
            item["error"].as_s().unwrap().chars().count(),
            MAX_ERROR_CHARS
        );
    }
}
