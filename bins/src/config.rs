//! The processor's configuration: flags with environment fallbacks, validated
//! at start. Defaults point at the local services of `scripts/services.sh`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use stream_actors::kafka::{Brokers, KafkaSecurityArgs, SettingError};
use stream_actors::PipelineConfig;

/// A setting that cannot work, named as the user wrote it.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {flag} ({env}): {reason}")]
pub struct ConfigError {
    /// The flag, e.g. `--batch-size`.
    pub flag: &'static str,
    /// The environment variable, e.g. `BATCH_SIZE`.
    pub env: &'static str,
    /// What is wrong with the value.
    pub reason: String,
}

impl From<SettingError> for ConfigError {
    fn from(error: SettingError) -> ConfigError {
        ConfigError {
            flag: error.flag,
            env: error.env,
            reason: error.reason,
        }
    }
}

/// The local PostgreSQL of `scripts/services.sh` (its demo password).
pub(crate) const LOCAL_POSTGRES_URL: &str = "postgres://postgres:postgres@127.0.0.1:5432/pipeline";

/// Where the pipeline's services are: shared by `processor` and `streamctl`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// How to reach them: TLS and SASL.
    #[command(flatten)]
    pub kafka_security: KafkaSecurityArgs,
    /// Consumer group; also the key of the persisted checkpoint.
    #[arg(long, env = "KAFKA_GROUP", default_value = "processor")]
    pub group: String,
    /// Source topic.
    #[arg(long, env = "KAFKA_TOPIC", default_value = "events")]
    pub topic: String,
    /// Dead-letter topic for poison records.
    #[arg(long, env = "KAFKA_DLQ_TOPIC", default_value = "events.dlq")]
    pub dlq_topic: String,
    /// PostgreSQL URL: the `events` table and the checkpoints live there.
    /// It carries the password, so its value is never printed (default: the
    /// local cluster of scripts/services.sh,
    /// postgres://postgres:***@127.0.0.1:5432/pipeline).
    #[arg(
        long,
        env = "POSTGRES_URL",
        default_value = LOCAL_POSTGRES_URL,
        hide_default_value = true,
        hide_env_values = true
    )]
    pub postgres_url: String,
    /// ClickHouse HTTP URL.
    #[arg(long, env = "CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    pub clickhouse_url: String,
    /// ClickHouse database holding the `events` table.
    #[arg(long, env = "CLICKHOUSE_DATABASE", default_value = "pipeline")]
    pub clickhouse_database: String,
    /// CA certificates (PEM) an https:// ClickHouse's certificate must chain
    /// to (default: the public web PKI).
    #[arg(long, env = "CLICKHOUSE_CA_FILE")]
    pub clickhouse_ca_file: Option<std::path::PathBuf>,
    /// ClickHouse user (default: the server's default user).
    #[arg(long, env = "CLICKHOUSE_USER")]
    pub clickhouse_user: Option<String>,
    /// ClickHouse password.
    #[arg(long, env = "CLICKHOUSE_PASSWORD", hide_env_values = true)]
    pub clickhouse_password: Option<String>,
}

