//! Catalog versions in the DynamoDB single table, under `PK=CONFIG`:
//! `SK=MODEL_CONFIG#{version}` (zero-padded to ten digits, so the sort key orders versions) holds
//! the catalog JSON and its metadata; `SK=ACTIVE_MODEL_CONFIG` holds the version in force, the
//! versions before it and a sequence number. Both are written with a condition, so two publishes
//! never share a number and two activations never overwrite each other unseen. No TTL: versions
//! are kept.

use std::collections::HashMap;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;

use super::{ActiveVersion, StoredVersion, VersionInfo};
use crate::dynamo::sdk_error;
use crate::entry::StoreError;

const PK: &str = "CONFIG";
const ACTIVE_SK: &str = "ACTIVE_MODEL_CONFIG";
const VERSION_PREFIX: &str = "MODEL_CONFIG#";

type Item = HashMap<String, AttributeValue>;

/// The sort key of a version.
pub fn version_sk(version: u64) -> String {
    format!("{VERSION_PREFIX}{version:010}")
}

#[derive(Clone)]
pub struct DynamoCatalogs {
    client: Client,
    table: String,
}

fn is_condition_failed<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    matches!(err, SdkError::ServiceError(e) if e.err().code() == Some("ConditionalCheckFailedException"))
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

impl DynamoCatalogs {
    pub fn new(client: Client, table: &str) -> DynamoCatalogs {
        DynamoCatalogs {
            client,
            table: table.to_owned(),
        }
    }

    fn decode(&self, what: &'static str, problem: String) -> StoreError {
        StoreError::Decode { what, problem }
    }

    fn num(&self, item: &Item, name: &str, what: &'static str) -> Result<u64, StoreError> {
        item.get(name)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                self.decode(what, format!("attribute {name} is missing or not a number"))
            })
    }

    fn text(&self, item: &Item, name: &str, what: &'static str) -> Result<String, StoreError> {
        item.get(name)
            .and_then(|v| v.as_s().ok())
            .cloned()
            .ok_or_else(|| {
                self.decode(what, format!("attribute {name} is missing or not a string"))
            })
    }

    /// The active pointer: one strongly consistent `GetItem` on its key, reading only the
    /// attributes it needs.
    pub(super) async fn active(&self) -> Result<Option<ActiveVersion>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(PK))
            .key("SK", s(ACTIVE_SK))
            .consistent_read(true)
            // Every name aliased: DynamoDB reserves hundreds of words in expressions.
            .projection_expression("#v, #at, #by, #h, #s")
            .expression_attribute_names("#v", "version")
            .expression_attribute_names("#at", "activatedAt")
            .expression_attribute_names("#by", "activatedBy")
            .expression_attribute_names("#h", "history")
            .expression_attribute_names("#s", "seq")
            .send()
            .await
            .map_err(|e| sdk_error(&self.table, "GetItem", &e))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        let what = "active model catalog item";
        let history = match item.get("history") {
            Some(AttributeValue::L(values)) => values
                .iter()
                .map(|v| v.as_n().ok().and_then(|n| n.parse::<u64>().ok()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    self.decode(what, "history holds a value that is not a version".into())
                })?,
            _ => Vec::new(),
        };
        Ok(Some(ActiveVersion {
            version: self.num(&item, "version", what)?,
            activated_at_ms: self.num(&item, "activatedAt", what)?,
            activated_by: self.text(&item, "activatedBy", what)?,
            history,
            seq: self.num(&item, "seq", what)?,
        }))
    }

    /// Writes `next` if the item still has sequence `expected` (0: no item yet).
    pub(super) async fn set_active(
        &self,
        next: &ActiveVersion,
        expected: u64,
    ) -> Result<bool, StoreError> {
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(PK))
            .item("SK", s(ACTIVE_SK))
            .item("entityType", s(ACTIVE_SK))
            .item("version", n(next.version))
            .item("activatedAt", n(next.activated_at_ms))
            .item("activatedBy", s(next.activated_by.clone()))
            .item(
                "history",
                AttributeValue::L(next.history.iter().map(|v| n(*v)).collect()),
            )
            .item("seq", n(next.seq));
        req = if expected == 0 {
            req.condition_expression("attribute_not_exists(PK)")
        } else {
            req.condition_expression("#s = :seq")
                .expression_attribute_names("#s", "seq")
                .expression_attribute_values(":seq", n(expected))
        };
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(sdk_error(&self.table, "PutItem", &e)),
        }
    }

    /// Every version, oldest first: a `Query` on `PK=CONFIG` and the version prefix, reading
    /// everything but the catalogs themselves.
    pub(super) async fn list(&self) -> Result<Vec<VersionInfo>, StoreError> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("PK = :pk AND begins_with(SK, :prefix)")
                .expression_attribute_values(":pk", s(PK))
                .expression_attribute_values(":prefix", s(VERSION_PREFIX))
                .projection_expression("#v, #l, #a, #n, #s, #c")
                .expression_attribute_names("#v", "version")
                .expression_attribute_names("#l", "label")
                .expression_attribute_names("#a", "author")
                .expression_attribute_names("#n", "note")
                .expression_attribute_names("#s", "summary")
                .expression_attribute_names("#c", "createdAt")
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error(&self.table, "Query", &e))?;
            for item in page.items.unwrap_or_default() {
                out.push(self.info_of(&item)?);
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(out),
            }
        }
    }

    pub(super) async fn get(&self, version: u64) -> Result<Option<StoredVersion>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(PK))
            .key("SK", s(version_sk(version)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error(&self.table, "GetItem", &e))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        Ok(Some(StoredVersion {
            info: self.info_of(&item)?,
            catalog_json: self.text(&item, "catalog", "model catalog version item")?,
        }))
    }

    /// Stores a new version; false when its number is taken (another publish came first).
    pub(super) async fn insert(&self, stored: &StoredVersion) -> Result<bool, StoreError> {
        let info = &stored.info;
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(PK))
            .item("SK", s(version_sk(info.version)))
            .item("entityType", s("MODEL_CONFIG"))
            .item("version", n(info.version))
            .item("catalog", s(stored.catalog_json.clone()))
            .item("label", s(info.label.clone()))
            .item("author", s(info.author.clone()))
            .item("summary", s(info.summary.clone()))
            .item("createdAt", n(info.created_at_ms))
            .condition_expression("attribute_not_exists(PK)");
        if let Some(note) = &info.note {
            req = req.item("note", s(note.clone()));
        }
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(sdk_error(&self.table, "PutItem", &e)),
        }
    }

    fn info_of(&self, item: &Item) -> Result<VersionInfo, StoreError> {
        let what = "model catalog version item";
        Ok(VersionInfo {
            version: self.num(item, "version", what)?,
            label: self.text(item, "label", what)?,
            author: self.text(item, "author", what)?,
            note: item.get("note").and_then(|v| v.as_s().ok()).cloned(),
            summary: self.text(item, "summary", what)?,
            created_at_ms: self.num(item, "createdAt", what)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_sort_keys_sort_by_number() {
        assert_eq!(version_sk(3), "MODEL_CONFIG#0000000003");
        assert!(version_sk(10) > version_sk(9));
    }
}
