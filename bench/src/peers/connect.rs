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
use stream_bins::lag::LagReader;
use stream_bins::scratch;

use super::{Expected, PeerRun};

/// The connector's name; its consumer group is `connect-<name>`.
const CONNECTOR: &str = "bench-jdbc-sink";
/// Its table, in a database of its own.
const TABLE: &str = "connect_events";

/// The table, made before the connector starts: the envelope's fields, and
/// `stored_at` for the bench's span (the connector leaves it to its default).
const TABLE_DDL: &str = "CREATE TABLE connect_events (
    event_id TEXT PRIMARY KEY, event_type TEXT NOT NULL, user_id TEXT NOT NULL,
    amount DOUBLE PRECISION NOT NULL, ts BIGINT NOT NULL, schema_version INTEGER NOT NULL,
    stored_at TIMESTAMPTZ NOT NULL DEFAULT now())";

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

/// `host`, `port`, `user`, `password` and `dbname` of a PostgreSQL URL, as
/// a JDBC URL and its credentials.
fn jdbc_settings(postgres_url: &str) -> anyhow::Result<(String, String, String)> {
    let config: tokio_postgres::Config = postgres_url.parse()?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => anyhow::bail!("the bench's PostgreSQL URL has no TCP host"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config.get_dbname().context("no database in the URL")?;
    let user = config.get_user().unwrap_or("postgres").to_string();
    let password = config
        .get_password()
        .map(|password| String::from_utf8_lossy(password).into_owned())
        .unwrap_or_default();
    Ok((
        format!("jdbc:postgresql://{host}:{port}/{database}"),
        user,
        password,
    ))
}

/// Runs the connector on `topic` (the envelope form) until its group has
/// committed the end of every partition, or it stalls: with its defaults, or
/// with `batch_size` records per poll and per write (the pipeline's batch).
pub async fn run(
    install: &Install,
    brokers: &Brokers,
    topic: &str,
    batch_size: Option<u32>,
    expected: &Expected,
    out: &Path,
) -> anyhow::Result<PeerRun> {
    let name = scratch::unique_name("bench_connect");
    let dlq_topic = format!("{name}_dlq");
    scratch::create_topic(&dlq_topic, 1).await;
    let postgres_url = scratch::create_postgres_database(&name).await;
    stream_actors::storage::connect_postgres(&postgres_url)
        .await?
        .batch_execute(TABLE_DDL)
        .await
        .context("create the connector's table")?;
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

    let mut command = Command::new("java");
    command
        .args(JVM_OPTIONS)
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            scratch::workspace_root()
                .join("bench/connect/log4j2.properties")
                .display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", install.runtime.display()))
        .arg("org.apache.kafka.connect.cli.ConnectStandalone")
        .arg(&worker)
        .arg(&connector_file);
    let log = work.join("worker.log");
    eprintln!(
        "bench: peers: Kafka Connect ({}), {tasks} tasks, log {}",
        install.versions,
        log.display()
    );
    let (mut child, monitor) = super::spawn_monitored(command, &log)?;
    let group = format!("connect-{connector}");
    let reader = LagReader::new(brokers, &group, topic, None)?;
    let outcome = super::wait_drained(
        "Kafka Connect",
        &mut child,
        &monitor,
        reader,
        super::Position::Committed,
    )
    .await;
    let samples = monitor.finish(child.id());
    let stopped = crate::memory::terminate(&mut child);
    let remark = outcome?.unwrap_or_default();
    // A worker that needs a kill to stop is worth saying, not a failure.
    // The JVM ends with 143 (128 + SIGTERM) after its shutdown hooks ran.
    let remark = match stopped {
        Ok(status) if status.success() || status.code() == Some(143) => remark,
        Ok(status) => format!("{remark} exited with {status} on SIGTERM")
            .trim()
            .to_string(),
        Err(error) => format!("{remark} {error}").trim().to_string(),
    };
    let dead_letters = super::records_in(brokers, &dlq_topic).await?;
    let settings = match batch_size {
        None => "the connector's defaults (batch.size 500)".to_string(),
        Some(size) => format!("batch.size and max.poll.records {size}"),
    };
    super::measure(
        format!("{}, {settings}", install.versions),
        &format!("PostgreSQL, upsert by event_id, {tasks} tasks"),
        &postgres_url,
        TABLE,
        None,
        &samples,
        expected,
        dead_letters,
        remark,
    )
    .await
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
