//! Recovery: from SIGKILL to the first new commit and to caught up; from an
//! actor kill to its restart and its first new commit. Targets (issue 10):
//! SIGKILL to the first new commit at most 2 s, actor kill to the first new
//! commit at most 1 s, medians of [`ROUNDS`]. The processor runs with static
//! group membership (`--group-instance-id`, the pod name in Kubernetes), so
//! the restarted process takes its partitions back without a rebalance.
//!
//! Method: a backlog of events in a fresh topic; the release processor drains
//! it; at a third of the backlog it is SIGKILLed and started again at once
//! (as an orchestrator would). "First new commit" is the first checkpoint
//! row written after the kill (`pipeline_checkpoints.updated_at`, the same
//! clock); "caught up" is the checkpoint at the end of every partition. Then
//! the actor kill: `POST /actors/sink/kill` on the admin endpoint, timed to
//! `/status` showing the next generation ready, and to its first checkpoint.
//! Each is repeated [`ROUNDS`] times; the table shows the median and the worst.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use stream_bins::scratch::{self, TestEnv};

use crate::table::{at_most, Row, Verdict};

/// Kills of each kind.
const ROUNDS: usize = 5;
/// SIGKILL to the first new commit, seconds (median).
const SIGKILL_TARGET: f64 = 2.0;
/// Actor kill to the first new commit, seconds (median).
const ACTOR_KILL_TARGET: f64 = 1.0;
/// Events in the backlog per round.
const EVENTS: u64 = 60_000;

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or_default()
}

/// The release processor on `env`, its admin endpoint on `admin`.
pub(crate) fn start(
    processor: &Path,
    env: &TestEnv,
    admin: &scratch::AdminAccess,
    log: &Path,
) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    Command::new(processor)
        .args(env.processor_flags())
        .args(admin.flags())
        .args(["--group-instance-id", "bench-recovery-0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start {}", processor.display()))
}

