//! `ringpeer bench --tunnels N --streams M`: memory at scale, from one load
//! process. Two phases, each against fresh real processes of this binary:
//!
//! 1. **proxy**: a `ringpeer proxy` (one shard); this process opens N agent
//!    tunnels to it (N identities `scale-<i>`, real mTLS, see
//!    [`super::scale_sim`]), then M client dials spread over the tunnels,
//!    each established with one echoed byte and then held idle. The proxy's
//!    VmRSS is read before the tunnels, after them and after the streams.
//! 2. **agent**: a `ringpeer proxy`, a `ringpeer agent` and a
//!    `ringpeer target echo`; M dials through them, so the agent holds M
//!    idle streams, each with its kernel socket to the target. The agent's
//!    VmRSS is read before and after, beside the kernel's socket memory
//!    (`/proc/net/sockstat` and the slab, machine-wide).
//!
//! Invariants: the figures are VmRSS deltas of the measured process divided
//! by what was added; the measured processes run this binary's production
//! code with budgets raised only through their config files (`[limits]`,
//! `[h2]`); the file-descriptor limit is raised (to `fs.nr_open`) for this
//! process and its children, nothing else about the machine is changed.
//! The agent dials targets on several loopback addresses (127.0.0.x), since
//! one destination has only ~28,000 ephemeral source ports.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::bench::BenchOpts;
use super::fleet::CertDir;
use super::scale_sim::{agent_tunnel, open_streams, PARALLEL};
use crate::client::Client;
use crate::runtime::signal::Signal;
use crate::transport::h2conf::H2Tuning;
use crate::transport::identity::Role;
use crate::transport::tls::{TlsFiles, TlsMaterial};

/// Streams per client connection (below the default `streams_per_conn`;
/// 5,000 made the load process's h2 client connections its bottleneck).
pub const STREAMS_PER_CLIENT_CONN: usize = 1_000;
/// Streams per target address at the agent (ephemeral ports per address).
const STREAMS_PER_TARGET_ADDR: usize = 20_000;
/// Keepalive of every connection in a run: one ping per minute instead of
/// every 2 s, so that 10,000 tunnels' pings do not swamp the one load
/// process (a ping costs CPU, not memory: one timer per connection either
/// way). Rejected: the defaults, under which the load process fell behind
/// at 10,000 tunnels and the proxy dropped its links as unresponsive.
const KEEPALIVE: &str = "[h2]\nkeepalive_interval_ms = 60000\nkeepalive_miss_ms = 60000\nkeepalive_timeout_ms = 120000\nhandshake_timeout_ms = 60000\n";

/// The `[h2]` of this process's connections, [`KEEPALIVE`] applied.
/// Its handshakes may take long too: 10,000 tunnels arrive at once.
pub fn h2() -> H2Tuning {
    H2Tuning {
        keepalive_interval_ms: 60_000,
        keepalive_miss_ms: 60_000,
        keepalive_timeout_ms: 120_000,
        handshake_timeout_ms: 60_000,
        ..H2Tuning::default()
    }
}

/// Settling time before each RSS reading (allocator, lazy frees).
const SETTLE: Duration = Duration::from_secs(2);

/// The proxy phase's figures (KiB).
#[derive(Serialize, Debug, Default, Clone)]
pub struct ProxyMem {
    /// VmRSS before any tunnel.
    pub rss_start_kib: u64,
    /// VmRSS with the tunnels up.
    pub rss_tunnels_kib: u64,
    /// VmRSS with the tunnels and the streams open.
    pub rss_streams_kib: u64,
    /// (rss_tunnels - rss_start) / tunnels.
    pub kib_per_tunnel: f64,
    /// (rss_streams - rss_tunnels) / streams.
    pub kib_per_stream: f64,
    /// Seconds to open the tunnels.
    pub tunnels_s: f64,
    /// Seconds to open the streams.
    pub streams_s: f64,
}