impl ConnectionArgs {
    /// Checks the connection settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka()?;
        for (value, flag, env) in [
            (&self.group, "--group", "KAFKA_GROUP"),
            (&self.topic, "--topic", "KAFKA_TOPIC"),
            (&self.dlq_topic, "--dlq-topic", "KAFKA_DLQ_TOPIC"),
            (
                &self.clickhouse_database,
                "--clickhouse-database",
                "CLICKHOUSE_DATABASE",
            ),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(flag, env, "must not be empty"));
            }
        }
        if self.topic == self.dlq_topic {
            return Err(invalid(
                "--dlq-topic",
                "KAFKA_DLQ_TOPIC",
                format!("must differ from --topic ({})", self.topic),
            ));
        }
        validate_postgres_url(&self.postgres_url)?;
        if !(self.clickhouse_url.starts_with("http://")
            || self.clickhouse_url.starts_with("https://"))
        {
            return Err(invalid(
                "--clickhouse-url",
                "CLICKHOUSE_URL",
                format!(
                    "must start with http:// or https://, got {:?}",
                    stream_actors::storage::redact_url(&self.clickhouse_url)
                ),
            ));
        }
        if let Some(ca_file) = &self.clickhouse_ca_file {
            if !self.clickhouse_url.starts_with("https://") {
                return Err(invalid(
                    "--clickhouse-ca-file",
                    "CLICKHOUSE_CA_FILE",
                    "is only used with an https:// --clickhouse-url",
                ));
            }
            stream_actors::clickhouse_tls::root_store(ca_file)
                .map_err(|reason| invalid("--clickhouse-ca-file", "CLICKHOUSE_CA_FILE", reason))?;
        }
        Ok(())
    }

    /// The brokers and how to reach them: the security settings checked
    /// (their files read) now.
    pub fn kafka(&self) -> Result<Brokers, ConfigError> {
        validate_brokers(&self.brokers)
            .map_err(|reason| invalid("--brokers", "KAFKA_BROKERS", reason))?;
        Ok(self.kafka_security.resolve(&self.brokers)?)
    }

    /// A pipeline configuration with these connections and default tuning.
    pub fn pipeline_config(&self) -> Result<PipelineConfig, ConfigError> {
        Ok(PipelineConfig {
            brokers: self.kafka()?,
            group_id: self.group.clone(),
            topic: self.topic.clone(),
            dlq_topic: self.dlq_topic.clone(),
            postgres_url: self.postgres_url.clone(),
            clickhouse_url: self.clickhouse_url.clone(),
            clickhouse_database: self.clickhouse_database.clone(),
            clickhouse_user: self.clickhouse_user.clone(),
            clickhouse_password: self.clickhouse_password.clone(),
            clickhouse_ca_file: self.clickhouse_ca_file.clone(),
            ..PipelineConfig::local_defaults()
        })
    }
}

/// Where the SQS API is and which queues to use: shared by `sqs-consumer`,
/// `streamctl sqs` and the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct SqsArgs {
    /// SQS endpoint URL (moto locally, ElasticMQ in Kubernetes).
    #[arg(long, env = "SQS_ENDPOINT", default_value = "http://127.0.0.1:4566")]
    pub sqs_endpoint: String,
    /// SQS region.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub sqs_region: String,
    /// SQS access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", default_value = "test")]
    pub sqs_access_key_id: String,
    /// SQS secret access key.
    #[arg(
        long,
        env = "AWS_SECRET_ACCESS_KEY",
        default_value = "test",
        hide_env_values = true
    )]
    pub sqs_secret_access_key: String,
    /// The orders queue.
    #[arg(long, env = "SQS_QUEUE", default_value = "orders")]
    pub queue: String,
    /// Its dead-letter queue.
    #[arg(long, env = "SQS_DLQ", default_value = "orders-dlq")]
    pub dlq: String,
}

impl SqsArgs {
    /// Checks the settings and builds the client settings.
    pub fn validate(&self) -> Result<stream_actors::sqs::SqsSettings, ConfigError> {
        if !(self.sqs_endpoint.starts_with("http://") || self.sqs_endpoint.starts_with("https://"))
        {
            return Err(invalid(
                "--sqs-endpoint",
                "SQS_ENDPOINT",
                format!(
                    "must start with http:// or https://, got {:?}",
                    self.sqs_endpoint
                ),
            ));
        }
        for (value, flag, env) in [
            (&self.queue, "--queue", "SQS_QUEUE"),
            (&self.dlq, "--dlq", "SQS_DLQ"),
            (&self.sqs_region, "--sqs-region", "AWS_REGION"),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(flag, env, "must not be empty"));
            }
        }
        if self.queue == self.dlq {
            return Err(invalid("--dlq", "SQS_DLQ", "must differ from --queue"));
        }
        Ok(stream_actors::sqs::SqsSettings {
            endpoint: self.sqs_endpoint.clone(),
            region: self.sqs_region.clone(),
            access_key_id: self.sqs_access_key_id.clone(),
            secret_access_key: self.sqs_secret_access_key.clone(),
        })
    }
}

