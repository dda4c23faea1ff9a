//! Proxy side of agent tunnels: accept (mTLS, role `agent`), become the
//! HTTP/2 client, exchange Control messages, and register the tunnel with
//! the shard and the control thread for as long as it lives.
//!
//! Invariants: the agent's id comes from its certificate, never from a
//! message; a tunnel is routable only after the agent announced its
//! services (and a later announcement replaces them: the agent reloaded);
//! it is unregistered exactly once, whatever ended it.

use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use futures_lite::future::or;
use glommio::net::{TcpListener, TcpStream};
use h2::client::SendRequest;
use http::header::{CONTENT_TYPE, TE};
use http::{HeaderValue, Request};

use crate::proxy::drain::Phase;
use crate::proxy::shard::{Shard, TunnelRef};
use crate::relay::grpc::{GrpcRecv, GrpcSend, Msgs};
use crate::route::model::Strategy;
use crate::route::RouteTable;
use crate::runtime::timeout;
use crate::transport::accept_tls;
use crate::transport::h2conf::{drive_client_pooled, ActiveStreams};
use crate::transport::identity::valid_name;
use crate::transport::keepalive::LinkHealth;
use crate::wire::codec::{encode_msg, MAX_CONTROL_STREAM_MSG};
use crate::wire::error::{Error, Label, Side};
use crate::wire::paths;
use crate::wire::pb::v1::{
    agent_message, control_message, AgentHello, AgentMessage, ControlMessage, Drain, ProxyEntry, ProxySet,
};

/// Most services an agent may announce.
pub const MAX_SERVICES: usize = 1024;

/// The tunnel accept loop of one shard.
pub async fn accept_loop(shard: Rc<Shard>, l: TcpListener) {
    let stop = shard.stopping.clone();
    super::accept_each(&shard.clone(), l, "tunnel", &stop, |tcp| serve_tunnel(shard.clone(), tcp)).await
}

async fn serve_tunnel(shard: Rc<Shard>, tcp: TcpStream) {
    let h2cfg = shard.shared.h2.clone();
    let acceptor = shard.shared.tls.current().built.tunnel.clone();
    let (tls, peer) = match accept_tls(&acceptor, tcp, h2cfg.handshake_timeout()).await {
        Ok(v) => v,
        Err(e) => {
            crate::warn_throttled!("agent tunnel refused", error = %e, "agent tunnel refused");
            shard.stats.error(e.label());
            return;
        }
    };
    let agent = peer.name.clone();
    let builder = h2cfg.link_client();
    let (mut send, conn) = match timeout(h2cfg.handshake_timeout(), builder.handshake::<_, Bytes>(tls)).await {
        Ok(Ok(v)) => v,
        _ => {
            shard.stats.error(Label::H2Handshake);
            return;
        }
    };
    let health = LinkHealth::new();
    let watched = health.clone();
    // The tunnel carries every client's responses from this agent: its
    // window grows with the dial streams open on it (a few stalled readers
    // must not block the rest).
    let streams = ActiveStreams::default();
    let (count, pool) = (streams.clone(), shard.buf.clone());
    // The connection goes in boxed and is moved out into the driver's
    // future, so the task does not keep a second, moved-from copy of it
    // (rustc #62958).
    let conn = Box::new(conn);
    let driver = glommio::spawn_local(async move {
        drive_client_pooled(*conn, &h2cfg, &watched, Some(&pool), || Some(count.open())).await
    });
    // What the agent is first told is exactly what later pushes compare
    // against (computed once: the snapshot may change meanwhile).
    let sent = membership(&shard, &shard.routes());
    let (services, ctrl_rx, mut ctrl_tx) =
        match timeout(shard.shared.h2.handshake_timeout(), open_control(&mut send, &shard, &sent)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!(agent, error = %e, "agent control stream failed");
                return;
            }
            Err(_) => {
                tracing::warn!(agent, "agent did not announce its services in time");
                return;
            }
        };
    let conn_id = shard.next_conn_id();
    shard.add_tunnel(&agent, TunnelRef { conn: conn_id, send, health, streams }, services.clone());
    tracing::info!(agent, shard = shard.index, services = ?services, "agent tunnel up");
    let mut driver = driver;
    let closing = || async {
        shard.closing.wait().await;
        "proxy_stopping"
    };
    let pushes = async {
        or(push_membership(&shard, &mut ctrl_tx, sent), shard.stopping.wait()).await;
        // Draining: tell the agent to open its replacement tunnel now; this
        // one serves its open streams until the agent drains it.
        if let Some(phase @ (Phase::Successor | Phase::Leaving)) = shard.drain_mode.get() {
            let successor = phase == Phase::Successor;
            let m = ControlMessage { message: Some(control_message::Message::Drain(Drain { successor })) };
            if ctrl_tx.send(encode_msg(&m)).await.is_ok() {
                tracing::info!(agent, successor, "told the agent to move its tunnel");
            }
        }
        std::future::pending::<()>().await
    };
    let control_ended = async {
        or(watch_control(&shard, &agent, conn_id, ctrl_rx), pushes).await;
        "control_stream_closed"
    };
    let why = or(or(&mut driver, control_ended), closing()).await;
    shard.remove_tunnel(&agent, conn_id);
    if why == "control_stream_closed" {
        // The agent is draining this tunnel: no new dials, but the streams
        // already on it finish.
        tracing::info!(agent, shard = shard.index, "agent tunnel draining");
        let _ = or(&mut driver, closing()).await;
    }
    tracing::info!(agent, shard = shard.index, why, "agent tunnel down");
}

