//! The pipeline's typed configuration, built and validated by the binary.

use std::time::Duration;

/// Everything the actors need to know, passed down explicitly.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The Kafka brokers and how to reach them (TLS, SASL).
    pub brokers: crate::kafka::Brokers,
    /// Consumer group; also the key of the persisted checkpoint.
    pub group_id: String,
    /// Source topic.
    pub topic: String,
    /// Dead-letter topic.
    pub dlq_topic: String,
    /// PostgreSQL connection URL (sink table and checkpoints).
    pub postgres_url: String,
    /// ClickHouse HTTP URL.
    pub clickhouse_url: String,
    /// ClickHouse database holding the `events` table.
    pub clickhouse_database: String,
    /// CA certificates (PEM) an `https://` ClickHouse's certificate must
    /// chain to; `None`: the public web PKI (webpki roots).
    pub clickhouse_ca_file: Option<std::path::PathBuf>,
    /// ClickHouse user, if not the default.
    pub clickhouse_user: Option<String>,
    /// ClickHouse password, if any.
    pub clickhouse_password: Option<String>,
    /// The most records in one sink batch (and one consumer batch).
    pub batch_size: usize,
    /// How long the sink waits for a batch to fill before writing what it has.
    pub linger: Duration,
    /// Capacity, in messages, of each data mailbox (parser, sink, dlq-writer).
    pub mailbox_capacity: usize,
    /// How often the committer persists the checkpoint and commits to Kafka.
    pub commit_interval: Duration,
    /// Schema versions the parser accepts.
    pub accepted_schema_versions: Vec<u32>,
    /// The longest one call to PostgreSQL or ClickHouse may take (connect,
    /// statement, insert): past it the call fails, the breaker counts it and
    /// the connection is made again.
    pub service_timeout: Duration,
    /// The watchdog's limit: an actor that holds a message this long without
    /// progress is hung and is restarted (at least three service timeouts:
    /// a reconnect and a statement must fit).
    pub stall_timeout: Duration,
    /// The largest record value the parser accepts, in bytes.
    pub max_record_bytes: usize,
    /// The longest text field the parser accepts, in bytes.
    pub max_field_bytes: usize,
    /// The consumer group session timeout: how soon the group coordinator
    /// gives a member's partitions to the others when it stops heartbeating
    /// (heartbeats go at a third of it). Kafka's `group.min.session.timeout.ms`
    /// refuses less than 6 s by default.
    pub session_timeout: Duration,
    /// The most bytes of records in flight between the consumer and the
    /// stores (see [`crate::budget`]); librdkafka's fetch and queue sizes
    /// follow it.
    pub max_in_flight_bytes: usize,
    /// librdkafka's `max.poll.interval.ms`. The consumer polls at least every
    /// 100 ms even while the pipeline is full (its partitions paused), so
    /// only a hung consumer passes it.
    pub max_poll_interval: Duration,
    /// Static group membership (`group.instance.id`; the pod name in
    /// Kubernetes): a restarted process with the same id takes its
    /// partitions back without a rebalance. Unique per running member;
    /// `None`: dynamic membership.
    pub group_instance_id: Option<String>,
    /// Whether replays are absorbed: unique `event_id` in PostgreSQL,
    /// ReplacingMergeTree in ClickHouse, the DLQ index in the DLQ writer. Only the
    /// recovery tests' negative control turns it off (on fresh databases), to
    /// show that the tests would catch the duplicates.
    pub dedup: bool,
    /// Where the sink and the DLQ writer report spans (a stored batch, a
    /// dead letter): [`crate::spans::Spans::off`] unless an OTLP endpoint is set.
    pub spans: crate::spans::Spans,
}

/// The default in-flight byte budget: 64 MiB.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;

impl PipelineConfig {
    /// A configuration pointing at the local services started by `scripts/services.sh`.
    pub fn local_defaults() -> PipelineConfig {
        PipelineConfig {
            brokers: crate::kafka::Brokers::plaintext("127.0.0.1:9092"),
            group_id: "processor".to_string(),
            topic: "events".to_string(),
            dlq_topic: "events.dlq".to_string(),
            postgres_url: "postgres://postgres:postgres@127.0.0.1:5432/pipeline".to_string(),
            clickhouse_url: "http://127.0.0.1:8123".to_string(),
            clickhouse_database: "pipeline".to_string(),
            clickhouse_ca_file: None,
            clickhouse_user: None,
            clickhouse_password: None,
            batch_size: 2000,
            linger: Duration::from_millis(50),
            mailbox_capacity: 8,
            commit_interval: Duration::from_millis(200),
            accepted_schema_versions: vec![1],
            service_timeout: crate::storage::DEFAULT_SERVICE_TIMEOUT,
            stall_timeout: Duration::from_secs(60),
            max_record_bytes: crate::parse::DEFAULT_MAX_RECORD_BYTES,
            max_field_bytes: crate::parse::DEFAULT_MAX_FIELD_BYTES,
            session_timeout: Duration::from_millis(6000),
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            max_poll_interval: Duration::from_secs(300),
            group_instance_id: None,
            dedup: true,
            spans: crate::spans::Spans::off(),
        }
    }
}
