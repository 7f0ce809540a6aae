//! The processor's admin endpoint, on the metrics address (one port for
//! Prometheus, the probes and the operator):
//!
//! | request | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus exposition |
//! | `GET /healthz` | 200 while the supervisor runs and answers and no actor is hung; 503 when an actor holds a message without progress past the stall limit (liveness) |
//! | `GET /readyz` | 200 while all five actors run and the consumer consumes (holds partitions, or is a settled member with none); 503 while restarting or stopping, while joining the group or waiting for its partitions, or when the consumer stopped polling (readiness). A member that holds partitions stays ready through a rebalance. |
//! | `GET /status` | JSON: ready, the group membership (partitions held), generation, restarts per actor, mailboxes, committer |
//! | `POST /actors/<name>/kill` | kills the actor; the supervisor restarts the pipeline from the checkpoint |
//! | `POST /actors/<name>/panic` | makes the actor panic at its next message |
//! | `POST /actors/<name>/hang` | makes the actor hold its next message forever (the watchdog's case) |
//!
//! The read-only routes are open. The mutating ones (`POST /actors/...`)
//! need `Authorization: Bearer <token>`, the token read from
//! `--admin-token-file` and compared in constant time; without it they
//! answer 401. With no token configured they are disabled (403), never open.
//!
//! axum on hyper's HTTP/1 server: the request head must arrive within
//! [`HEADER_READ_TIMEOUT`], a whole request is answered within
//! [`REQUEST_TIMEOUT`] (408 after that), at most [`MAX_CONCURRENT_REQUESTS`]
//! are served at once, and request bodies are not read.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use sha2::{Digest, Sha256};
use stream_supervisor::{KillMode, PipelineExit, PipelineMsg, PipelineStatus};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::{debug, warn};

/// How long a client may take to send the request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take, the answer included (a kill waits up to
/// 10 s for the supervisor).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Requests served at once; more wait for a slot.
pub const MAX_CONCURRENT_REQUESTS: usize = 32;
/// The shortest admin token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// What the endpoint reaches.
#[derive(Clone)]
pub struct AdminTarget {
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The pipeline supervisor.
    pub supervisor: ractor::ActorRef<PipelineMsg>,
    /// Whether the pipeline still runs.
    pub exit: watch::Receiver<PipelineExit>,
    /// The bearer token the mutating routes need; `None` disables them.
    pub token: Option<AdminToken>,
}

/// The admin token, kept only as its SHA-256 digest: a presented token is
/// hashed and the digests compared in constant time, so neither the
/// token's bytes nor its length show in the answer's timing.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    /// A token from its text (see [`read_token_file`] for the checks).
    pub fn new(secret: &str) -> AdminToken {
        AdminToken {
            digest: Sha256::digest(secret.as_bytes()).into(),
        }
    }

    /// Whether `presented` is the token.
    pub fn accepts(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest.ct_eq(&self.digest).into()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("AdminToken(***)")
    }
}

/// Reads an admin token file (a mounted Kubernetes Secret, or a file the
/// operator wrote): one line of at least [`MIN_TOKEN_LEN`] visible ASCII
/// characters; surrounding whitespace (a trailing newline) is ignored.
/// The error never contains the token.
pub fn read_token_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let token = text.trim();
    if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(format!(
            "{} must hold one token of visible ASCII characters, without spaces",
            path.display()
        ));
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "{} holds a token of {} characters; use at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 32`)",
            path.display(),
            token.len()
        ));
    }
    Ok(token.to_string())
}

/// The status as JSON (also what `streamctl status` prints).
pub fn status_json(status: &PipelineStatus) -> serde_json::Value {
    json!({
        "ready": readiness(status).is_ok(),
        "actors_running": status.ready,
        "group": {
            "ready": status.group.ready(),
            "partitions": status.group.partitions(),
            "state": status.group.to_string(),
        },
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

/// Readiness: the actors run and the consumer consumes. `Ok` with what it
/// does, `Err` with why not.
pub fn readiness(status: &PipelineStatus) -> Result<String, String> {
    if !status.ready {
        return Err("restarting".to_string());
    }
    if !status.group.ready() {
        return Err(status.group.to_string());
    }
    Ok(status.group.to_string())
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

/// The endpoint's routes (also what the tests drive without a socket).
pub fn router(target: AdminTarget) -> Router {
    let actions = Router::new()
        .route("/actors/{actor}/{action}", post(act))
        .route_layer(middleware::from_fn_with_state(
            target.clone(),
            require_token,
        ));
    let routes = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .merge(actions)
        .fallback(not_found);
    with_limits(routes).with_state(target)
}

/// The limits every endpoint of ours keeps: at most
/// [`MAX_CONCURRENT_REQUESTS`] at once, each answered within
/// [`REQUEST_TIMEOUT`] (408 after that).
pub fn with_limits<S: Clone + Send + Sync + 'static>(routes: Router<S>) -> Router<S> {
    routes
        .layer(GlobalConcurrencyLimitLayer::new(MAX_CONCURRENT_REQUESTS))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
}

/// Serves the endpoint on an already bound listener until the process ends:
/// one request per connection, each connection closed after at most
/// [`HEADER_READ_TIMEOUT`] + [`REQUEST_TIMEOUT`].
pub async fn serve(listener: TcpListener, target: AdminTarget) {
    serve_router(listener, router(target)).await
}

/// Serves `app` on an already bound listener until the process ends, with
/// the admin endpoint's limits: one request per connection, the head within
/// [`HEADER_READ_TIMEOUT`], the connection closed after at most
/// [`HEADER_READ_TIMEOUT`] + [`REQUEST_TIMEOUT`].
pub async fn serve_router(listener: TcpListener, app: Router) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(false);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(HEADER_READ_TIMEOUT + REQUEST_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => debug!(%error, "admin connection failed"),
                Err(_) => debug!("admin connection closed: too slow"),
            }
        });
    }
}

