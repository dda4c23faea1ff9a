//! Operating a fleet through the admin endpoint, with real proxy and agent
//! processes on a real Redis: `/metrics` parsed as Prometheus text (HELP,
//! TYPE, counters that move by exactly the dials made, histograms whose
//! counts equal the dials established, per-shard gauges), `/readyz` through
//! start, drain and stop, the Grafana dashboard's queries against what the
//! proxy exports, and admin connections that never send a request. The
//! agent's own admin endpoint: readiness that follows its tunnels, and
//! counters that move by exactly the dials it served.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::procs::admin_get as get;
use common::procs::{
    agent, free_addr, proxy_config_file, routes_of, sigterm, spawn_agent, start_proxy, wait_exit, write_agent_config,
    Proc,
};
use common::redis_server::Redis;
use common::{eventually, with_client};
use prometheus_parse::{Scrape, Value};
use ringpeer::runtime::admin_http::{HEADER_TIMEOUT, MAX_CONNS};
use ringpeer::tools::fleet::CertDir;
use ringpeer::tools::load::echo_roundtrip;
use ringpeer::tools::target::{self as targets, Kind};
use ringpeer::wire::error::Label;
use ringpeer::wire::DialTarget;

/// `/metrics`, parsed by a Prometheus text parser.
fn scrape(admin: SocketAddr) -> Scrape {
    let (status, body) = get(admin, "/metrics");
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The sum of the samples of `name` whose labels include `want`.
fn value(s: &Scrape, name: &str, want: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name && want.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(b) => b.iter().find(|b| b.less_than.is_infinite()).map_or(0.0, |b| b.count),
            Value::Summary(_) => 0.0,
        })
        .sum()
}

/// The shards that report gauge `name`.
fn shards_of(s: &Scrape, name: &str) -> BTreeSet<String> {
    s.samples.iter().filter(|x| x.metric == name).filter_map(|x| x.labels.get("shard").map(str::to_string)).collect()
}

fn t(s: &str) -> DialTarget {
    DialTarget::parse(s).unwrap()
}

/// `n` echo round trips to `target` on one client connection to `entry`;
/// how many succeeded.
fn dials(dir: &Path, entry: SocketAddr, target: &str, n: usize) -> usize {
    let target = t(target);
    with_client(entry, dir, "client", move |cl| async move {
        let mut ok = 0;
        for _ in 0..n {
            ok += usize::from(echo_roundtrip(&cl, &target, b"hello").await.as_deref() == Ok(&b"hello"[..]));
        }
        ok
    })
}

const PEERING: &str = "type = \"proxy_peering\"\nagent_connection_count = 1";

/// A proxy process of the `demo` cluster: (process, client addr, tunnel addr, admin addr).
fn start(dir: &Path, redis: &Redis, id: &str, extra: &str) -> (Proc, SocketAddr, SocketAddr, SocketAddr) {
    let (path, admin) = proxy_config_file(dir, redis, id, 10_000, PEERING, extra);
    let (p, client, tunnel) = start_proxy(&path, None);
    (p, client, tunnel, admin)
}

