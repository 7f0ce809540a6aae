//! The DLQ writer: produces poison records to the dead-letter topic.
//!
//! Upstream: the parser, through a bounded mailbox. Downstream: the
//! dead-letter topic, then the committer (`Ack`) once the broker has
//! confirmed delivery of every record in the batch.
//!
//! A dead letter carries the original key and bytes unchanged and headers
//! naming the error type, message, source topic/partition/offset, stage and
//! time ([`DLQ_HEADERS`]). A failed delivery is retried with backoff and never
//! acknowledged, so the committed offset cannot pass a poison message that is
//! not safely in the dead-letter topic.
//!
//! No duplicates after a crash: whatever was dead-lettered past the checkpoint
//! before a crash is replayed after it. So each dead letter is written to the
//! DLQ index in PostgreSQL ([`DlqIndex`]) before it is produced (the intent,
//! with the dead-letter topic's end offsets of that moment) and confirmed
//! after the broker's acknowledgement. Whenever partitions are assigned (at
//! every start, and in every rebalance) the consumer tells this actor the
//! checkpoint of each (`Assigned`), before it hands out any of their records;
//! the writer looks up the positions at or past the checkpoint in the index
//! and skips them. Confirmations ride on the next batch's intent statement
//! (one round trip per batch); one not written yet is an unconfirmed intent.
//! An intent without confirmation (a crash between the produce and the
//! confirmation) is resolved by reading the dead-letter topic
//! from the end offsets that intent recorded, never from the beginning: found
//! there, it is confirmed; not found, it is forgotten and produced again. So
//! a restart costs the same whatever the size of the dead-letter topic.
//! What it delivers after a look-up it remembers (old records of a partition
//! that Kafka took away and gave back arrive after the new look-up). The
//! index is pruned below the checkpoint.
//!
//! Bounded dead letters: the error message is cut to 1 KB where it is made
//! ([`crate::parse::cut_message`]). A producer error is either retriable
//! (broker away, timeout: retried with backoff, for as long as it takes) or
//! permanent for that record ([`is_permanent`]: too large, invalid). A record
//! the dead-letter topic refuses whole is sent as an envelope instead
//! ([`Form`]): the headers, a prefix of the key and of the value, and the
//! size and SHA-256 of each original; if even that is refused, the headers
//! alone. `dlq.envelope` says which, and `streamctl dlq replay` skips
//! envelopes (their bytes are not the original ones).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{ExponentialBuilder, Retryable};
use futures::future::join_all;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::budget::HeldBytes;
use crate::committer::CommitterMsg;
use crate::error::PipelineError;
use crate::faults::{CrashPoint, Faults};
use crate::kafka::Brokers;
use crate::mailbox::MailboxPermit;
use crate::metrics as names;
use crate::models::{AckSource, PoisonRecord, SourcePosition};
use crate::storage::DlqIndex;
use crate::trace_context::TRACEPARENT_HEADER;

/// Header names, in the order they are written. Then comes the record's
/// W3C `traceparent` ([`TRACEPARENT_HEADER`]), then the envelope's headers.
pub const DLQ_HEADERS: [&str; 8] = [
    "dlq.error.type",
    "dlq.error.message",
    "dlq.source.topic",
    "dlq.source.partition",
    "dlq.source.offset",
    "dlq.stage",
    "dlq.failed_at",
    REPLAY_COUNT_HEADER,
];

/// Set on a dead letter that does not carry the original bytes whole: its
/// value is `payload_prefix` or `headers_only` (see [`Form`]).
pub const ENVELOPE_HEADER: &str = "dlq.envelope";
/// An envelope keeps at most this much of the original value.
pub const ENVELOPE_PAYLOAD_BYTES: usize = 16 * 1024;
/// An envelope keeps at most this much of the original key.
pub const ENVELOPE_KEY_BYTES: usize = 1024;

/// How a dead letter carries the original record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Key and value unchanged.
    Whole,
    /// At most [`ENVELOPE_KEY_BYTES`] of the key and [`ENVELOPE_PAYLOAD_BYTES`]
    /// of the value, with the size and SHA-256 of each original.
    PayloadPrefix,
    /// No key and no value; the sizes and SHA-256 only.
    HeadersOnly,
}

