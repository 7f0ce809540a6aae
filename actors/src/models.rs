//! Message payloads that travel between the actors.
//!
//! These are plain data: no actor references, no I/O handles. The actors'
//! message enums wrap them.

use crate::parse::{PoisonKind, ValidEvent};
use crate::trace_context::TraceContext;

/// Where a record came from in Kafka. Every acknowledgement names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourcePosition {
    /// Kafka partition of the source topic.
    pub partition: i32,
    /// Offset of the record inside that partition.
    pub offset: i64,
}

impl std::fmt::Display for SourcePosition {
    /// `partition 3 offset 1200`.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "partition {} offset {}",
            self.partition, self.offset
        )
    }
}

/// A record as the consumer read it, bytes untouched.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRecord {
    /// Partition and offset, used for acknowledgements and DLQ headers.
    pub position: SourcePosition,
    /// The record key, kept unchanged so a dead letter carries the original key.
    pub key: Option<Vec<u8>>,
    /// The record value, kept unchanged so a dead letter carries the original bytes.
    pub payload: Option<Vec<u8>>,
    /// How many times this record was replayed from the dead-letter topic
    /// (its `dlq.replay.count` header; 0 for an original record).
    pub replay_count: u32,
    /// The Kafka record timestamp (producer create time), milliseconds since
    /// the epoch: the start of the end-to-end latency.
    pub kafka_timestamp_ms: Option<i64>,
    /// Its W3C trace context: the `traceparent` header, or a trace started
    /// for it when it had none (see [`crate::trace_context`]).
    pub trace: TraceContext,
}

impl RawRecord {
    /// What this record holds against the in-flight byte budget.
    pub fn budget_bytes(&self) -> usize {
        crate::budget::record_bytes(self.key.as_deref(), self.payload.as_deref())
    }
}

/// A record the parser accepted, ready for the sinks.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRecord {
    /// The record as read: its position (the sink acknowledges it once
    /// stored), its Kafka timestamp (for the end-to-end latency), and its key
    /// and bytes, kept so that a record a store refuses is dead-lettered
    /// unchanged.
    pub raw: RawRecord,
    /// The parsed event.
    pub event: ValidEvent,
}

/// A record the parser rejected, on its way to the dead-letter topic.
#[derive(Debug, Clone)]
pub struct PoisonRecord {
    /// The original record, key and bytes unchanged.
    pub raw: RawRecord,
    /// Why it was rejected.
    pub kind: PoisonKind,
    /// A human-readable explanation, written to the `dlq.error.message` header.
    pub message: String,
    /// The pipeline stage that rejected it, written to the `dlq.stage` header.
    pub stage: &'static str,
}

/// Which downstream actor acknowledged a set of positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckSource {
    /// The sink stored the events in PostgreSQL and ClickHouse.
    Sink,
    /// The DLQ writer got broker confirmation for the dead letters.
    DeadLetter,
}
