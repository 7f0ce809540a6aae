//! `streamctl lag`: a consumer group's lag read from the broker's side, not
//! from the consumer. Per partition: the end offset (high watermark), the
//! group's committed offset in Kafka and, with `--postgres-url`, the
//! pipeline's persisted checkpoint. The processor's own gauge
//! (`stream_consumer_lag`, from librdkafka's statistics) vanishes with the
//! processor; this keeps measuring while it is down, which is when lag
//! climbs.
//!
//! Without `--serve` it prints one reading and exits. With `--serve ADDR` it
//! reads every `--interval-secs` and serves the last reading as Prometheus
//! metrics on `ADDR/metrics` (job `lag-exporter`). A source that cannot be
//! read (the broker, or PostgreSQL for the checkpoint) reports
//! `stream_lag_exporter_up{source} 0` and its series are left out until it
//! answers again: an unknown lag is absent, never a stale number.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusBuilder;
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use stream_actors::kafka::{Brokers, KafkaSecurityArgs};
use tracing::{info, warn};

use crate::config::{in_range, invalid, validate_brokers, validate_postgres_url, ConfigError};

/// Records behind the end: end offset minus the group's committed offset
/// (gauge; labels `group`, `topic`, `partition`).
pub const GROUP_LAG: &str = "stream_group_lag";
/// Records behind the end: end offset minus the persisted checkpoint (gauge).
pub const CHECKPOINT_LAG: &str = "stream_checkpoint_lag";
/// The partition's end offset, the high watermark (gauge; `topic`, `partition`).
pub const END_OFFSET: &str = "stream_partition_end_offset";
/// The group's committed offset in Kafka (gauge).
pub const COMMITTED_OFFSET: &str = "stream_group_committed_offset";
/// The pipeline's persisted checkpoint, the next offset to read (gauge).
pub const CHECKPOINT_OFFSET: &str = "stream_group_checkpoint_offset";
/// 1 when the last read of a source (`source`: kafka, checkpoint) succeeded (gauge).
pub const EXPORTER_UP: &str = "stream_lag_exporter_up";
/// Reads of a source that failed (counter).
pub const READ_FAILURES: &str = "stream_lag_exporter_read_failures_total";

/// How long one read of the broker or of PostgreSQL may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// `streamctl lag`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LagArgs {
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// How to reach them: TLS and SASL.
    #[command(flatten)]
    pub kafka_security: KafkaSecurityArgs,
    /// The consumer group whose lag to measure.
    #[arg(long, env = "KAFKA_GROUP", default_value = "processor")]
    pub group: String,
    /// The topic it reads.
    #[arg(long, env = "KAFKA_TOPIC", default_value = "events")]
    pub topic: String,
    /// PostgreSQL URL of the pipeline's checkpoints: with it, the lag
    /// behind the persisted checkpoint (where a restarted processor
    /// resumes) is read too. Its value is never printed.
    #[arg(long, env = "POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<String>,
    /// Serve the readings as Prometheus metrics on this address
    /// (`/metrics`, and `/healthz`) until stopped, instead of printing one.
    #[arg(long, env = "LAG_EXPORTER_ADDR")]
    pub serve: Option<SocketAddr>,
    /// Seconds between readings while serving (0.2..=60).
    #[arg(long, env = "LAG_INTERVAL_SECS", default_value_t = 1.0)]
    pub interval_secs: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl LagArgs {
    /// Checks the settings; the error names the one that is wrong.
    pub fn validate(&self) -> Result<Brokers, ConfigError> {
        validate_brokers(&self.brokers)
            .map_err(|reason| invalid("--brokers", "KAFKA_BROKERS", reason))?;
        for (value, flag, env) in [
            (&self.group, "--group", "KAFKA_GROUP"),
            (&self.topic, "--topic", "KAFKA_TOPIC"),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(flag, env, "must not be empty"));
            }
        }
        if let Some(url) = &self.postgres_url {
            validate_postgres_url(url)?;
        }
        in_range(
            self.interval_secs,
            0.2..=60.0,
            "--interval-secs",
            "LAG_INTERVAL_SECS",
        )?;
        Ok(self.kafka_security.resolve(&self.brokers)?)
    }

    /// A reader for these settings.
    pub fn reader(&self, brokers: &Brokers) -> anyhow::Result<LagReader> {
        LagReader::new(brokers, &self.group, &self.topic, self.postgres_url.clone())
    }
}

