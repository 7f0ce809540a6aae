//! How every Kafka client of ours reaches the brokers: the bootstrap servers
//! and the security settings (TLS, SASL), in one place.
//!
//! [`Brokers`] is what the pipeline, `loadgen`, `streamctl`, the bench and
//! the tests pass around instead of a bare `host:port` list; each client
//! starts from [`Brokers::client_config`], so a security setting reaches
//! every client or none. [`KafkaSecurityArgs`] are the flags (with
//! environment fallbacks) that the binaries share; they name librdkafka's
//! own settings (`security.protocol`, `sasl.mechanism`, `ssl.ca.location`,
//! ...). [`check_access`] is the start-up probe: it turns librdkafka's
//! asynchronous authentication, TLS and authorization failures into one
//! error that names the setting to fix.
//!
//! librdkafka is built with OpenSSL (rdkafka's `ssl` feature), which brings
//! TLS and the SASL mechanisms PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512.
//! Kerberos (GSSAPI, rdkafka's `gssapi`/`sasl` features, Cyrus SASL) is not
//! built in.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::TopicPartitionList;

use crate::error::PipelineError;

/// `security.protocol`: how a client talks to the brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SecurityProtocol {
    /// No TLS, no authentication (a loopback development broker).
    #[default]
    #[value(name = "plaintext")]
    Plaintext,
    /// TLS, no SASL (optionally a client certificate).
    #[value(name = "ssl")]
    Ssl,
    /// SASL without TLS: the password crosses the network in the clear
    /// with PLAIN; SCRAM does not send it, but the data is not encrypted.
    #[value(name = "sasl_plaintext")]
    SaslPlaintext,
    /// SASL over TLS: what a production broker asks for.
    #[value(name = "sasl_ssl")]
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's name.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    /// Whether the connection is TLS.
    pub fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    /// Whether the client authenticates with SASL.
    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SaslMechanism {
    /// SCRAM with SHA-512: the password never crosses the wire.
    #[default]
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
    /// SCRAM with SHA-256.
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    /// The password itself, protected only by TLS.
    #[value(name = "PLAIN")]
    Plain,
}

impl SaslMechanism {
    /// librdkafka's (and Kafka's) name.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::Plain => "PLAIN",
        }
    }
}

/// A secret: its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Secret, Self::Err> {
        Ok(Secret::new(value))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("\"***\"")
    }
}

/// SASL credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslCredentials {
    /// The mechanism.
    pub mechanism: SaslMechanism,
    /// The user (the principal is `User:<username>`).
    pub username: String,
    /// The password.
    pub password: Secret,
    /// The file it was read from, if any: passed on to a child process
    /// instead of the password itself.
    pub password_file: Option<PathBuf>,
}

/// The security settings of every client.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KafkaSecurity {
    /// `security.protocol`.
    pub protocol: SecurityProtocol,
    /// SASL credentials, with a `sasl_*` protocol.
    pub sasl: Option<SaslCredentials>,
    /// `ssl.ca.location`: the CA certificates (PEM) that the brokers'
    /// certificates must chain to; `None`: the system's trust store.
    pub ssl_ca_location: Option<PathBuf>,
    /// `ssl.certificate.location` and `ssl.key.location`: a client
    /// certificate and its key (PEM), for brokers that ask for one.
    pub ssl_client_certificate: Option<(PathBuf, PathBuf)>,
    /// `ssl.endpoint.identification.algorithm`: whether the broker's
    /// certificate must name the host the client connected to.
    pub verify_hostname: bool,
}

impl KafkaSecurity {
    /// No TLS, no SASL.
    pub fn plaintext() -> KafkaSecurity {
        KafkaSecurity {
            verify_hostname: true,
            ..KafkaSecurity::default()
        }
    }

    /// Sets these settings on a librdkafka configuration.
    pub fn apply(&self, config: &mut ClientConfig) {
        config.set("security.protocol", self.protocol.as_str());
        if let Some(sasl) = &self.sasl {
            config
                .set("sasl.mechanism", sasl.mechanism.as_str())
                .set("sasl.username", &sasl.username)
                .set("sasl.password", sasl.password.expose());
        }
        if self.protocol.uses_tls() {
            if let Some(ca) = &self.ssl_ca_location {
                config.set("ssl.ca.location", ca.to_string_lossy());
            }
            if let Some((certificate, key)) = &self.ssl_client_certificate {
                config
                    .set("ssl.certificate.location", certificate.to_string_lossy())
                    .set("ssl.key.location", key.to_string_lossy());
            }
            config.set(
                "ssl.endpoint.identification.algorithm",
                if self.verify_hostname {
                    "https"
                } else {
                    "none"
                },
            );
        }
    }

