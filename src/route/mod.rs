//! Routes: which proxy, and which shard on it, holds a tunnel to which
//! agent.
//!
//! Invariants: a [`RouteTable`] is immutable once built; the control thread
//! derives a new one per batch of changes and hands an `Arc` of it to every
//! shard, so a lookup on the hot path is one hash lookup with no lock. The
//! agent map ([`agents::AgentMap`]) is copy-on-write in 4096 small tables,
//! so a new snapshot costs the tables of the changed agents, not the table
//! size. Local
//! routes come from this proxy's own tunnels and are always exact; remote
//! routes come from the backend and only name proxies that are alive.

pub mod agents;
pub mod feed;
pub mod grants;
pub mod model;
pub mod redis;
pub mod redis_conn;
pub mod redis_ha;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;

use agents::AgentMap;
use model::{ProxyInfo, Strategy};

/// A tunnel to an agent on one shard of this proxy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LocalRoute {
    /// Shard holding the tunnel.
    pub shard: u32,
    /// Services the agent announced.
    pub services: Arc<[String]>,
}

/// A tunnel to an agent held by another proxy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RemoteRoute {
    /// Proxy id.
    pub proxy: Arc<str>,
    /// Shard on that proxy.
    pub shard: u32,
    /// Peer address of that shard, when the proxy published one.
    pub peer_addr: Option<Arc<str>>,
    /// Services the agent announced.
    pub services: Arc<[String]>,
    /// That proxy is draining: tried after the others.
    pub draining: bool,
}

/// Everything known about reaching one agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AgentRoutes {
    /// Tunnels held by this proxy, newest first.
    pub local: Vec<LocalRoute>,
    /// Tunnels held by other live proxies.
    pub remote: Vec<RemoteRoute>,
    /// No tunnel is known right now, but one is expected shortly: the
    /// backend lists this proxy as a holder (a predecessor's tunnel moving
    /// to this process), or the agent's last route went away moments ago
    /// (it is moving between proxies). A dial waits for it within its
    /// deadline instead of answering NOT_FOUND.
    pub moving: bool,
}

/// An immutable snapshot of routes.
#[derive(Debug, Default, serde::Serialize)]
pub struct RouteTable {
    /// Increases with each snapshot.
    pub version: u64,
    /// Routes by agent.
    pub agents: AgentMap,
    /// Live proxies, by id.
    pub proxies: HashMap<String, ProxyInfo>,
    /// The cluster's tunnel strategy.
    pub strategy: Strategy,
    /// The grants (shared between snapshots until one changes).
    pub grants: Arc<grants::GrantTable>,
    /// Bumped by each grant removal that asks to end the open streams it
    /// allowed (`grants revoke --kill-streams`): shards re-check their open
    /// streams when it moves.
    pub grant_kills: u64,
    /// Whether the backend was reachable when this snapshot was built.
    pub backend_up: bool,
    /// Whether the routes were ever loaded from the backend (a process
    /// that just started knows nothing yet: its dials wait for the load).
    pub loaded: bool,
}

impl RouteTable {
    /// Routes to `agent`.
    #[inline]
    pub fn get(&self, agent: &str) -> Option<&AgentRoutes> {
        self.agents.get(agent)
    }

    /// Number of agents.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }
}
