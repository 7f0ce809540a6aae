//! Every metric the rules and dashboards may use (observability/exported-metrics.txt,
//! which scripts/check-observability.sh holds them to) is really exported: a
//! pipeline, an SQS consumer and loadgen run in this process against a
//! Prometheus recorder, the lag exporter reads the same group, and the names
//! in their expositions are compared with the list. A renamed metric breaks this test, not a dashboard.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::TestEnv;
use stream_actors::sqs::{self, SqsSettings};
use stream_actors::sqs_consumer::{SqsConsumerActor, SqsConsumerArgs, SqsConsumerMsg};
use stream_supervisor::solo::start_solo;
use stream_supervisor::start_pipeline;

fn listed_names() -> BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../observability/exported-metrics.txt"
    );
    std::fs::read_to_string(path)
        .expect("exported-metrics.txt")
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim().to_string())
        .filter(|name| !name.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_metric_is_exported() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("recorder");
    let env = TestEnv::new("metrics", 3).await;
    env.produce(2_000, 0.05, 5).await;
    let pipeline = start_pipeline(env.config.clone()).await.expect("pipeline");
    env.wait_for_catch_up(Duration::from_secs(60)).await;

    let settings = SqsSettings {
        endpoint: std::env::var("SQS_ENDPOINT")
            .unwrap_or_else(|_| "http://127.0.0.1:4566".to_string()),
        ..SqsSettings::local()
    };
    let queue = common::unique_name("metrics-orders");
    let dlq = format!("{queue}-dlq");
    let client = sqs::client(&settings);
    sqs::setup_queues(&client, &settings, &queue, &dlq, 3)
        .await
        .expect("queues");
    loadgen::sqs::run(&settings, &queue, 10, 0.0, 1)
        .await
        .expect("orders");
    let consumer = start_solo(
        "sqs_consumer",
        SqsConsumerActor,
        SqsConsumerArgs {
            settings,
            queue,
            dlq,
            postgres_url: env.config.postgres_url.clone(),
            concurrency: 2,
            wait_time_seconds: 1,
            visibility_timeout_seconds: 5,
            retry_delay_seconds: 0,
            delete_gate: None,
        },
    )
    .await
    .expect("sqs consumer");
    common::wait_until(
        "orders to be processed",
        Duration::from_secs(30),
        || async {
            let child = consumer.child().expect("child");
            ractor::call!(child, SqsConsumerMsg::Status)
                .map(|status| status.deleted == 10)
                .unwrap_or(false)
        },
    )
    .await;
    // The lag gauge comes with librdkafka's statistics, once a second.
    common::wait_until("the consumer lag gauge", Duration::from_secs(10), || {
        let exposition = recorder.render();
        async move { exposition.contains("# TYPE stream_consumer_lag ") }
    })
    .await;
    consumer.shutdown().await;
    pipeline.shutdown().await;
    // The lag exporter's (job lag-exporter) series, read after the
    // pipeline committed and checkpointed.
    let mut reader = stream_bins::lag::LagReader::new(
        &env.config.brokers,
        &env.config.group_id,
        &env.config.topic,
        Some(env.config.postgres_url.clone()),
    )
    .expect("lag reader");
    let reading = reader.read().await;
    assert_eq!(reading.group_lag(), Some(0), "{reading:?}");

    let exposition = recorder.render()
        + &stream_bins::lag::exposition(&reading, &stream_bins::lag::Failures::default());
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let missing: Vec<String> = listed_names()
        .into_iter()
        .filter(|name| !exported.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "listed but not exported: {missing:?}\nexported: {exported:?}"
    );
}
