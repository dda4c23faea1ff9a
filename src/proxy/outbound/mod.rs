//! Outbound: where a resolved dial goes. One [`Upstream`] type with three
//! kinds (a tunnel on this shard, a sibling shard, a peer proxy), one
//! [`plan`] that orders them, and one failover rule ([`after_failure`]).
//!
//! Invariants:
//! - Outbound code never answers the client: it returns an [`Opened`]
//!   upstream or the [`Error`] of the last attempt; `inbound` answers.
//! - Failover decides on the error's retry class only, never on its text,
//!   and every attempt runs within what is left of the one dial deadline.
//! - A dial that arrived over a peer link is served from this proxy's own
//!   tunnels only (no peer upstreams), so a dial crosses at most one link.

pub mod peer;
pub mod sibling;

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::shard::{Shard, TunnelRef};
use crate::relay::call::{self, Established, Outgoing};
use crate::relay::{Chunk, GrpcRecv, GrpcSend, Item, Sink, Source};
use crate::route::RemoteRoute;
use crate::runtime::pipe::{PipeRx, PipeTx};
use crate::transport::h2conf::StreamGuard;
use crate::wire::error::{Error, Label, Retry, Side};
use crate::wire::paths;

/// Times a stream refused unprocessed is retried on the same upstream (a
/// new link that had not yet learned the peer's stream limit).
pub const MAX_REFUSED_RETRIES: u32 = 8;

/// How long a dial whose every upstream failed to reach a holder waits for
/// the routes to change before it gives up: an agent moving between
/// proxies (a drain, a restart in place) shows up at its new holder within
/// this. A dial for an agent marked *moving* waits up to its deadline.
pub const REPLAN_WAIT: Duration = Duration::from_secs(3);

/// A pause after a route change before planning again, so a burst of
/// unrelated changes does not make a failing dial spin.
const REPLAN_COALESCE: Duration = Duration::from_millis(10);

/// One place a dial can be sent.
#[derive(Clone)]
pub enum Upstream {
    /// A tunnel on this shard.
    Local(TunnelRef),
    /// A tunnel on a sibling shard of this proxy.
    Sibling(u32),
    /// A tunnel held by another proxy, reached over a peer link.
    Peer {
        /// The peer's proxy id (checked against its certificate).
        proxy: Rc<str>,
        /// Its peer address (the owning shard's, when published).
        addr: Rc<str>,
    },
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upstream::Local(t) => write!(f, "Local(conn {})", t.conn),
            Upstream::Sibling(k) => write!(f, "Sibling({k})"),
            Upstream::Peer { proxy, addr } => write!(f, "Peer({proxy} at {addr})"),
        }
    }
}

/// Which kind of upstream served a dial (for the audit log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// A tunnel on this shard.
    Local,
    /// A tunnel on sibling shard `k`.
    Sibling(u32),
    /// A peer proxy, by id.
    Peer(Rc<str>),
}

/// The send half of an opened upstream.
pub enum UpSend {
    /// An HTTP/2 stream (tunnel or peer link).
    H2(GrpcSend),
    /// A pipe to the sibling shard that holds the stream.
    Pipe(PipeTx<Item>),
}

/// The receive half of an opened upstream.
pub enum UpRecv {
    /// An HTTP/2 stream (tunnel or peer link).
    H2(GrpcRecv),
    /// A pipe from the sibling shard.
    Pipe(PipeRx<Item>),
}

/// An established upstream dial.
pub struct Opened {
    /// Towards the agent.
    pub send: UpSend,
    /// From the agent.
    pub recv: UpRecv,
    /// Bytes received up to and including `ConnectionEstablished`, to
    /// forward verbatim.
    pub held: Vec<Bytes>,
    /// Keeps the peer link's stream slot for as long as the dial lives.
    pub slot: Option<peer::PeerStream>,
    /// Counts the dial among the tunnel's open streams while it lives.
    pub tunnel_slot: Option<StreamGuard>,
    /// The upstream that served it ([`Upstream::open`] sets it).
    pub via: Via,
}

impl From<Established> for Opened {
    fn from(e: Established) -> Opened {
        Opened {
            send: UpSend::H2(e.send),
            recv: UpRecv::H2(e.recv),
            held: e.held,
            slot: None,
            tunnel_slot: None,
            via: Via::Local,
        }
    }
}

impl Source for UpRecv {
    async fn next(&mut self) -> Result<Chunk, Error> {
        match self {
            UpRecv::H2(r) => Source::next(r).await,
            UpRecv::Pipe(r) => Source::next(r).await,
        }
    }
}