#[test]
fn metrics_follow_prometheus_conventions_and_count_every_dial_by_path() {
    ringpeer::runtime::raise_memlock();
    let redis = Redis::start();
    let certs = CertDir::temp().unwrap();
    let dir = &certs.path;
    let echo = targets::spawn(Kind::Echo).unwrap();
    // The agent is held by B only: dials entering at A cross a peer link.
    let (_a, a_client, _, a_admin) = start(dir, &redis, "proxy-a", "");
    let (_b, b_client, b_tunnel, b_admin) = start(dir, &redis, "proxy-b", "");
    let _agent = agent(dir, "agent-1", b_tunnel, echo.addr);
    eventually("A routes agent-1 through B", || routes_of(a_admin, "agent-1") == ["proxy-b"]);
    eventually("both ready", || get(a_admin, "/readyz").0 == 200 && get(b_admin, "/readyz").0 == 200);
    let (a0, b0) = (scrape(a_admin), scrape(b_admin));

    const PEERED: usize = 5;
    const DIRECT: usize = 4;
    assert_eq!(dials(dir, a_client, "agent-1/echo", PEERED), PEERED);
    assert_eq!(dials(dir, b_client, "agent-1/echo", DIRECT), DIRECT);
    assert_eq!(dials(dir, a_client, "agent-missing/echo", 1), 0);
    let (a1, b1) = (scrape(a_admin), scrape(b_admin));
    let moved =
        |s0: &Scrape, s1: &Scrape, name: &str, want: &[(&str, &str)]| value(s1, name, want) - value(s0, name, want);

    // Counters move by exactly the dials made, on the path each took.
    let a_peer = moved(&a0, &a1, "ringpeer_dial_attempts_total", &[("path", "peer")]);
    let a_near = moved(&a0, &a1, "ringpeer_dial_attempts_total", &[("path", "local")])
        + moved(&a0, &a1, "ringpeer_dial_attempts_total", &[("path", "shard")]);
    let b_near = moved(&b0, &b1, "ringpeer_dial_attempts_total", &[("path", "local")])
        + moved(&b0, &b1, "ringpeer_dial_attempts_total", &[("path", "shard")]);
    let b_peer = moved(&b0, &b1, "ringpeer_dial_attempts_total", &[("path", "peer")]);
    eprintln!("attempts: A peer {a_peer} near {a_near}; B near {b_near} peer {b_peer}");
    assert_eq!((a_peer, a_near), (PEERED as f64, 0.0));
    // B served A's dials over the peer link and its own clients' dials.
    assert_eq!((b_near, b_peer), ((PEERED + DIRECT) as f64, 0.0));
    assert_eq!(moved(&a0, &a1, "ringpeer_dials_total", &[]), (PEERED + 1) as f64);
    assert_eq!(moved(&b0, &b1, "ringpeer_dials_total", &[]), (PEERED + DIRECT) as f64);
    let no_route = [("error", Label::NoRoute.name()), ("side", "proxy"), ("path", "none")];
    assert_eq!(moved(&a0, &a1, "ringpeer_dials_failed_total", &no_route), 1.0);
    assert_eq!(moved(&a0, &a1, "ringpeer_dials_failed_total", &[]), 1.0);
    assert_eq!(moved(&b0, &b1, "ringpeer_dials_failed_total", &[]), 0.0);

    // Histograms: one set-up and one first byte per established dial.
    for h in ["ringpeer_dial_setup_seconds", "ringpeer_dial_first_byte_seconds"] {
        let a = moved(&a0, &a1, h, &[("path", "peer")]);
        let b = moved(&b0, &b1, h, &[("path", "local")]) + moved(&b0, &b1, h, &[("path", "shard")]);
        eprintln!("{h}: A peer {a}, B local+shard {b}");
        assert_eq!((a, b), (PEERED as f64, (PEERED + DIRECT) as f64), "{h}");
        let count = format!("{h}_count");
        assert_eq!(value(&a1, &count, &[("path", "peer")]), value(&a1, h, &[("path", "peer")]), "+Inf bucket = _count");
    }
    let setup_sum = value(&a1, "ringpeer_dial_setup_seconds_sum", &[("path", "peer")]);
    assert!(setup_sum > 0.0 && setup_sum < PEERED as f64 * 5.0, "{PEERED} peer set-ups took {setup_sum} s in all");

    // Per-shard gauges name each of the two shards; B holds the one tunnel.
    for g in ["ringpeer_tunnels", "ringpeer_active_streams", "ringpeer_buffered_bytes", "ringpeer_peer_links"] {
        assert_eq!(shards_of(&b1, g), BTreeSet::from(["0".to_string(), "1".to_string()]), "{g}");
    }
    assert_eq!(value(&b1, "ringpeer_tunnels", &[]), 1.0);
    assert!(value(&a1, "ringpeer_peer_links", &[]) >= 1.0);
    assert_eq!(value(&b1, "ringpeer_active_streams", &[]), 0.0, "every stream ended");
    // Route, backend, readiness and certificate state.
    assert!(value(&a1, "ringpeer_route_agents", &[]) >= 1.0);
    assert_eq!(value(&a1, "ringpeer_route_backend_up", &[]), 1.0);
    assert_eq!(value(&a1, "ringpeer_ready", &[]), 1.0);
    let age = value(&a1, "ringpeer_route_sync_age_seconds", &[]);
    assert!((0.0..60.0).contains(&age), "last route sync {age} s ago");
    let own = value(&a1, "ringpeer_cert_expiry_seconds", &[("cert", "own")]);
    assert!(own > 86_400.0, "own certificate: {own} s left");

    // Every sample has a TYPE (only histogram _sum/_count parse untyped),
    // every family a HELP, every counter ends in _total.
    let mut families = BTreeSet::new();
    for x in &a1.samples {
        let family = x.metric.trim_end_matches("_sum").trim_end_matches("_count");
        match &x.value {
            Value::Untyped(_) => {
                assert!(x.metric.ends_with("_sum") || x.metric.ends_with("_count"), "{} has no TYPE", x.metric)
            }
            Value::Counter(_) => assert!(x.metric.ends_with("_total"), "{}", x.metric),
            _ => {}
        }
        assert!(a1.docs.contains_key(family), "{family} has no HELP");
        families.insert(family.to_string());
    }
    families.extend(a1.docs.keys().cloned());
    eprintln!("{} families exported: {families:?}", families.len());

    // The dashboard's queries only name families the proxy exports.
    let board: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("deploy/grafana/ringpeer-fleet.json").unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&board, &mut exprs);
    assert!(exprs.len() >= 12, "{} queries", exprs.len());
    for e in &exprs {
        for name in metric_names(e) {
            let family =
                ["_bucket", "_sum", "_count"].iter().fold(name.clone(), |n, s| n.trim_end_matches(s).to_string());
            assert!(
                families.contains(&family) || families.contains(&name),
                "dashboard query {e:?} names {name}, not exported"
            );
        }
    }
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// The `ringpeer_…` identifiers in a PromQL expression.
fn metric_names(e: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = e;
    while let Some(i) = rest.find("ringpeer_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn readyz_follows_a_proxy_through_start_drain_and_stop() {
    ringpeer::runtime::raise_memlock();
    let mut redis = Redis::start();
    redis.kill();
    let certs = CertDir::temp().unwrap();
    let dir = &certs.path;
    let (mut a, _, _, admin) = start(dir, &redis, "proxy-a", "handover_wait_ms = 300");
    // Started with the route backend down: alive, not ready, and why.
    eventually("readyz names the unreachable backend", || {
        let (status, body) = get(admin, "/readyz");
        status == 503 && body.contains("unreachable") && body.contains("no routes loaded yet")
    });
    let (status, body) = get(admin, "/healthz");
    assert_eq!(status, 200, "{body}");
    let s = scrape(admin);
    assert_eq!(value(&s, "ringpeer_ready", &[]), 0.0);
    assert_eq!(value(&s, "ringpeer_route_backend_up", &[]), 0.0);
    assert!(!s.samples.iter().any(|x| x.metric == "ringpeer_route_sync_age_seconds"), "no sync yet, no age");
    eprintln!("readyz before the first sync: {}", get(admin, "/readyz").1.trim());

    // Redis comes up: ready once synced.
    redis.restart();
    let t0 = Instant::now();
    eventually("readyz turns 200 once synced", || get(admin, "/readyz").0 == 200);
    eprintln!("ready {:?} after Redis came up: {}", t0.elapsed(), get(admin, "/readyz").1.trim());
    assert_eq!(value(&scrape(admin), "ringpeer_ready", &[]), 1.0);

    // SIGTERM: not ready ("draining") at once, while still alive.
    sigterm(&a);
    let t0 = Instant::now();
    let (mut status, mut body) = get(admin, "/readyz");
    while status != 503 && t0.elapsed() < Duration::from_secs(2) {
        (status, body) = get(admin, "/readyz");
    }
    let took = t0.elapsed();
    eprintln!("readyz {status} {:?} after SIGTERM: {}", took, body.trim());
    assert_eq!(status, 503);
    assert!(body.starts_with("draining"), "{body}");
    assert!(took < Duration::from_millis(500), "readyz turned 503 {took:?} after SIGTERM");
    assert_eq!(value(&scrape(admin), "ringpeer_draining", &[]), 1.0);

    // Stopped: the process exits and the admin port is closed.
    let status = wait_exit(&mut a, Duration::from_secs(10));
    eprintln!("exited {:?} after SIGTERM: {status:?}", t0.elapsed());
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(TcpStream::connect(admin).is_err(), "admin still answers after exit");
}

#[test]
fn admin_connections_that_never_send_delay_neither_scrapes_nor_shutdown_beyond_bounds() {
    ringpeer::runtime::raise_memlock();
    let redis = Redis::start();
    let certs = CertDir::temp().unwrap();
    let dir = &certs.path;
    let (mut a, _, _, admin) = start(dir, &redis, "proxy-a", "handover_wait_ms = 0");
    eventually("ready", || get(admin, "/readyz").0 == 200);

    // MAX_CONNS silent connections take every slot; one more is refused at
    // once, naming the limit, never queued.
    let t0 = Instant::now();
    let silent: Vec<TcpStream> = (0..MAX_CONNS).map(|_| TcpStream::connect(admin).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100)); // let the admin thread accept them
    let t1 = Instant::now();
    let (status, body) = get(admin, "/metrics");
    let refused = t1.elapsed();
    eprintln!("scrape beside {MAX_CONNS} silent connections: {status} in {refused:?}: {}", body.trim());
    assert_eq!(status, 503);
    assert!(body.contains(&format!("{MAX_CONNS} admin connections")), "{body}");
    assert!(refused < Duration::from_millis(500), "refused after {refused:?}");

    // The silent ones are closed after HEADER_TIMEOUT; then scrapes work.
    let mut first = silent.into_iter().next().unwrap();
    first.set_read_timeout(Some(HEADER_TIMEOUT * 3)).unwrap();
    let n = first.read(&mut [0u8; 64]).unwrap_or(usize::MAX);
    let closed = t0.elapsed();
    eprintln!("a silent connection was closed (read {n}) {closed:?} after it opened");
    assert!(n != usize::MAX, "a silent connection still open after {:?}", HEADER_TIMEOUT * 3);
    let mut served = None;
    while served.is_none() && t0.elapsed() < HEADER_TIMEOUT * 3 {
        if get(admin, "/metrics").0 == 200 {
            served = Some(t0.elapsed());
        }
    }
    eprintln!("scrapes served again {served:?} after the flood began (header timeout {HEADER_TIMEOUT:?})");
    let served = served.expect("scrapes served again");
    assert!(served < HEADER_TIMEOUT + Duration::from_millis(1500), "{served:?}");

    // Shutdown beside MAX_CONNS + 1 connections that never send (one of
    // them refused), plus one stuck half-way through its request head.
    let mut stuck: Vec<TcpStream> = (0..=MAX_CONNS).map(|_| TcpStream::connect(admin).unwrap()).collect();
    let mut half = TcpStream::connect(admin).unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nhost:").unwrap();
    stuck.push(half);
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    sigterm(&a);
    let status = wait_exit(&mut a, Duration::from_secs(10));
    let stop = t0.elapsed();
    eprintln!("proxy exited {stop:?} after SIGTERM with {} stalled admin connections: {status:?}", stuck.len());
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    // Less than the header timeout the stalled connections would hold.
    assert!(stop < HEADER_TIMEOUT, "stalled admin connections delayed the exit to {stop:?}");
}

