//! `processor`: Kafka -> parser -> PostgreSQL + ClickHouse, poison -> DLQ.

use stream_bins::config::{parse_or_exit, ProcessorConfig};

#[tokio::main]
async fn main() {
    let flags: ProcessorConfig = parse_or_exit();
    let validated = flags
        .validate()
        .and_then(|(config, metrics_addr)| Ok((config, metrics_addr, flags.admin_token()?)));
    let (config, metrics_addr, admin_token) = validated.unwrap_or_else(|config_error| {
        eprintln!("error: {config_error}");
        std::process::exit(2);
    });
    let policy = flags.restart_policy();
    let otlp_endpoint = flags.otlp_endpoint.clone();
    // The processor serves /metrics itself, on its admin endpoint.
    stream_bins::run_service(None, || {
        stream_bins::processor::run(config, otlp_endpoint, policy, metrics_addr, admin_token)
    })
    .await
}
