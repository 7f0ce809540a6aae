//! A supervisor for a single actor (the SQS consumer): owns it, and when it
//! fails or stops unasked, stops too and reports [`PipelineExit::Failed`], so
//! the process exits non-zero and its orchestrator restarts it.

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::watch;

use crate::{escalate_on_child_exit, mark_stopped, startup_message, PipelineExit, StartError};

/// Messages the solo supervisor handles.
#[derive(Debug)]
pub enum SoloMsg {
    /// Stop the child, then stop.
    Shutdown,
}

/// What a solo supervisor starts with.
pub struct SoloArgs<A: Actor> {
    /// The child's name, for messages.
    pub name: &'static str,
    /// The child actor.
    pub actor: A,
    /// Its arguments.
    pub arguments: A::Arguments,
    /// Where the outcome is published.
    pub exit: watch::Sender<PipelineExit>,
    /// Where the child's reference is published once it runs.
    pub child: watch::Sender<Option<ActorRef<A::Msg>>>,
}

/// The solo supervisor's state.
pub struct SoloState<A: Actor> {
    name: &'static str,
    child: ActorRef<A::Msg>,
    shutting_down: bool,
    exit: watch::Sender<PipelineExit>,
}

/// Supervises one actor of type `A`.
pub struct SoloSupervisor<A: Actor>(std::marker::PhantomData<fn() -> A>);

impl<A: Actor> Default for SoloSupervisor<A> {
    fn default() -> Self {
        SoloSupervisor(std::marker::PhantomData)
    }
}

impl<A: Actor> Actor for SoloSupervisor<A> {
    type Msg = SoloMsg;
    type State = SoloState<A>;
    type Arguments = SoloArgs<A>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (child, _) =
            Actor::spawn_linked(None, args.actor, args.arguments, myself.get_cell()).await?;
        args.child.send_replace(Some(child.clone()));
        Ok(SoloState {
            name: args.name,
            child,
            shutting_down: false,
            exit: args.exit,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.child.stop(None);
        mark_stopped(&state.exit);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SoloMsg::Shutdown => {
                state.shutting_down = true;
                let _ = state
                    .child
                    .stop_and_wait(None, Some(std::time::Duration::from_secs(10)))
                    .await;
                myself.stop(Some("shutdown".to_string()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let name = state.name;
        escalate_on_child_exit(
            &myself,
            event,
            &mut state.shutting_down,
            &state.exit,
            |_| name.to_string(),
        );
        Ok(())
    }
}

/// A running solo-supervised actor.
pub struct SoloHandle<M: ractor::Message> {
    /// The supervisor.
    pub supervisor: ActorRef<SoloMsg>,
    /// The child (replaced if it is ever restarted).
    pub child: watch::Receiver<Option<ActorRef<M>>>,
    /// Completes when the supervisor has stopped.
    pub join: tokio::task::JoinHandle<()>,
    /// How it ended (or `Running`).
    pub exit: watch::Receiver<PipelineExit>,
}

impl<M: ractor::Message> SoloHandle<M> {
    /// The child actor.
    pub fn child(&self) -> Option<ActorRef<M>> {
        self.child.borrow().clone()
    }

    /// Stops the child and the supervisor; returns how it ended.
    pub async fn shutdown(self) -> PipelineExit {
        let _ = self.supervisor.cast(SoloMsg::Shutdown);
        let _ = self.join.await;
        self.exit.borrow().clone()
    }
}

/// Starts `actor` under a fresh solo supervisor.
pub async fn start_solo<A: Actor>(
    name: &'static str,
    actor: A,
    arguments: A::Arguments,
) -> Result<SoloHandle<A::Msg>, StartError> {
    let (exit_sender, exit_receiver) = watch::channel(PipelineExit::Running);
    let (child_sender, child_receiver) = watch::channel(None);
    let (supervisor, join) = Actor::spawn(
        None,
        SoloSupervisor::<A>::default(),
        SoloArgs {
            name,
            actor,
            arguments,
            exit: exit_sender,
            child: child_sender,
        },
    )
    .await
    .map_err(|spawn_error| StartError::Spawn(startup_message(&spawn_error)))?;
    Ok(SoloHandle {
        supervisor,
        child: child_receiver,
        join,
        exit: exit_receiver,
    })
}