/// The agent phase's figures (KiB unless named).
#[derive(Serialize, Debug, Default, Clone)]
pub struct AgentMem {
    /// Streams opened (at most `--streams`; fewer when the descriptor limit
    /// cannot hold them).
    pub streams: usize,
    /// Agent VmRSS before the streams (tunnel up, one stream warmed).
    pub rss_before_kib: u64,
    /// Agent VmRSS with the streams open.
    pub rss_after_kib: u64,
    /// Agent RSS per open idle stream.
    pub kib_per_stream: f64,
    /// The proxy's RSS per stream in the same run (one tunnel).
    pub proxy_kib_per_stream: f64,
    /// Machine-wide slab growth per stream (two sockets: the agent's and
    /// the target's end; plus the proxy's h2 stream, no socket).
    pub slab_kib_per_stream: f64,
    /// `/proc/net/sockstat` TCP `mem` growth per stream, KiB (queued bytes).
    pub sockstat_kib_per_stream: f64,
    /// Seconds to open the streams.
    pub streams_s: f64,
}

/// The report of one run.
#[derive(Serialize, Debug, Default)]
pub struct ScaleReport {
    /// Tunnels opened in the proxy phase.
    pub tunnels: usize,
    /// Streams opened in each phase.
    pub streams: usize,
    /// Client connections the streams were spread over.
    pub client_conns: usize,
    /// The proxy phase (absent when skipped).
    pub proxy: Option<ProxyMem>,
    /// The agent phase (absent when skipped).
    pub agent: Option<AgentMem>,
}

/// Runs the scale benchmark (`--tunnels`, `--streams`, `--scale-phase`).
pub fn run(o: &BenchOpts, tunnels: usize) -> anyhow::Result<()> {
    let nofile = raise_nofile();
    eprintln!("scale: RLIMIT_NOFILE raised to {nofile}");
    let streams = o.streams;
    let certs = CertDir::temp()?;
    let mut r = ScaleReport {
        tunnels,
        streams,
        client_conns: streams.div_ceil(STREAMS_PER_CLIENT_CONN).max(1),
        ..Default::default()
    };
    if o.scale_phase != "agent" {
        let p = proxy_phase(&certs.path, tunnels, streams).context("proxy phase")?;
        // Printed at once: a later phase that fails must not lose it.
        eprintln!("scale: proxy phase: {}", serde_json::to_string(&p)?);
        r.proxy = Some(p);
    }
    if o.scale_phase != "proxy" {
        // Each agent stream holds two descriptors in the agent (its target
        // socket and the dup of it that `split_tcp` makes for the write
        // half): without CAP_SYS_RESOURCE the hard limit caps the phase.
        let fit = ((nofile as usize).saturating_sub(1000) / 2).max(1);
        if streams > fit {
            eprintln!("scale: agent phase limited to {fit} streams by RLIMIT_NOFILE {nofile}");
        }
        r.agent = Some(agent_phase(&certs.path, streams.min(fit)).context("agent phase")?);
    }
    if let Some(p) = &r.proxy {
        println!(
            "proxy: {tunnels} tunnels, {streams} streams: RSS {:.1} -> {:.1} -> {:.1} MiB: {:.1} KiB per idle tunnel, {:.1} KiB per open idle stream (tunnels {:.1} s, streams {:.1} s)",
            p.rss_start_kib as f64 / 1024.0,
            p.rss_tunnels_kib as f64 / 1024.0,
            p.rss_streams_kib as f64 / 1024.0,
            p.kib_per_tunnel,
            p.kib_per_stream,
            p.tunnels_s,
            p.streams_s
        );
    }
    if let Some(a) = &r.agent {
        println!(
            "agent: {} streams: RSS {:.1} -> {:.1} MiB: {:.1} KiB per open idle stream; kernel slab {:.1} KiB per stream (both socket ends), sockstat mem {:.2} KiB; proxy {:.1} KiB per stream (one tunnel) ({:.1} s)",
            a.streams,
            a.rss_before_kib as f64 / 1024.0,
            a.rss_after_kib as f64 / 1024.0,
            a.kib_per_stream,
            a.slab_kib_per_stream,
            a.sockstat_kib_per_stream,
            a.proxy_kib_per_stream,
            a.streams_s
        );
    }
    let json = serde_json::to_string_pretty(&r)?;
    if let Some(p) = &o.json {
        std::fs::write(p, &json).with_context(|| format!("cannot write {}", p.display()))?;
    }
    println!("{json}");
    Ok(())
}

