//! The peers phase (issue 14): what users pick instead of this pipeline for
//! "Kafka to PostgreSQL, poison to a dead-letter topic, nothing lost", on the
//! same broker and the same PostgreSQL, each into a table of its own, side by
//! side with the pipeline (the processor binary, PostgreSQL and ClickHouse).
//!
//! Every run is measured the same way:
//! - **events/s**: the records of its topic over the span from its first to
//!   its last stored row (`stored_at`, set by PostgreSQL: `DEFAULT now()`, the
//!   storing transaction's start), so start-up and group joins count for
//!   nobody;
//! - **CPU seconds per 1M events**: `utime + stime` of the peer's own process
//!   over that span ([`process`]), scaled to a million records;
//! - **peak RSS** over the whole run;
//! - **what it stored**: every `event_id` in its table against the valid
//!   events loadgen sent (replayed from the seed: [`loadgen::planned_records`]):
//!   valid events stored, missing, duplicated, and poison stored (by kind);
//! - **dead letters**: records in its dead-letter topic.
//!
//! A peer that loses, duplicates or stores poison is reported as such.

pub mod connect;
pub mod process;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use stream_actors::kafka::Brokers;
use stream_bins::lag::LagReader;
use stream_bins::scratch::{self, TestEnv};

use crate::table::{at_least, at_most, thousands, Row};
use process::Monitor;

/// Poison rate of the peers' topics (the issue's).
pub const POISON_RATE: f64 = 0.005;
/// Partitions of the peers' topics (as the throughput phase's).
pub const PARTITIONS: i32 = 6;
/// The longest a peer may take to drain its topic.
const DRAIN_DEADLINE: Duration = Duration::from_secs(1200);
/// A peer whose group has not moved for this long has stalled (Kafka
/// Connect commits every 60 s by default).
const STALL_LIMIT: Duration = Duration::from_secs(90);
/// A peer whose group has committed nothing for this long never started.
const START_LIMIT: Duration = Duration::from_secs(180);

/// What the topics hold, replayed from loadgen's seed.
pub struct Expected {
    /// Records in each topic.
    pub records: u64,
    /// `event_id`s of the valid events.
    pub valid: HashSet<String>,
    /// `event_id`s of poison records that have one, with their kind.
    pub poison: HashMap<String, &'static str>,
    /// Poison records in all.
    pub poison_records: u64,
}

impl Expected {
    /// Replays `config`'s records.
    pub fn of(config: &loadgen::LoadgenConfig) -> Expected {
        let mut expected = Expected {
            records: 0,
            valid: HashSet::new(),
            poison: HashMap::new(),
            poison_records: 0,
        };
        for record in loadgen::planned_records(config) {
            expected.records += 1;
            let event_id = serde_json::from_slice::<serde_json::Value>(&record.payload)
                .ok()
                .and_then(|value| value["event_id"].as_str().map(str::to_string));
            match (record.poison, event_id) {
                (None, Some(event_id)) => {
                    expected.valid.insert(event_id);
                }
                (None, None) => unreachable!("a valid event has an event_id"),
                (Some(kind), event_id) => {
                    expected.poison_records += 1;
                    if let Some(event_id) = event_id {
                        expected.poison.insert(event_id, kind.label());
                    }
                }
            }
        }
        expected
    }
}

/// A peer's table against the valid events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableCheck {
    /// Rows in the table.
    pub rows: u64,
    /// Valid events stored (once or more).
    pub stored_valid: u64,
    /// Valid events not stored.
    pub missing_valid: u64,
    /// Rows beyond one per distinct `event_id`.
    pub duplicates: u64,
    /// Poison stored as if it were an event, by kind.
    pub poison_stored: BTreeMap<&'static str, u64>,
    /// Rows whose `event_id` loadgen never sent.
    pub unknown: u64,
}

