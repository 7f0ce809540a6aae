//! Supervision of the pipeline.
//!
//! [`PipelineSupervisor`] owns one pipeline: it creates the shared clients
//! (Kafka consumer and producer, checkpoint store), spawns the five actors
//! linked to itself, and joins them with bounded mailboxes. It is the only
//! place that knows the wiring.
//!
//! Failure policy: a child that fails, or stops when nobody asked it to, takes
//! the whole pipeline down and the supervisor reports [`PipelineExit::Failed`]
//! (escalation). Messages in the dead actors' mailboxes are lost; that is safe
//! because nothing past the persisted checkpoint is committed, so the next
//! start rewinds to the checkpoint and the idempotent sinks absorb the replay.
//!
//! [`solo::SoloSupervisor`] applies the same policy to a single actor (the
//! SQS consumer).
//!
//! A graceful [`PipelineMsg::Shutdown`] stops the consumer first, waits for
//! everything in flight to be acknowledged, persists a last checkpoint, then
//! stops the rest.

use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod solo;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use stream_actors::committer::{CommitterActor, CommitterArgs, CommitterMsg, CommitterStatus};
use stream_actors::consumer::{
    check_topics, create_consumer, ConsumerActor, ConsumerArgs, ConsumerMsg,
};
use stream_actors::dlq_writer::{create_dlq_producer, DlqWriterActor, DlqWriterArgs};
use stream_actors::mailbox::{MailboxBound, MailboxStats};
use stream_actors::parse::ParseRules;
use stream_actors::parser::{ParserActor, ParserArgs};
use stream_actors::sink::{SinkActor, SinkArgs};
use stream_actors::storage::CheckpointStore;
use stream_actors::PipelineConfig;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// How long a graceful shutdown waits for in-flight records.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// How a pipeline ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineExit {
    /// Still running.
    Running,
    /// Stopped on request, everything in flight committed.
    Stopped,
    /// A child failed; the message says which and why.
    Failed(String),
}

/// Messages the pipeline supervisor handles.
#[derive(Debug)]
pub enum PipelineMsg {
    /// Drain and stop; replies when done.
    Shutdown(RpcReplyPort<()>),
    /// Report mailboxes and committer progress.
    Status(RpcReplyPort<PipelineStatus>),
}

/// A snapshot of a running pipeline.
#[derive(Debug, Clone)]
pub struct PipelineStatus {
    /// Per data mailbox: actor, depth, capacity, max depth.
    pub mailboxes: Vec<MailboxSnapshot>,
    /// The committer's progress.
    pub committer: CommitterStatus,
}

/// One mailbox's figures at a moment.
#[derive(Debug, Clone, PartialEq)]
pub struct MailboxSnapshot {
    /// Receiving actor.
    pub actor: &'static str,
    /// Messages in the mailbox now.
    pub depth: usize,
    /// The bound.
    pub capacity: usize,
    /// The highest depth seen.
    pub max_depth: usize,
    /// Messages sent so far.
    pub sent: u64,
    /// Seconds senders waited on a full mailbox.
    pub wait_seconds: f64,
}

impl From<&MailboxStats> for MailboxSnapshot {
    fn from(stats: &MailboxStats) -> Self {
        MailboxSnapshot {
            actor: stats.actor,
            depth: stats.depth(),
            capacity: stats.capacity,
            max_depth: stats.max_depth(),
            sent: stats.sent(),
            wait_seconds: stats.wait_seconds(),
        }
    }
}

/// The children of one pipeline.
struct Children {
    consumer: ActorRef<ConsumerMsg>,
    committer: ActorRef<CommitterMsg>,
    /// Everything, in start order, for stopping.
    all: Vec<ActorCell>,
}

/// The pipeline supervisor's state.
pub struct PipelineState {
    children: Children,
    /// The data mailboxes' figures.
    mailboxes: Vec<Arc<MailboxStats>>,
    /// Set once a shutdown was asked for: children stopping is then expected.
    shutting_down: bool,
    /// Where the outcome is published.
    exit: watch::Sender<PipelineExit>,
}

/// What the pipeline supervisor starts with.
pub struct PipelineArgs {
    /// The validated configuration.
    pub config: PipelineConfig,
    /// Where to publish how the pipeline ended.
    pub exit: watch::Sender<PipelineExit>,
}

/// The pipeline supervisor actor.
pub struct PipelineSupervisor;

