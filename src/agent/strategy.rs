//! The agent's tunnel manager: which proxies to keep tunnels to.
//!
//! Invariants:
//! - `agent_mesh`: a tunnel to every known proxy. `proxy_peering`: tunnels
//!   to exactly `agent_connection_count` distinct proxies, as long as that
//!   many exist.
//! - The proxy set and strategy come from the proxies over `Agent/Control`;
//!   the configured addresses only seed discovery.
//! - A tunnel that has been down longer than [`FAILED_AFTER`] is replaced
//!   when another proxy is available.
//! - So is a tunnel whose proxy missed a keepalive ping (suspect: frozen or
//!   cut off), at once: the proxies route around it only once the agent
//!   holds its `agent_connection_count` tunnels elsewhere.
//! - A tunnel that is no longer wanted drains (GOAWAY): its open streams
//!   finish, and no new ones start. While it is healthy it drains only once
//!   every wanted tunnel has been up for [`SETTLE`] (make before break), so
//!   a proxy that is leaving never leaves the agent unreachable.
//! - A proxy that said it leaves the fleet (a Drain message) is chosen only
//!   when no other proxy is known; one whose record carries the draining
//!   mark is not chosen for a new tunnel, but a tunnel already held to it
//!   stays until it says to move.
//! - Proxies are chosen in an order hashed from the agent id, so a fleet of
//!   agents spreads over the proxies.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::route::model::Strategy;
use crate::runtime::Shutdown;
use crate::transport::keepalive::LinkHealth;

/// A tunnel down this long counts as failed and is replaced.
pub const FAILED_AFTER: Duration = Duration::from_secs(2);

/// How long a replacement tunnel must have been up before the tunnel it
/// replaces drains: the new proxy registers the tunnel and the backend
/// spreads its route meanwhile.
pub const SETTLE: Duration = Duration::from_secs(1);

/// How long a proxy that said it is leaving the fleet is avoided.
pub const LEAVING_FOR: Duration = Duration::from_secs(120);

/// What the proxies told the agent.
#[derive(Debug, Default)]
pub struct Membership {
    /// The strategy in force.
    pub strategy: Strategy,
    /// Known proxies: id → tunnel address.
    pub proxies: BTreeMap<String, String>,
    /// Proxies whose record carries the draining mark.
    pub draining: BTreeSet<String>,
    /// Proxies that told this agent they leave the fleet, until when.
    pub leaving: BTreeMap<String, Instant>,
    /// Bumped on every change.
    pub generation: u64,
}

impl Membership {
    /// Whether proxy `id` said it leaves the fleet (recently).
    pub fn leaving(&self, id: &str, now: Instant) -> bool {
        self.leaving.get(id).is_some_and(|t| *t > now)
    }
}

/// One tunnel the agent runs, keyed by address.
#[derive(Clone)]
pub struct Slot {
    /// Fires to drain and end this tunnel.
    pub stop: Shutdown,
    /// Whether the tunnel is established.
    pub up: Rc<Cell<bool>>,
    /// When `up` last changed.
    pub since: Rc<Cell<Instant>>,
    /// The proxy's id, once connected.
    pub proxy: Rc<RefCell<Option<String>>>,
    /// Set when the tunnel task has ended.
    pub ended: Rc<Cell<bool>>,
    /// The keepalive verdict of the tunnel's current connection.
    pub health: Rc<RefCell<LinkHealth>>,
    /// Set when its proxy said a successor listens at the same address:
    /// the manager opens a replacement there and retires this slot.
    pub replace: Rc<Cell<bool>>,
}

impl Slot {
    /// A fresh slot (connecting).
    pub fn new() -> Slot {
        Slot {
            stop: Shutdown::new(),
            up: Rc::default(),
            since: Rc::new(Cell::new(Instant::now())),
            proxy: Rc::default(),
            ended: Rc::default(),
            health: Rc::default(),
            replace: Rc::default(),
        }
    }

    /// Whether the tunnel has been up for at least `d`.
    pub fn up_for(&self, d: Duration, now: Instant) -> bool {
        self.up.get() && now.duration_since(self.since.get()) >= d
    }

    /// Whether the tunnel is up but its proxy missed a keepalive ping.
    pub fn suspect(&self) -> bool {
        self.up.get() && self.health.borrow().is_suspect()
    }

    /// Whether the slot is up, or still within its grace period.
    pub fn healthy(&self, now: Instant) -> bool {
        self.up.get() || now.duration_since(self.since.get()) < FAILED_AFTER
    }
}

impl Default for Slot {
    fn default() -> Self {
        Slot::new()
    }
}

fn spread(agent: &str, addr: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (agent, addr).hash(&mut h);
    h.finish()
}

