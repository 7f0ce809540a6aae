//! The binaries' logic, kept out of `main` so tests can call it.
//!
//! - [`archive`]: `streamctl dlq archive`, dead letters into S3-compatible storage.
//! - [`admin`]: the processor's admin endpoint (metrics, probes, status, kill).
//! - [`audit`]: `streamctl audit`, the topic reconciled with the stores and the DLQ.
//! - [`chart`]: `streamctl chart`, a PNG of a run from Prometheus.
//! - [`config`]: the processor's flags (and the connection flags `streamctl` shares).
//! - [`processor`]: runs the pipeline until a signal or a failure.
//! - [`prometheus`]: a small Prometheus API client.
//! - [`watch`]: `streamctl watch`, the live terminal view.
//! - [`lag`]: `streamctl lag`, a group's lag from the broker's side (and its exporter).
//! - [`inspect`]: independent reads of topics, stores and checkpoints.
//! - [`report`]: `streamctl report`, the demo's summary.
//! - [`sqs_consumer`]: runs the SQS consumer actor under its supervisor.
//! - [`dlq`]: `streamctl dlq stats|show|replay`, from the topic or the archive.
//! - [`scratch`]: private topics and databases for tests and measurements.
//! - [`topics`]: `streamctl topics ensure`, the topics through the Kafka admin API.

pub mod admin;
pub mod archive;
pub mod audit;
pub mod chart;
pub mod config;
pub mod db;
pub mod dlq;
pub mod http;
pub mod inspect;
pub mod lag;
pub mod processor;
pub mod prometheus;
pub mod report;
pub mod scratch;
pub mod sqs_consumer;
pub mod topics;
pub mod watch;

/// SIGTERM or SIGINT, for the binaries' long runs: registers both handlers
/// now (so a signal that comes before the future is polled is not lost) and
/// returns a future that completes with the name of the first to arrive.
pub fn termination() -> std::io::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => "sigterm",
            _ = interrupt.recv() => "sigint",
        }
    })
}

/// Sets up `tracing` to stderr (coloured only on a terminal); `RUST_LOG`
/// overrides the default level.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rdkafka=warn,tokio_postgres=warn")
    });
    // Colours for a terminal only: a log file gets plain text to grep.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The tail every long-running binary shares: sets up tracing, serves
/// `/metrics` when asked, runs `work` and exits with its code (2 when the
/// metrics address cannot be served, 1 on an error).
pub async fn run_service<F>(
    metrics_addr: Option<std::net::SocketAddr>,
    work: impl FnOnce() -> F,
) -> !
where
    F: std::future::Future<Output = anyhow::Result<i32>>,
{
    init_tracing();
    if let Some(address) = metrics_addr {
        if let Err(metrics_error) = processor::install_metrics(address) {
            eprintln!("error: {metrics_error}");
            std::process::exit(2);
        }
    }
    match work().await {
        Ok(code) => std::process::exit(code),
        Err(run_error) => {
            eprintln!("error: {run_error:#}");
            std::process::exit(1);
        }
    }
}