impl Sink for UpSend {
    async fn send(&mut self, b: Bytes) -> Result<(), Error> {
        match self {
            UpSend::H2(s) => Sink::send(s, b).await,
            UpSend::Pipe(s) => Sink::send(s, b).await,
        }
    }

    async fn end(&mut self, t: Option<http::HeaderMap>) -> Result<(), Error> {
        match self {
            UpSend::H2(s) => s.end(t).await,
            UpSend::Pipe(s) => s.end(t).await,
        }
    }

    async fn fail(&mut self, e: &Error) {
        match self {
            UpSend::H2(s) => s.fail(e).await,
            UpSend::Pipe(s) => s.fail(e).await,
        }
    }
}

/// The upstreams for `agent`, in the order to try them: this shard's own
/// tunnel, then a sibling shard's, then (when `peers` is allowed) the other
/// proxies that hold one: draining ones last, live links first, then the
/// least loaded.
/// `link` tells, for a peer address, whether a live link exists and how
/// many streams it carries. A local tunnel whose keepalive ping is overdue
/// (suspect) goes last: the agent or the path to it may be frozen, and a
/// sibling or a peer holder answers sooner.
pub fn plan(
    index: u32,
    local: Option<TunnelRef>,
    siblings: impl IntoIterator<Item = u32>,
    remote: &[RemoteRoute],
    peers: bool,
    link: impl Fn(&str) -> (bool, usize),
) -> Vec<Upstream> {
    let mut out = Vec::with_capacity(1);
    let (local, suspect) = match local {
        Some(t) if t.health.is_suspect() => (None, Some(t)),
        t => (t, None),
    };
    if let Some(t) = local {
        out.push(Upstream::Local(t));
    }
    if let Some(k) = siblings.into_iter().find(|&k| k != index) {
        out.push(Upstream::Sibling(k));
    }
    if peers {
        // Draining holders after the others, then dead links, then load.
        let mut r: Vec<(bool, usize, &RemoteRoute)> = remote
            .iter()
            .filter_map(|r| {
                let (live, load) = link(r.peer_addr.as_deref()?);
                Some((!live, load, r))
            })
            .collect();
        r.sort_by_key(|(dead, load, r)| (r.draining, *dead, *load));
        out.extend(r.into_iter().filter_map(|(_, _, r)| {
            Some(Upstream::Peer { proxy: Rc::from(&*r.proxy), addr: Rc::from(r.peer_addr.as_deref()?) })
        }));
    }
    out.extend(suspect.map(Upstream::Local));
    out
}

/// What to do after an attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Try the same upstream again (it refused the stream unprocessed).
    Again,
    /// Try the next upstream.
    Skip,
    /// Give up: answer the client with this error.
    Stop,
}

/// The failover rule: decided by the retry class (and, for a stream
/// refused unprocessed, how often the same upstream refused already).
pub fn after_failure(e: &Error, refused_here: u32) -> Next {
    match e.retry {
        // Refused unprocessed, or the link went away (GOAWAY) under this very
        // stream: the same holder, on another stream or link, may serve it.
        Retry::Safe if matches!(e.label, Label::Refused | Label::GoAway) && refused_here < MAX_REFUSED_RETRIES => {
            Next::Again
        }
        Retry::Safe => Next::Skip,
        Retry::Unsafe | Retry::Never => Next::Stop,
    }
}

impl Upstream {
    /// Which kind of upstream this is.
    pub fn via(&self) -> Via {
        match self {
            Upstream::Local(_) => Via::Local,
            Upstream::Sibling(k) => Via::Sibling(*k),
            Upstream::Peer { proxy, .. } => Via::Peer(proxy.clone()),
        }
    }

