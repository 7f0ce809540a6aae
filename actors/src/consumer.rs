//! The consumer: reads the source topic and hands batches to the parser.
//!
//! Upstream: Kafka (rdkafka `BaseConsumer`, auto-commit off). Downstream: the
//! parser, through a bounded mailbox, and the committer, which it tells what
//! it handed out (`Track`) before it hands it out.
//!
//! On every partition assignment the [`CheckpointingContext`] loads the
//! persisted checkpoint and resumes each partition at its checkpointed offset,
//! so a restart (of this actor or of the process) resumes exactly where the
//! committer left off. A partition without a checkpoint starts at the
//! beginning (Kafka's committed offsets are never trusted over the
//! checkpoint); a checkpoint that cannot be read fails the actor rather than
//! guess.
//!
//! Broker workaround: Tansu 0.6 answers a fetch from an offset inside a record
//! batch with the batches that start after it, silently skipping the rest of
//! that batch. So the partition is assigned `fetch_rewind` offsets before the
//! checkpoint (far enough back to reach the start of the batch that holds it)
//! and records below the checkpoint are dropped here, before anyone sees them.
//! On Kafka or Redpanda the rewind only costs a few re-read records; set it to
//! 0 there. When the parser's mailbox is full, `send` waits and the
//! consumer stops polling: librdkafka's prefetch queue fills and fetching
//! stops, so a burst becomes lag, not memory.
//!
//! If it fails (the broker gone for good), its supervisor decides; records it
//! read but did not commit are read again after a restart. It also fails on
//! purpose when the group holds a dead member ([`OrphanWatch`]): the
//! restart's fresh join gets the broker to evict it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use crate::committer::{CommitterMsg, REVOKE_DRAIN_DEADLINE};
use crate::config::PipelineConfig;
use crate::dlq_writer::DlqWriterMsg;
use crate::error::PipelineError;
use crate::mailbox::BoundedSender;
use crate::metrics as names;
use crate::models::{RawRecord, SourcePosition};
use crate::parser::ParserMsg;
use crate::storage::CheckpointStore;

/// How long one poll waits for the first record, so the actor stays responsive.
const POLL_WAIT: Duration = Duration::from_millis(100);

/// A partition-assignment change, passed from the rebalance callback to the actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceNotice {
    /// These partitions were assigned, at these offsets (None: no checkpoint yet).
    Assigned(Vec<(i32, Option<i64>)>),
    /// These partitions were taken away.
    Revoked(Vec<i32>),
    /// The checkpoint could not be read, so nothing was assigned.
    CheckpointUnavailable(String),
}

/// The consumer's librdkafka context: assigns partitions at their checkpoint.
pub struct CheckpointingContext {
    /// Consumer group: the checkpoint's key.
    group_id: String,
    /// Source topic.
    topic: String,
    /// Where checkpoints are read from.
    store: Arc<CheckpointStore>,
    /// The runtime that drives the checkpoint store's connection.
    runtime: tokio::runtime::Handle,
    /// Assignment changes not yet seen by the consumer actor.
    notices: Mutex<Vec<RebalanceNotice>>,
    /// How far before the checkpoint to fetch from (see the module doc).
    fetch_rewind: i64,
    /// Per assigned partition, the checkpoint: records below it are dropped.
    floors: Mutex<HashMap<i32, i64>>,
    /// The committer, asked to settle revoked partitions before they go.
    committer: Mutex<Option<ActorRef<CommitterMsg>>>,
    /// Held while polling and while rewinding, so that a poll of a killed
    /// consumer actor (still running on its blocking thread) cannot take
    /// records after the next generation's rewind.
    poll_lock: Mutex<()>,
    /// Set when this client must not be reused: the next generation joins
    /// the group with a fresh one.
    rejoin: AtomicBool,
    /// Partitions just rewound: until a record at or below the limit arrives
    /// (the first record of the re-read), records above it were fetched
    /// before the seek and are dropped. With the time of the rewind.
    rewound: Mutex<HashMap<i32, (i64, std::time::Instant)>>,
    /// Per partition, one past the highest offset this client has fetched:
    /// the orphan watch's view of its own partitions' ends, with no broker
    /// query (ListOffsets costs Tansu a scan of the partition's batches).
    fetched_high: Mutex<HashMap<i32, i64>>,
}

