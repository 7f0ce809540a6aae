//! `streamctl dlq`: look into the dead-letter topic and replay from it.
//!
//! - `stats`: counts by error type, stage, source partition and age.
//! - `show`: records with their headers; payloads shown safely (text with
//!   control characters escaped when it is UTF-8, hex otherwise).
//! - `replay`: re-publishes selected dead letters to the source topic, key and
//!   bytes unchanged, with `dlq.replay.count` one higher and `dlq.replay.of`
//!   naming the dead letter. Dry run unless `execute`. No loops: a dead letter
//!   is replayed at most once (the table `dlq_replays` remembers), and one
//!   whose replay count already reached `max_replays` is not selected, so a
//!   record that is still poison lands back in the DLQ once and stays there.
//!   Envelopes (`dlq.envelope`: the topic refused the record whole, so only a
//!   prefix or its hash is there) are never replayed.
//!
//! Each reads the dead-letter topic, or with `--from-archive` the archive
//! `streamctl dlq archive` wrote ([`crate::archive`]): the same records,
//! named by the same dead-letter positions, so the filters and the replay
//! rule are the same, and a dead letter replayed from one is not replayed
//! again from the other.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde::Serialize;
use stream_actors::dlq_writer::{ENVELOPE_HEADER, REPLAY_COUNT_HEADER};
use stream_actors::storage::connect_postgres;
use stream_actors::trace_context::TRACEPARENT_HEADER;

use crate::config::ConnectionArgs;
use crate::inspect::{read_topic, ReadRecord};

/// Names the dead letter a replayed record came from: `topic/partition/offset`.
pub const REPLAY_OF_HEADER: &str = "dlq.replay.of";

/// Reads the whole dead-letter topic named by `connections`.
pub fn read_dead_letters(connections: &ConnectionArgs) -> anyhow::Result<Vec<ReadRecord>> {
    read_topic(
        &connections.kafka()?,
        &connections.dlq_topic,
        Duration::from_secs(120),
    )
}

/// Where the dead letters are read from: the topic, or the archive.
#[derive(Debug, Clone, clap::Args)]
pub struct DlqSource {
    /// Read the dead letters from the archive `streamctl dlq archive` wrote
    /// instead of the topic (those the topic's retention deleted are there).
    #[arg(long)]
    pub from_archive: bool,
    /// The archive.
    #[command(flatten)]
    pub s3: crate::archive::S3Args,
}

impl DlqSource {
    /// The dead letters of `connections.dlq_topic`, from the topic or the archive.
    pub async fn read(&self, connections: &ConnectionArgs) -> anyhow::Result<Vec<ReadRecord>> {
        if !self.from_archive {
            let connections = connections.clone();
            return tokio::task::spawn_blocking(move || read_dead_letters(&connections)).await?;
        }
        let archive = self.s3.archive()?;
        archive.ensure_bucket(false).await?;
        archive.read(&connections.dlq_topic).await
    }
}

/// Which dead letters a command looks at.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DlqFilter {
    /// Only this error type (the `dlq.error.type` header), e.g. unknown_schema_version.
    #[arg(long)]
    pub error_type: Option<String>,
    /// Only dead letters from this source partition.
    #[arg(long)]
    pub source_partition: Option<i32>,
    /// Only source offsets in FROM..=TO (with --source-partition, or across partitions).
    #[arg(long, value_parser = parse_range)]
    pub source_offsets: Option<(i64, i64)>,
}

fn parse_range(text: &str) -> Result<(i64, i64), String> {
    let (from, to) = text
        .split_once("..")
        .ok_or_else(|| format!("{text:?} is not FROM..TO"))?;
    let from: i64 = from
        .parse()
        .map_err(|_| format!("{from:?} is not an offset"))?;
    let to: i64 = to
        .trim_start_matches('=')
        .parse()
        .map_err(|_| format!("{to:?} is not an offset"))?;
    if from > to {
        return Err(format!("{from} is after {to}"));
    }
    Ok((from, to))
}

impl DlqFilter {
    /// Whether a dead letter from `source_topic` passes the filter.
    pub fn accepts(&self, record: &ReadRecord, source_topic: &str) -> bool {
        if record.header("dlq.source.topic") != Some(source_topic) {
            return false;
        }
        if let Some(error_type) = &self.error_type {
            if record.header("dlq.error.type") != Some(error_type.as_str()) {
                return false;
            }
        }
        let partition: Option<i32> = record
            .header("dlq.source.partition")
            .and_then(|text| text.parse().ok());
        if let Some(wanted) = self.source_partition {
            if partition != Some(wanted) {
                return false;
            }
        }
        if let Some((from, to)) = self.source_offsets {
            let offset: Option<i64> = record
                .header("dlq.source.offset")
                .and_then(|text| text.parse().ok());
            if !offset.is_some_and(|offset| (from..=to).contains(&offset)) {
                return false;
            }
        }
        true
    }
}

