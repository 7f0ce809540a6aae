//! Supervision of the pipeline.
//!
//! The tree: [`root::RootSupervisor`] owns one [`PipelineSupervisor`] per
//! pipeline and escalates when one does (the process then exits non-zero, so
//! that Kubernetes restarts the pod). The pipeline supervisor owns the shared
//! clients (checkpoint store, DLQ producer) and the five actors, linked to
//! itself and joined with bounded mailboxes. It is the only place that knows
//! the wiring.
//!
//! Restart policy: one for all. When a child fails (an error, a panic) or
//! stops when nobody asked it to, the supervisor kills the other four, flushes
//! the DLQ producer, waits a backoff (exponential with jitter) and starts all
//! five again. All five, because the dead child's mailbox is lost and with it
//! records the others already tracked: only a restart from the persisted
//! checkpoint (the Kafka client, which stays in the group, is rewound to the
//! checkpoint) puts them back, and the idempotent sinks and the DLQ writer's
//! index absorb the replay. A restart intensity bounds this: more than
//! `max_restarts` restarts within `window` and the supervisor escalates
//! ([`PipelineExit::Failed`]) instead. Restart counts per actor are in
//! [`PipelineStatus`] and in `stream_actor_restarts_total{actor}`.
//!
//! [`solo::SoloSupervisor`] escalates on a single actor's failure (the SQS
//! consumer, whose messages the broker redelivers).
//!
//! A graceful [`PipelineMsg::Shutdown`] stops the consumer first, waits for
//! everything in flight to be acknowledged, persists a last checkpoint, then
//! stops the rest.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod root;
pub mod solo;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rand::Rng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, Producer};
use stream_actors::budget::ByteBudget;
use stream_actors::committer::{CommitterActor, CommitterArgs, CommitterMsg, CommitterStatus};
use stream_actors::consumer::{
    create_consumer, membership, CheckpointingContext, ConsumerActor, ConsumerArgs, ConsumerMsg,
    Membership,
};
use stream_actors::dlq_writer::{create_dlq_producer, DlqWriterActor, DlqWriterArgs};
use stream_actors::faults::{Faults, Injected};
use stream_actors::mailbox::{MailboxBound, MailboxError, MailboxStats};
use stream_actors::parse::ParseRules;
use stream_actors::parser::{ParserActor, ParserArgs};
use stream_actors::progress::Progress;
use stream_actors::sink::{SinkActor, SinkArgs};
use stream_actors::storage::{CheckpointStore, DlqIndex};
use stream_actors::PipelineConfig;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// How long a graceful shutdown waits for in-flight records.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// The pipeline's actors, in start order of the data path.
pub const ACTORS: [&str; 5] = ["consumer", "parser", "sink", "dlq_writer", "committer"];

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

/// When to restart and when to give up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartPolicy {
    /// At most this many restarts...
    pub max_restarts: usize,
    /// ...within this window; one more and the supervisor escalates.
    pub window: Duration,
    /// The first restart waits this long (plus or minus 20 % jitter).
    pub first_backoff: Duration,
    /// Each further restart in the window waits twice as long, up to this.
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 10,
            window: Duration::from_secs(60),
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RestartPolicy {
    /// The wait before restart number `recent` (1-based) within the window.
    pub fn backoff(&self, recent: usize) -> Duration {
        let doublings = recent.saturating_sub(1).min(16) as u32;
        let base = self
            .first_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff);
        base.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
    }
}

/// How to take an actor down on request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillMode {
    /// Abort it where it stands (ractor's kill).
    Kill,
    /// Make it panic at the start of its next message.
    Panic,
    /// Make it hold its next message forever (the watchdog restarts it).
    Hang,
}

/// Messages the pipeline supervisor handles.
#[derive(Debug)]
pub enum PipelineMsg {
    /// Drain and stop; replies when done.
    Shutdown(RpcReplyPort<()>),
    /// Report mailboxes, committer progress and restarts.
    Status(RpcReplyPort<PipelineStatus>),
    /// Kill (or make panic) a child by name; replies with what was done.
    Kill(String, KillMode, RpcReplyPort<Result<String, String>>),
    /// The backoff is over: start the children again.
    Restart,
    /// Time to look for hung actors.
    Watchdog,
}

