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

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tracing::warn;

use crate::committer::CommitterMsg;
use crate::error::PipelineError;
use crate::mailbox::MailboxPermit;
use crate::metrics as names;
use crate::models::{AckSource, PoisonRecord};

/// Header names, in the order they are written.
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

/// How many times the record was replayed before it failed again: `streamctl
/// dlq replay` sets it on what it re-publishes, the consumer reads it, and the
/// DLQ writer carries it here, so a replay tool can refuse to loop.
pub const REPLAY_COUNT_HEADER: &str = "dlq.replay.count";

/// The first retry waits this long; each next one twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Retries never wait longer than this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Builds the idempotent producer the DLQ writer uses.
pub fn create_dlq_producer(brokers: &str) -> Result<FutureProducer, PipelineError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
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
    },
}

/// The DLQ writer's state: its arguments.
pub struct DlqWriterState {
    args: DlqWriterArgs,
}

impl DlqWriterState {
    /// Produces every record and waits for the broker to confirm each one.
    /// Returns the records that failed.
    async fn produce(&self, records: Vec<PoisonRecord>) -> Vec<PoisonRecord> {
        let failed_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis())
            .unwrap_or_default()
            .to_string();
        let deliveries = records.iter().map(|record| {
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
            let mut headers = OwnedHeaders::new_with_capacity(DLQ_HEADERS.len());
            for (key, value) in DLQ_HEADERS.iter().zip(values) {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let mut kafka_record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.args.dlq_topic).headers(headers);
            if let Some(key) = record.raw.key.as_deref() {
                kafka_record = kafka_record.key(key);
            }
            if let Some(payload) = record.raw.payload.as_deref() {
                kafka_record = kafka_record.payload(payload);
            }
            self.args.producer.send(kafka_record, Timeout::Never)
        });
        let results = join_all(deliveries).await;
        let mut failed = Vec::new();
        for (record, result) in records.into_iter().zip(results) {
            match result {
                Ok(_) => {
                    metrics::counter!(names::DLQ_MESSAGES, "error_type" => record.kind.label())
                        .increment(1);
                }
                Err((delivery_error, _)) => {
                    warn!(%delivery_error, partition = record.raw.position.partition, offset = record.raw.position.offset, "dead letter not delivered");
                    failed.push(record);
                }
            }
        }
        failed
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
        Ok(DlqWriterState { args })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            DlqWriterMsg::Write { records, permit } => {
                let positions: Vec<_> = records.iter().map(|record| record.raw.position).collect();
                let mut remaining = records;
                let mut backoff = FIRST_BACKOFF;
                loop {
                    remaining = state.produce(remaining).await;
                    if remaining.is_empty() {
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                state.args.committer.cast(CommitterMsg::Ack {
                    source: AckSource::DeadLetter,
                    positions,
                })?;
                drop(permit);
            }
        }
        Ok(())
    }
}
