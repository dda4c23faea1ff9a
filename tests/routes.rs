//! Route store stories against a real redis-server: proxies converge, Redis
//! dies and comes back while streams run, a proxy killed with -9 expires,
//! trimming forces a resync, garbage is skipped, and a plain Redis client
//! (not our code) can write routes a proxy uses.

mod common;

use std::time::{Duration, Instant};

use common::redis_server::Redis;
use common::{eventually, random_bytes, sha256};
use prost::Message;
use ringpeer::config::BackendKind;
use ringpeer::route::model::Strategy;
use ringpeer::tools::fleet::{agent_config, proxy_config, AgentHandle, CertDir, ProxyHandle};
use ringpeer::tools::load::{echo_roundtrip, open};
use ringpeer::tools::target::{self as targets, Kind};
use ringpeer::wire::pb::v1 as pb;
use ringpeer::wire::DialTarget;

fn t(s: &str) -> DialTarget {
    DialTarget::parse(s).unwrap()
}

fn redis_proxy(certs: &CertDir, redis: &Redis, id: &str, ttl_ms: u64) -> ProxyHandle {
    let mut cfg = proxy_config(&certs.path, id, 1);
    cfg.backend.kind = BackendKind::Redis;
    cfg.backend.url = Some(redis.url());
    cfg.grants.clear();
    cfg.backend.proxy_ttl_ms = ttl_ms;
    // One tunnel per agent, so an agent stays on the proxy it dialled.
    cfg.strategy = Strategy::ProxyPeering { agent_connection_count: 1 };
    ProxyHandle::start(cfg).unwrap()
}

fn has_route(p: &ProxyHandle, agent: &str, via: &str) -> bool {
    p.routes()
        .get(agent)
        .is_some_and(|r| r.remote.iter().any(|x| &*x.proxy == via) || (via == "local" && !r.local.is_empty()))
}

fn key(k: &str) -> String {
    format!("ringpeer:{{demo}}:{k}")
}

#[test]
fn an_agent_on_b_becomes_routable_on_a_and_leaves_cleanly() {
    let redis = Redis::start();
    let certs = CertDir::temp().unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    let a = redis_proxy(&certs, &redis, "proxy-a", 10_000);
    let b = redis_proxy(&certs, &redis, "proxy-b", 10_000);
    let agent =
        AgentHandle::start(agent_config(&certs.path, "agent-1", &[b.tunnel_addr], &[("echo", echo.addr)])).unwrap();
    eventually("A routes agent-1 via B", || has_route(&a, "agent-1", "proxy-b"));
    eventually("B's own snapshot has the tunnel", || has_route(&b, "agent-1", "local"));
    // A dial at A follows the route learned from Redis, over the peer link to B.
    let back = common::with_client(a.client_addr, &certs.path, "client", |c| async move {
        echo_roundtrip(&c, &t("agent-1/echo"), b"via redis and a peer link").await
    });
    assert_eq!(back.unwrap(), b"via redis and a peer link");
    // The agent leaves: the route disappears from A and from Redis.
    drop(agent);
    eventually("A drops the route", || a.routes().get("agent-1").is_none());
    let n: usize = redis::Commands::hlen(&mut redis.con(), key("agent:agent-1")).unwrap();
    assert_eq!(n, 0);
}

