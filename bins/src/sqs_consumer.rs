//! Runs the SQS consumer under its supervisor until SIGINT/SIGTERM (exit 0)
//! or a failure (exit 1).

use stream_actors::sqs_consumer::{SqsConsumerActor, SqsConsumerArgs};
use stream_supervisor::solo::start_solo;
use stream_supervisor::PipelineExit;
use tracing::{error, info};

/// Runs until a signal or a failure; returns the process exit code.
pub async fn run(arguments: SqsConsumerArgs) -> anyhow::Result<i32> {
    let handle = start_solo("sqs_consumer", SqsConsumerActor, arguments).await?;
    let mut exit = handle.exit.clone();
    let termination = crate::termination()?;
    tokio::select! {
        signal = termination => info!("{signal} received"),
        _ = exit.wait_for(|state| *state != PipelineExit::Running) => {}
    }
    match handle.shutdown().await {
        PipelineExit::Failed(reason) => {
            error!(%reason, "sqs consumer failed");
            Ok(1)
        }
        PipelineExit::Stopped | PipelineExit::Running => Ok(0),
    }
}
