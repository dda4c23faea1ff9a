//! A proxy shard's state: its agent tunnels, its route snapshot, its peer
//! links and the mailboxes of its sibling shards.
//!
//! Invariants: everything here is owned by one executor thread (`Rc`,
//! `RefCell`, never borrowed across an await); other threads reach a shard
//! only through its mailbox ([`ShardMsg`], route tables in its latest-wins
//! slot). The shard knows the control thread only as a bounded channel of
//! [`TunnelEvent`]s: it imports no control type.
//! - A tunnel is announced to the sibling shards *before* it is usable on
//!   its own shard, directly through their mailboxes, so no dial can learn
//!   of a tunnel (even by using it) before every sibling has the notice
//!   queued. Learning it only from route tables left a window (the control
//!   thread's wake-up, its backend write, the table's delivery) in which a
//!   dial entering a sibling shard got NOT_FOUND while the tunnel was up.
//! - Tunnel events never wait and are never lost: when the control channel
//!   is full they queue in this shard's backlog (bounded by its tunnels'
//!   changes) and a flusher retries them in order.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam::channel::{Sender, TrySendError};
use h2::client::SendRequest;
use tokio_rustls::TlsAcceptor;

use crate::transport::identity::Role;
use crate::transport::reload::Live;
use crate::transport::tls::{TlsError, TlsMaterial};

use super::drain::Phase;
use super::outbound::peer::{PeerLinkConfig, PeerLinks};
use super::stats::ShardStats;
use crate::relay::Item;
use crate::route::feed::TunnelEvent;
use crate::route::RouteTable;
use crate::runtime::budget::{BufMeter, Identities};
use crate::runtime::mailbox::{Inbox, Mailbox, Next};
use crate::runtime::pipe::{PipeRx, PipeTx};
use crate::runtime::signal::{Inflight, Signal};
use crate::transport::h2conf::{ActiveStreams, H2Tuning};
use crate::transport::keepalive::LinkHealth;

/// Cross-shard dials queued in one shard's mailbox before more are
/// refused with RESOURCE_EXHAUSTED (a shard this far behind would not set
/// them up within their deadline anyway).
pub const MAILBOX_DIALS: usize = 4096;

/// How often a shard retries tunnel events the full control channel refused.
const BACKLOG_RETRY: Duration = Duration::from_millis(5);

/// A shard's mailbox: queued [`ShardMsg`]s and the latest route table.
pub type ShardMailbox = Mailbox<ShardMsg, RouteTable>;

/// Work posted to a shard by another thread.
pub enum ShardMsg {
    /// A dial that entered on another shard for a tunnel held here
    /// (bounded: [`MAILBOX_DIALS`]).
    Dial(Box<CrossDial>),
    /// A sibling shard's tunnel came up or went down (exempt from the
    /// bound: one per tunnel change, and losing one would misroute).
    Tunnel {
        /// Agent id.
        agent: String,
        /// The shard holding it.
        shard: u32,
        /// Its connection id.
        conn: u64,
        /// Up (true) or down.
        up: bool,
    },
}

/// A dial crossing shards: the entry shard keeps the client stream, this
/// shard opens the agent stream; bytes move through the two pipes.
pub struct CrossDial {
    /// The agent.
    pub agent: String,
    /// The encoded `DialRequest` and the client identity to send it.
    pub dial: crate::relay::call::Outgoing,
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
    /// The tunnel's keepalive verdict: a suspect tunnel is tried last.
    pub health: LinkHealth,
    /// Dial streams open on the tunnel (its connection window grows with
    /// them, `transport::window`): each dial holds a guard while it lives.
    pub streams: ActiveStreams,
}