    /// `User:<name>` as the broker's authorizer sees it, when SASL names it.
    pub fn principal(&self) -> Option<String> {
        self.sasl
            .as_ref()
            .map(|sasl| format!("User:{}", sasl.username))
    }
}

/// The Kafka cluster and how to reach it. `Display` shows the bootstrap
/// servers, `Debug` the protocol and user too; neither shows a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brokers {
    /// `bootstrap.servers`: `host:port[,host:port]`.
    pub servers: String,
    /// TLS and SASL.
    pub security: KafkaSecurity,
}

impl Brokers {
    /// Brokers reached without TLS or SASL (the local development broker).
    pub fn plaintext(servers: impl Into<String>) -> Brokers {
        Brokers {
            servers: servers.into(),
            security: KafkaSecurity::plaintext(),
        }
    }

    /// A librdkafka configuration with the bootstrap servers and the
    /// security settings: where every client of ours starts.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.servers);
        self.security.apply(&mut config);
        config
    }
}

impl fmt::Display for Brokers {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.servers)
    }
}

/// A security setting that cannot work, named as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting {flag} ({env}): {reason}")]
pub struct SettingError {
    /// The flag, e.g. `--kafka-ssl-ca-location`.
    pub flag: &'static str,
    /// The environment variable, e.g. `KAFKA_SSL_CA_LOCATION`.
    pub env: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn setting_error(flag: &'static str, env: &'static str, reason: impl Into<String>) -> SettingError {
    SettingError {
        flag,
        env,
        reason: reason.into(),
    }
}

/// The Kafka security flags every binary shares (librdkafka's settings,
/// with environment fallbacks). The default is a plaintext connection.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KafkaSecurityArgs {
    /// How to talk to the brokers (librdkafka's security.protocol): plaintext,
    /// ssl (TLS), sasl_plaintext, or sasl_ssl (SASL over TLS).
    #[arg(
        long = "kafka-security-protocol",
        env = "KAFKA_SECURITY_PROTOCOL",
        value_enum,
        ignore_case = true,
        default_value = "plaintext"
    )]
    pub protocol: SecurityProtocol,
    /// SASL mechanism, with a sasl_* protocol: SCRAM-SHA-512 (default),
    /// SCRAM-SHA-256 or PLAIN.
    #[arg(
        long = "kafka-sasl-mechanism",
        env = "KAFKA_SASL_MECHANISM",
        value_enum,
        ignore_case = true
    )]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name (the broker's principal User:<name>).
    #[arg(long = "kafka-sasl-username", env = "KAFKA_SASL_USERNAME")]
    pub sasl_username: Option<String>,
    /// File holding the SASL password (a mounted Secret; one trailing
    /// newline is ignored).
    #[arg(
        long = "kafka-sasl-password-file",
        env = "KAFKA_SASL_PASSWORD_FILE",
        conflicts_with = "sasl_password"
    )]
    pub sasl_password_file: Option<PathBuf>,
    /// SASL password. Prefer --kafka-sasl-password-file: a flag's value is
    /// visible to every user of the machine in the process list. Never printed.
    #[arg(
        long = "kafka-sasl-password",
        env = "KAFKA_SASL_PASSWORD",
        hide_env_values = true
    )]
    pub sasl_password: Option<Secret>,
    /// CA certificates (PEM) the brokers' certificates must chain to, with
    /// ssl or sasl_ssl (default: the system's trust store).
    #[arg(long = "kafka-ssl-ca-location", env = "KAFKA_SSL_CA_LOCATION")]
    pub ssl_ca_location: Option<PathBuf>,
    /// Client certificate (PEM), for brokers that require one (mutual TLS).
    #[arg(
        long = "kafka-ssl-certificate-location",
        env = "KAFKA_SSL_CERTIFICATE_LOCATION",
        requires = "ssl_key_location"
    )]
    pub ssl_certificate_location: Option<PathBuf>,
    /// The client certificate's private key (PEM, unencrypted).
    #[arg(
        long = "kafka-ssl-key-location",
        env = "KAFKA_SSL_KEY_LOCATION",
        requires = "ssl_certificate_location"
    )]
    pub ssl_key_location: Option<PathBuf>,
    /// Whether the broker's certificate must name the host connected to
    /// (librdkafka's ssl.endpoint.identification.algorithm): https or none.
    #[arg(
        long = "kafka-ssl-endpoint-identification",
        env = "KAFKA_SSL_ENDPOINT_IDENTIFICATION",
        default_value = "https",
        value_parser = ["https", "none"]
    )]
    pub ssl_endpoint_identification: String,
}

