//! A quick in-process parser measurement, so that the table has a figure
//! without running criterion (`cargo bench -p stream-actors --bench parser`
//! has the careful one).
//!
//! Records come from loadgen's own generator (`generate_record`, seeded),
//! so the bytes are exactly what the pipeline parses. One thread parses the
//! same records over and over for a fixed time: events/s on one core.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::SeedableRng;
use stream_actors::parse::{parse_event, ParseRules};

/// Distinct records per mix; parsed round-robin.
const RECORDS: usize = 20_000;

/// One mix's figure.
#[derive(Debug, Clone)]
pub struct ParserResult {
    /// What the mix is.
    pub mix: String,
    /// Records parsed.
    pub parsed: u64,
    /// Of which valid.
    pub valid: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl ParserResult {
    /// Events per second.
    pub fn rate(&self) -> f64 {
        self.parsed as f64 / self.seconds
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or_default()
}

/// Parses records of loadgen's `poison_rate` mix for about `duration` on this thread.
pub fn measure(mix: &str, poison_rate: f64, duration: Duration) -> ParserResult {
    let now = now_ms();
    let mut rng = StdRng::seed_from_u64(42);
    let payloads: Vec<Vec<u8>> = (0..RECORDS)
        .map(|_| loadgen::generate_record(&mut rng, poison_rate, now).payload)
        .collect();
    let rules = ParseRules::with_now(now);
    // Warm the caches and the allocator.
    for payload in &payloads {
        black_box(parse_event(Some(payload), &rules).is_ok());
    }
    let mut parsed = 0u64;
    let mut valid = 0u64;
    let started = Instant::now();
    while started.elapsed() < duration {
        for payload in &payloads {
            if black_box(parse_event(Some(black_box(payload)), &rules)).is_ok() {
                valid += 1;
            }
        }
        parsed += payloads.len() as u64;
    }
    ParserResult {
        mix: mix.to_string(),
        parsed,
        valid,
        seconds: started.elapsed().as_secs_f64(),
    }
}
