//! The stage of the budget and stall stories: a proxy process and an agent
//! process (so each RSS is its own) in front of a target in the test
//! process, raw HTTP/2 clients, RSS and metrics probes, and the lock that
//! makes the stories take turns.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringpeer::tools::fleet::CertDir;
use ringpeer::tools::target::{self as targets, Kind, Target};
use ringpeer::transport::h2conf::H2Tuning;
use ringpeer::wire::paths;

use super::procs::{free_addr, metric, spawn_agent, start_proxy, write_agent_config, Proc};

pub const BIN: &str = env!("CARGO_BIN_EXE_ringpeer");

/// The stories here each load both cores (proxy, agent, target and an
/// attacker); two at once would measure each other. They take turns.
pub static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}
pub const MIB: u64 = 1 << 20;
/// The proxy's dial deadline here (short, so failed dials show quickly).
pub const DIAL_TIMEOUT_MS: u64 = 3_000;

/// A proxy process (two shards, memory backend), an agent process with one
/// service, `svc`, and the target behind it.
pub struct Stage {
    pub certs: CertDir,
    pub target: Target,
    pub proxy: Proc,
    pub agent: Proc,
    pub client_addr: SocketAddr,
    pub admin: SocketAddr,
}

pub fn stage(kind: Kind) -> Stage {
    stage_with(kind, None)
}

/// [`stage`], the agent also serving `echo` at `echo_addr` when given.
pub fn stage_with(kind: Kind, echo_addr: Option<SocketAddr>) -> Stage {
    ringpeer::runtime::raise_memlock();
    let certs = CertDir::temp().unwrap();
    let target = targets::spawn(kind).unwrap();
    let d = certs.path.display();
    let admin = free_addr();
    let cfg = format!(
        "cluster = \"demo\"\nid = \"proxy-a\"\nshards = 2\nclient_addr = \"127.0.0.1:0\"\ntunnel_addr = \"127.0.0.1:0\"\n\
         peer_addr = \"127.0.0.1:0\"\nadmin_addr = \"{admin}\"\npin_cpus = false\ndial_timeout_ms = {DIAL_TIMEOUT_MS}\n\
         [tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/proxy-a.pem\"\nkey = \"{d}/proxy-a-key.pem\"\n[[grants]]\nname = \"all\"\nclients = [\"*\"]\nagents = [\"*\"]\nservices = [\"*\"]\n[audit]\npath = \"{d}/proxy-a-audit.log\"\n"
    );
    let path = certs.path.join("proxy-a.toml");
    std::fs::write(&path, cfg).unwrap();
    let (proxy, client_addr, tunnel) = start_proxy(&path, Some("proxy"));
    let services =
        format!("svc = \"{}\"\n{}", target.addr, echo_addr.map(|a| format!("echo = \"{a}\"\n")).unwrap_or_default());
    let agent = spawn_agent(&write_agent_config(&certs.path, "agent-1", tunnel, "", &services));
    super::eventually("the agent's tunnel is up", || metric(admin, "ringpeer_tunnels").unwrap_or(0) >= 1);
    Stage { certs, target, proxy, agent, client_addr, admin }
}

/// Resident memory of process `pid`, bytes (VmRSS).
pub fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
    kb.unwrap_or(0) * 1024
}

/// The count of one error label on the proxy's metrics (all shards).
pub fn errors(admin: SocketAddr, label: &str) -> i64 {
    let tag = format!("error=\"{label}\"}}");
    error_lines(admin)
        .lines()
        .filter(|l| l.contains(&tag))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}

/// The proxy's error counters, one line each (for the story's log).
pub fn error_lines(admin: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| l.starts_with("ringpeer_errors_total") || l.starts_with("ringpeer_dials"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Samples both processes' RSS every 50 ms until `stop`; returns the peaks.
pub fn watch_rss(proxy: u32, agent: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let mut peak = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            peak = (peak.0.max(rss(proxy)), peak.1.max(rss(agent)));
            std::thread::sleep(Duration::from_millis(50));
        }
        peak
    })
}

/// The request head of a client dial.
pub fn dial_head() -> http::Request<()> {
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = paths::uri(paths::PROXY_DIAL).clone();
    req.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
    req
}

pub type Conn = h2::client::Connection<ringpeer::transport::ClientTls, Bytes>;

/// A raw HTTP/2 client connection with the h2 crate's own 64 KiB windows
/// (which this client will never replenish).
pub async fn raw_client(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> (h2::client::SendRequest<Bytes>, Conn) {
    let (stream, _) = ringpeer::transport::connect_tls(tls, &addr.to_string(), Duration::from_secs(5)).await.unwrap();
    let mut b = H2Tuning::h2_crate_defaults().client();
    // This client stays however many of its dials the proxy fails.
    b.max_local_error_reset_streams(None);
    b.handshake::<_, Bytes>(stream).await.unwrap()
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Waits up to `bound` for `cond`; returns how long it took.
pub fn within(bound: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < bound, "not within {bound:?}: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
    t0.elapsed()
}

/// 10,000 streams from 5 connections to a service that writes forever; the
/// clients never grant window. Each stream holds at the agent at most one
/// pending message (its read buffer stops growing past the soft level), and
/// the proxy holds at most what the tunnel's windows let through, so both
/// stay within a per-stream figure plus their buffer budget; once the
/// clients are gone, every target connection closes.
/// Runs `f` on a fresh executor with `n` client connections to `addr`.
pub fn with_clients<F, Fut, T>(addr: SocketAddr, dir: &std::path::Path, n: usize, f: F) -> T
where
    F: FnOnce(Vec<ringpeer::client::Client>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    let tls = ringpeer::client::client_tls(dir, "client").unwrap();
    ringpeer::runtime::block_on("budget-client", move || async move {
        let mut cs = Vec::new();
        for _ in 0..n {
            cs.push(ringpeer::client::Client::connect(&addr.to_string(), &tls, &H2Tuning::default()).await.unwrap());
        }
        f(cs).await
    })
    .unwrap()
}