impl KafkaSecurityArgs {
    /// The flags that give these settings, for a child process. The password
    /// goes as its file when it came from one; otherwise it goes in the
    /// returned environment (`KAFKA_SASL_PASSWORD`), never as a flag.
    pub fn of(security: &KafkaSecurity) -> (Vec<String>, Vec<(String, String)>) {
        let mut flags = vec![
            "--kafka-security-protocol".to_string(),
            security.protocol.as_str().to_string(),
        ];
        let mut environment = Vec::new();
        if let Some(sasl) = &security.sasl {
            flags.extend([
                "--kafka-sasl-mechanism".to_string(),
                sasl.mechanism.as_str().to_string(),
                "--kafka-sasl-username".to_string(),
                sasl.username.clone(),
            ]);
            match &sasl.password_file {
                Some(file) => flags.extend([
                    "--kafka-sasl-password-file".to_string(),
                    file.to_string_lossy().into_owned(),
                ]),
                None => environment.push((
                    "KAFKA_SASL_PASSWORD".to_string(),
                    sasl.password.expose().to_string(),
                )),
            }
        }
        if let Some(ca) = &security.ssl_ca_location {
            flags.extend([
                "--kafka-ssl-ca-location".to_string(),
                ca.to_string_lossy().into_owned(),
            ]);
        }
        if let Some((certificate, key)) = &security.ssl_client_certificate {
            flags.extend([
                "--kafka-ssl-certificate-location".to_string(),
                certificate.to_string_lossy().into_owned(),
                "--kafka-ssl-key-location".to_string(),
                key.to_string_lossy().into_owned(),
            ]);
        }
        if !security.verify_hostname {
            flags.extend([
                "--kafka-ssl-endpoint-identification".to_string(),
                "none".to_string(),
            ]);
        }
        (flags, environment)
    }

    /// The same settings as arguments (the password kept in memory).
    pub fn from_security(security: &KafkaSecurity) -> KafkaSecurityArgs {
        KafkaSecurityArgs {
            protocol: security.protocol,
            sasl_mechanism: security.sasl.as_ref().map(|sasl| sasl.mechanism),
            sasl_username: security.sasl.as_ref().map(|sasl| sasl.username.clone()),
            sasl_password_file: security
                .sasl
                .as_ref()
                .and_then(|sasl| sasl.password_file.clone()),
            sasl_password: security.sasl.as_ref().map(|sasl| sasl.password.clone()),
            ssl_ca_location: security.ssl_ca_location.clone(),
            ssl_certificate_location: security
                .ssl_client_certificate
                .as_ref()
                .map(|(certificate, _)| certificate.clone()),
            ssl_key_location: security
                .ssl_client_certificate
                .as_ref()
                .map(|(_, key)| key.clone()),
            ssl_endpoint_identification: if security.verify_hostname {
                "https"
            } else {
                "none"
            }
            .to_string(),
        }
    }