/// Stores orders from an SQS queue in PostgreSQL; the broker redrives the
/// poison to the dead-letter queue after `maxReceiveCount` failed receives.
///
/// Every flag can also be set through the environment variable shown.
#[derive(Debug, Clone, Parser)]
#[command(name = "sqs-consumer", version, about, long_about = None)]
pub struct SqsConsumerConfig {
    /// Endpoint, credentials, queues.
    #[command(flatten)]
    pub sqs: SqsArgs,
    /// PostgreSQL URL: the `orders` table lives there. It carries the
    /// password, so its value is never printed (default: the local cluster
    /// of scripts/services.sh, postgres://postgres:***@127.0.0.1:5432/pipeline).
    #[arg(
        long,
        env = "POSTGRES_URL",
        default_value = LOCAL_POSTGRES_URL,
        hide_default_value = true,
        hide_env_values = true
    )]
    pub postgres_url: String,
    /// Messages processed at once (1..=100).
    #[arg(long, env = "SQS_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// Long-poll wait per receive, seconds (0..=20).
    #[arg(long, env = "SQS_WAIT_SECS", default_value_t = 5)]
    pub wait_secs: i32,
    /// Visibility timeout, renewed while an order is being stored, seconds (1..=43200).
    #[arg(long, env = "SQS_VISIBILITY_TIMEOUT_SECS", default_value_t = 30)]
    pub visibility_timeout_secs: i32,
    /// Seconds before a failed message is visible again (0..=43200).
    #[arg(long, env = "SQS_RETRY_DELAY_SECS", default_value_t = 1)]
    pub retry_delay_secs: i32,
    /// Address of the Prometheus `/metrics` endpoint; empty to disable.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9466")]
    pub metrics_addr: String,
}

impl SqsConsumerConfig {
    /// Checks every value and builds the actor's arguments.
    pub fn validate(
        &self,
    ) -> Result<
        (
            stream_actors::sqs_consumer::SqsConsumerArgs,
            Option<SocketAddr>,
        ),
        ConfigError,
    > {
        let settings = self.sqs.validate()?;
        validate_postgres_url(&self.postgres_url)?;
        in_range(
            self.concurrency,
            1..=100,
            "--concurrency",
            "SQS_CONCURRENCY",
        )?;
        in_range(self.wait_secs, 0..=20, "--wait-secs", "SQS_WAIT_SECS")?;
        in_range(
            self.visibility_timeout_secs,
            1..=43_200,
            "--visibility-timeout-secs",
            "SQS_VISIBILITY_TIMEOUT_SECS",
        )?;
        in_range(
            self.retry_delay_secs,
            0..=43_200,
            "--retry-delay-secs",
            "SQS_RETRY_DELAY_SECS",
        )?;
        let metrics_addr = parse_metrics_addr(&self.metrics_addr)?;
        Ok((
            stream_actors::sqs_consumer::SqsConsumerArgs {
                settings,
                queue: self.sqs.queue.clone(),
                dlq: self.sqs.dlq.clone(),
                postgres_url: self.postgres_url.clone(),
                concurrency: self.concurrency,
                wait_time_seconds: self.wait_secs,
                visibility_timeout_seconds: self.visibility_timeout_secs,
                retry_delay_seconds: self.retry_delay_secs,
                delete_gate: None,
            },
            metrics_addr,
        ))
    }
}

/// Parses `--metrics-addr`: empty disables the endpoint.
pub fn parse_metrics_addr(text: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.parse::<SocketAddr>().map(Some).map_err(|_| {
        invalid(
            "--metrics-addr",
            "METRICS_ADDR",
            format!("{text:?} is not an address like 127.0.0.1:9464"),
        )
    })
}

