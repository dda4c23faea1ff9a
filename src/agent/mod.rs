//! The agent: dials out to proxies (it never listens), keeps reverse
//! tunnels to the proxies its strategy asks for ([`super::strategy`]), and
//! serves dials by connecting to its local services.
//!
//! Invariants: each tunnel reconnects with capped jittered backoff and logs
//! once per state change, not once per retry; a dial for an unknown service
//! or a refusing target ends with NOT_FOUND / UNAVAILABLE and a message that
//! names them; bytes go target ↔ tunnel through [`splice`].
//! Budgets (`[limits]`): streams and dials in set-up per tunnel, and the
//! bytes its relay holds ([`BufMeter`]); past one a dial is answered
//! RESOURCE_EXHAUSTED naming it, so the agent's memory is bounded by its
//! budgets, not by its clients. A dial the proxy resets (its caller left,
//! its deadline passed) stops connecting, or closes its target connection.
//! Who may reach what: a service with an `allow` list serves only the
//! clients it names, checked against the identity the proxies vouch for
//! (`ringpeer-client-id`) before the target is connected ([`services`]).
//! Which proxy it tunnels to: an address from the pushed proxy set must
//! present that entry's proxy certificate (`proxy_tls`).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::future::or;
use h2::server::SendResponse;
use h2::RecvStream;
use http::Request;

use crate::runtime::budget::{AgentLimits, BufMeter};
use crate::runtime::listeners::{bind_group, parse_addr};
pub mod admin;
mod dial;
mod proxy_tls;
mod reconfig;
pub mod services;
pub mod stats;
pub mod strategy;
mod tunnels;

use crate::config::AgentConfig;
use crate::relay::call::{answer_error, answer_ok};
use crate::relay::grpc::{GrpcRecv, Msgs};
use crate::route::model::Strategy;
use crate::runtime::signal::Signal;
use crate::runtime::{timeout, Shutdown};
use crate::transport::flood::FloodMeter;
use crate::transport::h2conf::{serve, ActiveStreams, H2Tuning};
use crate::transport::identity::valid_name;
use crate::transport::identity::Role;
use crate::transport::reload::{Live, Source, Trigger};
use crate::transport::tls::TlsMaterial;

/// Fires a [`Shutdown`] when dropped (stops the side threads however the
/// agent returns).
struct EndOnDrop(Shutdown);
impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}
use crate::transport::ClientTls;
use crate::wire::codec::{encode_msg, MAX_CONTROL_STREAM_MSG};
use crate::wire::error::{Error, Label, Retry, Side};
use crate::wire::paths;
use crate::wire::pb::v1::{agent_message, control_message, AgentHello, AgentMessage, ControlMessage};
use crate::wire::status::{Code, Status};
use proxy_tls::ProxyTls;
use services::LiveServices;
use stats::AgentStats;
use strategy::{Membership, Slot, LEAVING_FOR};

struct AgentCtx {
    id: String,
    cluster: String,
    /// The services in force (SIGHUP replaces them).
    services: LiveServices,
    /// Client configs towards proxies: any proxy at a seed, the named one
    /// at an address from the pushed proxy set; they follow reloads.
    tls: ProxyTls,
    /// The last refusal of our certificate a proxy sent (logged once per change).
    refused: std::cell::Cell<Option<&'static str>>,
    h2: H2Tuning,
    connect_timeout: Duration,
    shutdown: Shutdown,
    membership: RefCell<Membership>,
    /// Per-agent override of the cluster's agent_connection_count.
    count_override: Option<u32>,
    /// Budgets (`[limits]`).
    limits: AgentLimits,
    /// Bytes the relay holds (the agent runs one shard).
    buf: BufMeter,
    /// What the admin endpoint reports.
    stats: Arc<AgentStats>,
}

impl AgentCtx {
    /// Answers a dial with `e`, counted by its label.
    fn fail(&self, respond: SendResponse<Bytes>, e: &Error) {
        self.stats.error(e);
        answer_error(respond, e)
    }
}

/// Runs an agent until `shutdown` fires.
pub fn run(cfg: AgentConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    run_with(cfg, shutdown, None, None)
}

