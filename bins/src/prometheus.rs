//! A small Prometheus HTTP API client (instant queries), for `streamctl
//! watch`, the demo's checks and the tests, on [`crate::http`].

use std::collections::BTreeMap;

pub use crate::http::http_get;

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
