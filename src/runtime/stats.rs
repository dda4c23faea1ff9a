//! Counters and gauges written by one shard and read by others.
//!
//! Invariant: each instance has exactly one writer thread (its shard), so an
//! update is a relaxed load and a relaxed store, not a locked read-modify-write
//! (`lock xadd` costs tens of cycles and serialises the core's store
//! buffer). Readers on other threads (admin scrape, tests) see a recent value.
//!
//! Alternative rejected: `Cell` counters read through the shard's mailbox.
//! Exact, but a scrape would then have to wake every shard.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonically increasing counter with a single writer.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n` (only the owning shard calls this).
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1)
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge with a single writer.
#[derive(Default, Debug)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds `d` (may be negative; only the owning shard calls this).
    pub fn add(&self, d: i64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(d), Ordering::Relaxed);
    }
    /// Sets the value (only the owning shard calls this).
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counts one in a [`Gauge`] while it lives (an open stream, say).
pub struct Held<'a>(&'a Gauge);

impl<'a> Held<'a> {
    /// Adds one to `g` until dropped (only the owning shard calls this).
    pub fn new(g: &'a Gauge) -> Self {
        g.add(1);
        Held(g)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

/// Upper bounds, in seconds, of the buckets of every latency histogram
/// (dial set-up, time to first byte): 0.5 ms to 10 s, roughly ×2.5 apart;
/// past the last, `+Inf`. Fixed, so a histogram is a flat array.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// [`LATENCY_BUCKETS`] in nanoseconds.
const BOUNDS_NS: [u64; 14] = {
    let mut b = [0u64; 14];
    let mut i = 0;
    while i < 14 {
        b[i] = (LATENCY_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    b
};

/// A latency histogram with a single writer: one [`Counter`] per bucket of
/// [`LATENCY_BUCKETS`] (plus `+Inf`), not cumulative, and the sum in
/// nanoseconds. Recording is a short scan and two relaxed stores; readers
/// sum histograms of several shards bucket by bucket.
///
/// Alternative rejected: `prometheus_client::metrics::histogram::Histogram`
/// (a mutex per observation, shared by every shard).
#[derive(Default, Debug)]
pub struct Histogram {
    buckets: [Counter; 15],
    sum_ns: Counter,
}

impl Histogram {
    /// Records one observation (only the owning shard calls this).
    pub fn record(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(BOUNDS_NS.len());
        self.buckets[i].inc();
        self.sum_ns.add(ns);
    }

    /// Adds this histogram into `into`: per-bucket counts (not cumulative,
    /// the last one `+Inf`) and the sum in nanoseconds.
    pub fn add_to(&self, into: &mut HistogramSum) {
        for (t, b) in into.buckets.iter_mut().zip(&self.buckets) {
            *t += b.get();
        }
        into.sum_ns += self.sum_ns.get();
    }
}

/// Histograms summed at read time (see [`Histogram::add_to`]).
#[derive(Default, Debug, Clone, Copy)]
pub struct HistogramSum {
    /// Per-bucket counts, not cumulative; the last is `+Inf`.
    pub buckets: [u64; 15],
    /// Sum of the observations, nanoseconds.
    pub sum_ns: u64,
}

impl HistogramSum {
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// `(upper bound in seconds, count)` per bucket, the last `+Inf`.
    pub fn bounds(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        LATENCY_BUCKETS.iter().copied().chain([f64::INFINITY]).zip(self.buckets.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_histogram_puts_each_observation_in_the_first_bucket_that_holds_it() {
        let h = Histogram::default();
        h.record(Duration::from_micros(500)); // exactly the first bound
        h.record(Duration::from_millis(3)); // 2.5 ms < 3 ms <= 5 ms
        h.record(Duration::from_secs(60)); // past the last bound
        let mut s = HistogramSum::default();
        h.add_to(&mut s);
        h.add_to(&mut s);
        assert_eq!(s.count(), 6);
        let b: Vec<(f64, u64)> = s.bounds().filter(|(_, n)| *n > 0).collect();
        assert_eq!(b, vec![(0.0005, 2), (0.005, 2), (f64::INFINITY, 2)]);
        assert_eq!(s.sum_ns, 2 * (500_000 + 3_000_000 + 60_000_000_000));
    }
}
