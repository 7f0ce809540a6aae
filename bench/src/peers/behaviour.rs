//! How each peer behaves (issue 14's second table), observed, not taken from
//! its documentation:
//! - **hostile records**: a topic of ordinary events and poison with two
//!   more records ahead of them, a valid-looking event with a NUL in
//!   `user_id` and one with a 512 KiB `user_id`; where each went (stored,
//!   dead-lettered with which error, or nowhere), whether the peer drained
//!   the topic or stalled behind them, and the headers on its dead letters;
//! - **a SIGKILL mid-run**: the peer on the big topic, killed once a third
//!   of the valid events are stored and started again the same way; what
//!   its table and its dead-letter topic hold once it has drained (dead
//!   letters are counted against the distinct source positions they name).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::producer::FutureRecord;
use stream_actors::kafka::Brokers;
use stream_actors::topic::ReadRecord;

use super::{read_table, Expected, Launch, TableCheck};
use crate::table::thousands;

/// Ordinary events in the hostile topic.
pub const HOSTILE_EVENTS: u64 = 20_000;
/// The seed of its events (not the big topics').
pub const HOSTILE_SEED: u64 = 15;
/// The huge field's size.
const HUGE_FIELD_BYTES: usize = 512 * 1024;
/// The longest the SIGKILL run waits for a third of the rows.
const KILL_DEADLINE: Duration = Duration::from_secs(600);

/// A hostile record: what it is, its `event_id`, its value (the event's
/// JSON).
#[derive(Debug, Clone)]
pub struct Hostile {
    /// What is wrong with it, as the table says it.
    pub label: &'static str,
    /// Its `event_id`.
    pub event_id: String,
    /// The event's JSON.
    pub payload: Vec<u8>,
}

/// The two hostile records: every field present and of its type, the
/// timestamp now, `event_id` first (so it leads even a cut copy).
pub fn hostile_records() -> Vec<Hostile> {
    let now_ms = (super::process::now_epoch() * 1000.0) as i64;
    let event = |event_id: &str, user_id: &str| {
        format!(
            r#"{{"event_id":"{event_id}","event_type":"click","user_id":{},"amount":1.5,"ts":{now_ms},"schema_version":1}}"#,
            serde_json::Value::String(user_id.to_string())
        )
        .into_bytes()
    };
    let nul = "2c0b7a3e-0000-4000-8000-000000000001";
    let huge = "2c0b7a3e-0000-4000-8000-000000000002";
    vec![
        Hostile {
            label: "NUL in user_id",
            event_id: nul.to_string(),
            payload: event(nul, "user-\u{0}-1"),
        },
        Hostile {
            label: "512 KiB user_id",
            event_id: huge.to_string(),
            payload: event(huge, &"u".repeat(HUGE_FIELD_BYTES)),
        },
    ]
}

/// Writes the hostile records to `topic` in `format`, keyed by `event_id`.
pub async fn produce_hostile(
    brokers: &Brokers,
    topic: &str,
    format: loadgen::ValueFormat,
    records: &[Hostile],
) -> anyhow::Result<()> {
    let producer = loadgen::create_producer(brokers)?;
    for record in records {
        let value = format.encode(record.payload.clone());
        producer
            .send(
                FutureRecord::to(topic)
                    .key(&record.event_id)
                    .payload(&value),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(error, _)| error)
            .with_context(|| format!("produce the {} record to {topic}", record.label))?;
    }
    Ok(())
}

/// What the hostile topic holds: the events replayed from the seed, and the
/// hostile records counted as poison of their own kinds (the pipeline's
/// rules refuse both).
pub fn hostile_expected(config: &loadgen::LoadgenConfig, records: &[Hostile]) -> Expected {
    let mut expected = Expected::of(config);
    for record in records {
        expected.records += 1;
        expected.poison_records += 1;
        expected
            .poison
            .insert(record.event_id.clone(), record.label);
    }
    expected
}

/// Where a hostile record went.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// A row in the peer's table.
    Stored,
    /// A dead letter, with the error its headers name.
    DeadLettered(String),
    /// Neither.
    Nowhere,
}

