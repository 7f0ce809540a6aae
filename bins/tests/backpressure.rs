//! Memory bounded in bytes, and a member that stays in its group while the
//! pipeline is full.
//!
//! - A stream of 5 MB records (valid ones and poison ones) drains with the
//!   bytes in flight within `--max-in-flight-bytes` and the process far
//!   inside the pod's memory limit; every record is stored once or
//!   dead-lettered once (the poison ones as envelopes: the dead-letter topic
//!   takes 1 MB).
//! - A PostgreSQL outage three times longer than `max.poll.interval.ms`:
//!   the consumer pauses its partitions and keeps polling, so the member
//!   never leaves the group (same member id before and after, no pipeline
//!   restart), and the pipeline catches up after it.

mod common;

use std::time::{Duration, Instant};

use common::{assert_clean, audit, within, Frozen, ProcessorProcess, TestEnv};
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

/// The pod's memory limit in `k8s/` (512 MiB).
const POD_LIMIT_BYTES: u64 = 512 * 1024 * 1024;

/// A field of `/proc/<pid>/status` in bytes (VmRSS, VmHWM).
fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Lets `topic` take records of up to `bytes`.
async fn allow_records_of(env: &TestEnv, topic: &str, bytes: usize) {
    let admin: AdminClient<DefaultClientContext> = env
        .config
        .brokers
        .client_config()
        .create()
        .expect("admin client");
    let size = bytes.to_string();
    let change = AlterConfig::new(ResourceSpecifier::Topic(topic)).set("max.message.bytes", &size);
    let results = admin
        .alter_configs(&[change], &AdminOptions::new())
        .await
        .expect("alter configs");
    for result in results {
        result.expect("max.message.bytes raised");
    }
}

