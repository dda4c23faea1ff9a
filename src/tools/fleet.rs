//! A fleet in one process: certificates in a directory, proxies and agents
//! as threads with real sockets and TLS. Used by `demo`, `bench` and the
//! in-process tests.
//!
//! Invariant: every part is the production code path (`proxy::run`,
//! `tunnel::agent::run`); only the process boundary is missing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::{AgentConfig, BackendConfig, ProxyConfig, ServiceSpec};
use crate::proxy::control::SnapshotCell;
use crate::proxy::stats::Metrics;
use crate::proxy::{run_with, Listeners, RunOpts};
use crate::route::store::StoreFactory;
use crate::runtime::Shutdown;
use crate::transport::h2conf::H2Tuning;
use crate::transport::tls::TlsFiles;

/// A proxy config for `id` with certificates from `dir`, on 127.0.0.1:0.
pub fn proxy_config(dir: &Path, id: &str, shards: usize) -> ProxyConfig {
    ProxyConfig {
        cluster: "demo".into(),
        id: id.into(),
        shards: Some(shards),
        client_addr: "127.0.0.1:0".into(),
        tunnel_addr: "127.0.0.1:0".into(),
        peer_addr: "127.0.0.1:0".into(),
        advertise_host: None,
        shard_aware_peering: true,
        pin_cpus: false,
        dial_timeout_ms: 10_000,
        peer_connect_timeout_ms: 1_000,
        peer_answer_timeout_ms: 500,
        tls: TlsFiles::in_dir(dir, id),
        backend: BackendConfig::default(),
        strategy: Default::default(),
        admin_addr: None,
        h2: H2Tuning::default(),
        limits: Default::default(),
        drain_timeout_ms: 300_000,
        handover_wait_ms: 5_000,
        upgrade_socket: None,
        authorization: Default::default(),
        grants: vec![open_grant()],
        // demo and bench print their reports on stdout; tests that read
        // the audit set a file.
        audit: crate::config::AuditConfig::off(),
        log_level: None,
    }
}

/// The grant an in-process fleet starts with: every client of its CA may
/// reach every agent's every service. Tests that exercise grants replace it.
pub fn open_grant() -> crate::config::GrantSpec {
    let any = vec!["*".to_string()];
    crate::config::GrantSpec { name: "fleet".into(), clients: any.clone(), agents: any.clone(), services: any }
}

/// An agent config for `id` dialling `proxies`, serving `services`.
pub fn agent_config(dir: &Path, id: &str, proxies: &[SocketAddr], services: &[(&str, SocketAddr)]) -> AgentConfig {
    AgentConfig {
        cluster: "demo".into(),
        id: id.into(),
        proxies: proxies.iter().map(|p| p.to_string()).collect(),
        tls: TlsFiles::in_dir(dir, id),
        services: services
            .iter()
            .map(|(n, a)| (n.to_string(), ServiceSpec::open(a.to_string())))
            .collect::<BTreeMap<_, _>>(),
        connect_timeout_ms: 2_000,
        agent_connection_count: None,
        h2: H2Tuning::default(),
        limits: Default::default(),
        drain_timeout_ms: 300_000,
        log_level: None,
        admin_addr: None,
    }
}

/// A proxy running on threads of this process.
pub struct ProxyHandle {
    /// Client edge address.
    pub client_addr: SocketAddr,
    /// Tunnel address.
    pub tunnel_addr: SocketAddr,
    /// Its counters.
    pub metrics: Metrics,
    /// Its latest route snapshot.
    pub snapshot: SnapshotCell,
    shutdown: Shutdown,
    join: Option<JoinHandle<anyhow::Result<()>>>,
}

impl ProxyHandle {
    /// Starts a proxy with the given listeners.
    pub fn start_with(cfg: ProxyConfig, listeners: Listeners) -> anyhow::Result<ProxyHandle> {
        Self::start_full(cfg, listeners, None)
    }