/// Binds the admin address; the error names the setting.
pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|error| {
        anyhow::anyhow!("cannot serve metrics on --metrics-addr {address}: {error}")
    })
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

fn answer(code: u16, content_type: &'static str, body: String) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn text(code: u16, body: impl Into<String>) -> Response {
    answer(code, TEXT, body.into())
}

async fn current_status(target: &AdminTarget, limit_ms: u64) -> Option<PipelineStatus> {
    ractor::call_t!(target.supervisor, PipelineMsg::Status, limit_ms).ok()
}

async fn metrics(State(target): State<AdminTarget>) -> Response {
    answer(200, "text/plain; version=0.0.4", target.metrics.render())
}

async fn healthz(State(target): State<AdminTarget>) -> Response {
    if *target.exit.borrow() != PipelineExit::Running {
        return text(503, "pipeline stopped\n");
    }
    match current_status(&target, 3_000).await {
        Some(status) => {
            let (code, content_type, body) = health(&status);
            answer(code, content_type, body)
        }
        None => text(503, "supervisor not answering\n"),
    }
}

async fn readyz(State(target): State<AdminTarget>) -> Response {
    match current_status(&target, 5_000).await {
        Some(status) => match readiness(&status) {
            Ok(state) => answer(200, TEXT, format!("ready: {state}\n")),
            Err(reason) => answer(503, TEXT, format!("not ready: {reason}\n")),
        },
        None => text(503, "supervisor not answering\n"),
    }
}

async fn status(State(target): State<AdminTarget>) -> Response {
    match current_status(&target, 5_000).await {
        Some(status) => answer(200, JSON, format!("{}\n", status_json(&status))),
        None => text(503, "supervisor not answering\n"),
    }
}

/// The gate of the mutating routes: disabled without a configured token,
/// 401 without the right bearer token.
async fn require_token(
    State(target): State<AdminTarget>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &target.token else {
        return text(
            403,
            "admin actions are disabled: start the processor with --admin-token-file (ADMIN_TOKEN_FILE)\n",
        );
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credentials)| credentials.trim());
    match presented {
        Some(presented) if token.accepts(presented) => next.run(request).await,
        _ => {
            warn!(
                path = request.uri().path(),
                presented = presented.is_some(),
                "admin request refused: missing or wrong bearer token"
            );
            let mut refused = text(
                401,
                "this action needs Authorization: Bearer <the token in the processor's --admin-token-file>\n",
            );
            refused.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            refused
        }
    }
}

async fn act(
    State(target): State<AdminTarget>,
    UrlPath((actor, action)): UrlPath<(String, String)>,
) -> Response {
    let mode = match action.as_str() {
        "kill" => KillMode::Kill,
        "panic" => KillMode::Panic,
        "hang" => KillMode::Hang,
        _ => {
            return text(
                404,
                "use POST /actors/<name>/kill, /actors/<name>/panic or /actors/<name>/hang\n",
            )
        }
    };
    let answer = ractor::call_t!(target.supervisor, PipelineMsg::Kill, 10_000, actor, mode);
    match answer {
        Ok(Ok(done)) => text(200, format!("{done}\n")),
        Ok(Err(refused)) if refused.starts_with("no actor") => text(404, format!("{refused}\n")),
        Ok(Err(refused)) => text(409, format!("{refused}\n")),
        Err(_) => text(503, "supervisor not answering\n"),
    }
}

async fn not_found() -> Response {
    text(
        404,
        "endpoints: GET /metrics /healthz /readyz /status, POST /actors/<name>/kill|panic|hang (with the admin token)\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use stream_actors::consumer::Membership;

    #[test]
    fn readyz_needs_running_actors_and_a_consuming_member() {
        let mut status = PipelineStatus {
            ready: true,
            group: Membership::Consuming {
                partitions: 2,
                rebalancing: true,
            },
            mailboxes: Vec::new(),
            committer: Default::default(),
            restarts: Default::default(),
            generation: 1,
            stalled: Vec::new(),
        };
        assert_eq!(
            readiness(&status),
            Ok("consuming 2 partition(s) while the group rebalances".to_string())
        );
        assert_eq!(status_json(&status)["group"]["partitions"], 2);
        status.group = Membership::Joining {
            state: "up".to_string(),
            join_state: "wait-sync".to_string(),
        };
        let reason = readiness(&status).unwrap_err();
        assert!(reason.contains("joining the group"), "{reason}");
        assert_eq!(status_json(&status)["ready"], false);
        status.group = Membership::Idle {
            members: 7,
            topic_partitions: 6,
        };
        status.ready = false;
        assert_eq!(readiness(&status), Err("restarting".to_string()));
    }

    #[test]
    fn healthz_fails_while_an_actor_is_stalled() {
        let mut status = PipelineStatus {
            ready: true,
            group: Membership::Idle {
                members: 7,
                topic_partitions: 6,
            },
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
