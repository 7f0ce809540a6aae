//! Kafka over SASL_SSL on the real broker: the local Apache Kafka's
//! SASL_SSL listener (TLS with the test CA of `scripts/services.sh`,
//! SCRAM-SHA-512 users, the StandardAuthorizer with ACLs per user). The
//! pipeline runs end to end through it; a wrong password or an untrusted
//! certificate fails at start with one line that names the setting.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use stream_actors::kafka::{Brokers, KafkaSecurityArgs};

const PROCESSOR: &str = env!("CARGO_BIN_EXE_processor");
const STREAMCTL: &str = env!("CARGO_BIN_EXE_streamctl");

/// Topics and group the `processor` user's ACLs allow (scripts/services.sh):
/// it reads `secured-src-*` and the group `secured-*`, writes `secured-dlq-*`.
async fn secured_env(prefix: &str) -> TestEnv {
    let name = unique_name(prefix);
    let topic = format!("secured-src-{name}");
    let dlq_topic = format!("secured-dlq-{name}");
    // Created over the loopback plaintext listener (the broker's super user).
    create_topics(&[(&topic, 3), (&dlq_topic, 2)]).await;
    let mut env = TestEnv::with_topics(
        name.clone(),
        &secured_brokers("processor"),
        topic,
        dlq_topic,
    )
    .await;
    env.config.group_id = format!("secured-{name}");
    env
}

/// Runs a binary with a deadline; kills it if it runs too long.
fn run_with_deadline(binary: &str, arguments: &[String], deadline: Duration) -> Output {
    run_binary(binary, arguments, &[("RUST_LOG", "warn")], deadline)
}

/// The processor's flags for `env` with `brokers` instead of its own.
fn processor_flags_with(env: &TestEnv, brokers: &Brokers) -> Vec<String> {
    let mut other = TestEnv {
        config: env.config.clone(),
    };
    other.config.brokers = brokers.clone();
    let mut flags = other.processor_flags();
    flags.extend(["--metrics-addr".to_string(), String::new()]);
    flags
}

