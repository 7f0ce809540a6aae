//! W3C trace context end to end: a record's `traceparent` reaches its row
//! in both stores and its dead letter unchanged; a record without one (or
//! with an invalid one) gets a trace of its own, not a failure; a replayed
//! dead letter keeps its trace; with an OTLP endpoint the processor
//! exports a span per stored batch (linked to each record's trace) and per
//! dead letter (a child of the record's trace), here to an OTLP/HTTP
//! receiver in the test.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{by_type, run_until_caught_up, ProcessorProcess, TestEnv};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use prost::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use stream_actors::trace_context::{TraceContext, TRACEPARENT_HEADER};

/// Spans an in-test OTLP/HTTP receiver took, with the service name of
/// their resource.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP receiver (protobuf, `POST /v1/traces`) on a free loopback
/// port: its base URL and what it receives.
async fn otlp_receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let store = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                for resource_spans in request.resource_spans {
                    let service = resource_spans
                        .resource
                        .iter()
                        .flat_map(|resource| &resource.attributes)
                        .find(|attribute| attribute.key == "service.name")
                        .and_then(|attribute| attribute.value.as_ref()?.value.clone())
                        .map(|value| match value {
                            Value::StringValue(name) => name,
                            other => format!("{other:?}"),
                        })
                        .unwrap_or_default();
                    for scope_spans in resource_spans.scope_spans {
                        store.lock().extend(
                            scope_spans
                                .spans
                                .into_iter()
                                .map(|span| (service.clone(), span)),
                        );
                    }
                }
                (
                    [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), received)
}

/// A string attribute of a span.
fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .and_then(|attribute| attribute.value.as_ref()?.value.clone())
        .map(|value| match value {
            Value::StringValue(text) => text,
            Value::IntValue(number) => number.to_string(),
            other => format!("{other:?}"),
        })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

fn event(event_id: uuid::Uuid, schema_version: u32) -> Vec<u8> {
    serde_json::json!({
        "event_id": event_id, "event_type": "page_view", "user_id": "u-trace",
        "amount": 1.5, "ts": now_ms(), "schema_version": schema_version,
    })
    .to_string()
    .into_bytes()
}

/// One record sent by the test: what it carried and where it landed.
struct Sent {
    traceparent: Option<&'static str>,
    partition: i32,
    offset: i64,
    timestamp_ms: i64,
}

/// Sends `payload` with `traceparent` (if any) as its header and an explicit timestamp.
async fn send(
    producer: &FutureProducer,
    topic: &str,
    payload: &[u8],
    traceparent: Option<&'static str>,
) -> Sent {
    let timestamp_ms = now_ms();
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
        .payload(payload)
        .timestamp(timestamp_ms);
    if let Some(value) = traceparent {
        record = record.headers(OwnedHeaders::new().insert(Header {
            key: TRACEPARENT_HEADER,
            value: Some(value),
        }));
    }
    let delivery = producer
        .send(record, Timeout::After(Duration::from_secs(30)))
        .await
        .expect("delivered");
    Sent {
        traceparent,
        partition: delivery.partition,
        offset: delivery.offset,
        timestamp_ms,
    }
}

impl Sent {
    /// The trace context the pipeline must give this record.
    fn expected(&self, topic: &str) -> String {
        match self
            .traceparent
            .and_then(|value| TraceContext::parse(value.as_bytes()))
        {
            Some(context) => context.to_string(),
            None => TraceContext::started_for(
                topic,
                self.partition,
                self.offset,
                Some(self.timestamp_ms),
            )
            .to_string(),
        }
    }
}

/// Traceparent by event id, in PostgreSQL and in ClickHouse.
async fn stored_traceparents(
    env: &TestEnv,
) -> (BTreeMap<String, Option<String>>, BTreeMap<String, String>) {
    let postgres = stream_actors::storage::connect_postgres(&env.config.postgres_url)
        .await
        .expect("postgres");
    let in_postgres = postgres
        .query("SELECT event_id::text, traceparent FROM events", &[])
        .await
        .expect("rows")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let clickhouse =
        stream_actors::storage::ClickHouseEvents::client(&env.config).expect("clickhouse");
    let in_clickhouse: Vec<(String, String)> = clickhouse
        .query("SELECT event_id, traceparent FROM events FINAL")
        .fetch_all()
        .await
        .expect("clickhouse rows");
    (in_postgres, in_clickhouse.into_iter().collect())
}

