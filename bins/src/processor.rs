//! Runs the pipeline until SIGINT/SIGTERM (drain, checkpoint, exit 0) or a
//! failure (exit 1, so that an orchestrator restarts it from the checkpoint).

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;
use stream_actors::PipelineConfig;
use stream_supervisor::{start_pipeline, PipelineExit};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

/// Serves `/metrics` on `address`.
pub fn install_metrics(address: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(address)
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .map_err(|error| anyhow::anyhow!("histogram buckets: {error}"))?
        .install()
        .map_err(|error| {
            anyhow::anyhow!("cannot serve metrics on --metrics-addr {address}: {error}")
        })
}

/// Runs the pipeline; returns the process exit code.
pub async fn run(config: PipelineConfig) -> anyhow::Result<i32> {
    let pipeline = start_pipeline(config).await?;
    let mut exit = pipeline.exit.clone();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => info!("sigterm received"),
        _ = interrupt.recv() => info!("sigint received"),
        _ = exit.wait_for(|state| *state != PipelineExit::Running) => {}
    }
    let outcome = if *pipeline.exit.borrow() == PipelineExit::Running {
        pipeline.shutdown().await
    } else {
        let _ = pipeline.join.await;
        let outcome = pipeline.exit.borrow().clone();
        outcome
    };
    match outcome {
        PipelineExit::Failed(reason) => {
            error!(%reason, "pipeline failed");
            Ok(1)
        }
        PipelineExit::Stopped | PipelineExit::Running => {
            info!("pipeline stopped");
            Ok(0)
        }
    }
}
