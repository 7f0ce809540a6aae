//! Throughput, side by side on one topic: the pipeline end to end, a no-op
//! rdkafka consumer, seed 001's per-message Python consumer and a batched
//! Python consumer.
//!
//! The pipeline is timed as `bins/examples/throughput.rs` times it: from
//! `start_pipeline` (group join included) until the persisted checkpoint
//! reaches the end of every partition, then the report must account for
//! every event (stored + dead-lettered = produced, no duplicates). The raw
//! consumer is timed from its assignment to its last record. The Python
//! consumers are timed from their first message (their group join is not
//! counted, which favours them).

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use stream_actors::kafka::Brokers;
use stream_bins::scratch::TestEnv;

use crate::python::{self, Bounds, PythonRun};

/// How long seed 001's consumer runs, and the most it reads.
#[derive(Debug, Clone, Copy)]
pub struct Seed001Bounds {
    /// Seconds from its first message.
    pub seconds: f64,
    /// Messages at most.
    pub max_events: u64,
}

/// The figures of the throughput comparison.
#[derive(Debug, Clone)]
pub struct ThroughputResult {
    /// Records in the topic.
    pub events: u64,
    /// Pipeline: seconds to caught up.
    pub pipeline_seconds: f64,
    /// Pipeline: seconds to its first persisted checkpoint (start-up, group
    /// join and the first batches).
    pub first_checkpoint_seconds: f64,
    /// Records below that first checkpoint.
    pub first_checkpoint_offsets: u64,
    /// Raw consume: records read and seconds.
    pub raw_read: u64,
    /// Raw consume seconds.
    pub raw_seconds: f64,
    /// Seed 001's consumer, for its bounded slice.
    pub seed001: PythonRun,
    /// The batched Python consumer.
    pub batched: PythonRun,
}

impl ThroughputResult {
    /// Pipeline events/s.
    pub fn pipeline_rate(&self) -> f64 {
        self.events as f64 / self.pipeline_seconds
    }

    /// Pipeline events/s from its first checkpoint to caught up: the rate
    /// once started, without the start-up.
    pub fn pipeline_running_rate(&self) -> f64 {
        (self.events - self.first_checkpoint_offsets) as f64
            / (self.pipeline_seconds - self.first_checkpoint_seconds)
    }

    /// Raw consume events/s.
    pub fn raw_rate(&self) -> f64 {
        self.raw_read as f64 / self.raw_seconds
    }
}

/// Polls the persisted checkpoint every 50 ms until it first holds
/// something: (seconds since `started`, records below it).
async fn first_checkpoint(
    connections: stream_bins::config::ConnectionArgs,
    started: Instant,
) -> anyhow::Result<(f64, u64)> {
    loop {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "no checkpoint within 900 s"
        );
        // The table appears with the pipeline: until then, nothing to read.
        if let Ok(checkpoint) = stream_bins::inspect::checkpoint_offsets(
            &connections.postgres_url,
            &connections.group,
            &connections.topic,
        )
        .await
        {
            let below: i64 = checkpoint.values().sum();
            if below > 0 {
                return Ok((started.elapsed().as_secs_f64(), below as u64));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads every record of `topic` with a consumer that does nothing else.
fn raw_consume(brokers: &Brokers, topic: &str, expected: u64) -> anyhow::Result<(u64, f64)> {
    let consumer: BaseConsumer = brokers
        .client_config()
        .set("group.id", format!("{topic}_raw_noop"))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for partition in stream_bins::inspect::partitions(brokers, topic)? {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    let started = Instant::now();
    consumer.assign(&assignment)?;
    let mut read = 0u64;
    while read < expected {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "raw consume did not finish within 600 s ({read}/{expected})"
        );
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            message?;
            read += 1;
        }
    }
    Ok((read, started.elapsed().as_secs_f64()))
}

/// Runs the four consumers on one topic of `events` records.
pub async fn run(
    events: u64,
    python: &Path,
    scripts: &Path,
    seed001: Seed001Bounds,
    batched_max_seconds: f64,
    spans: stream_actors::spans::Spans,
) -> anyhow::Result<ThroughputResult> {
    let mut env = TestEnv::new("bench_throughput", 6).await;
    env.config.spans = spans;
    eprintln!(
        "bench: throughput: loading {events} events (poison 0.005) into {}",
        env.config.topic
    );
    let ledger = env.produce(events, 0.005, 2026).await;
    anyhow::ensure!(
        ledger.sent == events,
        "loadgen delivered {} of {events}",
        ledger.sent
    );

    eprintln!("bench: throughput: pipeline end to end");
    let started = Instant::now();
    let first_checkpoint = tokio::spawn(first_checkpoint(env.connections(), started));
    let pipeline = stream_supervisor::start_pipeline(env.config.clone()).await?;
    env.wait_for_catch_up(Duration::from_secs(900)).await;
    let pipeline_seconds = started.elapsed().as_secs_f64();
    let (first_checkpoint_seconds, first_checkpoint_offsets) = first_checkpoint.await??;
    pipeline.shutdown().await;
    let report = stream_bins::report::gather(&env.connections()).await?;
    anyhow::ensure!(
        report.accounted_for(),
        "pipeline run did not account for every event:\n{}",
        report.render()
    );
    eprintln!(
        "bench: throughput: pipeline {events} events in {pipeline_seconds:.2} s, every event accounted for"
    );

    eprintln!("bench: throughput: raw consume, no-op rdkafka consumer");
    let brokers = env.config.brokers.clone();
    let topic = env.config.topic.clone();
    let (raw_read, raw_seconds) =
        tokio::task::spawn_blocking(move || raw_consume(&brokers, &topic, events)).await??;

    eprintln!(
        "bench: throughput: seed 001's consumer (per message), {} s or {} events",
        seed001.seconds, seed001.max_events
    );
    let seed001 = python::run_consumer(
        python,
        &scripts.join("seed001_consumer.py"),
        "bench_seed001",
        &env.config.topic,
        Bounds {
            max_events: seed001.max_events.min(events),
            max_seconds: seed001.seconds,
        },
    )
    .await?;

    eprintln!("bench: throughput: batched Python consumer (1000 per poll)");
    let batched = python::run_consumer(
        python,
        &scripts.join("batched_consumer.py"),
        "bench_batched",
        &env.config.topic,
        Bounds {
            max_events: events,
            max_seconds: batched_max_seconds,
        },
    )
    .await?;

    Ok(ThroughputResult {
        events,
        pipeline_seconds,
        first_checkpoint_seconds,
        first_checkpoint_offsets,
        raw_read,
        raw_seconds,
        seed001,
        batched,
    })
}
