//! The in-flight byte budget: how many bytes of records the pipeline holds
//! between the consumer and the stores, whatever the number of messages.
//!
//! The mailboxes bound messages; a message is a batch of up to `--batch-size`
//! records, and a record can be as large as the broker allows, so messages
//! alone do not bound memory. The consumer takes the bytes of each batch
//! from the budget before it hands the batch out ([`ByteBudget::acquire`]),
//! the bytes travel with the batch ([`HeldBytes`], split between the sink
//! and the DLQ writer by the parser), and they go back to the budget when
//! the records are stored or dead-lettered and dropped. While the budget is
//! spent the consumer pauses its partitions and keeps polling (see
//! `consumer`), so the member stays in its group.
//!
//! A record larger than the whole budget still goes, alone: it takes the
//! whole budget.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::metrics as names;

/// What a record costs besides its key and value: the structs that carry
/// it and the parsed event's own fields (bounded by `--max-field-bytes`;
/// typically far less than this).
pub const RECORD_OVERHEAD: usize = 256;

/// The bytes a record of this key and value holds against the budget.
pub fn record_bytes(key: Option<&[u8]>, payload: Option<&[u8]>) -> usize {
    key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len) + RECORD_OVERHEAD
}

/// The pipeline's byte budget.
#[derive(Debug)]
pub struct ByteBudget {
    /// One permit per byte.
    permits: Arc<Semaphore>,
    /// The budget's size in bytes.
    limit: usize,
    /// Bytes held now (for the gauge).
    held: AtomicUsize,
}

impl ByteBudget {
    /// A budget of `limit` bytes (at least one).
    pub fn new(limit: usize) -> Arc<ByteBudget> {
        let limit = limit.clamp(1, u32::MAX as usize);
        metrics::gauge!(names::IN_FLIGHT_BYTES_LIMIT).set(limit as f64);
        metrics::gauge!(names::IN_FLIGHT_BYTES).set(0.0);
        Arc::new(ByteBudget {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            held: AtomicUsize::new(0),
        })
    }

    /// The budget's size in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Waits until `bytes` are free (the whole budget at most: a record
    /// larger than the budget goes alone) and takes them. Cancel-safe:
    /// nothing is taken unless it returns.
    pub async fn acquire(self: &Arc<Self>, bytes: usize) -> HeldBytes {
        let take = bytes.clamp(1, self.limit);
        let permit = self
            .permits
            .clone()
            .acquire_many_owned(take as u32)
            .await
            .expect("the budget's semaphore is never closed");
        permit.forget();
        let held = self.held.fetch_add(take, Ordering::Relaxed) + take;
        metrics::gauge!(names::IN_FLIGHT_BYTES).set(held as f64);
        HeldBytes {
            budget: Some(self.clone()),
            bytes: take,
        }
    }

    fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let held = self.held.fetch_sub(bytes, Ordering::Relaxed) - bytes;
        metrics::gauge!(names::IN_FLIGHT_BYTES).set(held as f64);
        self.permits.add_permits(bytes);
    }
}

/// Bytes taken from the budget, given back when dropped.
#[derive(Debug, Default)]
pub struct HeldBytes {
    /// `None` for bytes held against no budget.
    budget: Option<Arc<ByteBudget>>,
    bytes: usize,
}

impl HeldBytes {
    /// Nothing held (records that came from inside the pipeline, already
    /// paid for by the batch they were part of).
    pub fn none() -> HeldBytes {
        HeldBytes::default()
    }

    /// How many bytes this holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes over what `other` holds (of the same budget).
    pub fn absorb(&mut self, mut other: HeldBytes) {
        if self.budget.is_none() {
            self.budget = other.budget.clone();
        }
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Moves up to `bytes` out of `holders`, first ones first, into one holder.
    pub fn take_from(holders: &mut [HeldBytes], bytes: usize) -> HeldBytes {
        let mut taken = HeldBytes::none();
        for holder in holders {
            if taken.bytes >= bytes {
                break;
            }
            taken.absorb(holder.split(bytes - taken.bytes));
        }
        taken
    }

    /// Moves up to `bytes` of what this holds into a new holder.
    pub fn split(&mut self, bytes: usize) -> HeldBytes {
        let moved = bytes.min(self.bytes);
        self.bytes -= moved;
        HeldBytes {
            budget: self.budget.clone(),
            bytes: moved,
        }
    }
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.release(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn bytes_go_back_when_the_last_part_is_dropped() {
        let budget = ByteBudget::new(1000);
        let mut held = budget.acquire(600).await;
        assert_eq!(budget.held(), 600);
        let part = held.split(200);
        assert_eq!((held.bytes(), part.bytes()), (400, 200));
        // Only 400 free: a request for 500 waits.
        let waiting = tokio::time::timeout(Duration::from_millis(50), budget.acquire(500)).await;
        assert!(waiting.is_err(), "the budget is spent");
        assert_eq!(budget.held(), 600, "a cancelled wait takes nothing");
        drop(held);
        assert_eq!(budget.held(), 200);
        let more = budget.acquire(800).await;
        assert_eq!(budget.held(), 1000);
        drop((part, more));
        assert_eq!(budget.held(), 0);
        let mut holders = vec![budget.acquire(100).await, budget.acquire(300).await];
        let taken = HeldBytes::take_from(&mut holders, 250);
        assert_eq!(taken.bytes(), 250);
        assert_eq!((holders[0].bytes(), holders[1].bytes()), (0, 150));
        drop(holders);
        assert_eq!(budget.held(), 250);
        drop(taken);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_record_larger_than_the_budget_takes_all_of_it() {
        let budget = ByteBudget::new(1000);
        let big = budget.acquire(5_000_000).await;
        assert_eq!(big.bytes(), 1000);
        let waiting = tokio::time::timeout(Duration::from_millis(50), budget.acquire(1)).await;
        assert!(waiting.is_err());
        drop(big);
        assert_eq!(budget.acquire(1).await.bytes(), 1);
    }

    #[test]
    fn a_record_costs_its_key_and_value_and_the_overhead() {
        assert_eq!(record_bytes(None, None), RECORD_OVERHEAD);
        assert_eq!(record_bytes(Some(b"ab"), Some(b"xyz")), 5 + RECORD_OVERHEAD);
    }
}
