//! Measures end-to-end throughput against the raw consume rate of the same
//! topic, in one run on the same services:
//!
//! `cargo run --release -p stream-bins --example throughput -- [COUNT]`
//!
//! 1. loads COUNT events (poison rate 0.005) into a fresh 6-partition topic;
//! 2. starts the pipeline and times it until the checkpoint reaches the end;
//! 3. times a no-op rdkafka consumer reading the same topic from the start.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use stream_bins::scratch::TestEnv;
use stream_supervisor::start_pipeline;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let count: u64 = std::env::args()
        .nth(1)
        .map(|text| text.parse())
        .transpose()?
        .unwrap_or(200_000);
    let mut env = TestEnv::new("throughput", 6).await;
    // The processor's --batch-size and --linger-ms, from the same variables.
    if let Some(batch_size) = std::env::var("BATCH_SIZE")
        .ok()
        .and_then(|text| text.parse().ok())
    {
        env.config.batch_size = batch_size;
    }
    if let Some(linger_ms) = std::env::var("LINGER_MS")
        .ok()
        .and_then(|text| text.parse().ok())
    {
        env.config.linger = Duration::from_millis(linger_ms);
    }
    eprintln!(
        "throughput: loading {count} events into {}",
        env.config.topic
    );
    let ledger = env.produce(count, 0.005, 2026).await;

    let started = Instant::now();
    let pipeline = start_pipeline(env.config.clone()).await?;
    env.wait_for_catch_up(Duration::from_secs(900)).await;
    let pipeline_seconds = started.elapsed().as_secs_f64();
    pipeline.shutdown().await;
    let report = stream_bins::report::gather(&env.connections()).await?;
    anyhow::ensure!(
        report.accounted_for(),
        "pipeline run did not account for every event:\n{}",
        report.render()
    );

    let consumer: BaseConsumer = env
        .config
        .brokers
        .client_config()
        .set("group.id", "throughput-noop")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for partition in stream_bins::inspect::partitions(&env.config.brokers, &env.config.topic)? {
        assignment.add_partition_offset(&env.config.topic, partition, Offset::Beginning)?;
    }
    let started = Instant::now();
    consumer.assign(&assignment)?;
    let mut read = 0u64;
    while read < ledger.sent {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "raw consume did not finish"
        );
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            message?;
            read += 1;
        }
    }
    let raw_seconds = started.elapsed().as_secs_f64();

    let pipeline_rate = ledger.sent as f64 / pipeline_seconds;
    let raw_rate = ledger.sent as f64 / raw_seconds;
    println!("| measurement | events | seconds | events/s |");
    println!("|---|---|---|---|");
    println!("| pipeline end to end (exactly-once sinks, poison 0.005) | {} | {pipeline_seconds:.2} | {pipeline_rate:.0} |", ledger.sent);
    println!("| raw consume, no-op rdkafka consumer | {read} | {raw_seconds:.2} | {raw_rate:.0} |");
    println!(
        "| ratio pipeline / raw | | | {:.3} |",
        pipeline_rate / raw_rate
    );
    Ok(())
}
