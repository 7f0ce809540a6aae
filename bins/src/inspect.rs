//! Independent reads of what the pipeline did: topic end offsets, the
//! dead-letter topic, the stores and the checkpoint. Used by `streamctl` and by
//! the tests; none of it goes through the pipeline's actors.

use std::collections::BTreeMap;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};

use rdkafka::{Offset, TopicPartitionList};
use stream_actors::kafka::Brokers;
use stream_actors::storage::{connect_postgres, ClickHouseEvents};
use stream_actors::PipelineConfig;

use stream_actors::topic::KAFKA_TIMEOUT;
pub use stream_actors::topic::{end_offsets, partitions, plain_consumer, read_topic, ReadRecord};

/// [`end_offsets`] on a blocking thread: it waits on the broker (one
/// ListOffsets per partition), which inside async code would hold a runtime
/// worker, and with it half of an in-process pipeline on two cores.
pub async fn end_offsets_async(
    brokers: &Brokers,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let (brokers, topic) = (brokers.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || end_offsets(&brokers, &topic))
        .await
        .context("the end offsets task failed")?
}

/// The consumer group's committed offsets in Kafka, per partition.
pub fn kafka_committed_offsets(
    brokers: &Brokers,
    group: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let consumer: BaseConsumer = brokers
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .context("cannot create a kafka client")?;
    let mut wanted = TopicPartitionList::new();
    for partition in partitions(brokers, topic)? {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(wanted, KAFKA_TIMEOUT)
        .with_context(|| format!("cannot read committed offsets of group {group}"))?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|element| match element.offset() {
            Offset::Offset(offset) => Some((element.partition(), offset)),
            _ => None,
        })
        .collect())
}

/// The persisted checkpoint, per partition.
pub async fn checkpoint_offsets(
    postgres_url: &str,
    group: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    checkpoint_offsets_on(&connect_postgres(postgres_url).await?, group, topic).await
}

/// [`checkpoint_offsets`] on a connection the caller keeps (empty when the
/// table does not exist yet).
pub async fn checkpoint_offsets_on(
    client: &tokio_postgres::Client,
    group: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    if !table_exists(client, "pipeline_checkpoints").await? {
        return Ok(BTreeMap::new());
    }
    let rows = client
        .query(
            "SELECT partition, next_offset FROM pipeline_checkpoints WHERE consumer_group = $1 AND topic = $2",
            &[&group, &topic],
        )
        .await
        .context("cannot read pipeline_checkpoints")?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<_, i32>(0), row.get::<_, i64>(1)))
        .collect())
}

/// Whether a PostgreSQL table exists (the pipeline creates its tables on start).
pub async fn table_exists(client: &tokio_postgres::Client, table: &str) -> anyhow::Result<bool> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get(0))
}

/// When the newest checkpoint was written, in seconds since the Unix epoch
/// (0 when there is none yet or the database cannot be read): the recovery
/// tests and benchmark time "the first new commit" with it.
pub async fn last_checkpoint_at(postgres_url: &str) -> f64 {
    let Ok(client) = connect_postgres(postgres_url).await else {
        return 0.0;
    };
    if !table_exists(&client, "pipeline_checkpoints")
        .await
        .unwrap_or(false)
    {
        return 0.0;
    }
    client
        .query_one(
            "SELECT COALESCE(EXTRACT(EPOCH FROM max(updated_at))::float8, 0) FROM pipeline_checkpoints",
            &[],
        )
        .await
        .map(|row| row.get::<_, f64>(0))
        .unwrap_or(0.0)
}

/// Row counts of the PostgreSQL `events` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgresCounts {
    /// All rows.
    pub rows: i64,
    /// Distinct `event_id`s.
    pub distinct_event_ids: i64,
}

/// Counts the PostgreSQL `events` rows from `topic` (zero if the table does
/// not exist yet).
pub async fn postgres_counts(postgres_url: &str, topic: &str) -> anyhow::Result<PostgresCounts> {
    let client = connect_postgres(postgres_url).await?;
    if !table_exists(&client, "events").await? {
        return Ok(PostgresCounts {
            rows: 0,
            distinct_event_ids: 0,
        });
    }
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT event_id) FROM events WHERE source_topic = $1",
            &[&topic],
        )
        .await?;
    Ok(PostgresCounts {
        rows: row.get(0),
        distinct_event_ids: row.get(1),
    })
}

/// Row counts of the ClickHouse `events` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClickHouseCounts {
    /// Rows as stored, before merges collapse replays.
    pub raw_rows: u64,
    /// Rows with `FINAL`: one per `event_id`.
    pub final_rows: u64,
    /// Distinct `event_id`s.
    pub distinct_event_ids: u64,
}

/// Counts the ClickHouse `events` rows from `config.topic` (zero if the
/// table does not exist yet).
pub async fn clickhouse_counts(config: &PipelineConfig) -> anyhow::Result<ClickHouseCounts> {
    let client = ClickHouseEvents::client(config)?;
    let exists: u8 = client
        .query("EXISTS TABLE events")
        .fetch_one()
        .await
        .with_context(|| {
            format!(
                "cannot query clickhouse at {}",
                stream_actors::storage::redact_url(&config.clickhouse_url)
            )
        })?;
    if exists == 0 {
        return Ok(ClickHouseCounts {
            raw_rows: 0,
            final_rows: 0,
            distinct_event_ids: 0,
        });
    }
    let count = |query: &str| {
        client
            .query(query)
            .bind(config.topic.as_str())
            .fetch_one::<u64>()
    };
    let raw_rows = count("SELECT count() FROM events WHERE source_topic = ?").await?;
    let final_rows = count("SELECT count() FROM events FINAL WHERE source_topic = ?").await?;
    let distinct_event_ids =
        count("SELECT uniqExact(event_id) FROM events WHERE source_topic = ?").await?;
    Ok(ClickHouseCounts {
        raw_rows,
        final_rows,
        distinct_event_ids,
    })
}
