//! Load generator: producer actors that send valid events and a chosen
//! fraction of poison to Kafka, and an exact ledger of what was delivered.
//!
//! - [`generate_record`]: one record, valid or poison, with its
//!   `traceparent`, from a seeded RNG.
//! - [`ProducerActor`]: produces its share of the records at its share of the rate.
//! - [`run`]: spawns the producers, prints progress, returns the [`Ledger`].
//! - [`sqs`]: `loadgen sqs`, orders to an SQS queue.
//!
//! The ledger counts only records the broker confirmed; the producer is
//! idempotent, so a retried send is not stored twice by the broker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use stream_actors::kafka::Brokers;
use stream_actors::trace_context::TRACEPARENT_HEADER;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
pub mod sqs;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::Serialize;

/// Metric: records the broker confirmed, by kind (`valid` or a poison kind).
pub const SENT_METRIC: &str = "loadgen_sent_total";

/// The kinds of poison loadgen sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoisonKind {
    /// Truncated or garbled JSON.
    MalformedJson,
    /// A JSON object without `event_id`.
    MissingEventId,
    /// `amount` as a string.
    WrongFieldType,
    /// `ts` two years in the future.
    TsOutOfRange,
    /// `schema_version` 99.
    UnknownSchemaVersion,
}

impl PoisonKind {
    /// Every kind, in label order.
    pub const ALL: [PoisonKind; 5] = [
        PoisonKind::MalformedJson,
        PoisonKind::MissingEventId,
        PoisonKind::WrongFieldType,
        PoisonKind::TsOutOfRange,
        PoisonKind::UnknownSchemaVersion,
    ];

    /// The ledger's name for the kind.
    pub fn label(self) -> &'static str {
        match self {
            PoisonKind::MalformedJson => "malformed_json",
            PoisonKind::MissingEventId => "missing_event_id",
            PoisonKind::WrongFieldType => "wrong_field_type",
            PoisonKind::TsOutOfRange => "ts_out_of_range",
            PoisonKind::UnknownSchemaVersion => "unknown_schema_version",
        }
    }

    /// The `dlq.error.type` the processor gives this kind.
    pub fn expected_dlq_error_type(self) -> &'static str {
        match self {
            PoisonKind::MalformedJson => "malformed_json",
            PoisonKind::MissingEventId => "missing_field",
            PoisonKind::WrongFieldType => "wrong_field_type",
            PoisonKind::TsOutOfRange => "timestamp_out_of_range",
            PoisonKind::UnknownSchemaVersion => "unknown_schema_version",
        }
    }
}

/// How a record's value is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ValueFormat {
    /// The event's JSON, as the pipeline reads it.
    #[default]
    Json,
    /// Kafka Connect's `JsonConverter` envelope (`schemas.enable=true`):
    /// `{"schema": <the event's struct schema>, "payload": <the event>}`, for
    /// sinks that need a schema (JDBC sink connectors). The same records:
    /// poison that is a JSON object goes in the same envelope (the converter
    /// or the sink decides what to do with it); malformed JSON goes as it is.
    ConnectJson,
}

/// The event's schema in Kafka Connect's JSON form: every field required.
pub const CONNECT_EVENT_SCHEMA: &str = concat!(
    r#"{"type":"struct","name":"events","optional":false,"fields":["#,
    r#"{"field":"event_id","type":"string","optional":false},"#,
    r#"{"field":"event_type","type":"string","optional":false},"#,
    r#"{"field":"user_id","type":"string","optional":false},"#,
    r#"{"field":"amount","type":"double","optional":false},"#,
    r#"{"field":"ts","type":"int64","optional":false},"#,
    r#"{"field":"schema_version","type":"int32","optional":false}]}"#
);

