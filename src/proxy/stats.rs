//! A proxy's counters: one `ShardStats` per shard, summed at read time.
//!
//! Invariants: each `ShardStats` is written by its shard only (single-writer
//! counters, no contention, no locks); readers (admin, demo, bench, tests)
//! sum across shards. Errors are counted by [`Label`] (an array index) and
//! by gRPC code, so counting one never allocates or compares strings.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use crate::runtime::stats::{Counter, Gauge};
use crate::wire::error::{Error, Label};
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
    errors: [Counter; Label::COUNT],
    codes: [Counter; 17],
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
            errors: std::array::from_fn(|_| Counter::default()),
            codes: std::array::from_fn(|_| Counter::default()),
        }
    }
}

impl ShardStats {
    /// Counts a failed dial: its label and its gRPC code.
    pub fn failed(&self, e: &Error) {
        self.errors[e.label.index()].inc();
        self.codes[e.code as usize].inc();
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

type Row = (&'static str, fn(&ShardStats) -> i64);

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

    /// Prometheus text exposition of the counters.
    pub fn render(&self, proxy: &str) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let rows: [Row; 12] = [
            ("ringpeer_peer_links", |s| s.peer_links.get()),
            ("ringpeer_dials_peered_total", |s| s.dials_peered.get() as i64),
            ("ringpeer_dials_total", |s| s.dials.get() as i64),
            ("ringpeer_dials_local_total", |s| s.dials_local.get() as i64),
            ("ringpeer_dials_cross_shard_total", |s| s.dials_cross_shard.get() as i64),
            ("ringpeer_dials_failed_total", |s| s.dials_failed.get() as i64),
            ("ringpeer_dials_replanned_total", |s| s.dials_replanned.get() as i64),
            ("ringpeer_bytes_up_total", |s| s.bytes_up.get() as i64),
            ("ringpeer_bytes_down_total", |s| s.bytes_down.get() as i64),
            ("ringpeer_active_streams", |s| s.active_streams.get()),
            ("ringpeer_tunnels", |s| s.tunnels.get()),
            ("ringpeer_client_connections_total", |s| s.client_conns.get() as i64),
        ];
        for (name, f) in rows {
            for (i, s) in self.shards.iter().enumerate() {
                let _ = writeln!(out, "{name}{{proxy=\"{proxy}\",shard=\"{i}\"}} {}", f(s));
            }
        }
        let _ = writeln!(out, "ringpeer_audit_lines_total{{proxy=\"{proxy}\"}} {}", self.audit.lines());
        let _ = writeln!(out, "ringpeer_audit_dropped_total{{proxy=\"{proxy}\"}} {}", self.audit.dropped_count());
        for label in Label::ALL {
            for (i, s) in self.shards.iter().enumerate() {
                let v = s.errors[label.index()].get();
                if v > 0 {
                    let _ = writeln!(
                        out,
                        "ringpeer_errors_total{{proxy=\"{proxy}\",shard=\"{i}\",error=\"{}\"}} {v}",
                        label.name()
                    );
                }
            }
        }
        out
    }
}

/// The `ringpeer_cert_expiry_seconds` gauge: validity left of this
/// proxy's certificate (`cert="own"`) and of each CA of its bundle
/// (`cert="ca"`), at `now` (negative once expired).
pub fn cert_expiry(proxy: &str, certs: &[crate::transport::tls::CertInfo], now: i64) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', " ");
    let mut m = String::from(
        "# HELP ringpeer_cert_expiry_seconds Seconds until a loaded certificate expires (own, and each CA).\n\
         # TYPE ringpeer_cert_expiry_seconds gauge\n",
    );
    for c in certs {
        m.push_str(&format!(
            "ringpeer_cert_expiry_seconds{{proxy=\"{}\",cert=\"{}\",subject=\"{}\",serial=\"{}\"}} {}\n",
            esc(proxy),
            c.kind,
            esc(&c.subject),
            c.serial,
            c.remaining(now)
        ));
    }
    m
}
