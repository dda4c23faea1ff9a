//! Budgets: how much of a shard one connection, one identity or all the
//! relayed bytes may take (the `[limits]` config sections), and the
//! shard-local meters that enforce them.
//!
//! Invariants:
//! - Every meter here is shard-local (`Rc`/`Cell`, no locks, no atomics):
//!   a budget "per identity" or "per shard" is counted on each shard
//!   separately, so a proxy with N shards allows up to N times the figure.
//! - Each budget has a stable name (its config key); an exceeded budget is
//!   answered with RESOURCE_EXHAUSTED whose message names it and its value
//!   ([`exceeded`]), and counted under its own metric label.
//! - A guard returned by a meter gives its unit back when dropped, so a
//!   cancelled dial (its task dropped) frees its share at once.
//!
//! Alternative rejected: one process-wide atomic meter. Exact, but every
//! dial and every read buffer would touch a shared cache line; shard-local
//! figures are what the thread-per-core design promises.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::runtime::stats::Gauge;
use crate::wire::error::{Error, Label, Retry, Side};
use crate::wire::status::Code;

/// `[limits]` of a proxy.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyLimits {
    /// Concurrent dial streams on one client-edge connection.
    pub streams_per_conn: usize,
    /// Concurrent dial streams on one incoming peer link (a link carries
    /// every dial of the other proxy's clients to this one's agents).
    pub peer_streams_per_conn: usize,
    /// Dials in set-up (request read, resolved, upstream opening) on one
    /// connection.
    pub setup_per_conn: usize,
    /// Client-edge or peer connections of one certificate identity, per shard.
    pub conns_per_identity: usize,
    /// Concurrent client-edge dial streams of one identity, per shard.
    pub streams_per_identity: usize,
    /// Bytes the relay may hold per shard; new dials are refused past it,
    /// and read buffers stop growing past half of it.
    pub shard_buffer_bytes: usize,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            streams_per_conn: 10_000,
            peer_streams_per_conn: 100_000,
            setup_per_conn: DEFAULT_SETUP_PER_CONN,
            conns_per_identity: 1_000,
            streams_per_identity: 20_000,
            shard_buffer_bytes: 256 << 20,
        }
    }
}

/// `[limits]` of an agent.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentLimits {
    /// Concurrent dial streams on one tunnel.
    pub streams_per_conn: usize,
    /// Dials in set-up (request read, target connecting) on one tunnel.
    pub setup_per_conn: usize,
    /// Bytes the relay may hold (read buffers and received data not yet
    /// written); new dials are refused past it, and read buffers stop
    /// growing past half of it.
    pub shard_buffer_bytes: usize,
}

impl Default for AgentLimits {
    fn default() -> Self {
        AgentLimits { streams_per_conn: 20_000, setup_per_conn: DEFAULT_SETUP_PER_CONN, shard_buffer_bytes: 256 << 20 }
    }
}

/// Default of `setup_per_conn`: large enough for a multiplexing client's
/// bursts (the tests open 1000 dials at once on one connection), small
/// enough that a slow-loris of request-less streams holds a few MiB.
pub const DEFAULT_SETUP_PER_CONN: usize = 4096;

/// The least `shard_buffer_bytes` accepted: a few dials' read buffers.
pub const MIN_SHARD_BUFFER: usize = 1 << 20;

fn positive(section: &str, pairs: &[(&str, usize)]) -> Result<(), String> {
    for (k, v) in pairs {
        if *v == 0 {
            return Err(format!("{section}.{k} must be > 0"));
        }
    }
    Ok(())
}

impl ProxyLimits {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        positive(
            "limits",
            &[
                ("streams_per_conn", self.streams_per_conn),
                ("peer_streams_per_conn", self.peer_streams_per_conn),
                ("setup_per_conn", self.setup_per_conn),
                ("conns_per_identity", self.conns_per_identity),
                ("streams_per_identity", self.streams_per_identity),
            ],
        )?;
        buffer_ok(self.shard_buffer_bytes)
    }
}

impl AgentLimits {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        positive("limits", &[("streams_per_conn", self.streams_per_conn), ("setup_per_conn", self.setup_per_conn)])?;
        buffer_ok(self.shard_buffer_bytes)
    }
}

