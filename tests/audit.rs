//! Audit stories: every dial that enters a proxy's client edge leaves one
//! JSON line in the proxy's audit log, naming who dialled what from where,
//! which way it went, how it ended, and what it moved; a full audit queue
//! drops lines (and counts them) but never holds a dial back.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::eventually;
use ringpeer::config::{AuditConfig, GrantSpec, ProxyConfig};
use ringpeer::route::model::Strategy;
use ringpeer::route::store::{MemoryStore, StoreFactory};
use ringpeer::tools::fleet::{agent_config, proxy_config, AgentHandle, CertDir, ProxyHandle};
use ringpeer::tools::load::echo_roundtrip;
use ringpeer::tools::target::{self as targets, Kind, Target};
use ringpeer::wire::codec::encode_data;
use ringpeer::wire::status::{Code, Status};
use ringpeer::wire::DialTarget;
use serde_json::Value;

fn t(s: &str) -> DialTarget {
    DialTarget::parse(s).unwrap()
}

/// The audit log's lines, parsed (each must be one JSON object).
fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

/// Waits for the audit log to hold `n` lines and returns them.
fn wait_lines(path: &Path, n: usize) -> Vec<Value> {
    eventually(&format!("{n} audit lines in {}", path.display()), || lines(path).len() >= n);
    lines(path)
}

/// `cfg` with its audit appended to `<dir>/<id>.audit.jsonl`.
fn audited(mut cfg: ProxyConfig, dir: &Path) -> (ProxyConfig, PathBuf) {
    let path = dir.join(format!("{}.audit.jsonl", cfg.id));
    cfg.audit = AuditConfig::to_file(&path);
    (cfg, path)
}

/// One proxy (audited) with agent-1 and agent-2 (echo), where `client` may
/// reach agent-1 and the agent `ghost` (which never connects), nothing else.
struct One {
    certs: CertDir,
    _echo: Target,
    proxy: ProxyHandle,
    audit: PathBuf,
    _agents: Vec<AgentHandle>,
}

fn one(queue: usize) -> One {
    ringpeer::runtime::raise_memlock();
    let certs = CertDir::temp().unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    let mut cfg = proxy_config(&certs.path, "proxy-a", 1);
    cfg.grants = vec![GrantSpec {
        name: "client-to-agent-1".into(),
        clients: vec!["client".into()],
        agents: vec!["agent-1".into(), "ghost".into()],
        services: vec!["*".into()],
    }];
    let (mut cfg, audit) = audited(cfg, &certs.path);
    cfg.audit.queue = queue;
    let proxy = ProxyHandle::start(cfg).unwrap();
    let agents = ["agent-1", "agent-2"]
        .into_iter()
        .map(|id| AgentHandle::start(agent_config(&certs.path, id, &[proxy.tunnel_addr], &[("echo", echo.addr)])))
        .map(Result::unwrap)
        .collect();
    proxy.wait_tunnels(2, Duration::from_secs(10)).unwrap();
    One { certs, _echo: echo, proxy, audit, _agents: agents }
}

/// What the client of a counted dial sent and received.
struct Counted {
    source: String,
    status: Status,
    /// DATA payload bytes sent after the `DialRequest` (gRPC framing
    /// included), and received after `ConnectionEstablished`.
    up: u64,
    down: u64,
}

/// Dials `target` at `addr`, sends three framed messages, half-closes and
/// reads the echo to the end, counting the DATA payload bytes each way.
fn counted_dial(addr: std::net::SocketAddr, dir: &Path, target: &'static str) -> Counted {
    common::with_client(addr, dir, "client", move |cl| async move {
        let source = cl.local_addr().unwrap().to_string();
        let mut o = cl.dial(&t(target), Duration::from_secs(10)).await.expect("granted dial");
        let mut up = 0;
        for n in [1usize, 1000, 70_000] {
            let m = encode_data(&vec![b'a'; n]);
            up += m.len() as u64;
            o.send.send(m).await.unwrap();
        }
        o.send.close().unwrap();
        let mut down = 0;
        while let Some(c) = o.recv.chunk().await.unwrap() {
            down += c.len() as u64;
        }
        let t = o.recv.trailers().await.unwrap().expect("trailers");
        Counted { source, status: Status::from_headers(&t).unwrap(), up, down }
    })
}

