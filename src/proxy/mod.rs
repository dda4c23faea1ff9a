//! The proxy process: binds listeners, starts the control thread and one
//! shard per core, and runs until shutdown.
//!
//! Invariants: everything that can fail because of the operator (bad
//! certificate, port in use, bad config) fails in [`Listeners::bind`] or
//! before the first shard starts, with one clear error; `run` returns only
//! after every shard has stopped.

pub mod admin;
pub mod audit;
pub mod control;
pub mod drain;
pub mod inbound;
pub mod outbound;
pub mod readiness;
pub mod reconfig;
pub mod scrape;
pub mod shard;
pub mod stats;
pub mod tunables;
pub mod upgrade;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::config::BackendKind;
use crate::config::ProxyConfig;
use crate::proxy::control::{Control, ControlOpts, SnapshotCell};
use crate::route::feed::Publish;
use crate::route::model::{now_ms, ProxyInfo};
use crate::route::redis::RedisFactory;
use crate::route::store::{MemoryStore, StoreFactory};
use crate::runtime::listeners::{bind_group, parse_addr, BindError};
use crate::runtime::mailbox::mailbox;
use crate::runtime::{build_version, spawn_executor, Shutdown};
use crate::transport::identity::Role;
use crate::transport::reload::{self, Live};
use crate::transport::tls::TlsMaterial;
use drain::{Drain, Phase};
use shard::{Acceptors, ProxyShared, Shard};
use stats::Metrics;

/// The listening sockets of a proxy, one per shard and role. A `None` leaves
/// that shard without that listener (tests use this to place connections).
pub struct Listeners {
    /// Client edge listeners by shard.
    pub client: Vec<Option<TcpListener>>,
    /// Agent tunnel listeners by shard.
    pub tunnel: Vec<Option<TcpListener>>,
    /// Peer link listeners by shard, each on its own port so a peer stream
    /// lands on the shard that owns the tunnel.
    pub peer: Vec<Option<TcpListener>>,
    /// Admin HTTP listener.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds `SO_REUSEPORT` listeners for every shard of `cfg`.
    pub fn bind(cfg: &ProxyConfig) -> Result<Listeners, BindError> {
        let n = cfg.shard_count();
        let client = bind_group(parse_addr(&cfg.client_addr, "client_addr")?, n, "client_addr")?;
        let tunnel = bind_group(parse_addr(&cfg.tunnel_addr, "tunnel_addr")?, n, "tunnel_addr")?;
        let peer_base = parse_addr(&cfg.peer_addr, "peer_addr")?;
        let peer = (0..n)
            .map(|i| {
                let mut a = peer_base;
                if a.port() != 0 {
                    a.set_port(a.port() + i as u16);
                }
                Ok(bind_group(a, 1, "peer_addr")?.pop())
            })
            .collect::<Result<Vec<_>, BindError>>()?;
        let admin = match &cfg.admin_addr {
            Some(a) => bind_group(parse_addr(a, "admin_addr")?, 1, "admin_addr")?.pop(),
            None => None,
        };
        Ok(Listeners {
            client: client.into_iter().map(Some).collect(),
            tunnel: tunnel.into_iter().map(Some).collect(),
            peer,
            admin,
        })
    }

    fn addr(v: &[Option<TcpListener>]) -> SocketAddr {
        v.iter().flatten().next().and_then(|l| l.local_addr().ok()).expect("at least one listener")
    }

    /// The bound client edge address.
    pub fn client_addr(&self) -> SocketAddr {
        Self::addr(&self.client)
    }

    /// The bound tunnel address.
    pub fn tunnel_addr(&self) -> SocketAddr {
        Self::addr(&self.tunnel)
    }
}

fn to_glommio(l: TcpListener) -> glommio::net::TcpListener {
    // SAFETY: the descriptor is a bound, listening TCP socket we own.
    unsafe { glommio::net::TcpListener::from_raw_fd(l.into_raw_fd()) }
}

/// The address peers should dial for a listener bound at `a`.
fn advertise(a: SocketAddr, cfg: &ProxyConfig) -> String {
    match &cfg.advertise_host {
        Some(h) => format!("{h}:{}", a.port()),
        None if a.ip().is_unspecified() => {
            tracing::warn!(peer_addr = %a, "peer_addr is a wildcard and advertise_host is unset; advertising 127.0.0.1");
            format!("127.0.0.1:{}", a.port())
        }
        None => a.to_string(),
    }
}

