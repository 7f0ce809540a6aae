//! `streamctl audit`: reads the source topic independently (its own client,
//! no group) and reconciles every record, by its source position (partition,
//! offset), with PostgreSQL, ClickHouse and the dead-letter topic.
//!
//! A record is accounted for when it is either stored exactly once in both
//! stores or dead-lettered exactly once (and not both). Everything else is
//! counted per partition: missing (in neither, or in one store only) and
//! duplicated (a second row in a store, a second dead letter, or stored and
//! dead-lettered). ClickHouse is counted with `FINAL` when its table is a
//! ReplacingMergeTree (what the pipeline creates), so rows a merge will
//! collapse are not duplicates; any other engine is counted as stored.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use stream_actors::storage::{connect_postgres, ClickHouseEvents};

use crate::config::ConnectionArgs;
use crate::inspect::read_topic;

/// One partition's reconciliation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PartitionAudit {
    /// Partition of the source topic.
    pub partition: i32,
    /// Records in the topic.
    pub records: u64,
    /// Stored once in both stores.
    pub stored: u64,
    /// Dead-lettered once.
    pub dead_lettered: u64,
    /// In neither, or in one store only.
    pub missing: u64,
    /// Extra copies: second rows, second dead letters, stored and dead-lettered.
    pub duplicated: u64,
}

/// The whole reconciliation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    /// Source topic.
    pub topic: String,
    /// Per partition, sorted.
    pub partitions: Vec<PartitionAudit>,
    /// All partitions together (`partition` is -1).
    pub total: PartitionAudit,
    /// Rows or dead letters whose source position is not in the topic.
    pub unknown_positions: u64,
}

impl Audit {
    /// Nothing missing, nothing duplicated, nothing unknown.
    pub fn clean(&self) -> bool {
        self.total.missing == 0 && self.total.duplicated == 0 && self.unknown_positions == 0
    }

    /// The text `streamctl audit` prints.
    pub fn render(&self) -> String {
        let mut text = format!(
            "audit of {} ({} partitions) against PostgreSQL, ClickHouse and the dead-letter topic\n",
            self.topic,
            self.partitions.len()
        );
        let _ = writeln!(
            text,
            "{:>9} {:>10} {:>10} {:>14} {:>8} {:>11}",
            "partition", "records", "stored", "dead-lettered", "missing", "duplicated"
        );
        for row in self.partitions.iter().chain(std::iter::once(&self.total)) {
            let name = if row.partition < 0 {
                "total".to_string()
            } else {
                row.partition.to_string()
            };
            let _ = writeln!(
                text,
                "{name:>9} {:>10} {:>10} {:>14} {:>8} {:>11}",
                row.records, row.stored, row.dead_lettered, row.missing, row.duplicated
            );
        }
        if self.unknown_positions > 0 {
            let _ = writeln!(
                text,
                "{} rows or dead letters name a source position the topic does not hold",
                self.unknown_positions
            );
        }
        let verdict = if self.clean() {
            format!(
                "audit: OK: all {} records accounted for: {} stored once in PostgreSQL and ClickHouse, {} dead-lettered once; no gap, no duplicate",
                self.total.records, self.total.stored, self.total.dead_lettered
            )
        } else {
            format!(
                "audit: FAILED: {} missing, {} duplicated, {} unknown",
                self.total.missing, self.total.duplicated, self.unknown_positions
            )
        };
        text.push_str(&verdict);
        text.push('\n');
        text
    }
}

type Positions = HashMap<(i32, i64), u64>;

async fn postgres_positions(postgres_url: &str, topic: &str) -> anyhow::Result<Positions> {
    let client = connect_postgres(postgres_url).await?;
    if !crate::inspect::table_exists(&client, "events").await? {
        return Ok(Positions::new());
    }
    let rows = client
        .query(
            "SELECT source_partition, source_offset, count(*) FROM events WHERE source_topic = $1 GROUP BY 1, 2",
            &[&topic],
        )
        .await
        .context("cannot count PostgreSQL rows by source position")?;
    Ok(rows
        .iter()
        .map(|row| {
            (
                (row.get::<_, i32>(0), row.get::<_, i64>(1)),
                row.get::<_, i64>(2) as u64,
            )
        })
        .collect())
}

