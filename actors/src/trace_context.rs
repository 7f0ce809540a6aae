//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) carried in
//! the `traceparent` Kafka header.
//!
//! A producer that traces (loadgen does) puts `traceparent` on each record.
//! The consumer reads it into [`crate::models::RawRecord::trace`]; the
//! parser, the sink and the DLQ writer carry it; both stores keep it in their
//! `traceparent` column, a dead letter keeps it in its `traceparent` header,
//! and `streamctl dlq replay` sets it again on what it re-publishes, so an
//! event is one trace from its producer to its row, through the dead-letter
//! topic and back.
//!
//! A record with no `traceparent`, or one that is not valid, is not a
//! failure: it gets a trace of its own ([`TraceContext::started_for`]),
//! derived from its source position and timestamp, so that reading the
//! same record again after a crash gives the same trace, and both stores and
//! the dead letter agree on it (PostgreSQL keeps the first row written,
//! ClickHouse the last).

use sha2::{Digest, Sha256};

/// The header that carries the trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The `sampled` bit of `trace-flags`.
pub const SAMPLED: u8 = 0x01;

/// A parsed `traceparent`: which trace a record belongs to and which span
/// (the producer's) it came from. Copied with each record, no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace: 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// The parent span (`parent-id`): 8 bytes, never all zero.
    pub span_id: [u8; 8],
    /// `trace-flags`; bit 0 is `sampled`.
    pub flags: u8,
}

/// Why the consumer started a trace for a record instead of carrying one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// The record had no `traceparent` header.
    Missing = 0,
    /// It had one, but not a valid one.
    Invalid = 1,
}

impl Started {
    /// Every reason, in the order of their discriminants.
    pub const ALL: [Started; 2] = [Started::Missing, Started::Invalid];

    /// The `reason` label of [`crate::metrics::TRACES_STARTED`].
    pub fn label(self) -> &'static str {
        match self {
            Started::Missing => "missing",
            Started::Invalid => "invalid",
        }
    }
}

impl TraceContext {
    /// Parses a `traceparent` value as the W3C recommendation says: version
    /// `00` is exactly `00-<32 hex>-<16 hex>-<2 hex>`, lower case, with
    /// neither id all zeros; a later version (not `ff`) may carry more
    /// fields after a `-`, which are ignored (it is then propagated as
    /// version 00). Anything else is `None`.
    pub fn parse(value: &[u8]) -> Option<TraceContext> {
        if value.len() < 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let version = hex_byte(&value[0..2])?;
        if version == 0xff || (version == 0 && value.len() != 55) {
            return None;
        }
        if version != 0 && value.len() > 55 && value[55] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (index, byte) in trace_id.iter_mut().enumerate() {
            *byte = hex_byte(&value[3 + 2 * index..5 + 2 * index])?;
        }
        let mut span_id = [0u8; 8];
        for (index, byte) in span_id.iter_mut().enumerate() {
            *byte = hex_byte(&value[36 + 2 * index..38 + 2 * index])?;
        }
        let flags = hex_byte(&value[53..55])?;
        let context = TraceContext {
            trace_id,
            span_id,
            flags,
        };
        context.is_valid().then_some(context)
    }

    /// The record's trace context from its headers (`traceparent`), or one
    /// started for it (see [`TraceContext::started_for`]) and why.
    pub fn of_record(
        traceparent: Option<&[u8]>,
        topic: &str,
        partition: i32,
        offset: i64,
        timestamp_ms: Option<i64>,
    ) -> (TraceContext, Option<Started>) {
        match traceparent {
            Some(value) => match TraceContext::parse(value) {
                Some(context) => (context, None),
                None => (
                    TraceContext::started_for(topic, partition, offset, timestamp_ms),
                    Some(Started::Invalid),
                ),
            },
            None => (
                TraceContext::started_for(topic, partition, offset, timestamp_ms),
                Some(Started::Missing),
            ),
        }
    }