/// Starts the processor binary exporting spans to `endpoint` (every 200 ms)
/// and waits until it has caught up with the topic.
async fn run_exporting_to(env: &TestEnv, endpoint: &str) -> ProcessorProcess {
    let mut processor = ProcessorProcess::start(
        env,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    processor.wait_ready(Duration::from_secs(60));
    env.wait_for_catch_up(Duration::from_secs(90)).await;
    processor
}

const CARRIED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const DEAD: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const REPLAYED: &str = "00-11112222333344445555666677778888-1234567890abcdef-00";
const INVALID: &str = "00-NOT-A-TRACEPARENT";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_reaches_rows_and_dead_letters_and_spans_follow_it() {
    let env = TestEnv::new("trace", 2).await;
    let topic = env.config.topic.clone();
    let producer: FutureProducer = env
        .config
        .brokers
        .client_config()
        .create()
        .expect("producer");
    let ids: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::new_v4()).collect();
    // Valid: carried, missing, invalid. Then poison: carried, missing; and
    // one of an unknown schema version, to replay.
    let carried = send(&producer, &topic, &event(ids[0], 1), Some(CARRIED)).await;
    let missing = send(&producer, &topic, &event(ids[1], 1), None).await;
    let invalid = send(&producer, &topic, &event(ids[2], 1), Some(INVALID)).await;
    let dead = send(&producer, &topic, b"{\"event_id\": ", Some(DEAD)).await;
    let dead_missing = send(&producer, &topic, b"not json", None).await;
    let to_replay = send(&producer, &topic, &event(ids[3], 99), Some(REPLAYED)).await;
    // And loadgen's records, each with a traceparent of its own.
    let ledger = env.produce(600, 0.05, 41).await;

    let (endpoint, received) = otlp_receiver().await;
    let mut processor = run_exporting_to(&env, &endpoint).await;
    assert_eq!(
        processor.metric_where("stream_trace_contexts_started_total", "reason=\"missing\""),
        Some(2.0)
    );
    assert_eq!(
        processor.metric_where("stream_trace_contexts_started_total", "reason=\"invalid\""),
        Some(1.0)
    );
    // Exports go every 200 ms: some are counted as sent, none failed.
    assert!(
        common::within(Duration::from_secs(20), || {
            processor.metric("stream_spans_exported_total") >= Some(1.0)
        })
        .await,
        "no span export counted:\n{}",
        processor.log_tail()
    );
    assert_eq!(
        processor.metric("stream_span_exports_failed_total"),
        Some(0.0)
    );
    assert_eq!(processor.terminate(Duration::from_secs(60)), Some(0));

    // Rows: the carried trace unchanged, a started one where there was
    // none, the same in both stores.
    let (in_postgres, in_clickhouse) = stored_traceparents(&env).await;
    for (id, sent) in ids.iter().zip([&carried, &missing, &invalid]) {
        let expected = sent.expected(&topic);
        assert_eq!(
            in_postgres.get(&id.to_string()),
            Some(&Some(expected.clone()))
        );
        assert_eq!(in_clickhouse.get(&id.to_string()), Some(&expected));
    }
    assert_eq!(carried.expected(&topic), CARRIED);
    let started_for_missing = missing.expected(&topic);
    let started_for_invalid = invalid.expected(&topic);
    assert_ne!(started_for_missing, started_for_invalid);
    assert!(TraceContext::parse(started_for_invalid.as_bytes()).is_some());

    // Loadgen's records: each row has the traceparent loadgen sent with it.
    let planned: HashMap<String, String> = loadgen::planned_records(&loadgen::LoadgenConfig {
        brokers: env.config.brokers.clone(),
        topic: topic.clone(),
        count: 600,
        rate: 0,
        poison_rate: 0.05,
        seed: 41,
        producers: 2,
        progress: false,
        format: loadgen::ValueFormat::Json,
    })
    .filter(|record| record.poison.is_none())
    .map(|record| {
        let event: serde_json::Value = serde_json::from_slice(&record.payload).expect("json");
        (
            event["event_id"].as_str().expect("id").to_string(),
            record.traceparent,
        )
    })
    .collect();
    assert_eq!(planned.len() as u64, ledger.valid);
    for (event_id, traceparent) in &planned {
        assert_eq!(in_postgres.get(event_id), Some(&Some(traceparent.clone())));
        assert_eq!(in_clickhouse.get(event_id), Some(traceparent));
    }

    // Dead letters: the record's traceparent (or the one started for it).
    let dead_letters = stream_actors::topic::read_topic(
        &env.config.brokers,
        &env.config.dlq_topic,
        Duration::from_secs(60),
    )
    .expect("dead letters");
    assert_eq!(dead_letters.len() as u64, ledger.poison + 3);
    let by_source: HashMap<(i32, i64), String> = dead_letters
        .iter()
        .filter(|letter| letter.header("dlq.source.topic") == Some(topic.as_str()))
        .map(|letter| {
            let partition = letter.header("dlq.source.partition").expect("partition");
            let offset = letter.header("dlq.source.offset").expect("offset");
            (
                (
                    partition.parse().expect("int"),
                    offset.parse().expect("int"),
                ),
                letter
                    .header(TRACEPARENT_HEADER)
                    .expect("traceparent")
                    .to_string(),
            )
        })
        .collect();
    for sent in [&dead, &dead_missing, &to_replay] {
        assert_eq!(
            by_source.get(&(sent.partition, sent.offset)),
            Some(&sent.expected(&topic))
        );
    }
    assert!(by_source
        .values()
        .all(|value| TraceContext::parse(value.as_bytes()).is_some()));

    // Spans: one per dead letter, a child of the record's trace; one per
    // stored batch, linked to every record it stored.
    let spans = received.lock().clone();
    assert!(spans
        .iter()
        .all(|(service, _)| service == "stream-processor"));
    let dlq_span_name = format!("send {}", env.config.dlq_topic);
    let dead_letter_spans: Vec<&Span> = spans
        .iter()
        .map(|(_, span)| span)
        .filter(|span| span.name == dlq_span_name)
        .collect();
    // The producer of `to_replay` did not sample its trace: no span there.
    assert_eq!(dead_letter_spans.len() as u64, ledger.poison + 2);
    let unsampled = TraceContext::parse(REPLAYED.as_bytes()).expect("valid");
    assert!(spans
        .iter()
        .all(|(_, span)| span.trace_id != unsampled.trace_id));
    for (sent, error_type) in [(&dead, "malformed_json"), (&dead_missing, "malformed_json")] {
        let context = TraceContext::parse(sent.expected(&topic).as_bytes()).expect("valid");
        let span = dead_letter_spans
            .iter()
            .find(|span| span.trace_id == context.trace_id)
            .unwrap_or_else(|| panic!("no dead-letter span in trace {}", context.trace_id_hex()));
        assert_eq!(span.parent_span_id, context.span_id);
        assert_eq!(attribute(span, "error.type").as_deref(), Some(error_type));
        assert_eq!(
            attribute(span, "stream.source.offset"),
            Some(sent.offset.to_string())
        );
        // Status code 2: error.
        assert_eq!(span.status.as_ref().map(|status| status.code), Some(2));
    }
    let batch_name = format!("process {topic}");
    let batch_spans: Vec<&Span> = spans
        .iter()
        .map(|(_, span)| span)
        .filter(|span| span.name == batch_name)
        .collect();
    let linked: HashSet<(Vec<u8>, Vec<u8>)> = batch_spans
        .iter()
        .flat_map(|span| &span.links)
        .map(|link| (link.trace_id.clone(), link.span_id.clone()))
        .collect();
    let stored_in_batches: i64 = batch_spans
        .iter()
        .map(|span| {
            attribute(span, "messaging.batch.message_count")
                .and_then(|count| count.parse::<i64>().ok())
                .expect("message count")
        })
        .sum();
    assert_eq!(stored_in_batches as u64, ledger.valid + 3);
    assert_eq!(linked.len() as u64, ledger.valid + 3);
    for sent in [&carried, &missing, &invalid] {
        let context = TraceContext::parse(sent.expected(&topic).as_bytes()).expect("valid");
        assert!(linked.contains(&(context.trace_id.to_vec(), context.span_id.to_vec())));
    }

    // A replayed dead letter keeps its trace: its row carries it (and its
    // flags: this one was not sampled).
    let replayed = stream_bins::dlq::replay(
        &env.connections(),
        &by_type("unknown_schema_version"),
        3,
        true,
    )
    .await
    .expect("replay");
    let expected_replays = ledger
        .poison_by_kind
        .get("unknown_schema_version")
        .copied()
        .unwrap_or(0)
        + 1;
    assert_eq!(replayed.published, expected_replays);
    run_until_caught_up(&env, vec![1, 99]).await;
    let (in_postgres, in_clickhouse) = stored_traceparents(&env).await;
    assert_eq!(
        in_postgres.get(&ids[3].to_string()),
        Some(&Some(REPLAYED.to_string()))
    );
    assert_eq!(
        in_clickhouse.get(&ids[3].to_string()).map(String::as_str),
        Some(REPLAYED)
    );
}

