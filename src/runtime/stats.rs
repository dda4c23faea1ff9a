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
