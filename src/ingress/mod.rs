//! Client edge: accepts client connections (mTLS, role `client`), serves
//! `ringpeer.v1.Proxy/Dial`, and hands each dial to the tunnel that holds
//! its agent: on this shard, or on a sibling shard through pipes.
//!
//! Invariants: a dial is routed only after its DialRequest was validated;
//! every dial ends with a gRPC status (or a reset when the client left);
//! every outcome is counted under a static label.

pub mod cross;

use std::rc::Rc;

use bytes::Bytes;
use futures_lite::future::or;
use glommio::net::{TcpListener, TcpStream};
use h2::server::SendResponse;
use h2::RecvStream;
use http::Request;

use crate::proxy::shard::{Route, Shard, TunnelRef};
use crate::relay::handshake::{open_dial, read_dial_request, respond_ok, respond_status};
use crate::relay::{relay, H2Sink, H2Source, Sink};
use crate::runtime::timeout;
use crate::telemetry::code_label;
use crate::transport::accept_tls;
use crate::transport::h2conf::{serve, ActiveStreams};
use crate::wire::codec::encode_msg;
use crate::wire::paths;
use crate::wire::status::{Code, Status};
use crate::wire::DialTarget;

/// Accepts connections on `l` until shutdown, running `f` for each.
pub async fn accept_each<F, Fut>(shard: &Rc<Shard>, l: TcpListener, what: &'static str, f: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + 'static,
{
    loop {
        let r = or(async { Some(l.accept().await) }, async {
            shard.shutdown.wait().await;
            None
        })
        .await;
        match r {
            None => return,
            Some(Ok(tcp)) => {
                glommio::spawn_local(f(tcp)).detach();
            }
            Some(Err(e)) => {
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
            tracing::debug!(error = %e, "client connection refused");
            shard.stats.error(e.label());
            return;
        }
    };
    shard.stats.client_conns.inc();
    let conn = match timeout(h2cfg.handshake_timeout(), h2cfg.server().handshake::<_, Bytes>(tls)).await {
        Ok(Ok(c)) => c,
        _ => {
            shard.stats.error("h2_handshake");
            return;
        }
    };
    tracing::debug!(client = %peer, shard = shard.index, "client connected");
    let active = ActiveStreams::default();
    let serving = serve(conn, h2cfg, &shard.shutdown, &active, false, |req, respond| {
        let guard = active.enter();
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let _guard = guard;
            handle_dial(shard, req, respond, edge).await;
        })
        .detach();
    });
    let why = or(serving, async {
        shard.closing.wait().await;
        "proxy_stopping"
    })
    .await;
    tracing::debug!(client = %peer, why, "client connection ended");
}

/// Counts a failed dial and answers it.
pub fn fail(shard: &Shard, respond: SendResponse<Bytes>, s: &Status) {
    shard.stats.dials_failed.inc();
    shard.stats.error(code_label(s.code));
    respond_status(respond, s);
}

/// Tracks an open relayed stream in the shard's gauge.
pub struct StreamCount<'a>(&'a Shard);

impl<'a> StreamCount<'a> {
    /// Counts one open stream.
    pub fn new(shard: &'a Shard) -> Self {
        shard.stats.active_streams.add(1);
        StreamCount(shard)
    }
}

impl Drop for StreamCount<'_> {
    fn drop(&mut self) {
        self.0.stats.active_streams.add(-1);
    }
}

async fn handle_dial(shard: Rc<Shard>, req: Request<RecvStream>, respond: SendResponse<Bytes>, edge: Edge) {
    let path = match edge {
        Edge::Client => paths::PROXY_DIAL,
        Edge::Peer => paths::PEER_DIAL,
    };
    if edge == Edge::Peer && req.uri().path() == paths::PEER_PING {
        return crate::peer::answer_ping(respond);
    }
    shard.stats.dials.inc();
    // A dial arriving over a peer link has crossed one; one that claims more
    // would be a forwarding loop.
    let hops =
        req.headers().get(crate::relay::handshake::HOPS_HEADER).and_then(|v| v.to_str().ok()?.parse::<u8>().ok());
    if edge == Edge::Peer && hops.unwrap_or(1) > 1 {
        let s =
            Status::new(Code::InvalidArgument, "dial has already crossed a peer link; refusing to forward it again");
        return fail(&shard, respond, &s);
    }
    if req.uri().path() != path {
        let s =
            Status::new(Code::Unimplemented, format!("unknown method {}; this port serves {path}", req.uri().path()));
        return fail(&shard, respond, &s);
    }
    let mut rx = req.into_body();
    let (target, mut dec) = match read_dial_request(&mut rx, shard.shared.dial_timeout).await {
        Ok(v) => v,
        Err(s) => return fail(&shard, respond, &s),
    };
    let rest = dec.take_rest();
    tracing::debug!(shard = shard.index, %target, "dial");
    match shard.route(&target.agent) {
        Route::Local(t) => local_dial(&shard, t, target, rx, rest, respond).await,
        Route::Shard(k) => cross::entry_side(&shard, k, target, rx, rest, respond).await,
        Route::Remote(routes) if edge == Edge::Client => {
            crate::peer::dial(&shard, routes, target, rx, rest, respond).await
        }
        Route::Remote(_) => {
            let s = Status::new(Code::NotFound, format!("agent {:?} has no tunnel to this proxy", target.agent));
            fail(&shard, respond, &s)
        }
        Route::None => {
            let s = Status::new(
                Code::NotFound,
                format!("no route to agent {:?}: no proxy holds a tunnel to it", target.agent),
            );
            fail(&shard, respond, &s)
        }
    }
}

async fn local_dial(
    shard: &Shard,
    mut t: TunnelRef,
    target: DialTarget,
    rx: RecvStream,
    rest: Bytes,
    respond: SendResponse<Bytes>,
) {
    shard.stats.dials_local.inc();
    let first = encode_msg(&target.to_frame());
    let opened = match open_dial(&mut t.send, &target.agent, paths::AGENT_DIAL, first, shard.shared.dial_timeout).await
    {
        Ok(o) => o,
        Err(s) => return fail(shard, respond, &s),
    };
    relay_opened(shard, opened, rx, rest, respond).await
}

/// Answers the client and relays an established upstream dial (agent
/// tunnel or peer link) until the call ends.
pub async fn relay_opened(
    shard: &Shard,
    opened: crate::relay::handshake::Opened,
    rx: RecvStream,
    rest: Bytes,
    mut respond: SendResponse<Bytes>,
) {
    let Ok(tx) = respond_ok(&mut respond) else { return };
    let _count = StreamCount::new(shard);
    let mut down = H2Sink { tx, trailers: true };
    let mut up = H2Sink { tx: opened.tx, trailers: false };
    let (mut up_src, mut down_src) = (H2Source { rx, trailers: false }, H2Source { rx: opened.rx, trailers: true });
    let start = async {
        for b in opened.held {
            down.send(b).await?;
        }
        if !rest.is_empty() {
            up.send(rest).await?;
        }
        relay((&mut up_src, &mut up), (&mut down_src, &mut down), &shard.stats.bytes_up, &shard.stats.bytes_down).await
    };
    if let Err(e) = start.await {
        shard.stats.error(e.label());
        let _ = down.tx.send_trailers(e.status().to_trailers());
    }
}
