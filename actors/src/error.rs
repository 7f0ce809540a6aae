//! The actors crate's error type. A bad record is never an error here: it is
//! data (a dead letter). These are infrastructure failures, which fail the
//! actor and leave the decision to its supervisor.

use crate::mailbox::MailboxError;

/// An infrastructure failure on the data path.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// PostgreSQL refused a connection or a statement.
    #[error("postgres: {context}: {source}")]
    Postgres {
        /// What we were doing.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// ClickHouse refused a connection or a statement.
    #[error("clickhouse: {context}: {source}")]
    ClickHouse {
        /// What we were doing.
        context: String,
        /// The driver's error.
        #[source]
        source: clickhouse::error::Error,
    },
    /// The Kafka client failed.
    #[error("kafka: {context}: {source}")]
    Kafka {
        /// What we were doing.
        context: String,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// A downstream actor has stopped.
    #[error(transparent)]
    Mailbox(#[from] MailboxError),
    /// The Kafka client hit a fatal error and cannot be used again (a static
    /// member fenced by another incarnation, say): the next generation joins
    /// the group with a fresh client.
    #[error("kafka client unusable after a fatal error ({0}); joining again with a fresh client")]
    KafkaFatal(String),
    /// A restart could not put the consumer back at the checkpoint.
    #[error("rewind to the checkpoint: {0}")]
    Rewind(String),
    /// The configuration cannot work; names the setting.
    #[error("invalid setting {setting}: {reason}")]
    Config {
        /// The flag or environment variable at fault.
        setting: &'static str,
        /// Why it cannot work.
        reason: String,
    },
}

impl PipelineError {
    /// Wraps a PostgreSQL error with what we were doing.
    pub fn postgres(
        context: impl Into<String>,
    ) -> impl FnOnce(tokio_postgres::Error) -> PipelineError {
        let context = context.into();
        move |source| PipelineError::Postgres { context, source }
    }

    /// Wraps a ClickHouse error with what we were doing.
    pub fn clickhouse(
        context: impl Into<String>,
    ) -> impl FnOnce(clickhouse::error::Error) -> PipelineError {
        let context = context.into();
        move |source| PipelineError::ClickHouse { context, source }
    }

    /// Wraps a Kafka error with what we were doing.
    pub fn kafka(
        context: impl Into<String>,
    ) -> impl FnOnce(rdkafka::error::KafkaError) -> PipelineError {
        let context = context.into();
        move |source| PipelineError::Kafka { context, source }
    }
}