impl ValueFormat {
    /// The value to send for `payload` (loadgen's JSON form of a record).
    pub fn encode(self, payload: Vec<u8>) -> Vec<u8> {
        match self {
            ValueFormat::Json => payload,
            ValueFormat::ConnectJson => {
                let is_object =
                    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&payload)
                        .is_ok();
                if !is_object {
                    return payload;
                }
                let mut envelope =
                    Vec::with_capacity(payload.len() + CONNECT_EVENT_SCHEMA.len() + 24);
                envelope.extend_from_slice(br#"{"schema":"#);
                envelope.extend_from_slice(CONNECT_EVENT_SCHEMA.as_bytes());
                envelope.extend_from_slice(br#","payload":"#);
                envelope.extend_from_slice(&payload);
                envelope.push(b'}');
                envelope
            }
        }
    }
}

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadgenConfig {
    /// The Kafka brokers and how to reach them.
    pub brokers: Brokers,
    /// Target topic.
    pub topic: String,
    /// Records to send in total.
    pub count: u64,
    /// Records per second in total; 0 means as fast as possible.
    pub rate: u64,
    /// Fraction of records that are poison, 0..=1.
    pub poison_rate: f64,
    /// RNG seed: the same seed sends the same records.
    pub seed: u64,
    /// Producer actors sharing the work.
    pub producers: usize,
    /// Print progress to stderr about once a second.
    pub progress: bool,
    /// How each record's value is written.
    pub format: ValueFormat,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// A setting cannot work.
    #[error("invalid setting {setting}: {reason}")]
    Config {
        /// The flag at fault.
        setting: &'static str,
        /// Why.
        reason: String,
    },
    /// The producer could not be created or records were not delivered.
    #[error("kafka: {0}")]
    Kafka(String),
    /// A producer actor failed.
    #[error("producer actor: {0}")]
    Actor(String),
}

impl LoadgenConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), LoadgenError> {
        let invalid =
            |setting: &'static str, reason: String| LoadgenError::Config { setting, reason };
        if !(0.0..=1.0).contains(&self.poison_rate) || self.poison_rate.is_nan() {
            return Err(invalid(
                "--poison-rate",
                format!("must be within 0..=1, got {}", self.poison_rate),
            ));
        }
        if self.count == 0 {
            return Err(invalid("--count", "must be at least 1".to_string()));
        }
        if !(1..=64).contains(&self.producers) {
            return Err(invalid(
                "--producers",
                format!("must be 1..=64, got {}", self.producers),
            ));
        }
        if self.topic.trim().is_empty() {
            return Err(invalid("--topic", "must not be empty".to_string()));
        }
        if self.brokers.servers.trim().is_empty() {
            return Err(invalid("--brokers", "must not be empty".to_string()));
        }
        Ok(())
    }
}

/// The exact account of a run: the last line loadgen prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Ledger {
    /// Records the broker confirmed.
    pub sent: u64,
    /// Valid events among them.
    pub valid: u64,
    /// Poison among them.
    pub poison: u64,
    /// Poison by kind label.
    pub poison_by_kind: BTreeMap<String, u64>,
    /// Wall time of the run, seconds.
    pub elapsed_s: f64,
    /// Records per second.
    pub rate: f64,
}

impl Ledger {
    fn absorb(&mut self, tally: &Tally) {
        self.sent += tally.valid + tally.poison.values().sum::<u64>();
        self.valid += tally.valid;
        for (kind, count) in &tally.poison {
            self.poison += count;
            *self
                .poison_by_kind
                .entry(kind.label().to_string())
                .or_insert(0) += count;
        }
    }
}

/// One generated record.
#[derive(Debug, Clone)]
pub struct GeneratedRecord {
    /// Kafka key: the user id.
    pub key: String,
    /// Kafka value.
    pub payload: Vec<u8>,
    /// `None` for a valid event.
    pub poison: Option<PoisonKind>,
    /// The W3C `traceparent` header: a trace of its own, as a traced
    /// producer would send it (sampled).
    pub traceparent: String,
}

const EVENT_TYPES: [&str; 4] = ["page_view", "add_to_cart", "purchase", "refund"];

