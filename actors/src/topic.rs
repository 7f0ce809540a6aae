//! Reading a topic back with a plain client: its partitions, its end
//! offsets and every record up to them. Joins no group, commits nothing. The
//! DLQ writer uses it to see what it already wrote; `streamctl` and the tests
//! use it to audit.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::Brokers;

/// How long a metadata or watermark request may take.
pub const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for metadata and manual reads.
pub fn plain_consumer(brokers: &Brokers) -> anyhow::Result<BaseConsumer> {
    brokers
        .client_config()
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .with_context(|| format!("cannot create a kafka client for {brokers}"))
}

/// The reading client's context. librdkafka reports a partition's end (with
/// `enable.partition.eof`) as an error event, which rdkafka's default
/// context logs at ERROR; reaching the end is what a read waits for, so it
/// is logged at debug, and every other error as before. So is a refused
/// group: librdkafka needs a `group.id` to assign partitions and looks its
/// coordinator up, but a read joins no group and commits nothing, so a
/// principal that may read the topic but not describe the reader's group
/// (an ACL for the pipeline's group only) reads all the same.
pub struct EndOfPartitionIsNotAnError;

/// The group name librdkafka needs for a manual read (never joined, never
/// committed to).
const READER_GROUP: &str = "streamctl-inspect";

impl ClientContext for EndOfPartitionIsNotAnError {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error,
            KafkaError::Global(RDKafkaErrorCode::PartitionEOF) | KafkaError::PartitionEOF(_)
        ) {
            tracing::debug!(%reason, "reached the end of a partition");
        } else if is_refused_group(&error) {
            tracing::debug!(%reason, "the reader's group {READER_GROUP} is not authorized (not needed for a read)");
        } else {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for EndOfPartitionIsNotAnError {}

fn is_refused_group(error: &KafkaError) -> bool {
    error.rdkafka_error_code() == Some(RDKafkaErrorCode::GroupAuthorizationFailed)
}

/// A client for manual reads that reports each partition's end (a partition
/// EOF), so a read stops at the end even when the last offsets hold no
/// record a consumer sees (transaction markers).
fn eof_consumer(brokers: &Brokers) -> anyhow::Result<BaseConsumer<EndOfPartitionIsNotAnError>> {
    brokers
        .client_config()
        .set("group.id", READER_GROUP)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .set("auto.offset.reset", "earliest")
        .create_with_context(EndOfPartitionIsNotAnError)
        .with_context(|| format!("cannot create a kafka client for {brokers}"))
}

/// The partitions of a topic, sorted.
pub fn partitions(brokers: &Brokers, topic: &str) -> anyhow::Result<Vec<i32>> {
    partitions_on(&plain_consumer(brokers)?, brokers, topic, KAFKA_TIMEOUT)
}

/// The partitions of a topic, sorted, through a client the caller keeps
/// (`brokers` names them in errors).
pub fn partitions_on(
    consumer: &BaseConsumer,
    brokers: &dyn std::fmt::Display,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("cannot read metadata of topic {topic} from {brokers}"))?;
    let Some(topic_metadata) = metadata
        .topics()
        .iter()
        .find(|candidate| candidate.name() == topic)
    else {
        bail!("topic {topic} not found on {brokers}");
    };
    if let Some(error) = topic_metadata.error() {
        bail!(
            "topic {topic} on {brokers}: {}",
            RDKafkaErrorCode::from(error)
        );
    }
    let mut partitions: Vec<i32> = topic_metadata
        .partitions()
        .iter()
        .map(|partition| partition.id())
        .collect();
    partitions.sort_unstable();
    Ok(partitions)
}

/// Per partition, the end offset (the high watermark): the offset the next
/// record will get.
pub fn end_offsets(brokers: &Brokers, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let consumer = plain_consumer(brokers)?;
    let mut ends = BTreeMap::new();
    for partition in partitions_on(&consumer, brokers, topic, KAFKA_TIMEOUT)? {
        let (_, high) = consumer
            .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
            .with_context(|| format!("cannot read the end offset of {topic}/{partition}"))?;
        ends.insert(partition, high);
    }
    Ok(ends)
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    /// Partition it was read from.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes.
    pub payload: Option<Vec<u8>>,
    /// Headers, in order; values as text (lossy).
    pub headers: Vec<(String, String)>,
    /// The record's timestamp (ms since the Unix epoch), when it has one.
    pub timestamp_ms: Option<i64>,
}

impl ReadRecord {
    /// The record as read from a message.
    pub fn from_message(message: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| {
                        (
                            header.key.to_string(),
                            header
                                .value
                                .map(|value| String::from_utf8_lossy(value).into_owned())
                                .unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        ReadRecord {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: message.timestamp().to_millis(),
        }
    }

    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Reads every record of a topic, from the beginning to the end offsets as
/// they are now (what is written meanwhile is left out). Uses manual
/// assignment: it joins no group, commits nothing.
pub fn read_topic(
    brokers: &Brokers,
    topic: &str,
    deadline: Duration,
) -> anyhow::Result<Vec<ReadRecord>> {
    read_from(brokers, topic, &BTreeMap::new(), deadline)
}

/// Reads the records of a topic from `starts` (per partition; a partition
/// not named is read from its beginning) to the end offsets as they are now.
/// A start below what retention kept reads from the first record kept.
pub fn read_from(
    brokers: &Brokers,
    topic: &str,
    starts: &BTreeMap<i32, i64>,
    deadline: Duration,
) -> anyhow::Result<Vec<ReadRecord>> {
    let ends = end_offsets(brokers, topic)?;
    let consumer = eof_consumer(brokers)?;
    let mut assignment = TopicPartitionList::new();
    let mut remaining: BTreeMap<i32, i64> = BTreeMap::new();
    for (partition, end) in &ends {
        let start = starts.get(partition).copied().unwrap_or(0);
        if *end > start {
            let offset = if start > 0 {
                Offset::Offset(start)
            } else {
                Offset::Beginning
            };
            assignment.add_partition_offset(topic, *partition, offset)?;
            remaining.insert(*partition, *end);
        }
    }
    let mut records = Vec::new();
    if remaining.is_empty() {
        return Ok(records);
    }
    consumer
        .assign(&assignment)
        .context("cannot assign partitions")?;
    let started = Instant::now();
    while !remaining.is_empty() {
        if started.elapsed() > deadline {
            bail!(
                "reading {topic} did not finish within {deadline:?}; still missing {remaining:?}"
            );
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => {
                let Some(end) = remaining.get(&message.partition()).copied() else {
                    continue;
                };
                if message.offset() < end {
                    records.push(ReadRecord::from_message(&message));
                }
                if message.offset() + 1 >= end {
                    remaining.remove(&message.partition());
                }
            }
            // At the high watermark, which is at or past the end taken above.
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                remaining.remove(&partition);
            }
            Some(Err(error)) if is_refused_group(&error) => {}
            Some(Err(error)) => {
                return Err(error).with_context(|| format!("error reading {topic}"))
            }
        }
    }
    Ok(records)
}