/// One partition's positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition.
    pub partition: i32,
    /// The first offset still in the log (the low watermark).
    pub start: i64,
    /// The end offset (the high watermark): the next record's offset.
    pub end: i64,
    /// The group's committed offset in Kafka, if it committed one.
    pub committed: Option<i64>,
    /// The persisted checkpoint, if read and present.
    pub checkpoint: Option<i64>,
}

impl PartitionLag {
    /// Records behind the end for the group's committed offset; a
    /// partition the group never committed lags by all it holds.
    pub fn group_lag(&self) -> i64 {
        behind(self.start, self.end, self.committed)
    }

    /// Records behind the end for the persisted checkpoint.
    pub fn checkpoint_lag(&self) -> i64 {
        behind(self.start, self.end, self.checkpoint)
    }
}

fn behind(start: i64, end: i64, position: Option<i64>) -> i64 {
    (end - position.unwrap_or(start)).max(0)
}

/// One reading of a group on a topic.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// The group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// Per partition, in order; empty when the broker could not be read.
    pub partitions: Vec<PartitionLag>,
    /// Why the broker could not be read.
    pub kafka_error: Option<String>,
    /// Whether the checkpoint was asked for.
    pub checkpoint_read: bool,
    /// Why the checkpoint could not be read.
    pub checkpoint_error: Option<String>,
}

impl Reading {
    /// The group's lag over all partitions (None when the broker could not be read).
    pub fn group_lag(&self) -> Option<i64> {
        self.kafka_error
            .is_none()
            .then(|| self.partitions.iter().map(PartitionLag::group_lag).sum())
    }

    /// The lag behind the checkpoint over all partitions, when it was read.
    pub fn checkpoint_lag(&self) -> Option<i64> {
        (self.kafka_error.is_none() && self.checkpoint_read && self.checkpoint_error.is_none())
            .then(|| {
                self.partitions
                    .iter()
                    .map(PartitionLag::checkpoint_lag)
                    .sum()
            })
    }

    /// A table for a terminal.
    pub fn render(&self) -> String {
        let mut lines = vec![format!(
            "group {} on topic {} (lag = end offset - position)",
            self.group, self.topic
        )];
        if let Some(error) = &self.kafka_error {
            lines.push(format!("kafka: cannot read: {error}"));
            return lines.join("\n") + "\n";
        }
        let show = |value: Option<i64>| value.map_or("-".to_string(), |value| value.to_string());
        lines.push(format!(
            "{:>9} {:>12} {:>12} {:>12} {:>10} {:>12} {:>14}",
            "partition", "start", "end", "committed", "lag", "checkpoint", "checkpoint lag"
        ));
        for partition in &self.partitions {
            lines.push(format!(
                "{:>9} {:>12} {:>12} {:>12} {:>10} {:>12} {:>14}",
                partition.partition,
                partition.start,
                partition.end,
                show(partition.committed),
                partition.group_lag(),
                show(partition.checkpoint),
                if self.checkpoint_lag().is_some() {
                    partition.checkpoint_lag().to_string()
                } else {
                    "-".to_string()
                },
            ));
        }
        lines.push(format!(
            "lag: {} behind the committed offsets; {}",
            show(self.group_lag()),
            match (&self.checkpoint_error, self.checkpoint_lag()) {
                (Some(error), _) => format!("checkpoint: cannot read: {error}"),
                (None, Some(lag)) => format!("{lag} behind the persisted checkpoint"),
                (None, None) => "checkpoint: not read (no --postgres-url)".to_string(),
            }
        ));
        lines.join("\n") + "\n"
    }
}

/// Reads a group's positions; keeps its clients between readings.
pub struct LagReader {
    consumer: Arc<BaseConsumer>,
    group: String,
    topic: String,
    postgres_url: Option<String>,
    postgres: Option<tokio_postgres::Client>,
    brokers: String,
}

impl LagReader {
    /// A reader for `group` on `topic`; the checkpoint is read when
    /// `postgres_url` is given. Creating it does not contact anything.
    pub fn new(
        brokers: &Brokers,
        group: &str,
        topic: &str,
        postgres_url: Option<String>,
    ) -> anyhow::Result<LagReader> {
        // The group id is only the key of the committed offsets: the client
        // subscribes to nothing and joins no group.
        let consumer: BaseConsumer = brokers
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .with_context(|| format!("cannot create a kafka client for {brokers}"))?;
        Ok(LagReader {
            consumer: Arc::new(consumer),
            group: group.to_string(),
            topic: topic.to_string(),
            postgres_url,
            postgres: None,
            brokers: brokers.to_string(),
        })
    }