/// Makes one record from the RNG: poison with probability `poison_rate`.
pub fn generate_record(rng: &mut StdRng, poison_rate: f64, now_ms: i64) -> GeneratedRecord {
    let event_id = uuid::Builder::from_random_bytes(rng.gen()).into_uuid();
    let user_id = format!("user-{}", rng.gen_range(0..10_000));
    let event_type = EVENT_TYPES[rng.gen_range(0..EVENT_TYPES.len())];
    let amount = (rng.gen_range(0..50_000) as f64) / 100.0;
    let ts = now_ms - rng.gen_range(0..60_000);
    let poison = if poison_rate > 0.0 && rng.gen_bool(poison_rate) {
        Some(PoisonKind::ALL[rng.gen_range(0..PoisonKind::ALL.len())])
    } else {
        None
    };
    let payload = match poison {
        None => serde_json::json!({"event_id": event_id, "event_type": event_type, "user_id": user_id, "amount": amount, "ts": ts, "schema_version": 1}).to_string(),
        Some(PoisonKind::MalformedJson) => {
            let whole = serde_json::json!({"event_id": event_id, "event_type": event_type, "user_id": user_id, "amount": amount, "ts": ts, "schema_version": 1}).to_string();
            let cut = rng.gen_range(1..whole.len() - 1);
            whole[..cut].to_string()
        }
        Some(PoisonKind::MissingEventId) => serde_json::json!({"event_type": event_type, "user_id": user_id, "amount": amount, "ts": ts, "schema_version": 1}).to_string(),
        Some(PoisonKind::WrongFieldType) => serde_json::json!({"event_id": event_id, "event_type": event_type, "user_id": user_id, "amount": amount.to_string(), "ts": ts, "schema_version": 1}).to_string(),
        Some(PoisonKind::TsOutOfRange) => serde_json::json!({"event_id": event_id, "event_type": event_type, "user_id": user_id, "amount": amount, "ts": now_ms + 2 * 365 * 24 * 3600 * 1000, "schema_version": 1}).to_string(),
        Some(PoisonKind::UnknownSchemaVersion) => serde_json::json!({"event_id": event_id, "event_type": event_type, "user_id": user_id, "amount": amount, "ts": ts, "schema_version": 99}).to_string(),
    };
    GeneratedRecord {
        key: user_id,
        payload: payload.into_bytes(),
        poison,
        traceparent: random_traceparent(rng),
    }
}

/// A `traceparent` with random, non-zero ids, sampled.
fn random_traceparent(rng: &mut StdRng) -> String {
    let trace_id: u128 = rng.gen_range(1..=u128::MAX);
    let span_id: u64 = rng.gen_range(1..=u64::MAX);
    format!("00-{trace_id:032x}-{span_id:016x}-01")
}

/// Each producer actor's share of a run: (records, RNG seed).
pub fn shares(config: &LoadgenConfig) -> Vec<(u64, u64)> {
    let producers = config.producers.max(1) as u64;
    (0..producers)
        .map(|index| {
            let share = config.count / producers + u64::from(index < config.count % producers);
            let seed = config.seed.wrapping_mul(1_000_003).wrapping_add(index);
            (share, seed)
        })
        .collect()
}

/// The records a run of `config` sends, actor by actor, as the actors make
/// them (only the timestamps differ: they follow the clock): what a
/// consumer of the topic should have stored and dead-lettered.
pub fn planned_records(config: &LoadgenConfig) -> impl Iterator<Item = GeneratedRecord> + '_ {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or_default();
    shares(config).into_iter().flat_map(move |(count, seed)| {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..count).map(move |_| generate_record(&mut rng, config.poison_rate, now_ms))
    })
}

/// What one producer actor delivered.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Valid events delivered.
    pub valid: u64,
    /// Poison delivered, by kind.
    pub poison: BTreeMap<PoisonKind, u64>,
    /// Records the broker did not confirm.
    pub failed: u64,
    /// The first delivery error, if any.
    pub first_error: Option<String>,
}

/// Messages a producer actor handles.
pub enum ProducerMsg {
    /// Send `count` records at `rate` per second (0: unpaced), then reply.
    Produce {
        /// Records to send.
        count: u64,
        /// Records per second for this actor.
        rate: f64,
        /// The RNG seed for this actor.
        seed: u64,
        /// Where to send the tally.
        reply: RpcReplyPort<Tally>,
    },
}

/// What a producer actor starts with.
pub struct ProducerArgs {
    /// The shared idempotent producer.
    pub producer: FutureProducer,
    /// Target topic.
    pub topic: String,
    /// Poison fraction.
    pub poison_rate: f64,
    /// Shared count of confirmed records, for progress output.
    pub delivered: Arc<AtomicU64>,
    /// How each record's value is written.
    pub format: ValueFormat,
}

/// A producer actor: sends its share and tallies deliveries.
pub struct ProducerActor;

/// The most records one actor keeps waiting for confirmation.
const MAX_IN_FLIGHT: usize = 20_000;

impl Actor for ProducerActor {
    type Msg = ProducerMsg;
    type State = ProducerArgs;
    type Arguments = ProducerArgs;

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
        let ProducerMsg::Produce {
            count,
            rate,
            seed,
            reply,
        } = message;
        let tally = produce_share(state, count, rate, seed).await;
        let _ = reply.send(tally);
        Ok(())
    }
}

