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
//!
//! A second table ([`behaviour`]) observes each peer against hostile records
//! and under a SIGKILL mid-run.

pub mod behaviour;
pub mod connect;
pub mod process;
pub mod quix;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
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

/// The `WHERE` clause and its parameters that keep a table's rows from
/// `topic` only, when given (the pipeline's shared table).
pub fn topic_filter<'a>(
    topic: &'a Option<&'a str>,
) -> (
    &'static str,
    Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>,
) {
    match topic {
        Some(topic) => ("WHERE source_topic = $1", vec![topic]),
        None => ("", Vec::new()),
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
    let (filter, params) = topic_filter(&topic);
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

/// The parts of a PostgreSQL URL a peer's own client takes one by one.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresParts {
    /// TCP host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database.
    pub database: String,
    /// User.
    pub user: String,
    /// Password (empty when none).
    pub password: String,
}

impl PostgresParts {
    /// Parses `postgres_url`; it must name a TCP host and a database.
    pub fn of(postgres_url: &str) -> anyhow::Result<PostgresParts> {
        let config: tokio_postgres::Config = postgres_url.parse()?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => anyhow::bail!("the bench's PostgreSQL URL has no TCP host"),
        };
        Ok(PostgresParts {
            host,
            port: config.get_ports().first().copied().unwrap_or(5432),
            database: config
                .get_dbname()
                .context("no database in the URL")?
                .to_string(),
            user: config.get_user().unwrap_or("postgres").to_string(),
            password: config
                .get_password()
                .map(|password| String::from_utf8_lossy(password).into_owned())
                .unwrap_or_default(),
        })
    }
}

/// A peer's table, made before it starts: the event's fields, and
/// `stored_at` for the bench's span (the peer leaves it to its default).
pub fn peer_table_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (
            event_id TEXT PRIMARY KEY, event_type TEXT NOT NULL, user_id TEXT NOT NULL,
            amount DOUBLE PRECISION NOT NULL, ts BIGINT NOT NULL, schema_version INTEGER NOT NULL,
            stored_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
}