#[test]
fn an_agent_reports_its_tunnels_and_dials_and_is_ready_only_with_a_tunnel() {
    ringpeer::runtime::raise_memlock();
    let redis = Redis::start();
    let certs = CertDir::temp().unwrap();
    let dir = &certs.path;
    let echo = targets::spawn(Kind::Echo).unwrap();
    // "closed" is a port nothing listens on: its dials fail at the target.
    let closed = free_addr();
    // The agent starts before its proxy exists.
    let tunnel = free_addr();
    let admin = free_addr();
    let top = format!("admin_addr = \"{admin}\"\n");
    let services = format!("echo = \"{}\"\nclosed = \"{closed}\"\n", echo.addr);
    let mut agent = spawn_agent(&write_agent_config(dir, "agent-1", tunnel, &top, &services));
    eventually("the agent's admin answers, not ready: no tunnel", || {
        let (status, body) = get(admin, "/readyz");
        status == 503 && body.contains("no tunnel up")
    });
    assert_eq!(get(admin, "/healthz").0, 200);
    eventually("a failed tunnel attempt is counted", || {
        value(&scrape(admin), "ringpeer_agent_tunnel_failures_total", &[]) >= 1.0
    });
    let s = scrape(admin);
    assert_eq!(value(&s, "ringpeer_agent_ready", &[("agent", "agent-1")]), 0.0);
    assert_eq!(value(&s, "ringpeer_agent_tunnels", &[]), 0.0);
    assert!(value(&s, "ringpeer_agent_cert_expiry_seconds", &[("cert", "own")]) > 86_400.0);

    // The proxy comes up at the agent's address: ready, naming it.
    let extra = format!("tunnel_addr = \"{tunnel}\"");
    let (path, p_admin) = proxy_config_file(dir, &redis, "proxy-a", 10_000, PEERING, "");
    let cfg = std::fs::read_to_string(&path).unwrap().replace("tunnel_addr = \"127.0.0.1:0\"", &extra);
    std::fs::write(&path, cfg).unwrap();
    let (_p, client, _) = start_proxy(&path, None);
    eventually("the agent is ready once its tunnel is up", || get(admin, "/readyz").0 == 200);
    let body = get(admin, "/readyz").1;
    assert!(body.contains("proxy-a") && body.contains(&tunnel.to_string()), "{body}");
    eventually("proxy-a routes agent-1", || routes_of(p_admin, "agent-1") == ["local"]);
    let tunnels: serde_json::Value = serde_json::from_str(&get(admin, "/tunnels").1).unwrap();
    assert_eq!(tunnels["tunnels"][0]["proxy"], "proxy-a", "{tunnels}");

    let s0 = scrape(admin);
    const OK: usize = 3;
    assert_eq!(dials(dir, client, "agent-1/echo", OK), OK);
    assert_eq!(dials(dir, client, "agent-1/closed", 2), 0);
    let s1 = scrape(admin);
    let moved = |name: &str, want: &[(&str, &str)]| value(&s1, name, want) - value(&s0, name, want);
    assert_eq!(moved("ringpeer_agent_dials_total", &[]), (OK + 2) as f64);
    assert_eq!(moved("ringpeer_agent_dials_established_total", &[]), OK as f64);
    let target = [("error", Label::TargetConnect.name())];
    assert_eq!(moved("ringpeer_agent_dial_errors_total", &target), 2.0);
    assert_eq!(moved("ringpeer_agent_dial_errors_total", &[]), 2.0);
    // The histogram counts every established dial's target connect.
    assert_eq!(moved("ringpeer_agent_target_connect_seconds", &[]), OK as f64);
    assert_eq!(value(&s1, "ringpeer_agent_tunnels", &[]), 1.0);
    assert_eq!(value(&s1, "ringpeer_agent_tunnel_up", &[("proxy", "proxy-a")]), 1.0);
    assert_eq!(value(&s1, "ringpeer_agent_open_streams", &[]), 0.0);
    assert_eq!(value(&s1, "ringpeer_agent_ready", &[]), 1.0);
    for f in &s1.docs {
        assert!(f.0.starts_with("ringpeer_agent_"), "{} is not an agent family", f.0);
    }

    // SIGTERM: not ready at once, then gone.
    sigterm(&agent);
    let t0 = Instant::now();
    let (mut status, mut body) = get(admin, "/readyz");
    while status == 200 && t0.elapsed() < Duration::from_secs(2) {
        (status, body) = get(admin, "/readyz");
    }
    eprintln!("agent readyz {status} {:?} after SIGTERM: {}", t0.elapsed(), body.trim());
    assert!(status == 503 || status == 0, "{status} {body}");
    assert!(status == 0 || body.starts_with("draining"), "{body}");
    let exited = wait_exit(&mut agent, Duration::from_secs(10));
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");
    assert!(TcpStream::connect(admin).is_err(), "agent admin still answers after exit");
}
