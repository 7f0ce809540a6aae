//! `streamctl dlq archive` on the real services (Kafka, moto's S3): every
//! dead letter lands in the archive once, byte for byte, whatever kills the
//! archiver and however often it is run again; `--from-archive` reads it back
//! and replays from it with the same at-most-once rule as from the topic,
//! after the topic has lost the dead letters.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{by_type, run_binary, run_until_caught_up, KillOnDrop, TestEnv};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use stream_actors::faults::Faults;
use stream_bins::archive::{self, hour_folder, Archive, ArchiveArgs, S3Args};
use stream_bins::dlq::{self, DlqFilter};
use stream_bins::inspect::{self, ReadRecord};

const STREAMCTL: &str = env!("CARGO_BIN_EXE_streamctl");

fn s3_args(bucket: &str) -> S3Args {
    S3Args {
        s3_endpoint: std::env::var("S3_ENDPOINT").unwrap_or("http://127.0.0.1:4566".into()),
        s3_region: "us-east-1".into(),
        s3_access_key_id: "test".into(),
        s3_secret_access_key: "test".into(),
        archive_bucket: bucket.to_string(),
        archive_prefix: String::new(),
    }
}

/// A bucket of this test's own (bucket names take no underscores).
fn bucket_for(env: &TestEnv) -> String {
    format!("dlq-{}", env.config.dlq_topic.replace('_', "-")).to_lowercase()
}

/// Records whose payload and key are not UTF-8: their dead letters are
/// archived in base64.
async fn produce_binary(env: &TestEnv, count: u8) {
    let producer: FutureProducer = env.config.brokers.client_config().create().unwrap();
    for index in 0..count {
        let key = [0xfe, index];
        let payload = [0xff, 0x00, 0xc3, 0x28, index];
        producer
            .send(
                FutureRecord::to(&env.config.topic)
                    .key(&key[..])
                    .payload(&payload[..]),
                Timeout::After(Duration::from_secs(30)),
            )
            .await
            .map_err(|(error, _)| error)
            .expect("binary record produced");
    }
}

/// The archiver's command line for `env`.
fn archive_command(env: &TestEnv, bucket: &str, extra: &[&str]) -> Vec<String> {
    let mut arguments: Vec<String> = ["dlq", "archive", "--create-bucket"]
        .iter()
        .map(|text| text.to_string())
        .collect();
    arguments.extend(env.processor_flags());
    arguments.extend(
        [
            "--archive-bucket",
            bucket,
            "--archiver-group",
            &format!("{}-archiver", env.config.group_id),
        ]
        .iter()
        .map(|text| text.to_string()),
    );
    arguments.extend(extra.iter().map(|text| text.to_string()));
    arguments
}

