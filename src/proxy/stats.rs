//! A proxy's counters: one `ShardStats` per shard, summed at read time.
//!
//! Invariants: each `ShardStats` is written by its shard only (single-writer
//! counters, gauges and histograms: no contention, no locks); readers (the
//! `/metrics` scrape in `proxy::scrape`, demo, bench, tests) sum across
//! shards. Errors are counted by [`Label`], [`Side`] and [`DialPath`] (array
//! indices) and by gRPC code, so counting one never allocates or compares
//! strings.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use crate::runtime::stats::{Counter, Gauge, Histogram, HistogramSum};
use crate::wire::error::{Error, Label, Side};
use crate::wire::status::Code;

/// Counters of one shard.
#[derive(Debug)]
pub struct ShardStats {
    /// Dials received on the client edge.
    pub dials: Counter,
    /// Dials served by a tunnel on the same shard.
    pub dials_local: Counter,
    /// Dials that crossed to another shard.
    pub dials_cross_shard: Counter,
    /// Dials sent through a peer link.
    pub dials_peered: Counter,
    /// Dials that failed before being established.
    pub dials_failed: Counter,
    /// Dials that waited for the routes to change (an agent moving between
    /// proxies, or every holder failing) and were planned again.
    pub dials_replanned: Counter,
    /// Payload bytes client → agent.
    pub bytes_up: Counter,
    /// Payload bytes agent → client.
    pub bytes_down: Counter,
    /// Open relayed streams.
    pub active_streams: Gauge,
    /// Agent tunnels held.
    pub tunnels: Gauge,
    /// Peer links open from this shard.
    pub peer_links: Gauge,
    /// Client edge connections accepted.
    pub client_conns: Counter,
    /// Version of the route snapshot this shard routes by.
    pub route_version: Gauge,
    /// Bytes held by the relay (the shard's `BufMeter`, mirrored).
    pub buffered: Arc<Gauge>,
    /// Dial set-up time (arrival to established), by [`DialPath`].
    pub setup: [Histogram; DialPath::COUNT],
    /// Arrival to the first DATA relayed back to the caller, by [`DialPath`].
    pub first_byte: [Histogram; DialPath::COUNT],
    errors: [Counter; Label::COUNT],
    codes: [Counter; 17],
    /// Failed dials by (label, side, path-or-none), flattened.
    failures: Box<[Counter]>,
}

/// The way a dial went (or, for a failed one, was last tried): a tunnel on
/// the same shard, a tunnel on another shard, or another proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialPath {
    /// A tunnel held by this shard.
    Local = 0,
    /// A tunnel held by another shard of this proxy.
    Shard = 1,
    /// Another proxy, over a peer link.
    Peer = 2,
}

impl DialPath {
    /// Number of paths.
    pub const COUNT: usize = 3;
    /// Every path, in index order.
    pub const ALL: [DialPath; 3] = [DialPath::Local, DialPath::Shard, DialPath::Peer];

    /// The `path` label value.
    pub fn name(self) -> &'static str {
        match self {
            DialPath::Local => "local",
            DialPath::Shard => "shard",
            DialPath::Peer => "peer",
        }
    }
}

/// Every side, in `Side as usize` order (the `side` label).
pub const SIDES: [Side; 5] = [Side::Client, Side::Proxy, Side::Peer, Side::Agent, Side::Target];
/// Paths of a failed dial: the three [`DialPath`]s, then none (it failed
/// before any upstream was tried).
const FAIL_PATHS: usize = DialPath::COUNT + 1;

fn failure_index(label: Label, side: Side, path: Option<DialPath>) -> usize {
    let p = path.map_or(DialPath::COUNT, |p| p as usize);
    (label.index() * SIDES.len() + side as usize) * FAIL_PATHS + p
}

impl Default for ShardStats {
    fn default() -> Self {
        ShardStats {
            dials: Counter::default(),
            dials_local: Counter::default(),
            dials_cross_shard: Counter::default(),
            dials_peered: Counter::default(),
            dials_replanned: Counter::default(),
            dials_failed: Counter::default(),
            bytes_up: Counter::default(),
            bytes_down: Counter::default(),
            active_streams: Gauge::default(),
            tunnels: Gauge::default(),
            peer_links: Gauge::default(),
            client_conns: Counter::default(),
            route_version: Gauge::default(),
            buffered: Arc::default(),
            setup: Default::default(),
            first_byte: Default::default(),
            errors: std::array::from_fn(|_| Counter::default()),
            codes: std::array::from_fn(|_| Counter::default()),
            failures: (0..Label::COUNT * SIDES.len() * FAIL_PATHS).map(|_| Counter::default()).collect(),
        }
    }
}

impl ShardStats {
    /// Counts a failed dial: its label, its side, the path tried last
    /// (none: it failed before any upstream was tried) and its gRPC code.
    pub fn failed(&self, e: &Error, path: Option<DialPath>) {
        self.dials_failed.inc();
        self.errors[e.label.index()].inc();
        self.codes[e.code as usize].inc();
        self.failures[failure_index(e.label, e.side, path)].inc();
    }

    /// Failed dials with this label, side and path.
    pub fn failure_count(&self, label: Label, side: Side, path: Option<DialPath>) -> u64 {
        self.failures[failure_index(label, side, path)].get()
    }

    /// Counts a failure that is not a dial (a refused handshake, say).
    pub fn error(&self, label: Label) {
        self.errors[label.index()].inc();
    }

    /// Count of one error label.
    pub fn error_count(&self, label: Label) -> u64 {
        self.errors[label.index()].get()
    }

    /// Dials that ended with `code`.
    pub fn code_count(&self, code: Code) -> u64 {
        self.codes[code as usize].get()
    }
}

/// The audit log's counters (`proxy::audit`), one pair per proxy: `lines`
/// has one writer (the audit thread); `dropped` is added to by any shard,
/// but only when the audit queue is full (an atomic add beside the failed
/// push, which already touched the shared queue), and by the audit thread
/// for lines its sink refused. Lines written plus lines dropped is exactly
/// the number of client-edge dials audited.
#[derive(Debug, Default)]
pub struct AuditCounters {
    lines: Counter,
    dropped: AtomicU64,
}

impl AuditCounters {
    /// Adds `n` lines written (the audit thread only).
    pub fn wrote(&self, n: u64) {
        self.lines.add(n);
    }

    /// Adds `n` lines dropped (any thread).
    pub fn dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Lines written to the audit sink.
    pub fn lines(&self) -> u64 {
        self.lines.get()
    }

    /// Lines dropped: the queue was full, or the sink failed.
    pub fn dropped_count(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// All shards' counters of one proxy.
#[derive(Clone, Default)]
pub struct Metrics {
    /// One entry per shard.
    pub shards: Vec<Arc<ShardStats>>,
    /// The audit log's counters.
    pub audit: Arc<AuditCounters>,
}

impl Metrics {
    /// Counters for `n` shards.
    pub fn new(n: usize) -> Metrics {
        Metrics { shards: (0..n).map(|_| Arc::new(ShardStats::default())).collect(), audit: Arc::default() }
    }

    /// Sums a counter over shards.
    pub fn sum(&self, f: impl Fn(&ShardStats) -> u64) -> u64 {
        self.shards.iter().map(|s| f(s)).sum()
    }
}
