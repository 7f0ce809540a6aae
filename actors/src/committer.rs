//! The committer: the only actor that moves offsets.
//!
//! Upstream: the consumer tells it, in read order, which offsets it has handed
//! to the parser (`Track`); the sink and the DLQ writer tell it which of those
//! are safely stored or delivered (`Ack`). Downstream: the checkpoint table in
//! PostgreSQL, then Kafka's committed offsets.
//!
//! Each partition advances only over the contiguous run of acknowledged
//! offsets at the front of what was tracked, so a committed offset never
//! passes a message that is still in flight. On every tick it persists the
//! checkpoint first and commits to Kafka second: the checkpoint is the truth,
//! the Kafka commit a courtesy for tools that read consumer-group offsets.
//!
//! If PostgreSQL is gone the checkpoint simply does not move (the failure is
//! counted and the next tick tries again on a new connection); what was
//! acknowledged but not persisted is replayed after a crash and absorbed by
//! the idempotent sinks.
//!
//! On a rebalance, the consumer's rebalance callback asks it to `Revoke`
//! partitions and waits for the answer before the partitions go to another
//! member: it waits until everything in flight for them is acknowledged (or a
//! deadline passes), persists and commits that, and forgets them, so work in
//! flight for a revoked partition is either completed and committed or dropped
//! without committing. Late acknowledgements for them are ignored.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use crate::consumer::CheckpointingContext;
use crate::faults::{CrashPoint, Faults};
use crate::metrics as names;
use crate::models::{AckSource, SourcePosition};
use crate::storage::CheckpointStore;

/// What the committer starts with.
pub struct CommitterArgs {
    /// Consumer group: the checkpoint's key.
    pub group_id: String,
    /// Source topic.
    pub topic: String,
    /// Where the checkpoint is persisted.
    pub store: Arc<CheckpointStore>,
    /// The consumer, to commit offsets to Kafka after the checkpoint.
    pub consumer: Arc<BaseConsumer<CheckpointingContext>>,
    /// How often to persist and commit.
    pub commit_interval: Duration,
    /// Injected faults.
    pub faults: Arc<Faults>,
    /// What this actor tells the watchdog.
    pub progress: Arc<crate::progress::Progress>,
}

/// How long a revoke waits for the revoked partitions' work in flight.
pub const REVOKE_DRAIN_DEADLINE: Duration = Duration::from_secs(8);

/// Messages the committer handles. None of them go through a bounded
/// mailbox: their number is bounded by the records in flight, which the data
/// mailboxes bound.
#[derive(Debug)]
pub enum CommitterMsg {
    /// The consumer handed these positions to the parser, in read order.
    Track(Vec<SourcePosition>),
    /// These positions are stored (sink) or delivered (DLQ).
    Ack {
        /// Who acknowledges.
        source: AckSource,
        /// What is acknowledged.
        positions: Vec<SourcePosition>,
    },
    /// Partitions taken away by a rebalance: wait for their work in flight
    /// (up to [`REVOKE_DRAIN_DEADLINE`]), commit what is done, forget the
    /// rest, then reply.
    Revoke(Vec<i32>, RpcReplyPort<()>),
    /// Time to persist the checkpoint and commit.
    Tick,
    /// Persist and commit now, then reply.
    Flush(RpcReplyPort<()>),
    /// Report progress.
    Status(RpcReplyPort<CommitterStatus>),
}

/// A snapshot of the committer's progress.
#[derive(Debug, Clone, Default)]
pub struct CommitterStatus {
    /// Records tracked and not yet acknowledged.
    pub in_flight: usize,
    /// Per partition, the next offset as last persisted.
    pub persisted: BTreeMap<i32, i64>,
    /// Checkpoints persisted so far.
    pub checkpoints_persisted: u64,
}

/// One partition's progress.
#[derive(Debug, Default)]
struct PartitionProgress {
    /// Tracked offsets in read order, with whether each is acknowledged.
    pending: VecDeque<(i64, bool)>,
    /// The offset after the contiguous acknowledged run: what to commit next.
    committable: Option<i64>,
    /// What was last persisted.
    persisted: Option<i64>,
}

impl PartitionProgress {
    /// Tracks an offset handed out. Within one assignment Kafka delivers a
    /// partition's offsets in increasing order (with gaps where compaction
    /// or transaction markers are); a revocation forgets the partition and
    /// a restart starts a new committer. So an offset at or below the last
    /// one tracked means the stream went back unannounced, and what was
    /// made committable can no longer be trusted: returns the last offset
    /// tracked, and the committer fails (the pipeline restarts from the
    /// checkpoint, which is always safe).
    fn track(&mut self, offset: i64) -> Result<(), i64> {
        let last = self
            .pending
            .back()
            .map(|(tracked, _)| *tracked)
            .or(self.committable.map(|next| next - 1));
        if let Some(last) = last.filter(|last| offset <= *last) {
            return Err(last);
        }
        self.pending.push_back((offset, false));
        Ok(())
    }

