//! Hostile input on the real local services: one bad record never stops the
//! pipeline. Records of every hostile class we could think of, between valid
//! events, each end up stored once or dead-lettered once; records a store
//! refuses are found by bisecting the batch and dead-lettered from the sink.

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::TestEnv;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use sha2::{Digest, Sha256};
use stream_actors::dlq_writer::{ENVELOPE_HEADER, ENVELOPE_PAYLOAD_BYTES};
use stream_actors::parse::MAX_ERROR_MESSAGE_BYTES;
use stream_bins::inspect::{self, ReadRecord};
use stream_supervisor::{start_pipeline, PipelineExit};

/// Where a record must end up.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// Stored in both stores.
    Stored,
    /// Dead-lettered with this error type.
    Dead(&'static str),
    /// Dead-lettered, whatever the type (serde decides the exact one).
    DeadAny,
}

/// A record to produce: key, value, where it must end up.
type Hostile = (Vec<u8>, Option<Vec<u8>>, Outcome);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A valid event's JSON with these raw JSON values spliced in.
fn event(event_type: &str, user_id: &str, amount: &str) -> String {
    event_at(event_type, user_id, amount, &now_ms().to_string(), "1")
}

/// The same, with the raw JSON of `ts` and `schema_version` too.
fn event_at(event_type: &str, user_id: &str, amount: &str, ts: &str, version: &str) -> String {
    format!(
        r#"{{"event_id":"{}","event_type":{event_type},"user_id":{user_id},"amount":{amount},"ts":{ts},"schema_version":{version}}}"#,
        uuid::Uuid::new_v4(),
    )
}