fn dial_status(addr: std::net::SocketAddr, dir: &Path, target: &'static str) -> Code {
    common::with_client(addr, dir, "client", move |cl| async move {
        match cl.dial(&t(target), Duration::from_secs(10)).await {
            Ok(_) => Code::Ok,
            Err(e) => e.code,
        }
    })
}

fn ms(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("{k} is not a number in {v}"))
}

#[test]
fn a_granted_local_dial_is_one_ok_line_with_its_exact_bytes_and_times() {
    let f = one(1024);
    let c = counted_dial(f.proxy.client_addr, &f.certs.path, "agent-1/echo");
    assert!(c.status.is_ok(), "{:?}", c.status);
    // The echo sends back at least what it got (its own framing may differ).
    assert!(c.up > 71_000 && c.down > 71_000, "{} up, {} down", c.up, c.down);
    let l = &wait_lines(&f.audit, 1)[0];
    assert_eq!(l["proxy"], "proxy-a");
    assert_eq!(l["shard"], 0);
    assert_eq!(l["client"], "spiffe://demo/client/client");
    assert_eq!(l["source"], c.source.as_str(), "the client's own socket address");
    assert_eq!((l["agent"].as_str(), l["service"].as_str()), (Some("agent-1"), Some("echo")));
    assert_eq!((l["path"].as_str(), l["via"].as_str()), (Some("local"), Some("proxy-a")));
    assert_eq!(l["code"], "OK");
    assert!(l.get("label").is_none() && l.get("message").is_none(), "{l}");
    assert_eq!(l["bytes_up"].as_u64(), Some(c.up), "bytes client → agent, exactly");
    assert_eq!(l["bytes_down"].as_u64(), Some(c.down), "bytes agent → client, exactly");
    let (setup, duration) = (ms(l, "setup_ms"), ms(l, "duration_ms"));
    assert!(setup > 0.0 && setup < 10_000.0, "setup {setup} ms");
    assert!(duration >= setup, "duration {duration} ms < setup {setup} ms");
    let time = l["time"].as_str().unwrap();
    assert!(time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "RFC 3339 UTC ms: {time}");
    assert_eq!((f.proxy.metrics.audit.lines(), f.proxy.metrics.audit.dropped_count()), (1, 0));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&f.audit).unwrap().permissions().mode();
    assert_eq!(mode & 0o007, 0, "others may not read the audit log ({mode:o})");
}

#[test]
fn a_dial_served_by_another_shard_says_shard_and_counts_the_same_bytes() {
    // The client port is open only on shard 0, the tunnel port only on
    // shard 1: the dial crosses shards through the pipes.
    ringpeer::runtime::raise_memlock();
    let certs = CertDir::temp().unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    let (cfg, audit) = audited(proxy_config(&certs.path, "proxy-a", 2), &certs.path);
    let proxy = ProxyHandle::start_with(cfg, common::split_shards(0)).unwrap();
    let _agent =
        AgentHandle::start(agent_config(&certs.path, "agent-1", &[proxy.tunnel_addr], &[("echo", echo.addr)])).unwrap();
    proxy.wait_tunnels(1, Duration::from_secs(10)).unwrap();
    let c = counted_dial(proxy.client_addr, &certs.path, "agent-1/echo");
    assert!(c.status.is_ok(), "{:?}", c.status);
    let l = wait_lines(&audit, 1).remove(0);
    assert_eq!((l["shard"].as_u64(), l["path"].as_str(), l["via"].as_str()), (Some(0), Some("shard"), Some("proxy-a")));
    assert_eq!((l["code"].as_str(), l["source"].as_str()), (Some("OK"), Some(c.source.as_str())));
    assert_eq!((l["bytes_up"].as_u64(), l["bytes_down"].as_u64()), (Some(c.up), Some(c.down)));
}