/// [`run`], reloading its certificates on `reload` (SIGHUP in `main`) as
/// well as when the files change, and its config file on `reconfig`
/// (see [`reconfig`]).
pub fn run_with(
    cfg: AgentConfig,
    shutdown: Shutdown,
    reload: Option<Trigger>,
    reconfig: Option<crate::config::live::Reconfig>,
) -> anyhow::Result<()> {
    cfg.validate()?;
    // Bound first: a taken admin port fails the start, before any tunnel.
    let admin = match &cfg.admin_addr {
        Some(a) => bind_group(parse_addr(a, "admin_addr")?, 1, "admin_addr")?.pop(),
        None => None,
    };
    let tls = TlsMaterial::load_as(&cfg.tls, &cfg.cluster, Role::Agent, &cfg.id)?;
    let services = LiveServices::new(services::from_config(&cfg.services)?);
    let build = |m: &TlsMaterial| proxy_tls::build(m, None);
    let live = Live::new(tls.clone(), build(&tls)?);
    let who = format!("agent {}", cfg.id);
    crate::transport::reload::log_loaded(&who, &tls, "loaded");
    let ended = Shutdown::new();
    // Stops the reload and admin threads however the agent returns.
    let stop_side = EndOnDrop(ended.clone());
    let c = cfg.clone();
    let src = Source {
        who,
        files: cfg.tls.clone(),
        load: Box::new(move || TlsMaterial::load_as(&c.tls, &c.cluster, Role::Agent, &c.id)),
        build: Box::new(build),
    };
    crate::transport::reload::spawn(src, live.clone(), reload.unwrap_or_default(), ended.clone())?;
    if let Some(rc) = reconfig {
        // Not joined: it ends within a poll of `ended`.
        reconfig::spawn(cfg.clone(), rc, ended.clone(), services.clone())?;
    }
    let stats = Arc::new(AgentStats::default());
    let admin = match admin {
        Some(l) => {
            let o = admin::Observed {
                agent: cfg.id.clone(),
                stats: stats.clone(),
                shutdown: shutdown.clone(),
                tls: live.clone(),
            };
            Some(admin::spawn(l, o, ended.clone())?)
        }
        None => None,
    };
    let client = ProxyTls::new(live);
    let proxies = cfg.proxies.clone();
    let name = format!("agent-{}", cfg.id);
    let ran = crate::runtime::block_on(&name, move || async move {
        let ctx = Rc::new(AgentCtx {
            id: cfg.id,
            cluster: cfg.cluster,
            services,
            tls: client,
            refused: Default::default(),
            h2: H2Tuning { drain_timeout_ms: cfg.drain_timeout_ms, ..cfg.h2 },
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            shutdown,
            membership: RefCell::default(),
            count_override: cfg.agent_connection_count,
            buf: BufMeter::with_gauge(cfg.limits.shard_buffer_bytes, stats.buffered.clone()),
            limits: cfg.limits,
            stats,
        });
        tunnels::manage(ctx, proxies).await;
    });
    drop(stop_side);
    if let Some(h) = admin {
        // Ends within admin_http::SHUTDOWN_GRACE of `ended`.
        let _ = h.join();
    }
    ran?;
    Ok(())
}

async fn serve_tunnel(ctx: Rc<AgentCtx>, tls: ClientTls, slot: &Slot) -> &'static str {
    let stop = &slot.stop;
    let active = ActiveStreams::with_pool(ctx.limits.streams_per_conn, ctx.limits.setup_per_conn, &ctx.buf);
    let metered = FloodMeter::new(tls, &active);
    let builder = ctx.h2.link_server();
    let conn = match timeout(ctx.h2.handshake_timeout(), builder.handshake::<_, Bytes>(metered)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // The proxy's verdict on our certificate arrives here (TLS 1.3).
            let Some(why) = crate::transport::verify::explain_refusal(&e) else { return "h2_handshake_failed" };
            if ctx.refused.replace(Some(why)) != Some(why) {
                tracing::warn!(agent = ctx.id, "the proxy refused our certificate: {why}");
            }
            return "certificate_refused";
        }
        Err(_) => return "h2_handshake_failed",
    };
    ctx.refused.set(None);
    // The strategy reads this tunnel's keepalive verdict: a proxy that
    // stops answering pings is replaced without waiting for the timeout.
    *slot.health.borrow_mut() = active.health().clone();
    // Drain on agent shutdown or when the strategy no longer wants this tunnel.
    let drain = Signal::new();
    let d = drain.clone();
    let (sd, st) = (ctx.shutdown.clone(), stop.clone());
    glommio::spawn_local(async move {
        or(sd.wait(), st.wait()).await;
        d.trigger();
    })
    .detach();
    serve(conn, &ctx.h2, &drain, &active, true, |req, respond| {
        let (ctx, drain, active, slot) = (ctx.clone(), drain.clone(), active.clone(), slot.clone());
        glommio::spawn_local(async move {
            match req.uri().path() {
                paths::AGENT_DIAL => dial::handle(ctx, &active, req, respond).await,
                // Not counted in the stream budget: it is the tunnel's own.
                paths::AGENT_CONTROL => handle_control(ctx, req, respond, drain, &slot).await,
                other => {
                    let m = format!("unknown method {other}");
                    answer_error(
                        respond,
                        &Error::new(Code::Unimplemented, Side::Proxy, Retry::Never, Label::Unimplemented, m),
                    )
                }
            }
        })
        .detach();
    })
    .await
}

