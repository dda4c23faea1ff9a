//! Route propagation latency through Redis.
//!
//! `cargo bench --bench route_propagation [-- --json FILE]` starts a
//! `redis-server` on a free port and two control threads (proxy-a, proxy-b)
//! exactly as proxies run them. For each of 300 agents it reports a tunnel
//! up on B and measures the time until A's shards receive a snapshot with
//! the route (then the same for the tunnel going down): B's write, Redis,
//! A's XREAD, A's rebuild and publish. Then, for 300 grants written and
//! revoked by a third connection (as `ringpeer grants` or another control
//! plane would), the time until *both* proxies publish a snapshot with the
//! change. Prints p50/p99/max.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::Receiver;
use ringpeer::proxy::control::{Control, ControlOpts};
use ringpeer::route::feed::TunnelEvent;
use ringpeer::route::grants::Grant;
use ringpeer::route::model::{ProxyInfo, Strategy};
use ringpeer::route::redis::RedisFactory;
use ringpeer::route::store::StoreFactory;
use ringpeer::route::RouteTable;

type Tables = Receiver<Arc<RouteTable>>;

fn control(id: &str, url: &str) -> (Control, Tables) {
    let (tx, rx) = crossbeam::channel::unbounded();
    let opts = ControlOpts {
        me: ProxyInfo {
            id: id.into(),
            peer_addrs: vec!["127.0.0.1:1".into()],
            tunnel_addr: "t".into(),
            client_addr: "c".into(),
            version: 1,
            draining: false,
            build: String::new(),
        },
        ttl: Duration::from_secs(10),
        resync: Duration::from_secs(30),
        strategy: Strategy::AgentMesh,
    };
    let f = Arc::new(RedisFactory::new(url, "bench", 10_000).unwrap());
    let publish = Box::new(move |t| {
        let _ = tx.send(t);
    });
    (Control::spawn(opts, f, publish, Default::default()).unwrap(), rx)
}

fn wait_until(tables: &mut Tables, pred: impl Fn(&RouteTable) -> bool) {
    while let Ok(t) = tables.recv() {
        if pred(&t) {
            return;
        }
    }
}

fn main() {
    let json_out = std::env::args().skip_while(|a| a != "--json").nth(1);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut redis = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be installed");
    let url = format!("redis://127.0.0.1:{port}");
    std::thread::sleep(Duration::from_millis(300));
    let (a, mut a_in) = control("proxy-a", &url);
    let (b, mut b_in) = control("proxy-b", &url);
    wait_until(&mut a_in, |t| t.proxies.contains_key("proxy-b"));
    let mut up = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut down = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for i in 0..300u64 {
        let agent = format!("agent-{i}");
        let t0 = Instant::now();
        b.events
            .send(TunnelEvent::TunnelUp {
                agent: agent.clone(),
                shard: 1,
                conn: i,
                services: vec!["ssh".to_string()].into(),
            })
            .unwrap();
        wait_until(&mut a_in, |t| t.get(&agent).is_some_and(|r| r.remote.iter().any(|x| &*x.proxy == "proxy-b")));
        up.record(t0.elapsed().as_micros() as u64).ok();
        let t0 = Instant::now();
        b.events.send(TunnelEvent::TunnelDown { agent: agent.clone(), conn: i }).unwrap();
        // Gone from A's routes to B. (The entry itself stays, marked
        // moving, for MOVE_GRACE: dials wait for the agent instead of
        // failing; that is not propagation.)
        wait_until(&mut a_in, |t| t.get(&agent).is_none_or(|r| r.remote.iter().all(|x| &*x.proxy != "proxy-b")));
        down.record(t0.elapsed().as_micros() as u64).ok();
    }
    // Grants: written by a separate connection; applied when both proxies
    // published a table with (or without) the grant.
    let mut writer = RedisFactory::new(&url, "bench", 10_000).unwrap().connect().unwrap();
    let mut g_up = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut g_down = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    while b_in.try_recv().is_ok() {}
    for i in 0..300u64 {
        let name = format!("grant-{i}");
        let client = format!("client-{i}");
        let g = Grant::new(&name, std::slice::from_ref(&client), &["db-*".into()], &["postgres".into()]).unwrap();
        let t0 = Instant::now();
        writer.put_grant(&g).unwrap();
        let has = |t: &RouteTable| t.grants.allows(&client, "db-1", "postgres").is_some();
        wait_until(&mut a_in, has);
        wait_until(&mut b_in, has);
        g_up.record(t0.elapsed().as_micros() as u64).ok();
        let t0 = Instant::now();
        writer.remove_grant(&name, false).unwrap();
        wait_until(&mut a_in, |t| !has(t));
        wait_until(&mut b_in, |t| !has(t));
        g_down.record(t0.elapsed().as_micros() as u64).ok();
    }
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let report = |what: &str, h: &hdrhistogram::Histogram<u64>| {
        let max = h.max() as f64 / 1000.0;
        let label = format!("{what}:");
        println!("{label:<34} p50 {:.2} ms  p99 {:.2} ms  max {max:.2} ms", ms(h, 0.5), ms(h, 0.99));
    };
    report("grant written -> on A and B", &g_up);
    report("grant revoked -> gone on A and B", &g_down);
    report("route up on B -> visible on A", &up);
    report("route down on B -> gone on A", &down);
    if let Some(p) = json_out {
        let j = serde_json::json!({
            "samples": 300,
            "up_ms": {"p50": ms(&up, 0.5), "p99": ms(&up, 0.99), "max": up.max() as f64 / 1000.0},
            "down_ms": {"p50": ms(&down, 0.5), "p99": ms(&down, 0.99), "max": down.max() as f64 / 1000.0},
            "grant_up_ms": {"p50": ms(&g_up, 0.5), "p99": ms(&g_up, 0.99), "max": g_up.max() as f64 / 1000.0},
            "grant_down_ms": {"p50": ms(&g_down, 0.5), "p99": ms(&g_down, 0.99), "max": g_down.max() as f64 / 1000.0},
        });
        std::fs::write(p, serde_json::to_string_pretty(&j).unwrap()).unwrap();
    }
    a.stop();
    b.stop();
    let _ = redis.kill();
    let _ = redis.wait();
}