/// A snapshot of a running pipeline.
#[derive(Debug, Clone)]
pub struct PipelineStatus {
    /// Whether all five actors are running (false while restarting).
    pub ready: bool,
    /// The consumer's place in its group (readiness needs it to consume).
    pub group: Membership,
    /// Per data mailbox: actor, depth, capacity, max depth.
    pub mailboxes: Vec<MailboxSnapshot>,
    /// The committer's progress (default while restarting).
    pub committer: CommitterStatus,
    /// Restarts caused by each actor, for every actor.
    pub restarts: BTreeMap<&'static str, u64>,
    /// How many times the children were started (1 + restarts).
    pub generation: u64,
    /// Actors holding a message without progress for more than half the
    /// stall limit: `/healthz` fails; at the limit the watchdog restarts them.
    pub stalled: Vec<&'static str>,
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

/// The children of one pipeline, one generation.
struct Children {
    consumer: ActorRef<ConsumerMsg>,
    committer: ActorRef<CommitterMsg>,
    /// The Kafka consumer, to detach its revoke hook before teardown.
    kafka_consumer: Arc<BaseConsumer<CheckpointingContext>>,
    /// Everything, in [`ACTORS`] order.
    all: Vec<ActorCell>,
    /// The data mailboxes' figures.
    mailboxes: Vec<Arc<MailboxStats>>,
    /// What each actor tells the watchdog, in [`ACTORS`] order.
    progress: Vec<Arc<Progress>>,
}

impl Children {
    /// The actors holding a message without progress for longer than `limit`.
    fn stalled(&self, limit: Duration) -> Vec<(usize, Duration)> {
        self.progress
            .iter()
            .enumerate()
            .filter_map(|(index, progress)| {
                progress
                    .stalled_for()
                    .filter(|stalled| *stalled > limit)
                    .map(|stalled| (index, stalled))
            })
            .collect()
    }

    /// The role of a cell of this generation.
    fn role(&self, cell: &ActorCell) -> Option<&'static str> {
        self.all
            .iter()
            .position(|child| child.get_id() == cell.get_id())
            .map(|index| ACTORS[index])
    }

    /// Kills every child and waits (bounded) for each to end.
    async fn kill_all(self) {
        self.kafka_consumer.context().detach_committer();
        for child in &self.all {
            child.kill();
        }
        for child in &self.all {
            let _ = child.wait(Some(Duration::from_secs(10))).await;
        }
    }
}

/// What every generation of children is built from.
struct Shared {
    config: PipelineConfig,
    store: Arc<CheckpointStore>,
    /// The DLQ index, shared by the DLQ writers of every generation.
    dlq_index: Arc<DlqIndex>,
    producer: FutureProducer,
    faults: Arc<Faults>,
    /// The Kafka consumer client. It outlives the generations of children,
    /// so an actor restart is a rewind, not a leave and a rejoin; it is
    /// replaced only when the consumer asks for a fresh membership.
    kafka: Option<Arc<BaseConsumer<CheckpointingContext>>>,
}

impl Shared {
    /// Spawns the five children linked to `supervisor`. If one fails to
    /// start, the ones already started are killed.
    async fn spawn_children(
        &mut self,
        supervisor: ActorCell,
    ) -> Result<Children, ActorProcessingErr> {
        let kafka_consumer = match &self.kafka {
            Some(client) => client.clone(),
            None => {
                let client = create_consumer(&self.config, self.store.clone())?;
                self.kafka = Some(client.clone());
                client
            }
        };
        let mut started: Vec<ActorCell> = Vec::new();
        let result = self
            .spawn_into(supervisor, kafka_consumer, &mut started)
            .await;
        if result.is_err() {
            for cell in &started {
                cell.kill();
            }
        }
        result
    }

