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
//! A failed write is retried with exponential backoff, reconnecting first,
//! for as long as it takes: while it retries the sink takes no new messages,
//! its mailbox fills and intake pauses all the way back to Kafka. A valid
//! event is never dead-lettered because a store is down.

use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{info, warn};

use crate::committer::CommitterMsg;
use crate::config::PipelineConfig;
use crate::error::PipelineError;
use crate::mailbox::MailboxPermit;
use crate::metrics as names;
use crate::models::{AckSource, ValidRecord};
use crate::storage::{ClickHouseEvents, PostgresEvents};

/// The first retry waits this long; each next one twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Retries never wait longer than this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the sink starts with.
pub struct SinkArgs {
    /// Store URLs, batch size and linger.
    pub config: PipelineConfig,
    /// Told what is stored.
    pub committer: ActorRef<CommitterMsg>,
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
}

impl SinkState {
    /// Writes the buffer to both stores, retrying until it succeeds, then acks.
    async fn write_buffer(&mut self) -> Result<(), ActorProcessingErr> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.try_write().await {
                Ok(()) => break,
                Err(write_error) => {
                    warn!(%write_error, attempt, backoff_ms = backoff.as_millis() as u64, "sink write failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        if attempt > 1 {
            info!(
                attempt,
                records = self.buffer.len(),
                "sink write succeeded after retries"
            );
        }
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

    async fn try_write(&mut self) -> Result<(), PipelineError> {
        if self.postgres.is_none() {
            self.postgres = Some(PostgresEvents::connect(&self.args.config.postgres_url).await?);
        }
        let postgres = self.postgres.as_ref().expect("connected above");
        let started = Instant::now();
        if let Err(postgres_error) = postgres.write(&self.buffer).await {
            metrics::counter!(names::SINK_RETRIES, "store" => "postgres").increment(1);
            self.postgres = None;
            return Err(postgres_error);
        }
        metrics::histogram!(names::SINK_BATCH_SECONDS, "store" => "postgres")
            .record(started.elapsed().as_secs_f64());
        let started = Instant::now();
        if let Err(clickhouse_error) = self.clickhouse.write(&self.buffer).await {
            metrics::counter!(names::SINK_RETRIES, "store" => "clickhouse").increment(1);
            return Err(clickhouse_error);
        }
        metrics::histogram!(names::SINK_BATCH_SECONDS, "store" => "clickhouse")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }
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
        let postgres = PostgresEvents::connect(&args.config.postgres_url).await?;
        let clickhouse = ClickHouseEvents::connect(&args.config).await?;
        Ok(SinkState {
            buffer: Vec::with_capacity(args.config.batch_size),
            args,
            postgres: Some(postgres),
            clickhouse,
            buffered_permits: Vec::new(),
            flush_scheduled: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
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
