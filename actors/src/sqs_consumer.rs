//! The SQS consumer: stores orders from a queue, and lets the broker
//! dead-letter the ones that keep failing.
//!
//! Upstream: an SQS queue (long-poll receive). Downstream: the PostgreSQL
//! `orders` table (idempotent by `order_id`).
//!
//! Each received message is processed in a task of its own, at most
//! `concurrency` at once (a semaphore permit per message). A message is
//! deleted only after its order is stored; a message that fails (poison) is
//! never deleted: its visibility is set to `retry_delay_seconds` so it comes
//! back, the broker counts the receive, and after `maxReceiveCount` receives
//! the broker moves it to the dead-letter queue by itself. While an order is
//! being stored, a heartbeat extends the message's visibility so slow work is
//! not redelivered under our feet.
//!
//! An order the parser accepts but the store refuses as data (a PostgreSQL
//! data exception, such as a NUL in a text field) is a failed message like a
//! malformed one: left for redelivery, and redriven by the broker. If storing
//! fails for an infrastructure reason (PostgreSQL gone), the actor fails and
//! its supervisor decides; the message was not deleted, so it comes back.
//! The failure counts per message id are bounded ([`FailureLog`]): a
//! message's entry goes when it is deleted, and the oldest go when the log is
//! full (a redriven message is never seen again). A crash after the store and before the delete redelivers a message
//! whose order is already stored: the insert does nothing the second time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use aws_sdk_sqs::Client;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::metrics as names;
use crate::order::parse_order;
use crate::sqs::{approximate_messages, classify, client, queue_url, SqsSettings};
use crate::storage::PostgresOrders;

/// How often the dead-letter queue's depth is read.
const REDRIVEN_REFRESH: Duration = Duration::from_secs(2);

/// What the SQS consumer starts with.
#[derive(Clone)]
pub struct SqsConsumerArgs {
    /// Endpoint, region, credentials.
    pub settings: SqsSettings,
    /// The queue to consume.
    pub queue: String,
    /// Its dead-letter queue, watched for the redriven count.
    pub dlq: String,
    /// Where orders are stored.
    pub postgres_url: String,
    /// The most messages processed at once.
    pub concurrency: usize,
    /// Long-poll wait per receive, seconds (0..=20).
    pub wait_time_seconds: i32,
    /// Visibility timeout asked for on receive and renewed while working, seconds.
    pub visibility_timeout_seconds: i32,
    /// After a failure, seconds until the message is visible again.
    pub retry_delay_seconds: i32,
    /// Test hook for crash windows: when set, each delete first takes a permit
    /// from this semaphore, so a test can hold a message between store and delete.
    pub delete_gate: Option<Arc<Semaphore>>,
}

impl std::fmt::Debug for SqsConsumerArgs {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SqsConsumerArgs")
            .field("queue", &self.queue)
            .field("dlq", &self.dlq)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// Messages the SQS consumer handles.
#[derive(Debug)]
pub enum SqsConsumerMsg {
    /// Receive the next batch (sent to itself).
    Receive,
    /// Read the dead-letter queue's depth (on a timer).
    RefreshRedriven,
    /// A processing task hit an infrastructure failure.
    TaskFailed(String),
    /// Report the counters.
    Status(RpcReplyPort<SqsConsumerStatus>),
}

/// The consumer's counters at a moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SqsConsumerStatus {
    /// Messages received (a redelivery counts again).
    pub received: u64,
    /// Orders stored (new or already there) and then deleted.
    pub processed: u64,
    /// Receives that failed processing (the message was left for redelivery).
    pub failed_receives: u64,
    /// Messages deleted.
    pub deleted: u64,
    /// Messages in the dead-letter queue, as last read.
    pub redriven: i64,
    /// Per message id, how many of its receives failed.
    pub failures_by_message: HashMap<String, u32>,
}

/// What every processing task shares.
struct TaskContext {
    args: SqsConsumerArgs,
    client: Client,
    queue_url: String,
    store: PostgresOrders,
    received: AtomicU64,
    processed: AtomicU64,
    failed_receives: AtomicU64,
    deleted: AtomicU64,
    /// Failed receives per message id, bounded.
    failures_by_message: Mutex<FailureLog>,
}

/// The SQS consumer's state.
pub struct SqsConsumerState {
    context: Arc<TaskContext>,
    /// One permit per message being processed.
    permits: Arc<Semaphore>,
    /// The processing tasks; dropped (aborted) with the actor.
    tasks: JoinSet<()>,
    /// The dead-letter queue's URL.
    dlq_url: String,
    /// Its depth as last read.
    redriven: i64,
}

/// The SQS consumer actor.
pub struct SqsConsumerActor;

