//! The control thread's view of the cluster, folded from full loads and
//! events, and the snapshot built from it.
//!
//! Invariants: applying an event twice is harmless (full loads and the
//! events after their cursor overlap); a proxy's routes count only while its
//! record is valid; while the backend is unreachable nothing expires, so
//! proxies keep serving every route they knew. A full load never removes
//! a known proxy before its deadline, and after an outage every deadline
//! is at least one TTL away ([`ClusterView::carry_over`]): records lapsed
//! in the backend while no proxy could write (e.g. a Redis failover longer
//! than the TTL), and their owners need that long to write them again.
//! - An agent is *moving* (its entry stays, empty, so dials wait for it
//!   instead of answering NOT_FOUND) for [`MOVE_GRACE`] after its last
//!   route went away, and while the backend lists this very proxy id as a
//!   holder with no tunnel here, for [`ARRIVAL_WINDOW`] after the process
//!   started: a predecessor (restart or upgrade in place) wrote that route
//!   and the agent is reconnecting to this process.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::grants::GrantView;
use crate::route::agents::AgentMap;
use crate::route::model::{AgentRoute, Event, ProxyInfo, Strategy};
use crate::route::store::Loaded;
use crate::route::{AgentRoutes, LocalRoute, RemoteRoute, RouteTable};

/// How long an agent whose last route went away counts as moving.
pub const MOVE_GRACE: Duration = Duration::from_secs(3);

/// How long after start a route under this proxy's own id with no tunnel
/// here counts as a tunnel on its way (then it is stale and removed).
pub const ARRIVAL_WINDOW: Duration = Duration::from_secs(30);

/// This proxy's own tunnels: agent → (connection id, route), newest first.
pub type LocalTunnels = HashMap<String, Vec<(u64, LocalRoute)>>;

/// What the backend says about the cluster.
#[derive(Default, Debug)]
pub struct ClusterView {
    /// Proxies and the instant their record lapses.
    pub proxies: HashMap<String, (ProxyInfo, Instant)>,
    /// Agent → proxy → route.
    pub agents: HashMap<String, HashMap<String, AgentRoute>>,
    /// The strategy, once known.
    pub strategy: Option<Strategy>,
    /// Proxy → agents it holds routes for (to find what a proxy's arrival
    /// or departure affects).
    by_proxy: HashMap<String, HashSet<String>>,
    /// Agents that lost their last route, until when they count as moving.
    pub moving: HashMap<String, Instant>,
    /// Until when routes under this proxy's own id count as arriving.
    pub arrivals_until: Option<Instant>,
    /// The grants.
    pub grants: GrantView,
}

/// Which agents' routes an update may have changed.
#[derive(Debug, Default)]
pub struct Affected {
    /// Every agent (full load).
    pub all: bool,
    /// These agents.
    pub agents: HashSet<String>,
    /// Proxy set, strategy or grants changed (cheap to copy into every
    /// snapshot).
    pub cluster: bool,
}

impl Affected {
    /// Merges another update's effects.
    pub fn merge(&mut self, o: Affected) {
        self.all |= o.all;
        self.cluster |= o.cluster;
        if !self.all {
            self.agents.extend(o.agents);
        }
    }

    /// Marks one agent.
    pub fn agent(a: &str) -> Affected {
        Affected { agents: HashSet::from([a.to_string()]), ..Default::default() }
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        !self.all && !self.cluster && self.agents.is_empty()
    }
}

impl ClusterView {
    /// A view from a full load.
    pub fn from_loaded(l: &Loaded, now: Instant) -> ClusterView {
        let mut v = ClusterView { strategy: l.strategy, ..Default::default() };
        v.grants = GrantView::from_loaded(&l.grants, &GrantView::default());
        for (p, ttl) in &l.proxies {
            v.proxies.insert(p.id.clone(), (p.clone(), now + *ttl));
        }
        for (agent, routes) in &l.agents {
            let m: HashMap<_, _> = routes.iter().map(|r| (r.proxy.clone(), r.clone())).collect();
            for p in m.keys() {
                v.by_proxy.entry(p.clone()).or_default().insert(agent.clone());
            }
            if !m.is_empty() {
                v.agents.insert(agent.clone(), m);
            }
        }
        v
    }