impl Fate {
    fn render(&self) -> String {
        match self {
            Fate::Stored => "stored".to_string(),
            Fate::DeadLettered(error) => format!("dead-lettered (`{error}`)"),
            Fate::Nowhere => "neither stored nor dead-lettered".to_string(),
        }
    }
}

/// The error a dead letter names: the pipeline's and the Quix script's
/// `dlq.error.type`, Kafka Connect's exception class.
fn error_of(record: &ReadRecord) -> String {
    let header = |name: &str| {
        record
            .headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    header("dlq.error.type")
        .or_else(|| {
            header("__connect.errors.exception.class.name")
                .map(|class| class.rsplit('.').next().unwrap_or_default().to_string())
        })
        .unwrap_or_else(|| "no error header".to_string())
}

/// The source position a dead letter names, in any peer's headers.
fn source_position(record: &ReadRecord) -> Option<(String, String)> {
    let header = |names: [&str; 2]| {
        record
            .headers
            .iter()
            .find(|(key, _)| names.contains(&key.as_str()))
            .map(|(_, value)| value.clone())
    };
    Some((
        header(["dlq.source.partition", "__connect.errors.partition"])?,
        header(["dlq.source.offset", "__connect.errors.offset"])?,
    ))
}

/// Every record of `topic`, read on a blocking thread.
async fn read_all(brokers: &Brokers, topic: &str) -> anyhow::Result<Vec<ReadRecord>> {
    let (brokers, topic) = (brokers.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        stream_actors::topic::read_topic(&brokers, &topic, Duration::from_secs(120))
    })
    .await?
}

/// Where each hostile record went (it is keyed by its `event_id`).
pub fn fates(ids: &[String], dead_letters: &[ReadRecord], records: &[Hostile]) -> Vec<Fate> {
    let stored: HashSet<&str> = ids.iter().map(String::as_str).collect();
    records
        .iter()
        .map(|record| {
            if stored.contains(record.event_id.as_str()) {
                return Fate::Stored;
            }
            let needle = record.event_id.as_bytes();
            dead_letters
                .iter()
                .find(|letter| {
                    // The value, or a prefix of it (the pipeline cuts a
                    // large one), or the key (its `event_id`).
                    [letter.key.as_deref(), letter.payload.as_deref()]
                        .into_iter()
                        .flatten()
                        .any(|bytes| bytes.windows(needle.len()).any(|window| window == needle))
                })
                .map_or(Fate::Nowhere, |letter| Fate::DeadLettered(error_of(letter)))
        })
        .collect()
}

/// A peer against a hostile topic (one hostile record ahead of the events).
#[derive(Debug, Clone)]
pub struct HostileRun {
    /// Where the hostile record went.
    pub fate: Fate,
    /// Empty when it drained the topic; else what happened (a stall).
    pub remark: String,
    /// Its table against the events and poison.
    pub check: TableCheck,
    /// Records in its dead-letter topic.
    pub dead_letters: u64,
    /// The header names on its dead letters (the union, in first-seen order).
    pub headers: Vec<String>,
}

/// Runs `launch` on a hostile topic holding `record` until it drains or
/// stalls.
pub async fn hostile_run(
    launch: &Launch,
    expected: &Expected,
    record: &Hostile,
) -> anyhow::Result<HostileRun> {
    let (_, remark, _) = launch.until_drained(0).await?;
    // A peer that stalled at once may have stored nothing.
    let ids = match read_table(
        &launch.postgres_url,
        &launch.table,
        launch.topic_filter.as_deref(),
    )
    .await
    {
        Ok((_, _, ids)) => ids,
        Err(_) => Vec::new(),
    };
    let dead_letters = read_all(&launch.brokers, &launch.dlq_topic).await?;
    let mut headers: Vec<String> = Vec::new();
    for letter in &dead_letters {
        for (name, _) in &letter.headers {
            if !headers.contains(name) {
                headers.push(name.clone());
            }
        }
    }
    let run = HostileRun {
        fate: fates(&ids, &dead_letters, std::slice::from_ref(record)).remove(0),
        remark,
        check: TableCheck::of(&ids, expected),
        dead_letters: dead_letters.len() as u64,
        headers,
    };
    eprintln!(
        "bench: peers: behaviour ({}): {}: {}; {}; {}; {} dead letters",
        launch.name,
        record.label,
        run.fate.render(),
        if run.remark.is_empty() {
            "drained"
        } else {
            &run.remark
        },
        run.check.verdict(),
        run.dead_letters
    );
    Ok(run)
}

