//! What the agent counts, for its admin endpoint (`agent::admin`): dials
//! received, established and failed (by error label), target connect
//! latency, open streams, buffered bytes, and which tunnels are up.
//!
//! Invariants:
//! - The agent runs one executor thread, the only writer of every counter,
//!   gauge and histogram here ([`crate::runtime::stats`]: a relaxed load
//!   and store, no locked read-modify-write); the admin thread only reads.
//! - The tunnel map is the one lock, taken when a tunnel comes up or goes
//!   down (seconds apart at most, never per dial or per message) and at
//!   scrape time.
//!
//! Alternative rejected: counters inside `AgentCtx` (an `Rc`, owned by the
//! executor): the admin thread could not read them without a round trip
//! through the executor on every scrape.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::runtime::stats::{Counter, Gauge, Histogram};
use crate::wire::error::{Error, Label};

/// One agent's counters (shared by the executor and the admin thread).
#[derive(Debug)]
pub struct AgentStats {
    /// Dials received (a DialRequest read).
    pub dials: Counter,
    /// Dials whose target connected (answered established).
    pub established: Counter,
    /// Dials answered with an error, by label.
    errors: [Counter; Label::COUNT],
    /// Target connect latency of established dials.
    pub connect: Histogram,
    /// Relayed streams open now.
    pub open_streams: Gauge,
    /// Bytes the relay holds (published by the agent's `BufMeter`).
    pub buffered: Arc<Gauge>,
    /// Tunnels established, ever.
    pub tunnels_opened: Counter,
    /// Tunnel attempts that failed before the tunnel was up (connect, TLS,
    /// a refused certificate, a proxy that is not the one expected).
    pub tunnel_failures: Counter,
    /// Tunnels up now: tunnel address → proxy id.
    tunnels: Mutex<BTreeMap<String, String>>,
}

impl Default for AgentStats {
    fn default() -> Self {
        AgentStats {
            dials: Counter::default(),
            established: Counter::default(),
            errors: std::array::from_fn(|_| Counter::default()),
            connect: Histogram::default(),
            open_streams: Gauge::default(),
            buffered: Arc::default(),
            tunnels_opened: Counter::default(),
            tunnel_failures: Counter::default(),
            tunnels: Mutex::default(),
        }
    }
}

impl AgentStats {
    /// Counts a dial answered with `e`.
    pub fn error(&self, e: &Error) {
        self.errors[e.label.index()].inc();
    }

    /// Dials answered with an error labelled `l`.
    pub fn error_count(&self, l: Label) -> u64 {
        self.errors[l.index()].get()
    }

    /// The tunnel at `addr` is up, to `proxy`.
    pub fn tunnel_up(&self, addr: &str, proxy: &str) {
        self.tunnels_opened.inc();
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner()).insert(addr.to_string(), proxy.to_string());
    }

    /// The tunnel at `addr` is down.
    pub fn tunnel_down(&self, addr: &str) {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner()).remove(addr);
    }

    /// The tunnels up now: (address, proxy id).
    pub fn tunnels(&self) -> Vec<(String, String)> {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(a, p)| (a.clone(), p.clone())).collect()
    }
}

/// Counts one relayed stream open while it lives.
pub struct OpenStream<'a>(&'a Gauge);

impl<'a> OpenStream<'a> {
    pub fn new(g: &'a Gauge) -> Self {
        g.add(1);
        OpenStream(g)
    }
}

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}
