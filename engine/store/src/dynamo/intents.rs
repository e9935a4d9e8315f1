//! Every replica's open call intents and heartbeats in the single table, and the sweep that
//! records the calls of a lost replica.
//!
//! - Intent: `PK=INTENT#{recordId}`, `SK=INTENT`, `GSI1PK=INTENT`, `GSI1SK={call start}#{recordId}`,
//!   `ttl` like the request's, `replicaId`, `callStartedMs`, and the attributes of the
//!   `interrupted` record it stands for (so the sweep writes exactly what the replica would have
//!   written at its own restart: same id, same keys).
//! - Heartbeat: `PK=REPLICA#{replicaId}`, `SK=HEARTBEAT`, `heartbeatMs`, `startedMs`, `pid`,
//!   `ttl` 7 days after the beat.
//!
//! The sweep queries `GSI1` for intents older than the lost-after time, reads each one's
//! replica heartbeat (strongly consistent) and, for a replica silent that long, writes the
//! record and deletes the intent in one transaction that requires the record to be absent (at
//! the key the request's last record has, and at the key a `retried` record of the call has when
//! that differs) and the intent to be present: a record the replica did ship is never doubled,
//! and two replicas sweeping at once record a call once.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Delete, DeleteRequest, Put, PutRequest, TransactWriteItem,
    WriteRequest,
};
use futures::future::BoxFuture;
use keyvex_engine::clock::now_ms;
use keyvex_engine::record::{CallIntent, RequestRecord};

use super::codec::{attr_s, request_from_item, request_item};
use super::{DynamoStore, MAX_BATCH_ITEMS};
use crate::entry::{StoreError, day_of, iso_ts};
use crate::tracker::{Replica, SharedIntents, Swept};

const INTENT_INDEX_KEY: &str = "INTENT";
const HEARTBEAT_TTL_SECS: u64 = 7 * 86_400;

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn build_error(what: &'static str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Decode {
        what,
        problem: err.to_string(),
    }
}

fn intent_key(record_id: &str) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("PK".to_owned(), s(format!("INTENT#{record_id}"))),
        ("SK".to_owned(), s("INTENT")),
    ])
}

/// The key of a request item dated `ms`.
fn request_key(ms: u64, record_id: &str) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("PK".to_owned(), s(format!("METRIC#{}", day_of(ms)))),
        (
            "SK".to_owned(),
            s(format!("REQUEST#{}#{record_id}", iso_ts(ms))),
        ),
    ])
}

/// The item of one open intent of `replica`.
pub fn intent_item(replica: &str, intent: &CallIntent) -> HashMap<String, AttributeValue> {
    let id = &intent.record.request_id;
    let mut item = request_item(&intent.record);
    item.remove("GSI2PK");
    item.remove("GSI2SK");
    item.extend(intent_key(id));
    item.insert("GSI1PK".into(), s(INTENT_INDEX_KEY));
    item.insert(
        "GSI1SK".into(),
        s(format!("{}#{id}", iso_ts(intent.call_started_ms))),
    );
    item.insert("entityType".into(), s("INTENT"));
    item.insert("replicaId".into(), s(replica));
    item.insert("callStartedMs".into(), n(intent.call_started_ms));
    if let Some(held) = &intent.spend
        && let Ok(json) = serde_json::to_string(held)
    {
        // The reservation goes with the intent, so a replica that sweeps it can settle it.
        item.insert("spendHold".into(), s(json));
    }
    item
}

/// The replica and the intent of an intent item.
pub fn intent_from_item(
    item: &HashMap<String, AttributeValue>,
) -> Result<(String, CallIntent), StoreError> {
    let record = request_from_item(item)?;
    let call_started_ms = item
        .get("callStartedMs")
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(record.timestamp_ms);
    Ok((
        attr_s(item, "replicaId"),
        CallIntent {
            record,
            call_started_ms,
            spend: item
                .get("spendHold")
                .and_then(|v| v.as_s().ok())
                .and_then(|json| serde_json::from_str(json).ok()),
        },
    ))
}

/// What the sweep did with one intent.
enum Settled {
    Recorded,
    AlreadyRecorded,
    /// Removed meanwhile by someone else.
    Gone,
}

impl DynamoStore {
    async fn write_all(&self, requests: Vec<WriteRequest>) -> Result<(), StoreError> {
        let mut requests = requests.into_iter().peekable();
        while requests.peek().is_some() {
            let chunk: Vec<WriteRequest> = requests.by_ref().take(MAX_BATCH_ITEMS).collect();
            self.write_chunk(chunk).await?;
        }
        Ok(())
    }

