//! Kafka Connect with Debezium's JDBC sink connector: the worker from
//! Maven Central (`bench/connect/runtime-pom.xml`), the connector as a
//! plugin of its own (`bench/connect/jdbc-sink-pom.xml`), one standalone
//! worker run as the distribution's `connect-standalone.sh` runs it (its
//! heap and GC options), upserting by `event_id` into a table of its own,
//! `errors.tolerance=all` with a dead-letter topic and context headers.
//!
//! A JDBC sink needs records with a schema: its topic holds the same events
//! (same seed) in the JsonConverter envelope (`loadgen --format
//! connect-json`). Everything else is the connector's default.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use stream_actors::kafka::Brokers;
use stream_bins::scratch;

use super::Launch;

/// The connector's name; its consumer group is `connect-<name>`.
const CONNECTOR: &str = "bench-jdbc-sink";
/// Its table, in a database of its own.
const TABLE: &str = "connect_events";

/// The JVM options of `connect-standalone.sh` (`KAFKA_HEAP_OPTS`) and
/// `kafka-run-class.sh` (`KAFKA_JVM_PERFORMANCE_OPTS`).
const JVM_OPTIONS: [&str; 9] = [
    "-Xms256M",
    "-Xmx2G",
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:MaxInlineLevel=15",
    "-Djava.awt.headless=true",
];

/// Where the worker's jars and the plugin are.
pub struct Install {
    runtime: PathBuf,
    plugins: PathBuf,
    /// "Kafka Connect 4.4.0, Debezium JDBC sink 3.5.0.Final", from the jars.
    pub versions: String,
}

/// The version in a jar's name `<artifact>-<version>.jar` found in `dir`.
fn jar_version(dir: &Path, artifact: &str) -> anyhow::Result<String> {
    let prefix = format!("{artifact}-");
    std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .find_map(|name| {
            let version = name.strip_prefix(&prefix)?.strip_suffix(".jar")?;
            version
                .starts_with(|c: char| c.is_ascii_digit())
                .then(|| version.to_string())
        })
        .with_context(|| format!("no {artifact} jar in {}", dir.display()))
}

/// Resolves `pom`'s dependencies into `target` with Maven, unless `target`
/// already holds them for this very pom (a copy of it is the stamp).
fn resolve(pom: &Path, target: &Path, log: &Path) -> anyhow::Result<()> {
    let wanted = std::fs::read(pom).with_context(|| format!("cannot read {}", pom.display()))?;
    let stamp = target.join(".resolved-pom.xml");
    if std::fs::read(&stamp).ok().as_deref() == Some(wanted.as_slice()) {
        return Ok(());
    }
    eprintln!(
        "bench: peers: resolving {} from Maven Central (log: {})",
        pom.display(),
        log.display()
    );
    if target.exists() {
        std::fs::remove_dir_all(target)?;
    }
    let log_file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let status = Command::new("mvn")
        .args(["-B", "-q", "-f"])
        .arg(pom)
        .args([
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            &format!("-DoutputDirectory={}", target.display()),
        ])
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .context("cannot run mvn (Maven resolves Kafka Connect and the connector)")?;
    anyhow::ensure!(
        status.success(),
        "mvn could not resolve {} ({status}); see {}",
        pom.display(),
        log.display()
    );
    std::fs::write(&stamp, wanted)?;
    Ok(())
}

/// Resolves the worker and the connector into `dir` (once per pom).
pub fn ensure_installed(root: &Path, dir: &Path) -> anyhow::Result<Install> {
    let poms = root.join("bench").join("connect");
    // Maven takes a relative output directory from the pom's directory.
    let dir = &std::path::absolute(dir)?;
    let runtime = dir.join("runtime");
    let plugins = dir.join("plugins");
    let plugin = plugins.join("debezium-jdbc");
    std::fs::create_dir_all(dir)?;
    resolve(
        &poms.join("runtime-pom.xml"),
        &runtime,
        &dir.join("mvn-runtime.log"),
    )?;
    resolve(
        &poms.join("jdbc-sink-pom.xml"),
        &plugin,
        &dir.join("mvn-jdbc-sink.log"),
    )?;
    let versions = format!(
        "Kafka Connect {}, Debezium JDBC sink {}",
        jar_version(&runtime, "connect-runtime")?,
        jar_version(&plugin, "debezium-connector-jdbc")?
    );
    Ok(Install {
        runtime,
        plugins,
        versions,
    })
}

/// A JDBC URL and its credentials for a PostgreSQL URL.
fn jdbc_settings(postgres_url: &str) -> anyhow::Result<(String, String, String)> {
    let parts = super::PostgresParts::of(postgres_url)?;
    Ok((
        format!(
            "jdbc:postgresql://{}:{}/{}",
            parts.host, parts.port, parts.database
        ),
        parts.user,
        parts.password,
    ))
}