fn buffer_ok(v: usize) -> Result<(), String> {
    if v < MIN_SHARD_BUFFER {
        return Err(format!("limits.shard_buffer_bytes {v} is below the minimum {MIN_SHARD_BUFFER}"));
    }
    Ok(())
}

/// The error answered past a budget: RESOURCE_EXHAUSTED, retry-safe (nothing
/// was done), its message naming the budget and its value.
pub fn exceeded(budget: &'static str, value: usize, label: Label, side: Side) -> Error {
    let m = format!("budget {budget} ({value}) reached");
    Error::new(Code::ResourceExhausted, side, Retry::Safe, label, m)
}

#[derive(Default)]
struct MeterInner {
    held: Cell<usize>,
    peak: Cell<usize>,
    soft: Cell<usize>,
    hard: Cell<usize>,
    /// Connection window granted beyond the connections' base windows
    /// (see `transport::window`); at most the soft level in all.
    windows: Cell<usize>,
    /// `held`, mirrored for readers on other threads (the metrics scrape):
    /// one more relaxed store per change, written by this shard only.
    public: Option<Arc<Gauge>>,
}

/// A shard's meter of bytes held by the relay (read buffers, received
/// chunks whose credit is not yet returned). Cloned into every dial.
#[derive(Clone, Default)]
pub struct BufMeter(Rc<MeterInner>);

impl BufMeter {
    /// A meter with budget `hard` bytes; buffers stop growing past `hard / 2`.
    pub fn new(hard: usize) -> BufMeter {
        let m = BufMeter::default();
        m.0.hard.set(hard);
        m.0.soft.set(hard / 2);
        m
    }

    /// [`BufMeter::new`], whose bytes held are also published in `gauge`.
    pub fn with_gauge(hard: usize, gauge: Arc<Gauge>) -> BufMeter {
        let m = BufMeter(Rc::new(MeterInner { public: Some(gauge), ..MeterInner::default() }));
        m.0.hard.set(hard);
        m.0.soft.set(hard / 2);
        m
    }

    fn held_now(&self, v: usize) {
        self.0.held.set(v);
        if let Some(g) = &self.0.public {
            g.set(v as i64);
        }
    }

    /// Counts `n` more bytes held.
    pub fn add(&self, n: usize) {
        let v = self.0.held.get() + n;
        self.held_now(v);
        if v > self.0.peak.get() {
            self.0.peak.set(v);
        }
    }

    /// Counts `n` bytes given back.
    pub fn sub(&self, n: usize) {
        self.held_now(self.0.held.get().saturating_sub(n));
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.0.held.get()
    }

    /// The most held at once.
    pub fn peak(&self) -> usize {
        self.0.peak.get()
    }

    /// Past the soft level: buffers keep their minimum size.
    pub fn over_soft(&self) -> bool {
        self.0.hard.get() > 0 && self.0.held.get() >= self.0.soft.get()
    }

    /// Past the budget: new dials are refused.
    pub fn over_budget(&self) -> bool {
        self.0.hard.get() > 0 && self.0.held.get() >= self.0.hard.get()
    }

    /// A new budget (a config reload): buffers stop growing past half of
    /// it, new dials are refused past it; bytes held stay held.
    pub fn set_budget(&self, hard: usize) {
        self.0.hard.set(hard);
        self.0.soft.set(hard / 2);
    }

    /// The budget, bytes.
    pub fn budget(&self) -> usize {
        self.0.hard.get()
    }

    /// The extra connection window a connection that holds `own` of it may
    /// have at most. All grants together stay within half the soft level
    /// (a quarter of the budget), and grants plus the bytes held within
    /// the soft level: a stalled stream also holds a chunk in the relay,
    /// and what a window lets in costs more than its bytes (h2 keeps each
    /// frame in its read allocation). Measured with 200 stalled streams: a
    /// pool of the whole soft level (128 MiB) let the proxy grow 170 MiB,
    /// more than its documented bound.
    pub fn window_room(&self, own: usize) -> usize {
        let others = self.0.windows.get().saturating_sub(own);
        let pool = (self.0.soft.get() / 2).saturating_sub(others);
        pool.min(self.0.soft.get().saturating_sub(others + self.0.held.get()))
    }

