//! The pipeline's actors and the pieces they share.
//!
//! Data path (each arrow into an actor is a bounded mailbox):
//!
//! ```text
//! Kafka -> consumer -> parser -> sink (PostgreSQL + ClickHouse) --ack--> committer -> checkpoint + Kafka commit
//!                            \-> dlq_writer -> dead-letter topic --ack--/
//! ```
//!
//! Modules:
//! - [`parse`]: the pure parser (no I/O, never panics) and the poison kinds.
//! - [`mailbox`]: bounded mailboxes on top of ractor's unbounded ones.
//! - [`models`]: the data that travels between actors.
//! - [`storage`]: the PostgreSQL and ClickHouse tables and the checkpoint table.
//! - [`consumer`], [`parser`], [`sink`], [`dlq_writer`], [`committer`]: one actor each.
//! - [`sqs`], [`sqs_consumer`], [`order`]: the SQS side: queue plumbing, the
//!   consumer actor whose poison the broker redrives, and the order parser.
//! - [`clickhouse_tls`]: ClickHouse over HTTPS trusting the CA of `--clickhouse-ca-file`.
//! - [`breaker`]: the sink's circuit breaker per store.
//! - [`faults`]: injected panics, hangs and crash points for the recovery tests and demo.
//! - [`progress`]: what each actor tells the watchdog (busy, progress).
//! - [`kafka`]: the brokers and how every client reaches them (TLS, SASL), and the start-up probe.
//! - [`postgres_tls`]: PostgreSQL URLs with libpq's `sslmode`/`sslrootcert`, verified with OpenSSL.
//! - [`topic`]: reading a topic back (true end offsets, every record).
//! - [`trace_context`]: the W3C `traceparent` each record carries to its row or dead letter.
//! - [`spans`]: the optional OTLP export of a span per stored batch and per dead letter.
//! - [`config`], [`error`], [`metrics`]: configuration, the error type, metric names.

pub mod breaker;
pub mod budget;
pub mod clickhouse_tls;
pub mod committer;
pub mod config;
pub mod consumer;
pub mod dlq_writer;
pub mod error;
pub mod faults;
pub mod kafka;
pub mod mailbox;
pub mod metrics;
pub mod models;
pub mod order;
pub mod parse;
pub mod parser;
pub mod postgres_tls;
pub mod progress;
pub mod sink;
pub mod spans;
pub mod sqs;
pub mod sqs_consumer;
pub mod storage;
pub mod topic;
pub mod trace_context;

pub use config::PipelineConfig;
pub use error::PipelineError;
