//! Restart cost against the size of the dead-letter topic (issue 11): an
//! actor restart with a dead-letter topic of [`DEAD_LETTERS`] records costs
//! at most [`TARGET_EXTRA`] more than with an almost empty one, because the
//! DLQ writer looks up the DLQ index past the checkpoint instead of reading
//! the topic.
//!
//! Method: the release processor drains a small backlog; then the DLQ
//! writer is killed ([`ROUNDS`] times; `POST /actors/dlq_writer/kill`, so
//! the whole pipeline restarts, one for all), each timed from the kill to
//! the new generation's DLQ writer having finished its look-up
//! (`stream_dlq_index_lookups_total` going up). Then [`DEAD_LETTERS`]
//! dead letters of the same source topic are written to the dead-letter
//! topic, and a fresh processor is killed the same way. Each series starts
//! with a fresh process: the supervisor's restart backoff grows with the
//! restarts in its window (95 ms, 200 ms, 400 ms... with jitter), and both
//! series must pay the same.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use stream_actors::kafka::Brokers;
use stream_bins::scratch::{self, TestEnv};

use crate::memory::scrape_max;
use crate::recovery::{generation, lag, median_and_worst, poll, ready, start};
use crate::table::{at_most, Row, Verdict};

/// Kills per DLQ size.
const ROUNDS: usize = 5;
/// Dead letters in the large dead-letter topic.
pub const DEAD_LETTERS: u64 = 1_000_000;
/// The most a large dead-letter topic may add to a restart, seconds.
const TARGET_EXTRA: f64 = 1.0;
/// Events the processor drains first.
const EVENTS: u64 = 20_000;

/// Writes `count` dead letters of `source_topic` (source offsets far past
/// anything consumed) to `dlq_topic`.
fn fill_dlq(
    brokers: &Brokers,
    dlq_topic: &str,
    source_topic: &str,
    count: u64,
) -> anyhow::Result<()> {
    let producer: BaseProducer = brokers
        .client_config()
        .set("linger.ms", "50")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "500000")
        .set("compression.type", "lz4")
        .create()
        .context("cannot create the DLQ filler")?;
    let payload = br#"{"event_id":"00000000-0000-0000-0000-000000000000","event_type":"click","user_id":"u","amount":"not a number","ts_ms":1,"schema_version":1}"#;
    for index in 0..count {
        let offset = (1_000_000_000 + index).to_string();
        let partition = (index % 3).to_string();
        let headers = [
            ("dlq.error.type", "wrong_type"),
            ("dlq.error.message", "amount: expected a number"),
            ("dlq.source.topic", source_topic),
            ("dlq.source.partition", partition.as_str()),
            ("dlq.source.offset", offset.as_str()),
            ("dlq.stage", "parse"),
            ("dlq.failed_at", "0"),
            ("dlq.replay.count", "0"),
        ]
        .into_iter()
        .fold(
            OwnedHeaders::new_with_capacity(8),
            |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: Some(value),
                })
            },
        );
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(dlq_topic)
            .payload(&payload[..])
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((error, _)) => return Err(error).context("cannot fill the dead-letter topic"),
            }
        }
        if index % 100_000 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("cannot flush the dead-letter filler")?;
    Ok(())
}

fn lookups(admin: &str) -> Option<f64> {
    let (_, body) = scratch::http_get(admin, "/metrics").ok()?;
    scrape_max(&body, "stream_dlq_index_lookups_total")
}

/// Kills the DLQ writer; seconds from the kill to the new generation's DLQ
/// writer having looked up the index.
async fn kill_once(access: &scratch::AdminAccess) -> anyhow::Result<f64> {
    let admin = access.address.as_str();
    let before_generation = generation(admin).context("no generation in /status")?;
    let before = lookups(admin).context("no stream_dlq_index_lookups_total")?;
    let (code, answer) = access.post("/actors/dlq_writer/kill")?;
    anyhow::ensure!(code == 200, "kill dlq_writer answered {code}: {answer}");
    let killed = Instant::now();
    poll(
        "the next generation's DLQ index look-up",
        Duration::from_secs(120),
        || {
            let done = ready(admin)
                && generation(admin).is_some_and(|now| now > before_generation)
                && lookups(admin).is_some_and(|now| now > before);
            async move { done }
        },
    )
    .await?;
    Ok(killed.elapsed().as_secs_f64())
}

