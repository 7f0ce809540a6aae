//! SQS plumbing shared by the SQS consumer, `streamctl sqs` and loadgen:
//! the client, queue lookup with clear errors, queue setup with a redrive
//! policy, and queue depth.
//!
//! The contrast with the Kafka dead-letter topic: here the broker decides.
//! A message that is received and not deleted comes back after its
//! visibility timeout; once it has been received `maxReceiveCount` times the
//! broker moves it to the dead-letter queue named in the queue's
//! `RedrivePolicy`. The consumer never routes it itself.

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;

/// Where the SQS API is and who we are.
#[derive(Debug, Clone)]
pub struct SqsSettings {
    /// Endpoint URL (moto locally, ElasticMQ in Kubernetes).
    pub endpoint: String,
    /// Region name.
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
}

impl SqsSettings {
    /// The local moto server with dummy credentials.
    pub fn local() -> SqsSettings {
        SqsSettings {
            endpoint: "http://127.0.0.1:4566".to_string(),
            region: "us-east-1".to_string(),
            access_key_id: "test".to_string(),
            secret_access_key: "test".to_string(),
        }
    }
}

/// Why an SQS operation failed, in words that name the endpoint or queue.
#[derive(Debug, thiserror::Error)]
pub enum SqsError {
    /// Nothing answered at the endpoint.
    #[error("sqs endpoint {endpoint} is unreachable: {detail}")]
    Unreachable {
        /// The endpoint URL.
        endpoint: String,
        /// The transport error.
        detail: String,
    },
    /// The queue does not exist.
    #[error(
        "sqs queue {queue} does not exist at {endpoint} (create it with `streamctl sqs setup`)"
    )]
    QueueMissing {
        /// The queue name.
        queue: String,
        /// The endpoint URL.
        endpoint: String,
    },
    /// An existing queue's redrive policy is not the one asked for.
    #[error("sqs queue {queue} has redrive policy {actual}, expected {expected}")]
    PolicyMismatch {
        /// The queue name.
        queue: String,
        /// The policy wanted.
        expected: String,
        /// The policy found.
        actual: String,
    },
    /// Any other API error.
    #[error("sqs {context}: {detail}")]
    Api {
        /// What we were doing.
        context: String,
        /// The service's error code and message.
        detail: String,
    },
}

/// Turns an SDK error into an [`SqsError`] that names what failed.
pub fn classify<E, R>(settings: &SqsSettings, context: &str, error: SdkError<E, R>) -> SqsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match &error {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => SqsError::Unreachable {
            endpoint: settings.endpoint.clone(),
            detail: DisplayErrorContext(&error).to_string(),
        },
        _ => {
            let code = error.code().unwrap_or("unknown");
            let message = error.message().unwrap_or("");
            SqsError::Api {
                context: context.to_string(),
                detail: format!("{code}: {message}"),
            }
        }
    }
}

/// Builds a client for these settings (no request is made).
pub fn client(settings: &SqsSettings) -> Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(&settings.endpoint)
        .region(Region::new(settings.region.clone()))
        .credentials_provider(Credentials::new(
            &settings.access_key_id,
            &settings.secret_access_key,
            None,
            None,
            "stream-pipeline",
        ))
        .build();
    Client::from_conf(config)
}

/// The URL of a queue, or a clear error when it or the endpoint is missing.
pub async fn queue_url(
    client: &Client,
    settings: &SqsSettings,
    queue: &str,
) -> Result<String, SqsError> {
    match client.get_queue_url().queue_name(queue).send().await {
        Ok(output) => output
            .queue_url()
            .map(str::to_string)
            .ok_or_else(|| SqsError::Api {
                context: format!("get url of queue {queue}"),
                detail: "no url in answer".to_string(),
            }),
        Err(error) => {
            let missing = error
                .as_service_error()
                .is_some_and(|service| service.is_queue_does_not_exist())
                || error
                    .code()
                    .is_some_and(|code| code.contains("NonExistentQueue"));
            if missing {
                Err(SqsError::QueueMissing {
                    queue: queue.to_string(),
                    endpoint: settings.endpoint.clone(),
                })
            } else {
                Err(classify(
                    settings,
                    &format!("get url of queue {queue}"),
                    error,
                ))
            }
        }
    }
}

/// What `setup_queues` found or made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSetup {
    /// The main queue's URL.
    pub queue_url: String,
    /// The dead-letter queue's URL.
    pub dlq_url: String,
    /// Whether the main queue was created now (false: it existed with the right policy).
    pub created: bool,
}

/// The redrive policy JSON for a dead-letter queue ARN.
pub fn redrive_policy(dlq_arn: &str, max_receive_count: u32) -> String {
    serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive_count.to_string()}).to_string()
}