impl Form {
    /// The next smaller form after the topic refused this one permanently.
    fn smaller(self) -> Option<Form> {
        match self {
            Form::Whole => Some(Form::PayloadPrefix),
            Form::PayloadPrefix => Some(Form::HeadersOnly),
            Form::HeadersOnly => None,
        }
    }

    fn label(self) -> Option<&'static str> {
        match self {
            Form::Whole => None,
            Form::PayloadPrefix => Some("payload_prefix"),
            Form::HeadersOnly => Some("headers_only"),
        }
    }
}

/// What a dead letter carries.
#[derive(Debug)]
pub struct DeadLetterBody<'a> {
    /// The key, or a prefix of it.
    pub key: Option<&'a [u8]>,
    /// The value, or a prefix of it.
    pub payload: Option<&'a [u8]>,
    /// Headers that describe what was left out (none for [`Form::Whole`]).
    pub headers: Vec<(String, String)>,
}

/// What a dead letter carries in `form`.
pub fn dead_letter_body<'a>(
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    form: Form,
) -> DeadLetterBody<'a> {
    let Some(label) = form.label() else {
        return DeadLetterBody {
            key,
            payload,
            headers: Vec::new(),
        };
    };
    let mut headers = vec![(ENVELOPE_HEADER.to_string(), label.to_string())];
    let mut keep = |name: &str, bytes: Option<&'a [u8]>, limit: usize| {
        let bytes = bytes?;
        headers.push((format!("dlq.{name}.size"), bytes.len().to_string()));
        headers.push((
            format!("dlq.{name}.sha256"),
            hex::encode(Sha256::digest(bytes)),
        ));
        (form == Form::PayloadPrefix).then(|| &bytes[..bytes.len().min(limit)])
    };
    let key = keep("key", key, ENVELOPE_KEY_BYTES);
    let payload = keep("payload", payload, ENVELOPE_PAYLOAD_BYTES);
    DeadLetterBody {
        key,
        payload,
        headers,
    }
}

/// Whether a producer error means the topic will never take this record as
/// it is (too large, invalid), as opposed to the broker being away or slow.
pub fn is_permanent(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::BadMessage
        )
    )
}

/// How many times the record was replayed before it failed again: `streamctl
/// dlq replay` sets it on what it re-publishes, the consumer reads it, and the
/// DLQ writer carries it here, so a replay tool can refuse to loop.
pub const REPLAY_COUNT_HEADER: &str = "dlq.replay.count";

/// The first retry waits this long; each next one twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Retries never wait longer than this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Builds the idempotent producer the DLQ writer uses.
pub fn create_dlq_producer(brokers: &Brokers) -> Result<FutureProducer, PipelineError> {
    brokers
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .map_err(PipelineError::kafka("create dlq producer"))
}

/// What the DLQ writer starts with.
pub struct DlqWriterArgs {
    /// The producer.
    pub producer: FutureProducer,
    /// The source topic, for the `dlq.source.topic` header.
    pub source_topic: String,
    /// The dead-letter topic.
    pub dlq_topic: String,
    /// Told what is delivered.
    pub committer: ActorRef<CommitterMsg>,
    /// Brokers, to read the dead-letter topic's end offsets, and back where
    /// an intent has no confirmation.
    pub brokers: Brokers,
    /// The DLQ index; `None` writes every dead letter, even one already in
    /// the topic (only the recovery tests' negative control).
    pub index: Option<Arc<DlqIndex>>,
    /// Injected faults.
    pub faults: Arc<Faults>,
    /// What this actor tells the watchdog.
    pub progress: Arc<crate::progress::Progress>,
    /// Where a span per delivered dead letter goes.
    pub spans: crate::spans::Spans,
}

/// Messages the DLQ writer handles.
#[derive(Debug)]
pub enum DlqWriterMsg {
    /// Poison records from the parser.
    Write {
        /// The records, in read order.
        records: Vec<PoisonRecord>,
        /// This message's slot in the DLQ writer's mailbox.
        permit: MailboxPermit,
        /// The records' bytes against the in-flight budget, held until delivered.
        bytes: HeldBytes,
    },
    /// These partitions were assigned at these checkpoints (next offset to
    /// read; `None`: from the start): look up what is already dead-lettered.
    Assigned(Vec<(i32, Option<i64>)>),
}