/// A peer's own corner, named `<prefix>_<unique>`: a dead-letter topic
/// (`<name>_dlq`, one partition), a database and `table` in it. Returns the
/// name, the dead-letter topic and the database's URL.
pub async fn peer_corner(prefix: &str, table: &str) -> anyhow::Result<(String, String, String)> {
    let name = scratch::unique_name(prefix);
    let dlq_topic = format!("{name}_dlq");
    scratch::create_topic(&dlq_topic, 1).await;
    let postgres_url = scratch::create_postgres_database(&name).await;
    stream_actors::storage::connect_postgres(&postgres_url)
        .await?
        .batch_execute(&peer_table_ddl(table))
        .await
        .with_context(|| format!("create the table {table} for {name}"))?;
    Ok((name, dlq_topic, postgres_url))
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
pub async fn measure(
    launch: &Launch,
    samples: &[process::Sample],
    expected: &Expected,
    dead_letters: u64,
    remark: String,
) -> anyhow::Result<PeerRun> {
    let (first, last, ids) = read_table(
        &launch.postgres_url,
        &launch.table,
        launch.topic_filter.as_deref(),
    )
    .await?;
    let cpu = |at: f64| process::cpu_at(samples, at).context("no CPU samples");
    let run = PeerRun {
        name: launch.name.clone(),
        stores: launch.stores.clone(),
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

/// How to start a peer (again after a SIGKILL: the same command, group,
/// table and dead-letter topic) and where to read what it did.
pub struct Launch {
    /// Short label for progress lines.
    pub label: String,
    /// Who, with its version and settings, for the tables.
    pub name: String,
    /// Where it writes, for the tables.
    pub stores: String,
    /// Its command, made afresh for each start.
    pub command: Box<dyn Fn() -> Command + Send + Sync>,
    /// Its log for the first start; later starts add `-<n>` to the name.
    pub log: PathBuf,
    /// Its database.
    pub postgres_url: String,
    /// Its table there.
    pub table: String,
    /// Only the rows of this source topic (the pipeline's shared table).
    pub topic_filter: Option<String>,
    /// Its dead-letter topic.
    pub dlq_topic: String,
    /// The broker.
    pub brokers: Brokers,
    /// Its consumer group.
    pub group: String,
    /// The topic it reads.
    pub topic: String,
    /// Where its progress is read.
    pub position: Position,
    /// Exit codes of a clean stop on SIGTERM besides 0 (the JVM's 143: it
    /// ends so after its shutdown hooks ran).
    pub clean_codes: &'static [i32],
}

impl Launch {
    /// Starts the peer; `start` counts the starts from 0 (it names the log).
    pub fn start(&self, start: u32) -> anyhow::Result<(Child, Monitor)> {
        let log = match start {
            0 => self.log.clone(),
            n => {
                let stem = self.log.file_stem().unwrap_or_default().to_string_lossy();
                self.log.with_file_name(format!("{stem}-{n}.log"))
            }
        };
        spawn_monitored((self.command)(), &log)
    }

    /// A reader of its progress.
    pub fn reader(&self) -> anyhow::Result<LagReader> {
        let checkpoint = (self.position == Position::Checkpoint).then(|| self.postgres_url.clone());
        LagReader::new(&self.brokers, &self.group, &self.topic, checkpoint)
    }

    /// Stops it with SIGTERM: a remark when it did not stop cleanly.
    pub fn stop(&self, child: &mut Child) -> Option<String> {
        match crate::memory::terminate(child) {
            Ok(status)
                if status.success()
                    || status
                        .code()
                        .is_some_and(|code| self.clean_codes.contains(&code)) =>
            {
                None
            }
            Ok(status) => Some(format!("exited with {status} on SIGTERM")),
            Err(error) => Some(format!("{error:#}")),
        }
    }

    /// Starts it (start number `start`), waits until it has drained its
    /// topic (or stalls) and stops it: its samples, a remark (empty when it
    /// drained and stopped cleanly), and when the wait ended (before the
    /// stop).
    pub async fn until_drained(
        &self,
        start: u32,
    ) -> anyhow::Result<(Vec<process::Sample>, String, Instant)> {
        let (mut child, monitor) = self.start(start)?;
        let outcome = wait_drained(
            &self.label,
            &mut child,
            &monitor,
            self.reader()?,
            self.position,
        )
        .await;
        let waited = Instant::now();
        let samples = monitor.finish(child.id());
        let stopped = self.stop(&mut child);
        Ok((samples, remarks(outcome?, stopped), waited))
    }

    /// Runs it until it has drained its topic and measures the run.
    pub async fn drain(&self, expected: &Expected) -> anyhow::Result<PeerRun> {
        eprintln!(
            "bench: peers: {}, {}, log {}",
            self.name,
            self.stores,
            self.log.display()
        );
        let (samples, remark, _) = self.until_drained(0).await?;
        let dead_letters = records_in(&self.brokers, &self.dlq_topic).await?;
        measure(self, &samples, expected, dead_letters, remark).await
    }
}

/// Two optional remarks as one (empty when neither).
pub fn remarks(first: Option<String>, second: Option<String>) -> String {
    [first, second]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ")
}

/// The pipeline: `processor` on the plain topic of `env`, both stores.
pub fn pipeline(processor: &Path, env: &TestEnv, log: PathBuf) -> Launch {
    let processor = processor.to_path_buf();
    let flags = env.processor_flags();
    let config = &env.config;
    Launch {
        label: "pipeline".to_string(),
        name: format!("this pipeline {}", env!("CARGO_PKG_VERSION")),
        stores: "PostgreSQL and ClickHouse, exactly once".to_string(),
        command: Box::new(move || {
            let mut command = Command::new(&processor);
            command.args(&flags).args([
                "--metrics-addr",
                &format!("127.0.0.1:{}", scratch::free_port()),
            ]);
            command
        }),
        log,
        postgres_url: config.postgres_url.clone(),
        table: "events".to_string(),
        topic_filter: Some(config.topic.clone()),
        dlq_topic: config.dlq_topic.clone(),
        brokers: config.brokers.clone(),
        group: config.group_id.clone(),
        topic: config.topic.clone(),
        position: Position::Checkpoint,
        clean_codes: &[],
    }
}

/// The pipeline's run, with its own report's check that every event is
/// accounted for.
async fn pipeline_run(
    processor: &Path,
    env: &TestEnv,
    expected: &Expected,
    out: &Path,
) -> anyhow::Result<PeerRun> {
    let run = pipeline(processor, env, out.join("peers-processor.log"))
        .drain(expected)
        .await?;
    let report = stream_bins::report::gather(&env.connections()).await?;
    anyhow::ensure!(
        report.accounted_for(),
        "the pipeline did not account for every event:\n{}",
        report.render()
    );
    Ok(run)
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
    /// The behaviour table (Markdown), when it could be observed.
    pub behaviour: Option<String>,
}

/// Loads the topics (the plain one and the envelope one, same seed), then
/// runs the pipeline and each peer on them, one at a time.
pub async fn run(
    processor: &Path,
    root: &Path,
    venv: &Path,
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
        behaviour: None,
    };
    eprintln!("bench: peers: the pipeline (processor binary)");
    match pipeline_run(processor, &env, &result.expected, out).await {
        Ok(run) => result.runs.push(run),
        Err(error) => result.failures.push(format!("pipeline: {error:#}")),
    }
    // Its defaults, then records per poll and per write as the pipeline's
    // default `--batch-size`.
    let tuned = stream_actors::PipelineConfig::local_defaults().batch_size as u32;
    for batch_size in [None, Some(tuned)] {
        let launch = connect::prepare(
            &install,
            &env.config.brokers,
            &connect_topic,
            batch_size,
            out,
        );
        match async { launch.await?.drain(&result.expected).await }.await {
            Ok(run) => result.runs.push(run),
            Err(error) => result.failures.push(format!("Kafka Connect: {error:#}")),
        }
    }
    eprintln!("bench: peers: Quix Streams");
    let script = root.join("bench").join("python").join("quix_consumer.py");
    let python = crate::python::ensure_venv(venv).await;
    let quix = async {
        let python = python
            .as_ref()
            .map_err(|error| anyhow::anyhow!("{error:#}"))?;
        quix::prepare(python, &script, &env.config.brokers, &env.config.topic, out)
            .await?
            .drain(&result.expected)
            .await
    };
    match quix.await {
        Ok(run) => result.runs.push(run),
        Err(error) => result.failures.push(format!("Quix Streams: {error:#}")),
    }

    eprintln!("bench: peers: behaviour (hostile records, a SIGKILL mid-run)");
    let peers = Peers {
        processor,
        install: &install,
        python: python.as_deref().ok(),
        script: &script,
        out,
    };
    let big = Topics {
        plain: &env.config.topic,
        enveloped: &connect_topic,
    };
    match behaviour_table(&peers, &env.config.brokers, &big, &result.expected).await {
        Ok(table) => result.behaviour = Some(table),
        Err(error) => result.failures.push(format!("behaviour table: {error:#}")),
    }
    Ok(result)
}

/// An outcome with its error as text, for a table cell.
fn observed<T>(outcome: anyhow::Result<T>) -> Result<T, String> {
    outcome.map_err(|error| format!("{error:#}"))
}

/// What it takes to start each peer.
struct Peers<'a> {
    processor: &'a Path,
    install: &'a connect::Install,
    /// The venv's Python, when the venv could be made.
    python: Option<&'a Path>,
    script: &'a Path,
    out: &'a Path,
}

/// A topic of events in both forms: plain JSON, and the JsonConverter
/// envelope for Kafka Connect.
struct Topics<'a> {
    plain: &'a str,
    enveloped: &'a str,
}

