//! Step 2 of the dial pipeline: who the dial is for, and whether the
//! grants let that client reach the agent and service; plus the register
//! of open dials that a `grants revoke --kill-streams` re-checks.
//!
//! Invariants:
//! - The client is the connection's own identity on the client edge. On a
//!   peer link it is the identity the peer asserts (`ringpeer-client-id`),
//!   which must be a client of this cluster: a peer is trusted to say who
//!   its client is, never to widen what that client may reach, because the
//!   serving proxy checks its own grants again.
//! - A refusal names client, agent and service and nothing else: it comes
//!   before any route is looked at, so an unauthorized client learns
//!   neither whether the agent exists nor where it is.
//! - A proxy that has not loaded its grants yet (just started, backend not
//!   reached) refuses nobody for want of a grant: the dial waits for the
//!   first load, bounded, and is then answered UNAVAILABLE (retry-safe),
//!   never a PERMISSION_DENIED that the grants would not have given.
//! - Open dials are registered on their shard only (a `RefCell`, no lock);
//!   a sweep runs when a snapshot brings a newer kill count, and ends each
//!   stream no remaining grant allows with PERMISSION_DENIED.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;

use super::{Caller, Edge};
use crate::proxy::shard::Shard;
use crate::relay::call::CLIENT_ID_HEADER;
use crate::route::grants::{Authorization, GrantTable};
use crate::route::RouteTable;
use crate::runtime::signal::Signal;
use crate::transport::identity::{Role, SpiffeId};
use crate::wire::error::{Error, Label, Retry, Side};
use crate::wire::status::Code;
use crate::wire::DialTarget;

/// How long a dial waits for a proxy that just started to load its grants
/// before it is answered UNAVAILABLE: the same bound as a dial waiting for
/// the first routes (`outbound::REPLAN_WAIT`).
pub const FIRST_LOAD_WAIT: Duration = crate::proxy::outbound::REPLAN_WAIT;

/// The client a dial acts for.
pub struct Client {
    /// Its identity.
    pub id: SpiffeId,
    /// The same, as the header value sent on to peers and agents.
    pub header: HeaderValue,
}

fn denied(side: Side, m: String) -> Error {
    Error::new(Code::PermissionDenied, side, Retry::Never, Label::PermissionDenied, m)
}

/// The client of a dial arriving on `edge` from `caller`.
pub fn client_of(shard: &Shard, caller: &Caller, headers: &http::HeaderMap, edge: Edge) -> Result<Client, Error> {
    if let (Edge::Client, Some(h)) = (edge, &caller.header) {
        return Ok(Client { id: caller.id.clone(), header: h.clone() });
    }
    let Some(h) = headers.get(CLIENT_ID_HEADER) else {
        return Err(denied(Side::Peer, format!("peer {} sent a dial without {CLIENT_ID_HEADER}", caller.id)));
    };
    match h.to_str().ok().and_then(|s| SpiffeId::parse(s).ok()) {
        Some(id) if id.role == Role::Client && id.cluster == shard.shared.cluster => {
            Ok(Client { id, header: h.clone() })
        }
        _ => Err(denied(
            Side::Peer,
            format!(
                "peer {} asserted {CLIENT_ID_HEADER} {:?}, which is not a client of this cluster",
                caller.id,
                String::from_utf8_lossy(&h.as_bytes()[..h.len().min(300)])
            ),
        )),
    }
}

/// Names the agent's default service when the dial names none, as the
/// agent would pick it: its only service, else one called `default`.
/// Unresolved (agent unknown here, or no default) it stays empty, which
/// only a `*` grant matches; the agent then lists its services to the
/// (authorized) client.
pub fn default_service(routes: &RouteTable, target: &mut DialTarget) {
    if !target.service.is_empty() {
        return;
    }
    let Some(r) = routes.get(&target.agent) else { return };
    let services = match (r.local.first(), r.remote.first()) {
        (Some(l), _) => &l.services,
        (None, Some(rm)) => &rm.services,
        (None, None) => return,
    };
    if services.len() == 1 {
        target.service.clone_from(&services[0]);
    } else if services.iter().any(|s| s == "default") {
        target.service = "default".to_string();
    }
}