/// The tunnel addresses the agent should hold now under `strategy` (the
/// cluster's, or the agent's own count override).
pub fn desired(
    agent: &str,
    strategy: Strategy,
    m: &Membership,
    seeds: &[String],
    slots: &HashMap<String, Slot>,
    now: Instant,
) -> Vec<String> {
    // A draining proxy is not chosen for a new tunnel, but a tunnel the
    // agent holds to it stays until the proxy says to move (`Drain`): a
    // proxy restarting in place keeps its agents.
    let held = |a: &String| slots.get(a).is_some_and(|s| s.healthy(now));
    let preferred: Vec<String> = m
        .proxies
        .iter()
        .filter(|(id, a)| !m.leaving(id, now) && (!m.draining.contains(*id) || held(a)))
        .map(|(_, a)| a.clone())
        .collect();
    let mut candidates: Vec<String> = if m.proxies.is_empty() {
        seeds.to_vec()
    } else if preferred.is_empty() {
        // Every known proxy drains: keep what there is.
        m.proxies.values().cloned().collect()
    } else {
        preferred
    };
    candidates.sort_by_key(|a| spread(agent, a));
    candidates.dedup();
    let want = match strategy {
        Strategy::AgentMesh => return candidates,
        Strategy::ProxyPeering { agent_connection_count } => agent_connection_count.max(1) as usize,
    };
    // Keep healthy tunnels first (up ones before connecting ones), then add
    // new proxies, then fall back to suspect ones and, if nothing else
    // exists, to failed ones.
    let mut keep: Vec<String> = Vec::with_capacity(want);
    let mut ranked: Vec<&String> = candidates.iter().collect();
    ranked.sort_by_key(|a| match slots.get(*a) {
        Some(s) if s.suspect() => 3,
        Some(s) if s.up.get() => 0,
        Some(s) if s.healthy(now) => 1,
        None => 2,
        Some(_) => 4,
    });
    for a in ranked {
        if keep.len() == want {
            break;
        }
        keep.push(a.clone());
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(strategy: Strategy, n: usize) -> Membership {
        Membership {
            strategy,
            proxies: (0..n).map(|i| (format!("p{i}"), format!("10.0.0.{i}:3024"))).collect(),
            generation: 1,
            ..Default::default()
        }
    }

    #[test]
    fn mesh_takes_all_and_peering_takes_n_replacing_failed_ones() {
        let now = Instant::now();
        let mut slots = HashMap::new();
        assert_eq!(desired("a", Strategy::AgentMesh, &m(Strategy::AgentMesh, 3), &[], &slots, now).len(), 3);
        let peering = m(Strategy::ProxyPeering { agent_connection_count: 2 }, 3);
        let first = desired("a", peering.strategy, &peering, &[], &slots, now);
        assert_eq!(first.len(), 2);
        for a in &first {
            let s = Slot::new();
            s.up.set(true);
            slots.insert(a.clone(), s);
        }
        assert_eq!(desired("a", peering.strategy, &peering, &[], &slots, now), first, "stable while healthy");
        // One tunnel fails for longer than the grace period: it is replaced.
        let failed = &first[0];
        slots[failed].up.set(false);
        slots[failed].since.set(now - FAILED_AFTER * 2);
        let next = desired("a", peering.strategy, &peering, &[], &slots, now);
        assert_eq!(next.len(), 2);
        assert!(!next.contains(failed) && next.contains(&first[1]));
        // A live tunnel whose proxy missed a ping is replaced at once, while
        // another proxy is there to take it.
        let mut slots: HashMap<String, Slot> = HashMap::new();
        for a in &first {
            let s = Slot::new();
            s.up.set(true);
            slots.insert(a.clone(), s);
        }
        let frozen = &first[0];
        let h = LinkHealth::new();
        slots[frozen].health.replace(h.clone());
        h.mark(true);
        let next = desired("a", peering.strategy, &peering, &[], &slots, now);
        assert!(!next.contains(frozen) && next.contains(&first[1]) && next.len() == 2, "{next:?}");
        // With no other proxy, the suspect tunnel is kept.
        let only_two = Membership {
            strategy: peering.strategy,
            proxies: first.iter().enumerate().map(|(i, a)| (format!("q{i}"), a.clone())).collect(),
            generation: 1,
            ..Default::default()
        };
        assert!(desired("a", peering.strategy, &only_two, &[], &slots, now).contains(frozen));
        // A proxy leaving the fleet is replaced; when it is the only one
        // known, it is kept.
        let one = Strategy::ProxyPeering { agent_connection_count: 1 };
        let mut leaving = m(one, 3);
        let held = desired("a", one, &leaving, &[], &HashMap::new(), now);
        let id = leaving.proxies.iter().find(|(_, a)| **a == held[0]).map(|(id, _)| id.clone()).unwrap();
        leaving.leaving.insert(id.clone(), now + LEAVING_FOR);
        let moved = desired("a", one, &leaving, &[], &HashMap::new(), now);
        assert_ne!(moved, held, "a leaving proxy is not chosen");
        leaving.proxies.retain(|k, _| *k == id);
        assert_eq!(desired("a", one, &leaving, &[], &HashMap::new(), now), held);
        // With no proxies known yet, the configured seeds are used.
        let seeds = vec!["seed:1".to_string()];
        assert_eq!(desired("a", Strategy::AgentMesh, &Membership::default(), &seeds, &HashMap::new(), now), seeds);
    }
}