/// Reads a queue attribute.
pub async fn queue_attribute(
    client: &Client,
    settings: &SqsSettings,
    queue_url: &str,
    name: QueueAttributeName,
) -> Result<Option<String>, SqsError> {
    let output = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(name.clone())
        .send()
        .await
        .map_err(|error| {
            classify(
                settings,
                &format!("get attribute {name} of {queue_url}"),
                error,
            )
        })?;
    Ok(output
        .attributes()
        .and_then(|attributes| attributes.get(&name))
        .cloned())
}

/// Messages waiting in a queue (`ApproximateNumberOfMessages`).
pub async fn approximate_messages(
    client: &Client,
    settings: &SqsSettings,
    queue_url: &str,
) -> Result<i64, SqsError> {
    count_attribute(
        client,
        settings,
        queue_url,
        QueueAttributeName::ApproximateNumberOfMessages,
    )
    .await
}

/// Messages received and not yet deleted (`ApproximateNumberOfMessagesNotVisible`).
pub async fn approximate_in_flight(
    client: &Client,
    settings: &SqsSettings,
    queue_url: &str,
) -> Result<i64, SqsError> {
    count_attribute(
        client,
        settings,
        queue_url,
        QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
    )
    .await
}

async fn count_attribute(
    client: &Client,
    settings: &SqsSettings,
    queue_url: &str,
    name: QueueAttributeName,
) -> Result<i64, SqsError> {
    let value = queue_attribute(client, settings, queue_url, name).await?;
    Ok(value.and_then(|text| text.parse().ok()).unwrap_or(0))
}

/// Creates the dead-letter queue and the main queue with a redrive policy
/// (`maxReceiveCount` receives, then the broker moves the message). An
/// existing main queue is checked: a different policy is an error.
pub async fn setup_queues(
    client: &Client,
    settings: &SqsSettings,
    queue: &str,
    dlq: &str,
    max_receive_count: u32,
) -> Result<QueueSetup, SqsError> {
    let dlq_url = match queue_url(client, settings, dlq).await {
        Ok(url) => url,
        Err(SqsError::QueueMissing { .. }) => client
            .create_queue()
            .queue_name(dlq)
            .send()
            .await
            .map_err(|error| classify(settings, &format!("create queue {dlq}"), error))?
            .queue_url()
            .unwrap_or_default()
            .to_string(),
        Err(other) => return Err(other),
    };
    let dlq_arn = queue_attribute(client, settings, &dlq_url, QueueAttributeName::QueueArn)
        .await?
        .ok_or_else(|| SqsError::Api {
            context: format!("get arn of {dlq}"),
            detail: "no QueueArn attribute".to_string(),
        })?;
    let expected = redrive_policy(&dlq_arn, max_receive_count);
    match queue_url(client, settings, queue).await {
        Ok(existing_url) => {
            let actual = queue_attribute(
                client,
                settings,
                &existing_url,
                QueueAttributeName::RedrivePolicy,
            )
            .await?
            .unwrap_or_else(|| "none".to_string());
            if !same_policy(&actual, &dlq_arn, max_receive_count) {
                return Err(SqsError::PolicyMismatch {
                    queue: queue.to_string(),
                    expected,
                    actual,
                });
            }
            Ok(QueueSetup {
                queue_url: existing_url,
                dlq_url,
                created: false,
            })
        }
        Err(SqsError::QueueMissing { .. }) => {
            let created = client
                .create_queue()
                .queue_name(queue)
                .attributes(QueueAttributeName::RedrivePolicy, expected)
                .send()
                .await
                .map_err(|error| classify(settings, &format!("create queue {queue}"), error))?;
            Ok(QueueSetup {
                queue_url: created.queue_url().unwrap_or_default().to_string(),
                dlq_url,
                created: true,
            })
        }
        Err(other) => Err(other),
    }
}

/// Compares a policy JSON with the wanted target and count (the count may be
/// a string or a number, depending on the server).
fn same_policy(actual: &str, dlq_arn: &str, max_receive_count: u32) -> bool {
    let Ok(policy) = serde_json::from_str::<serde_json::Value>(actual) else {
        return false;
    };
    let target_matches = policy
        .get("deadLetterTargetArn")
        .and_then(|value| value.as_str())
        == Some(dlq_arn);
    let count = policy.get("maxReceiveCount").and_then(|value| match value {
        serde_json::Value::String(text) => text.parse::<u32>().ok(),
        serde_json::Value::Number(number) => number.as_u64().map(|count| count as u32),
        _ => None,
    });
    target_matches && count == Some(max_receive_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_compare_whatever_the_count_type() {
        let arn = "arn:aws:sqs:us-east-1:123456789012:orders-dlq";
        assert!(same_policy(&redrive_policy(arn, 3), arn, 3));
        assert!(same_policy(
            &format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":3}}"#),
            arn,
            3
        ));
        assert!(!same_policy(&redrive_policy(arn, 5), arn, 3));
        assert!(!same_policy("none", arn, 3));
    }
}
