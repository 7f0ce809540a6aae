//! Criterion microbenchmarks of the pure parser, in events/s on one core
//! (issue 7's target: at least 500k events/s per core).
//!
//! `cargo bench -p stream-actors --bench parser`
//!
//! Three mixes of 10,000 records, built here from a seeded RNG in loadgen's
//! wire shape (this crate cannot depend on loadgen, which depends on it):
//! all valid; loadgen's default mix (poison 0.005); and all poison, cycling
//! through malformed JSON (truncated), missing `event_id`, `amount` as a
//! string, `ts` two years ahead, unknown `schema_version`, and bytes that are
//! not JSON at all. Each iteration parses the whole slice; criterion reports
//! elements (events) per second.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stream_actors::parse::{parse_event, ParseRules, ONE_YEAR_MS};

const NOW_MS: i64 = 1_790_000_000_000;
const RECORDS: usize = 10_000;
const EVENT_TYPES: [&str; 4] = ["page_view", "add_to_cart", "purchase", "refund"];

fn valid_json(rng: &mut StdRng) -> serde_json::Value {
    let event_id = uuid::Builder::from_random_bytes(rng.gen()).into_uuid();
    serde_json::json!({
        "event_id": event_id,
        "event_type": EVENT_TYPES[rng.gen_range(0..EVENT_TYPES.len())],
        "user_id": format!("user-{}", rng.gen_range(0..10_000)),
        "amount": (rng.gen_range(0..50_000) as f64) / 100.0,
        "ts": NOW_MS - rng.gen_range(0..60_000),
        "schema_version": 1,
    })
}

/// Poison of kind `kind % 6`.
fn poison(rng: &mut StdRng, kind: usize) -> Vec<u8> {
    let mut event = valid_json(rng);
    let object = event.as_object_mut().expect("an object");
    match kind % 6 {
        0 => {
            let whole = event.to_string();
            let cut = rng.gen_range(1..whole.len() - 1);
            return whole.as_bytes()[..cut].to_vec();
        }
        1 => {
            object.remove("event_id");
        }
        2 => {
            let amount = object["amount"].to_string();
            object.insert("amount".into(), serde_json::Value::String(amount));
        }
        3 => {
            object.insert("ts".into(), (NOW_MS + 2 * ONE_YEAR_MS).into());
        }
        4 => {
            object.insert("schema_version".into(), 99.into());
        }
        _ => return b"GET / HTTP/1.1\r\nHost: not-an-event\r\n\r\n".to_vec(),
    }
    event.to_string().into_bytes()
}

/// `RECORDS` payloads, each poison with probability `poison_rate`.
fn mix(poison_rate: f64, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..RECORDS)
        .map(|index| {
            if poison_rate > 0.0 && rng.gen_bool(poison_rate) {
                poison(&mut rng, index)
            } else {
                valid_json(&mut rng).to_string().into_bytes()
            }
        })
        .collect()
}

fn parser(criterion: &mut Criterion) {
    let rules = ParseRules::with_now(NOW_MS);
    let mut group = criterion.benchmark_group("parse_event");
    group.throughput(Throughput::Elements(RECORDS as u64));
    for (name, poison_rate, expect_valid) in [
        ("valid", 0.0, Some(RECORDS)),
        ("loadgen_mix_poison_0.005", 0.005, None),
        ("poison", 1.0, Some(0)),
    ] {
        let payloads = mix(poison_rate, 2026);
        let valid = payloads
            .iter()
            .filter(|payload| parse_event(Some(payload), &rules).is_ok())
            .count();
        if let Some(expected) = expect_valid {
            assert_eq!(valid, expected, "mix {name}: the generator is off");
        }
        group.bench_function(name, |bencher| {
            bencher.iter(|| {
                let mut accepted = 0usize;
                for payload in &payloads {
                    if parse_event(Some(black_box(payload)), &rules).is_ok() {
                        accepted += 1;
                    }
                }
                black_box(accepted)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, parser);
criterion_main!(benches);
