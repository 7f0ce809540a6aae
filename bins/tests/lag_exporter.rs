//! `streamctl lag`, the lag read from the broker's side: it counts what a
//! group has not committed on the real broker, keeps serving it while the
//! processor is SIGKILLed (the lag climbs as records arrive), sees it drain
//! when the processor is back, and reports an unreadable checkpoint as
//! `stream_lag_exporter_up{source="checkpoint"} 0` without stale numbers.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, run_binary, scrape, wait_until, KillOnDrop, ProcessorProcess, TestEnv};

const STREAMCTL: &str = env!("CARGO_BIN_EXE_streamctl");

/// `streamctl lag` for the env's group and topic, with the checkpoint at `postgres_url`.
fn lag_args(env: &TestEnv, postgres_url: &str) -> Vec<String> {
    [
        "lag",
        "--brokers",
        &env.config.brokers.servers,
        "--group",
        &env.config.group_id,
        "--topic",
        &env.config.topic,
        "--postgres-url",
        postgres_url,
    ]
    .map(str::to_string)
    .to_vec()
}

/// `streamctl lag --serve` on a free port for the env's group and topic.
fn start_exporter(env: &TestEnv, postgres_url: &str) -> (KillOnDrop, String) {
    let address = format!("127.0.0.1:{}", free_port());
    let child = Command::new(STREAMCTL)
        .args(lag_args(env, postgres_url))
        .args(["--serve", &address, "--interval-secs", "0.2"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("streamctl lag starts");
    (KillOnDrop(child), address)
}

/// Waits until the exporter serves `metric` (summed over partitions) equal to `wanted`.
async fn wait_for_metric(address: &str, metric: &str, label: &str, wanted: f64) {
    wait_until(
        &format!("{metric}{{{label}}} = {wanted} at {address}"),
        Duration::from_secs(60),
        || async move { scrape(address, metric, label) == Some(wanted) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_climbs_while_the_processor_is_down_and_drains_after() {
    let env = TestEnv::new("lagexp", 3).await;
    let (_exporter, address) = start_exporter(&env, &env.config.postgres_url);

    // Nothing consumed yet: the group lags by everything on the topic.
    env.produce(3_000, 0.0, 1).await;
    wait_for_metric(&address, "stream_group_lag", "", 3_000.0).await;
    wait_for_metric(&address, "stream_checkpoint_lag", "", 3_000.0).await;
    wait_for_metric(&address, "stream_partition_end_offset", "", 3_000.0).await;
    assert_eq!(
        scrape(&address, "stream_lag_exporter_up", "source=\"kafka\""),
        Some(1.0)
    );

    // The processor catches up: both lags drain to 0.
    let mut processor = ProcessorProcess::start(&env, &[]);
    processor.wait_ready(Duration::from_secs(30));
    wait_for_metric(&address, "stream_group_lag", "", 0.0).await;
    wait_for_metric(&address, "stream_checkpoint_lag", "", 0.0).await;
    wait_for_metric(&address, "stream_group_committed_offset", "", 3_000.0).await;
    wait_for_metric(&address, "stream_group_checkpoint_offset", "", 3_000.0).await;

    // SIGKILLed: the processor's own lag gauge is gone with it, the
    // exporter still answers, and the lag climbs by what arrives.
    processor.kill9();
    env.produce(2_000, 0.0, 2).await;
    wait_for_metric(&address, "stream_group_lag", "", 2_000.0).await;
    wait_for_metric(&address, "stream_checkpoint_lag", "", 2_000.0).await;

    // Back: it drains again.
    let mut processor = ProcessorProcess::start(&env, &[]);
    processor.wait_ready(Duration::from_secs(30));
    wait_for_metric(&address, "stream_group_lag", "", 0.0).await;
    wait_for_metric(&address, "stream_checkpoint_lag", "", 0.0).await;
    assert_eq!(
        scrape(&address, "stream_lag_exporter_read_failures_total", ""),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_checkpoint_is_reported_not_guessed() {
    let env = TestEnv::new("lagexp_nopg", 2).await;
    env.produce(500, 0.0, 3).await;
    // Nothing listens on this port.
    let closed = format!(
        "postgres://postgres:postgres@127.0.0.1:{}/pipeline?sslmode=disable",
        free_port()
    );
    let (_exporter, address) = start_exporter(&env, &closed);
    wait_for_metric(
        &address,
        "stream_lag_exporter_up",
        "source=\"checkpoint\"",
        0.0,
    )
    .await;
    wait_for_metric(&address, "stream_group_lag", "", 500.0).await;
    assert_eq!(
        scrape(&address, "stream_lag_exporter_up", "source=\"kafka\""),
        Some(1.0)
    );
    assert_eq!(scrape(&address, "stream_checkpoint_lag", ""), None);
    assert!(
        scrape(
            &address,
            "stream_lag_exporter_read_failures_total",
            "source=\"checkpoint\""
        )
        .unwrap_or(0.0)
            >= 1.0
    );

    // Printed once, it says which source failed and exits 1.
    let output = run_binary(
        STREAMCTL,
        &lag_args(&env, &closed),
        &[],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("lag: 500 behind the committed offsets"),
        "{stdout}"
    );
    assert!(stdout.contains("checkpoint: cannot read"), "{stdout}");

    // A port that is taken: exit 2, naming --serve.
    let output = run_binary(
        STREAMCTL,
        &[
            "lag",
            "--brokers",
            &env.config.brokers.servers,
            "--serve",
            &address,
        ],
        &[],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--serve"), "{stderr}");
}