async fn settle(
    in_flight: &mut std::collections::VecDeque<(DeliveryFuture, Option<PoisonKind>)>,
    tally: &mut Tally,
    delivered: &AtomicU64,
) {
    let Some((delivery, poison)) = in_flight.pop_front() else {
        return;
    };
    match delivery.await {
        Ok(Ok(_)) => {
            match poison {
                None => tally.valid += 1,
                Some(kind) => *tally.poison.entry(kind).or_insert(0) += 1,
            }
            delivered.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(SENT_METRIC, "kind" => poison.map(PoisonKind::label).unwrap_or("valid")).increment(1);
        }
        Ok(Err((delivery_error, _))) => {
            tally.failed += 1;
            tally
                .first_error
                .get_or_insert_with(|| delivery_error.to_string());
        }
        Err(_cancelled) => {
            tally.failed += 1;
            tally
                .first_error
                .get_or_insert_with(|| "delivery cancelled".to_string());
        }
    }
}

async fn produce_share(state: &ProducerArgs, count: u64, rate: f64, seed: u64) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    let mut in_flight = std::collections::VecDeque::new();
    let started = Instant::now();
    for sequence in 0..count {
        if rate > 0.0 && sequence % 100 == 0 {
            let due = started + Duration::from_secs_f64(sequence as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as i64)
            .unwrap_or_default();
        let mut record = generate_record(&mut rng, state.poison_rate, now_ms);
        record.payload = state.format.encode(std::mem::take(&mut record.payload));
        loop {
            let kafka_record = FutureRecord::to(&state.topic)
                .key(record.key.as_str())
                .payload(record.payload.as_slice())
                .headers(OwnedHeaders::new().insert(Header {
                    key: TRACEPARENT_HEADER,
                    value: Some(record.traceparent.as_str()),
                }));
            match state.producer.send_result(kafka_record) {
                Ok(delivery) => {
                    in_flight.push_back((delivery, record.poison));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if in_flight.is_empty() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    } else {
                        settle(&mut in_flight, &mut tally, &state.delivered).await;
                    }
                }
                Err((send_error, _)) => {
                    tally.failed += 1;
                    tally
                        .first_error
                        .get_or_insert_with(|| send_error.to_string());
                    break;
                }
            }
        }
        while in_flight.len() >= MAX_IN_FLIGHT {
            settle(&mut in_flight, &mut tally, &state.delivered).await;
        }
    }
    while !in_flight.is_empty() {
        settle(&mut in_flight, &mut tally, &state.delivered).await;
    }
    tally
}

/// The producers' supervisor: they are spawned linked to it, so a producer
/// that fails (a panic; delivery errors are counted in its tally, not thrown)
/// is recorded with its reason and the run fails with it, instead of hanging
/// on a dead actor. No restart: the ledger must count what was really sent,
/// and a half-done share cannot be resumed without sending duplicates.
pub struct ProducerSupervisor;

impl Actor for ProducerSupervisor {
    type Msg = ();
    type State = Arc<std::sync::Mutex<Vec<String>>>;
    type Arguments = Arc<std::sync::Mutex<Vec<String>>>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        failures: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(failures)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: ractor::SupervisionEvent,
        failures: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let ractor::SupervisionEvent::ActorFailed(cell, reason) = event {
            failures
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .push(format!("producer actor {} failed: {reason}", cell.get_id()));
        }
        Ok(())
    }
}

/// Creates the idempotent producer.
pub fn create_producer(brokers: &Brokers) -> Result<FutureProducer, LoadgenError> {
    brokers
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "10")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "60000")
        .create()
        .map_err(|error| {
            LoadgenError::Kafka(format!("cannot create producer for {brokers}: {error}"))
        })
}

