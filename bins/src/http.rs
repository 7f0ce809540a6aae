//! The one HTTP client of the binaries (ureq, blocking, plain HTTP on
//! loopback or in-cluster addresses): `streamctl` against the processor's
//! admin endpoint, the Prometheus API client, the tests and the bench.

use std::time::Duration;

/// How long one request may take, the body included.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// A GET; returns the status code and the body.
pub fn http_get(address: &str, path_and_query: &str) -> std::io::Result<(u16, String)> {
    http_request(address, "GET", path_and_query, None)
}

/// A request without a body to `http://{address}{path_and_query}`, with
/// `Authorization: Bearer <token>` when a token is given; returns the status
/// code and the body (an error status is an answer, not an error).
pub fn http_request(
    address: &str,
    method: &str,
    path_and_query: &str,
    bearer: Option<&str>,
) -> std::io::Result<(u16, String)> {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    let agent = AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .build()
            .into()
    });
    let mut request = ureq::http::Request::builder()
        .method(method)
        .uri(format!("http://{address}{path_and_query}"));
    if let Some(token) = bearer {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let request = request
        .body(())
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    let mut response = agent.run(request).map_err(ureq::Error::into_io)?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(ureq::Error::into_io)?;
    Ok((status, body))
}
