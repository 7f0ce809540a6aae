//! Scratch environments: private topics, PostgreSQL database and ClickHouse
//! database on the real services, so that tests and measurements never see
//! each other's data. Service addresses come from the same environment
//! variables the binaries read, with the local defaults.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::config::ConnectionArgs;
use stream_actors::kafka::{Brokers, KafkaSecurityArgs};
use stream_actors::PipelineConfig;

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Kafka brokers under test: the plaintext loopback listener.
pub fn brokers() -> Brokers {
    Brokers::plaintext(env_or("KAFKA_BROKERS", "127.0.0.1:9092"))
}

/// The workspace's root, where `scripts/services.sh` keeps `.services/`.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bins/ has a parent")
        .to_path_buf()
}

/// The local broker's SASL_SSL listener (`KAFKA_SASL_SSL_BROKERS`, default
/// 127.0.0.1:9094), as `user` (admin, processor or loadgen): TLS against the
/// test CA of `scripts/services.sh`, SCRAM-SHA-512 with the password that
/// script generated for the user (read from its file).
pub fn secured_brokers(user: &str) -> Brokers {
    let services = workspace_root().join(".services");
    secured_brokers_with(
        user,
        services.join(format!("kafka/users/{user}.password")),
        Some(services.join("tls/ca.pem")),
    )
}

/// [`secured_brokers`] with another password file and CA (`None`: the
/// system's trust store), for the tests of what is refused.
pub fn secured_brokers_with(
    user: &str,
    password_file: std::path::PathBuf,
    ca: Option<std::path::PathBuf>,
) -> Brokers {
    use stream_actors::kafka::{SaslMechanism, SecurityProtocol};
    KafkaSecurityArgs {
        protocol: SecurityProtocol::SaslSsl,
        sasl_mechanism: Some(SaslMechanism::ScramSha512),
        sasl_username: Some(user.to_string()),
        sasl_password_file: Some(password_file),
        ssl_ca_location: ca,
        ssl_endpoint_identification: "https".to_string(),
        ..KafkaSecurityArgs::default()
    }
    .resolve(&env_or("KAFKA_SASL_SSL_BROKERS", "127.0.0.1:9094"))
    .expect("the SASL_SSL settings of scripts/services.sh (run `scripts/services.sh up`)")
}

/// A PostgreSQL URL for the server's maintenance database.
pub fn postgres_admin_url() -> String {
    env_or(
        "POSTGRES_ADMIN_URL",
        "postgres://postgres:postgres@127.0.0.1:5432/postgres",
    )
}

/// ClickHouse under test.
pub fn clickhouse_url() -> String {
    env_or("CLICKHOUSE_URL", "http://127.0.0.1:8123")
}

/// A name no other test (or earlier run) uses.
pub fn unique_name(prefix: &str) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        millis % 100_000_000,
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates topics (name, partitions) with `streamctl topics ensure`'s
/// code, which waits until every partition has a leader.
pub async fn create_topics(topics: &[(&str, i32)]) {
    let specs: Vec<crate::topics::TopicSpec> = topics
        .iter()
        .map(|(name, partitions)| crate::topics::TopicSpec {
            name: name.to_string(),
            partitions: *partitions,
        })
        .collect();
    crate::topics::ensure(&brokers(), &specs, 1, false, Duration::from_secs(30))
        .await
        .unwrap_or_else(|error| panic!("create topics {topics:?}: {error:#}"));
}

/// Creates a topic and waits until every partition has a leader.
pub async fn create_topic(name: &str, partitions: i32) {
    create_topics(&[(name, partitions)]).await;
}

/// Sends the pipeline's `tracing` output through the test harness, so a
/// failing test shows what its actors logged (`RUST_LOG` sets the level).
pub fn init_test_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rdkafka=warn,tokio_postgres=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Polls `condition` every 100 ms until it holds; panics after `deadline`.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a PostgreSQL database; returns its URL.
pub async fn create_postgres_database(name: &str) -> String {
    let admin = stream_actors::storage::connect_postgres(&postgres_admin_url())
        .await
        .expect("postgres admin connection");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create postgres database");
    postgres_admin_url()
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{name}"))
        .unwrap()
}

