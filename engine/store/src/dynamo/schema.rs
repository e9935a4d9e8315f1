//! Provisioning and checking the single table (`keyvex table create` / `describe`): string keys
//! `PK`/`SK`, `GSI1` on `GSI1PK`/`GSI1SK` and `GSI2` on `GSI2PK`/`GSI2SK` (projection `ALL`),
//! on-demand billing, and TTL on `ttl`.
//!
//! Creating is idempotent: an existing table is checked against that schema first, and a table
//! that differs is an error listing each difference, with nothing changed. A table that only
//! lacks TTL gets it enabled. Extra indexes, billing mode and throughput are the operator's.

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, IndexStatus, KeySchemaElement, KeyType,
    Projection, ProjectionType, ScalarAttributeType, TableDescription, TableStatus,
    TimeToLiveSpecification, TimeToLiveStatus,
};
use serde::Serialize;
use tokio::time::Instant;

use super::sdk_error;
use crate::entry::StoreError;

/// The attribute holding each item's expiry (epoch seconds).
pub const TTL_ATTRIBUTE: &str = "ttl";
/// The table's key: partition, then sort; both strings.
const TABLE_KEY: (&str, &str) = ("PK", "SK");
/// The global secondary indexes: name, partition key, sort key (all strings, projection ALL).
const INDEXES: [(&str, &str, &str); 2] =
    [("GSI1", "GSI1PK", "GSI1SK"), ("GSI2", "GSI2PK", "GSI2SK")];
/// How long [`create_table`] waits for a new table and its indexes to become `ACTIVE` (AWS
/// takes seconds to minutes; emulators are active at once).
pub const ACTIVE_WAIT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_secs(1);

/// The schema in one line, for messages.
pub const SCHEMA: &str = "keys PK (S, hash) / SK (S, range); GSI1 on GSI1PK / GSI1SK and GSI2 on GSI2PK / GSI2SK (S, projection ALL); TTL on ttl";

/// What [`create_table`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Provisioned {
    /// The table did not exist and was created.
    Created,
    /// The table existed with the schema (TTL may have been enabled just now).
    AlreadyExisted,
}

/// The outcome of [`create_table`]: what happened and the table as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provision {
    pub outcome: Provisioned,
    /// TTL on `ttl` was off and has been enabled by this call.
    pub enabled_ttl: bool,
    pub table: TableInfo,
}

/// One key attribute of the table or an index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    pub attribute: String,
    /// `HASH` (partition) or `RANGE` (sort).
    pub key_type: String,
    /// `S`, `N` or `B`; `None` when the attribute definitions do not list it.
    pub attribute_type: Option<String>,
}

/// One global secondary index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexInfo {
    pub name: String,
    pub status: Option<String>,
    pub keys: Vec<KeyInfo>,
    pub projection: Option<String>,
}

/// The table's time to live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TtlInfo {
    /// `ENABLED`, `ENABLING`, `DISABLED` or `DISABLING`.
    pub status: String,
    pub attribute: Option<String>,
}

impl TtlInfo {
    fn on(&self) -> bool {
        matches!(self.status.as_str(), "ENABLED" | "ENABLING")
    }
}

/// A table as DescribeTable and DescribeTimeToLive show it, in the terms it is checked in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableInfo {
    pub name: String,
    pub status: Option<String>,
    pub arn: Option<String>,
    /// `PAY_PER_REQUEST` or `PROVISIONED`; `None` when DynamoDB does not say.
    pub billing_mode: Option<String>,
    pub item_count: Option<i64>,
    pub keys: Vec<KeyInfo>,
    pub indexes: Vec<IndexInfo>,
    pub ttl: TtlInfo,
}