/// Moves events from Kafka into PostgreSQL and ClickHouse; dead-letters poison.
///
/// Every flag can also be set through the environment variable shown.
/// Defaults point at the local services started by `scripts/services.sh up`.
#[derive(Debug, Clone, Parser)]
#[command(name = "processor", version, about, long_about = None)]
pub struct ProcessorConfig {
    /// Where the services are.
    #[command(flatten)]
    pub connections: ConnectionArgs,
    /// Records per sink batch (1..=100000).
    #[arg(long, env = "BATCH_SIZE", default_value_t = 2000)]
    pub batch_size: usize,
    /// Milliseconds the sink waits for a batch to fill (0..=60000).
    #[arg(long, env = "LINGER_MS", default_value_t = 50)]
    pub linger_ms: u64,
    /// Capacity of each data mailbox, in messages (1..=100000).
    #[arg(long, env = "MAILBOX_CAPACITY", default_value_t = 8)]
    pub mailbox_capacity: usize,
    /// Milliseconds between checkpoints (10..=60000).
    #[arg(long, env = "COMMIT_INTERVAL_MS", default_value_t = 200)]
    pub commit_interval_ms: u64,
    /// Accepted schema versions, comma-separated.
    #[arg(
        long,
        env = "ACCEPTED_SCHEMA_VERSIONS",
        default_value = "1",
        value_delimiter = ','
    )]
    pub accepted_schema_versions: Vec<String>,
    /// Milliseconds one call to PostgreSQL or ClickHouse may take (connect,
    /// statement, insert, delete); past it the call fails like any other, so
    /// the circuit breaker opens on a hung server (100..=600000).
    #[arg(long, env = "SERVICE_TIMEOUT_MS", default_value_t = 10_000)]
    pub service_timeout_ms: u64,
    /// Milliseconds an actor may hold a message without progress before the
    /// watchdog restarts it as hung, and /healthz fails meanwhile (1000..=3600000,
    /// and at least three --service-timeout-ms).
    #[arg(long, env = "STALL_TIMEOUT_MS", default_value_t = 60_000)]
    pub stall_timeout_ms: u64,
    /// The largest record value accepted, in bytes; a larger one is
    /// dead-lettered as record_too_large (1024..=104857600).
    #[arg(long, env = "MAX_RECORD_BYTES", default_value_t = stream_actors::parse::DEFAULT_MAX_RECORD_BYTES)]
    pub max_record_bytes: usize,
    /// The longest text field (event_type, user_id) accepted, in bytes; a
    /// longer one is dead-lettered as field_too_long (16..=1048576).
    #[arg(long, env = "MAX_FIELD_BYTES", default_value_t = stream_actors::parse::DEFAULT_MAX_FIELD_BYTES)]
    pub max_field_bytes: usize,
    /// Consumer group session timeout in milliseconds: how soon a dead
    /// processor's partitions move to the others (6000..=300000, the range
    /// Kafka's group.min/max.session.timeout.ms accept by default).
    #[arg(long, env = "SESSION_TIMEOUT_MS", default_value_t = 6000)]
    pub session_timeout_ms: u64,
    /// The most bytes of records in flight between the consumer and the
    /// stores; past it the consumer pauses its partitions (still polling, so
    /// it stays in the group) until records are stored or dead-lettered.
    /// librdkafka's queue and each fetch get a quarter of it. A record
    /// larger than all of it still goes, alone (1048576..=2147483648).
    #[arg(long, env = "MAX_IN_FLIGHT_BYTES", default_value_t = stream_actors::config::DEFAULT_MAX_IN_FLIGHT_BYTES)]
    pub max_in_flight_bytes: usize,
    /// librdkafka's max.poll.interval.ms: a consumer that does not poll for
    /// this long leaves the group. The consumer polls every 100 ms even
    /// while paused, so only a hung one does (at least
    /// --session-timeout-ms, at most 86400000).
    #[arg(long, env = "MAX_POLL_INTERVAL_MS", default_value_t = 300_000)]
    pub max_poll_interval_ms: u64,
    /// Static group membership: this member's group.instance.id, unique in
    /// the group (in Kubernetes, the pod name). A restarted processor with
    /// the same id takes its partitions back without a rebalance. Unset:
    /// dynamic membership, and a killed processor's partitions wait for the
    /// session timeout.
    #[arg(long, env = "KAFKA_GROUP_INSTANCE_ID")]
    pub group_instance_id: Option<String>,
    /// Address of the admin endpoint: `/metrics`, `/healthz`, `/readyz`,
    /// `/status` (open, read-only) and `POST /actors/<name>/kill|panic|hang`
    /// (needs the admin token); empty to disable.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,
    /// A file holding the admin token (one line, at least 16 visible ASCII
    /// characters; in Kubernetes a mounted Secret): `POST /actors/...`
    /// needs `Authorization: Bearer <token>`. Unset: those routes are
    /// disabled.
    #[arg(long, env = "ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Restart intensity: at most this many pipeline restarts within
    /// --restart-window-secs; one more and the process exits 1 (0..=1000).
    #[arg(long, env = "MAX_RESTARTS", default_value_t = 10)]
    pub max_restarts: usize,
    /// The window of the restart intensity, in seconds (1..=3600).
    #[arg(long, env = "RESTART_WINDOW_SECS", default_value_t = 60)]
    pub restart_window_secs: u64,
    /// Export a span per stored batch and per dead letter over OTLP/HTTP
    /// (protobuf) to this collector, e.g. `http://otel-collector:4318`
    /// (`/v1/traces` is appended). Unset: no export; records still carry
    /// their `traceparent` to their rows and dead letters. The usual
    /// `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*` and
    /// `OTEL_EXPORTER_OTLP_HEADERS` apply.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Test only: store replays twice (no unique key, no DLQ index), on
    /// fresh databases. The recovery tests' negative control.
    #[arg(long, env = "STREAM_UNSAFE_DISABLE_DEDUP", hide = true)]
    pub unsafe_disable_dedup: bool,
}

