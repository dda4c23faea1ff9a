//! Grants, end to end with real processes, a real Redis and real
//! certificates: who may reach what is decided at the entry proxy and again
//! at the serving proxy, before any stream or target connect; grants written
//! to Redis apply on every proxy within a bound; a revocation leaves open
//! streams alone unless asked to end them.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procs::{self, Proc};
use common::redis_server::Redis;
use common::{eventually, with_client};
use ringpeer::route::grants::Grant;
use ringpeer::route::redis::RedisFactory;
use ringpeer::route::store::{RouteStore, StoreFactory};
use ringpeer::tools::fleet::CertDir;
use ringpeer::tools::load::open;
use ringpeer::transport::identity::Role;
use ringpeer::wire::status::Code;
use ringpeer::wire::DialTarget;

/// An echo server that counts the connections it accepted.
struct CountingEcho {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
}

fn counting_echo() -> CountingEcho {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let n = accepts.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            n.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 << 10];
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 || s.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    CountingEcho { addr, accepts }
}

/// Proxies A (grants), C (`allow_all`: a proxy whose grants are wider than
/// the fleet's) and B (grants, holds agent-1's tunnel), on one Redis.
struct Topology {
    redis: Redis,
    certs: CertDir,
    echo: CountingEcho,
    a: SocketAddr,
    c: SocketAddr,
    b_admin: SocketAddr,
    _procs: Vec<Proc>,
}

fn topology() -> Topology {
    let redis = Redis::start_bare();
    let certs = CertDir::temp().unwrap();
    for name in ["alice", "bob"] {
        ringpeer::transport::certs::issue(&certs.path, Role::Client, name).unwrap();
    }
    let echo = counting_echo();
    let strategy = "type = \"proxy_peering\"\nagent_connection_count = 1";
    let start = |id: &str, extra: &str| {
        let (path, admin) = procs::proxy_config_file(&certs.path, &redis, id, 3_000, strategy, extra);
        let (p, client, tunnel) = procs::start_proxy(&path, None);
        (p, client, tunnel, admin)
    };
    let (pa, a, _, a_admin) = start("proxy-a", "");
    let (pc, c, _, c_admin) = start("proxy-c", "authorization = \"allow_all\"");
    let (pb, _, b_tunnel, b_admin) = start("proxy-b", "");
    let agent = procs::agent(&certs.path, "agent-1", b_tunnel, echo.addr);
    for admin in [a_admin, c_admin] {
        eventually("agent-1 is routable via proxy-b", || procs::routes_of(admin, "agent-1") == ["proxy-b"]);
    }
    Topology { redis, certs, echo, a, c, b_admin, _procs: vec![pa, pc, pb, agent] }
}

fn writer(redis: &Redis) -> Box<dyn RouteStore> {
    RedisFactory::new(&redis.url(), "demo", 10_000).unwrap().connect().unwrap()
}

fn alice_to_echo() -> Grant {
    Grant::new("alice-echo", &["alice".into()], &["agent-*".into()], &["echo".into()]).unwrap()
}

/// One dial as `who` at `proxy`: its code and message, and `data` echoed.
fn dial(proxy: SocketAddr, dir: &Path, who: &str, spec: &str, data: &'static [u8]) -> (Code, String) {
    let t = DialTarget::parse(spec).unwrap();
    with_client(proxy, dir, who, move |c| async move {
        match ringpeer::tools::load::echo_roundtrip(&c, &t, data).await {
            Ok(back) if back == data => (Code::Ok, String::new()),
            Ok(_) => (Code::DataLoss, "echo came back different".into()),
            Err(e) => (e.code, e.message.to_string()),
        }
    })
}

