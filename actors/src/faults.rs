//! Fault injection, for the kill-and-watch demo and the recovery tests.
//!
//! Off unless asked for:
//!
//! - **Armed faults** ([`Faults::arm`], checked by every actor at the start of
//!   each message in [`Faults::at_message_start`]): a panic (ractor turns it
//!   into `ActorFailed`, exactly as a bug would; `POST /actors/<name>/panic`)
//!   or a hang (the actor holds the message forever without progress, as a
//!   future that never completes would: the watchdog's case;
//!   `POST /actors/<name>/hang`).
//! - **Crash points**: `STREAM_CRASH_AT=<point>:<n>` aborts the whole process
//!   (no unwinding, no cleanup: the same as a SIGKILL) the n-th time the
//!   pipeline reaches `point`. The points are the windows where a crash is most
//!   likely to duplicate or lose something: [`CrashPoint`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::PipelineError;

/// Where a crash can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// In the sink: the batch is in both stores, not yet acknowledged, so the
    /// checkpoint does not cover it. A restart replays it.
    AfterDbWrite,
    /// In the committer: the checkpoint is persisted, Kafka's committed offset
    /// is not. A restart must trust the checkpoint.
    AfterCheckpoint,
    /// In the DLQ writer: the intents are in the DLQ index, the dead letters
    /// not produced yet. A restart must produce them.
    AfterDlqIntent,
    /// In the DLQ writer: the broker confirmed the dead letters, the DLQ
    /// index does not say so yet. A restart must not produce them again.
    AfterDlqDelivery,
    /// In the DLQ archiver (`streamctl dlq archive`): an object is in the
    /// bucket, its manifest is not. A re-run must write that object again
    /// under the same name, not a second copy of its dead letters.
    AfterArchiveObject,
}

impl CrashPoint {
    /// Every crash point.
    pub const ALL: [CrashPoint; 5] = [
        CrashPoint::AfterDbWrite,
        CrashPoint::AfterCheckpoint,
        CrashPoint::AfterDlqIntent,
        CrashPoint::AfterDlqDelivery,
        CrashPoint::AfterArchiveObject,
    ];

    /// The name used in `STREAM_CRASH_AT`.
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::AfterDbWrite => "after_db_write",
            CrashPoint::AfterCheckpoint => "after_checkpoint",
            CrashPoint::AfterDlqIntent => "after_dlq_intent",
            CrashPoint::AfterDlqDelivery => "after_dlq_delivery",
            CrashPoint::AfterArchiveObject => "after_archive_object",
        }
    }

    fn parse(name: &str) -> Option<CrashPoint> {
        CrashPoint::ALL
            .into_iter()
            .find(|point| point.name() == name)
    }
}

/// A fault for an actor's next message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// Panic at the start of it.
    Panic,
    /// Hold it forever without progress.
    Hang,
}

/// The pipeline's injected faults, shared by the supervisor and every actor.
#[derive(Debug, Default)]
pub struct Faults {
    /// Faults armed for an actor's next message.
    armed: Mutex<HashMap<String, Injected>>,
    /// The crash point and on which arrival to crash.
    crash: Option<(CrashPoint, u64)>,
    /// Arrivals at the crash point so far.
    arrivals: AtomicU64,
}

impl Faults {
    /// No faults.
    pub fn none() -> Faults {
        Faults::default()
    }

    /// Reads `STREAM_CRASH_AT` (`after_db_write:3`, `after_checkpoint:1`).
    pub fn from_env() -> Result<Faults, PipelineError> {
        match std::env::var("STREAM_CRASH_AT") {
            Ok(text) if !text.is_empty() => Faults::with_crash(&text),
            _ => Ok(Faults::none()),
        }
    }

    /// Parses a crash specification `<point>:<n>`.
    pub fn with_crash(spec: &str) -> Result<Faults, PipelineError> {
        let invalid = |reason: String| PipelineError::Config {
            setting: "STREAM_CRASH_AT",
            reason,
        };
        let (name, count) = spec.split_once(':').unwrap_or((spec, "1"));
        let point = CrashPoint::parse(name).ok_or_else(|| {
            let known: Vec<&str> = CrashPoint::ALL.iter().map(|point| point.name()).collect();
            invalid(format!(
                "unknown crash point {name:?}; expected one of {}",
                known.join(", ")
            ))
        })?;
        let count: u64 = count
            .parse()
            .ok()
            .filter(|count| *count >= 1)
            .ok_or_else(|| invalid(format!("{count:?} is not a count of 1 or more")))?;
        Ok(Faults {
            crash: Some((point, count)),
            ..Faults::default()
        })
    }

    /// Arms `fault` for `actor`'s next message.
    pub fn arm(&self, actor: &str, fault: Injected) {
        self.armed
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .insert(actor.to_string(), fault);
    }

    /// Called by each actor at the start of a message: fires the fault armed
    /// for it, once (a panic, or a wait that never ends).
    pub async fn at_message_start(&self, actor: &str) {
        let armed = self
            .armed
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .remove(actor);
        match armed {
            None => {}
            Some(Injected::Panic) => panic!("injected panic in actor {actor}"),
            Some(Injected::Hang) => {
                tracing::warn!(actor, "injected hang: holding this message forever");
                std::future::pending::<()>().await;
            }
        }
    }

    /// Called when the pipeline reaches `point`: aborts the process on the
    /// configured arrival.
    pub fn reached(&self, point: CrashPoint) {
        let Some((crash_point, on_arrival)) = self.crash else {
            return;
        };
        if crash_point != point {
            return;
        }
        let arrival = self.arrivals.fetch_add(1, Ordering::SeqCst) + 1;
        if arrival == on_arrival {
            eprintln!(
                "STREAM_CRASH_AT: aborting at {} (arrival {arrival})",
                point.name()
            );
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_specs_parse_and_bad_ones_name_the_setting() {
        let faults = Faults::with_crash("after_checkpoint:3").unwrap();
        assert_eq!(faults.crash, Some((CrashPoint::AfterCheckpoint, 3)));
        let faults = Faults::with_crash("after_db_write").unwrap();
        assert_eq!(faults.crash, Some((CrashPoint::AfterDbWrite, 1)));
        for bad in ["after_lunch:1", "after_db_write:0", "after_db_write:x"] {
            let error = Faults::with_crash(bad).unwrap_err().to_string();
            assert!(error.contains("STREAM_CRASH_AT"), "{error}");
        }
    }

    #[test]
    fn an_armed_panic_fires_once_in_the_named_actor_only() {
        let faults = Faults::none();
        let start = |actor| futures::executor::block_on(faults.at_message_start(actor));
        faults.arm("sink", Injected::Panic);
        start("parser");
        let fired = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| start("sink")));
        assert!(fired.is_err());
        start("sink");
    }

    #[test]
    fn other_points_and_earlier_arrivals_do_not_crash() {
        let faults = Faults::with_crash("after_checkpoint:2").unwrap();
        faults.reached(CrashPoint::AfterDbWrite);
        faults.reached(CrashPoint::AfterCheckpoint);
        assert_eq!(faults.arrivals.load(Ordering::SeqCst), 1);
    }
}