impl CheckpointingContext {
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
        std::mem::take(
            &mut *self
                .notices
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()),
        )
    }

    /// Whether a record of a just-rewound partition was fetched before the
    /// rewind (it lies past where the re-read starts, and the re-read has not
    /// begun): such a record is dropped, as the re-read delivers it again in
    /// order. Fails when the re-read has not begun within
    /// [`REWIND_DEADLINE`] (the seek did not take).
    pub fn fetched_before_rewind(&self, partition: i32, offset: i64) -> Result<bool, String> {
        let mut rewound = self
            .rewound
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let Some((limit, since)) = rewound.get(&partition).copied() else {
            return Ok(false);
        };
        if offset <= limit {
            rewound.remove(&partition);
            return Ok(false);
        }
        if since.elapsed() > REWIND_DEADLINE {
            self.request_rejoin();
            return Err(format!(
                "partition {partition}: still reading past the checkpoint ({offset} > {limit}) {REWIND_DEADLINE:?} after the rewind"
            ));
        }
        Ok(true)
    }

    /// Whether a record at this position is below its partition's checkpoint
    /// (fetched only because of the rewind) and must be dropped.
    pub fn below_checkpoint(&self, partition: i32, offset: i64) -> bool {
        self.floors
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .get(&partition)
            .is_some_and(|floor| offset < *floor)
    }

    /// Notes how far one poll's batch reached per partition (one past the
    /// highest offset fetched): one lock per batch, not per record.
    fn note_fetched(&self, batch_high: &HashMap<i32, i64>) {
        let mut high = self
            .fetched_high
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        for (partition, end) in batch_high {
            let known = high.entry(*partition).or_insert(0);
            *known = (*known).max(*end);
        }
    }

    /// One past the highest offset of this partition fetched so far (0: none).
    pub fn fetched_high(&self, partition: i32) -> i64 {
        self.fetched_high
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .get(&partition)
            .copied()
            .unwrap_or(0)
    }

    /// From now on, revokes wait for the committer to settle the partitions.
    pub fn attach_committer(&self, committer: ActorRef<CommitterMsg>) {
        *self
            .committer
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(committer);
    }

    /// Revokes no longer wait (the pipeline is being torn down).
    pub fn detach_committer(&self) {
        self.committer
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
    }

    /// Asks the committer to settle revoked partitions and waits for it, from
    /// a thread of its own (the callback runs inside librdkafka's poll).
    fn settle_revoked(&self, partitions: &[i32]) {
        let Some(committer) = self
            .committer
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
        else {
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
        self.notices
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .push(notice);
    }

    /// Reads the checkpoint from a thread of its own: the rebalance callback
    /// runs inside librdkafka's poll, which may itself be on a runtime thread.
    pub fn load_checkpoint(&self) -> Result<HashMap<i32, i64>, PipelineError> {
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

impl ClientContext for CheckpointingContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): publishes the
    /// consumer lag per partition, end offset minus committed offset.
    fn stats(&self, statistics: rdkafka::Statistics) {
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
                let checkpoint = match self.load_checkpoint() {
                    Ok(checkpoint) => checkpoint,
                    Err(load_error) => {
                        error!(%load_error, "cannot load checkpoint; assigning nothing");
                        // librdkafka now waits for an assign that never
                        // comes: only a fresh client gets out of that.
                        self.request_rejoin();
                        self.push_notice(RebalanceNotice::CheckpointUnavailable(
                            load_error.to_string(),
                        ));
                        return;
                    }
                };
                let mut assigned = Vec::new();
                for element in tpl.elements() {
                    let partition = element.partition();
                    assigned.push((partition, checkpoint.get(&partition).copied()));
                }
                let mut floors = self
                    .floors
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner());
                for (partition, next) in &assigned {
                    let (start, floor) = match next {
                        Some(next_offset) => (
                            Offset::Offset((next_offset - self.fetch_rewind).max(0)),
                            *next_offset,
                        ),
                        None => (Offset::Beginning, 0),
                    };
                    floors.insert(*partition, floor);
                    if let Err(set_error) = tpl.set_partition_offset(&self.topic, *partition, start)
                    {
                        error!(%set_error, partition, "cannot set start offset");
                    }
                }
                drop(floors);
                // A fresh assignment starts a fresh fetch: no rewind gate.
                self.rewound
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .clear();
                info!(?assigned, "partitions assigned at checkpoint");
                if let Err(assign_error) = base_consumer.assign(tpl) {
                    error!(%assign_error, "assign failed");
                }
                self.push_notice(RebalanceNotice::Assigned(assigned));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked: Vec<i32> = tpl
                    .elements()
                    .iter()
                    .map(|element| element.partition())
                    .collect();
                info!(?revoked, "partitions revoked; settling work in flight");
                self.settle_revoked(&revoked);
                self.push_notice(RebalanceNotice::Revoked(revoked));
                if let Err(unassign_error) = base_consumer.unassign() {
                    error!(%unassign_error, "unassign failed");
                }
            }
            other => {
                error!(?other, "rebalance error");
                let _ = base_consumer.unassign();
            }
        }
    }
}