impl TableCheck {
    /// Compares the `event_id`s of a table with what was sent.
    pub fn of(ids: &[String], expected: &Expected) -> TableCheck {
        let mut check = TableCheck {
            rows: ids.len() as u64,
            ..TableCheck::default()
        };
        let mut seen = HashSet::with_capacity(ids.len());
        for id in ids {
            if !seen.insert(id.as_str()) {
                check.duplicates += 1;
                continue;
            }
            if expected.valid.contains(id) {
                check.stored_valid += 1;
            } else if let Some(kind) = expected.poison.get(id) {
                *check.poison_stored.entry(kind).or_insert(0) += 1;
            } else {
                check.unknown += 1;
            }
        }
        check.missing_valid = expected.valid.len() as u64 - check.stored_valid;
        check
    }

    /// Exactly the valid events, each once.
    pub fn exact(&self) -> bool {
        self.missing_valid == 0
            && self.duplicates == 0
            && self.poison_stored.is_empty()
            && self.unknown == 0
    }

    /// "exactly the valid events", or what is wrong.
    pub fn verdict(&self) -> String {
        if self.exact() {
            return "exactly the valid events".to_string();
        }
        let mut wrong = Vec::new();
        if self.missing_valid > 0 {
            wrong.push(format!("{} valid events missing", self.missing_valid));
        }
        if self.duplicates > 0 {
            wrong.push(format!("{} duplicate rows", self.duplicates));
        }
        if !self.poison_stored.is_empty() {
            let kinds: Vec<String> = self
                .poison_stored
                .iter()
                .map(|(kind, count)| format!("{count} {kind}"))
                .collect();
            wrong.push(format!("poison stored: {}", kinds.join(", ")));
        }
        if self.unknown > 0 {
            wrong.push(format!("{} rows with unknown event_id", self.unknown));
        }
        wrong.join("; ")
    }
}

/// One peer's run.
#[derive(Debug, Clone)]
pub struct PeerRun {
    /// Who, with its version.
    pub name: String,
    /// Where it writes.
    pub stores: String,
    /// Records in its topic.
    pub records: u64,
    /// First to last stored row, seconds.
    pub seconds: f64,
    /// CPU seconds of its process over that span.
    pub cpu_seconds: f64,
    /// Peak RSS of its process, MB.
    pub peak_rss_mb: f64,
    /// Its table against the valid events.
    pub check: TableCheck,
    /// Records in its dead-letter topic.
    pub dead_letters: u64,
    /// Anything else seen (a stall, a crash), empty when nothing.
    pub remark: String,
}

impl PeerRun {
    /// Records of its topic per second of storing.
    pub fn rate(&self) -> f64 {
        self.records as f64 / self.seconds
    }

    /// CPU seconds per million records.
    pub fn cpu_per_million(&self) -> f64 {
        self.cpu_seconds / self.records as f64 * 1_000_000.0
    }
}

/// The first and last `stored_at` (epoch seconds) and the `event_id`s of a
/// table, its rows from `topic` only when given (the pipeline's shared table).
pub async fn read_table(
    postgres_url: &str,
    table: &str,
    topic: Option<&str>,
) -> anyhow::Result<(f64, f64, Vec<String>)> {
    let client = stream_actors::storage::connect_postgres(postgres_url).await?;
    let filter = if topic.is_some() {
        "WHERE source_topic = $1"
    } else {
        ""
    };
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = match &topic {
        Some(topic) => vec![topic],
        None => Vec::new(),
    };
    let span = client
        .query_one(
            &format!(
                "SELECT extract(epoch FROM min(stored_at))::float8, extract(epoch FROM max(stored_at))::float8 FROM {table} {filter}"
            ),
            &params,
        )
        .await
        .with_context(|| format!("read the span of {table}"))?;
    let (first, last): (Option<f64>, Option<f64>) = (span.get(0), span.get(1));
    let ids = client
        .query(
            &format!("SELECT event_id::text FROM {table} {filter}"),
            &params,
        )
        .await
        .with_context(|| format!("read the event_ids of {table}"))?
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect();
    match (first, last) {
        (Some(first), Some(last)) => Ok((first, last, ids)),
        _ => anyhow::bail!("{table} holds no rows"),
    }
}