/// Static settings shared by every shard of a proxy.
pub struct ProxyShared {
    /// Proxy id.
    pub id: String,
    /// HTTP/2 tuning.
    pub h2: H2Tuning,
    /// The settings a reload changes (`[limits]`, `dial_timeout_ms`); read
    /// through [`Shard::tunables`].
    pub live: super::tunables::LiveTunables,
    /// Peer connect deadline (capped by what is left of the dial's).
    pub peer_connect_timeout: Duration,
    /// How long a peer may take to answer a dial's headers.
    pub peer_answer_timeout: Duration,
    /// Authorization policy (`authorization`): grants, or allow-all.
    pub authorization: crate::route::grants::Authorization,
    /// The cluster (SPIFFE trust domain) of this proxy.
    pub cluster: String,
    /// The audit queue (`[audit]`); `None` when the audit is off.
    pub audit: Option<super::audit::Audit>,
    /// Tunnel address announced to agents.
    pub tunnel_addr: String,
    /// This proxy's TLS material and acceptors, replaced by a reload; each
    /// accepted connection reads it once. Peer dials build their client
    /// configs from its material (each checks the peer's name against the
    /// route's proxy id).
    pub tls: Live<Acceptors>,
}

/// The TLS acceptors of a proxy's three listeners, built from one material.
pub struct Acceptors {
    /// Client edge (clients only).
    pub client: TlsAcceptor,
    /// Agent tunnels (agents only).
    pub tunnel: TlsAcceptor,
    /// Peer links (proxies only).
    pub peer: TlsAcceptor,
}

impl Acceptors {
    /// Builds the acceptors from `m`.
    pub fn build(m: &TlsMaterial) -> Result<Acceptors, TlsError> {
        Ok(Acceptors {
            client: TlsAcceptor::from(m.server_config(&[Role::Client])?),
            tunnel: TlsAcceptor::from(m.server_config(&[Role::Agent])?),
            peer: TlsAcceptor::from(m.server_config(&[Role::Proxy])?),
        })
    }
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
    pub mailboxes: Vec<ShardMailbox>,
    /// Tunnel events for the control thread.
    pub events: Sender<TunnelEvent>,
    /// Fired when the proxy stops: stop accepting, send GOAWAY, drain.
    pub stopping: Signal,
    /// Fired when peer links must drain: with `stopping`, except while
    /// leaving the fleet (peers reach this proxy's agents until they moved).
    pub peer_stopping: Signal,
    /// Why the shard stops: `None` for a plain stop, else the drain phase.
    pub drain_mode: Cell<Option<Phase>>,
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
    /// Open dials, for `grants revoke --kill-streams` sweeps.
    pub open_dials: super::inbound::authz::OpenDials,
    tunnels: RefCell<HashMap<String, Vec<TunnelRef>>>,
    /// Tunnels on sibling shards: agent → (shard, conn), newest first.
    siblings: RefCell<HashMap<String, Vec<(u32, u64)>>>,
    /// Tunnel events the control channel had no room for, oldest first.
    backlog: Rc<RefCell<VecDeque<TunnelEvent>>>,
    routes: RefCell<Arc<RouteTable>>,
    /// Peer links of this shard.
    pub peers: PeerLinks,
    /// Tasks waiting for the next route snapshot or tunnel.
    route_waiters: RefCell<Vec<std::task::Waker>>,
    /// Bumped whenever a tunnel comes up here or on a sibling shard.
    tunnel_gen: Cell<u64>,
    next_conn: Cell<u64>,
    /// Generation of the live settings last applied to `buf`.
    tunables_seen: Cell<u64>,
}

impl Shard {
    /// A shard with no tunnels and an empty route table.
    pub fn new(
        index: u32,
        shared: Arc<ProxyShared>,
        stats: Arc<ShardStats>,
        mailboxes: Vec<ShardMailbox>,
        events: Sender<TunnelEvent>,
    ) -> Shard {
        let closing = Signal::new();
        let cfg = PeerLinkConfig { connect_timeout: shared.peer_connect_timeout, ..PeerLinkConfig::default() };
        let peers = PeerLinks::new(shared.tls.clone(), shared.h2.clone(), cfg, closing.clone());
        let tunables = shared.live.load();
        let buf = BufMeter::with_gauge(tunables.limits.shard_buffer_bytes, stats.buffered.clone());
        let tunables_seen = Cell::new(tunables.generation);
        drop(tunables);
        let gauge = stats.clone();
        peers.pool(&buf);
        peers.on_count(move |n| gauge.peer_links.set(n as i64));
        Shard {
            index,
            peers,
            shared,
            stats,
            mailboxes,
            events,
            stopping: Signal::new(),
            peer_stopping: Signal::new(),
            drain_mode: Cell::new(None),
            closing,
            streams: Inflight::default(),
            conns: Inflight::default(),
            buf,
            identities: Identities::default(),
            open_dials: Default::default(),
            tunnels: RefCell::default(),
            siblings: RefCell::default(),
            backlog: Rc::default(),
            routes: RefCell::default(),
            route_waiters: RefCell::default(),
            tunnel_gen: Cell::new(0),
            next_conn: Cell::new(0),
            tunables_seen,
        }
    }

