//! The batch sink the metrics shipper writes to: `BatchWriteItem` in requests of ≤ 25 items and
//! ≤ 16 MB, unprocessed items and throttled requests resent with full jitter, then one
//! conditional `UpdateItem` per session whose messages the batch carried.

use std::collections::HashMap;

use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemError;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, ReturnValue, WriteRequest};
use futures::future::BoxFuture;

use super::codec::{attr_s, entry_item, estimate_size};
use super::{DynamoStore, MAX_BATCH_BYTES, MAX_BATCH_ITEMS};
use crate::entry::{Entry, Sink, StoreError, WriteReport, full_jitter, iso_ts};
use crate::session_meta::SessionMetadata;

impl DynamoStore {
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

    /// Writes one ≤ 25-item request, resending only `UnprocessedItems` (and whole requests that
    /// were throttled) with full-jitter backoff. Returns the number of resends.
    pub(super) async fn write_chunk(&self, chunk: Vec<WriteRequest>) -> Result<u64, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dynamo::codec::request_item;
    use crate::dynamo::codec::tests::rec;

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
}
