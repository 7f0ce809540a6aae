//! Bounded mailboxes on top of ractor's unbounded ones.
//!
//! ractor's mailboxes have no capacity, so a fast producer can fill memory
//! with messages a slow actor has not handled yet. The bound here is a
//! semaphore of `capacity` permits per receiving actor: a sender must acquire
//! a [`MailboxPermit`] before it casts, the permit travels inside the message,
//! and it is released when the receiver drops the message after handling it.
//! A full receiver therefore makes its sender wait in [`BoundedSender::send`],
//! and because every actor on the data path sends this way, the wait reaches
//! back to the consumer, which then stops pulling from Kafka.
//!
//! Command messages (ticks, stops, queries) bypass the bound by casting on the
//! plain `ActorRef`.
//!
//! Depth is counted by the permit itself (increment on acquire, decrement on
//! drop), independently of the semaphore, so that the observed maximum would
//! show a broken bound.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ractor::{ActorRef, Message};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics as names;

/// Live figures of one mailbox, shared by its senders and observers.
#[derive(Debug)]
pub struct MailboxStats {
    /// The receiving actor's name, used as the `actor` label.
    pub actor: &'static str,
    /// The most messages allowed in the mailbox at once.
    pub capacity: usize,
    /// Messages sent and not yet handled.
    depth: AtomicUsize,
    /// The highest depth ever seen.
    max_depth: AtomicUsize,
    /// Messages sent in total.
    sent: AtomicU64,
    /// Nanoseconds senders spent waiting for a free slot.
    wait_nanos: AtomicU64,
}

impl MailboxStats {
    /// Messages currently queued or being handled.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// The highest depth observed since creation.
    pub fn max_depth(&self) -> usize {
        self.max_depth.load(Ordering::Relaxed)
    }

    /// Messages sent since creation.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Total time senders waited on a full mailbox, in seconds.
    pub fn wait_seconds(&self) -> f64 {
        self.wait_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }
}

/// The bound of one receiving actor: its permits and its figures.
#[derive(Debug, Clone)]
pub struct MailboxBound {
    /// One permit per message allowed in the mailbox.
    permits: Arc<Semaphore>,
    /// Figures shared with observers.
    stats: Arc<MailboxStats>,
}

impl MailboxBound {
    /// A bound of `capacity` messages for the actor called `actor`.
    ///
    /// A capacity of zero is raised to one: a mailbox that holds nothing
    /// would deadlock the pipeline.
    pub fn new(actor: &'static str, capacity: usize) -> MailboxBound {
        let capacity = capacity.max(1);
        metrics::gauge!(names::MAILBOX_CAPACITY, "actor" => actor).set(capacity as f64);
        metrics::gauge!(names::MAILBOX_DEPTH, "actor" => actor).set(0.0);
        metrics::counter!(names::MAILBOX_SEND_WAIT_MICROS, "actor" => actor).increment(0);
        MailboxBound {
            permits: Arc::new(Semaphore::new(capacity)),
            stats: Arc::new(MailboxStats {
                actor,
                capacity,
                depth: AtomicUsize::new(0),
                max_depth: AtomicUsize::new(0),
                sent: AtomicU64::new(0),
                wait_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// The figures of this mailbox.
    pub fn stats(&self) -> Arc<MailboxStats> {
        self.stats.clone()
    }

    /// Joins the bound to the actor that receives the messages.
    pub fn sender_for<M: Message>(&self, actor: ActorRef<M>) -> BoundedSender<M> {
        BoundedSender {
            actor,
            bound: self.clone(),
        }
    }

    async fn acquire(&self) -> Result<MailboxPermit, MailboxError> {
        let wait_started = Instant::now();
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let permit = self
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| MailboxError::Closed(self.stats.actor))?;
                let waited = wait_started.elapsed();
                self.stats
                    .wait_nanos
                    .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
                metrics::counter!(names::MAILBOX_SEND_WAIT_MICROS, "actor" => self.stats.actor)
                    .increment(waited.as_micros() as u64);
                permit
            }
        };
        let depth = self.stats.depth.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats.max_depth.fetch_max(depth, Ordering::Relaxed);
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(names::MAILBOX_DEPTH, "actor" => self.stats.actor).set(depth as f64);
        Ok(MailboxPermit {
            _permit: permit,
            stats: self.stats.clone(),
        })
    }
}

/// A slot in a bounded mailbox, carried inside the message it paid for.
/// Dropping it (when the receiver is done with the message) frees the slot.
#[derive(Debug)]
pub struct MailboxPermit {
    /// Held until the message is handled; dropping it returns the slot.
    _permit: OwnedSemaphorePermit,
    /// Where to count the slot's release.
    stats: Arc<MailboxStats>,
}

impl Drop for MailboxPermit {
    fn drop(&mut self) {
        let depth = self.stats.depth.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(names::MAILBOX_DEPTH, "actor" => self.stats.actor).set(depth as f64);
    }
}

/// Why a bounded send failed.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    /// The receiving actor has stopped; the message was not delivered.
    #[error("mailbox of actor {0} is closed: the actor has stopped")]
    Closed(&'static str),
}

/// A sender that waits for room before it casts.
#[derive(Debug)]
pub struct BoundedSender<M: Message> {
    /// The receiving actor.
    actor: ActorRef<M>,
    /// The receiver's permits and figures.
    bound: MailboxBound,
}

impl<M: Message> Clone for BoundedSender<M> {
    fn clone(&self) -> Self {
        BoundedSender {
            actor: self.actor.clone(),
            bound: self.bound.clone(),
        }
    }
}

impl<M: Message> BoundedSender<M> {
    /// Waits for a free slot, then casts the message `build` makes around the permit.
    pub async fn send(&self, build: impl FnOnce(MailboxPermit) -> M) -> Result<(), MailboxError> {
        let permit = self.bound.acquire().await?;
        self.actor
            .cast(build(permit))
            .map_err(|_| MailboxError::Closed(self.bound.stats.actor))
    }