    /// Marks an offset acknowledged; returns whether it was tracked.
    fn acknowledge(&mut self, offset: i64) -> bool {
        let Ok(index) = self
            .pending
            .binary_search_by_key(&offset, |(tracked, _)| *tracked)
        else {
            return false;
        };
        self.pending[index].1 = true;
        while let Some((front_offset, true)) = self.pending.front().copied() {
            self.pending.pop_front();
            self.committable = Some(front_offset + 1);
        }
        true
    }
}

/// The committer's state.
pub struct CommitterState {
    args: CommitterArgs,
    /// Progress per partition.
    partitions: BTreeMap<i32, PartitionProgress>,
    /// Checkpoints persisted so far.
    checkpoints_persisted: u64,
    /// A revoke waiting for its partitions' work in flight.
    revoking: Option<PendingRevoke>,
}

/// A revoke that waits for acknowledgements.
struct PendingRevoke {
    partitions: Vec<i32>,
    deadline: Instant,
    reply: RpcReplyPort<()>,
}

impl CommitterState {
    fn in_flight_of(&self, partitions: &[i32]) -> usize {
        partitions
            .iter()
            .filter_map(|partition| self.partitions.get(partition))
            .map(|progress| progress.pending.len())
            .sum()
    }

    /// Finishes the pending revoke if its partitions are drained or its
    /// deadline passed: persists what is done, forgets them, replies.
    async fn settle_revoke(&mut self) {
        let ready = self.revoking.as_ref().is_some_and(|revoke| {
            self.in_flight_of(&revoke.partitions) == 0 || Instant::now() >= revoke.deadline
        });
        if !ready {
            return;
        }
        let revoke = self.revoking.take().expect("checked above");
        let dropped = self.in_flight_of(&revoke.partitions);
        if dropped > 0 {
            warn!(
                dropped,
                partitions = ?revoke.partitions,
                "revoke deadline passed; work in flight for revoked partitions dropped uncommitted"
            );
        }
        self.persist_and_commit(Some(&revoke.partitions)).await;
        for partition in &revoke.partitions {
            self.partitions.remove(partition);
        }
        tracing::info!(partitions = ?revoke.partitions, "revoked partitions committed and released");
        let _ = revoke.reply.send(());
    }

    fn in_flight(&self) -> usize {
        self.partitions
            .values()
            .map(|progress| progress.pending.len())
            .sum()
    }

    /// Persists every partition that moved, then commits them to Kafka. A
    /// failed persist leaves the checkpoint where it was (the next call tries
    /// again); returns whether the checkpoint is now up to date.
    async fn persist_and_commit(&mut self, only: Option<&[i32]>) -> bool {
        let moved: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .filter(|(partition, _)| only.is_none_or(|wanted| wanted.contains(partition)))
            .filter_map(|(partition, progress)| match progress.committable {
                Some(next) if Some(next) != progress.persisted => Some((*partition, next)),
                _ => None,
            })
            .collect();
        if moved.is_empty() {
            return true;
        }
        if let Err(persist_error) = self
            .args
            .store
            .persist(&self.args.group_id, &self.args.topic, &moved)
            .await
        {
            metrics::counter!(names::CHECKPOINT_FAILURES).increment(1);
            warn!(%persist_error, "checkpoint not persisted; retrying on the next tick");
            return false;
        }
        self.args.faults.reached(CrashPoint::AfterCheckpoint);
        self.checkpoints_persisted += 1;
        metrics::counter!(names::CHECKPOINTS_PERSISTED).increment(1);
        let mut offsets = TopicPartitionList::new();
        for (partition, next) in &moved {
            if let Some(progress) = self.partitions.get_mut(partition) {
                progress.persisted = Some(*next);
            }
            metrics::gauge!(names::CHECKPOINT_OFFSET, "partition" => partition.to_string())
                .set(*next as f64);
            if let Err(error) =
                offsets.add_partition_offset(&self.args.topic, *partition, Offset::Offset(*next))
            {
                warn!(%error, partition, "cannot build the kafka commit");
            }
        }
        if let Err(error) = self.args.consumer.commit(&offsets, CommitMode::Async) {
            // The checkpoint is persisted; Kafka catches up on the next tick.
            warn!(%error, "kafka commit failed after checkpoint was persisted");
        }
        debug!(partitions = moved.len(), "checkpoint persisted");
        true
    }
}

/// The committer actor.
pub struct CommitterActor;

