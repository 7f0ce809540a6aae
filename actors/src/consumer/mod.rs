//! The consumer: reads the source topic and hands batches to the parser.
//!
//! Upstream: Kafka (an rdkafka `BaseConsumer` in a consumer group,
//! auto-commit off). Downstream: the parser, through a bounded mailbox; the
//! committer, told what is handed out (`Track`) before it is handed out; the
//! DLQ writer, told each assignment's checkpoints (`Assigned`) before any
//! record of those partitions.
//!
//! - [`rebalance`]: the librdkafka context. Every assignment starts each
//!   partition at its persisted checkpoint; every revocation is settled with
//!   the committer first.
//! - [`membership`]: the member's place in the group (statistics), which
//!   readiness reports.
//! - [`client`]: the client's settings (cooperative-sticky assignor, static
//!   membership), its creation, and the rewind an actor restart does instead
//!   of a rejoin.
//! - this module: the actor's poll loop.
//!
//! Backpressure, in messages and in bytes: a batch goes to the parser only
//! with a slot in its mailbox and its bytes taken from the in-flight budget
//! ([`crate::budget`]). A batch stops growing at `--batch-size` records or a
//! quarter of the budget. While there is no room the consumer pauses its
//! partitions (`pause()`) and keeps polling, every [`POLL_WAIT`] at most, so
//! the member keeps its place in the group through an outage of any length
//! (`max.poll.interval.ms` counts from the last poll); when room comes it
//! resumes them and librdkafka fetches from the record after the last one
//! it returned. A burst becomes lag, not memory.
//!
//! If it fails (the broker gone for good, a checkpoint it cannot read), its
//! supervisor restarts the pipeline; records it read but did not commit are
//! read again from the checkpoint.

pub mod client;
pub mod membership;
pub mod rebalance;

pub use client::{create_consumer, rewind_to_checkpoint};
pub use membership::Membership;
pub use rebalance::{CheckpointingContext, RebalanceNotice};

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use tracing::{info, warn};

use crate::budget::ByteBudget;
use crate::committer::CommitterMsg;
use crate::dlq_writer::DlqWriterMsg;
use crate::error::PipelineError;
use crate::mailbox::BoundedSender;
use crate::metrics as names;
use crate::models::{RawRecord, SourcePosition};
use crate::parser::ParserMsg;
use crate::trace_context::{self, TraceContext};

/// How long one poll waits for the first record, and how long the consumer
/// waits for room in the pipeline between two polls, so the actor stays
/// responsive and the member stays in its group.
const POLL_WAIT: Duration = Duration::from_millis(100);

/// What the consumer starts with.
pub struct ConsumerArgs {
    /// The rdkafka consumer, shared with the committer.
    pub consumer: Arc<BaseConsumer<CheckpointingContext>>,
    /// Source topic.
    pub topic: String,
    /// The most records handed to the parser in one message.
    pub batch_size: usize,
    /// The parser's bounded mailbox.
    pub parser: BoundedSender<ParserMsg>,
    /// The in-flight byte budget of this generation.
    pub budget: Arc<ByteBudget>,
    /// The committer, told what is handed out.
    pub committer: ActorRef<CommitterMsg>,
    /// The DLQ writer, told each assignment's checkpoints before any record.
    pub dlq_writer: ActorRef<DlqWriterMsg>,
    /// Injected faults.
    pub faults: Arc<crate::faults::Faults>,
    /// What this actor tells the watchdog.
    pub progress: Arc<crate::progress::Progress>,
}

/// Messages the consumer handles.
#[derive(Debug)]
pub enum ConsumerMsg {
    /// Read the next batch (the actor sends this to itself after each batch).
    Poll,
}

/// The consumer's state.
pub struct ConsumerState {
    args: ConsumerArgs,
    /// Records read but not handed out yet: no room in the pipeline.
    pending: Batch,
    /// Whether the assigned partitions are paused.
    paused: bool,
}

