//! The dial pipeline, the same for every dial that enters a proxy:
//!
//! 1. **decode**: the method, the hop count and the `DialRequest`
//!    (size-checked and validated before anything else);
//! 2. **authorize**: the client (this connection's identity on the client
//!    edge, the identity a peer asserts in `ringpeer-client-id` on a peer
//!    link) against the snapshot's grants, for the agent and the service
//!    (an empty service resolved to the agent's default first, so grants
//!    and the agent see the same name). A refused dial gets
//!    PERMISSION_DENIED naming client, agent and service, before any route
//!    is looked at: an unauthorized client learns nothing about the agent;
//! 3. **resolve**: the ordered upstreams ([`outbound::plan`]);
//! 4. **open**: [`outbound::open`] tries them with failover;
//! 5. **relay**: move bytes verbatim until the upstream's trailers
//!    (forwarded as received) or the first failure.
//!
//! The 200 headers go out between 3 and 4, as soon as the dial is known to
//! be routable: a peer proxy bounds the time to them to detect a frozen
//! proxy (`peer_answer_timeout_ms`), which must not include the time the
//! agent takes to connect its target.
//!
//! Before step 1 a dial takes a set-up slot of its connection
//! (`setup_per_conn`) and is refused while the shard's relay holds more
//! than `shard_buffer_bytes`; the relayed streams' received bytes are
//! counted in that meter.
//!
//! Every client-edge dial leaves one line in the audit log
//! ([`crate::proxy::audit`]): a [`Trail`] started when it arrives and
//! queued when `handle` returns, whichever way.
//!
//! Invariants: only this module answers the caller; a failed dial is
//! answered once, with its error's trailers, and counted under its label
//! and code; a failure after establishment cancels the upstream hop.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::future::or;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderValue, Request};

use super::authz::{self, authorize_loaded, client_of, Client};
use super::{Caller, Edge};
use crate::proxy::audit::{self, Trail};
use crate::proxy::outbound::{self, Opened, UpRecv, Via};
use crate::proxy::shard::Shard;
use crate::proxy::stats::DialPath;
use crate::relay::call::{answer_error, answer_ok, read_dial_request, Outgoing, HOPS_HEADER};
use crate::relay::{relay, FirstByte, GrpcRecv, GrpcSend, Leg, Sink, Tally};
use crate::route::grants::Authorization;
use crate::runtime::budget::exceeded;
use crate::runtime::signal::Signal;
use crate::runtime::stats::Held;
use crate::transport::h2conf::ActiveStreams;
use crate::wire::codec::{encode_msg, FrameDecoder};
use crate::wire::error::{Error, Label, Retry, Side};
use crate::wire::pb::ProxyServicePingResponse;
use crate::wire::status::{Code, Status};
use crate::wire::{paths, DialTarget};

/// Counts a failed dial and answers it.
pub fn fail(shard: &Shard, respond: SendResponse<Bytes>, e: &Error) {
    shard.stats.failed(e, None);
    answer_error(respond, e);
}

/// [`fail`], auditing the refusal first.
fn refuse(shard: &Shard, respond: SendResponse<Bytes>, e: &Error, trail: &mut Option<Trail<'_>>) {
    if let Some(t) = trail {
        t.failed(e);
    }
    fail(shard, respond, e)
}

/// [`fail`] for a stream refused before its dial was read (a connection or
/// identity budget), auditing it when it came in on the client edge.
pub fn refuse_stream(shard: &Shard, caller: &Caller, edge: Edge, respond: SendResponse<Bytes>, e: &Error) {
    refuse(shard, respond, e, &mut trail(shard, caller, edge))
}

/// The audit trail of a dial that just arrived: client-edge dials only, and
/// only when the audit is on.
fn trail<'a>(shard: &'a Shard, caller: &Caller, edge: Edge) -> Option<Trail<'a>> {
    let audit = shard.shared.audit.as_ref().filter(|_| edge == Edge::Client)?;
    let client = caller.header.clone().or_else(|| HeaderValue::from_str(&caller.id.uri()).ok())?;
    Some(Trail::start(audit, shard.index, client, &caller.addr))
}

