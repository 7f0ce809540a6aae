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
//!
//! A store that refuses the batch because of what is in it (a PostgreSQL data
//! exception or constraint, a ClickHouse parse or type error:
//! [`PipelineError::data_error`]) would refuse it forever, so the sink
//! bisects the batch to find the records it refuses, writes the rest, and
//! dead-letters those records (`dlq.stage=sink`, kind `store_rejected`, the
//! store's message) through the DLQ writer, which acks them. If the other
//! store already took them, they are deleted there before the batch is acked,
//! so a record ends up stored in both stores or dead-lettered, never both.

use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{info, warn};

use crate::breaker::CircuitBreaker;
use crate::budget::HeldBytes;
use crate::committer::CommitterMsg;
use crate::config::PipelineConfig;
use crate::dlq_writer::DlqWriterMsg;
use crate::error::PipelineError;
use crate::faults::{CrashPoint, Faults};
use crate::mailbox::{BoundedSender, MailboxPermit};
use crate::metrics as names;
use crate::models::{AckSource, PoisonRecord, SourcePosition, ValidRecord};
use crate::parse::{cut_message, PoisonKind};
use crate::storage::{ClickHouseEvents, PostgresEvents};

/// The pipeline stage name written to the `dlq.stage` header of records a
/// store refused.
pub const SINK_STAGE: &str = "sink";

/// What the sink starts with.
pub struct SinkArgs {
    /// Store URLs, batch size and linger.
    pub config: PipelineConfig,
    /// Told what is stored.
    pub committer: ActorRef<CommitterMsg>,
    /// Where records a store refuses go.
    pub dlq_writer: BoundedSender<DlqWriterMsg>,
    /// Injected faults.
    pub faults: Arc<Faults>,
    /// What this actor tells the watchdog.
    pub progress: Arc<crate::progress::Progress>,
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
        /// The records' bytes against the in-flight budget, held until written.
        bytes: HeldBytes,
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
    /// The bytes of the buffered records against the in-flight budget.
    buffered_bytes: Vec<HeldBytes>,
    /// Whether a `Flush` is already scheduled.
    flush_scheduled: bool,
    /// One breaker per store.
    postgres_breaker: CircuitBreaker,
    clickhouse_breaker: CircuitBreaker,
}

/// Which store a write failed in.
#[derive(Debug, Clone, Copy)]
enum Store {
    Postgres = 0,
    ClickHouse = 1,
}

impl Store {
    fn other(self) -> Store {
        match self {
            Store::Postgres => Store::ClickHouse,
            Store::ClickHouse => Store::Postgres,
        }
    }

    /// The `store` label of the sink's metrics.
    fn label(self) -> &'static str {
        match self {
            Store::Postgres => "postgres",
            Store::ClickHouse => "clickhouse",
        }
    }
}