    /// Opens the dial `first` (an encoded `DialRequest`) on this upstream.
    /// `last` says no other upstream is left to try: a peer then gets the
    /// whole remaining deadline to answer, since skipping it would only fail
    /// the dial sooner.
    pub async fn open(
        &self,
        shard: &Rc<Shard>,
        agent: &str,
        dial: &Outgoing,
        left: Duration,
        last: bool,
    ) -> Result<Opened, Error> {
        match self {
            Upstream::Local(t) => {
                shard.stats.dials_local.inc();
                let mut send = t.send.clone();
                let uri = paths::uri(paths::AGENT_DIAL);
                let guard = t.streams.enter();
                let mut o =
                    Opened::from(call::open(&mut send, uri, dial.hop(0), dial.first.clone(), Side::Agent, left).await?);
                o.tunnel_slot = Some(guard);
                Ok(o)
            }
            Upstream::Sibling(k) => {
                shard.stats.dials_cross_shard.inc();
                sibling::open(shard, *k, agent, dial.clone(), left).await
            }
            Upstream::Peer { proxy, addr } => {
                shard.stats.dials_peered.inc();
                let deadline = Instant::now() + left;
                let mut slot = if last {
                    shard.peers.stream_last_resort(proxy, addr, deadline).await?
                } else {
                    shard.peers.stream(proxy, addr, deadline).await?
                };
                let left = deadline.saturating_duration_since(Instant::now());
                let uri = paths::uri(paths::PEER_DIAL);
                let bound = if last { left } else { shard.shared.peer_answer_timeout.min(left) };
                let e = match call::open_bounded(
                    &mut slot.send,
                    uri,
                    dial.hop(1),
                    dial.first.clone(),
                    Side::Peer,
                    bound,
                    left,
                )
                .await
                {
                    Ok(e) => e,
                    Err(e) => {
                        if e.label == Label::Unresponsive {
                            shard.peers.suspect(addr, &e);
                        }
                        return Err(e);
                    }
                };
                let mut o = Opened::from(e);
                o.slot = Some(slot);
                o.via = Via::Peer(proxy.clone());
                Ok(o)
            }
        }
    }
}

/// Tries `plan` in order under one deadline, following [`after_failure`];
/// `tried` names the upstream of the latest attempt (the audit's path of a
/// dial that failed).
pub async fn open(
    shard: &Rc<Shard>,
    plan: &[Upstream],
    agent: &str,
    dial: &Outgoing,
    deadline: Duration,
    tried: &Cell<Option<Via>>,
) -> Result<Opened, Error> {
    let end = Instant::now() + deadline;
    let mut last: Option<Error> = None;
    let (mut i, mut refused) = (0, 0);
    while i < plan.len() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        tried.set(Some(plan[i].via()));
        match plan[i].open(shard, agent, dial, left, i + 1 == plan.len()).await {
            Ok(o) => return Ok(o),
            Err(e) => {
                match after_failure(&e, refused) {
                    Next::Again => refused += 1,
                    Next::Skip => {
                        tracing::debug!(agent, upstream = ?plan[i], error = %e, "upstream failed; trying the next");
                        (i, refused) = (i + 1, 0);
                    }
                    Next::Stop => return Err(e),
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::deadline(Side::Proxy, "the dial deadline passed before any upstream answered")))
}

/// [`open`], planning again when every upstream failed to reach a holder
/// (or there was none yet) and the routes change within [`REPLAN_WAIT`]
/// (or what `resolve` allows: up to the deadline for a moving agent).
/// `resolve` gives the plan and how long the dial may wait for a tunnel
/// when there is none (`None`: it may not); `no_route` the error then.
/// `tried` as in [`open`].
pub async fn open_replanning(
    shard: &Rc<Shard>,
    agent: &str,
    dial: Outgoing,
    deadline: Duration,
    resolve: impl Fn(&Shard) -> (Vec<Upstream>, Option<Duration>),
    no_route: impl Fn() -> Error,
    tried: &Cell<Option<Via>>,
) -> Result<Opened, Error> {
    let end = Instant::now() + deadline;
    let mut last: Option<Error> = None;
    loop {
        let marks = shard.marks();
        let (plan, moving) = resolve(shard);
        if !plan.is_empty() {
            let left = end.saturating_duration_since(Instant::now());
            match open(shard, &plan, agent, &dial, left, tried).await {
                Ok(o) => return Ok(o),
                Err(e) if !e.is_route_failure() => return Err(e),
                Err(e) => last = Some(e),
            }
        } else if moving.is_none() {
            return Err(last.unwrap_or_else(no_route));
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let wait = moving.unwrap_or(REPLAN_WAIT).min(left);
        if crate::runtime::timeout(wait, shard.changed_since(marks)).await.is_err() {
            break;
        }
        tracing::debug!(agent, ?moving, "routes changed; planning the dial again");
        shard.stats.dials_replanned.inc();
        glommio::timer::sleep(REPLAN_COALESCE).await;
    }
    Err(last.unwrap_or_else(|| {
        let m = format!("agent {agent:?} is moving between proxies and no tunnel to it came up before the deadline");
        Error::deadline(Side::Proxy, m).with_retry(Retry::Safe)
    }))
}

#[cfg(test)]
mod tests;