#[test]
fn a_denied_dial_and_a_dial_to_an_unknown_agent_are_audited_with_their_codes() {
    let f = one(1024);
    assert_eq!(dial_status(f.proxy.client_addr, &f.certs.path, "agent-2/echo"), Code::PermissionDenied);
    let l = wait_lines(&f.audit, 1).remove(0);
    assert_eq!((l["agent"].as_str(), l["service"].as_str()), (Some("agent-2"), Some("echo")));
    assert_eq!(l["code"], "PERMISSION_DENIED");
    assert_eq!(l["label"], "permission_denied");
    assert!(l["message"].as_str().unwrap().contains("agent-2"), "{l}");
    assert_eq!((l["path"].as_str(), l["via"].as_str()), (Some("none"), Some("")));
    assert_eq!((l["bytes_up"].as_u64(), l["bytes_down"].as_u64()), (Some(0), Some(0)));
    assert!(ms(&l, "setup_ms") > 0.0 && ms(&l, "duration_ms") >= ms(&l, "setup_ms"), "{l}");

    // Granted, but no proxy holds a tunnel to it.
    assert_eq!(dial_status(f.proxy.client_addr, &f.certs.path, "ghost"), Code::NotFound);
    let l = wait_lines(&f.audit, 2).remove(1);
    assert_eq!((l["agent"].as_str(), l["service"].as_str()), (Some("ghost"), Some("")), "unresolved service");
    assert_eq!((l["code"].as_str(), l["label"].as_str()), (Some("NOT_FOUND"), Some("no_route")));
    assert_eq!(l["path"], "none");
    assert_eq!((l["bytes_up"].as_u64(), l["bytes_down"].as_u64()), (Some(0), Some(0)));
}

#[test]
fn a_dial_through_a_peer_names_the_peer_and_the_serving_proxy_writes_no_line() {
    ringpeer::runtime::raise_memlock();
    let certs = CertDir::temp().unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    let store: Arc<dyn StoreFactory> = Arc::new(MemoryStore::new(10_000));
    let start = |id: &str| {
        let mut cfg = proxy_config(&certs.path, id, 1);
        cfg.strategy = Strategy::ProxyPeering { agent_connection_count: 1 };
        let (cfg, audit) = audited(cfg, &certs.path);
        let l = ringpeer::Listeners::bind(&cfg).unwrap();
        (ProxyHandle::start_full(cfg, l, Some(store.clone())).unwrap(), audit)
    };
    let (a, a_audit) = start("proxy-a");
    let (b, b_audit) = start("proxy-b");
    let services = [("echo", echo.addr), ("refused", common::dead_addr())];
    let _agent = AgentHandle::start(agent_config(&certs.path, "agent-1", &[b.tunnel_addr], &services)).unwrap();
    b.wait_tunnels(1, Duration::from_secs(10)).unwrap();
    eventually("A routes agent-1 via B", || a.routes().get("agent-1").is_some_and(|r| !r.remote.is_empty()));
    let c = counted_dial(a.client_addr, &certs.path, "agent-1/echo");
    assert!(c.status.is_ok(), "{:?}", c.status);
    let l = wait_lines(&a_audit, 1).remove(0);
    assert_eq!(
        (l["proxy"].as_str(), l["path"].as_str(), l["via"].as_str()),
        (Some("proxy-a"), Some("peer"), Some("proxy-b"))
    );
    assert_eq!(l["code"], "OK");
    assert_eq!((l["bytes_up"].as_u64(), l["bytes_down"].as_u64()), (Some(c.up), Some(c.down)));
    // B served the dial over a peer link: the entry proxy audits, B does not.
    assert_eq!(b.metrics.sum(|s| s.dials.get()), 1, "B saw the peer dial");
    assert_eq!(lines(&b_audit).len(), 0);
    assert_eq!(b.metrics.audit.lines(), 0);

    // A dial the agent cannot connect: it failed at B, and A's line says so.
    let code = dial_status(a.client_addr, &certs.path, "agent-1/refused");
    assert_ne!(code, Code::Ok);
    let l = wait_lines(&a_audit, 2).remove(1);
    assert_eq!((l["path"].as_str(), l["via"].as_str()), (Some("peer"), Some("proxy-b")), "the upstream tried last");
    assert_eq!(l["code"], code.name());
    assert!(l["label"].is_string() && l["message"].is_string(), "{l}");
    assert_eq!((l["bytes_up"].as_u64(), l["bytes_down"].as_u64()), (Some(0), Some(0)));
    eprintln!("refused at the agent, audited at A: {l}");
}