/// Builds the consumer (not yet subscribed). Auto-commit and auto offset
/// store are off: only the committer commits.
pub fn create_consumer(
    config: &PipelineConfig,
    store: Arc<CheckpointStore>,
) -> Result<Arc<BaseConsumer<CheckpointingContext>>, PipelineError> {
    let context = CheckpointingContext {
        group_id: config.group_id.clone(),
        topic: config.topic.clone(),
        store,
        runtime: tokio::runtime::Handle::current(),
        notices: Mutex::new(Vec::new()),
        fetch_rewind: config.fetch_rewind,
        floors: Mutex::new(HashMap::new()),
        committer: Mutex::new(None),
        poll_lock: Mutex::new(()),
        rejoin: AtomicBool::new(false),
        rewound: Mutex::new(HashMap::new()),
        fetched_high: Mutex::new(HashMap::new()),
    };
    let mut client_config = ClientConfig::new();
    // librdkafka's own debug contexts (for example `cgrp` for the group
    // protocol), logged through `tracing` at `rdkafka=debug`.
    if let Ok(contexts) = std::env::var("STREAM_KAFKA_DEBUG") {
        client_config
            .set("debug", contexts)
            .set_log_level(rdkafka::config::RDKafkaLogLevel::Debug);
    }
    let consumer: BaseConsumer<CheckpointingContext> = client_config
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
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
        .set("queued.max.messages.kbytes", "16384")
        .set("statistics.interval.ms", "1000")
        .create_with_context(context)
        .map_err(PipelineError::kafka("create consumer"))?;
    Ok(Arc::new(consumer))
}

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
    /// The committer, told what is handed out.
    pub committer: ActorRef<CommitterMsg>,
    /// The DLQ writer, told each assignment's checkpoints before any record.
    pub dlq_writer: ActorRef<DlqWriterMsg>,
    /// Injected faults.
    pub faults: Arc<crate::faults::Faults>,
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
    /// Watches for partitions held by a dead member.
    orphans: Arc<Mutex<OrphanWatch>>,
    /// The watch's look in progress, on its own blocking thread so that its
    /// broker queries never hold up the poll.
    orphan_check: Option<tokio::task::JoinHandle<Option<String>>>,
}

/// How long a partition may stand still with lag, unassigned to this member,
/// while this member's own partitions move, before it rejoins the group.
const STUCK_AFTER: Duration = Duration::from_secs(15);
/// How often the consumer looks for such orphaned partitions.
const ORPHAN_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Watches for partitions nobody alive consumes.
///
/// Seen on Tansu 0.6: when a member is killed while another joins, the group
/// can settle with the dead member still holding partitions, and it is never
/// evicted. Those partitions then have lag and a checkpoint that never moves.
/// When this member sees that for [`STUCK_AFTER`], while its own partitions
/// are caught up or moving (so it is not a store outage that stalls
/// everybody), it fails; the supervisor's restart is a fresh join, which
/// makes the broker evict the dead member. On a broker that evicts dead
/// members itself this never triggers.
#[derive(Debug, Default)]
pub struct OrphanWatch {
    /// Per partition: the checkpoint last seen and since when it stands still.
    still: HashMap<i32, (i64, std::time::Instant)>,
    last_check: Option<std::time::Instant>,
}

