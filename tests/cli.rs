//! Process stories: `ringpeer` binaries as separate processes (proxy, agent,
//! dial, forward), killed and restarted for real; every operator error is
//! one clear line and a non-zero exit.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::procs::{start_proxy, Proc};
use std::time::{Duration, Instant};

use ringpeer::tools::target::{self as targets, Kind};

const BIN: &str = env!("CARGO_BIN_EXE_ringpeer");

fn ringpeer(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn certs_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let out = ringpeer(&["certs", "init", "--dir", d.path().to_str().unwrap(), "--cluster", "c1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    d
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn proxy_toml(dir: &Path, client: &str, tunnel: &str) -> String {
    let d = dir.display();
    format!(
        "cluster = \"c1\"\nid = \"proxy-a\"\nshards = 2\nclient_addr = \"{client}\"\ntunnel_addr = \"{tunnel}\"\n\
         peer_addr = \"127.0.0.1:0\"\npin_cpus = false\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/proxy-a.pem\"\nkey = \"{d}/proxy-a-key.pem\"\n[[grants]]\nname = \"all\"\nclients = [\"*\"]\nagents = [\"*\"]\nservices = [\"*\"]\n"
    )
}

fn agent_toml(dir: &Path, tunnel: SocketAddr, echo: SocketAddr, sink: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "cluster = \"c1\"\nid = \"agent-1\"\nproxies = [\"{tunnel}\"]\n[tls]\nca = \"{d}/ca.pem\"\n\
         cert = \"{d}/agent-1.pem\"\nkey = \"{d}/agent-1-key.pem\"\n[services]\necho = \"{echo}\"\nsink = \"{sink}\"\n"
    )
}

fn start_agent(config: &Path) -> Proc {
    Proc(
        Command::new(BIN)
            .args(["agent", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    )
}

/// Runs `ringpeer dial` with `input` on stdin.
fn dial(target: &str, proxy: SocketAddr, dir: &Path, input: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(["dial", target, "--proxy", &proxy.to_string(), "--certs", dir.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let w = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    w.join().unwrap();
    out
}

fn dial_until_ok(target: &str, proxy: SocketAddr, dir: &Path, input: &[u8], within: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        let out = dial(target, proxy, dir, input);
        if out.status.success() || t0.elapsed() > within {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn one_line(out: &Output) -> String {
    let e = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(e.lines().count(), 1, "expected one line on stderr, got: {e}");
    e
}

/// A proxy process and an agent process (agent-1: echo, sink) on fresh certificates.
struct Cluster {
    certs: tempfile::TempDir,
    _targets: (targets::Target, targets::Target),
    proxy: Option<Proc>,
    agent: Proc,
    client: SocketAddr,
    tunnel: SocketAddr,
    /// The proxy's admin endpoint (metrics).
    admin: SocketAddr,
}

impl Cluster {
    fn start() -> Cluster {
        let certs = certs_dir();
        let dir = certs.path();
        let echo = targets::spawn(Kind::Echo).unwrap();
        let sink = targets::spawn(Kind::Sink).unwrap();
        let admin = common::procs::free_addr();
        let toml = format!("admin_addr = \"{admin}\"\n{}", proxy_toml(dir, "127.0.0.1:0", "127.0.0.1:0"));
        let (proxy, client, tunnel) = start_proxy(&write(dir, "p.toml", &toml), None);
        let agent = start_agent(&write(dir, "a.toml", &agent_toml(dir, tunnel, echo.addr, sink.addr)));
        Cluster { certs, _targets: (echo, sink), proxy: Some(proxy), agent, client, tunnel, admin }
    }

    fn dir(&self) -> &Path {
        self.certs.path()
    }
}

#[test]
fn agent_and_proxy_processes_carry_a_dial_from_stdin_to_stdout_with_half_close() {
    let cl = Cluster::start();
    let (dir, client) = (cl.dir(), cl.client);
    // stdin ends (half-close) and the whole echo still arrives on stdout.
    let input = common::random_bytes(2 << 20);
    let out = dial_until_ok("agent-1/echo", client, dir, &input, Duration::from_secs(10));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(common::sha256(&out.stdout), common::sha256(&input));
    // The sink answers only after EOF.
    let out = dial("agent-1/sink", client, dir, &[1u8; 100_000]);
    assert!(out.status.success());
    assert_eq!(out.stdout, 100_000u64.to_be_bytes());
    // Unknown agent and unknown service: NOT_FOUND, one line, exit 1.
    let out = dial("agent-7/echo", client, dir, b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(one_line(&out).contains("NOT_FOUND: no route to agent \"agent-7\""));
    let out = dial("agent-1/ssh", client, dir, b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(one_line(&out).contains("NOT_FOUND: agent \"agent-1\" has no service \"ssh\""));
}

#[test]
fn the_agent_reconnects_after_the_proxy_is_killed_and_restarted() {
    let mut cl = Cluster::start();
    let (client, tunnel) = (cl.client, cl.tunnel);
    let out = dial_until_ok("agent-1/echo", client, cl.dir(), b"before", Duration::from_secs(10));
    assert_eq!(out.stdout, b"before");
    // kill -9 the proxy, then start it again on the same ports.
    drop(cl.proxy.take());
    assert!(cl.agent.0.try_wait().unwrap().is_none(), "the agent keeps running");
    let dir = cl.dir();
    let out = dial("agent-1/echo", client, dir, b"down");
    assert!(!out.status.success(), "no proxy, no dial");
    let restarted = write(dir, "p2.toml", &proxy_toml(dir, &client.to_string(), &tunnel.to_string()));
    let (_proxy, client2, _) = start_proxy(&restarted, None);
    assert_eq!(client2, client);
    let t0 = Instant::now();
    let out = dial_until_ok("agent-1/echo", client, dir, b"after", Duration::from_secs(15));
    assert_eq!(out.stdout, b"after", "agent came back: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("agent usable again {:?} after the proxy restarted", t0.elapsed());
}

#[test]
fn forward_multiplexes_local_connections_over_one_connection() {
    let cl = Cluster::start();
    let (dir, client) = (cl.dir(), cl.client);
    dial_until_ok("agent-1/echo", client, dir, b"up?", Duration::from_secs(10));
    // Client connections the proxy has accepted so far (the dials above).
    // The counter only grows, so a connection opened and closed in between
    // is caught too.
    let conns = || common::procs::metric(cl.admin, "ringpeer_client_connections_total").expect("admin metrics");
    let before = conns();
    let mut fwd = Command::new(BIN)
        .args(["forward", "--listen", "127.0.0.1:0", "--to", "agent-1/echo", "--proxy", &client.to_string()])
        .args(["--certs", dir.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(fwd.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let _fwd = Proc(fwd);
    std::thread::spawn(move || for _ in lines {});
    let local: SocketAddr = first.split_whitespace().nth(2).unwrap().parse().unwrap();
    let handles: Vec<_> = (0..8u8)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(local).unwrap();
                let msg = vec![i; 50_000];
                s.write_all(&msg).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let mut back = Vec::new();
                s.read_to_end(&mut back).unwrap();
                back == msg
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap(), "every forwarded connection echoes intact");
    }
    // Each echo came back through the proxy, so the connection(s) carrying
    // them were accepted (and counted) before now.
    assert_eq!(conns() - before, 1, "8 local connections must share one connection to the proxy");
}

#[test]
fn operator_errors_are_one_clear_line_and_a_nonzero_exit() {
    let certs = certs_dir();
    let dir = certs.path();
    // Unknown config key.
    let bad = write(dir, "bad.toml", &format!("shardz = 3\n{}", proxy_toml(dir, "127.0.0.1:0", "127.0.0.1:0")));
    let out = ringpeer(&["proxy", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&out).contains("unknown field `shardz`"));
    // Missing certificate.
    let missing = proxy_toml(dir, "127.0.0.1:0", "127.0.0.1:0").replace("proxy-a.pem", "nope.pem");
    let out = ringpeer(&["proxy", "--config", write(dir, "m.toml", &missing).to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&out).contains("cannot read certificate"));
    // Wrong role: a proxy configured with an agent certificate.
    let wrong = proxy_toml(dir, "127.0.0.1:0", "127.0.0.1:0")
        .replace("proxy-a.pem", "agent-1.pem")
        .replace("proxy-a-key", "agent-1-key");
    let out = ringpeer(&["proxy", "--config", write(dir, "w.toml", &wrong).to_str().unwrap()]);
    assert!(one_line(&out).contains("needs a proxy certificate"));
    // Port in use.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let inuse = proxy_toml(dir, &busy.local_addr().unwrap().to_string(), "127.0.0.1:0");
    let out = ringpeer(&["proxy", "--config", write(dir, "b.toml", &inuse).to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&out).contains("cannot listen on"));
    // A dial with a certificate from a directory without one.
    let empty = tempfile::tempdir().unwrap();
    let out = ringpeer(&["dial", "agent-1", "--proxy", "127.0.0.1:1", "--certs", empty.path().to_str().unwrap()]);
    assert!(one_line(&out).contains("cannot read CA certificate"));
    // Nothing listening.
    let out =
        ringpeer(&["dial", "agent-1", "--proxy", &common::dead_addr().to_string(), "--certs", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(one_line(&out).contains("cannot connect to"));
    // certs issue with a bad role.
    let out = ringpeer(&["certs", "issue", "--dir", dir.to_str().unwrap(), "--role", "admin", "--name", "x"]);
    assert!(one_line(&out).contains("unknown role"));
}

#[test]
fn the_demo_runs_a_three_proxy_fleet_and_passes_its_checks() {
    let out = Command::new(BIN).arg("demo").env("RUST_LOG", "warn").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("peer link -> proxy-c") && text.contains("demo: all checks passed"), "{text}");
}