#[test]
fn a_flood_past_a_one_line_queue_drops_lines_exactly_and_no_dial_fails() {
    const DIALS: usize = 300;
    let f = one(1);
    let t0 = Instant::now();
    let results = common::with_client(f.proxy.client_addr, &f.certs.path, "client", |cl| async move {
        let tasks: Vec<_> = (0..DIALS)
            .map(|_| {
                let cl = cl.clone();
                glommio::spawn_local(async move { echo_roundtrip(&cl, &t("agent-1/echo"), b"ping").await })
            })
            .collect();
        let mut out = Vec::with_capacity(DIALS);
        for t in tasks {
            out.push(t.await.map(|b| b.len()).map_err(|e| e.to_string()));
        }
        out
    });
    let took = t0.elapsed();
    let failed: Vec<_> = results.iter().filter(|r| r != &&Ok(4)).collect();
    assert!(failed.is_empty(), "{} of {DIALS} dials failed: {:?}", failed.len(), &failed[..failed.len().min(3)]);
    assert!(took < Duration::from_secs(30), "{DIALS} dials took {took:?}");
    let audit = f.proxy.metrics.audit.clone();
    eventually("every dial written or dropped", || audit.lines() + audit.dropped_count() == DIALS as u64);
    // Exact accounting: nothing lost uncounted, nothing counted twice.
    assert!(audit.dropped_count() > 0, "a one-line queue under {DIALS} concurrent dials must drop some");
    assert_eq!(lines(&f.audit).len() as u64, audit.lines(), "the file holds exactly the lines counted");
    assert_eq!(f.proxy.metrics.sum(|s| s.dials.get()), DIALS as u64);
    let m = ringpeer::proxy::scrape::Families::of_metrics("proxy-a", f.proxy.metrics.clone()).render();
    assert!(m.contains(&format!("ringpeer_audit_dropped_total{{proxy=\"proxy-a\"}} {}", audit.dropped_count())), "{m}");
    assert!(m.contains(&format!("ringpeer_audit_lines_total{{proxy=\"proxy-a\"}} {}", audit.lines())), "{m}");
    eprintln!("{DIALS} dials in {took:?}: {} lines written, {} dropped", audit.lines(), audit.dropped_count());
}

