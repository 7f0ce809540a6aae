//! `streamctl dlq` on the real services: stats match the ledger, a dry run
//! moves nothing, a replay of records that are now valid lands each once, and
//! a replay of records that are still poison does not loop.

mod common;

use std::time::Duration;

use common::{by_type, run_until_caught_up, TestEnv};
use stream_actors::dlq_writer::REPLAY_COUNT_HEADER;
use stream_bins::dlq::{self, DlqFilter};
use stream_bins::inspect;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_lands_fixed_records_once_and_never_loops_on_poison() {
    let env = TestEnv::new("replay", 3).await;
    let ledger = env.produce(4_000, 0.05, 21).await;
    let unknown_version = ledger.poison_by_kind["unknown_schema_version"];
    let malformed = ledger.poison_by_kind["malformed_json"];
    assert!(unknown_version > 0 && malformed > 0, "{ledger:?}");
    run_until_caught_up(&env, vec![1]).await;
    let connections = env.connections();

    // Stats agree with the ledger.
    let dead_letters = inspect::read_topic(
        &env.config.brokers,
        &env.config.dlq_topic,
        Duration::from_secs(60),
    )
    .unwrap();
    let stats = dlq::stats(&dead_letters, &env.config.topic, &DlqFilter::default());
    assert_eq!(stats.total, ledger.poison);
    assert_eq!(
        stats.by_error_type["unknown_schema_version"],
        unknown_version
    );
    assert_eq!(stats.by_stage["parse"], ledger.poison);
    assert_eq!(stats.by_age.values().sum::<u64>(), ledger.poison);

    // A dry run says what would move and moves nothing.
    let ends_before = inspect::end_offsets(&env.config.brokers, &env.config.topic).unwrap();
    let dry = dlq::replay(&connections, &by_type("unknown_schema_version"), 1, false)
        .await
        .unwrap();
    assert!(!dry.executed);
    assert_eq!(dry.selected, unknown_version);
    assert_eq!(dry.published, 0);
    assert_eq!(
        inspect::end_offsets(&env.config.brokers, &env.config.topic).unwrap(),
        ends_before
    );

    // The fix: the processor now accepts schema version 99. Replay lands each once.
    let replayed = dlq::replay(&connections, &by_type("unknown_schema_version"), 1, true)
        .await
        .unwrap();
    assert_eq!(replayed.published, unknown_version);
    run_until_caught_up(&env, vec![1, 99]).await;
    let postgres = inspect::postgres_counts(&env.config.postgres_url, &env.config.topic)
        .await
        .unwrap();
    assert_eq!(postgres.rows as u64, ledger.valid + unknown_version);
    assert_eq!(postgres.distinct_event_ids, postgres.rows);
    let clickhouse = inspect::clickhouse_counts(&env.config).await.unwrap();
    assert_eq!(clickhouse.final_rows, ledger.valid + unknown_version);

    // Replaying the same dead letters again selects nothing.
    let again = dlq::replay(&connections, &by_type("unknown_schema_version"), 1, true)
        .await
        .unwrap();
    assert_eq!(again.selected, 0);
    assert_eq!(again.skipped_already_replayed, unknown_version);

    // Still-poison records land back in the DLQ once, marked as replayed...
    let poison_replay = dlq::replay(&connections, &by_type("malformed_json"), 1, true)
        .await
        .unwrap();
    assert_eq!(poison_replay.published, malformed);
    run_until_caught_up(&env, vec![1, 99]).await;
    let dead_letters = inspect::read_topic(
        &env.config.brokers,
        &env.config.dlq_topic,
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(dead_letters.len() as u64, ledger.poison + malformed);
    let marked = dead_letters
        .iter()
        .filter(|record| record.header(REPLAY_COUNT_HEADER) == Some("1"))
        .count() as u64;
    assert_eq!(marked, malformed);
    // ...and are not replayed again: no loop.
    let no_loop = dlq::replay(&connections, &by_type("malformed_json"), 1, true)
        .await
        .unwrap();
    assert_eq!(no_loop.selected, 0);
    assert_eq!(no_loop.skipped_already_replayed, malformed);
    assert_eq!(no_loop.skipped_replay_limit, malformed);

    // Everything, replays included, is accounted for exactly once.
    let report = stream_bins::report::gather(&connections).await.unwrap();
    assert!(report.accounted_for(), "{}", report.render());
}