impl Actor for PipelineSupervisor {
    type Msg = PipelineMsg;
    type State = PipelineState;
    type Arguments = PipelineArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let config = args.config;
        let supervisor_cell = myself.get_cell();
        check_topics(&config.brokers, &[&config.topic, &config.dlq_topic])?;
        let store = Arc::new(CheckpointStore::connect(&config.postgres_url).await?);
        let kafka_consumer = create_consumer(&config, store.clone())?;
        let producer = create_dlq_producer(&config.brokers)?;

        let (committer, _) = Actor::spawn_linked(
            None,
            CommitterActor,
            CommitterArgs {
                group_id: config.group_id.clone(),
                topic: config.topic.clone(),
                store,
                consumer: kafka_consumer.clone(),
                commit_interval: config.commit_interval,
            },
            supervisor_cell.clone(),
        )
        .await?;
        let sink_bound = MailboxBound::new("sink", config.mailbox_capacity);
        let (sink, _) = Actor::spawn_linked(
            None,
            SinkActor,
            SinkArgs {
                config: config.clone(),
                committer: committer.clone(),
            },
            supervisor_cell.clone(),
        )
        .await?;
        let dlq_bound = MailboxBound::new("dlq_writer", config.mailbox_capacity);
        let (dlq_writer, _) = Actor::spawn_linked(
            None,
            DlqWriterActor,
            DlqWriterArgs {
                producer,
                source_topic: config.topic.clone(),
                dlq_topic: config.dlq_topic.clone(),
                committer: committer.clone(),
            },
            supervisor_cell.clone(),
        )
        .await?;
        let parser_bound = MailboxBound::new("parser", config.mailbox_capacity);
        let mut rules = ParseRules::with_now(0);
        rules.accepted_schema_versions = config.accepted_schema_versions.clone();
        let (parser, _) = Actor::spawn_linked(
            None,
            ParserActor,
            ParserArgs {
                rules,
                sink: sink_bound.sender_for(sink.clone()),
                dlq_writer: dlq_bound.sender_for(dlq_writer.clone()),
            },
            supervisor_cell.clone(),
        )
        .await?;
        let (consumer, _) = Actor::spawn_linked(
            None,
            ConsumerActor,
            ConsumerArgs {
                consumer: kafka_consumer,
                topic: config.topic.clone(),
                batch_size: config.batch_size,
                parser: parser_bound.sender_for(parser.clone()),
                committer: committer.clone(),
            },
            supervisor_cell,
        )
        .await?;
        for actor in ["consumer", "parser", "sink", "dlq_writer", "committer"] {
            metrics::counter!(stream_actors::metrics::ACTOR_RESTARTS, "actor" => actor)
                .increment(0);
        }
        info!(topic = %config.topic, group = %config.group_id, "pipeline started");
        Ok(PipelineState {
            children: Children {
                all: vec![
                    consumer.get_cell(),
                    parser.get_cell(),
                    sink.get_cell(),
                    dlq_writer.get_cell(),
                    committer.get_cell(),
                ],
                consumer,
                committer,
            },
            mailboxes: vec![parser_bound.stats(), sink_bound.stats(), dlq_bound.stats()],
            shutting_down: false,
            exit: args.exit,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for child in &state.children.all {
            child.stop(None);
        }
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
            PipelineMsg::Status(reply) => {
                let committer = ractor::call!(state.children.committer, CommitterMsg::Status)?;
                let _ = reply.send(PipelineStatus {
                    mailboxes: state
                        .mailboxes
                        .iter()
                        .map(|stats| stats.as_ref().into())
                        .collect(),
                    committer,
                });
            }
            PipelineMsg::Shutdown(reply) => {
                state.shutting_down = true;
                info!("pipeline shutting down: stopping intake");
                let _ = state
                    .children
                    .consumer
                    .stop_and_wait(None, Some(Duration::from_secs(10)))
                    .await;
                let deadline = Instant::now() + DRAIN_DEADLINE;
                loop {
                    let status = ractor::call!(state.children.committer, CommitterMsg::Status)?;
                    if status.in_flight == 0 {
                        break;
                    }
                    if Instant::now() >= deadline {
                        warn!(
                            in_flight = status.in_flight,
                            "drain deadline passed; the rest replays on next start"
                        );
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                ractor::call!(state.children.committer, CommitterMsg::Flush)?;
                info!("pipeline drained and checkpointed");
                let _ = reply.send(());
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
        let children = &state.children;
        escalate_on_child_exit(
            &myself,
            event,
            &mut state.shutting_down,
            &state.exit,
            |cell| format!("actor {}", describe(cell, children)),
        );
        Ok(())
    }
}

/// The escalation policy every supervisor here shares: a child that failed,
/// or stopped while nobody was shutting down, fails the supervisor, which
/// publishes [`PipelineExit::Failed`] and stops (its owner exits non-zero).
pub(crate) fn escalate_on_child_exit<M: ractor::Message>(
    myself: &ActorRef<M>,
    event: SupervisionEvent,
    shutting_down: &mut bool,
    exit: &watch::Sender<PipelineExit>,
    name: impl Fn(&ActorCell) -> String,
) {
    let failure = match event {
        SupervisionEvent::ActorFailed(cell, reason) => {
            Some(format!("{} failed: {reason}", name(&cell)))
        }
        SupervisionEvent::ActorTerminated(cell, _, reason) if !*shutting_down => Some(format!(
            "{} stopped unexpectedly ({})",
            name(&cell),
            reason.unwrap_or_else(|| "no reason".to_string())
        )),
        _ => None,
    };
    if let Some(failure) = failure {
        error!(%failure, "supervisor escalating");
        *shutting_down = true;
        exit.send_replace(PipelineExit::Failed(failure.clone()));
        myself.stop(Some(failure));
    }
}

/// Publishes [`PipelineExit::Stopped`] unless an outcome is already there.
pub(crate) fn mark_stopped(exit: &watch::Sender<PipelineExit>) {
    exit.send_if_modified(|outcome| {
        let running = *outcome == PipelineExit::Running;
        if running {
            *outcome = PipelineExit::Stopped;
        }
        running
    });
}

/// Names a child by its role.
fn describe(cell: &ActorCell, children: &Children) -> &'static str {
    const ROLES: [&str; 5] = ["consumer", "parser", "sink", "dlq_writer", "committer"];
    children
        .all
        .iter()
        .position(|child| child.get_id() == cell.get_id())
        .map(|index| ROLES[index])
        .unwrap_or("unknown")
}

/// A running pipeline, as its owner sees it.
pub struct PipelineHandle {
    /// The supervisor, for `Status` and `Shutdown`.
    pub supervisor: ActorRef<PipelineMsg>,
    /// Completes when the supervisor has stopped.
    pub join: tokio::task::JoinHandle<()>,
    /// How the pipeline ended (or `Running`).
    pub exit: watch::Receiver<PipelineExit>,
}

impl PipelineHandle {
    /// The current status.
    pub async fn status(&self) -> Result<PipelineStatus, ractor::RactorErr<PipelineMsg>> {
        ractor::call!(self.supervisor, PipelineMsg::Status)
    }

    /// Drains and stops, then waits for the supervisor to end.
    pub async fn shutdown(self) -> PipelineExit {
        let _ = ractor::call!(self.supervisor, PipelineMsg::Shutdown);
        let _ = self.join.await;
        self.exit.borrow().clone()
    }
}

/// Why a pipeline could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A client could not be created or a child failed in its start.
    #[error("pipeline failed to start: {0}")]
    Spawn(String),
}

/// Starts a pipeline under a fresh supervisor.
pub async fn start_pipeline(config: PipelineConfig) -> Result<PipelineHandle, StartError> {
    let (exit_sender, exit_receiver) = watch::channel(PipelineExit::Running);
    let (supervisor, join) = Actor::spawn(
        None,
        PipelineSupervisor,
        PipelineArgs {
            config,
            exit: exit_sender,
        },
    )
    .await
    .map_err(|spawn_error| StartError::Spawn(startup_message(&spawn_error)))?;
    Ok(PipelineHandle {
        supervisor,
        join,
        exit: exit_receiver,
    })
}

/// The innermost message of a spawn error, which names what failed.
fn startup_message(spawn_error: &ractor::SpawnErr) -> String {
    match spawn_error {
        ractor::SpawnErr::StartupFailed(inner) => {
            // A child's start failure arrives wrapped in the supervisor's.
            match inner.downcast_ref::<ractor::SpawnErr>() {
                Some(child_error) => startup_message(child_error),
                None => error_chain(inner.as_ref()),
            }
        }
        other => other.to_string(),
    }
}

/// An error and its causes, joined with ": ", skipping causes the message
/// already repeats.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = inner.source();
    }
    message
}
