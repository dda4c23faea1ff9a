//! Operations stories with a real proxy process logging JSON lines: SIGHUP
//! reloads the config file (log level, limits, grants of the embedded
//! store) and refuses a bad one while the old config keeps serving; a storm
//! of refused handshakes logs a handful of lines and a count, not one line
//! each; an agent reloads its services and the proxy routes the new ones
//! while open streams go on. Every stderr line of every proxy here must
//! parse as JSON (`--log-format json`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::{self, Proc};
use common::with_client;
use ringpeer::tools::fleet::CertDir;
use ringpeer::tools::load::{echo_roundtrip, open};
use ringpeer::tools::target::{self as targets, Kind};
use ringpeer::transport::identity::Role;
use ringpeer::wire::status::Code;
use ringpeer::wire::DialTarget;

const BIN: &str = env!("CARGO_BIN_EXE_ringpeer");

/// A proxy process whose stderr lines are kept, each parsed as JSON.
struct Logged {
    proc: Proc,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    client: SocketAddr,
    tunnel: SocketAddr,
}

impl Logged {
    fn start(config: &Path) -> Logged {
        let mut child = Command::new(BIN)
            .args(["--log-format", "json", "proxy", "--config", config.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut r = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        r.read_line(&mut first).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&first).unwrap_or_else(|e| panic!("not a JSON line: {first:?}: {e}"));
        let msg = v["fields"]["message"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains(" listening: "), "the proxy did not start: {first}");
        let words: Vec<&str> = msg.split_whitespace().collect();
        let at = |k: &str| words[words.iter().position(|w| *w == k).unwrap() + 1].parse().unwrap();
        let (client, tunnel) = (at("client"), at("tunnel"));
        let lines = Arc::new(Mutex::new(vec![v]));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in r.lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line: {line:?}: {e}"));
                l.lock().unwrap().push(v);
            }
        });
        Logged { proc: Proc(child), lines, client, tunnel }
    }

    fn sighup(&self) {
        // SAFETY: a plain signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.proc.0.id() as i32, libc::SIGHUP) }, 0);
    }

    /// Lines so far whose message contains `s`.
    fn count(&self, s: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|v| message(v).contains(s)).count()
    }

    /// Waits (15 s at most) for a line containing `s`; returns it.
    fn wait_for(&self, s: &str) -> String {
        let t0 = Instant::now();
        loop {
            if let Some(v) = self.lines.lock().unwrap().iter().find(|v| message(v).contains(s)) {
                return message(v);
            }
            assert!(t0.elapsed() < Duration::from_secs(15), "no log line with {s:?} in 15 s: {:#?}", self.lines);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn debug_lines(&self) -> usize {
        self.lines.lock().unwrap().iter().filter(|v| v["level"] == "DEBUG").count()
    }
}

fn message(v: &serde_json::Value) -> String {
    v["fields"]["message"].as_str().unwrap_or_default().to_string()
}

fn proxy_config(dir: &Path, top: &str, tail: &str) -> String {
    let d = dir.display();
    format!(
        "cluster = \"demo\"\nid = \"proxy-a\"\nshards = 1\nclient_addr = \"127.0.0.1:0\"\ntunnel_addr = \"127.0.0.1:0\"\n\
         peer_addr = \"127.0.0.1:0\"\npin_cpus = false\nupgrade_socket = \"{d}/proxy-a.sock\"\n{top}\n\
         [tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/proxy-a.pem\"\nkey = \"{d}/proxy-a-key.pem\"\n\
         [audit]\nenabled = false\n\
         [[grants]]\nname = \"users\"\nclients = [\"client\"]\nagents = [\"agent-1\"]\nservices = [\"*\"]\n{tail}"
    )
}

/// Opens `n` dials at once as `client` from one connection and holds them;
/// the outcome of each (Ok, or the code and message).
fn dials(p: &Logged, dir: &Path, client: &str, n: usize) -> Vec<Result<(), (Code, String)>> {
    let t = DialTarget::parse("agent-1/echo").unwrap();
    with_client(p.client, dir, client, move |c| async move {
        let mut held = Vec::new();
        let mut out = Vec::new();
        for _ in 0..n {
            match open(&c, &t).await {
                Ok(io) => {
                    held.push(io);
                    out.push(Ok(()));
                }
                Err(e) => out.push(Err((e.code, e.message.to_string()))),
            }
        }
        out
    })
}

#[test]
fn sighup_applies_log_level_limits_and_grants_and_refuses_a_bad_file() {
    let certs = CertDir::temp().unwrap();
    let dir = certs.path.as_path();
    ringpeer::transport::certs::issue(dir, Role::Client, "ops").unwrap();
    let echo = ringpeer::tools::target::spawn_at(ringpeer::tools::target::Kind::Echo, procs::free_addr()).unwrap();
    let path = dir.join("proxy-a.toml");
    std::fs::write(&path, proxy_config(dir, "log_level = \"warn\"", "")).unwrap();
    let p = Logged::start(&path);
    let _agent = procs::agent(dir, "agent-1", p.tunnel, echo.addr);

    // Before: three dials of one identity pass (streams_per_identity is
    // 20000), `ops` has no grant, and nothing logs at debug.
    common::eventually("agent-1 reachable", || dials(&p, dir, "client", 1)[0].is_ok());
    assert_eq!(dials(&p, dir, "client", 3), vec![Ok(()), Ok(()), Ok(())]);
    let denied = dials(&p, dir, "ops", 1);
    assert!(matches!(&denied[0], Err((Code::PermissionDenied, _))), "{denied:?}");
    assert_eq!(p.debug_lines(), 0, "debug lines at log_level warn");

    // The file changes: debug logs, at most 2 streams per identity, a
    // grant for `ops`, and a new client port (needs a restart).
    let ops = "[[grants]]\nname = \"ops\"\nclients = [\"ops\"]\nagents = [\"*\"]\nservices = [\"*\"]\n";
    let top = "log_level = \"debug\"\n[limits]\nstreams_per_identity = 2\n";
    let changed = proxy_config(dir, top, ops).replace("client_addr = \"127.0.0.1:0\"", "client_addr = \"127.0.0.1:1\"");
    std::fs::write(&path, changed).unwrap();
    p.sighup();
    let applied = p.wait_for("config reloaded:");
    assert!(
        applied.contains("log_level \"warn\" -> \"debug\"")
            && applied.contains("limits.streams_per_identity 20000 -> 2")
            && applied.contains("grants +ops"),
        "{applied}"
    );
    let refused = p.wait_for("NOT applied");
    assert!(refused.contains("client_addr \"127.0.0.1:0\" -> \"127.0.0.1:1\""), "{refused}");
    // One signal, both reloads: now that info lines show, a second SIGHUP
    // reloads the certificates as well as the (unchanged) config.
    p.sighup();
    p.wait_for("config reloaded: no change");
    p.wait_for("TLS reloaded");

    // After: the third dial is refused naming the budget; `ops` gets
    // through once the grant reached the shard; debug lines appear.
    let out = dials(&p, dir, "client", 3);
    assert_eq!(out[..2], [Ok(()), Ok(())]);
    assert_eq!(out[2], Err((Code::ResourceExhausted, "budget streams_per_identity (2) reached".into())), "{out:?}");
    common::eventually("ops allowed", || dials(&p, dir, "ops", 1)[0].is_ok());
    assert!(p.debug_lines() > 0, "no debug line after the reload");

    // A bad file is refused whole; the running config keeps serving.
    let bad = proxy_config(dir, "log_level = \"info\"\n[limits]\nstreams_per_identity = 0\n", ops);
    std::fs::write(&path, bad).unwrap();
    p.sighup();
    let e = p.wait_for("config reload refused");
    assert!(e.contains("limits.streams_per_identity must be > 0"), "{e}");
    let debug_before = p.debug_lines();
    let out = dials(&p, dir, "client", 3);
    assert_eq!(out[..2], [Ok(()), Ok(())]);
    assert!(matches!(&out[2], Err((Code::ResourceExhausted, _))), "{out:?}");
    assert!(p.debug_lines() > debug_before, "log_level left debug on a refused file");
    assert_eq!(p.count("config reload refused"), 1);
    assert_eq!(p.count("config reloaded: log_level"), 1);
}

#[test]
fn a_storm_of_refused_handshakes_logs_a_handful_of_lines_and_the_count() {
    const N: usize = 500;
    let certs = CertDir::temp().unwrap();
    let foreign = CertDir::temp().unwrap();
    let dir = certs.path.as_path();
    let path = dir.join("proxy-a.toml");
    std::fs::write(&path, proxy_config(dir, "log_level = \"warn\"", "")).unwrap();
    let p = Logged::start(&path);
    // A client certificate from another CA: the proxy refuses each one.
    let cfg = common::client_config_presenting(dir, &foreign.path, "client", Role::Client);
    let addr = p.client;
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                for _ in 0..N / 4 {
                    let name = ringpeer::transport::tls::server_name("127.0.0.1");
                    let conn = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
                    let tcp = std::net::TcpStream::connect(addr).unwrap();
                    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let _ = tls.write_all(b"x");
                    let _ = tls.read(&mut [0u8; 64]);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Every refusal is accounted for: logged in full, or counted in a
    // summary line (the flusher writes it within about a window).
    let refused = |p: &Logged| {
        let lines = p.lines.lock().unwrap();
        let mine: Vec<_> = lines.iter().filter(|v| message(v).contains("TLS handshake refused")).collect();
        let counted: u64 = mine.iter().map(|v| v["fields"]["repeated"].as_u64().unwrap_or(1)).sum();
        (mine.len(), counted)
    };
    let t0 = Instant::now();
    while refused(&p).1 < N as u64 {
        assert!(t0.elapsed() < Duration::from_secs(40), "{:?} after 40 s: {:#?}", refused(&p), p.lines);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (lines, counted) = refused(&p);
    eprintln!("{N} refused handshakes: {lines} log lines, counting {counted}");
    assert_eq!(counted, N as u64);
    assert!(lines <= 8, "{lines} lines for {N} refusals");
    let summary = p.wait_for("repeated");
    assert!(summary.contains("more times in the last"), "{summary}");
}

#[test]
fn an_agent_applies_a_new_log_level_and_services_and_names_the_changes_it_did_not_apply() {
    let certs = CertDir::temp().unwrap();
    let proxy = common::dead_addr();
    let agent = |level: &str, echo: &str, timeout: u64| {
        let top = format!("log_level = \"{level}\"\nconnect_timeout_ms = {timeout}\n");
        procs::write_agent_config(&certs.path, "agent-1", proxy, &top, &format!("echo = \"{echo}\"\n"))
    };
    let path = agent("warn", "127.0.0.1:7", 5_000);
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "agent", "--config", path.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let r = BufReader::new(child.stderr.take().unwrap());
    let pid = child.id() as i32;
    let _p = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in r.lines().map_while(Result::ok) {
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line: {line:?}: {e}"));
            let _ = tx.send(message(&v));
        }
    });
    // Its first warning (no proxy answers) says it runs, signals handled.
    let first = rx.recv_timeout(Duration::from_secs(15)).expect("the agent logs at warn");
    agent("info", "127.0.0.1:8", 4_000);
    let (mut applied, mut refused) = (None, None);
    let t0 = Instant::now();
    while applied.is_none() || refused.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(15), "no reload lines: {applied:?} {refused:?}");
        // SAFETY: a plain signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGHUP) };
        while let Ok(m) = rx.recv_timeout(Duration::from_millis(300)) {
            if m.contains("config reloaded: log_level") {
                applied = Some(m);
            } else if m.contains("NOT applied") {
                refused = Some(m);
            }
        }
    }
    let (applied, refused) = (applied.unwrap(), refused.unwrap());
    assert!(applied.contains("log_level \"warn\" -> \"info\""), "{first}: {applied}");
    assert!(applied.contains("services (changed echo)"), "{applied}");
    assert!(refused.contains("connect_timeout_ms 5000 -> 4000") && !refused.contains("services"), "{refused}");
}