    /// One reading. A source that cannot be read is named in the reading,
    /// not returned as an error.
    pub async fn read(&mut self) -> Reading {
        let mut reading = Reading {
            group: self.group.clone(),
            topic: self.topic.clone(),
            checkpoint_read: self.postgres_url.is_some(),
            ..Reading::default()
        };
        let consumer = Arc::clone(&self.consumer);
        let (group, topic, brokers) =
            (self.group.clone(), self.topic.clone(), self.brokers.clone());
        match tokio::task::spawn_blocking(move || read_kafka(&consumer, &brokers, &group, &topic))
            .await
            .context("the kafka read failed")
            .and_then(|result| result)
        {
            Ok(partitions) => reading.partitions = partitions,
            Err(error) => reading.kafka_error = Some(format!("{error:#}")),
        }
        if self.postgres_url.is_some() {
            match self.read_checkpoint().await {
                Ok(checkpoint) => {
                    for partition in &mut reading.partitions {
                        partition.checkpoint = checkpoint.get(&partition.partition).copied();
                    }
                }
                Err(error) => {
                    self.postgres = None;
                    reading.checkpoint_error = Some(format!("{error:#}"));
                }
            }
        }
        reading
    }

    async fn read_checkpoint(&mut self) -> anyhow::Result<BTreeMap<i32, i64>> {
        let Some(url) = &self.postgres_url else {
            return Ok(BTreeMap::new());
        };
        if self
            .postgres
            .as_ref()
            .is_none_or(|client| client.is_closed())
        {
            self.postgres =
                Some(stream_actors::storage::connect_postgres_within(url, READ_TIMEOUT).await?);
        }
        let client = self.postgres.as_ref().expect("connected above");
        let query = crate::inspect::checkpoint_offsets_on(client, &self.group, &self.topic);
        tokio::time::timeout(READ_TIMEOUT, query)
            .await
            .map_err(|_| anyhow::anyhow!("postgres did not answer within {READ_TIMEOUT:?}"))?
    }
}

/// The topic's partitions with their watermarks and the group's committed
/// offsets (blocking: each call waits on the broker).
fn read_kafka(
    consumer: &BaseConsumer,
    brokers: &str,
    group: &str,
    topic: &str,
) -> anyhow::Result<Vec<PartitionLag>> {
    let ids = stream_actors::topic::partitions_on(consumer, &brokers, topic, READ_TIMEOUT)?;
    let mut wanted = TopicPartitionList::new();
    for partition in &ids {
        wanted.add_partition(topic, *partition);
    }
    let committed: BTreeMap<i32, i64> = consumer
        .committed_offsets(wanted, READ_TIMEOUT)
        .with_context(|| format!("cannot read the committed offsets of group {group}"))?
        .elements()
        .iter()
        .filter_map(|element| match element.offset() {
            Offset::Offset(offset) => Some((element.partition(), offset)),
            _ => None,
        })
        .collect();
    ids.into_iter()
        .map(|partition| {
            let (start, end) = consumer
                .fetch_watermarks(topic, partition, READ_TIMEOUT)
                .with_context(|| format!("cannot read the offsets of {topic}/{partition}"))?;
            Ok(PartitionLag {
                partition,
                start,
                end,
                committed: committed.get(&partition).copied(),
                checkpoint: None,
            })
        })
        .collect()
}

/// Failed reads per source, over the exporter's life.
#[derive(Debug, Clone, Copy, Default)]
pub struct Failures {
    /// Failed reads of the broker.
    pub kafka: u64,
    /// Failed reads of the checkpoint.
    pub checkpoint: u64,
}