/// What agents are told: the live proxies (id, tunnel address, draining)
/// and the cluster's strategy.
type Membership = (Vec<(String, String, bool)>, Strategy);

fn membership(shard: &Shard, t: &RouteTable) -> Membership {
    let mut proxies: Vec<(String, String, bool)> =
        t.proxies.values().map(|p| (p.id.clone(), p.tunnel_addr.clone(), p.draining)).collect();
    if !proxies.iter().any(|(id, _, _)| *id == shard.shared.id) {
        proxies.push((shard.shared.id.clone(), shard.shared.tunnel_addr.clone(), false));
    }
    proxies.sort();
    (proxies, t.strategy)
}

fn control_frames(shard: &Shard, m: &Membership) -> Bytes {
    let set = ControlMessage {
        message: Some(control_message::Message::ProxySet(ProxySet {
            self_: shard.shared.id.clone(),
            proxies: m
                .0
                .iter()
                .map(|(id, addr, draining)| ProxyEntry {
                    id: id.clone(),
                    tunnel_addr: addr.clone(),
                    draining: *draining,
                })
                .collect(),
        })),
    };
    let strategy = ControlMessage { message: Some(control_message::Message::Strategy(m.1.to_pb())) };
    let mut b = encode_msg(&set).to_vec();
    b.extend_from_slice(&encode_msg(&strategy));
    b.into()
}

/// Tells the agent whenever the proxy set or the strategy changes.
async fn push_membership(shard: &Shard, tx: &mut GrpcSend, mut sent: Membership) {
    // Version 0: compare with the current snapshot first, in case it
    // changed since the first frames went out.
    let mut version = 0;
    loop {
        let t = shard.next_routes(version).await;
        version = t.version;
        let m = membership(shard, &t);
        if m != sent {
            if tx.send(control_frames(shard, &m)).await.is_err() {
                return;
            }
            sent = m;
        }
    }
}

type ControlRecv = GrpcRecv<Msgs<AgentMessage>>;

/// Opens Agent/Control, tells the agent the proxy set and strategy, and
/// waits for its services.
async fn open_control(
    send: &mut SendRequest<Bytes>,
    shard: &Shard,
    first: &Membership,
) -> Result<(Arc<[String]>, ControlRecv, GrpcSend), Error> {
    let closed = |e: h2::Error| Error::from_h2(Side::Agent, false, &e);
    poll_fn(|cx| send.poll_ready(cx)).await.map_err(closed)?;
    let mut req = Request::new(());
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = paths::uri(paths::AGENT_CONTROL).clone();
    req.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    req.headers_mut().insert(TE, HeaderValue::from_static("trailers"));
    let (resp, tx) = send.send_request(req, false).map_err(closed)?;
    let mut tx = GrpcSend::request(tx, Side::Agent);
    tx.send_now(control_frames(shard, first))?;
    let resp = resp.await.map_err(closed)?;
    if resp.status() != 200 {
        return Err(Error::bad_request(format!("agent answered HTTP {}", resp.status())).on(Side::Agent));
    }
    let mut rx = GrpcRecv::new(resp.into_body(), Msgs::<AgentMessage>::new(MAX_CONTROL_STREAM_MSG), Side::Agent);
    loop {
        let Some(m) = rx.next().await? else {
            return Err(Error::bad_request("agent closed the control stream").on(Side::Agent));
        };
        let Some(agent_message::Message::Hello(h)) = m.message else { continue };
        return Ok((announced(h)?, rx, tx));
    }
}

/// The services of a hello, checked: at most [`MAX_SERVICES`], valid names.
fn announced(h: AgentHello) -> Result<Arc<[String]>, Error> {
    if h.services.len() > MAX_SERVICES || h.services.iter().any(|s| !valid_name(s)) {
        return Err(Error::bad_request("agent announced invalid service names").on(Side::Agent));
    }
    Ok(h.services.into())
}

/// Follows the agent's control stream until it ends: a later hello (the
/// agent reloaded its services) updates the tunnel's route; an invalid one
/// ends the stream like any bad control message.
async fn watch_control(shard: &Shard, agent: &str, conn: u64, mut rx: ControlRecv) {
    loop {
        match rx.next().await {
            Ok(Some(AgentMessage { message: Some(agent_message::Message::Hello(h)) })) => match announced(h) {
                Ok(services) => {
                    tracing::info!(agent, shard = shard.index, services = ?services, "agent announced new services");
                    shard.set_tunnel_services(agent, conn, services);
                }
                Err(e) => {
                    crate::warn_throttled!("bad control message from agent", error = %e, "bad control message from agent");
                    return;
                }
            },
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e) => {
                if e.label != Label::ConnectionLost {
                    crate::warn_throttled!("bad control message from agent", error = %e, "bad control message from agent");
                }
                return;
            }
        }
    }
}