impl TableInfo {
    fn of(desc: &TableDescription, ttl: TtlInfo, fallback_name: &str) -> TableInfo {
        let attr_type = |name: &str| {
            desc.attribute_definitions()
                .iter()
                .find(|a| a.attribute_name() == name)
                .map(|a| a.attribute_type().as_str().to_owned())
        };
        let keys = |schema: &[KeySchemaElement]| {
            schema
                .iter()
                .map(|k| KeyInfo {
                    attribute: k.attribute_name().to_owned(),
                    key_type: k.key_type().as_str().to_owned(),
                    attribute_type: attr_type(k.attribute_name()),
                })
                .collect::<Vec<_>>()
        };
        TableInfo {
            name: desc.table_name().unwrap_or(fallback_name).to_owned(),
            status: desc.table_status().map(|s| s.as_str().to_owned()),
            arn: desc.table_arn().map(str::to_owned),
            billing_mode: desc
                .billing_mode_summary()
                .and_then(|b| b.billing_mode())
                .map(|m| m.as_str().to_owned()),
            item_count: desc.item_count(),
            keys: keys(desc.key_schema()),
            indexes: desc
                .global_secondary_indexes()
                .iter()
                .map(|i| IndexInfo {
                    name: i.index_name().unwrap_or_default().to_owned(),
                    status: i.index_status().map(|s| s.as_str().to_owned()),
                    keys: keys(i.key_schema()),
                    projection: i
                        .projection()
                        .and_then(|p| p.projection_type())
                        .map(|p| p.as_str().to_owned()),
                })
                .collect(),
            ttl,
        }
    }

    /// How the table differs from the schema keyvex writes, one sentence per difference naming
    /// what is there and what is needed. Empty when the table can be used. TTL that is off is
    /// not a difference ([`create_table`] enables it); TTL on another attribute is, since a
    /// table has only one.
    pub fn differences(&self) -> Vec<String> {
        let mut out = Vec::new();
        let (pk, sk) = TABLE_KEY;
        check_keys(&mut out, "the table", &self.keys, pk, sk);
        for (name, pk, sk) in INDEXES {
            match self.indexes.iter().find(|i| i.name == name) {
                None => out.push(format!(
                    "index {name} is missing (needed: {pk} (S, hash) / {sk} (S, range), projection ALL)"
                )),
                Some(index) => {
                    check_keys(&mut out, &format!("index {name}"), &index.keys, pk, sk);
                    if index.projection.as_deref() != Some("ALL") {
                        out.push(format!(
                            "index {name} projects {} (needed: ALL)",
                            index.projection.as_deref().unwrap_or("nothing")
                        ));
                    }
                }
            }
        }
        if self.ttl.on()
            && let Some(attr) = self.ttl.attribute.as_deref()
            && attr != TTL_ATTRIBUTE
        {
            out.push(format!(
                "TTL is on attribute {attr} (needed: {TTL_ATTRIBUTE}; a table has one TTL attribute)"
            ));
        }
        out
    }

    /// The table and every index are `ACTIVE`.
    pub fn is_active(&self) -> bool {
        self.status.as_deref() == Some(TableStatus::Active.as_str())
            && self
                .indexes
                .iter()
                .all(|i| i.status.as_deref() == Some(IndexStatus::Active.as_str()))
    }

    /// TTL is on (or being turned on) for `ttl`.
    pub fn ttl_enabled(&self) -> bool {
        self.ttl.on() && self.ttl.attribute.as_deref() == Some(TTL_ATTRIBUTE)
    }
}

fn check_keys(out: &mut Vec<String>, what: &str, keys: &[KeyInfo], pk: &str, sk: &str) {
    for (role, key_type, want) in [("partition", "HASH", pk), ("sort", "RANGE", sk)] {
        match keys.iter().find(|k| k.key_type == key_type) {
            None => out.push(format!("{what} has no {role} key (needed: {want} (S))")),
            Some(k) if k.attribute != want => out.push(format!(
                "{what} has {role} key {} (needed: {want} (S))",
                k.attribute
            )),
            Some(k) if k.attribute_type.as_deref() != Some("S") => out.push(format!(
                "{what} has {role} key {want} of type {} (needed: S, a string)",
                k.attribute_type.as_deref().unwrap_or("unknown")
            )),
            Some(_) => {}
        }
    }
}