/// Checks a config and loads its TLS identity: everything that can fail
/// before a socket is bound.
pub fn preflight(cfg: &ProxyConfig) -> anyhow::Result<TlsMaterial> {
    cfg.validate()?;
    Ok(TlsMaterial::load_as(&cfg.tls, &cfg.cluster, Role::Proxy, &cfg.id)?)
}

/// After telling its agents to move, how long a draining shard waits for
/// their tunnels to go (once its streams are done) before it closes them:
/// an agent that does not know the Drain message then reconnects.
pub const TUNNEL_MOVE_WAIT: Duration = Duration::from_secs(10);

/// What an embedding program (demo, tests) may share with a proxy.
#[derive(Default, Clone)]
pub struct RunOpts {
    /// Counters to fill (one entry per shard); created when absent.
    pub metrics: Option<Metrics>,
    /// Route store to use instead of the one `[backend]` names (several
    /// in-process proxies share one memory store this way).
    pub store: Option<Arc<dyn StoreFactory>>,
    /// Where the latest route snapshot is published.
    pub snapshot: Option<SnapshotCell>,
    /// The drain state the caller drives (SIGTERM in `main`); a proxy
    /// embedded without one never drains, it only stops.
    pub drain: Option<Drain>,
    /// The listeners were taken over from a predecessor that served the
    /// upgrade socket: serve it in its place.
    pub took_over: bool,
    /// Reload requests (SIGHUP in `main`); the certificate files are
    /// watched for changes either way.
    pub reload: Option<reload::Trigger>,
    /// Config reload requests (SIGHUP in `main`, with `reload`): the
    /// config file is read again and what can change live is applied
    /// ([`reconfig`]).
    pub reconfig: Option<crate::config::live::Reconfig>,
}

/// Runs a proxy until `shutdown` fires; returns once every shard stopped.
pub fn run(cfg: ProxyConfig, listeners: Listeners, shutdown: Shutdown) -> anyhow::Result<()> {
    run_with(cfg, listeners, shutdown, RunOpts::default())
}

/// The store factory a config names.
pub fn store_for(cfg: &ProxyConfig) -> anyhow::Result<Arc<dyn StoreFactory>> {
    Ok(match cfg.backend.kind {
        BackendKind::Memory => Arc::new(MemoryStore::new(cfg.backend.events_maxlen)),
        BackendKind::Redis => {
            Arc::new(RedisFactory::with_options(cfg.backend.redis_options()?, &cfg.cluster, cfg.backend.events_maxlen)?)
        }
    })
}

/// Fires a signal when dropped (the side threads' stop, on every exit).
struct EndOnDrop(Shutdown);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

