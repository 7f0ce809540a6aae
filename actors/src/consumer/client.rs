//! The Kafka consumer client: how it joins the group, and how an actor
//! restart puts it back at the checkpoint without leaving the group.
//!
//! The client belongs to the pipeline supervisor and outlives actor
//! restarts. A new generation's consumer does not rejoin: it rewinds the
//! partitions the client holds to the persisted checkpoint
//! ([`rewind_to_checkpoint`]), which is what a fresh assignment would do,
//! without a rebalance for the rest of the group. A seek makes librdkafka
//! discard what it fetched before (its fetch queue is versioned per seek), so
//! the next record of a partition is the one at its checkpoint.
//!
//! Group membership is Kafka's:
//! - the cooperative-sticky assignor, so a rebalance revokes only the
//!   partitions that move to another member;
//! - static membership when `group.instance.id` is set (the pod name in
//!   Kubernetes): a restarted process with the same id takes its partitions
//!   back at once, with no rebalance, instead of waiting for the session
//!   timeout to evict its previous incarnation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;
use tracing::debug;

use super::rebalance::{
    at_checkpoint, start_offset, AtCheckpoint, CheckpointingContext, RebalanceNotice,
    StoredCheckpoint,
};
use crate::config::PipelineConfig;
use crate::error::PipelineError;
use crate::storage::CheckpointStore;

/// The consumer client's librdkafka settings. Auto-commit and auto offset
/// store are off: only the committer commits.
pub fn consumer_settings(config: &PipelineConfig) -> ClientConfig {
    let mut client_config = config.brokers.client_config();
    client_config
        .set("group.id", &config.group_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (config.session_timeout.as_millis() / 3)
                .max(100)
                .to_string(),
        )
        .set(
            "max.poll.interval.ms",
            config.max_poll_interval.as_millis().to_string(),
        )
        .set("statistics.interval.ms", "1000");
    for (name, value) in fetch_limits(config.max_in_flight_bytes) {
        client_config.set(name, value.to_string());
    }
    if let Some(instance) = &config.group_instance_id {
        client_config.set("group.instance.id", instance);
    }
    // librdkafka's own debug contexts (for example `cgrp` for the group
    // protocol), logged through `tracing` at `librdkafka=debug`.
    if let Ok(contexts) = std::env::var("STREAM_KAFKA_DEBUG") {
        client_config
            .set("debug", contexts)
            .set_log_level(rdkafka::config::RDKafkaLogLevel::Debug);
    }
    client_config
}

