//! Peer links: persistent HTTP/2 connections from each shard to the shards
//! of other proxies, carrying `proto.ProxyService/DialNode` streams
//! (wire-compatible with Teleport's proxy peering API).
//!
//! Invariants:
//! - A link is mTLS with role `proxy` on both sides, and the dialled peer's
//!   name must equal the proxy id of the route being used.
//! - Routes name the owning shard's peer address, so a peer stream lands on
//!   the shard that holds the tunnel.
//! - A dial tries the agent's proxies (live links first) and moves on when
//!   one answers UNAVAILABLE or NOT_FOUND before ConnectionEstablished,
//!   within the dial's deadline. The serving side never forwards to another
//!   peer, so a dial crosses at most one peer link.
//! - A link is dropped from the pool when its connection ends, and when its
//!   proxy leaves the registry (it then drains: open streams finish); the
//!   next dial reconnects, no more often than a capped, jittered backoff
//!   allows after a failure, so dials skip a dead peer instead of waiting.
//! - Streams are counted per link against the peer's
//!   `max_concurrent_streams`; a full link gets a sibling connection.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::server::SendResponse;
use h2::RecvStream;

use crate::ingress::{fail, relay_opened};
use crate::proxy::shard::Shard;
use crate::relay::handshake::{open_dial_hops, respond_ok, REFUSED};
use crate::route::RemoteRoute;
use crate::runtime::timeout;
use crate::transport::connect_tls;
use crate::transport::h2conf::drive_client;
use crate::transport::identity::Role;
use crate::wire::codec::encode_msg;
use crate::wire::paths;
use crate::wire::pb::ProxyServicePingResponse;
use crate::wire::status::{Code, Status};
use crate::wire::DialTarget;

#[derive(Clone)]
struct Link {
    send: SendRequest<Bytes>,
    proxy: Rc<str>,
    alive: Rc<Cell<bool>>,
    /// Streams this shard has open on the link.
    active: Rc<Cell<usize>>,
}

impl Link {
    fn saturated(&self) -> bool {
        self.active.get() >= self.send.current_max_send_streams()
    }
}

/// Counts a stream open on a link until dropped.
pub struct LinkStream(Rc<Cell<usize>>);

impl Drop for LinkStream {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// A peer address that failed to connect, and when to try it again.
struct Backoffs {
    next_try: Instant,
    backoff: crate::tunnel::backoff::Backoff,
}

/// One shard's peer links, by peer address (several per address when one
/// connection's stream limit is reached).
#[derive(Default)]
pub struct PeerPool {
    links: RefCell<HashMap<String, Vec<Link>>>,
    failing: RefCell<HashMap<String, Backoffs>>,
}

impl PeerPool {
    /// Whether a live link to `addr` exists.
    pub fn has(&self, addr: &str) -> bool {
        self.links.borrow().get(addr).is_some_and(|v| v.iter().any(|l| l.alive.get()))
    }

    /// Streams this shard has open towards `addr`.
    pub fn load(&self, addr: &str) -> usize {
        self.links.borrow().get(addr).map(|v| v.iter().map(|l| l.active.get()).sum()).unwrap_or(0)
    }

    /// Drops links to proxies that left the registry. Dropping our handle
    /// lets the connection finish the streams it carries, then close.
    pub fn retain_proxies(&self, live: &std::collections::HashMap<String, crate::route::model::ProxyInfo>) {
        self.links.borrow_mut().retain(|addr, v| {
            v.retain(|l| live.contains_key(&*l.proxy));
            if v.is_empty() {
                tracing::debug!(addr, "peer left the registry; its links drain");
            }
            !v.is_empty()
        });
    }

    fn pick(&self, addr: &str, proxy: &str) -> Option<(SendRequest<Bytes>, LinkStream)> {
        let links = self.links.borrow();
        let l = links.get(addr)?.iter().find(|l| l.alive.get() && &*l.proxy == proxy && !l.saturated())?;
        l.active.set(l.active.get() + 1);
        Some((l.send.clone(), LinkStream(l.active.clone())))
    }

    /// A stream handle on a link to `proxy` at `addr`: an existing link with
    /// room, or a new connection (never more often than the address's
    /// backoff allows after a failure).
    async fn get(
        &self,
        shard: &Rc<Shard>,
        addr: &str,
        proxy: &str,
        deadline: Duration,
    ) -> Result<(SendRequest<Bytes>, LinkStream), Status> {
        if let Some(l) = self.pick(addr, proxy) {
            return Ok(l);
        }
        let unavailable = |e: String| Status::new(Code::Unavailable, format!("peer {proxy} at {addr}: {e}"));
        if let Some(b) = self.failing.borrow().get(addr) {
            if Instant::now() < b.next_try {
                return Err(unavailable("unreachable; backing off".into()));
            }
        }
        let r = self.connect(shard, addr, proxy, deadline).await;
        let mut failing = self.failing.borrow_mut();
        match &r {
            Ok(_) => {
                failing.remove(addr);
            }
            Err(_) => {
                let b = failing.entry(addr.to_string()).or_insert_with(|| Backoffs {
                    next_try: Instant::now(),
                    backoff: crate::tunnel::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
                });
                b.next_try = Instant::now() + b.backoff.next_delay();
            }
        }
        drop(failing);
        r?;
        self.pick(addr, proxy).ok_or_else(|| unavailable("link closed at once".into()))
    }

