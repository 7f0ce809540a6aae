//! The pure parser: bytes in, a valid event or a typed poison error out.
//!
//! Architecture invariant: this module does no I/O, reads no clock and never
//! panics, whatever the input bytes. The current time and the accepted schema
//! versions come in through [`ParseRules`], so the same bytes always classify
//! the same way under the same rules.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use uuid::Uuid;

/// One year in milliseconds: the default distance a timestamp may lie from now.
pub const ONE_YEAR_MS: i64 = 365 * 24 * 60 * 60 * 1000;

/// A well-formed event, as stored in the sinks.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidEvent {
    /// The idempotency key: the sinks store one row per `event_id`.
    pub event_id: Uuid,
    /// Free-form event type, for example `purchase`.
    pub event_type: String,
    /// The user the event belongs to; also the Kafka key.
    pub user_id: String,
    /// Amount of money the event carries.
    pub amount: f64,
    /// Event time in milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// Schema version the producer wrote.
    pub schema_version: u32,
}

/// Why a record is poison. The label is what the DLQ header and metrics carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoisonKind {
    /// Not JSON, not a JSON object, or not UTF-8.
    MalformedJson,
    /// A required field is absent or null.
    MissingField,
    /// A field has the wrong JSON type (a string where a number belongs...).
    WrongFieldType,
    /// A field has the right type but an impossible value (an `event_id` that is not a UUID...).
    InvalidValue,
    /// `ts` lies too far from the current time.
    TimestampOutOfRange,
    /// `schema_version` is not one this processor accepts.
    UnknownSchemaVersion,
    /// A text field holds a NUL character, which PostgreSQL `text` refuses
    /// (SQLSTATE 22021) on every try.
    NulInText,
    /// A text field is longer than [`ParseRules::max_field_bytes`].
    FieldTooLong,
    /// The whole value is larger than [`ParseRules::max_record_bytes`].
    RecordTooLarge,
    /// The parser accepted it but a store refused it as data (a PostgreSQL
    /// data exception or constraint, a ClickHouse type or parse error): the
    /// sink found it by bisecting the batch (`dlq.stage=sink`).
    StoreRejected,
}

impl PoisonKind {
    /// Every kind, in label order; handy for reports and tests.
    pub const ALL: [PoisonKind; 10] = [
        PoisonKind::MalformedJson,
        PoisonKind::MissingField,
        PoisonKind::WrongFieldType,
        PoisonKind::InvalidValue,
        PoisonKind::TimestampOutOfRange,
        PoisonKind::UnknownSchemaVersion,
        PoisonKind::NulInText,
        PoisonKind::FieldTooLong,
        PoisonKind::RecordTooLarge,
        PoisonKind::StoreRejected,
    ];

    /// The stable label used in the `dlq.error.type` header and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            PoisonKind::MalformedJson => "malformed_json",
            PoisonKind::MissingField => "missing_field",
            PoisonKind::WrongFieldType => "wrong_field_type",
            PoisonKind::InvalidValue => "invalid_value",
            PoisonKind::TimestampOutOfRange => "timestamp_out_of_range",
            PoisonKind::UnknownSchemaVersion => "unknown_schema_version",
            PoisonKind::NulInText => "nul_in_text",
            PoisonKind::FieldTooLong => "field_too_long",
            PoisonKind::RecordTooLarge => "record_too_large",
            PoisonKind::StoreRejected => "store_rejected",
        }
    }

    /// The inverse of [`PoisonKind::label`].
    pub fn from_label(label: &str) -> Option<PoisonKind> {
        PoisonKind::ALL
            .into_iter()
            .find(|kind| kind.label() == label)
    }
}

impl fmt::Display for PoisonKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.label())
    }
}

/// A classification failure: the kind plus a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ParseError {
    /// The typed reason.
    pub kind: PoisonKind,
    /// What exactly was wrong, for the `dlq.error.message` header.
    pub message: String,
}

impl ParseError {
    /// An error of `kind`; the message is cut to [`MAX_ERROR_MESSAGE_BYTES`].
    pub fn new(kind: PoisonKind, message: impl Into<String>) -> ParseError {
        ParseError {
            kind,
            message: cut_message(message.into()),
        }
    }
}

/// The longest error message a dead letter carries (`dlq.error.message`):
/// serde's messages quote the offending value, which may be megabytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// Cuts `message` to at most [`MAX_ERROR_MESSAGE_BYTES`] bytes on a character
/// boundary, saying how much was cut.
pub fn cut_message(message: String) -> String {
    if message.len() <= MAX_ERROR_MESSAGE_BYTES {
        return message;
    }
    let marker_room = 40;
    let mut end = MAX_ERROR_MESSAGE_BYTES - marker_room;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes cut)", &message[..end], message.len() - end)
}