/// The metrics' path of an upstream.
fn dial_path(via: &Via) -> DialPath {
    match via {
        Via::Local => DialPath::Local,
        Via::Sibling(_) => DialPath::Shard,
        Via::Peer(_) => DialPath::Peer,
    }
}

fn path_of(via: &Via) -> audit::Path {
    match via {
        Via::Local => audit::Path::Local,
        Via::Sibling(k) => audit::Path::Shard(*k),
        Via::Peer(p) => audit::Path::Peer(p.to_string()),
    }
}

/// Whether the caller ended the call by resetting or cancelling it.
fn caller_reset(e: &Error) -> bool {
    e.side == Side::Client && matches!(e.label, Label::Cancelled | Label::StreamReset)
}

/// Handles one request on a client or peer connection.
pub async fn handle(
    shard: Rc<Shard>,
    caller: &Caller,
    conn: &ActiveStreams,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    edge: Edge,
) {
    if edge == Edge::Peer && req.uri().path() == paths::PEER_PING {
        return answer_ping(respond);
    }
    shard.stats.dials.inc();
    let arrived = Instant::now();
    let mut trail = trail(&shard, caller, edge);
    let Some(setup) = conn.enter_setup() else {
        let max = conn.limits().1;
        let mut e = exceeded("setup_per_conn", max, Label::BudgetSetupPerConn, Side::Client);
        e.message = format!("{}: at most {max} dials in set-up per connection", e.message).into();
        return refuse(&shard, respond, &e, &mut trail);
    };
    // Applies a reloaded shard_buffer_bytes before the check.
    shard.refresh_tunables();
    if shard.buf.over_budget() {
        let e = exceeded("shard_buffer_bytes", shard.buf.budget(), Label::BudgetShardBuffer, Side::Proxy);
        return refuse(&shard, respond, &e, &mut trail);
    }
    let (mut target, client, recv) = match decode(&shard, caller, req, edge).await {
        Ok(v) => v,
        Err(e) => {
            if caller_reset(&e) {
                conn.reset_by_peer();
            }
            return refuse(&shard, respond, &e, &mut trail);
        }
    };
    if edge == Edge::Client {
        // The source is the entry proxy's to say, never the client's.
        target.source.clone_from(&caller.addr);
    }
    let authorized = authorize_loaded(&shard, &client.id, &mut target, edge).await;
    if let Some(t) = &mut trail {
        t.target(&target.agent, &target.service);
    }
    if let Err(e) = authorized {
        return refuse(&shard, respond, &e, &mut trail);
    }
    let (mut plan, mut moving) = resolve(&shard, &target.agent, edge);
    if plan.is_empty() && moving.is_none() {
        // Before answering NOT_FOUND, take in what is already queued for
        // this shard (a sibling's tunnel notice, a newer table).
        shard.catch_up().await;
        (plan, moving) = resolve(&shard, &target.agent, edge);
    }
    if plan.is_empty() && moving.is_none() {
        return refuse(&shard, respond, &no_route(&target.agent, edge), &mut trail);
    }
    // Answer the headers now: a peer proxy's failover bounds the time to
    // this answer, so a live proxy must give it before the (possibly slow)
    // upstream connects, or before a moving agent's tunnel arrives.
    // Failures from here on end with trailers.
    let far = if edge == Edge::Peer { Side::Peer } else { Side::Client };
    let Ok(mut down) = answer_ok(&mut respond, far) else {
        if let Some(t) = &mut trail {
            t.failed(&Error::cancelled("the caller went away before the dial was answered"));
        }
        return;
    };
    let dial = Outgoing { first: encode_msg(&target.to_frame()), client: Some(client.header) };
    // A caller that resets while the upstream is being opened cancels the
    // opening: dropping it resets the upstream stream in turn, so the agent
    // stops before (or right after) it connects the target.
    let agent = target.agent.as_str();
    let tried = Cell::new(None);
    let open = outbound::open_replanning(
        &shard,
        agent,
        dial,
        shard.dial_timeout(),
        |s| resolve(s, agent, edge),
        || no_route(agent, edge),
        &tried,
    );
    let opened = or(open, async {
        let r = down.reset_by_peer().await;
        Err(Error::cancelled(format!("the caller reset the dial ({r:?}) before it was established")))
    })
    .await;
    let opened = match opened {
        Ok(o) => o,
        Err(e) => {
            if caller_reset(&e) {
                conn.reset_by_peer();
            }
            // The path of a dial that failed: the upstream tried last.
            let tried = tried.take();
            shard.stats.failed(&e, tried.as_ref().map(dial_path));
            if let Some(t) = &mut trail {
                t.path(tried.as_ref().map_or(audit::Path::None, path_of));
                t.failed(&e);
            }
            return Sink::fail(&mut down, &e).await;
        }
    };
    drop(setup);
    let path = dial_path(&opened.via);
    shard.stats.setup[path as usize].record(arrived.elapsed());
    if let Some(t) = &mut trail {
        t.established(path_of(&opened.via));
    }
    // Registered for `grants revoke --kill-streams` sweeps (not under
    // allow_all: no grant can be revoked there).
    let reg =
        (shard.shared.authorization == Authorization::Grants).then(|| shard.open_dials.register(&client.id, &target));
    let revoke = reg.as_ref().map(|r| (&r.cancel, client.id.name.as_str(), &target));
    let first_byte = FirstByte { hist: &shard.stats.first_byte[path as usize], since: arrived };
    relay_to_caller(&shard, opened, recv, down, revoke, trail.as_mut(), first_byte).await
}

