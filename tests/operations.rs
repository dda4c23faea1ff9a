//! Operations stories: a tunnel is reachable from every shard the moment it
//! is usable on its own, the admin endpoint cannot be stalled, and a proxy
//! that cannot load its routes says why on /readyz.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis_server::Redis;
use ringpeer::config::BackendKind;
use ringpeer::route::model::{AgentRoute, ProxyInfo, Strategy};
use ringpeer::route::store::{Loaded, MemoryStore, Read as StoreRead, RouteStore, StoreFactory, StreamId};
use ringpeer::tools::fleet::{agent_config, proxy_config, AgentHandle, CertDir, ProxyHandle};
use ringpeer::tools::load::echo_roundtrip;
use ringpeer::tools::target::{self as targets, Kind};
use ringpeer::wire::DialTarget;

fn t(s: &str) -> DialTarget {
    DialTarget::parse(s).unwrap()
}

/// A memory store whose announced route writes take `delay` (a slow or
/// distant Redis): the control thread publishes a new tunnel's table only
/// after that write.
struct SlowStore {
    inner: MemoryStore,
    delay: Duration,
}

struct SlowConn {
    inner: Box<dyn RouteStore>,
    delay: Duration,
}

impl StoreFactory for SlowStore {
    fn connect(&self) -> anyhow::Result<Box<dyn RouteStore>> {
        Ok(Box::new(SlowConn { inner: self.inner.connect()?, delay: self.delay }))
    }
    fn describe(&self) -> String {
        "slow memory".into()
    }
}

impl RouteStore for SlowConn {
    fn put_proxy(&mut self, info: &ProxyInfo, ttl: Duration) -> anyhow::Result<()> {
        self.inner.put_proxy(info, ttl)
    }
    fn remove_proxy(&mut self, id: &str) -> anyhow::Result<()> {
        self.inner.remove_proxy(id)
    }
    fn put_route(&mut self, agent: &str, route: &AgentRoute, announce: bool) -> anyhow::Result<()> {
        if announce {
            std::thread::sleep(self.delay);
        }
        self.inner.put_route(agent, route, announce)
    }
    fn remove_route(&mut self, agent: &str, proxy: &str, announce: bool) -> anyhow::Result<()> {
        self.inner.remove_route(agent, proxy, announce)
    }
    fn seed_strategy(&mut self, s: Strategy) -> anyhow::Result<Strategy> {
        self.inner.seed_strategy(s)
    }
    fn set_strategy(&mut self, s: Strategy) -> anyhow::Result<()> {
        self.inner.set_strategy(s)
    }
    fn put_grant(&mut self, g: &ringpeer::route::grants::Grant) -> anyhow::Result<()> {
        self.inner.put_grant(g)
    }
    fn remove_grant(&mut self, name: &str, kill_streams: bool) -> anyhow::Result<bool> {
        self.inner.remove_grant(name, kill_streams)
    }
    fn load(&mut self) -> anyhow::Result<Loaded> {
        self.inner.load()
    }
    fn read(&mut self, after: StreamId, block: Duration) -> anyhow::Result<StoreRead> {
        self.inner.read(after, block)
    }
}

#[test]
fn a_tunnel_is_reachable_from_a_sibling_shard_as_soon_as_it_is_usable() {
    // The rare wrong NOT_FOUND: sibling shards used to learn of a tunnel
    // only from the control thread's next table, published after its backend
    // write. Here that write takes 1.5 s, the tunnel port is open only on
    // shard 0 and the client port only on shard 1: 200 dials fired the
    // moment shard 0 holds the tunnel must all reach the agent.
    ringpeer::runtime::raise_memlock();
    let certs = CertDir::temp().unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    let cfg = proxy_config(&certs.path, "proxy-a", 2);
    let listeners = common::split_shards(1);
    let store = Arc::new(SlowStore { inner: MemoryStore::new(1000), delay: Duration::from_millis(1500) });
    let proxy = ProxyHandle::start_full(cfg, listeners, Some(store)).unwrap();
    let (metrics, tunnel_addr, dir) = (proxy.metrics.clone(), proxy.tunnel_addr, certs.path.clone());
    let (failures, first_after, _agent) =
        common::with_client(proxy.client_addr, &certs.path, "client", move |c| async move {
            // The client is connected (to shard 1) before the agent starts.
            let agent =
                AgentHandle::start(agent_config(&dir, "agent-1", &[tunnel_addr], &[("echo", echo.addr)])).unwrap();
            let t0 = Instant::now();
            while metrics.shards[0].tunnels.get() < 1 {
                assert!(t0.elapsed() < Duration::from_secs(10), "the tunnel never came up");
                glommio::timer::sleep(Duration::from_micros(200)).await;
            }
            let up = Instant::now();
            let mut handles = Vec::new();
            for i in 0..200u32 {
                let c = c.clone();
                handles.push(glommio::spawn_local(async move {
                    let msg = i.to_be_bytes();
                    echo_roundtrip(&c, &t("agent-1/echo"), &msg).await.map(|b| b == msg)
                }));
            }
            let mut failures = Vec::new();
            for h in handles {
                match h.await {
                    Ok(true) => {}
                    other => failures.push(format!("{other:?}")),
                }
            }
            (failures, up.elapsed(), (agent, echo))
        });
    eprintln!("200 dials on the sibling shard, answered within {first_after:?} of the tunnel coming up");
    assert!(failures.is_empty(), "{} of 200 dials failed, first: {}", failures.len(), failures[0]);
    assert!(first_after < Duration::from_millis(1500), "answered before the control thread's table: {first_after:?}");
    assert_eq!(proxy.metrics.shards[1].dials_cross_shard.get(), 200);
}

