//! The sink: stores valid events in PostgreSQL and ClickHouse, in batches.
//!
//! Upstream: the parser, through a bounded mailbox. Downstream: the two
//! stores, then the committer (`Ack`) once both hold the batch.
//!
//! Batches close at `batch_size` records or after `linger`, whichever comes
//! first; the slots of buffered messages are held until the batch is written,
//! so the mailbox bound also bounds the buffer. Writes are idempotent (see
//! [`crate::storage`]), so a replay after a crash stores nothing twice.
//!
//! A failed write is retried, reconnecting first, for as long as it takes,
//! behind a circuit breaker per store ([`crate::breaker`]): after a few
//! failures in a row the breaker opens and no write is tried until its period
//! (growing, with jitter) is over. While it retries the sink takes no new
//! messages, its mailbox fills and intake pauses all the way back to Kafka. A
//! valid event is never dead-lettered because a store is down. Both stores
//! are written at once; a store that already holds the batch is not written
//! again on the retry.

use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{info, warn};

use crate::breaker::CircuitBreaker;
use crate::committer::CommitterMsg;
use crate::config::PipelineConfig;
use crate::error::PipelineError;
use crate::faults::{CrashPoint, Faults};
use crate::mailbox::MailboxPermit;
use crate::metrics as names;
use crate::models::{AckSource, ValidRecord};
use crate::storage::{ClickHouseEvents, PostgresEvents};

/// What the sink starts with.
pub struct SinkArgs {
    /// Store URLs, batch size and linger.
    pub config: PipelineConfig,
    /// Told what is stored.
    pub committer: ActorRef<CommitterMsg>,
    /// Injected faults.
    pub faults: Arc<Faults>,
}

/// Messages the sink handles.
#[derive(Debug)]
pub enum SinkMsg {
    /// Valid events from the parser.
    Store {
        /// The events, in read order.
        records: Vec<ValidRecord>,
        /// This message's slot in the sink's mailbox, held until written.
        permit: MailboxPermit,
    },
    /// The linger time of the oldest buffered record is up.
    Flush,
}

/// The sink's state.
pub struct SinkState {
    args: SinkArgs,
    /// PostgreSQL table; `None` after a failure, until reconnected.
    postgres: Option<PostgresEvents>,
    /// ClickHouse table.
    clickhouse: ClickHouseEvents,
    /// Records waiting for the batch to fill.
    buffer: Vec<ValidRecord>,
    /// The slots of the buffered messages.
    buffered_permits: Vec<MailboxPermit>,
    /// Whether a `Flush` is already scheduled.
    flush_scheduled: bool,
    /// One breaker per store.
    postgres_breaker: CircuitBreaker,
    clickhouse_breaker: CircuitBreaker,
}

/// Which store a write failed in.
#[derive(Debug, Clone, Copy)]
enum Store {
    Postgres,
    ClickHouse,
}

impl Store {
    /// The `store` label of the sink's metrics.
    fn label(self) -> &'static str {
        match self {
            Store::Postgres => "postgres",
            Store::ClickHouse => "clickhouse",
        }
    }
}