/// The table `name` as it is now, or `None` when it does not exist.
pub async fn describe_table(client: &Client, name: &str) -> Result<Option<TableInfo>, StoreError> {
    let desc = match client.describe_table().table_name(name).send().await {
        Ok(out) => out.table,
        Err(err)
            if err
                .as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            return Ok(None);
        }
        Err(err) => return Err(sdk_error(name, "DescribeTable", &err)),
    };
    let Some(desc) = desc else {
        return Ok(None);
    };
    let ttl = client
        .describe_time_to_live()
        .table_name(name)
        .send()
        .await
        .map_err(|e| sdk_error(name, "DescribeTimeToLive", &e))?;
    let ttl = ttl.time_to_live_description().map_or_else(
        || TtlInfo {
            status: TimeToLiveStatus::Disabled.as_str().to_owned(),
            attribute: None,
        },
        |d| TtlInfo {
            status: d
                .time_to_live_status()
                .unwrap_or(&TimeToLiveStatus::Disabled)
                .as_str()
                .to_owned(),
            attribute: d.attribute_name().map(str::to_owned),
        },
    );
    Ok(Some(TableInfo::of(&desc, ttl, name)))
}

/// [`create_table_within`] waiting up to [`ACTIVE_WAIT`].
pub async fn create_table(client: &Client, name: &str) -> Result<Provision, StoreError> {
    create_table_within(client, name, ACTIVE_WAIT).await
}

/// Creates the single table (on-demand) when it does not exist, waits until it and its indexes
/// are `ACTIVE` (up to `wait`), and enables TTL on `ttl`. Idempotent: an existing table with the
/// schema is left as it is (TTL enabled if it was off); one whose keys, indexes or TTL attribute
/// differ is a [`StoreError::SchemaMismatch`] and is not touched.
pub async fn create_table_within(
    client: &Client,
    name: &str,
    wait: Duration,
) -> Result<Provision, StoreError> {
    let outcome = match describe_table(client, name).await? {
        Some(existing) => {
            let differences = existing.differences();
            if !differences.is_empty() {
                return Err(StoreError::SchemaMismatch {
                    table: name.to_owned(),
                    differences,
                });
            }
            tracing::debug!(
                table = name,
                "DynamoDB table already exists with the schema"
            );
            Provisioned::AlreadyExisted
        }
        None => send_create(client, name).await?,
    };
    let table = wait_active(client, name, wait).await?;
    let differences = table.differences();
    if !differences.is_empty() {
        return Err(StoreError::SchemaMismatch {
            table: name.to_owned(),
            differences,
        });
    }
    if table.ttl_enabled() {
        return Ok(Provision {
            outcome,
            enabled_ttl: false,
            table,
        });
    }
    enable_ttl(client, name).await?;
    let table = describe_table(client, name)
        .await?
        .ok_or_else(|| StoreError::NoTable {
            table: name.to_owned(),
        })?;
    Ok(Provision {
        outcome,
        enabled_ttl: true,
        table,
    })
}

/// Sends CreateTable; a table created by someone else since the describe counts as existing
/// (it is checked like one once it is active).
async fn send_create(client: &Client, name: &str) -> Result<Provisioned, StoreError> {
    let build_err = |e: aws_sdk_dynamodb::error::BuildError| StoreError::Dynamo {
        operation: "CreateTable",
        table: name.to_owned(),
        message: e.to_string(),
        retryable: false,
    };
    let key = |n: &str, t: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(n)
            .key_type(t)
            .build()
            .map_err(build_err)
    };
    let (pk, sk) = TABLE_KEY;
    let mut req = client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key(pk, KeyType::Hash)?)
        .key_schema(key(sk, KeyType::Range)?);
    let mut attributes = vec![pk, sk];
    for (index, ipk, isk) in INDEXES {
        req = req.global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(index)
                .key_schema(key(ipk, KeyType::Hash)?)
                .key_schema(key(isk, KeyType::Range)?)
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::All)
                        .build(),
                )
                .build()
                .map_err(build_err)?,
        );
        attributes.extend([ipk, isk]);
    }
    for a in attributes {
        req = req.attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(a)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(build_err)?,
        );
    }
    match req.send().await {
        Ok(_) => {
            tracing::info!(table = name, "created DynamoDB table");
            Ok(Provisioned::Created)
        }
        Err(err)
            if err
                .as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception()) =>
        {
            Ok(Provisioned::AlreadyExisted)
        }
        Err(err) => Err(sdk_error(name, "CreateTable", &err)),
    }
}

