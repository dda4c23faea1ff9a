//! The proxy settings a config reload (SIGHUP) changes while it runs:
//! `[limits]` and `dial_timeout_ms`. Every shard reads them from one
//! [`LiveTunables`] cell, swapped whole by the reload thread.
//!
//! Invariants:
//! - Readers take one atomic load (`ArcSwap::load`, no lock, no
//!   allocation) per connection (the per-connection budgets, fixed for the
//!   connection's life) or per dial (`streams_per_identity`,
//!   `shard_buffer_bytes`, `dial_timeout_ms`): a reload applies to the next
//!   connection or dial, never to one under way.
//! - `shard_buffer_bytes` lives in each shard's single-writer
//!   [`BufMeter`](crate::runtime::budget::BufMeter); the shard copies a
//!   new value into it the first time it sees a new generation
//!   ([`Shard::tunables`](super::shard::Shard::tunables)).
//!
//! Rejected: pushing the new values to the shards as mailbox messages (a
//! message kind for a rare event, and a shard that is busy would apply
//! them late anyway); a `RwLock` (a shared cache line written on every
//! dial's read).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::runtime::budget::ProxyLimits;

/// One generation of the live settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunables {
    /// `[limits]`.
    pub limits: ProxyLimits,
    /// `dial_timeout_ms`.
    pub dial_timeout: Duration,
    /// 0 at start, +1 per reload that changed something.
    pub generation: u64,
}

/// The cell the shards read and the reload thread swaps.
#[derive(Clone)]
pub struct LiveTunables(Arc<ArcSwap<Tunables>>);

impl LiveTunables {
    /// A cell holding generation 0 of `limits` and `dial_timeout`.
    pub fn new(limits: ProxyLimits, dial_timeout: Duration) -> LiveTunables {
        LiveTunables(Arc::new(ArcSwap::from_pointee(Tunables { limits, dial_timeout, generation: 0 })))
    }

    /// The current settings; take what is needed and drop the guard (never
    /// hold it across an await).
    pub fn load(&self) -> arc_swap::Guard<Arc<Tunables>> {
        self.0.load()
    }

    /// Replaces the settings (a new generation) when they differ.
    pub fn store(&self, limits: ProxyLimits, dial_timeout: Duration) -> bool {
        let old = self.0.load_full();
        if old.limits == limits && old.dial_timeout == dial_timeout {
            return false;
        }
        self.0.store(Arc::new(Tunables { limits, dial_timeout, generation: old.generation + 1 }));
        true
    }
}