/// Checks that a number lies in `range`; the error names the setting.
pub(crate) fn in_range<T: PartialOrd + std::fmt::Display>(
    value: T,
    range: std::ops::RangeInclusive<T>,
    flag: &'static str,
    env: &'static str,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(invalid(
        flag,
        env,
        format!("must be {}..={}, got {value}", range.start(), range.end()),
    ))
}

pub(crate) fn invalid(
    flag: &'static str,
    env: &'static str,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError {
        flag,
        env,
        reason: reason.into(),
    }
}

impl ProcessorConfig {
    /// Reads the admin token, if one is configured; the error names the
    /// setting and never contains the token.
    pub fn admin_token(&self) -> Result<Option<crate::admin::AdminToken>, ConfigError> {
        let Some(path) = &self.admin_token_file else {
            return Ok(None);
        };
        crate::admin::read_token_file(path)
            .map(|token| Some(crate::admin::AdminToken::new(&token)))
            .map_err(|reason| invalid("--admin-token-file", "ADMIN_TOKEN_FILE", reason))
    }

    /// The supervisor's restart policy (call after [`ProcessorConfig::validate`]).
    pub fn restart_policy(&self) -> stream_supervisor::RestartPolicy {
        stream_supervisor::RestartPolicy {
            max_restarts: self.max_restarts,
            window: Duration::from_secs(self.restart_window_secs),
            ..stream_supervisor::RestartPolicy::default()
        }
    }