/// Step 1: the method, the hop count, the client and the `DialRequest`.
async fn decode(
    shard: &Shard,
    caller: &Caller,
    req: Request<RecvStream>,
    edge: Edge,
) -> Result<(DialTarget, Client, GrpcRecv), Error> {
    let path = match edge {
        Edge::Client => paths::PROXY_DIAL,
        Edge::Peer => paths::PEER_DIAL,
    };
    if req.uri().path() != path {
        let m = format!("unknown method {}; this port serves {path}", req.uri().path());
        return Err(Error::new(Code::Unimplemented, Side::Client, Retry::Never, Label::Unimplemented, m));
    }
    // A dial arriving over a peer link has crossed one; one that claims more
    // would be a forwarding loop.
    let hops = req.headers().get(HOPS_HEADER).and_then(|v| v.to_str().ok()?.parse::<u8>().ok());
    if edge == Edge::Peer && hops.unwrap_or(1) > 1 {
        let m = "dial has already crossed a peer link; refusing to forward it again";
        return Err(Error::new(Code::InvalidArgument, Side::Peer, Retry::Never, Label::Loop, m));
    }
    let client = client_of(shard, caller, req.headers(), edge)?;
    let far = if edge == Edge::Peer { Side::Peer } else { Side::Client };
    let mut recv = GrpcRecv::new(req.into_body(), FrameDecoder::new(), far);
    let target = read_dial_request(&mut recv, shard.dial_timeout()).await?;
    tracing::debug!(shard = shard.index, %target, client = %client.id, ?edge, "dial");
    Ok((target, client, recv))
}

/// Step 3: the upstreams to try, in order, and how long the dial may wait
/// for a tunnel when there is none: up to its deadline for an agent that is
/// moving (no tunnel now, one expected), a short while when the routes were
/// never loaded yet (a process that just started), else not at all.
fn resolve(shard: &Shard, agent: &str, edge: Edge) -> (Vec<outbound::Upstream>, Option<Duration>) {
    let routes = shard.routes();
    let r = routes.get(agent);
    let moving = match r {
        Some(r) if r.moving => Some(Duration::MAX),
        None if !routes.loaded => Some(outbound::REPLAN_WAIT),
        _ => None,
    };
    // Siblings' own notices first (exact and immediate), then the table's.
    let noticed = shard.sibling_tunnels(agent);
    let siblings = noticed.into_iter().chain(r.iter().flat_map(|r| r.local.iter().map(|l| l.shard)));
    let remote = r.map(|r| &r.remote[..]).unwrap_or_default();
    let plan = outbound::plan(shard.index, shard.local_tunnel(agent), siblings, remote, edge == Edge::Client, |a| {
        (shard.peers.has_ready(a), shard.peers.load(a))
    });
    (plan, moving)
}

