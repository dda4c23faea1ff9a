//! The control thread's view of the cluster, folded from full loads and
//! events, and the snapshot built from it.
//!
//! Invariants: applying an event twice is harmless (full loads and the
//! events after their cursor overlap); a proxy's routes count only while its
//! record is valid; while the backend is unreachable nothing expires, so
//! proxies keep serving every route they knew.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::route::model::{AgentRoute, Event, ProxyInfo, Strategy};
use crate::route::store::Loaded;
use crate::route::{AgentRoutes, LocalRoute, RemoteRoute, RouteTable};

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
}

impl ClusterView {
    /// A view from a full load.
    pub fn from_loaded(l: &Loaded, now: Instant) -> ClusterView {
        let mut v = ClusterView { strategy: l.strategy, ..Default::default() };
        for (p, ttl) in &l.proxies {
            v.proxies.insert(p.id.clone(), (p.clone(), now + *ttl));
        }
        for (agent, routes) in &l.agents {
            let m: HashMap<_, _> = routes.iter().map(|r| (r.proxy.clone(), r.clone())).collect();
            if !m.is_empty() {
                v.agents.insert(agent.clone(), m);
            }
        }
        v
    }

    /// Folds one event in.
    pub fn apply(&mut self, e: Event, now: Instant) {
        match e {
            Event::AgentUp { agent, route } => {
                self.agents.entry(agent).or_default().insert(route.proxy.clone(), route);
            }
            Event::AgentDown { agent, proxy } => {
                if let Some(m) = self.agents.get_mut(&agent) {
                    m.remove(&proxy);
                    if m.is_empty() {
                        self.agents.remove(&agent);
                    }
                }
            }
            Event::ProxyUp { info, ttl_ms } => {
                self.proxies.insert(info.id.clone(), (info, now + Duration::from_millis(ttl_ms)));
            }
            Event::ProxyDown { proxy } => {
                self.proxies.remove(&proxy);
            }
            Event::Strategy(s) => self.strategy = Some(s),
        }
    }

    /// Drops proxies whose record lapsed; returns whether any did.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.proxies.len();
        self.proxies.retain(|_, (_, until)| *until > now);
        before != self.proxies.len()
    }

    /// Builds the snapshot the shards route with.
    pub fn build(&self, me: &str, local: &LocalTunnels, version: u64, backend_up: bool) -> RouteTable {
        let mut agents: HashMap<String, AgentRoutes> = HashMap::with_capacity(self.agents.len() + local.len());
        let mut interned: HashMap<&str, Arc<str>> = HashMap::with_capacity(self.proxies.len());
        for (agent, by_proxy) in &self.agents {
            let mut remote = Vec::new();
            for (proxy, r) in by_proxy {
                if proxy == me {
                    continue;
                }
                let Some((info, _)) = self.proxies.get(proxy) else { continue };
                let name = interned.entry(proxy.as_str()).or_insert_with(|| Arc::from(proxy.as_str())).clone();
                remote.push(RemoteRoute {
                    proxy: name,
                    shard: r.shard,
                    peer_addr: info.peer_addrs.get(r.shard as usize).map(|a| Arc::from(a.as_str())),
                    services: r.services.clone().into(),
                });
            }
            if !remote.is_empty() {
                agents.insert(agent.clone(), AgentRoutes { local: Vec::new(), remote });
            }
        }
        for (agent, tunnels) in local {
            let e = agents.entry(agent.clone()).or_default();
            e.local = tunnels.iter().map(|(_, r)| r.clone()).collect();
        }
        RouteTable {
            version,
            agents,
            proxies: self.proxies.iter().map(|(k, (p, _))| (k.clone(), p.clone())).collect(),
            strategy: self.strategy.unwrap_or_default(),
            backend_up,
        }
    }
}
