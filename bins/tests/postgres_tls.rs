//! PostgreSQL over TLS on the real server: the local cluster runs with
//! `ssl = on` and the test CA's server certificate (`scripts/services.sh`).
//! With `sslmode=verify-full&sslrootcert=<the CA>` the processor stores
//! every event over verified TLS; a certificate that does not verify, or a
//! setting this build cannot honour, fails at start naming the setting.

mod common;

use std::time::Duration;

use common::*;

const PROCESSOR: &str = env!("CARGO_BIN_EXE_processor");

/// `url` with the TLS parameters appended.
fn with_tls(url: &str, parameters: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{parameters}")
}

fn test_ca() -> String {
    workspace_root()
        .join(".services/tls/ca.pem")
        .to_string_lossy()
        .into_owned()
}

/// The processor, started with `postgres_url` for `env`, exits 1 at start
/// with one error line that names the URL setting and says `says`; the
/// password is not printed.
fn assert_refused_at_start(env: &TestEnv, postgres_url: &str, code: i32, says: &str) {
    let mut flags = env.processor_flags();
    let at = flags
        .iter()
        .position(|flag| flag == "--postgres-url")
        .unwrap();
    flags[at + 1] = postgres_url.to_string();
    flags.extend(["--metrics-addr".to_string(), String::new()]);
    let output = run_binary(PROCESSOR, &flags, &[], Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("error"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("--postgres-url") && errors[0].contains(says),
        "names --postgres-url and says {says:?}: {stderr}"
    );
    assert!(!stderr.contains("postgres:postgres@"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_stores_over_verified_tls() {
    let mut env = TestEnv::new("pg_tls", 3).await;
    env.config.postgres_url = with_tls(
        &env.config.postgres_url,
        &format!("sslmode=verify-full&sslrootcert={}", test_ca()),
    );
    let ledger = env.produce(2_000, 0.01, 21).await;
    let mut processor = ProcessorProcess::start(&env, &[]);
    processor.wait_ready(Duration::from_secs(60));
    env.wait_for_catch_up(Duration::from_secs(120)).await;

    // Every connection to the test's database is TLS, the processor's
    // among them (this query's own connection is left out).
    let database = env.config.clickhouse_database.clone();
    let client = stream_actors::storage::connect_postgres(&env.config.postgres_url)
        .await
        .expect("connect over verify-full");
    let rows = client
        .query(
            "SELECT s.ssl, s.version FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid \
             WHERE a.datname = $1 AND a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'",
            &[&database],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty(), "the processor holds connections");
    for row in &rows {
        let ssl: bool = row.get(0);
        let version: Option<String> = row.get(1);
        assert!(ssl, "a connection without TLS");
        println!("processor connection: TLS {version:?}");
    }
    let own: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(own);

    processor.terminate(Duration::from_secs(30));
    assert_clean(&audit(&env).await, &ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_postgres_certificate_or_an_unsupported_setting_fails_at_start() {
    let env = TestEnv::new("pg_tls_refused", 1).await;
    // The system's trust store, not the test CA that signed the server's
    // certificate.
    assert_refused_at_start(
        &env,
        &with_tls(
            &env.config.postgres_url,
            "sslmode=verify-full&sslrootcert=/etc/ssl/certs/ca-certificates.crt",
        ),
        1,
        "does not verify",
    );
    // Settings this build cannot honour: refused at start, exit 2.
    for parameters in [
        "sslmode=allow",
        "sslmode=verify-full&sslcert=/tmp/client.pem",
    ] {
        assert_refused_at_start(
            &env,
            &with_tls(&env.config.postgres_url, parameters),
            2,
            "not supported",
        );
    }
    assert_refused_at_start(
        &env,
        &with_tls(
            &env.config.postgres_url,
            "sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
        ),
        2,
        "sslrootcert",
    );
}
