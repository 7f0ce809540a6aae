//! The SQS consumer on a real SQS API server (moto): the broker redrives
//! poison after `maxReceiveCount` receives; valid orders are stored once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{create_postgres_database, unique_name, wait_until};
use stream_actors::sqs::{self, SqsError, SqsSettings};
use stream_actors::sqs_consumer::{
    SqsConsumerActor, SqsConsumerArgs, SqsConsumerMsg, SqsConsumerStatus,
};
use stream_supervisor::solo::{start_solo, SoloHandle};
use stream_supervisor::PipelineExit;

fn settings() -> SqsSettings {
    SqsSettings {
        endpoint: std::env::var("SQS_ENDPOINT")
            .unwrap_or_else(|_| "http://127.0.0.1:4566".to_string()),
        ..SqsSettings::local()
    }
}

struct QueueEnv {
    queue: String,
    dlq: String,
    postgres_url: String,
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

async fn queue_env(prefix: &str, max_receive_count: u32) -> QueueEnv {
    let name = unique_name(prefix);
    let queue = format!("{name}-orders");
    let dlq = format!("{name}-orders-dlq");
    let client = sqs::client(&settings());
    let setup = sqs::setup_queues(&client, &settings(), &queue, &dlq, max_receive_count)
        .await
        .expect("queue setup");
    assert!(setup.created);
    QueueEnv {
        postgres_url: create_postgres_database(&name).await,
        queue,
        dlq,
        client,
        queue_url: setup.queue_url,
    }
}

impl QueueEnv {
    fn arguments(&self) -> SqsConsumerArgs {
        SqsConsumerArgs {
            settings: settings(),
            queue: self.queue.clone(),
            dlq: self.dlq.clone(),
            postgres_url: self.postgres_url.clone(),
            concurrency: 4,
            wait_time_seconds: 1,
            visibility_timeout_seconds: 2,
            retry_delay_seconds: 0,
            delete_gate: None,
        }
    }

    async fn send(&self, body: &str) -> String {
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .expect("send")
            .message_id()
            .unwrap()
            .to_string()
    }