fn stdout(output: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Every archived dead letter (not deduplicated), by position, with the
/// manifests and every key under the topic's folder.
async fn archived(
    archive: &Archive,
    dlq_topic: &str,
) -> (
    Vec<archive::ArchivedRecord>,
    Vec<archive::Manifest>,
    Vec<String>,
) {
    let manifests = archive.manifests(dlq_topic).await.unwrap();
    let mut records = Vec::new();
    for manifest in &manifests {
        records.extend(archive.object_records(manifest).await.unwrap());
    }
    let keys = archive
        .list(&archive.topic_prefix(dlq_topic))
        .await
        .unwrap();
    (records, manifests, keys)
}

async fn manifests_cover(archive: &Archive, dlq_topic: &str) -> BTreeMap<i32, i64> {
    let mut next = BTreeMap::new();
    for manifest in archive.manifests(dlq_topic).await.unwrap() {
        next.insert(manifest.dlq_partition, manifest.last_offset + 1);
    }
    next
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_archiver_run_again_archives_every_dead_letter_once() {
    let env = TestEnv::new("archive", 3).await;
    let ledger = env.produce(3_000, 0.05, 41).await;
    produce_binary(&env, 5).await;
    run_until_caught_up(&env, vec![1]).await;
    let dlq_topic = env.config.dlq_topic.clone();
    let topic_records =
        inspect::read_topic(&env.config.brokers, &dlq_topic, Duration::from_secs(60)).unwrap();
    assert_eq!(topic_records.len() as u64, ledger.poison + 5);
    let ends = inspect::end_offsets(&env.config.brokers, &dlq_topic).unwrap();
    // A batch size that leaves some partition with a part-filled batch, so
    // the SIGKILL below comes mid-batch.
    let batch = [10_i64, 11, 13, 7]
        .into_iter()
        .find(|size| ends.values().any(|end| end % size != 0))
        .unwrap();
    let batch_flag = batch.to_string();
    let bucket = bucket_for(&env);
    let archive = s3_args(&bucket).archive().unwrap();

    // 1. Crash between an object and its manifest (the third object).
    let crashed = run_binary(
        STREAMCTL,
        &archive_command(&env, &bucket, &["--max-batch-records", &batch_flag]),
        &[("STREAM_CRASH_AT", "after_archive_object:3")],
        Duration::from_secs(120),
    );
    assert!(!crashed.status.success(), "{}", stdout(&crashed));
    let (_, manifests, keys) = archived(&archive, &dlq_topic).await;
    assert_eq!(manifests.len(), 2, "{}", stdout(&crashed));
    assert_eq!(
        keys.len(),
        2 * 2 + 1,
        "two objects with manifests, one without: {keys:?}"
    );

    let before_crash = manifests_cover(&archive, &dlq_topic).await;

    // 2. Follow; SIGKILL once every partition has less than a batch left,
    //    some of it read and held in an open batch.
    let serve = format!("127.0.0.1:{}", common::free_port());
    let mut follower = KillOnDrop(
        std::process::Command::new(STREAMCTL)
            .args(archive_command(
                &env,
                &bucket,
                &[
                    "--follow",
                    "--max-batch-records",
                    &batch_flag,
                    "--max-batch-age-secs",
                    "600",
                    "--serve",
                    &serve,
                ],
            ))
            .env_remove("KAFKA_BROKERS")
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::wait_until(
        "every partition archived to its last part-filled batch",
        Duration::from_secs(120),
        || {
            let (archive, dlq_topic, ends) = (&archive, &dlq_topic, &ends);
            async move {
                let next = manifests_cover(archive, dlq_topic).await;
                ends.iter()
                    .all(|(partition, end)| end - next.get(partition).copied().unwrap_or(0) < batch)
            }
        },
    )
    .await;
    // Its metrics say what it wrote and what it holds; it is healthy.
    let archived_now: i64 = manifests_cover(&archive, &dlq_topic)
        .await
        .iter()
        .map(|(partition, next)| next - before_crash.get(partition).copied().unwrap_or(0))
        .sum();
    assert!(
        common::within(Duration::from_secs(10), || {
            common::scrape(&serve, "stream_dlq_archive_records_total", "")
                == Some(archived_now as f64)
                && common::scrape(&serve, "stream_dlq_archive_open_records", "")
                    .is_some_and(|held| held > 0.0)
        })
        .await,
        "{:?}",
        common::http_get(&serve, "/metrics")
    );
    assert_eq!(common::http_get(&serve, "/healthz").unwrap().0, 200);
    follower.0.kill().unwrap();
    follower.0.wait().unwrap();
    let before_rerun = manifests_cover(&archive, &dlq_topic).await;
    assert!(
        ends.iter()
            .any(|(partition, end)| before_rerun.get(partition).copied().unwrap_or(0) < *end),
        "the kill came mid-batch: {before_rerun:?} of {ends:?}"
    );

    // 3. Run again to the end; 4. and again: nothing more to write.
    let rerun = run_binary(
        STREAMCTL,
        &archive_command(&env, &bucket, &["--max-batch-records", &batch_flag]),
        &[],
        Duration::from_secs(120),
    );
    assert!(rerun.status.success(), "{}", stdout(&rerun));
    let (records, manifests, keys) = archived(&archive, &dlq_topic).await;
    let again = run_binary(
        STREAMCTL,
        &archive_command(&env, &bucket, &["--max-batch-records", &batch_flag]),
        &[],
        Duration::from_secs(120),
    );
    assert!(again.status.success(), "{}", stdout(&again));
    assert!(
        stdout(&again).contains("nothing to archive"),
        "{}",
        stdout(&again)
    );
    assert_eq!(archived(&archive, &dlq_topic).await.2, keys);

    // Every dead letter once, byte for byte; every object has its manifest
    // (the one left without is written over, not beside).
    assert_eq!(keys.len(), manifests.len() * 2, "{keys:?}");
    let positions: BTreeSet<(i32, i64)> = records
        .iter()
        .map(|record| (record.dlq_partition, record.dlq_offset))
        .collect();
    assert_eq!(
        positions.len(),
        records.len(),
        "a dead letter archived twice"
    );
    assert_eq!(records.len(), topic_records.len());
    let by_position: BTreeMap<(i32, i64), &ReadRecord> = topic_records
        .iter()
        .map(|record| ((record.partition, record.offset), record))
        .collect();
    let mut base64 = 0;
    for record in &records {
        let original = by_position[&(record.dlq_partition, record.dlq_offset)];
        let back = record.to_read().unwrap();
        assert_eq!(back.key, original.key);
        assert_eq!(back.payload, original.payload);
        for (name, value) in &original.headers {
            assert_eq!(back.header(name), Some(value.as_str()), "header {name}");
        }
        if record.payload_encoding == archive::Encoding::Base64 {
            base64 += 1;
        }
    }
    assert_eq!(base64, 5, "the binary records' dead letters are in base64");
    for manifest in &manifests {
        let first = by_position[&(manifest.dlq_partition, manifest.first_offset)];
        let folder = hour_folder(first.timestamp_ms);
        assert_eq!(
            manifest.object,
            format!(
                "{dlq_topic}/{folder}/{dlq_topic}+{}+{:020}.jsonl.gz",
                manifest.dlq_partition, manifest.first_offset
            )
        );
        assert!(manifest.records <= batch as u64);
    }
    // The archiver's group is at the end (what `streamctl lag` shows).
    let committed = inspect::kafka_committed_offsets(
        &env.config.brokers,
        &format!("{}-archiver", env.config.group_id),
        &dlq_topic,
    )
    .unwrap();
    assert_eq!(committed, ends);

    // `dlq stats --from-archive` counts what the topic holds.
    let mut stats_arguments: Vec<String> = ["dlq", "stats", "--json", "--from-archive"]
        .iter()
        .map(|text| text.to_string())
        .collect();
    stats_arguments.extend(env.processor_flags());
    stats_arguments.extend(["--archive-bucket".to_string(), bucket.clone()]);
    let stats = run_binary(STREAMCTL, &stats_arguments, &[], Duration::from_secs(60));
    assert!(stats.status.success(), "{}", stdout(&stats));
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["total"], serde_json::json!(ledger.poison + 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_the_topic_lost_are_replayed_from_the_archive_once() {
    let env = TestEnv::new("archreplay", 3).await;
    let ledger = env.produce(2_000, 0.05, 42).await;
    let unknown_version = ledger.poison_by_kind["unknown_schema_version"];
    assert!(unknown_version > 0, "{ledger:?}");
    run_until_caught_up(&env, vec![1]).await;
    let connections = env.connections();
    let bucket = bucket_for(&env);
    let archive = s3_args(&bucket).archive().unwrap();
    let arguments = ArchiveArgs {
        connections: connections.clone(),
        s3: s3_args(&bucket),
        follow: false,
        max_batch_bytes: 5 * 1024 * 1024,
        max_batch_records: 100_000,
        max_batch_age_secs: 300,
        archiver_group: format!("{}-archiver", env.config.group_id),
        create_bucket: true,
        serve: None,
    };
    let outcome = archive::run(&arguments, &Faults::none(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(outcome.records, ledger.poison);

    // Retention deletes the topic's dead letters.
    let ends = inspect::end_offsets(&env.config.brokers, &env.config.dlq_topic).unwrap();
    let admin: AdminClient<DefaultClientContext> =
        env.config.brokers.client_config().create().unwrap();
    let mut deleted = TopicPartitionList::new();
    for (partition, end) in &ends {
        deleted
            .add_partition_offset(&env.config.dlq_topic, *partition, Offset::Offset(*end))
            .unwrap();
    }
    admin
        .delete_records(&deleted, &AdminOptions::new())
        .await
        .unwrap();
    assert!(dlq::read_dead_letters(&connections).unwrap().is_empty());

    // From the archive: the same counts, and a replay that lands each once.
    let records = archive.read(&env.config.dlq_topic).await.unwrap();
    let stats = dlq::stats(&records, &env.config.topic, &DlqFilter::default());
    assert_eq!(stats.total, ledger.poison);
    assert_eq!(
        stats.by_error_type["unknown_schema_version"],
        unknown_version
    );
    let by_type = by_type("unknown_schema_version");
    let replayed = dlq::replay_records(&connections, &records, &by_type, 1, true)
        .await
        .unwrap();
    assert_eq!(replayed.published, unknown_version);
    run_until_caught_up(&env, vec![1, 99]).await;
    let postgres = inspect::postgres_counts(&env.config.postgres_url, &env.config.topic)
        .await
        .unwrap();
    assert_eq!(postgres.rows as u64, ledger.valid + unknown_version);
    assert_eq!(postgres.distinct_event_ids, postgres.rows);
    let again = dlq::replay_records(&connections, &records, &by_type, 1, true)
        .await
        .unwrap();
    assert_eq!(again.selected, 0);
    assert_eq!(again.skipped_already_replayed, unknown_version);

    // Dead letters deleted before they were archived are named, not hidden.
    let producer: FutureProducer = env.config.brokers.client_config().create().unwrap();
    producer
        .send(
            FutureRecord::to(&env.config.dlq_topic)
                .partition(0)
                .key("late")
                .payload("late"),
            Timeout::After(Duration::from_secs(30)),
        )
        .await
        .map_err(|(error, _)| error)
        .unwrap();
    let ends = inspect::end_offsets(&env.config.brokers, &env.config.dlq_topic).unwrap();
    let mut deleted = TopicPartitionList::new();
    deleted
        .add_partition_offset(&env.config.dlq_topic, 0, Offset::Offset(ends[&0]))
        .unwrap();
    admin
        .delete_records(&deleted, &AdminOptions::new())
        .await
        .unwrap();
    let outcome = archive::run(&arguments, &Faults::none(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(outcome.records, 0);
    assert_eq!(
        outcome.expired.get(&0).copied(),
        Some((ends[&0] - 1, ends[&0]))
    );
}