/// [`run`], sharing counters, store or snapshot with the caller.
pub fn run_with(cfg: ProxyConfig, listeners: Listeners, shutdown: Shutdown, opts: RunOpts) -> anyhow::Result<()> {
    let metrics = opts.metrics;
    let tls = preflight(&cfg)?;
    let tls_live = Live::new(tls.clone(), Acceptors::build(&tls)?);
    let who = format!("proxy {}", cfg.id);
    reload::log_loaded(&who, &tls, "loaded");
    let n = listeners.client.len().max(listeners.tunnel.len());
    if n == 0 {
        bail!("no listeners");
    }
    let tunnel_addr = listeners.tunnel_addr().to_string();
    let drain = opts.drain.unwrap_or_default();
    let upgrade_path = cfg.upgrade_socket_path();
    let spare = match &upgrade_path {
        Some(_) => Some(upgrade::Spare::of(&listeners).context("cannot duplicate the listeners for a handover")?),
        None => None,
    };
    let mut h2 = cfg.h2.clone();
    h2.drain_timeout_ms = cfg.drain_timeout_ms;
    let metrics = metrics.filter(|m| m.shards.len() == n).unwrap_or_else(|| Metrics::new(n));
    // Fires once every shard has ended: the side threads stop with it.
    let ended = Shutdown::new();
    let (audit, audit_writer) = match audit::start(&cfg.audit, &cfg.id, metrics.audit.clone(), ended.clone())
        .with_context(|| format!("audit.path {:?}", cfg.audit.path))?
    {
        Some((a, w)) => (Some(a), Some(w)),
        None => (None, None),
    };
    // Should a later step fail, the side threads (the audit writer) stop too.
    let _ended_on_exit = EndOnDrop(ended.clone());
    let live = tunables::LiveTunables::new(cfg.limits.clone(), Duration::from_millis(cfg.dial_timeout_ms));
    let shared = Arc::new(ProxyShared {
        id: cfg.id.clone(),
        h2,
        live: live.clone(),
        peer_connect_timeout: Duration::from_millis(cfg.peer_connect_timeout_ms),
        peer_answer_timeout: Duration::from_millis(cfg.peer_answer_timeout_ms),
        authorization: cfg.authorization,
        cluster: cfg.cluster.clone(),
        audit,
        tunnel_addr,
        tls: tls_live.clone(),
    });
    let (boxes, inboxes): (Vec<_>, Vec<_>) = (0..n).map(|_| mailbox(shard::MAILBOX_DIALS)).unzip();
    let store = match opts.store {
        Some(s) => s,
        None => store_for(&cfg)?,
    };
    let me = ProxyInfo {
        id: cfg.id.clone(),
        peer_addrs: {
            let addrs: Vec<String> = listeners
                .peer
                .iter()
                .map(|l| l.as_ref().and_then(|l| l.local_addr().ok()).map(|a| advertise(a, &cfg)).unwrap_or_default())
                .collect();
            if cfg.shard_aware_peering {
                addrs
            } else {
                vec![addrs.first().cloned().unwrap_or_default(); addrs.len()]
            }
        },
        tunnel_addr: listeners.tunnel_addr().to_string(),
        client_addr: listeners.client_addr().to_string(),
        version: now_ms(),
        draining: false,
        build: build_version().to_string(),
    };
    let copts = ControlOpts {
        me,
        ttl: Duration::from_millis(cfg.backend.proxy_ttl_ms),
        resync: Duration::from_millis(cfg.backend.resync_interval_ms),
        strategy: cfg.strategy,
    };
    let publish: Publish = {
        let boxes = boxes.clone();
        Box::new(move |t| {
            for b in &boxes {
                let _ = b.replace(t.clone());
            }
        })
    };
    // `[[grants]]` (embedded store only, see `config`) go in before the
    // control thread's first load, so the first snapshot already has them
    // and no dial meets an empty grant table at start.
    if !cfg.grants.is_empty() {
        let mut w = store.connect()?;
        for g in &cfg.grants {
            w.put_grant(&g.grant().map_err(anyhow::Error::msg)?)?;
        }
    }
    let reconfig_store = store.clone();
    let control = Control::spawn(copts, store, publish, opts.snapshot.unwrap_or_default())?;
    // Shards that serve their listeners (readiness).
    let serving = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let admin = match listeners.admin {
        Some(l) => {
            let observed = readiness::Observed {
                proxy: cfg.id.clone(),
                metrics: metrics.clone(),
                snapshot: control.snapshot.clone(),
                health: control.health.clone(),
                drain: drain.clone(),
                tls: tls_live.clone(),
                serving: serving.clone(),
            };
            Some(admin::spawn(l, observed, ended.clone())?)
        }
        None => None,
    };
    let mut side = Vec::new();
    {
        let (files, c) = (cfg.tls.clone(), cfg.clone());
        let src = reload::Source {
            who,
            files,
            load: Box::new(move || TlsMaterial::load_as(&c.tls, &c.cluster, Role::Proxy, &c.id)),
            build: Box::new(Acceptors::build),
        };
        // Not joined: it ends within a poll of `ended`.
        reload::spawn(src, tls_live.clone(), opts.reload.clone().unwrap_or_default(), ended.clone())?;
    }
    if let Some(rc) = opts.reconfig.clone() {
        let t = reconfig::Targets { tunables: live.clone(), store: reconfig_store };
        side.push(reconfig::spawn(cfg.clone(), rc, t, ended.clone())?);
    }
    if let (Some(path), Some(spare)) = (upgrade_path, spare) {
        let (d, c, e) = (drain.clone(), control.commands.clone(), ended.clone());
        side.push(upgrade::serve(path, spare, d, c, e, opts.took_over)?);
    }
    {
        let (d, c, e) = (drain.clone(), control.commands.clone(), ended.clone());
        let wait = Duration::from_millis(cfg.handover_wait_ms);
        side.push(std::thread::Builder::new().name("drain".into()).spawn(move || drain::coordinate(d, c, wait, e))?);
    }
    let drain_timeout = Duration::from_millis(cfg.drain_timeout_ms);
    let cpus = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let mut client = listeners.client;
    let mut tunnel = listeners.tunnel;
    let mut peer = listeners.peer;
    client.resize_with(n, || None);
    tunnel.resize_with(n, || None);
    peer.resize_with(n, || None);
    let mut handles = Vec::with_capacity(n);
    for (i, (((inbox, cl), tl), pl)) in inboxes.into_iter().zip(client).zip(tunnel).zip(peer).enumerate() {
        let (shared, stats, boxes, events, sd) =
            (shared.clone(), metrics.shards[i].clone(), boxes.clone(), control.events.clone(), shutdown.clone());
        let (drain, serving) = (drain.clone(), serving.clone());
        let cpu = cfg.pin_cpus.then_some(i % cpus);
        let h = spawn_executor(&format!("{}-shard{i}", cfg.id), cpu, move || async move {
            let shard = Rc::new(Shard::new(i as u32, shared, stats, boxes, events));
            glommio::spawn_local(shard.clone().run_inbox(inbox)).detach();
            let mut tasks = Vec::new();
            if let Some(l) = cl {
                tasks.push(glommio::spawn_local(inbound::accept_loop(shard.clone(), to_glommio(l))));
            }
            if let Some(l) = tl {
                tasks.push(glommio::spawn_local(inbound::tunnel::accept_loop(shard.clone(), to_glommio(l))));
            }
            let peers = pl.map(|l| glommio::spawn_local(inbound::peer_accept_loop(shard.clone(), to_glommio(l))));
            readiness::Observed::shard_serving(&serving);
            // The one wait on the process-wide signals; connections wait on
            // the shard's own.
            let mode = futures_lite::future::or(
                async {
                    sd.wait().await;
                    None
                },
                async {
                    drain.begun().wait().await;
                    Some(drain.phase())
                },
            )
            .await;
            shard.drain_mode.set(mode);
            shard.stopping.trigger();
            // Leaving the fleet, peers still reach this proxy's agents
            // until they have moved: peer links stay served meanwhile.
            if mode != Some(Phase::Leaving) {
                shard.peer_stopping.trigger();
            }
            for t in tasks {
                t.await;
            }
            match mode {
                // Stopped without the drain protocol (tests, the demo):
                // let open streams finish for a short while.
                None => {
                    let _ =
                        crate::runtime::timeout(crate::transport::h2conf::DRAIN_TIMEOUT, shard.streams.idle()).await;
                }
                Some(_) => {
                    let settled = shard.settle(TUNNEL_MOVE_WAIT);
                    let cut = async {
                        sd.wait().await;
                        tracing::warn!(shard = shard.index, "stopped during the drain; closing open streams");
                    };
                    if crate::runtime::timeout(drain_timeout, futures_lite::future::or(settled, cut)).await.is_err() {
                        tracing::warn!(
                            shard = shard.index,
                            ?drain_timeout,
                            "drain_timeout passed; closing open streams"
                        );
                    }
                }
            }
            shard.peer_stopping.trigger();
            if let Some(t) = peers {
                t.await;
            }
            // Close every remaining connection and wait for their tasks to
            // end, then give the reactor a moment to complete the socket
            // closes (glommio closes through the ring), so a successor can
            // bind the same ports at once.
            shard.closing.trigger();
            let _ = crate::runtime::timeout(Duration::from_secs(1), shard.conns.idle()).await;
            glommio::timer::sleep(Duration::from_millis(20)).await;
        })
        .context("cannot start shard")?;
        handles.push(h);
    }
    tracing::info!(proxy = %cfg.id, shards = n, "proxy running");
    let mut failed = None;
    for h in handles {
        if let Err(e) = h.join() {
            failed = Some(e.to_string());
        }
    }
    ended.trigger();
    if let Some(w) = audit_writer {
        w.finish(audit::STOP_WAIT);
    }
    control.stop();
    if let Some(a) = admin {
        let _ = a.join();
    }
    for t in side {
        let _ = t.join();
    }
    if drain.phase() != Phase::Running {
        tracing::info!(proxy = %cfg.id, phase = ?drain.phase(), "drained");
    }
    if let Some(e) = failed {
        bail!("a shard failed: {e}");
    }
    Ok(())
}
