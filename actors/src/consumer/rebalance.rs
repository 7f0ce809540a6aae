//! The rebalance context: librdkafka's callbacks for the pipeline's consumer.
//!
//! Kafka's group protocol hands partitions to members; this context decides
//! where each one starts. On every assignment it loads the persisted
//! checkpoint and assigns each partition at its checkpointed offset (a
//! partition with no checkpoint starts at the log's beginning); Kafka's own
//! committed offsets are never trusted over the checkpoint. On every
//! revocation it asks the committer to settle the partitions (work in flight
//! acknowledged and committed, or dropped uncommitted after a deadline)
//! before they go to another member.
//!
//! The group runs the cooperative-sticky assignor, so a rebalance names only
//! the partitions that move: an assignment adds to what the member holds
//! (`incremental_assign`) and a revocation takes away only those partitions
//! (`incremental_unassign`). With the eager protocol (a group whose other
//! members ask for it) the same callbacks assign and unassign everything.
//!
//! The context also records, for the consumer's poll loop, what changed:
//! [`RebalanceNotice`]s for the actor (the DLQ writer must hear of an
//! assignment before any record of it) and the partitions revoked while a
//! batch was being collected (their records already in the batch are
//! dropped: the committer has settled those partitions, and their next owner
//! reads them again from the checkpoint).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use ractor::ActorRef;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{error, info, warn};

use super::membership::{GroupState, Membership};
use crate::committer::{CommitterMsg, REVOKE_DRAIN_DEADLINE};
use crate::error::PipelineError;
use crate::metrics as names;
use crate::storage::CheckpointStore;

/// Partitions with their checkpoint (next offset to read; None: none yet).
pub type AtCheckpoint = Vec<(i32, Option<i64>)>;

/// A partition-assignment change, passed from the rebalance callback to the actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceNotice {
    /// These partitions were assigned, at these checkpoints (None: no checkpoint yet).
    Assigned(AtCheckpoint),
    /// These partitions were taken away.
    Revoked(Vec<i32>),
    /// The checkpoint could not be read, so nothing was assigned.
    CheckpointUnavailable(String),
}

/// Where the persisted checkpoint comes from: per partition, the next offset
/// to read. Blocking; called from librdkafka's callbacks and from the rewind.
pub trait CheckpointSource: Send + Sync {
    /// The checkpoint of every partition that has one.
    fn load(&self) -> Result<HashMap<i32, i64>, PipelineError>;
}

/// The checkpoint table in PostgreSQL, read for one group and topic.
pub struct StoredCheckpoint {
    /// Where checkpoints are read from.
    pub store: Arc<CheckpointStore>,
    /// The runtime that drives the store's connection.
    pub runtime: tokio::runtime::Handle,
    /// Consumer group: the checkpoint's key.
    pub group_id: String,
    /// Source topic.
    pub topic: String,
}

impl CheckpointSource for StoredCheckpoint {
    /// Reads on a thread of its own: the rebalance callback runs inside
    /// librdkafka's poll, which may itself be on a runtime thread.
    fn load(&self) -> Result<HashMap<i32, i64>, PipelineError> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.runtime
                        .block_on(self.store.load(&self.group_id, &self.topic))
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(PipelineError::Config {
                        setting: "postgres-url",
                        reason: "checkpoint loader thread panicked".to_string(),
                    })
                })
        })
    }
}

/// Where a partition starts reading: at its checkpoint, or at the beginning
/// of the log when it has none.
pub fn start_offset(checkpoint: Option<i64>) -> Offset {
    match checkpoint {
        Some(next_offset) => Offset::Offset(next_offset),
        None => Offset::Beginning,
    }
}

/// Each partition with its checkpoint (None: none persisted yet).
pub fn at_checkpoint(partitions: &[i32], checkpoint: &HashMap<i32, i64>) -> AtCheckpoint {
    partitions
        .iter()
        .map(|partition| (*partition, checkpoint.get(partition).copied()))
        .collect()
}

