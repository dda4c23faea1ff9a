//! Telemetry: per-shard counters with static labels.
//!
//! Invariants: each `ShardStats` is written by one shard only (relaxed
//! atomics, no contention, no locks); readers (demo, bench, tests, the
//! control thread) sum across shards. Error labels are `&'static str` from a
//! fixed list, so counting an error never allocates.

pub mod admin;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// A monotonically increasing counter.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
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

/// A gauge.
#[derive(Default, Debug)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds `d` (may be negative).
    pub fn add(&self, d: i64) {
        self.0.fetch_add(d, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Error labels counted per shard.
pub const ERROR_LABELS: &[&str] = &[
    "not_found",
    "unavailable",
    "invalid_argument",
    "deadline_exceeded",
    "permission_denied",
    "resource_exhausted",
    "unimplemented",
    "stream_reset",
    "pipe_broken",
    "h2",
    "io",
    "tls_handshake",
    "no_alpn",
    "timeout",
    "connect",
    "h2_handshake",
    "other",
];

/// Counters of one shard.
#[derive(Default, Debug)]
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
    errors: [Counter; 17],
}

impl ShardStats {
    /// Counts an error by label (unknown labels count as `other`).
    pub fn error(&self, label: &'static str) {
        let i = ERROR_LABELS.iter().position(|l| *l == label).unwrap_or(ERROR_LABELS.len() - 1);
        self.errors[i].inc();
    }

    /// Count of one error label.
    pub fn error_count(&self, label: &str) -> u64 {
        ERROR_LABELS.iter().position(|l| *l == label).map(|i| self.errors[i].get()).unwrap_or(0)
    }
}

type Row = (&'static str, fn(&ShardStats) -> i64);

/// All shards' counters of one proxy.
#[derive(Clone, Default)]
pub struct Metrics {
    /// One entry per shard.
    pub shards: Vec<Arc<ShardStats>>,
}

impl Metrics {
    /// Counters for `n` shards.
    pub fn new(n: usize) -> Metrics {
        Metrics { shards: (0..n).map(|_| Arc::new(ShardStats::default())).collect() }
    }

    /// Sums a counter over shards.
    pub fn sum(&self, f: impl Fn(&ShardStats) -> u64) -> u64 {
        self.shards.iter().map(|s| f(s)).sum()
    }

    /// Prometheus text exposition of the counters.
    pub fn render(&self, proxy: &str) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let rows: [Row; 11] = [
            ("ringpeer_peer_links", |s| s.peer_links.get()),
            ("ringpeer_dials_peered_total", |s| s.dials_peered.get() as i64),
            ("ringpeer_dials_total", |s| s.dials.get() as i64),
            ("ringpeer_dials_local_total", |s| s.dials_local.get() as i64),
            ("ringpeer_dials_cross_shard_total", |s| s.dials_cross_shard.get() as i64),
            ("ringpeer_dials_failed_total", |s| s.dials_failed.get() as i64),
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
        for (li, label) in ERROR_LABELS.iter().enumerate() {
            for (i, s) in self.shards.iter().enumerate() {
                let v = s.errors[li].get();
                if v > 0 {
                    let _ =
                        writeln!(out, "ringpeer_errors_total{{proxy=\"{proxy}\",shard=\"{i}\",error=\"{label}\"}} {v}");
                }
            }
        }
        out
    }
}

/// Static metrics label of a gRPC status code.
pub fn code_label(code: crate::wire::status::Code) -> &'static str {
    use crate::wire::status::Code;
    match code {
        Code::NotFound => "not_found",
        Code::Unavailable => "unavailable",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::Unimplemented => "unimplemented",
        _ => "other",
    }
}