/// A peer SIGKILLed mid-run and started again.
#[derive(Debug, Clone)]
pub struct KillRun {
    /// Rows stored when it was killed.
    pub rows_at_kill: u64,
    /// Its table, once drained after the restart.
    pub check: TableCheck,
    /// Records in its dead-letter topic.
    pub dead_letters: u64,
    /// The distinct source positions they name.
    pub dead_letter_positions: u64,
    /// From the restart until it had drained the topic, seconds.
    pub recovery_seconds: f64,
    /// Empty when it drained; else what happened.
    pub remark: String,
}

/// Rows of its table now (0 before the first).
async fn rows_now(client: &tokio_postgres::Client, launch: &Launch) -> u64 {
    let topic = launch.topic_filter.as_deref();
    let (filter, params) = super::topic_filter(&topic);
    client
        .query_one(
            &format!("SELECT count(*) FROM {} {filter}", launch.table),
            &params,
        )
        .await
        .map(|row| row.get::<_, i64>(0) as u64)
        .unwrap_or(0)
}

/// Starts `launch`, SIGKILLs it once a third of the valid events are
/// stored, starts it again and waits until it has drained its topic.
pub async fn kill_run(launch: &Launch, expected: &Expected) -> anyhow::Result<KillRun> {
    let client = stream_actors::storage::connect_postgres(&launch.postgres_url).await?;
    let target = expected.valid.len() as u64 / 3;
    let (mut child, monitor) = launch.start(0)?;
    let started = Instant::now();
    let rows_at_kill = loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{} exited early with {status}", launch.label);
        }
        let rows = rows_now(&client, launch).await;
        if rows >= target {
            break rows;
        }
        if started.elapsed() > KILL_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "{} stored {rows} of the {target} rows to kill it at within {KILL_DEADLINE:?}",
                launch.label
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    child.kill().context("SIGKILL")?;
    child.wait()?;
    monitor.finish(child.id());
    eprintln!(
        "bench: peers: SIGKILL ({}) at {} rows; starting it again",
        launch.name,
        thousands(rows_at_kill as f64)
    );
    let restarted = Instant::now();
    let (_, remark, drained) = launch.until_drained(1).await?;
    let recovery_seconds = (drained - restarted).as_secs_f64();
    let (_, _, ids) = read_table(
        &launch.postgres_url,
        &launch.table,
        launch.topic_filter.as_deref(),
    )
    .await?;
    let dead_letters = read_all(&launch.brokers, &launch.dlq_topic).await?;
    let positions: HashSet<(String, String)> =
        dead_letters.iter().filter_map(source_position).collect();
    let run = KillRun {
        rows_at_kill,
        check: TableCheck::of(&ids, expected),
        dead_letters: dead_letters.len() as u64,
        dead_letter_positions: positions.len() as u64,
        recovery_seconds,
        remark,
    };
    eprintln!(
        "bench: peers: after the SIGKILL ({}): {}; {} dead letters for {} source records; committed the end {:.1} s after the restart {}",
        launch.name,
        run.check.verdict(),
        run.dead_letters,
        run.dead_letter_positions,
        run.recovery_seconds,
        run.remark
    );
    Ok(run)
}

/// One peer's behaviour: its name, and each part's outcome or why it could
/// not be observed.
pub struct Behaviour {
    /// Who.
    pub name: String,
    /// Against each hostile topic, in [`hostile_records`]' order.
    pub hostile: Vec<Result<HostileRun, String>>,
    /// SIGKILLed mid-run.
    pub kill: Result<KillRun, String>,
}