fn no_route(agent: &str, edge: Edge) -> Error {
    let m = match edge {
        Edge::Client => format!("no route to agent {agent:?}: no proxy holds a tunnel to it"),
        Edge::Peer => format!("agent {agent:?} has no tunnel to this proxy"),
    };
    // Retry-safe: the caller (a peer) may try another holder.
    Error::new(Code::NotFound, Side::Proxy, Retry::Safe, Label::NoRoute, m)
}

/// Step 5: answers the caller and relays until the call ends. The payload
/// counted (in the shard's counters and the audit) is what is relayed after
/// establishment, gRPC framing included: the client's bytes that followed
/// its `DialRequest`, then every DATA payload each way.
async fn relay_to_caller(
    shard: &Shard,
    o: Opened,
    mut recv: GrpcRecv,
    mut down: GrpcSend,
    revoke: Option<(&Signal, &str, &DialTarget)>,
    trail: Option<&mut Trail<'_>>,
    first_byte: FirstByte<'_>,
) {
    let Opened { mut send, recv: mut up_recv, held, slot: _slot, tunnel_slot: _tunnel_slot, via: _ } = o;
    // The client's bytes that followed its `DialRequest`.
    let rest = recv.decoder().take_rest();
    recv.meter(&shard.buf);
    if let UpRecv::H2(r) = &mut up_recv {
        r.meter(&shard.buf);
    }
    let _open = shard.streams.enter();
    let _gauge = Held::new(&shard.stats.active_streams);
    let stats = &shard.stats;
    let (up, back) = (Tally::default(), Tally::default());
    // Time to first byte: at the first DATA sent down, held or relayed.
    let mut first_byte = Some(first_byte);
    let start = async {
        for b in held {
            if let Some(f) = first_byte.take() {
                f.record();
            }
            down.send(b).await?;
        }
        if !rest.is_empty() {
            stats.bytes_up.add(rest.len() as u64);
            up.add(rest.len() as u64);
            send.send(rest).await?;
        }
        Ok(())
    };
    let started = start.await;
    let r = match started {
        Ok(()) => {
            let relaying = relay(
                Leg { src: &mut recv, sink: &mut send, bytes: &stats.bytes_up, tally: &up, first: None },
                Leg { src: &mut up_recv, sink: &mut down, bytes: &stats.bytes_down, tally: &back, first: first_byte },
            );
            match revoke {
                None => relaying.await,
                Some((cancel, client, target)) => {
                    let ended = or(async { Some(relaying.await) }, async {
                        cancel.wait().await;
                        None
                    })
                    .await;
                    match ended {
                        Some(r) => r,
                        None => {
                            // Revoked: the relay was dropped mid-flight; end
                            // both hops with the revocation's status.
                            let e = authz::revoked(client, target);
                            Sink::fail(&mut down, &e).await;
                            send.fail(&e).await;
                            Err(e)
                        }
                    }
                }
            }
        }
        Err(e) => {
            Sink::fail(&mut down, &e).await;
            send.fail(&e).await;
            Err(e)
        }
    };
    tracing::debug!(shard = shard.index, up = up.bytes.get(), down = back.bytes.get(), result = ?r.as_ref().err(), "dial relayed");
    if let Some(t) = trail {
        t.relayed(&r, &up, &back);
    }
    // A reset after establishment is an ordinary cancel (a client dropping
    // a finished stream early): it is not counted against the connection.
    if let Err(e) = r {
        stats.error(e.label);
    }
}

/// Answers `proto.ProxyService/Ping`.
fn answer_ping(mut respond: SendResponse<Bytes>) {
    if let Ok(mut tx) = answer_ok(&mut respond, Side::Peer) {
        let _ = tx.send_now(encode_msg(&ProxyServicePingResponse {}));
        let _ = tx.trailers(Status::ok().to_trailers());
    }
}
