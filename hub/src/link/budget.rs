//! What one device may send the hub: a token bucket of messages and one of bytes per session.
//!
//! Everything a device sends ends up in work for the hub (the relay matching status entries
//! against the pod cache, the live registry, log routing). A well-behaved agent sends a report
//! when something changes and a full one per reconnect; a compromised one could send as fast as
//! its link allows. The buckets let bursts through (a reconnect's full report, a log being read)
//! and cut the session of a device that keeps sending more than its budget.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The `[link.device_budget]` table: sustained rates and bursts per device session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Messages per second a device may send, sustained.
    pub messages_per_sec: u64,
    /// Messages a device may send at once.
    pub message_burst: u64,
    /// Bytes per second of status, capacity and ack messages a device may send, sustained
    /// (log chunks are paced by the reader and count only as messages).
    pub bytes_per_sec: u64,
    /// Bytes of such messages a device may send at once.
    pub byte_burst: u64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            messages_per_sec: 200,
            message_burst: 2000,
            bytes_per_sec: 2 * 1024 * 1024,
            // Two messages of the link's maximum size.
            byte_burst: 32 * 1024 * 1024,
        }
    }
}

impl BudgetConfig {
    /// Why the settings cannot work, naming the field.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("messages_per_sec", self.messages_per_sec),
            ("message_burst", self.message_burst),
            ("bytes_per_sec", self.bytes_per_sec),
            ("byte_burst", self.byte_burst),
        ] {
            if v == 0 {
                return Err(format!("link.device_budget.{name}: must be positive"));
            }
        }
        if self.byte_burst < fleetlet_proto::MAX_MESSAGE_BYTES as u64 {
            return Err(format!(
                "link.device_budget.byte_burst: {} is below the link's message limit of {} bytes (one valid message would cut the session)",
                self.byte_burst,
                fleetlet_proto::MAX_MESSAGE_BYTES
            ));
        }
        Ok(())
    }
}

/// One refill-on-read token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f32,
    rate: f32,
    burst: f32,
}

impl Bucket {
    fn new(rate: u64, burst: u64) -> Self {
        Self {
            tokens: burst as f32,
            rate: rate as f32,
            burst: burst as f32,
        }
    }

    fn refill(&mut self, elapsed: Duration) {
        self.tokens = (self.tokens + elapsed.as_secs_f32() * self.rate).min(self.burst);
    }

    fn take(&mut self, n: f32) -> bool {
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// The budget of one device session. Kept small: it lives in every session's inbound task.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    messages: Bucket,
    bytes: Bucket,
    last: Instant,
}

/// Which part of its budget a device went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OverBudget {
    /// Too many messages.
    #[error("more than {burst} messages at once or {rate}/s sustained")]
    Messages {
        /// The sustained rate.
        rate: u64,
        /// The burst.
        burst: u64,
    },
    /// Too many bytes.
    #[error("more than {burst} bytes at once or {rate} bytes/s sustained")]
    Bytes {
        /// The sustained rate.
        rate: u64,
        /// The burst.
        burst: u64,
    },
}

impl Budget {
    /// A full budget.
    pub fn new(cfg: &BudgetConfig) -> Self {
        Self {
            messages: Bucket::new(cfg.messages_per_sec, cfg.message_burst),
            bytes: Bucket::new(cfg.bytes_per_sec, cfg.byte_burst),
            last: Instant::now(),
        }
    }

    /// Charges one message of `bytes` (0 for messages counted only as messages).
    pub fn charge(&mut self, bytes: usize) -> Result<(), OverBudget> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last);
        self.last = now;
        self.messages.refill(elapsed);
        self.bytes.refill(elapsed);
        if !self.messages.take(1.0) {
            return Err(OverBudget::Messages {
                rate: self.messages.rate as u64,
                burst: self.messages.burst as u64,
            });
        }
        if bytes > 0 && !self.bytes.take(bytes as f32) {
            return Err(OverBudget::Bytes {
                rate: self.bytes.rate as u64,
                burst: self.bytes.burst as u64,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BudgetConfig {
        BudgetConfig {
            messages_per_sec: 10,
            message_burst: 20,
            bytes_per_sec: 1000,
            byte_burst: 5000,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_and_a_flood_is_over_budget() {
        let mut b = Budget::new(&cfg());
        for _ in 0..20 {
            b.charge(0).expect("within the burst");
        }
        assert!(matches!(b.charge(0), Err(OverBudget::Messages { .. })));
        // The sustained rate refills it.
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..10 {
            b.charge(0).expect("refilled");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_are_budgeted_separately() {
        let mut b = Budget::new(&cfg());
        b.charge(5000).expect("the byte burst");
        assert!(matches!(b.charge(10), Err(OverBudget::Bytes { .. })));
        tokio::time::advance(Duration::from_secs(2)).await;
        b.charge(2000).expect("refilled at 1000 bytes/s");
    }

    #[test]
    fn settings_are_checked() {
        assert!(BudgetConfig::default().check().is_ok());
        let c = BudgetConfig {
            bytes_per_sec: 0,
            ..Default::default()
        };
        assert!(c.check().expect_err("zero").contains("bytes_per_sec"));
        let c = BudgetConfig {
            byte_burst: 1024,
            ..Default::default()
        };
        assert!(c.check().expect_err("small").contains("byte_burst"));
    }
}