/// Sends everything and returns the ledger. Fails if any record was not delivered.
pub async fn run(config: &LoadgenConfig) -> Result<Ledger, LoadgenError> {
    config.validate()?;
    // Fail fast, with one clear message, when the broker cannot be reached
    // or refuses us, or the topic is not there.
    let (brokers, topic) = (config.brokers.clone(), config.topic.clone());
    tokio::task::spawn_blocking(move || {
        stream_actors::kafka::check_access(&brokers, &[&topic], stream_actors::kafka::PROBE_TIMEOUT)
    })
    .await
    .map_err(|error| LoadgenError::Kafka(format!("start-up probe failed: {error}")))?
    .map_err(|error| LoadgenError::Kafka(error.to_string()))?;
    let producer = create_producer(&config.brokers)?;

    let delivered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress_task = config.progress.then(|| {
        let delivered = delivered.clone();
        let total = config.count;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let so_far = delivered.load(Ordering::Relaxed);
                eprintln!(
                    "loadgen: {so_far}/{total} sent ({:.0}/s)",
                    so_far as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    });

    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (supervisor, supervisor_handle) = Actor::spawn(None, ProducerSupervisor, failures.clone())
        .await
        .map_err(|error| LoadgenError::Actor(error.to_string()))?;
    let mut calls = Vec::new();
    let mut actors = Vec::new();
    for (share, seed) in shares(config) {
        let (actor, handle) = Actor::spawn_linked(
            None,
            ProducerActor,
            ProducerArgs {
                producer: producer.clone(),
                topic: config.topic.clone(),
                poison_rate: config.poison_rate,
                delivered: delivered.clone(),
                format: config.format,
            },
            supervisor.get_cell(),
        )
        .await
        .map_err(|error| LoadgenError::Actor(error.to_string()))?;
        let rate = config.rate as f64 / config.producers as f64;
        let caller = actor.clone();
        calls.push(async move {
            caller
                .call(
                    move |reply| ProducerMsg::Produce {
                        count: share,
                        rate,
                        seed,
                        reply,
                    },
                    None,
                )
                .await
        });
        actors.push((actor, handle));
    }
    let mut ledger = Ledger::default();
    let mut failed = 0u64;
    let mut first_error = None;
    let outcomes = futures::future::join_all(calls).await;
    let supervised = |fallback: String| {
        let failures = failures.lock().unwrap_or_else(|poison| poison.into_inner());
        if failures.is_empty() {
            LoadgenError::Actor(fallback)
        } else {
            LoadgenError::Actor(failures.join("; "))
        }
    };
    for outcome in outcomes {
        match outcome {
            Ok(ractor::rpc::CallResult::Success(tally)) => {
                ledger.absorb(&tally);
                failed += tally.failed;
                if first_error.is_none() {
                    first_error = tally.first_error;
                }
            }
            Ok(other) => return Err(supervised(format!("producer did not answer: {other:?}"))),
            Err(error) => return Err(supervised(error.to_string())),
        }
    }
    for (actor, handle) in actors {
        actor.stop(None);
        let _ = handle.await;
    }
    supervisor.stop(None);
    let _ = supervisor_handle.await;
    if let Some(task) = progress_task {
        task.abort();
    }
    ledger.elapsed_s = started.elapsed().as_secs_f64();
    ledger.rate = ledger.sent as f64 / ledger.elapsed_s.max(1e-9);
    if failed > 0 {
        return Err(LoadgenError::Kafka(format!(
            "{failed} records were not delivered (first error: {}); delivered: {}",
            first_error.unwrap_or_default(),
            serde_json::to_string(&ledger).unwrap_or_default()
        )));
    }
    Ok(ledger)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that panics on its first message.
    struct Fragile;

    impl Actor for Fragile {
        type Msg = ();
        type State = ();
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<Self::Msg>,
            _args: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(())
        }

        async fn handle(
            &self,
            _myself: ActorRef<Self::Msg>,
            _message: Self::Msg,
            _state: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            panic!("producer bug");
        }
    }

    #[tokio::test]
    async fn the_supervisor_records_a_failed_producer_with_its_reason() {
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (supervisor, handle) = Actor::spawn(None, ProducerSupervisor, failures.clone())
            .await
            .unwrap();
        let (child, child_handle) = Actor::spawn_linked(None, Fragile, (), supervisor.get_cell())
            .await
            .unwrap();
        child.cast(()).unwrap();
        let _ = child_handle.await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while failures.lock().unwrap().is_empty() && Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        let recorded = failures.lock().unwrap().clone();
        assert_eq!(recorded.len(), 1, "{recorded:?}");
        assert!(recorded[0].contains("producer bug"), "{recorded:?}");
        supervisor.stop(None);
        let _ = handle.await;
    }

    #[test]
    fn the_same_seed_makes_the_same_records() {
        let mut first = StdRng::seed_from_u64(7);
        let mut second = StdRng::seed_from_u64(7);
        for _ in 0..100 {
            let a = generate_record(&mut first, 0.3, 1_000);
            let b = generate_record(&mut second, 0.3, 1_000);
            assert_eq!(a.payload, b.payload);
            assert_eq!(a.poison, b.poison);
        }
    }

    #[test]
    fn poison_rate_is_respected_and_every_kind_appears() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut poison = BTreeMap::new();
        let total = 200_000;
        for _ in 0..total {
            if let Some(kind) = generate_record(&mut rng, 0.05, 1_000).poison {
                *poison.entry(kind).or_insert(0u64) += 1;
            }
        }
        let fraction = poison.values().sum::<u64>() as f64 / total as f64;
        assert!((fraction - 0.05).abs() < 0.005, "fraction {fraction}");
        assert_eq!(poison.len(), PoisonKind::ALL.len());
    }

    #[test]
    fn the_connect_envelope_carries_the_same_event_and_leaves_malformed_json_alone() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut kinds = BTreeMap::new();
        for _ in 0..20_000 {
            let record = generate_record(&mut rng, 0.05, 1_700_000_000_000);
            let encoded = ValueFormat::ConnectJson.encode(record.payload.clone());
            *kinds.entry(record.poison).or_insert(0) += 1;
            if record.poison == Some(PoisonKind::MalformedJson) {
                assert_eq!(encoded, record.payload);
                continue;
            }
            let envelope: serde_json::Value = serde_json::from_slice(&encoded).expect("json");
            let original: serde_json::Value =
                serde_json::from_slice(&record.payload).expect("json");
            assert_eq!(envelope["payload"], original);
            assert_eq!(
                envelope["schema"],
                serde_json::from_str::<serde_json::Value>(CONNECT_EVENT_SCHEMA).expect("schema")
            );
            if record.poison.is_none() {
                // Every field of a valid event is in the schema, and the other way round.
                let fields: Vec<&str> = envelope["schema"]["fields"]
                    .as_array()
                    .expect("fields")
                    .iter()
                    .map(|field| field["field"].as_str().expect("name"))
                    .collect();
                let mut keys: Vec<&str> = original
                    .as_object()
                    .expect("object")
                    .keys()
                    .map(String::as_str)
                    .collect();
                keys.sort_unstable();
                let mut sorted = fields.clone();
                sorted.sort_unstable();
                assert_eq!(keys, sorted);
            }
        }
        assert_eq!(kinds.len(), PoisonKind::ALL.len() + 1, "{kinds:?}");
        assert_eq!(ValueFormat::Json.encode(b"{}".to_vec()), b"{}".to_vec());
    }

    #[test]
    fn planned_records_are_the_same_whenever_they_are_made() {
        let config = LoadgenConfig {
            brokers: Brokers::plaintext("127.0.0.1:9092"),
            topic: "events".into(),
            count: 5_001,
            rate: 0,
            poison_rate: 0.05,
            seed: 9,
            producers: 3,
            progress: false,
            format: ValueFormat::Json,
        };
        assert_eq!(
            shares(&config).iter().map(|(count, _)| count).sum::<u64>(),
            5_001
        );
        let identity = |record: GeneratedRecord| {
            let value: Option<serde_json::Value> = serde_json::from_slice(&record.payload).ok();
            let event_id = value.and_then(|value| value["event_id"].as_str().map(str::to_string));
            (event_id, record.poison)
        };
        let first: Vec<_> = planned_records(&config).map(identity).collect();
        let second: Vec<_> = planned_records(&config).map(identity).collect();
        assert_eq!(first.len(), 5_001);
        assert_eq!(first, second);
        // The first actor's records are its RNG's, in order.
        let mut rng = StdRng::seed_from_u64(shares(&config)[0].1);
        assert_eq!(first[0], identity(generate_record(&mut rng, 0.05, 1)));
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let config = LoadgenConfig {
            brokers: Brokers::plaintext("127.0.0.1:9092"),
            topic: "events".into(),
            count: 10,
            rate: 0,
            poison_rate: 1.5,
            seed: 0,
            producers: 2,
            progress: false,
            format: ValueFormat::Json,
        };
        let error = config.validate().expect_err("invalid");
        assert!(error.to_string().contains("--poison-rate"));
    }
}