    /// Waits for a free slot and takes it, to send into later with
    /// [`BoundedSender::cast`]. Cancel-safe: nothing is taken unless it returns.
    pub async fn reserve(&self) -> Result<MailboxPermit, MailboxError> {
        self.bound.acquire().await
    }

    /// Casts a message built around a slot taken with [`BoundedSender::reserve`].
    pub fn cast(&self, message: M) -> Result<(), MailboxError> {
        self.actor
            .cast(message)
            .map_err(|_| MailboxError::Closed(self.bound.stats.actor))
    }

    /// The receiving actor, for command messages that bypass the bound.
    pub fn actor(&self) -> &ActorRef<M> {
        &self.actor
    }

    /// The receiver's figures.
    pub fn stats(&self) -> Arc<MailboxStats> {
        self.bound.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::{Actor, ActorProcessingErr};
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// Holds each message until the test releases it.
    struct GateActor;

    struct GatedMessage {
        value: u32,
        _permit: MailboxPermit,
    }

    struct GateState {
        release: Arc<tokio::sync::Semaphore>,
        handled: mpsc::UnboundedSender<u32>,
    }

    impl Actor for GateActor {
        type Msg = GatedMessage;
        type State = GateState;
        type Arguments = GateState;

        async fn pre_start(
            &self,
            _myself: ActorRef<Self::Msg>,
            args: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(args)
        }

        async fn handle(
            &self,
            _myself: ActorRef<Self::Msg>,
            message: Self::Msg,
            state: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            state.release.acquire().await?.forget();
            let _ = state.handled.send(message.value);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_full_mailbox_makes_the_sender_wait_until_the_receiver_catches_up() {
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let (handled_sender, mut handled_receiver) = mpsc::unbounded_channel();
        let (actor, handle) = Actor::spawn(
            None,
            GateActor,
            GateState {
                release: release.clone(),
                handled: handled_sender,
            },
        )
        .await
        .expect("spawn");
        let bound = MailboxBound::new("gate", 2);
        let sender = bound.sender_for(actor.clone());

        // Two slots: two sends complete at once (one being handled, one queued).
        for value in 0..2 {
            sender
                .send(|permit| GatedMessage {
                    value,
                    _permit: permit,
                })
                .await
                .expect("send");
        }
        assert_eq!(bound.stats().depth(), 2);

        // The third send must wait while the receiver is stuck.
        let third_sender = sender.clone();
        let mut third = tokio::spawn(async move {
            third_sender
                .send(|permit| GatedMessage {
                    value: 2,
                    _permit: permit,
                })
                .await
        });
        let still_waiting = tokio::time::timeout(Duration::from_millis(200), &mut third).await;
        assert!(
            still_waiting.is_err(),
            "send completed although the mailbox was full"
        );
        assert_eq!(bound.stats().max_depth(), 2);

        // Let the receiver handle one message: the third send goes through.
        release.add_permits(1);
        assert_eq!(handled_receiver.recv().await, Some(0));
        third.await.expect("join").expect("send");
        release.add_permits(2);
        assert_eq!(handled_receiver.recv().await, Some(1));
        assert_eq!(handled_receiver.recv().await, Some(2));
        assert!(bound.stats().max_depth() <= 2);
        assert!(bound.stats().wait_seconds() > 0.0);
        assert_eq!(bound.stats().sent(), 3);

        actor.stop(None);
        handle.await.expect("actor stops");
        // Every permit was returned when its message was dropped.
        assert_eq!(bound.stats().depth(), 0);
    }

    #[tokio::test]
    async fn sending_to_a_stopped_actor_is_an_error() {
        let (handled_sender, _handled_receiver) = mpsc::unbounded_channel();
        let (actor, handle) = Actor::spawn(
            None,
            GateActor,
            GateState {
                release: Arc::new(tokio::sync::Semaphore::new(10)),
                handled: handled_sender,
            },
        )
        .await
        .expect("spawn");
        actor.stop(None);
        handle.await.expect("stopped");
        let sender = MailboxBound::new("gate", 1).sender_for(actor);
        let result = sender
            .send(|permit| GatedMessage {
                value: 0,
                _permit: permit,
            })
            .await;
        assert!(matches!(result, Err(MailboxError::Closed("gate"))));
    }
}