async fn clickhouse_positions(connections: &ConnectionArgs) -> anyhow::Result<Positions> {
    let client = ClickHouseEvents::client(&connections.pipeline_config()?)?;
    let engines: Vec<String> = client
        .query("SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = 'events'")
        .fetch_all()
        .await
        .with_context(|| {
            format!(
                "cannot query ClickHouse at {}",
                stream_actors::storage::redact_url(&connections.clickhouse_url)
            )
        })?;
    let Some(engine) = engines.first() else {
        return Ok(Positions::new());
    };
    let from = if engine.starts_with("Replacing") {
        "events FINAL"
    } else {
        "events"
    };
    let rows: Vec<(i32, i64, u64)> = client
        .query(&format!(
            "SELECT source_partition, source_offset, count() FROM {from} WHERE source_topic = ? GROUP BY source_partition, source_offset"
        ))
        .bind(connections.topic.as_str())
        .fetch_all()
        .await
        .context("cannot count ClickHouse rows by source position")?;
    Ok(rows
        .into_iter()
        .map(|(partition, offset, count)| ((partition, offset), count))
        .collect())
}

fn dead_letter_positions(connections: &ConnectionArgs) -> anyhow::Result<Positions> {
    let mut positions = Positions::new();
    for record in crate::dlq::read_dead_letters(connections)? {
        if record.header("dlq.source.topic") != Some(connections.topic.as_str()) {
            continue;
        }
        let partition = record
            .header("dlq.source.partition")
            .and_then(|text| text.parse::<i32>().ok());
        let offset = record
            .header("dlq.source.offset")
            .and_then(|text| text.parse::<i64>().ok());
        if let (Some(partition), Some(offset)) = (partition, offset) {
            *positions.entry((partition, offset)).or_default() += 1;
        }
    }
    Ok(positions)
}

/// Reads the topic, the stores and the dead-letter topic, and reconciles them.
pub async fn audit(connections: &ConnectionArgs) -> anyhow::Result<Audit> {
    let (brokers, topic) = (connections.kafka()?, connections.topic.clone());
    let records =
        tokio::task::spawn_blocking(move || read_topic(&brokers, &topic, Duration::from_secs(600)))
            .await??;
    let postgres = postgres_positions(&connections.postgres_url, &connections.topic).await?;
    let clickhouse = clickhouse_positions(connections).await?;
    let dlq_connections = connections.clone();
    let dead_letters =
        tokio::task::spawn_blocking(move || dead_letter_positions(&dlq_connections)).await??;

    let mut partitions: BTreeMap<i32, PartitionAudit> = BTreeMap::new();
    let mut seen = std::collections::HashSet::with_capacity(records.len());
    for record in &records {
        let position = (record.partition, record.offset);
        seen.insert(position);
        let row = partitions
            .entry(record.partition)
            .or_insert_with(|| PartitionAudit {
                partition: record.partition,
                ..PartitionAudit::default()
            });
        row.records += 1;
        let in_postgres = postgres.get(&position).copied().unwrap_or(0);
        let in_clickhouse = clickhouse.get(&position).copied().unwrap_or(0);
        let in_dlq = dead_letters.get(&position).copied().unwrap_or(0);
        let extra = |count: u64| count.saturating_sub(1);
        row.duplicated += extra(in_postgres) + extra(in_clickhouse) + extra(in_dlq);
        let stored = in_postgres > 0 || in_clickhouse > 0;
        match (stored, in_dlq > 0) {
            (true, true) => row.duplicated += 1,
            (true, false) if in_postgres > 0 && in_clickhouse > 0 => row.stored += 1,
            (true, false) => row.missing += 1,
            (false, true) => row.dead_lettered += 1,
            (false, false) => row.missing += 1,
        }
    }
    let unknown_positions = [&postgres, &clickhouse, &dead_letters]
        .iter()
        .flat_map(|positions| positions.iter())
        .filter(|(position, _)| !seen.contains(*position))
        .map(|(_, count)| *count)
        .sum();
    let mut total = PartitionAudit {
        partition: -1,
        ..PartitionAudit::default()
    };
    for row in partitions.values() {
        total.records += row.records;
        total.stored += row.stored;
        total.dead_lettered += row.dead_lettered;
        total.missing += row.missing;
        total.duplicated += row.duplicated;
    }
    Ok(Audit {
        topic: connections.topic.clone(),
        partitions: partitions.into_values().collect(),
        total,
        unknown_positions,
    })
}
