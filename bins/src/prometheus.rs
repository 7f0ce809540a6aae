//! A small Prometheus HTTP API client (instant queries), for `streamctl
//! watch`, the demo's checks and the tests. Plain HTTP/1.0 on a socket: the
//! API is simple and this keeps an HTTP client crate out of the binaries.

use std::collections::BTreeMap;
use std::time::Duration;

/// A plain HTTP/1.0 GET on loopback; returns the status code and the body.
/// Enough for `/metrics` and the Prometheus API without an HTTP client crate.
pub fn http_get(address: &str, path_and_query: &str) -> std::io::Result<(u16, String)> {
    http_request(address, "GET", path_and_query)
}

/// An HTTP/1.0 request without a body; returns the status code and the body.
pub fn http_request(
    address: &str,
    method: &str,
    path_and_query: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path_and_query} HTTP/1.0\r\nHost: {address}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or((response.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Percent-encodes a query parameter value.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Runs an instant query; returns each series' labels and value.
pub fn query(
    address: &str,
    expression: &str,
) -> anyhow::Result<Vec<(BTreeMap<String, String>, f64)>> {
    let (status, body) = http_get(
        address,
        &format!("/api/v1/query?query={}", url_encode(expression)),
    )
    .map_err(|error| anyhow::anyhow!("cannot reach prometheus at {address}: {error}"))?;
    anyhow::ensure!(
        status == 200,
        "prometheus at {address} answered {status} to {expression}: {body}"
    );
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    let mut samples = Vec::new();
    for series in answer["data"]["result"].as_array().into_iter().flatten() {
        let labels = series["metric"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(key, value)| (key.clone(), value.as_str().unwrap_or_default().to_string()))
            .collect();
        let Some(value) = series["value"][1]
            .as_str()
            .and_then(|text| text.parse().ok())
        else {
            continue;
        };
        samples.push((labels, value));
    }
    Ok(samples)
}

/// The first value of an instant query, if there is one.
pub fn query_scalar(address: &str, expression: &str) -> anyhow::Result<Option<f64>> {
    Ok(query(address, expression)?.first().map(|(_, value)| *value))
}