/// The consumer actor.
pub struct ConsumerActor;

impl Actor for ConsumerActor {
    type Msg = ConsumerMsg;
    type State = ConsumerState;
    type Arguments = ConsumerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let subscribed = args
            .consumer
            .subscription()
            .map_err(PipelineError::kafka("read the subscription"))?
            .count()
            > 0;
        if subscribed {
            // A restart in the same process: the client (and its place in
            // the group) survived; only the actors are new. Rewind what it
            // holds to the checkpoint and tell the new DLQ writer.
            let consumer = args.consumer.clone();
            let assigned =
                tokio::task::spawn_blocking(move || rewind_to_checkpoint(&consumer)).await??;
            info!(?assigned, "rewound to the checkpoint");
            args.dlq_writer.cast(DlqWriterMsg::Assigned(assigned))?;
        } else {
            args.consumer
                .subscribe(&[&args.topic])
                .map_err(PipelineError::kafka(format!("subscribe to {}", args.topic)))?;
        }
        metrics::counter!(names::CONSUMER_PAUSES).increment(0);
        Ok(ConsumerState {
            args,
            pending: Batch::default(),
            paused: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        myself.cast(ConsumerMsg::Poll)?;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _working = state.args.progress.working();
        state.args.faults.at_message_start("consumer").await;
        match message {
            ConsumerMsg::Poll => {
                let consumer = state.args.consumer.clone();
                let limits = BatchLimits {
                    records: state.args.batch_size,
                    bytes: (state.args.budget.limit() / 4).max(1),
                };
                // Holding a batch already: only serve the group, do not wait.
                let wait = if state.pending.records.is_empty() {
                    POLL_WAIT
                } else {
                    Duration::ZERO
                };
                let mut pending = std::mem::take(&mut state.pending);
                // Bounded by the poll's own wait and the rebalance deadlines.
                let poll = tokio::task::spawn_blocking(move || {
                    let polled = poll_batch(&consumer, &mut pending, limits, wait);
                    (pending, polled)
                });
                let (pending, polled) = state.args.progress.protect(poll).await?;
                state.pending = pending;
                polled?;
                let mut newly_assigned = false;
                for notice in state.args.consumer.context().take_notices() {
                    match notice {
                        // Before any record of these partitions goes out.
                        RebalanceNotice::Assigned(assigned) => {
                            newly_assigned = true;
                            state
                                .args
                                .dlq_writer
                                .cast(DlqWriterMsg::Assigned(assigned))?
                        }
                        // Already settled with the committer inside the callback.
                        RebalanceNotice::Revoked(_) => {}
                        RebalanceNotice::CheckpointUnavailable(reason) => {
                            return Err(format!(
                                "partitions assigned but the checkpoint cannot be read: {reason}"
                            )
                            .into());
                        }
                    }
                }
                if newly_assigned {
                    // librdkafka keeps a partition's pause across a
                    // revocation: one revoked while paused comes back
                    // paused, and one assigned while paused comes unpaused.
                    // Make every assigned partition match the intake.
                    let intake = if state.paused {
                        Intake::Paused
                    } else {
                        Intake::Running
                    };
                    set_intake(&state.args.consumer, intake)?;
                }
                if !state.pending.records.is_empty() {
                    state.hand_out().await?;
                } else if state.paused {
                    // The batch that waited left with its partitions (a
                    // rebalance revoked them): nothing waits for room now.
                    set_intake(&state.args.consumer, Intake::Running)?;
                    state.paused = false;
                    info!("nothing waiting for room; intake resumed");
                }
                myself.cast(ConsumerMsg::Poll)?;
            }
        }
        Ok(())
    }
}

impl ConsumerState {
    /// Hands the pending batch to the parser if there is room for it (a
    /// mailbox slot and its bytes) within [`POLL_WAIT`]; otherwise pauses
    /// the partitions and keeps the batch for the next turn.
    async fn hand_out(&mut self) -> Result<(), ActorProcessingErr> {
        let bytes = self.pending.bytes;
        let (budget, parser) = (&self.args.budget, &self.args.parser);
        let room = async {
            let held = budget.acquire(bytes).await;
            let slot = parser.reserve().await?;
            Ok::<_, crate::mailbox::MailboxError>((held, slot))
        };
        // A full pipeline is backpressure, not a hang.
        let waited = self
            .args
            .progress
            .protect(tokio::time::timeout(POLL_WAIT, room))
            .await;
        let Ok(room) = waited else {
            if !self.paused {
                set_intake(&self.args.consumer, Intake::Paused)?;
                self.paused = true;
                metrics::counter!(names::CONSUMER_PAUSES).increment(1);
                info!(
                    records = self.pending.records.len(),
                    bytes,
                    in_flight_bytes = budget.held(),
                    "the pipeline is full; intake paused, still polling"
                );
            }
            return Ok(());
        };
        let (held, slot) = room?;
        if self.paused {
            set_intake(&self.args.consumer, Intake::Running)?;
            self.paused = false;
            info!("room in the pipeline; intake resumed");
        }
        let records = std::mem::take(&mut self.pending).records;
        metrics::counter!(names::EVENTS_CONSUMED).increment(records.len() as u64);
        let positions = records.iter().map(|record| record.position).collect();
        self.args.committer.cast(CommitterMsg::Track(positions))?;
        self.args.parser.cast(ParserMsg::Parse {
            records,
            permit: slot,
            bytes: held,
        })?;
        Ok(())
    }
}

/// Whether the consumer takes records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intake {
    Running,
    Paused,
}