impl Actor for CommitterActor {
    type Msg = CommitterMsg;
    type State = CommitterState;
    type Arguments = CommitterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(args.commit_interval, || CommitterMsg::Tick);
        metrics::counter!(names::CHECKPOINT_FAILURES).increment(0);
        Ok(CommitterState {
            args,
            partitions: BTreeMap::new(),
            checkpoints_persisted: 0,
            revoking: None,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _working = state.args.progress.working();
        state.args.faults.at_message_start("committer").await;
        match message {
            CommitterMsg::Track(positions) => {
                for position in positions {
                    let tracked = state
                        .partitions
                        .entry(position.partition)
                        .or_default()
                        .track(position.offset);
                    if let Err(last) = tracked {
                        return Err(format!(
                            "partition {}: offset {} handed out after {last} without a revocation; restarting from the checkpoint",
                            position.partition, position.offset
                        )
                        .into());
                    }
                }
                metrics::gauge!(names::IN_FLIGHT).set(state.in_flight() as f64);
            }
            CommitterMsg::Ack { source, positions } => {
                let mut untracked = 0usize;
                for position in positions {
                    let known = state
                        .partitions
                        .get_mut(&position.partition)
                        .is_some_and(|progress| progress.acknowledge(position.offset));
                    if !known {
                        untracked += 1;
                    }
                }
                if untracked > 0 {
                    debug!(
                        ?source,
                        untracked, "acknowledgements for positions no longer tracked"
                    );
                }
                metrics::gauge!(names::IN_FLIGHT).set(state.in_flight() as f64);
                state.settle_revoke().await;
            }
            CommitterMsg::Revoke(partitions, reply) => {
                if let Some(earlier) = state.revoking.take() {
                    // Cannot happen (the callback waits for each answer); answer it anyway.
                    let _ = earlier.reply.send(());
                }
                state.revoking = Some(PendingRevoke {
                    partitions,
                    deadline: Instant::now() + REVOKE_DRAIN_DEADLINE,
                    reply,
                });
                state.settle_revoke().await;
            }
            CommitterMsg::Tick => {
                state.persist_and_commit(None).await;
                state.settle_revoke().await;
            }
            CommitterMsg::Flush(reply) => {
                if !state.persist_and_commit(None).await {
                    return Err("final checkpoint could not be persisted".into());
                }
                let _ = reply.send(());
            }
            CommitterMsg::Status(reply) => {
                let status = CommitterStatus {
                    in_flight: state.in_flight(),
                    persisted: state
                        .partitions
                        .iter()
                        .filter_map(|(partition, progress)| {
                            progress.persisted.map(|next| (*partition, next))
                        })
                        .collect(),
                    checkpoints_persisted: state.checkpoints_persisted,
                };
                let _ = reply.send(status);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::PartitionProgress;

    #[test]
    fn advances_only_over_a_contiguous_acknowledged_run() {
        let mut progress = PartitionProgress::default();
        for offset in 10..15 {
            progress.track(offset).unwrap();
        }
        assert!(progress.acknowledge(12));
        assert!(progress.acknowledge(11));
        assert_eq!(progress.committable, None, "10 is not acknowledged yet");
        assert!(progress.acknowledge(10));
        assert_eq!(progress.committable, Some(13));
        assert!(progress.acknowledge(14));
        assert_eq!(progress.committable, Some(13), "13 is still in flight");
        assert!(progress.acknowledge(13));
        assert_eq!(progress.committable, Some(15));
        assert!(progress.pending.is_empty());
    }

    #[test]
    fn gaps_in_offsets_do_not_block_progress() {
        // Offsets need not be contiguous (compaction, transaction markers):
        // only tracked offsets count.
        let mut progress = PartitionProgress::default();
        for offset in [3, 7, 8] {
            progress.track(offset).unwrap();
        }
        assert!(progress.acknowledge(8));
        assert!(progress.acknowledge(3));
        assert_eq!(progress.committable, Some(4));
        assert!(progress.acknowledge(7));
        assert_eq!(progress.committable, Some(9));
    }

    #[test]
    fn unknown_offsets_are_ignored() {
        let mut progress = PartitionProgress::default();
        progress.track(5).unwrap();
        progress.track(6).unwrap();
        assert!(!progress.acknowledge(4));
        assert!(progress.acknowledge(5));
        assert_eq!(progress.committable, Some(6));
    }

    #[test]
    fn a_step_back_without_a_revocation_is_refused() {
        // Kafka hands out a partition's offsets in order within one
        // assignment; a step back means what was committable is not proven.
        let mut progress = PartitionProgress::default();
        for offset in 10..15 {
            progress.track(offset).unwrap();
        }
        assert_eq!(progress.track(12), Err(14), "behind the last tracked");
        assert_eq!(progress.track(14), Err(14), "the same offset again");
        for offset in 10..15 {
            assert!(progress.acknowledge(offset));
        }
        assert_eq!(progress.committable, Some(15));
        assert_eq!(progress.track(13), Err(14), "behind what is committable");
        assert_eq!(progress.track(15), Ok(()));
    }
}
