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
    /// Tunnels up now: tunnel id → (address, proxy id). Keyed by id, not
    /// address: during an upgrade in place the replacement tunnel comes up
    /// at the same address before the old one goes down, and the old one's
    /// "down" must not erase it (seen under systemd: /readyz said "no
    /// tunnel up" after every `ringpeer-proxy@next` handover).
    /// The id of a tunnel is the count of tunnels opened before it.
    tunnels: Mutex<BTreeMap<u64, (String, String)>>,
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

    /// The tunnel at `addr` is up, to `proxy`; its id, for
    /// [`tunnel_down`](Self::tunnel_down).
    pub fn tunnel_up(&self, addr: &str, proxy: &str) -> u64 {
        let id = self.tunnels_opened.get();
        self.tunnels_opened.inc();
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (addr.to_string(), proxy.to_string()));
        id
    }

    /// The tunnel `id` is down.
    pub fn tunnel_down(&self, id: u64) {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// The tunnels up now: (address, proxy id), by address.
    pub fn tunnels(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> =
            self.tunnels.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_tunnel_at_the_same_address_outlives_its_predecessor() {
        let s = AgentStats::default();
        let old = s.tunnel_up("10.0.0.11:7444", "proxy-a");
        // Upgrade in place: the successor answers at the same address.
        let new = s.tunnel_up("10.0.0.11:7444", "proxy-a");
        assert_eq!(s.tunnels().len(), 2);
        s.tunnel_down(old);
        assert_eq!(s.tunnels(), vec![("10.0.0.11:7444".to_string(), "proxy-a".to_string())]);
        s.tunnel_down(new);
        assert!(s.tunnels().is_empty());
        assert_eq!(s.tunnels_opened.get(), 2);
    }
}