impl OrphanWatch {
    /// Whether [`ORPHAN_CHECK_EVERY`] has passed since the last look.
    pub fn due(&self) -> bool {
        self.last_check
            .is_none_or(|last| last.elapsed() >= ORPHAN_CHECK_EVERY)
    }

    /// Looks (at most every [`ORPHAN_CHECK_EVERY`]); returns why the group
    /// looks stuck, if it does. Blocking: call from a blocking thread.
    pub fn check(
        &mut self,
        consumer: &BaseConsumer<CheckpointingContext>,
        topic: &str,
    ) -> Option<String> {
        let now = std::time::Instant::now();
        if self
            .last_check
            .is_some_and(|last| now.duration_since(last) < ORPHAN_CHECK_EVERY)
        {
            return None;
        }
        self.last_check = Some(now);
        let mine: std::collections::HashSet<i32> = consumer
            .assignment()
            .ok()?
            .elements()
            .iter()
            .map(|element| element.partition())
            .collect();
        let checkpoint = consumer.context().load_checkpoint().ok()?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .find(|found| found.name() == topic)?
            .partitions()
            .iter()
            .map(|partition| partition.id())
            .collect();
        let mut mine_stalled = false;
        let mut orphans = Vec::new();
        for partition in partitions {
            // Its own partitions' ends as fetched; the broker is asked only
            // about the others.
            let high = if mine.contains(&partition) {
                consumer.context().fetched_high(partition)
            } else {
                consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(5))
                    .ok()?
                    .1
            };
            let next = checkpoint.get(&partition).copied().unwrap_or(0);
            let entry = self.still.entry(partition).or_insert((next, now));
            if entry.0 != next || high <= next {
                // Moved, or nothing to do: not standing still.
                *entry = (next, now);
                continue;
            }
            if now.duration_since(entry.1) < STUCK_AFTER {
                continue;
            }
            if mine.contains(&partition) {
                mine_stalled = true;
            } else {
                orphans.push(partition);
            }
        }
        if orphans.is_empty() || mine_stalled {
            return None;
        }
        self.still.clear();
        Some(format!(
            "partitions {orphans:?} have lag and no progress for {STUCK_AFTER:?} and are not assigned here, while this member's own partitions move: the group holds a dead member; rejoining"
        ))
    }
}

/// The consumer actor.
pub struct ConsumerActor;