    async fn spawn_into(
        &self,
        supervisor: ActorCell,
        kafka_consumer: Arc<BaseConsumer<CheckpointingContext>>,
        started: &mut Vec<ActorCell>,
    ) -> Result<Children, ActorProcessingErr> {
        let config = &self.config;
        // One per actor, in ACTORS order: consumer, parser, sink, dlq_writer, committer.
        let progress: Vec<Arc<Progress>> =
            ACTORS.iter().map(|_| Arc::new(Progress::new())).collect();
        let progress_of = |actor: &str| {
            progress[ACTORS
                .iter()
                .position(|name| *name == actor)
                .expect("an actor")]
            .clone()
        };
        let (committer, _) = Actor::spawn_linked(
            None,
            CommitterActor,
            CommitterArgs {
                group_id: config.group_id.clone(),
                topic: config.topic.clone(),
                store: self.store.clone(),
                consumer: kafka_consumer.clone(),
                commit_interval: config.commit_interval,
                faults: self.faults.clone(),
                progress: progress_of("committer"),
            },
            supervisor.clone(),
        )
        .await?;
        started.push(committer.get_cell());
        kafka_consumer.context().attach_committer(committer.clone());
        let dlq_bound = MailboxBound::new("dlq_writer", config.mailbox_capacity);
        let (dlq_writer, _) = Actor::spawn_linked(
            None,
            DlqWriterActor,
            DlqWriterArgs {
                producer: self.producer.clone(),
                source_topic: config.topic.clone(),
                dlq_topic: config.dlq_topic.clone(),
                committer: committer.clone(),
                brokers: config.brokers.clone(),
                index: config.dedup.then(|| self.dlq_index.clone()),
                faults: self.faults.clone(),
                progress: progress_of("dlq_writer"),
                spans: config.spans.clone(),
            },
            supervisor.clone(),
        )
        .await?;
        started.push(dlq_writer.get_cell());
        let sink_bound = MailboxBound::new("sink", config.mailbox_capacity);
        let (sink, _) = Actor::spawn_linked(
            None,
            SinkActor,
            SinkArgs {
                config: config.clone(),
                committer: committer.clone(),
                dlq_writer: dlq_bound.sender_for(dlq_writer.clone()),
                faults: self.faults.clone(),
                progress: progress_of("sink"),
            },
            supervisor.clone(),
        )
        .await?;
        started.push(sink.get_cell());
        let parser_bound = MailboxBound::new("parser", config.mailbox_capacity);
        let mut rules = ParseRules::with_now(0);
        rules.accepted_schema_versions = config.accepted_schema_versions.clone();
        rules.max_record_bytes = config.max_record_bytes;
        rules.max_field_bytes = config.max_field_bytes;
        let (parser, _) = Actor::spawn_linked(
            None,
            ParserActor,
            ParserArgs {
                rules,
                sink: sink_bound.sender_for(sink.clone()),
                dlq_writer: dlq_bound.sender_for(dlq_writer.clone()),
                faults: self.faults.clone(),
                progress: progress_of("parser"),
            },
            supervisor.clone(),
        )
        .await?;
        started.push(parser.get_cell());
        let (consumer, _) = Actor::spawn_linked(
            None,
            ConsumerActor,
            ConsumerArgs {
                consumer: kafka_consumer.clone(),
                topic: config.topic.clone(),
                batch_size: config.batch_size,
                parser: parser_bound.sender_for(parser.clone()),
                budget: ByteBudget::new(config.max_in_flight_bytes),
                committer: committer.clone(),
                dlq_writer: dlq_writer.clone(),
                faults: self.faults.clone(),
                progress: progress_of("consumer"),
            },
            supervisor,
        )
        .await?;
        started.push(consumer.get_cell());
        Ok(Children {
            all: vec![
                consumer.get_cell(),
                parser.get_cell(),
                sink.get_cell(),
                dlq_writer.get_cell(),
                committer.get_cell(),
            ],
            consumer,
            committer,
            kafka_consumer,
            mailboxes: vec![parser_bound.stats(), sink_bound.stats(), dlq_bound.stats()],
            progress,
        })
    }

    /// Closes the Kafka consumer client if the last generation asked for a
    /// fresh one (or `always`): it leaves the group, and the next generation
    /// joins with a new client.
    async fn close_consumer_client(&mut self, always: bool) {
        let rejoin = self
            .kafka
            .as_ref()
            .is_some_and(|client| client.context().rejoin_requested());
        if !(always || rejoin) {
            return;
        }
        if let Some(client) = self.kafka.take() {
            if rejoin {
                info!("closing the Kafka consumer; the next generation rejoins the group");
            }
            // Dropping the last handle closes it: a blocking leave.
            let _ = tokio::task::spawn_blocking(move || drop(client)).await;
        }
    }

    /// Waits (bounded) for the DLQ producer's deliveries in flight, so that
    /// an intent the next generation finds unconfirmed was either delivered
    /// or not, not still on its way.
    async fn flush_producer(&self) {
        let producer = self.producer.clone();
        let flushed =
            tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
        if !matches!(flushed, Ok(Ok(()))) {
            warn!(
                ?flushed,
                "DLQ producer flush before restart did not complete"
            );
        }
    }
}

