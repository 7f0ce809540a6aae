//! The admin endpoint of a running processor: the read-only routes are open,
//! the mutating ones need the bearer token (a missing or wrong token, a
//! cross-site form post, another scheme: 401, and nothing happens), a slow
//! client is cut off, and without a configured token the routes are
//! disabled.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{http_get, ProcessorProcess, TestEnv};

/// A raw HTTP/1.1 request (what a browser or an attacker sends); the status
/// code and the whole answer.
fn raw_request(address: &str, request: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (code, answer)
}

fn status(processor: &ProcessorProcess) -> serde_json::Value {
    let (code, body) = http_get(&processor.admin, "/status").expect("status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status json")
}

fn streamctl(arguments: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_streamctl"))
        .args(arguments)
        .env_remove("ADMIN_TOKEN_FILE")
        .output()
        .expect("streamctl runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kill_routes_need_the_token_and_the_read_only_routes_stay_open() {
    let env = TestEnv::new("admin", 2).await;
    let mut processor = ProcessorProcess::start(&env, &[]);
    processor.wait_ready(Duration::from_secs(60));
    let admin = processor.admin.clone();

    for path in ["/metrics", "/healthz", "/readyz", "/status"] {
        let (code, body) = http_get(&admin, path).expect(path);
        assert_eq!(code, 200, "{path}: {body}");
    }

    // Refused, and nothing happens: no token, a wrong one, another scheme,
    // a cross-site form post (a browser cannot add the header to one).
    let host = format!("Host: {admin}\r\nConnection: close\r\n");
    let wrong_token = "not-the-token-but-long-enough-0123456789";
    let refused = [
        format!("POST /actors/sink/kill HTTP/1.1\r\n{host}Content-Length: 0\r\n\r\n"),
        format!(
            "POST /actors/sink/kill HTTP/1.1\r\n{host}Authorization: Bearer {wrong_token}\r\nContent-Length: 0\r\n\r\n"
        ),
        format!(
            "POST /actors/sink/kill HTTP/1.1\r\n{host}Authorization: Basic YWRtaW46YWRtaW4=\r\nContent-Length: 0\r\n\r\n"
        ),
        format!(
            "POST /actors/sink/panic HTTP/1.1\r\n{host}Origin: http://evil.example\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\n\r\na=b"
        ),
    ];
    for request in &refused {
        let (code, answer) = raw_request(&admin, request);
        assert_eq!(code, 401, "{request}\n{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{answer}"
        );
    }
    let without = streamctl(&["kill", "sink", "--admin", &admin]);
    assert_eq!(without.status.code(), Some(1), "{without:?}");
    assert!(
        String::from_utf8_lossy(&without.stderr)
            .contains("pass its admin token with --admin-token-file"),
        "{without:?}"
    );
    let wrong_file = std::env::temp_dir().join(format!("admin-wrong-{}.token", std::process::id()));
    std::fs::write(&wrong_file, format!("{wrong_token}\n")).expect("write");
    let wrong = streamctl(&[
        "kill",
        "sink",
        "--admin",
        &admin,
        "--admin-token-file",
        &wrong_file.display().to_string(),
    ]);
    std::fs::remove_file(&wrong_file).ok();
    assert_eq!(wrong.status.code(), Some(1), "{wrong:?}");
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("refused the token"),
        "{wrong:?}"
    );
    let unchanged = status(&processor);
    assert_eq!(unchanged["generation"], 1, "{unchanged}");
    assert_eq!(unchanged["restarts"]["sink"], 0, "{unchanged}");
    let log = std::fs::read_to_string(&processor.log).expect("log");
    assert!(log.contains("admin request refused"), "{log}");
    assert!(!log.contains(wrong_token), "the presented token was logged");

    // With the token: a GET is the wrong method, a POST kills.
    let (code, _) = common::http_request(
        &admin,
        "GET",
        "/actors/sink/kill",
        Some(
            std::fs::read_to_string(&processor.access.token_file)
                .expect("token")
                .trim(),
        ),
    )
    .expect("get");
    assert_eq!(code, 405);
    let mut arguments = vec!["kill".to_string(), "sink".to_string()];
    arguments.extend(processor.admin_args());
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    let kill = streamctl(&arguments);
    assert!(kill.status.success(), "{kill:?}");
    assert_eq!(String::from_utf8_lossy(&kill.stdout).trim(), "killed sink");
    let restarted = common::within(Duration::from_secs(60), || {
        http_get(&admin, "/status").is_ok_and(|(_, body)| {
            serde_json::from_str::<serde_json::Value>(&body)
                .is_ok_and(|status| status["generation"] == 2 && status["restarts"]["sink"] == 1)
        })
    })
    .await;
    assert!(restarted, "{}", status(&processor));

    // A client that never finishes its request head is cut off.
    let mut slow = std::net::TcpStream::connect(&admin).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let started = Instant::now();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    let mut buffer = Vec::new();
    let closed = slow.read_to_end(&mut buffer);
    let waited = started.elapsed();
    assert!(
        closed.is_ok() && waited < Duration::from_secs(25),
        "a slow client held the connection {waited:?}: {closed:?}"
    );
    eprintln!("slow client cut off after {:.1} s", waited.as_secs_f64());

    assert_eq!(processor.terminate(Duration::from_secs(60)), Some(0));

    // No token configured: the routes are disabled, whatever is presented.
    let mut disabled = ProcessorProcess::start_without_admin_token(&env, &[]);
    disabled.wait_ready(Duration::from_secs(60));
    let (code, answer) = raw_request(
        &disabled.admin,
        &format!(
            "POST /actors/sink/kill HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {wrong_token}\r\nContent-Length: 0\r\n\r\n"
        ),
    );
    assert_eq!(code, 403, "{answer}");
    assert!(answer.contains("disabled"), "{answer}");
    assert_eq!(status(&disabled)["generation"], 1);
    assert_eq!(disabled.terminate(Duration::from_secs(60)), Some(0));
}
