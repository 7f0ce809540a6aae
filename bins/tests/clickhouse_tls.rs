//! ClickHouse over HTTPS on the real server: the local ClickHouse serves
//! HTTPS on 127.0.0.1:8443 with the test CA's certificate
//! (`scripts/services.sh`). With `--clickhouse-url https://...` and
//! `--clickhouse-ca-file <the CA>` the processor stores every event over
//! verified TLS; without the CA the certificate does not verify, and the
//! processor fails at start naming the setting.

mod common;

use std::time::Duration;

use common::*;

const PROCESSOR: &str = env!("CARGO_BIN_EXE_processor");

fn https_url() -> String {
    std::env::var("CLICKHOUSE_HTTPS_URL").unwrap_or_else(|_| "https://localhost:8443".to_string())
}

fn test_ca() -> std::path::PathBuf {
    workspace_root().join(".services/tls/ca.pem")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_stores_into_clickhouse_over_verified_https() {
    let mut env = TestEnv::new("ch_tls", 3).await;
    env.config.clickhouse_url = https_url();
    env.config.clickhouse_ca_file = Some(test_ca());
    let ledger = env.produce(2_000, 0.01, 31).await;
    let mut processor = ProcessorProcess::start(&env, &[]);
    processor.wait_ready(Duration::from_secs(60));
    env.wait_for_catch_up(Duration::from_secs(120)).await;
    processor.terminate(Duration::from_secs(30));
    // The audit reads ClickHouse over the same HTTPS connection settings.
    assert_clean(&audit(&env).await, &ledger);
    // And the rows are there for a plain-HTTP reader too: one server.
    let mut plain = TestEnv {
        config: env.config.clone(),
    };
    plain.config.clickhouse_url = clickhouse_url();
    plain.config.clickhouse_ca_file = None;
    let counts = stream_bins::inspect::clickhouse_counts(&plain.config)
        .await
        .expect("clickhouse counts");
    assert_eq!(counts.distinct_event_ids, ledger.valid, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_clickhouse_certificate_or_a_ca_for_plain_http_fails_at_start() {
    let env = TestEnv::new("ch_tls_refused", 1).await;
    // No CA file: the public web PKI, which did not sign the test certificate.
    let mut flags = env.processor_flags();
    let at = flags
        .iter()
        .position(|flag| flag == "--clickhouse-url")
        .unwrap();
    flags[at + 1] = https_url();
    flags.extend(["--metrics-addr".to_string(), String::new()]);
    let output = run_binary(PROCESSOR, &flags, &[], Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("error"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("--clickhouse-ca-file") && errors[0].contains("does not verify"),
        "{stderr}"
    );

    // A CA file with a plain-HTTP URL cannot be honoured: refused, exit 2.
    let mut flags = env.processor_flags();
    flags.extend([
        "--clickhouse-ca-file".to_string(),
        test_ca().to_string_lossy().into_owned(),
        "--metrics-addr".to_string(),
        String::new(),
    ]);
    let output = run_binary(PROCESSOR, &flags, &[], Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--clickhouse-ca-file") && stderr.contains("https://"),
        "{stderr}"
    );
}
