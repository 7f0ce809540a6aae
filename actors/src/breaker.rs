//! A circuit breaker per store, for the sink.
//!
//! Closed: writes go through. After `threshold` failures in a row it opens:
//! no write is attempted for the open period, which doubles (up to a cap, with
//! jitter) each time a trial fails. When the period is over it is half-open:
//! one trial write; success closes it, failure opens it again. While it is not
//! closed the sink holds its batch and takes no new messages, so intake pauses
//! back to Kafka: lag grows, memory does not.
//!
//! Its state is the gauge `stream_circuit_breaker_state{store}`: 0 closed,
//! 1 half-open, 2 open.

use std::time::{Duration, Instant};

use rand::Rng;

use crate::metrics as names;

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Writes go through.
    Closed,
    /// No writes until this instant.
    Open {
        /// When a trial is allowed.
        until: Instant,
    },
    /// The next write is a trial.
    HalfOpen,
}

impl BreakerState {
    /// The gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open { .. } => 2.0,
        }
    }
}

/// One store's breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    store: &'static str,
    state: BreakerState,
    /// Failures in a row.
    failures: u32,
    /// Failures in a row that open the breaker.
    threshold: u32,
    /// The next open period.
    open_for: Duration,
    first_open: Duration,
    max_open: Duration,
}

impl CircuitBreaker {
    /// A closed breaker for `store`: opens after 3 failures in a row, for
    /// 200 ms at first and at most 5 s.
    pub fn new(store: &'static str) -> CircuitBreaker {
        let breaker = CircuitBreaker {
            store,
            state: BreakerState::Closed,
            failures: 0,
            threshold: 3,
            open_for: Duration::from_millis(200),
            first_open: Duration::from_millis(200),
            max_open: Duration::from_secs(5),
        };
        breaker.publish();
        breaker
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    fn publish(&self) {
        metrics::gauge!(names::CIRCUIT_BREAKER_STATE, "store" => self.store)
            .set(self.state.gauge());
    }

    /// How long to wait before a write may be attempted (zero when closed or
    /// half-open); moves an open breaker whose period is over to half-open.
    pub fn wait(&mut self) -> Duration {
        if let BreakerState::Open { until } = self.state {
            let now = Instant::now();
            if now < until {
                return until - now;
            }
            self.state = BreakerState::HalfOpen;
            self.publish();
        }
        Duration::ZERO
    }

    /// A write succeeded.
    pub fn succeeded(&mut self) {
        if self.state != BreakerState::Closed {
            tracing::info!(store = self.store, "circuit breaker closed");
        }
        self.failures = 0;
        self.open_for = self.first_open;
        self.state = BreakerState::Closed;
        self.publish();
    }

    /// A write failed.
    pub fn failed(&mut self) {
        self.failures += 1;
        let trip = match self.state {
            BreakerState::HalfOpen => true,
            BreakerState::Closed => self.failures >= self.threshold,
            BreakerState::Open { .. } => false,
        };
        if trip {
            let jitter = rand::thread_rng().gen_range(0.8..1.2);
            let period = self.open_for.mul_f64(jitter);
            tracing::warn!(
                store = self.store,
                open_ms = period.as_millis() as u64,
                "circuit breaker open"
            );
            self.state = BreakerState::Open {
                until: Instant::now() + period,
            };
            self.open_for = (self.open_for * 2).min(self.max_open);
            self.publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_half_opens_after_the_period_and_closes_on_success() {
        let mut breaker = CircuitBreaker::new("postgres");
        breaker.failed();
        breaker.failed();
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.failed();
        assert!(matches!(breaker.state(), BreakerState::Open { .. }));
        let wait = breaker.wait();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(240));
        // The period is over:
        breaker.state = BreakerState::Open {
            until: Instant::now(),
        };
        assert_eq!(breaker.wait(), Duration::ZERO);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        breaker.failed();
        assert!(
            matches!(breaker.state(), BreakerState::Open { .. }),
            "a failed trial opens it again"
        );
        assert!(breaker.wait() > Duration::from_millis(240), "longer period");
        breaker.state = BreakerState::HalfOpen;
        breaker.succeeded();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.state().gauge(), 0.0);
    }
}
