//! How long the agent's reconcile passes take, for the hub's `/metrics`: counted by every pod
//! worker, sent over the link at most once a minute.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Shared counters of reconcile passes.
#[derive(Debug, Default)]
pub struct ReconcileStats {
    passes: AtomicU64,
    micros_sum: AtomicU64,
    micros_max: AtomicU64,
}

/// One reading of the counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReconcileReading {
    /// Passes since start.
    pub passes: u64,
    /// Total seconds.
    pub seconds_sum: f64,
    /// Longest pass since the previous reading, seconds.
    pub seconds_max: f64,
}

impl ReconcileStats {
    /// Count one pass that took `d`.
    pub fn record(&self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.passes.fetch_add(1, Ordering::Relaxed);
        self.micros_sum.fetch_add(micros, Ordering::Relaxed);
        self.micros_max.fetch_max(micros, Ordering::Relaxed);
    }

    /// The counters; the maximum starts over.
    pub fn take(&self) -> ReconcileReading {
        ReconcileReading {
            passes: self.passes.load(Ordering::Relaxed),
            seconds_sum: self.micros_sum.load(Ordering::Relaxed) as f64 / 1e6,
            seconds_max: self.micros_max.swap(0, Ordering::Relaxed) as f64 / 1e6,
        }
    }

    /// Passes so far (to tell whether anything changed).
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_counts_and_a_max_that_starts_over() {
        let s = ReconcileStats::default();
        s.record(Duration::from_millis(5));
        s.record(Duration::from_millis(20));
        let r = s.take();
        assert_eq!(r.passes, 2);
        assert!((r.seconds_sum - 0.025).abs() < 1e-9);
        assert!((r.seconds_max - 0.020).abs() < 1e-9);
        assert_eq!(s.take().seconds_max, 0.0);
    }
}
