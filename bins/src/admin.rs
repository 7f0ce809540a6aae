//! The processor's admin endpoint, on the metrics address (one port for
//! Prometheus, the probes and the operator):
//!
//! | request | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus exposition |
//! | `GET /healthz` | 200 while the supervisor runs and answers and no actor is hung; 503 when an actor holds a message without progress past the stall limit (liveness) |
//! | `GET /readyz` | 200 while all five actors run, 503 while restarting or stopping (readiness) |
//! | `GET /status` | JSON: ready, generation, restarts per actor, mailboxes, committer |
//! | `POST /actors/<name>/kill` | kills the actor; the supervisor restarts the pipeline from the checkpoint |
//! | `POST /actors/<name>/panic` | makes the actor panic at its next message |
//! | `POST /actors/<name>/hang` | makes the actor hold its next message forever (the watchdog's case) |
//!
//! A deliberately small HTTP/1.0 server: one request per connection, no body.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use stream_supervisor::{KillMode, PipelineExit, PipelineMsg, PipelineStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::warn;

/// What the endpoint reaches.
#[derive(Clone)]
pub struct AdminTarget {
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The pipeline supervisor.
    pub supervisor: ractor::ActorRef<PipelineMsg>,
    /// Whether the pipeline still runs.
    pub exit: watch::Receiver<PipelineExit>,
}

/// The status as JSON (also what `streamctl status` prints).
pub fn status_json(status: &PipelineStatus) -> serde_json::Value {
    json!({
        "ready": status.ready,
        "generation": status.generation,
        "restarts": status.restarts,
        "stalled": status.stalled,
        "mailboxes": status.mailboxes.iter().map(|mailbox| json!({
            "actor": mailbox.actor,
            "depth": mailbox.depth,
            "capacity": mailbox.capacity,
            "max_depth": mailbox.max_depth,
            "sent": mailbox.sent,
            "wait_seconds": mailbox.wait_seconds,
        })).collect::<Vec<_>>(),
        "committer": {
            "in_flight": status.committer.in_flight,
            "checkpoints_persisted": status.committer.checkpoints_persisted,
            "persisted": status.committer.persisted,
        },
    })
}

/// Liveness: unhealthy while an actor is hung (the watchdog restarts it;
/// if that keeps happening the restart intensity ends the process).
pub fn health(status: &PipelineStatus) -> (u16, &'static str, String) {
    if status.stalled.is_empty() {
        (200, TEXT, "ok\n".to_string())
    } else {
        (
            503,
            TEXT,
            format!(
                "stalled: {} holding a message without progress\n",
                status.stalled.join(", ")
            ),
        )
    }
}

/// Serves the endpoint on an already bound listener until the process ends.
pub async fn serve(listener: TcpListener, target: AdminTarget) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let target = target.clone();
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, &target).await {
                        warn!(%error, "admin request failed");
                    }
                });
            }
            Err(error) => {
                warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Binds the admin address; the error names the setting.
pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|error| {
        anyhow::anyhow!("cannot serve metrics on --metrics-addr {address}: {error}")
    })
}

async fn answer(mut stream: TcpStream, target: &AdminTarget) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 512];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..read]);
        if head.len() > 16 * 1024 {
            break;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("");
    let path = words.next().unwrap_or("");
    let (code, content_type, body) = route(method, path, target).await;
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.0 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

async fn route(method: &str, path: &str, target: &AdminTarget) -> (u16, &'static str, String) {
    let running = *target.exit.borrow() == PipelineExit::Running;
    let status = || async { ractor::call_t!(target.supervisor, PipelineMsg::Status, 5_000).ok() };
    match (method, path) {
        ("GET", "/metrics") => (200, "text/plain; version=0.0.4", target.metrics.render()),
        ("GET", "/healthz") if !running => (503, TEXT, "pipeline stopped\n".to_string()),
        ("GET", "/healthz") => {
            match ractor::call_t!(target.supervisor, PipelineMsg::Status, 3_000) {
                Ok(status) => health(&status),
                Err(_) => (503, TEXT, "supervisor not answering\n".to_string()),
            }
        }
        ("GET", "/readyz") => match status().await {
            Some(status) if status.ready => (200, TEXT, "ready\n".to_string()),
            Some(_) => (503, TEXT, "restarting\n".to_string()),
            None => (503, TEXT, "supervisor not answering\n".to_string()),
        },
        ("GET", "/status") => match status().await {
            Some(status) => (200, JSON, format!("{}\n", status_json(&status))),
            None => (503, TEXT, "supervisor not answering\n".to_string()),
        },
        (method, path) if path.starts_with("/actors/") => {
            let mut parts = path.trim_start_matches("/actors/").split('/');
            let actor = parts.next().unwrap_or("");
            let mode = match parts.next() {
                Some("kill") => KillMode::Kill,
                Some("panic") => KillMode::Panic,
                Some("hang") => KillMode::Hang,
                _ => {
                    return (
                        404,
                        TEXT,
                        "use POST /actors/<name>/kill, /actors/<name>/panic or /actors/<name>/hang\n"
                            .to_string(),
                    )
                }
            };
            if method != "POST" {
                return (405, TEXT, "use POST\n".to_string());
            }
            let answer = ractor::call_t!(
                target.supervisor,
                PipelineMsg::Kill,
                10_000,
                actor.to_string(),
                mode
            );
            match answer {
                Ok(Ok(done)) => (200, TEXT, format!("{done}\n")),
                Ok(Err(refused)) if refused.starts_with("no actor") => {
                    (404, TEXT, format!("{refused}\n"))
                }
                Ok(Err(refused)) => (409, TEXT, format!("{refused}\n")),
                Err(_) => (503, TEXT, "supervisor not answering\n".to_string()),
            }
        }
        _ => (
            404,
            TEXT,
            "endpoints: GET /metrics /healthz /readyz /status, POST /actors/<name>/kill|panic|hang\n"
                .to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_fails_while_an_actor_is_stalled() {
        let mut status = PipelineStatus {
            ready: true,
            mailboxes: Vec::new(),
            committer: Default::default(),
            restarts: Default::default(),
            generation: 1,
            stalled: Vec::new(),
        };
        assert_eq!(health(&status).0, 200);
        status.stalled = vec!["sink"];
        let (code, _, body) = health(&status);
        assert_eq!(code, 503);
        assert!(body.contains("stalled: sink"), "{body}");
    }
}
