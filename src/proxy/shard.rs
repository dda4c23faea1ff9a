//! A proxy shard's state: its agent tunnels, its route snapshot, its peer
//! links and the mailboxes of its sibling shards.
//!
//! Invariants: everything here is owned by one executor thread (`Rc`,
//! `RefCell`, never borrowed across an await); other threads reach a shard
//! only through its mailbox ([`ShardMsg`]). The shard knows the control
//! thread only as a channel of [`TunnelEvent`]s, and receives route tables
//! as messages: it imports no control type.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crossbeam::channel::Sender;
use h2::client::SendRequest;
use tokio_rustls::TlsAcceptor;

use super::outbound::peer::{PeerLinkConfig, PeerLinks};
use super::stats::ShardStats;
use crate::relay::Item;
use crate::route::feed::TunnelEvent;
use crate::route::RouteTable;
use crate::runtime::budget::{BufMeter, Identities, ProxyLimits};
use crate::runtime::mailbox::{Inbox, Mailbox};
use crate::runtime::pipe::{PipeRx, PipeTx};
use crate::runtime::signal::{Inflight, Signal};
use crate::transport::h2conf::H2Tuning;
use crate::transport::keepalive::LinkHealth;

/// Work posted to a shard by another thread.
pub enum ShardMsg {
    /// A new route snapshot from the control thread.
    Routes(Arc<RouteTable>),
    /// A dial that entered on another shard for a tunnel held here.
    Dial(Box<CrossDial>),
}

/// A dial crossing shards: the entry shard keeps the client stream, this
/// shard opens the agent stream; bytes move through the two pipes.
pub struct CrossDial {
    /// The agent.
    pub agent: String,
    /// The encoded `DialRequest` to send it.
    pub first: Bytes,
    /// Client → agent: verbatim DATA payloads, then End or Fail.
    pub up: PipeRx<Item>,
    /// Agent → client: first the establishment bytes or a Fail, then
    /// verbatim DATA payloads, then End (the agent's trailers) or Fail.
    pub down: PipeTx<Item>,
}

/// A live tunnel to an agent on this shard.
#[derive(Clone)]
pub struct TunnelRef {
    /// Connection id (unique within the proxy).
    pub conn: u64,
    /// Handle to open streams on the tunnel (we are its HTTP/2 client).
    pub send: SendRequest<Bytes>,
    /// Services the agent announced.
    pub services: Arc<[String]>,
    /// The tunnel's keepalive verdict: a suspect tunnel is tried last.
    pub health: LinkHealth,
}

/// Static settings shared by every shard of a proxy.
pub struct ProxyShared {
    /// Proxy id.
    pub id: String,
    /// HTTP/2 tuning.
    pub h2: H2Tuning,
    /// Dial establishment deadline.
    pub dial_timeout: Duration,
    /// Peer connect deadline (capped by what is left of the dial's).
    pub peer_connect_timeout: Duration,
    /// How long a peer may take to answer a dial's headers.
    pub peer_answer_timeout: Duration,
    /// Budgets (`[limits]`).
    pub limits: ProxyLimits,
    /// TLS acceptor for the client edge (clients only).
    pub client_tls: TlsAcceptor,
    /// TLS acceptor for agent tunnels (agents only).
    pub tunnel_tls: TlsAcceptor,
    /// Tunnel address announced to agents.
    pub tunnel_addr: String,
    /// TLS acceptor for peer links (proxies only).
    pub peer_tls: TlsAcceptor,
    /// This proxy's TLS identity, for dialling peers (each dial checks the
    /// peer's name against the route's proxy id).
    pub tls: crate::transport::tls::TlsMaterial,
}

/// One shard.
pub struct Shard {
    /// Shard index.
    pub index: u32,
    /// Proxy-wide settings.
    pub shared: Arc<ProxyShared>,
    /// Counters of this shard.
    pub stats: Arc<ShardStats>,
    /// Every shard's mailbox, by index.
    pub mailboxes: Vec<Mailbox<ShardMsg>>,
    /// Tunnel events for the control thread.
    pub events: Sender<TunnelEvent>,
    /// Fired when the proxy stops: stop accepting, send GOAWAY, drain.
    pub stopping: Signal,
    /// Fired after draining: every connection task of this shard ends now.
    /// (glommio does not drop detached tasks when an executor exits, so
    /// their sockets would otherwise stay open.)
    pub closing: Signal,
    /// Relayed streams open on this shard (the drain waits for zero).
    pub streams: Inflight,
    /// Connection tasks alive on this shard (closing waits for zero).
    pub conns: Inflight,
    /// Bytes the relay holds on this shard (budget `shard_buffer_bytes`).
    pub buf: BufMeter,
    /// Connections and streams per caller identity on this shard.
    pub identities: Identities,
    tunnels: RefCell<HashMap<String, Vec<TunnelRef>>>,
    routes: RefCell<Arc<RouteTable>>,
    /// Peer links of this shard.
    pub peers: PeerLinks,
    /// Tasks waiting for the next route snapshot.
    route_waiters: RefCell<Vec<std::task::Waker>>,
    next_conn: Cell<u64>,
}

