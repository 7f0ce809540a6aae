//! The actors crate's error type. A bad record is never an error here: it is
//! data (a dead letter). These are infrastructure failures, which fail the
//! actor and leave the decision to its supervisor.

use crate::mailbox::MailboxError;

/// An infrastructure failure on the data path.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// PostgreSQL refused a connection or a statement. Shown with the
    /// server's message, SQLSTATE and what it names ([`postgres_detail`]).
    #[error("postgres: {context}: {}", postgres_detail(source))]
    Postgres {
        /// What we were doing.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// ClickHouse refused a connection or a statement (its message carries
    /// the server's `Code: N`).
    #[error("clickhouse: {context}: {}", with_causes(source))]
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
    /// A service did not answer in time (a hung server, a stalled network):
    /// a failure like any other, so the breaker and the supervisor see it.
    #[error("{service}: {what}: no answer within {after:?}")]
    Timeout {
        /// `postgres` or `clickhouse`.
        service: &'static str,
        /// What we were doing.
        what: String,
        /// The limit that passed.
        after: std::time::Duration,
    },
    /// A downstream actor has stopped.
    #[error(transparent)]
    Mailbox(#[from] MailboxError),
    /// The Kafka client hit a fatal error and cannot be used again (a static
    /// member fenced by another incarnation, say): the next generation joins
    /// the group with a fresh client.
    #[error("kafka client unusable after a fatal error ({0}); joining again with a fresh client")]
    KafkaFatal(String),
    /// A blocking call run off the runtime panicked or was cancelled.
    #[error("blocking task: {0}")]
    Blocking(#[from] tokio::task::JoinError),
    /// The dead-letter topic's end offsets, or its records where an intent
    /// had no confirmation, could not be read.
    #[error("dead-letter topic: {0}")]
    DlqTopic(String),
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

/// An error and its causes, `: `-separated (a client library's TLS failure
/// is in a cause, not in the error's own text); a cause whose text the
/// error already shows is not repeated.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text = format!("{text}: {inner_text}");
        }
        cause = inner.source();
    }
    text
}

/// What PostgreSQL said, for a log line an operator can act on: the
/// server's message with its SQLSTATE and the constraint, table and column
/// it names, then its detail and hint; a failure that never reached the
/// server (connection, TLS, protocol) as the driver's error and its causes.
pub fn postgres_detail(error: &tokio_postgres::Error) -> String {
    let Some(db_error) = error.as_db_error() else {
        return with_causes(error);
    };
    let mut names = vec![format!("SQLSTATE {}", db_error.code().code())];
    for (what, value) in [
        ("constraint", db_error.constraint()),
        ("table", db_error.table()),
        ("column", db_error.column()),
    ] {
        if let Some(value) = value {
            names.push(format!("{what} {value}"));
        }
    }
    let mut text = format!(
        "{} {} ({})",
        db_error.severity(),
        db_error.message(),
        names.join(", ")
    );
    if let Some(detail) = db_error.detail() {
        text.push_str(&format!("; detail: {detail}"));
    }
    if let Some(hint) = db_error.hint() {
        text.push_str(&format!("; hint: {hint}"));
    }
    text
}

/// PostgreSQL errors about the values written, not about the server: the
/// whole data-exception class 22 (22021 a NUL in text, 22P05 an
/// untranslatable character, 22003 a number out of range, 22001 a string too
/// long...) and the not-null and check constraints (23502, 23514). The same
/// rows fail the same way on every retry.
fn postgres_data_error(code: &str) -> bool {
    code.starts_with("22") || matches!(code, "23502" | "23514")
}

/// ClickHouse error codes about the values inserted: parse, type and range
/// errors, and a table's own check (`throwIf` in a column expression).
const CLICKHOUSE_DATA_ERRORS: [u32; 16] = [
    6,   // CANNOT_PARSE_TEXT
    25,  // CANNOT_PARSE_ESCAPE_SEQUENCE
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
    469, // VIOLATED_CONSTRAINT
];

/// The `Code: N` of a ClickHouse exception message.
pub fn clickhouse_error_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + "Code: ".len()..];
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..digits].parse().ok()
}

/// Runs `call`, failing with [`PipelineError::Timeout`] once `limit` passes.
/// Dropping the call abandons it (its connection is dropped by the caller).
pub async fn within<T>(
    limit: std::time::Duration,
    service: &'static str,
    what: &str,
    call: impl std::future::Future<Output = Result<T, PipelineError>>,
) -> Result<T, PipelineError> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(PipelineError::Timeout {
            service,
            what: what.to_string(),
            after: limit,
        })
    })
}

impl PipelineError {
    /// The store's own words when this failure is about the data written
    /// (the same rows fail on every retry, so they must be dead-lettered),
    /// `None` when it is about the store or the way to it (connection,
    /// timeout, server error: retriable behind the breaker).
    pub fn data_error(&self) -> Option<String> {
        match self {
            PipelineError::Postgres { source, .. } => {
                let db_error = source.as_db_error()?;
                postgres_data_error(db_error.code().code()).then(|| {
                    format!(
                        "postgres SQLSTATE {}: {}",
                        db_error.code().code(),
                        db_error.message()
                    )
                })
            }
            PipelineError::ClickHouse {
                source: clickhouse::error::Error::BadResponse(message),
                ..
            } => {
                let code = clickhouse_error_code(message)?;
                CLICKHOUSE_DATA_ERRORS
                    .contains(&code)
                    .then(|| format!("clickhouse {message}"))
            }
            _ => None,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("error connecting to server: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_are_added_once() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(
            with_causes(&Outer(refused)),
            "error connecting to server: refused"
        );
    }

    #[test]
    fn clickhouse_codes_are_read_from_the_exception() {
        assert_eq!(
            clickhouse_error_code("Code: 395, e.displayText() = DB::Exception: Value passed to 'throwIf' function is non zero"),
            Some(395)
        );
        assert_eq!(
            clickhouse_error_code("Code: 27. DB::Exception: Cannot parse input"),
            Some(27)
        );
        assert_eq!(clickhouse_error_code("connection refused"), None);
    }

    #[test]
    fn only_data_errors_are_about_the_data() {
        let bad = |message: &str| PipelineError::ClickHouse {
            context: "insert".into(),
            source: clickhouse::error::Error::BadResponse(message.into()),
        };
        assert!(bad("Code: 395. DB::Exception: throwIf")
            .data_error()
            .is_some());
        // Too many parts, memory limit: the server's trouble, retried.
        assert!(bad("Code: 252. DB::Exception: Too many parts")
            .data_error()
            .is_none());
        assert!(bad("Code: 241. DB::Exception: Memory limit")
            .data_error()
            .is_none());
        let network = PipelineError::ClickHouse {
            context: "insert".into(),
            source: clickhouse::error::Error::TimedOut,
        };
        assert!(network.data_error().is_none());
        assert!(postgres_data_error("22021"));
        assert!(postgres_data_error("22P05"));
        assert!(postgres_data_error("23514"));
        assert!(!postgres_data_error("23505"));
        assert!(!postgres_data_error("57P01"));
        assert!(!postgres_data_error("08006"));
    }
}