#[test]
fn grants_decide_at_the_entry_and_again_at_the_serving_proxy_and_apply_within_a_bound() {
    let t = topology();
    let dir = t.certs.path.clone();
    // No grant: alice is refused at A, naming who, what and which service,
    // and nothing about the agent's whereabouts.
    let (code, msg) = dial(t.a, &dir, "alice", "agent-1/echo", b"hello");
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    for want in ["\"alice\"", "\"agent-1\"", "\"echo\""] {
        assert!(msg.contains(want), "{want} not in {msg:?}");
    }
    assert!(!msg.contains("proxy-b") && !msg.contains("127.0.0.1"), "a refusal leaks the route: {msg}");
    // An agent that does not exist gets the same answer: no probing.
    let (code, msg) = dial(t.a, &dir, "alice", "ghost/echo", b"hello");
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    // C lets everything through (allow_all), but B, which serves the
    // agent, checks its own grants on the peer dial and refuses.
    let (code, msg) = dial(t.c, &dir, "alice", "agent-1/echo", b"hello");
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("at proxy proxy-b"), "the serving proxy should say it refused: {msg}");
    assert_eq!(t.echo.accepts.load(Ordering::SeqCst), 0, "a refused dial reached the target");

    // A grant written to Redis (as a control plane would): the next dial
    // through A succeeds, within a bound measured from the write.
    let grant = alice_to_echo();
    let a = t.a;
    let mut w = writer(&t.redis);
    let (since_write, tries) = with_client(a, &dir, "alice", move |c| async move {
        let target = DialTarget::parse("agent-1/echo").unwrap();
        let t0 = Instant::now();
        w.put_grant(&grant).unwrap();
        let mut tries = 0;
        loop {
            tries += 1;
            let started = t0.elapsed();
            match open(&c, &target).await {
                Ok(_) => return (started, tries),
                Err(e) if e.code == Code::PermissionDenied && t0.elapsed() < Duration::from_secs(5) => {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => panic!("dial after the grant: {e}"),
            }
        }
    });
    eprintln!("grant written -> first successful dial started after {since_write:?} ({tries} tries)");
    // The 100 ms p99 is the benchmark's claim (benches/route_propagation);
    // this bound only has to hold on a loaded CI machine.
    assert!(since_write < Duration::from_millis(300), "the grant took {since_write:?} to apply at A");
    // Both paths now work, bytes intact, and only these reached the target.
    assert_eq!(dial(t.a, &dir, "alice", "agent-1/echo", b"through A").0, Code::Ok);
    assert_eq!(dial(t.c, &dir, "alice", "agent-1/echo", b"through C").0, Code::Ok);
    // The grant is for alice and echo only.
    assert_eq!(dial(t.a, &dir, "bob", "agent-1/echo", b"x").0, Code::PermissionDenied);
    let accepts = t.echo.accepts.load(Ordering::SeqCst);
    assert_eq!(accepts, 3, "target accepts: the timed dial and the two round trips");
    // The entry proxies' audit has each of these dials, with its fields.
    let audit = |proxy: &str, want: &dyn Fn(&serde_json::Value) -> bool| {
        common::audit_line(&dir.join(format!("{proxy}-audit.log")), want)
    };
    let alice = |l: &serde_json::Value| l["client"] == "spiffe://demo/client/alice";
    let denied = audit("proxy-a", &|l| alice(l) && l["agent"] == "agent-1" && l["code"] == "PERMISSION_DENIED");
    assert_eq!(
        (&denied["service"], &denied["path"], &denied["via"], &denied["label"]),
        (&"echo".into(), &"none".into(), &"".into(), &"permission_denied".into()),
        "{denied}"
    );
    assert_eq!((denied["bytes_up"].as_u64(), denied["bytes_down"].as_u64()), (Some(0), Some(0)), "{denied}");
    assert!(denied["source"].as_str().unwrap().starts_with("127.0.0.1:") && denied["proxy"] == "proxy-a", "{denied}");
    audit("proxy-a", &|l| alice(l) && l["agent"] == "ghost" && l["code"] == "PERMISSION_DENIED");
    let at_b = audit("proxy-c", &|l| alice(l) && l["code"] == "PERMISSION_DENIED");
    assert_eq!((&at_b["path"], &at_b["via"]), (&"peer".into(), &"proxy-b".into()), "{at_b}");
    assert!(at_b["message"].as_str().unwrap().contains("at proxy proxy-b"), "{at_b}");
    // "through A": 9 bytes in one Frame{Data} (4 bytes of protobuf tags and
    // lengths) with its 5-byte gRPC prefix: 18 bytes up.
    let ok = audit("proxy-a", &|l| alice(l) && l["code"] == "OK" && l["bytes_up"] == 18);
    assert_eq!((&ok["path"], &ok["via"], &ok["service"]), (&"peer".into(), &"proxy-b".into(), &"echo".into()), "{ok}");
    assert!(ok["bytes_down"].as_u64().unwrap() >= 18, "{ok}");
    let (setup, total) = (ok["setup_ms"].as_f64().unwrap(), ok["duration_ms"].as_f64().unwrap());
    assert!(setup > 0.0 && total >= setup, "{ok}");
    // B's snapshot lists the grant on its admin endpoint.
    let routes = procs::routes_json(t.b_admin);
    assert!(routes["grants"]["grants"].to_string().contains("alice-echo"), "{routes}");
}