/// The consumer's librdkafka context: assigns partitions at their checkpoint
/// and settles revoked ones with the committer.
pub struct CheckpointingContext {
    /// Source topic.
    topic: String,
    /// Where checkpoints are read from.
    checkpoint: Box<dyn CheckpointSource>,
    /// The runtime the committer call runs on.
    runtime: tokio::runtime::Handle,
    /// Assignment changes not yet seen by the consumer actor.
    notices: Mutex<Vec<RebalanceNotice>>,
    /// Partitions revoked since the poll loop last looked: records of them
    /// in the batch being collected are dropped.
    revoked: Mutex<HashSet<i32>>,
    /// Whether `revoked` holds anything: the poll loop looks after every
    /// record, so that look is one atomic load, not a lock.
    any_revoked: AtomicBool,
    /// The committer, asked to settle revoked partitions before they go.
    committer: Mutex<Option<ActorRef<CommitterMsg>>>,
    /// Held while polling and while rewinding, so that a poll of a killed
    /// consumer actor (still running on its blocking thread) cannot take
    /// records after the next generation's rewind.
    pub(super) poll_lock: Mutex<()>,
    /// Set when this client must not be reused: the next generation joins
    /// the group with a fresh one.
    rejoin: AtomicBool,
    /// Whether the consumer actor paused the assigned partitions (the
    /// pipeline was full). The client outlives the actor: a rewind resumes
    /// them for the next generation.
    pub(super) intake_paused: AtomicBool,
    /// The group state of the last statistics (readiness reads it).
    group: Mutex<Option<GroupState>>,
}

impl CheckpointingContext {
    /// A context for `topic` reading checkpoints from `checkpoint`.
    pub fn new(
        topic: String,
        checkpoint: Box<dyn CheckpointSource>,
        runtime: tokio::runtime::Handle,
    ) -> CheckpointingContext {
        CheckpointingContext {
            topic,
            checkpoint,
            runtime,
            notices: Mutex::new(Vec::new()),
            revoked: Mutex::new(HashSet::new()),
            any_revoked: AtomicBool::new(false),
            committer: Mutex::new(None),
            poll_lock: Mutex::new(()),
            rejoin: AtomicBool::new(false),
            intake_paused: AtomicBool::new(false),
            group: Mutex::new(None),
        }
    }

    /// This member's place in its group, from the last statistics.
    pub fn membership(&self) -> Membership {
        Membership::of(self.group.lock().as_ref(), std::time::Instant::now())
    }

    /// Asks for a fresh client (and a fresh group membership) at the next
    /// restart instead of reusing this one.
    pub fn request_rejoin(&self) {
        self.rejoin.store(true, Ordering::SeqCst);
    }

    /// Whether [`Self::request_rejoin`] was called.
    pub fn rejoin_requested(&self) -> bool {
        self.rejoin.load(Ordering::SeqCst)
    }

    /// Takes the assignment changes since the last call.
    pub fn take_notices(&self) -> Vec<RebalanceNotice> {
        std::mem::take(&mut *self.notices.lock())
    }

    /// Takes the partitions revoked since the last call.
    pub fn take_revoked(&self) -> HashSet<i32> {
        if !self.any_revoked.swap(false, Ordering::AcqRel) {
            return HashSet::new();
        }
        std::mem::take(&mut *self.revoked.lock())
    }

    /// The persisted checkpoint (blocking).
    pub fn load_checkpoint(&self) -> Result<HashMap<i32, i64>, PipelineError> {
        self.checkpoint.load()
    }

    /// The source topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// From now on, revokes wait for the committer to settle the partitions.
    pub fn attach_committer(&self, committer: ActorRef<CommitterMsg>) {
        *self.committer.lock() = Some(committer);
    }

    /// Revokes no longer wait (the pipeline is being torn down).
    pub fn detach_committer(&self) {
        self.committer.lock().take();
    }