impl ConsumerActor {
    /// Collects the orphan watch's finished look, if any, and starts the
    /// next one when it is due.
    async fn orphan_verdict(
        &self,
        state: &mut ConsumerState,
    ) -> Result<Option<String>, ActorProcessingErr> {
        if let Some(check) = state.orphan_check.take_if(|check| check.is_finished()) {
            if let Some(reason) = check.await? {
                return Ok(Some(reason));
            }
        }
        let due = state.orphan_check.is_none()
            && state
                .orphans
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .due();
        if due {
            let (consumer, topic, orphans) = (
                state.args.consumer.clone(),
                state.args.topic.clone(),
                state.orphans.clone(),
            );
            state.orphan_check = Some(tokio::task::spawn_blocking(move || {
                orphans
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .check(&consumer, &topic)
            }));
        }
        Ok(None)
    }
}

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
            let (consumer, topic) = (args.consumer.clone(), args.topic.clone());
            let assigned =
                tokio::task::spawn_blocking(move || rewind_to_checkpoint(&consumer, &topic))
                    .await??;
            info!(?assigned, "rewound to the checkpoint");
            args.dlq_writer.cast(DlqWriterMsg::Assigned(assigned))?;
        } else {
            args.consumer
                .subscribe(&[&args.topic])
                .map_err(PipelineError::kafka(format!("subscribe to {}", args.topic)))?;
        }
        Ok(ConsumerState {
            args,
            orphans: Arc::new(Mutex::new(OrphanWatch::default())),
            orphan_check: None,
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
        state.args.faults.panic_if_armed("consumer");
        match message {
            ConsumerMsg::Poll => {
                let consumer = state.args.consumer.clone();
                let batch_size = state.args.batch_size;
                let records =
                    tokio::task::spawn_blocking(move || poll_batch(&consumer, batch_size))
                        .await??;
                if let Some(reason) = self.orphan_verdict(state).await? {
                    state.args.consumer.context().request_rejoin();
                    return Err(reason.into());
                }
                for notice in state.args.consumer.context().take_notices() {
                    match notice {
                        // Before any record of these partitions goes out.
                        RebalanceNotice::Assigned(assigned) => state
                            .args
                            .dlq_writer
                            .cast(DlqWriterMsg::Assigned(assigned))?,
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
                if !records.is_empty() {
                    metrics::counter!(names::EVENTS_CONSUMED).increment(records.len() as u64);
                    let positions = records.iter().map(|record| record.position).collect();
                    state.args.committer.cast(CommitterMsg::Track(positions))?;
                    state
                        .args
                        .parser
                        .send(|permit| ParserMsg::Parse { records, permit })
                        .await?;
                }
                myself.cast(ConsumerMsg::Poll)?;
            }
        }
        Ok(())
    }
}

/// The `dlq.replay.count` header of a record replayed from the dead-letter topic.
fn replay_count(message: &rdkafka::message::BorrowedMessage<'_>) -> u32 {
    use rdkafka::message::Headers;
    let Some(headers) = message.headers() else {
        return 0;
    };
    headers
        .iter()
        .find(|header| header.key == crate::dlq_writer::REPLAY_COUNT_HEADER)
        .and_then(|header| header.value)
        .and_then(|value| std::str::from_utf8(value).ok())
        .and_then(|text| text.parse().ok())
        .unwrap_or(0)
}

/// Reads up to `batch_size` records: waits up to [`POLL_WAIT`] for the first,
/// then takes what is already fetched without waiting.
fn poll_batch(
    consumer: &BaseConsumer<CheckpointingContext>,
    batch_size: usize,
) -> Result<Vec<RawRecord>, PipelineError> {
    let _polling = consumer
        .context()
        .poll_lock
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let mut records = Vec::new();
    let mut batch_high = HashMap::new();
    let mut wait = POLL_WAIT;
    while records.len() < batch_size {
        match consumer.poll(wait) {
            None => break,
            Some(Ok(message)) => {
                let context = consumer.context();
                let end = batch_high.entry(message.partition()).or_insert(0);
                *end = (*end).max(message.offset() + 1);
                if context
                    .fetched_before_rewind(message.partition(), message.offset())
                    .map_err(PipelineError::Rewind)?
                    || context.below_checkpoint(message.partition(), message.offset())
                {
                    continue;
                }
                records.push(RawRecord {
                    position: SourcePosition {
                        partition: message.partition(),
                        offset: message.offset(),
                    },
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().map(<[u8]>::to_vec),
                    replay_count: replay_count(&message),
                    kafka_timestamp_ms: message.timestamp().to_millis(),
                });
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(poll_error)) => {
                // Broker and transport errors are retried by librdkafka; report and carry on.
                warn!(%poll_error, "consumer poll error");
                break;
            }
        }
        wait = Duration::ZERO;
    }
    consumer.context().note_fetched(&batch_high);
    Ok(records)
}

/// How often a rewind retries a seek that librdkafka refuses (a partition
/// whose fetcher is still starting), and how long it waits between tries.
const SEEK_ATTEMPTS: u32 = 20;
const SEEK_RETRY_WAIT: Duration = Duration::from_millis(100);

/// Puts every partition this client holds back at its checkpoint: the
/// in-process restart's equivalent of a fresh assignment. Waits for any poll
/// still running (a killed actor's), drops assignment notices the old
/// generation did not see, sets each partition's floor to its checkpoint and
/// seeks it `fetch_rewind` before (records fetched before the seek are
/// discarded by librdkafka). Returns the assignment with its checkpoints, for
/// the DLQ writer. Blocking: call from a blocking thread.
///
/// Reusing the client keeps the group stable across actor restarts: a new
/// client per restart means a leave and a join each time, and Tansu 0.6 can
/// settle such churn with a departed member as the group's leader, after
/// which no member is ever assigned anything.
pub fn rewind_to_checkpoint(
    consumer: &BaseConsumer<CheckpointingContext>,
    topic: &str,
) -> Result<Vec<(i32, Option<i64>)>, PipelineError> {
    let context = consumer.context();
    let started = std::time::Instant::now();
    let _polling = context
        .poll_lock
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let locked_ms = started.elapsed().as_millis() as u64;
    for notice in context.take_notices() {
        if let RebalanceNotice::CheckpointUnavailable(reason) = notice {
            context.request_rejoin();
            return Err(PipelineError::Rewind(format!(
                "the checkpoint was unreadable at the last assignment: {reason}"
            )));
        }
    }
    let assignment = consumer
        .assignment()
        .map_err(PipelineError::kafka("read the assignment"))?;
    let partitions: Vec<i32> = assignment
        .elements()
        .iter()
        .filter(|element| element.topic() == topic)
        .map(|element| element.partition())
        .collect();
    if partitions.is_empty() {
        return Ok(Vec::new());
    }
    let checkpoint = context.load_checkpoint()?;
    let mut assigned = Vec::new();
    let mut seeks = TopicPartitionList::new();
    // The re-read's first record is at or below the checkpoint: the fetch
    // starts `fetch_rewind` before it. No broker query here (ListOffsets
    // costs Tansu a scan of the partition's batches, ~0.4 s each): when
    // retention has removed everything up to past the checkpoint, the
    // re-read starts above it, the gate holds until REWIND_DEADLINE and the
    // next generation takes a fresh client, which starts where the log does.
    let limits: HashMap<i32, i64> = partitions
        .iter()
        .map(|partition| (*partition, checkpoint.get(partition).copied().unwrap_or(0)))
        .collect();
    let checkpoint_ms = started.elapsed().as_millis() as u64;
    {
        let mut floors = context
            .floors
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        for partition in partitions {
            let next = checkpoint.get(&partition).copied();
            let (start, floor) = match next {
                Some(next_offset) => (
                    Offset::Offset((next_offset - context.fetch_rewind).max(0)),
                    next_offset,
                ),
                None => (Offset::Beginning, 0),
            };
            floors.insert(partition, floor);
            seeks
                .add_partition_offset(topic, partition, start)
                .map_err(PipelineError::kafka("build the seek list"))?;
            assigned.push((partition, next));
        }
    }
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
            debug!(
                locked_ms,
                checkpoint_ms,
                seeks = attempt,
                total_ms = started.elapsed().as_millis() as u64,
                "rewind timings"
            );
            let now = std::time::Instant::now();
            *context
                .rewound
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()) = limits
                .into_iter()
                .map(|(partition, limit)| (partition, (limit, now)))
                .collect();
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

/// How long after a rewind the re-read of a partition must have begun.
pub const REWIND_DEADLINE: Duration = Duration::from_secs(30);

/// How long one seek waits for librdkafka.
const SEEK_WAIT: Duration = Duration::from_secs(5);

/// Checks, before anything starts, that the broker answers and the topics
/// exist (the broker may not auto-create them), so that a wrong address or
/// a missing topic is a clear error at start rather than a silent wait.
pub fn check_topics(brokers: &str, topics: &[&str]) -> Result<(), PipelineError> {
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(PipelineError::kafka("create metadata client"))?;
    for topic in topics {
        let metadata = probe
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(PipelineError::kafka(format!(
                "cannot reach broker {brokers}"
            )))?;
        let present = metadata.topics().iter().any(|found| {
            found.name() == *topic && found.error().is_none() && !found.partitions().is_empty()
        });
        if !present {
            return Err(PipelineError::Config {
                setting: "--topic/--dlq-topic",
                reason: format!("topic {topic} does not exist on {brokers}; create it first"),
            });
        }
    }
    Ok(())
}