    async fn put_intents(&self, replica: &str, intents: &[CallIntent]) -> Result<(), StoreError> {
        // The latest version of an id wins; a batch may not hold one key twice.
        let mut latest: HashMap<&str, &CallIntent> = HashMap::new();
        for intent in intents {
            latest.insert(&intent.record.request_id, intent);
        }
        let mut requests = Vec::with_capacity(latest.len());
        for intent in latest.into_values() {
            let put = PutRequest::builder()
                .set_item(Some(intent_item(replica, intent)))
                .build()
                .map_err(|e| build_error("DynamoDB put request", e))?;
            requests.push(WriteRequest::builder().put_request(put).build());
        }
        self.write_all(requests).await
    }

    async fn remove_intents(&self, record_ids: &[String]) -> Result<(), StoreError> {
        let mut unique: Vec<&String> = record_ids.iter().collect();
        unique.sort();
        unique.dedup();
        let mut requests = Vec::with_capacity(unique.len());
        for id in unique {
            let delete = DeleteRequest::builder()
                .set_key(Some(intent_key(id)))
                .build()
                .map_err(|e| build_error("DynamoDB delete request", e))?;
            requests.push(WriteRequest::builder().delete_request(delete).build());
        }
        self.write_all(requests).await
    }

    async fn put_heartbeat(&self, replica: &Replica) -> Result<(), StoreError> {
        let now = now_ms();
        self.client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(format!("REPLICA#{}", replica.id)))
            .item("SK", s("HEARTBEAT"))
            .item("entityType", s("REPLICA"))
            .item("replicaId", s(replica.id.clone()))
            .item("pid", n(u64::from(replica.pid)))
            .item("startedMs", n(replica.started_ms))
            .item("heartbeatMs", n(now))
            .item("ttl", n(now / 1000 + HEARTBEAT_TTL_SECS))
            .send()
            .await
            .map_err(|e| self.sdk_error("PutItem", &e))?;
        Ok(())
    }

    /// The last heartbeat of `replica` (unix ms), if it has one.
    async fn last_heartbeat(&self, replica: &str) -> Result<Option<u64>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(format!("REPLICA#{replica}")))
            .key("SK", s("HEARTBEAT"))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.sdk_error("GetItem", &e))?;
        Ok(out
            .item
            .as_ref()
            .and_then(|item| item.get("heartbeatMs"))
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse().ok()))
    }

    async fn exists(&self, key: HashMap<String, AttributeValue>) -> Result<bool, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .consistent_read(true)
            .projection_expression("PK")
            .send()
            .await
            .map_err(|e| self.sdk_error("GetItem", &e))?;
        Ok(out.item.is_some())
    }

    /// Whether the call's record is stored, under either key it can have.
    async fn record_stored(
        &self,
        record: &RequestRecord,
        call_started_ms: u64,
    ) -> Result<bool, StoreError> {
        if self
            .exists(request_key(record.timestamp_ms, &record.request_id))
            .await?
        {
            return Ok(true);
        }
        Ok(call_started_ms != record.timestamp_ms
            && self
                .exists(request_key(call_started_ms, &record.request_id))
                .await?)
    }

    /// Writes one intent's `interrupted` record and deletes the intent, in one transaction.
    async fn settle_intent(&self, intent: &CallIntent) -> Result<Settled, StoreError> {
        let record = &intent.record;
        let absent = "attribute_not_exists(PK)";
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(request_item(record)))
            .condition_expression(absent)
            .build()
            .map_err(|e| build_error("DynamoDB transaction put", e))?;
        let mut items = vec![TransactWriteItem::builder().put(put).build()];
        if intent.call_started_ms != record.timestamp_ms {
            // Had the call been followed by another, its record (`retried`) is dated from its
            // own start: that one must be absent too.
            let check = ConditionCheck::builder()
                .table_name(&self.table)
                .set_key(Some(request_key(
                    intent.call_started_ms,
                    &record.request_id,
                )))
                .condition_expression(absent)
                .build()
                .map_err(|e| build_error("DynamoDB condition check", e))?;
            items.push(TransactWriteItem::builder().condition_check(check).build());
        }
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(intent_key(&record.request_id)))
            .condition_expression("attribute_exists(PK)")
            .build()
            .map_err(|e| build_error("DynamoDB transaction delete", e))?;
        items.push(TransactWriteItem::builder().delete(delete).build());
        match self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => Ok(Settled::Recorded),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_transaction_canceled_exception()) =>
            {
                // A condition failed: the record is there (the replica shipped it after all, or
                // another sweep was first), or the intent is gone.
                if self.record_stored(record, intent.call_started_ms).await? {
                    self.remove_intents(std::slice::from_ref(&record.request_id))
                        .await?;
                    Ok(Settled::AlreadyRecorded)
                } else {
                    Ok(Settled::Gone)
                }
            }
            Err(err) => Err(self.sdk_error("TransactWriteItems", &err)),
        }
    }

    async fn sweep_intents(
        &self,
        me: &str,
        lost_after: Duration,
        limit: usize,
    ) -> Result<Swept, StoreError> {
        let now = now_ms();
        let cutoff = now.saturating_sub(u64::try_from(lost_after.as_millis()).unwrap_or(u64::MAX));
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name("GSI1")
                .key_condition_expression("GSI1PK = :p AND GSI1SK < :c")
                .expression_attribute_values(":p", s(INTENT_INDEX_KEY))
                .expression_attribute_values(":c", s(iso_ts(cutoff)))
                .set_exclusive_start_key(start)
                .limit(i32::try_from(limit).unwrap_or(i32::MAX))
                .send()
                .await
                .map_err(|e| self.sdk_error("Query", &e))?;
            items.extend(out.items.unwrap_or_default());
            start = out.last_evaluated_key;
            if start.is_none() || items.len() >= limit {
                break;
            }
        }
        let mut lost: HashMap<String, bool> = HashMap::new();
        let mut swept = Swept::default();
        for item in items.into_iter().take(limit) {
            let (replica, intent) = match intent_from_item(&item) {
                Ok(found) => found,
                Err(err) => {
                    tracing::error!(error = %err, key = %attr_s(&item, "PK"), "a stored call intent does not decode; left in place");
                    continue;
                }
            };
            if replica == me {
                continue;
            }
            let is_lost = match lost.get(&replica) {
                Some(is_lost) => *is_lost,
                None => {
                    let is_lost = self
                        .last_heartbeat(&replica)
                        .await?
                        .is_none_or(|beat| beat <= cutoff);
                    lost.insert(replica.clone(), is_lost);
                    is_lost
                }
            };
            if !is_lost {
                continue;
            }
            match self.settle_intent(&intent).await? {
                Settled::Recorded => {
                    tracing::warn!(replica, record_id = %intent.record.request_id, caller = %intent.record.user_id,
                        "a call in flight on a lost replica is recorded as interrupted");
                    swept.recorded += 1;
                    if let Some(held) = intent.spend {
                        swept.spend.push((held, intent.record.cost()));
                    }
                }
                Settled::AlreadyRecorded => swept.already_recorded += 1,
                Settled::Gone => {}
            }
        }
        Ok(swept)
    }
}

