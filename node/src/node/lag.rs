//! How long the swarm task goes without polling. A timer due every [`LAG_PROBE_EVERY`] is
//! checked for how late it fires: a late tick means the task was busy that long (a handler, a
//! store flush, signing, a large decode), so the worst lateness is the longest stall seen, and
//! the distribution says how often the task stalls. `OpsHandle::loop_lag` reads it; the node
//! logs it when it stops.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the swarm task's lag is sampled.
pub const LAG_PROBE_EVERY: Duration = Duration::from_millis(50);

/// Upper bounds of the lag histogram's buckets, in microseconds; a last bucket holds the rest.
const BUCKETS_US: [u64; 12] = [
    1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000,
    5_000_000,
];

/// The swarm task's lag samples (shared between the task and its handles).
#[derive(Debug, Default)]
pub struct LoopLag {
    samples: AtomicU64,
    max_us: AtomicU64,
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
}

/// What [`LoopLag`] has seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagSnapshot {
    /// Samples taken.
    pub samples: u64,
    /// The longest stall seen.
    pub max: Duration,
    /// At least half of the samples were at most this late (a bucket bound).
    pub p50: Duration,
    /// At least 99% of the samples were at most this late (a bucket bound; the maximum when
    /// the last bucket holds the 99th percentile).
    pub p99: Duration,
}

impl LoopLag {
    /// Records one sample: the probe fired `lag` after it was due.
    pub(crate) fn record(&self, lag: Duration) {
        let us = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX);
        self.samples.fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
        let i = BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The samples so far.
    pub fn snapshot(&self) -> LagSnapshot {
        let samples = self.samples.load(Ordering::Relaxed);
        let max = Duration::from_micros(self.max_us.load(Ordering::Relaxed));
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let quantile = |q: f64| {
            let total: u64 = counts.iter().sum();
            if total == 0 {
                return Duration::ZERO;
            }
            let want = (q * total as f64).ceil() as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= want {
                    return BUCKETS_US
                        .get(i)
                        .map_or(max, |b| Duration::from_micros(*b).min(max));
                }
            }
            max
        };
        LagSnapshot {
            samples,
            max,
            p50: quantile(0.5),
            p99: quantile(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_bounds_capped_by_the_maximum() {
        let lag = LoopLag::default();
        assert_eq!(lag.snapshot().samples, 0);
        for _ in 0..98 {
            lag.record(Duration::from_micros(300));
        }
        lag.record(Duration::from_millis(30));
        lag.record(Duration::from_millis(700));
        let s = lag.snapshot();
        assert_eq!(s.samples, 100);
        assert_eq!(s.max, Duration::from_millis(700));
        assert_eq!(s.p50, Duration::from_millis(1));
        // 99 of 100 samples are at most 50 ms (the 30 ms one's bucket).
        assert_eq!(s.p99, Duration::from_millis(50));
        lag.record(Duration::from_secs(9));
        lag.record(Duration::from_secs(9));
        let s = lag.snapshot();
        assert_eq!(s.max, Duration::from_secs(9));
        assert_eq!(s.p99, Duration::from_secs(9));
    }
}