/// Records in a topic (the sum of its end offsets; nothing is deleted).
pub async fn records_in(brokers: &Brokers, topic: &str) -> anyhow::Result<u64> {
    let ends = stream_bins::inspect::end_offsets_async(brokers, topic).await?;
    Ok(ends.values().map(|end| *end as u64).sum())
}

/// Spawns `command` with its output in `log`, sampled by a [`Monitor`].
pub fn spawn_monitored(mut command: Command, log: &Path) -> anyhow::Result<(Child, Monitor)> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let child = command
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let monitor = Monitor::start(child.id(), DRAIN_DEADLINE * 2);
    Ok((child, monitor))
}

/// Which position a peer's progress is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The group's committed offsets in Kafka (the peers).
    Committed,
    /// The persisted checkpoint (the pipeline).
    Checkpoint,
}

/// Records still to read at `position`, from one reading of `reader` (the
/// lag exporter's reader, which keeps its clients): None while the source
/// cannot be read or the peer has stored no position yet.
async fn behind(reader: &mut LagReader, position: Position) -> Option<u64> {
    let reading = reader.read().await;
    let (lag, started) = match position {
        Position::Committed => (
            reading.group_lag(),
            reading.partitions.iter().any(|p| p.committed.is_some()),
        ),
        Position::Checkpoint => (
            reading.checkpoint_lag(),
            reading.partitions.iter().any(|p| p.checkpoint.is_some()),
        ),
    };
    lag.filter(|_| started).map(|lag| lag.max(0) as u64)
}