impl SharedIntents for DynamoStore {
    fn put<'a>(
        &'a self,
        replica: &'a str,
        intents: &'a [CallIntent],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.put_intents(replica, intents))
    }

    fn remove<'a>(&'a self, record_ids: &'a [String]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.remove_intents(record_ids))
    }

    fn heartbeat<'a>(&'a self, replica: &'a Replica) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.put_heartbeat(replica))
    }

    fn sweep<'a>(
        &'a self,
        me: &'a str,
        lost_after: Duration,
        limit: usize,
    ) -> BoxFuture<'a, Result<Swept, StoreError>> {
        Box::pin(self.sweep_intents(me, lost_after, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dynamo::codec::tests::rec;
    use keyvex_engine::budgets::{BudgetScope, HeldSpend, SpendLine};
    use keyvex_engine::cost::Cost;

    #[test]
    fn an_intent_item_round_trips_and_keeps_the_record_it_stands_for() {
        let record = rec(4).interrupted("the process stopped");
        let held = HeldSpend {
            lines: vec![SpendLine {
                scope: BudgetScope::CallerDaily,
                subject: "alice".into(),
                key: "caller_daily:alice:2026-12-07".into(),
                window: "2026-12-07".into(),
                limit: Some(Cost(5_000_000)),
                override_of: Some("alice".into()),
                resets_at: Some(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_688_000),
                ),
                keep_for: std::time::Duration::from_secs(172_800),
            }],
            reserved: Cost(123_456),
        };
        let intent = CallIntent {
            record: record.clone(),
            call_started_ms: record.timestamp_ms + 900,
            // The reservation rides along, for the replica that sweeps the intent to settle.
            spend: Some(held),
        };
        let item = intent_item("replica-a", &intent);
        assert_eq!(attr_s(&item, "PK"), "INTENT#req-004");
        assert_eq!(attr_s(&item, "SK"), "INTENT");
        assert_eq!(attr_s(&item, "GSI1PK"), "INTENT");
        assert_eq!(
            attr_s(&item, "GSI1SK"),
            format!("{}#req-004", iso_ts(record.timestamp_ms + 900))
        );
        assert!(!item.contains_key("GSI2PK"), "not a provider's request");
        let (replica, back) = intent_from_item(&item).unwrap();
        assert_eq!(replica, "replica-a");
        assert_eq!(back, intent);
        // The record the sweep writes has the keys the replica's own write would have.
        let written = request_item(&back.record);
        assert_eq!(
            written["SK"],
            request_key(record.timestamp_ms, "req-004")["SK"]
        );
    }
}
