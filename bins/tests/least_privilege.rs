//! The processor as a least-privilege PostgreSQL role: `streamctl db
//! migrate` creates the tables as their owner and grants the role SELECT,
//! INSERT, UPDATE and DELETE on them, nothing more. Before the migration
//! the processor refuses to start with an error that says so; after it the
//! pipeline runs end to end as that role, and the role can neither create,
//! alter nor drop a table.

mod common;

use std::time::Duration;

use common::{assert_clean, audit, unique_name, ProcessorProcess, TestEnv};
use stream_actors::storage::connect_postgres;
use tokio_postgres::error::SqlState;

/// `url` with another user and password.
fn as_user(url: &str, user: &str, password: &str) -> String {
    let (_, host_and_database) = url.split_once('@').expect("url with user info");
    format!("postgres://{user}:{password}@{host_and_database}")
}

fn streamctl(arguments: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_streamctl"))
        .args(arguments)
        .env_remove("POSTGRES_URL")
        .output()
        .expect("streamctl runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processor_runs_as_a_role_that_may_only_read_and_write_its_tables() {
    let env = TestEnv::new("leastpriv", 3).await;
    let owner_url = env.config.postgres_url.clone();
    let role = unique_name("app");
    let password = uuid::Uuid::new_v4().simple().to_string();
    let owner = connect_postgres(&owner_url).await.expect("owner");
    owner
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{password}'; REVOKE CREATE ON SCHEMA public FROM PUBLIC"
        ))
        .await
        .expect("create role");
    let app_url = as_user(&owner_url, &role, &password);

    // Before the migration: no table, and the role may not create one.
    let mut early = ProcessorProcess::start(
        &env,
        &[("POSTGRES_URL", app_url.as_str()), ("MAX_RESTARTS", "0")],
    );
    assert_eq!(
        early.wait_exit(Duration::from_secs(90)),
        Some(1),
        "{}",
        early.log_tail()
    );
    let log = early.log_tail();
    assert!(log.contains("streamctl db migrate"), "{log}");
    assert!(!log.contains(&password), "the password leaked: {log}");

    // The migration, as the owner; a second run changes nothing.
    let migrate_to = |role: &str| {
        streamctl(&[
            "db",
            "migrate",
            "--postgres-url",
            &owner_url,
            "--grant-to",
            role,
        ])
    };
    let migrate = migrate_to(&role);
    let stdout = String::from_utf8_lossy(&migrate.stdout);
    assert!(migrate.status.success(), "{migrate:?}");
    assert!(stdout.contains("table events: created"), "{stdout}");
    assert!(
        stdout.contains("table pipeline_checkpoints: created"),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("to {role}")), "{stdout}");
    let again = migrate_to(&role);
    assert!(again.status.success(), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stdout).contains("table events: exists"));
    let bad_role = migrate_to("no such role");
    assert_eq!(bad_role.status.code(), Some(2), "{bad_role:?}");

    // The pipeline end to end as the role.
    let mut processor = ProcessorProcess::start(&env, &[("POSTGRES_URL", app_url.as_str())]);
    processor.wait_ready(Duration::from_secs(60));
    let ledger = env.produce(6_000, 0.01, 61).await;
    env.wait_for_catch_up(Duration::from_secs(120)).await;
    assert_clean(&audit(&env).await, &ledger);
    assert_eq!(processor.terminate(Duration::from_secs(60)), Some(0));

    // The role reads and writes, and nothing else.
    let app = connect_postgres(&app_url).await.expect("app role");
    let rows: i64 = app
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .expect("select")
        .get(0);
    assert_eq!(rows as u64, ledger.valid);
    for statement in [
        "CREATE TABLE intruder (id INT)",
        "ALTER TABLE events ADD COLUMN intruder INT",
        "DROP TABLE pipeline_checkpoints",
        "TRUNCATE events",
    ] {
        let refused = app.batch_execute(statement).await.expect_err(statement);
        assert_eq!(
            refused.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{statement}: {refused}"
        );
    }
    drop(app);
    owner
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .expect("drop role");
}
