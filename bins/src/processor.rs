//! Runs the pipeline until SIGINT/SIGTERM (drain, checkpoint, exit 0) or a
//! failure (exit 1, so that an orchestrator restarts it from the checkpoint).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use stream_actors::faults::Faults;
use stream_actors::spans::SpanExport;
use stream_actors::PipelineConfig;
use stream_supervisor::{start_pipeline_with, PipelineExit, RestartPolicy};
use tracing::{error, info};

fn metrics_builder() -> anyhow::Result<PrometheusBuilder> {
    PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .map_err(|error| anyhow::anyhow!("histogram buckets: {error}"))
}

/// Serves `/metrics` on `address`.
pub fn install_metrics(address: SocketAddr) -> anyhow::Result<()> {
    metrics_builder()?
        .with_http_listener(address)
        .install()
        .map_err(|error| {
            anyhow::anyhow!("cannot serve metrics on --metrics-addr {address}: {error}")
        })
}

/// Installs the metrics recorder without a listener (the admin endpoint
/// renders it) and keeps its histograms tidy.
fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = metrics_builder()?
        .install_recorder()
        .map_err(|error| anyhow::anyhow!("cannot install the metrics recorder: {error}"))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(5));
        loop {
            ticks.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Runs the pipeline under its supervisor, with the admin endpoint (metrics,
/// probes, and kill behind `admin_token`) on `admin_addr`, exporting spans
/// to `otlp_endpoint` if set (sent at exit); returns the process exit code: 0 after a
/// signal and a drain, 1 when the supervisor escalated, 2 when the admin
/// address cannot be served or `STREAM_CRASH_AT` is malformed.
pub async fn run(
    mut config: PipelineConfig,
    otlp_endpoint: Option<String>,
    policy: RestartPolicy,
    admin_addr: Option<SocketAddr>,
    admin_token: Option<crate::admin::AdminToken>,
) -> anyhow::Result<i32> {
    let faults = match Faults::from_env() {
        Ok(faults) => Arc::new(faults),
        Err(fault_error) => {
            eprintln!("error: {fault_error}");
            return Ok(2);
        }
    };
    let admin = match admin_addr {
        Some(address) => {
            let metrics = install_recorder()?;
            match crate::admin::bind(address).await {
                Ok(listener) => Some((listener, metrics)),
                Err(bind_error) => {
                    eprintln!("error: {bind_error}");
                    return Ok(2);
                }
            }
        }
        None => None,
    };
    let export = match otlp_endpoint {
        Some(endpoint) => {
            let (export, spans) = SpanExport::start(&endpoint, config.batch_size)?;
            info!(%endpoint, "exporting spans over OTLP/HTTP");
            config.spans = spans;
            Some(export)
        }
        None => None,
    };
    let pipeline = start_pipeline_with(config, policy, faults).await?;
    if let Some((listener, metrics)) = admin {
        if admin_token.is_none() {
            info!("admin actions (POST /actors/...) disabled: no --admin-token-file");
        }
        let target = crate::admin::AdminTarget {
            metrics,
            supervisor: pipeline.supervisor.clone(),
            exit: pipeline.exit.clone(),
            token: admin_token,
        };
        tokio::spawn(crate::admin::serve(listener, target));
    }
    let mut exit = pipeline.exit.clone();
    let termination = crate::termination()?;
    tokio::select! {
        signal = termination => info!("{signal} received"),
        _ = exit.wait_for(|state| *state != PipelineExit::Running) => {}
    }
    let outcome = if *pipeline.exit.borrow() == PipelineExit::Running {
        pipeline.shutdown().await
    } else {
        let _ = pipeline.join.await;
        let outcome = pipeline.exit.borrow().clone();
        outcome
    };
    if let Some(export) = export {
        // Sends what is queued; blocking, so off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || export.shutdown(Duration::from_secs(5))).await;
    }
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