/// A proxy with an admin endpoint; returns it and the admin address.
fn proxy_with_admin(
    certs: &CertDir,
    cfg_edit: impl FnOnce(&mut ringpeer::config::ProxyConfig),
) -> (ProxyHandle, SocketAddr) {
    let mut cfg = proxy_config(&certs.path, "proxy-a", 1);
    cfg.admin_addr = Some("127.0.0.1:0".into());
    cfg_edit(&mut cfg);
    let l = ringpeer::Listeners::bind(&cfg).unwrap();
    let admin = l.admin.as_ref().unwrap().local_addr().unwrap();
    (ProxyHandle::start_with(cfg, l).unwrap(), admin)
}

/// One admin request: (status, body, time taken).
fn get(addr: SocketAddr, path: &str) -> (u16, String, Duration) {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body, t0.elapsed())
}

#[test]
fn stalled_admin_clients_delay_neither_other_clients_nor_shutdown() {
    let certs = CertDir::temp().unwrap();
    let (proxy, admin) = proxy_with_admin(&certs, |_| {});
    let (status, _, idle) = get(admin, "/metrics");
    assert_eq!(status, 200);
    // One client connects and never sends; one asks for /metrics and never
    // reads (its receive buffer as small as the kernel allows).
    let silent = TcpStream::connect(admin).unwrap();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(1).unwrap();
    sock.connect(&admin.into()).unwrap();
    let mut deaf: TcpStream = sock.into();
    deaf.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // A third client is served as fast as ever.
    let (status, body, took) = get(admin, "/metrics");
    eprintln!("/metrics idle {idle:?}, beside two stalled clients {took:?}");
    assert_eq!(status, 200);
    assert!(body.contains("ringpeer_"), "{body}");
    assert!(took < Duration::from_millis(500), "a stalled client delayed /metrics to {took:?}");
    // So many silent clients that every slot is taken: the next one is
    // refused at once, naming the limit, never queued behind them.
    let flood: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(admin).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));
    let (status, body, took) = get(admin, "/readyz");
    eprintln!("/readyz beside 22 stalled clients: {status} in {took:?}");
    assert_eq!(status, 503);
    let limit = format!("{} admin connections already open", ringpeer::runtime::admin_http::MAX_CONNS);
    assert!(body.contains(&limit), "{body}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    // Shutdown does not wait for any of them.
    let t0 = Instant::now();
    proxy.stop().unwrap();
    let stop = t0.elapsed();
    eprintln!("proxy stopped in {stop:?} with 22 stalled admin clients");
    assert!(stop < Duration::from_millis(1500), "stalled admin clients delayed shutdown to {stop:?}");
    drop((silent, deaf, flood));
}

#[test]
fn readyz_says_why_routes_are_not_loaded_until_the_backend_answers() {
    let mut redis = Redis::start();
    redis.kill();
    let certs = CertDir::temp().unwrap();
    let url = redis.url();
    let (proxy, admin) = proxy_with_admin(&certs, |c| {
        c.backend.kind = BackendKind::Redis;
        c.backend.url = Some(url);
        c.grants.clear();
    });
    // Redis is down: the proxy is not ready and says why.
    common::eventually("readyz names the unreachable backend", || {
        let (status, body, _) = get(admin, "/readyz");
        status == 503 && body.contains("unreachable") && body.contains("no routes loaded yet")
    });
    let (_, body, _) = get(admin, "/readyz");
    eprintln!("readyz while redis is down: {body}");
    assert!(body.contains(&redis.url()), "{body}");
    // Redis comes up: ready, with the routes version it serves.
    redis.restart();
    // (Reads and writes reconnect each on its own backoff: 200 "degraded"
    // may come first, while writes still fail.)
    common::eventually("readyz turns 200 once synced", || {
        let (status, body, _) = get(admin, "/readyz");
        status == 200 && body.starts_with("ok: synced")
    });
    let (_, body, _) = get(admin, "/readyz");
    eprintln!("readyz once synced: {body}");
    assert!(body.starts_with("ok: synced with redis"), "{body}");
    assert!(proxy.routes().backend_up);
    // Redis dies again: still ready (it serves the last snapshot; a
    // backend outage must not take the whole fleet out of the load
    // balancer), degraded, and it says so.
    redis.kill();
    common::eventually("readyz reports the outage", || {
        let (status, body, _) = get(admin, "/readyz");
        status == 200 && body.starts_with("ok (degraded)") && body.contains("serving the last snapshot")
    });
}
