//! The Python baselines: a venv of their own (created on first use) and a
//! run of one consumer script against a fresh PostgreSQL database, checked
//! against what the database holds afterwards.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use stream_bins::scratch;
use tokio::process::Command;

/// What the bench installs into its venv, from PyPI: the baselines'
/// client and driver, and Quix Streams with the driver its PostgreSQL sink
/// uses (the peers phase).
const PACKAGES: [&str; 4] = [
    "confluent-kafka",
    "psycopg[binary]",
    "quixstreams",
    "psycopg2-binary",
];

/// Runs `command` to completion within `limit`; fails on a non-zero exit.
async fn run_checked(mut command: Command, what: &str, limit: Duration) -> anyhow::Result<String> {
    command.kill_on_drop(true);
    command.stderr(std::process::Stdio::inherit());
    command.stdout(std::process::Stdio::piped());
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .with_context(|| format!("{what} did not finish within {limit:?}"))?
        .with_context(|| format!("{what} failed to run"))?;
    anyhow::ensure!(
        output.status.success(),
        "{what} exited with {}",
        output.status
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The venv's python, creating the venv (python3 -m venv, pip install from
/// PyPI) when it is missing or lacks a package.
pub async fn ensure_venv(venv: &Path) -> anyhow::Result<PathBuf> {
    let python = venv.join("bin").join("python");
    let mut check = Command::new(&python);
    check.args([
        "-c",
        "import confluent_kafka, psycopg, quixstreams, psycopg2",
    ]);
    if python.exists()
        && run_checked(check, "venv import check", Duration::from_secs(60))
            .await
            .is_ok()
    {
        return Ok(python);
    }
    eprintln!(
        "bench: creating the Python venv {} ({})",
        venv.display(),
        PACKAGES.join(", ")
    );
    let mut create = Command::new("python3");
    create.arg("-m").arg("venv").arg(venv);
    run_checked(create, "python3 -m venv", Duration::from_secs(120)).await?;
    // Keep the venv out of git without touching the repository's .gitignore.
    std::fs::write(venv.join(".gitignore"), "*\n")?;
    let mut install = Command::new(venv.join("bin").join("pip"));
    install
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(PACKAGES);
    run_checked(install, "pip install", Duration::from_secs(600)).await?;
    Ok(python)
}

/// What a Python consumer did, as it reported and as the database shows.
#[derive(Debug, Clone)]
pub struct PythonRun {
    /// Messages it consumed and stored.
    pub consumed: u64,
    /// Seconds from its first message to its last offset commit.
    pub seconds: f64,
}

impl PythonRun {
    /// Events per second.
    pub fn rate(&self) -> f64 {
        self.consumed as f64 / self.seconds
    }
}

/// Limits of one Python run.
pub struct Bounds {
    /// Stop after this many messages.
    pub max_events: u64,
    /// Stop this long after the first message.
    pub max_seconds: f64,
}

/// Runs `script` (in bench/python) on `topic` from the start, into a fresh
/// PostgreSQL database with the seed's table, and checks the stored rows.
pub async fn run_consumer(
    python: &Path,
    script: &Path,
    name: &str,
    topic: &str,
    bounds: Bounds,
) -> anyhow::Result<PythonRun> {
    let database = scratch::unique_name(name);
    let url = scratch::create_postgres_database(&database).await;
    let client = stream_actors::storage::connect_postgres(&url).await?;
    client
        .batch_execute("CREATE TABLE events (id TEXT PRIMARY KEY, data BYTEA)")
        .await
        .context("create the Python consumer's table")?;

    let mut command = Command::new(python);
    command
        .arg(script)
        .args(["--brokers", &scratch::brokers().servers])
        .args(["--topic", topic])
        .args(["--group", &format!("{database}_group")])
        .args(["--postgres-url", &url])
        .args(["--max-events", &bounds.max_events.to_string()])
        .args(["--max-seconds", &bounds.max_seconds.to_string()]);
    // Time box: its own bound, plus the group join and a margin.
    let limit = Duration::from_secs_f64(bounds.max_seconds + 120.0);
    let stdout = run_checked(command, name, limit).await?;
    let last = stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .with_context(|| format!("{name} printed no summary"))?;
    let summary: serde_json::Value =
        serde_json::from_str(last).with_context(|| format!("{name} summary {last:?}"))?;
    let field = |key: &str| {
        summary[key]
            .as_f64()
            .with_context(|| format!("{name} summary lacks {key}: {last}"))
    };
    let consumed = field("consumed")? as u64;
    let seconds = field("seconds")?;

    // Verify against the database itself, not only the script's word.
    let row = client
        .query_one("SELECT count(*), count(DISTINCT id) FROM events", &[])
        .await?;
    let (stored, distinct): (i64, i64) = (row.get(0), row.get(1));
    anyhow::ensure!(
        consumed > 0 && seconds > 0.0,
        "{name} consumed nothing ({last})"
    );
    anyhow::ensure!(
        stored as u64 == consumed && distinct == stored,
        "{name}: consumed {consumed} but the database holds {stored} rows ({distinct} distinct)"
    );
    eprintln!(
        "bench: {name}: {consumed} events in {seconds:.1} s, {stored} rows stored and verified"
    );
    Ok(PythonRun { consumed, seconds })
}