/// The Prometheus exposition of a reading.
pub fn exposition(reading: &Reading, failures: &Failures) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        metrics::describe_gauge!(GROUP_LAG, "Records behind the end: end offset minus the group's committed offset (read from the broker).");
        metrics::describe_gauge!(
            CHECKPOINT_LAG,
            "Records behind the end: end offset minus the pipeline's persisted checkpoint."
        );
        metrics::describe_gauge!(END_OFFSET, "The partition's end offset (high watermark).");
        metrics::describe_gauge!(COMMITTED_OFFSET, "The group's committed offset in Kafka.");
        metrics::describe_gauge!(
            CHECKPOINT_OFFSET,
            "The pipeline's persisted checkpoint: the next offset a restart reads."
        );
        metrics::describe_gauge!(
            EXPORTER_UP,
            "1 when the last read of the source succeeded, 0 when it failed."
        );
        metrics::describe_counter!(READ_FAILURES, "Reads of a source that failed.");
        let group = reading.group.clone();
        let topic = reading.topic.clone();
        let checkpoint_known = reading.checkpoint_lag().is_some();
        for partition in &reading.partitions {
            let id = partition.partition.to_string();
            let labels = [
                ("group", group.clone()),
                ("topic", topic.clone()),
                ("partition", id.clone()),
            ];
            metrics::gauge!(END_OFFSET, "topic" => topic.clone(), "partition" => id.clone())
                .set(partition.end as f64);
            metrics::gauge!(GROUP_LAG, &labels).set(partition.group_lag() as f64);
            if let Some(committed) = partition.committed {
                metrics::gauge!(COMMITTED_OFFSET, &labels).set(committed as f64);
            }
            if checkpoint_known {
                metrics::gauge!(CHECKPOINT_LAG, &labels).set(partition.checkpoint_lag() as f64);
                if let Some(checkpoint) = partition.checkpoint {
                    metrics::gauge!(CHECKPOINT_OFFSET, &labels).set(checkpoint as f64);
                }
            }
        }
        let mut sources = vec![("kafka", reading.kafka_error.is_none(), failures.kafka)];
        if reading.checkpoint_read {
            sources.push(("checkpoint", checkpoint_known, failures.checkpoint));
        }
        for (source, up, failed) in sources {
            let labels = [
                ("group", group.clone()),
                ("topic", topic.clone()),
                ("source", source.to_string()),
            ];
            metrics::gauge!(EXPORTER_UP, &labels).set(if up { 1.0 } else { 0.0 });
            metrics::counter!(READ_FAILURES, &labels).absolute(failed);
        }
    });
    handle.render()
}

/// Reads once and prints the table (or JSON). Exits 1 when a source (the
/// broker, or the checkpoint when asked for) cannot be read.
pub async fn print_once(arguments: &LagArgs, brokers: &Brokers) -> anyhow::Result<i32> {
    let mut reader = arguments.reader(brokers)?;
    let reading = reader.read().await;
    if arguments.json {
        let checkpoint_known = reading.checkpoint_lag().is_some();
        let partitions: Vec<serde_json::Value> = reading
            .partitions
            .iter()
            .map(|partition| {
                serde_json::json!({
                    "partition": partition.partition,
                    "start": partition.start,
                    "end": partition.end,
                    "committed": partition.committed,
                    "lag": partition.group_lag(),
                    "checkpoint": partition.checkpoint,
                    "checkpoint_lag": checkpoint_known.then(|| partition.checkpoint_lag()),
                })
            })
            .collect();
        let answer = serde_json::json!({
            "group": reading.group,
            "topic": reading.topic,
            "lag": reading.group_lag(),
            "checkpoint_lag": reading.checkpoint_lag(),
            "kafka_error": reading.kafka_error,
            "checkpoint_error": reading.checkpoint_error,
            "partitions": partitions,
        });
        println!("{answer}");
    } else {
        print!("{}", reading.render());
    }
    Ok(
        if reading.kafka_error.is_some() || reading.checkpoint_error.is_some() {
            1
        } else {
            0
        },
    )
}

/// What `/metrics` serves: the last reading's exposition.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<String>>);

