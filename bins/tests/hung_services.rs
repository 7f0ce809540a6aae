//! A hung store (SIGSTOP: its connections stay open and nothing answers) is
//! a failure the pipeline sees: every call to PostgreSQL and ClickHouse is
//! bounded by `--service-timeout-ms`, so the sink's write fails and the
//! breaker opens, the committer's checkpoint fails and lets go of its lock,
//! and once the server resumes the pipeline catches up with nothing lost or
//! duplicated.

mod common;

use std::time::{Duration, Instant};

use common::{assert_clean, audit, within, Frozen, ProcessorProcess, TestEnv};

/// Waits for loadgen and the catch-up, stops the processor (SIGTERM, exit 0)
/// and audits: nothing lost, nothing duplicated.
async fn finish(
    env: &TestEnv,
    mut processor: ProcessorProcess,
    production: tokio::task::JoinHandle<loadgen::Ledger>,
) {
    let ledger = production.await.expect("loadgen task");
    env.wait_for_catch_up(Duration::from_secs(300)).await;
    assert_eq!(processor.terminate(Duration::from_secs(60)), Some(0));
    assert_clean(&audit(env).await, &ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_store_times_out_opens_the_breaker_and_the_pipeline_resumes_after_it() {
    let env = TestEnv::new("hung", 3).await;
    // Checkpoints every 5 s: at the freeze there is always an acknowledged
    // run not persisted yet, so the committer tries a write while the store
    // hangs (after the freeze nothing more is acknowledged: the sink and the
    // DLQ writer's index both need PostgreSQL).
    let mut processor = ProcessorProcess::start(
        &env,
        &[
            ("SERVICE_TIMEOUT_MS", "1000"),
            ("COMMIT_INTERVAL_MS", "5000"),
        ],
    );
    processor.wait_ready(Duration::from_secs(60));
    let production = env.produce_in_background(90_000, 1_500, 0.01, 31);

    for (service, label) in [
        ("postgres", "store=\"postgres\""),
        ("clickhouse", "store=\"clickhouse\""),
    ] {
        assert!(
            within(Duration::from_secs(60), || processor
                .metric("stream_events_processed_total")
                .is_some_and(|processed| processed > 0.0))
            .await,
            "nothing stored before the freeze:\n{}",
            processor.log_tail()
        );
        let retries_before = processor
            .metric_where("stream_sink_retries_total", label)
            .unwrap_or(0.0);
        let checkpoint_failures_before = processor
            .metric("stream_checkpoint_failures_total")
            .unwrap_or(0.0);
        let mut frozen = Frozen::freeze(service);
        let frozen_at = Instant::now();
        // The write times out like any failure: retries counted, the
        // breaker opens (2), and the process stays up.
        let breaker_opened = within(Duration::from_secs(30), || {
            processor
                .metric_where("stream_circuit_breaker_state", label)
                .is_some_and(|state| state >= 2.0)
        })
        .await;
        eprintln!(
            "{service} frozen: breaker open after {:.1} s",
            frozen_at.elapsed().as_secs_f64()
        );
        assert!(
            processor.child.try_wait().unwrap().is_none(),
            "processor died:\n{}",
            processor.log_tail()
        );
        let retries = processor
            .metric_where("stream_sink_retries_total", label)
            .unwrap_or(0.0);
        assert!(
            breaker_opened && retries > retries_before,
            "{service} hung: breaker open {breaker_opened}, retries {retries_before} -> {retries}:\n{}",
            processor.log_tail()
        );
        if service == "postgres" {
            // The committer's checkpoint write times out too, instead of
            // holding the checkpoint lock forever.
            assert!(
                within(Duration::from_secs(30), || processor
                    .metric("stream_checkpoint_failures_total")
                    .is_some_and(|failures| failures > checkpoint_failures_before))
                .await,
                "the checkpoint never failed while PostgreSQL hung:\n{}",
                processor.log_tail()
            );
        }
        frozen.thaw();
        // Back: the breaker closes again.
        assert!(
            within(Duration::from_secs(90), || processor
                .metric_where("stream_circuit_breaker_state", label)
                == Some(0.0))
            .await,
            "{service}'s breaker did not close:\n{}",
            processor.log_tail()
        );
    }

    finish(&env, processor, production).await;
}

/// An actor that holds a message forever (an injected hang: a future that
/// never completes) fails `/healthz` from half the stall limit on, and the
/// watchdog restarts the pipeline from the checkpoint at the limit, counted
/// against that actor; nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_restarts_a_hung_actor_and_healthz_fails_meanwhile() {
    let env = TestEnv::new("stall", 3).await;
    let mut processor = ProcessorProcess::start(
        &env,
        &[("SERVICE_TIMEOUT_MS", "1000"), ("STALL_TIMEOUT_MS", "3000")],
    );
    processor.wait_ready(Duration::from_secs(60));
    let production = env.produce_in_background(20_000, 2_000, 0.01, 41);
    assert!(
        within(Duration::from_secs(60), || processor
            .metric("stream_events_processed_total")
            .is_some_and(|processed| processed > 0.0))
        .await,
        "nothing stored:\n{}",
        processor.log_tail()
    );
    assert!(matches!(
        common::http_get(&processor.admin, "/healthz"),
        Ok((200, _))
    ));

    // The generation before the hang: with a 1 s service timeout a slow
    // PostgreSQL at start may already have cost a restart.
    let before = common::http_get(&processor.admin, "/status")
        .ok()
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .and_then(|json| json["generation"].as_u64())
        .expect("generation in /status");
    let hang = std::process::Command::new(env!("CARGO_BIN_EXE_streamctl"))
        .args(["kill", "parser", "--hang"])
        .args(processor.admin_args())
        .output()
        .expect("streamctl runs");
    assert!(hang.status.success(), "{hang:?}");
    assert_eq!(
        String::from_utf8_lossy(&hang.stdout).trim(),
        "parser will hang at its next message"
    );
    let hung_at = Instant::now();
    let mut unhealthy = None;
    let restarted = within(Duration::from_secs(30), || {
        if let Ok((503, body)) = common::http_get(&processor.admin, "/healthz") {
            unhealthy.get_or_insert(body);
        }
        common::http_get(&processor.admin, "/status").is_ok_and(|(_, body)| {
            serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|json| {
                json["restarts"]["parser"] == 1
                    && json["generation"] == before + 1
                    && json["ready"] == true
            })
        })
    })
    .await;
    assert!(restarted, "no restart:\n{}", processor.log_tail());
    eprintln!(
        "parser hung: restarted after {:.1} s (stall limit 3 s)",
        hung_at.elapsed().as_secs_f64()
    );
    assert!(
        hung_at.elapsed() >= Duration::from_millis(2_900),
        "restarted before the stall limit: {:?}",
        hung_at.elapsed()
    );
    let unhealthy = unhealthy.expect("/healthz never failed while the parser hung");
    assert!(unhealthy.contains("stalled: parser"), "{unhealthy}");
    assert_eq!(
        processor.metric_where("stream_actor_stalls_total", "actor=\"parser\""),
        Some(1.0)
    );
    assert!(matches!(
        common::http_get(&processor.admin, "/healthz"),
        Ok((200, _))
    ));

    finish(&env, processor, production).await;
}