impl SinkState {
    /// Writes the buffer to both stores, retrying until it succeeds, then acks.
    async fn write_buffer(&mut self) -> Result<(), ActorProcessingErr> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let mut attempt = 0u32;
        let mut done = Written::default();
        loop {
            let wait = self
                .postgres_breaker
                .wait()
                .max(self.clickhouse_breaker.wait());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
                continue;
            }
            attempt += 1;
            let failures = self.try_write(&mut done).await;
            if failures.is_empty() {
                break;
            }
            for (store, write_error) in failures {
                warn!(%write_error, ?store, attempt, "sink write failed, retrying");
                match store {
                    Store::Postgres => self.postgres_breaker.failed(),
                    Store::ClickHouse => self.clickhouse_breaker.failed(),
                }
            }
            // Closed breaker: a short pause before trying again.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if attempt > 1 {
            info!(
                attempt,
                records = self.buffer.len(),
                "sink write succeeded after retries"
            );
        }
        self.args.faults.reached(CrashPoint::AfterDbWrite);
        let stored = std::mem::take(&mut self.buffer);
        metrics::counter!(names::EVENTS_PROCESSED).increment(stored.len() as u64);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as i64)
            .unwrap_or_default();
        let latency = metrics::histogram!(names::END_TO_END_LATENCY);
        for produced_at in stored.iter().filter_map(|record| record.kafka_timestamp_ms) {
            latency.record((now_ms - produced_at).max(0) as f64 / 1000.0);
        }
        let positions = stored.iter().map(|record| record.position).collect();
        self.args.committer.cast(CommitterMsg::Ack {
            source: AckSource::Sink,
            positions,
        })?;
        self.buffered_permits.clear();
        Ok(())
    }

    /// One attempt: both stores at once, each unless it already holds the
    /// batch. Returns what failed (nothing: both hold it).
    async fn try_write(&mut self, done: &mut Written) -> Vec<(Store, PipelineError)> {
        let SinkState {
            args,
            postgres,
            clickhouse,
            buffer,
            ..
        } = self;
        let postgres_write = async {
            if done.postgres {
                return None;
            }
            if postgres.is_none() {
                let config = &args.config;
                match PostgresEvents::connect(&config.postgres_url, config.dedup).await {
                    Ok(connected) => *postgres = Some(connected),
                    Err(connect_error) => return Some(Err(connect_error)),
                }
            }
            let started = Instant::now();
            let written = postgres
                .as_ref()
                .expect("connected above")
                .write(buffer)
                .await;
            Some(written.map(|_| started.elapsed()))
        };
        let clickhouse_write = async {
            if done.clickhouse {
                return None;
            }
            let started = Instant::now();
            Some(clickhouse.write(buffer).await.map(|()| started.elapsed()))
        };
        let (postgres_outcome, clickhouse_outcome) = tokio::join!(postgres_write, clickhouse_write);
        let mut failures = Vec::new();
        for (store, outcome) in [
            (Store::Postgres, postgres_outcome),
            (Store::ClickHouse, clickhouse_outcome),
        ] {
            let label = store.label();
            match outcome {
                None => {}
                Some(Ok(took)) => {
                    metrics::histogram!(names::SINK_BATCH_SECONDS, "store" => label)
                        .record(took.as_secs_f64());
                    match store {
                        Store::Postgres => {
                            self.postgres_breaker.succeeded();
                            done.postgres = true;
                        }
                        Store::ClickHouse => {
                            self.clickhouse_breaker.succeeded();
                            done.clickhouse = true;
                        }
                    }
                }
                Some(Err(write_error)) => {
                    metrics::counter!(names::SINK_RETRIES, "store" => label).increment(1);
                    if let Store::Postgres = store {
                        // Reconnect before the next attempt.
                        self.postgres = None;
                    }
                    failures.push((store, write_error));
                }
            }
        }
        failures
    }
}

/// Which stores already hold the batch being written.
#[derive(Debug, Default)]
struct Written {
    postgres: bool,
    clickhouse: bool,
}

/// The sink actor.
pub struct SinkActor;

impl Actor for SinkActor {
    type Msg = SinkMsg;
    type State = SinkState;
    type Arguments = SinkArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        metrics::counter!(names::EVENTS_PROCESSED).increment(0);
        for store in ["postgres", "clickhouse"] {
            metrics::counter!(names::SINK_RETRIES, "store" => store).increment(0);
        }
        let postgres =
            PostgresEvents::connect(&args.config.postgres_url, args.config.dedup).await?;
        let clickhouse = ClickHouseEvents::connect(&args.config).await?;
        Ok(SinkState {
            buffer: Vec::with_capacity(args.config.batch_size),
            args,
            postgres: Some(postgres),
            clickhouse,
            buffered_permits: Vec::new(),
            flush_scheduled: false,
            postgres_breaker: CircuitBreaker::new("postgres"),
            clickhouse_breaker: CircuitBreaker::new("clickhouse"),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.args.faults.panic_if_armed("sink");
        match message {
            SinkMsg::Store { records, permit } => {
                state.buffer.extend(records);
                state.buffered_permits.push(permit);
                if state.buffer.len() >= state.args.config.batch_size {
                    state.write_buffer().await?;
                } else if !state.flush_scheduled {
                    state.flush_scheduled = true;
                    myself.send_after(state.args.config.linger, || SinkMsg::Flush);
                }
            }
            SinkMsg::Flush => {
                state.flush_scheduled = false;
                state.write_buffer().await?;
            }
        }
        Ok(())
    }
}
