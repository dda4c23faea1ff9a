//! Budget stories, played against a real proxy and a real agent, each its
//! own `ringpeer` process (so each RSS is its own), with a target in this
//! process whose open connections we count:
//!
//! - slow readers: thousands of streams to a service that writes forever,
//!   from clients that never grant flow-control window: both processes
//!   stay within their budgets, and every target connection closes once
//!   the clients are gone;
//! - reset amplification: 5,000 dials reset in flight: few reach the
//!   target, nothing of them remains a second later, memory barely moves,
//!   and a canary client is served as fast as before.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::procs::{free_addr, metric, Proc};
use ringpeer::proxy::outbound::sibling::PIPE_CAP;
use ringpeer::runtime::budget::{AgentLimits, ProxyLimits};
use ringpeer::tools::fleet::CertDir;
use ringpeer::tools::target::{self as targets, Kind, Target};
use ringpeer::transport::h2conf::{H2Tuning, MAX_RESETS_PER_SEC};
use ringpeer::wire::codec::encode_msg;
use ringpeer::wire::{paths, DialTarget};

const BIN: &str = env!("CARGO_BIN_EXE_ringpeer");

/// The stories here each load both cores (proxy, agent, target and an
/// attacker); two at once would measure each other. They take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}
const MIB: u64 = 1 << 20;
/// The proxy's dial deadline here (short, so failed dials show quickly).
const DIAL_TIMEOUT_MS: u64 = 3_000;

/// A proxy process (two shards, memory backend), an agent process with one
/// service, `svc`, and the target behind it.
struct Stage {
    certs: CertDir,
    target: Target,
    proxy: Proc,
    agent: Proc,
    client_addr: SocketAddr,
    admin: SocketAddr,
}

fn stage(kind: Kind) -> Stage {
    stage_with(kind, None)
}

/// [`stage`], the agent also serving `echo` at `echo_addr` when given.
fn stage_with(kind: Kind, echo_addr: Option<SocketAddr>) -> Stage {
    ringpeer::runtime::raise_memlock();
    let certs = CertDir::temp().unwrap();
    let target = targets::spawn(kind).unwrap();
    let d = certs.path.display();
    let admin = free_addr();
    let cfg = format!(
        "cluster = \"demo\"\nid = \"proxy-a\"\nshards = 2\nclient_addr = \"127.0.0.1:0\"\ntunnel_addr = \"127.0.0.1:0\"\n\
         peer_addr = \"127.0.0.1:0\"\nadmin_addr = \"{admin}\"\npin_cpus = false\ndial_timeout_ms = {DIAL_TIMEOUT_MS}\n\
         [tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/proxy-a.pem\"\nkey = \"{d}/proxy-a-key.pem\"\n"
    );
    let path = certs.path.join("proxy-a.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut child = Command::new(BIN)
        .args(["proxy", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            eprintln!("proxy: {l}");
        }
    });
    let proxy = Proc(child);
    let w: Vec<&str> = line.split_whitespace().collect();
    let after = |k: &str| -> SocketAddr { w[w.iter().position(|x| *x == k).unwrap() + 1].parse().unwrap() };
    let (client_addr, tunnel) = (after("client"), after("tunnel"));
    let cfg = format!(
        "cluster = \"demo\"\nid = \"agent-1\"\nproxies = [\"{tunnel}\"]\n[tls]\nca = \"{d}/ca.pem\"\n\
         cert = \"{d}/agent-1.pem\"\nkey = \"{d}/agent-1-key.pem\"\n[services]\nsvc = \"{}\"\n{}",
        target.addr,
        echo_addr.map(|a| format!("echo = \"{a}\"\n")).unwrap_or_default()
    );
    let path = certs.path.join("agent-1.toml");
    std::fs::write(&path, cfg).unwrap();
    let agent = Proc(
        Command::new(BIN).args(["agent", "--config", path.to_str().unwrap()]).env("RUST_LOG", "warn").spawn().unwrap(),
    );
    common::eventually("the agent's tunnel is up", || metric(admin, "ringpeer_tunnels").unwrap_or(0) >= 1);
    Stage { certs, target, proxy, agent, client_addr, admin }
}