/// A dead letter's `dlq.error.type` ("unknown" without one).
pub fn error_type(record: &ReadRecord) -> &str {
    record.header("dlq.error.type").unwrap_or("unknown")
}

/// Counts `record` under its error type in `counts`.
pub fn count_error_type(counts: &mut BTreeMap<String, u64>, record: &ReadRecord) {
    *counts.entry(error_type(record).to_string()).or_insert(0) += 1;
}

/// Counts of the dead-letter topic.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DlqStats {
    /// Dead letters that passed the filter.
    pub total: u64,
    /// By `dlq.error.type`.
    pub by_error_type: BTreeMap<String, u64>,
    /// By `dlq.stage`.
    pub by_stage: BTreeMap<String, u64>,
    /// By source partition.
    pub by_source_partition: BTreeMap<String, u64>,
    /// By age since `dlq.failed_at`: under a minute, an hour, a day, older.
    pub by_age: BTreeMap<String, u64>,
}

fn age_bucket(failed_at_ms: Option<i64>, now_ms: i64) -> &'static str {
    let Some(failed_at) = failed_at_ms else {
        return "unknown";
    };
    let age_seconds = (now_ms - failed_at).max(0) / 1000;
    match age_seconds {
        0..60 => "1: under 1m",
        60..3600 => "2: under 1h",
        3600..86_400 => "3: under 1d",
        _ => "4: older",
    }
}

/// Counts the dead letters that pass `filter`.
pub fn stats(records: &[ReadRecord], source_topic: &str, filter: &DlqFilter) -> DlqStats {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or_default();
    let mut result = DlqStats::default();
    for record in records
        .iter()
        .filter(|record| filter.accepts(record, source_topic))
    {
        result.total += 1;
        let count = |map: &mut BTreeMap<String, u64>, key: &str| {
            *map.entry(key.to_string()).or_insert(0) += 1
        };
        count_error_type(&mut result.by_error_type, record);
        count(
            &mut result.by_stage,
            record.header("dlq.stage").unwrap_or("unknown"),
        );
        count(
            &mut result.by_source_partition,
            record.header("dlq.source.partition").unwrap_or("unknown"),
        );
        let failed_at = record
            .header("dlq.failed_at")
            .and_then(|text| text.parse().ok());
        count(&mut result.by_age, age_bucket(failed_at, now_ms));
    }
    result
}

/// Bytes as text when they are UTF-8 (control characters escaped), else hex.
pub fn render_bytes(bytes: Option<&[u8]>) -> String {
    match bytes {
        None => "(none)".to_string(),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => text.chars().flat_map(char::escape_debug).collect(),
            Err(_) => {
                let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
                format!("hex:{hex}")
            }
        },
    }
}

/// One dead letter as `dlq show` prints it.
pub fn render_record(record: &ReadRecord) -> String {
    let mut lines = vec![format!("--- {}/{} ---", record.partition, record.offset)];
    for (key, value) in &record.headers {
        lines.push(format!("{key}: {}", render_bytes(Some(value.as_bytes()))));
    }
    lines.push(format!("key: {}", render_bytes(record.key.as_deref())));
    lines.push(format!(
        "payload: {}",
        render_bytes(record.payload.as_deref())
    ));
    lines.join("\n")
}

/// What a replay did, or would do.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ReplayOutcome {
    /// Whether records were published (false: dry run).
    pub executed: bool,
    /// Dead letters selected for replay.
    pub selected: u64,
    /// Selected, by error type.
    pub selected_by_error_type: BTreeMap<String, u64>,
    /// Passed the filter but were replayed before.
    pub skipped_already_replayed: u64,
    /// Passed the filter but reached the replay limit.
    pub skipped_replay_limit: u64,
    /// Passed the filter but are envelopes (`dlq.envelope`): the topic
    /// refused the record whole, so its original bytes are not there to replay.
    pub skipped_envelopes: u64,
    /// Records published to the source topic.
    pub published: u64,
}

/// Replays dead letters of `connections.topic` that pass `filter`, read
/// from the dead-letter topic.
pub async fn replay(
    connections: &ConnectionArgs,
    filter: &DlqFilter,
    max_replays: u32,
    execute: bool,
) -> anyhow::Result<ReplayOutcome> {
    let records = read_dead_letters(connections)?;
    replay_records(connections, &records, filter, max_replays, execute).await
}

