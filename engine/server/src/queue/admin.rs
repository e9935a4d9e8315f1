//! Queue provisioning (`keyvex queue create`) and reading a queue's redrive policy.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::QueueAttributeName;

use super::QueueError;

/// The Keyvex platform's queue names.
pub const DEFAULT_QUEUE: &str = "keyvex-ai-processing-queue";
pub const DEFAULT_DLQ: &str = "keyvex-ai-processing-dlq";

/// How the queues are made. `Default` is the Keyvex platform's queue setup: visibility 300 s,
/// retention 14 days on both, dead-letter after 3 receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    pub visibility: Duration,
    pub retention: Duration,
    pub max_receives: u32,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            visibility: Duration::from_secs(300),
            // SQS's maximum; the DLQ gets it too, so a dead letter outlives its original.
            retention: Duration::from_secs(14 * 86_400),
            max_receives: 3,
        }
    }
}

/// The two queue URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueUrls {
    pub queue_url: String,
    pub dlq_url: String,
}

/// Where a queue's dead letters go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redrive {
    pub dlq_url: String,
    pub max_receives: u32,
}

/// Creates the queue and its DLQ with the platform's settings. Idempotent: queues that exist with the
/// same attributes are fine; different attributes are a [`QueueError::QueueMismatch`].
pub async fn create_queues(
    client: &Client,
    name: &str,
    dlq_name: &str,
) -> Result<QueueUrls, QueueError> {
    create_queues_with(client, name, dlq_name, &QueueSettings::default()).await
}

/// [`create_queues`] with explicit settings (tests use a visibility of seconds).
pub async fn create_queues_with(
    client: &Client,
    name: &str,
    dlq_name: &str,
    settings: &QueueSettings,
) -> Result<QueueUrls, QueueError> {
    let retention = settings.retention.as_secs().to_string();
    let visibility = settings.visibility.as_secs().to_string();
    let dlq_url = create_one(
        client,
        dlq_name,
        settings,
        HashMap::from([
            (
                QueueAttributeName::MessageRetentionPeriod,
                retention.clone(),
            ),
            (QueueAttributeName::VisibilityTimeout, visibility.clone()),
        ]),
    )
    .await?;
    let dlq_arn = queue_arn(client, &dlq_url).await?;
    // A JSON *string* attribute, as SQS wants it.
    let redrive = serde_json::json!({
        "deadLetterTargetArn": dlq_arn,
        "maxReceiveCount": settings.max_receives,
    })
    .to_string();
    let queue_url = create_one(
        client,
        name,
        settings,
        HashMap::from([
            (QueueAttributeName::MessageRetentionPeriod, retention),
            (QueueAttributeName::VisibilityTimeout, visibility),
            (QueueAttributeName::RedrivePolicy, redrive),
        ]),
    )
    .await?;
    tracing::info!(queue_url, dlq_url, "AI-processing queues ready");
    Ok(QueueUrls { queue_url, dlq_url })
}

async fn create_one(
    client: &Client,
    name: &str,
    settings: &QueueSettings,
    attributes: HashMap<QueueAttributeName, String>,
) -> Result<String, QueueError> {
    let out = client
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(attributes))
        .send()
        .await;
    match out {
        Ok(out) => out.queue_url.ok_or_else(|| QueueError::Sqs {
            operation: "CreateQueue",
            message: format!("no queue URL returned for {name}"),
            retryable: true,
        }),
        // SQS answers an identical CreateQueue with the existing URL; only different attributes
        // are an error, and those need a person to decide.
        Err(e)
            if e.as_service_error().is_some_and(|s| {
                s.is_queue_name_exists() || s.code() == Some("QueueAlreadyExists")
            }) =>
        {
            Err(QueueError::QueueMismatch {
                name: name.to_owned(),
                visibility_secs: settings.visibility.as_secs(),
                message: aws_sdk_sqs::error::DisplayErrorContext(&e).to_string(),
            })
        }
        Err(e) => Err(QueueError::sqs("CreateQueue", &e)),
    }
}

async fn attributes(
    client: &Client,
    url: &str,
    names: &[QueueAttributeName],
) -> Result<HashMap<QueueAttributeName, String>, QueueError> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .set_attribute_names(Some(names.to_vec()))
        .send()
        .await
        .map_err(|e| QueueError::sqs("GetQueueAttributes", &e))?;
    Ok(out.attributes.unwrap_or_default())
}

async fn queue_arn(client: &Client, url: &str) -> Result<String, QueueError> {
    attributes(client, url, &[QueueAttributeName::QueueArn])
        .await?
        .remove(&QueueAttributeName::QueueArn)
        .ok_or_else(|| QueueError::Sqs {
            operation: "GetQueueAttributes",
            message: format!("{url} has no QueueArn"),
            retryable: false,
        })
}

/// The queue's `RedrivePolicy`, resolved to the DLQ's URL; `None` when it has none.
pub async fn redrive_of(client: &Client, queue_url: &str) -> Result<Option<Redrive>, QueueError> {
    let Some(policy) = attributes(client, queue_url, &[QueueAttributeName::RedrivePolicy])
        .await?
        .remove(&QueueAttributeName::RedrivePolicy)
    else {
        return Ok(None);
    };
    let Some((dlq_name, max_receives)) = parse_redrive(&policy) else {
        tracing::warn!(
            queue_url,
            policy,
            "RedrivePolicy is not understood; ignoring it"
        );
        return Ok(None);
    };
    let dlq_url = client
        .get_queue_url()
        .queue_name(&dlq_name)
        .send()
        .await
        .map_err(|e| QueueError::sqs("GetQueueUrl", &e))?
        .queue_url
        .ok_or_else(|| QueueError::Sqs {
            operation: "GetQueueUrl",
            message: format!("no URL for the dead-letter queue {dlq_name}"),
            retryable: false,
        })?;
    Ok(Some(Redrive {
        dlq_url,
        max_receives,
    }))
}

/// `(dlq name, maxReceiveCount)` of a RedrivePolicy; the count may be a number or a string.
fn parse_redrive(policy: &str) -> Option<(String, u32)> {
    let v: serde_json::Value = serde_json::from_str(policy).ok()?;
    let arn = v.get("deadLetterTargetArn")?.as_str()?;
    let name = arn.rsplit(':').next()?.to_owned();
    let count = match v.get("maxReceiveCount")? {
        serde_json::Value::Number(n) => u32::try_from(n.as_u64()?).ok()?,
        serde_json::Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    Some((name, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redrive_policy_count_is_a_number_or_a_string() {
        let arn = "arn:aws:sqs:us-east-1:123456789012:jobs-dlq";
        assert_eq!(
            parse_redrive(&format!(
                r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"5"}}"#
            )),
            Some(("jobs-dlq".into(), 5))
        );
        assert_eq!(
            parse_redrive(&format!(
                r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":3}}"#
            )),
            Some(("jobs-dlq".into(), 3))
        );
        assert_eq!(parse_redrive("{}"), None);
    }
}
