//! What the admin endpoint observes of a running proxy, and its two
//! verdicts: liveness (`/healthz`) and readiness (`/readyz`).
//!
//! Invariants:
//! - Everything here is read off the hot path (the admin thread) from state
//!   that shards publish anyway: a counter of shards serving, the control
//!   thread's [`Health`](super::control::Health), the drain phase, the
//!   loaded certificates. Nothing here wakes a shard.
//! - Readiness is 200 only once every shard serves its listeners, the first
//!   route sync completed and the own certificate is valid; 503 `draining`
//!   from the first drain request on (so a load balancer stops sending new
//!   clients before the proxy goes), and 503 naming the reason otherwise.
//! - A route backend outage after the first sync does NOT make the proxy
//!   unready: it keeps serving its last snapshot (local tunnels and known
//!   peers still work), and every proxy of a fleet would otherwise leave
//!   the load balancer at once. The outage shows in the body ("degraded")
//!   and in `ringpeer_route_backend_up`. Alternative rejected: the old
//!   `/healthz` verdict (503 on any backend error), which turned a Redis
//!   outage into a whole-fleet outage behind a load balancer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::control::{HealthCell, SnapshotCell};
use super::drain::{Drain, Phase};
use super::shard::Acceptors;
use super::stats::Metrics;
use crate::transport::reload::Live;

/// What the admin endpoint reads of one proxy.
#[derive(Clone)]
pub struct Observed {
    /// Proxy id.
    pub proxy: String,
    /// Its counters.
    pub metrics: Metrics,
    /// Its latest route snapshot.
    pub snapshot: SnapshotCell,
    /// The control thread's view of the route backend.
    pub health: HealthCell,
    /// Its drain state.
    pub drain: Drain,
    /// Its TLS material (certificate expiry).
    pub tls: Live<Acceptors>,
    /// Shards that started serving their listeners (see [`Observed::serving`]).
    pub serving: Arc<AtomicUsize>,
}

impl Observed {
    /// Marks one more shard as serving its listeners (each shard once, after
    /// its accept loops are spawned).
    pub fn shard_serving(serving: &AtomicUsize) {
        serving.fetch_add(1, Ordering::Release);
    }

    /// Whether the proxy drains (any phase past Running).
    pub fn draining(&self) -> bool {
        self.drain.phase() != Phase::Running
    }

    /// Seconds of validity left of the own certificate at `now` (Unix
    /// seconds); `None` when no certificate is loaded.
    pub fn own_cert_left(&self, now: i64) -> Option<i64> {
        self.tls.current().material.certs.iter().find(|c| c.kind == "own").map(|c| c.remaining(now))
    }

    /// `/readyz`: `Ok(what)` when ready, else `Err(why not)`.
    pub fn readiness(&self) -> Result<String, String> {
        if self.draining() {
            return Err(format!("draining ({:?})", self.drain.phase()));
        }
        let (serving, shards) = (self.serving.load(Ordering::Acquire), self.metrics.shards.len());
        if serving < shards {
            return Err(format!("starting: {serving} of {shards} shards serving their listeners"));
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match self.own_cert_left(now) {
            Some(left) if left <= 0 => return Err(format!("own certificate expired {} s ago", -left)),
            None => return Err("no certificate loaded".into()),
            Some(_) => {}
        }
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (ok, why) = h.verdict();
        if !h.ever_synced {
            return Err(why);
        }
        Ok(if ok { why } else { format!("ok (degraded): {why}") })
    }

    /// `/healthz`: the process runs its loops (the admin thread answers, and
    /// not every shard has ended).
    pub fn liveness(&self) -> String {
        format!("alive: proxy {}, {:?}", self.proxy, self.drain.phase())
    }
}