/// One series: a fresh processor (so the supervisor's restart backoff
/// starts from the same place in both series) caught up, then [`ROUNDS`]
/// kills. Returns the seconds from each kill to the look-up, and the
/// look-ups' own durations (`stream_dlq_index_lookup_seconds`).
async fn series(
    processor: &Path,
    env: &TestEnv,
    log: &Path,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let access = scratch::AdminAccess::new();
    let admin = access.address.clone();
    let mut child = start(processor, env, &access, log)?;
    let outcome = async {
        poll("caught up", Duration::from_secs(300), || async {
            lag(env).await == 0 && ready(&admin)
        })
        .await?;
        let mut restarts = Vec::new();
        let mut lookups = Vec::new();
        for _ in 0..ROUNDS {
            restarts.push(kill_once(&access).await?);
            let (_, body) = scratch::http_get(&admin, "/metrics")?;
            lookups.push(scrape_max(&body, "stream_dlq_index_lookup_seconds").unwrap_or(0.0));
        }
        anyhow::Ok((restarts, lookups))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    outcome.with_context(|| format!("see {}", log.display()))
}

/// The rows: restart with an almost empty and with a large dead-letter topic.
pub async fn rows(processor: &Path) -> anyhow::Result<Vec<Row>> {
    let log = std::env::temp_dir().join("bench-dlq-restart-processor.log");
    let _ = std::fs::remove_file(&log);
    let env = TestEnv::new("benchdlqrestart", 3).await;
    env.produce(EVENTS, 0.005, 901).await;
    let (small, small_lookups) = series(processor, &env, &log).await?;
    eprintln!(
        "bench: writing {DEAD_LETTERS} dead letters to {}",
        env.config.dlq_topic
    );
    let (brokers, dlq_topic, topic) = (
        env.config.brokers.clone(),
        env.config.dlq_topic.clone(),
        env.config.topic.clone(),
    );
    let filled = Instant::now();
    tokio::task::spawn_blocking(move || fill_dlq(&brokers, &dlq_topic, &topic, DEAD_LETTERS))
        .await??;
    eprintln!(
        "bench: wrote them in {:.1} s",
        filled.elapsed().as_secs_f64()
    );
    let (large, large_lookups) = series(processor, &env, &log).await?;
    let (small_median, small_worst) = median_and_worst(small);
    let (large_median, large_worst) = median_and_worst(large);
    let (small_lookup, _) = median_and_worst(small_lookups);
    let (large_lookup, _) = median_and_worst(large_lookups);
    let extra = large_median - small_median;
    let dead_letters = (EVENTS as f64 * 0.005) as u64;
    Ok(vec![
        Row {
            measurement: format!(
                "restart: dlq_writer kill -> DLQ index looked up, ~{dead_letters} dead letters (median of {ROUNDS}; worst {small_worst:.2} s; the look-up itself {:.1} ms)",
                small_lookup * 1000.0
            ),
            events: None,
            seconds: Some(small_median),
            value: format!("{small_median:.2} s"),
            target: String::new(),
            verdict: Verdict::None,
        },
        Row {
            measurement: format!(
                "restart: the same with {DEAD_LETTERS} more dead letters in the topic (median of {ROUNDS}; worst {large_worst:.2} s; the look-up itself {:.1} ms)",
                large_lookup * 1000.0
            ),
            events: None,
            seconds: Some(large_median),
            value: format!("{large_median:.2} s ({extra:+.2} s)"),
            target: format!("<= {TARGET_EXTRA} s more"),
            verdict: at_most(extra, TARGET_EXTRA),
        },
    ])
}