/// Resident memory of process `pid`, bytes (VmRSS).
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
    kb.unwrap_or(0) * 1024
}

/// The count of one error label on the proxy's metrics (all shards).
fn errors(admin: SocketAddr, label: &str) -> i64 {
    let tag = format!("error=\"{label}\"}}");
    error_lines(admin)
        .lines()
        .filter(|l| l.contains(&tag))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}

/// The proxy's error counters, one line each (for the story's log).
fn error_lines(admin: SocketAddr) -> String {
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
fn watch_rss(proxy: u32, agent: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64)> {
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
fn dial_head() -> http::Request<()> {
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = paths::uri(paths::PROXY_DIAL).clone();
    req.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
    req
}

type Conn = h2::client::Connection<ringpeer::transport::ClientTls, Bytes>;

/// A raw HTTP/2 client connection with the h2 crate's own 64 KiB windows
/// (which this client will never replenish).
async fn raw_client(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> (h2::client::SendRequest<Bytes>, Conn) {
    let (stream, _) = ringpeer::transport::connect_tls(tls, &addr.to_string(), Duration::from_secs(5)).await.unwrap();
    let mut b = H2Tuning::h2_crate_defaults().client();
    // This client stays however many of its dials the proxy fails.
    b.max_local_error_reset_streams(None);
    b.handshake::<_, Bytes>(stream).await.unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Waits up to `bound` for `cond`; returns how long it took.
fn within(bound: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
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
#[test]
fn slow_readers_stay_within_the_budgets_and_leave_no_target_connection() {
    let _turn = turn();
    const CONNS: usize = 5;
    const PER_CONN: usize = 2_000;
    let st = stage(Kind::Flood);
    let (p, a) = (st.proxy.0.id(), st.agent.0.id());
    let base = (rss(p), rss(a));
    let tls = ringpeer::client::client_tls(&st.certs.path, "client").unwrap();
    let addr = st.client_addr;
    let leave = Arc::new(AtomicBool::new(false));
    let go = leave.clone();
    let clients = std::thread::spawn(move || {
        ringpeer::runtime::block_on("slow-readers", move || async move {
            let first = encode_msg(&DialTarget::parse("agent-1/svc").unwrap().to_frame());
            let mut held = Vec::new();
            let mut conns = Vec::new();
            let mut conns_send = Vec::new();
            for _ in 0..CONNS {
                let (mut send, conn) = raw_client(addr, &tls).await;
                conns.push(glommio::spawn_local(async move {
                    if let Err(e) = conn.await {
                        eprintln!("slow reader connection ended: {e}");
                    }
                }));
                for _ in 0..PER_CONN {
                    if std::future::poll_fn(|cx| send.poll_ready(cx)).await.is_err() {
                        break;
                    }
                    let Ok((resp, mut tx)) = send.send_request(dial_head(), false) else { break };
                    let _ = tx.send_data(first.clone(), false);
                    held.push((resp, tx));
                }
                conns_send.push(send);
            }
            while !go.load(Ordering::Relaxed) {
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            // Going away: the connections close with everything on them
            // (each ends once its last handle is gone).
            drop((held, conns_send));
            for c in conns {
                let _ = ringpeer::runtime::timeout(Duration::from_secs(5), c).await;
            }
        })
        .unwrap()
    });
    // Let the dials arrive, and the ones that cannot be established fail:
    // until every target connection belongs to a relayed stream.
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = watch_rss(p, a, stop.clone());
    let t0 = Instant::now();
    let settled = within(Duration::from_secs(40), "every open target connection is a relayed stream", || {
        let open = st.target.open_conns() as i64;
        st.target.accepted() > 0
            && t0.elapsed() > Duration::from_millis(DIAL_TIMEOUT_MS)
            && metric(st.admin, "ringpeer_active_streams") == Some(open)
            && st.target.open_conns() as i64 == open
    });
    // Hold them a little, still never reading; meanwhile another client
    // dials the same agent. Logged, not asserted: this many stalled streams
    // hold more than half of `shard_buffer_bytes` in the relay, where the
    // tunnel's window no longer grows (it is what bounds memory), so the
    // dial may pass its deadline. Within the budget it is asserted:
    // `stalled_streams_leave_the_tunnel_open_to_new_dials`.
    let canary = with_clients(st.client_addr, &st.certs.path, 1, |cs| async move {
        let t0 = Instant::now();
        let r = cs[0].dial(&DialTarget::parse("agent-1/svc").unwrap(), Duration::from_secs(5)).await;
        (t0.elapsed(), r.err().map(|e| e.to_string()))
    });
    eprintln!("a canary dial during the attack: {canary:?}");
    std::thread::sleep(Duration::from_secs(1));
    let open = st.target.open_conns();
    let relayed = metric(st.admin, "ringpeer_active_streams").unwrap_or(-1);
    stop.store(true, Ordering::Relaxed);
    let (pp, ap) = peaks.join().unwrap();
    eprintln!(
        "settled after {settled:?}: {open} target connections open ({} accepted), the proxy relays {relayed}; \
         RSS proxy {} -> peak {} MiB, agent {} -> peak {} MiB",
        st.target.accepted(),
        base.0 / MIB,
        pp / MIB,
        base.1 / MIB,
        ap / MIB
    );
    eprintln!("{}", error_lines(st.admin));
    // The documented budget: per open dial at most PER_DIAL (h2 stream
    // state, the task, a cross-shard pipe, one pending message), plus the
    // buffers up to the soft level of `shard_buffer_bytes`, where they stop
    // growing. The whole run's peak is held to it, set-up storm included.
    const PER_DIAL: u64 = 40 << 10;
    let dials = (CONNS * PER_CONN) as u64;
    let proxy_budget = dials * PER_DIAL + ProxyLimits::default().shard_buffer_bytes as u64 / 2;
    let agent_budget = dials * PER_DIAL + AgentLimits::default().shard_buffer_bytes as u64 / 2;
    assert!(pp - base.0 <= proxy_budget, "proxy RSS grew {} MiB > {} MiB", (pp - base.0) / MIB, proxy_budget / MIB);
    assert!(ap - base.1 <= agent_budget, "agent RSS grew {} MiB > {} MiB", (ap - base.1) / MIB, agent_budget / MIB);
    // How many of the 10,000 set-ups beat the 3 s deadline depends on the
    // machine (100 to 4,525 here, with a debug build); whatever failed must
    // have left no target connection.
    assert!(open as i64 == relayed, "{open} target connections for {relayed} relayed streams");

    // The clients go away: every target connection closes.
    leave.store(true, Ordering::Relaxed);
    clients.join().unwrap();
    let took = within(Duration::from_secs(5), "every target connection closed after the clients left", || {
        st.target.open_conns() == 0
    });
    within(Duration::from_secs(5), "the proxy's stream gauge back to 0", || {
        metric(st.admin, "ringpeer_active_streams") == Some(0)
    });
    eprintln!("all {open} target connections closed {took:?} after the clients left");
}

/// Runs `f` on a fresh executor with `n` client connections to `addr`.
fn with_clients<F, Fut, T>(addr: SocketAddr, dir: &std::path::Path, n: usize, f: F) -> T
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

/// Each budget, set small, refuses the first dial past it with
/// RESOURCE_EXHAUSTED naming the budget and its value, counted under its
/// own metric label, while the dials within it are served: streams per
/// tunnel at the agent, per client connection, per identity, and
/// connections per identity. (The shard buffer budget is exercised by the
/// slow readers above and unit-tested in `runtime::budget`.)
#[test]
fn each_budget_refuses_the_first_dial_past_it_naming_itself() {
    let _turn = turn();
    use ringpeer::tools::fleet::{agent_config, proxy_config, AgentHandle, ProxyHandle};
    use ringpeer::wire::status::Code;
    ringpeer::runtime::raise_memlock();
    let certs = CertDir::temp().unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    let mut cfg = proxy_config(&certs.path, "proxy-a", 1);
    cfg.limits =
        ProxyLimits { streams_per_conn: 4, streams_per_identity: 6, conns_per_identity: 2, ..Default::default() };
    let proxy = ProxyHandle::start(cfg).unwrap();
    let mut a1 = agent_config(&certs.path, "agent-1", &[proxy.tunnel_addr], &[("echo", echo.addr)]);
    a1.limits = AgentLimits { streams_per_conn: 3, ..Default::default() };
    let a2 = agent_config(&certs.path, "agent-2", &[proxy.tunnel_addr], &[("echo", echo.addr)]);
    let _agents = [AgentHandle::start(a1).unwrap(), AgentHandle::start(a2).unwrap()];
    proxy.wait_tunnels(2, Duration::from_secs(10)).unwrap();
    let refusals = with_clients(proxy.client_addr, &certs.path, 3, |cs| async move {
        let d = Duration::from_secs(5);
        let (one, two) = (DialTarget::parse("agent-1/echo").unwrap(), DialTarget::parse("agent-2/echo").unwrap());
        let mut out = Vec::new();
        let mut held = Vec::new();
        // Agent 1's tunnel takes 3 dial streams; the 4th is refused there.
        for _ in 0..3 {
            held.push(cs[0].dial(&one, d).await.expect("within the agent's budget"));
        }
        out.push(cs[0].dial(&one, d).await.err());
        // Connection 0 takes a 4th stream, not a 5th.
        held.push(cs[0].dial(&two, d).await.expect("within the connection's budget"));
        out.push(cs[0].dial(&two, d).await.err());
        // The identity takes 2 more on connection 1 (6 in all), not a 7th.
        for _ in 0..2 {
            held.push(cs[1].dial(&two, d).await.expect("within the identity's budget"));
        }
        out.push(cs[1].dial(&two, d).await.err());
        // Its third connection is over its budget of 2.
        out.push(cs[2].dial(&two, d).await.err());
        drop(held);
        out.into_iter().map(|e| e.map(|e| (e.code, e.message.to_string()))).collect::<Vec<_>>()
    });
    let want = [
        "budget streams_per_conn (3) reached",
        "budget streams_per_conn (4) reached",
        "budget streams_per_identity (6) reached",
        "budget conns_per_identity (2) reached",
    ];
    for (got, want) in refusals.iter().zip(want) {
        let (code, msg) = got.as_ref().unwrap_or_else(|| panic!("no refusal for {want}"));
        eprintln!("refused: {code:?} {msg:?}");
        assert_eq!(*code, Code::ResourceExhausted, "{msg}");
        assert!(msg.contains(want), "{msg:?} does not name {want:?}");
    }
    let m = &proxy.metrics;
    for label in ["budget_streams_per_conn", "budget_streams_per_identity", "budget_conns_per_identity"] {
        assert!(common::errors(m, label) >= 1, "{label} not counted");
    }
}

/// Dials per attacking connection, and their pace: under the rapid-reset
/// rule (MAX_RESETS_PER_SEC premature resets in a second end a connection),
/// so every reset goes down the cancellation path instead of ending its
/// connection early.
const RESETS_PER_CONN: usize = 200;
const RESET_EVERY: Duration = Duration::from_millis(25);

/// 5,000 dials reset in flight (HEADERS + DialRequest + RST_STREAM) over
/// 25 connections, each paced under the rapid-reset rule. A reset cancels
/// the dial at every hop: few reach the target, none outlives its reset by
/// a second, memory barely moves, and a canary client is served as fast as
/// before.
#[test]
fn reset_amplification_reaches_few_targets_and_leaves_nothing() {
    let _turn = turn();
    const CONNS: usize = 25;
    assert!(1_000_000 / RESET_EVERY.as_micros() as u32 <= MAX_RESETS_PER_SEC);
    let st = stage(Kind::Echo);
    let (p, a) = (st.proxy.0.id(), st.agent.0.id());
    let tls = ringpeer::client::client_tls(&st.certs.path, "client").unwrap();

    // The canary: one echo dial after another, idle first, then under attack.
    let phase = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let (ph, canary_addr, canary_tls) = (phase.clone(), st.client_addr, tls.clone());
    let canary = std::thread::spawn(move || {
        ringpeer::runtime::block_on("canary", move || async move {
            let c = ringpeer::client::Client::connect(&canary_addr.to_string(), &canary_tls, &H2Tuning::default())
                .await
                .unwrap();
            let t = DialTarget::parse("agent-1/svc").unwrap();
            let (mut idle, mut attacked) = (Vec::new(), Vec::new());
            loop {
                let now = ph.load(Ordering::Relaxed);
                if now == 3 {
                    break;
                }
                let t0 = Instant::now();
                let back = ringpeer::tools::load::echo_roundtrip(&c, &t, b"canary").await;
                let took = t0.elapsed();
                assert_eq!(back.expect("the canary is served"), b"canary");
                match now {
                    0 => idle.push(took),
                    2 => attacked.push(took),
                    _ => {}
                }
                if now == 0 && idle.len() == 50 {
                    ph.store(1, Ordering::Relaxed);
                }
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            (idle, attacked)
        })
        .unwrap()
    });
    while phase.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let base = (rss(p), rss(a));
    st.target.reset_peak();
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = watch_rss(p, a, stop.clone());
    phase.store(2, Ordering::Relaxed);
    let addr = st.client_addr;
    let t0 = Instant::now();
    let sent = ringpeer::runtime::block_on("reset-amplification", move || async move {
        let first = encode_msg(&DialTarget::parse("agent-1/svc").unwrap().to_frame());
        let mut tasks = Vec::new();
        for _ in 0..CONNS {
            let (tls, first) = (tls.clone(), first.clone());
            tasks.push(glommio::spawn_local(async move {
                let (mut send, conn) = raw_client(addr, &tls).await;
                glommio::spawn_local(conn).detach();
                let start = Instant::now();
                let mut sent = 0;
                for i in 0..RESETS_PER_CONN {
                    if std::future::poll_fn(|cx| send.poll_ready(cx)).await.is_err() {
                        break;
                    }
                    let Ok((_resp, mut tx)) = send.send_request(dial_head(), false) else { break };
                    let _ = tx.send_data(first.clone(), false);
                    // In flight: the proxy has started the dial when the reset comes.
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                    tx.send_reset(h2::Reason::CANCEL);
                    sent += 1;
                    let next = start + RESET_EVERY * (i as u32 + 1);
                    glommio::timer::sleep(next.saturating_duration_since(Instant::now())).await;
                }
                sent
            }));
        }
        let mut sent = 0;
        for t in tasks {
            sent += t.await;
        }
        sent
    })
    .unwrap();
    let attack = t0.elapsed();
    phase.store(3, Ordering::Relaxed);
    let (idle, attacked) = canary.join().unwrap();
    // Everything of the reset dials is gone within a second.
    let released = within(Duration::from_secs(1), "no target connection and no relayed stream left", || {
        st.target.open_conns() == 0 && metric(st.admin, "ringpeer_active_streams") == Some(0)
    });
    stop.store(true, Ordering::Relaxed);
    let (pp, ap) = peaks.join().unwrap();
    let (idle_m, attacked_m) = (median(idle), median(attacked.clone()));
    let cancelled = errors(st.admin, "cancelled");
    eprintln!(
        "{sent} dials reset in flight over {CONNS} connections in {attack:?}; the proxy cancelled {cancelled}; \
         the target accepted {} (at most {} at once); released {released:?} after the attack; \
         RSS proxy {} -> peak {} MiB, agent {} -> peak {} MiB; canary median {idle_m:?} idle, \
         {attacked_m:?} under attack ({} dials)",
        st.target.accepted(),
        st.target.peak_open(),
        base.0 / MIB,
        pp / MIB,
        base.1 / MIB,
        ap / MIB,
        attacked.len()
    );
    eprintln!("{}", error_lines(st.admin));
    assert_eq!(sent, CONNS * RESETS_PER_CONN);
    assert_eq!(errors(st.admin, "reset_flood"), 0, "the pace stayed under the rapid-reset rule");
    // Most resets must land while the dial is in flight, or this would not
    // test cancellation (a dial established within its 1 ms is not).
    assert!(cancelled as usize >= sent / 2, "only {cancelled} of {sent} resets cancelled a dial at the proxy");
    let setup = ProxyLimits::default().setup_per_conn;
    assert!(st.target.peak_open() <= setup, "{} target connections at once", st.target.peak_open());
    assert!(pp.saturating_sub(base.0) <= 64 * MIB, "proxy RSS grew {} MiB", (pp - base.0) / MIB);
    assert!(ap.saturating_sub(base.1) <= 64 * MIB, "agent RSS grew {} MiB", (ap - base.1) / MIB);
    assert!(attacked.len() >= 5, "the canary ran {} dials during the attack", attacked.len());
    assert!(attacked_m < idle_m * 2, "canary median {attacked_m:?} under attack vs {idle_m:?} idle");
}

/// 200 stalled streams (5 connections x 40, from clients that never grant
/// window) to a service that writes forever: on the tunnel they may hold
/// 800 MiB of stream windows, 25 times its 32 MiB connection window. The
/// tunnel's window grows with its streams, within the shard's buffer
/// budget, so every stalled dial is established, and a canary client then
/// dials an echo service on the same agent 10 times: each dial is
/// established and echoes within 1 s, while both processes stay within the
/// documented bound.
#[test]
fn stalled_streams_leave_the_tunnel_open_to_new_dials() {
    let _turn = turn();
    stalled_story(false)
}

/// The same, the stalled clients also uploading as fast as they are let
/// to a target that never reads: their data holds the agent's side of the
/// tunnel (the agent is its HTTP/2 server), whose window grows the same way.
#[test]
fn stalled_uploads_leave_the_tunnel_open_to_new_dials() {
    let _turn = turn();
    stalled_story(true)
}

fn stalled_story(upload: bool) {
    const CONNS: usize = 5;
    const PER_CONN: usize = 40;
    const CANARY: usize = 10;
    let echo = targets::spawn(Kind::Echo).unwrap();
    let st = stage_with(Kind::Flood, Some(echo.addr));
    let (p, a) = (st.proxy.0.id(), st.agent.0.id());
    let base = (rss(p), rss(a));
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = watch_rss(p, a, stop.clone());
    let tls = ringpeer::client::client_tls(&st.certs.path, "client").unwrap();
    let addr = st.client_addr;
    let leave = Arc::new(AtomicBool::new(false));
    let go = leave.clone();
    let stalled = std::thread::spawn(move || {
        ringpeer::runtime::block_on("stalled", move || async move {
            let first = encode_msg(&DialTarget::parse("agent-1/svc").unwrap().to_frame());
            let (mut held, mut sends) = (Vec::new(), Vec::new());
            for _ in 0..CONNS {
                let (mut send, conn) = raw_client(addr, &tls).await;
                glommio::spawn_local(conn).detach();
                for _ in 0..PER_CONN {
                    std::future::poll_fn(|cx| send.poll_ready(cx)).await.unwrap();
                    let (resp, mut tx) = send.send_request(dial_head(), false).unwrap();
                    tx.send_data(first.clone(), false).unwrap();
                    if upload {
                        // Writes as fast as the proxy's windows let it.
                        glommio::spawn_local(async move {
                            let _resp = resp;
                            let chunk = ringpeer::wire::codec::encode_data(&[7u8; 16 << 10]);
                            loop {
                                tx.reserve_capacity(chunk.len());
                                match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
                                    Some(Ok(n)) if n >= chunk.len() => {
                                        if tx.send_data(chunk.clone(), false).is_err() {
                                            break;
                                        }
                                    }
                                    Some(Ok(_)) => {}
                                    _ => break,
                                }
                            }
                        })
                        .detach();
                    } else {
                        held.push((resp, tx));
                    }
                }
                sends.push(send);
            }
            while !go.load(Ordering::Relaxed) {
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            drop((held, sends));
        })
        .unwrap()
    });
    // Every stalled dial reaches the target, which starts writing at once.
    let dials = CONNS * PER_CONN;
    within(Duration::from_secs(20), "every stalled dial reached the target", || st.target.accepted() >= dials);
    // The floods fill every window they are given (no event tells when:
    // 4 MiB per stream on loopback takes well under this).
    std::thread::sleep(Duration::from_millis(1_000));
    let established = metric(st.admin, "ringpeer_active_streams").unwrap_or(-1);
    let echo_addr = DialTarget::parse("agent-1/echo").unwrap();
    let canary = with_clients(st.client_addr, &st.certs.path, 1, move |cs| async move {
        let mut took = Vec::new();
        for i in 0..CANARY {
            let t0 = Instant::now();
            let data = format!("canary {i}");
            let r = ringpeer::tools::load::echo_roundtrip(&cs[0], &echo_addr, data.as_bytes()).await;
            took.push((t0.elapsed(), r.map(|b| b == data.as_bytes()).map_err(|e| e.to_string())));
        }
        took
    });
    stop.store(true, Ordering::Relaxed);
    let (pp, ap) = peaks.join().unwrap();
    eprintln!(
        "{dials} stalled dials ({established} relayed, upload {upload}); canary dials {canary:?}; \
         RSS proxy {} -> peak {} MiB, agent {} -> peak {} MiB",
        base.0 / MIB,
        pp / MIB,
        base.1 / MIB,
        ap / MIB
    );
    eprintln!("{}", error_lines(st.admin));
    leave.store(true, Ordering::Relaxed);
    for (i, (took, r)) in canary.iter().enumerate() {
        assert_eq!(r, &Ok(true), "canary dial {i} after {took:?}");
        assert!(*took < Duration::from_secs(1), "canary dial {i} took {took:?}");
    }
    assert_eq!(established, dials as i64, "every stalled dial was established");
    // The documented bound: per open dial PER_DIAL, and per stalled dial
    // that crosses shards a full pipe (PIPE_CAP frames); plus each
    // connection's own window (the tunnel's and, uploading, each client
    // connection's: 32 MiB) and the buffers up to the soft level of
    // `shard_buffer_bytes` (what the windows may grow by is part of it).
    const PER_DIAL: u64 = 40 << 10;
    let h2 = H2Tuning::default();
    let pipe = (PIPE_CAP as u64) * h2.max_frame_size as u64;
    let window = h2.connection_window as u64 * if upload { CONNS as u64 + 1 } else { 1 };
    let proxy_budget = dials as u64 * (PER_DIAL + pipe) + window + ProxyLimits::default().shard_buffer_bytes as u64 / 2;
    let agent_budget = dials as u64 * PER_DIAL + window + AgentLimits::default().shard_buffer_bytes as u64 / 2;
    assert!(pp - base.0 <= proxy_budget, "proxy RSS grew {} MiB > {} MiB", (pp - base.0) / MIB, proxy_budget / MIB);
    assert!(ap - base.1 <= agent_budget, "agent RSS grew {} MiB > {} MiB", (ap - base.1) / MIB, agent_budget / MIB);
    stalled.join().unwrap();
}