#[test]
fn a_sink_that_stops_reading_holds_back_no_dial_and_not_the_proxy_stop() {
    const DIALS: usize = 1500;
    const QUEUE: usize = 512;
    // A line is at least 240 bytes: the pipe holds at most 273 of them,
    // and the writer's blocked batch (64 KiB and one line) as many again.
    const MAX_HELD: u64 = (64 << 10) / 240;
    ringpeer::runtime::raise_memlock();
    let certs = CertDir::temp().unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    // The audit goes into a pipe whose reader never reads: once its 64 KiB
    // are full (some 200 lines), the writer thread blocks in write(2).
    let fifo = certs.path.join("audit.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    use std::os::unix::fs::OpenOptionsExt;
    let reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
    // 64 KiB, whatever this system's default.
    use std::os::fd::AsRawFd;
    // SAFETY: an open pipe descriptor.
    assert_eq!(unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETPIPE_SZ, 65_536) }, 65_536);
    let mut cfg = proxy_config(&certs.path, "proxy-a", 1);
    // More lines queue than the pipe holds, so the writer must block.
    cfg.audit = AuditConfig { queue: QUEUE, ..AuditConfig::to_file(&fifo) };
    let proxy = ProxyHandle::start(cfg).unwrap();
    let _agent =
        AgentHandle::start(agent_config(&certs.path, "agent-1", &[proxy.tunnel_addr], &[("echo", echo.addr)])).unwrap();
    proxy.wait_tunnels(1, Duration::from_secs(10)).unwrap();
    let t0 = Instant::now();
    let ok = common::with_client(proxy.client_addr, &certs.path, "client", |cl| async move {
        let tasks: Vec<_> = (0..DIALS)
            .map(|_| {
                let cl = cl.clone();
                glommio::spawn_local(async move { echo_roundtrip(&cl, &t("agent-1/echo"), b"ping").await.is_ok() })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await);
        }
        ok
    });
    let took = t0.elapsed();
    assert_eq!(ok, DIALS, "every dial succeeds while the audit sink is stuck");
    assert!(took < Duration::from_secs(30), "{DIALS} dials took {took:?}");
    let audit = proxy.metrics.audit.clone();
    // Stuck: the pipe full (64 KiB, some 190 lines), the writer blocked
    // with a batch of at most 64 KiB more, the queue full, the rest dropped.
    let in_pipe = || {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        unsafe { libc::ioctl(reader.as_raw_fd(), libc::FIONREAD, &mut n) };
        n as usize
    };
    // A blocked writer leaves the pipe nearly full (its 16 pages, partly
    // filled where writes did not merge).
    eventually("the pipe full", || in_pipe() > 48 << 10);
    assert!(audit.lines() <= MAX_HELD, "{} lines cannot all have fit in a 64 KiB pipe", audit.lines());
    // What neither the pipe, the blocked batch nor the queue holds was dropped.
    let least = DIALS as u64 - QUEUE as u64 - 2 * MAX_HELD - 1;
    eventually(&format!("at least {least} dropped"), || audit.dropped_count() >= least);
    // Stopping waits for the stuck writer a bounded time, then leaves it.
    let (tx, rx) = std::sync::mpsc::channel();
    let t1 = Instant::now();
    std::thread::spawn(move || tx.send(proxy.stop().is_ok()).unwrap());
    let stopped = rx.recv_timeout(Duration::from_secs(20)).expect("the proxy stops despite a stuck audit sink");
    assert!(stopped);
    let stop = t1.elapsed();
    let (l, d) = (audit.lines(), audit.dropped_count());
    assert!(
        stop >= ringpeer::proxy::audit::STOP_WAIT,
        "it waited for the writer first ({stop:?}; {l} lines, {d} dropped)"
    );
    eprintln!(
        "{DIALS} dials in {took:?} with the sink stuck: {} lines written, {} dropped; stop took {stop:?}",
        audit.lines(),
        audit.dropped_count()
    );
    // The writer left behind writes what it holds once the pipe is read,
    // and the accounting comes out exact: every dial written or dropped.
    let (mut reader, mut read, mut buf) = (reader, Vec::new(), [0u8; 65536]);
    eventually("the freed writer accounts for every dial", || {
        use std::io::Read;
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            read.extend_from_slice(&buf[..n]);
        }
        audit.lines() + audit.dropped_count() == DIALS as u64
    });
    let written = read.iter().filter(|&&b| b == b'\n').count() as u64;
    assert_eq!(written, audit.lines(), "every line counted as written came out of the pipe");
    eprintln!("after the pipe was read: {} lines, {} dropped, {written} read", audit.lines(), audit.dropped_count());
}
