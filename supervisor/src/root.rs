//! The root of the supervision tree: owns one [`PipelineSupervisor`] per
//! pipeline. It restarts nothing itself: a pipeline supervisor that ends is
//! either a requested shutdown (all of them stop, [`PipelineExit::Stopped`])
//! or an escalation (its restart intensity was exceeded, or it could not
//! start its children), which the root escalates in turn: it publishes
//! [`PipelineExit::Failed`] and stops the others, and the process exits
//! non-zero so that Kubernetes restarts the pod.

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::watch;
use tracing::{error, info};

use crate::{mark_stopped, PipelineArgs, PipelineExit, PipelineMsg, PipelineSupervisor};

/// What the root starts with.
pub struct RootArgs {
    /// One entry per pipeline.
    pub pipelines: Vec<PipelineArgs>,
    /// Where the root publishes the outcome of the whole tree.
    pub exit: watch::Sender<PipelineExit>,
    /// Where the pipeline supervisors' references are published once running.
    pub started: watch::Sender<Vec<ActorRef<PipelineMsg>>>,
}

/// The root's state.
pub struct RootState {
    pipelines: Vec<(ActorRef<PipelineMsg>, watch::Receiver<PipelineExit>)>,
    exit: watch::Sender<PipelineExit>,
}

/// Messages the root handles.
#[derive(Debug)]
pub enum RootMsg {}

/// The root supervisor actor.
pub struct RootSupervisor;

impl Actor for RootSupervisor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut pipelines = Vec::new();
        for mut pipeline in args.pipelines {
            // Each pipeline supervisor publishes its own outcome; the root reads it.
            let (exit, outcome) = watch::channel(PipelineExit::Running);
            pipeline.exit = exit;
            match Actor::spawn_linked(None, PipelineSupervisor, pipeline, myself.get_cell()).await {
                Ok((supervisor, _)) => pipelines.push((supervisor, outcome)),
                Err(spawn_error) => {
                    for (started, _) in &pipelines {
                        started.stop(None);
                    }
                    return Err(spawn_error.into());
                }
            }
        }
        args.started.send_replace(
            pipelines
                .iter()
                .map(|(supervisor, _)| supervisor.clone())
                .collect(),
        );
        Ok(RootState {
            pipelines,
            exit: args.exit,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for (supervisor, _) in &state.pipelines {
            supervisor.stop(None);
        }
        mark_stopped(&state.exit);
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let cell = match &event {
            SupervisionEvent::ActorFailed(cell, _)
            | SupervisionEvent::ActorTerminated(cell, ..) => cell.clone(),
            _ => return Ok(()),
        };
        let Some(index) = state
            .pipelines
            .iter()
            .position(|(supervisor, _)| supervisor.get_id() == cell.get_id())
        else {
            return Ok(());
        };
        let (_, outcome) = state.pipelines.remove(index);
        let outcome = outcome.borrow().clone();
        match (outcome, event) {
            (PipelineExit::Failed(reason), _) => {
                error!(%reason, "pipeline supervisor escalated; the root stops the process");
                state.exit.send_replace(PipelineExit::Failed(reason));
                myself.stop(Some("escalation".to_string()));
            }
            (_, SupervisionEvent::ActorFailed(_, reason)) => {
                let reason = format!("pipeline supervisor failed: {reason}");
                error!(%reason, "the root stops the process");
                state.exit.send_replace(PipelineExit::Failed(reason));
                myself.stop(Some("escalation".to_string()));
            }
            _ => {
                info!("pipeline stopped");
                if state.pipelines.is_empty() {
                    myself.stop(Some("all pipelines stopped".to_string()));
                }
            }
        }
        Ok(())
    }
}