/// Polls `condition` every 10 ms until it holds or `deadline` passes.
pub(crate) async fn poll<F, Fut>(
    what: &str,
    deadline: Duration,
    mut condition: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !condition().await {
        anyhow::ensure!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn last_checkpoint_at(env: &TestEnv) -> f64 {
    stream_bins::inspect::last_checkpoint_at(&env.config.postgres_url).await
}

pub(crate) async fn lag(env: &TestEnv) -> i64 {
    let connections = env.connections();
    let Ok(ends) =
        stream_bins::inspect::end_offsets_async(&env.config.brokers, &connections.topic).await
    else {
        return i64::MAX;
    };
    let Ok(checkpoint) = stream_bins::inspect::checkpoint_offsets(
        &connections.postgres_url,
        &connections.group,
        &connections.topic,
    )
    .await
    else {
        return i64::MAX;
    };
    stream_bins::report::lag(&ends, &checkpoint)
}

/// The committed offsets' total: how far the group got.
async fn committed(env: &TestEnv) -> i64 {
    let connections = env.connections();
    stream_bins::inspect::checkpoint_offsets(
        &connections.postgres_url,
        &connections.group,
        &connections.topic,
    )
    .await
    .map(|checkpoint| checkpoint.values().sum())
    .unwrap_or(0)
}

pub(crate) fn ready(admin: &str) -> bool {
    matches!(scratch::http_get(admin, "/readyz"), Ok((200, _)))
}

pub(crate) fn generation(admin: &str) -> Option<u64> {
    let (_, body) = scratch::http_get(admin, "/status").ok()?;
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()?
        .get("generation")?
        .as_u64()
}

/// One round's figures, seconds from the kill.
struct Round {
    sigkill_first_commit: f64,
    sigkill_caught_up: f64,
    actor_restart: f64,
    actor_first_commit: f64,
}

async fn round(processor: &Path, index: usize, log: &Path) -> anyhow::Result<Round> {
    let env = TestEnv::new(&format!("benchrecovery{index}"), 6).await;
    env.produce(EVENTS, 0.005, 700 + index as u64).await;
    let access = scratch::AdminAccess::new();
    let admin = access.address.clone();
    let mut child = start(processor, &env, &access, log)?;
    let total: i64 = EVENTS as i64;
    poll(
        "a third of the backlog",
        Duration::from_secs(300),
        || async { committed(&env).await > total / 3 },
    )
    .await?;

    // The process: SIGKILL, started again at once.
    child.kill()?;
    child.wait()?;
    let killed_at = now_seconds();
    let killed = Instant::now();
    let mut child = start(processor, &env, &access, log)?;
    poll(
        "the first commit after the SIGKILL",
        Duration::from_secs(120),
        || async { last_checkpoint_at(&env).await > killed_at },
    )
    .await?;
    let sigkill_first_commit = now_seconds() - killed_at;
    poll(
        "caught up after the SIGKILL",
        Duration::from_secs(300),
        || async { lag(&env).await == 0 },
    )
    .await?;
    let sigkill_caught_up = killed.elapsed().as_secs_f64();

    // An actor: more events, then the sink killed mid-stream.
    poll(
        "the restarted processor ready",
        Duration::from_secs(60),
        || {
            let ready = ready(&admin);
            async move { ready }
        },
    )
    .await?;
    let before = generation(&admin).context("no generation in /status")?;
    let producer = {
        let config = env.config.clone();
        tokio::spawn(async move {
            loadgen::run(&loadgen::LoadgenConfig {
                brokers: config.brokers.clone(),
                topic: config.topic.clone(),
                count: EVENTS / 2,
                rate: 10_000,
                poison_rate: 0.005,
                seed: 800 + index as u64,
                producers: 1,
                progress: false,
                format: loadgen::ValueFormat::Json,
            })
            .await
        })
    };
    let moving_from = committed(&env).await;
    poll(
        "the new events flowing",
        Duration::from_secs(60),
        || async { committed(&env).await > moving_from + 2_000 },
    )
    .await?;
    let (code, answer) = access.post("/actors/sink/kill")?;
    anyhow::ensure!(code == 200, "kill sink answered {code}: {answer}");
    let killed_at = now_seconds();
    poll("the next generation ready", Duration::from_secs(60), || {
        let restarted = ready(&admin) && generation(&admin).is_some_and(|now| now > before);
        async move { restarted }
    })
    .await?;
    let actor_restart = now_seconds() - killed_at;
    let restarted_at = now_seconds();
    poll(
        "the first commit after the actor kill",
        Duration::from_secs(60),
        || async { last_checkpoint_at(&env).await > restarted_at },
    )
    .await?;
    let actor_first_commit = now_seconds() - killed_at;
    producer.await??;
    poll(
        "caught up after the actor kill",
        Duration::from_secs(300),
        || async { lag(&env).await == 0 },
    )
    .await?;
    let _ = child.kill();
    let _ = child.wait();
    let audit = stream_bins::audit::audit(&env.connections()).await?;
    anyhow::ensure!(audit.clean(), "recovery round {index}:\n{}", audit.render());
    Ok(Round {
        sigkill_first_commit,
        sigkill_caught_up,
        actor_restart,
        actor_first_commit,
    })
}

pub(crate) fn median_and_worst(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    (values[values.len() / 2], values[values.len() - 1])
}

/// The recovery rows of the table. `processor` is the release binary.
pub async fn recovery_rows(processor: &Path) -> anyhow::Result<Vec<Row>> {
    let log = std::env::temp_dir().join("bench-recovery-processor.log");
    let _ = std::fs::remove_file(&log);
    let mut rounds = Vec::new();
    for index in 0..ROUNDS {
        eprintln!("bench: recovery round {} of {ROUNDS}", index + 1);
        rounds.push(round(processor, index, &log).await?);
    }
    let row = |measurement: &str, values: Vec<f64>, target: Option<f64>| {
        let (median, worst) = median_and_worst(values);
        Row {
            measurement: format!("{measurement} (median of {ROUNDS}; worst {worst:.2} s)"),
            events: None,
            seconds: Some(median),
            value: format!("{median:.2} s"),
            target: target
                .map(|at| format!("<= {at} s (median)"))
                .unwrap_or_default(),
            verdict: target.map_or(Verdict::None, |at| at_most(median, at)),
        }
    };
    let sigkill =
        "recovery: processor SIGKILL -> first new commit (restarted at once, static membership)";
    Ok(vec![
        row(
            sigkill,
            rounds
                .iter()
                .map(|round| round.sigkill_first_commit)
                .collect(),
            Some(SIGKILL_TARGET),
        ),
        row(
            "recovery: processor SIGKILL -> caught up",
            rounds.iter().map(|round| round.sigkill_caught_up).collect(),
            None,
        ),
        row(
            "recovery: actor kill (sink) -> pipeline running again",
            rounds.iter().map(|round| round.actor_restart).collect(),
            None,
        ),
        row(
            "recovery: actor kill (sink) -> first new commit",
            rounds
                .iter()
                .map(|round| round.actor_first_commit)
                .collect(),
            Some(ACTOR_KILL_TARGET),
        ),
    ])
}