impl SinkState {
    /// Writes the buffer to both stores, retrying until it succeeds, then
    /// acks. Records a store refuses as data are dead-lettered instead (found
    /// by bisecting the batch) and removed from the other store if it already
    /// took them; everything else is retried behind the breakers.
    async fn write_buffer(&mut self) -> Result<(), ActorProcessingErr> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let started = std::time::SystemTime::now();
        let mut attempt = 0u32;
        let mut done = Written::default();
        let mut refused: Vec<PoisonRecord> = Vec::new();
        // Per store, refused records it took before they were found (the
        // other store refused them): deleted before the batch is acked.
        let mut to_remove: [Vec<SourcePosition>; 2] = [Vec::new(), Vec::new()];
        loop {
            let wait = self
                .postgres_breaker
                .wait()
                .max(self.clickhouse_breaker.wait());
            if !wait.is_zero() {
                let progress = self.args.progress.clone();
                progress.protect(tokio::time::sleep(wait)).await;
                continue;
            }
            attempt += 1;
            self.args.progress.record();
            let mut failures = Vec::new();
            let mut buffer_changed = false;
            for (store, write_error) in self.try_write(&mut done).await {
                let Some(store_message) = write_error.data_error() else {
                    failures.push((store, write_error));
                    continue;
                };
                warn!(?store, %store_message, records = self.buffer.len(), "a store refused the batch as data; bisecting it");
                // The refusal was of the batch as it was: if the other
                // store's bisection took records out, it may not hold now.
                let known_error = (!buffer_changed).then_some(store_message);
                match self.bisect(store, known_error).await {
                    Ok(found) => {
                        buffer_changed |= !found.is_empty();
                        done.set(store);
                        let other = store.other();
                        if done.get(other) {
                            to_remove[other as usize]
                                .extend(found.iter().map(|record| record.raw.position));
                        }
                        refused.extend(found);
                    }
                    Err(write_error) => failures.push((store, write_error)),
                }
            }
            if failures.is_empty() {
                for store in [Store::Postgres, Store::ClickHouse] {
                    let positions = &to_remove[store as usize];
                    if positions.is_empty() {
                        continue;
                    }
                    match self.remove(store, positions).await {
                        Ok(()) => to_remove[store as usize].clear(),
                        Err(remove_error) => failures.push((store, remove_error)),
                    }
                }
            }
            if failures.is_empty() {
                break;
            }
            for (store, write_error) in failures {
                warn!(%write_error, ?store, attempt, "sink write failed, retrying");
                metrics::counter!(names::SINK_RETRIES, "store" => store.label()).increment(1);
                if let Store::Postgres = store {
                    // Reconnect before the next attempt.
                    self.postgres = None;
                }
                self.breaker(store).failed();
            }
            // Closed breaker: a short pause before trying again.
            self.args.progress.record();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if attempt > 1 {
            info!(
                attempt,
                records = self.buffer.len(),
                "sink write succeeded after retries"
            );
        }
        if !refused.is_empty() {
            let count = refused.len();
            let refused_bytes = refused.iter().map(|record| record.raw.budget_bytes()).sum();
            let bytes = HeldBytes::take_from(&mut self.buffered_bytes, refused_bytes);
            let send = self.args.dlq_writer.send(|permit| DlqWriterMsg::Write {
                records: refused,
                permit,
                bytes,
            });
            self.args.progress.protect(send).await?;
            warn!(
                refused = count,
                "records refused by a store were dead-lettered"
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
        for produced_at in stored
            .iter()
            .filter_map(|record| record.raw.kafka_timestamp_ms)
        {
            latency.record((now_ms - produced_at).max(0) as f64 / 1000.0);
        }
        let config = &self.args.config;
        config
            .spans
            .stored_batch(&config.topic, &config.group_id, &stored, started, attempt);
        let positions = stored.iter().map(|record| record.raw.position).collect();
        self.args.committer.cast(CommitterMsg::Ack {
            source: AckSource::Sink,
            positions,
        })?;
        self.buffered_permits.clear();
        self.buffered_bytes.clear();
        Ok(())
    }

    fn breaker(&mut self, store: Store) -> &mut CircuitBreaker {
        match store {
            Store::Postgres => &mut self.postgres_breaker,
            Store::ClickHouse => &mut self.clickhouse_breaker,
        }
    }

    /// One write of `records` to one store.
    async fn write_to(
        &mut self,
        store: Store,
        records: &[ValidRecord],
    ) -> Result<(), PipelineError> {
        match store {
            Store::Postgres => self.postgres().await?.write(records).await.map(|_| ()),
            Store::ClickHouse => self.clickhouse.write(records).await,
        }
    }

    /// The PostgreSQL table, connecting first if the last call failed.
    async fn postgres(&mut self) -> Result<&PostgresEvents, PipelineError> {
        connected(&mut self.postgres, &self.args.config).await
    }

    /// Deletes rows stored from these positions in one store.
    async fn remove(
        &mut self,
        store: Store,
        positions: &[SourcePosition],
    ) -> Result<(), PipelineError> {
        info!(
            ?store,
            records = positions.len(),
            "removing records the other store refused"
        );
        // Bounded by its own deadline (a ClickHouse mutation can take longer
        // than one call).
        let progress = self.args.progress.clone();
        match store {
            Store::Postgres => self.postgres().await?.remove(positions).await.map(|_| ()),
            Store::ClickHouse => progress.protect(self.clickhouse.remove(positions)).await,
        }
    }

    /// Finds the records of the buffer that `store` refuses as data, by
    /// writing halves of the failing range until each refused record stands
    /// alone; everything else ends up written to `store`. Takes the refused
    /// records out of the buffer and returns them as dead letters
    /// (`dlq.stage=sink`). Writes about k·log2(n) times for k refused records
    /// among n. A failure that is not about the data stops the search (the
    /// whole batch is retried later: the writes are idempotent).
    async fn bisect(
        &mut self,
        store: Store,
        known_error: Option<String>,
    ) -> Result<Vec<PoisonRecord>, PipelineError> {
        let buffer = std::mem::take(&mut self.buffer);
        let search = self.find_refused(store, &buffer, known_error).await;
        self.buffer = buffer;
        let mut refused_at = search?;
        refused_at.sort_by_key(|(index, _)| std::cmp::Reverse(*index));
        let mut found = Vec::with_capacity(refused_at.len());
        for (index, message) in refused_at {
            let record = self.buffer.remove(index);
            warn!(
                ?store,
                partition = record.raw.position.partition,
                offset = record.raw.position.offset,
                %message,
                "a store refused a record; dead-lettering it"
            );
            found.push(PoisonRecord {
                raw: record.raw,
                kind: PoisonKind::StoreRejected,
                message: cut_message(message),
                stage: SINK_STAGE,
            });
        }
        found.reverse();
        Ok(found)
    }

    /// The bisection itself: the indexes of `records` that `store` refuses,
    /// each with the store's message. `known_error`: the whole of `records`
    /// is known to fail with it (`None`: not known, write it first).
    async fn find_refused(
        &mut self,
        store: Store,
        records: &[ValidRecord],
        known_error: Option<String>,
    ) -> Result<Vec<(usize, String)>, PipelineError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        // Ranges still to look at, each with its error if it is known to fail.
        let mut ranges = vec![(0, records.len(), known_error)];
        let mut refused_at = Vec::new();
        while let Some((start, end, known_error)) = ranges.pop() {
            self.args.progress.record();
            let error = match known_error {
                Some(message) => Some(message),
                None => match self.write_to(store, &records[start..end]).await {
                    Ok(()) => None,
                    Err(write_error) => match write_error.data_error() {
                        Some(message) => Some(message),
                        None => return Err(write_error),
                    },
                },
            };
            let Some(message) = error else { continue };
            if end - start == 1 {
                refused_at.push((start, message));
            } else {
                let middle = start + (end - start) / 2;
                ranges.push((middle, end, None));
                ranges.push((start, middle, None));
            }
        }
        Ok(refused_at)
    }

    /// One attempt: both stores at once, each unless it already holds the
    /// batch. Returns what failed (nothing: both hold it).
    async fn try_write(&mut self, done: &mut Written) -> Vec<(Store, PipelineError)> {
        if self.buffer.is_empty() {
            // Every record was refused: nothing left to write.
            done.set(Store::Postgres);
            done.set(Store::ClickHouse);
            return Vec::new();
        }
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
            let table = match connected(postgres, &args.config).await {
                Ok(table) => table,
                Err(connect_error) => return Some(Err(connect_error)),
            };
            let started = Instant::now();
            Some(table.write(buffer).await.map(|_| started.elapsed()))
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
            match outcome {
                None => {}
                Some(Ok(took)) => {
                    metrics::histogram!(names::SINK_BATCH_SECONDS, "store" => store.label())
                        .record(took.as_secs_f64());
                    self.breaker(store).succeeded();
                    done.set(store);
                }
                Some(Err(write_error)) => failures.push((store, write_error)),
            }
        }
        failures
    }
}

