//! A dead letter's envelope is bounded whatever the record, and describes
//! the original exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stream_actors::dlq_writer::{
    dead_letter_body, Form, ENVELOPE_KEY_BYTES, ENVELOPE_PAYLOAD_BYTES,
};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = (split as usize * rest.len()) / 255;
    let (key, payload) = rest.split_at(at);
    for form in [Form::Whole, Form::PayloadPrefix, Form::HeadersOnly] {
        let body = dead_letter_body(Some(key), Some(payload), form);
        match form {
            Form::Whole => {
                assert_eq!(body.key, Some(key));
                assert_eq!(body.payload, Some(payload));
                assert!(body.headers.is_empty());
            }
            Form::PayloadPrefix => {
                let kept_key = body.key.unwrap();
                let kept_payload = body.payload.unwrap();
                assert!(kept_key.len() <= ENVELOPE_KEY_BYTES && key.starts_with(kept_key));
                assert!(
                    kept_payload.len() <= ENVELOPE_PAYLOAD_BYTES
                        && payload.starts_with(kept_payload)
                );
            }
            Form::HeadersOnly => assert!(body.key.is_none() && body.payload.is_none()),
        }
        if form != Form::Whole {
            let size = body
                .headers
                .iter()
                .find(|(name, _)| name == "dlq.payload.size")
                .map(|(_, value)| value.as_str());
            assert_eq!(size, Some(payload.len().to_string().as_str()));
        }
    }
});
