//! The parser never panics, whatever the bytes, and its error messages stay
//! within the dead-letter header bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stream_actors::parse::{parse_event, ParseRules, MAX_ERROR_MESSAGE_BYTES};

fuzz_target!(|data: &[u8]| {
    let mut rules = ParseRules::with_now(1_790_000_000_000);
    // Small limits so the size checks are reached too.
    rules.max_field_bytes = 64;
    rules.max_record_bytes = 4096;
    if let Err(error) = parse_event(Some(data), &rules) {
        assert!(!error.message.is_empty());
        assert!(error.message.len() <= MAX_ERROR_MESSAGE_BYTES);
    }
});