/// The pipeline supervisor's state.
pub struct PipelineState {
    shared: Shared,
    policy: RestartPolicy,
    /// The running generation; `None` while restarting.
    children: Option<Children>,
    /// The last generation's mailboxes (for status while restarting).
    mailboxes: Vec<Arc<MailboxStats>>,
    /// Set once a shutdown was asked for: children stopping is then expected.
    shutting_down: bool,
    /// Where the outcome is published.
    exit: watch::Sender<PipelineExit>,
    /// When the recent restarts happened (within the policy's window).
    recent_restarts: VecDeque<Instant>,
    /// Restarts caused by each actor.
    restarts: BTreeMap<&'static str, u64>,
    generation: u64,
}

impl PipelineState {
    /// Counts a restart; escalates when the intensity is exceeded, otherwise
    /// tears down what is left and schedules the restart after a backoff.
    async fn restart_after(
        &mut self,
        myself: &ActorRef<PipelineMsg>,
        role: &'static str,
        failure: String,
    ) {
        let now = Instant::now();
        while self
            .recent_restarts
            .front()
            .is_some_and(|at| now.duration_since(*at) > self.policy.window)
        {
            self.recent_restarts.pop_front();
        }
        if self.recent_restarts.len() >= self.policy.max_restarts {
            escalate(
                myself,
                &mut self.shutting_down,
                &self.exit,
                format!(
                    "{failure}; more than {} restarts within {:?}, giving up",
                    self.policy.max_restarts, self.policy.window
                ),
            );
            return;
        }
        self.recent_restarts.push_back(now);
        *self.restarts.entry(role).or_default() += 1;
        metrics::counter!(stream_actors::metrics::ACTOR_RESTARTS, "actor" => role).increment(1);
        metrics::counter!(stream_actors::metrics::PIPELINE_RESTARTS).increment(1);
        let backoff = self.policy.backoff(self.recent_restarts.len());
        warn!(%failure, actor = role, backoff_ms = backoff.as_millis() as u64, "restarting the pipeline from the checkpoint");
        if let Some(children) = self.children.take() {
            children.kill_all().await;
        }
        self.shared.close_consumer_client(false).await;
        self.shared.flush_producer().await;
        myself.send_after(backoff, || PipelineMsg::Restart);
    }
}

