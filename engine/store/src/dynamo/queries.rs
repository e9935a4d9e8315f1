//! The reads of the single table: always a `Query` on a key or a GSI, never a `Scan`.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use keyvex_engine::record::{RequestRecord, SessionMessage};

use super::DynamoStore;
use super::codec::{alert_from_item, attr_s, from_item, message_from_item, request_from_item};
use crate::alerts::{Alert, AlertType, Severity};
use crate::entry::{StoreError, day_of, iso_ts};
use crate::session_meta::SessionMetadata;

impl DynamoStore {
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
