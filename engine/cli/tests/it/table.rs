//! `keyvex table create` and `keyvex table describe` as an operator runs them — the built binary
//! against DynamoDB on moto (`DYNAMODB_ENDPOINT`), checked with the real SDK: the table gets its
//! keys, both GSIs and TTL; a second run reports it exists with the schema checked; a table that
//! lacks TTL gets it; a table with another schema is refused with each difference named and left
//! as it was. Last, the DynamoDB timeouts from the environment bound a call to an endpoint that
//! never answers.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType, TimeToLiveSpecification, TimeToLiveStatus,
};
use keyvex_testkit::moto::{self, Moto};
use serde_json::Value;

use crate::cli_support::{keyvex_bare, stdout_of};

/// `keyvex table ARGS…` against `moto`.
fn table_cmd(moto: &Moto, args: &[&str]) -> std::process::Command {
    let mut cmd = keyvex_bare();
    cmd.env("DYNAMODB_ENDPOINT", &moto.endpoint)
        .arg("table")
        .args(args);
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn failed(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "expected a failure; stdout: {}",
        text(&output.stdout)
    );
    text(&output.stderr)
}

async fn ttl_of(client: &aws_sdk_dynamodb::Client, table: &str) -> (TimeToLiveStatus, String) {
    let out = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .unwrap();
    let d = out.time_to_live_description().unwrap();
    (
        d.time_to_live_status().unwrap().clone(),
        d.attribute_name().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn table_create_provisions_keys_gsis_and_ttl_and_a_second_run_reports_it_exists() {
    let moto = Moto::start().await;
    let client = moto::client(&moto.endpoint).await;

    let output = table_cmd(&moto, &["create", "--table", "ops-table"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout).trim(),
        "created DynamoDB table ops-table (ACTIVE): keys PK/SK, GSI1, GSI2, TTL on ttl enabled now"
    );
    assert!(
        text(&output.stderr).contains("set DYNAMODB_TABLE_NAME=ops-table"),
        "{}",
        text(&output.stderr)
    );

    // What the SDK sees: the single-table layout the store writes.
    let desc = client
        .describe_table()
        .table_name("ops-table")
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    let keys = |schema: &[KeySchemaElement]| -> Vec<(String, String)> {
        schema
            .iter()
            .map(|k| {
                (
                    k.attribute_name().to_owned(),
                    k.key_type().as_str().to_owned(),
                )
            })
            .collect()
    };
    let pair = |pk: &str, sk: &str| vec![(pk.into(), "HASH".into()), (sk.into(), "RANGE".into())];
    assert_eq!(keys(desc.key_schema()), pair("PK", "SK"));
    let mut indexes: Vec<_> = desc
        .global_secondary_indexes()
        .iter()
        .map(|i| {
            (
                i.index_name().unwrap().to_owned(),
                keys(i.key_schema()),
                i.projection().unwrap().projection_type().unwrap().clone(),
            )
        })
        .collect();
    indexes.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        indexes,
        vec![
            ("GSI1".into(), pair("GSI1PK", "GSI1SK"), ProjectionType::All),
            ("GSI2".into(), pair("GSI2PK", "GSI2SK"), ProjectionType::All),
        ]
    );
    assert!(
        desc.attribute_definitions()
            .iter()
            .all(|a| a.attribute_type() == &ScalarAttributeType::S)
    );
    assert_eq!(
        ttl_of(&client, "ops-table").await,
        (TimeToLiveStatus::Enabled, "ttl".into())
    );

    // Again, named by the environment this time: nothing to do, and no hint.
    let output = table_cmd(&moto, &["create"])
        .env("DYNAMODB_TABLE_NAME", "ops-table")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout).trim(),
        "DynamoDB table ops-table already exists (ACTIVE); schema checked: keys PK/SK, GSI1, GSI2, TTL on ttl"
    );
    assert!(
        !text(&output.stderr).contains("DYNAMODB_TABLE_NAME"),
        "{}",
        text(&output.stderr)
    );

    let described: Value = serde_json::from_str(&stdout_of(&mut table_cmd(
        &moto,
        &["describe", "--table", "ops-table"],
    )))
    .unwrap();
    assert_eq!(described["name"], "ops-table");
    assert_eq!(described["status"], "ACTIVE");
    assert_eq!(described["schemaDifferences"], serde_json::json!([]));
    assert_eq!(described["ttlEnabled"], true);
    assert_eq!(described["ttl"]["attribute"], "ttl");
    assert_eq!(described["indexes"].as_array().unwrap().len(), 2);

    // A table whose TTL was turned off gets it back, and says so.
    client
        .update_time_to_live()
        .table_name("ops-table")
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name("ttl")
                .enabled(false)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        ttl_of(&client, "ops-table").await.0,
        TimeToLiveStatus::Disabled
    );
    let out = stdout_of(&mut table_cmd(&moto, &["create", "--table", "ops-table"]));
    assert!(out.ends_with("TTL on ttl enabled now"), "{out}");
    assert_eq!(
        ttl_of(&client, "ops-table").await.0,
        TimeToLiveStatus::Enabled
    );
}

