//! Shared helpers for the end-to-end tests: an in-process fleet built from
//! the production code paths, a client runner, and payload checksums.
#![allow(dead_code)]

pub mod procs;
pub mod redis_ha;
pub mod redis_server;
pub mod stage;

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

/// What a TLS server decided about a client's certificate.
#[derive(Debug)]
pub enum TlsVerdict {
    /// The server refused at the TLS layer: it sent a fatal alert, during
    /// the handshake or (TLS 1.3, where the server judges the client's
    /// certificate after the client has finished) on the first read.
    Refused(rustls::AlertDescription),
    /// The handshake held and the server spoke first on the connection
    /// (HTTP/2 SETTINGS from a server, the preface from a tunnel's h2
    /// client): the TLS layer accepted the certificate.
    Accepted,
    /// Anything else (our side refused the server, a close without an
    /// alert, no answer): not a verdict on our certificate.
    Other(String),
}

/// Handshakes with `addr` using `cfg` and reports the server's verdict. We
/// never write: every ringpeer listener speaks first once TLS is up, so an
/// accepted certificate shows as bytes, a refused one as an alert.
pub fn tls_verdict(addr: SocketAddr, cfg: std::sync::Arc<rustls::ClientConfig>) -> TlsVerdict {
    ringpeer::runtime::block_on("tls-verdict", move || async move {
        use tokio::io::AsyncReadExt;
        let verdict = |e: std::io::Error| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::AlertReceived(a)) => TlsVerdict::Refused(*a),
            _ => TlsVerdict::Other(e.to_string()),
        };
        let tcp = match glommio::net::TcpStream::connect(addr).await {
            Ok(t) => t,
            Err(e) => return TlsVerdict::Other(format!("connect: {e}")),
        };
        let io = ringpeer::transport::io::GlommioIo::new(tcp);
        let name = ringpeer::transport::tls::server_name("127.0.0.1");
        let mut tls = match tokio_rustls::TlsConnector::from(cfg).connect(name, io).await {
            Ok(t) => t,
            Err(e) => return verdict(e),
        };
        let mut buf = [0u8; 64];
        match ringpeer::runtime::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
            Ok(Ok(0)) => TlsVerdict::Other("closed without an alert".into()),
            Ok(Ok(_)) => TlsVerdict::Accepted,
            Ok(Err(e)) => verdict(e),
            Err(_) => TlsVerdict::Other("no answer within 10 s".into()),
        }
    })
    .unwrap()
}

/// A client config that trusts `trust_dir`'s CA and checks the server as
/// certificate `name` of `role` would, but presents `name`'s certificate
/// from `present_dir` (e.g. a foreign CA's): a test of the server's
/// verifier alone, since our side accepts the server.
pub fn client_config_presenting(
    trust_dir: &Path,
    present_dir: &Path,
    name: &str,
    role: ringpeer::transport::identity::Role,
) -> std::sync::Arc<rustls::ClientConfig> {
    let mut cfg = (*client_config_as(trust_dir, name, role, None)).clone();
    cfg.client_auth_cert_resolver = client_config_as(present_dir, name, role, None).client_auth_cert_resolver.clone();
    std::sync::Arc::new(cfg)
}

/// Sum over shards of an error label's count.
pub fn errors(m: &ringpeer::proxy::stats::Metrics, label: &str) -> u64 {
    use ringpeer::wire::error::Label;
    let l = Label::ALL.iter().find(|l| l.name() == label).unwrap_or_else(|| panic!("no error label {label}"));
    m.sum(|s| s.error_count(*l))
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

/// Listeners for a two-shard proxy with the client port open only on shard
/// `client_shard` and the tunnel port only on the other shard, so every
/// dial must cross shards.
pub fn split_shards(client_shard: usize) -> ringpeer::Listeners {
    use ringpeer::runtime::listeners::bind_group;
    let one = |what| bind_group("127.0.0.1:0".parse().unwrap(), 1, what).unwrap().pop();
    let (mut client, mut tunnel) = (vec![None, None], vec![None, None]);
    client[client_shard] = one("client");
    tunnel[1 - client_shard] = one("tunnel");
    ringpeer::Listeners { client, tunnel, peer: vec![], admin: None }
}

/// The audit lines a proxy wrote to `path` (`[audit] path`), parsed; waits
/// up to 5 s for one matching `want` (the writer thread batches lines).
pub fn audit_line(path: &Path, want: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let t0 = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}"))).collect();
        if let Some(l) = lines.iter().find(|l| want(l)) {
            return l.clone();
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "no such audit line in {}:\n{text}", path.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The log filter of the processes tests start: `warn`, or what
/// `RINGPEER_TEST_LOG` says (e.g. `warn,ringpeer=debug` to see a hang).
pub fn child_log() -> String {
    test_log().unwrap_or_else(|| "warn".into())
}

/// `RINGPEER_TEST_LOG`, when set.
pub fn test_log() -> Option<String> {
    std::env::var("RINGPEER_TEST_LOG").ok()
}
