//! `streamctl topics ensure`: the source and dead-letter topics, created
//! through the Kafka admin API when missing (or deleted and created again
//! with `--recreate`). The same command sets up the local broker
//! (`scripts/services.sh`), the demo and the cluster's topic-init job.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use stream_actors::kafka::{Brokers, KafkaSecurityArgs};

use crate::config::{in_range, invalid, valid_kafka_name, validate_brokers, ConfigError};

/// `streamctl topics ensure`'s settings.
#[derive(Debug, Clone, clap::Args)]
pub struct EnsureArgs {
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// How to reach them: TLS and SASL.
    #[command(flatten)]
    pub kafka_security: KafkaSecurityArgs,
    /// Source topic.
    #[arg(long, env = "KAFKA_TOPIC", default_value = "events")]
    pub topic: String,
    /// Dead-letter topic.
    #[arg(long, env = "KAFKA_DLQ_TOPIC", default_value = "events.dlq")]
    pub dlq_topic: String,
    /// Partitions of the source topic (1..=10000).
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Partitions of the dead-letter topic (1..=10000).
    #[arg(long, env = "DLQ_TOPIC_PARTITIONS", default_value_t = 6)]
    pub dlq_partitions: i32,
    /// Replication factor of topics it creates (1..=16; no more than the
    /// brokers in the cluster).
    #[arg(long, env = "TOPIC_REPLICATION_FACTOR", default_value_t = 1)]
    pub replication_factor: i32,
    /// Delete both topics first, with every record in them (a clean demo run).
    #[arg(long)]
    pub recreate: bool,
    /// Seconds to wait for the broker to answer and the partitions to get leaders.
    #[arg(long, default_value_t = 60)]
    pub wait_secs: u64,
}

impl EnsureArgs {
    /// The brokers and how to reach them (security files read now).
    pub fn kafka(&self) -> Result<Brokers, ConfigError> {
        validate_brokers(&self.brokers)
            .map_err(|reason| invalid("--brokers", "KAFKA_BROKERS", reason))?;
        Ok(self.kafka_security.resolve(&self.brokers)?)
    }

    /// Checks every value; the topics to ensure.
    pub fn validate(&self) -> Result<Vec<TopicSpec>, ConfigError> {
        self.kafka()?;
        for (name, flag, env) in [
            (&self.topic, "--topic", "KAFKA_TOPIC"),
            (&self.dlq_topic, "--dlq-topic", "KAFKA_DLQ_TOPIC"),
        ] {
            if !valid_kafka_name(name) {
                return Err(invalid(
                    flag,
                    env,
                    format!("{name:?} is not a Kafka topic name (1..=249 of a-z A-Z 0-9 . _ -)"),
                ));
            }
        }
        if self.topic == self.dlq_topic {
            return Err(invalid(
                "--dlq-topic",
                "KAFKA_DLQ_TOPIC",
                format!("must differ from --topic ({})", self.topic),
            ));
        }
        in_range(
            self.partitions,
            1..=10_000,
            "--partitions",
            "TOPIC_PARTITIONS",
        )?;
        in_range(
            self.dlq_partitions,
            1..=10_000,
            "--dlq-partitions",
            "DLQ_TOPIC_PARTITIONS",
        )?;
        in_range(
            self.replication_factor,
            1..=16,
            "--replication-factor",
            "TOPIC_REPLICATION_FACTOR",
        )?;
        Ok(vec![
            TopicSpec {
                name: self.topic.clone(),
                partitions: self.partitions,
            },
            TopicSpec {
                name: self.dlq_topic.clone(),
                partitions: self.dlq_partitions,
            },
        ])
    }
}

/// A topic the pipeline needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Its name.
    pub name: String,
    /// Partitions to create it with.
    pub partitions: i32,
}

/// What `ensure` found or did for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It was there with this many partitions.
    Existed(i32),
    /// It was created.
    Created,
    /// It was deleted and created again.
    Recreated,
}

/// How long one admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a wait asks the broker again.
const POLL_EVERY: Duration = Duration::from_millis(250);

fn admin_client(brokers: &Brokers) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    brokers
        .client_config()
        .create()
        .with_context(|| format!("cannot create a Kafka admin client for {brokers}"))
}

/// Each topic's partition count, as the broker's metadata shows it now
/// (None: no such topic). Fails when the broker does not answer.
fn partition_counts(
    metadata_client: &BaseConsumer,
    topics: &[TopicSpec],
) -> anyhow::Result<Vec<Option<i32>>> {
    let metadata = metadata_client
        .fetch_metadata(None, REQUEST_TIMEOUT)
        .context("the broker does not answer metadata requests")?;
    Ok(topics
        .iter()
        .map(|spec| {
            metadata
                .topics()
                .iter()
                .find(|topic| topic.name() == spec.name && topic.error().is_none())
                .map(|topic| {
                    topic
                        .partitions()
                        .iter()
                        .filter(|partition| partition.leader() >= 0)
                        .count() as i32
                })
        })
        .collect())
}

/// Polls the metadata (each request on a blocking thread) until `done`
/// holds for the counts, or fails at the deadline naming `what` it waited for.
async fn wait_for_metadata(
    metadata_client: &Arc<BaseConsumer>,
    topics: &[TopicSpec],
    deadline: Instant,
    what: &str,
    done: impl Fn(&[Option<i32>]) -> bool,
) -> anyhow::Result<Vec<Option<i32>>> {
    loop {
        let (client, specs) = (metadata_client.clone(), topics.to_vec());
        let last = tokio::task::spawn_blocking(move || partition_counts(&client, &specs)).await?;
        match &last {
            Ok(counts) if done(counts) => return last,
            _ if Instant::now() >= deadline => {
                let seen = last.map(|counts| format!("{counts:?}"));
                bail!("timed out waiting for {what} (last seen: {seen:?})");
            }
            _ => tokio::time::sleep(POLL_EVERY).await,
        }
    }
}

