//! End-to-end latency at a fixed rate.
//!
//! What is measured, and why it is honest: the sink records
//! `stream_end_to_end_latency_seconds` for every valid event it stores, as
//! (wall clock right after both PostgreSQL and ClickHouse hold the batch,
//! just before the acknowledgement goes to the committer) minus (the Kafka
//! record timestamp, which librdkafka sets to the producer's create time when
//! loadgen hands it the record). Producer, broker, pipeline and stores share
//! this machine's clock, so there is no skew between the two ends. The span
//! therefore covers loadgen's producer batching (`linger.ms` 10), the broker,
//! the consumer's fetch, the parser, the sink's batching (its linger: 5 ms
//! in the latency profile, 50 ms in the default throughput profile) and
//! both store writes; it leaves out the checkpoint commit, which does not
//! delay the data.
//!
//! The Prometheus exporter would only give bucketed quantiles, so this bench
//! installs its own metrics recorder in-process and keeps every sample of
//! that one histogram (millisecond resolution, the resolution of Kafka
//! timestamps) while [`Capture`] is on; p50 and p99 are nearest-rank
//! quantiles over all of them. A warm-up load runs first and is caught up
//! before capture starts, so group join and connection set-up are not in the
//! figures. The number of samples must equal the valid events the measured
//! load sent: no sample is lost or counted twice.
//!
//! Baseline, side by side in the same run: a no-op rdkafka consumer (default
//! librdkafka settings, like the pipeline's consumer) assigned at the end of
//! the topic before the measured load starts, taking (its receive time minus
//! the same Kafka timestamp) for every record of the measured load. What the
//! broker and the client add alone shows there; the rest is the pipeline's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use stream_actors::kafka::Brokers;

use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder};
use metrics::{SharedString, Unit};
use stream_actors::metrics::END_TO_END_LATENCY;
use stream_bins::scratch::TestEnv;

/// The samples of `stream_end_to_end_latency_seconds`, kept while capturing.
#[derive(Debug, Default)]
pub struct Capture {
    on: AtomicBool,
    samples: Mutex<Vec<f64>>,
}

impl Capture {
    fn start(&self) {
        self.samples.lock().expect("samples lock").clear();
        self.on.store(true, Ordering::SeqCst);
    }

    fn stop(&self) -> Vec<f64> {
        self.on.store(false, Ordering::SeqCst);
        std::mem::take(&mut *self.samples.lock().expect("samples lock"))
    }
}

impl HistogramFn for Capture {
    fn record(&self, value: f64) {
        if self.on.load(Ordering::Relaxed) {
            self.samples.lock().expect("samples lock").push(value);
        }
    }
}

/// A recorder that keeps the end-to-end latency samples and drops every other metric.
struct LatencyRecorder {
    capture: Arc<Capture>,
}

impl Recorder for LatencyRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        if key.name() == END_TO_END_LATENCY {
            Histogram::from_arc(self.capture.clone())
        } else {
            Histogram::noop()
        }
    }
}

/// Installs the process-wide recorder; call once, before any pipeline starts.
pub fn install_recorder() -> anyhow::Result<Arc<Capture>> {
    let capture = Arc::new(Capture::default());
    metrics::set_global_recorder(LatencyRecorder {
        capture: capture.clone(),
    })
    .map_err(|error| anyhow::anyhow!("cannot install the metrics recorder: {error}"))?;
    Ok(capture)
}

/// The figures of one latency run.
#[derive(Debug, Clone)]
pub struct LatencyResult {
    /// Records the measured load sent (valid and poison).
    pub sent: u64,
    /// Latency samples (one per valid event stored).
    pub samples: usize,
    /// The rate loadgen achieved over the measured load.
    pub achieved_rate: f64,
    /// Wall time of the measured load, seconds.
    pub seconds: f64,
    /// Median, seconds.
    pub p50: f64,
    /// 99th percentile, seconds.
    pub p99: f64,
    /// Largest sample, seconds.
    pub max: f64,
    /// The no-op consumer's samples (all records of the measured load).
    pub raw_samples: usize,
    /// Its median, seconds.
    pub raw_p50: f64,
    /// Its 99th percentile, seconds.
    pub raw_p99: f64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or_default()
}