#[test]
fn an_agent_reloads_its_services_and_the_proxy_routes_the_new_ones_without_dropping_a_stream() {
    let certs = CertDir::temp().unwrap();
    let dir = certs.path.clone();
    let cfg = dir.join("proxy-a.toml");
    std::fs::write(&cfg, proxy_config(&dir, "", "")).unwrap();
    let p = Logged::start(&cfg);
    let (echo, web) = (targets::spawn(Kind::Echo).unwrap(), targets::spawn(Kind::Echo).unwrap());
    let tunnel = p.tunnel;
    let write_agent = move |dir: &Path, services: &str| procs::write_agent_config(dir, "agent-1", tunnel, "", services);
    let agent = procs::spawn_agent(&write_agent(&dir, &format!("echo = \"{}\"\n", echo.addr)));
    let pid = agent.0.id() as i32;
    p.wait_for("agent tunnel up");
    let sighup = move || {
        // SAFETY: a plain signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    };
    let (add, remove) =
        (format!("echo = \"{}\"\nweb = \"{}\"\n", echo.addr, web.addr), format!("web = \"{}\"\n", web.addr));
    let dir2 = dir.clone();
    let (took, held, gone) = with_client(p.client, &dir, "client", move |c| async move {
        let t = |s: &str| DialTarget::parse(s).unwrap();
        // No service "web" yet: the agent says so.
        let e = echo_roundtrip(&c, &t("agent-1/web"), b"x").await.unwrap_err();
        assert!(e.code == Code::NotFound && e.message.contains("has no service \"web\""), "{e:?}");
        // A stream to "echo" stays open across both reloads.
        let mut io = open(&c, &t("agent-1/echo")).await.unwrap();
        io.write(b"one").await.unwrap();
        let mut got = Vec::new();
        io.read_exact(&mut got, 3).await.unwrap();
        // Reload 1 adds "web": dials to it work soon after.
        write_agent(&dir2, &add);
        let t0 = Instant::now();
        sighup();
        while echo_roundtrip(&c, &t("agent-1/web"), b"web").await.as_deref() != Ok(&b"web"[..]) {
            assert!(t0.elapsed() < Duration::from_secs(10), "web not served 10 s after the reload");
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        let took = t0.elapsed();
        // Reload 2 removes "echo": new dials to it are refused, naming it.
        write_agent(&dir2, &remove);
        sighup();
        let t1 = Instant::now();
        let gone = loop {
            match echo_roundtrip(&c, &t("agent-1/echo"), b"e").await {
                Err(e) if e.code == Code::NotFound => break e.message.to_string(),
                _ => assert!(t1.elapsed() < Duration::from_secs(10), "echo still served 10 s after its removal"),
            }
            glommio::timer::sleep(Duration::from_millis(20)).await;
        };
        // The stream opened before both reloads still carries bytes.
        io.write(b"two").await.unwrap();
        io.read_exact(&mut got, 6).await.unwrap();
        (took, got, gone)
    });
    eprintln!("web served {took:?} after the reload that added it; echo then refused: {gone}");
    assert_eq!(held, b"onetwo");
    assert!(gone.contains("has no service \"echo\""), "{gone}");
    // The proxy learnt each new list from the tunnel's control stream.
    p.wait_for("agent announced new services");
    assert!(p.count("agent announced new services") >= 2, "{:#?}", p.lines);
    assert_eq!(p.count("agent tunnel down"), 0, "the tunnel was replaced: {:#?}", p.lines);
    drop(agent);
}