/// Reads `reader` every second until the peer is `0` behind at `position`
/// (Ok(None)), the process exits, the deadline passes, it stores no
/// position for [`START_LIMIT`] or stops moving for [`STALL_LIMIT`]
/// (Ok(Some(why))): a stall is a finding about the peer, not a bench error.
pub async fn wait_drained(
    label: &str,
    child: &mut Child,
    monitor: &Monitor,
    mut reader: LagReader,
    position: Position,
) -> anyhow::Result<Option<String>> {
    let started = Instant::now();
    let mut last_move = Instant::now();
    let mut last_behind = u64::MAX;
    let mut last_print = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{label} exited early with {status}");
        }
        if started.elapsed() > DRAIN_DEADLINE {
            return Ok(Some(format!(
                "not drained within {DRAIN_DEADLINE:?} ({last_behind} records behind)"
            )));
        }
        if let Some(now_behind) = behind(&mut reader, position).await {
            if now_behind == 0 {
                return Ok(None);
            }
            if now_behind != last_behind {
                last_behind = now_behind;
                last_move = Instant::now();
            }
        }
        if last_behind == u64::MAX && started.elapsed() > START_LIMIT {
            return Ok(Some(format!(
                "never started: nothing committed within {START_LIMIT:?}"
            )));
        }
        if last_behind != u64::MAX && last_move.elapsed() > STALL_LIMIT {
            return Ok(Some(format!(
                "stalled: {last_behind} records behind, no progress for {STALL_LIMIT:?}"
            )));
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            let rss = monitor.last().map(|reading| reading.rss_mb);
            eprintln!(
                "bench: peers ({label}): {} behind, RSS {:.0} MB",
                if last_behind == u64::MAX {
                    "not started,".to_string()
                } else {
                    last_behind.to_string()
                },
                rss.unwrap_or_default()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Makes a [`PeerRun`] from a finished run's table and samples.
#[allow(clippy::too_many_arguments)]
pub async fn measure(
    name: String,
    stores: &str,
    postgres_url: &str,
    table: &str,
    topic_filter: Option<&str>,
    samples: &[process::Sample],
    expected: &Expected,
    dead_letters: u64,
    remark: String,
) -> anyhow::Result<PeerRun> {
    let (first, last, ids) = read_table(postgres_url, table, topic_filter).await?;
    let cpu = |at: f64| process::cpu_at(samples, at).context("no CPU samples");
    let run = PeerRun {
        name,
        stores: stores.to_string(),
        records: expected.records,
        seconds: (last - first).max(1e-3),
        cpu_seconds: cpu(last)? - cpu(first)?,
        peak_rss_mb: process::peak_rss_mb(samples),
        check: TableCheck::of(&ids, expected),
        dead_letters,
        remark,
    };
    eprintln!(
        "bench: peers ({}): {} ev/s over {:.1} s, {:.1} CPU s per 1M, peak RSS {:.0} MB, {} rows: {}; {} dead letters",
        run.name,
        thousands(run.rate()),
        run.seconds,
        run.cpu_per_million(),
        run.peak_rss_mb,
        run.check.rows,
        run.check.verdict(),
        run.dead_letters
    );
    Ok(run)
}

/// The pipeline: `processor` on the plain topic of `env`, both stores.
pub async fn pipeline(
    processor: &Path,
    env: &TestEnv,
    expected: &Expected,
    out: &Path,
) -> anyhow::Result<PeerRun> {
    let mut command = Command::new(processor);
    command.args(env.processor_flags()).args([
        "--metrics-addr",
        &format!("127.0.0.1:{}", scratch::free_port()),
    ]);
    let (mut child, monitor) = spawn_monitored(command, &out.join("peers-processor.log"))?;
    let connections = env.connections();
    let reader = LagReader::new(
        &env.config.brokers,
        &env.config.group_id,
        &env.config.topic,
        Some(env.config.postgres_url.clone()),
    )?;
    let outcome = wait_drained(
        "pipeline",
        &mut child,
        &monitor,
        reader,
        Position::Checkpoint,
    )
    .await;
    let samples = monitor.finish(child.id());
    let status = crate::memory::terminate(&mut child);
    let remark = outcome?.unwrap_or_default();
    anyhow::ensure!(
        status?.success(),
        "the processor failed to stop; see peers-processor.log"
    );
    let report = stream_bins::report::gather(&connections).await?;
    anyhow::ensure!(
        report.accounted_for(),
        "the pipeline did not account for every event:\n{}",
        report.render()
    );
    let dead_letters = records_in(&env.config.brokers, &env.config.dlq_topic).await?;
    measure(
        format!("this pipeline {}", env!("CARGO_PKG_VERSION")),
        "PostgreSQL and ClickHouse, exactly once",
        &env.config.postgres_url,
        "events",
        Some(&env.config.topic),
        &samples,
        expected,
        dead_letters,
        remark,
    )
    .await
}

/// The seed of the peers' topics.
pub const SEED: u64 = 14;

/// Every peer's run, what failed to run, and what the topics hold.
pub struct PeersResult {
    /// The runs, the pipeline first.
    pub runs: Vec<PeerRun>,
    /// A peer that could not be measured, and why.
    pub failures: Vec<String>,
    /// What the topics hold.
    pub expected: Expected,
}

/// Loads the topics (the plain one and the envelope one, same seed), then
/// runs the pipeline and each peer on them, one at a time.
pub async fn run(
    processor: &Path,
    root: &Path,
    events: u64,
    out: &Path,
) -> anyhow::Result<PeersResult> {
    // Resolved before anything is timed (minutes on a first run).
    let install = connect::ensure_installed(root, &out.join("connect"))?;
    let env = TestEnv::new("bench_peers", PARTITIONS).await;
    let connect_topic = format!("{}_connect", env.config.topic);
    scratch::create_topic(&connect_topic, PARTITIONS).await;
    let mut config = loadgen::LoadgenConfig {
        brokers: env.config.brokers.clone(),
        topic: env.config.topic.clone(),
        count: events,
        rate: 0,
        poison_rate: POISON_RATE,
        seed: SEED,
        producers: 2,
        progress: false,
        format: loadgen::ValueFormat::Json,
    };
    let expected = Expected::of(&config);
    for (topic, format) in [
        (env.config.topic.clone(), loadgen::ValueFormat::Json),
        (connect_topic.clone(), loadgen::ValueFormat::ConnectJson),
    ] {
        eprintln!("bench: peers: loading {events} events ({format:?}) into {topic}");
        config.topic = topic;
        config.format = format;
        let ledger = loadgen::run(&config).await?;
        anyhow::ensure!(
            ledger.sent == events && ledger.valid == expected.valid.len() as u64,
            "loadgen delivered {} ({} valid) of {events} ({} valid planned)",
            ledger.sent,
            ledger.valid,
            expected.valid.len()
        );
    }

    let mut result = PeersResult {
        runs: Vec::new(),
        failures: Vec::new(),
        expected,
    };
    eprintln!("bench: peers: the pipeline (processor binary)");
    match pipeline(processor, &env, &result.expected, out).await {
        Ok(run) => result.runs.push(run),
        Err(error) => result.failures.push(format!("pipeline: {error:#}")),
    }
    // Its defaults, then records per poll and per write as the pipeline's
    // default `--batch-size`.
    let tuned = stream_actors::PipelineConfig::local_defaults().batch_size as u32;
    for batch_size in [None, Some(tuned)] {
        match connect::run(
            &install,
            &env.config.brokers,
            &connect_topic,
            batch_size,
            &result.expected,
            out,
        )
        .await
        {
            Ok(run) => result.runs.push(run),
            Err(error) => result.failures.push(format!("Kafka Connect: {error:#}")),
        }
    }
    Ok(result)
}

/// Issue 14's targets against the peers: the pipeline's events/s at least
/// 1.5 x the fastest peer's, its CPU per 1M events at most half the leanest
/// peer's, its peak RSS at most a quarter of the Kafka Connect worker's
/// (the smallest of its runs). Peers that did not store exactly the valid
/// events still count: the targets compare cost, the table says who is right.
pub fn target_rows(runs: &[PeerRun]) -> Vec<Row> {
    let Some((pipeline, peers)) = runs.split_first() else {
        return Vec::new();
    };
    let best = |key: fn(&PeerRun) -> f64, highest: bool| {
        peers
            .iter()
            .filter(|run| key(run).is_finite())
            .max_by(|a, b| {
                let order = key(a).total_cmp(&key(b));
                if highest {
                    order
                } else {
                    order.reverse()
                }
            })
    };
    let mut rows = Vec::new();
    if let Some(fastest) = best(PeerRun::rate, true) {
        let ratio = pipeline.rate() / fastest.rate();
        rows.push(Row {
            measurement: format!(
                "peers: pipeline events/s / the fastest peer's ({})",
                fastest.name
            ),
            events: None,
            seconds: None,
            value: format!("{ratio:.2} x"),
            target: ">= 1.5 x".to_string(),
            verdict: at_least(ratio, 1.5),
        });
    }
    if let Some(leanest) = best(PeerRun::cpu_per_million, false) {
        let ratio = pipeline.cpu_per_million() / leanest.cpu_per_million();
        rows.push(Row {
            measurement: format!(
                "peers: pipeline CPU s per 1M events / the leanest peer's ({})",
                leanest.name
            ),
            events: None,
            seconds: None,
            value: format!("{ratio:.3} x"),
            target: "<= 0.5 x".to_string(),
            verdict: at_most(ratio, 0.5),
        });
    }
    let connect_rss = peers
        .iter()
        .filter(|run| run.name.starts_with("Kafka Connect"))
        .map(|run| run.peak_rss_mb)
        .reduce(f64::min);
    if let Some(connect_rss) = connect_rss {
        let ratio = pipeline.peak_rss_mb / connect_rss;
        rows.push(Row {
            measurement: "peers: pipeline peak RSS / the Kafka Connect worker's".to_string(),
            events: None,
            seconds: None,
            value: format!("{ratio:.3} x"),
            target: "<= 0.25 x".to_string(),
            verdict: at_most(ratio, 0.25),
        });
    }
    rows
}

/// The peers table, Markdown.
pub fn render(runs: &[PeerRun], expected: &Expected) -> String {
    let mut table = String::from(
        "| peer | writes | events/s | s | CPU s per 1M events | peak RSS | rows | table | dead letters | remark |\n\
         |---|---|---:|---:|---:|---:|---:|---|---:|---|\n",
    );
    for run in runs {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {:.1} | {:.1} | {:.0} MB | {} | {} | {} | {} |",
            run.name,
            run.stores,
            thousands(run.rate()),
            run.seconds,
            run.cpu_per_million(),
            run.peak_rss_mb,
            thousands(run.check.rows as f64),
            run.check.verdict(),
            thousands(run.dead_letters as f64),
            run.remark
        );
    }
    let _ = write!(
        table,
        "\nEach topic: {} records, {} valid events, {} poison (rate {POISON_RATE}), {PARTITIONS} partitions, the same seed.",
        thousands(expected.records as f64),
        thousands(expected.valid.len() as f64),
        thousands(expected.poison_records as f64),
    );
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected() -> Expected {
        Expected {
            records: 6,
            valid: ["a", "b", "c"].map(str::to_string).into(),
            poison: [("p".to_string(), "ts_out_of_range")].into(),
            poison_records: 3,
        }
    }

    fn run(name: &str, seconds: f64, cpu_seconds: f64, peak_rss_mb: f64) -> PeerRun {
        PeerRun {
            name: name.to_string(),
            stores: String::new(),
            records: 1_000_000,
            seconds,
            cpu_seconds,
            peak_rss_mb,
            check: TableCheck::default(),
            dead_letters: 0,
            remark: String::new(),
        }
    }

    #[test]
    fn targets_compare_the_pipeline_with_the_best_peer_of_each_kind() {
        let runs = [
            run("pipeline", 10.0, 5.0, 100.0),
            run("Kafka Connect defaults", 100.0, 100.0, 1_000.0),
            run("Kafka Connect tuned", 20.0, 40.0, 1_200.0),
            run("Quix", 40.0, 8.0, 150.0),
        ];
        let rows = target_rows(&runs);
        assert_eq!(rows.len(), 3);
        // 100k/s against the tuned run's 50k/s.
        assert!(rows[0].measurement.contains("Kafka Connect tuned"));
        assert_eq!(rows[0].value, "2.00 x");
        assert_eq!(rows[0].verdict, crate::table::Verdict::Met);
        // 5 CPU s against Quix's 8: 0.625, missed.
        assert!(rows[1].measurement.contains("Quix"));
        assert!(matches!(rows[1].verdict, crate::table::Verdict::Missed(_)));
        // 100 MB against the smaller Connect worker's 1000 MB.
        assert_eq!(rows[2].value, "0.100 x");
        assert_eq!(rows[2].verdict, crate::table::Verdict::Met);
        assert!(target_rows(&runs[..1]).is_empty());
    }

    #[test]
    fn a_table_of_exactly_the_valid_events_is_exact() {
        let ids = ["c", "a", "b"].map(str::to_string);
        let check = TableCheck::of(&ids, &expected());
        assert!(check.exact(), "{check:?}");
        assert_eq!(check.verdict(), "exactly the valid events");
    }

    #[test]
    fn losses_duplicates_poison_and_strangers_are_each_named() {
        let ids = ["a", "a", "p", "zz"].map(str::to_string);
        let check = TableCheck::of(&ids, &expected());
        assert!(!check.exact());
        assert_eq!(
            check,
            TableCheck {
                rows: 4,
                stored_valid: 1,
                missing_valid: 2,
                duplicates: 1,
                poison_stored: [("ts_out_of_range", 1)].into(),
                unknown: 1,
            }
        );
        assert_eq!(
            check.verdict(),
            "2 valid events missing; 1 duplicate rows; poison stored: 1 ts_out_of_range; 1 rows with unknown event_id"
        );
    }
}
