//! Broker faults. On the real broker (the local Apache Kafka): SIGKILLed
//! twice mid-run and restarted from its log on disk. In addition, injected
//! with librdkafka's mock cluster: a broker down then up, request errors on
//! OffsetCommit and Produce, added round-trip time. The stores are the real
//! PostgreSQL and ClickHouse; every test ends with the audit: produced =
//! stored + dead-lettered, no duplicates anywhere.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use stream_actors::kafka::Brokers;
use stream_supervisor::{start_pipeline, PipelineExit};

const BROKERS: i32 = 3;

/// A mock cluster with the source topic (3 partitions) and the DLQ topic, and
/// scratch databases for them.
async fn mock_env(prefix: &str) -> (MockCluster<'static, DefaultProducerContext>, TestEnv) {
    let mock = MockCluster::new(BROKERS).expect("mock cluster");
    let name = unique_name(prefix);
    let topic = format!("{name}_events");
    let dlq_topic = format!("{name}_events_dlq");
    mock.create_topic(&topic, 3, 1).expect("source topic");
    mock.create_topic(&dlq_topic, 3, 1).expect("dlq topic");
    let env = TestEnv::with_topics(
        name,
        &Brokers::plaintext(mock.bootstrap_servers()),
        topic,
        dlq_topic,
    )
    .await;
    (mock, env)
}

async fn finish(
    env: &TestEnv,
    pipeline: stream_supervisor::PipelineHandle,
    ledger: &loadgen::Ledger,
) {
    env.wait_for_catch_up(Duration::from_secs(300)).await;
    assert_eq!(pipeline.shutdown().await, PipelineExit::Stopped);
    let audit = audit(env).await;
    eprintln!("{}", audit.render());
    assert!(audit.clean(), "{}", audit.render());
    assert_eq!(audit.total.records, ledger.sent);
    assert_eq!(audit.total.stored, ledger.valid);
    assert_eq!(audit.total.dead_lettered, ledger.poison);
}