/// The pipeline on `topic` with a group, databases and a dead-letter topic
/// of its own.
async fn pipeline_on(processor: &Path, brokers: &Brokers, topic: &str, log: PathBuf) -> Launch {
    let name = scratch::unique_name("bench_behaviour");
    let dlq_topic = format!("{name}_dlq");
    scratch::create_topic(&dlq_topic, 3).await;
    let env = TestEnv::with_topics(name, brokers, topic.to_string(), dlq_topic).await;
    pipeline(processor, &env, log)
}

impl Peers<'_> {
    /// Each peer's launch on `topics`, by name; a peer that cannot be
    /// launched is an error in its place.
    async fn launches(
        &self,
        brokers: &Brokers,
        topics: &Topics<'_>,
        what: &str,
    ) -> Vec<(String, anyhow::Result<Launch>)> {
        let pipeline = pipeline_on(
            self.processor,
            brokers,
            topics.plain,
            self.out.join(format!("{what}-processor.log")),
        )
        .await;
        let connect =
            connect::prepare(self.install, brokers, topics.enveloped, None, self.out).await;
        let quix = match self.python {
            Some(python) => {
                quix::prepare(python, self.script, brokers, topics.plain, self.out).await
            }
            None => Err(anyhow::anyhow!("the bench's Python venv could not be made")),
        };
        vec![
            ("this pipeline".to_string(), Ok(pipeline)),
            ("Kafka Connect".to_string(), connect),
            ("Quix Streams".to_string(), quix),
        ]
    }
}