    /// A connection's extra window changes from `old` to `new` bytes.
    pub fn regrant_window(&self, old: usize, new: usize) {
        self.0.windows.set(self.0.windows.get().saturating_sub(old) + new);
    }

    /// Extra connection window granted on this shard, bytes.
    pub fn windows(&self) -> usize {
        self.0.windows.get()
    }
}

#[derive(Default, Clone, Copy)]
struct Counts {
    conns: usize,
    streams: usize,
}

/// A shard's connections and streams per certificate identity.
#[derive(Clone, Default)]
pub struct Identities(Rc<RefCell<HashMap<Rc<str>, Counts>>>);

/// One connection of an identity; streams are counted through it.
pub struct IdentityConn {
    map: Identities,
    key: Rc<str>,
}

/// One stream of an identity.
pub struct IdentityStream {
    map: Identities,
    key: Rc<str>,
}

impl Identities {
    /// Counts a connection of `who`, unless it already has `max`.
    pub fn enter_conn(&self, who: &str, max: usize) -> Option<IdentityConn> {
        let mut m = self.0.borrow_mut();
        let key = match m.get_key_value(who) {
            Some((k, _)) => k.clone(),
            None => Rc::from(who),
        };
        let c = m.entry(key.clone()).or_default();
        if c.conns >= max {
            return None;
        }
        c.conns += 1;
        Some(IdentityConn { map: self.clone(), key })
    }

    /// Connections and streams of `who` now.
    pub fn counts(&self, who: &str) -> (usize, usize) {
        self.0.borrow().get(who).map(|c| (c.conns, c.streams)).unwrap_or_default()
    }

    fn change(&self, key: &str, f: impl FnOnce(&mut Counts)) {
        let mut m = self.0.borrow_mut();
        if let Some(c) = m.get_mut(key) {
            f(c);
            if c.conns == 0 && c.streams == 0 {
                m.remove(key);
            }
        }
    }
}

impl IdentityConn {
    /// Counts a stream of this identity, unless it already has `max`.
    pub fn enter_stream(&self, max: usize) -> Option<IdentityStream> {
        let mut m = self.map.0.borrow_mut();
        let c = m.get_mut(&self.key)?;
        if c.streams >= max {
            return None;
        }
        c.streams += 1;
        Some(IdentityStream { map: self.map.clone(), key: self.key.clone() })
    }
}

impl Drop for IdentityConn {
    fn drop(&mut self) {
        self.map.change(&self.key, |c| c.conns -= 1);
    }
}

impl Drop for IdentityStream {
    fn drop(&mut self) {
        self.map.change(&self.key, |c| c.streams -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_budgets_count_per_identity_and_give_back_on_drop() {
        let ids = Identities::default();
        let a1 = ids.enter_conn("a", 2).unwrap();
        let a2 = ids.enter_conn("a", 2).unwrap();
        assert!(ids.enter_conn("a", 2).is_none());
        assert!(ids.enter_conn("b", 2).is_some());
        let s: Vec<_> = (0..3).map(|_| a1.enter_stream(4).unwrap()).collect();
        let _s4 = a2.enter_stream(4).unwrap();
        assert!(a2.enter_stream(4).is_none(), "streams count per identity, across its connections");
        assert_eq!(ids.counts("a"), (2, 4));
        drop(s);
        drop((a1, a2, _s4));
        assert_eq!(ids.counts("a"), (0, 0));
        assert!(ids.0.borrow().is_empty());
    }

    #[test]
    fn the_buffer_meter_has_a_soft_level_at_half_the_budget() {
        let m = BufMeter::new(100);
        m.add(49);
        assert!(!m.over_soft());
        m.add(1);
        assert!(m.over_soft() && !m.over_budget());
        m.add(50);
        assert!(m.over_budget());
        m.sub(60);
        assert_eq!((m.held(), m.peak()), (40, 100));
    }

    #[test]
    fn zero_limits_are_errors_naming_the_key() {
        let l = ProxyLimits { streams_per_identity: 0, ..ProxyLimits::default() };
        assert_eq!(l.validate().unwrap_err(), "limits.streams_per_identity must be > 0");
        let a = AgentLimits { shard_buffer_bytes: 10, ..AgentLimits::default() };
        assert!(a.validate().unwrap_err().contains("limits.shard_buffer_bytes"));
    }
}