    /// Folds the previous view into this fresh full load: a proxy `old`
    /// knew that the load lacks stays, with the routes it held, until its
    /// deadline in `old`; only [`expire`](Self::expire) (or its own
    /// `ProxyDown`) removes a proxy, never a load. After a backend outage
    /// (`extend_to`), every known proxy's deadline is moreover at least
    /// `extend_to`, lacking or loaded: records could not be refreshed
    /// during the outage, so they lapsed, or are about to, on the backend.
    /// A live proxy writes its record and routes again within a heartbeat
    /// of reaching the backend; one that died meanwhile expires then.
    /// Returns how many lacking proxies were kept.
    ///
    /// Rejected: letting a load drop them (what it did): a Redis failover
    /// longer than the proxy TTL then failed every dial through a live
    /// proxy until that proxy's writer reconnected. Seen in the kill -9
    /// stories: 28 of 288 dials failed (Cluster); and, with the rule
    /// applied to the first load after the outage only, a second load
    /// (the reader reconnecting once more on the master-change signal)
    /// still dropped them: 18 to 42 dials failed, outages up to 0.91 s.
    pub fn carry_over(&mut self, old: &ClusterView, now: Instant, extend_to: Option<Instant>) -> usize {
        let mut kept = 0;
        for (id, (info, was)) in &old.proxies {
            let deadline = extend_to.map_or(*was, |e| (*was).max(e));
            if let Some((_, loaded)) = self.proxies.get_mut(id) {
                if extend_to.is_some() {
                    *loaded = (*loaded).max(deadline);
                }
                continue;
            }
            if deadline <= now {
                continue;
            }
            kept += 1;
            self.proxies.insert(id.clone(), (info.clone(), deadline));
            for agent in old.agents_of(id) {
                let Some(r) = old.agents.get(&agent).and_then(|m| m.get(id)) else { continue };
                self.agents.entry(agent.clone()).or_default().entry(id.clone()).or_insert_with(|| r.clone());
                self.by_proxy.entry(id.clone()).or_default().insert(agent);
            }
        }
        kept
    }

    /// What differs between this view and `new` (a fresh full load), so a
    /// periodic resync that finds nothing new costs a comparison, not a
    /// rebuild.
    pub fn diff(&self, new: &ClusterView) -> Affected {
        let cluster = self.strategy != new.strategy || self.grants.differs(&new.grants);
        let mut a = Affected { cluster, ..Default::default() };
        for (agent, routes) in &new.agents {
            if self.agents.get(agent) != Some(routes) {
                a.agents.insert(agent.clone());
            }
        }
        for agent in self.agents.keys() {
            if !new.agents.contains_key(agent) {
                a.agents.insert(agent.clone());
            }
        }
        let ids: HashSet<&String> = self.proxies.keys().chain(new.proxies.keys()).collect();
        for id in ids {
            if self.proxies.get(id).map(|(p, _)| p) != new.proxies.get(id).map(|(p, _)| p) {
                a.cluster = true;
                a.agents.extend(self.agents_of(id));
                a.agents.extend(new.agents_of(id));
            }
        }
        a
    }

    fn agents_of(&self, proxy: &str) -> HashSet<String> {
        self.by_proxy.get(proxy).cloned().unwrap_or_default()
    }