    /// Checks the settings (files exist and hold what they should) and
    /// reads the password: a setting that cannot work fails here, at start.
    pub fn resolve(&self, servers: &str) -> Result<Brokers, SettingError> {
        let protocol = self.protocol;
        let sasl = if protocol.uses_sasl() {
            let username = self
                .sasl_username
                .as_deref()
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .ok_or_else(|| {
                    setting_error(
                        "--kafka-sasl-username",
                        "KAFKA_SASL_USERNAME",
                        format!(
                            "required with --kafka-security-protocol {}",
                            protocol.as_str()
                        ),
                    )
                })?;
            let password_file = self.sasl_password_file.clone();
            let password = match (&self.sasl_password_file, &self.sasl_password) {
                (Some(file), _) => read_password_file(file)?,
                (None, Some(password)) if !password.expose().is_empty() => password.clone(),
                _ => {
                    return Err(setting_error(
                        "--kafka-sasl-password-file",
                        "KAFKA_SASL_PASSWORD_FILE",
                        format!(
                            "a password is required with --kafka-security-protocol {} (or set KAFKA_SASL_PASSWORD)",
                            protocol.as_str()
                        ),
                    ))
                }
            };
            Some(SaslCredentials {
                mechanism: self.sasl_mechanism.unwrap_or_default(),
                username: username.to_string(),
                password,
                password_file,
            })
        } else {
            for (given, flag, env) in [
                (
                    self.sasl_mechanism.is_some(),
                    "--kafka-sasl-mechanism",
                    "KAFKA_SASL_MECHANISM",
                ),
                (
                    self.sasl_username.is_some(),
                    "--kafka-sasl-username",
                    "KAFKA_SASL_USERNAME",
                ),
                (
                    self.sasl_password_file.is_some() || self.sasl_password.is_some(),
                    "--kafka-sasl-password-file",
                    "KAFKA_SASL_PASSWORD_FILE",
                ),
            ] {
                if given {
                    return Err(setting_error(
                        flag,
                        env,
                        format!(
                            "SASL is not used with --kafka-security-protocol {}; set sasl_ssl (or sasl_plaintext) to authenticate",
                            protocol.as_str()
                        ),
                    ));
                }
            }
            None
        };
        let tls_files = [
            (
                &self.ssl_ca_location,
                "--kafka-ssl-ca-location",
                "KAFKA_SSL_CA_LOCATION",
                "CERTIFICATE",
            ),
            (
                &self.ssl_certificate_location,
                "--kafka-ssl-certificate-location",
                "KAFKA_SSL_CERTIFICATE_LOCATION",
                "CERTIFICATE",
            ),
            (
                &self.ssl_key_location,
                "--kafka-ssl-key-location",
                "KAFKA_SSL_KEY_LOCATION",
                "PRIVATE KEY",
            ),
        ];
        for (file, flag, env, pem_label) in tls_files {
            let Some(file) = file else { continue };
            if !protocol.uses_tls() {
                return Err(setting_error(
                    flag,
                    env,
                    format!(
                        "TLS is not used with --kafka-security-protocol {}; set ssl or sasl_ssl",
                        protocol.as_str()
                    ),
                ));
            }
            check_pem_file(file, pem_label).map_err(|reason| setting_error(flag, env, reason))?;
        }
        let ssl_client_certificate = self
            .ssl_certificate_location
            .clone()
            .zip(self.ssl_key_location.clone());
        Ok(Brokers {
            servers: servers.to_string(),
            security: KafkaSecurity {
                protocol,
                sasl,
                ssl_ca_location: self.ssl_ca_location.clone(),
                ssl_client_certificate,
                verify_hostname: self.ssl_endpoint_identification != "none",
            },
        })
    }
}

/// Reads a password file: one line, a trailing newline ignored.
fn read_password_file(file: &Path) -> Result<Secret, SettingError> {
    let invalid = |reason: String| {
        setting_error(
            "--kafka-sasl-password-file",
            "KAFKA_SASL_PASSWORD_FILE",
            reason,
        )
    };
    let text = std::fs::read_to_string(file)
        .map_err(|error| invalid(format!("cannot read {}: {error}", file.display())))?;
    let password = text
        .strip_suffix('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(invalid(format!("{} is empty", file.display())));
    }
    if password.contains('\n') {
        return Err(invalid(format!(
            "{} holds more than one line; it must hold the password alone",
            file.display()
        )));
    }
    Ok(Secret::new(password))
}

/// Checks that a file is readable PEM with the given kind of block, so that
/// a wrong path fails at start with its flag, not inside a TLS handshake.
fn check_pem_file(file: &Path, label: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(file)
        .map_err(|error| format!("cannot read {}: {error}", file.display()))?;
    let found = text.lines().any(|line| {
        line.starts_with("-----BEGIN ") && line.trim_end().ends_with(&format!("{label}-----"))
    });
    if found {
        Ok(())
    } else {
        Err(format!(
            "{} holds no PEM {label} (a \"-----BEGIN ...{label}-----\" block)",
            file.display()
        ))
    }
}

