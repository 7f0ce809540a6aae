//! What the processor's log tells an operator: a clean run (poison
//! included: a dead letter is data, not an error) writes no ERROR line and
//! no terminal colours into a file; a store that refuses a batch for a
//! reason that is not the data is named with the server's own words (the
//! SQLSTATE, or ClickHouse's code), the batch's size and its first and
//! last source positions, and the run recovers once the store is fixed.

mod common;

use std::time::Duration;

use common::{assert_clean, audit, clickhouse_url, ProcessorProcess, TestEnv};

fn log_of(processor: &ProcessorProcess) -> String {
    std::fs::read_to_string(&processor.log).expect("processor log")
}

/// Waits until the processor's log holds `needle` (panics after 60 s).
async fn wait_for_log(processor: &ProcessorProcess, needle: &str) -> String {
    let mut found = String::new();
    common::wait_until(
        &format!("{needle:?} in the processor's log"),
        Duration::from_secs(60),
        || {
            let log = log_of(processor);
            let hit = log.contains(needle);
            if hit {
                found = log;
            }
            async move { hit }
        },
    )
    .await;
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_logs_no_error() {
    let env = TestEnv::new("cleanlog", 3).await;
    let mut processor = ProcessorProcess::start(&env, &[]);
    processor.wait_ready(Duration::from_secs(30));
    let ledger = env.produce(3_000, 0.02, 11).await;
    env.wait_for_catch_up(Duration::from_secs(60)).await;
    assert_eq!(processor.terminate(Duration::from_secs(30)), Some(0));
    assert_clean(&audit(&env).await, &ledger);
    let log = log_of(&processor);
    let errors: Vec<&str> = log.lines().filter(|line| line.contains("ERROR")).collect();
    assert!(
        errors.is_empty(),
        "ERROR lines in a clean run:\n{}",
        errors.join("\n")
    );
    assert!(
        !log.contains('\u{1b}'),
        "terminal colour codes in a log file:\n{log}"
    );
    assert!(log.contains("INFO"), "the log says nothing at all:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_is_named_with_the_servers_words_and_its_positions() {
    let env = TestEnv::new("storeerr", 2).await;
    let mut processor = ProcessorProcess::start(&env, &[]);
    processor.wait_ready(Duration::from_secs(30));
    let postgres = stream_actors::storage::connect_postgres(&env.config.postgres_url)
        .await
        .expect("postgres");
    let clickhouse = clickhouse::Client::default()
        .with_url(clickhouse_url())
        .with_database(&env.config.clickhouse_database);

    // PostgreSQL: a column renamed under the running pipeline (a botched
    // migration): every insert fails with 42703 until it is renamed back.
    postgres
        .batch_execute("ALTER TABLE events RENAME COLUMN amount TO amount_renamed")
        .await
        .expect("rename");
    let first = env.produce(200, 0.0, 21).await;
    let log = wait_for_log(&processor, "SQLSTATE 42703").await;
    let line = log
        .lines()
        .find(|line| line.contains("SQLSTATE 42703"))
        .expect("the line");
    eprintln!("the operator reads: {line}");
    for wanted in [
        "postgres: insert a batch of",
        "(first partition",
        ", last partition",
        r#"column "amount" of relation "events" does not exist"#,
    ] {
        assert!(line.contains(wanted), "{wanted:?} missing from:\n{line}");
    }
    postgres
        .batch_execute("ALTER TABLE events RENAME COLUMN amount_renamed TO amount")
        .await
        .expect("rename back");
    env.wait_for_catch_up(Duration::from_secs(60)).await;

    // ClickHouse: a column dropped: Code 16 (no such column) until it is back.
    clickhouse
        .query("ALTER TABLE events DROP COLUMN amount")
        .execute()
        .await
        .expect("drop column");
    let second = env.produce(200, 0.0, 22).await;
    let log = wait_for_log(&processor, "clickhouse: insert a batch of").await;
    let line = log
        .lines()
        .find(|line| line.contains("clickhouse: insert a batch of"))
        .expect("the line");
    eprintln!("the operator reads: {line}");
    for wanted in ["(first partition", ", last partition", "Code: 16", "amount"] {
        assert!(line.contains(wanted), "{wanted:?} missing from:\n{line}");
    }
    clickhouse
        .query("ALTER TABLE events ADD COLUMN amount Float64")
        .execute()
        .await
        .expect("add column back");
    env.wait_for_catch_up(Duration::from_secs(60)).await;

    let ledger = loadgen::Ledger {
        sent: first.sent + second.sent,
        valid: first.valid + second.valid,
        poison: first.poison + second.poison,
        ..first
    };
    assert_clean(&audit(&env).await, &ledger);
}