#[test]
fn redis_killed_and_restarted_while_streams_run_loses_nothing_and_converges() {
    let mut redis = Redis::start();
    let certs = CertDir::temp().unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    let a = redis_proxy(&certs, &redis, "proxy-a", 10_000);
    let _agent =
        AgentHandle::start(agent_config(&certs.path, "agent-1", &[a.tunnel_addr], &[("echo", echo.addr)])).unwrap();
    a.wait_tunnels(1, Duration::from_secs(10)).unwrap();
    eventually("A synced with Redis", || a.routes().backend_up);
    let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
    let (killed_tx, killed_rx) = std::sync::mpsc::channel::<()>();
    let data = random_bytes(8 << 20);
    let sum = sha256(&data);
    let client = {
        let (addr, dir) = (a.client_addr, certs.path.clone());
        std::thread::spawn(move || {
            common::with_client(addr, &dir, "client", move |c| async move {
                // A stream that is open across the outage.
                let mut long = open(&c, &t("agent-1/echo")).await.unwrap();
                let mut back = Vec::new();
                for (i, chunk) in data.chunks(1 << 20).enumerate() {
                    if i == 2 {
                        kill_tx.send(()).unwrap();
                        killed_rx.recv().unwrap();
                        // New dials still work while Redis is down.
                        let again = echo_roundtrip(&c, &t("agent-1/echo"), b"during the outage").await.unwrap();
                        assert_eq!(again, b"during the outage");
                    }
                    long.write(chunk).await.unwrap();
                    let want = back.len() + chunk.len();
                    long.read_exact(&mut back, want).await.unwrap();
                }
                long.close_write().unwrap();
                while long.read().await.unwrap().is_some() {}
                (back, long.status().await)
            })
        })
    };
    kill_rx.recv().unwrap();
    redis.kill();
    // The outage has begun for the proxy once its snapshot says so; only
    // then does the client try a new dial and carry on with the stream.
    eventually("A sees the backend down", || !a.routes().backend_up);
    killed_tx.send(()).unwrap();
    let (back, status) = client.join().unwrap();
    assert!(status.is_ok(), "{status}");
    assert_eq!(sha256(&back), sum, "no data lost across the outage");
    assert!(a.routes().get("agent-1").is_some_and(|r| !r.local.is_empty()), "local routes stay exact");
    assert!(!a.routes().backend_up, "the whole stream ran while the backend was down");
    // Redis comes back empty; the proxy republishes and the backend converges.
    redis.restart();
    eventually("route republished", || {
        redis::Commands::hexists(&mut redis.con(), key("agent:agent-1"), "proxy-a").unwrap_or(false)
    });
    eventually("proxy re-registered", || {
        redis::Commands::exists(&mut redis.con(), key("proxy:proxy-a")).unwrap_or(false)
    });
    eventually("A's snapshot says the backend is back", || a.routes().backend_up);
}