/// The DLQ writer's state.
pub struct DlqWriterState {
    args: DlqWriterArgs,
    /// Source positions (partition, offset) at or past the checkpoint that the
    /// dead-letter topic already holds: looked up in the DLQ index when their
    /// partition was assigned, plus what this writer delivered since. Kafka can take a
    /// partition away and give it back to the same member (its session
    /// timed out while the broker was away, or a revoke's deadline dropped
    /// its work in flight): the old records still in the mailboxes reach
    /// this writer after the new assignment's look-up, and the replay from
    /// the checkpoint brings the same positions again.
    already_written: HashSet<(i32, i64)>,
    /// When the index was last pruned below the checkpoint.
    last_prune: Instant,
    /// A lower bound of the dead-letter topic's end offset per partition (by
    /// partition id): read from the broker once, then raised past every
    /// dead letter delivered. Offsets only grow, so a lower bound is a safe
    /// place to start looking for a dead letter produced after it, and it
    /// costs no round trip per batch.
    dlq_ends: Option<Vec<i64>>,
    /// Delivered dead letters not confirmed in the index yet: confirmed with
    /// the next batch's intents, in the same statement (one round trip per
    /// batch instead of two). A restart before that reads them back.
    unconfirmed: Vec<SourcePosition>,
}

/// How often the DLQ index is pruned below the checkpoint while running (it
/// is pruned at every assignment too).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Written positions further than this below the newest one of their
/// partition are forgotten once the set is large: the consumer never goes
/// back further than the checkpoint, which trails the newest record by the
/// records in flight (tens of thousands at most, bounded by the mailboxes).
const FORGET_BELOW: i64 = 1_000_000;
/// The set's size above which old positions are forgotten.
const PRUNE_ABOVE: usize = 100_000;

/// Remembers delivered positions, forgetting far-behind ones when the set is large.
fn remember(written: &mut HashSet<(i32, i64)>, delivered: &[crate::models::SourcePosition]) {
    written.extend(
        delivered
            .iter()
            .map(|position| (position.partition, position.offset)),
    );
    if written.len() > PRUNE_ABOVE {
        let mut newest: HashMap<i32, i64> = HashMap::new();
        for (partition, offset) in written.iter() {
            let entry = newest.entry(*partition).or_insert(*offset);
            *entry = (*entry).max(*offset);
        }
        written.retain(|(partition, offset)| *offset + FORGET_BELOW >= newest[partition]);
    }
}

/// The dead-letter topic's end offset of each partition, by partition id
/// ([`crate::topic::end_offsets`]): where a dead letter produced from now on
/// can be found at the earliest. Blocking.
fn dlq_end_offsets(brokers: &Brokers, topic: &str) -> Result<Vec<i64>, PipelineError> {
    let ends = crate::topic::end_offsets(brokers, topic)
        .map_err(|error| PipelineError::DlqTopic(format!("{error:#}")))?;
    let mut by_id = vec![0; ends.keys().map(|id| *id as usize + 1).max().unwrap_or(0)];
    for (partition, end) in ends {
        by_id[partition as usize] = end;
    }
    Ok(by_id)
}

/// Raises the known end offsets past the dead letters that landed.
fn raise_ends(ends: &mut Vec<i64>, landed: &[(i32, i64)]) {
    for (partition, offset) in landed {
        let Ok(index) = usize::try_from(*partition) else {
            continue;
        };
        if ends.len() <= index {
            ends.resize(index + 1, 0);
        }
        ends[index] = ends[index].max(offset + 1);
    }
}

/// Where to read the dead-letter topic from to find every one of these
/// unconfirmed intents: per partition, the lowest end offset any of them
/// recorded (a partition none recorded, added since, from its start).
fn scan_starts(intents: &[crate::storage::IndexedDeadLetter]) -> BTreeMap<i32, i64> {
    let mut starts: BTreeMap<i32, i64> = BTreeMap::new();
    for intent in intents {
        for (partition, end) in intent.scan_from.iter().enumerate() {
            let start = starts.entry(partition as i32).or_insert(*end);
            *start = (*start).min(*end);
        }
    }
    starts
}