/// Reads every `--interval-secs` and serves the last reading on `address`
/// until the process is stopped; returns 2 (having said why, naming
/// `--serve`) when the address cannot be bound.
pub async fn serve(
    arguments: &LagArgs,
    brokers: &Brokers,
    address: SocketAddr,
) -> anyhow::Result<i32> {
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("error: invalid setting --serve (LAG_EXPORTER_ADDR): cannot listen on {address}: {error}");
            return Ok(2);
        }
    };
    let mut reader = arguments.reader(brokers)?;
    let shared = Shared::default();
    let app = crate::admin::with_limits(
        Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" })),
    )
    .with_state(shared.clone());
    tokio::spawn(crate::admin::serve_router(listener, app));
    eprintln!(
        "streamctl lag: serving the lag of group {} on topic {} at http://{address}/metrics, read every {} s{}",
        arguments.group,
        arguments.topic,
        arguments.interval_secs,
        if arguments.postgres_url.is_some() {
            " (with the persisted checkpoint)"
        } else {
            ""
        }
    );
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(arguments.interval_secs));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = Failures::default();
    let mut last = (None::<String>, None::<String>);
    loop {
        ticks.tick().await;
        let began = Instant::now();
        let reading = reader.read().await;
        failures.kafka += u64::from(reading.kafka_error.is_some());
        failures.checkpoint += u64::from(reading.checkpoint_error.is_some());
        *shared.0.lock() = exposition(&reading, &failures);
        // Log a source's failure when it starts or changes, and its recovery.
        for (source, now, before) in [
            ("kafka", &reading.kafka_error, &last.0),
            ("checkpoint", &reading.checkpoint_error, &last.1),
        ] {
            match (now, before) {
                (Some(error), previous) if previous.as_ref() != Some(error) => {
                    warn!(source, %error, "lag: cannot read")
                }
                (None, Some(_)) => info!(source, "lag: reading again"),
                _ => {}
            }
        }
        tracing::debug!(took = ?began.elapsed(), lag = ?reading.group_lag(), "lag read");
        last = (
            reading.kafka_error.clone(),
            reading.checkpoint_error.clone(),
        );
    }
}

async fn metrics(axum::extract::State(shared): axum::extract::State<Shared>) -> impl IntoResponse {
    let body = shared.0.lock().clone();
    if body.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "no reading yet\n".to_string(),
        );
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(
        partition: i32,
        start: i64,
        end: i64,
        committed: Option<i64>,
        checkpoint: Option<i64>,
    ) -> PartitionLag {
        PartitionLag {
            partition,
            start,
            end,
            committed,
            checkpoint,
        }
    }

    #[test]
    fn lag_is_end_minus_position_or_everything_held() {
        assert_eq!(partition(0, 0, 100, Some(40), None).group_lag(), 60);
        assert_eq!(partition(0, 30, 100, None, None).group_lag(), 70);
        assert_eq!(partition(0, 0, 100, None, Some(100)).checkpoint_lag(), 0);
        // A position past the end (a truncated topic) is not negative lag.
        assert_eq!(partition(0, 0, 10, Some(12), None).group_lag(), 0);
    }

    #[test]
    fn an_unreadable_source_exports_up_0_and_no_stale_series() {
        let reading = Reading {
            group: "g".into(),
            topic: "t".into(),
            kafka_error: Some("1/1 brokers are down".into()),
            checkpoint_read: true,
            ..Reading::default()
        };
        let text = exposition(
            &reading,
            &Failures {
                kafka: 3,
                checkpoint: 0,
            },
        );
        assert!(
            text.contains(r#"stream_lag_exporter_up{group="g",topic="t",source="kafka"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"stream_lag_exporter_read_failures_total{group="g",topic="t",source="kafka"} 3"#
            ),
            "{text}"
        );
        assert!(!text.contains("stream_group_lag{"), "{text}");
        assert!(!text.contains("stream_checkpoint_lag{"), "{text}");
    }

    #[test]
    fn a_reading_exports_every_partition() {
        let reading = Reading {
            group: "g".into(),
            topic: "t".into(),
            partitions: vec![
                partition(0, 0, 10, Some(4), Some(3)),
                partition(1, 0, 5, None, None),
            ],
            checkpoint_read: true,
            ..Reading::default()
        };
        let text = exposition(&reading, &Failures::default());
        for line in [
            r#"stream_group_lag{group="g",topic="t",partition="0"} 6"#,
            r#"stream_group_lag{group="g",topic="t",partition="1"} 5"#,
            r#"stream_checkpoint_lag{group="g",topic="t",partition="0"} 7"#,
            r#"stream_checkpoint_lag{group="g",topic="t",partition="1"} 5"#,
            r#"stream_partition_end_offset{topic="t",partition="0"} 10"#,
            r#"stream_group_committed_offset{group="g",topic="t",partition="0"} 4"#,
            r#"stream_group_checkpoint_offset{group="g",topic="t",partition="0"} 3"#,
            r#"stream_lag_exporter_up{group="g",topic="t",source="checkpoint"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(
            !text.contains(r#"stream_group_committed_offset{group="g",topic="t",partition="1"}"#)
        );
        assert_eq!(reading.group_lag(), Some(11));
        assert_eq!(reading.checkpoint_lag(), Some(12));
    }
}