/// A no-op consumer assigned at the current end of `topic`: for each of the
/// next `expected` records, receive time minus Kafka timestamp, in seconds.
/// Says `ready` once assigned.
fn raw_latencies(
    brokers: &Brokers,
    topic: &str,
    expected: u64,
    deadline: Duration,
    ready: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<Vec<f64>> {
    let ends = stream_bins::inspect::end_offsets(brokers, topic)?;
    let consumer: BaseConsumer = brokers
        .client_config()
        .set("group.id", format!("{topic}_latency_noop"))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for (partition, end) in &ends {
        assignment.add_partition_offset(topic, *partition, Offset::Offset(*end))?;
    }
    consumer.assign(&assignment)?;
    // One empty poll so the fetch sessions exist before the load starts.
    if let Some(message) = consumer.poll(Duration::from_millis(500)) {
        anyhow::bail!("a record past the end before the load started: {message:?}");
    }
    let _ = ready.send(());
    let started = Instant::now();
    let mut samples = Vec::with_capacity(expected as usize);
    while (samples.len() as u64) < expected {
        anyhow::ensure!(
            started.elapsed() < deadline,
            "the no-op consumer saw {} of {expected} records within {deadline:?}",
            samples.len()
        );
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            let received = now_ms();
            if let Some(created) = message.timestamp().to_millis() {
                samples.push((received - created).max(0) as f64 / 1000.0);
            }
        }
    }
    Ok(samples)
}

/// Nearest-rank quantile of sorted samples.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs the pipeline in-process with the sink's `linger`, loads `rate *
/// seconds` events at `rate` (poison 0.005) while it runs, and returns the
/// latency quantiles.
pub async fn run(
    capture: &Capture,
    rate: u64,
    seconds: u64,
    linger: Duration,
) -> anyhow::Result<LatencyResult> {
    let mut env = TestEnv::new("bench_latency", 6).await;
    env.config.linger = linger;
    let pipeline = stream_supervisor::start_pipeline(env.config.clone()).await?;
    let load = |count: u64, seed: u64| loadgen::LoadgenConfig {
        brokers: env.config.brokers.clone(),
        topic: env.config.topic.clone(),
        count,
        rate,
        poison_rate: 0.005,
        seed,
        producers: 2,
        progress: false,
        format: loadgen::ValueFormat::Json,
    };

    eprintln!("bench: latency: warm-up, 3 s at {rate}/s");
    loadgen::run(&load(rate * 3, 7001)).await?;
    env.wait_for_catch_up(Duration::from_secs(300)).await;

    let count = rate * seconds;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (brokers, topic) = (env.config.brokers.clone(), env.config.topic.clone());
    let raw = tokio::task::spawn_blocking(move || {
        raw_latencies(
            &brokers,
            &topic,
            count,
            Duration::from_secs(seconds + 120),
            ready_tx,
        )
    });
    if ready_rx.await.is_err() {
        // The no-op consumer failed before it was ready: its error says why.
        raw.await??;
        anyhow::bail!("the no-op latency consumer stopped before the load");
    }
    eprintln!(
        "bench: latency: {count} events at {rate}/s with the pipeline and a no-op consumer running"
    );
    capture.start();
    let started = Instant::now();
    let ledger = loadgen::run(&load(count, 7002)).await;
    let caught_up = match &ledger {
        Ok(_) => {
            env.wait_for_catch_up(Duration::from_secs(300)).await;
            true
        }
        Err(_) => false,
    };
    let elapsed = started.elapsed().as_secs_f64();
    let mut samples = capture.stop();
    let ledger = ledger?;
    pipeline.shutdown().await;
    anyhow::ensure!(caught_up, "latency run did not catch up");
    let report = stream_bins::report::gather(&env.connections()).await?;
    anyhow::ensure!(
        report.accounted_for(),
        "latency run did not account for every event:\n{}",
        report.render()
    );
    anyhow::ensure!(
        samples.len() as u64 == ledger.valid,
        "latency samples ({}) differ from the valid events sent ({})",
        samples.len(),
        ledger.valid
    );
    samples.sort_by(f64::total_cmp);
    let mut raw_samples = raw.await??;
    anyhow::ensure!(
        raw_samples.len() as u64 == ledger.sent,
        "the no-op consumer saw {} records, the load sent {}",
        raw_samples.len(),
        ledger.sent
    );
    raw_samples.sort_by(f64::total_cmp);
    Ok(LatencyResult {
        raw_samples: raw_samples.len(),
        raw_p50: quantile(&raw_samples, 0.50),
        raw_p99: quantile(&raw_samples, 0.99),
        sent: ledger.sent,
        samples: samples.len(),
        achieved_rate: ledger.rate,
        seconds: elapsed,
        p50: quantile(&samples, 0.50),
        p99: quantile(&samples, 0.99),
        max: samples.last().copied().unwrap_or(f64::NAN),
    })
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn nearest_rank_quantiles() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&sorted, 0.50), 50.0);
        assert_eq!(quantile(&sorted, 0.99), 99.0);
        assert_eq!(quantile(&sorted, 1.0), 100.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