#[test]
fn a_revoked_grant_keeps_open_streams_unless_asked_to_end_them() {
    let t = topology();
    let dir = t.certs.path.clone();
    writer(&t.redis).put_grant(&alice_to_echo()).unwrap();
    let url = t.redis.url();
    let a = t.a;
    let cli = move |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringpeer"))
            .args(["grants", "--backend", &url, "--cluster", "demo"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ringpeer grants {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let out = with_client(a, &dir, "alice", move |c| async move {
        let target = DialTarget::parse("agent-1/echo").unwrap();
        let mut waited = 0;
        let mut s = loop {
            match open(&c, &target).await {
                Ok(s) => break s,
                Err(e) if e.code == Code::PermissionDenied && waited < 5000 => {
                    waited += 5;
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        let mut back = Vec::new();
        s.write(b"before").await.unwrap();
        s.read_exact(&mut back, 6).await.unwrap();
        // Revoked without --kill-streams: new dials are refused, the open
        // stream goes on.
        let said = cli(&["revoke", "alice-echo"]);
        let t0 = Instant::now();
        while open(&c, &target).await.is_ok() {
            assert!(t0.elapsed() < Duration::from_secs(2), "the revocation did not apply within 2 s");
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        let refused_after = t0.elapsed();
        s.write(b"after").await.unwrap();
        back.clear();
        s.read_exact(&mut back, 5).await.unwrap();
        assert_eq!(back, b"after", "the open stream must survive a plain revoke");
        // Granted again, a second stream; then --kill-streams ends both.
        let again = cli(&["add", "alice-echo", "--clients", "alice", "--agents", "agent-*", "--services", "echo"]);
        let mut s2 = loop {
            if let Ok(s) = open(&c, &target).await {
                break s;
            }
            glommio::timer::sleep(Duration::from_millis(2)).await;
        };
        let killed = cli(&["revoke", "alice-echo", "--kill-streams"]);
        let t1 = Instant::now();
        let mut ended = Vec::new();
        for s in [&mut s, &mut s2] {
            let end = loop {
                match s.read().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => break s.status().await,
                    Err(e) => break e.status(),
                }
            };
            ended.push((end, t1.elapsed()));
        }
        (said, refused_after, again, killed, ended)
    });
    let (said, refused_after, again, killed, ended) = out;
    eprintln!("revoke: new dials refused after {refused_after:?}; kill: {ended:?}");
    assert!(said.contains("open streams stay up"), "{said}");
    assert!(again.contains("written"), "{again}");
    assert!(killed.contains("being ended"), "{killed}");
    for (status, after) in ended {
        assert_eq!(status.code, Code::PermissionDenied, "{status}");
        assert!(status.message.contains("revoked"), "{status}");
        assert!(after < Duration::from_secs(2), "a killed stream ended only after {after:?}");
    }
}

#[test]
fn a_peer_must_name_a_client_of_the_cluster_and_cannot_widen_its_grants() {
    // An open grant lets every client reach everything: the refusals below
    // come from the identity checks alone.
    let redis = Redis::start();
    let certs = CertDir::temp().unwrap();
    let echo = counting_echo();
    let strategy = "type = \"proxy_peering\"\nagent_connection_count = 1";
    let (path, b_admin) = procs::proxy_config_file(&certs.path, &redis, "proxy-b", 3_000, strategy, "");
    let (_b, _, b_tunnel) = procs::start_proxy(&path, None);
    let _agent = procs::agent(&certs.path, "agent-1", b_tunnel, echo.addr);
    eventually("agent-1 has a tunnel to proxy-b", || procs::routes_of(b_admin, "agent-1") == ["local"]);
    let routes = procs::routes_json(b_admin);
    let peer: SocketAddr = routes["proxies"]["proxy-b"]["peer_addrs"][0].as_str().unwrap().parse().unwrap();
    // Dial B's peer port as proxy-a would, with forged client headers.
    let tls = common::client_config_as(&certs.path, "proxy-a", Role::Proxy, Some("proxy-b"));
    let accepts = echo.accepts.clone();
    let results = ringpeer::runtime::block_on("peer", move || async move {
        let h2 = ringpeer::transport::h2conf::H2Tuning::default();
        let c = ringpeer::client::Client::connect(&peer.to_string(), &tls, &h2).await.unwrap();
        let target = DialTarget::parse("agent-1/echo").unwrap();
        let mut out = Vec::new();
        for asserted in [None, Some("spiffe://demo/proxy/proxy-a"), Some("spiffe://other/client/alice"), Some("alice")]
        {
            let v = asserted.map(|s| http::HeaderValue::from_str(s).unwrap());
            let hop = ringpeer::relay::call::Hop { hops: 1, client: v.as_ref() };
            let path = ringpeer::wire::paths::PEER_DIAL;
            let r = c.dial_with(path, hop, &target, Duration::from_secs(5)).await;
            out.push((asserted, r.err().map(|e| (e.code, e.message.to_string()))));
        }
        let before_good = accepts.load(Ordering::SeqCst);
        let good = http::HeaderValue::from_static("spiffe://demo/client/alice");
        let hop = ringpeer::relay::call::Hop { hops: 1, client: Some(&good) };
        let ok = c.dial_with(ringpeer::wire::paths::PEER_DIAL, hop, &target, Duration::from_secs(5)).await;
        (out, before_good, ok.is_ok())
    })
    .unwrap();
    let (refused, before_good, good_ok) = results;
    for (asserted, r) in refused {
        let (code, msg) = r.unwrap_or_else(|| panic!("a peer dial asserting {asserted:?} was let through"));
        assert_eq!(code, Code::PermissionDenied, "{asserted:?}: {msg}");
        assert!(msg.contains("ringpeer-client-id"), "{asserted:?}: {msg}");
    }
    assert_eq!(before_good, 0, "a refused peer dial reached the target");
    assert!(good_ok, "a peer dial for a client of the cluster, allowed by the grant, is served");
    eventually("the allowed dial reached the target", || echo.accepts.load(Ordering::SeqCst) == 1);
}

#[test]
fn a_proxy_that_has_not_loaded_its_grants_says_unavailable_not_permission_denied() {
    // The control plane granted everyone everything, then the backend went
    // away; a proxy starts now, before it can load a single grant.
    let mut redis = Redis::start();
    redis.kill();
    let certs = CertDir::temp().unwrap();
    ringpeer::transport::certs::issue(&certs.path, Role::Client, "alice").unwrap();
    let (path, _) = procs::proxy_config_file(
        &certs.path,
        &redis,
        "proxy-a",
        3_000,
        "type = \"proxy_peering\"\nagent_connection_count = 1",
        "",
    );
    let (_pa, a, tunnel) = procs::start_proxy(&path, None);
    let echo = counting_echo();
    let _agent = procs::agent(&certs.path, "agent-1", tunnel, echo.addr);
    // A granted client is told to come back (retry-safe), not that it may
    // never reach the agent, and within the first-load bound.
    let t0 = Instant::now();
    let (code, msg) = dial(a, &certs.path, "alice", "agent-1/echo", b"hello");
    assert_eq!(code, Code::Unavailable, "{msg}");
    assert!(msg.contains("has not loaded its grants"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(8), "answered after {:?}", t0.elapsed());
    let l = common::audit_line(&certs.path.join("proxy-a-audit.log"), |l| l["code"] == "UNAVAILABLE");
    assert_eq!(l["label"], "not_loaded", "{l}");
    // The backend comes back with the grant: the same dial is served.
    redis.restart();
    eventually("alice is served once the grants loaded", || {
        dial(a, &certs.path, "alice", "agent-1/echo", b"hello").0 == Code::Ok
    });
    assert!(echo.accepts.load(Ordering::SeqCst) >= 1);
}