/// Pauses or resumes every assigned partition. The client's own flag tells
/// the next generation's rewind to resume them.
fn set_intake(
    consumer: &BaseConsumer<CheckpointingContext>,
    intake: Intake,
) -> Result<(), PipelineError> {
    let assignment = consumer
        .assignment()
        .map_err(PipelineError::kafka("read the assignment"))?;
    let context = consumer.context();
    match intake {
        Intake::Paused => {
            context.intake_paused.store(true, Ordering::Release);
            consumer
                .pause(&assignment)
                .map_err(PipelineError::kafka("pause the assigned partitions"))
        }
        Intake::Running => {
            context.intake_paused.store(false, Ordering::Release);
            consumer
                .resume(&assignment)
                .map_err(PipelineError::kafka("resume the assigned partitions"))
        }
    }
}

/// Records read and not handed out yet, with their bytes (as
/// [`RawRecord::budget_bytes`] counts them), counted as they come.
#[derive(Debug, Default)]
struct Batch {
    records: Vec<RawRecord>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, record: RawRecord) {
        self.bytes += record.budget_bytes();
        self.records.push(record);
    }

    /// See [`drop_revoked`].
    fn drop_revoked(&mut self, revoked: &HashSet<i32>) {
        if !revoked.is_empty() {
            drop_revoked(&mut self.records, revoked);
            self.bytes = self.records.iter().map(RawRecord::budget_bytes).sum();
        }
    }
}

/// Where a batch stops growing.
#[derive(Debug, Clone, Copy)]
struct BatchLimits {
    /// Records.
    records: usize,
    /// Bytes (as [`RawRecord::budget_bytes`] counts them).
    bytes: usize,
}

/// A record as read, headers looked at: its `dlq.replay.count` (a record
/// replayed from the dead-letter topic) and its `traceparent` (or a trace
/// started for it, and why).
fn read_record(
    message: &rdkafka::message::BorrowedMessage<'_>,
) -> (RawRecord, Option<trace_context::Started>) {
    use rdkafka::message::Headers;
    let mut replay_count = 0;
    let mut traceparent = None;
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            if header.key == crate::dlq_writer::REPLAY_COUNT_HEADER {
                replay_count = header
                    .value
                    .and_then(|value| std::str::from_utf8(value).ok())
                    .and_then(|text| text.parse().ok())
                    .unwrap_or(0);
            } else if header
                .key
                .eq_ignore_ascii_case(trace_context::TRACEPARENT_HEADER)
            {
                traceparent = header.value;
            }
        }
    }
    let position = SourcePosition {
        partition: message.partition(),
        offset: message.offset(),
    };
    let kafka_timestamp_ms = message.timestamp().to_millis();
    let (trace, started) = TraceContext::of_record(
        traceparent,
        message.topic(),
        position.partition,
        position.offset,
        kafka_timestamp_ms,
    );
    let record = RawRecord {
        position,
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        replay_count,
        kafka_timestamp_ms,
        trace,
    };
    (record, started)
}