    /// Checks every value and builds the pipeline's configuration.
    pub fn validate(&self) -> Result<(PipelineConfig, Option<SocketAddr>), ConfigError> {
        self.connections.validate()?;
        in_range(self.batch_size, 1..=100_000, "--batch-size", "BATCH_SIZE")?;
        in_range(self.linger_ms, 0..=60_000, "--linger-ms", "LINGER_MS")?;
        in_range(
            self.mailbox_capacity,
            1..=100_000,
            "--mailbox-capacity",
            "MAILBOX_CAPACITY",
        )?;
        in_range(
            self.commit_interval_ms,
            10..=60_000,
            "--commit-interval-ms",
            "COMMIT_INTERVAL_MS",
        )?;
        in_range(
            self.session_timeout_ms,
            6_000..=300_000,
            "--session-timeout-ms",
            "SESSION_TIMEOUT_MS",
        )?;
        in_range(
            self.max_in_flight_bytes,
            1024 * 1024..=2 * 1024 * 1024 * 1024,
            "--max-in-flight-bytes",
            "MAX_IN_FLIGHT_BYTES",
        )?;
        in_range(
            self.max_poll_interval_ms,
            self.session_timeout_ms..=86_400_000,
            "--max-poll-interval-ms",
            "MAX_POLL_INTERVAL_MS",
        )?;
        let group_instance_id = match self.group_instance_id.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(id) if valid_kafka_name(id) => Some(id.to_string()),
            Some(id) => {
                return Err(invalid(
                    "--group-instance-id",
                    "KAFKA_GROUP_INSTANCE_ID",
                    format!("{id:?}: use at most 249 of a-z A-Z 0-9 . _ -"),
                ))
            }
        };
        let mut accepted_schema_versions = Vec::new();
        for text in &self.accepted_schema_versions {
            let version = text.trim().parse::<u32>().map_err(|_| {
                invalid(
                    "--accepted-schema-versions",
                    "ACCEPTED_SCHEMA_VERSIONS",
                    format!("{text:?} is not a version number"),
                )
            })?;
            accepted_schema_versions.push(version);
        }
        in_range(
            self.service_timeout_ms,
            100..=600_000,
            "--service-timeout-ms",
            "SERVICE_TIMEOUT_MS",
        )?;
        in_range(
            self.stall_timeout_ms,
            1_000..=3_600_000,
            "--stall-timeout-ms",
            "STALL_TIMEOUT_MS",
        )?;
        if self.stall_timeout_ms < 3 * self.service_timeout_ms {
            return Err(invalid(
                "--stall-timeout-ms",
                "STALL_TIMEOUT_MS",
                format!(
                    "must be at least three --service-timeout-ms ({} ms): a reconnect and a statement must fit; got {}",
                    3 * self.service_timeout_ms,
                    self.stall_timeout_ms
                ),
            ));
        }
        in_range(
            self.max_record_bytes,
            1024..=100 * 1024 * 1024,
            "--max-record-bytes",
            "MAX_RECORD_BYTES",
        )?;
        in_range(
            self.max_field_bytes,
            16..=1024 * 1024,
            "--max-field-bytes",
            "MAX_FIELD_BYTES",
        )?;
        in_range(
            self.max_restarts,
            0..=1000,
            "--max-restarts",
            "MAX_RESTARTS",
        )?;
        in_range(
            self.restart_window_secs,
            1..=3600,
            "--restart-window-secs",
            "RESTART_WINDOW_SECS",
        )?;
        let metrics_addr = parse_metrics_addr(&self.metrics_addr)?;
        if let Some(endpoint) = &self.otlp_endpoint {
            validate_otlp_endpoint(endpoint)?;
        }
        let config = PipelineConfig {
            dedup: !self.unsafe_disable_dedup,
            batch_size: self.batch_size,
            linger: Duration::from_millis(self.linger_ms),
            mailbox_capacity: self.mailbox_capacity,
            commit_interval: Duration::from_millis(self.commit_interval_ms),
            accepted_schema_versions,
            service_timeout: Duration::from_millis(self.service_timeout_ms),
            stall_timeout: Duration::from_millis(self.stall_timeout_ms),
            max_record_bytes: self.max_record_bytes,
            max_field_bytes: self.max_field_bytes,
            session_timeout: Duration::from_millis(self.session_timeout_ms),
            max_in_flight_bytes: self.max_in_flight_bytes,
            max_poll_interval: Duration::from_millis(self.max_poll_interval_ms),
            group_instance_id,
            ..self.connections.pipeline_config()?
        };
        Ok((config, metrics_addr))
    }
}

/// Checks an OTLP/HTTP collector URL: `http://host[:port][/path]`.
/// `https://` is refused here (this build's exporter speaks plain HTTP:
/// reach a collector over TLS through a local agent or sidecar).
pub fn validate_otlp_endpoint(endpoint: &str) -> Result<(), ConfigError> {
    let refuse = |reason: String| {
        Err(invalid(
            "--otlp-endpoint",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            reason,
        ))
    };
    if endpoint.starts_with("https://") {
        return refuse(format!(
            "{endpoint:?}: this build exports over plain http only; point it at a collector (agent or sidecar) on http://"
        ));
    }
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return refuse(format!(
            "{endpoint:?} is not an http:// URL (the collector's OTLP/HTTP base, e.g. http://127.0.0.1:4318)"
        ));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        Some(_) => return refuse(format!("{endpoint:?}: the port is not a number")),
        None => authority,
    };
    if host.is_empty() || authority.contains('@') || endpoint.contains(['?', '#', ' ']) {
        return refuse(format!(
            "{endpoint:?}: expected http://host[:port][/path], without credentials, query or fragment"
        ));
    }
    Ok(())
}