fn proxy_phase(dir: &Path, tunnels: usize, streams: usize) -> anyhow::Result<ProxyMem> {
    let t0 = Instant::now();
    let names: Vec<String> = (0..tunnels).map(|i| format!("scale-{i}")).collect();
    issue_all(dir, &names)?;
    let tls = names
        .iter()
        .map(|n| {
            Ok(TlsMaterial::load_as(&TlsFiles::in_dir(dir, n), "demo", Role::Agent, n)?
                .client_config(Role::Proxy, None)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!("scale: {tunnels} agent certificates in {:.1} s", t0.elapsed().as_secs_f64());
    let proxy = ProxyProc::start(dir, "proxy-a", streams)?;
    let (tunnel_addr, client_addr, pid, admin) =
        (proxy.tunnel.clone(), proxy.client.clone(), proxy.pid(), proxy.admin.clone());
    let client_tls = crate::client::client_tls(dir, "client")?;
    let m = crate::runtime::block_on("scale", move || async move {
        let mut m = ProxyMem { rss_start_kib: rss_kib(pid), ..Default::default() };
        let (stop, up) = (Signal::new(), Rc::new(std::cell::Cell::new(0usize)));
        let t = Instant::now();
        for (i, cfg) in tls.into_iter().enumerate() {
            while i - up.get() >= PARALLEL && t.elapsed() < Duration::from_secs(600) {
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            glommio::spawn_local(agent_tunnel(cfg, tunnel_addr.clone(), stop.clone(), up.clone())).detach();
        }
        wait_tunnels(&admin, tunnels as i64, Duration::from_secs(600)).await?;
        m.tunnels_s = t.elapsed().as_secs_f64();
        glommio::timer::sleep(SETTLE).await;
        m.rss_tunnels_kib = rss_kib(pid);
        let t = Instant::now();
        let clients = connect_clients(&client_addr, &client_tls, streams).await?;
        let held = open_streams(&clients, streams, |i| format!("scale-{}/echo", i % tunnels))
            .await
            .map_err(anyhow::Error::msg)?;
        m.streams_s = t.elapsed().as_secs_f64();
        glommio::timer::sleep(SETTLE).await;
        m.rss_streams_kib = rss_kib(pid);
        m.kib_per_tunnel = (m.rss_tunnels_kib as f64 - m.rss_start_kib as f64) / tunnels.max(1) as f64;
        m.kib_per_stream = (m.rss_streams_kib as f64 - m.rss_tunnels_kib as f64) / streams.max(1) as f64;
        drop(held);
        stop.trigger();
        Ok::<_, anyhow::Error>(m)
    })??;
    drop(proxy);
    Ok(m)
}

fn agent_phase(dir: &Path, streams: usize) -> anyhow::Result<AgentMem> {
    let proxy = ProxyProc::start(dir, "proxy-b", streams)?;
    let echo_port = free_port()?;
    let echo = Proc::spawn(dir, "echo", &["target", "echo", "--listen", &format!("0.0.0.0:{echo_port}")])?;
    let addrs = streams.div_ceil(STREAMS_PER_TARGET_ADDR).clamp(1, 250);
    let services: String =
        (0..addrs).map(|k| format!("echo{k} = \"127.0.0.{}:{echo_port}\"\n", k + 1)).collect::<String>();
    let cfg = format!(
        "cluster = \"demo\"\nid = \"agent-1\"\nproxies = [\"{}\"]\n{}[limits]\nstreams_per_conn = {}\n{KEEPALIVE}max_concurrent_streams = {}\n[services]\n{services}",
        proxy.tunnel,
        tls_section(dir, "agent-1"),
        streams * 2 + 100,
        streams * 2 + 100,
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, cfg)?;
    let agent = Proc::spawn(dir, "agent", &["agent", "--config", path.to_str().expect("utf-8 path"), "--log", "warn"])?;
    let (client_addr, admin, ppid, apid) = (proxy.client.clone(), proxy.admin.clone(), proxy.pid(), agent.child.id());
    let client_tls = crate::client::client_tls(dir, "client")?;
    let a = crate::runtime::block_on("scale", move || async move {
        wait_tunnels(&admin, 1, Duration::from_secs(30)).await?;
        let clients = connect_clients(&client_addr, &client_tls, streams).await?;
        // One warm-up stream per target address (first-use allocations).
        let warm = open_streams(&clients, addrs, |k| format!("agent-1/echo{k}")).await.map_err(anyhow::Error::msg)?;
        glommio::timer::sleep(SETTLE).await;
        let (a0, p0, slab0, sock0) = (rss_kib(apid), rss_kib(ppid), slab_kib(), sockstat_tcp_pages());
        let t = Instant::now();
        let held = open_streams(&clients, streams, |i| format!("agent-1/echo{}", i % addrs))
            .await
            .map_err(anyhow::Error::msg)?;
        let streams_s = t.elapsed().as_secs_f64();
        glommio::timer::sleep(SETTLE).await;
        let (a1, p1, slab1, sock1) = (rss_kib(apid), rss_kib(ppid), slab_kib(), sockstat_tcp_pages());
        let n = streams.max(1) as f64;
        let page_kib = 4.0;
        drop((held, warm));
        Ok::<_, anyhow::Error>(AgentMem {
            streams,
            rss_before_kib: a0,
            rss_after_kib: a1,
            kib_per_stream: (a1 as f64 - a0 as f64) / n,
            proxy_kib_per_stream: (p1 as f64 - p0 as f64) / n,
            slab_kib_per_stream: (slab1 as f64 - slab0 as f64) / n,
            sockstat_kib_per_stream: (sock1 as f64 - sock0 as f64) * page_kib / n,
            streams_s,
        })
    })??;
    drop((agent, echo, proxy));
    Ok(a)
}

async fn connect_clients(
    addr: &str,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    streams: usize,
) -> anyhow::Result<Vec<Client>> {
    let mut v = Vec::new();
    for _ in 0..streams.div_ceil(STREAMS_PER_CLIENT_CONN).max(1) {
        let mut tries = 0;
        let c = loop {
            match Client::connect(addr, tls, &h2()).await {
                Ok(c) => break c,
                Err(e) if tries >= 3 => return Err(e).context("client connect"),
                Err(_) => tries += 1,
            }
        };
        v.push(c);
    }
    Ok(v)
}

/// Waits until the proxy's admin endpoint counts `n` tunnels.
async fn wait_tunnels(admin: &str, n: i64, within: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut last = -1;
    loop {
        last = metric(admin, "ringpeer_tunnels").unwrap_or(last);
        if last >= n {
            return Ok(());
        }
        anyhow::ensure!(t0.elapsed() < within, "the proxy holds {last} tunnels of {n} after {within:?}");
        glommio::timer::sleep(Duration::from_millis(200)).await;
    }
}

/// Sums a metric over its shards from the admin endpoint (a blocking GET;
/// small, and only between phases).
fn metric(admin: &str, name: &str) -> Option<i64> {
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let vals = body.lines().filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']));
    Some(vals.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>() as i64)
}

fn issue_all(dir: &Path, names: &[String]) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        let chunks: Vec<_> = names.chunks(names.len().div_ceil(threads).max(1)).collect();
        let hs: Vec<_> = chunks
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    c.iter().try_for_each(|n| crate::transport::certs::issue(dir, Role::Agent, n).map(|_| ()))
                })
            })
            .collect();
        hs.into_iter().try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("certificate thread panicked"))?)
    })
}

