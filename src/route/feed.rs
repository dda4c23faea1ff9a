//! The narrow handle between the control thread and the shards.
//!
//! Shards report their tunnels as [`TunnelEvent`]s; the control thread
//! hands each new [`RouteTable`] to a [`Publish`] callback. Neither side
//! imports the other's types: the proxy wires the two together (the callback
//! posts the table into every shard's mailbox).
//!
//! Invariant: shards never wait on the control thread (events go through a
//! bounded channel with a per-shard backlog, tables through the latest-wins
//! slot of lock-free mailboxes).

use std::sync::Arc;

use super::RouteTable;

/// What shards tell the control thread.
#[derive(Debug)]
pub enum TunnelEvent {
    /// A tunnel to `agent` came up on `shard` (connection `conn`).
    TunnelUp {
        /// Agent id.
        agent: String,
        /// Shard.
        shard: u32,
        /// Connection id, unique within the proxy.
        conn: u64,
        /// Announced services.
        services: Arc<[String]>,
    },
    /// That tunnel went away.
    TunnelDown {
        /// Agent id.
        agent: String,
        /// Connection id.
        conn: u64,
    },
    /// The proxy is stopping: no more events (leave the cluster cleanly).
    Stop,
}

/// Hands a new snapshot to every shard.
pub type Publish = Box<dyn Fn(Arc<RouteTable>) + Send>;