/// librdkafka's fetch and prefetch sizes, from the in-flight byte budget: its
/// local queue (`queued.max.messages.kbytes`) and one fetch response
/// (`fetch.max.bytes`) get a quarter of the budget each, so what the
/// client holds besides the pipeline is bounded by the same setting. A
/// record larger than a fetch still comes, alone (Kafka returns at least
/// one record batch); `receive.message.max.bytes` stays at librdkafka's
/// default, large enough for it, so a big record is a dead letter, never a
/// stuck consumer.
pub fn fetch_limits(max_in_flight_bytes: usize) -> [(&'static str, usize); 3] {
    const MIB: usize = 1024 * 1024;
    let quarter = (max_in_flight_bytes / 4).clamp(MIB, 50 * MIB);
    [
        ("queued.max.messages.kbytes", quarter / 1024),
        ("fetch.max.bytes", quarter),
        ("max.partition.fetch.bytes", quarter.min(MIB)),
    ]
}

/// Builds the consumer (not yet subscribed).
pub fn create_consumer(
    config: &PipelineConfig,
    store: Arc<CheckpointStore>,
) -> Result<Arc<BaseConsumer<CheckpointingContext>>, PipelineError> {
    let runtime = tokio::runtime::Handle::current();
    let context = CheckpointingContext::new(
        config.topic.clone(),
        Box::new(StoredCheckpoint {
            store,
            runtime: runtime.clone(),
            group_id: config.group_id.clone(),
            topic: config.topic.clone(),
        }),
        runtime,
    );
    let consumer: BaseConsumer<CheckpointingContext> = consumer_settings(config)
        .create_with_context(context)
        .map_err(PipelineError::kafka("create consumer"))?;
    Ok(Arc::new(consumer))
}

/// How often a rewind retries a seek that librdkafka refuses (a partition
/// whose fetcher is still starting), and how long it waits between tries.
const SEEK_ATTEMPTS: u32 = 20;
const SEEK_RETRY_WAIT: Duration = Duration::from_millis(100);
/// How long one seek waits for librdkafka.
const SEEK_WAIT: Duration = Duration::from_secs(5);

/// The seeks that put `partitions` back at their checkpoint, with what to
/// tell the DLQ writer (each partition and its checkpoint).
pub fn rewind_plan(
    topic: &str,
    partitions: &[i32],
    checkpoint: &HashMap<i32, i64>,
) -> Result<(TopicPartitionList, AtCheckpoint), PipelineError> {
    let assigned = at_checkpoint(partitions, checkpoint);
    let mut seeks = TopicPartitionList::new();
    for (partition, next) in &assigned {
        seeks
            .add_partition_offset(topic, *partition, start_offset(*next))
            .map_err(PipelineError::kafka("build the seek list"))?;
    }
    Ok((seeks, assigned))
}

/// Puts every partition this client holds back at its checkpoint: the
/// in-process restart's equivalent of a fresh assignment. Waits for any poll
/// still running (a killed actor's), fails if the last assignment could not
/// read the checkpoint, then seeks. Returns the assignment with its
/// checkpoints, for the DLQ writer. Blocking: call from a blocking thread.
pub fn rewind_to_checkpoint(
    consumer: &BaseConsumer<CheckpointingContext>,
) -> Result<AtCheckpoint, PipelineError> {
    let context = consumer.context();
    let _polling = context.poll_lock.lock();
    for notice in context.take_notices() {
        if let RebalanceNotice::CheckpointUnavailable(reason) = notice {
            context.request_rejoin();
            return Err(PipelineError::Rewind(format!(
                "the checkpoint was unreadable at the last assignment: {reason}"
            )));
        }
    }
    // Records of partitions revoked before this generation began are gone
    // with the old generation.
    context.take_revoked();
    let assignment = consumer
        .assignment()
        .map_err(PipelineError::kafka("read the assignment"))?;
    // The last generation may have paused its intake; resume before the
    // seek, which then decides where fetching starts again.
    if context
        .intake_paused
        .swap(false, std::sync::atomic::Ordering::AcqRel)
    {
        consumer
            .resume(&assignment)
            .map_err(PipelineError::kafka("resume the paused partitions"))?;
    }
    let partitions: Vec<i32> = assignment
        .elements()
        .iter()
        .filter(|element| element.topic() == context.topic())
        .map(|element| element.partition())
        .collect();
    if partitions.is_empty() {
        return Ok(Vec::new());
    }
    let checkpoint = context.load_checkpoint()?;
    let (seeks, assigned) = rewind_plan(context.topic(), &partitions, &checkpoint)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let failed: Vec<(i32, String)> = match consumer.seek_partitions(seeks.clone(), SEEK_WAIT) {
            Ok(result) => result
                .elements()
                .iter()
                .filter_map(|element| {
                    element
                        .error()
                        .err()
                        .map(|seek_error| (element.partition(), seek_error.to_string()))
                })
                .collect(),
            Err(seek_error) => vec![(-1, seek_error.to_string())],
        };
        if failed.is_empty() {
            return Ok(assigned);
        }
        if attempt >= SEEK_ATTEMPTS {
            // Records past the checkpoint may already have been fetched and
            // taken: without the seek they would be skipped. Start over with
            // a fresh client, which is assigned at the checkpoint.
            context.request_rejoin();
            return Err(PipelineError::Rewind(format!(
                "librdkafka refused to seek (partition, error): {failed:?}"
            )));
        }
        debug!(attempt, ?failed, "librdkafka refused a seek; retrying");
        std::thread::sleep(SEEK_RETRY_WAIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Offset;

    #[test]
    fn a_rewind_seeks_each_held_partition_to_its_checkpoint() {
        let checkpoint = HashMap::from([(1, 500), (3, 0)]);
        let (seeks, assigned) = rewind_plan("events", &[1, 2, 3], &checkpoint).unwrap();
        let offsets: Vec<(String, i32, Offset)> = seeks
            .elements()
            .iter()
            .map(|element| {
                (
                    element.topic().to_string(),
                    element.partition(),
                    element.offset(),
                )
            })
            .collect();
        assert_eq!(
            offsets,
            vec![
                ("events".to_string(), 1, Offset::Offset(500)),
                ("events".to_string(), 2, Offset::Beginning),
                ("events".to_string(), 3, Offset::Offset(0)),
            ]
        );
        assert_eq!(assigned, vec![(1, Some(500)), (2, None), (3, Some(0))]);
    }

    #[test]
    fn static_membership_and_the_cooperative_assignor_are_configured() {
        let mut config = PipelineConfig::local_defaults();
        let settings = consumer_settings(&config);
        assert_eq!(
            settings.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(
            settings.get("group.instance.id"),
            None,
            "dynamic by default"
        );
        assert_eq!(settings.get("enable.auto.commit"), Some("false"));
        assert_eq!(settings.get("enable.auto.offset.store"), Some("false"));
        config.group_instance_id = Some("processor-0".to_string());
        config.session_timeout = Duration::from_secs(9);
        let settings = consumer_settings(&config);
        assert_eq!(settings.get("group.instance.id"), Some("processor-0"));
        assert_eq!(settings.get("session.timeout.ms"), Some("9000"));
        assert_eq!(settings.get("heartbeat.interval.ms"), Some("3000"));
    }

    #[test]
    fn fetch_and_queue_sizes_follow_the_in_flight_budget() {
        let mut config = PipelineConfig::local_defaults();
        config.max_in_flight_bytes = 64 * 1024 * 1024;
        config.max_poll_interval = Duration::from_secs(7);
        let settings = consumer_settings(&config);
        assert_eq!(settings.get("queued.max.messages.kbytes"), Some("16384"));
        assert_eq!(settings.get("fetch.max.bytes"), Some("16777216"));
        assert_eq!(settings.get("max.partition.fetch.bytes"), Some("1048576"));
        assert_eq!(settings.get("max.poll.interval.ms"), Some("7000"));
        // Small budgets keep a usable fetch; large ones stay at librdkafka's ceiling.
        assert_eq!(fetch_limits(1024)[1].1, 1024 * 1024);
        assert_eq!(fetch_limits(4 << 30)[1].1, 50 * 1024 * 1024);
    }
}