fn tls_section(dir: &Path, id: &str) -> String {
    let f = TlsFiles::in_dir(dir, id);
    format!("[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n", f.ca, f.cert, f.key)
}

/// A child process of this binary, killed on drop; its output in a file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(dir: &Path, name: &str, args: &[&str]) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log)?;
        let child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc { child, log })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}: {}", self.log.display(), std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

/// A `ringpeer proxy` child with one shard, budgets raised for `streams`.
struct ProxyProc {
    proc: Proc,
    tunnel: String,
    client: String,
    admin: String,
}

/// The load's client may reach every agent (the proxy denies by default).
const GRANT: &str = "[[grants]]\nname = \"scale\"\nclients = [\"client\"]\nagents = [\"*\"]\nservices = [\"*\"]\n";

impl ProxyProc {
    fn start(dir: &Path, id: &str, streams: usize) -> anyhow::Result<ProxyProc> {
        let [client, tunnel, peer, admin] =
            [free_port()?, free_port()?, free_port()?, free_port()?].map(|p| format!("127.0.0.1:{p}"));
        let cfg = format!(
            "cluster = \"demo\"\nid = \"{id}\"\nshards = 1\nclient_addr = \"{client}\"\ntunnel_addr = \"{tunnel}\"\npeer_addr = \"{peer}\"\nadmin_addr = \"{admin}\"\ndial_timeout_ms = 60000\n{}[limits]\nstreams_per_identity = {}\n{KEEPALIVE}{GRANT}",
            tls_section(dir, id),
            streams * 2 + 100
        );
        let path = dir.join(format!("{id}.toml"));
        std::fs::write(&path, cfg)?;
        let mut proc =
            Proc::spawn(dir, id, &["proxy", "--config", path.to_str().expect("utf-8 path"), "--log", "warn"])?;
        let t0 = Instant::now();
        while metric(&admin, "ringpeer_tunnels").is_none() {
            if let Some(st) = proc.child.try_wait()? {
                anyhow::bail!("{id} exited ({st}): {}", std::fs::read_to_string(&proc.log).unwrap_or_default());
            }
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(20), "{id} admin endpoint never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(ProxyProc { proc, tunnel, client, admin })
    }

    fn pid(&self) -> u32 {
        self.proc.child.id()
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// VmRSS of `pid`, KiB (0 if unreadable).
pub fn rss_kib(pid: u32) -> u64 {
    status_field(&format!("/proc/{pid}/status"), "VmRSS:")
}

fn slab_kib() -> u64 {
    status_field("/proc/meminfo", "Slab:")
}

fn status_field(path: &str, key: &str) -> u64 {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// `/proc/net/sockstat` TCP `mem`, pages.
fn sockstat_tcp_pages() -> u64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let line = s.lines().find(|l| l.starts_with("TCP:")).unwrap_or("");
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mem" {
            return it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    0
}

/// Raises RLIMIT_NOFILE (soft and hard) to `fs.nr_open` (at most 2^20);
/// children inherit it. Returns the soft limit now in force.
pub fn raise_nofile() -> u64 {
    let want: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
        .min(1 << 20);
    let mut cur = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
        let raised = libc::rlimit { rlim_cur: want, rlim_max: want };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            // Not root: the soft limit up to the hard one.
            let soft = libc::rlimit { rlim_cur: cur.rlim_max, rlim_max: cur.rlim_max };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
    }
    cur.rlim_cur
}