/// Whether a name is one Kafka accepts for a topic or a group instance:
/// 1 to 249 characters of ASCII letters, digits, `.`, `_` and `-`.
pub fn valid_kafka_name(name: &str) -> bool {
    (1..=249).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Checks a PostgreSQL URL, its TLS settings (`sslmode`, `sslrootcert`)
/// included: a setting this build cannot honour fails here, at start.
pub fn validate_postgres_url(url: &str) -> Result<(), ConfigError> {
    stream_actors::postgres_tls::PostgresTarget::parse(url)
        .map(|_| ())
        .map_err(|reason| invalid("--postgres-url", "POSTGRES_URL", reason))
}

/// Checks `host:port[,host:port]`.
pub fn validate_brokers(brokers: &str) -> Result<(), String> {
    if brokers.trim().is_empty() {
        return Err("must not be empty".to_string());
    }
    for broker in brokers.split(',') {
        let Some((host, port)) = broker.trim().rsplit_once(':') else {
            return Err(format!("{broker:?} is not host:port"));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("{broker:?} is not host:port"));
        }
    }
    Ok(())
}

/// Parses command-line flags; on a bad flag prints one line naming it and exits 2.
/// `--help` and `--version` print as usual and exit 0.
pub fn parse_or_exit<T: Parser>() -> T {
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(clap_error) => {
            use clap::error::ErrorKind;
            if matches!(
                clap_error.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = clap_error.print();
                std::process::exit(0);
            }
            let rendered = clap_error.render().to_string();
            let first_line = rendered
                .lines()
                .find(|line| !line.trim().is_empty())
                .unwrap_or("error: bad arguments");
            eprintln!("{first_line}");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_endpoints_are_checked() {
        for good in [
            "http://127.0.0.1:4318",
            "http://otel-collector:4318/",
            "http://collector.observability.svc/otlp",
        ] {
            assert!(validate_otlp_endpoint(good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("https://collector:4318", "plain http only"),
            ("collector:4318", "not an http:// URL"),
            ("http://:4318", "expected http://host"),
            ("http://collector:port", "port is not a number"),
            ("http://user:secret@collector:4318", "without credentials"),
            ("http://collector:4318/?x=1", "query"),
        ] {
            let error = validate_otlp_endpoint(bad).expect_err(bad).to_string();
            assert!(
                error.contains(says) && error.contains("--otlp-endpoint"),
                "{bad}: {error}"
            );
        }
    }

    fn parse(arguments: &[&str]) -> ProcessorConfig {
        let mut full = vec!["processor"];
        full.extend_from_slice(arguments);
        ProcessorConfig::try_parse_from(full).expect("parses")
    }

    #[test]
    fn defaults_are_valid_and_point_at_local_services() {
        let (config, metrics_addr) = parse(&[]).validate().expect("valid");
        assert_eq!(config.brokers.servers, "127.0.0.1:9092");
        assert_eq!(config.topic, "events");
        assert_eq!(config.dlq_topic, "events.dlq");
        assert_eq!(metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(
            config.group_instance_id, None,
            "dynamic membership by default"
        );
    }

    #[test]
    fn a_group_instance_id_makes_the_membership_static() {
        let (config, _) = parse(&["--group-instance-id", "processor-7d9f-x2"])
            .validate()
            .expect("valid");
        assert_eq!(
            config.group_instance_id.as_deref(),
            Some("processor-7d9f-x2")
        );
        let (config, _) = parse(&["--group-instance-id", ""])
            .validate()
            .expect("valid");
        assert_eq!(config.group_instance_id, None, "empty means unset");
    }

    #[test]
    fn each_bad_value_names_its_setting() {
        let cases: [(&[&str], &str); 9] = [
            (&["--brokers", "nohostport"], "--brokers"),
            (&["--session-timeout-ms", "3000"], "--session-timeout-ms"),
            (&["--group-instance-id", "pod 0"], "--group-instance-id"),
            (&["--batch-size", "0"], "--batch-size"),
            (&["--mailbox-capacity", "0"], "--mailbox-capacity"),
            (&["--postgres-url", "mysql:://x"], "--postgres-url"),
            (&["--clickhouse-url", "127.0.0.1:8123"], "--clickhouse-url"),
            (&["--dlq-topic", "events"], "--dlq-topic"),
            (
                &["--accepted-schema-versions", "1,x"],
                "--accepted-schema-versions",
            ),
        ];
        for (arguments, flag) in cases {
            let error = parse(arguments).validate().expect_err("invalid");
            assert_eq!(error.flag, flag, "{arguments:?}");
            assert!(error.to_string().contains(flag));
        }
    }
}