/// Reads the dead-letter topic from `starts` and returns which of the
/// `wanted` positions of `source_topic` it holds.
fn delivered_among(
    brokers: &Brokers,
    dlq_topic: &str,
    source_topic: &str,
    starts: &BTreeMap<i32, i64>,
    wanted: &HashSet<(i32, i64)>,
) -> anyhow::Result<HashSet<(i32, i64)>> {
    let records = crate::topic::read_from(brokers, dlq_topic, starts, Duration::from_secs(60))?;
    let mut found = HashSet::new();
    for record in &records {
        if record.header("dlq.source.topic") != Some(source_topic) {
            continue;
        }
        let position = record
            .header("dlq.source.partition")
            .and_then(|text| text.parse::<i32>().ok())
            .zip(
                record
                    .header("dlq.source.offset")
                    .and_then(|text| text.parse::<i64>().ok()),
            );
        if let Some(position) = position.filter(|position| wanted.contains(position)) {
            found.insert(position);
        }
    }
    Ok(found)
}

/// Retries `attempt` (each one bounded by its own timeout) with backoff
/// until it succeeds: the index or the broker being away is an outage to
/// wait out, as the sink waits behind its breaker, not a poison record.
async fn until_done<T, F, Fut>(
    progress: &crate::progress::Progress,
    what: &str,
    attempt: F,
) -> Result<T, PipelineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, PipelineError>>,
{
    let schedule = ExponentialBuilder::default()
        .with_min_delay(FIRST_BACKOFF)
        .with_max_delay(MAX_BACKOFF)
        .with_jitter()
        .without_max_times();
    progress
        .protect(
            attempt
                .retry(schedule)
                .notify(|error, wait| warn!(%error, ?wait, what, "retrying")),
        )
        .await
}

/// A dead letter on its way, in the form it is tried in.
struct Pending {
    record: PoisonRecord,
    form: Form,
}

impl DlqWriterState {
    /// Partitions were assigned at these checkpoints: confirms what this
    /// writer delivered, loads what the index holds at or past them, prunes
    /// it below the persisted checkpoint, and resolves intents without
    /// confirmation by reading the dead-letter topic from where they
    /// recorded its end.
    async fn look_up(&mut self, assigned: Vec<(i32, Option<i64>)>) -> Result<(), PipelineError> {
        let Some(index) = self.args.index.clone() else {
            return Ok(());
        };
        let started = Instant::now();
        let floors: HashMap<i32, i64> = assigned
            .iter()
            .map(|(partition, next)| (*partition, next.unwrap_or(0)))
            .collect();
        let progress = &self.args.progress;
        // What this writer delivered and has not confirmed yet: confirmed
        // now, so the look-up need not read it back.
        let delivered_before = std::mem::take(&mut self.unconfirmed);
        until_done(progress, "confirm dead letters", || {
            index.confirm(&delivered_before)
        })
        .await?;
        // Look up before pruning: the persisted checkpoint can already be
        // past these floors (acks of the last assignment's work in flight
        // land after the partitions came back), and positions between the
        // two may still be replayed by records handed out under this one.
        let indexed =
            until_done(progress, "look up the dlq index", || index.lookup(&floors)).await?;
        let pruned = until_done(progress, "prune the dlq index", || index.prune()).await?;
        let (confirmed, unconfirmed): (Vec<_>, Vec<_>) =
            indexed.into_iter().partition(|entry| entry.confirmed);
        let mut found: HashSet<(i32, i64)> = confirmed
            .iter()
            .map(|entry| (entry.position.partition, entry.position.offset))
            .collect();
        if !unconfirmed.is_empty() {
            let wanted: HashSet<(i32, i64)> = unconfirmed
                .iter()
                .map(|entry| (entry.position.partition, entry.position.offset))
                .collect();
            let starts = scan_starts(&unconfirmed);
            let delivered = self
                .landed(&starts, wanted)
                .await?
                .map_err(|error| PipelineError::DlqTopic(format!("{error:#}")))?;
            let (delivered, lost): (Vec<SourcePosition>, Vec<SourcePosition>) = unconfirmed
                .iter()
                .map(|entry| entry.position)
                .partition(|position| delivered.contains(&(position.partition, position.offset)));
            until_done(progress, "confirm dead letters found", || {
                index.confirm(&delivered)
            })
            .await?;
            until_done(progress, "forget undelivered intents", || {
                index.forget(&lost)
            })
            .await?;
            info!(
                unconfirmed = unconfirmed.len(),
                found_delivered = delivered.len(),
                not_delivered = lost.len(),
                ?starts,
                "resolved dead-letter intents without confirmation"
            );
            found.extend(
                delivered
                    .iter()
                    .map(|position| (position.partition, position.offset)),
            );
        }
        // Forget only what lies below the new floors: what this writer
        // delivered at or past them is in the topic, whatever the index
        // says now (it may have been pruned already, see above).
        self.already_written.retain(|(partition, offset)| {
            floors.get(partition).is_none_or(|floor| *offset >= *floor)
        });
        let partitions = floors.len();
        info!(
            partitions,
            already_dead_lettered = found.len(),
            pruned,
            took_ms = started.elapsed().as_millis() as u64,
            "looked up the dlq index past the checkpoint"
        );
        self.already_written.extend(found);
        self.last_prune = Instant::now();
        metrics::gauge!(names::DLQ_INDEX_LOOKUP_SECONDS).set(started.elapsed().as_secs_f64());
        metrics::counter!(names::DLQ_INDEX_LOOKUPS).increment(1);
        Ok(())
    }