    /// Starts a proxy with the given listeners and, optionally, a route
    /// store shared with other in-process proxies.
    pub fn start_full(
        cfg: ProxyConfig,
        listeners: Listeners,
        store: Option<Arc<dyn StoreFactory>>,
    ) -> anyhow::Result<ProxyHandle> {
        let (client_addr, tunnel_addr) = (listeners.client_addr(), listeners.tunnel_addr());
        let metrics = Metrics::new(listeners.client.len().max(listeners.tunnel.len()));
        let snapshot = SnapshotCell::default();
        let shutdown = Shutdown::new();
        let opts =
            RunOpts { metrics: Some(metrics.clone()), store, snapshot: Some(snapshot.clone()), ..Default::default() };
        let sd = shutdown.clone();
        let join = std::thread::Builder::new()
            .name(format!("proxy-{}", cfg.id))
            .spawn(move || run_with(cfg, listeners, sd, opts))?;
        Ok(ProxyHandle { client_addr, tunnel_addr, metrics, snapshot, shutdown, join: Some(join) })
    }

    /// This proxy's shard-0 peer address, once its record is published.
    pub fn routes_eventually_self_peer_addr(&self) -> String {
        let t0 = Instant::now();
        loop {
            let r = self.routes();
            if let Some(a) = r
                .proxies
                .values()
                .find(|p| p.client_addr == self.client_addr.to_string())
                .and_then(|p| p.peer_addrs.first())
            {
                return a.clone();
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "proxy record never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The latest route snapshot.
    pub fn routes(&self) -> Arc<crate::route::RouteTable> {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Binds and starts a proxy.
    pub fn start(cfg: ProxyConfig) -> anyhow::Result<ProxyHandle> {
        let l = Listeners::bind(&cfg)?;
        Self::start_with(cfg, l)
    }

    /// Waits until this proxy holds `n` tunnels and every shard routes by
    /// a snapshot that lists them.
    pub fn wait_tunnels(&self, n: i64, within: Duration) -> anyhow::Result<()> {
        let t0 = Instant::now();
        loop {
            let held = self.metrics.shards.iter().map(|s| s.tunnels.get()).sum::<i64>();
            let r = self.routes();
            let listed = r.agents.values().map(|a| a.local.len() as i64).sum::<i64>();
            let applied = self.metrics.shards.iter().all(|s| s.route_version.get() >= r.version as i64);
            if held >= n && listed >= n && applied {
                return Ok(());
            }
            if t0.elapsed() > within {
                anyhow::bail!("agents did not connect within {within:?} ({held} tunnels, {listed} routed)");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the proxy and waits for it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        self.join.take().expect("joined once").join().map_err(|_| anyhow::anyhow!("proxy thread panicked"))?
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// An agent running on a thread of this process.
pub struct AgentHandle {
    shutdown: Shutdown,
    join: Option<JoinHandle<anyhow::Result<()>>>,
}

impl AgentHandle {
    /// Starts an agent.
    pub fn start(cfg: AgentConfig) -> anyhow::Result<AgentHandle> {
        let shutdown = Shutdown::new();
        let sd = shutdown.clone();
        let join = std::thread::Builder::new()
            .name(format!("agent-{}", cfg.id))
            .spawn(move || crate::agent::run(cfg, sd))
            .context("cannot start agent thread")?;
        Ok(AgentHandle { shutdown, join: Some(join) })
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// A certificates directory: a temporary one, or a kept path.
pub struct CertDir {
    /// The directory.
    pub path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl CertDir {
    /// Creates a temporary directory with `certs init --cluster demo`.
    pub fn temp() -> anyhow::Result<CertDir> {
        let tmp = tempfile::Builder::new().prefix("ringpeer-demo-").tempdir()?;
        crate::transport::certs::init(tmp.path(), "demo")?;
        Ok(CertDir { path: tmp.path().to_path_buf(), _tmp: Some(tmp) })
    }

    /// Keeps the directory after the process exits.
    pub fn keep(mut self) -> PathBuf {
        if let Some(t) = self._tmp.take() {
            let _ = t.keep();
        }
        self.path
    }
}