    /// A new trace for a record that came without one, sampled: its ids are
    /// the SHA-256 of the record's topic, partition, offset and timestamp,
    /// so the same record read twice gets the same trace. (Not the W3C
    /// `random` flag: the ids are unique, not random.)
    pub fn started_for(
        topic: &str,
        partition: i32,
        offset: i64,
        timestamp_ms: Option<i64>,
    ) -> TraceContext {
        let digest = Sha256::new()
            .chain_update(b"stream-pipeline trace\0")
            .chain_update(topic.as_bytes())
            .chain_update([0])
            .chain_update(partition.to_be_bytes())
            .chain_update(offset.to_be_bytes())
            .chain_update(timestamp_ms.unwrap_or(-1).to_be_bytes())
            .finalize();
        let mut trace_id = [0u8; 16];
        trace_id.copy_from_slice(&digest[..16]);
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&digest[16..24]);
        // An all-zero id is invalid; a digest that starts with 16 (or 8)
        // zero bytes will not happen, but would still give a valid context.
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        if span_id == [0; 8] {
            span_id[7] = 1;
        }
        TraceContext {
            trace_id,
            span_id,
            flags: SAMPLED,
        }
    }

    /// Neither id is all zeros.
    pub fn is_valid(&self) -> bool {
        self.trace_id != [0; 16] && self.span_id != [0; 8]
    }

    /// Whether the producer sampled this trace.
    pub fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The `traceparent` value (version 00), written on the stack: the
    /// sink and the DLQ writer write one per record.
    pub fn header(&self) -> Traceparent {
        let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
        // Lengths are fixed: 32, 16 and 2 hex digits.
        let _ = hex::encode_to_slice(self.trace_id, &mut text[3..35]);
        let _ = hex::encode_to_slice(self.span_id, &mut text[36..52]);
        let _ = hex::encode_to_slice([self.flags], &mut text[53..55]);
        Traceparent(text)
    }
}

impl std::fmt::Display for TraceContext {
    /// `00-<trace-id>-<parent-id>-<flags>`.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.header().as_str())
    }
}

/// A `traceparent` value as text, 55 bytes of ASCII, without allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Traceparent([u8; 55]);

impl Traceparent {
    /// The value.
    pub fn as_str(&self) -> &str {
        // Built from ASCII only (digits, lower-case hex and '-').
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for Traceparent {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Two lower-case hex digits as a byte (upper case is invalid in `traceparent`).
fn hex_byte(pair: &[u8]) -> Option<u8> {
    let digit = |character: u8| match character {
        b'0'..=b'9' => Some(character - b'0'),
        b'a'..=b'f' => Some(character - b'a' + 10),
        _ => None,
    };
    Some(digit(pair[0])? << 4 | digit(pair[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips_unchanged() {
        let context = TraceContext::parse(EXAMPLE.as_bytes()).expect("valid");
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(context.span_id), "00f067aa0ba902b7");
        assert!(context.is_sampled());
        assert_eq!(context.header().as_str(), EXAMPLE);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let context = TraceContext::parse(unsampled.as_bytes()).expect("valid");
        assert!(!context.is_sampled());
        assert_eq!(context.to_string(), unsampled);
    }

    #[test]
    fn invalid_values_are_refused() {
        for invalid in [
            "",
            "00",
            // Upper case.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Version ff, and version 00 with more after it.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // Wrong separators, short ids, not hex.
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(TraceContext::parse(invalid.as_bytes()), None, "{invalid}");
        }
    }

    #[test]
    fn a_later_version_is_read_and_carried_as_version_00() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        let context = TraceContext::parse(later.as_bytes()).expect("a later version");
        assert_eq!(context.to_string(), EXAMPLE);
        assert_eq!(
            TraceContext::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"),
            None
        );
    }

    #[test]
    fn a_record_without_a_valid_traceparent_gets_the_same_new_trace_each_time() {
        let (carried, started) =
            TraceContext::of_record(Some(EXAMPLE.as_bytes()), "events", 0, 7, Some(1));
        assert_eq!((carried.to_string().as_str(), started), (EXAMPLE, None));
        let (missing, started) = TraceContext::of_record(None, "events", 0, 7, Some(1));
        assert_eq!(started, Some(Started::Missing));
        assert!(missing.is_valid() && missing.is_sampled());
        assert_eq!(
            TraceContext::parse(missing.to_string().as_bytes()),
            Some(missing)
        );
        let (invalid, started) = TraceContext::of_record(Some(b"junk"), "events", 0, 7, Some(1));
        assert_eq!(started, Some(Started::Invalid));
        // Read again after a crash: the same trace.
        assert_eq!(missing, invalid);
        // Another position, topic or timestamp: another trace.
        for other in [
            TraceContext::started_for("events", 0, 8, Some(1)),
            TraceContext::started_for("events", 1, 7, Some(1)),
            TraceContext::started_for("other", 0, 7, Some(1)),
            TraceContext::started_for("events", 0, 7, Some(2)),
        ] {
            assert_ne!(other.trace_id, missing.trace_id);
        }
    }
}