/// The PostgreSQL table in `slot`, connecting first if it is empty (the last
/// call failed).
async fn connected<'a>(
    slot: &'a mut Option<PostgresEvents>,
    config: &PipelineConfig,
) -> Result<&'a PostgresEvents, PipelineError> {
    if slot.is_none() {
        *slot = Some(PostgresEvents::connect(config).await?);
    }
    Ok(slot.as_ref().expect("connected above"))
}

/// Which stores already hold the batch being written.
#[derive(Debug, Default)]
struct Written {
    postgres: bool,
    clickhouse: bool,
}

impl Written {
    fn set(&mut self, store: Store) {
        match store {
            Store::Postgres => self.postgres = true,
            Store::ClickHouse => self.clickhouse = true,
        }
    }

    fn get(&self, store: Store) -> bool {
        match store {
            Store::Postgres => self.postgres,
            Store::ClickHouse => self.clickhouse,
        }
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
        let postgres = PostgresEvents::connect(&args.config).await?;
        let clickhouse = ClickHouseEvents::connect(&args.config).await?;
        Ok(SinkState {
            buffer: Vec::with_capacity(args.config.batch_size),
            args,
            postgres: Some(postgres),
            clickhouse,
            buffered_permits: Vec::new(),
            buffered_bytes: Vec::new(),
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
        let _working = state.args.progress.working();
        state.args.faults.at_message_start("sink").await;
        match message {
            SinkMsg::Store {
                records,
                permit,
                bytes,
            } => {
                state.buffer.extend(records);
                state.buffered_permits.push(permit);
                state.buffered_bytes.push(bytes);
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
