//! The tests' harness is the library's scratch environments.

#![allow(unused_imports, dead_code)]

pub use stream_bins::scratch::*;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Polls `condition` every 200 ms for at most `deadline`; whether it held.
pub async fn within(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// A metric from the `/metrics` of `address`, summed over the series whose
/// labels contain `label` ("" for all); None when no series is there.
pub fn scrape(address: &str, name: &str, label: &str) -> Option<f64> {
    let (_, body) = http_get(address, "/metrics").ok()?;
    let mut total = None;
    for line in body.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if series.split('{').next() == Some(name) && series.contains(label) {
            *total.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    total
}

/// A child process killed when the test ends, however it ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `processor` process on a scratch environment, with its admin endpoint
/// on a free port and its log in a temporary file.
pub struct ProcessorProcess {
    pub child: Child,
    /// The admin endpoint's address.
    pub admin: String,
    /// The admin endpoint with its token (`--admin-token-file`).
    pub access: AdminAccess,
    pub log: std::path::PathBuf,
}

impl ProcessorProcess {
    /// Starts the processor binary on `env`, with extra environment variables.
    pub fn start(env: &TestEnv, extra: &[(&str, &str)]) -> ProcessorProcess {
        ProcessorProcess::spawn(env, extra, true)
    }

    /// [`ProcessorProcess::start`] with no admin token: its kill routes
    /// are disabled.
    pub fn start_without_admin_token(env: &TestEnv, extra: &[(&str, &str)]) -> ProcessorProcess {
        ProcessorProcess::spawn(env, extra, false)
    }

    fn spawn(env: &TestEnv, extra: &[(&str, &str)], with_token: bool) -> ProcessorProcess {
        let access = AdminAccess::new();
        let admin = access.address.clone();
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("processor")));
        let log_file = std::fs::File::create(&log).expect("log file");
        let config = &env.config;
        let mut command = Command::new(env!("CARGO_BIN_EXE_processor"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,rdkafka=warn")
            .env("KAFKA_BROKERS", &config.brokers.servers)
            .env("KAFKA_GROUP", &config.group_id)
            .env("KAFKA_TOPIC", &config.topic)
            .env("KAFKA_DLQ_TOPIC", &config.dlq_topic)
            .env("POSTGRES_URL", &config.postgres_url)
            .env("CLICKHOUSE_URL", &config.clickhouse_url)
            .env("CLICKHOUSE_DATABASE", &config.clickhouse_database)
            .env("METRICS_ADDR", &admin)
            .env("ADMIN_TOKEN_FILE", &access.token_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        if !with_token {
            command.env_remove("ADMIN_TOKEN_FILE");
        }
        if let Some(ca_file) = &config.clickhouse_ca_file {
            command.env("CLICKHOUSE_CA_FILE", ca_file);
        }
        let (security_flags, security_environment) =
            stream_actors::kafka::KafkaSecurityArgs::of(&config.brokers.security);
        command.args(security_flags).envs(security_environment);
        for (name, value) in extra {
            command.env(name, value);
        }
        let child = command.spawn().expect("processor starts");
        ProcessorProcess {
            child,
            admin,
            access,
            log,
        }
    }

    /// `streamctl` arguments that reach this processor's admin endpoint
    /// with its token.
    pub fn admin_args(&self) -> [String; 4] {
        [
            "--admin".to_string(),
            self.admin.clone(),
            "--admin-token-file".to_string(),
            self.access.token_file.display().to_string(),
        ]
    }

    /// Polls `/readyz` until it answers 200 (panics after `deadline`, or if
    /// the process exits first).
    pub fn wait_ready(&mut self, deadline: Duration) {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "processor exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            if matches!(http_get(&self.admin, "/readyz"), Ok((200, _))) {
                return;
            }
            assert!(
                started.elapsed() < deadline,
                "processor not ready after {deadline:?}:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A counter or gauge from `/metrics`, summed over its labels.
    pub fn metric(&self, name: &str) -> Option<f64> {
        scrape(&self.admin, name, "")
    }

    /// A counter or gauge from `/metrics`, summed over the series whose
    /// labels contain `label` (e.g. `store="postgres"`).
    pub fn metric_where(&self, name: &str, label: &str) -> Option<f64> {
        scrape(&self.admin, name, label)
    }

    /// SIGKILL: no drain, no last checkpoint.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (bounded) for the exit code.
    pub fn terminate(&mut self, deadline: Duration) -> Option<i32> {
        sigterm(self.child.id());
        self.wait_exit(deadline)
    }

    /// Waits (bounded) for the process to exit; its code (None: a signal).
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<i32> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                started.elapsed() < deadline,
                "processor did not exit within {deadline:?}:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for ProcessorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends SIGTERM with the `kill` command (no libc dependency).
fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// Reconciles the environment's topic with the stores and the DLQ.
pub async fn audit(env: &TestEnv) -> stream_bins::audit::Audit {
    stream_bins::audit::audit(&env.connections())
        .await
        .expect("audit runs")
}

/// The audit is clean and accounts for exactly what loadgen sent: every
/// valid event stored once, every poison record dead-lettered once.
pub fn assert_clean(audit: &stream_bins::audit::Audit, ledger: &loadgen::Ledger) {
    assert!(audit.clean(), "{}", audit.render());
    assert_eq!(audit.total.records, ledger.sent, "{}", audit.render());
    assert_eq!(audit.total.stored, ledger.valid, "{}", audit.render());
    assert_eq!(
        audit.total.dead_lettered,
        ledger.poison,
        "{}",
        audit.render()
    );
}

/// Stops a local service for an outage test and starts it again when
/// dropped, even when the test fails half-way.
pub struct Outage {
    service: &'static str,
    restored: bool,
}

const SERVICES_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services.sh");

impl Outage {
    /// `scripts/services.sh stop <service>`.
    pub fn begin(service: &'static str) -> Outage {
        let stopped = Command::new("bash")
            .args([SERVICES_SH, "stop", service])
            .status()
            .expect("services.sh stop");
        assert!(stopped.success(), "services.sh stop {service} failed");
        Outage {
            service,
            restored: false,
        }
    }

    /// `scripts/services.sh start <service>`: the service is back and healthy.
    pub fn end(&mut self) {
        start_service(self.service);
        self.restored = true;
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if !self.restored {
            let _ = Command::new("bash")
                .args([SERVICES_SH, "start", self.service])
                .status();
        }
    }
}

/// `scripts/services.sh start <service>`: starts it (nothing is installed,
/// nothing is built) and waits until it is healthy.
pub fn start_service(service: &str) {
    let started = Command::new("bash")
        .args([SERVICES_SH, "start", service])
        .status()
        .expect("services.sh start");
    assert!(started.success(), "services.sh start {service} failed");
}

/// A hung server: `scripts/services.sh freeze <service>` (SIGSTOP; its
/// connections stay open and nothing answers). Thawed when dropped, even
/// when the test fails half-way.
pub struct Frozen {
    service: &'static str,
    thawed: bool,
}

impl Frozen {
    /// Freezes `postgres`, `clickhouse` or `kafka`.
    pub fn freeze(service: &'static str) -> Frozen {
        let frozen = Command::new("bash")
            .args([SERVICES_SH, "freeze", service])
            .status()
            .expect("services.sh freeze");
        assert!(frozen.success(), "services.sh freeze {service} failed");
        Frozen {
            service,
            thawed: false,
        }
    }

    /// Resumes it.
    pub fn thaw(&mut self) {
        let thawed = Command::new("bash")
            .args([SERVICES_SH, "thaw", self.service])
            .status()
            .expect("services.sh thaw");
        assert!(thawed.success(), "services.sh thaw {} failed", self.service);
        self.thawed = true;
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed {
            let _ = Command::new("bash")
                .args([SERVICES_SH, "thaw", self.service])
                .status();
        }
    }
}

/// The local Kafka broker SIGKILLed (`scripts/services.sh kill kafka`): a
/// crash, with no controlled shutdown. Dropping it starts the broker again,
/// even when the test fails half-way.
pub struct BrokerCrash {
    restarted: bool,
}

impl BrokerCrash {
    /// SIGKILLs the broker and waits until the process is gone.
    pub fn sigkill() -> BrokerCrash {
        let killed = Command::new("bash")
            .args([SERVICES_SH, "kill", "kafka"])
            .status()
            .expect("services.sh kill kafka");
        assert!(killed.success(), "services.sh kill kafka failed");
        BrokerCrash { restarted: false }
    }

    /// Starts the broker again from its log on disk and waits until it serves.
    pub fn restart(&mut self) {
        start_service("kafka");
        self.restarted = true;
    }
}

impl Drop for BrokerCrash {
    fn drop(&mut self) {
        if !self.restarted {
            let _ = Command::new("bash")
                .args([SERVICES_SH, "start", "kafka"])
                .status();
        }
    }
}

/// Runs the pipeline in this process on `env`, accepting these schema
/// versions, until it caught up with the topic; then stops it.
pub async fn run_until_caught_up(env: &TestEnv, accepted_schema_versions: Vec<u32>) {
    let mut config = env.config.clone();
    config.accepted_schema_versions = accepted_schema_versions;
    let pipeline = stream_supervisor::start_pipeline(config)
        .await
        .expect("pipeline starts");
    env.wait_for_catch_up(Duration::from_secs(120)).await;
    assert_eq!(
        pipeline.shutdown().await,
        stream_supervisor::PipelineExit::Stopped
    );
}

/// The dead letters of one error type.
pub fn by_type(error_type: &str) -> stream_bins::dlq::DlqFilter {
    stream_bins::dlq::DlqFilter {
        error_type: Some(error_type.to_string()),
        ..stream_bins::dlq::DlqFilter::default()
    }
}