impl Actor for SqsConsumerActor {
    type Msg = SqsConsumerMsg;
    type State = SqsConsumerState;
    type Arguments = SqsConsumerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        for counter in [
            names::SQS_RECEIVED,
            names::SQS_PROCESSED,
            names::SQS_FAILED_RECEIVES,
            names::SQS_DELETED,
            names::SQS_VISIBILITY_EXTENSIONS,
        ] {
            metrics::counter!(counter).increment(0);
        }
        let sqs = client(&args.settings);
        let main_url = queue_url(&sqs, &args.settings, &args.queue).await?;
        let dlq_url = queue_url(&sqs, &args.settings, &args.dlq).await?;
        let store = PostgresOrders::connect(&args.postgres_url).await?;
        myself.send_interval(REDRIVEN_REFRESH, || SqsConsumerMsg::RefreshRedriven);
        info!(queue = %args.queue, dlq = %args.dlq, concurrency = args.concurrency, "sqs consumer started");
        Ok(SqsConsumerState {
            permits: Arc::new(Semaphore::new(args.concurrency.max(1))),
            context: Arc::new(TaskContext {
                args,
                client: sqs,
                queue_url: main_url,
                store,
                received: AtomicU64::new(0),
                processed: AtomicU64::new(0),
                failed_receives: AtomicU64::new(0),
                deleted: AtomicU64::new(0),
                failures_by_message: Mutex::new(FailureLog::new(MAX_TRACKED_FAILURES)),
            }),
            tasks: JoinSet::new(),
            dlq_url,
            redriven: 0,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Read the dead-letter queue's depth once now, so the gauge exists from the start.
        myself.cast(SqsConsumerMsg::RefreshRedriven)?;
        myself.cast(SqsConsumerMsg::Receive)?;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SqsConsumerMsg::Receive => {
                while state.tasks.try_join_next().is_some() {}
                receive_batch(&myself, state).await?;
                myself.cast(SqsConsumerMsg::Receive)?;
            }
            SqsConsumerMsg::RefreshRedriven => {
                let context = &state.context;
                match approximate_messages(&context.client, &context.args.settings, &state.dlq_url)
                    .await
                {
                    Ok(depth) => {
                        state.redriven = depth;
                        metrics::gauge!(names::SQS_REDRIVEN, "queue" => context.args.dlq.clone())
                            .set(depth as f64);
                    }
                    Err(error) => warn!(%error, "cannot read dead-letter queue depth"),
                }
            }
            SqsConsumerMsg::TaskFailed(reason) => return Err(reason.into()),
            SqsConsumerMsg::Status(reply) => {
                let context = &state.context;
                let _ = reply.send(SqsConsumerStatus {
                    received: context.received.load(Ordering::Relaxed),
                    processed: context.processed.load(Ordering::Relaxed),
                    failed_receives: context.failed_receives.load(Ordering::Relaxed),
                    deleted: context.deleted.load(Ordering::Relaxed),
                    redriven: state.redriven,
                    failures_by_message: context
                        .failures_by_message
                        .lock()
                        .unwrap_or_else(|poison| poison.into_inner())
                        .counts(),
                });
            }
        }
        Ok(())
    }
}

/// Waits for at least one free slot, receives up to as many messages as there
/// are free slots (at most 10), and starts a task per message.
async fn receive_batch(
    myself: &ActorRef<SqsConsumerMsg>,
    state: &mut SqsConsumerState,
) -> Result<(), ActorProcessingErr> {
    let mut slots: Vec<OwnedSemaphorePermit> = vec![state.permits.clone().acquire_owned().await?];
    while slots.len() < 10 {
        match state.permits.clone().try_acquire_owned() {
            Ok(permit) => slots.push(permit),
            Err(_) => break,
        }
    }
    let context = state.context.clone();
    let output = context
        .client
        .receive_message()
        .queue_url(&context.queue_url)
        .max_number_of_messages(slots.len() as i32)
        .wait_time_seconds(context.args.wait_time_seconds)
        .visibility_timeout(context.args.visibility_timeout_seconds)
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .send()
        .await
        .map_err(|error| classify(&context.args.settings, "receive", error))?;
    for message in output.messages().iter().cloned() {
        let Some(permit) = slots.pop() else {
            break;
        };
        context.received.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::SQS_RECEIVED).increment(1);
        let task_context = context.clone();
        let supervisor = myself.clone();
        state.tasks.spawn(async move {
            if let Err(reason) = process_message(&task_context, message).await {
                let _ = supervisor.cast(SqsConsumerMsg::TaskFailed(reason));
            }
            drop(permit);
        });
    }
    Ok(())
}

