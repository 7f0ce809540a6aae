//! Rows carry their source topic: two pipelines reading two topics share
//! one PostgreSQL and one ClickHouse `events` table, and `streamctl audit`
//! and `report` reconcile each topic on its own (without the topic, each
//! audit saw the other's rows as unknown positions). Tables made before the
//! column existed are migrated: by `streamctl db migrate
//! --existing-rows-topic`, or by the processor at start (its own topic).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{assert_clean, audit, create_topics, run_binary, unique_name, TestEnv};
use stream_supervisor::start_pipeline;

/// The `events` table as versions before `source_topic` made it.
const OLD_POSTGRES_EVENTS: &str = "CREATE TABLE events (
    event_id UUID PRIMARY KEY, event_type TEXT NOT NULL, user_id TEXT NOT NULL,
    amount DOUBLE PRECISION NOT NULL, ts_ms BIGINT NOT NULL, schema_version INTEGER NOT NULL,
    source_partition INTEGER NOT NULL, source_offset BIGINT NOT NULL,
    stored_at TIMESTAMPTZ NOT NULL DEFAULT now());
  INSERT INTO events (event_id, event_type, user_id, amount, ts_ms, schema_version, source_partition, source_offset) VALUES
    ('00000000-0000-4000-8000-000000000001', 'click', 'u1', 1.0, 0, 1, 0, 900000),
    ('00000000-0000-4000-8000-000000000002', 'click', 'u2', 2.0, 0, 1, 1, 900000);";

/// A PostgreSQL connection as the owner, after making the `events` table
/// the way versions before `source_topic` did, with two rows.
async fn old_postgres_table(env: &TestEnv) -> tokio_postgres::Client {
    let owner = stream_actors::storage::connect_postgres(&env.config.postgres_url)
        .await
        .expect("postgres");
    owner
        .batch_execute(OLD_POSTGRES_EVENTS)
        .await
        .expect("old table");
    owner
}