#[tokio::test]
async fn table_create_refuses_a_table_with_another_schema_names_each_difference_and_changes_nothing()
 {
    let moto = Moto::start().await;
    let client = moto::client(&moto.endpoint).await;
    // Someone else's table under the same name: a numeric sort key, GSI1 keys only, no GSI2, and
    // TTL on another attribute.
    let key = |n: &str, t: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(n)
            .key_type(t)
            .build()
            .unwrap()
    };
    let attr = |n: &str, t: ScalarAttributeType| {
        AttributeDefinition::builder()
            .attribute_name(n)
            .attribute_type(t)
            .build()
            .unwrap()
    };
    client
        .create_table()
        .table_name("theirs")
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key("PK", KeyType::Hash))
        .key_schema(key("SK", KeyType::Range))
        .attribute_definitions(attr("PK", ScalarAttributeType::S))
        .attribute_definitions(attr("SK", ScalarAttributeType::N))
        .attribute_definitions(attr("GSI1PK", ScalarAttributeType::S))
        .attribute_definitions(attr("GSI1SK", ScalarAttributeType::S))
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name("GSI1")
                .key_schema(key("GSI1PK", KeyType::Hash))
                .key_schema(key("GSI1SK", KeyType::Range))
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::KeysOnly)
                        .build(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    client
        .update_time_to_live()
        .table_name("theirs")
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name("expiresAt")
                .enabled(true)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();

    let stderr = failed(
        &table_cmd(&moto, &["create", "--table", "theirs"])
            .output()
            .unwrap(),
    );
    for part in [
        "DynamoDB table theirs exists with a schema keyvex cannot use",
        "the table has sort key SK of type N (needed: S, a string)",
        "index GSI1 projects KEYS_ONLY (needed: ALL)",
        "index GSI2 is missing",
        "TTL is on attribute expiresAt (needed: ttl",
        "Nothing was changed",
        "DYNAMODB_TABLE_NAME",
    ] {
        assert!(stderr.contains(part), "missing {part:?} in: {stderr}");
    }
    // Left as it was.
    let desc = client
        .describe_table()
        .table_name("theirs")
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    assert_eq!(desc.global_secondary_indexes().len(), 1);
    assert_eq!(
        ttl_of(&client, "theirs").await,
        (TimeToLiveStatus::Enabled, "expiresAt".into())
    );

    // `describe` shows the same differences and fails too.
    let output = table_cmd(&moto, &["describe", "--table", "theirs"])
        .output()
        .unwrap();
    let stderr = failed(&output);
    assert!(stderr.contains("differs from the schema"), "{stderr}");
    let described: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        described["schemaDifferences"].as_array().unwrap().len(),
        4,
        "{described}"
    );

    // A table that does not exist is named as such, with the command that makes it.
    let stderr = failed(
        &table_cmd(&moto, &["describe", "--table", "nobody"])
            .output()
            .unwrap(),
    );
    assert!(
        stderr.contains("nobody does not exist") && stderr.contains("keyvex table create"),
        "{stderr}"
    );
}

/// An endpoint that completes the TCP handshake and never answers: a listener that is never
/// accepted from (the kernel accepts into its backlog). The timeouts come from the environment
/// through the configuration, as an operator sets them.
#[tokio::test]
async fn dynamodb_timeouts_from_the_environment_bound_a_call_to_a_silent_endpoint() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let started = Instant::now();
    let mut child = keyvex_bare()
        .env("DYNAMODB_ENDPOINT", &endpoint)
        .env("KEYVEX_DYNAMODB_ATTEMPT_TIMEOUT_MS", "300")
        .env("KEYVEX_DYNAMODB_OPERATION_TIMEOUT_MS", "1000")
        .args(["table", "describe", "--table", "t"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Without timeouts the call never returns: give up on the process after a generous bound
    // instead of hanging the test run.
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("keyvex table describe hung on a silent endpoint");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let output = child.wait_with_output().unwrap();
    let stderr = failed(&output);
    assert!(
        stderr.contains("DescribeTable on table t timed out") && stderr.contains("timeout"),
        "{stderr}"
    );
    // The operation timeout plus the process's start, with room for a loaded machine; without
    // timeouts the call would never return.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    drop(silent);
}
