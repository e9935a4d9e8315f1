//! The item layout of every entity in the single table: keys (`PK`/`SK`, `GSI1PK`/`GSI1SK`,
//! `GSI2PK`/`GSI2SK`), the `ttl` epoch seconds, and the attributes, in both directions.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use keyvex_engine::record::{RequestRecord, SessionMessage};
use keyvex_engine::text::truncate_chars;
use serde_json::Value;

use super::{ALERT_TTL_SECS, KEY_ATTRS, MAX_CONTENT_BYTES, MAX_ERROR_CHARS, REQUEST_TTL_SECS};
use crate::alerts::Alert;
use crate::entry::{Entry, StoreError, day_of, iso_ts};

pub(super) fn attr_s(item: &HashMap<String, AttributeValue>, name: &str) -> String {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default()
}

/// Attribute names plus values, a slight over-estimate of DynamoDB's item size rules.
pub(super) fn estimate_size(item: &HashMap<String, AttributeValue>) -> usize {
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

pub(super) fn from_item<T: serde::de::DeserializeOwned>(
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use keyvex_engine::cost::Cost;

    pub(crate) fn rec(i: u64) -> RequestRecord {
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
    fn message_items_round_trip_and_huge_content_is_cut_to_a_preview() {
        use crate::sessions::Role;
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
    fn the_catalog_version_is_an_attribute_and_old_items_read_as_version_zero() {
        let item = request_item(&rec(2).with_catalog_version(3));
        assert_eq!(item["catalogVersion"], AttributeValue::N("3".into()));
        assert_eq!(request_from_item(&item).unwrap().catalog_version, 3);
        let mut old = request_item(&rec(2));
        old.remove("catalogVersion");
        assert_eq!(request_from_item(&old).unwrap(), rec(2));
    }

    #[test]
    fn the_trace_id_is_an_attribute_and_old_items_read_without_one() {
        let mut traced = rec(4);
        traced.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
        let item = request_item(&traced);
        assert_eq!(
            item["traceId"],
            AttributeValue::S("4bf92f3577b34da6a3ce929d0e0e4736".into())
        );
        assert_eq!(request_from_item(&item).unwrap(), traced);
        let old = request_item(&rec(4));
        assert!(!old.contains_key("traceId"));
        assert_eq!(request_from_item(&old).unwrap().trace_id, None);
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
