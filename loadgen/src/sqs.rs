//! `loadgen sqs`: sends orders (and a fraction of poison) to an SQS queue.

use std::time::Instant;

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use stream_actors::sqs::{classify, client, queue_url, SqsError, SqsSettings};

/// The account of an SQS run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SqsLedger {
    /// Messages the queue accepted.
    pub sent: u64,
    /// Valid orders among them.
    pub valid: u64,
    /// Poison among them.
    pub poison: u64,
    /// Wall time, seconds.
    pub elapsed_s: f64,
    /// Messages per second.
    pub rate: f64,
}

/// One order body, poison with probability `poison_rate`.
pub fn generate_order(rng: &mut StdRng, poison_rate: f64) -> (String, bool) {
    let order_id = uuid::Builder::from_random_bytes(rng.gen()).into_uuid();
    let amount = (rng.gen_range(1..100_000) as f64) / 100.0;
    let customer_id = format!("customer-{}", rng.gen_range(0..1000));
    if poison_rate > 0.0 && rng.gen_bool(poison_rate) {
        let body = if rng.gen_bool(0.5) {
            format!("{{\"order_id\":\"{order_id}\",\"customer_id\":\"{customer_id}\",\"amount\":")
        } else {
            serde_json::json!({"order_id": order_id, "customer_id": customer_id, "amount": -amount, "currency": "EUR"}).to_string()
        };
        return (body, true);
    }
    let body = serde_json::json!({"order_id": order_id, "customer_id": customer_id, "amount": amount, "currency": "EUR"});
    (body.to_string(), false)
}

/// Sends `count` orders to `queue` in batches of ten.
pub async fn run(
    settings: &SqsSettings,
    queue: &str,
    count: u64,
    poison_rate: f64,
    seed: u64,
) -> Result<SqsLedger, SqsError> {
    let sqs = client(settings);
    let url = queue_url(&sqs, settings, queue).await?;
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut ledger = SqsLedger::default();
    let mut remaining = count;
    while remaining > 0 {
        let batch_size = remaining.min(10);
        let mut entries = Vec::new();
        let mut poison_in_batch = 0;
        for index in 0..batch_size {
            let (body, poison) = generate_order(&mut rng, poison_rate);
            poison_in_batch += u64::from(poison);
            entries.push(
                SendMessageBatchRequestEntry::builder()
                    .id(format!("m{index}"))
                    .message_body(body)
                    .build()
                    .map_err(|error| SqsError::Api {
                        context: "build batch entry".to_string(),
                        detail: error.to_string(),
                    })?,
            );
        }
        let output = sqs
            .send_message_batch()
            .queue_url(&url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|error| classify(settings, &format!("send to {queue}"), error))?;
        if !output.failed().is_empty() {
            return Err(SqsError::Api {
                context: format!("send to {queue}"),
                detail: format!(
                    "{} messages refused: {:?}",
                    output.failed().len(),
                    output.failed()
                ),
            });
        }
        ledger.sent += batch_size;
        ledger.poison += poison_in_batch;
        ledger.valid += batch_size - poison_in_batch;
        remaining -= batch_size;
    }
    ledger.elapsed_s = started.elapsed().as_secs_f64();
    ledger.rate = ledger.sent as f64 / ledger.elapsed_s.max(1e-9);
    Ok(ledger)
}