/// The errors librdkafka reported to the probe's client, the latest last
/// (at most [`ProbeErrors::KEPT`]): a refused password is followed by "all
/// brokers are down", which must not hide it.
#[derive(Default)]
struct ProbeErrors(Mutex<Vec<(RDKafkaErrorCode, String)>>);

impl ProbeErrors {
    const KEPT: usize = 32;
}

impl ClientContext for ProbeErrors {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, %reason, "librdkafka error during the start-up probe");
        if let Some(code) = error.rdkafka_error_code() {
            let mut errors = self.0.lock();
            if errors.len() == ProbeErrors::KEPT {
                errors.remove(0);
            }
            errors.push((code, reason.to_string()));
        }
    }

    // The probe's own error names the failure; librdkafka's log lines of the
    // same failure (several per attempt) would only bury it.
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        tracing::debug!(?level, %facility, %message, "librdkafka (start-up probe)");
    }
}

impl ConsumerContext for ProbeErrors {}

/// How long the processor's probe waits for the brokers.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks, before anything starts, that the brokers answer (waiting up to
/// `wait`), that the client authenticates and trusts them, and that each
/// topic exists and may be described. A failure is one error that names the
/// setting to fix: a refused password, an untrusted certificate, a missing
/// topic or one the principal may not use. Authentication and TLS failures
/// end the probe at once instead of at the deadline. With no topics, it
/// checks the connection alone.
pub fn check_access(
    brokers: &Brokers,
    topics: &[&str],
    wait: Duration,
) -> Result<(), PipelineError> {
    let probe: BaseConsumer<ProbeErrors> = brokers
        .client_config()
        .create_with_context(ProbeErrors::default())
        .map_err(PipelineError::kafka(format!(
            "create a client for {brokers}"
        )))?;
    let deadline = Instant::now() + wait;
    let wanted: Vec<Option<&str>> = if topics.is_empty() {
        vec![None]
    } else {
        topics.iter().map(|topic| Some(*topic)).collect()
    };
    for topic in wanted {
        let metadata = loop {
            let attempt = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_millis(500));
            match probe.fetch_metadata(topic, attempt) {
                Ok(metadata) => break metadata,
                Err(error) => {
                    let errors = serve_events(&probe);
                    if let Some(failure) = errors
                        .iter()
                        .find_map(|(code, reason)| security_failure(brokers, *code, reason))
                    {
                        return Err(failure);
                    }
                    if Instant::now() >= deadline {
                        // The latest error that says more than "all brokers
                        // are down".
                        let why = errors
                            .iter()
                            .rev()
                            .find(|(code, _)| *code != RDKafkaErrorCode::AllBrokersDown)
                            .or(errors.last())
                            .map(|(_, reason)| reason.clone())
                            .unwrap_or_else(|| error.to_string());
                        return Err(PipelineError::Config {
                            setting: "--brokers (KAFKA_BROKERS)",
                            reason: format!(
                                "kafka: no answer from {brokers} within {wait:?} (security protocol {}): {why}",
                                brokers.security.protocol.as_str()
                            ),
                        });
                    }
                }
            }
        };
        let Some(topic) = topic else { continue };
        let found = metadata.topics().iter().find(|found| found.name() == topic);
        let principal = principal_of(brokers);
        match found.map(|found| (found.error(), found.partitions().is_empty())) {
            Some((None, false)) => {}
            Some((Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED), _)) => {
                return Err(PipelineError::Config {
                    setting: "--topic/--dlq-topic",
                    reason: format!(
                        "{principal} may not use topic {topic} on {brokers} (TOPIC_AUTHORIZATION_FAILED); an ACL must allow it, or the topic is the wrong one"
                    ),
                })
            }
            _ => {
                return Err(PipelineError::Config {
                    setting: "--topic/--dlq-topic",
                    reason: format!(
                        "topic {topic} does not exist on {brokers}; create it first (streamctl topics ensure)"
                    ),
                })
            }
        }
    }
    Ok(())
}

/// The principal the brokers see: `User:<sasl user>`, or `User:ANONYMOUS`
/// without SASL (a client certificate's name is the broker's to derive).
fn principal_of(brokers: &Brokers) -> String {
    brokers
        .security
        .principal()
        .unwrap_or_else(|| "User:ANONYMOUS".to_string())
}

