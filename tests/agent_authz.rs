//! The agent's side of "who may reach what": its own per-service allow
//! list, the client identity and source it receives from the proxies, and
//! the proxy names it holds the pushed proxy set to. Real processes (proxies
//! and agents on the Redis backend), real certificates, real sockets.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::{free_addr, proxy_config_file, routes_of, start_proxy, Proc};
use common::redis_server::Redis;
use common::{eventually, random_bytes, sha256, with_client};
use ringpeer::route::grants::Grant;
use ringpeer::route::model::ProxyInfo;
use ringpeer::route::redis::RedisFactory;
use ringpeer::route::store::StoreFactory;
use ringpeer::tools::fleet::CertDir;
use ringpeer::tools::load::echo_roundtrip;
use ringpeer::tools::target::{self as targets, Kind};
use ringpeer::transport::identity::Role;
use ringpeer::wire::error::Error;
use ringpeer::wire::status::Code;
use ringpeer::wire::DialTarget;

const BIN: &str = env!("CARGO_BIN_EXE_ringpeer");

/// A process's log lines (ANSI colours stripped), collected as it runs.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        self.0.lock().unwrap().iter().filter(|l| parts.iter().all(|p| l.contains(p))).cloned().collect()
    }

    /// Waits up to `bound` for a line holding every part.
    fn wait_for(&self, parts: &[&str], bound: Duration) -> Option<String> {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.lines_with(parts).pop() {
                return Some(l);
            }
            if t0.elapsed() > bound {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Starts agent `id` on `config`, logging the agent module at debug.
fn agent_proc(dir: &Path, id: &str, config: &str) -> (Proc, Log) {
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(BIN)
        .args(["agent", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", "warn,ringpeer::agent=debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::default();
    let (lines, l) = (BufReader::new(child.stderr.take().unwrap()).lines(), log.clone());
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            l.0.lock().unwrap().push(strip_ansi(&line));
        }
    });
    (Proc(child), log)
}

fn agent_head(dir: &Path, id: &str, seeds: &[SocketAddr]) -> String {
    let d = dir.display();
    let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "cluster = \"demo\"\nid = \"{id}\"\nproxies = [{}]\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{id}.pem\"\nkey = \"{d}/{id}-key.pem\"\n",
        seeds.join(", ")
    )
}

/// The local ports of this machine's established TCP connections to
/// `remote` (from /proc/net/tcp): a client's source port, seen from outside
/// the client library.
fn ports_connected_to(remote: SocketAddr) -> Vec<u16> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let want = format!("0100007F:{:04X}", remote.port());
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && f[2] == want && f[3] == "01")
                .then(|| u16::from_str_radix(f[1].rsplit(':').next().unwrap(), 16).unwrap())
        })
        .collect::<std::collections::BTreeSet<u16>>()
        // The kernel may list a socket twice while the table changes under
        // a read (seen: [41466, 41466]); a set counts it once.
        .into_iter()
        .collect()
}

/// A fleet on Redis with an open grant: proxy A and proxy B (processes,
/// `proxy_peering` with one tunnel per agent) and agent-1 tunnelled to B
/// only, serving `echo` to alice alone and `open` to whoever the grants
/// let through.
struct Fx {
    certs: CertDir,
    _redis: Redis,
    a_client: SocketAddr,
    b_client: SocketAddr,
    echo: targets::Target,
    open: targets::Target,
    agent_log: Log,
    _procs: Vec<Proc>,
}

impl Fx {
    fn start() -> Fx {
        ringpeer::runtime::raise_memlock();
        let certs = CertDir::temp().unwrap();
        for name in ["alice", "bob"] {
            ringpeer::transport::certs::issue(&certs.path, Role::Client, name).unwrap();
        }
        let redis = Redis::start();
        // The proxies' grants let every client of the CA reach everything:
        // only the agent's own list stands between bob and echo.
        let any = vec!["*".to_string()];
        let open = Grant::new("open", &any, &any, &any).unwrap();
        let f = RedisFactory::new(&redis.url(), "demo", 1000).unwrap();
        f.connect().unwrap().put_grant(&open).unwrap();
        let strategy = "type = \"proxy_peering\"\nagent_connection_count = 1";
        let mut procs = vec![];
        let mut start = |id: &str| {
            let (path, _) = proxy_config_file(&certs.path, &redis, id, 3000, strategy, "");
            let (p, client, tunnel) = start_proxy(&path, None);
            procs.push(p);
            (client, tunnel)
        };
        let (a_client, _) = start("proxy-a");
        let (b_client, b_tunnel) = start("proxy-b");
        let echo = targets::spawn(Kind::Echo).unwrap();
        let open_t = targets::spawn(Kind::Echo).unwrap();
        let cfg = format!(
            "{}[services]\nopen = \"{}\"\n[services.echo]\naddr = \"{}\"\nallow = [\"alice\"]\n",
            agent_head(&certs.path, "agent-1", &[b_tunnel]),
            open_t.addr,
            echo.addr
        );
        let (agent, agent_log) = agent_proc(&certs.path, "agent-1", &cfg);
        procs.push(agent);
        Fx { certs, _redis: redis, a_client, b_client, echo, open: open_t, agent_log, _procs: procs }
    }