/// Short names of the header families, so a row stays readable: Kafka
/// Connect's context headers share one prefix.
fn header_summary(headers: &[String]) -> String {
    if headers.is_empty() {
        return "none".to_string();
    }
    let connect: Vec<&str> = headers
        .iter()
        .filter_map(|name| name.strip_prefix("__connect.errors."))
        .collect();
    let others: Vec<String> = headers
        .iter()
        .filter(|name| !name.starts_with("__connect.errors."))
        .map(|name| format!("`{name}`"))
        .collect();
    let mut parts = others;
    if !connect.is_empty() {
        parts.push(format!("`__connect.errors.`{{{}}}", connect.join(", ")));
    }
    parts.join(", ")
}

/// A hostile record's cell: where it went, whether the peer drained the
/// topic, and the valid events it left unstored.
fn hostile_cell(run: &Result<HostileRun, String>) -> String {
    let run = match run {
        Ok(run) => run,
        Err(error) => return format!("not observed: {error}"),
    };
    let mut cell = run.fate.render();
    if run.remark.is_empty() {
        cell.push_str("; the topic drained");
    } else {
        let _ = write!(cell, "; {}", run.remark);
    }
    if run.check.missing_valid > 0 {
        let _ = write!(
            cell,
            "; **{} valid events not stored**",
            thousands(run.check.missing_valid as f64)
        );
    }
    cell
}

/// The SIGKILL cell.
fn kill_cell(run: &Result<KillRun, String>) -> String {
    let run = match run {
        Ok(run) => run,
        Err(error) => return format!("not observed: {error}"),
    };
    let duplicates = run.dead_letters.saturating_sub(run.dead_letter_positions);
    format!(
        "killed at {} rows; then {}; {} dead letters for {} source records{}; committed the end {:.0} s after the restart{}",
        thousands(run.rows_at_kill as f64),
        run.check.verdict(),
        thousands(run.dead_letters as f64),
        thousands(run.dead_letter_positions as f64),
        if duplicates > 0 {
            format!(" (**{} duplicates**)", thousands(duplicates as f64))
        } else {
            String::new()
        },
        run.recovery_seconds,
        if run.remark.is_empty() {
            String::new()
        } else {
            format!(" ({})", run.remark)
        }
    )
}

