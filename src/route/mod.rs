//! Route table: which shard of this proxy holds a tunnel to which agent.
//!
//! Invariants: a [`RouteTable`] is immutable once built; the control thread
//! builds a new one per change and hands an `Arc` of it to every shard, so a
//! lookup on the hot path is one hash lookup with no lock.

use std::collections::HashMap;
use std::sync::Arc;

/// A tunnel to an agent on one shard of this proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalRoute {
    /// Shard holding the tunnel.
    pub shard: u32,
    /// Services the agent announced.
    pub services: Arc<[String]>,
}

/// Everything known about reaching one agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentRoutes {
    /// Tunnels held by this proxy, newest first.
    pub local: Vec<LocalRoute>,
}

/// An immutable snapshot of routes.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Increases with each snapshot.
    pub version: u64,
    agents: HashMap<String, AgentRoutes>,
}

impl RouteTable {
    /// A table.
    pub fn new(version: u64, agents: HashMap<String, AgentRoutes>) -> RouteTable {
        RouteTable { version, agents }
    }

    /// Routes to `agent`.
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

    /// Iterates agents and routes.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &AgentRoutes)> {
        self.agents.iter()
    }
}