/// One test's private corner of the services.
pub struct TestEnv {
    /// The pipeline configuration pointing at this corner.
    pub config: PipelineConfig,
}

impl TestEnv {
    /// Creates topics (source with `partitions`, DLQ with 3), a PostgreSQL
    /// database and a ClickHouse database, all named after `prefix`.
    pub async fn new(prefix: &str, partitions: i32) -> TestEnv {
        let name = unique_name(prefix);
        let topic = format!("{name}_events");
        let dlq_topic = format!("{name}_events_dlq");
        create_topics(&[(&topic, partitions), (&dlq_topic, 3)]).await;
        TestEnv::with_topics(name, &brokers(), topic, dlq_topic).await
    }

    /// A PostgreSQL and a ClickHouse database named `name`, for topics that
    /// already exist on `brokers` (a mock cluster, say).
    pub async fn with_topics(
        name: String,
        brokers: &Brokers,
        topic: String,
        dlq_topic: String,
    ) -> TestEnv {
        init_test_tracing();
        let postgres_url = create_postgres_database(&name).await;

        let clickhouse = clickhouse::Client::default().with_url(clickhouse_url());
        clickhouse
            .query(&format!("CREATE DATABASE IF NOT EXISTS {name}"))
            .execute()
            .await
            .expect("create clickhouse database");

        let config = PipelineConfig {
            brokers: brokers.clone(),
            group_id: format!("{name}_group"),
            topic,
            dlq_topic,
            postgres_url,
            clickhouse_url: clickhouse_url(),
            clickhouse_database: name,
            ..PipelineConfig::local_defaults()
        };
        TestEnv { config }
    }

    /// The processor's flags for this corner (brokers and their security,
    /// group, topics, stores), for measurements that run the binary. A SASL
    /// password goes as its file (see [`KafkaSecurityArgs::of`]).
    pub fn processor_flags(&self) -> Vec<String> {
        let config = &self.config;
        let (mut flags, _) = KafkaSecurityArgs::of(&config.brokers.security);
        flags.extend(
            [
                ("--brokers", &config.brokers.servers),
                ("--group", &config.group_id),
                ("--topic", &config.topic),
                ("--dlq-topic", &config.dlq_topic),
                ("--postgres-url", &config.postgres_url),
                ("--clickhouse-url", &config.clickhouse_url),
                ("--clickhouse-database", &config.clickhouse_database),
            ]
            .into_iter()
            .flat_map(|(flag, value)| [flag.to_string(), value.clone()]),
        );
        if let Some(ca_file) = &config.clickhouse_ca_file {
            flags.extend([
                "--clickhouse-ca-file".to_string(),
                ca_file.to_string_lossy().into_owned(),
            ]);
        }
        flags
    }

    /// The same corner as connection flags, for the report and `streamctl`.
    pub fn connections(&self) -> ConnectionArgs {
        ConnectionArgs {
            brokers: self.config.brokers.servers.clone(),
            kafka_security: KafkaSecurityArgs::from_security(&self.config.brokers.security),
            group: self.config.group_id.clone(),
            topic: self.config.topic.clone(),
            dlq_topic: self.config.dlq_topic.clone(),
            postgres_url: self.config.postgres_url.clone(),
            clickhouse_url: self.config.clickhouse_url.clone(),
            clickhouse_database: self.config.clickhouse_database.clone(),
            clickhouse_ca_file: self.config.clickhouse_ca_file.clone(),
            clickhouse_user: None,
            clickhouse_password: None,
        }
    }

    /// Sends `count` records with loadgen's producers; returns the ledger.
    pub async fn produce(&self, count: u64, poison_rate: f64, seed: u64) -> loadgen::Ledger {
        loadgen::run(&loadgen::LoadgenConfig {
            brokers: self.config.brokers.clone(),
            topic: self.config.topic.clone(),
            count,
            rate: 0,
            poison_rate,
            seed,
            producers: 2,
            progress: false,
            format: loadgen::ValueFormat::Json,
        })
        .await
        .expect("loadgen run")
    }