/// Loads the hostile topics (one per hostile record, so that one record's
/// effect does not hide the other's), then observes each peer on them and
/// under a SIGKILL on the big topics.
async fn behaviour_table(
    peers: &Peers<'_>,
    brokers: &Brokers,
    big: &Topics<'_>,
    expected: &Expected,
) -> anyhow::Result<String> {
    let records = behaviour::hostile_records();
    let mut config = loadgen::LoadgenConfig {
        brokers: brokers.clone(),
        topic: String::new(),
        count: behaviour::HOSTILE_EVENTS,
        rate: 0,
        poison_rate: POISON_RATE,
        seed: behaviour::HOSTILE_SEED,
        producers: 2,
        progress: false,
        format: loadgen::ValueFormat::Json,
    };
    // Per hostile record: what its topics hold, and each peer's launch on
    // them ([record][peer]).
    let mut hostile = Vec::new();
    for (index, record) in records.iter().enumerate() {
        let name = scratch::unique_name("bench_hostile");
        let (plain, enveloped) = (format!("{name}_events"), format!("{name}_connect"));
        scratch::create_topics(&[(&plain, PARTITIONS), (&enveloped, PARTITIONS)]).await;
        // The hostile record first: a peer that stalls on it stalls on
        // everything behind it in its partition.
        for (topic, format) in [
            (plain.clone(), loadgen::ValueFormat::Json),
            (enveloped.clone(), loadgen::ValueFormat::ConnectJson),
        ] {
            behaviour::produce_hostile(brokers, &topic, format, std::slice::from_ref(record))
                .await?;
            config.topic = topic;
            config.format = format;
            loadgen::run(&config).await?;
        }
        let topics = Topics {
            plain: &plain,
            enveloped: &enveloped,
        };
        let launches = peers
            .launches(brokers, &topics, &format!("hostile-{index}"))
            .await;
        hostile.push((
            behaviour::hostile_expected(&config, std::slice::from_ref(record)),
            launches,
        ));
    }
    let killed = peers.launches(brokers, big, "sigkill").await;
    let mut behaviours = Vec::new();
    for (peer, (name, on_big)) in killed.into_iter().enumerate() {
        let mut runs = Vec::new();
        let mut full_name = on_big.as_ref().map(|launch| launch.name.clone()).ok();
        for ((record_expected, launches), record) in hostile.iter_mut().zip(&records) {
            let (_, launch) = &launches[peer];
            let run = match launch {
                Ok(launch) => {
                    full_name.get_or_insert_with(|| launch.name.clone());
                    behaviour::hostile_run(launch, record_expected, record).await
                }
                Err(error) => Err(anyhow::anyhow!("{error:#}")),
            };
            runs.push(observed(run));
        }
        let kill = match on_big {
            Ok(launch) => behaviour::kill_run(&launch, expected).await,
            Err(error) => Err(error),
        };
        behaviours.push(behaviour::Behaviour {
            name: full_name.unwrap_or(name),
            hostile: runs,
            kill: observed(kill),
        });
    }
    let mut table = behaviour::render(&behaviours, &records);
    let _ = write!(
        table,
        "\nEach hostile record is on a topic of its own, ahead of {} events at poison rate {POISON_RATE} (seed {}), {PARTITIONS} partitions; Kafka Connect reads the same in the JsonConverter envelope. The SIGKILL runs are on the big topics.",
        thousands(behaviour::HOSTILE_EVENTS as f64),
        behaviour::HOSTILE_SEED,
    );
    Ok(table)
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