    /// Asks the committer to settle revoked partitions and waits for it, from
    /// a thread of its own (the callback runs inside librdkafka's poll).
    fn settle_revoked(&self, partitions: &[i32]) {
        let Some(committer) = self.committer.lock().clone() else {
            return;
        };
        let partitions = partitions.to_vec();
        let outcome = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.runtime.block_on(async move {
                        ractor::call_t!(
                            committer,
                            CommitterMsg::Revoke,
                            (REVOKE_DRAIN_DEADLINE + Duration::from_secs(2)).as_millis() as u64,
                            partitions
                        )
                    })
                })
                .join()
        });
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(call_error)) => {
                warn!(%call_error, "committer did not settle revoked partitions; their uncommitted work replays elsewhere");
            }
            Err(_) => warn!("revoke settling thread panicked"),
        }
    }

    fn push_notice(&self, notice: RebalanceNotice) {
        self.notices.lock().push(notice);
    }

    /// An assignment: each partition set at its checkpoint, then assigned.
    fn assign_at_checkpoint(
        &self,
        base_consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
    ) {
        let checkpoint = match self.load_checkpoint() {
            Ok(checkpoint) => checkpoint,
            Err(load_error) => {
                error!(%load_error, "cannot load the checkpoint; assigning nothing");
                // librdkafka now waits for an assign that never comes: only
                // a fresh client gets out of that.
                self.request_rejoin();
                self.push_notice(RebalanceNotice::CheckpointUnavailable(
                    load_error.to_string(),
                ));
                return;
            }
        };
        let partitions: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|element| element.topic() == self.topic)
            .map(|element| element.partition())
            .collect();
        let assigned = at_checkpoint(&partitions, &checkpoint);
        for (partition, next) in &assigned {
            if let Err(set_error) =
                tpl.set_partition_offset(&self.topic, *partition, start_offset(*next))
            {
                error!(%set_error, partition, "cannot set the start offset");
            }
        }
        info!(?assigned, "partitions assigned at the checkpoint");
        let assign_result = match base_consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => base_consumer.incremental_assign(tpl),
            _ => base_consumer.assign(tpl),
        };
        if let Err(assign_error) = assign_result {
            error!(%assign_error, "assign failed");
        }
        self.push_notice(RebalanceNotice::Assigned(assigned));
    }

    /// A revocation: settled with the committer, then unassigned.
    fn revoke_after_settling(&self, base_consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let revoked: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|element| element.topic() == self.topic)
            .map(|element| element.partition())
            .collect();
        let lost = base_consumer.assignment_lost();
        info!(
            ?revoked,
            lost, "partitions revoked; settling work in flight"
        );
        self.revoked.lock().extend(revoked.iter().copied());
        self.any_revoked.store(true, Ordering::Release);
        self.settle_revoked(&revoked);
        self.push_notice(RebalanceNotice::Revoked(revoked));
        let unassign_result = match base_consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => base_consumer.incremental_unassign(tpl),
            _ => base_consumer.unassign(),
        };
        if let Err(unassign_error) = unassign_result {
            error!(%unassign_error, "unassign failed");
        }
    }
}

impl ClientContext for CheckpointingContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): publishes the
    /// consumer lag per partition, end offset minus committed offset.
    /// It also keeps the group state (readiness) and publishes the partitions
    /// assigned.
    fn stats(&self, statistics: rdkafka::Statistics) {
        if let Some(group) = &statistics.cgrp {
            metrics::gauge!(names::CONSUMER_ASSIGNED_PARTITIONS).set(group.assignment_size as f64);
            *self.group.lock() = Some(GroupState {
                state: group.state.clone(),
                join_state: group.join_state.clone(),
                partitions: group.assignment_size,
                topic_partitions: statistics
                    .topics
                    .get(&self.topic)
                    .map(|topic| {
                        topic
                            .partitions
                            .keys()
                            .filter(|partition| **partition >= 0)
                            .count()
                    })
                    .unwrap_or(0),
                seen: std::time::Instant::now(),
            });
        }
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        for (partition, partition_statistics) in &topic.partitions {
            if *partition < 0 || partition_statistics.consumer_lag < 0 {
                continue;
            }
            metrics::gauge!(names::CONSUMER_LAG, "partition" => partition.to_string())
                .set(partition_statistics.consumer_lag as f64);
        }
    }
}

