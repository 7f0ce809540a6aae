//! PostgreSQL connection strings with libpq's TLS settings.
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` and verifies
//! nothing itself: verification is the TLS connector's. libpq users write
//! `sslmode=verify-full&sslrootcert=/path/ca.pem`, which tokio-postgres
//! refuses to parse. [`PostgresTarget::parse`] takes `sslmode` and
//! `sslrootcert` out of the URL (or `key=value` string), hands the rest to
//! tokio-postgres, and [`PostgresTarget::connect`] builds an OpenSSL
//! connector (the same OpenSSL librdkafka uses) that verifies what the mode
//! asks for, as libpq does:
//!
//! - `disable`: no TLS.
//! - `prefer` (libpq's default): TLS if the server offers it, nothing verified.
//! - `require`: TLS or no connection; nothing verified, unless `sslrootcert`
//!   is given, then as `verify-ca` (libpq's rule).
//! - `verify-ca`: the server's certificate must chain to `sslrootcert` (or
//!   to the system's trust store when none is given, `sslrootcert=system`).
//! - `verify-full`: `verify-ca`, and the certificate must name the host.
//!
//! Anything else (`allow`, an unknown mode, `sslcert`/`sslkey` client
//! certificates) is refused when the URL is parsed, at start.

use std::path::PathBuf;
use std::str::FromStr;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode as WireSslMode;
use tokio_postgres::{Client, Config, Connection, NoTls, Socket};

/// libpq's `sslmode`, the values this build honours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if offered, unverified.
    Prefer,
    /// TLS required, unverified (verified as `VerifyCa` with a root cert).
    Require,
    /// TLS, the chain verified.
    VerifyCa,
    /// TLS, the chain and the host name verified.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        match value {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(format!(
                "sslmode={other} is not supported; use disable, prefer, require, verify-ca or verify-full"
            )),
        }
    }
}

/// Where to connect and how: tokio-postgres's configuration, and the TLS
/// settings it cannot carry.
#[derive(Clone)]
pub struct PostgresTarget {
    /// Host, port, user, password, database, options.
    pub config: Config,
    /// The TLS mode.
    pub ssl_mode: SslMode,
    /// `sslrootcert`: the CA certificates (PEM) the server's must chain to;
    /// `None`: the system's trust store.
    pub root_cert: Option<PathBuf>,
    /// The connector for the mode; `None` with `disable`.
    tls: Option<MakeTlsConnector>,
}

impl std::fmt::Debug for PostgresTarget {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PostgresTarget")
            .field("config", &self.config)
            .field("ssl_mode", &self.ssl_mode)
            .field("root_cert", &self.root_cert)
            .finish_non_exhaustive()
    }
}

/// Parameters this build cannot honour: refused rather than ignored.
const UNSUPPORTED: [&str; 4] = ["sslcert", "sslkey", "sslpassword", "sslcrl"];

impl PostgresTarget {
    /// Parses a URL (`postgres://...?sslmode=verify-full&sslrootcert=...`) or
    /// a `key=value` string. Errors say what is wrong without the password.
    pub fn parse(url: &str) -> Result<PostgresTarget, String> {
        let mut ssl_mode = None;
        let mut root_cert = None;
        let mut take = |key: &str, value: &str| -> Result<bool, String> {
            match key {
                "sslmode" => {
                    ssl_mode = Some(SslMode::parse(value)?);
                    Ok(true)
                }
                "sslrootcert" => {
                    root_cert = (value != "system").then(|| PathBuf::from(value));
                    Ok(true)
                }
                key if UNSUPPORTED.contains(&key) => Err(format!(
                    "{key} is not supported (client certificates); authenticate with a password"
                )),
                _ => Ok(false),
            }
        };
        let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            match url.split_once('?') {
                None => url.to_string(),
                Some((base, query)) => {
                    let mut kept = Vec::new();
                    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        if !take(key, &percent_decode(value))? {
                            kept.push(pair);
                        }
                    }
                    if kept.is_empty() {
                        base.to_string()
                    } else {
                        format!("{base}?{}", kept.join("&"))
                    }
                }
            }
        } else {
            let mut kept = Vec::new();
            for token in url.split_whitespace() {
                let (key, value) = token.split_once('=').unwrap_or((token, ""));
                if !take(key.trim(), value.trim_matches('\''))? {
                    kept.push(token);
                }
            }
            kept.join(" ")
        };
        let mut config =
            Config::from_str(&rest).map_err(|error| format!("not a PostgreSQL URL: {error}"))?;
        let ssl_mode = ssl_mode.unwrap_or(SslMode::Prefer);
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => WireSslMode::Disable,
            SslMode::Prefer => WireSslMode::Prefer,
            _ => WireSslMode::Require,
        });
        if let Some(file) = &root_cert {
            let text = std::fs::read_to_string(file)
                .map_err(|error| format!("sslrootcert {}: {error}", file.display()))?;
            if !text.contains("-----BEGIN CERTIFICATE-----") {
                return Err(format!(
                    "sslrootcert {} holds no PEM certificate",
                    file.display()
                ));
            }
        }
        let tls = connector(ssl_mode, root_cert.as_ref())
            .map_err(|stack| format!("cannot set up TLS for sslmode={ssl_mode:?}: {stack}"))?;
        Ok(PostgresTarget {
            config,
            ssl_mode,
            root_cert,
            tls,
        })
    }

    /// Connects, and drives the connection on the runtime until it closes.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        match &self.tls {
            None => spawn(self.config.connect(NoTls).await?),
            Some(connector) => spawn(self.config.connect(connector.clone()).await?),
        }
    }
}