/// A standalone worker with the JDBC sink on `topic` (the envelope events),
/// into a database and dead-letter topic of its own; with the connector's
/// defaults, or with `batch_size` records per poll and per write (the
/// pipeline's batch).
pub async fn prepare(
    install: &Install,
    brokers: &Brokers,
    topic: &str,
    batch_size: Option<u32>,
    out: &Path,
) -> anyhow::Result<Launch> {
    let (name, dlq_topic, postgres_url) = super::peer_corner("bench_connect", TABLE).await?;
    let (jdbc_url, user, password) = jdbc_settings(&postgres_url)?;
    let connector = format!("{CONNECTOR}-{name}");
    let tasks = std::thread::available_parallelism().map_or(2, |cores| cores.get());

    let work = out.join("connect").join(&name);
    std::fs::create_dir_all(&work)?;
    let worker = work.join("worker.properties");
    std::fs::write(
        &worker,
        format!(
            "bootstrap.servers={servers}\n\
             key.converter=org.apache.kafka.connect.storage.StringConverter\n\
             value.converter=org.apache.kafka.connect.json.JsonConverter\n\
             value.converter.schemas.enable=true\n\
             offset.storage.file.filename={offsets}\n\
             plugin.path={plugins}\n\
             listeners=http://127.0.0.1:{port}\n{poll}",
            servers = brokers.servers,
            offsets = work.join("connect.offsets").display(),
            plugins = install.plugins.display(),
            port = scratch::free_port(),
            poll = batch_size
                .map(|size| format!("consumer.max.poll.records={size}\n"))
                .unwrap_or_default(),
        ),
    )?;
    let connector_file = work.join("connector.properties");
    std::fs::write(
        &connector_file,
        format!(
            "name={connector}\n\
             connector.class=io.debezium.connector.jdbc.JdbcSinkConnector\n\
             tasks.max={tasks}\n\
             topics={topic}\n\
             connection.url={jdbc_url}\n\
             connection.username={user}\n\
             connection.password={password}\n\
             insert.mode=upsert\n\
             primary.key.mode=record_value\n\
             primary.key.fields=event_id\n\
             collection.name.format={TABLE}\n\
             schema.evolution=none\n\
             errors.tolerance=all\n\
             errors.deadletterqueue.topic.name={dlq_topic}\n\
             errors.deadletterqueue.topic.replication.factor=1\n\
             errors.deadletterqueue.context.headers.enable=true\n{batch}",
            batch = batch_size
                .map(|size| format!("batch.size={size}\n"))
                .unwrap_or_default(),
        ),
    )?;

    let log4j = scratch::workspace_root().join("bench/connect/log4j2.properties");
    let classpath = format!("{}/*", install.runtime.display());
    let command = move || {
        let mut command = Command::new("java");
        command
            .args(JVM_OPTIONS)
            .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
            .arg("-cp")
            .arg(&classpath)
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .arg(&worker)
            .arg(&connector_file);
        command
    };
    let settings = match batch_size {
        None => "the connector's defaults (batch.size 500)".to_string(),
        Some(size) => format!("batch.size and max.poll.records {size}"),
    };
    Ok(Launch {
        label: "Kafka Connect".to_string(),
        name: format!("{}, {settings}", install.versions),
        stores: format!("PostgreSQL, upsert by event_id, {tasks} tasks"),
        command: Box::new(command),
        log: work.join("worker.log"),
        postgres_url,
        table: TABLE.to_string(),
        topic_filter: None,
        dlq_topic,
        brokers: brokers.clone(),
        group: format!("connect-{connector}"),
        topic: topic.to_string(),
        position: super::Position::Committed,
        clean_codes: &[143],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_url_becomes_a_jdbc_url_and_credentials() {
        let (url, user, password) =
            jdbc_settings("postgres://app:s3cret@127.0.0.1:5433/bench_x").expect("parses");
        assert_eq!(url, "jdbc:postgresql://127.0.0.1:5433/bench_x");
        assert_eq!((user.as_str(), password.as_str()), ("app", "s3cret"));
    }

    #[test]
    fn versions_come_from_the_jar_names() {
        let dir = std::env::temp_dir().join(scratch::unique_name("jars"));
        std::fs::create_dir_all(&dir).expect("dir");
        for name in [
            "connect-runtime-4.4.0.jar",
            "connect-runtime-extras-1.jar",
            "x.jar",
        ] {
            std::fs::write(dir.join(name), b"").expect("jar");
        }
        assert_eq!(
            jar_version(&dir, "connect-runtime").expect("found"),
            "4.4.0"
        );
        assert!(jar_version(&dir, "debezium-connector-jdbc").is_err());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
