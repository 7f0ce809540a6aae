//! Progress tracking for the watchdog, after Quickwit's `record_progress`.
//!
//! Each actor owns a [`Progress`]. While it works on a message it holds a
//! [`Working`] guard, and it calls [`Progress::record`] whenever it gets
//! somewhere (a write attempt returned, a retry began). Waiting that is not
//! a hang (for a permit of a full downstream mailbox: that is backpressure)
//! goes through [`Progress::protect`]. The pipeline supervisor looks at every
//! actor's progress on a timer: an actor that has held a message without
//! progress for longer than the stall limit is hung, and is restarted like
//! a failed one. Every call to a service is bounded by a timeout, so only a
//! bug (a future that never completes) gets here.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Milliseconds since the first use in this process (never 0).
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// One actor's progress.
#[derive(Debug, Default)]
pub struct Progress {
    /// When the message in hand was taken (0: idle).
    busy_since: AtomicU64,
    /// When progress was last recorded.
    last: AtomicU64,
    /// Waits in progress that are not hangs.
    protected: AtomicUsize,
}

/// Held while an actor works on a message; marks it idle when dropped.
#[must_use = "the actor is busy only while the guard lives"]
pub struct Working(Arc<Progress>);

impl Drop for Working {
    fn drop(&mut self) {
        self.0.busy_since.store(0, Ordering::Release);
    }
}

impl Progress {
    /// An idle actor's progress.
    pub fn new() -> Progress {
        Progress::default()
    }

    /// The actor takes a message.
    pub fn working(self: &Arc<Self>) -> Working {
        let now = now_ms();
        self.last.store(now, Ordering::Release);
        self.busy_since.store(now, Ordering::Release);
        Working(self.clone())
    }

    /// The actor got somewhere.
    pub fn record(&self) {
        self.last.store(now_ms(), Ordering::Release);
    }

    /// Runs a wait that is not a hang (backpressure); progress is recorded
    /// when it ends.
    pub async fn protect<T>(&self, wait: impl Future<Output = T>) -> T {
        self.protected.fetch_add(1, Ordering::AcqRel);
        let outcome = wait.await;
        self.protected.fetch_sub(1, Ordering::AcqRel);
        self.record();
        outcome
    }

    /// How long the actor has held a message without progress (`None`:
    /// idle, or in a protected wait).
    pub fn stalled_for(&self) -> Option<Duration> {
        if self.busy_since.load(Ordering::Acquire) == 0
            || self.protected.load(Ordering::Acquire) > 0
        {
            return None;
        }
        let last = self.last.load(Ordering::Acquire);
        Some(Duration::from_millis(now_ms().saturating_sub(last)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_busy_actor_without_progress_stalls() {
        let progress = Arc::new(Progress::new());
        assert_eq!(progress.stalled_for(), None, "idle");
        let working = progress.working();
        std::thread::sleep(Duration::from_millis(30));
        let stalled = progress.stalled_for().expect("busy");
        assert!(stalled >= Duration::from_millis(30), "{stalled:?}");
        progress.record();
        assert!(progress.stalled_for().unwrap() < Duration::from_millis(30));
        // A protected wait is not a stall, however long.
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let waiting = progress.protect(wait);
        tokio::pin!(waiting);
        assert!(futures::poll!(&mut waiting).is_pending());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(progress.stalled_for(), None, "protected");
        release.send(()).unwrap();
        waiting.await.unwrap();
        assert!(
            progress.stalled_for().is_some(),
            "busy again after the wait"
        );
        drop(working);
        assert_eq!(progress.stalled_for(), None, "idle after the message");
    }
}