    /// Folds one event in; returns what it may have changed.
    pub fn apply(&mut self, e: Event, now: Instant) -> Affected {
        match e {
            Event::AgentUp { agent, route } => {
                self.by_proxy.entry(route.proxy.clone()).or_default().insert(agent.clone());
                self.agents.entry(agent.clone()).or_default().insert(route.proxy.clone(), route);
                Affected::agent(&agent)
            }
            Event::AgentDown { agent, proxy } => {
                if let Some(m) = self.agents.get_mut(&agent) {
                    m.remove(&proxy);
                    if m.is_empty() {
                        self.agents.remove(&agent);
                        self.lost(&agent, now);
                    }
                }
                if let Some(s) = self.by_proxy.get_mut(&proxy) {
                    s.remove(&agent);
                }
                Affected::agent(&agent)
            }
            Event::ProxyUp { info, ttl_ms } => {
                let id = info.id.clone();
                let known = self.proxies.get(&id).map(|(p, _)| p == &info).unwrap_or(false);
                self.proxies.insert(id.clone(), (info, now + Duration::from_millis(ttl_ms)));
                if known {
                    // A heartbeat: nothing a snapshot shows changed.
                    Affected::default()
                } else {
                    Affected { agents: self.agents_of(&id), cluster: true, all: false }
                }
            }
            Event::ProxyDown { proxy } => {
                self.proxies.remove(&proxy);
                let agents = self.agents_of(&proxy);
                for a in &agents {
                    self.lost(a, now);
                }
                Affected { agents, cluster: true, all: false }
            }
            Event::Strategy(s) => {
                self.strategy = Some(s);
                Affected { cluster: true, ..Default::default() }
            }
            Event::GrantUp(g) => Affected { cluster: self.grants.up(g), ..Default::default() },
            Event::GrantDown { name, kill_streams } => {
                Affected { cluster: self.grants.down(&name, kill_streams), ..Default::default() }
            }
        }
    }

    /// Drops proxies whose record lapsed; returns what that changed.
    pub fn expire(&mut self, now: Instant) -> Affected {
        let gone: Vec<String> =
            self.proxies.iter().filter(|(_, (_, until))| *until <= now).map(|(k, _)| k.clone()).collect();
        let mut a = Affected::default();
        for p in gone {
            self.proxies.remove(&p);
            let agents = self.agents_of(&p);
            for ag in &agents {
                self.lost(ag, now);
            }
            a.merge(Affected { agents, cluster: true, all: false });
        }
        let lapsed: Vec<String> = self.moving.iter().filter(|(_, t)| **t <= now).map(|(k, _)| k.clone()).collect();
        for ag in lapsed {
            self.moving.remove(&ag);
            a.agents.insert(ag);
        }
        if self.arrivals_until.is_some_and(|t| t <= now) {
            self.arrivals_until = None;
            a.all = true;
        }
        a
    }

    /// Marks `agent` as moving for [`MOVE_GRACE`] (its last route, here or
    /// elsewhere, just went away; it may be reconnecting).
    pub fn lost(&mut self, agent: &str, now: Instant) {
        self.moving.insert(agent.to_string(), now + MOVE_GRACE);
    }

    /// Agents the backend lists under `me` (a predecessor's routes, or
    /// stale ones) that have no tunnel in `local`.
    pub fn listed_here_without_tunnel(&self, me: &str, local: &LocalTunnels) -> Vec<String> {
        self.by_proxy
            .get(me)
            .into_iter()
            .flatten()
            .filter(|a| !local.contains_key(*a) && self.agents.get(*a).is_some_and(|m| m.contains_key(me)))
            .cloned()
            .collect()
    }