    async fn connect(&self, shard: &Rc<Shard>, addr: &str, proxy: &str, deadline: Duration) -> Result<(), Status> {
        let unavailable = |e: String| Status::new(Code::Unavailable, format!("peer {proxy} at {addr}: {e}"));
        let cfg = shard.shared.tls.client_config(Role::Proxy, Some(proxy)).map_err(|e| unavailable(e.to_string()))?;
        let h2 = shard.shared.h2.clone();
        let connect = async {
            let (tls, _) = connect_tls(&cfg, addr, deadline).await.map_err(|e| unavailable(e.to_string()))?;
            h2.client().handshake::<_, Bytes>(tls).await.map_err(|e| unavailable(e.to_string()))
        };
        let (send, conn) = timeout(deadline, connect).await.map_err(|_| unavailable("connect timed out".into()))??;
        let alive = Rc::new(Cell::new(true));
        let link = Link { send, proxy: Rc::from(proxy), alive: alive.clone(), active: Rc::default() };
        let n = {
            let mut links = self.links.borrow_mut();
            let v = links.entry(addr.to_string()).or_default();
            v.push(link);
            v.len()
        };
        let (shard2, addr2, proxy2) = (shard.clone(), addr.to_string(), proxy.to_string());
        shard.stats.peer_links.add(1);
        glommio::spawn_local(async move {
            let why = futures_lite::future::or(drive_client(conn, &h2), async {
                shard2.closing.wait().await;
                "proxy_stopping"
            })
            .await;
            alive.set(false);
            shard2.stats.peer_links.add(-1);
            let mut links = shard2.peers.links.borrow_mut();
            if let Some(v) = links.get_mut(&addr2) {
                v.retain(|l| l.alive.get());
                if v.is_empty() {
                    links.remove(&addr2);
                }
            }
            tracing::info!(peer = proxy2, addr = addr2, why, "peer link closed");
        })
        .detach();
        tracing::info!(peer = proxy, addr, shard = shard.index, links = n, "peer link up");
        Ok(())
    }
}

/// Dials `target` through the proxies that hold it and relays the call.
pub async fn dial(
    shard: &Rc<Shard>,
    mut routes: Vec<RemoteRoute>,
    target: DialTarget,
    rx: RecvStream,
    rest: Bytes,
    respond: SendResponse<Bytes>,
) {
    shard.stats.dials_peered.inc();
    // Live links first, then the least loaded.
    routes.sort_by_key(|r| {
        let addr = r.peer_addr.as_deref().unwrap_or_default();
        (!shard.peers.has(addr), shard.peers.load(addr))
    });
    let end = Instant::now() + shard.shared.dial_timeout;
    let mut last = Status::new(Code::Unavailable, format!("no peer address for agent {:?}", target.agent));
    let mut routes = routes.into_iter().peekable();
    let mut refused = 0;
    while let Some(r) = routes.peek() {
        let Some(addr) = r.peer_addr.as_deref() else {
            routes.next();
            continue;
        };
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let (mut send, _stream) = match shard.peers.get(shard, addr, &r.proxy, left).await {
            Ok(s) => s,
            Err(s) => {
                last = s;
                routes.next();
                continue;
            }
        };
        let first = encode_msg(&target.to_frame());
        let left = end.saturating_duration_since(Instant::now());
        match open_dial_hops(&mut send, &r.proxy, paths::PEER_DIAL, first, left, 1).await {
            Ok(opened) => return relay_opened(shard, opened, rx, rest, respond).await,
            // Refused unprocessed (a new link that had not yet learned the
            // peer's stream limit): retry, on a link with room.
            Err(s) if s.message == REFUSED && refused < 8 => {
                refused += 1;
                last = s;
            }
            Err(s) if matches!(s.code, Code::Unavailable | Code::NotFound) => {
                tracing::debug!(agent = target.agent, peer = &*r.proxy, status = %s, "peer refused the dial; trying the next");
                last = s;
                routes.next();
            }
            Err(s) => return fail(shard, respond, &s),
        }
    }
    fail(shard, respond, &last)
}

/// Answers `proto.ProxyService/Ping`.
pub fn answer_ping(mut respond: SendResponse<Bytes>) {
    if let Ok(mut tx) = respond_ok(&mut respond) {
        let _ = tx.send_data(encode_msg(&ProxyServicePingResponse {}), false);
        let _ = tx.send_trailers(Status::ok().to_trailers());
    }
}