/// What the pipeline supervisor starts with.
pub struct PipelineArgs {
    /// The validated configuration.
    pub config: PipelineConfig,
    /// When to restart and when to escalate.
    pub policy: RestartPolicy,
    /// Injected faults (none in production unless `STREAM_CRASH_AT` is set).
    pub faults: Arc<Faults>,
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
        stream_actors::kafka::check_access(
            &config.brokers,
            &[&config.topic, &config.dlq_topic],
            stream_actors::kafka::PROBE_TIMEOUT,
        )?;
        stream_actors::kafka::check_group(
            &config.brokers,
            &config.group_id,
            &config.topic,
            stream_actors::kafka::PROBE_TIMEOUT,
        )?;
        let store =
            Arc::new(CheckpointStore::connect(&config.postgres_url, config.service_timeout).await?);
        let dlq_index = Arc::new(
            DlqIndex::connect(
                &config.postgres_url,
                config.service_timeout,
                &config.group_id,
                &config.topic,
            )
            .await?,
        );
        let producer = create_dlq_producer(&config.brokers)?;
        let mut shared = Shared {
            config,
            store,
            dlq_index,
            producer,
            faults: args.faults,
            kafka: None,
        };
        let children = shared.spawn_children(myself.get_cell()).await?;
        for actor in ACTORS {
            metrics::counter!(stream_actors::metrics::ACTOR_RESTARTS, "actor" => actor)
                .increment(0);
            metrics::counter!(stream_actors::metrics::ACTOR_STALLS, "actor" => actor).increment(0);
        }
        let look_every = (shared.config.stall_timeout / 4).max(Duration::from_millis(100));
        myself.send_interval(look_every, || PipelineMsg::Watchdog);
        metrics::counter!(stream_actors::metrics::PIPELINE_RESTARTS).increment(0);
        info!(topic = %shared.config.topic, group = %shared.config.group_id, "pipeline started");
        Ok(PipelineState {
            mailboxes: children.mailboxes.clone(),
            children: Some(children),
            shared,
            policy: args.policy,
            shutting_down: false,
            exit: args.exit,
            recent_restarts: VecDeque::new(),
            restarts: ACTORS.iter().map(|actor| (*actor, 0)).collect(),
            generation: 1,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(children) = state.children.take() {
            children.kafka_consumer.context().detach_committer();
            for child in &children.all {
                child.stop(None);
            }
        }
        state.shared.close_consumer_client(true).await;
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
                let committer = match &state.children {
                    Some(children) => {
                        ractor::call_t!(children.committer, CommitterMsg::Status, 5_000)
                            .unwrap_or_default()
                    }
                    None => CommitterStatus::default(),
                };
                let group = match &state.shared.kafka {
                    Some(client) => {
                        let client = client.clone();
                        let group_id = state.shared.config.group_id.clone();
                        tokio::task::spawn_blocking(move || membership::current(&client, &group_id))
                            .await
                            .unwrap_or(Membership::Unknown)
                    }
                    None => Membership::Unknown,
                };
                let _ = reply.send(PipelineStatus {
                    ready: state.children.is_some() && !state.shutting_down,
                    group,
                    mailboxes: state
                        .mailboxes
                        .iter()
                        .map(|stats| stats.as_ref().into())
                        .collect(),
                    committer,
                    restarts: state.restarts.clone(),
                    generation: state.generation,
                    stalled: state
                        .children
                        .as_ref()
                        .map(|children| {
                            children
                                .stalled(state.shared.config.stall_timeout / 2)
                                .into_iter()
                                .map(|(index, _)| ACTORS[index])
                                .collect()
                        })
                        .unwrap_or_default(),
                });
            }
            PipelineMsg::Kill(actor, mode, reply) => {
                let outcome = match (
                    &state.children,
                    ACTORS.iter().position(|name| *name == actor),
                ) {
                    (_, None) => Err(format!(
                        "no actor named {actor:?}; the actors are {}",
                        ACTORS.join(", ")
                    )),
                    (None, Some(_)) => Err("the pipeline is restarting; try again".to_string()),
                    (Some(children), Some(index)) => match mode {
                        KillMode::Kill => {
                            warn!(actor, "killing actor on request");
                            children.all[index].kill();
                            Ok(format!("killed {actor}"))
                        }
                        KillMode::Panic => {
                            warn!(actor, "actor will panic at its next message, on request");
                            state.shared.faults.arm(&actor, Injected::Panic);
                            Ok(format!("{actor} will panic at its next message"))
                        }
                        KillMode::Hang => {
                            warn!(actor, "actor will hang at its next message, on request");
                            state.shared.faults.arm(&actor, Injected::Hang);
                            Ok(format!("{actor} will hang at its next message"))
                        }
                    },
                };
                let _ = reply.send(outcome);
            }
            PipelineMsg::Restart => {
                if state.shutting_down || state.children.is_some() {
                    return Ok(());
                }
                match state.shared.spawn_children(myself.get_cell()).await {
                    Ok(children) => {
                        state.generation += 1;
                        state.mailboxes = children.mailboxes.clone();
                        state.children = Some(children);
                        info!(generation = state.generation, "pipeline restarted");
                    }
                    Err(start_error) => {
                        let failure = format!("restart failed: {start_error}");
                        state.restart_after(&myself, "supervisor", failure).await;
                    }
                }
            }
            PipelineMsg::Watchdog => {
                if state.shutting_down {
                    return Ok(());
                }
                let limit = state.shared.config.stall_timeout;
                if let Some(children) = &state.children {
                    if let Some((index, stalled)) = children.stalled(limit).into_iter().next() {
                        let actor = ACTORS[index];
                        error!(
                            actor,
                            stalled_ms = stalled.as_millis() as u64,
                            limit_ms = limit.as_millis() as u64,
                            "actor holds a message without progress past the stall limit; restarting it as hung"
                        );
                        metrics::counter!(stream_actors::metrics::ACTOR_STALLS, "actor" => actor)
                            .increment(1);
                        // Its termination restarts the pipeline, counted against it.
                        children.all[index].kill();
                    }
                }
            }
            PipelineMsg::Shutdown(reply) => {
                state.shutting_down = true;
                info!("pipeline shutting down: stopping intake");
                if let Some(children) = &state.children {
                    let _ = children
                        .consumer
                        .stop_and_wait(None, Some(Duration::from_secs(10)))
                        .await;
                    let deadline = Instant::now() + DRAIN_DEADLINE;
                    loop {
                        let status = ractor::call!(children.committer, CommitterMsg::Status)?;
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
                    ractor::call!(children.committer, CommitterMsg::Flush)?;
                    info!("pipeline drained and checkpointed");
                }
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
        if state.shutting_down {
            return Ok(());
        }
        let (cell, failure, blamed) = match event {
            SupervisionEvent::ActorFailed(cell, reason) => {
                // A send into a stopped actor's mailbox fails its sender,
                // whose failure can arrive first: the restart is the stopped
                // actor's.
                let blamed = match reason.downcast_ref::<MailboxError>() {
                    Some(MailboxError::Closed(actor)) => {
                        ACTORS.iter().copied().find(|name| name == actor)
                    }
                    None => None,
                };
                (cell, format!("failed: {reason}"), blamed)
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                format!(
                    "stopped unexpectedly ({})",
                    reason.unwrap_or_else(|| "no reason".to_string())
                ),
                None,
            ),
            _ => return Ok(()),
        };
        // Only this generation's children count: the others were killed by us.
        let Some(role) = state
            .children
            .as_ref()
            .and_then(|children| children.role(&cell))
        else {
            return Ok(());
        };
        let failure = format!("actor {role} {failure}");
        let role = blamed.unwrap_or(role);
        state.restart_after(&myself, role, failure).await;
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
        escalate(myself, shutting_down, exit, failure);
    }
}

/// Publishes the failure and stops the supervisor (its owner exits non-zero).
fn escalate<M: ractor::Message>(
    myself: &ActorRef<M>,
    shutting_down: &mut bool,
    exit: &watch::Sender<PipelineExit>,
    failure: String,
) {
    error!(%failure, "supervisor escalating");
    *shutting_down = true;
    exit.send_replace(PipelineExit::Failed(failure.clone()));
    myself.stop(Some(failure));
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

/// A running pipeline, as its owner sees it.
pub struct PipelineHandle {
    /// The pipeline supervisor, for `Status`, `Kill` and `Shutdown`.
    pub supervisor: ActorRef<PipelineMsg>,
    /// Completes when the root supervisor has stopped.
    pub join: tokio::task::JoinHandle<()>,
    /// How the tree ended (or `Running`), as the root publishes it.
    pub exit: watch::Receiver<PipelineExit>,
}

impl PipelineHandle {
    /// The current status.
    pub async fn status(&self) -> Result<PipelineStatus, ractor::RactorErr<PipelineMsg>> {
        ractor::call!(self.supervisor, PipelineMsg::Status)
    }

    /// Kills an actor (or makes it panic at its next message).
    pub async fn kill(&self, actor: &str, mode: KillMode) -> Result<String, String> {
        ractor::call_t!(
            self.supervisor,
            PipelineMsg::Kill,
            10_000,
            actor.to_string(),
            mode
        )
        .map_err(|call_error| format!("supervisor did not answer: {call_error}"))?
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

/// Starts a pipeline under a fresh supervisor, with the default restart
/// policy and no injected faults.
pub async fn start_pipeline(config: PipelineConfig) -> Result<PipelineHandle, StartError> {
    start_pipeline_with(config, RestartPolicy::default(), Arc::new(Faults::none())).await
}

/// Starts a pipeline under a fresh supervisor.
pub async fn start_pipeline_with(
    config: PipelineConfig,
    policy: RestartPolicy,
    faults: Arc<Faults>,
) -> Result<PipelineHandle, StartError> {
    let (exit_sender, exit_receiver) = watch::channel(PipelineExit::Running);
    let (started_sender, started) = watch::channel(Vec::new());
    let (_root, join) = Actor::spawn(
        None,
        root::RootSupervisor,
        root::RootArgs {
            pipelines: vec![PipelineArgs {
                config,
                policy,
                faults,
                exit: watch::channel(PipelineExit::Running).0,
            }],
            exit: exit_sender,
            started: started_sender,
        },
    )
    .await
    .map_err(|spawn_error| StartError::Spawn(startup_message(&spawn_error)))?;
    let supervisor = started
        .borrow()
        .first()
        .cloned()
        .ok_or_else(|| StartError::Spawn("the root started no pipeline".to_string()))?;
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