    /// Which of `wanted` (source positions) the dead-letter topic holds,
    /// read from `starts` on a blocking thread (bounded by the read's own
    /// deadline; the watchdog does not count the wait).
    async fn landed(
        &self,
        starts: &BTreeMap<i32, i64>,
        wanted: HashSet<(i32, i64)>,
    ) -> Result<anyhow::Result<HashSet<(i32, i64)>>, tokio::task::JoinError> {
        let (brokers, dlq_topic, source_topic, starts) = (
            self.args.brokers.clone(),
            self.args.dlq_topic.clone(),
            self.args.source_topic.clone(),
            starts.clone(),
        );
        let read = tokio::task::spawn_blocking(move || {
            delivered_among(&brokers, &dlq_topic, &source_topic, &starts, &wanted)
        });
        self.args.progress.protect(read).await
    }

    /// Drops from `pending` the dead letters the topic holds after all,
    /// reading it from `starts`. False when the topic cannot be read now.
    async fn drop_landed(
        &self,
        pending: &mut Vec<Pending>,
        starts: &BTreeMap<i32, i64>,
    ) -> Result<bool, ActorProcessingErr> {
        let wanted: HashSet<(i32, i64)> = pending
            .iter()
            .map(|Pending { record, .. }| {
                (record.raw.position.partition, record.raw.position.offset)
            })
            .collect();
        let found = match self.landed(starts, wanted).await? {
            Ok(found) => found,
            Err(error) => {
                warn!(error = %format!("{error:#}"), "cannot read the dead-letter topic to see which failed dead letters landed; waiting");
                return Ok(false);
            }
        };
        if !found.is_empty() {
            pending.retain(|Pending { record, .. }| {
                let landed =
                    found.contains(&(record.raw.position.partition, record.raw.position.offset));
                if landed {
                    metrics::counter!(names::DLQ_MESSAGES, "error_type" => record.kind.label())
                        .increment(1);
                }
                !landed
            });
            metrics::counter!(names::DLQ_DUPLICATES_SKIPPED).increment(found.len() as u64);
            info!(
                landed = found.len(),
                still_pending = pending.len(),
                "dead letters reported as failed are in the topic after all; not written again"
            );
        }
        Ok(true)
    }