    /// The routes to one agent as the shards should see them.
    pub fn routes_for(&self, agent: &str, me: &str, local: &LocalTunnels) -> Option<AgentRoutes> {
        let mut out = AgentRoutes::default();
        let mut listed_here = false;
        if let Some(by_proxy) = self.agents.get(agent) {
            for (proxy, r) in by_proxy {
                if proxy == me {
                    listed_here = true;
                    continue;
                }
                let Some((info, _)) = self.proxies.get(proxy) else { continue };
                out.remote.push(RemoteRoute {
                    proxy: Arc::from(proxy.as_str()),
                    shard: r.shard,
                    peer_addr: info.peer_addrs.get(r.shard as usize).map(|a| Arc::from(a.as_str())),
                    services: r.services.clone().into(),
                    draining: info.draining,
                });
            }
        }
        if let Some(t) = local.get(agent) {
            out.local = t.iter().map(|(_, r)| r.clone()).collect();
        }
        if out.local.is_empty() && out.remote.is_empty() {
            // The snapshot is rebuilt when either mark lapses (`expire`),
            // so the mark's presence is enough here.
            out.moving = self.moving.contains_key(agent) || (listed_here && self.arrivals_until.is_some());
        }
        (!out.local.is_empty() || !out.remote.is_empty() || out.moving).then_some(out)
    }

    /// Derives the next snapshot from `prev`, recomputing only `changed`.
    pub fn update(
        &self,
        prev: &RouteTable,
        changed: &Affected,
        me: &str,
        local: &LocalTunnels,
        version: u64,
        backend_up: bool,
    ) -> RouteTable {
        if changed.all {
            let mut t = self.build(me, local, version, backend_up);
            t.loaded |= prev.loaded;
            return t;
        }
        let mut agents = prev.agents.clone();
        for a in &changed.agents {
            match self.routes_for(a, me, local) {
                Some(r) => {
                    agents.insert(a, r);
                }
                None => {
                    agents.remove(a);
                }
            }
        }
        RouteTable {
            version,
            agents,
            proxies: if changed.cluster { self.proxy_map() } else { prev.proxies.clone() },
            strategy: self.strategy.unwrap_or_default(),
            grants: self.grants.table(),
            grant_kills: self.grants.kills(),
            backend_up,
            loaded: prev.loaded || backend_up,
        }
    }

    fn proxy_map(&self) -> HashMap<String, ProxyInfo> {
        self.proxies.iter().map(|(k, (p, _))| (k.clone(), p.clone())).collect()
    }