    /// The live settings (one atomic load); the first call after a reload
    /// also applies the new `shard_buffer_bytes` to this shard's meter.
    pub fn tunables(&self) -> arc_swap::Guard<Arc<super::tunables::Tunables>> {
        let t = self.shared.live.load();
        if t.generation != self.tunables_seen.get() {
            self.tunables_seen.set(t.generation);
            self.buf.set_budget(t.limits.shard_buffer_bytes);
        }
        t
    }

    /// Applies a reloaded tunables generation (the shard buffer budget)
    /// now, before a check that reads it.
    pub fn refresh_tunables(&self) {
        let _ = self.tunables();
    }

    /// The dial deadline in force (`dial_timeout_ms`).
    pub fn dial_timeout(&self) -> Duration {
        self.tunables().dial_timeout
    }

    /// A connection id unique within the proxy (shard index in the top bits).
    pub fn next_conn_id(&self) -> u64 {
        let n = self.next_conn.get() + 1;
        self.next_conn.set(n);
        (u64::from(self.index) << 48) | n
    }

    /// Registers a tunnel: tells the sibling shards first (see the module
    /// invariants), then makes it usable here, then tells the control thread.
    pub fn add_tunnel(&self, agent: &str, t: TunnelRef, services: Arc<[String]>) {
        self.tell_siblings(agent, t.conn, true);
        let ev = TunnelEvent::TunnelUp { agent: agent.to_string(), shard: self.index, conn: t.conn, services };
        self.tunnels.borrow_mut().entry(agent.to_string()).or_default().insert(0, t);
        self.stats.tunnels.add(1);
        self.report(ev);
        self.tunnel_arrived();
    }

    /// The agent on tunnel `conn` announced a new service list (it
    /// reloaded): the control thread's `TunnelUp` for a known tunnel
    /// replaces its services, and so its route's. Not for a tunnel already
    /// removed here, which the event would bring back.
    pub fn set_tunnel_services(&self, agent: &str, conn: u64, services: Arc<[String]>) {
        if self.tunnels.borrow().get(agent).is_some_and(|v| v.iter().any(|t| t.conn == conn)) {
            self.report(TunnelEvent::TunnelUp { agent: agent.to_string(), shard: self.index, conn, services });
        }
    }

    fn tunnel_arrived(&self) {
        self.tunnel_gen.set(self.tunnel_gen.get() + 1);
        for w in self.route_waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Tunnels registered on this shard.
    pub fn tunnel_count(&self) -> usize {
        self.tunnels.borrow().values().map(Vec::len).sum()
    }

    /// What a waiting dial compares against: (route version, tunnel
    /// generation).
    pub fn marks(&self) -> (u64, u64) {
        (self.routes.borrow().version, self.tunnel_gen.get())
    }

    /// Resolves when a newer route snapshot arrived, or a tunnel came up
    /// here or on a sibling, since `marks`.
    pub async fn changed_since(&self, marks: (u64, u64)) {
        std::future::poll_fn(|cx| {
            if self.marks() != marks {
                return std::task::Poll::Ready(());
            }
            let mut ws = self.route_waiters.borrow_mut();
            if !ws.iter().any(|w| w.will_wake(cx.waker())) {
                ws.push(cx.waker().clone());
            }
            std::task::Poll::Pending
        })
        .await
    }

    /// A draining shard's wait: until no stream is open and its agents'
    /// tunnels have moved away (or `move_wait` passed since it began).
    pub async fn settle(&self, move_wait: Duration) {
        let began = Instant::now();
        loop {
            self.streams.idle().await;
            glommio::timer::sleep(Duration::from_millis(50)).await;
            let moved = self.tunnel_count() == 0 || began.elapsed() >= move_wait;
            if moved && self.streams.get() == 0 {
                return;
            }
        }
    }

    /// Removes a tunnel and tells the sibling shards and the control thread.
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
        self.tell_siblings(agent, conn, false);
        self.report(TunnelEvent::TunnelDown { agent: agent.to_string(), conn });
    }