    async fn order_rows(&self) -> i64 {
        let client = stream_actors::storage::connect_postgres(&self.postgres_url)
            .await
            .unwrap();
        let exists: bool = client
            .query_one("SELECT to_regclass('orders') IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        if !exists {
            return 0;
        }
        client
            .query_one("SELECT count(*) FROM orders", &[])
            .await
            .unwrap()
            .get(0)
    }
}

fn order(index: u32) -> String {
    format!(
        r#"{{"order_id":"{}","customer_id":"c-{index}","amount":{}.5,"currency":"EUR"}}"#,
        uuid::Uuid::new_v4(),
        index + 1
    )
}

async fn status(handle: &SoloHandle<SqsConsumerMsg>) -> SqsConsumerStatus {
    let child = handle.child().expect("child running");
    ractor::call!(child, SqsConsumerMsg::Status).expect("status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_received_max_receive_count_times_then_redriven_and_valid_orders_are_stored_once()
{
    let env = queue_env("redrive", 3).await;
    for index in 0..5 {
        env.send(&order(index)).await;
    }
    let poison_id = env.send(r#"{"order_id":"not-a-uuid","amount":-1}"#).await;

    let handle = start_solo("sqs_consumer", SqsConsumerActor, env.arguments())
        .await
        .expect("consumer starts");
    wait_until(
        "the poison order to be redriven",
        Duration::from_secs(60),
        || async {
            let current = status(&handle).await;
            current.redriven == 1 && current.deleted == 5
        },
    )
    .await;
    let final_status = status(&handle).await;
    assert_eq!(
        final_status.failures_by_message.get(&poison_id),
        Some(&3),
        "{final_status:?}"
    );
    assert_eq!(final_status.failures_by_message.len(), 1);
    assert_eq!(final_status.processed, 5);
    assert_eq!(final_status.received, 5 + 3);
    assert_eq!(handle.shutdown().await, PipelineExit::Stopped);

    assert_eq!(env.order_rows().await, 5);
    assert_eq!(
        sqs::approximate_messages(&env.client, &settings(), &env.queue_url)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        sqs::approximate_in_flight(&env.client, &settings(), &env.queue_url)
            .await
            .unwrap(),
        0
    );
    // The poison sits in the dead-letter queue, bytes unchanged.
    let dlq_url = sqs::queue_url(&env.client, &settings(), &env.dlq)
        .await
        .unwrap();
    let redriven = env
        .client
        .receive_message()
        .queue_url(&dlq_url)
        .max_number_of_messages(10)
        .send()
        .await
        .unwrap();
    assert_eq!(redriven.messages().len(), 1);
    assert_eq!(
        redriven.messages()[0].body(),
        Some(r#"{"order_id":"not-a-uuid","amount":-1}"#)
    );
}

/// An order the parser accepts and PostgreSQL refuses (a NUL in a text
/// field, SQLSTATE 22021) is a failed message like any poison: left for
/// redelivery, redriven by the broker, and the consumer keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_the_store_refuses_is_redriven_and_the_consumer_keeps_running() {
    let env = queue_env("refused", 2).await;
    for index in 0..5 {
        env.send(&order(index)).await;
    }
    let refused_body = order(99).replace("c-99", "c-\\u0000-99");
    assert!(
        stream_actors::order::parse_order(&refused_body).is_ok(),
        "the parser accepts it; only the store refuses it"
    );
    let refused_id = env.send(&refused_body).await;

    let handle = start_solo("sqs_consumer", SqsConsumerActor, env.arguments())
        .await
        .expect("consumer starts");
    let first_child = handle.child().expect("child running").get_id();
    wait_until(
        "the refused order to be redriven",
        Duration::from_secs(60),
        || async {
            assert_eq!(
                *handle.exit.borrow(),
                PipelineExit::Running,
                "the consumer must not exit over one order"
            );
            let current = status(&handle).await;
            current.redriven == 1 && current.deleted == 5
        },
    )
    .await;
    let final_status = status(&handle).await;
    assert_eq!(
        final_status.failures_by_message.get(&refused_id),
        Some(&2),
        "{final_status:?}"
    );
    assert_eq!(final_status.failures_by_message.len(), 1);
    assert_eq!(
        handle.child().expect("child running").get_id(),
        first_child,
        "never restarted"
    );
    assert_eq!(handle.shutdown().await, PipelineExit::Stopped);
    assert_eq!(env.order_rows().await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_between_store_and_delete_stores_no_duplicate() {
    let env = queue_env("crash", 3).await;
    env.send(&order(7)).await;

    // First consumer: stores, then waits at the gate before deleting; killed there.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut arguments = env.arguments();
    arguments.delete_gate = Some(gate.clone());
    let first = start_solo("sqs_consumer", SqsConsumerActor, arguments)
        .await
        .expect("starts");
    wait_until("the order to be stored", Duration::from_secs(30), || {
        env.order_rows_is(1)
    })
    .await;
    first.child().expect("child").kill();
    let mut exit = first.exit.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        exit.wait_for(|state| matches!(state, PipelineExit::Failed(_))),
    )
    .await
    .expect("supervisor saw the kill")
    .expect("exit channel");
    let _ = first.join.await;
    assert_eq!(
        sqs::approximate_messages(&env.client, &settings(), &env.queue_url)
            .await
            .unwrap()
            + sqs::approximate_in_flight(&env.client, &settings(), &env.queue_url)
                .await
                .unwrap(),
        1,
        "the message was not deleted"
    );

    // Second consumer: the message comes back after its visibility timeout.
    let second = start_solo("sqs_consumer", SqsConsumerActor, env.arguments())
        .await
        .expect("restarts");
    wait_until(
        "the redelivered message to be deleted",
        Duration::from_secs(60),
        || async { status(&second).await.deleted == 1 },
    )
    .await;
    assert_eq!(second.shutdown().await, PipelineExit::Stopped);
    assert_eq!(
        env.order_rows().await,
        1,
        "the redelivery stored a duplicate"
    );
    assert_eq!(
        sqs::approximate_messages(&env.client, &settings(), &env.queue_url)
            .await
            .unwrap(),
        0
    );
}

impl QueueEnv {
    async fn order_rows_is(&self, expected: i64) -> bool {
        self.order_rows().await == expected
    }
}

#[tokio::test]
async fn an_unreachable_endpoint_and_a_missing_queue_are_clear_errors() {
    let unreachable = SqsSettings {
        endpoint: "http://127.0.0.1:1".to_string(),
        ..SqsSettings::local()
    };
    let error = sqs::queue_url(&sqs::client(&unreachable), &unreachable, "orders")
        .await
        .expect_err("unreachable");
    assert!(matches!(error, SqsError::Unreachable { .. }), "{error:?}");
    assert!(error.to_string().contains("127.0.0.1:1"), "{error}");

    let missing = unique_name("missing");
    let error = sqs::queue_url(&sqs::client(&settings()), &settings(), &missing)
        .await
        .expect_err("missing");
    assert!(matches!(error, SqsError::QueueMissing { .. }), "{error:?}");
    assert!(error.to_string().contains(&missing), "{error}");
}

#[tokio::test]
async fn an_existing_queue_with_another_policy_is_reported() {
    let env = queue_env("policy", 3).await;
    let error = sqs::setup_queues(&env.client, &settings(), &env.queue, &env.dlq, 5)
        .await
        .expect_err("policy differs");
    assert!(
        matches!(error, SqsError::PolicyMismatch { .. }),
        "{error:?}"
    );
    let checked = sqs::setup_queues(&env.client, &settings(), &env.queue, &env.dlq, 3)
        .await
        .expect("same policy");
    assert!(!checked.created);
}

#[test]
fn the_binary_names_a_missing_queue() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sqs-consumer"))
        .args(["--queue", "no-such-queue-for-tests", "--metrics-addr", ""])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no-such-queue-for-tests") && stderr.contains("does not exist"),
        "{stderr}"
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sqs-consumer"))
        .args(["--concurrency", "0"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--concurrency"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_work_extends_visibility_so_the_message_is_not_redelivered() {
    let env = queue_env("slow", 3).await;
    env.send(&order(3)).await;
    // Visibility 4 s (renewed every 2 s); the work is held for 9 s: without
    // renewal the message would come back (and be received again) meanwhile.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut arguments = env.arguments();
    arguments.visibility_timeout_seconds = 4;
    arguments.delete_gate = Some(gate.clone());
    let handle = start_solo("sqs_consumer", SqsConsumerActor, arguments)
        .await
        .expect("starts");
    wait_until("the order to be stored", Duration::from_secs(30), || {
        env.order_rows_is(1)
    })
    .await;
    let held_since = std::time::Instant::now();
    while held_since.elapsed() < Duration::from_secs(9) {
        assert_eq!(
            status(&handle).await.received,
            1,
            "redelivered while still being worked on"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gate.add_permits(1);
    wait_until(
        "the message to be deleted",
        Duration::from_secs(30),
        || async { status(&handle).await.deleted == 1 },
    )
    .await;
    assert_eq!(status(&handle).await.received, 1);
    assert_eq!(handle.shutdown().await, PipelineExit::Stopped);
    assert_eq!(env.order_rows().await, 1);
}

#[tokio::test]
async fn loadgen_sqs_ledger_matches_the_queue() {
    let env = queue_env("loadgen", 3).await;
    let ledger = loadgen::sqs::run(&settings(), &env.queue, 45, 0.2, 9)
        .await
        .expect("loadgen sqs");
    assert_eq!(ledger.sent, 45);
    assert_eq!(ledger.valid + ledger.poison, 45);
    assert!(ledger.poison > 0);
    assert_eq!(
        sqs::approximate_messages(&env.client, &settings(), &env.queue_url)
            .await
            .unwrap(),
        45
    );
    let error = loadgen::sqs::run(&settings(), "no-such-queue-for-tests", 1, 0.0, 1)
        .await
        .expect_err("missing queue");
    assert!(error.to_string().contains("no-such-queue-for-tests"));
}
