//! loadgen's command line: bad flags and a missing topic are clear errors.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs loadgen with a deadline; kills it if it runs too long.
fn run_with_deadline(arguments: &[&str], deadline: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(arguments)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn loadgen");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > deadline {
            child.kill().ok();
            panic!("loadgen {arguments:?} still running after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    for (arguments, flag) in [
        (vec!["--poison-rate", "2"], "--poison-rate"),
        (vec!["--count", "0"], "--count"),
        (vec!["--rate", "fast"], "--rate"),
    ] {
        let output = run_with_deadline(&arguments, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{arguments:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(flag), "{stderr}");
    }
}

#[test]
fn a_missing_topic_is_a_clear_error() {
    let output = run_with_deadline(
        &["--topic", "no_such_topic_for_tests", "--count", "1"],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no_such_topic_for_tests"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_unreachable_broker_is_a_clear_error() {
    let output = run_with_deadline(
        &["--brokers", "127.0.0.1:1", "--count", "1"],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
}