/// Every hostile record: key, value, where it must end up.
fn hostile_records() -> Vec<Hostile> {
    let text = |value: String| Some(value.into_bytes());
    let valid_type = "\"purchase\"";
    let mut records: Vec<(&str, Option<Vec<u8>>, Outcome)> = vec![
        (
            "nul-user",
            text(event(valid_type, r#""a\u0000b""#, "1.5")),
            Outcome::Dead("nul_in_text"),
        ),
        (
            "nul-type",
            text(event(r#""x\u0000""#, "\"u\"", "1.5")),
            Outcome::Dead("nul_in_text"),
        ),
        (
            "raw-nul-byte",
            text(event(valid_type, "\"a\0b\"", "1.5")),
            Outcome::Dead("malformed_json"),
        ),
        (
            "control-chars",
            text(event(valid_type, r#""\u0001\u001f\t\r\n""#, "1.5")),
            Outcome::Stored,
        ),
        (
            "huge-wrong-type",
            text(event(
                valid_type,
                "\"u\"",
                &format!("\"{}\"", "9".repeat(600_000)),
            )),
            Outcome::Dead("wrong_field_type"),
        ),
        (
            "long-user",
            text(event(
                valid_type,
                &format!("\"{}\"", "u".repeat(100_000)),
                "1.5",
            )),
            Outcome::Dead("field_too_long"),
        ),
        (
            "amount-overflow",
            text(event(valid_type, "\"u\"", "1e400")),
            Outcome::DeadAny,
        ),
        (
            "extreme-amount",
            text(event(valid_type, "\"u\"", "1.7976931348623157e308")),
            Outcome::Stored,
        ),
        (
            "negative-zero",
            text(event(valid_type, "\"u\"", "-0.0")),
            Outcome::Stored,
        ),
        (
            "nan-string",
            text(event(valid_type, "\"u\"", "\"NaN\"")),
            Outcome::Dead("wrong_field_type"),
        ),
        (
            "array-amount",
            text(event(valid_type, "\"u\"", "[]")),
            Outcome::Dead("wrong_field_type"),
        ),
        (
            "ts-overflow",
            text(event_at(
                valid_type,
                "\"u\"",
                "1",
                "99999999999999999999",
                "1",
            )),
            Outcome::DeadAny,
        ),
        (
            "negative-version",
            text(event_at(
                valid_type,
                "\"u\"",
                "1",
                &now_ms().to_string(),
                "-1",
            )),
            Outcome::Dead("wrong_field_type"),
        ),
        // An unknown field is ignored, however deep (serde skips it without recursion).
        (
            "deep-nesting-ignored",
            text(format!(
                "{{\"x\":{}{},{}",
                "[".repeat(100_000),
                "]".repeat(100_000),
                &event(valid_type, "\"u\"", "1")[1..]
            )),
            Outcome::Stored,
        ),
        (
            "deep-nesting-amount",
            text(event(
                valid_type,
                "\"u\"",
                &format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
            )),
            Outcome::DeadAny,
        ),
        (
            "invalid-utf8",
            Some(
                [
                    &b"{\"user_id\":\"\xff\xfe\","[..],
                    &event(valid_type, "\"u\"", "1").into_bytes()[1..],
                ]
                .concat(),
            ),
            Outcome::DeadAny,
        ),
        (
            "lone-surrogate",
            text(event(valid_type, r#""\ud800""#, "1")),
            Outcome::DeadAny,
        ),
        (
            "empty-value",
            Some(Vec::new()),
            Outcome::Dead("malformed_json"),
        ),
        ("tombstone", None, Outcome::Dead("malformed_json")),
        (
            "json-null",
            text("null".to_string()),
            Outcome::Dead("malformed_json"),
        ),
        (
            "json-string",
            text("\"{}\"".to_string()),
            Outcome::Dead("malformed_json"),
        ),
        (
            "empty-object",
            text("{}".to_string()),
            Outcome::Dead("missing_field"),
        ),
        (
            "null-field",
            text(event(valid_type, "null", "1")),
            Outcome::Dead("missing_field"),
        ),
        (
            "duplicate-keys",
            text(format!(
                "{{\"amount\":1,{}",
                &event(valid_type, "\"u\"", "2")[1..]
            )),
            Outcome::Dead("malformed_json"),
        ),
        (
            "bom",
            text(format!("\u{feff}{}", event(valid_type, "\"u\"", "1"))),
            Outcome::Dead("malformed_json"),
        ),
        (
            "empty-strings",
            text(event("\"\"", "\"\"", "1")),
            Outcome::Stored,
        ),
        (
            "multibyte",
            text(event("\"köp\"", "\"ユーザー😀\"", "1")),
            Outcome::Stored,
        ),
        (
            "leading-space",
            text(format!("  \n{}", event(valid_type, "\"u\"", "1"))),
            Outcome::Stored,
        ),
        (
            "unknown-fields",
            text(event(valid_type, "\"u\"", "1").replace("{", "{\"extra\":{\"a\":[1,2,{}]},")),
            Outcome::Stored,
        ),
        (
            "not-json",
            text("<xml/>".to_string()),
            Outcome::Dead("malformed_json"),
        ),
    ];
    // Larger than the processor's limit (900 KB in this test) and too large
    // for the dead-letter producer with its headers: dead-lettered as an envelope.
    let padding =
        "p".repeat(1_000_000 - event(valid_type, "\"u\"", "1").len() - "\"pad\":\"\",".len());
    let too_large =
        event(valid_type, "\"u\"", "1").replacen('{', &format!("{{\"pad\":\"{padding}\","), 1);
    assert_eq!(too_large.len(), 1_000_000);
    records.push((
        "too-large",
        text(too_large),
        Outcome::Dead("record_too_large"),
    ));
    let mut keyed: Vec<Hostile> = records
        .into_iter()
        .map(|(name, value, outcome)| (name.as_bytes().to_vec(), value, outcome))
        .collect();
    // A 10 KB key on a poison record: the dead letter keeps it whole.
    let mut big_key = b"big-key".to_vec();
    big_key.extend(std::iter::repeat_n(b'k', 10_000));
    keyed.push((
        big_key,
        Some(b"not json".to_vec()),
        Outcome::Dead("malformed_json"),
    ));
    keyed
}

async fn produce_raw(env: &TestEnv, records: &[Hostile]) {
    let producer: FutureProducer = env
        .config
        .brokers
        .client_config()
        .set("message.max.bytes", "2000000")
        .create()
        .expect("producer");
    for (key, value, _) in records {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&env.config.topic).key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map_err(|(error, _)| error)
            .expect("hostile record produced");
    }
}

fn position(record: &ReadRecord) -> Option<(i32, i64)> {
    Some((
        record.header("dlq.source.partition")?.parse().ok()?,
        record.header("dlq.source.offset")?.parse().ok()?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_are_stored_or_dead_lettered_once_and_never_stall_the_pipeline() {
    let mut env = TestEnv::new("hostile", 3).await;
    env.config.max_record_bytes = 900_000;
    let hostile = hostile_records();
    let before = env.produce(1500, 0.0, 11).await;
    produce_raw(&env, &hostile).await;
    let after = env.produce(1500, 0.0, 12).await;

    let pipeline = start_pipeline(env.config.clone())
        .await
        .expect("pipeline starts");
    env.wait_for_catch_up(Duration::from_secs(180)).await;
    let status = pipeline.status().await.expect("status");
    assert!(
        status.restarts.values().all(|restarts| *restarts == 0),
        "no actor failed over a record: {:?}",
        status.restarts
    );
    assert_eq!(pipeline.shutdown().await, PipelineExit::Stopped);

    // Each hostile record where it belongs, by its key.
    let source = inspect::read_topic(
        &env.config.brokers,
        &env.config.topic,
        Duration::from_secs(60),
    )
    .unwrap();
    let key_at: HashMap<(i32, i64), Vec<u8>> = source
        .iter()
        .filter_map(|record| Some(((record.partition, record.offset), record.key.clone()?)))
        .collect();
    let dead_letters = inspect::read_topic(
        &env.config.brokers,
        &env.config.dlq_topic,
        Duration::from_secs(60),
    )
    .unwrap();
    let mut dead_by_key: HashMap<Vec<u8>, &ReadRecord> = HashMap::new();
    for dead_letter in &dead_letters {
        let message = dead_letter.header("dlq.error.message").unwrap_or_default();
        assert!(
            message.len() <= MAX_ERROR_MESSAGE_BYTES,
            "a {} byte error message",
            message.len()
        );
        let at = position(dead_letter).expect("source position headers");
        if let Some(key) = key_at.get(&at) {
            dead_by_key.insert(key.clone(), dead_letter);
        }
    }
    let postgres = stream_actors::storage::connect_postgres(&env.config.postgres_url)
        .await
        .unwrap();
    for (key, value, outcome) in &hostile {
        let name = String::from_utf8_lossy(&key[..key.len().min(20)]).into_owned();
        let dead = dead_by_key.get(key);
        match outcome {
            Outcome::Stored => {
                assert!(dead.is_none(), "{name} was dead-lettered");
                let at = key_at
                    .iter()
                    .find(|(_, stored_key)| *stored_key == key)
                    .map(|(at, _)| *at)
                    .expect("in the topic");
                let rows: i64 = postgres
                    .query_one(
                        "SELECT count(*) FROM events WHERE source_partition = $1 AND source_offset = $2",
                        &[&at.0, &at.1],
                    )
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(rows, 1, "{name} stored once");
            }
            Outcome::Dead(kind) => {
                let dead = dead.unwrap_or_else(|| panic!("{name} not dead-lettered"));
                assert_eq!(dead.header("dlq.error.type"), Some(*kind), "{name}");
                assert_eq!(dead.header("dlq.stage"), Some("parse"), "{name}");
            }
            Outcome::DeadAny => {
                let dead = dead.unwrap_or_else(|| panic!("{name} not dead-lettered"));
                assert_eq!(dead.header("dlq.stage"), Some("parse"), "{name}");
            }
        }
        let Some(dead) = dead else { continue };
        if name == "too-large" {
            // Too large for the dead-letter topic with its headers: an envelope.
            let original = value.as_deref().unwrap();
            assert_eq!(dead.header(ENVELOPE_HEADER), Some("payload_prefix"));
            assert_eq!(dead.header("dlq.payload.size"), Some("1000000"));
            let sha = hex::encode(Sha256::digest(original));
            assert_eq!(dead.header("dlq.payload.sha256"), Some(sha.as_str()));
            assert_eq!(
                dead.payload.as_deref(),
                Some(&original[..ENVELOPE_PAYLOAD_BYTES])
            );
            assert_eq!(dead.key.as_deref(), Some(key.as_slice()));
        } else {
            // Everything else carries the original key and bytes unchanged.
            assert_eq!(dead.header(ENVELOPE_HEADER), None, "{name}");
            assert_eq!(dead.payload.as_deref(), value.as_deref(), "{name}");
            assert_eq!(dead.key.as_deref(), Some(key.as_slice()), "{name}");
        }
    }

    // Every record of the topic stored once or dead-lettered once.
    let audit = common::audit(&env).await;
    assert!(audit.clean(), "{}", audit.render());
    let stored_hostile = hostile
        .iter()
        .filter(|(_, _, outcome)| *outcome == Outcome::Stored)
        .count() as u64;
    assert_eq!(
        audit.total.stored,
        before.valid + after.valid + stored_hostile,
        "{}",
        audit.render()
    );
    assert_eq!(
        audit.total.dead_lettered,
        hostile.len() as u64 - stored_hostile
    );
}

/// Records the parser accepts and a store refuses as data (a PostgreSQL check
/// constraint, SQLSTATE 23514; a ClickHouse column expression that throws,
/// code 395, and records both refuse) are found by bisecting the batch and
/// dead-lettered from the sink; the rest of their batches is stored, and a
/// refused record is in neither store even where the other store took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_store_refuses_are_bisected_out_and_dead_lettered_from_the_sink() {
    let env = TestEnv::new("refused", 3).await;
    let pipeline = start_pipeline(env.config.clone())
        .await
        .expect("pipeline starts");
    // The sink created the tables; now each store gets a rule of its own.
    let postgres = stream_actors::storage::connect_postgres(&env.config.postgres_url)
        .await
        .unwrap();
    postgres
        .batch_execute("ALTER TABLE events ADD CONSTRAINT refuse_marked CHECK (user_id NOT IN ('refused-by-postgres', 'refused-by-both'))")
        .await
        .unwrap();
    stream_actors::storage::ClickHouseEvents::client(&env.config)
        .expect("clickhouse client")
        .query("ALTER TABLE events ADD COLUMN refuse_marked UInt8 MATERIALIZED throwIf(user_id IN ('refused-by-clickhouse', 'refused-by-both'))")
        .execute()
        .await
        .unwrap();

    let mut refused: Vec<Hostile> = Vec::new();
    for index in 0..6 {
        for store in ["postgres", "clickhouse", "both"] {
            refused.push((
                format!("refused-{store}-{index}").into_bytes(),
                Some(event("\"purchase\"", &format!("\"refused-by-{store}\""), "3.5").into_bytes()),
                Outcome::Dead("store_rejected"),
            ));
        }
    }
    let background = env.produce_in_background(4000, 0, 0.0, 21);
    produce_raw(&env, &refused[..9]).await;
    let first = background.await.unwrap();
    produce_raw(&env, &refused[9..]).await;
    let second = env.produce(2000, 0.0, 22).await;

    env.wait_for_catch_up(Duration::from_secs(180)).await;
    let status = pipeline.status().await.expect("status");
    assert!(
        status.restarts.values().all(|restarts| *restarts == 0),
        "{:?}",
        status.restarts
    );
    assert_eq!(pipeline.shutdown().await, PipelineExit::Stopped);

    let audit = common::audit(&env).await;
    assert!(audit.clean(), "{}", audit.render());
    assert_eq!(audit.total.stored, first.valid + second.valid);
    assert_eq!(audit.total.dead_lettered, refused.len() as u64);

    let dead_letters = inspect::read_topic(
        &env.config.brokers,
        &env.config.dlq_topic,
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(dead_letters.len(), refused.len());
    for dead in &dead_letters {
        let key = String::from_utf8(dead.key.clone().unwrap()).unwrap();
        assert_eq!(dead.header("dlq.stage"), Some("sink"), "{key}");
        assert_eq!(
            dead.header("dlq.error.type"),
            Some("store_rejected"),
            "{key}"
        );
        let message = dead.header("dlq.error.message").unwrap();
        let expected: &[&str] = if key.contains("postgres") {
            &["postgres SQLSTATE 23514"]
        } else if key.contains("clickhouse") {
            &["clickhouse Code: 395"]
        } else {
            // Refused by both: whichever store found it first.
            &["postgres SQLSTATE 23514", "clickhouse Code: 395"]
        };
        assert!(
            expected.iter().any(|prefix| message.starts_with(prefix)),
            "{key}: {message}"
        );
        let original = refused
            .iter()
            .find(|(refused_key, _, _)| refused_key == key.as_bytes())
            .unwrap();
        assert_eq!(dead.payload, original.1, "{key}: bytes unchanged");
    }
}