/// Checks, before anything starts, that the principal may use the consumer
/// group: it reads the group's committed offsets of `topic` (Describe on
/// the group), which a broker with ACLs refuses at once to a principal
/// without them. Only that refusal fails; any other error is left to the
/// consumer, which retries on its own.
pub fn check_group(
    brokers: &Brokers,
    group: &str,
    topic: &str,
    wait: Duration,
) -> Result<(), PipelineError> {
    let probe: BaseConsumer<ProbeErrors> = brokers
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create_with_context(ProbeErrors::default())
        .map_err(PipelineError::kafka(format!(
            "create a client for {brokers}"
        )))?;
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition(topic, 0);
    let refused = |code: RDKafkaErrorCode| code == RDKafkaErrorCode::GroupAuthorizationFailed;
    let deadline = Instant::now() + wait;
    loop {
        let attempt = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), Duration::from_millis(500));
        let error = match probe.committed_offsets(partitions.clone(), attempt) {
            Ok(_) => return Ok(()),
            Err(error) => error,
        };
        // librdkafka retries a refused coordinator look-up until the
        // request times out; the refusal itself comes as an error event.
        let refused_now = error.rdkafka_error_code().is_some_and(refused)
            || serve_events(&probe).iter().any(|(code, _)| refused(*code));
        if refused_now {
            return Err(PipelineError::Config {
                setting: "--group (KAFKA_GROUP)",
                reason: format!(
                    "{} may not use consumer group {group} on {brokers} (GROUP_AUTHORIZATION_FAILED); an ACL must allow Read on it, or the group is the wrong one",
                    principal_of(brokers)
                ),
            });
        }
        if Instant::now() >= deadline {
            tracing::warn!(%error, %group, "cannot read the group's committed offsets at start; the consumer will retry");
            return Ok(());
        }
    }
}

/// Serves a probe's events for a moment (log lines and errors, one per
/// poll), so that its context records why a request failed; the errors so far.
fn serve_events(probe: &BaseConsumer<ProbeErrors>) -> Vec<(RDKafkaErrorCode, String)> {
    let serve_until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < serve_until {
        let _ = probe.poll(Duration::from_millis(20));
    }
    probe.context().0.lock().clone()
}

/// A librdkafka error that a setting of ours causes, as one clear error
/// naming that setting; `None` for anything else (a broker that is down).
fn security_failure(
    brokers: &Brokers,
    code: RDKafkaErrorCode,
    reason: &str,
) -> Option<PipelineError> {
    let security = &brokers.security;
    match code {
        RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => {
            let user = security
                .sasl
                .as_ref()
                .map(|sasl| format!("user {:?} ({})", sasl.username, sasl.mechanism.as_str()))
                .unwrap_or_else(|| "the client".to_string());
            Some(PipelineError::Config {
                setting: "--kafka-sasl-username / --kafka-sasl-password-file (KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD_FILE, KAFKA_SASL_PASSWORD)",
                reason: format!(
                    "the brokers at {brokers} refused {user}: {}",
                    last_clause(reason)
                ),
            })
        }
        RDKafkaErrorCode::SSL if reason.contains("certificate verify failed") => {
            let trusted = security
                .ssl_ca_location
                .as_ref()
                .map(|ca| format!("a CA in {}", ca.display()))
                .unwrap_or_else(|| "a CA of the system's trust store".to_string());
            let what =
                if reason.contains("ostname mismatch") || reason.contains("IP address mismatch") {
                    "names another host than the one connected to".to_string()
                } else {
                    format!("is not signed by {trusted}")
                };
            Some(PipelineError::Config {
                setting: "--kafka-ssl-ca-location (KAFKA_SSL_CA_LOCATION)",
                reason: format!(
                    "the TLS certificate of the brokers at {brokers} {what}: {}",
                    last_clause(reason)
                ),
            })
        }
        RDKafkaErrorCode::SSL => Some(PipelineError::Config {
            setting: "--kafka-security-protocol (KAFKA_SECURITY_PROTOCOL)",
            reason: format!(
                "the TLS handshake with {brokers} failed ({}); is that listener {}?",
                last_clause(reason),
                security.protocol.as_str()
            ),
        }),
        _ => None,
    }
}

