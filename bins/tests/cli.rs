//! The binaries' behaviour on bad configuration and unreachable services:
//! a clear one-line error naming the setting or the service, never a panic.

use std::process::{Command, Output};
use std::time::Duration;

/// Runs a binary with a deadline; kills it if it runs too long.
fn run_with_deadline(binary: &str, arguments: &[&str], deadline: Duration) -> Output {
    run_with_env(binary, arguments, &[], deadline)
}

/// [`run_with_deadline`] with extra environment variables.
fn run_with_env(
    binary: &str,
    arguments: &[&str],
    environment: &[(&str, &str)],
    deadline: Duration,
) -> Output {
    stream_bins::scratch::run_binary(binary, arguments, environment, deadline)
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const PROCESSOR: &str = env!("CARGO_BIN_EXE_processor");
const STREAMCTL: &str = env!("CARGO_BIN_EXE_streamctl");

#[test]
fn bad_values_exit_2_with_one_line_naming_the_setting() {
    let cases: [(&[&str], &str); 6] = [
        (&["--batch-size", "0"], "--batch-size"),
        (&["--batch-size", "many"], "--batch-size"),
        (&["--mailbox-capacity", "0"], "--mailbox-capacity"),
        (&["--brokers", "no-port"], "--brokers"),
        (&["--metrics-addr", "nowhere"], "--metrics-addr"),
        (&["--no-such-flag"], "--no-such-flag"),
    ];
    for (arguments, setting) in cases {
        let output = run_with_deadline(PROCESSOR, arguments, Duration::from_secs(20));
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{arguments:?}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{arguments:?}: more than one line: {stderr}"
        );
        assert!(stderr.contains(setting), "{arguments:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn environment_values_are_validated_too() {
    let output = Command::new(PROCESSOR)
        .env("BATCH_SIZE", "0")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr_of(&output).contains("BATCH_SIZE"));
}

#[test]
fn help_explains_the_settings() {
    let output = run_with_deadline(PROCESSOR, &["--help"], Duration::from_secs(20));
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    for setting in [
        "--brokers",
        "--group",
        "--topic",
        "--dlq-topic",
        "--postgres-url",
        "--clickhouse-url",
        "--batch-size",
        "--linger-ms",
        "--mailbox-capacity",
        "--metrics-addr",
        "--service-timeout-ms",
        "--stall-timeout-ms",
        "--max-record-bytes",
        "--max-field-bytes",
        "KAFKA_BROKERS",
    ] {
        assert!(help.contains(setting), "help lacks {setting}");
    }
}

#[test]
fn a_stall_limit_shorter_than_three_service_timeouts_is_refused() {
    let output = run_with_deadline(
        PROCESSOR,
        &[
            "--service-timeout-ms",
            "5000",
            "--stall-timeout-ms",
            "10000",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = stderr_of(&output);
    assert!(stderr.contains("--stall-timeout-ms"), "{stderr}");
    assert!(stderr.contains("15000"), "{stderr}");
}

#[test]
fn unreachable_postgres_is_a_clear_error_without_the_password() {
    let output = run_with_env(
        PROCESSOR,
        &[
            "--postgres-url",
            "postgres://app:hunter2-in-the-url@127.0.0.1:1/pipeline",
            "--metrics-addr",
            "",
        ],
        &[("RUST_LOG", "debug")],
        Duration::from_secs(60),
    );
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("postgres") && stderr.contains("app:***@127.0.0.1:1"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn help_prints_no_secret_from_the_environment_or_the_defaults() {
    let secrets = [
        (
            "POSTGRES_URL",
            "postgres://app:pg-secret-1@db.example:5432/pipeline",
        ),
        ("CLICKHOUSE_PASSWORD", "ch-secret-2"),
        ("AWS_SECRET_ACCESS_KEY", "aws-secret-3"),
        ("KAFKA_SASL_PASSWORD", "kafka-secret-4"),
    ];
    let sqs_consumer = env!("CARGO_BIN_EXE_sqs-consumer");
    let commands: [(&str, &[&str]); 6] = [
        (PROCESSOR, &["--help"]),
        (STREAMCTL, &["topics", "ensure", "--help"]),
        (STREAMCTL, &["report", "--help"]),
        (STREAMCTL, &["audit", "--help"]),
        (STREAMCTL, &["sqs", "setup", "--help"]),
        (sqs_consumer, &["--help"]),
    ];
    for (binary, arguments) in commands {
        let output = run_with_env(binary, arguments, &secrets, Duration::from_secs(20));
        assert_eq!(output.status.code(), Some(0), "{arguments:?}");
        let help = String::from_utf8_lossy(&output.stdout);
        for secret in [
            "pg-secret-1",
            "ch-secret-2",
            "aws-secret-3",
            "kafka-secret-4",
            "postgres:postgres@",
        ] {
            assert!(
                !help.contains(secret),
                "{binary} {arguments:?} prints {secret}:\n{help}"
            );
        }
    }
    let help = run_with_deadline(PROCESSOR, &["--help"], Duration::from_secs(20));
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--admin-token-file"), "{help}");
    assert!(help.contains("--kafka-sasl-password-file"), "{help}");
    assert!(help.contains("--kafka-ssl-ca-location"), "{help}");
    assert!(
        help.contains("postgres://postgres:***@127.0.0.1:5432"),
        "{help}"
    );
}

#[test]
fn a_bad_admin_token_file_is_refused_at_start_without_printing_the_token() {
    let directory = std::env::temp_dir().join(format!("admin-token-cli-{}", std::process::id()));
    std::fs::create_dir_all(&directory).expect("temp dir");
    let short = directory.join("short");
    std::fs::write(&short, "tooshort-x1\n").expect("write");
    let spaced = directory.join("spaced");
    std::fs::write(&spaced, "a token with spaces in it, long enough\n").expect("write");
    let missing = directory.join("missing");
    for (file, reason) in [
        (&short, "at least 16"),
        (&spaced, "without spaces"),
        (&missing, "cannot read"),
    ] {
        let path = file.display().to_string();
        let output = run_with_deadline(
            PROCESSOR,
            &["--admin-token-file", &path],
            Duration::from_secs(20),
        );
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{path}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("--admin-token-file"), "{stderr}");
        assert!(stderr.contains(reason), "{stderr}");
        assert!(!stderr.contains("tooshort"), "the token leaked: {stderr}");
    }
    std::fs::remove_dir_all(&directory).ok();
}

#[test]
fn unreachable_clickhouse_is_a_clear_error() {
    let output = run_with_deadline(
        PROCESSOR,
        &[
            "--clickhouse-url",
            "http://127.0.0.1:1",
            "--metrics-addr",
            "",
        ],
        Duration::from_secs(60),
    );
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("clickhouse") && stderr.contains("127.0.0.1:1"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn unreachable_kafka_is_a_clear_error() {
    let output = run_with_deadline(
        PROCESSOR,
        &["--brokers", "127.0.0.1:1", "--metrics-addr", ""],
        Duration::from_secs(60),
    );
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("kafka") && stderr.contains("127.0.0.1:1"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_missing_topic_is_a_clear_error() {
    let output = run_with_deadline(
        PROCESSOR,
        &["--topic", "no_such_topic_for_tests", "--metrics-addr", ""],
        Duration::from_secs(60),
    );
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no_such_topic_for_tests"), "{stderr}");
}

#[test]
fn streamctl_report_names_an_unreachable_service() {
    let output = run_with_deadline(
        STREAMCTL,
        &["report", "--brokers", "127.0.0.1:1", "--wait-secs", "0"],
        Duration::from_secs(60),
    );
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn streamctl_topics_ensure_creates_leaves_alone_and_recreates_through_the_admin_api() {
    let name = format!(
        "topics_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            % 100_000_000
    );
    let (topic, dlq_topic) = (format!("{name}_events"), format!("{name}_dlq"));
    let ensure = |extra: &[&str]| {
        let mut arguments = vec![
            "topics",
            "ensure",
            "--brokers",
            "127.0.0.1:9092",
            "--topic",
            &topic,
            "--dlq-topic",
            &dlq_topic,
            "--partitions",
            "3",
            "--dlq-partitions",
            "2",
        ];
        arguments.extend_from_slice(extra);
        let output = run_with_deadline(STREAMCTL, &arguments, Duration::from_secs(90));
        assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert_eq!(
        ensure(&[]),
        format!(
            "topic {topic}: created (3 partitions)\ntopic {dlq_topic}: created (2 partitions)\n"
        )
    );
    let brokers = &stream_bins::scratch::brokers();
    assert_eq!(
        stream_bins::inspect::partitions(brokers, &topic).unwrap(),
        [0, 1, 2]
    );
    assert_eq!(
        ensure(&[]),
        format!("topic {topic}: exists (3 partitions)\ntopic {dlq_topic}: exists (2 partitions)\n")
    );
    // A record in the topic, then --recreate: the topic is empty again.
    let producer: rdkafka::producer::BaseProducer = brokers.client_config().create().unwrap();
    producer
        .send(rdkafka::producer::BaseRecord::<(), str>::to(&topic).payload("x"))
        .unwrap();
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10)).unwrap();
    let records = |topic: &str| {
        stream_bins::inspect::end_offsets(brokers, topic)
            .unwrap()
            .values()
            .sum::<i64>()
    };
    assert_eq!(records(&topic), 1);
    assert_eq!(
        ensure(&["--recreate"]),
        format!(
            "topic {topic}: deleted and created again (3 partitions)\ntopic {dlq_topic}: deleted and created again (2 partitions)\n"
        )
    );
    assert_eq!(records(&topic), 0);
    // Bad values: exit 2, one line naming the setting.
    for (arguments, setting) in [
        (
            vec!["topics", "ensure", "--partitions", "0"],
            "--partitions",
        ),
        (vec!["topics", "ensure", "--topic", "no spaces"], "--topic"),
        (
            vec!["topics", "ensure", "--replication-factor", "0"],
            "--replication-factor",
        ),
    ] {
        let output = run_with_deadline(STREAMCTL, &arguments, Duration::from_secs(20));
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{arguments:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(setting), "{arguments:?}: {stderr}");
    }
}
