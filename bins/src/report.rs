//! `streamctl report`: waits for the pipeline to catch up, then says what
//! happened: events in the topic, rows stored, dead letters by error type,
//! lag, and the success ratio (the SLI).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::ConnectionArgs;
use crate::inspect;

/// The SLO target the success ratio is compared with.
pub const SLO_TARGET: f64 = 0.99;

/// Everything the report says.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Source topic.
    pub topic: String,
    /// Records in the source topic (sum of end offsets).
    pub produced: i64,
    /// Rows in PostgreSQL `events`.
    pub postgres_rows: i64,
    /// Distinct `event_id`s in PostgreSQL.
    pub postgres_distinct: i64,
    /// Rows in ClickHouse `events` with `FINAL`.
    pub clickhouse_final_rows: u64,
    /// Distinct `event_id`s in ClickHouse.
    pub clickhouse_distinct: u64,
    /// Dead letters from this topic.
    pub dead_lettered: u64,
    /// Dead letters from this topic, by `dlq.error.type`.
    pub dead_lettered_by_type: BTreeMap<String, u64>,
    /// Dead letters whose (partition, offset) appeared more than once.
    pub dead_letter_duplicates: u64,
    /// Sum over partitions of end offset minus checkpoint.
    pub lag: i64,
    /// stored / (stored + dead-lettered).
    pub success_ratio: f64,
}

impl Report {
    /// Every produced record is stored or dead-lettered, exactly once.
    pub fn accounted_for(&self) -> bool {
        self.lag == 0
            && self.dead_letter_duplicates == 0
            && self.postgres_rows == self.postgres_distinct
            && self.clickhouse_final_rows as i64 == self.postgres_rows
            && self.postgres_rows + self.dead_lettered as i64 == self.produced
    }

    /// The report as the demo prints it.
    pub fn render(&self) -> String {
        let mut lines = vec![
            "== pipeline report ==".to_string(),
            format!("events in topic {}: {}", self.topic, self.produced),
            format!(
                "stored in postgres: {} rows ({} distinct event_id)",
                self.postgres_rows, self.postgres_distinct
            ),
            format!(
                "stored in clickhouse: {} rows FINAL ({} distinct event_id)",
                self.clickhouse_final_rows, self.clickhouse_distinct
            ),
            format!(
                "dead-lettered: {} ({} duplicates)",
                self.dead_lettered, self.dead_letter_duplicates
            ),
        ];
        for (error_type, count) in &self.dead_lettered_by_type {
            lines.push(format!("  {error_type}: {count}"));
        }
        lines.push(format!("lag (end offsets - checkpoint): {}", self.lag));
        lines.push(format!(
            "success ratio (SLI): {:.4} (target {SLO_TARGET})",
            self.success_ratio
        ));
        lines.push(if self.accounted_for() {
            "verdict: every event accounted for: stored + dead-lettered = produced, no duplicates"
                .to_string()
        } else {
            "verdict: MISMATCH: stored + dead-lettered != produced, or duplicates, or lag"
                .to_string()
        });
        lines.join("\n")
    }
}

/// Sum over partitions of end offset minus checkpoint (a partition with no
/// checkpoint lags by its whole length).
pub fn lag(ends: &BTreeMap<i32, i64>, checkpoint: &BTreeMap<i32, i64>) -> i64 {
    ends.iter()
        .map(|(partition, end)| (end - checkpoint.get(partition).copied().unwrap_or(0)).max(0))
        .sum()
}

/// Waits until the checkpoint reaches the end offsets, printing progress to
/// stderr, or until `wait` passes. Returns the last lag seen.
pub async fn wait_for_catch_up(
    connections: &ConnectionArgs,
    wait: Duration,
) -> anyhow::Result<i64> {
    let deadline = Instant::now() + wait;
    let mut last_print = Instant::now();
    loop {
        let ends = inspect::end_offsets_async(&connections.kafka()?, &connections.topic).await?;
        let checkpoint = inspect::checkpoint_offsets(
            &connections.postgres_url,
            &connections.group,
            &connections.topic,
        )
        .await?;
        let current_lag = lag(&ends, &checkpoint);
        if current_lag == 0 || Instant::now() >= deadline {
            return Ok(current_lag);
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            eprintln!("streamctl: waiting for catch-up: lag {current_lag}");
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Gathers the report.
pub async fn gather(connections: &ConnectionArgs) -> anyhow::Result<Report> {
    let ends = inspect::end_offsets_async(&connections.kafka()?, &connections.topic).await?;
    let checkpoint = inspect::checkpoint_offsets(
        &connections.postgres_url,
        &connections.group,
        &connections.topic,
    )
    .await?;
    let postgres = inspect::postgres_counts(&connections.postgres_url, &connections.topic).await?;
    let clickhouse = inspect::clickhouse_counts(&connections.pipeline_config()?).await?;
    let dead_letters = crate::dlq::read_dead_letters(connections)?;
    let mut dead_lettered_by_type = BTreeMap::new();
    let mut seen_sources = std::collections::HashSet::new();
    let mut dead_lettered = 0u64;
    let mut dead_letter_duplicates = 0u64;
    for record in &dead_letters {
        if record.header("dlq.source.topic") != Some(connections.topic.as_str()) {
            continue;
        }
        dead_lettered += 1;
        let source = (
            record
                .header("dlq.source.partition")
                .unwrap_or("")
                .to_string(),
            record.header("dlq.source.offset").unwrap_or("").to_string(),
        );
        if !seen_sources.insert(source) {
            dead_letter_duplicates += 1;
        }
        crate::dlq::count_error_type(&mut dead_lettered_by_type, record);
    }
    let stored = postgres.rows as f64;
    let success_ratio = if stored + dead_lettered as f64 > 0.0 {
        stored / (stored + dead_lettered as f64)
    } else {
        1.0
    };
    Ok(Report {
        topic: connections.topic.clone(),
        produced: ends.values().sum(),
        postgres_rows: postgres.rows,
        postgres_distinct: postgres.distinct_event_ids,
        clickhouse_final_rows: clickhouse.final_rows,
        clickhouse_distinct: clickhouse.distinct_event_ids,
        dead_lettered,
        dead_lettered_by_type,
        dead_letter_duplicates,
        lag: lag(&ends, &checkpoint),
        success_ratio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_partitions_without_checkpoint_whole() {
        let ends = BTreeMap::from([(0, 10), (1, 5), (2, 0)]);
        let checkpoint = BTreeMap::from([(0, 7)]);
        assert_eq!(lag(&ends, &checkpoint), 3 + 5);
    }
}
