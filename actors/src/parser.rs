//! The parser actor: splits each batch into valid events and poison.
//!
//! Upstream: the consumer, through a bounded mailbox. Downstream: the sink
//! (valid events) and the DLQ writer (poison), each through a bounded
//! mailbox. It holds its own slot until both sends are done, so a full sink
//! or DLQ writer stops the parser, which stops the consumer.
//!
//! The classification itself is [`crate::parse::parse_event`], which is pure;
//! this actor only reads the clock and routes. It has no failure of its own
//! except a stopped downstream actor.

use std::time::{SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::budget::HeldBytes;
use crate::dlq_writer::DlqWriterMsg;
use crate::mailbox::{BoundedSender, MailboxPermit};
use crate::models::{PoisonRecord, RawRecord, ValidRecord};
use crate::parse::{parse_event, ParseRules};
use crate::sink::SinkMsg;

/// The pipeline stage name written to the `dlq.stage` header.
pub const PARSE_STAGE: &str = "parse";

/// What the parser starts with.
pub struct ParserArgs {
    /// Rules for classification; `now_ms` is refreshed per batch.
    pub rules: ParseRules,
    /// The sink's bounded mailbox.
    pub sink: BoundedSender<SinkMsg>,
    /// The DLQ writer's bounded mailbox.
    pub dlq_writer: BoundedSender<DlqWriterMsg>,
    /// Injected faults.
    pub faults: std::sync::Arc<crate::faults::Faults>,
    /// What this actor tells the watchdog.
    pub progress: std::sync::Arc<crate::progress::Progress>,
}

/// Messages the parser handles.
#[derive(Debug)]
pub enum ParserMsg {
    /// A batch from the consumer.
    Parse {
        /// The records, in read order.
        records: Vec<RawRecord>,
        /// This message's slot in the parser's mailbox.
        permit: MailboxPermit,
        /// The records' bytes against the in-flight budget: the parser
        /// hands the poison records' share to the DLQ writer and the rest
        /// to the sink.
        bytes: HeldBytes,
    },
}

/// The parser's state: its arguments.
pub struct ParserState {
    args: ParserArgs,
}

/// The parser actor.
pub struct ParserActor;

/// Splits records into valid and poison under `rules`. Pure.
pub fn split_batch(
    records: Vec<RawRecord>,
    rules: &ParseRules,
) -> (Vec<ValidRecord>, Vec<PoisonRecord>) {
    let mut valid = Vec::with_capacity(records.len());
    let mut poison = Vec::new();
    for raw in records {
        match parse_event(raw.payload.as_deref(), rules) {
            Ok(event) => valid.push(ValidRecord { raw, event }),
            Err(parse_error) => poison.push(PoisonRecord {
                raw,
                kind: parse_error.kind,
                message: parse_error.message,
                stage: PARSE_STAGE,
            }),
        }
    }
    (valid, poison)
}

impl Actor for ParserActor {
    type Msg = ParserMsg;
    type State = ParserState;
    type Arguments = ParserArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(ParserState { args })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _working = state.args.progress.working();
        state.args.faults.at_message_start("parser").await;
        match message {
            ParserMsg::Parse {
                records,
                permit,
                mut bytes,
            } => {
                state.args.rules.now_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|elapsed| elapsed.as_millis() as i64)
                    .unwrap_or_default();
                let (valid, poison) = split_batch(records, &state.args.rules);
                let poison_bytes = poison.iter().map(|record| record.raw.budget_bytes()).sum();
                let dlq_bytes = bytes.split(poison_bytes);
                // A full mailbox downstream is backpressure, not a hang.
                let progress = &state.args.progress;
                if !valid.is_empty() {
                    let send = state.args.sink.send(|sink_permit| SinkMsg::Store {
                        records: valid,
                        permit: sink_permit,
                        bytes,
                    });
                    progress.protect(send).await?;
                }
                if !poison.is_empty() {
                    let send = state
                        .args
                        .dlq_writer
                        .send(|dlq_permit| DlqWriterMsg::Write {
                            records: poison,
                            permit: dlq_permit,
                            bytes: dlq_bytes,
                        });
                    progress.protect(send).await?;
                }
                drop(permit);
            }
        }
        Ok(())
    }
}
