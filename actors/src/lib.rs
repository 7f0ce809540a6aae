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
//! - [`config`], [`error`], [`metrics`]: configuration, the error type, metric names.

pub mod committer;
pub mod config;
pub mod consumer;
pub mod dlq_writer;
pub mod error;
pub mod mailbox;
pub mod metrics;
pub mod models;
pub mod parse;
pub mod parser;
pub mod sink;
pub mod storage;

pub use config::PipelineConfig;
pub use error::PipelineError;