    /// Runs one echo round trip as `client` entering at `at`; also returns
    /// the client's source port towards `at`.
    fn echo(&self, at: SocketAddr, client: &str, target: &str, data: Arc<Vec<u8>>) -> (Result<Vec<u8>, Error>, u16) {
        let t = DialTarget::parse(target).unwrap();
        with_client(at, &self.certs.path, client, move |cl| async move {
            let ports = ports_connected_to(at);
            assert_eq!(ports.len(), 1, "one client connection to {at}: {ports:?}");
            (echo_roundtrip(&cl, &t, &data).await, ports[0])
        })
    }
}

#[test]
fn the_agent_s_own_allow_list_refuses_a_granted_at_proxy_client_directly_and_across_a_peer_link() {
    let fx = Fx::start();
    let data = Arc::new(random_bytes(256 << 10));
    let sum = sha256(&data);
    // Entering at B: the agent's tunnel is local. Entering at A: the dial
    // crosses the peer link A → B, and the identity header with it.
    for (path, at) in [("direct", fx.b_client), ("peer link", fx.a_client)] {
        // The route reaches A once B's record and tunnel have spread.
        let t0 = Instant::now();
        let alice = loop {
            let (r, _) = fx.echo(at, "alice", "agent-1/echo", data.clone());
            match r {
                Err(e) if e.code == Code::NotFound || e.code == Code::Unavailable => {
                    assert!(t0.elapsed() < Duration::from_secs(20), "{path}: no route within 20 s: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                r => break r,
            }
        };
        assert_eq!(sha256(&alice.unwrap_or_else(|e| panic!("{path}: alice: {e}"))), sum, "{path}: bytes intact");
        let accepted = fx.echo.accepted();
        let (bob, _) = fx.echo(at, "bob", "agent-1/echo", data.clone());
        let e = bob.expect_err("bob is refused");
        assert_eq!(e.code, Code::PermissionDenied, "{path}: {e}");
        assert!(
            e.message.contains(r#"agent "agent-1" refuses client "bob" for service "echo" (not in its allow list)"#),
            "{path}: {e}"
        );
        assert_eq!(fx.echo.accepted(), accepted, "{path}: the target saw no connection for bob");
        // A service without an allow list serves whoever the grants admit.
        let (open, _) = fx.echo(at, "bob", "agent-1/open", data.clone());
        assert_eq!(sha256(&open.unwrap_or_else(|e| panic!("{path}: bob to open: {e}"))), sum);
    }
    assert_eq!(fx.echo.accepted(), 2, "echo served alice's two dials only");
    assert_eq!(fx.open.accepted(), 2, "open served bob's two dials");
    // The entry proxies' audit: bob's refusal by the agent, with its path.
    for (entry, path) in [("proxy-b", None), ("proxy-a", Some("peer"))] {
        let l = common::audit_line(&fx.certs.path.join(format!("{entry}-audit.log")), |l| {
            l["client"] == "spiffe://demo/client/bob" && l["service"] == "echo"
        });
        assert_eq!(l["code"], "PERMISSION_DENIED", "{l}");
        assert_eq!(l["label"], "permission_denied", "{l}");
        assert_eq!(l["agent"], "agent-1", "{l}");
        assert_eq!(l["via"], "proxy-b", "{l}");
        assert!(l["message"].as_str().unwrap().contains("refuses client \"bob\""), "{l}");
        assert!(l["source"].as_str().unwrap().starts_with("127.0.0.1:"), "{l}");
        assert_eq!((l["bytes_up"].as_u64(), l["bytes_down"].as_u64()), (Some(0), Some(0)), "{l}");
        if let Some(p) = path {
            assert_eq!(l["path"], p, "{l}");
        }
    }
}

#[test]
fn the_client_s_identity_and_source_reach_the_agent_directly_and_across_a_peer_link() {
    let fx = Fx::start();
    let data = Arc::new(random_bytes(1024));
    for (path, at) in [("direct", fx.b_client), ("peer link", fx.a_client)] {
        let t0 = Instant::now();
        let port = loop {
            match fx.echo(at, "alice", "agent-1/open", data.clone()) {
                (Ok(back), port) => {
                    assert_eq!(back, *data);
                    break port;
                }
                (Err(e), _) => {
                    assert!(t0.elapsed() < Duration::from_secs(20), "{path}: no route within 20 s: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        // The agent logged the dial with the client the entry proxy
        // authenticated and the address it saw the client at.
        let source = format!("source=\"127.0.0.1:{port}\"");
        let line = fx
            .agent_log
            .wait_for(
                &["dial", "client=\"spiffe://demo/client/alice\"", &source, "service=\"open\""],
                Duration::from_secs(5),
            )
            .unwrap_or_else(|| {
                panic!("{path}: no agent log line with alice and {source}: {:?}", fx.agent_log.0.lock().unwrap())
            });
        assert!(line.contains("DEBUG"), "{line}");
    }
}

/// The sum over shards of error label `label` on `admin`'s /metrics.
fn errors_at(admin: SocketAddr, label: &str) -> u64 {
    let Ok(mut s) = TcpStream::connect(admin) else { return 0 };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    let want = format!("error=\"{label}\"");
    body.lines()
        .filter(|l| l.starts_with("ringpeer_errors_total{") && l.contains(&want))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn an_agent_refuses_a_proxy_whose_certificate_name_differs_from_the_pushed_id() {
    ringpeer::runtime::raise_memlock();
    let certs = CertDir::temp().unwrap();
    let redis = Redis::start();
    let (path, a_admin) = proxy_config_file(&certs.path, &redis, "proxy-a", 3000, "type = \"agent_mesh\"", "");
    let (_a, _, a_tunnel) = start_proxy(&path, None);
    // Proxy C runs on its own (memory backend): it is in no proxy set, so
    // the only entry with its address is the forged one.
    let c_admin = free_addr();
    let d = certs.path.display();
    let c_cfg = format!(
        "cluster = \"demo\"\nid = \"proxy-c\"\nshards = 1\nclient_addr = \"127.0.0.1:0\"\ntunnel_addr = \"127.0.0.1:0\"\n\
         admin_addr = \"{c_admin}\"\npeer_addr = \"127.0.0.1:0\"\npin_cpus = false\nupgrade_socket = \"{d}/proxy-c.sock\"\n\
         [tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/proxy-c.pem\"\nkey = \"{d}/proxy-c-key.pem\"\n"
    );
    let c_path = certs.path.join("proxy-c.toml");
    std::fs::write(&c_path, c_cfg).unwrap();
    let (_c, _, c_tunnel) = start_proxy(&c_path, None);
    // A registry entry naming proxy-b at C's tunnel address.
    let forged = ProxyInfo {
        id: "proxy-b".into(),
        peer_addrs: vec![common::dead_addr().to_string()],
        tunnel_addr: c_tunnel.to_string(),
        client_addr: common::dead_addr().to_string(),
        version: 1,
        draining: false,
        build: String::new(),
    };
    let f = RedisFactory::new(&redis.url(), "demo", 1000).unwrap();
    f.connect().unwrap().put_proxy(&forged, Duration::from_secs(600)).unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    let cfg = format!("{}[services]\necho = \"{}\"\n", agent_head(&certs.path, "agent-1", &[a_tunnel]), echo.addr);
    let (_agent, log) = agent_proc(&certs.path, "agent-1", &cfg);
    // The agent holds its tunnel to A, and learns the set with the entry.
    eventually("agent-1 tunnelled to proxy-a", || routes_of(a_admin, "agent-1") == ["local"]);
    let seen = log.wait_for(&["proxy set", "proxy-b"], Duration::from_secs(10)).expect("the set reached the agent");
    let t0 = Instant::now();
    let want = format!(
        "proxy set entry \"proxy-b\" at {c_tunnel} presented a certificate that does not name \"proxy-b\"; refusing it"
    );
    let refusal = log.wait_for(&[&want], Duration::from_secs(5));
    assert!(refusal.is_some(), "no refusal within 5 s of the set ({seen}); log: {:?}", log.0.lock().unwrap());
    let logged_after = t0.elapsed();
    // Five more seconds: the entry is retried with backoff, not in a loop,
    // and the refusal is logged once.
    std::thread::sleep(Duration::from_secs(5));
    let handshakes = errors_at(c_admin, "tls_handshake");
    let tunnels = common::procs::metric(c_admin, "ringpeer_tunnels").unwrap_or(0);
    let refusals = log.lines_with(&[&want]).len();
    eprintln!(
        "refusal logged {logged_after:?} after the set; C refused {handshakes} handshakes; {refusals} log line(s)"
    );
    assert_eq!(tunnels, 0, "C holds no tunnel from the agent");
    assert!((1..=10).contains(&handshakes), "C saw {handshakes} handshakes from the agent in about 5-10 s");
    assert_eq!(refusals, 1, "the refusal is logged once");
    assert!(log.lines_with(&["tunnel up", "proxy-c"]).is_empty(), "no tunnel to C");
    // Now C's own record claims its address too (as a stale record and the
    // proxy that took its port would): the agent accepts C there, under
    // C's name, and only C.
    let real = ProxyInfo { id: "proxy-c".into(), ..forged };
    f.connect().unwrap().put_proxy(&real, Duration::from_secs(600)).unwrap();
    let up = format!("addr=\"{c_tunnel}\"");
    let line = log.wait_for(&["tunnel up", "proxy=\"proxy-c\"", &up], Duration::from_secs(10));
    assert!(line.is_some(), "no tunnel to C under proxy-c within 10 s: {:?}", log.0.lock().unwrap());
    assert!(log.lines_with(&["tunnel up", "proxy-b"]).is_empty(), "never a tunnel under proxy-b");
}