/// A collector that is away costs spans, never events: the pipeline stores
/// and dead-letters everything as usual, the failed exports are logged and
/// counted, and the processor still stops at once on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_away_drops_spans_not_events() {
    let env = TestEnv::new("trace_away", 2).await;
    let ledger = env.produce(1_000, 0.05, 43).await;
    // A port nothing listens on: taken, then closed.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("address")
    };
    let endpoint = format!("http://{closed}");
    let mut processor = run_exporting_to(&env, &endpoint).await;
    assert!(
        common::within(Duration::from_secs(20), || {
            processor.metric("stream_span_exports_failed_total") >= Some(1.0)
        })
        .await,
        "no failed export counted:\n{}",
        processor.log_tail()
    );
    assert_eq!(processor.metric("stream_spans_exported_total"), Some(0.0));
    let started = std::time::Instant::now();
    assert_eq!(processor.terminate(Duration::from_secs(30)), Some(0));
    let stopping = started.elapsed();
    let log = std::fs::read_to_string(&processor.log).expect("log");
    assert!(
        log.contains("spans not exported over OTLP (dropped)"),
        "{}",
        processor.log_tail()
    );
    common::assert_clean(&common::audit(&env).await, &ledger);
    eprintln!("stopped {stopping:?} after SIGTERM with the collector away");
}