async fn postgres_rows_by_topic(env: &TestEnv) -> BTreeMap<String, i64> {
    let client = stream_actors::storage::connect_postgres(&env.config.postgres_url)
        .await
        .expect("postgres");
    client
        .query("SELECT source_topic, count(*) FROM events GROUP BY 1", &[])
        .await
        .expect("count by topic")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

fn clickhouse(env: &TestEnv) -> clickhouse::Client {
    stream_actors::storage::ClickHouseEvents::client(&env.config).expect("clickhouse client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pipelines_share_the_tables_and_each_topic_reconciles_alone() {
    let first = TestEnv::new("shared", 3).await;
    // A second pipeline: its own topics and group, the same two databases.
    let name = unique_name("sharedb");
    let (topic, dlq_topic) = (format!("{name}_events"), format!("{name}_events_dlq"));
    create_topics(&[(&topic, 2), (&dlq_topic, 3)]).await;
    let mut config = first.config.clone();
    config.topic = topic;
    config.dlq_topic = dlq_topic;
    config.group_id = format!("{name}_group");
    let second = TestEnv { config };

    let first_ledger = first.produce(2_000, 0.02, 31).await;
    let second_ledger = second.produce(1_500, 0.02, 32).await;
    let first_pipeline = start_pipeline(first.config.clone()).await.expect("first");
    let second_pipeline = start_pipeline(second.config.clone()).await.expect("second");
    first.wait_for_catch_up(Duration::from_secs(90)).await;
    second.wait_for_catch_up(Duration::from_secs(90)).await;
    first_pipeline.shutdown().await;
    second_pipeline.shutdown().await;

    let by_topic = postgres_rows_by_topic(&first).await;
    assert_eq!(
        by_topic.get(&first.config.topic),
        Some(&(first_ledger.valid as i64)),
        "{by_topic:?}"
    );
    assert_eq!(
        by_topic.get(&second.config.topic),
        Some(&(second_ledger.valid as i64)),
        "{by_topic:?}"
    );
    for (env, ledger) in [(&first, &first_ledger), (&second, &second_ledger)] {
        assert_clean(&audit(env).await, ledger);
        let report = stream_bins::report::gather(&env.connections())
            .await
            .expect("report");
        assert!(report.accounted_for(), "{}", report.render());
        assert_eq!(
            report.postgres_rows,
            ledger.valid as i64,
            "{}",
            report.render()
        );
        assert_eq!(
            report.clickhouse_final_rows,
            ledger.valid,
            "{}",
            report.render()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_migrate_attributes_an_older_tables_rows_to_the_topic_it_is_given() {
    let env = TestEnv::new("migrate_topic", 2).await;
    let owner = old_postgres_table(&env).await;
    let migrate = |topic: &str| {
        run_binary(
            env!("CARGO_BIN_EXE_streamctl"),
            &[
                "db",
                "migrate",
                "--postgres-url",
                &env.config.postgres_url,
                "--existing-rows-topic",
                topic,
            ],
            &[],
            Duration::from_secs(60),
        )
    };
    let refused = migrate("not a topic!");
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--existing-rows-topic"));

    let output = migrate("legacy.events");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(
            "table events: added source_topic; 2 existing rows attributed to topic legacy.events"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("table events: added traceparent"),
        "{stdout}"
    );
    assert_eq!(
        postgres_rows_by_topic(&env).await,
        BTreeMap::from([("legacy.events".to_string(), 2)])
    );
    let nullable: String = owner
        .query_one(
            "SELECT is_nullable FROM information_schema.columns WHERE table_name = 'events' AND column_name = 'source_topic'",
            &[],
        )
        .await
        .expect("column")
        .get(0);
    assert_eq!(nullable, "NO");
    // Once is enough: a second run finds the column and says nothing of it.
    let again = migrate("other");
    assert!(again.status.success());
    assert!(!String::from_utf8_lossy(&again.stdout).contains("added"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processor_migrates_older_tables_to_its_own_topic() {
    let env = TestEnv::new("legacy_tables", 2).await;
    old_postgres_table(&env).await;
    let clickhouse = clickhouse(&env);
    clickhouse
        .query(
            "CREATE TABLE events (event_id String, event_type String, user_id String, amount Float64,
             ts_ms Int64, schema_version UInt32, source_partition Int32, source_offset Int64,
             stored_at DateTime DEFAULT now()) ENGINE = ReplacingMergeTree() ORDER BY event_id",
        )
        .execute()
        .await
        .expect("old clickhouse table");
    clickhouse
        .query("INSERT INTO events (event_id, event_type, user_id, amount, ts_ms, schema_version, source_partition, source_offset) VALUES ('old-1', 'click', 'u1', 1, 0, 1, 0, 900000), ('old-2', 'click', 'u2', 2, 0, 1, 1, 900000)")
        .execute()
        .await
        .expect("old clickhouse rows");

    let ledger = env.produce(500, 0.0, 33).await;
    let pipeline = start_pipeline(env.config.clone()).await.expect("pipeline");
    env.wait_for_catch_up(Duration::from_secs(90)).await;
    pipeline.shutdown().await;

    let topic = env.config.topic.clone();
    assert_eq!(
        postgres_rows_by_topic(&env).await,
        BTreeMap::from([(topic.clone(), ledger.valid as i64 + 2)])
    );
    let by_topic: Vec<(String, u64)> = clickhouse
        .query("SELECT source_topic, count() FROM events FINAL GROUP BY source_topic")
        .fetch_all()
        .await
        .expect("clickhouse by topic");
    assert_eq!(by_topic, vec![(topic, ledger.valid + 2)]);
    // And a traceparent column: none in the old rows, one in every new row.
    let postgres = stream_actors::storage::connect_postgres(&env.config.postgres_url)
        .await
        .expect("postgres");
    let traced = postgres
        .query_one(
            "SELECT count(*) FILTER (WHERE traceparent IS NULL), count(*) FILTER (WHERE traceparent LIKE '00-%') FROM events",
            &[],
        )
        .await
        .expect("count traced rows");
    assert_eq!(
        (traced.get::<_, i64>(0), traced.get::<_, i64>(1)),
        (2, ledger.valid as i64)
    );
    let traced: (u64, u64) = clickhouse
        .query("SELECT countIf(traceparent = ''), countIf(startsWith(traceparent, '00-')) FROM events FINAL")
        .fetch_one()
        .await
        .expect("clickhouse traced rows");
    assert_eq!(traced, (2, ledger.valid));
}