/// Stores the order and deletes the message, or leaves a poison message for
/// redelivery. `Err` only for infrastructure failures.
async fn process_message(context: &TaskContext, message: Message) -> Result<(), String> {
    let message_id = message.message_id().unwrap_or_default().to_string();
    let receipt = message.receipt_handle().unwrap_or_default().to_string();
    let body = message.body().unwrap_or_default();
    let order = match parse_order(body) {
        Ok(order) => order,
        Err(reason) => {
            leave_for_redelivery(context, &message, "order rejected", &reason.to_string()).await;
            return Ok(());
        }
    };

    // The work (store, then the test gate if any), renewing the message's
    // visibility while it runs so slow work is not redelivered meanwhile.
    let work = async {
        match context.store.store(&order, &message_id).await {
            Ok(_) => {}
            Err(store_error) => {
                return match store_error.data_error() {
                    Some(refusal) => Ok(Some(refusal)),
                    None => Err(format!("storing order {}: {store_error}", order.order_id)),
                }
            }
        }
        if let Some(gate) = &context.args.delete_gate {
            gate.acquire()
                .await
                .map_err(|error| error.to_string())?
                .forget();
        }
        Ok::<Option<String>, String>(None)
    };
    tokio::pin!(work);
    let renew_every =
        Duration::from_secs((context.args.visibility_timeout_seconds.max(2) / 2) as u64);
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
    let refused = loop {
        tokio::select! {
            result = &mut work => break result?,
            _ = heartbeat.tick() => {
                if let Err(error) = context
                    .client
                    .change_message_visibility()
                    .queue_url(&context.queue_url)
                    .receipt_handle(&receipt)
                    .visibility_timeout(context.args.visibility_timeout_seconds)
                    .send()
                    .await
                {
                    warn!(%message_id, error = %classify(&context.args.settings, "extend visibility", error), "cannot extend visibility");
                }
                metrics::counter!(names::SQS_VISIBILITY_EXTENSIONS).increment(1);
            }
        }
    };
    if let Some(refusal) = refused {
        leave_for_redelivery(context, &message, "store refused the order", &refusal).await;
        return Ok(());
    }
    context
        .client
        .delete_message()
        .queue_url(&context.queue_url)
        .receipt_handle(&receipt)
        .send()
        .await
        .map_err(|error| classify(&context.args.settings, "delete message", error).to_string())?;
    context
        .failures_by_message
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .forget(&message_id);
    context.processed.fetch_add(1, Ordering::Relaxed);
    context.deleted.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(names::SQS_PROCESSED).increment(1);
    metrics::counter!(names::SQS_DELETED).increment(1);
    Ok(())
}

/// Counts a failed receive and makes the message visible again after the
/// retry delay. Never deletes it: after `maxReceiveCount` receives the broker
/// moves it to the dead-letter queue.
async fn leave_for_redelivery(context: &TaskContext, message: &Message, what: &str, reason: &str) {
    let message_id = message.message_id().unwrap_or_default();
    let receipt = message.receipt_handle().unwrap_or_default();
    let receive_count = message
        .attributes()
        .and_then(|attributes| attributes.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .cloned()
        .unwrap_or_default();
    warn!(%message_id, %reason, receive_count, "{what}; leaving it for redelivery");
    context.failed_receives.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(names::SQS_FAILED_RECEIVES).increment(1);
    context
        .failures_by_message
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .failed(message_id);
    if let Err(error) = context
        .client
        .change_message_visibility()
        .queue_url(&context.queue_url)
        .receipt_handle(receipt)
        .visibility_timeout(context.args.retry_delay_seconds)
        .send()
        .await
    {
        warn!(%message_id, error = %classify(&context.args.settings, "change visibility", error), "cannot shorten visibility");
    }
}

/// The most message ids whose failures are remembered.
pub const MAX_TRACKED_FAILURES: usize = 10_000;

/// Failed receives per message id, at most `capacity` ids: when full, the
/// half whose last failure is oldest is forgotten.
#[derive(Debug)]
pub struct FailureLog {
    capacity: usize,
    /// Per id: failures, and when the last one was (a sequence number).
    entries: HashMap<String, (u32, u64)>,
    next_sequence: u64,
}

impl FailureLog {
    /// An empty log holding at most `capacity` ids.
    pub fn new(capacity: usize) -> FailureLog {
        FailureLog {
            capacity: capacity.max(2),
            entries: HashMap::new(),
            next_sequence: 0,
        }
    }

    /// Counts one failed receive of `message_id`.
    pub fn failed(&mut self, message_id: &str) {
        self.next_sequence += 1;
        let entry = self.entries.entry(message_id.to_string()).or_insert((0, 0));
        entry.0 += 1;
        entry.1 = self.next_sequence;
        if self.entries.len() > self.capacity {
            let mut sequences: Vec<u64> = self
                .entries
                .values()
                .map(|(_, sequence)| *sequence)
                .collect();
            sequences.sort_unstable();
            let keep_from = sequences[sequences.len() - self.capacity / 2];
            self.entries
                .retain(|_, (_, sequence)| *sequence >= keep_from);
        }
    }

    /// Forgets a message (deleted: it will not come back).
    pub fn forget(&mut self, message_id: &str) {
        self.entries.remove(message_id);
    }

    /// Failures per message id.
    pub fn counts(&self) -> HashMap<String, u32> {
        self.entries
            .iter()
            .map(|(id, (count, _))| (id.clone(), *count))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::FailureLog;

    #[test]
    fn the_failure_log_stays_bounded_and_keeps_the_newest() {
        let mut log = FailureLog::new(100);
        log.failed("poison");
        log.failed("poison");
        for index in 0..10_000 {
            log.failed(&format!("message-{index}"));
            assert!(log.counts().len() <= 100);
        }
        let counts = log.counts();
        assert!(counts.contains_key("message-9999"));
        assert!(!counts.contains_key("poison"), "oldest forgotten");
        log.failed("again");
        log.failed("again");
        assert_eq!(log.counts()["again"], 2);
        log.forget("again");
        assert!(!log.counts().contains_key("again"));
    }
}