/// The default [`ParseRules::max_record_bytes`]: 1 MiB, the broker's default
/// `message.max.bytes`.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;
/// The default [`ParseRules::max_field_bytes`].
pub const DEFAULT_MAX_FIELD_BYTES: usize = 4096;

/// What the parser accepts. Passed in so the parser stays pure.
#[derive(Debug, Clone)]
pub struct ParseRules {
    /// The current time in milliseconds since the epoch, read by the caller.
    pub now_ms: i64,
    /// How far into the future `ts` may lie.
    pub max_future_ms: i64,
    /// How far into the past `ts` may lie.
    pub max_past_ms: i64,
    /// Schema versions this processor knows how to store.
    pub accepted_schema_versions: Vec<u32>,
    /// The largest record value accepted, in bytes.
    pub max_record_bytes: usize,
    /// The longest text field (`event_type`, `user_id`) accepted, in bytes.
    pub max_field_bytes: usize,
}

impl ParseRules {
    /// Rules with the default window (one year either way) and schema version 1.
    pub fn with_now(now_ms: i64) -> ParseRules {
        ParseRules {
            now_ms,
            max_future_ms: ONE_YEAR_MS,
            max_past_ms: 10 * ONE_YEAR_MS,
            accepted_schema_versions: vec![1],
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            max_field_bytes: DEFAULT_MAX_FIELD_BYTES,
        }
    }
}

/// The wire shape, borrowed from the input where possible. Every field is
/// optional so that a missing field is reported as such, not as a syntax error.
#[derive(Deserialize)]
struct WireEvent<'input> {
    #[serde(borrow, default)]
    event_id: Option<Cow<'input, str>>,
    #[serde(borrow, default)]
    event_type: Option<Cow<'input, str>>,
    #[serde(borrow, default)]
    user_id: Option<Cow<'input, str>>,
    #[serde(default)]
    amount: Option<f64>,
    #[serde(default)]
    ts: Option<i64>,
    #[serde(default)]
    schema_version: Option<u32>,
}

/// Classifies one record value. Never panics, never does I/O.
pub fn parse_event(payload: Option<&[u8]>, rules: &ParseRules) -> Result<ValidEvent, ParseError> {
    let Some(bytes) = payload else {
        return Err(ParseError::new(
            PoisonKind::MalformedJson,
            "record has no value (null payload)",
        ));
    };
    if bytes.len() > rules.max_record_bytes {
        return Err(ParseError::new(
            PoisonKind::RecordTooLarge,
            format!(
                "value is {} bytes, more than the {} accepted",
                bytes.len(),
                rules.max_record_bytes
            ),
        ));
    }
    let first_significant_byte = bytes.iter().find(|byte| !byte.is_ascii_whitespace());
    if first_significant_byte != Some(&b'{') {
        return Err(ParseError::new(
            PoisonKind::MalformedJson,
            "value is not a JSON object",
        ));
    }
    let wire: WireEvent<'_> = match serde_json::from_slice(bytes) {
        Ok(wire) => wire,
        Err(error) => return Err(classify_json_error(&error)),
    };

    let Some(event_id_text) = wire.event_id else {
        return Err(ParseError::new(
            PoisonKind::MissingField,
            "missing field `event_id`",
        ));
    };
    let Some(event_type) = wire.event_type else {
        return Err(ParseError::new(
            PoisonKind::MissingField,
            "missing field `event_type`",
        ));
    };
    let Some(user_id) = wire.user_id else {
        return Err(ParseError::new(
            PoisonKind::MissingField,
            "missing field `user_id`",
        ));
    };
    let Some(amount) = wire.amount else {
        return Err(ParseError::new(
            PoisonKind::MissingField,
            "missing field `amount`",
        ));
    };
    let Some(ts_ms) = wire.ts else {
        return Err(ParseError::new(
            PoisonKind::MissingField,
            "missing field `ts`",
        ));
    };
    let Some(schema_version) = wire.schema_version else {
        return Err(ParseError::new(
            PoisonKind::MissingField,
            "missing field `schema_version`",
        ));
    };

    if !rules.accepted_schema_versions.contains(&schema_version) {
        return Err(ParseError::new(
            PoisonKind::UnknownSchemaVersion,
            format!(
                "schema_version {schema_version} is not accepted (accepted: {:?})",
                rules.accepted_schema_versions
            ),
        ));
    }
    let Ok(event_id) = Uuid::parse_str(&event_id_text) else {
        return Err(ParseError::new(
            PoisonKind::InvalidValue,
            format!("event_id {:?} is not a UUID", truncate(&event_id_text, 64)),
        ));
    };
    if !amount.is_finite() {
        return Err(ParseError::new(
            PoisonKind::InvalidValue,
            "amount is not finite",
        ));
    }
    for (name, text) in [("event_type", &event_type), ("user_id", &user_id)] {
        if text.len() > rules.max_field_bytes {
            return Err(ParseError::new(
                PoisonKind::FieldTooLong,
                format!(
                    "{name} is {} bytes, more than the {} accepted",
                    text.len(),
                    rules.max_field_bytes
                ),
            ));
        }
        if text.contains('\0') {
            return Err(ParseError::new(
                PoisonKind::NulInText,
                format!("{name} holds a NUL character, which the stores refuse"),
            ));
        }
    }
    let latest_allowed = rules.now_ms.saturating_add(rules.max_future_ms);
    let earliest_allowed = rules.now_ms.saturating_sub(rules.max_past_ms);
    if ts_ms > latest_allowed || ts_ms < earliest_allowed {
        return Err(ParseError::new(
            PoisonKind::TimestampOutOfRange,
            format!(
                "ts {ts_ms} is outside [{earliest_allowed}, {latest_allowed}] (now {})",
                rules.now_ms
            ),
        ));
    }

    Ok(ValidEvent {
        event_id,
        event_type: event_type.into_owned(),
        user_id: user_id.into_owned(),
        amount,
        ts_ms,
        schema_version,
    })
}

