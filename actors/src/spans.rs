//! Spans exported over OTLP/HTTP with the OpenTelemetry SDK: off unless an
//! endpoint is configured (`--otlp-endpoint`, `OTEL_EXPORTER_OTLP_ENDPOINT`).
//!
//! Two kinds, following OpenTelemetry's messaging conventions:
//! - **a stored batch**: one `process <topic>` span (kind consumer) per batch
//!   both stores took, from the sink's first attempt to its last success,
//!   with a link to each record's trace context (the record's own
//!   `traceparent`; a batch holds records of many traces);
//! - **a dead letter**: one `send <dlq topic>` span (kind producer) per dead
//!   letter the broker confirmed, a child of the record's trace context, so
//!   the record's trace shows where it went and why (`error.type`, status
//!   error with the reason).
//!
//! The SDK's batch processor queues finished spans and sends them from a
//! thread of its own; when the queue is full (an endpoint that is away or
//! slow) it drops spans rather than wait, so tracing never holds up the
//! pipeline. An export that fails is logged (WARN) and counted
//! (`stream_span_exports_failed_total`), what was sent too
//! (`stream_spans_exported_total`). [`SpanExport::shutdown`] sends what is
//! queued at exit.

use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Link, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, TracerProvider,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

use crate::metrics as names;
use crate::models::{PoisonRecord, ValidRecord};
use crate::trace_context::TraceContext;

/// The service name spans carry when `OTEL_SERVICE_NAME` does not say.
pub const DEFAULT_SERVICE_NAME: &str = "stream-processor";

/// Where the actors report spans: nowhere ([`Spans::off`], the default) or
/// to the tracer of a [`SpanExport`]. Cheap to clone.
#[derive(Clone, Default)]
pub struct Spans {
    tracer: Option<SdkTracer>,
}

impl std::fmt::Debug for Spans {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Spans")
            .field("exporting", &self.tracer.is_some())
            .finish()
    }
}

/// The running exporter; shut it down to send the spans still queued.
pub struct SpanExport {
    provider: SdkTracerProvider,
}

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the OTLP span exporter for {endpoint}: {reason}")]
pub struct SpanExportError {
    endpoint: String,
    reason: String,
}

impl SpanExport {
    /// Starts exporting to `endpoint` (the collector's base URL, such as
    /// `http://otel-collector:4318`; `/v1/traces` is appended), OTLP/HTTP
    /// with protobuf bodies. `max_links` bounds the links of a batch span
    /// (the largest batch). The usual `OTEL_*` variables tune the rest:
    /// `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`,
    /// `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`.
    pub fn start(endpoint: &str, max_links: usize) -> Result<(SpanExport, Spans), SpanExportError> {
        let traces_url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(&traces_url)
            .build()
            .map_err(|error| SpanExportError {
                endpoint: traces_url.clone(),
                reason: error.to_string(),
            })?;
        let exporter = Counted(exporter);
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .with_max_links_per_span(max_links.clamp(128, u32::MAX as usize) as u32)
            .build();
        let tracer = provider.tracer("stream-actors");
        metrics::counter!(names::SPANS_EXPORTED).increment(0);
        metrics::counter!(names::SPAN_EXPORTS_FAILED).increment(0);
        Ok((
            SpanExport { provider },
            Spans {
                tracer: Some(tracer),
            },
        ))
    }

    /// Sends the spans still queued (waiting up to `limit`) and stops.
    pub fn shutdown(self, limit: Duration) {
        if let Err(error) = self.provider.shutdown_with_timeout(limit) {
            tracing::warn!(%error, "the OTLP span exporter did not shut down cleanly; spans may be lost");
        }
    }
}

/// An exporter that counts what it sent and what failed
/// ([`names::SPANS_EXPORTED`], [`names::SPAN_EXPORTS_FAILED`]) and says
/// why an export failed: the SDK itself keeps quiet about it.
#[derive(Debug)]
struct Counted<E>(E);

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.0.export(batch).await;
        match &result {
            Ok(()) => metrics::counter!(names::SPANS_EXPORTED).increment(spans),
            Err(error) => {
                metrics::counter!(names::SPAN_EXPORTS_FAILED).increment(spans);
                tracing::warn!(%error, spans, "spans not exported over OTLP (dropped)");
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

/// The OpenTelemetry form of a record's trace context (from a remote
/// producer).
fn span_context(trace: &TraceContext) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(trace.trace_id),
        SpanId::from_bytes(trace.span_id),
        TraceFlags::new(trace.flags),
        true,
        TraceState::default(),
    )
}

impl Spans {
    /// No export.
    pub fn off() -> Spans {
        Spans::default()
    }

    /// A batch both stores took: `process <topic>`, from `started` to now,
    /// linked to each record's trace.
    pub fn stored_batch(
        &self,
        topic: &str,
        group: &str,
        records: &[ValidRecord],
        started: SystemTime,
        attempts: u32,
    ) {
        let (Some(tracer), Some(first), Some(last)) =
            (&self.tracer, records.first(), records.last())
        else {
            return;
        };
        // The trace context alone: a record's position is in its row, and
        // attributes per link would double what a batch span weighs.
        let links = records
            .iter()
            .map(|record| Link::with_context(span_context(&record.raw.trace)))
            .collect();
        let mut span = SpanBuilder::from_name(format!("process {topic}"))
            .with_kind(SpanKind::Consumer)
            .with_start_time(started)
            .with_links(links)
            .with_attributes([
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.destination.name", topic.to_string()),
                KeyValue::new("messaging.consumer.group.name", group.to_string()),
                KeyValue::new("messaging.batch.message_count", records.len() as i64),
                KeyValue::new("stream.batch.first", first.raw.position.to_string()),
                KeyValue::new("stream.batch.last", last.raw.position.to_string()),
                KeyValue::new("stream.sink.attempts", i64::from(attempts)),
                KeyValue::new("stream.sink.stores", "postgres clickhouse"),
            ])
            .start_with_context(tracer, &Context::new());
        opentelemetry::trace::Span::end(&mut span);
    }

    /// A dead letter the broker confirmed at `dlq_partition`/`dlq_offset`:
    /// `send <dlq topic>`, a child of the record's trace, from `started` to
    /// now, status error with the reason.
    pub fn dead_letter(
        &self,
        record: &PoisonRecord,
        source_topic: &str,
        dlq_topic: &str,
        landed: (i32, i64),
        started: SystemTime,
    ) {
        let Some(tracer) = &self.tracer else {
            return;
        };
        let parent = Context::new().with_remote_span_context(span_context(&record.raw.trace));
        let mut span = SpanBuilder::from_name(format!("send {dlq_topic}"))
            .with_kind(SpanKind::Producer)
            .with_start_time(started)
            .with_attributes([
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.destination.name", dlq_topic.to_string()),
                KeyValue::new("messaging.destination.partition.id", landed.0.to_string()),
                KeyValue::new("messaging.kafka.offset", landed.1),
                KeyValue::new("error.type", record.kind.label()),
                KeyValue::new("stream.dlq.stage", record.stage),
                KeyValue::new("stream.source.topic", source_topic.to_string()),
                KeyValue::new(
                    "stream.source.partition",
                    i64::from(record.raw.position.partition),
                ),
                KeyValue::new("stream.source.offset", record.raw.position.offset),
                KeyValue::new("stream.replay.count", i64::from(record.raw.replay_count)),
            ])
            .start_with_context(tracer, &parent);
        opentelemetry::trace::Span::set_status(&mut span, Status::error(record.message.clone()));
        opentelemetry::trace::Span::end(&mut span);
    }
}