/// Rows in the scratch PostgreSQL `events` table (0 before it exists).
async fn stored(env: &TestEnv) -> i64 {
    stream_bins::inspect::postgres_counts(&env.config.postgres_url, &env.config.topic)
        .await
        .map(|counts| counts.rows)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_broker_sigkilled_twice_mid_run_loses_and_duplicates_nothing() {
    const EVENTS: u64 = 80_000;
    let env = TestEnv::new("brokerkill", 6).await;
    let mut processor =
        ProcessorProcess::start(&env, &[("KAFKA_GROUP_INSTANCE_ID", "brokerkill-0")]);
    processor.wait_ready(Duration::from_secs(60));
    let production = env.produce_in_background(EVENTS, 4_000, 0.01, 404);
    for (kill, target) in [15_000, 45_000].into_iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(240);
        while stored(&env).await < target {
            assert!(
                Instant::now() < deadline,
                "kill {kill}: {target} rows never stored:\n{}",
                processor.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let killed_at = Instant::now();
        let mut broker = BrokerCrash::sigkill();
        broker.restart();
        eprintln!(
            "broker kill {}: SIGKILL at {target} rows stored, serving again {:.1} s later",
            kill + 1,
            killed_at.elapsed().as_secs_f64()
        );
        assert!(
            processor.child.try_wait().unwrap().is_none(),
            "the processor died with the broker:\n{}",
            processor.log_tail()
        );
    }
    let ledger = production.await.expect("loadgen task");
    assert_eq!(ledger.sent, EVENTS);
    env.wait_for_catch_up(Duration::from_secs(300)).await;
    assert_eq!(processor.terminate(Duration::from_secs(60)), Some(0));
    let audit = audit(&env).await;
    eprintln!("{}", audit.render());
    assert!(audit.clean(), "{}", audit.render());
    assert_eq!(audit.total.records, ledger.sent);
    assert_eq!(audit.total.stored, ledger.valid);
    assert_eq!(audit.total.dead_lettered, ledger.poison);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_that_timed_out_while_the_broker_hung_are_not_written_twice() {
    // A hung broker (SIGSTOP) answers nothing, but the produce requests sent
    // to it wait in its socket buffer and are appended when it resumes. The
    // DLQ producer gives up on them after message.timeout.ms (30 s): a
    // dead letter reported as failed may be in the topic all the same, and
    // sending it again would write it twice.
    const EVENTS: u64 = 100_000;
    let env = TestEnv::new("brokerhang", 3).await;
    // All of it first: the broker hangs early in the run, with most records
    // still to go (and many in the consumer's buffers), so dead letters are
    // being produced while it hangs.
    let ledger = env.produce(EVENTS, 0.2, 606).await;
    let mut processor =
        ProcessorProcess::start(&env, &[("KAFKA_GROUP_INSTANCE_ID", "brokerhang-0")]);
    wait_until(
        "dead letters being written",
        Duration::from_secs(120),
        || {
            let written = processor.metric("stream_dlq_messages_total").unwrap_or(0.0);
            async move { written > 500.0 }
        },
    )
    .await;
    let mut broker = Frozen::freeze("kafka");
    let frozen_at = Instant::now();
    let timed_out = within(Duration::from_secs(90), || {
        std::fs::read_to_string(&processor.log)
            .is_ok_and(|log| log.contains("dead letter not delivered"))
    })
    .await;
    broker.thaw();
    eprintln!(
        "broker frozen {:.1} s; dead letters timed out: {timed_out}",
        frozen_at.elapsed().as_secs_f64()
    );
    assert!(
        timed_out,
        "no dead letter timed out while the broker hung:\n{}",
        processor.log_tail()
    );
    env.wait_for_catch_up(Duration::from_secs(300)).await;
    assert_eq!(processor.terminate(Duration::from_secs(60)), Some(0));
    let audit = audit(&env).await;
    eprintln!("{}", audit.render());
    assert_clean(&audit, &ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_then_up_mid_run_loses_and_duplicates_nothing() {
    let (mock, env) = mock_env("mockdown").await;
    let ledger = env.produce(20_000, 0.02, 41).await;
    let pipeline = start_pipeline(env.config.clone()).await.expect("pipeline");
    wait_until("some rows stored", Duration::from_secs(120), || async {
        stream_bins::inspect::postgres_counts(&env.config.postgres_url, &env.config.topic)
            .await
            .is_ok_and(|counts| counts.rows > 1_000)
    })
    .await;
    // Every broker leads some partition; take one down for a while.
    mock.broker_down(2).expect("broker down");
    let down_for = tokio::time::Instant::now() + Duration::from_secs(3);
    tokio::time::sleep_until(down_for).await;
    mock.broker_up(2).expect("broker up");
    finish(&env, pipeline, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_commit_and_produce_errors_keep_the_invariants() {
    let (mock, env) = mock_env("mockerrors").await;
    // Poison-heavy, so the DLQ writer produces a lot.
    let ledger = env.produce(10_000, 0.1, 42).await;
    // From now on: Kafka commits fail, and so do the DLQ writer's produces.
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 20],
    );
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 20],
    );
    let pipeline = start_pipeline(env.config.clone()).await.expect("pipeline");
    finish(&env, pipeline, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_round_trip_time_slows_but_does_not_break_anything() {
    let (mock, env) = mock_env("mockrtt").await;
    let ledger = env.produce(10_000, 0.02, 43).await;
    for broker in 1..=BROKERS {
        mock.broker_round_trip_time(broker, Duration::from_millis(150))
            .expect("rtt");
    }
    let pipeline = start_pipeline(env.config.clone()).await.expect("pipeline");
    finish(&env, pipeline, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_static_member_joins_again_with_a_fresh_client_and_loses_nothing() {
    // Kafka fences a static member when another incarnation with its
    // group.instance.id took its place (seen on the real broker after a
    // restart: the session expired, the member rejoined, and the old
    // generation's commit was refused). librdkafka makes that a fatal error:
    // the client is unusable, and only a fresh one gets back in.
    let (mock, env) = mock_env("mockfenced").await;
    let mut ledger = env.produce(10_000, 0.02, 44).await;
    let mut config = env.config.clone();
    config.group_instance_id = Some("fenced-0".to_string());
    let pipeline = start_pipeline(config).await.expect("pipeline");
    wait_until("some rows stored", Duration::from_secs(120), || async {
        stored(&env).await > 1_000
    })
    .await;
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID],
    );
    // Records produced after the fault is armed: the pipeline may already
    // have committed all of the first batch, and with nothing new to commit
    // the fenced response would never come.
    let more = env.produce(2_000, 0.02, 45).await;
    ledger.sent += more.sent;
    ledger.valid += more.valid;
    ledger.poison += more.poison;
    wait_until(
        "the consumer restarted with a fresh client",
        Duration::from_secs(60),
        || async {
            pipeline
                .status()
                .await
                .is_ok_and(|status| status.restarts["consumer"] >= 1 && status.ready)
        },
    )
    .await;
    finish(&env, pipeline, &ledger).await;
}