fn classify_json_error(error: &serde_json::Error) -> ParseError {
    use serde_json::error::Category;
    let message = error.to_string();
    let kind = match error.classify() {
        Category::Data if !message.starts_with("duplicate field") => PoisonKind::WrongFieldType,
        Category::Data | Category::Syntax | Category::Eof | Category::Io => {
            PoisonKind::MalformedJson
        }
    };
    ParseError::new(kind, message)
}

fn truncate(text: &str, max_chars: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        Some((byte_index, _)) => Cow::Owned(format!("{}...", &text[..byte_index])),
        None => Cow::Borrowed(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW_MS: i64 = 1_790_000_000_000;

    fn rules() -> ParseRules {
        ParseRules::with_now(NOW_MS)
    }

    fn classify(text: &str) -> Result<ValidEvent, PoisonKind> {
        parse_event(Some(text.as_bytes()), &rules()).map_err(|error| error.kind)
    }

    const VALID: &str = r#"{"event_id":"6f1c2a4e-8b7d-4c1e-9f3a-2b5d8e7c9a01","event_type":"purchase","user_id":"user-42","amount":12.5,"ts":1790000000000,"schema_version":1}"#;

    #[test]
    fn accepts_a_valid_event() {
        let event = classify(VALID).expect("valid");
        assert_eq!(event.user_id, "user-42");
        assert_eq!(event.amount, 12.5);
        assert_eq!(event.ts_ms, NOW_MS);
        assert_eq!(event.schema_version, 1);
        assert_eq!(
            event.event_id.to_string(),
            "6f1c2a4e-8b7d-4c1e-9f3a-2b5d8e7c9a01"
        );
    }

    #[test]
    fn classifies_each_poison_kind() {
        assert_eq!(classify("{\"event_id\":"), Err(PoisonKind::MalformedJson));
        assert_eq!(classify("not json"), Err(PoisonKind::MalformedJson));
        assert_eq!(classify("[1,2]"), Err(PoisonKind::MalformedJson));
        assert_eq!(
            parse_event(None, &rules()).map_err(|error| error.kind),
            Err(PoisonKind::MalformedJson)
        );
        let missing_id = VALID.replace(r#""event_id":"6f1c2a4e-8b7d-4c1e-9f3a-2b5d8e7c9a01","#, "");
        assert_eq!(classify(&missing_id), Err(PoisonKind::MissingField));
        let wrong_type = VALID.replace("12.5", "\"12.5\"");
        assert_eq!(classify(&wrong_type), Err(PoisonKind::WrongFieldType));
        let bad_uuid = VALID.replace("6f1c2a4e-8b7d", "zzzz");
        assert_eq!(classify(&bad_uuid), Err(PoisonKind::InvalidValue));
        let future = VALID.replace("1790000000000", &(NOW_MS + 2 * ONE_YEAR_MS).to_string());
        assert_eq!(classify(&future), Err(PoisonKind::TimestampOutOfRange));
        let unknown_version = VALID.replace("\"schema_version\":1", "\"schema_version\":99");
        assert_eq!(
            classify(&unknown_version),
            Err(PoisonKind::UnknownSchemaVersion)
        );
        let duplicate = VALID.replace("{", "{\"amount\":1,");
        assert_eq!(classify(&duplicate), Err(PoisonKind::MalformedJson));
    }

    #[test]
    fn refuses_what_the_stores_cannot_take() {
        let nul = VALID.replace("user-42", "user\\u0000-42");
        assert_eq!(classify(&nul), Err(PoisonKind::NulInText));
        let nul_type = VALID.replace("purchase", "pur\\u0000chase");
        assert_eq!(classify(&nul_type), Err(PoisonKind::NulInText));
        let long_user = VALID.replace("user-42", &"u".repeat(DEFAULT_MAX_FIELD_BYTES + 1));
        assert_eq!(classify(&long_user), Err(PoisonKind::FieldTooLong));
        let just_fits = VALID.replace("user-42", &"u".repeat(DEFAULT_MAX_FIELD_BYTES));
        assert!(classify(&just_fits).is_ok());
        let mut small = rules();
        small.max_record_bytes = VALID.len() - 1;
        assert_eq!(
            parse_event(Some(VALID.as_bytes()), &small).map_err(|error| error.kind),
            Err(PoisonKind::RecordTooLarge)
        );
        small.max_record_bytes = VALID.len();
        assert!(parse_event(Some(VALID.as_bytes()), &small).is_ok());
    }

    #[test]
    fn error_messages_are_cut_to_a_kilobyte() {
        // serde quotes the wrong-typed value; a 600 KB one must not reach a header whole.
        let huge = VALID.replace("12.5", &format!("\"{}\"", "9".repeat(600_000)));
        let error = parse_event(Some(huge.as_bytes()), &rules()).unwrap_err();
        assert_eq!(error.kind, PoisonKind::WrongFieldType);
        assert!(
            error.message.len() <= MAX_ERROR_MESSAGE_BYTES,
            "{}",
            error.message.len()
        );
        assert!(
            error.message.ends_with("bytes cut)"),
            "{}",
            &error.message[900..]
        );
        // Multi-byte characters are cut on a boundary.
        let cut = cut_message("é".repeat(2000));
        assert!(cut.len() <= MAX_ERROR_MESSAGE_BYTES);
        assert_eq!(cut_message("short".to_string()), "short");
    }

    #[test]
    fn accepted_schema_versions_are_configurable() {
        let version_two = VALID.replace("\"schema_version\":1", "\"schema_version\":2");
        let mut rules_with_two = rules();
        rules_with_two.accepted_schema_versions = vec![1, 2];
        assert!(parse_event(Some(version_two.as_bytes()), &rules_with_two).is_ok());
    }

    #[test]
    fn labels_round_trip() {
        for kind in PoisonKind::ALL {
            assert_eq!(PoisonKind::from_label(kind.label()), Some(kind));
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        for field in ["x", "amount", "event_id"] {
            let deep = format!(
                "{{\"{field}\":{}{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            );
            assert!(classify(&deep).is_err(), "{field}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn arbitrary_bytes_always_classify(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            // Never panics; an error always carries a message.
            if let Err(error) = parse_event(Some(&bytes), &rules()) {
                prop_assert!(!error.message.is_empty());
                prop_assert!(error.message.len() <= MAX_ERROR_MESSAGE_BYTES);
            }
        }

        #[test]
        fn mutated_valid_events_always_classify(
            position in 0usize..VALID.len(),
            replacement in any::<u8>(),
        ) {
            let mut bytes = VALID.as_bytes().to_vec();
            bytes[position] = replacement;
            let _ = parse_event(Some(&bytes), &rules());
        }

        #[test]
        fn json_shaped_input_always_classifies(
            event_id in prop_oneof![Just("\"6f1c2a4e-8b7d-4c1e-9f3a-2b5d8e7c9a01\"".to_string()), ".{0,40}".prop_map(|s| format!("{s:?}")), any::<i64>().prop_map(|n| n.to_string()), Just("null".to_string())],
            amount in prop_oneof![any::<f64>().prop_map(|n| if n.is_finite() { n.to_string() } else { "0".to_string() }), Just("\"x\"".to_string()), Just("[]".to_string())],
            ts in any::<i64>(),
            version in any::<u32>(),
        ) {
            let text = format!(r#"{{"event_id":{event_id},"event_type":"t","user_id":"u","amount":{amount},"ts":{ts},"schema_version":{version}}}"#);
            let _ = parse_event(Some(text.as_bytes()), &rules());
        }
    }
}