/// Drops the records of partitions revoked while the batch was collected:
/// the committer settled those partitions without them, and their next owner
/// reads them again from the checkpoint.
fn drop_revoked(records: &mut Vec<RawRecord>, revoked: &HashSet<i32>) {
    if !revoked.is_empty() {
        records.retain(|record| !revoked.contains(&record.position.partition));
    }
}

/// Adds records to `batch` until it holds `limits` (records or bytes):
/// polls at least once (so the group is served even when the batch is
/// full: records of paused partitions do not come), waits up to `wait` for
/// the first record, then takes what is already fetched without waiting.
/// Rebalance callbacks run inside these polls; records of partitions they
/// revoked are dropped. Fails when the client hit a fatal error, which
/// leaves it unusable: with static membership Kafka fences a member whose
/// session expired while another incarnation with its `group.instance.id`
/// joined (seen after a broker restart); the next generation takes a fresh
/// client, which joins under the same id.
fn poll_batch(
    consumer: &BaseConsumer<CheckpointingContext>,
    batch: &mut Batch,
    limits: BatchLimits,
    mut wait: Duration,
) -> Result<(), PipelineError> {
    let context = consumer.context();
    let _polling = context.poll_lock.lock();
    // Records that came without a valid `traceparent`, by reason.
    let mut traces_started = [0u64; trace_context::Started::ALL.len()];
    loop {
        let polled = consumer.poll(wait);
        batch.drop_revoked(&context.take_revoked());
        match polled {
            None => break,
            Some(Ok(message)) => {
                let (record, started) = read_record(&message);
                if let Some(reason) = started {
                    traces_started[reason as usize] += 1;
                }
                batch.push(record);
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(poll_error)) => {
                // Broker and transport errors are retried by librdkafka;
                // report and carry on, unless the client is done for.
                warn!(%poll_error, "consumer poll error");
                break;
            }
        }
        wait = Duration::ZERO;
        if batch.records.len() >= limits.records || batch.bytes >= limits.bytes {
            break;
        }
    }
    for (count, reason) in traces_started.into_iter().zip(trace_context::Started::ALL) {
        if count > 0 {
            metrics::counter!(names::TRACES_STARTED, "reason" => reason.label()).increment(count);
        }
    }
    if let Some((code, reason)) = consumer.client().fatal_error() {
        context.request_rejoin();
        return Err(PipelineError::KafkaFatal(format!("{code:?}: {reason}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(partition: i32, offset: i64) -> RawRecord {
        RawRecord {
            position: SourcePosition { partition, offset },
            key: None,
            payload: None,
            replay_count: 0,
            kafka_timestamp_ms: None,
            trace: TraceContext::started_for("events", partition, offset, None),
        }
    }

    #[test]
    fn records_of_a_partition_revoked_mid_batch_are_dropped() {
        let mut records = vec![record(0, 1), record(1, 1), record(0, 2), record(2, 9)];
        drop_revoked(&mut records, &HashSet::new());
        assert_eq!(records.len(), 4);
        drop_revoked(&mut records, &HashSet::from([0]));
        let kept: Vec<(i32, i64)> = records
            .iter()
            .map(|record| (record.position.partition, record.position.offset))
            .collect();
        assert_eq!(kept, vec![(1, 1), (2, 9)]);
    }
}