impl Shard {
    /// A shard with no tunnels and an empty route table.
    pub fn new(
        index: u32,
        shared: Arc<ProxyShared>,
        stats: Arc<ShardStats>,
        mailboxes: Vec<Mailbox<ShardMsg>>,
        events: Sender<TunnelEvent>,
    ) -> Shard {
        let closing = Signal::new();
        let cfg = PeerLinkConfig { connect_timeout: shared.peer_connect_timeout, ..PeerLinkConfig::default() };
        let peers = PeerLinks::new(shared.tls.clone(), shared.h2.clone(), cfg, closing.clone());
        let buf = BufMeter::new(shared.limits.shard_buffer_bytes);
        let gauge = stats.clone();
        peers.on_count(move |n| gauge.peer_links.set(n as i64));
        Shard {
            index,
            peers,
            shared,
            stats,
            mailboxes,
            events,
            stopping: Signal::new(),
            closing,
            streams: Inflight::default(),
            conns: Inflight::default(),
            buf,
            identities: Identities::default(),
            tunnels: RefCell::default(),
            routes: RefCell::default(),
            route_waiters: RefCell::default(),
            next_conn: Cell::new(0),
        }
    }

    /// A connection id unique within the proxy (shard index in the top bits).
    pub fn next_conn_id(&self) -> u64 {
        let n = self.next_conn.get() + 1;
        self.next_conn.set(n);
        (u64::from(self.index) << 48) | n
    }

    /// Registers a tunnel and tells the control thread.
    pub fn add_tunnel(&self, agent: &str, t: TunnelRef) {
        let ev = TunnelEvent::TunnelUp {
            agent: agent.to_string(),
            shard: self.index,
            conn: t.conn,
            services: t.services.clone(),
        };
        self.tunnels.borrow_mut().entry(agent.to_string()).or_default().insert(0, t);
        self.stats.tunnels.add(1);
        let _ = self.events.send(ev);
    }

    /// Removes a tunnel and tells the control thread.
    pub fn remove_tunnel(&self, agent: &str, conn: u64) {
        let mut map = self.tunnels.borrow_mut();
        if let Some(v) = map.get_mut(agent) {
            let before = v.len();
            v.retain(|t| t.conn != conn);
            if v.len() < before {
                self.stats.tunnels.add(-1);
            }
            if v.is_empty() {
                map.remove(agent);
            }
        }
        drop(map);
        let _ = self.events.send(TunnelEvent::TunnelDown { agent: agent.to_string(), conn });
    }

    /// The newest tunnel to `agent` on this shard that answers its
    /// keepalive, else the newest one (suspect: the plan tries it last).
    pub fn local_tunnel(&self, agent: &str) -> Option<TunnelRef> {
        let map = self.tunnels.borrow();
        let v = map.get(agent)?;
        v.iter().find(|t| !t.health.is_suspect()).or(v.first()).cloned()
    }

    /// The current route snapshot.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.routes.borrow().clone()
    }

    /// The first snapshot newer than `version`.
    pub async fn next_routes(&self, version: u64) -> Arc<RouteTable> {
        std::future::poll_fn(|cx| {
            let cur = self.routes.borrow().clone();
            if cur.version > version {
                return std::task::Poll::Ready(cur);
            }
            let mut ws = self.route_waiters.borrow_mut();
            if !ws.iter().any(|w| w.will_wake(cx.waker())) {
                ws.push(cx.waker().clone());
            }
            std::task::Poll::Pending
        })
        .await
    }

    /// Handles this shard's mailbox until the shard stops.
    pub async fn run_inbox(self: Rc<Self>, mut inbox: Inbox<ShardMsg>) {
        loop {
            match inbox.recv().await {
                ShardMsg::Routes(t) => {
                    let mut cur = self.routes.borrow_mut();
                    if t.version > cur.version {
                        self.peers.retain_proxies(|p| t.proxies.contains_key(p));
                        self.stats.route_version.set(t.version as i64);
                        *cur = t;
                        drop(cur);
                        for w in self.route_waiters.borrow_mut().drain(..) {
                            w.wake();
                        }
                    }
                }
                ShardMsg::Dial(d) => {
                    glommio::spawn_local(super::outbound::sibling::serve(self.clone(), *d)).detach();
                }
            }
        }
    }
}