impl ConsumerContext for CheckpointingContext {
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.assign_at_checkpoint(base_consumer, tpl)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoke_after_settling(base_consumer, tpl)
            }
            other => {
                // librdkafka reports the failure and rejoins on its own.
                error!(?other, "rebalance failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::ClientConfig;

    /// A checkpoint with fixed contents, or one that cannot be read.
    struct FixedCheckpoint(Result<HashMap<i32, i64>, String>);

    impl CheckpointSource for FixedCheckpoint {
        fn load(&self) -> Result<HashMap<i32, i64>, PipelineError> {
            self.0.clone().map_err(|reason| PipelineError::Config {
                setting: "postgres-url",
                reason,
            })
        }
    }

    /// A consumer that joins no group and reaches no broker (nothing listens
    /// on port 1): assignment is local to librdkafka.
    fn offline_consumer(
        checkpoint: Result<HashMap<i32, i64>, String>,
    ) -> (tokio::runtime::Runtime, BaseConsumer<CheckpointingContext>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let context = CheckpointingContext::new(
            "events".to_string(),
            Box::new(FixedCheckpoint(checkpoint)),
            runtime.handle().clone(),
        );
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "offline")
            .create_with_context(context)
            .unwrap();
        (runtime, consumer)
    }

    fn partitions(topic: &str, partitions: &[i32]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for partition in partitions {
            tpl.add_partition(topic, *partition);
        }
        tpl
    }

    #[test]
    fn a_partition_starts_at_its_checkpoint_or_at_the_beginning() {
        assert_eq!(start_offset(Some(42)), Offset::Offset(42));
        assert_eq!(start_offset(Some(0)), Offset::Offset(0));
        assert_eq!(start_offset(None), Offset::Beginning);
        let checkpoint = HashMap::from([(0, 10), (2, 30)]);
        assert_eq!(
            at_checkpoint(&[0, 1, 2], &checkpoint),
            vec![(0, Some(10)), (1, None), (2, Some(30))]
        );
    }

    #[test]
    fn an_assignment_sets_each_partition_at_its_checkpoint_and_tells_the_actor() {
        let (_runtime, consumer) = offline_consumer(Ok(HashMap::from([(0, 100), (1, 7)])));
        let mut tpl = partitions("events", &[0, 1, 2]);
        consumer.context().rebalance(
            &consumer,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS,
            &mut tpl,
        );
        let offsets: Vec<(i32, Offset)> = tpl
            .elements()
            .iter()
            .map(|element| (element.partition(), element.offset()))
            .collect();
        assert_eq!(
            offsets,
            vec![
                (0, Offset::Offset(100)),
                (1, Offset::Offset(7)),
                (2, Offset::Beginning)
            ]
        );
        let assigned: Vec<i32> = consumer
            .assignment()
            .unwrap()
            .elements()
            .iter()
            .map(|element| element.partition())
            .collect();
        assert_eq!(assigned, vec![0, 1, 2]);
        assert_eq!(
            consumer.context().take_notices(),
            vec![RebalanceNotice::Assigned(vec![
                (0, Some(100)),
                (1, Some(7)),
                (2, None)
            ])]
        );
        assert!(!consumer.context().rejoin_requested());
    }

    #[test]
    fn an_unreadable_checkpoint_assigns_nothing_and_asks_for_a_fresh_client() {
        let (_runtime, consumer) = offline_consumer(Err("connection refused".to_string()));
        let mut tpl = partitions("events", &[0, 1]);
        consumer.context().rebalance(
            &consumer,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS,
            &mut tpl,
        );
        assert_eq!(consumer.assignment().unwrap().count(), 0);
        assert!(consumer.context().rejoin_requested());
        let notices = consumer.context().take_notices();
        assert!(
            matches!(notices.as_slice(), [RebalanceNotice::CheckpointUnavailable(reason)] if reason.contains("connection refused")),
            "{notices:?}"
        );
    }

    #[test]
    fn a_revocation_unassigns_and_marks_the_partitions_for_the_poll_loop() {
        let (_runtime, consumer) = offline_consumer(Ok(HashMap::new()));
        let mut tpl = partitions("events", &[0, 1, 2]);
        let context = consumer.context();
        context.rebalance(
            &consumer,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS,
            &mut tpl,
        );
        context.take_notices();
        let mut revoked = partitions("events", &[0, 1, 2]);
        context.rebalance(
            &consumer,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS,
            &mut revoked,
        );
        assert_eq!(consumer.assignment().unwrap().count(), 0);
        assert_eq!(
            context.take_notices(),
            vec![RebalanceNotice::Revoked(vec![0, 1, 2])]
        );
        assert_eq!(context.take_revoked(), HashSet::from([0, 1, 2]));
        assert!(context.take_revoked().is_empty(), "taken once");
    }

    #[test]
    fn partitions_of_other_topics_are_left_alone() {
        let (_runtime, consumer) = offline_consumer(Ok(HashMap::from([(0, 5)])));
        let mut tpl = partitions("events", &[0]);
        tpl.add_partition("other", 0);
        consumer.context().rebalance(
            &consumer,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS,
            &mut tpl,
        );
        assert_eq!(
            consumer.context().take_notices(),
            vec![RebalanceNotice::Assigned(vec![(0, Some(5))])]
        );
    }
}
