//! Provisioning: the single table with both GSIs (projection `ALL`, on-demand billing) and TTL
//! on `ttl`.

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType, TableStatus, TimeToLiveSpecification,
};

use super::DynamoStore;
use crate::entry::StoreError;

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