/// `count` records of about `size` bytes: valid events carrying a large
/// field the parser ignores, and every other one malformed JSON.
fn large_records(count: usize, size: usize) -> Vec<(String, Vec<u8>)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    (0..count)
        .map(|index| {
            let padding = "x".repeat(size);
            let value = if index % 2 == 0 {
                format!(
                    r#"{{"event_id":"00000000-0000-4000-8000-{index:012}","event_type":"upload","user_id":"big-{index}","amount":1.5,"ts":{now},"schema_version":1,"attachment":"{padding}"}}"#
                )
            } else {
                format!(r#"{{"event_id":"broken-{index}","attachment":"{padding}"#)
            };
            (format!("big-{index}"), value.into_bytes())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_5_mb_records_drains_within_the_byte_budget() {
    const RECORD: usize = 5 * 1024 * 1024;
    const LARGE: usize = 40;
    const BUDGET: u64 = 32 * 1024 * 1024;
    let env = TestEnv::new("bigrecords", 3).await;
    allow_records_of(&env, &env.config.topic, 8 * 1024 * 1024).await;
    let before = env.produce(2_000, 0.0, 61).await;
    let producer: FutureProducer = env
        .config
        .brokers
        .client_config()
        .set("message.max.bytes", "8388608")
        .create()
        .expect("producer");
    for (key, value) in large_records(LARGE, RECORD) {
        producer
            .send(
                FutureRecord::to(&env.config.topic)
                    .key(&key)
                    .payload(&value),
                Timeout::After(Duration::from_secs(60)),
            )
            .await
            .map_err(|(error, _)| error)
            .expect("large record produced");
    }
    let after = env.produce(2_000, 0.0, 62).await;

    let mut processor = ProcessorProcess::start(
        &env,
        &[
            ("MAX_RECORD_BYTES", "8388608"),
            ("MAX_IN_FLIGHT_BYTES", &BUDGET.to_string()),
        ],
    );
    processor.wait_ready(Duration::from_secs(60));
    let pid = processor.child.id();
    let expected = before.valid + after.valid + (LARGE as u64) / 2;
    let (mut most_in_flight, mut most_rss) = (0.0_f64, 0_u64);
    let drained = within(Duration::from_secs(300), || {
        if let Some(bytes) = processor.metric("stream_in_flight_bytes") {
            most_in_flight = most_in_flight.max(bytes);
        }
        most_rss = most_rss.max(proc_status_bytes(pid, "VmRSS:").unwrap_or(0));
        processor
            .metric("stream_events_processed_total")
            .is_some_and(|stored| stored >= expected as f64)
            && processor
                .metric("stream_dlq_envelopes_total")
                .is_some_and(|envelopes| envelopes >= (LARGE / 2) as f64)
    })
    .await;
    let peak = proc_status_bytes(pid, "VmHWM:").unwrap_or(most_rss);
    eprintln!(
        "{LARGE} records of 5 MB: most in flight {:.1} MiB (budget {} MiB), peak RSS {:.0} MiB (pod limit {} MiB)",
        most_in_flight / 1048576.0,
        BUDGET / 1048576,
        peak as f64 / 1048576.0,
        POD_LIMIT_BYTES / 1048576
    );
    assert!(drained, "did not drain:\n{}", processor.log_tail());
    assert!(
        most_in_flight <= BUDGET as f64,
        "{most_in_flight} bytes in flight past the budget of {BUDGET}"
    );
    assert!(
        peak < POD_LIMIT_BYTES,
        "peak RSS {peak} bytes: past the pod limit:\n{}",
        processor.log_tail()
    );
    env.wait_for_catch_up(Duration::from_secs(120)).await;
    assert_eq!(processor.terminate(Duration::from_secs(60)), Some(0));
    let audit = audit(&env).await;
    eprintln!("{}", audit.render());
    assert!(audit.clean(), "{}", audit.render());
    assert_eq!(audit.total.stored, expected, "{}", audit.render());
    assert_eq!(
        audit.total.dead_lettered,
        (LARGE / 2) as u64,
        "{}",
        audit.render()
    );
}

/// The members of the group (their member ids), as the broker sees them.
fn group_members(env: &TestEnv) -> Vec<String> {
    let client = stream_bins::inspect::plain_consumer(&env.config.brokers).expect("client");
    let groups = client
        .fetch_group_list(Some(&env.config.group_id), Duration::from_secs(10))
        .expect("group list");
    let mut members: Vec<String> = groups
        .groups()
        .iter()
        .flat_map(|group| group.members().iter().map(|member| member.id().to_string()))
        .collect();
    members.sort();
    members
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_member_stays_in_the_group_through_an_outage_longer_than_max_poll_interval() {
    const MAX_POLL_INTERVAL: Duration = Duration::from_secs(6);
    let env = TestEnv::new("pausing", 3).await;
    let mut processor = ProcessorProcess::start(
        &env,
        &[
            ("SERVICE_TIMEOUT_MS", "1000"),
            ("MAX_POLL_INTERVAL_MS", "6000"),
            ("MAX_IN_FLIGHT_BYTES", "1048576"),
        ],
    );
    processor.wait_ready(Duration::from_secs(60));
    let production = env.produce_in_background(60_000, 2_000, 0.01, 71);
    assert!(
        within(Duration::from_secs(60), || processor
            .metric("stream_events_processed_total")
            .is_some_and(|stored| stored > 0.0))
        .await,
        "nothing stored:\n{}",
        processor.log_tail()
    );
    let members = group_members(&env);
    assert_eq!(members.len(), 1, "one member: {members:?}");

    let mut frozen = Frozen::freeze("postgres");
    assert!(
        within(Duration::from_secs(30), || processor
            .metric("stream_consumer_pauses_total")
            .is_some_and(|pauses| pauses > 0.0))
        .await,
        "intake never paused while PostgreSQL hung:\n{}",
        processor.log_tail()
    );
    // Hold the outage for three poll intervals, watching the group.
    let outage = Instant::now();
    while outage.elapsed() < 3 * MAX_POLL_INTERVAL {
        assert!(
            processor.child.try_wait().unwrap().is_none(),
            "processor died:\n{}",
            processor.log_tail()
        );
        assert_eq!(
            group_members(&env),
            members,
            "the member left the group during the outage:\n{}",
            processor.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let in_flight = processor.metric("stream_in_flight_bytes").unwrap_or(0.0);
    assert!(
        in_flight <= 1048576.0,
        "{in_flight} bytes in flight past the budget"
    );
    frozen.thaw();

    let ledger = production.await.expect("loadgen task");
    env.wait_for_catch_up(Duration::from_secs(300)).await;
    assert_eq!(
        group_members(&env),
        members,
        "a new member id after the outage"
    );
    assert_eq!(
        processor.metric("stream_pipeline_restarts_total"),
        Some(0.0),
        "the pipeline restarted:\n{}",
        processor.log_tail()
    );
    let log = std::fs::read_to_string(&processor.log).unwrap_or_default();
    assert!(
        !log.contains("max.poll.interval") && !log.contains("maximum poll interval"),
        "librdkafka saw the poll interval pass:\n{}",
        processor.log_tail()
    );
    assert_eq!(processor.terminate(Duration::from_secs(60)), Some(0));
    assert_clean(&audit(&env).await, &ledger);
}