/// The processor fails at start, within the probe's time, with exit code 1
/// and one error line that names `setting`; no other line is an error, and
/// no secret is printed.
fn assert_refused_at_start(env: &TestEnv, brokers: &Brokers, setting: &str, says: &str) {
    let started = Instant::now();
    let output = run_with_deadline(
        PROCESSOR,
        &processor_flags_with(env, brokers),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("error") || line.contains("ERROR"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    assert!(
        errors[0].contains(setting) && errors[0].contains(says),
        "the error names {setting} and says {says:?}: {stderr}"
    );
    let password =
        std::fs::read_to_string(workspace_root().join(".services/kafka/users/processor.password"))
            .unwrap();
    assert!(!stderr.contains(password.trim()), "{stderr}");
    // Refused at the first handshake, not after the probe's deadline.
    assert!(
        started.elapsed() < stream_actors::kafka::PROBE_TIMEOUT,
        "took {:?}: {stderr}",
        started.elapsed()
    );
    println!("refused in {:?}: {}", started.elapsed(), errors[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_end_to_end_over_sasl_ssl() {
    let env = secured_env("sasl_e2e").await;
    // loadgen as its own user, which may only write the source topics.
    let ledger = loadgen::run(&loadgen::LoadgenConfig {
        brokers: secured_brokers("loadgen"),
        topic: env.config.topic.clone(),
        count: 3_000,
        rate: 0,
        poison_rate: 0.01,
        seed: 12,
        producers: 2,
        progress: false,
        format: loadgen::ValueFormat::Json,
    })
    .await
    .expect("loadgen over SASL_SSL");
    assert_eq!(ledger.sent, 3_000);
    assert!(ledger.poison > 0, "{ledger:?}");

    let mut processor = ProcessorProcess::start(&env, &[]);
    processor.wait_ready(Duration::from_secs(60));
    env.wait_for_catch_up(Duration::from_secs(120)).await;
    // The group's offsets are committed in Kafka, through the same listener.
    let committed = stream_bins::inspect::kafka_committed_offsets(
        &env.config.brokers,
        &env.config.group_id,
        &env.config.topic,
    )
    .expect("committed offsets over SASL_SSL");
    let ends = stream_bins::inspect::end_offsets(&env.config.brokers, &env.config.topic).unwrap();
    assert_eq!(committed, ends);
    processor.terminate(Duration::from_secs(30));
    // Nothing was refused on the way: the processor's ACLs (read the source
    // topic and its group, write and read back the DLQ) are all it needed.
    let log = std::fs::read_to_string(&processor.log).unwrap();
    let errors: Vec<&str> = log.lines().filter(|line| line.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert_clean(&audit(&env).await, &ledger);

    // streamctl takes the same settings: its audit, as the processor's user.
    let mut arguments: Vec<String> = vec!["audit".to_string()];
    arguments.extend(
        env.processor_flags()
            .into_iter()
            .filter(|flag| !flag.is_empty()),
    );
    let output = run_with_deadline(STREAMCTL, &arguments, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let total = stdout
        .lines()
        .find(|line| line.trim_start().starts_with("total"))
        .unwrap_or_else(|| panic!("no total line: {stdout}"));
    assert_eq!(
        total.split_whitespace().nth(1),
        Some(ledger.sent.to_string().as_str()),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_at_start_naming_the_setting() {
    let env = secured_env("sasl_wrong_password").await;
    let wrong = std::env::temp_dir().join(format!("{}.password", unique_name("wrong")));
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let brokers = secured_brokers_with(
        "processor",
        wrong.clone(),
        Some(workspace_root().join(".services/tls/ca.pem")),
    );
    assert_refused_at_start(&env, &brokers, "--kafka-sasl-password-file", "refused");
    std::fs::remove_file(wrong).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_fails_at_start_naming_the_setting() {
    let env = secured_env("sasl_untrusted").await;
    // The system's trust store: public CAs, not the test CA that signed the
    // broker's certificate.
    let brokers = secured_brokers_with(
        "processor",
        workspace_root().join(".services/kafka/users/processor.password"),
        None,
    );
    assert_refused_at_start(&env, &brokers, "--kafka-ssl-ca-location", "not signed by");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_and_streamctl_refuse_a_wrong_password_naming_the_setting() {
    let wrong = std::env::temp_dir().join(format!("{}.password", unique_name("wrong")));
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let brokers = secured_brokers_with(
        "admin",
        wrong.clone(),
        Some(workspace_root().join(".services/tls/ca.pem")),
    );
    let (security, _) = KafkaSecurityArgs::of(&brokers.security);
    let mut arguments = vec![
        "topics".to_string(),
        "ensure".to_string(),
        "--brokers".to_string(),
        brokers.servers.clone(),
        "--topic".to_string(),
        "secured-src-never-created".to_string(),
        "--dlq-topic".to_string(),
        "secured-dlq-never-created".to_string(),
    ];
    arguments.extend(security);
    let output = run_with_deadline(STREAMCTL, &arguments, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--kafka-sasl-password-file") && stderr.contains("refused"),
        "{stderr}"
    );

    let error = loadgen::run(&loadgen::LoadgenConfig {
        brokers,
        topic: "secured-src-never-created".to_string(),
        count: 10,
        rate: 0,
        poison_rate: 0.0,
        seed: 1,
        producers: 1,
        progress: false,
        format: loadgen::ValueFormat::Json,
    })
    .await
    .expect_err("a wrong password is refused");
    let message = error.to_string();
    assert!(
        message.contains("--kafka-sasl-password-file") && message.contains("refused"),
        "{message}"
    );
    std::fs::remove_file(wrong).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_or_group_the_processor_may_not_use_is_refused_at_start_and_nothing_is_lost() {
    let env = secured_env("acl_forbidden").await;
    // A topic no ACL of the processor's user covers, with records in it
    // (written over the loopback listener).
    let forbidden = format!("forbidden-{}", unique_name("acl"));
    create_topics(&[(&forbidden, 3)]).await;
    let ledger = loadgen::run(&loadgen::LoadgenConfig {
        brokers: brokers(),
        topic: forbidden.clone(),
        count: 600,
        rate: 0,
        poison_rate: 0.02,
        seed: 41,
        producers: 1,
        progress: false,
        format: loadgen::ValueFormat::Json,
    })
    .await
    .expect("loadgen");

    let mut on_forbidden = TestEnv {
        config: env.config.clone(),
    };
    on_forbidden.config.topic = forbidden.clone();
    assert_refused_at_start(
        &on_forbidden,
        &env.config.brokers,
        "--topic",
        &format!("User:processor may not use topic {forbidden}"),
    );
    // A group outside its ACLs, on a topic it may read.
    let mut other_group = TestEnv {
        config: env.config.clone(),
    };
    other_group.config.group_id = format!("other-{}", unique_name("group"));
    assert_refused_at_start(
        &other_group,
        &env.config.brokers,
        "--group",
        &format!(
            "User:processor may not use consumer group {}",
            other_group.config.group_id
        ),
    );

    // Nothing is lost: the refused start read, stored and committed nothing,
    // and a processor that may read the topic (here the loopback listener's
    // super user) then takes every record exactly once.
    let ends = stream_bins::inspect::end_offsets(&brokers(), &forbidden).unwrap();
    assert_eq!(ends.values().sum::<i64>(), 600);
    let checkpoint = stream_bins::inspect::checkpoint_offsets(
        &env.config.postgres_url,
        &env.config.group_id,
        &forbidden,
    )
    .await
    .unwrap();
    assert!(checkpoint.is_empty(), "{checkpoint:?}");
    let mut permitted = on_forbidden;
    permitted.config.brokers = brokers();
    let mut processor = ProcessorProcess::start(&permitted, &[]);
    processor.wait_ready(Duration::from_secs(60));
    permitted.wait_for_catch_up(Duration::from_secs(120)).await;
    processor.terminate(Duration::from_secs(30));
    assert_clean(&audit(&permitted).await, &ledger);
}