/// Polls until the table and its indexes are `ACTIVE`; a new table on AWS is `CREATING` for
/// seconds to minutes.
async fn wait_active(client: &Client, name: &str, wait: Duration) -> Result<TableInfo, StoreError> {
    let started = Instant::now();
    loop {
        let table = describe_table(client, name)
            .await?
            .ok_or_else(|| StoreError::NoTable {
                table: name.to_owned(),
            })?;
        if table.is_active() {
            return Ok(table);
        }
        if started.elapsed() >= wait {
            return Err(StoreError::NotActive {
                table: name.to_owned(),
                status: table.status.unwrap_or_else(|| "unknown".to_owned()),
                waited_secs: started.elapsed().as_secs(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn enable_ttl(client: &Client, name: &str) -> Result<(), StoreError> {
    let spec = TimeToLiveSpecification::builder()
        .attribute_name(TTL_ATTRIBUTE)
        .enabled(true)
        .build()
        .map_err(|e| StoreError::Dynamo {
            operation: "UpdateTimeToLive",
            table: name.to_owned(),
            message: e.to_string(),
            retryable: false,
        })?;
    match client
        .update_time_to_live()
        .table_name(name)
        .time_to_live_specification(spec)
        .send()
        .await
    {
        Ok(_) => {
            tracing::info!(table = name, attribute = TTL_ATTRIBUTE, "enabled TTL");
            Ok(())
        }
        // AWS refuses a second update while the first is still being applied.
        Err(err)
            if err
                .as_service_error()
                .and_then(|e| e.message())
                .is_some_and(|m| m.contains("already enabled")) =>
        {
            Ok(())
        }
        Err(err) => Err(sdk_error(name, "UpdateTimeToLive", &err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(attribute: &str, key_type: &str, t: &str) -> KeyInfo {
        KeyInfo {
            attribute: attribute.into(),
            key_type: key_type.into(),
            attribute_type: Some(t.into()),
        }
    }

    fn good() -> TableInfo {
        TableInfo {
            name: "t".into(),
            status: Some("ACTIVE".into()),
            arn: None,
            billing_mode: Some("PAY_PER_REQUEST".into()),
            item_count: Some(0),
            keys: vec![key("PK", "HASH", "S"), key("SK", "RANGE", "S")],
            indexes: INDEXES
                .iter()
                .map(|(name, pk, sk)| IndexInfo {
                    name: (*name).into(),
                    status: Some("ACTIVE".into()),
                    keys: vec![key(pk, "HASH", "S"), key(sk, "RANGE", "S")],
                    projection: Some("ALL".into()),
                })
                .collect(),
            ttl: TtlInfo {
                status: "ENABLED".into(),
                attribute: Some("ttl".into()),
            },
        }
    }

    #[test]
    fn the_schema_has_no_differences_and_each_difference_is_named() {
        assert_eq!(good().differences(), Vec::<String>::new());
        assert!(good().is_active() && good().ttl_enabled());

        let mut t = good();
        t.keys = vec![key("pk", "HASH", "S"), key("SK", "RANGE", "N")];
        t.indexes.remove(1);
        t.indexes[0].projection = Some("KEYS_ONLY".into());
        t.ttl.attribute = Some("expiresAt".into());
        let d = t.differences();
        assert_eq!(
            d,
            vec![
                "the table has partition key pk (needed: PK (S))",
                "the table has sort key SK of type N (needed: S, a string)",
                "index GSI1 projects KEYS_ONLY (needed: ALL)",
                "index GSI2 is missing (needed: GSI2PK (S, hash) / GSI2SK (S, range), projection ALL)",
                "TTL is on attribute expiresAt (needed: ttl; a table has one TTL attribute)",
            ]
        );

        // TTL off is fixed by create, not a conflict; an index still building is not active.
        let mut t = good();
        t.ttl = TtlInfo {
            status: "DISABLED".into(),
            attribute: None,
        };
        t.indexes[1].status = Some("CREATING".into());
        assert!(t.differences().is_empty() && !t.ttl_enabled() && !t.is_active());
    }
}