    /// Starts loadgen's producers in the background at `rate` events/s (0:
    /// as fast as they go); the task's output is the ledger.
    pub fn produce_in_background(
        &self,
        count: u64,
        rate: u64,
        poison_rate: f64,
        seed: u64,
    ) -> tokio::task::JoinHandle<loadgen::Ledger> {
        let config = loadgen::LoadgenConfig {
            brokers: self.config.brokers.clone(),
            topic: self.config.topic.clone(),
            count,
            rate,
            poison_rate,
            seed,
            producers: 2,
            progress: false,
            format: loadgen::ValueFormat::Json,
        };
        tokio::spawn(async move { loadgen::run(&config).await.expect("loadgen run") })
    }

    /// Waits until the persisted checkpoint reaches the end of every partition.
    pub async fn wait_for_catch_up(&self, deadline: Duration) {
        let connections = self.connections();
        wait_until("checkpoint to reach the end offsets", deadline, || {
            let connections = connections.clone();
            // A service that does not answer (a broker restarting, say) is
            // "not yet"; the deadline bounds the wait.
            async move {
                let Ok(ends) =
                    crate::inspect::end_offsets_async(&self.config.brokers, &connections.topic)
                        .await
                else {
                    return false;
                };
                let Ok(checkpoint) = crate::inspect::checkpoint_offsets(
                    &connections.postgres_url,
                    &connections.group,
                    &connections.topic,
                )
                .await
                else {
                    return false;
                };
                crate::report::lag(&ends, &checkpoint) == 0
            }
        })
        .await;
    }
}

pub use crate::http::{http_get, http_request};
pub use crate::prometheus::url_encode;

/// A processor's admin endpoint for a test or a measurement: a free
/// loopback address and a fresh admin token in a file of its own (mode
/// 0600, removed on drop).
pub struct AdminAccess {
    /// `host:port` for `--metrics-addr`.
    pub address: String,
    /// The file for `--admin-token-file`.
    pub token_file: std::path::PathBuf,
    token: String,
}

impl AdminAccess {
    /// A free port and a new random token.
    pub fn new() -> AdminAccess {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let token = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let token_file = std::env::temp_dir().join(format!("{}.token", unique_name("admin")));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&token_file)
            .expect("admin token file");
        writeln!(file, "{token}").expect("admin token written");
        AdminAccess {
            address: format!("127.0.0.1:{}", free_port()),
            token_file,
            token,
        }
    }

    /// The processor's flags for this endpoint.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--metrics-addr".to_string(),
            self.address.clone(),
            "--admin-token-file".to_string(),
            self.token_file.display().to_string(),
        ]
    }

    /// `POST path` with the token (a kill, a panic, a hang).
    pub fn post(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_request(&self.address, "POST", path, Some(&self.token))
    }
}

impl Default for AdminAccess {
    fn default() -> Self {
        AdminAccess::new()
    }
}

impl Drop for AdminAccess {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.token_file);
    }
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("free port")
}

/// Runs a binary to its end (stdout and stderr captured) with `environment`
/// on top of this process's (no `KAFKA_BROKERS`; `RUST_LOG=error` unless
/// given); kills it and fails if it runs past `deadline`.
pub fn run_binary<S: AsRef<std::ffi::OsStr>>(
    binary: &str,
    arguments: &[S],
    environment: &[(&str, &str)],
    deadline: Duration,
) -> std::process::Output {
    let mut child = std::process::Command::new(binary)
        .args(arguments)
        .env_remove("KAFKA_BROKERS")
        .env("RUST_LOG", "error")
        .envs(environment.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn binary");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > deadline {
            child.kill().ok();
            let output = child.wait_with_output().expect("output");
            let shown: Vec<_> = arguments.iter().map(|argument| argument.as_ref()).collect();
            panic!(
                "{binary} {shown:?} still running after {deadline:?}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