/// librdkafka's reason without its `sasl_ssl://host:port/bootstrap: `
/// prefix and its `(after 12ms in state ...)` suffix.
fn last_clause(reason: &str) -> &str {
    let reason = match reason.find("/bootstrap: ") {
        Some(at) => &reason[at + "/bootstrap: ".len()..],
        None => reason.split_once(": ").map_or(reason, |(_, rest)| rest),
    };
    match reason.rfind(" (after ") {
        Some(at) => reason[..at].trim(),
        None => reason.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        security: KafkaSecurityArgs,
    }

    fn parse(args: &[&str]) -> KafkaSecurityArgs {
        let mut argv = vec!["test"];
        argv.extend_from_slice(args);
        Flags::try_parse_from(argv).expect("flags parse").security
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("kafka-security-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_default_is_plaintext_with_nothing_else() {
        let brokers = parse(&[]).resolve("127.0.0.1:9092").unwrap();
        assert_eq!(brokers, Brokers::plaintext("127.0.0.1:9092"));
        let config = brokers.client_config();
        assert_eq!(config.get("security.protocol"), Some("plaintext"));
        assert_eq!(config.get("sasl.username"), None);
        assert_eq!(config.get("ssl.ca.location"), None);
    }

    #[test]
    fn sasl_ssl_sets_librdkafkas_settings_and_debug_hides_the_password() {
        let password = temp_file("password", "s3cret-pass\n");
        let ca = temp_file(
            "ca.pem",
            "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n",
        );
        let brokers = parse(&[
            "--kafka-security-protocol",
            "SASL_SSL",
            "--kafka-sasl-username",
            "processor",
            "--kafka-sasl-password-file",
            password.to_str().unwrap(),
            "--kafka-ssl-ca-location",
            ca.to_str().unwrap(),
        ])
        .resolve("127.0.0.1:9093")
        .unwrap();
        let config = brokers.client_config();
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("processor"));
        assert_eq!(config.get("sasl.password"), Some("s3cret-pass"));
        assert_eq!(config.get("ssl.ca.location"), ca.to_str());
        assert_eq!(
            config.get("ssl.endpoint.identification.algorithm"),
            Some("https")
        );
        assert_eq!(
            brokers.security.principal().as_deref(),
            Some("User:processor")
        );
        let shown = format!("{brokers:?} {brokers}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("processor"), "{shown}");
    }

    #[test]
    fn settings_that_cannot_work_fail_naming_the_flag() {
        let empty = temp_file("empty", "\n");
        let not_pem = temp_file("not-pem", "hello\n");
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (
                vec!["--kafka-security-protocol", "sasl_ssl"],
                "--kafka-sasl-username",
            ),
            (
                vec![
                    "--kafka-security-protocol",
                    "sasl_ssl",
                    "--kafka-sasl-username",
                    "u",
                ],
                "--kafka-sasl-password-file",
            ),
            (
                vec![
                    "--kafka-security-protocol",
                    "sasl_ssl",
                    "--kafka-sasl-username",
                    "u",
                    "--kafka-sasl-password-file",
                    empty.to_str().unwrap(),
                ],
                "--kafka-sasl-password-file",
            ),
            (
                vec![
                    "--kafka-security-protocol",
                    "sasl_ssl",
                    "--kafka-sasl-username",
                    "u",
                    "--kafka-sasl-password-file",
                    "/nonexistent/password",
                ],
                "--kafka-sasl-password-file",
            ),
            (vec!["--kafka-sasl-username", "u"], "--kafka-sasl-username"),
            (
                vec!["--kafka-ssl-ca-location", not_pem.to_str().unwrap()],
                "--kafka-ssl-ca-location",
            ),
            (
                vec![
                    "--kafka-security-protocol",
                    "ssl",
                    "--kafka-ssl-ca-location",
                    not_pem.to_str().unwrap(),
                ],
                "--kafka-ssl-ca-location",
            ),
            (
                vec![
                    "--kafka-security-protocol",
                    "ssl",
                    "--kafka-ssl-ca-location",
                    "/nonexistent/ca.pem",
                ],
                "--kafka-ssl-ca-location",
            ),
        ];
        for (args, flag) in cases {
            let error = parse(&args).resolve("127.0.0.1:9093").unwrap_err();
            assert_eq!(error.flag, flag, "{args:?}: {error}");
        }
    }

    #[test]
    fn librdkafka_reasons_lose_their_prefix_and_timing() {
        assert_eq!(
            last_clause("sasl_ssl://127.0.0.1:9093/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 303ms in state AUTH_REQ)"),
            "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512"
        );
    }
}
