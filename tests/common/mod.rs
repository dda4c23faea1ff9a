//! Shared helpers for the end-to-end tests: an in-process fleet built from
//! the production code paths, a client runner, and payload checksums.
#![allow(dead_code)]

pub mod procs;
pub mod redis_server;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rand::RngCore;
use ringpeer::client::Client;
use ringpeer::tools::fleet::{agent_config, proxy_config, AgentHandle, CertDir, ProxyHandle};
use ringpeer::tools::target::{self as targets, Kind, Target};
use ringpeer::transport::h2conf::H2Tuning;
use sha2::{Digest, Sha256};

/// A proxy with agent-1 (echo, sink, refused) and agent-2 (echo).
pub struct Fleet {
    pub certs: CertDir,
    pub echo: Target,
    pub sink: Target,
    pub proxy: ProxyHandle,
    pub agents: Vec<AgentHandle>,
}

/// An address nothing listens on (bound then closed).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

impl Fleet {
    pub fn start(shards: usize) -> Fleet {
        ringpeer::runtime::raise_memlock();
        let certs = CertDir::temp().unwrap();
        let echo = targets::spawn(Kind::Echo).unwrap();
        let sink = targets::spawn(Kind::Sink).unwrap();
        let proxy = ProxyHandle::start(proxy_config(&certs.path, "proxy-a", shards)).unwrap();
        let a1 = agent_config(
            &certs.path,
            "agent-1",
            &[proxy.tunnel_addr],
            &[("echo", echo.addr), ("sink", sink.addr), ("refused", dead_addr())],
        );
        let a2 = agent_config(&certs.path, "agent-2", &[proxy.tunnel_addr], &[("echo", echo.addr)]);
        let agents = vec![AgentHandle::start(a1).unwrap(), AgentHandle::start(a2).unwrap()];
        proxy.wait_tunnels(2, Duration::from_secs(10)).unwrap();
        Fleet { certs, echo, sink, proxy, agents }
    }

    pub fn dir(&self) -> &Path {
        &self.certs.path
    }

    /// Runs `f` with a client connected to the proxy, on a fresh executor.
    pub fn client<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        with_client(self.proxy.client_addr, self.dir(), "client", f)
    }
}

/// Runs `f` with a client connected to `addr` using certificate `name`.
pub fn with_client<F, Fut, T>(addr: SocketAddr, dir: &Path, name: &str, f: F) -> T
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let tls = ringpeer::client::client_tls(dir, name).unwrap();
    ringpeer::runtime::block_on("test-client", move || async move {
        let c = Client::connect(&addr.to_string(), &tls, &H2Tuning::default()).await.expect("client connects");
        f(c).await
    })
    .unwrap()
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

pub fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// Waits up to 15 s for `cond` (server-side counters are updated after the
/// client already saw the outcome).
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(15), "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A client TLS config presenting certificate `name` (of `role`) from
/// `dir`, expecting a proxy (named `expect`, when given).
pub fn client_config_as(
    dir: &Path,
    name: &str,
    role: ringpeer::transport::identity::Role,
    expect: Option<&str>,
) -> std::sync::Arc<rustls::ClientConfig> {
    let m = ringpeer::transport::tls::TlsMaterial::load(
        &ringpeer::transport::tls::TlsFiles::in_dir(dir, name),
        "demo",
        role,
    )
    .unwrap();
    m.client_config(ringpeer::transport::identity::Role::Proxy, expect).unwrap()
}
