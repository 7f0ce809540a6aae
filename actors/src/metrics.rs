//! Every metric name the actors export, in one place.
//!
//! Labels: `actor` for per-actor figures, `partition` for per-partition ones,
//! `error_type` for dead letters (the [`crate::parse::PoisonKind`] label).

/// Valid events stored by the sink (counter). The SLI's numerator.
pub const EVENTS_PROCESSED: &str = "stream_events_processed_total";
/// Poison records written to the dead-letter topic (counter, label `error_type`).
pub const DLQ_MESSAGES: &str = "stream_dlq_messages_total";
/// Records that came without a valid W3C `traceparent` header, for which
/// the consumer started a trace (counter, label `reason`: `missing`,
/// `invalid`).
pub const TRACES_STARTED: &str = "stream_trace_contexts_started_total";
/// Spans sent to the OTLP endpoint (counter; only with `--otlp-endpoint`).
pub const SPANS_EXPORTED: &str = "stream_spans_exported_total";
/// Spans in exports that failed, dropped (counter; only with `--otlp-endpoint`).
pub const SPAN_EXPORTS_FAILED: &str = "stream_span_exports_failed_total";
/// Records read from Kafka by the consumer (counter).
pub const EVENTS_CONSUMED: &str = "stream_events_consumed_total";
/// Messages waiting in or being handled by an actor's mailbox (gauge, label `actor`).
pub const MAILBOX_DEPTH: &str = "stream_mailbox_depth";
/// The bound of an actor's mailbox (gauge, label `actor`).
pub const MAILBOX_CAPACITY: &str = "stream_mailbox_capacity";
/// Microseconds senders spent waiting on a full mailbox (counter, label `actor`).
pub const MAILBOX_SEND_WAIT_MICROS: &str = "stream_mailbox_send_wait_microseconds_total";
/// Sink batch write duration in seconds (histogram, label `store`).
pub const SINK_BATCH_SECONDS: &str = "stream_sink_batch_duration_seconds";
/// Sink write attempts that failed and will be retried (counter, label `store`).
pub const SINK_RETRIES: &str = "stream_sink_retries_total";
/// The next offset to read per partition, as persisted in the checkpoint (gauge, label `partition`).
pub const CHECKPOINT_OFFSET: &str = "stream_checkpoint_offset";
/// Checkpoints persisted (counter).
pub const CHECKPOINTS_PERSISTED: &str = "stream_checkpoints_persisted_total";
/// Records consumed but not yet acknowledged by the sink or the DLQ (gauge).
pub const IN_FLIGHT: &str = "stream_in_flight_records";
/// Bytes of records the pipeline holds between the consumer and the stores (gauge).
pub const IN_FLIGHT_BYTES: &str = "stream_in_flight_bytes";
/// The in-flight byte budget, `--max-in-flight-bytes` (gauge).
pub const IN_FLIGHT_BYTES_LIMIT: &str = "stream_in_flight_bytes_limit";
/// Times the consumer paused its partitions because the pipeline was full
/// (counter); it keeps polling while paused, so it stays in the group.
pub const CONSUMER_PAUSES: &str = "stream_consumer_pauses_total";
/// Records behind the end of the partition: end offset minus committed offset (gauge, label `partition`).
pub const CONSUMER_LAG: &str = "stream_consumer_lag";
/// Partitions the group assigned to this member (gauge, from librdkafka's
/// statistics): after a scale-out or scale-in, who holds what.
pub const CONSUMER_ASSIGNED_PARTITIONS: &str = "stream_consumer_assigned_partitions";
/// SQS messages received; a redelivery counts again (counter).
pub const SQS_RECEIVED: &str = "sqs_messages_received_total";
/// SQS orders stored and their messages deleted (counter).
pub const SQS_PROCESSED: &str = "sqs_messages_processed_total";
/// SQS receives whose processing failed; the message was left for redelivery (counter).
pub const SQS_FAILED_RECEIVES: &str = "sqs_receive_failures_total";
/// SQS messages deleted (counter).
pub const SQS_DELETED: &str = "sqs_messages_deleted_total";
/// Messages the broker moved to the dead-letter queue: its ApproximateNumberOfMessages (gauge, label `queue`).
pub const SQS_REDRIVEN: &str = "sqs_messages_redriven";
/// Actor restarts by a supervisor (counter, label `actor`). Exported at 0 from
/// the start so `increase()` sees the first restart.
pub const ACTOR_RESTARTS: &str = "stream_actor_restarts_total";
/// Actors the watchdog found holding a message without progress past the
/// stall limit, and restarted (counter, label `actor`; exported at 0).
pub const ACTOR_STALLS: &str = "stream_actor_stalls_total";
/// Visibility extensions for slow work (counter).
pub const SQS_VISIBILITY_EXTENSIONS: &str = "sqs_visibility_extensions_total";
/// Seconds from the Kafka record timestamp to the sink's acknowledgement (histogram).
pub const END_TO_END_LATENCY: &str = "stream_end_to_end_latency_seconds";
/// A store's circuit breaker in the sink: 0 closed, 1 half-open, 2 open (gauge, label `store`).
pub const CIRCUIT_BREAKER_STATE: &str = "stream_circuit_breaker_state";
/// Dead letters not written again because the dead-letter topic already holds
/// them (a replay after a crash) (counter).
pub const DLQ_DUPLICATES_SKIPPED: &str = "stream_dlq_duplicates_skipped_total";
/// Look-ups of the DLQ index at an assignment or a restart (counter).
pub const DLQ_INDEX_LOOKUPS: &str = "stream_dlq_index_lookups_total";
/// How long the last look-up of the DLQ index took, seconds (gauge): what a
/// restart costs the DLQ writer, whatever the size of the dead-letter topic.
pub const DLQ_INDEX_LOOKUP_SECONDS: &str = "stream_dlq_index_lookup_seconds";
/// Dead letters the dead-letter topic refused whole, delivered as envelopes
/// (a prefix of the bytes, or the headers only).
pub const DLQ_ENVELOPES: &str = "stream_dlq_envelopes_total";
/// Checkpoint writes that failed; the checkpoint stays where it was and the
/// next tick tries again (counter).
pub const CHECKPOINT_FAILURES: &str = "stream_checkpoint_failures_total";
/// Pipeline restarts by the supervisor after a child failed (counter).
pub const PIPELINE_RESTARTS: &str = "stream_pipeline_restarts_total";
