//! Quix Streams (PyPI) with its PostgreSQL sink: `bench/python/quix_consumer.py`
//! in the bench's venv, one process (a Quix application is one Python
//! thread; it scales by more processes in the group), at least once, `ON
//! CONFLICT DO NOTHING` on `event_id`, poison to a dead-letter topic from
//! the processing-error callback, validated by the pipeline's rules
//! written in Python.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use stream_actors::kafka::Brokers;

use super::{Launch, PostgresParts};

/// Its table, in a database of its own.
const TABLE: &str = "quix_events";

/// The installed Quix Streams version.
async fn version(python: &Path) -> anyhow::Result<String> {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(python)
            .args(["-c", "import quixstreams; print(quixstreams.__version__)"])
            .output(),
    )
    .await
    .context("reading the Quix Streams version took over 60 s")??;
    anyhow::ensure!(
        output.status.success(),
        "cannot import quixstreams: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// The Quix application on `topic` (the plain events), into a database and
/// dead-letter topic of its own.
pub async fn prepare(
    python: &Path,
    script: &Path,
    brokers: &Brokers,
    topic: &str,
    out: &Path,
) -> anyhow::Result<Launch> {
    let (name, dlq_topic, postgres_url) = super::peer_corner("bench_quix", TABLE).await?;
    let parts = PostgresParts::of(&postgres_url)?;
    let version = version(python).await?;
    let group = format!("{name}_group");

    let work = out.join("quix").join(&name);
    std::fs::create_dir_all(&work)?;
    let arguments: Vec<String> = [
        ("--brokers", brokers.servers.clone()),
        ("--topic", topic.to_string()),
        ("--dlq-topic", dlq_topic.clone()),
        ("--group", group.clone()),
        ("--host", parts.host),
        ("--port", parts.port.to_string()),
        ("--dbname", parts.database),
        ("--user", parts.user),
        ("--password", parts.password),
        ("--table", TABLE.to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect();
    let (python, script, directory) = (python.to_path_buf(), script.to_path_buf(), work.clone());
    let command = move || {
        let mut command = Command::new(&python);
        // Quix keeps its state directory in the working directory.
        command
            .arg(&script)
            .args(&arguments)
            .current_dir(&directory);
        command
    };
    Ok(Launch {
        label: "Quix Streams".to_string(),
        name: format!("Quix Streams {version}"),
        stores: "PostgreSQL, ON CONFLICT DO NOTHING, 1 process".to_string(),
        command: Box::new(command),
        log: work.join("quix.log"),
        postgres_url,
        table: TABLE.to_string(),
        topic_filter: None,
        dlq_topic,
        brokers: brokers.clone(),
        group,
        topic: topic.to_string(),
        position: super::Position::Committed,
        clean_codes: &[],
    })
}
