//! Inbound: the proxy's listening side. Accepts client connections (role
//! `client`), peer connections (role `proxy`) and agent tunnels ([`tunnel`]),
//! and runs every dial through one pipeline ([`dial`]):
//! decode → authorize → resolve → open an upstream → relay.
//!
//! Invariants: every connection is mTLS with the role its port expects;
//! every connection task ends when its shard closes; each refused handshake
//! is counted under a static label.

pub mod dial;
pub mod tunnel;

use std::rc::Rc;

use bytes::Bytes;
use futures_lite::future::or;
use glommio::net::{TcpListener, TcpStream};

use super::shard::Shard;
use crate::runtime::timeout;
use crate::transport::accept_tls;
use crate::transport::flood::FloodMeter;
use crate::transport::h2conf::{serve, ActiveStreams};
use crate::wire::error::Label;

/// Accepts connections on `l` until the shard stops, running `f` for each.
pub async fn accept_each<F, Fut>(shard: &Rc<Shard>, l: TcpListener, what: &'static str, f: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + 'static,
{
    loop {
        let r = or(async { Some(l.accept().await) }, async {
            shard.stopping.wait().await;
            None
        })
        .await;
        match r {
            None => return,
            Some(Ok(tcp)) => {
                let alive = shard.conns.enter();
                let task = f(tcp);
                glommio::spawn_local(async move {
                    task.await;
                    drop(alive);
                })
                .detach();
            }
            Some(Err(e)) => {
                // Out of descriptors, usually: back off instead of spinning.
                tracing::warn!(shard = shard.index, listener = what, error = %e, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
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
    accept_each(&shard.clone(), l, "client", |tcp| serve_edge(shard.clone(), tcp, Edge::Client)).await
}

/// The peer accept loop of one shard.
pub async fn peer_accept_loop(shard: Rc<Shard>, l: TcpListener) {
    accept_each(&shard.clone(), l, "peer", |tcp| serve_edge(shard.clone(), tcp, Edge::Peer)).await
}

async fn serve_edge(shard: Rc<Shard>, tcp: TcpStream, edge: Edge) {
    let h2cfg = &shard.shared.h2;
    let acceptor = match edge {
        Edge::Client => &shard.shared.client_tls,
        Edge::Peer => &shard.shared.peer_tls,
    };
    let (tls, peer) = match accept_tls(acceptor, tcp, h2cfg.handshake_timeout()).await {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(?edge, error = %e, "connection refused");
            shard.stats.error(e.label());
            return;
        }
    };
    shard.stats.client_conns.inc();
    let active = ActiveStreams::default();
    let metered = FloodMeter::new(tls, &active);
    let conn = match timeout(h2cfg.handshake_timeout(), h2cfg.server().handshake::<_, Bytes>(metered)).await {
        Ok(Ok(c)) => c,
        _ => {
            shard.stats.error(Label::H2Handshake);
            return;
        }
    };
    tracing::debug!(peer = %peer, ?edge, shard = shard.index, "connected");
    let caller = Rc::new(peer);
    let serving = serve(conn, h2cfg, &shard.stopping, &active, false, |req, respond| {
        let guard = active.enter();
        let (shard, caller, active) = (shard.clone(), caller.clone(), active.clone());
        glommio::spawn_local(async move {
            let _guard = guard;
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
        tracing::warn!(peer = %caller, "connection ended with GOAWAY ENHANCE_YOUR_CALM: {what}");
        shard.stats.error(label);
    }
    tracing::debug!(peer = %caller, why, "connection ended");
}