/// What wakes the control loop of a tunnel.
enum Wake {
    /// A message from the proxy, the stream's end, or an error.
    Message(Result<Option<ControlMessage>, Error>),
    /// The tunnel drains (agent shutdown, or no longer wanted).
    Drain,
    /// A reload replaced the services: announce them again.
    Services,
}

/// Serves Agent/Control until the proxy closes it or the tunnel drains
/// (ending it first tells the proxy to stop routing new dials here).
async fn handle_control(
    ctx: Rc<AgentCtx>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    drain: Signal,
    slot: &Slot,
) {
    let Ok(mut tx) = answer_ok(&mut respond, Side::Proxy) else { return };
    let hello = |v: &services::Version| {
        encode_msg(&AgentMessage {
            message: Some(agent_message::Message::Hello(AgentHello {
                services: v.services.keys().cloned().collect(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            })),
        })
    };
    let mut announced = ctx.services.current();
    if tx.send_now(hello(&announced)).is_err() {
        return;
    }
    let mut rx = GrpcRecv::new(req.into_body(), Msgs::<ControlMessage>::new(MAX_CONTROL_STREAM_MSG), Side::Proxy);
    loop {
        // On shutdown the control stream ends first, so the proxy stops
        // routing here and the tunnel drains. A reload that changed the
        // services is announced again (the proxy updates its route).
        let wake = or(
            async { Wake::Message(rx.next().await) },
            or(
                async {
                    drain.wait().await;
                    Wake::Drain
                },
                async {
                    announced.superseded.wait().await;
                    Wake::Services
                },
            ),
        );
        match wake.await {
            Wake::Message(Ok(Some(m))) => on_control(&ctx, m, slot),
            Wake::Message(Ok(None)) | Wake::Drain => break,
            Wake::Message(Err(e)) => {
                tracing::warn!(agent = ctx.id, error = %e, "bad control message");
                let _ = tx.trailers(e.to_trailers());
                return;
            }
            Wake::Services => {
                announced = ctx.services.current();
                if tx.send(hello(&announced)).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.trailers(Status::ok().to_trailers());
}

/// Applies one control message: the proxy set, the strategy, or a drain
/// of the tunnel it came on.
fn on_control(ctx: &AgentCtx, m: ControlMessage, slot: &Slot) {
    match m.message {
        Some(control_message::Message::ProxySet(s)) => {
            let valid = || s.proxies.iter().filter(|p| valid_name(&p.id) && !p.tunnel_addr.is_empty());
            let set: BTreeMap<String, String> = valid().map(|p| (p.id.clone(), p.tunnel_addr.clone())).collect();
            let draining: BTreeSet<String> = valid().filter(|p| p.draining).map(|p| p.id.clone()).collect();
            let mut m = ctx.membership.borrow_mut();
            if m.proxies != set || m.draining != draining {
                ctx.tls.retain(&set);
                tracing::info!(
                    agent = ctx.id,
                    from = s.self_,
                    proxies = ?set.keys().collect::<Vec<_>>(),
                    draining = ?draining,
                    "proxy set"
                );
                m.proxies = set;
                m.draining = draining;
                m.generation += 1;
            }
        }
        Some(control_message::Message::Drain(d)) => {
            let proxy = slot.proxy.borrow().clone().unwrap_or_default();
            tracing::info!(agent = ctx.id, proxy, successor = d.successor, "proxy drains this tunnel");
            if d.successor {
                slot.replace.set(true);
            } else {
                let mut m = ctx.membership.borrow_mut();
                m.leaving.insert(proxy, Instant::now() + LEAVING_FOR);
                m.generation += 1;
            }
        }
        Some(control_message::Message::Strategy(s)) => match Strategy::from_pb(&s) {
            Ok(s) => {
                let mut m = ctx.membership.borrow_mut();
                if m.strategy != s {
                    tracing::info!(agent = ctx.id, strategy = %s, "tunnel strategy");
                    m.strategy = s;
                    m.generation += 1;
                }
            }
            Err(e) => tracing::warn!(agent = ctx.id, error = %e, "ignoring a bad strategy"),
        },
        None => {}
    }
}
