//! Inbound: the proxy's listening side. Accepts client connections (role
//! `client`), peer connections (role `proxy`) and agent tunnels ([`tunnel`]),
//! and runs every dial through one pipeline ([`dial`]):
//! decode → authorize → resolve → open an upstream → relay.
//!
//! Invariants: every connection is mTLS with the role its port expects;
//! every connection task ends when its shard closes; each refused handshake
//! is counted under a static label. Budgets (`[limits]`, counted on this
//! shard): streams per connection (client edge and peer links apart),
//! connections and client-edge streams per certificate identity; a stream
//! past one is answered at once, RESOURCE_EXHAUSTED naming the budget.

pub mod authz;
pub mod dial;
pub mod tunnel;

use std::rc::Rc;

use bytes::Bytes;
use futures_lite::future::or;
use glommio::net::{TcpListener, TcpStream};

use super::shard::Shard;
use crate::runtime::budget::exceeded;
use crate::runtime::signal::Signal;
use crate::runtime::timeout;
use crate::transport::accept_tls;
use crate::transport::flood::FloodMeter;
use crate::transport::h2conf::{serve, ActiveStreams};
use crate::transport::identity::SpiffeId;
use crate::wire::error::{Label, Side};

/// Accepts connections on `l` until the shard stops, running `f` for each.
pub async fn accept_each<F, Fut>(shard: &Rc<Shard>, l: TcpListener, what: &'static str, stop: &Signal, f: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + 'static,
{
    loop {
        let r = or(async { Some(l.accept().await) }, async {
            stop.wait().await;
            None
        })
        .await;
        match r {
            None => return,
            Some(Ok(tcp)) => {
                let alive = shard.conns.enter();
                // Boxed: an async block that awaits a future it captured
                // stores it twice (the capture and the awaited copy; rustc
                // #62958), which for a connection's task was ~10 KiB more
                // per idle connection (heaptrack, perf/scale-memory.sh).
                let task = Box::pin(f(tcp));
                glommio::spawn_local(async move {
                    task.await;
                    drop(alive);
                })
                .detach();
            }
            Some(Err(e)) => {
                // Out of descriptors, usually: back off instead of spinning.
                // Throttled: EMFILE under a connection flood fails every
                // accept for a while.
                crate::warn_throttled!("accept failed", shard = shard.index, listener = what, error = %e, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

/// Who is at the other end of an inbound connection.
pub struct Caller {
    /// Its verified certificate identity.
    pub id: SpiffeId,
    /// Its address (`ip:port`), as this proxy sees it.
    pub addr: String,
    /// `id` as a [`CLIENT_ID_HEADER`](crate::relay::call::CLIENT_ID_HEADER)
    /// value, made once per connection (client edge only).
    pub header: Option<http::HeaderValue>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.id.fmt(f)
    }
}

/// Which edge a connection came in on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Edge {
    /// A client (`ringpeer.v1.Proxy/Dial`); may be routed through a peer.
    Client,
    /// A peer proxy (`proto.ProxyService/DialNode`); served from this
    /// proxy's own tunnels only, so a dial crosses at most one peer link.
    Peer,
}

/// The client edge accept loop of one shard.
pub async fn accept_loop(shard: Rc<Shard>, l: TcpListener) {
    let stop = shard.stopping.clone();
    accept_each(&shard.clone(), l, "client", &stop, |tcp| serve_edge(shard.clone(), tcp, Edge::Client)).await
}

/// The peer accept loop of one shard.
pub async fn peer_accept_loop(shard: Rc<Shard>, l: TcpListener) {
    let stop = shard.peer_stopping.clone();
    accept_each(&shard.clone(), l, "peer", &stop, |tcp| serve_edge(shard.clone(), tcp, Edge::Peer)).await
}

async fn serve_edge(shard: Rc<Shard>, tcp: TcpStream, edge: Edge) {
    let h2cfg = &shard.shared.h2;
    let addr = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let acceptor = match edge {
        Edge::Client => shard.shared.tls.current().built.client.clone(),
        Edge::Peer => shard.shared.tls.current().built.peer.clone(),
    };
    let (tls, peer) = match accept_tls(&acceptor, tcp, h2cfg.handshake_timeout()).await {
        Ok(v) => v,
        Err(e) => {
            // A refused certificate is worth a warning (a revoked client,
            // a misissued peer), throttled: a storm of them is one line
            // per window. Timeouts and bare closes (scanners, health
            // checks) stay at debug.
            if matches!(e, crate::transport::TransportError::Handshake { .. }) {
                crate::warn_throttled!("TLS handshake refused", ?edge, error = %e, "TLS handshake refused");
            } else {
                tracing::debug!(?edge, error = %e, "connection refused");
            }
            shard.stats.error(e.label());
            return;
        }
    };
    shard.stats.client_conns.inc();
    // The per-connection budgets in force when it came in hold for its
    // life; `streams_per_identity` is read per stream below.
    let limits = shard.tunables().limits.clone();
    let limits = &limits;
    let per_conn = match edge {
        Edge::Client => ("streams_per_conn", limits.streams_per_conn),
        Edge::Peer => ("peer_streams_per_conn", limits.peer_streams_per_conn),
    };
    let active = ActiveStreams::with_pool(per_conn.1, limits.setup_per_conn, &shard.buf);
    let metered = FloodMeter::new(tls, &active);
    let builder = match edge {
        Edge::Client => h2cfg.server(),
        Edge::Peer => h2cfg.link_server(),
    };
    let conn = match timeout(h2cfg.handshake_timeout(), builder.handshake::<_, Bytes>(metered)).await {
        Ok(Ok(c)) => c,
        _ => {
            shard.stats.error(Label::H2Handshake);
            return;
        }
    };
    tracing::debug!(peer = %peer, ?edge, shard = shard.index, "connected");
    let who = peer.to_string();
    let header = match edge {
        Edge::Client => http::HeaderValue::from_str(&who).ok(),
        Edge::Peer => None,
    };
    let caller = Rc::new(Caller { id: peer, addr, header });
    // Over its connection budget, an identity's connection is drained: the
    // dials it sent before it read the GOAWAY are answered with the
    // budget's error, and it ends at the first answer or after a second.
    // (Closing the socket at once was rejected: the caller would see a bare
    // reset, not which budget it hit.)
    let ident = shard.identities.enter_conn(&who, limits.conns_per_identity).map(Rc::new);
    let drain_now = Signal::new();
    let stop = if ident.is_none() {
        crate::warn_throttled!(
            "budget conns_per_identity reached",
            peer = %caller,
            limit = limits.conns_per_identity,
            "budget conns_per_identity reached"
        );
        shard.stats.error(Label::BudgetConnsPerIdentity);
        let d = drain_now.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(std::time::Duration::from_secs(1)).await;
            d.trigger();
        })
        .detach();
        &drain_now
    } else if edge == Edge::Peer {
        &shard.peer_stopping
    } else {
        &shard.stopping
    };
    let serving = serve(conn, h2cfg, stop, &active, false, |req, respond| {
        let Some(ident) = &ident else {
            let e =
                exceeded("conns_per_identity", limits.conns_per_identity, Label::BudgetConnsPerIdentity, Side::Client);
            return dial::refuse_stream(&shard, &caller, edge, respond, &e);
        };
        let Some(guard) = active.try_enter() else {
            let e = exceeded(per_conn.0, per_conn.1, Label::BudgetStreamsPerConn, Side::Client);
            return dial::refuse_stream(&shard, &caller, edge, respond, &e);
        };
        let stream = match edge {
            Edge::Client => match ident.enter_stream(shard.tunables().limits.streams_per_identity) {
                Some(s) => Some(s),
                None => {
                    let (max, label) = (shard.tunables().limits.streams_per_identity, Label::BudgetStreamsPerIdentity);
                    let e = exceeded("streams_per_identity", max, label, Side::Client);
                    return dial::refuse_stream(&shard, &caller, edge, respond, &e);
                }
            },
            Edge::Peer => None,
        };
        let (shard, caller, active) = (shard.clone(), caller.clone(), active.clone());
        glommio::spawn_local(async move {
            let _guards = (guard, stream);
            dial::handle(shard, &caller, &active, req, respond, edge).await;
        })
        .detach();
    });
    let why = or(serving, async {
        shard.closing.wait().await;
        "proxy_stopping"
    })
    .await;
    let flood = match why {
        "reset_flood" => Some((Label::ResetFlood, "too many streams reset before establishment")),
        "ping_flood" => Some((Label::PingFlood, "too many PING frames")),
        "settings_flood" => Some((Label::SettingsFlood, "too many SETTINGS frames")),
        _ => None,
    };
    if let Some((label, what)) = flood {
        crate::warn_throttled!("GOAWAY ENHANCE_YOUR_CALM", peer = %caller, "connection ended with GOAWAY ENHANCE_YOUR_CALM: {what}");
        shard.stats.error(label);
    }
    tracing::debug!(peer = %caller, why, "connection ended");
}