/// The OpenSSL connector for a mode; `None` with `disable`.
fn connector(
    ssl_mode: SslMode,
    root_cert: Option<&PathBuf>,
) -> Result<Option<MakeTlsConnector>, openssl::error::ErrorStack> {
    let verify_chain = match ssl_mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer => false,
        SslMode::Require => root_cert.is_some(),
        SslMode::VerifyCa | SslMode::VerifyFull => true,
    };
    let mut builder = SslConnector::builder(SslMethod::tls())?;
    if verify_chain {
        if let Some(file) = root_cert {
            builder.set_ca_file(file)?;
        }
        builder.set_verify(SslVerifyMode::PEER);
    } else {
        builder.set_verify(SslVerifyMode::NONE);
    }
    let mut connector = MakeTlsConnector::new(builder.build());
    if ssl_mode != SslMode::VerifyFull {
        connector.set_callback(|config, _host| {
            config.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok(Some(connector))
}

fn spawn<T>(
    (client, connection): (Client, Connection<Socket, T>),
) -> Result<Client, tokio_postgres::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "postgres connection closed");
        }
    });
    Ok(client)
}

/// `%xx` escapes of a URL query value (a path with spaces, say).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' && index + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("");
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                out.push(byte);
                index += 3;
                continue;
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_settings_are_taken_out_of_the_url() {
        let target = PostgresTarget::parse(
            "postgres://app:secret@db.example:5433/pipeline?sslmode=verify-full&sslrootcert=system&application_name=p",
        )
        .unwrap();
        assert_eq!(target.ssl_mode, SslMode::VerifyFull);
        assert_eq!(target.root_cert, None);
        assert_eq!(target.config.get_dbname(), Some("pipeline"));
        assert_eq!(target.config.get_application_name(), Some("p"));
        assert_eq!(target.config.get_ssl_mode(), WireSslMode::Require);
        assert!(!format!("{target:?}").contains("secret"));
    }

    #[test]
    fn the_default_is_prefer_and_key_value_strings_work_too() {
        let target = PostgresTarget::parse("postgres://u:p@127.0.0.1/db").unwrap();
        assert_eq!(target.ssl_mode, SslMode::Prefer);
        let target =
            PostgresTarget::parse("host=127.0.0.1 user=u sslmode=disable dbname=db").unwrap();
        assert_eq!(target.ssl_mode, SslMode::Disable);
        assert_eq!(target.config.get_dbname(), Some("db"));
        assert!(target.tls.is_none());
    }

    #[test]
    fn settings_this_build_cannot_honour_are_refused() {
        for url in [
            "postgres://u@h/db?sslmode=allow",
            "postgres://u@h/db?sslmode=bogus",
            "postgres://u@h/db?sslmode=require&sslcert=/c.pem",
            "postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
            "host=h sslkey=/k.pem",
        ] {
            assert!(PostgresTarget::parse(url).is_err(), "{url}");
        }
    }

    #[test]
    fn escaped_query_values_are_decoded() {
        assert_eq!(percent_decode("/a%20b/ca.pem"), "/a b/ca.pem");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
