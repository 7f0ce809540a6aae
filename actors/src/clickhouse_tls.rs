//! ClickHouse over HTTPS with the CA the operator names.
//!
//! The clickhouse crate's `rustls-tls` feature gives `https://` URLs a
//! rustls client that trusts the public web PKI (webpki roots). A server
//! whose certificate comes from a private CA (the local test CA, a
//! company's) needs that CA: [`client_trusting`] builds the same kind of
//! client (hyper-util over hyper-rustls, HTTP/1, aws-lc-rs) with a root
//! store holding only the certificates of `--clickhouse-ca-file`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// The crate's own TCP keepalive and idle-connection timeout (ClickHouse
/// closes idle connections after 3 s).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// The CA certificates of a PEM file, as a rustls root store.
pub fn root_store(ca_file: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certificates = CertificateDer::pem_file_iter(ca_file)
        .map_err(|error| format!("cannot read {}: {error}", ca_file.display()))?;
    for certificate in certificates {
        let certificate =
            certificate.map_err(|error| format!("{} is not PEM: {error}", ca_file.display()))?;
        roots.add(certificate).map_err(|error| {
            format!(
                "{}: a certificate rustls refuses: {error}",
                ca_file.display()
            )
        })?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no PEM certificate", ca_file.display()));
    }
    Ok(roots)
}

/// A ClickHouse client for `https://` URLs that trusts only the CA
/// certificates in `ca_file` (the host name is verified too).
pub fn client_trusting(ca_file: &Path) -> Result<clickhouse::Client, String> {
    let roots = root_store(ca_file)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS set-up: {error}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_keepalive(Some(TCP_KEEPALIVE));
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Ok(clickhouse::Client::with_http_client(
        HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector),
    ))
}