    fn tell_siblings(&self, agent: &str, conn: u64, up: bool) {
        for (k, b) in self.mailboxes.iter().enumerate() {
            if k as u32 != self.index {
                let msg = ShardMsg::Tunnel { agent: agent.to_string(), shard: self.index, conn, up };
                let _ = b.post_always(msg);
            }
        }
    }

    /// Sends a tunnel event to the control thread without waiting: when the
    /// channel is full, the event joins the backlog, which a flusher task
    /// drains in order.
    fn report(&self, ev: TunnelEvent) {
        let mut backlog = self.backlog.borrow_mut();
        if !backlog.is_empty() {
            backlog.push_back(ev);
            return;
        }
        match self.events.try_send(ev) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => return,
            Err(TrySendError::Full(ev)) => backlog.push_back(ev),
        }
        drop(backlog);
        let (backlog, tx) = (self.backlog.clone(), self.events.clone());
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(BACKLOG_RETRY).await;
                let mut b = backlog.borrow_mut();
                while let Some(ev) = b.pop_front() {
                    match tx.try_send(ev) {
                        Ok(()) => {}
                        Err(TrySendError::Disconnected(_)) => {
                            b.clear();
                            return;
                        }
                        Err(TrySendError::Full(ev)) => {
                            b.push_front(ev);
                            break;
                        }
                    }
                }
                if b.is_empty() {
                    return;
                }
            }
        })
        .detach();
    }

    /// The sibling shards holding a tunnel to `agent`, newest first, as
    /// their own notices said (fresher than any route table).
    pub fn sibling_tunnels(&self, agent: &str) -> Vec<u32> {
        self.siblings.borrow().get(agent).map(|v| v.iter().map(|(s, _)| *s).collect()).unwrap_or_default()
    }

    /// Lets this shard's inbox catch up (bounded): a dial about to fail for
    /// want of a route first sees every notice already queued for it.
    pub async fn catch_up(&self) {
        let Some(me) = self.mailboxes.get(self.index as usize) else { return };
        for _ in 0..64 {
            if !me.has_pending() {
                return;
            }
            futures_lite::future::yield_now().await;
        }
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
    pub async fn run_inbox(self: Rc<Self>, mut inbox: Inbox<ShardMsg, RouteTable>) {
        loop {
            match inbox.recv().await {
                Next::Latest(t) => {
                    let mut cur = self.routes.borrow_mut();
                    if t.version > cur.version {
                        self.peers.retain_proxies(|p| t.proxies.contains_key(p));
                        self.stats.route_version.set(t.version as i64);
                        let (grants, kills) = (t.grants.clone(), t.grant_kills);
                        *cur = t;
                        drop(cur);
                        for w in self.route_waiters.borrow_mut().drain(..) {
                            w.wake();
                        }
                        let ended = self.open_dials.sweep(&grants, kills);
                        if ended > 0 {
                            tracing::info!(
                                shard = self.index,
                                ended,
                                "grant revoked: ended the open streams it allowed"
                            );
                        }
                    }
                }
                Next::Msg(ShardMsg::Dial(d)) => {
                    glommio::spawn_local(super::outbound::sibling::serve(self.clone(), *d)).detach();
                }
                Next::Msg(ShardMsg::Tunnel { agent, shard, conn, up }) => {
                    let mut map = self.siblings.borrow_mut();
                    if up {
                        map.entry(agent).or_default().insert(0, (shard, conn));
                        drop(map);
                        self.tunnel_arrived();
                    } else if let Some(v) = map.get_mut(&agent) {
                        v.retain(|&(s, c)| (s, c) != (shard, conn));
                        if v.is_empty() {
                            map.remove(&agent);
                        }
                    }
                }
            }
        }
    }
}
