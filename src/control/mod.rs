//! Control thread: a plain thread, off the shards, that owns the proxy's
//! route state and publishes immutable snapshots to every shard.
//!
//! Invariants: shards report tunnel changes as events and never wait for
//! the control thread; the control thread batches pending events into one
//! snapshot and posts it to each shard's mailbox; a shard's own tunnel table
//! stays exact regardless of snapshot lag.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{Receiver, Sender};

use crate::proxy::shard::ShardMsg;
use crate::route::{AgentRoutes, LocalRoute, RouteTable};
use crate::runtime::mailbox::Mailbox;

/// What shards tell the control thread.
#[derive(Debug)]
pub enum ControlEvent {
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
    /// Stop the thread.
    Stop,
}

/// The control thread's handle.
pub struct Control {
    /// Where shards send events.
    pub events: Sender<ControlEvent>,
    join: Option<JoinHandle<()>>,
}

impl Control {
    /// Starts the control thread for a proxy whose shards listen on `shards`.
    pub fn spawn(proxy_id: String, shards: Vec<Mailbox<ShardMsg>>) -> anyhow::Result<Control> {
        let (tx, rx) = crossbeam::channel::unbounded();
        let join =
            std::thread::Builder::new().name(format!("{proxy_id}-control")).spawn(move || control_loop(rx, shards))?;
        Ok(Control { events: tx, join: Some(join) })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        let _ = self.events.send(ControlEvent::Stop);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

type Tunnels = HashMap<String, Vec<(u64, LocalRoute)>>;

fn apply(t: &mut Tunnels, ev: ControlEvent) -> bool {
    match ev {
        ControlEvent::TunnelUp { agent, shard, conn, services } => {
            t.entry(agent).or_default().insert(0, (conn, LocalRoute { shard, services }));
        }
        ControlEvent::TunnelDown { agent, conn } => {
            if let Some(v) = t.get_mut(&agent) {
                v.retain(|(c, _)| *c != conn);
                if v.is_empty() {
                    t.remove(&agent);
                }
            }
        }
        ControlEvent::Stop => return false,
    }
    true
}

fn snapshot(t: &Tunnels, version: u64) -> RouteTable {
    let agents =
        t.iter().map(|(a, v)| (a.clone(), AgentRoutes { local: v.iter().map(|(_, r)| r.clone()).collect() })).collect();
    RouteTable::new(version, agents)
}

fn control_loop(rx: Receiver<ControlEvent>, shards: Vec<Mailbox<ShardMsg>>) {
    let mut tunnels = Tunnels::new();
    let mut version = 0u64;
    while let Ok(ev) = rx.recv() {
        if !apply(&mut tunnels, ev) {
            return;
        }
        // Batch whatever else is already queued into the same snapshot.
        while let Ok(ev) = rx.try_recv() {
            if !apply(&mut tunnels, ev) {
                return;
            }
        }
        version += 1;
        let table = Arc::new(snapshot(&tunnels, version));
        for m in &shards {
            let _ = m.post(ShardMsg::Routes(table.clone()));
        }
    }
}