#[test]
fn routes_written_by_a_plain_redis_client_are_used_and_garbage_is_skipped() {
    let redis = Redis::start();
    let certs = CertDir::temp().unwrap();
    let a = redis_proxy(&certs, &redis, "proxy-a", 10_000);
    let mut con = redis.con();
    // Garbage under our keys first: must be logged and skipped, never fatal.
    redis::pipe()
        .cmd("SET")
        .arg(key("proxy:junk"))
        .arg(b"\xff\xfe garbage".as_slice())
        .arg("PX")
        .arg(60_000)
        .ignore()
        .cmd("HSET")
        .arg(key("agent:junk"))
        .arg("proxy-z")
        .arg(b"\x0a\xff".as_slice())
        .ignore()
        .cmd("XADD")
        .arg(key("events"))
        .arg("*")
        .arg("e")
        .arg(b"\x08\x63\xff".as_slice())
        .ignore()
        .query::<()>(&mut con)
        .unwrap();
    // Another control plane registers proxy-z holding agent ext-1, using
    // only the documented schema: prost bytes under the documented keys.
    let rec = pb::ProxyRecord {
        id: "proxy-z".into(),
        peer_addrs: vec!["10.9.9.9:3021".into()],
        tunnel_addr: "10.9.9.9:3024".into(),
        client_addr: "10.9.9.9:3080".into(),
        version: 1,
        ..Default::default()
    };
    let route = pb::AgentRoute {
        proxy_id: "proxy-z".into(),
        shard: 0,
        services: vec!["ssh".into()],
        expires_unix_ms: u64::MAX,
    };
    let proxy_up = pb::RouteEvent {
        r#type: pb::route_event::Kind::ProxyUp as i32,
        proxy_id: "proxy-z".into(),
        proxy: Some(rec.clone()),
        ttl_ms: 60_000,
        ..Default::default()
    };
    let agent_up = pb::RouteEvent {
        r#type: pb::route_event::Kind::AgentUp as i32,
        agent_id: "ext-1".into(),
        proxy_id: "proxy-z".into(),
        route: Some(route.clone()),
        ..Default::default()
    };
    let t0 = Instant::now();
    redis::pipe()
        .atomic()
        .cmd("SET")
        .arg(key("proxy:proxy-z"))
        .arg(rec.encode_to_vec())
        .arg("PX")
        .arg(60_000)
        .ignore()
        .cmd("HSET")
        .arg(key("agent:ext-1"))
        .arg("proxy-z")
        .arg(route.encode_to_vec())
        .ignore()
        .cmd("XADD")
        .arg(key("events"))
        .arg("MAXLEN")
        .arg("~")
        .arg(10_000)
        .arg("*")
        .arg("e")
        .arg(proxy_up.encode_to_vec())
        .ignore()
        .cmd("XADD")
        .arg(key("events"))
        .arg("MAXLEN")
        .arg("~")
        .arg(10_000)
        .arg("*")
        .arg("e")
        .arg(agent_up.encode_to_vec())
        .ignore()
        .query::<()>(&mut con)
        .unwrap();
    eventually("A sees ext-1 via proxy-z", || has_route(&a, "ext-1", "proxy-z"));
    eprintln!("externally written route visible on A after {:?}", t0.elapsed());
    let r = a.routes();
    assert_eq!(r.get("ext-1").unwrap().remote[0].peer_addr.as_deref(), Some("10.9.9.9:3021"));
    assert!(r.get("junk").is_none(), "the garbage route is skipped");
    let e =
        common::with_client(
            a.client_addr,
            &certs.path,
            "client",
            |c| async move { open(&c, &t("ext-1/ssh")).await.err() },
        );
    assert!(e.unwrap().message.contains("proxy-z"), "the proxy routes by the externally written record");
    // routes list reads the same schema and warns about the garbage.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringpeer"))
        .args(["routes", "--backend", &redis.url(), "--cluster", "demo", "list"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("ext-1") && text.contains("proxy-z") && text.contains("skipped"), "{text}");
}

#[test]
fn keys_of_the_wrong_type_are_skipped_and_never_stop_sync() {
    // Before any proxy starts, every kind of route key holds the wrong type.
    let redis = Redis::start();
    let mut con = redis.con();
    let _: () = redis::cmd("HSET").arg(key("proxy:bogus")).arg("f").arg("v").query(&mut con).unwrap();
    let _: () = redis::cmd("SET").arg(key("agent:ghost")).arg("not a hash").query(&mut con).unwrap();
    let _: () = redis::cmd("SET").arg(key("agent:agent-1")).arg("not a hash either").query(&mut con).unwrap();
    let _: () = redis::cmd("HSET").arg(key("strategy")).arg("f").arg("v").query(&mut con).unwrap();
    let _: () = redis::cmd("SET").arg(key("events")).arg("x").query(&mut con).unwrap();
    let certs = CertDir::temp().unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    let a = redis_proxy(&certs, &redis, "proxy-a", 10_000);
    let b = redis_proxy(&certs, &redis, "proxy-b", 10_000);
    let _agent =
        AgentHandle::start(agent_config(&certs.path, "agent-1", &[b.tunnel_addr], &[("echo", echo.addr)])).unwrap();
    // Sync works: B's tunnel reaches A through Redis, and a dial follows it.
    eventually("A routes agent-1 via B", || has_route(&a, "agent-1", "proxy-b"));
    eventually("both proxies see the backend up", || a.routes().backend_up && b.routes().backend_up);
    let back = common::with_client(a.client_addr, &certs.path, "client", |c| async move {
        echo_roundtrip(&c, &t("agent-1/echo"), b"through garbage").await
    });
    assert_eq!(back.unwrap(), b"through garbage");
    // The keys the proxies write were set aside (kept for inspection), the
    // others left alone; the reader of the backend lists what is valid.
    let kind = |k: &str| -> String { redis::cmd("TYPE").arg(key(k)).query(&mut redis.con()).unwrap() };
    assert_eq!(kind("events"), "stream");
    assert_eq!(kind("agent:agent-1"), "hash");
    assert_eq!(kind("proxy:bogus"), "hash", "a key no proxy writes is skipped, not touched");
    let aside: Vec<String> = redis::cmd("KEYS").arg(key("*:bad:*")).query(&mut redis.con()).unwrap();
    assert_eq!(aside.len(), 2, "{aside:?}");
    let factory = ringpeer::route::redis::RedisFactory::new(&redis.url(), "demo", 10_000).unwrap();
    let mut store = ringpeer::route::store::StoreFactory::connect(&factory).unwrap();
    let listed = ringpeer::tools::routes::list(&mut *store, false).unwrap();
    assert!(listed.contains("agent-1"), "{listed}");
}

#[test]
fn key_names_and_values_that_do_not_decode_are_skipped_and_sync_goes_on() {
    // Before any proxy starts: key names that are not UTF-8, a hash field
    // name that is not UTF-8, garbage values, and stream entries whose field
    // name is not UTF-8 or whose value is garbage.
    let redis = Redis::start();
    let mut con = redis.con();
    let raw = |k: &[u8]| [key("").as_bytes(), k].concat();
    let good_route =
        pb::AgentRoute { proxy_id: "proxy-z".into(), shard: 0, services: vec![], expires_unix_ms: u64::MAX }
            .encode_to_vec();
    let bad_event = |con: &mut redis::Connection, field: &[u8], value: &[u8]| {
        let _: String = redis::cmd("XADD").arg(key("events")).arg("*").arg(field).arg(value).query(con).unwrap();
    };
    let _: () = redis::cmd("SET").arg(raw(b"proxy:\xff\xfe")).arg("x").arg("PX").arg(60_000).query(&mut con).unwrap();
    let _: () = redis::cmd("HSET").arg(raw(b"agent:\xc3\x28")).arg("proxy-z").arg(&good_route).query(&mut con).unwrap();
    let _: () =
        redis::cmd("HSET").arg(key("agent:agent-9")).arg(b"\xff".as_slice()).arg(&good_route).query(&mut con).unwrap();
    let _: () = redis::cmd("SET")
        .arg(key("proxy:junk"))
        .arg(b"\x0a\xff\xff".as_slice())
        .arg("PX")
        .arg(60_000)
        .query(&mut con)
        .unwrap();
    bad_event(&mut con, b"\xff\xfe", b"x");
    bad_event(&mut con, b"e", b"\x08\x63\xff garbage");
    let certs = CertDir::temp().unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    let a = redis_proxy(&certs, &redis, "proxy-a", 3_000);
    let b = redis_proxy(&certs, &redis, "proxy-b", 3_000);
    let _agent1 =
        AgentHandle::start(agent_config(&certs.path, "agent-1", &[b.tunnel_addr], &[("echo", echo.addr)])).unwrap();
    eventually("A routes agent-1 via B", || has_route(&a, "agent-1", "proxy-b"));
    // More bad entries while the proxies follow the stream: the reader
    // skips them and keeps following (a later agent still propagates by
    // event, well before the periodic resync).
    bad_event(&mut con, b"\xff", b"\xff");
    bad_event(&mut con, b"e", b"garbage");
    let t0 = Instant::now();
    let _agent2 =
        AgentHandle::start(agent_config(&certs.path, "agent-2", &[b.tunnel_addr], &[("echo", echo.addr)])).unwrap();
    eventually("A routes agent-2 via B", || has_route(&a, "agent-2", "proxy-b"));
    eprintln!("agent-2 propagated past the bad entries in {:?}", t0.elapsed());
    let back = common::with_client(a.client_addr, &certs.path, "client", |c| async move {
        echo_roundtrip(&c, &t("agent-2/echo"), b"past bad bytes").await
    });
    assert_eq!(back.unwrap(), b"past bad bytes");
    assert!(a.routes().backend_up && b.routes().backend_up);
    // Heartbeats go on: B's record (TTL 3 s) is refreshed.
    let pttl =
        |con: &mut redis::Connection| -> i64 { redis::cmd("PTTL").arg(key("proxy:proxy-b")).query(con).unwrap() };
    let first = pttl(&mut con);
    eventually("B's record is refreshed by a heartbeat", || pttl(&mut redis.con()) > first);
    // The good route of agent-9 (beside a field name that is not UTF-8)
    // is dropped with that field only; routes list works and names each
    // bad key, escaped.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringpeer"))
        .args(["routes", "--backend", &redis.url(), "--cluster", "demo", "list"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    for k in ["proxy:\\xff\\xfe", "agent:\\xc3(", "agent:agent-9 field \\xff", "proxy:junk", "agent-1", "agent-2"] {
        assert!(text.contains(k), "routes list lacks {k:?}:\n{text}");
    }
}

#[test]
fn a_trimmed_event_stream_forces_a_full_resync_that_converges() {
    let redis = Redis::start();
    let certs = CertDir::temp().unwrap();
    let a = redis_proxy(&certs, &redis, "proxy-a", 10_000);
    let b = redis_proxy(&certs, &redis, "proxy-b", 10_000);
    eventually("A sees B", || a.routes().proxies.contains_key("proxy-b"));
    // A route appears in the hashes, but its event is trimmed away in the
    // same transaction it was added: A can only learn it by noticing the gap
    // and resyncing fully.
    let route = pb::AgentRoute {
        proxy_id: "proxy-b".into(),
        shard: 0,
        services: vec!["echo".into()],
        expires_unix_ms: u64::MAX,
    };
    let ev = pb::RouteEvent {
        r#type: pb::route_event::Kind::AgentUp as i32,
        agent_id: "silent-1".into(),
        proxy_id: "proxy-b".into(),
        route: Some(route.clone()),
        ..Default::default()
    };
    redis::pipe()
        .atomic()
        .cmd("HSET")
        .arg(key("agent:silent-1"))
        .arg("proxy-b")
        .arg(route.encode_to_vec())
        .ignore()
        .cmd("XADD")
        .arg(key("events"))
        .arg("*")
        .arg("e")
        .arg(ev.encode_to_vec())
        .ignore()
        .cmd("XTRIM")
        .arg(key("events"))
        .arg("MAXLEN")
        .arg(0)
        .ignore()
        .query::<()>(&mut redis.con())
        .unwrap();
    let t0 = Instant::now();
    eventually("A converged through a full resync", || has_route(&a, "silent-1", "proxy-b"));
    eprintln!("trim detected and resynced after {:?}", t0.elapsed());
    drop(b);
}

#[test]
fn strategy_is_seeded_once_and_changes_propagate_to_every_proxy() {
    let redis = Redis::start();
    let certs = CertDir::temp().unwrap();
    let mut cfg = proxy_config(&certs.path, "proxy-a", 1);
    cfg.backend.kind = BackendKind::Redis;
    cfg.backend.url = Some(redis.url());
    cfg.grants.clear();
    cfg.strategy = Strategy::ProxyPeering { agent_connection_count: 2 };
    let a = ProxyHandle::start(cfg).unwrap();
    eventually("seeded", || a.routes().strategy == Strategy::ProxyPeering { agent_connection_count: 2 });
    // B's config asks for proxy_peering 1, but the cluster's strategy is already set.
    let b = redis_proxy(&certs, &redis, "proxy-b", 10_000);
    eventually("B follows the cluster", || b.routes().strategy == Strategy::ProxyPeering { agent_connection_count: 2 });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringpeer"))
        .args(["routes", "--backend", &redis.url(), "--cluster", "demo", "set-strategy", "agent_mesh"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t0 = Instant::now();
    eventually("both switch", || {
        a.routes().strategy == Strategy::AgentMesh && b.routes().strategy == Strategy::AgentMesh
    });
    eprintln!("strategy change visible on both proxies after {:?} (includes the CLI process exit)", t0.elapsed());
}

mod processes {
    use super::*;
    use common::procs::{agent, proxy, routes_json, routes_of};
    use std::process::Command;

    const BIN: &str = env!("CARGO_BIN_EXE_ringpeer");

    #[test]
    fn three_proxy_processes_converge_on_the_same_routes() {
        let redis = Redis::start();
        let certs = CertDir::temp().unwrap();
        let dir = &certs.path;
        let echo = targets::spawn(Kind::Echo).unwrap();
        let (_a, _, admin_a) = proxy(dir, &redis, "proxy-a", 10_000, 1);
        let (_b, tb, admin_b) = proxy(dir, &redis, "proxy-b", 10_000, 1);
        let (_c, tc, admin_c) = proxy(dir, &redis, "proxy-c", 10_000, 1);
        let _g1 = agent(dir, "agent-1", tb, echo.addr);
        let _g2 = agent(dir, "agent-2", tc, echo.addr);
        eventually("every proxy knows both agents", || {
            routes_of(admin_a, "agent-1") == ["proxy-b"]
                && routes_of(admin_a, "agent-2") == ["proxy-c"]
                && routes_of(admin_b, "agent-1") == ["local"]
                && routes_of(admin_b, "agent-2") == ["proxy-c"]
                && routes_of(admin_c, "agent-1") == ["proxy-b"]
                && routes_of(admin_c, "agent-2") == ["local"]
        });
        let out = Command::new(BIN)
            .args(["routes", "--backend", &redis.url(), "--cluster", "demo", "--json", "list"])
            .output()
            .unwrap();
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(rows.as_array().unwrap().len(), 2, "{rows}");
        let out = Command::new(BIN)
            .args(["routes", "--backend", &redis.url(), "--cluster", "demo", "proxies"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(["proxy-a", "proxy-b", "proxy-c"].iter().all(|p| text.contains(p)), "{text}");
    }

    #[test]
    fn a_proxy_killed_with_sigkill_has_its_routes_expire_everywhere() {
        let redis = Redis::start();
        let certs = CertDir::temp().unwrap();
        let dir = &certs.path;
        let echo = targets::spawn(Kind::Echo).unwrap();
        let (_a, _, admin_a) = proxy(dir, &redis, "proxy-a", 1_500, 1);
        let (b, tb, _) = proxy(dir, &redis, "proxy-b", 1_500, 1);
        let _g1 = agent(dir, "agent-1", tb, echo.addr);
        eventually("A routes agent-1 via B", || routes_of(admin_a, "agent-1") == ["proxy-b"]);
        drop(b); // SIGKILL: B never cleans up.
        let t0 = Instant::now();
        eventually("B's routes expire on A", || !routes_of(admin_a, "agent-1").contains(&"proxy-b".to_string()));
        let took = t0.elapsed();
        assert!(took < Duration::from_millis(1_500 + 700), "expired after {took:?}, TTL is 1.5 s");
        assert!(routes_json(admin_a)["proxies"]["proxy-b"].is_null());
        // With agent_connection_count = 1 the agent replaces its lost tunnel.
        eventually("the agent moved to A", || routes_of(admin_a, "agent-1") == ["local"]);
        eprintln!("proxy-b's routes left A's view {took:?} after kill -9 (TTL 1.5 s)");
    }
}