/// Makes sure every topic exists: creates the missing ones (replication
/// factor `replication`), or with `recreate` deletes them all first. Waits
/// (up to `wait`) for the broker to answer, then for every partition to have
/// a leader. A topic that exists is left as it is, whatever its partitions.
pub async fn ensure(
    brokers: &Brokers,
    topics: &[TopicSpec],
    replication: i32,
    recreate: bool,
    wait: Duration,
) -> anyhow::Result<Vec<(TopicSpec, Outcome)>> {
    let deadline = Instant::now() + wait;
    // A refused password or an untrusted certificate is one clear error
    // now, not a timeout after `wait`.
    let probe_brokers = brokers.clone();
    tokio::task::spawn_blocking(move || {
        stream_actors::kafka::check_access(&probe_brokers, &[], wait)
    })
    .await??;
    let admin = admin_client(brokers)?;
    let metadata_client: BaseConsumer = brokers
        .client_config()
        .create()
        .with_context(|| format!("cannot create a Kafka client for {brokers}"))?;
    let metadata_client = Arc::new(metadata_client);
    let counts = wait_for_metadata(&metadata_client, topics, deadline, "the broker", |_| true)
        .await
        .with_context(|| format!("cannot reach the Kafka broker at {brokers}"))?;
    let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
    if recreate {
        let existing: Vec<&str> = topics
            .iter()
            .zip(&counts)
            .filter(|(_, count)| count.is_some())
            .map(|(spec, _)| spec.name.as_str())
            .collect();
        if !existing.is_empty() {
            for result in admin.delete_topics(&existing, &options).await? {
                match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                    Err((topic, code)) => bail!("cannot delete topic {topic}: {code}"),
                }
            }
            wait_for_metadata(
                &metadata_client,
                topics,
                deadline,
                "the topics' deletion",
                |counts| counts.iter().all(Option::is_none),
            )
            .await?;
        }
    }
    let mut outcomes = Vec::new();
    for (spec, count) in topics.iter().zip(&counts) {
        if let (Some(partitions), false) = (count, recreate) {
            outcomes.push((spec.clone(), Outcome::Existed(*partitions)));
            continue;
        }
        // A topic just deleted can still be "marked for deletion" for a
        // moment: its creation is refused as existing until then.
        loop {
            let new_topic = NewTopic::new(
                &spec.name,
                spec.partitions,
                TopicReplication::Fixed(replication),
            );
            let result = admin
                .create_topics(&[new_topic], &options)
                .await?
                .pop()
                .context("no answer to create_topics")?;
            match result {
                Ok(_) => break,
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) if !recreate => break,
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) if Instant::now() < deadline => {
                    tokio::time::sleep(POLL_EVERY).await;
                }
                Err((topic, code)) => bail!("cannot create topic {topic}: {code}"),
            }
        }
        outcomes.push((
            spec.clone(),
            if recreate && count.is_some() {
                Outcome::Recreated
            } else {
                Outcome::Created
            },
        ));
    }
    let expected: Vec<Option<i32>> = outcomes
        .iter()
        .map(|(spec, outcome)| match outcome {
            Outcome::Existed(partitions) => Some(*partitions),
            Outcome::Created | Outcome::Recreated => Some(spec.partitions),
        })
        .collect();
    wait_for_metadata(
        &metadata_client,
        topics,
        deadline,
        "every partition to have a leader",
        |counts| counts == expected.as_slice(),
    )
    .await?;
    Ok(outcomes)
}

/// "1 partition", "6 partitions".
fn partitions_text(count: i32) -> String {
    if count == 1 {
        "1 partition".to_string()
    } else {
        format!("{count} partitions")
    }
}

/// One line per topic, for the command's output.
pub fn render(outcomes: &[(TopicSpec, Outcome)]) -> String {
    outcomes
        .iter()
        .map(|(spec, outcome)| {
            let name = &spec.name;
            let asked = partitions_text(spec.partitions);
            match outcome {
                Outcome::Existed(found) if *found == spec.partitions => {
                    format!("topic {name}: exists ({asked})")
                }
                Outcome::Existed(found) => format!(
                    "topic {name}: exists with {} (asked for {}; left as it is)",
                    partitions_text(*found),
                    spec.partitions
                ),
                Outcome::Created => format!("topic {name}: created ({asked})"),
                Outcome::Recreated => format!("topic {name}: deleted and created again ({asked})"),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_topic_gets_one_line_that_says_what_happened() {
        let spec = |name: &str, partitions| TopicSpec {
            name: name.to_string(),
            partitions,
        };
        let text = render(&[
            (spec("events", 6), Outcome::Existed(6)),
            (spec("events.dlq", 6), Outcome::Existed(3)),
            (spec("a", 2), Outcome::Created),
            (spec("b", 1), Outcome::Recreated),
        ]);
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "topic events: exists (6 partitions)",
                "topic events.dlq: exists with 3 partitions (asked for 6; left as it is)",
                "topic a: created (2 partitions)",
                "topic b: deleted and created again (1 partition)",
            ]
        );
    }
}