    /// Produces every record and waits for the broker to confirm each one.
    /// Returns the records that failed; one the topic refused permanently
    /// comes back in the next smaller [`Form`], to be tried again at once.
    /// The flag: some failure has no smaller form to try (wait, then retry).
    /// Also returns where each delivered dead letter landed (partition, offset).
    async fn produce(&self, pending: Vec<Pending>) -> (Vec<Pending>, bool, Vec<(i32, i64)>) {
        let started = SystemTime::now();
        let failed_at = started
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis())
            .unwrap_or_default()
            .to_string();
        let deliveries = pending.iter().map(|Pending { record, form }| {
            let partition = record.raw.position.partition.to_string();
            let offset = record.raw.position.offset.to_string();
            let replay_count = record.raw.replay_count.to_string();
            let values: [&str; 8] = [
                record.kind.label(),
                &record.message,
                &self.args.source_topic,
                &partition,
                &offset,
                record.stage,
                &failed_at,
                &replay_count,
            ];
            let DeadLetterBody {
                key,
                payload,
                headers: envelope,
            } = dead_letter_body(
                record.raw.key.as_deref(),
                record.raw.payload.as_deref(),
                *form,
            );
            let mut headers =
                OwnedHeaders::new_with_capacity(DLQ_HEADERS.len() + 1 + envelope.len());
            for (key, value) in DLQ_HEADERS.iter().zip(values) {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            // The record's trace, unchanged (or the one started for it).
            let traceparent = record.raw.trace.header();
            headers = headers.insert(Header {
                key: TRACEPARENT_HEADER,
                value: Some(traceparent.as_str()),
            });
            for (key, value) in &envelope {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let mut kafka_record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.args.dlq_topic).headers(headers);
            if let Some(key) = key {
                kafka_record = kafka_record.key(key);
            }
            if let Some(payload) = payload {
                kafka_record = kafka_record.payload(payload);
            }
            self.args.producer.send(kafka_record, Timeout::Never)
        });
        let results = join_all(deliveries).await;
        let mut failed = Vec::new();
        let mut must_wait = false;
        let mut landed = Vec::new();
        for (Pending { record, form }, result) in pending.into_iter().zip(results) {
            let (partition, offset) = (record.raw.position.partition, record.raw.position.offset);
            match result {
                Ok(delivery) => {
                    landed.push((delivery.partition, delivery.offset));
                    self.args.spans.dead_letter(
                        &record,
                        &self.args.source_topic,
                        &self.args.dlq_topic,
                        (delivery.partition, delivery.offset),
                        started,
                    );
                    metrics::counter!(names::DLQ_MESSAGES, "error_type" => record.kind.label())
                        .increment(1);
                    if let Some(envelope) = form.label() {
                        metrics::counter!(names::DLQ_ENVELOPES).increment(1);
                        info!(
                            partition,
                            offset, envelope, "dead letter delivered as an envelope"
                        );
                    }
                }
                Err((delivery_error, _)) if is_permanent(&delivery_error) => {
                    let smaller = form.smaller();
                    warn!(%delivery_error, partition, offset, ?form, next = ?smaller, "the dead-letter topic refuses this dead letter; sending less of it");
                    must_wait |= smaller.is_none();
                    failed.push(Pending {
                        record,
                        form: smaller.unwrap_or(form),
                    });
                }
                Err((delivery_error, _)) => {
                    warn!(%delivery_error, partition, offset, "dead letter not delivered");
                    must_wait = true;
                    failed.push(Pending { record, form });
                }
            }
        }
        (failed, must_wait, landed)
    }
}

/// The DLQ writer actor.
pub struct DlqWriterActor;