/// Replays those of `records` (dead letters of `connections.dlq_topic`, from
/// the topic or the archive) that are from `connections.topic` and pass `filter`.
pub async fn replay_records(
    connections: &ConnectionArgs,
    records: &[ReadRecord],
    filter: &DlqFilter,
    max_replays: u32,
    execute: bool,
) -> anyhow::Result<ReplayOutcome> {
    let postgres = connect_postgres(&connections.postgres_url).await?;
    stream_actors::storage::ensure_table(
        &postgres,
        "dlq_replays",
        stream_actors::storage::DLQ_REPLAYS_DDL,
    )
    .await?;
    let done: std::collections::HashSet<(i32, i64)> = postgres
        .query(
            "SELECT dlq_partition, dlq_offset FROM dlq_replays WHERE dlq_topic = $1",
            &[&connections.dlq_topic],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();

    let mut outcome = ReplayOutcome {
        executed: execute,
        ..ReplayOutcome::default()
    };
    let mut selected = Vec::new();
    for record in records
        .iter()
        .filter(|record| filter.accepts(record, &connections.topic))
    {
        let replay_count: u32 = record
            .header(REPLAY_COUNT_HEADER)
            .and_then(|text| text.parse().ok())
            .unwrap_or(0);
        if record.header(ENVELOPE_HEADER).is_some() {
            outcome.skipped_envelopes += 1;
        } else if done.contains(&(record.partition, record.offset)) {
            outcome.skipped_already_replayed += 1;
        } else if replay_count >= max_replays {
            outcome.skipped_replay_limit += 1;
        } else {
            count_error_type(&mut outcome.selected_by_error_type, record);
            selected.push((record, replay_count));
        }
    }
    outcome.selected = selected.len() as u64;
    if !execute || selected.is_empty() {
        return Ok(outcome);
    }

    let producer: FutureProducer = connections
        .kafka()?
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .context("cannot create the replay producer")?;
    for (record, replay_count) in selected {
        let replay_of = format!(
            "{}/{}/{}",
            connections.dlq_topic, record.partition, record.offset
        );
        let next_count = (replay_count + 1).to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: REPLAY_COUNT_HEADER,
                value: Some(next_count.as_str()),
            })
            .insert(Header {
                key: REPLAY_OF_HEADER,
                value: Some(replay_of.as_str()),
            });
        // The replayed record continues the dead letter's trace: its row
        // (or its next dead letter) carries the same `traceparent`.
        if let Some(traceparent) = record.header(TRACEPARENT_HEADER) {
            headers = headers.insert(Header {
                key: TRACEPARENT_HEADER,
                value: Some(traceparent),
            });
        }
        let mut kafka_record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&connections.topic).headers(headers);
        if let Some(key) = record.key.as_deref() {
            kafka_record = kafka_record.key(key);
        }
        if let Some(payload) = record.payload.as_deref() {
            kafka_record = kafka_record.payload(payload);
        }
        producer
            .send(kafka_record, Timeout::After(Duration::from_secs(30)))
            .await
            .map_err(|(error, _)| anyhow::anyhow!("cannot replay {replay_of}: {error}"))?;
        postgres
            .execute(
                "INSERT INTO dlq_replays (dlq_topic, dlq_partition, dlq_offset) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&connections.dlq_topic, &record.partition, &record.offset],
            )
            .await?;
        outcome.published += 1;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_render_safely() {
        assert_eq!(render_bytes(Some(b"{\"a\":1}")), "{\\\"a\\\":1}");
        assert_eq!(render_bytes(Some(b"line\nbreak")), "line\\nbreak");
        assert_eq!(render_bytes(Some(&[0xff, 0x00, 0x41])), "hex:ff0041");
        assert_eq!(render_bytes(None), "(none)");
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("10..20"), Ok((10, 20)));
        assert_eq!(parse_range("10..=20"), Ok((10, 20)));
        assert!(parse_range("20..10").is_err());
        assert!(parse_range("x").is_err());
    }

    #[test]
    fn the_filter_selects_by_type_partition_and_offsets() {
        let record = ReadRecord {
            partition: 0,
            offset: 0,
            key: None,
            payload: None,
            headers: vec![
                ("dlq.source.topic".into(), "events".into()),
                ("dlq.error.type".into(), "malformed_json".into()),
                ("dlq.source.partition".into(), "2".into()),
                ("dlq.source.offset".into(), "15".into()),
            ],
            timestamp_ms: None,
        };
        assert!(DlqFilter::default().accepts(&record, "events"));
        assert!(!DlqFilter::default().accepts(&record, "other"));
        let by_type = DlqFilter {
            error_type: Some("missing_field".into()),
            ..DlqFilter::default()
        };
        assert!(!by_type.accepts(&record, "events"));
        let by_range = DlqFilter {
            source_partition: Some(2),
            source_offsets: Some((10, 15)),
            ..DlqFilter::default()
        };
        assert!(by_range.accepts(&record, "events"));
        let outside = DlqFilter {
            source_offsets: Some((16, 20)),
            ..DlqFilter::default()
        };
        assert!(!outside.accepts(&record, "events"));
    }
}