    /// Builds the whole snapshot (start, full resync).
    pub fn build(&self, me: &str, local: &LocalTunnels, version: u64, backend_up: bool) -> RouteTable {
        let names = self.agents.keys().chain(local.keys()).chain(self.moving.keys());
        let agents: AgentMap = names.filter_map(|a| self.routes_for(a, me, local).map(|r| (a.clone(), r))).collect();
        RouteTable {
            version,
            agents,
            proxies: self.proxy_map(),
            strategy: self.strategy.unwrap_or_default(),
            grants: self.grants.table(),
            grant_kills: self.grants.kills(),
            backend_up,
            loaded: backend_up,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(p: &str) -> AgentRoute {
        AgentRoute { proxy: p.into(), shard: 0, services: vec![], expires_ms: u64::MAX }
    }

    fn info(id: &str) -> ProxyInfo {
        ProxyInfo {
            id: id.into(),
            peer_addrs: vec!["x:1".into()],
            tunnel_addr: String::new(),
            client_addr: String::new(),
            version: 1,
            draining: false,
            build: String::new(),
        }
    }

    #[test]
    fn incremental_snapshots_equal_a_full_rebuild() {
        let now = Instant::now();
        let mut v = ClusterView::default();
        let local = LocalTunnels::new();
        let mut table = v.build("me", &local, 0, true);
        let events = vec![
            Event::ProxyUp { info: info("b"), ttl_ms: 10_000 },
            Event::AgentUp { agent: "a1".into(), route: route("b") },
            Event::AgentUp { agent: "a2".into(), route: route("c") },
            Event::ProxyUp { info: info("c"), ttl_ms: 10_000 },
            Event::ProxyUp { info: info("c"), ttl_ms: 10_000 },
            Event::AgentDown { agent: "a1".into(), proxy: "b".into() },
            Event::AgentUp { agent: "a3".into(), route: route("b") },
            Event::ProxyDown { proxy: "c".into() },
            Event::Strategy(Strategy::ProxyPeering { agent_connection_count: 2 }),
        ];
        for (i, e) in events.into_iter().enumerate() {
            let a = v.apply(e, now);
            table = v.update(&table, &a, "me", &local, i as u64, true);
            let full = v.build("me", &local, i as u64, true);
            assert_eq!(table.agents, full.agents, "after event {i}");
            assert_eq!(table.proxies, full.proxies);
            assert_eq!(table.strategy, full.strategy);
        }
        assert!(table.get("a3").is_some_and(|r| !r.moving), "b holds a3");
        assert!(table.get("a2").is_some_and(|r| r.moving && r.remote.is_empty()), "c left: a2 is moving");
        // Expiry of b leaves its agents moving, then (MOVE_GRACE later) gone.
        let later = now + Duration::from_secs(11);
        let gone = v.expire(later);
        table = v.update(&table, &gone, "me", &local, 99, true);
        assert!(table.agents.values().all(|r| r.moving && r.remote.is_empty()), "{:?}", table.agents);
        let gone = v.expire(later + MOVE_GRACE);
        table = v.update(&table, &gone, "me", &local, 100, true);
        assert!(table.is_empty());
        assert_eq!(table.agents, v.build("me", &local, 100, true).agents);
        // A resync that finds the same state changes nothing.
        assert!(v
            .diff(&ClusterView {
                proxies: v.proxies.clone(),
                agents: v.agents.clone(),
                strategy: v.strategy,
                ..Default::default()
            })
            .is_empty());
    }

    #[test]
    fn after_an_outage_lapsed_proxies_and_their_routes_stay_one_more_ttl() {
        let now = Instant::now();
        let mut old = ClusterView::default();
        for e in [
            Event::ProxyUp { info: info("b"), ttl_ms: 3_000 },
            Event::ProxyUp { info: info("c"), ttl_ms: 3_000 },
            Event::AgentUp { agent: "a1".into(), route: route("b") },
            Event::AgentUp { agent: "a2".into(), route: route("c") },
        ] {
            old.apply(e, now);
        }
        // The new master's load: b's record lapsed; c's has 100 ms left.
        let mut fresh = ClusterView::default();
        fresh.apply(Event::ProxyUp { info: info("c"), ttl_ms: 100 }, now);
        fresh.apply(Event::AgentUp { agent: "a2".into(), route: route("c") }, now);
        let until = now + Duration::from_secs(3);
        assert_eq!(fresh.carry_over(&old, now, Some(until)), 1);
        let local = LocalTunnels::new();
        let t = fresh.build("me", &local, 1, true);
        assert!(t.get("a1").is_some_and(|r| r.remote.iter().any(|m| &*m.proxy == "b")), "{:?}", t.agents);
        assert!(t.get("a2").is_some_and(|r| r.remote.iter().any(|m| &*m.proxy == "c")));
        // b never writes again (it died meanwhile): gone at `until`.
        assert!(fresh.expire(until - Duration::from_millis(1)).is_empty());
        assert!(fresh.proxies.contains_key("c"), "c's short remainder was extended");
        // A later load that still lacks b (the reader reconnected once
        // more) keeps it until the same deadline, not longer.
        let mut again = ClusterView::default();
        again.apply(Event::ProxyUp { info: info("c"), ttl_ms: 3_000 }, now);
        assert_eq!(again.carry_over(&fresh, now, None), 1);
        assert!(again.build("me", &local, 2, true).get("a1").is_some_and(|r| !r.remote.is_empty()));
        assert!(again.expire(until - Duration::from_millis(1)).is_empty());
        assert!(again.expire(until).agents.contains("a1"));
        let gone = fresh.expire(until);
        assert!(gone.agents.contains("a1") && !fresh.proxies.contains_key("b"));
    }
}