/// The behaviour table, Markdown.
pub fn render(behaviours: &[Behaviour], records: &[Hostile]) -> String {
    let mut table = String::from("| peer |");
    for record in records {
        let _ = write!(table, " {} |", record.label);
    }
    table.push_str(" headers on its dead letters | SIGKILL at a third, started again |\n|---|");
    table.push_str(&"---|".repeat(records.len() + 2));
    table.push('\n');
    for behaviour in behaviours {
        let _ = write!(table, "| {} |", behaviour.name);
        let mut headers: Vec<String> = Vec::new();
        for run in &behaviour.hostile {
            let _ = write!(table, " {} |", hostile_cell(run));
            for name in run.iter().flat_map(|run| &run.headers) {
                if !headers.contains(name) {
                    headers.push(name.clone());
                }
            }
        }
        let _ = writeln!(
            table,
            " {} | {} |",
            header_summary(&headers),
            kill_cell(&behaviour.kill)
        );
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(payload: &[u8], headers: &[(&str, &str)]) -> ReadRecord {
        ReadRecord {
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(payload.to_vec()),
            headers: headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
            timestamp_ms: None,
        }
    }

    #[test]
    fn hostile_records_are_json_events_the_pipeline_would_refuse() {
        let records = hostile_records();
        assert_eq!(records.len(), 2);
        for record in &records {
            let event: serde_json::Value =
                serde_json::from_slice(&record.payload).expect("valid JSON");
            assert_eq!(event["event_id"], record.event_id.as_str());
            assert!(record
                .payload
                .starts_with(format!(r#"{{"event_id":"{}""#, record.event_id).as_bytes()));
            assert_eq!(event["schema_version"], 1);
        }
        let nul: serde_json::Value = serde_json::from_slice(&records[0].payload).expect("JSON");
        assert!(nul["user_id"].as_str().expect("text").contains('\0'));
        // The JSON escapes it; the bytes on the wire hold no NUL.
        assert!(!records[0].payload.contains(&0));
        assert!(records[1].payload.len() > HUGE_FIELD_BYTES);
    }

    #[test]
    fn a_hostile_record_is_found_in_the_table_or_among_the_dead_letters() {
        let records = hostile_records();
        let letters = [
            letter(b"unrelated", &[("dlq.error.type", "malformed_json")]),
            letter(
                &records[1].payload,
                &[(
                    "__connect.errors.exception.class.name",
                    "org.apache.kafka.connect.errors.DataException",
                )],
            ),
        ];
        let ids = vec![records[0].event_id.clone(), "other".to_string()];
        assert_eq!(
            fates(&ids, &letters, &records),
            vec![
                Fate::Stored,
                Fate::DeadLettered("DataException".to_string())
            ]
        );
        assert_eq!(
            fates(&[], &letters[..1], &records),
            vec![Fate::Nowhere, Fate::Nowhere]
        );
        // A dead letter without the value (headers only) still has the key.
        let mut keyed = letter(b"", &[("dlq.error.type", "nul_in_text")]);
        keyed.key = Some(records[0].event_id.clone().into_bytes());
        assert_eq!(
            fates(&[], &[keyed], &records)[0],
            Fate::DeadLettered("nul_in_text".to_string())
        );
    }

    #[test]
    fn dead_letters_name_their_source_position_in_either_header_family() {
        let ours = letter(
            b"x",
            &[("dlq.source.partition", "3"), ("dlq.source.offset", "17")],
        );
        let connect = letter(
            b"x",
            &[
                ("__connect.errors.partition", "3"),
                ("__connect.errors.offset", "17"),
            ],
        );
        assert_eq!(source_position(&ours), Some(("3".into(), "17".into())));
        assert_eq!(source_position(&ours), source_position(&connect));
        assert_eq!(source_position(&letter(b"x", &[])), None);
    }

    #[test]
    fn the_table_has_a_row_per_peer_and_says_what_was_not_observed() {
        let records = hostile_records();
        let behaviours = [
            Behaviour {
                name: "pipeline".to_string(),
                hostile: vec![
                    Ok(HostileRun {
                        fate: Fate::DeadLettered("nul_in_text".to_string()),
                        remark: String::new(),
                        check: TableCheck::default(),
                        dead_letters: 2,
                        headers: vec![
                            "dlq.error.type".to_string(),
                            "__connect.errors.topic".to_string(),
                        ],
                    }),
                    Ok(HostileRun {
                        fate: Fate::Nowhere,
                        remark: "stalled: 10 records behind".to_string(),
                        check: TableCheck {
                            missing_valid: 9,
                            ..TableCheck::default()
                        },
                        dead_letters: 2,
                        headers: vec!["__connect.errors.offset".to_string()],
                    }),
                ],
                kill: Ok(KillRun {
                    rows_at_kill: 1_000,
                    check: TableCheck::default(),
                    dead_letters: 12,
                    dead_letter_positions: 10,
                    recovery_seconds: 3.2,
                    remark: String::new(),
                }),
            },
            Behaviour {
                name: "broken".to_string(),
                hostile: vec![Err("no JVM".to_string()), Err("no JVM".to_string())],
                kill: Err("no JVM".to_string()),
            },
        ];
        let table = render(&behaviours, &records);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        let columns = |line: &str| line.matches('|').count();
        assert!(lines.iter().all(|line| columns(line) == columns(lines[0])));
        assert!(lines[2].contains("dead-lettered (`nul_in_text`); the topic drained"));
        assert!(lines[2].contains("stalled: 10 records behind; **9 valid events not stored**"));
        assert!(lines[2].contains("`__connect.errors.`{topic, offset}"));
        assert!(lines[2].contains("**2 duplicates**"));
        assert_eq!(lines[3].matches("not observed: no JVM").count(), 3);
    }
}