impl Actor for DlqWriterActor {
    type Msg = DlqWriterMsg;
    type State = DlqWriterState;
    type Arguments = DlqWriterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Export every error type at 0, so rates and the SLI exist before the first dead letter.
        for kind in crate::parse::PoisonKind::ALL {
            metrics::counter!(names::DLQ_MESSAGES, "error_type" => kind.label()).increment(0);
        }
        metrics::counter!(names::DLQ_DUPLICATES_SKIPPED).increment(0);
        metrics::counter!(names::DLQ_ENVELOPES).increment(0);
        metrics::counter!(names::DLQ_INDEX_LOOKUPS).increment(0);
        Ok(DlqWriterState {
            args,
            already_written: HashSet::new(),
            last_prune: Instant::now(),
            dlq_ends: None,
            unconfirmed: Vec::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _working = state.args.progress.working();
        state.args.faults.at_message_start("dlq_writer").await;
        match message {
            DlqWriterMsg::Assigned(assigned) => state.look_up(assigned).await?,
            DlqWriterMsg::Write {
                records,
                permit,
                bytes,
            } => {
                let positions: Vec<_> = records.iter().map(|record| record.raw.position).collect();
                let before = records.len();
                let remaining: Vec<PoisonRecord> = records
                    .into_iter()
                    .filter(|record| {
                        !state
                            .already_written
                            .contains(&(record.raw.position.partition, record.raw.position.offset))
                    })
                    .collect();
                let skipped = before - remaining.len();
                if skipped > 0 {
                    metrics::counter!(names::DLQ_DUPLICATES_SKIPPED).increment(skipped as u64);
                    info!(
                        skipped,
                        "dead letters already in the topic, not written again"
                    );
                }
                let delivered: Vec<SourcePosition> =
                    remaining.iter().map(|record| record.raw.position).collect();
                // Where this batch's dead letters can land: the dead-letter
                // topic's end offsets before its first produce.
                let mut recheck_from: Option<BTreeMap<i32, i64>> = None;
                if let Some(index) = state.args.index.clone().filter(|_| !delivered.is_empty()) {
                    let progress = &state.args.progress;
                    if state.dlq_ends.is_none() {
                        let ends = until_done(
                            progress,
                            "read the dead-letter topic's end offsets",
                            || {
                                let (brokers, topic) =
                                    (state.args.brokers.clone(), state.args.dlq_topic.clone());
                                async move {
                                    tokio::task::spawn_blocking(move || {
                                        dlq_end_offsets(&brokers, &topic)
                                    })
                                    .await?
                                }
                            },
                        )
                        .await?;
                        state.dlq_ends = Some(ends);
                    }
                    let scan_from = state.dlq_ends.clone().unwrap_or_default();
                    recheck_from = Some(
                        (0..)
                            .zip(scan_from.iter().copied())
                            .collect::<BTreeMap<i32, i64>>(),
                    );
                    let confirming = std::mem::take(&mut state.unconfirmed);
                    until_done(progress, "record dead-letter intents", || {
                        index.intend(&delivered, &scan_from, &confirming)
                    })
                    .await?;
                    state.args.faults.reached(CrashPoint::AfterDlqIntent);
                }
                let mut pending: Vec<Pending> = remaining
                    .into_iter()
                    .map(|record| Pending {
                        record,
                        form: Form::Whole,
                    })
                    .collect();
                let mut backoff = FIRST_BACKOFF;
                loop {
                    // Bounded by the producer's message.timeout.ms.
                    let (failed, must_wait, landed) =
                        state.args.progress.protect(state.produce(pending)).await;
                    if let Some(ends) = state.dlq_ends.as_mut() {
                        raise_ends(ends, &landed);
                    }
                    pending = failed;
                    if pending.is_empty() {
                        break;
                    }
                    // A smaller form goes again at once; anything else waits.
                    if must_wait {
                        // A dead letter that failed in flight (a broker that
                        // hung until message.timeout.ms) may have been
                        // appended all the same: before sending any again,
                        // look in the topic, and wait while it cannot be read.
                        loop {
                            state
                                .args
                                .progress
                                .protect(tokio::time::sleep(backoff))
                                .await;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            let Some(starts) = &recheck_from else {
                                break;
                            };
                            if state.drop_landed(&mut pending, starts).await? {
                                break;
                            }
                        }
                        if pending.is_empty() {
                            break;
                        }
                    }
                }
                if let Some(index) = state.args.index.clone() {
                    state.args.faults.reached(CrashPoint::AfterDlqDelivery);
                    state.unconfirmed.extend_from_slice(&delivered);
                    remember(&mut state.already_written, &delivered);
                    if state.last_prune.elapsed() >= PRUNE_EVERY {
                        state.last_prune = Instant::now();
                        // Best effort: the next prune catches up.
                        if let Err(error) = index.prune().await {
                            warn!(%error, "could not prune the dlq index");
                        }
                    }
                }
                state.args.committer.cast(CommitterMsg::Ack {
                    source: AckSource::DeadLetter,
                    positions,
                })?;
                drop((permit, bytes));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::SourcePosition;
    use proptest::prelude::*;

    fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
        headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    #[test]
    fn whole_dead_letters_carry_the_original_bytes() {
        let DeadLetterBody {
            key,
            payload,
            headers,
        } = dead_letter_body(Some(b"k"), Some(b"v"), Form::Whole);
        assert_eq!((key, payload), (Some(&b"k"[..]), Some(&b"v"[..])));
        assert!(headers.is_empty());
    }

    #[test]
    fn producer_errors_are_classified() {
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(is_permanent(&too_large));
        let invalid = KafkaError::MessageProduction(RDKafkaErrorCode::InvalidRecord);
        assert!(is_permanent(&invalid));
        for retriable in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::QueueFull,
        ] {
            assert!(!is_permanent(&KafkaError::MessageProduction(retriable)));
        }
        assert_eq!(Form::Whole.smaller(), Some(Form::PayloadPrefix));
        assert_eq!(Form::PayloadPrefix.smaller(), Some(Form::HeadersOnly));
        assert_eq!(Form::HeadersOnly.smaller(), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// An envelope is bounded whatever the record, and says exactly what
        /// the original was.
        #[test]
        fn envelopes_are_bounded_and_describe_the_original(
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..3000)),
            payload_len in proptest::option::of(0usize..200_000),
            fill in any::<u8>(),
            headers_only in any::<bool>(),
        ) {
            let payload = payload_len.map(|len| vec![fill; len]);
            let form = if headers_only { Form::HeadersOnly } else { Form::PayloadPrefix };
            let DeadLetterBody { key: kept_key, payload: kept_payload, headers } =
                dead_letter_body(key.as_deref(), payload.as_deref(), form);
            prop_assert_eq!(header(&headers, ENVELOPE_HEADER), form.label());
            for (name, original, kept, limit) in [
                ("key", key.as_deref(), kept_key, ENVELOPE_KEY_BYTES),
                ("payload", payload.as_deref(), kept_payload, ENVELOPE_PAYLOAD_BYTES),
            ] {
                match original {
                    None => {
                        prop_assert!(kept.is_none());
                        let size_header = format!("dlq.{name}.size");
                        prop_assert!(header(&headers, &size_header).is_none());
                    }
                    Some(bytes) => {
                        let size = bytes.len().to_string();
                        let sha = hex::encode(Sha256::digest(bytes));
                        prop_assert_eq!(header(&headers, &format!("dlq.{name}.size")), Some(size.as_str()));
                        prop_assert_eq!(header(&headers, &format!("dlq.{name}.sha256")), Some(sha.as_str()));
                        if headers_only {
                            prop_assert!(kept.is_none());
                        } else {
                            let kept = kept.expect("a prefix");
                            prop_assert!(kept.len() <= limit);
                            prop_assert!(bytes.starts_with(kept));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn known_end_offsets_only_grow_past_what_landed() {
        let mut ends = vec![10, 20];
        raise_ends(&mut ends, &[(0, 14), (1, 5), (3, 7)]);
        assert_eq!(ends, vec![15, 20, 0, 8]);
        let intent = |scan_from: Vec<i64>| crate::storage::IndexedDeadLetter {
            position: SourcePosition {
                partition: 0,
                offset: 1,
            },
            confirmed: false,
            scan_from,
        };
        let starts = scan_starts(&[intent(vec![15, 20]), intent(vec![12, 25, 3])]);
        assert_eq!(starts, BTreeMap::from([(0, 12), (1, 20), (2, 3)]));
    }

    #[test]
    fn delivered_positions_are_remembered_and_only_far_behind_ones_forgotten() {
        let mut written = HashSet::new();
        let at = |partition, offset| SourcePosition { partition, offset };
        remember(&mut written, &[at(0, 5), at(1, 7)]);
        assert!(written.contains(&(0, 5)) && written.contains(&(1, 7)));
        // Fill past the pruning size: partition 0 moves far ahead.
        let far: Vec<_> = (0..PRUNE_ABOVE as i64)
            .map(|index| at(0, FORGET_BELOW + 10 + index))
            .collect();
        remember(&mut written, &far);
        assert!(
            !written.contains(&(0, 5)),
            "far behind its partition's newest"
        );
        assert!(written.contains(&(1, 7)), "newest of its own partition");
        assert!(written.contains(&(0, FORGET_BELOW + 10)));
    }
}
