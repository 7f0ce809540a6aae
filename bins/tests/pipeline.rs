//! End-to-end tests of the pipeline on the real local services (Apache Kafka,
//! PostgreSQL, ClickHouse): `scripts/services.sh up` must have run.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::TestEnv;
use stream_actors::dlq_writer::DLQ_HEADERS;
use stream_actors::parse::PoisonKind as ParserPoisonKind;
use stream_bins::inspect;
use stream_supervisor::{start_pipeline, PipelineExit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_lands_exactly_once_in_the_sinks_or_the_dlq() {
    let env = TestEnv::new("e2e", 6).await;
    let ledger = env.produce(100_000, 0.005, 42).await;
    assert_eq!(ledger.sent, 100_000);
    assert!(
        ledger.poison > 300 && ledger.poison < 700,
        "poison {}",
        ledger.poison
    );

    let pipeline = start_pipeline(env.config.clone())
        .await
        .expect("pipeline starts");
    env.wait_for_catch_up(Duration::from_secs(240)).await;
    assert_eq!(pipeline.shutdown().await, PipelineExit::Stopped);

    // PostgreSQL: exactly the valid events, no duplicate event_id.
    let postgres = inspect::postgres_counts(&env.config.postgres_url, &env.config.topic)
        .await
        .unwrap();
    assert_eq!(postgres.rows, ledger.valid as i64);
    assert_eq!(postgres.distinct_event_ids, postgres.rows);

    // ClickHouse: one row per event_id.
    let clickhouse = inspect::clickhouse_counts(&env.config).await.unwrap();
    assert_eq!(clickhouse.final_rows, ledger.valid);
    assert_eq!(clickhouse.distinct_event_ids, ledger.valid);

    // The DLQ, read back independently: exactly the poison, each with every
    // header, pointing at a distinct source record whose key and bytes it carries.
    let source = inspect::read_topic(
        &env.config.brokers,
        &env.config.topic,
        Duration::from_secs(120),
    )
    .unwrap();
    assert_eq!(source.len() as u64, ledger.sent);
    let source_by_position: HashMap<(i32, i64), &inspect::ReadRecord> = source
        .iter()
        .map(|record| ((record.partition, record.offset), record))
        .collect();
    let dead_letters = inspect::read_topic(
        &env.config.brokers,
        &env.config.dlq_topic,
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(dead_letters.len() as u64, ledger.poison);
    let mut seen_positions = HashSet::new();
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    for dead_letter in &dead_letters {
        for header in DLQ_HEADERS {
            let value = dead_letter
                .header(header)
                .unwrap_or_else(|| panic!("missing header {header}"));
            assert!(!value.is_empty(), "empty header {header}");
        }
        let error_type = dead_letter.header("dlq.error.type").unwrap();
        assert!(
            ParserPoisonKind::from_label(error_type).is_some(),
            "unknown error type {error_type}"
        );
        assert_eq!(
            dead_letter.header("dlq.source.topic"),
            Some(env.config.topic.as_str())
        );
        assert_eq!(dead_letter.header("dlq.stage"), Some("parse"));
        let failed_at: i64 = dead_letter
            .header("dlq.failed_at")
            .unwrap()
            .parse()
            .expect("failed_at is ms");
        assert!(failed_at > 1_700_000_000_000);
        let partition: i32 = dead_letter
            .header("dlq.source.partition")
            .unwrap()
            .parse()
            .unwrap();
        let offset: i64 = dead_letter
            .header("dlq.source.offset")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            seen_positions.insert((partition, offset)),
            "duplicate dead letter for {partition}/{offset}"
        );
        let original = source_by_position
            .get(&(partition, offset))
            .unwrap_or_else(|| {
                panic!("dead letter points at missing source record {partition}/{offset}")
            });
        assert_eq!(dead_letter.payload, original.payload, "payload changed");
        assert_eq!(dead_letter.key, original.key, "key changed");
        *by_type.entry(error_type.to_string()).or_insert(0) += 1;
    }
    let mut expected_by_type: BTreeMap<String, u64> = BTreeMap::new();
    for kind in loadgen::PoisonKind::ALL {
        let sent = ledger
            .poison_by_kind
            .get(kind.label())
            .copied()
            .unwrap_or(0);
        if sent > 0 {
            *expected_by_type
                .entry(kind.expected_dlq_error_type().to_string())
                .or_insert(0) += sent;
        }
    }
    assert_eq!(by_type, expected_by_type);

    // Offsets: the checkpoint and Kafka's committed offsets equal the end offsets.
    let ends = inspect::end_offsets(&env.config.brokers, &env.config.topic).unwrap();
    let checkpoint = inspect::checkpoint_offsets(
        &env.config.postgres_url,
        &env.config.group_id,
        &env.config.topic,
    )
    .await
    .unwrap();
    assert_eq!(checkpoint, ends);
    let committed = inspect::kafka_committed_offsets(
        &env.config.brokers,
        &env.config.group_id,
        &env.config.topic,
    )
    .unwrap();
    assert_eq!(committed, ends);

    // The report agrees.
    let report = stream_bins::report::gather(&env.connections())
        .await
        .unwrap();
    assert!(report.accounted_for(), "{}", report.render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_tiny_mailboxes_never_exceeds_capacity_and_all_arrives() {
    let env = TestEnv::new("burst", 3).await;
    let ledger = env.produce(30_000, 0.01, 7).await;
    let capacity = 2;
    let mut config = env.config.clone();
    config.mailbox_capacity = capacity;
    config.batch_size = 100;
    config.linger = Duration::from_millis(5);

    let pipeline = start_pipeline(config).await.expect("pipeline starts");
    // Sample the mailboxes while the burst drains.
    let mut samples = 0;
    let mut caught_up = false;
    for _ in 0..2400 {
        let status = pipeline.status().await.expect("status");
        for mailbox in &status.mailboxes {
            assert_eq!(mailbox.capacity, capacity);
            assert!(mailbox.depth <= capacity, "{mailbox:?}");
        }
        samples += 1;
        let ends = inspect::end_offsets(&env.config.brokers, &env.config.topic).unwrap();
        if status.committer.in_flight == 0 && status.committer.persisted == ends {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(caught_up, "pipeline did not catch up");
    let status = pipeline.status().await.expect("status");
    for mailbox in &status.mailboxes {
        assert!(mailbox.max_depth <= capacity, "bound broken: {mailbox:?}");
    }
    // The bound was reached and made senders wait: backpressure engaged.
    let parser = status
        .mailboxes
        .iter()
        .find(|mailbox| mailbox.actor == "parser")
        .unwrap();
    assert_eq!(parser.max_depth, capacity);
    let total_wait: f64 = status
        .mailboxes
        .iter()
        .map(|mailbox| mailbox.wait_seconds)
        .sum();
    assert!(
        total_wait > 0.0,
        "no sender ever waited: {:?}",
        status.mailboxes
    );
    assert!(samples > 0);
    assert_eq!(pipeline.shutdown().await, PipelineExit::Stopped);

    let postgres = inspect::postgres_counts(&env.config.postgres_url, &env.config.topic)
        .await
        .unwrap();
    assert_eq!(postgres.rows, ledger.valid as i64);
    let clickhouse = inspect::clickhouse_counts(&env.config).await.unwrap();
    assert_eq!(clickhouse.final_rows, ledger.valid);
    let report = stream_bins::report::gather(&env.connections())
        .await
        .unwrap();
    assert_eq!(report.dead_lettered, ledger.poison);
    assert!(report.accounted_for(), "{}", report.render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_the_checkpoint_without_duplicates() {
    let env = TestEnv::new("resume", 3).await;
    let first = env.produce(5_000, 0.02, 11).await;
    let pipeline = start_pipeline(env.config.clone())
        .await
        .expect("pipeline starts");
    env.wait_for_catch_up(Duration::from_secs(120)).await;
    assert_eq!(pipeline.shutdown().await, PipelineExit::Stopped);

    let second = env.produce(5_000, 0.02, 12).await;
    let pipeline = start_pipeline(env.config.clone())
        .await
        .expect("pipeline restarts");
    env.wait_for_catch_up(Duration::from_secs(120)).await;
    assert_eq!(pipeline.shutdown().await, PipelineExit::Stopped);

    // Had the restart not resumed from the checkpoint, the first run's poison
    // would be dead-lettered again: the report counts duplicates by source position.
    let report = stream_bins::report::gather(&env.connections())
        .await
        .unwrap();
    assert_eq!(report.dead_letter_duplicates, 0);
    assert_eq!(report.postgres_rows as u64, first.valid + second.valid);
    assert_eq!(report.dead_lettered, first.poison + second.poison);
    assert!(report.accounted_for(), "{}", report.render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_ledger_matches_what_the_topic_holds() {
    let env = TestEnv::new("ledger", 3).await;
    let ledger = env.produce(20_000, 0.1, 3).await;
    assert_eq!(ledger.sent, 20_000);
    assert_eq!(ledger.valid + ledger.poison, ledger.sent);
    assert_eq!(ledger.poison_by_kind.values().sum::<u64>(), ledger.poison);
    let records = inspect::read_topic(
        &env.config.brokers,
        &env.config.topic,
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(records.len() as u64, ledger.sent);
    // Classify independently with the parser: its verdict matches the ledger.
    let rules = stream_actors::parse::ParseRules::with_now(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    );
    let valid = records
        .iter()
        .filter(|record| {
            stream_actors::parse::parse_event(record.payload.as_deref(), &rules).is_ok()
        })
        .count() as u64;
    assert_eq!(valid, ledger.valid);
}