/// May `client` reach `target`? A refusal on a peer link says which proxy
/// refused: the serving proxy's grants, not the entry proxy's.
pub fn authorize(
    shard: &Shard,
    routes: &RouteTable,
    client: &SpiffeId,
    target: &DialTarget,
    edge: Edge,
) -> Result<(), Error> {
    if shard.shared.authorization == Authorization::AllowAll {
        return Ok(());
    }
    if routes.grants.allows(&client.name, &target.agent, &target.service).is_some() {
        return Ok(());
    }
    let service = if target.service.is_empty() { "(default)" } else { target.service.as_str() };
    let at = match edge {
        Edge::Client => String::new(),
        Edge::Peer => format!(" at proxy {}", shard.shared.id),
    };
    Err(denied(
        Side::Proxy,
        format!(
            "permission denied{at}: client {:?} may not reach agent {:?} service {service:?} (no grant allows it)",
            client.name, target.agent
        ),
    ))
}

/// [`default_service`] and [`authorize`] against the newest snapshot that
/// has the grants: one loaded from the backend, waited for up to
/// [`FIRST_LOAD_WAIT`] (and the dial deadline) by a proxy that has none
/// yet. Alternative rejected: refusing on the empty table of a proxy that
/// just started, which tells a granted client PERMISSION_DENIED (never to
/// retry) for the proxy's own start-up. Returns the snapshot it decided on.
pub async fn authorize_loaded(
    shard: &Shard,
    client: &SpiffeId,
    target: &mut DialTarget,
    edge: Edge,
) -> Result<Arc<RouteTable>, Error> {
    let mut routes = shard.routes();
    let end = Instant::now() + FIRST_LOAD_WAIT.min(shard.dial_timeout());
    loop {
        default_service(&routes, target);
        match authorize(shard, &routes, client, target, edge) {
            Ok(()) => return Ok(routes),
            Err(e) if routes.loaded => return Err(e),
            Err(_) => {}
        }
        let left = end.saturating_duration_since(Instant::now());
        match crate::runtime::timeout(left, shard.next_routes(routes.version)).await {
            Ok(r) => routes = r,
            Err(_) => {
                let m = format!(
                    "proxy {} has not loaded its grants from the route backend yet; try again or another proxy",
                    shard.shared.id
                );
                return Err(Error::new(Code::Unavailable, Side::Proxy, Retry::Safe, Label::NotLoaded, m));
            }
        }
    }
}

struct OpenDial {
    client: String,
    agent: String,
    service: String,
    cancel: Signal,
}

/// The open dials of one shard, for `--kill-streams` sweeps.
#[derive(Default)]
pub struct OpenDials {
    next: Cell<u64>,
    open: RefCell<HashMap<u64, OpenDial>>,
    kills_seen: Cell<u64>,
}

/// A registered dial; unregisters when dropped.
pub struct Registered<'a> {
    dials: &'a OpenDials,
    id: u64,
    /// Fires when a revocation ends this dial.
    pub cancel: Signal,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.dials.open.borrow_mut().remove(&self.id);
    }
}

impl OpenDials {
    /// Registers an established dial of `client` to `target`.
    pub fn register(&self, client: &SpiffeId, target: &DialTarget) -> Registered<'_> {
        let id = self.next.get() + 1;
        self.next.set(id);
        let cancel = Signal::new();
        let d = OpenDial {
            client: client.name.clone(),
            agent: target.agent.clone(),
            service: target.service.clone(),
            cancel: cancel.clone(),
        };
        self.open.borrow_mut().insert(id, d);
        Registered { dials: self, id, cancel }
    }

    /// After a new snapshot: when it carries a kill this shard has not
    /// swept for, ends every open dial `grants` no longer allows. Returns
    /// how many it ended.
    pub fn sweep(&self, grants: &GrantTable, kills: u64) -> usize {
        if kills <= self.kills_seen.replace(kills.max(self.kills_seen.get())) {
            return 0;
        }
        let mut n = 0;
        for d in self.open.borrow().values() {
            if grants.allows(&d.client, &d.agent, &d.service).is_none() && !d.cancel.is_triggered() {
                d.cancel.trigger();
                n += 1;
            }
        }
        n
    }

    /// Open dials registered.
    pub fn len(&self) -> usize {
        self.open.borrow().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.open.borrow().is_empty()
    }
}

/// The error a swept dial ends with.
pub fn revoked(client: &str, target: &DialTarget) -> Error {
    denied(
        Side::Proxy,
        format!("permission revoked: no grant lets client {client:?} reach {target} any more (grants revoke --kill-streams)"),
    )
}
