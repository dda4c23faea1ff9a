//! Peer links: persistent HTTP/2 connections from each shard to other
//! proxies, carrying `proto.ProxyService/DialNode` streams
//! (wire-compatible with Teleport's proxy peering API).
//!
//! Invariants:
//! - A link is mTLS with role `proxy` on both sides, and the dialled peer's
//!   name must equal the proxy id of the route being used.
//! - Streams are counted per link against the peer's
//!   `max_concurrent_streams`; a full link gets a sibling connection.
//! - A failed address backs off (capped, jittered): dials skip it at once.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;

use crate::proxy::shard::ProxyShared;
use crate::proxy::stats::ShardStats;
use crate::runtime::backoff::Backoff;
use crate::runtime::signal::Signal;
use crate::runtime::timeout;
use crate::transport::connect_tls;
use crate::transport::h2conf::{drive_client, H2Tuning};
use crate::transport::identity::Role;
use crate::transport::tls::TlsMaterial;
use crate::wire::error::{Error, Label, Retry, Side};

#[derive(Clone)]
struct Link {
    send: SendRequest<Bytes>,
    proxy: Rc<str>,
    alive: Rc<Cell<bool>>,
    active: Rc<Cell<usize>>,
}

impl Link {
    fn saturated(&self) -> bool {
        self.active.get() >= self.send.current_max_send_streams()
    }
}

/// A stream slot on a peer link: holds the link's count until dropped.
pub struct PeerStream {
    /// Handle to open the stream with.
    pub send: SendRequest<Bytes>,
    active: Rc<Cell<usize>>,
}

impl Drop for PeerStream {
    fn drop(&mut self) {
        self.active.set(self.active.get() - 1);
    }
}

struct Failing {
    next_try: Instant,
    backoff: Backoff,
}

/// One shard's peer links, by peer address.
pub struct PeerPool {
    tls: TlsMaterial,
    h2: H2Tuning,
    connect_timeout: Duration,
    stats: Arc<ShardStats>,
    closing: Signal,
    links: Rc<RefCell<HashMap<String, Vec<Link>>>>,
    failing: RefCell<HashMap<String, Failing>>,
}

fn unreachable(proxy: &str, addr: &str, label: Label, e: impl std::fmt::Display) -> Error {
    Error::unavailable(Side::Peer, Retry::Safe, label, format!("peer {proxy} at {addr}: {e}"))
}

impl PeerPool {
    /// An empty pool.
    pub fn new(shared: &ProxyShared, stats: Arc<ShardStats>, closing: Signal) -> PeerPool {
        PeerPool {
            tls: shared.tls.clone(),
            h2: shared.h2.clone(),
            connect_timeout: shared.peer_connect_timeout,
            stats,
            closing,
            links: Rc::default(),
            failing: RefCell::default(),
        }
    }

    /// Whether a live link to `addr` exists, and the streams it carries.
    pub fn link_state(&self, addr: &str) -> (bool, usize) {
        let links = self.links.borrow();
        let Some(v) = links.get(addr) else { return (false, 0) };
        (v.iter().any(|l| l.alive.get()), v.iter().map(|l| l.active.get()).sum())
    }

    /// Drops links to proxies that left the registry; they drain.
    pub fn retain_proxies(&self, live: impl Fn(&str) -> bool) {
        self.links.borrow_mut().retain(|_, v| {
            v.retain(|l| live(&l.proxy));
            !v.is_empty()
        });
    }

    fn pick(&self, addr: &str, proxy: &str) -> Option<PeerStream> {
        let links = self.links.borrow();
        let l = links.get(addr)?.iter().find(|l| l.alive.get() && &*l.proxy == proxy && !l.saturated())?;
        l.active.set(l.active.get() + 1);
        Some(PeerStream { send: l.send.clone(), active: l.active.clone() })
    }

    /// A stream slot on a link to `proxy` at `addr`.
    pub async fn stream(&self, proxy: &str, addr: &str, deadline: Instant) -> Result<PeerStream, Error> {
        if let Some(s) = self.pick(addr, proxy) {
            return Ok(s);
        }
        if self.failing.borrow().get(addr).is_some_and(|b| Instant::now() < b.next_try) {
            return Err(unreachable(proxy, addr, Label::PeerBackoff, "unreachable; backing off"));
        }
        let left = deadline.saturating_duration_since(Instant::now()).min(self.connect_timeout);
        let r = self.connect(addr, proxy, left).await;
        let mut failing = self.failing.borrow_mut();
        match &r {
            Ok(_) => {
                failing.remove(addr);
            }
            Err(_) => {
                let b = failing.entry(addr.to_string()).or_insert_with(|| Failing {
                    next_try: Instant::now(),
                    backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
                });
                b.next_try = Instant::now() + b.backoff.next_delay();
            }
        }
        drop(failing);
        r?;
        self.pick(addr, proxy).ok_or_else(|| unreachable(proxy, addr, Label::PeerUnreachable, "link closed at once"))
    }

    async fn connect(&self, addr: &str, proxy: &str, left: Duration) -> Result<(), Error> {
        let cfg = self
            .tls
            .client_config(Role::Proxy, Some(proxy))
            .map_err(|e| unreachable(proxy, addr, Label::TlsHandshake, e))?;
        let h2 = self.h2.clone();
        let connect = async {
            let (tls, _) =
                connect_tls(&cfg, addr, left).await.map_err(|e| unreachable(proxy, addr, Label::PeerUnreachable, e))?;
            h2.client().handshake::<_, Bytes>(tls).await.map_err(|e| unreachable(proxy, addr, Label::H2Handshake, e))
        };
        let (send, conn) = timeout(left, connect)
            .await
            .map_err(|_| unreachable(proxy, addr, Label::ConnectTimeout, "connect timed out"))??;
        let alive = Rc::new(Cell::new(true));
        let link = Link { send, proxy: Rc::from(proxy), alive: alive.clone(), active: Rc::default() };
        self.links.borrow_mut().entry(addr.to_string()).or_default().push(link);
        self.stats.peer_links.add(1);
        let (links, stats, closing, addr2, proxy2) =
            (self.links.clone(), self.stats.clone(), self.closing.clone(), addr.to_string(), proxy.to_string());
        glommio::spawn_local(async move {
            let why = futures_lite::future::or(drive_client(conn, &h2), async {
                closing.wait().await;
                "proxy_stopping"
            })
            .await;
            alive.set(false);
            stats.peer_links.add(-1);
            let mut links = links.borrow_mut();
            if let Some(v) = links.get_mut(&addr2) {
                v.retain(|l| l.alive.get());
                if v.is_empty() {
                    links.remove(&addr2);
                }
            }
            tracing::info!(peer = proxy2, addr = addr2, why, "peer link closed");
        })
        .detach();
        tracing::info!(peer = proxy, addr, "peer link up");
        Ok(())
    }
}
